//! The server over real TCP listeners: `serve()` in-process, and the built binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use idemgate_protocol::{ClaimOutcome, StoredResponse};
use idemgate_server::ServeArgs;
use serde_json::{json, Value};

fn args(redis_port: u16, store_port: u16, admin_port: u16) -> ServeArgs {
    ServeArgs {
        redis_url: format!("redis://127.0.0.1:{redis_port}"),
        store_listen: format!("127.0.0.1:{store_port}").parse().unwrap(),
        admin_listen: format!("127.0.0.1:{admin_port}").parse().unwrap(),
        redis_timeout_ms: 300,
        key_prefix: "tcp".into(),
        redis_cluster: false,
        admin_token_file: None,
        dashboard_dir: None,
        admin_token: Some(TOKEN.into()),
        failover: Default::default(),
        safety: Default::default(),
    }
}

async fn wait_listening(client: &reqwest::Client, url: &str) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get(url).send().await {
            Ok(r) => return r,
            Err(e) => {
                assert!(Instant::now() < deadline, "{url} not listening: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn serves_over_tcp_starts_without_redis_and_shuts_down_gracefully() {
    let redis_port = free_port();
    let (store_port, admin_port) = (free_port(), free_port());
    let config = args(redis_port, store_port, admin_port).validate().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(idemgate_server::serve(config, async {
        let _ = stop_rx.await;
    }));

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let store = format!("http://127.0.0.1:{store_port}");
    let admin = format!("http://127.0.0.1:{admin_port}");

    // Redis is not running yet: the server is up anyway and says so.
    let r = wait_listening(&http, &format!("{store}/healthz")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"redis": "down"}));
    let s = scope("tcp");
    let claim = claim_body(&s, "k", &fp("k"), 60_000);
    let started = Instant::now();
    let r = http
        .post(format!("{store}/v1/claim"))
        .json(&claim)
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // Redis comes up on the configured port: the store answers without a restart.
    let _redis = RedisServer::start_on(redis_port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let token = loop {
        let r = http
            .post(format!("{store}/v1/claim"))
            .json(&claim)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            match r.json::<ClaimOutcome>().await.unwrap() {
                ClaimOutcome::Acquired { fencing_token } => break fencing_token,
                other => panic!("{other:?}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "store still {} after Redis came up",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let response = StoredResponse {
        status: 201,
        headers: vec![
            ("location".into(), "/v1/payments/7".into()),
            ("vary".into(), "accept, accept-encoding".into()),
        ],
        body: b"\x00\x01created".to_vec(),
    };
    let r = http
        .post(format!("{store}/v1/complete"))
        .json(&json!({
            "record": {"scope": s, "key": "k"},
            "fencing_token": token,
            "status": 201,
            "response": response,
            "ttl_s": 86_400,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"outcome": "completed"})
    );
    let r = http
        .post(format!("{store}/v1/claim"))
        .json(&claim)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<ClaimOutcome>().await.unwrap(),
        ClaimOutcome::Replay { response }
    );

    let r = http.get(format!("{admin}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("coming soon"));
    let r = http
        .get(format!("{admin}/api/health"))
        .send()
        .await
        .unwrap();
    let health = r.json::<Value>().await.unwrap();
    assert_eq!(health["redis"], "up", "{health}");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        health["redis_latency_ms"].as_f64().unwrap() >= 0.0,
        "{health}"
    );
    // The admin routes are not on the store listener, and the store API is not on admin.
    let r = http
        .post(format!("{admin}/v1/claim"))
        .json(&claim)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    stop_tx.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), server).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
    assert!(http.get(format!("{store}/healthz")).send().await.is_err());
}

#[test]
fn binary_refuses_bad_flags_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate-server"))
        .args(["serve", "--redis-timeout-ms", "0"])
        .env_remove("IDEMGATE_REDIS_TIMEOUT_MS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--redis-timeout-ms"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_idemgate-server"))
        .args(["serve"])
        .env("IDEMGATE_KEY_PREFIX", "bad prefix")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("IDEMGATE_KEY_PREFIX"), "{stderr}");
}

#[tokio::test]
async fn binary_logs_its_listeners_and_stops_on_sigterm() {
    let redis = RedisServer::start();
    let (store_port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let child = Command::new(env!("CARGO_BIN_EXE_idemgate-server"))
        .arg("serve")
        .env("IDEMGATE_REDIS_URL", redis.url())
        .env("IDEMGATE_STORE_LISTEN", format!("127.0.0.1:{store_port}"))
        .env("IDEMGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let mut guard = Kill(child);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let http = reqwest::Client::new();
    let r = wait_listening(&http, &format!("http://127.0.0.1:{store_port}/healthz")).await;
    assert_eq!(r.status(), 200, "{}", read_log());
    let text = read_log();
    assert!(
        text.contains(&format!(
            "store API listening on http://127.0.0.1:{store_port}"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("admin listening on http://127.0.0.1:{admin_port}")),
        "{text}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit 5 s after SIGTERM: {}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}: {}", read_log());
    assert!(read_log().contains("stopped"), "{}", read_log());
}
