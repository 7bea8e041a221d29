//! The Envoy templates in `envoy/` render and pass `envoy --mode validate`.
//!
//! Validation loads the filter module in V8 with `envoy/demo-filter.json`, so the gateway
//! test also proves that the built filter accepts the demo configuration.

use std::path::PathBuf;

use idemgate_e2e::envoy::{render_file, validate, EnvoyVars};
use idemgate_e2e::{bins, demo_filter_config, EnvoyTemplate};

fn render(template: &EnvoyTemplate, wasm: PathBuf, name: &str) -> anyhow::Result<PathBuf> {
    let dir = idemgate_e2e::workspace_root().join("target/e2e/envoy-config");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("{name}-{}.yaml", std::process::id()));
    let vars = EnvoyVars {
        gateway_port: 10_000,
        admin_port: 10_001,
        upstream_port: 10_002,
        store_port: 10_003,
        filter_wasm: wasm,
        filter_config: demo_filter_config()?,
    };
    render_file(&template.path(), &vars, &out)?;
    Ok(out)
}

#[test]
fn passthrough_template_validates() {
    let envoy = bins::envoy_bin().unwrap();
    let cfg = render(
        &EnvoyTemplate::Passthrough,
        PathBuf::from("/unused.wasm"),
        "passthrough",
    )
    .unwrap();
    validate(&envoy, &cfg).unwrap();
}

#[test]
fn gateway_template_validates_with_the_filter_and_the_demo_config() {
    let envoy = bins::envoy_bin().unwrap();
    let wasm = bins::filter_wasm().unwrap();
    let cfg = render(&EnvoyTemplate::Gateway, wasm, "gateway").unwrap();
    validate(&envoy, &cfg).unwrap();
}
