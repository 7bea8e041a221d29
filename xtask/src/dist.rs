//! `cargo xtask dist` and `cargo xtask schema`: the release artifacts in `target/dist/`.
//!
//! - `idemgate-filter.wasm` (profile `release-size`: release, optimised for size) and
//!   `idemgate-filter.wasm.sha256` (`sha256sum` format);
//! - the filter's OCI image, compat variant ([`idemgate_e2e::oci`]), as an image layout
//!   (`idemgate-filter.oci/`) and as a tar archive of it (`idemgate-filter.oci.tar`), with
//!   its manifest digest printed and written to `idemgate-filter.oci.digest`;
//! - `idemgate-filter.schema.json`, the configuration's JSON Schema (also regenerated in
//!   `filter/`, where it is committed);
//! - `idemgate-admin.openapi.json`, the admin API's OpenAPI document.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};
use idemgate_e2e::oci::{write_image, ImageMeta};
use sha2::{Digest as _, Sha256};

use crate::util::{cargo, output, root, run as run_cmd};

/// Build the filter for distribution and write every artifact into target/dist/.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Package the module already built at target/wasm32-wasip1/release-size/idemgate_filter.wasm
    /// instead of building it.
    #[arg(long)]
    pub no_build: bool,
    /// `org.opencontainers.image.source` of the image (default: the workspace's
    /// `repository`).
    #[arg(long, default_value = env!("CARGO_PKG_REPOSITORY"))]
    pub source: String,
}

/// Regenerate filter/idemgate-filter.schema.json from the filter's config types.
#[derive(Debug, clap::Args)]
pub struct SchemaArgs {}

/// `target/dist/`.
pub fn dist_dir() -> PathBuf {
    root().join("target/dist")
}

/// The module `cargo build --profile release-size` produces.
pub fn dist_wasm() -> PathBuf {
    root().join("target/wasm32-wasip1/release-size/idemgate_filter.wasm")
}

/// Builds the filter with the `release-size` profile (release, `opt-level = "z"`, no name section).
///
/// # Errors
/// The build fails.
pub fn build_filter() -> Result<()> {
    run_cmd(cargo().args([
        "build",
        "--profile",
        "release-size",
        "--target",
        "wasm32-wasip1",
        "-p",
        "idemgate-filter",
    ]))
}

/// The schema as committed: pretty JSON with a final newline.
///
/// # Errors
/// Serialization fails.
pub fn schema_text() -> Result<String> {
    let schema = idemgate_filter::config::schema();
    Ok(serde_json::to_string_pretty(&schema).context("serializing the schema")? + "\n")
}

/// Writes filter/idemgate-filter.schema.json; returns its path.
///
/// # Errors
/// The file cannot be written.
pub fn write_schema() -> Result<PathBuf> {
    let path = idemgate_e2e::schema::schema_file();
    std::fs::write(&path, schema_text()?).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Entry point of `cargo xtask schema`.
///
/// # Errors
/// See [`write_schema`].
pub fn run_schema(_args: &SchemaArgs) -> Result<()> {
    let path = write_schema()?;
    println!("schema: wrote {}", path.display());
    Ok(())
}

/// `git rev-parse HEAD`, or `unknown` outside a git checkout.
fn git_revision(root: &Path) -> String {
    output(
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["rev-parse", "HEAD"]),
    )
    .map(|s| s.trim().to_owned())
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| "unknown".into())
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Entry point of `cargo xtask dist`.
///
/// # Errors
/// See [`run_dist`].
pub fn run(args: &Args) -> Result<()> {
    run_dist(!args.no_build, true, &args.source)
}

/// Builds the module (when `build`) and writes every artifact into `target/dist/`; with
/// `regenerate_schema` also rewrites the committed schema in `filter/` (`cargo xtask test`
/// leaves it alone, so the schema test can catch a stale one).
///
/// # Errors
/// The build fails, the module is missing, or a file cannot be written.
pub fn run_dist(build: bool, regenerate_schema: bool, source: &str) -> Result<()> {
    if build {
        build_filter()?;
    }
    let root = root();
    let out = dist_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let from = dist_wasm();
    let wasm = std::fs::read(&from).with_context(|| {
        format!(
            "reading {} (run `cargo xtask dist` without --no-build)",
            from.display()
        )
    })?;
    let sha = hex::encode(Sha256::digest(&wasm));
    write(&out.join("idemgate-filter.wasm"), &wasm)?;
    write(
        &out.join("idemgate-filter.wasm.sha256"),
        format!("{sha}  idemgate-filter.wasm\n"),
    )?;

    let meta = ImageMeta {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        revision: git_revision(&root),
        source: source.to_owned(),
    };
    let image = write_image(
        &wasm,
        &meta,
        &out.join("idemgate-filter.oci"),
        &out.join("idemgate-filter.oci.tar"),
    )?;
    write(
        &out.join("idemgate-filter.oci.digest"),
        format!("{}\n", image.manifest_digest),
    )?;

    let schema = schema_text()?;
    if regenerate_schema {
        write(&idemgate_e2e::schema::schema_file(), &schema)?;
    }
    write(&out.join("idemgate-filter.schema.json"), &schema)?;

    let openapi = serde_json::to_string_pretty(&idemgate_server::openapi::document())
        .context("serializing the OpenAPI document")?;
    write(&out.join("idemgate-admin.openapi.json"), openapi + "\n")?;

    println!(
        "dist: {} ({} bytes, sha256 {sha})",
        out.join("idemgate-filter.wasm").display(),
        wasm.len()
    );
    println!(
        "dist: OCI image (compat variant) {}:{} and {}; revision {}",
        out.join("idemgate-filter.oci").display(),
        image.tag,
        out.join("idemgate-filter.oci.tar").display(),
        meta.revision
    );
    println!("dist: schema and OpenAPI document in {}", out.display());
    println!("dist: manifest digest {}", image.manifest_digest);
    Ok(())
}
