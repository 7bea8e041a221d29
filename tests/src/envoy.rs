//! Envoy config templates (`envoy/*.yaml`) and their placeholders.
//!
//! A template holds `{{NAME}}` placeholders. Ports are substituted as numbers;
//! `FILTER_WASM` and `FILTER_CONFIG` as JSON string literals, which are valid YAML
//! double-quoted scalars (so any path and any JSON config survive the substitution).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::bins::workspace_root;

/// Which template to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvoyTemplate {
    /// `envoy/gateway.yaml`: the idemgate wasm filter, then the router.
    Gateway,
    /// `envoy/passthrough.yaml`: the same Envoy without the filter (benchmark baseline).
    Passthrough,
    /// Any other template file.
    File(PathBuf),
}

impl EnvoyTemplate {
    /// The template file.
    pub fn path(&self) -> PathBuf {
        match self {
            EnvoyTemplate::Gateway => workspace_root().join("envoy/gateway.yaml"),
            EnvoyTemplate::Passthrough => workspace_root().join("envoy/passthrough.yaml"),
            EnvoyTemplate::File(p) => p.clone(),
        }
    }
}

/// The values substituted into a template.
#[derive(Debug, Clone)]
pub struct EnvoyVars {
    /// Listener port clients use (`{{GATEWAY_PORT}}`).
    pub gateway_port: u16,
    /// Envoy admin port (`{{ADMIN_PORT}}`).
    pub admin_port: u16,
    /// Demo upstream port (`{{UPSTREAM_PORT}}`).
    pub upstream_port: u16,
    /// idemgate server store-API port (`{{STORE_PORT}}`).
    pub store_port: u16,
    /// The filter module (`{{FILTER_WASM}}`).
    pub filter_wasm: PathBuf,
    /// The filter configuration (`{{FILTER_CONFIG}}`), passed to the plugin as a JSON string.
    pub filter_config: serde_json::Value,
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Substitutes every placeholder of `template`.
///
/// # Errors
/// A `{{...}}` placeholder the harness does not know is left in the output.
pub fn render(template: &str, vars: &EnvoyVars) -> Result<String> {
    let config =
        serde_json::to_string(&vars.filter_config).context("serializing the filter config")?;
    let pairs = [
        ("{{GATEWAY_PORT}}", vars.gateway_port.to_string()),
        ("{{ADMIN_PORT}}", vars.admin_port.to_string()),
        ("{{UPSTREAM_PORT}}", vars.upstream_port.to_string()),
        ("{{STORE_PORT}}", vars.store_port.to_string()),
        (
            "{{FILTER_WASM}}",
            json_string(&vars.filter_wasm.to_string_lossy()),
        ),
        ("{{FILTER_CONFIG}}", json_string(&config)),
    ];
    let mut out = template.to_owned();
    for (placeholder, value) in &pairs {
        out = out.replace(placeholder, value);
    }
    if let Some(start) = out.find("{{") {
        let rest = &out[start..];
        let end = rest.find("}}").map(|e| e + 2).unwrap_or(rest.len().min(40));
        bail!(
            "unknown placeholder {} left in the Envoy template",
            &rest[..end]
        );
    }
    Ok(out)
}

/// Reads `template`, renders it and writes the result to `out`.
///
/// # Errors
/// The template cannot be read, has an unknown placeholder, or `out` cannot be written.
pub fn render_file(template: &Path, vars: &EnvoyVars, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(template)
        .with_context(|| format!("reading the Envoy template {}", template.display()))?;
    let rendered =
        render(&text, vars).with_context(|| format!("rendering {}", template.display()))?;
    std::fs::write(out, rendered).with_context(|| format!("writing {}", out.display()))
}

/// Runs `envoy --mode validate -c config`.
///
/// # Errors
/// Envoy cannot run, or rejects the config (the message holds Envoy's output).
pub fn validate(envoy_bin: &Path, config: &Path) -> Result<()> {
    let out = Command::new(envoy_bin)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warn",
            "-c",
        ])
        .arg(config)
        .output()
        .with_context(|| format!("running {}", envoy_bin.display()))?;
    if !out.status.success() {
        bail!(
            "envoy rejected {} ({}):\n{}{}",
            config.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Parses Envoy's plain-text `/stats` output into `name -> value` for counters and
/// gauges (histogram lines, which are not integers, are skipped).
pub fn parse_stats(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(": ")?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> EnvoyVars {
        EnvoyVars {
            gateway_port: 1,
            admin_port: 2,
            upstream_port: 3,
            store_port: 4,
            filter_wasm: PathBuf::from("/x/a \"b\".wasm"),
            filter_config: serde_json::json!({"routes": [{"name": "p\"q"}]}),
        }
    }

    #[test]
    fn renders_ports_and_quotes_strings() {
        let out = render("p: {{GATEWAY_PORT}} {{ADMIN_PORT}} {{UPSTREAM_PORT}} {{STORE_PORT}}\nf: {{FILTER_WASM}}\nc: {{FILTER_CONFIG}}\n", &vars()).unwrap();
        assert!(out.starts_with("p: 1 2 3 4\n"), "{out}");
        assert!(out.contains(r#"f: "/x/a \"b\".wasm""#), "{out}");
        assert!(
            out.contains(r#"c: "{\"routes\":[{\"name\":\"p\\\"q\"}]}""#),
            "{out}"
        );
    }

    #[test]
    fn unknown_placeholder_is_an_error() {
        let err = render("x: {{NOPE}}", &vars()).unwrap_err().to_string();
        assert!(err.contains("{{NOPE}}"), "{err}");
    }

    #[test]
    fn stats_parse_counters_and_skip_histograms() {
        let s = parse_stats("http.ingress.downstream_rq_total: 3\ncluster.upstream.upstream_rq_time: P0(nan,1) P25(nan,2)\nserver.live: 1\n");
        assert_eq!(s.get("http.ingress.downstream_rq_total"), Some(&3));
        assert_eq!(s.get("server.live"), Some(&1));
        assert_eq!(s.len(), 2);
    }
}
