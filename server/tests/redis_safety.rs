//! A Redis whose memory is full refuses claims cleanly (503, never 500) while stored
//! responses still replay. Each test runs its own redis-server on a free port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;

fn redis_cmd(redis: &RedisServer, args: &[&str]) -> redis::Value {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(&mut redis.conn()).unwrap()
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
