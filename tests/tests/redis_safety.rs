#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! Redis events through real Envoy, the filter and the server: a Redis SIGKILLed and
//! restarted on its data directory (AOF, fsync every second) still replays completed keys,
//! and a Redis whose memory is full makes fail-closed routes answer 503, never executing.

use std::time::{Duration, Instant};

use idemgate_e2e::{demo_filter_config, Component, Reply, Stack, StackOptions};
use serde_json::{json, Value};

const AUTH: &str = "Bearer tenant-a";

fn stack(name: &str) -> Stack {
    Stack::start(StackOptions {
        server_args: vec!["--redis-check-interval-s".into(), "1".into()],
        ..StackOptions::new(name, demo_filter_config().expect("demo filter config"))
    })
    .expect("stack starts")
}

fn pay(stack: &Stack, key: &str) -> Reply {
    stack
        .gateway()
        .post("/v1/payments")
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .json(&json!({"amount": 700, "currency": "eur"}))
        .send()
        .expect("POST /v1/payments through the gateway")
}

fn health(stack: &Stack) -> Value {
    stack
        .admin()
        .get("/api/health")
        .send()
        .expect("GET /api/health")
        .json()
        .expect("health JSON")
}

#[test]
fn a_redis_killed_and_restarted_on_its_aof_still_replays_completed_keys() {
    let mut stack = stack("redis-restart");
    let h = health(&stack);
    assert_eq!(h["redis_safety"]["persistence"], "ok", "AOF: {h}");
    let first = pay(&stack, "aof-1");
    assert_eq!(first.status, 201, "{}", first.text());
    // appendfsync everysec: what was written more than a second ago is on disk.
    std::thread::sleep(Duration::from_millis(1500));

    stack.kill(Component::Redis);
    let down = pay(&stack, "aof-1");
    assert_eq!(down.status, 503, "fail-closed while Redis is down");
    let restarted = Instant::now();
    stack.restart(Component::Redis).expect("redis restarts");

    // The server reconnects by itself; a retry meanwhile may still get 503, never a
    // second execution.
    let mut retry = pay(&stack, "aof-1");
    for _ in 0..50 {
        if retry.status != 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        retry = pay(&stack, "aof-1");
    }
    eprintln!(
        "replay answered {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(
        stack.executions("/v1/payments").unwrap(),
        1,
        "executed once"
    );

    // The server noticed the restart (run_id changed) within its 1 s check interval.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let h = health(&stack);
        if h["redis_safety"]["restarts"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "restart not counted: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn with_redis_memory_full_a_fail_closed_route_answers_503_and_never_executes() {
    let stack = stack("redis-oom");
    let done = pay(&stack, "oom-done");
    assert_eq!(done.status, 201, "{}", done.text());

    // Fill Redis, then set maxmemory below what it uses: with noeviction (the default)
    // every write that may grow memory is refused.
    stack
        .redis(&[
            "EVAL",
            "for i = 1, 300 do redis.call('SET', 'junk:' .. i, string.rep('x', 10000)) end",
            "0",
        ])
        .expect("fill");
    stack
        .redis(&["CONFIG", "SET", "maxmemory", "1mb"])
        .expect("maxmemory");
    assert!(
        stack.redis(&["SET", "probe", "1"]).is_err(),
        "Redis is full"
    );

    let r = pay(&stack, "oom-new");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let problem: Value = r.json().expect("problem JSON");
    assert_eq!(problem["type"], "urn:idemgate:problem:store-unavailable");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(
        stack.executions("/v1/payments").unwrap(),
        1,
        "the upstream was not called"
    );

    // A completed key still replays with memory full.
    let replay = pay(&stack, "oom-done");
    assert_eq!(replay.status, 201, "{}", replay.text());
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));

    // Memory back: the refused key executes once.
    stack
        .redis(&["CONFIG", "SET", "maxmemory", "0"])
        .expect("maxmemory");
    let r = pay(&stack, "oom-new");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(stack.executions("/v1/payments").unwrap(), 2);
}
