//! `cargo xtask test`: unit tests plus the end-to-end tests on real Envoy, Redis and server.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use idemgate_e2e::bins::{
    venv_envoy, ENVOY_BIN_ENV, FILTER_WASM_ENV, REDIS_SERVER_ENV, SERVER_BIN_ENV, UPSTREAM_BIN_ENV,
};

use crate::util::{cargo, root, status};

/// Setup, build, then `cargo test --workspace --no-fail-fast` with the IDEMGATE_* binaries set.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments passed on to `cargo test` (after `--`), e.g. `-- -p idemgate-e2e smoke`
    /// or `-- -- --nocapture`. With `-p`/`--package` the `--workspace` flag is dropped.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// Entry point of `cargo xtask test`; the exit code is cargo test's.
///
/// # Errors
/// Setup or the build fails, or cargo cannot be started.
pub fn run(args: &Args) -> Result<ExitCode> {
    let started = Instant::now();
    let result = run_inner(args);
    eprintln!(
        "xtask test: wall time {:.1} s",
        started.elapsed().as_secs_f64()
    );
    result
}

fn run_inner(args: &Args) -> Result<ExitCode> {
    crate::setup::run_setup()?;
    crate::build::run_build()?;
    // The dist tests pull target/dist/ from a registry and serve it to Envoy; the committed
    // schema is not regenerated here, so its staleness test can fail.
    crate::dist::run_dist(true, false, env!("CARGO_PKG_REPOSITORY"))?;
    let root = root();
    // Each stack keeps its logs in target/e2e/<test>-...; prune old runs, but leave recent
    // ones alone: another `cargo test` may be using the same target directory right now.
    let e2e = root.join("target/e2e");
    prune_older_than(&e2e, Duration::from_secs(3600));
    let envoy =
        venv_envoy(&root).context("envoy is missing after setup; run `cargo xtask setup`")?;
    let redis = idemgate_e2e::bins::find_on_path("redis-server")
        .context("redis-server is missing after setup")?;
    let mut cmd = cargo();
    // Run every test target even when one fails: CI should report all failures at once.
    cmd.args(["test", "--no-fail-fast"]);
    let picks_packages = args
        .cargo_args
        .iter()
        .take_while(|a| a.as_str() != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2));
    if !picks_packages {
        cmd.arg("--workspace");
    }
    cmd.args(&args.cargo_args)
        .env(ENVOY_BIN_ENV, envoy)
        .env(
            FILTER_WASM_ENV,
            root.join("target/wasm32-wasip1/release/idemgate_filter.wasm"),
        )
        .env(SERVER_BIN_ENV, root.join("target/debug/idemgate-server"))
        .env(UPSTREAM_BIN_ENV, root.join("target/debug/demo-upstream"))
        .env(REDIS_SERVER_ENV, redis)
        // The dashboard's browser test must run here (setup installs Chromium), never skip.
        .env("IDEMGATE_REQUIRE_BROWSER", "1");
    let st = status(&mut cmd)?;
    if !st.success() {
        eprintln!(
            "xtask test: cargo test failed ({st}); component logs of each end-to-end stack are in {}",
            e2e.display()
        );
    }
    Ok(st
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from))
}

/// Removes the entries of `dir` last modified more than `age` ago (best effort).
fn prune_older_than(dir: &Path, age: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|d| d > age);
        if old {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}
