//! `cargo xtask build`: the artifacts the end-to-end tests and the demo run.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::util::{cargo, root, run as run_cmd};

/// Where the built dashboard goes (`index.html`, `style.css`, `pkg/`); the server serves
/// it with `--dashboard-dir`.
pub fn dashboard_dir() -> PathBuf {
    root().join("target/dashboard")
}

/// Build the filter wasm (release), the host binaries (debug) and the dashboard.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Builds `target/wasm32-wasip1/release/idemgate_filter.wasm`, then
/// `target/debug/idemgate-server` and `target/debug/demo-upstream` (the debug profile
/// `cargo test` shares, so nothing is built twice), then the dashboard
/// ([`build_dashboard`]).
///
/// # Errors
/// A cargo build fails.
pub fn run_build() -> Result<()> {
    run_cmd(cargo().args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip1",
        "-p",
        "idemgate-filter",
    ]))?;
    run_cmd(cargo().args([
        "build",
        "-p",
        "idemgate-server",
        "-p",
        "idemgate-e2e",
        "--bins",
    ]))?;
    build_dashboard()
}

/// Builds the dashboard: `idemgate-dashboard` for wasm32-unknown-unknown (release), then
/// `wasm-bindgen --target web` into `target/dashboard/pkg/`, plus `index.html` and
/// `style.css` copied to `target/dashboard/`.
///
/// # Errors
/// The build fails, or wasm-bindgen is missing (run `cargo xtask setup`).
pub fn build_dashboard() -> Result<()> {
    let root = root();
    run_cmd(cargo().args([
        "build",
        "--release",
        "--target",
        "wasm32-unknown-unknown",
        "-p",
        "idemgate-dashboard",
    ]))?;
    let bindgen = crate::setup::wasm_bindgen_bin(&root);
    if !bindgen.is_file() {
        bail!(
            "{} is missing; run `cargo xtask setup` (it installs wasm-bindgen-cli)",
            bindgen.display()
        );
    }
    let out = dashboard_dir();
    let pkg = out.join("pkg");
    // Stale files from an older build must not be served.
    let _ = std::fs::remove_dir_all(&pkg);
    std::fs::create_dir_all(&pkg).with_context(|| format!("creating {}", pkg.display()))?;
    run_cmd(
        std::process::Command::new(&bindgen)
            .args(["--target", "web", "--no-typescript", "--out-dir"])
            .arg(&pkg)
            .arg(root.join("target/wasm32-unknown-unknown/release/idemgate_dashboard.wasm")),
    )?;
    for file in ["index.html", "style.css"] {
        let from = root.join("dashboard").join(file);
        std::fs::copy(&from, out.join(file))
            .with_context(|| format!("copying {} to {}", from.display(), out.display()))?;
    }
    println!("build: dashboard in {}", out.display());
    Ok(())
}

/// Entry point of `cargo xtask build`.
///
/// # Errors
/// See [`run_build`].
pub fn run(_args: &Args) -> Result<()> {
    run_build()
}
