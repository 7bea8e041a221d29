//! Claims across a primary failover: a primary, one replica and a Sentinel started by the
//! test (`idemgate_e2e::ReplicatedRedis`), servers that find the master through the
//! Sentinel (`--redis-sentinel`), with and without `--redis-wait-replicas 1`.
//!
//! Run with `--nocapture` to see the measured numbers (claim latency with and without
//! WAIT, time from the primary's SIGKILL to the first answer from the new primary).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use idemgate_e2e::ReplicatedRedis;
use serde_json::Value;

const LOCK_TTL_MS: u64 = 60_000;

async fn topology() -> ReplicatedRedis {
    tokio::task::spawn_blocking(|| ReplicatedRedis::start().expect("primary, replica, sentinel"))
        .await
        .unwrap()
}

/// A server on the Sentinel's master; `wait_replicas` 0 means no WAIT.
async fn server(redis: &ReplicatedRedis, wait_replicas: u32) -> Server {
    let mut args = Server::args(&format!("redis://127.0.0.1:{}", redis.primary_port()));
    args.failover.redis_sentinel = Some(redis.sentinel_url());
    args.failover.redis_wait_replicas = wait_replicas;
    args.failover.redis_wait_timeout_ms = 200;
    args.redis_timeout_ms = 1000;
    Server::start_from(args).await
}

/// `POST /v1/claim` of a request without a fencing token (each call is a new request);
/// returns the status and the JSON body.
async fn claim(http: &reqwest::Client, server: &Server, scope: &str, key: &str) -> (u16, Value) {
    let r = http
        .post(format!("{}/v1/claim", server.store))
        .json(&claim_body(scope, key, &fp(key), LOCK_TTL_MS))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Claims `key` until an answer other than 503 comes (the new primary is found), 20 s at
/// most; every 503 must be the store-unavailable problem. Returns the answer and when.
async fn claim_after_failover(
    http: &reqwest::Client,
    server: &Server,
    scope: &str,
    key: &str,
) -> (Value, Instant) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = claim(http, server, scope, key).await;
        if status == 200 {
            return (body, Instant::now());
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            body["type"]
                .as_str()
                .unwrap_or("")
                .ends_with("store-unavailable"),
            "{body}"
        );
        assert!(
            Instant::now() < deadline,
            "no answer from a new primary in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Median and 99th percentile of `n` sequential new-key claims, in microseconds.
async fn claim_latency(
    http: &reqwest::Client,
    server: &Server,
    scope: &str,
    n: usize,
) -> (u128, u128) {
    let mut us = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let (status, body) = claim(http, server, scope, &format!("lat-{i}")).await;
        us.push(started.elapsed().as_micros());
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("acquired")),
            "{body}"
        );
    }
    us.sort_unstable();
    (us[n / 2], us[n * 99 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_an_unacknowledged_claim_is_refused_and_an_acknowledged_one_survives_failover() {
    let started = Instant::now();
    let mut redis = topology().await;
    let waiting = server(&redis, 1).await;
    let plain = server(&redis, 0).await;
    let http = http();
    let s = scope("failover-wait");

    // What WAIT 1 costs on loopback (HTTP call included).
    let (plain_p50, plain_p99) = claim_latency(&http, &plain, &scope("lat-plain"), 300).await;
    let (wait_p50, wait_p99) = claim_latency(&http, &waiting, &scope("lat-wait"), 300).await;
    eprintln!(
        "claim latency, 300 sequential claims: without WAIT p50 {plain_p50} us p99 {plain_p99} us; \
         with WAIT 1 p50 {wait_p50} us p99 {wait_p99} us"
    );

    // The replica hears nothing: WAIT counts 0 of 1, so the claim is undone and refused.
    redis.pause_replica(true).unwrap();
    let refused_at = Instant::now();
    let (status, body) = claim(&http, &waiting, &s, "refused").await;
    let refused_in = refused_at.elapsed();
    redis.pause_replica(false).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .ends_with("store-unavailable"),
        "{body}"
    );
    assert!(
        waiting
            .metrics()
            .await
            .contains("idemgate_redis_wait_shortfalls_total{call=\"claim\"} 1"),
        "the shortfall is counted"
    );
    eprintln!("a claim the replica did not acknowledge was refused in {refused_in:?}");

    // A complete the replica does not acknowledge answers 503 (the record is written on
    // the primary); the filter's retry with the same token lands once the replica is back.
    let token = loop {
        let (status, body) = claim(&http, &waiting, &s, "completed").await;
        if status == 200 {
            assert_eq!(body["outcome"], "acquired", "{body}");
            break body["fencing_token"].as_str().unwrap().to_owned();
        }
        // The resumed replica is still catching up.
        assert!(refused_at.elapsed() < Duration::from_secs(10), "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let complete = serde_json::json!({
        "record": {"scope": s, "key": "completed"},
        "fencing_token": token,
        "status": 201,
        "response": {"status": 201, "headers": [], "body": "e30="},
        "ttl_s": 600
    });
    let send_complete = || {
        http.post(format!("{}/v1/complete", waiting.store))
            .json(&complete)
            .send()
    };
    redis.pause_replica(true).unwrap();
    let r = send_complete().await.unwrap();
    redis.pause_replica(false).unwrap();
    assert_eq!(r.status(), 503);
    assert!(waiting
        .metrics()
        .await
        .contains("idemgate_redis_wait_shortfalls_total{call=\"complete\"} 1"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = send_complete().await.unwrap();
        if r.status() == 200 {
            assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "completed");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retried complete never landed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Acknowledged: the replica has it before the answer, so killing the primary right
    // after the answer loses nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = claim(&http, &waiting, &s, "acked").await;
        if status != 503 || Instant::now() > deadline {
            break (status, body);
        }
        // The resumed replica is still catching up.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("acquired")),
        "{body}"
    );
    redis.kill_primary();
    let killed = Instant::now();
    let (dup, answered) = claim_after_failover(&http, &waiting, &s, "acked").await;
    assert_eq!(
        dup["outcome"], "in_flight",
        "the duplicate must not execute: {dup}"
    );
    let (dup, _) = claim_after_failover(&http, &plain, &s, "acked").await;
    assert_eq!(dup["outcome"], "in_flight", "{dup}");
    redis
        .wait_failover()
        .expect("the sentinel names the replica as master");
    eprintln!(
        "failover: the WAIT server answered from the promoted replica {:?} after the primary's SIGKILL",
        answered - killed
    );

    // The refused claim was never an execution: its key is free on the new primary (the
    // plain server; the waiting one now refuses every new claim: no replica is left).
    let (dup, _) = claim_after_failover(&http, &plain, &s, "refused").await;
    assert_eq!(dup["outcome"], "acquired", "{dup}");
    let (status, body) = claim(&http, &waiting, &s, "no-replica-left").await;
    assert_eq!(
        status, 503,
        "no replica can acknowledge: fail closed; {body}"
    );
    drop((waiting, plain));
    eprintln!("with-WAIT failover test took {:?}", started.elapsed());
}

/// The gap that `--redis-wait-replicas` closes, recorded rather than hidden: without WAIT
/// a claim acknowledged by the primary alone is lost when the primary dies before
/// replicating it, and its duplicate executes a second time on the promoted replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_gap_without_wait_a_claim_the_replica_missed_executes_twice_after_failover() {
    let started = Instant::now();
    let mut redis = topology().await;
    let plain = server(&redis, 0).await;
    let http = http();
    let s = scope("failover-gap");

    // The replica is stopped and its link cut, so the claim reaches no replica.
    redis.pause_replica(true).unwrap();
    redis.cut_replication().unwrap();
    let (status, body) = claim(&http, &plain, &s, "lost").await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("acquired")),
        "{body}"
    );
    redis.kill_primary();
    let killed = Instant::now();
    redis.pause_replica(false).unwrap();

    let (dup, answered) = claim_after_failover(&http, &plain, &s, "lost").await;
    redis
        .wait_failover()
        .expect("the sentinel names the replica as master");
    // THE GAP: "acquired" a second time; the request would execute twice.
    assert_eq!(dup["outcome"], "acquired", "{dup}");
    eprintln!(
        "known gap reproduced: without WAIT the duplicate was acquired again {:?} after the \
         primary's SIGKILL; test took {:?}",
        answered - killed,
        started.elapsed()
    );
}
