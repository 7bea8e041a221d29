//! Where the harness finds the programs it starts.
//!
//! Each binary comes from an environment variable or, when it is unset, from a default
//! under the workspace root (`cargo xtask build` puts them there; `cargo xtask setup`
//! installs Envoy and redis-server).

use std::env;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Env var: path to the Envoy binary.
pub const ENVOY_BIN_ENV: &str = "IDEMGATE_ENVOY_BIN";
/// Env var: path to the filter's `.wasm`.
pub const FILTER_WASM_ENV: &str = "IDEMGATE_FILTER_WASM";
/// Env var: path to the `idemgate-server` binary.
pub const SERVER_BIN_ENV: &str = "IDEMGATE_SERVER_BIN";
/// Env var: path to the `demo-upstream` binary.
pub const UPSTREAM_BIN_ENV: &str = "IDEMGATE_UPSTREAM_BIN";
/// Env var: path to `redis-server`.
pub const REDIS_SERVER_ENV: &str = "IDEMGATE_REDIS_SERVER";

/// The workspace root (the directory holding the workspace `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// The Envoy binary inside the project venv (`.tools/venv/lib/python*/site-packages/envoy/_bin/envoy`),
/// if the venv has one.
pub fn venv_envoy(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".tools/venv/lib");
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .filter(|p| p.is_file())
        .collect();
    candidates.sort();
    candidates.pop()
}

/// Looks `name` up on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The five programs a [`crate::Stack`] runs, all checked to exist.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Envoy 1.40 (`IDEMGATE_ENVOY_BIN`, default the project venv's).
    pub envoy: PathBuf,
    /// The filter module (`IDEMGATE_FILTER_WASM`, default
    /// `target/wasm32-wasip1/release/idemgate_filter.wasm`).
    pub filter_wasm: PathBuf,
    /// `idemgate-server` (`IDEMGATE_SERVER_BIN`, default `target/debug/idemgate-server`).
    pub server: PathBuf,
    /// `demo-upstream` (`IDEMGATE_UPSTREAM_BIN`, default `target/debug/demo-upstream`).
    pub upstream: PathBuf,
    /// `redis-server` (`IDEMGATE_REDIS_SERVER`, default the one on `PATH`).
    pub redis_server: PathBuf,
}

fn resolve(var: &str, default: Option<PathBuf>, what: &str, hint: &str) -> Result<PathBuf> {
    let (path, source) = match env::var_os(var) {
        Some(v) if !v.is_empty() => (Some(PathBuf::from(v)), format!("${var}")),
        _ => (default, "the default location".to_owned()),
    };
    match path {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => bail!(
            "{what} not found at {} (from {source}); {hint}, or set {var}",
            p.display()
        ),
        None => bail!("{what} not found; {hint}, or set {var}"),
    }
}

const BUILD_HINT: &str = "run `cargo xtask test` (or `cargo xtask build`) first";
const SETUP_HINT: &str = "run `cargo xtask test` (or `cargo xtask setup`) first";

/// The Envoy binary: `$IDEMGATE_ENVOY_BIN`, else the project venv's.
///
/// # Errors
/// It does not exist; the message says to run `cargo xtask setup`.
pub fn envoy_bin() -> Result<PathBuf> {
    resolve(
        ENVOY_BIN_ENV,
        venv_envoy(&workspace_root()),
        "the Envoy binary",
        SETUP_HINT,
    )
}

/// The filter module: `$IDEMGATE_FILTER_WASM`, else
/// `target/wasm32-wasip1/release/idemgate_filter.wasm`.
///
/// # Errors
/// It does not exist; the message says to run `cargo xtask build`.
pub fn filter_wasm() -> Result<PathBuf> {
    let default = workspace_root().join("target/wasm32-wasip1/release/idemgate_filter.wasm");
    resolve(
        FILTER_WASM_ENV,
        Some(default),
        "the filter wasm",
        BUILD_HINT,
    )
}

/// `idemgate-server`: `$IDEMGATE_SERVER_BIN`, else `target/debug/idemgate-server`.
///
/// # Errors
/// It does not exist; the message says to run `cargo xtask build`.
pub fn server_bin() -> Result<PathBuf> {
    let default = workspace_root().join("target/debug/idemgate-server");
    resolve(
        SERVER_BIN_ENV,
        Some(default),
        "the idemgate-server binary",
        BUILD_HINT,
    )
}

/// `demo-upstream`: `$IDEMGATE_UPSTREAM_BIN`, else `target/debug/demo-upstream`.
///
/// # Errors
/// It does not exist; the message says to run `cargo xtask build`.
pub fn upstream_bin() -> Result<PathBuf> {
    let default = workspace_root().join("target/debug/demo-upstream");
    resolve(
        UPSTREAM_BIN_ENV,
        Some(default),
        "the demo-upstream binary",
        BUILD_HINT,
    )
}

/// `redis-server`: `$IDEMGATE_REDIS_SERVER`, else the one on `PATH`.
///
/// # Errors
/// It does not exist; the message says to run `cargo xtask setup`.
pub fn redis_server_bin() -> Result<PathBuf> {
    resolve(
        REDIS_SERVER_ENV,
        find_on_path("redis-server"),
        "redis-server",
        SETUP_HINT,
    )
}

impl Binaries {
    /// Resolves every binary from the environment or the defaults.
    ///
    /// # Errors
    /// Names the first missing binary and says how to get it (`cargo xtask test`,
    /// which runs `cargo xtask setup` and `cargo xtask build`).
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            envoy: envoy_bin()?,
            filter_wasm: filter_wasm()?,
            server: server_bin()?,
            upstream: upstream_bin()?,
            redis_server: redis_server_bin()?,
        })
    }
}
