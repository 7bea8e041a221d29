//! Redis that cannot keep the promise is refused or flagged ([`idemgate_server::safety`]),
//! and a Redis whose memory is full refuses claims cleanly (503, never 500) while stored
//! responses still replay. Each test runs its own redis-server on a free port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn args(redis: &RedisServer, allow_evicting: bool) -> idemgate_server::ServeArgs {
    let mut a = Server::args(&redis.url());
    a.safety.allow_evicting_redis = allow_evicting;
    a.safety.redis_check_interval_s = 1;
    a
}

/// The value of one sample line of `/metrics` (`name{labels} value`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Events of `kind` from `/api/events/recent`.
async fn events(server: &Server, kind: &str) -> Vec<Value> {
    let v: Value = http()
        .get(format!(
            "{}/api/events/recent?kind={kind}&limit=50",
            server.admin
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.as_array().cloned().unwrap_or_default()
}

/// Polls `check` every 100 ms for at most `limit`; returns the last value it saw.
async fn wait_for<T>(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> (bool, T)) -> T
where
    T: std::fmt::Debug,
{
    let deadline = Instant::now() + limit;
    loop {
        let (done, value) = check().await;
        if done {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}; last: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn redis_cmd(redis: &RedisServer, args: &[&str]) -> redis::Value {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(&mut redis.conn()).unwrap()
}

#[tokio::test]
async fn an_evicting_redis_is_refused_at_start_with_the_setting_and_the_fix() {
    let redis = RedisServer::start_with(
        free_port(),
        &["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
    );
    for policy in ["allkeys-lru", "volatile-ttl"] {
        redis_cmd(&redis, &["CONFIG", "SET", "maxmemory-policy", policy]);
        let config = args(&redis, false).validate().unwrap();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            idemgate_server::serve(config, std::future::pending()),
        )
        .await
        .expect("serve returns at once");
        let err = result
            .expect_err("an evicting Redis is refused")
            .to_string();
        for needle in [
            &format!("maxmemory-policy {policy}"),
            "maxmemory 67108864 bytes",
            "noeviction",
            "--allow-evicting-redis",
        ] {
            assert!(err.contains(needle), "{needle:?} missing in: {err}");
        }
    }

    // The binary: exit status 1 and the same sentence on stderr.
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate-server"))
        .args(["serve", "--redis-url", &redis.url()])
        .args(["--store-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .env_remove("IDEMGATE_ALLOW_EVICTING_REDIS")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refusing to start") && stderr.contains("noeviction"),
        "{stderr}"
    );
}

#[tokio::test]
async fn allowed_evicting_redis_runs_flagged_unsafe_on_health_metrics_and_events() {
    let redis = RedisServer::start_with(
        free_port(),
        &[
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "volatile-lru",
            "--appendonly",
            "yes",
        ],
    );
    let server = Server::start_from(args(&redis, true)).await;
    let h = server.health().await;
    let s = &h["redis_safety"];
    assert_eq!(s["status"], "unsafe", "{h}");
    assert_eq!(s["eviction"], "unsafe", "{h}");
    assert_eq!(s["persistence"], "ok", "{h}");
    assert_eq!(s["evicting_allowed"], true, "{h}");
    assert_eq!(s["nodes"][0]["maxmemory_policy"], "volatile-lru", "{h}");
    assert_eq!(s["nodes"][0]["maxmemory_bytes"], 64 * 1024 * 1024, "{h}");
    assert!(
        s["messages"][0].as_str().unwrap().contains("noeviction"),
        "{h}"
    );
    let m = server.metrics().await;
    assert_eq!(
        sample(&m, "idemgate_redis_safety{check=\"eviction\"}"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(sample(&m, "idemgate_redis_persistence"), Some(2.0), "{m}");
    let evs = wait_for(Duration::from_secs(5), "a redis_unsafe event", async || {
        let e = events(&server, "redis_unsafe").await;
        (e.len() == 1, e)
    })
    .await;
    assert!(
        evs[0]["detail"]
            .as_str()
            .unwrap()
            .contains("maxmemory-policy volatile-lru"),
        "{evs:?}"
    );
}

#[tokio::test]
async fn a_redis_without_config_cannot_be_verified_and_the_server_starts() {
    let redis = RedisServer::start_with(free_port(), &["--rename-command", "CONFIG", ""]);
    let server = Server::start_from(args(&redis, false)).await;
    let h = server.health().await;
    let s = &h["redis_safety"];
    assert_eq!(s["status"], "cannot_verify", "{h}");
    assert_eq!(s["eviction"], "cannot_verify", "{h}");
    assert_eq!(s["persistence"], "cannot_verify", "{h}");
    let node = &s["nodes"][0];
    assert_eq!(
        node["maxmemory_policy"],
        Value::Null,
        "nothing guessed: {h}"
    );
    assert_eq!(node["persistence"], Value::Null, "nothing guessed: {h}");
    assert_eq!(node["role"], "master", "INFO still answers: {h}");
    assert!(
        node["run_id"].as_str().is_some_and(|r| r.len() == 40),
        "{h}"
    );
    assert!(
        s["messages"][0]
            .as_str()
            .unwrap()
            .contains("cannot be verified"),
        "{h}"
    );
    let m = server.metrics().await;
    assert_eq!(
        sample(&m, "idemgate_redis_safety{check=\"overall\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "idemgate_redis_persistence"), Some(-1.0), "{m}");
    // The store works.
    let r = http()
        .post(format!("{}/v1/claim", server.store))
        .json(&claim_body(&scope("nc"), "k", &fp("k"), 60_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn no_persistence_is_a_warning_and_a_policy_changed_at_run_time_is_flagged() {
    // The common Redis runs with `--save '' --appendonly no`.
    let redis = RedisServer::start();
    let server = Server::start_from(args(&redis, false)).await;
    let h = server.health().await;
    let s = &h["redis_safety"];
    assert_eq!(
        (&s["status"], &s["eviction"], &s["persistence"]),
        (&json!("warning"), &json!("ok"), &json!("warning")),
        "{h}"
    );
    assert_eq!(s["nodes"][0]["persistence"], "none", "{h}");
    assert!(
        s["messages"][0]
            .as_str()
            .unwrap()
            .contains("no persistence (appendonly no, save \"\")"),
        "{h}"
    );
    let m = server.metrics().await;
    assert_eq!(sample(&m, "idemgate_redis_persistence"), Some(0.0), "{m}");
    assert_eq!(
        sample(&m, "idemgate_redis_safety{check=\"persistence\"}"),
        Some(2.0),
        "{m}"
    );

    // An operator turns on AOF, then an evicting policy: both seen within the interval (1 s).
    redis_cmd(&redis, &["CONFIG", "SET", "appendonly", "yes"]);
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory", "128mb"]);
    redis_cmd(
        &redis,
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-lfu"],
    );
    let changed = Instant::now();
    let h = wait_for(
        Duration::from_secs(4),
        "unsafe on /api/health",
        async || {
            let h = server.health().await;
            (h["redis_safety"]["status"] == "unsafe", h)
        },
    )
    .await;
    let seen_after = changed.elapsed();
    assert_eq!(h["redis_safety"]["persistence"], "ok", "{h}");
    let evs = wait_for(Duration::from_secs(3), "a redis_unsafe event", async || {
        let e = events(&server, "redis_unsafe").await;
        (!e.is_empty(), e)
    })
    .await;
    assert!(
        evs[0]["detail"].as_str().unwrap().contains("allkeys-lfu"),
        "{evs:?}"
    );
    eprintln!("run-time policy change seen after {seen_after:?}");
    // Found at run time it is flagged, not fatal: the store still answers.
    let r = http()
        .get(format!("{}/healthz", server.store))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_redis_restart_changes_its_run_id_an_event_and_a_count() {
    let mut redis = RedisServer::start_with(free_port(), &["--appendonly", "yes"]);
    let server = Server::start_from(args(&redis, false)).await;
    let h = server.health().await;
    assert_eq!(h["redis_safety"]["status"], "ok", "{h}");
    assert_eq!(h["redis_safety"]["restarts"], 0, "{h}");
    let first = h["redis_safety"]["nodes"][0]["run_id"].clone();

    redis.kill();
    redis.restart();
    let h = wait_for(Duration::from_secs(5), "a counted restart", async || {
        let h = server.health().await;
        (h["redis_safety"]["restarts"] == 1, h)
    })
    .await;
    assert_ne!(h["redis_safety"]["nodes"][0]["run_id"], first, "{h}");
    let m = server.metrics().await;
    assert_eq!(
        sample(&m, "idemgate_redis_restarts_total"),
        Some(1.0),
        "{m}"
    );
    let evs = wait_for(
        Duration::from_secs(3),
        "a redis_restarted event",
        async || {
            let e = events(&server, "redis_restarted").await;
            (e.len() == 1, e)
        },
    )
    .await;
    let detail = evs[0]["detail"].as_str().unwrap();
    assert!(detail.contains("run_id changed"), "{detail}");
    assert!(detail.contains("append-only file"), "{detail}");
}

/// Fills Redis with junk, then sets `maxmemory` below what it uses: under `noeviction`
/// every write that may grow memory is refused with an OOM error from then on.
fn fill_memory(redis: &RedisServer) {
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    let junk = "x".repeat(10_000);
    for i in 0..300 {
        pipe.set(format!("junk:{i}"), &junk).ignore();
    }
    let () = pipe.query(&mut conn).unwrap();
    redis_cmd(redis, &["CONFIG", "SET", "maxmemory", "1mb"]);
    let refused = redis::cmd("SET")
        .arg("probe")
        .arg("1")
        .query::<()>(&mut conn)
        .unwrap_err();
    assert!(refused.to_string().contains("OOM"), "{refused}");
}

#[tokio::test]
async fn with_memory_full_claims_fail_with_503_and_stored_responses_still_replay() {
    let redis = RedisServer::start_with(free_port(), &["--maxmemory-policy", "noeviction"]);
    let (store, _admin) = apps(&redis.url());
    let s = scope("oom");
    completed(&store, &s, "done", &fp("done")).await;
    let held = acquire(&store, &s, "held", &fp("held"), 600_000).await;
    let gone = acquire(&store, &s, "gone", &fp("gone"), 600_000).await;
    let r = post(
        &store,
        "/v1/release",
        &json!({"record": {"scope": s, "key": "gone"}, "fencing_token": gone}),
    )
    .await;
    assert_eq!(r.json()["outcome"], "released");

    fill_memory(&redis);
    let record = |key: &str| format!("{PREFIX}:rec:{s}:{key}");
    let exists = |key: &str| -> i64 {
        redis::cmd("EXISTS")
            .arg(record(key))
            .query(&mut redis.conn())
            .unwrap()
    };

    // A new key: refused cleanly, nothing written.
    let r = post(
        &store,
        "/v1/claim",
        &claim_body(&s, "new", &fp("new"), 60_000),
    )
    .await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "a full Redis refuses the claim: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.content_type(), "application/problem+json");
    assert_eq!(
        r.json()["type"],
        "urn:idemgate:problem:store-unavailable",
        "never a 500"
    );
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(exists("new"), 0, "nothing written past maxmemory");

    // A released key (tombstone): refused, the tombstone kept.
    let r = post(
        &store,
        "/v1/claim",
        &claim_body(&s, "gone", &fp("gone"), 60_000),
    )
    .await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let tomb: String = redis::cmd("HGET")
        .arg(record("gone"))
        .arg("state")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(tomb, "released", "the record a claim would replace is kept");

    // A completed key still replays.
    let r = post(
        &store,
        "/v1/claim",
        &claim_body(&s, "done", &fp("done"), 60_000),
    )
    .await;
    assert_eq!(
        r.status.as_u16(),
        200,
        "replay with memory full: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["outcome"], "replay");

    // A duplicate of an in-flight key is still a 409 answer, not a store failure.
    let r = post(
        &store,
        "/v1/claim",
        &claim_body(&s, "held", &fp("held"), 60_000),
    )
    .await;
    assert_eq!(r.json()["outcome"], "in_flight");

    // Completing the in-flight key is refused cleanly (the filter retries it); the lock stays.
    let complete = json!({
        "record": {"scope": s, "key": "held"},
        "fencing_token": held,
        "status": 201,
        "response": {"status": 201, "headers": [], "body": "e30="},
        "ttl_s": 600
    });
    let r = post(&store, "/v1/complete", &complete).await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let state: String = redis::cmd("HGET")
        .arg(record("held"))
        .arg("state")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(state, "in_flight");

    // Memory back: the same complete lands and claims work again.
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory", "0"]);
    let r = post(&store, "/v1/complete", &complete).await;
    assert_eq!(r.json()["outcome"], "completed");
    let r = post(
        &store,
        "/v1/claim",
        &claim_body(&s, "gone", &fp("gone"), 60_000),
    )
    .await;
    assert_eq!(r.json()["outcome"], "acquired");
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(record("gone"))
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        fields.contains(&"fp".to_owned()) && fields.contains(&"lock_expires_ms".to_owned()),
        "{fields:?}"
    );
}
