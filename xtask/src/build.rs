//! `cargo xtask build`: the artifacts the end-to-end tests and the demo run.

use anyhow::Result;

use crate::util::{cargo, run as run_cmd};

/// Build the filter wasm (release) and the host binaries (debug).
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Builds `target/wasm32-wasip1/release/idemgate_filter.wasm`, then
/// `target/debug/idemgate-server` and `target/debug/demo-upstream` (the debug profile
/// `cargo test` shares, so nothing is built twice).
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
    ]))
}

/// Entry point of `cargo xtask build`.
///
/// # Errors
/// See [`run_build`].
pub fn run(_args: &Args) -> Result<()> {
    run_build()
}
