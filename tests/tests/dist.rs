#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The release artifacts of `cargo xtask dist` (in `target/dist/`, which `cargo xtask test`
//! writes first), used the ways platforms use them:
//!
//! - pushed with Debian's `skopeo` to Debian's `docker-registry` on loopback and pulled
//!   back with a Rust OCI client, then unpacked with the fetch rule of Istio and Envoy
//!   Gateway (last layer, tar+gzip, `plugin.wasm`);
//! - loaded by plain Envoy from `vm_config.code.remote` pinned by `sha256`, served by a
//!   local HTTP server; a wrong `sha256` is refused;
//! - rebuilt from the same module and annotations: the same manifest digest.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flate2::read::GzDecoder;
use idemgate_e2e::oci::{
    layout_annotations, layout_manifest, write_image, ImageMeta, LAYER_MEDIA_TYPE, PLUGIN_FILE,
    VARIANT_ANNOTATION,
};
use idemgate_e2e::process::{log_tail, Proc};
use idemgate_e2e::{free_port, wait_until, workspace_root, EnvoyTemplate, Stack, StackOptions};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// What `cargo xtask dist` wrote.
struct Dist {
    dir: PathBuf,
    wasm: Vec<u8>,
    wasm_sha256: String,
    manifest_digest: String,
    layout: PathBuf,
}

fn dist() -> Dist {
    let dir = std::env::var_os("IDEMGATE_DIST_DIR")
        .map_or_else(|| workspace_root().join("target/dist"), PathBuf::from);
    let read = |name: &str| {
        std::fs::read(dir.join(name)).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo xtask dist` first (`cargo xtask test` does)",
                dir.join(name).display()
            )
        })
    };
    let wasm = read("idemgate-filter.wasm");
    let sha_line = String::from_utf8(read("idemgate-filter.wasm.sha256")).expect("utf-8");
    let wasm_sha256 = sha_line
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned();
    assert_eq!(
        wasm_sha256,
        hex::encode(Sha256::digest(&wasm)),
        "idemgate-filter.wasm.sha256 is the module's digest"
    );
    let manifest_digest = String::from_utf8(read("idemgate-filter.oci.digest"))
        .expect("utf-8")
        .trim()
        .to_owned();
    Dist {
        layout: dir.join("idemgate-filter.oci"),
        dir,
        wasm,
        wasm_sha256,
        manifest_digest,
    }
}

/// A fresh directory under target/e2e/ for one test's logs and files (kept afterwards).
fn test_dir(name: &str) -> PathBuf {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let dir = workspace_root().join(format!(
        "target/e2e/dist-{name}-{unix_ms}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("test dir");
    dir
}

fn require_program(name: &str) -> PathBuf {
    idemgate_e2e::bins::find_on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH: the registry round trip needs Debian's docker-registry and \
             skopeo (`cargo xtask setup` installs them; by hand: `sudo apt-get install -y \
             docker-registry skopeo`)"
        )
    })
}

/// Istio's and Envoy Gateway's rule for a compat image: the last layer, which must be
/// `application/vnd.oci.image.layer.v1.tar+gzip`, holds `plugin.wasm` (by base name).
fn extract_plugin(layer_media_type: &str, layer: &[u8]) -> Vec<u8> {
    assert_eq!(
        layer_media_type, LAYER_MEDIA_TYPE,
        "the last layer must be tar+gzip"
    );
    let mut archive = tar::Archive::new(GzDecoder::new(layer));
    for entry in archive.entries().expect("a tar.gz layer") {
        let mut entry = entry.expect("a tar entry");
        let path = entry.path().expect("an entry path").into_owned();
        if path.file_name().is_some_and(|n| n == PLUGIN_FILE) {
            let mut wasm = Vec::new();
            entry.read_to_end(&mut wasm).expect("plugin.wasm reads");
            return wasm;
        }
    }
    panic!("{PLUGIN_FILE} not found in the layer");
}

#[test]
fn registry_round_trip_gives_back_the_module_under_the_printed_digest() {
    let started = Instant::now();
    let dist = dist();
    let registry_bin = require_program("docker-registry");
    let skopeo = require_program("skopeo");
    let (layout_digest, tag) = layout_manifest(&dist.layout).expect("layout index");
    assert_eq!(
        layout_digest, dist.manifest_digest,
        "the layout names the printed digest"
    );

    let dir = test_dir("registry");
    let port = free_port().expect("free port");
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        ),
    )
    .expect("registry config");
    let mut cmd = Command::new(registry_bin);
    cmd.arg("serve").arg(&config);
    let log = dir.join("registry.log");
    let mut registry = Proc::spawn("docker-registry", cmd, &log).expect("registry starts");
    let dump = |what: &str| format!("{what}\n--- registry log ---\n{}", log_tail(&log, 60));
    let base = format!("http://127.0.0.1:{port}");
    wait_until("the registry answers /v2/", 10_000, || {
        if let Some(status) = registry.exited() {
            anyhow::bail!("docker-registry exited ({status})");
        }
        Ok(ureq::get(&format!("{base}/v2/"))
            .call()
            .is_ok_and(|r| r.status() == 200))
    })
    .unwrap_or_else(|e| panic!("{}", dump(&format!("{e:#}"))));

    // The archive holds the same image (`skopeo copy oci-archive:...` works too).
    let inspect = Command::new(&skopeo)
        .args(["--insecure-policy", "inspect", "--raw"])
        .arg(format!(
            "oci-archive:{}:{tag}",
            dist.dir.join("idemgate-filter.oci.tar").display()
        ))
        .output()
        .expect("skopeo runs");
    assert!(
        inspect.status.success(),
        "skopeo inspect of the archive: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&inspect.stdout))),
        dist.manifest_digest,
        "the archive's manifest is the printed one"
    );

    // Push the layout as a platform team would.
    let repo = format!("127.0.0.1:{port}/idemgate-filter");
    let push = Command::new(&skopeo)
        .args([
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ])
        .arg(format!("oci:{}:{tag}", dist.layout.display()))
        .arg(format!("docker://{repo}:{tag}"))
        .output()
        .expect("skopeo runs");
    assert!(
        push.status.success(),
        "{}",
        dump(&format!(
            "skopeo copy failed ({}): {}{}",
            push.status,
            String::from_utf8_lossy(&push.stdout),
            String::from_utf8_lossy(&push.stderr)
        ))
    );

    // Pull it back with a Rust OCI client, by tag and pinned by digest.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    for reference in [
        format!("{repo}:{tag}"),
        format!("{repo}@{}", dist.manifest_digest),
    ] {
        let image: oci_client::Reference = reference.parse().expect("a reference");
        let (manifest, digest) = rt
            .block_on(client.pull_manifest(&image, &auth))
            .unwrap_or_else(|e| panic!("{}", dump(&format!("pulling {reference}: {e}"))));
        assert_eq!(
            digest, dist.manifest_digest,
            "{reference}: the registry serves the printed digest"
        );
        let oci_client::manifest::OciManifest::Image(manifest) = manifest else {
            panic!("{reference}: an image index, not a single manifest: {manifest:?}");
        };
        let annotations = manifest.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get(VARIANT_ANNOTATION).map(String::as_str),
            Some("compat")
        );
        for key in [
            "org.opencontainers.image.version",
            "org.opencontainers.image.revision",
            "org.opencontainers.image.source",
        ] {
            assert!(
                annotations.get(key).is_some_and(|v| !v.is_empty()),
                "{key} missing: {annotations:?}"
            );
        }
        assert_eq!(manifest.layers.len(), 1, "one layer: {manifest:?}");
        let layer = manifest.layers.last().expect("a layer");
        let mut blob = Vec::new();
        rt.block_on(client.pull_blob(&image, layer, &mut blob))
            .unwrap_or_else(|e| panic!("{}", dump(&format!("pulling the layer: {e}"))));
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&blob))),
            layer.digest,
            "the layer's bytes match its digest"
        );
        let wasm = extract_plugin(&layer.media_type, &blob);
        assert_eq!(
            hex::encode(Sha256::digest(&wasm)),
            dist.wasm_sha256,
            "plugin.wasm is the module dist built"
        );
        assert!(wasm == dist.wasm, "plugin.wasm is byte for byte the module");
    }
    registry.terminate(2_000);
    eprintln!(
        "registry round trip: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A one-file HTTP server on 127.0.0.1 (Envoy's remote code source); stops when dropped.
struct FileServer {
    port: u16,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FileServer {
    fn start(body: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if serve_one(stream, &body).is_ok() {
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Self {
            port,
            stop,
            served,
            thread: Some(thread),
        }
    }
}

fn serve_one(mut stream: TcpStream, body: &[u8]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 << 10 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/wasm\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `envoy/gateway.yaml` with the module fetched from `vm_config.code.remote` (cluster
/// `wasm_source` = 127.0.0.1:`port`) pinned by `sha256`, written into `dir`.
fn remote_code_template(dir: &Path, port: u16, sha256: &str) -> PathBuf {
    let gateway = std::fs::read_to_string(workspace_root().join("envoy/gateway.yaml"))
        .expect("envoy/gateway.yaml");
    let local = "                    local:\n                      filename: {{FILTER_WASM}}\n";
    assert!(gateway.contains(local), "gateway.yaml loads local code");
    let remote = format!(
        "                    remote:\n\
         \x20                     http_uri:\n\
         \x20                       uri: http://127.0.0.1:{port}/idemgate-filter.wasm\n\
         \x20                       cluster: wasm_source\n\
         \x20                       timeout: 5s\n\
         \x20                     sha256: {sha256}\n\
         \x20                     retry_policy: {{num_retries: 0}}\n"
    );
    let cluster = format!(
        "  clusters:\n\
         \x20 - name: wasm_source\n\
         \x20   type: STATIC\n\
         \x20   connect_timeout: 1s\n\
         \x20   load_assignment:\n\
         \x20     cluster_name: wasm_source\n\
         \x20     endpoints:\n\
         \x20     - lb_endpoints:\n\
         \x20       - endpoint:\n\
         \x20           address:\n\
         \x20             socket_address: {{address: 127.0.0.1, port_value: {port}}}\n"
    );
    let text = gateway
        .replace(local, &remote)
        .replacen("  clusters:\n", &cluster, 1);
    let path = dir.join("remote-code.yaml");
    std::fs::write(&path, text).expect("template");
    path
}

fn remote_stack_options(name: &str, dir: &Path, template: PathBuf) -> StackOptions {
    StackOptions {
        template: EnvoyTemplate::File(template),
        log_dir: Some(dir.to_path_buf()),
        startup_timeout_ms: 15_000,
        envoy_concurrency: 1,
        ..StackOptions::new(
            name,
            json!({
                "store": {"cluster": "idemgate_store", "timeout_ms": 1000},
                "routes": [{"name": "payments", "match": {"prefix": "/v1/payments"}, "key": "required"}]
            }),
        )
    }
}

#[test]
fn envoy_loads_remote_code_pinned_by_its_sha256() {
    let started = Instant::now();
    let dist = dist();
    let server = FileServer::start(dist.wasm.clone());
    let dir = test_dir("remote-ok");
    let template = remote_code_template(&dir, server.port, &dist.wasm_sha256);
    let stack =
        Stack::start(remote_stack_options("dist-remote-ok", &dir, template)).expect("stack starts");
    assert!(
        server.served.load(Ordering::SeqCst) >= 1,
        "Envoy fetched the module"
    );

    let gw = stack.gateway();
    let missing = gw
        .post("/v1/payments")
        .json(&json!({"amount": 1}))
        .send()
        .expect("POST without a key");
    assert_eq!(
        missing.status, 400,
        "the filter runs: a protected route needs a key"
    );
    let send = || {
        gw.post("/v1/payments")
            .header("Authorization", "Bearer remote")
            .header("Idempotency-Key", "\"remote-1\"")
            .json(&json!({"amount": 1000}))
            .send()
            .expect("POST")
    };
    let first = send();
    assert_eq!(first.status, 201, "{}", first.text());
    let replay = send();
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(stack.executions("/v1/payments").expect("executions"), 1);
    drop(stack);
    eprintln!("remote code: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn envoy_refuses_remote_code_with_a_wrong_sha256() {
    let started = Instant::now();
    let dist = dist();
    let server = FileServer::start(dist.wasm.clone());
    let dir = test_dir("remote-bad");
    let wrong = hex::encode(Sha256::digest(b"not the module"));
    let template = remote_code_template(&dir, server.port, &wrong);
    let mut opts = remote_stack_options("dist-remote-bad", &dir, template);
    // Missing programs must fail the test, not pass for a refusal.
    opts.binaries = Some(idemgate_e2e::Binaries::from_env().expect("programs"));
    opts.startup_timeout_ms = 5_000;
    let result = Stack::start(opts);
    let log_path = dir.join("envoy.log");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail = || log_tail(&log_path, 80);
    assert!(
        server.served.load(Ordering::SeqCst) >= 1,
        "Envoy fetched the module\n{}",
        tail()
    );
    assert!(
        log.contains("Plugin idemgate failed to load"),
        "Envoy's log says the module with the wrong sha256 was refused:\n{}",
        tail()
    );
    match result {
        // Envoy 1.40 keeps the listener with the plugin failed closed: nothing reaches the
        // upstream unprotected.
        Ok(stack) => {
            let reply = stack
                .gateway()
                .post("/v1/payments")
                .header("Authorization", "Bearer remote")
                .header("Idempotency-Key", "\"remote-bad\"")
                .json(&json!({"amount": 1}))
                .send()
                .expect("POST");
            assert_eq!(
                reply.status,
                503,
                "fail closed: {}\n{}",
                reply.text(),
                tail()
            );
            assert_eq!(stack.executions("/v1/payments").expect("executions"), 0);
        }
        Err(e) => eprintln!("Envoy did not become ready, as expected: {e:#}"),
    }
    eprintln!("wrong sha256: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn dist_writes_the_schema_and_the_openapi_document() {
    let dist = dist();
    let read_json = |name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dist.dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}; run `cargo xtask dist`"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
    };
    assert_eq!(
        read_json("idemgate-filter.schema.json"),
        idemgate_e2e::schema::committed_schema().expect("committed schema"),
        "dist ships the committed schema"
    );
    let openapi = read_json("idemgate-admin.openapi.json");
    assert!(
        openapi["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "an OpenAPI 3 document: {openapi}"
    );
    for path in ["/api/keys", "/api/purge", "/api/events"] {
        assert!(
            openapi["paths"].get(path).is_some(),
            "the document describes {path}"
        );
    }
}

#[test]
fn two_builds_of_the_image_have_the_same_manifest_digest() {
    let dist = dist();
    let annotations =
        layout_annotations(&dist.layout, &dist.manifest_digest).expect("manifest annotations");
    let get = |k: &str| {
        annotations
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("annotation {k} missing: {annotations:?}"))
            .to_owned()
    };
    let meta = ImageMeta {
        version: get("org.opencontainers.image.version"),
        revision: get("org.opencontainers.image.revision"),
        source: get("org.opencontainers.image.source"),
    };
    let dir = test_dir("determinism");
    let a = write_image(&dist.wasm, &meta, &dir.join("a"), &dir.join("a.tar")).expect("build a");
    let b = write_image(&dist.wasm, &meta, &dir.join("b"), &dir.join("b.tar")).expect("build b");
    assert_eq!(a.manifest_digest, b.manifest_digest);
    assert_eq!(
        a.manifest_digest, dist.manifest_digest,
        "the same module and annotations give the digest `cargo xtask dist` printed"
    );
    let archive = |p: &Path| std::fs::read(p).expect("archive");
    assert!(
        archive(&dir.join("a.tar")) == archive(&dir.join("b.tar")),
        "the archives are identical"
    );
    assert!(
        archive(&dir.join("a.tar")) == archive(&dist.dir.join("idemgate-filter.oci.tar")),
        "and identical to dist's"
    );

    // The layer: one regular file plugin.wasm at the root, root-owned, mode 0644, mtime 0.
    let hex = a.layer_digest.trim_start_matches("sha256:");
    let layer = std::fs::read(dir.join("a/blobs/sha256").join(hex)).expect("layer blob");
    let mut archive = tar::Archive::new(GzDecoder::new(layer.as_slice()));
    let entries: Vec<_> = archive
        .entries()
        .expect("tar")
        .map(|e| {
            let e = e.expect("entry");
            let h = e.header();
            (
                e.path().expect("path").display().to_string(),
                h.mode().expect("mode"),
                h.uid().expect("uid"),
                h.gid().expect("gid"),
                h.mtime().expect("mtime"),
            )
        })
        .collect();
    assert_eq!(entries, vec![(PLUGIN_FILE.to_owned(), 0o644, 0, 0, 0)]);

    // A different module gives a different digest (the digest covers the module).
    let mut other = dist.wasm.clone();
    other.push(0);
    let c = write_image(&other, &meta, &dir.join("c"), &dir.join("c.tar")).expect("build c");
    assert_ne!(c.manifest_digest, a.manifest_digest);
}
