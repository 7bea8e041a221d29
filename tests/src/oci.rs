//! The filter's OCI image in the Wasm image spec's "compat" variant, the one Istio's
//! `WasmPlugin`, Envoy Gateway's `EnvoyExtensionPolicy` and Higress fetch.
//!
//! One image manifest (not an index) whose single `application/vnd.oci.image.layer.v1.tar+gzip`
//! layer holds `plugin.wasm` at its root, annotated `module.wasm.image/variant: compat` and
//! with the `org.opencontainers.image.{version,revision,source}` annotations. The image is
//! deterministic: fixed mtimes, owners and modes in the tar, a fixed gzip level and header,
//! no creation time, and JSON written with sorted keys, so the same module and annotations
//! always give the same manifest digest.
//!
//! `cargo xtask dist` calls [`write_image`]; the dist tests rebuild the image from the same
//! inputs and pull it back from a registry.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    Arch, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder,
    MediaType, OciLayoutBuilder, Os, RootFsBuilder, Sha256Digest, ANNOTATION_REF_NAME,
    ANNOTATION_REVISION, ANNOTATION_SOURCE, ANNOTATION_TITLE, ANNOTATION_VERSION,
};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// The file the compat variant requires at the layer's root.
pub const PLUGIN_FILE: &str = "plugin.wasm";
/// The annotation that marks a Wasm image variant.
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";
/// The layer media type of the compat variant.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The mtime of every tar entry (the Unix epoch): nothing in the image depends on when it
/// was built.
const FIXED_MTIME: u64 = 0;

/// What the image says about its module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// `org.opencontainers.image.version`, e.g. `0.1.0`; also the tag in the layout.
    pub version: String,
    /// `org.opencontainers.image.revision`: the git commit the module was built from.
    pub revision: String,
    /// `org.opencontainers.image.source`: where the source lives.
    pub source: String,
}

/// The image as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The manifest's digest, `sha256:<64 hex>`: what a `WasmPlugin` pins.
    pub manifest_digest: String,
    /// The manifest bytes exactly as stored (the digest is over these).
    pub manifest: Vec<u8>,
    /// The layer's digest (`sha256:...`, of the gzipped tar).
    pub layer_digest: String,
    /// The SHA-256 of the module itself, hex: what `vm_config.code.remote.sha256` pins.
    pub wasm_sha256: String,
    /// The tag under which the layout names the manifest (the version).
    pub tag: String,
}

/// A blob: its bytes and `sha256:<hex>` digest.
struct Blob {
    bytes: Vec<u8>,
    hex: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let hex = hex::encode(Sha256::digest(&bytes));
        Self { bytes, hex }
    }

    fn digest(&self) -> Result<Sha256Digest> {
        self.hex
            .parse()
            .with_context(|| format!("sha256 digest {}", self.hex))
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// A tar archive of `files` (path, bytes) in this order, every entry a regular file (or a
/// directory when the path ends in `/`) owned by 0:0, mode 0644 (0755 for directories),
/// mtime [`FIXED_MTIME`].
fn deterministic_tar(files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in files {
        let mut header = tar::Header::new_ustar();
        let is_dir = path.ends_with('/');
        header.set_entry_type(if is_dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        header.set_mode(if is_dir { 0o755 } else { 0o644 });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(FIXED_MTIME);
        header.set_size(bytes.len() as u64);
        builder
            .append_data(&mut header, path, *bytes)
            .with_context(|| format!("adding {path} to a tar"))?;
    }
    builder.into_inner().context("finishing a tar")
}

/// Gzip at the best level with no file name and mtime 0 in the header.
fn deterministic_gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gz.write_all(bytes).context("gzip")?;
    gz.finish().context("gzip")
}

/// JSON with object members sorted by key at every level, compact: the same value always
/// gives the same bytes (oci-spec keeps annotations in a `HashMap`).
fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    fn sorted(v: Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<(String, Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    let value = sorted(serde_json::to_value(value).context("serializing OCI JSON")?);
    serde_json::to_vec(&value).context("serializing OCI JSON")
}

/// Builds the image of `wasm` in memory: layer, config and manifest blobs.
fn build(wasm: &[u8], meta: &ImageMeta) -> Result<(Blob, Blob, Blob)> {
    let tar = deterministic_tar(&[(PLUGIN_FILE, wasm)])?;
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    let layer = Blob::new(deterministic_gzip(&tar)?);

    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Wasm)
        .os(Os::Other("wasip1".into()))
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()
                .context("OCI rootfs")?,
        )
        .build()
        .context("OCI image configuration")?;
    let config = Blob::new(canonical_json(&config)?);

    let annotations: HashMap<String, String> = [
        (VARIANT_ANNOTATION, "compat"),
        (ANNOTATION_VERSION, meta.version.as_str()),
        (ANNOTATION_REVISION, meta.revision.as_str()),
        (ANNOTATION_SOURCE, meta.source.as_str()),
        (ANNOTATION_TITLE, "idemgate-filter"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(config.digest()?)
                .size(config.size())
                .build()
                .context("OCI config descriptor")?,
        )
        .layers(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageLayerGzip)
            .digest(layer.digest()?)
            .size(layer.size())
            .annotations(HashMap::from([(
                ANNOTATION_TITLE.to_owned(),
                PLUGIN_FILE.to_owned(),
            )]))
            .build()
            .context("OCI layer descriptor")?])
        .annotations(annotations)
        .build()
        .context("OCI image manifest")?;
    let manifest = Blob::new(canonical_json(&manifest)?);
    Ok((layer, config, manifest))
}

/// Writes the image of `wasm` as an OCI image layout in `layout_dir` (replaced) and as a
/// tar archive of that layout at `archive` (`skopeo copy oci-archive:FILE:TAG ...`); the
/// layout's `index.json` names the manifest with the tag `meta.version`.
///
/// # Errors
/// A file cannot be written.
pub fn write_image(
    wasm: &[u8],
    meta: &ImageMeta,
    layout_dir: &Path,
    archive: &Path,
) -> Result<Image> {
    let (layer, config, manifest) = build(wasm, meta)?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .digest(manifest.digest()?)
            .size(manifest.size())
            .annotations(HashMap::from([(
                ANNOTATION_REF_NAME.to_owned(),
                meta.version.clone(),
            )]))
            .build()
            .context("OCI manifest descriptor")?])
        .build()
        .context("OCI index")?;
    let index = canonical_json(&index)?;
    let oci_layout = canonical_json(
        &OciLayoutBuilder::default()
            .image_layout_version("1.0.0")
            .build()
            .context("oci-layout")?,
    )?;

    let blob_path = |b: &Blob| format!("blobs/sha256/{}", b.hex);
    let mut files: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), &oci_layout),
        ("index.json".into(), &index),
        ("blobs/".into(), &[]),
        ("blobs/sha256/".into(), &[]),
    ];
    let mut blobs = [&layer, &config, &manifest];
    blobs.sort_by(|a, b| a.hex.cmp(&b.hex));
    files.extend(blobs.iter().map(|b| (blob_path(b), b.bytes.as_slice())));

    if layout_dir.exists() {
        std::fs::remove_dir_all(layout_dir)
            .with_context(|| format!("removing {}", layout_dir.display()))?;
    }
    std::fs::create_dir_all(layout_dir)
        .with_context(|| format!("creating {}", layout_dir.display()))?;
    for (path, bytes) in &files {
        let to = layout_dir.join(path);
        if path.ends_with('/') {
            std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        } else {
            std::fs::write(&to, bytes).with_context(|| format!("writing {}", to.display()))?;
        }
    }
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), *b)).collect();
    std::fs::write(archive, deterministic_tar(&entries)?)
        .with_context(|| format!("writing {}", archive.display()))?;

    Ok(Image {
        manifest_digest: format!("sha256:{}", manifest.hex),
        manifest: manifest.bytes,
        layer_digest: format!("sha256:{}", layer.hex),
        wasm_sha256: hex::encode(Sha256::digest(wasm)),
        tag: meta.version.clone(),
    })
}

/// The manifest digest (`sha256:...`) and tag the layout's `index.json` names (its first
/// manifest).
///
/// # Errors
/// `index.json` is missing, not JSON, or names no manifest.
pub fn layout_manifest(layout_dir: &Path) -> Result<(String, String)> {
    let path = layout_dir.join("index.json");
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let index: Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let first = index["manifests"]
        .get(0)
        .and_then(Value::as_object)
        .with_context(|| format!("{} lists no manifest", path.display()))?;
    let digest = first
        .get("digest")
        .and_then(Value::as_str)
        .with_context(|| format!("{}: manifest without digest", path.display()))?;
    let tag = first
        .get("annotations")
        .and_then(|a| a.get(ANNOTATION_REF_NAME))
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok((digest.to_owned(), tag.to_owned()))
}

/// The manifest's annotations as written in a layout.
///
/// # Errors
/// The manifest blob is missing or not a JSON object.
pub fn layout_annotations(layout_dir: &Path, manifest_digest: &str) -> Result<Map<String, Value>> {
    let hex = manifest_digest.trim_start_matches("sha256:");
    let path = layout_dir.join("blobs/sha256").join(hex);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(manifest["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default())
}
