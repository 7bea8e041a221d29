//! Test helpers: a private redis-server per test and calls through `oneshot`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use idemgate_server::{admin_app, store_app, AdminTokens, AppState, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

/// The redis-server binary: `IDEMGATE_REDIS_SERVER` or `/usr/bin/redis-server`.
pub fn redis_server_bin() -> PathBuf {
    std::env::var_os("IDEMGATE_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A redis-server of this test only: own port, own directory, no persistence.
/// Killed on drop; its log is printed when the test panics.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts on a free port and waits until PING answers.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts on `port` and waits until PING answers.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// Starts on `port` with extra redis-server arguments after the defaults (they win:
    /// `--appendonly yes`, `--maxmemory-policy allkeys-lru`, ...); kept for restarts.
    pub fn start_with(port: u16, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = Self {
            port,
            dir,
            child: None,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// (Re)starts the process on the same port and directory; waits until PING answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new(redis_server_bin())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra_args)
            .arg("--logfile")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", redis_server_bin()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server exited early with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING in 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map(|p| p == "PONG")
            .unwrap_or(false)
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A plain synchronous connection for checking what the scripts wrote.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("client")
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connection")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            eprintln!(
                "----- redis-server log (port {}) -----\n{log}\n-----",
                self.port
            );
        }
    }
}

/// Key prefix used by the test apps.
pub const PREFIX: &str = "t";

/// The admin token the test apps accept (label `tester`).
pub const TOKEN: &str = "test-token-0123456789";

/// Store + admin apps over `redis_url` with a 500 ms timeout; the admin API accepts
/// [`TOKEN`] (label `tester`).
pub fn apps(redis_url: &str) -> (Router, Router) {
    let (store, admin, _) = apps_with_state(redis_url);
    (store, admin)
}

/// [`apps`] and their shared state.
pub fn apps_with_state(redis_url: &str) -> (Router, Router, Arc<AppState>) {
    let client = redis::Client::open(redis_url).expect("client");
    let store = Store::new(client, PREFIX, Duration::from_millis(500)).expect("store");
    let tokens = AdminTokens::new(vec![("tester".into(), TOKEN.into())]).expect("tokens");
    let state: Arc<AppState> = AppState::new(store, tokens).expect("state");
    (store_app(state.clone()), admin_app(state.clone()), state)
}

/// A response read to the end.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Sends one request through `oneshot`.
pub async fn send(app: &Router, method: &str, path: &str, body: impl Into<Body>) -> Resp {
    send_auth(app, method, path, None, body).await
}

/// Sends one admin request with `Authorization: Bearer <token>` (when given).
pub async fn send_auth(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: impl Into<Body>,
) -> Resp {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(body.into()).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

/// GET with the test token.
pub async fn admin_get(app: &Router, path: &str) -> Resp {
    send_auth(app, "GET", path, Some(TOKEN), Body::empty()).await
}

/// Admin call with the test token and a JSON body.
pub async fn admin_call(app: &Router, method: &str, path: &str, body: &Value) -> Resp {
    send_auth(
        app,
        method,
        path,
        Some(TOKEN),
        serde_json::to_vec(body).expect("json"),
    )
    .await
}

/// POSTs JSON.
pub async fn post(app: &Router, path: &str, body: &Value) -> Resp {
    send(app, "POST", path, serde_json::to_vec(body).expect("json")).await
}

/// A scope hash for tenant `name`.
pub fn scope(name: &str) -> String {
    idemgate_protocol::scope_hash("authorization", name.as_bytes())
}

/// A 64-hex fingerprint made from `seed`.
pub fn fp(seed: &str) -> String {
    idemgate_protocol::scope_hash("fp-for-tests", seed.as_bytes())
}

pub fn claim_body(scope: &str, key: &str, fingerprint: &str, lock_ttl_ms: u64) -> Value {
    json!({
        "record": {"scope": scope, "key": key},
        "fingerprint": fingerprint,
        "route": "payments",
        "method": "POST",
        "path": "/v1/payments?x=1",
        "lock_ttl_ms": lock_ttl_ms,
    })
}

/// Claims and expects `acquired`; returns the fencing token.
pub async fn acquire(
    app: &Router,
    scope: &str,
    key: &str,
    fingerprint: &str,
    lock_ttl_ms: u64,
) -> String {
    let r = post(
        app,
        "/v1/claim",
        &claim_body(scope, key, fingerprint, lock_ttl_ms),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    assert_eq!(v["outcome"], "acquired", "{v}");
    let token = v["fencing_token"].as_str().expect("token").to_owned();
    assert_eq!(token.len(), 32, "{token}");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{token}"
    );
    token
}

/// Claims and completes a record (status 201, a small JSON body); returns the token used.
pub async fn completed(app: &Router, scope: &str, key: &str, fingerprint: &str) -> String {
    let token = acquire(app, scope, key, fingerprint, 600_000).await;
    let r = post(
        app,
        "/v1/complete",
        &serde_json::json!({
            "record": {"scope": scope, "key": key},
            "fencing_token": token,
            "status": 201,
            "response": {"status": 201, "headers": [["content-type", "application/json"]], "body": "e30="},
            "ttl_s": 600
        }),
    )
    .await;
    assert_eq!(
        r.json()["outcome"],
        "completed",
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    token
}

/// An HTTP client for servers on real listeners (10 s per request).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One in-process server; stopped on drop.
pub struct Server {
    /// Store API base URL.
    pub store: String,
    /// Admin listener base URL.
    pub admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), idemgate_server::ServeError>>>,
}

impl Server {
    /// A server over one Redis, key prefix `live`, admin token [`TOKEN`], ready.
    pub async fn start(redis_url: &str) -> Self {
        Self::start_with(redis_url, false).await
    }

    /// As [`Server::start`]; with `cluster` the URL lists a Redis Cluster's seed nodes.
    pub async fn start_with(redis_url: &str, cluster: bool) -> Self {
        let mut args = Self::args(redis_url);
        args.redis_cluster = cluster;
        args.redis_timeout_ms = if cluster { 1000 } else { 500 };
        Self::start_from(args).await
    }

    /// `GET /metrics` on the admin listener, as text.
    pub async fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET /api/health` on the admin listener (no token).
    pub async fn health(&self) -> Value {
        http()
            .get(format!("{}/api/health", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The flags of [`Server::start`] on free ports, to adjust before [`Server::start_from`].
    pub fn args(redis_url: &str) -> idemgate_server::ServeArgs {
        let (store_port, admin_port) = (free_port(), free_port());
        idemgate_server::ServeArgs {
            redis_url: redis_url.to_owned(),
            store_listen: format!("127.0.0.1:{store_port}").parse().unwrap(),
            admin_listen: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            redis_timeout_ms: 500,
            key_prefix: "live".into(),
            redis_cluster: false,
            admin_token_file: None,
            dashboard_dir: None,
            admin_token: Some(TOKEN.into()),
            failover: Default::default(),
            safety: Default::default(),
        }
    }

    /// A server with these flags, ready (its Redis answers `PING`).
    pub async fn start_from(args: idemgate_server::ServeArgs) -> Self {
        let (store_port, admin_port) = (args.store_listen.port(), args.admin_listen.port());
        let config = args.validate().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(idemgate_server::serve(config, async {
            let _ = stop_rx.await;
        }));
        let server = Self {
            store: format!("http://127.0.0.1:{store_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            stop: Some(stop),
            task: Some(task),
        };
        let http = reqwest::Client::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !http
            .get(format!("{}/healthz", server.store))
            .send()
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
        {
            assert!(std::time::Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        server
    }

    /// Stops gracefully; returns how long it took.
    pub async fn stop(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
        }
        started.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
