//! `cargo xtask fuzz`: a bounded libFuzzer run of every target in `fuzz/` (the CI smoke
//! run), without cargo-fuzz.
//!
//! cargo-fuzz compiles for minutes from crates.io, so the targets are built here the way it
//! builds them: `cargo +nightly build --release` for the host target (so build scripts and
//! proc macros stay uninstrumented) with its SanitizerCoverage flags, debug assertions and
//! overflow checks. No AddressSanitizer: the code under test has no `unsafe`, and ASan
//! doubles the build and halves the speed. `cargo fuzz run TARGET` also works for longer,
//! ASan-instrumented sessions.
//!
//! Each target starts from its committed seeds (`fuzz/seeds/TARGET`) and the local corpus
//! (`fuzz/corpus/TARGET`, git-ignored, grows with every run). A crash, panic, timeout or
//! out-of-memory fails the task and leaves the input in `fuzz/artifacts/TARGET/`; replay it
//! with `fuzz/target/x86_64-unknown-linux-gnu/release/TARGET FILE`. When nightly or the
//! fuzz dependencies cannot be installed, the task prints a WARNING and succeeds.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::util::{display, output, root, status};

/// The fuzz targets, as named in fuzz/Cargo.toml.
pub const TARGETS: [&str; 5] = [
    "key",
    "filter_config",
    "canonical_json",
    "filter_store_reply",
    "server_store_call",
];

/// What cargo-fuzz passes to rustc (its defaults, without a sanitizer).
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// Run each fuzz target for a while on nightly (installed with rustup when missing).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
}

/// Entry point of `cargo xtask fuzz`.
///
/// # Errors
/// A target does not build, or a run found a crash (or could not start).
pub fn run(args: &Args) -> Result<ExitCode> {
    let started = Instant::now();
    if let Err(why) = tooling() {
        println!("WARNING: fuzz: skipped, {why:#}");
        return Ok(ExitCode::SUCCESS);
    }
    let fuzz = root().join("fuzz");
    let triple = host_triple()?;
    let mut build = nightly_cargo(&fuzz);
    build
        .args(["build", "--release", "--bins", "--target"])
        .arg(&triple)
        .env("RUSTFLAGS", RUSTFLAGS);
    let st = status(&mut build)?;
    if !st.success() {
        bail!("fuzz: building the targets failed ({st})");
    }
    println!(
        "fuzz: targets built after {} s",
        started.elapsed().as_secs()
    );

    let bin_dir = fuzz.join("target").join(&triple).join("release");
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let mut crashed = Vec::new();
    for target in targets {
        if !run_target(&fuzz, &bin_dir, target, args.seconds)? {
            crashed.push(target);
        }
    }
    println!("fuzz: finished after {} s", started.elapsed().as_secs());
    if !crashed.is_empty() {
        bail!(
            "fuzz: {} found a crash; inputs in fuzz/artifacts/",
            crashed.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cargo` of the nightly toolchain, in `dir`, without the variables the outer (stable)
/// cargo set for xtask.
fn nightly_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]).current_dir(dir);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Nightly (installed when missing), a C++ compiler for libFuzzer, and the crates.
fn tooling() -> Result<()> {
    let has_nightly = |cmd: &mut Command| output(cmd).is_some();
    if !has_nightly(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("fuzz: installing the nightly toolchain (rustup, minimal profile)");
        let st = status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            // Never replace the machine's rustup as a side effect.
            "--no-self-update",
        ]))
        .context("rustup is not available")?;
        if !st.success() {
            bail!("`rustup toolchain install nightly --profile minimal` failed ({st})");
        }
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if output(Command::new(&cxx).arg("--version")).is_none() {
        bail!("no C++ compiler ({cxx}) to build libFuzzer; install g++");
    }
    let mut fetch = nightly_cargo(&root().join("fuzz"));
    fetch.arg("fetch");
    let st = status(&mut fetch)?;
    if !st.success() {
        bail!("`{}` failed ({st})", display(&fetch));
    }
    Ok(())
}

fn host_triple() -> Result<String> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("`rustc +nightly -vV` failed")?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc +nightly -vV` names no host")
}

/// Runs one target; `false` when libFuzzer found a crash.
fn run_target(fuzz: &Path, bin_dir: &Path, target: &str, seconds: u64) -> Result<bool> {
    let corpus = fuzz.join("corpus").join(target);
    let seeds = fuzz.join("seeds").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    let logs = fuzz.join("target").join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new(bin_dir.join(target));
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .arg(&seeds)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!("$ {}", display(&cmd));
    let st = cmd
        .status()
        .with_context(|| format!("cannot run the fuzz target {target}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
            .to_owned()
    };
    let corpus_size = std::fs::read_dir(&corpus).map_or(0, Iterator::count);
    if st.success() {
        println!(
            "fuzz: {target}: {} executions in {seconds} s ({}/s), corpus {corpus_size}, no crash",
            stat("number_of_executed_units"),
            stat("average_exec_per_sec"),
        );
        return Ok(true);
    }
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("  {line}");
    }
    eprintln!(
        "fuzz: {target} FAILED ({st}); log {}, input in {}",
        log_path.display(),
        artifacts.display()
    );
    Ok(false)
}
