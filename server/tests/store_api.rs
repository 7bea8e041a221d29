//! The store API against a real redis-server, driven through `oneshot`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use idemgate_protocol::{ClaimOutcome, StoredResponse, GLOBAL_SCOPE};
use redis::Commands;
use serde_json::{json, Value};

fn stored(status: u16, headers: &[(&str, &str)], body: &[u8]) -> StoredResponse {
    StoredResponse {
        status,
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        body: body.to_vec(),
    }
}

fn complete_body(
    scope: &str,
    key: &str,
    token: &str,
    status: u16,
    response: Option<&StoredResponse>,
    ttl_s: u64,
) -> Value {
    json!({
        "record": {"scope": scope, "key": key},
        "fencing_token": token,
        "status": status,
        "response": response,
        "ttl_s": ttl_s,
    })
}

fn release_body(scope: &str, key: &str, token: &str) -> Value {
    json!({
        "record": {"scope": scope, "key": key},
        "fencing_token": token,
        "status": 502,
    })
}

fn record_key(scope: &str, key: &str) -> String {
    format!("{PREFIX}:rec:{scope}:{key}")
}

#[tokio::test]
async fn claim_acquires_then_reports_in_flight() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("alice");

    let token = acquire(&app, &s, "k-1", &fp("a"), 60_000).await;

    // What the script wrote: one hash at {prefix}:rec:{scope}:{key} with a lock TTL.
    let mut conn = redis.conn();
    let rkey = record_key(&s, "k-1");
    let fields: std::collections::HashMap<String, String> = conn.hgetall(&rkey).unwrap();
    assert_eq!(fields["state"], "in_flight");
    assert_eq!(fields["token"], token);
    assert_eq!(fields["fp"], fp("a"));
    assert_eq!(fields["route"], "payments");
    assert_eq!(fields["method"], "POST");
    assert_eq!(fields["path"], "/v1/payments?x=1");
    let created_ms: u64 = fields["created_ms"].parse().unwrap();
    let lock_expires_ms: u64 = fields["lock_expires_ms"].parse().unwrap();
    assert_eq!(lock_expires_ms - created_ms, 60_000);
    let pttl: i64 = redis::cmd("PTTL").arg(&rkey).query(&mut conn).unwrap();
    assert!(pttl > 59_000 && pttl <= 60_000, "{pttl}");

    let r = post(&app, "/v1/claim", &claim_body(&s, "k-1", &fp("a"), 60_000)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "application/json");
    let v = r.json();
    assert_eq!(v["outcome"], "in_flight", "{v}");
    let retry_after_ms = v["retry_after_ms"].as_u64().unwrap();
    assert!(
        retry_after_ms > 50_000 && retry_after_ms <= 60_000,
        "{retry_after_ms}"
    );
    // The record was not touched by the second claim.
    let token_now: String = conn.hget(&rkey, "token").unwrap();
    assert_eq!(token_now, token);
}

#[tokio::test]
async fn complete_then_claim_replays_exactly_and_counts_replays() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("alice");
    let token = acquire(&app, &s, "pay-1", &fp("p"), 60_000).await;

    let body: Vec<u8> = vec![0x00, 0xff, 0xfe, b'{', 0x80, b'"', 0x00, b'\n', 0xc3, 0x28];
    let response = stored(
        201,
        &[
            ("content-type", "application/json"),
            ("set-cookie", "a=1; Path=/"),
            ("location", "/v1/payments/42"),
            ("set-cookie", "b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT"),
            ("x-list", "a, b,c"),
        ],
        &body,
    );
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "pay-1", &token, 201, Some(&response), 3600),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json(), json!({"outcome": "completed"}));

    let mut conn = redis.conn();
    let rkey = record_key(&s, "pay-1");
    // Body stored as raw bytes, not base64.
    let raw: Vec<u8> = conn.hget(&rkey, "body").unwrap();
    assert_eq!(raw, body);
    let state: String = conn.hget(&rkey, "state").unwrap();
    assert_eq!(state, "completed");
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&rkey).query(&mut conn).unwrap();
    assert!(ttl_ms > 3_590_000 && ttl_ms <= 3_600_000, "{ttl_ms}");

    for n in 1..=2 {
        let r = post(
            &app,
            "/v1/claim",
            &claim_body(&s, "pay-1", &fp("p"), 60_000),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let outcome: ClaimOutcome = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            outcome,
            ClaimOutcome::Replay {
                response: response.clone()
            }
        );
        let replays: u64 = conn.hget(&rkey, "replays").unwrap();
        assert_eq!(replays, n);
    }
    let last_replay_ms: Option<u64> = conn.hget(&rkey, "last_replay_ms").unwrap();
    assert!(last_replay_ms.is_some());

    // A second complete with the same token (a retry whose reply was lost) answers the same
    // success and writes nothing.
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "pay-1", &token, 500, None, 3600),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));
    let status: u16 = conn.hget(&rkey, "status").unwrap();
    assert_eq!(status, 201);
}

#[tokio::test]
async fn large_binary_body_round_trips() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let token = acquire(&app, GLOBAL_SCOPE, "big", &fp("big"), 60_000).await;
    let body: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let response = stored(200, &[("content-type", "application/octet-stream")], &body);
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(GLOBAL_SCOPE, "big", &token, 200, Some(&response), 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));
    let r = post(
        &app,
        "/v1/claim",
        &claim_body(GLOBAL_SCOPE, "big", &fp("big"), 60_000),
    )
    .await;
    let outcome: ClaimOutcome = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(outcome, ClaimOutcome::Replay { response });
}

#[tokio::test]
async fn another_fingerprint_is_a_mismatch_in_flight_and_completed() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("bob");
    let token = acquire(&app, &s, "k", &fp("one"), 60_000).await;

    let r = post(&app, "/v1/claim", &claim_body(&s, "k", &fp("two"), 60_000)).await;
    assert_eq!(r.json(), json!({"outcome": "mismatch"}));

    let response = stored(200, &[], b"ok");
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "k", &token, 200, Some(&response), 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));

    let r = post(&app, "/v1/claim", &claim_body(&s, "k", &fp("two"), 60_000)).await;
    assert_eq!(r.json(), json!({"outcome": "mismatch"}));
    // The mismatch did not count as a replay.
    let replays: u64 = redis.conn().hget(record_key(&s, "k"), "replays").unwrap();
    assert_eq!(replays, 0);
}

#[tokio::test]
async fn expired_lock_is_reclaimed_and_the_first_holder_is_fenced_off() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("carol");
    let first = acquire(&app, &s, "slow", &fp("x"), 200).await;

    tokio::time::sleep(Duration::from_millis(350)).await;
    let second = acquire(&app, &s, "slow", &fp("x"), 60_000).await;
    assert_ne!(first, second);

    // The first holder's late complete is refused and writes nothing.
    let late = stored(200, &[("x-from", "first")], b"first");
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "slow", &first, 200, Some(&late), 60),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"outcome": "lock_lost"}));
    let mut conn = redis.conn();
    let rkey = record_key(&s, "slow");
    let (state, token, body): (String, String, Option<Vec<u8>>) = redis::cmd("HMGET")
        .arg(&rkey)
        .arg("state")
        .arg("token")
        .arg("body")
        .query(&mut conn)
        .unwrap();
    assert_eq!(state, "in_flight");
    assert_eq!(token, second);
    assert_eq!(body, None);
    let r = post(&app, "/v1/claim", &claim_body(&s, "slow", &fp("x"), 60_000)).await;
    assert_eq!(r.json()["outcome"], "in_flight");

    // Its late release is refused too, and the second holder still completes.
    let r = post(&app, "/v1/release", &release_body(&s, "slow", &first)).await;
    assert_eq!(r.json(), json!({"outcome": "lock_lost"}));
    let good = stored(201, &[("x-from", "second")], b"second");
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "slow", &second, 201, Some(&good), 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));
    let r = post(&app, "/v1/claim", &claim_body(&s, "slow", &fp("x"), 60_000)).await;
    let outcome: ClaimOutcome = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(outcome, ClaimOutcome::Replay { response: good });
}

#[tokio::test]
async fn release_lets_the_next_claim_acquire_and_stale_release_is_refused() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("dave");
    let first = acquire(&app, &s, "r", &fp("r"), 60_000).await;

    let r = post(&app, "/v1/release", &release_body(&s, "r", &first)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"outcome": "released"}));
    // The record is gone; a short-lived tombstone of the token is left.
    let state: String = redis.conn().hget(record_key(&s, "r"), "state").unwrap();
    assert_eq!(state, "released");

    // Releasing again with the same token (a retry whose reply was lost) answers the same.
    let r = post(&app, "/v1/release", &release_body(&s, "r", &first)).await;
    assert_eq!(r.json(), json!({"outcome": "released"}));

    let second = acquire(&app, &s, "r", &fp("r"), 60_000).await;
    assert_ne!(first, second);
    // A stale token cannot release the new holder's lock.
    let r = post(&app, "/v1/release", &release_body(&s, "r", &first)).await;
    assert_eq!(r.json(), json!({"outcome": "lock_lost"}));
    let token: String = redis.conn().hget(record_key(&s, "r"), "token").unwrap();
    assert_eq!(token, second);

    // A completed record cannot be released.
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "r", &second, 200, Some(&stored(200, &[], b"")), 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));
    let r = post(&app, "/v1/release", &release_body(&s, "r", &second)).await;
    assert_eq!(r.json(), json!({"outcome": "lock_lost"}));
    let state: String = redis.conn().hget(record_key(&s, "r"), "state").unwrap();
    assert_eq!(state, "completed");
}

#[tokio::test]
async fn completed_without_response_is_not_replayable() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("erin");
    let token = acquire(&app, &s, "huge", &fp("h"), 60_000).await;
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "huge", &token, 201, None, 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));
    let replayable: String = redis
        .conn()
        .hget(record_key(&s, "huge"), "replayable")
        .unwrap();
    assert_eq!(replayable, "0");

    let r = post(&app, "/v1/claim", &claim_body(&s, "huge", &fp("h"), 60_000)).await;
    assert_eq!(
        r.json(),
        json!({"outcome": "not_replayable", "status": 201})
    );
    // Another fingerprint is still a mismatch.
    let r = post(
        &app,
        "/v1/claim",
        &claim_body(&s, "huge", &fp("other"), 60_000),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "mismatch"}));
}

#[tokio::test]
async fn two_scopes_with_the_same_key_are_separate_records() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let (a, b) = (scope("tenant-a"), scope("tenant-b"));
    let ta = acquire(&app, &a, "same", &fp("1"), 60_000).await;
    let tb = acquire(&app, &b, "same", &fp("2"), 60_000).await;
    let tg = acquire(&app, GLOBAL_SCOPE, "same", &fp("3"), 60_000).await;
    assert_ne!(ta, tb);

    let ra = stored(201, &[("location", "/a")], b"a");
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&a, "same", &ta, 201, Some(&ra), 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));
    // A's token does not work on B's record.
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&b, "same", &ta, 201, Some(&ra), 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "lock_lost"}));

    let r = post(&app, "/v1/claim", &claim_body(&a, "same", &fp("1"), 60_000)).await;
    assert_eq!(r.json()["outcome"], "replay");
    let r = post(&app, "/v1/claim", &claim_body(&b, "same", &fp("2"), 60_000)).await;
    assert_eq!(r.json()["outcome"], "in_flight");

    let mut conn = redis.conn();
    for (scope, token) in [(&a, &ta), (&b, &tb), (&GLOBAL_SCOPE.to_owned(), &tg)] {
        let t: String = conn.hget(record_key(scope, "same"), "token").unwrap();
        assert_eq!(&t, token);
    }
}

async fn assert_bad_store_call(
    app: &axum::Router,
    path: &str,
    body: impl Into<axum::body::Body>,
    why: &str,
) {
    let r = send(app, "POST", path, body).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "{why}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.content_type(), "application/problem+json", "{why}");
    let v = r.json();
    assert_eq!(
        v["type"], "urn:idemgate:problem:bad-store-call",
        "{why}: {v}"
    );
    assert_eq!(v["status"], 400, "{why}");
    assert_eq!(v["title"], "Malformed store call", "{why}");
    assert!(
        v["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{why}: {v}"
    );
}

#[tokio::test]
async fn malformed_calls_are_400_problems() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("frank");
    let good = claim_body(&s, "k", &fp("f"), 1000);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };

    assert_bad_store_call(&app, "/v1/claim", "{not json", "bad JSON").await;
    assert_bad_store_call(&app, "/v1/claim", "", "empty body").await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["extra"] = json!(1)),
        "unknown field",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["record"]["zone"] = json!(1)),
        "unknown record field",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["record"]["scope"] = json!("ABC")),
        "bad scope",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["record"]["scope"] = json!(s.to_uppercase())),
        "uppercase scope",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["record"]["key"] = json!("")),
        "empty key",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["record"]["key"] = json!("x".repeat(256))),
        "256-char key",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["record"]["key"] = json!("a\u{1}b")),
        "control char",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["lock_ttl_ms"] = json!(0)),
        "lock_ttl_ms 0",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["lock_ttl_ms"] = json!(-5)),
        "negative lock_ttl_ms",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["fingerprint"] = json!(fp("f").to_uppercase())),
        "uppercase fingerprint",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| v["fingerprint"] = json!("abc")),
        "short fingerprint",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/claim",
        with(&|v| {
            v.as_object_mut().unwrap().remove("route");
        }),
        "missing field",
    )
    .await;

    let token = "0".repeat(32);
    let resp = stored(200, &[], b"");
    assert_bad_store_call(
        &app,
        "/v1/complete",
        serde_json::to_vec(&complete_body(&s, "k", &token, 200, Some(&resp), 0)).unwrap(),
        "ttl_s 0",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/complete",
        serde_json::to_vec(&complete_body(&s, "k", "nope", 200, None, 60)).unwrap(),
        "bad token",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/complete",
        serde_json::to_vec(&complete_body(&s, "k", &token, 201, Some(&resp), 60)).unwrap(),
        "status differs",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/complete",
        serde_json::to_vec(&complete_body(&s, "k", &token, 42, None, 60)).unwrap(),
        "status 42",
    )
    .await;
    let mut bad_b64 = complete_body(&s, "k", &token, 200, Some(&resp), 60);
    bad_b64["response"]["body"] = json!("%%%");
    assert_bad_store_call(
        &app,
        "/v1/complete",
        serde_json::to_vec(&bad_b64).unwrap(),
        "bad base64",
    )
    .await;
    assert_bad_store_call(
        &app,
        "/v1/release",
        serde_json::to_vec(&release_body(&s, "", &token)).unwrap(),
        "release empty key",
    )
    .await;

    // Nothing was written by any of them.
    let keys: Vec<String> = redis.conn().keys("*").unwrap();
    assert!(keys.is_empty(), "{keys:?}");

    // Unknown paths are 404 problems too.
    let r = send(&app, "GET", "/nope", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["type"], "urn:idemgate:problem:not-found");
}

#[tokio::test]
async fn redis_down_answers_503_fast_and_recovers_after_restart() {
    let mut redis = RedisServer::start();
    let (app, admin) = apps(&redis.url());
    let s = scope("gina");
    acquire(&app, &s, "before", &fp("b"), 60_000).await;
    let r = send(&app, "GET", "/healthz", "").await;
    assert_eq!(
        (r.status, r.json()),
        (StatusCode::OK, json!({"redis": "up"}))
    );

    redis.kill();
    for attempt in 0..3 {
        let started = Instant::now();
        let r = post(
            &app,
            "/v1/claim",
            &claim_body(&s, "during", &fp("d"), 60_000),
        )
        .await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1000),
            "attempt {attempt} took {took:?}"
        );
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.content_type(), "application/problem+json");
        assert_eq!(
            r.headers.get("retry-after").map(|v| v.to_str().unwrap()),
            Some("1")
        );
        let v = r.json();
        assert_eq!(v["type"], "urn:idemgate:problem:store-unavailable");
        assert_eq!(v["status"], 503);
        assert_eq!(v["retry_after_s"], 1);
    }
    let started = Instant::now();
    let r = send(&app, "GET", "/healthz", "").await;
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(
        (r.status, r.json()),
        (StatusCode::SERVICE_UNAVAILABLE, json!({"redis": "down"}))
    );
    let r = send(&admin, "GET", "/api/health", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["redis"], "down");

    // Same port, fresh process (empty data, empty script cache): the app recovers alone.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let token = loop {
        let r = post(
            &app,
            "/v1/claim",
            &claim_body(&s, "after", &fp("a"), 60_000),
        )
        .await;
        if r.status == StatusCode::OK {
            let v = r.json();
            assert_eq!(v["outcome"], "acquired", "{v}");
            break v["fencing_token"].as_str().unwrap().to_owned();
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "claims still fail 10 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r = post(
        &app,
        "/v1/complete",
        &complete_body(&s, "after", &token, 200, Some(&stored(200, &[], b"x")), 60),
    )
    .await;
    assert_eq!(r.json(), json!({"outcome": "completed"}));
    let r = send(&app, "GET", "/healthz", "").await;
    assert_eq!(
        (r.status, r.json()),
        (StatusCode::OK, json!({"redis": "up"}))
    );
}

#[tokio::test]
async fn admin_serves_placeholder_and_health() {
    let redis = RedisServer::start();
    let (_, admin) = apps(&redis.url());
    let r = send(&admin, "GET", "/", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.content_type().starts_with("text/html"),
        "{}",
        r.content_type()
    );
    let html = String::from_utf8(r.body).unwrap();
    assert!(html.contains("idemgate dashboard — coming soon"), "{html}");
    assert!(html.contains("href=\"/api/health\""), "{html}");

    let r = send(&admin, "GET", "/api/health", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["redis"], "up", "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["redis_latency_ms"].as_f64().is_some(), "{v}");
}

#[tokio::test]
async fn concurrent_claims_acquire_exactly_once() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("henry");
    let calls = (0..20).map(|_| {
        let app = app.clone();
        let body = claim_body(&s, "race", &fp("race"), 60_000);
        tokio::spawn(async move { post(&app, "/v1/claim", &body).await.json() })
    });
    let mut acquired = 0;
    let mut in_flight = 0;
    for call in calls {
        let v = call.await.unwrap();
        match v["outcome"].as_str() {
            Some("acquired") => acquired += 1,
            Some("in_flight") => in_flight += 1,
            _ => panic!("{v}"),
        }
    }
    assert_eq!((acquired, in_flight), (1, 19));
}

#[tokio::test]
async fn body_over_16_mib_is_a_400_problem() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let body = vec![b' '; 16 * 1024 * 1024 + 1];
    let r = send(&app, "POST", "/v1/complete", body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.content_type(), "application/problem+json");
    assert_eq!(r.json()["type"], "urn:idemgate:problem:bad-store-call");
}

fn claim_with(key: &str, token: &str, fingerprint: &str, lock_ttl_ms: u64, policy: Value) -> Value {
    let mut body = claim_body(&scope("erin"), key, fingerprint, lock_ttl_ms);
    body["fencing_token"] = json!(token);
    if !policy.is_null() {
        body["unknown_outcome"] = policy;
    }
    body
}

fn tok(n: u8) -> String {
    format!("{n:032x}")
}

async fn claim_json(app: &axum::Router, body: &Value) -> Value {
    let r = post(app, "/v1/claim", body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    r.json()
}

#[tokio::test]
async fn store_calls_with_the_callers_token_are_idempotent() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("erin");
    let t1 = tok(1);
    // A claim retried with its own token (its reply was lost) is acquired again.
    for _ in 0..2 {
        let v = claim_json(&app, &claim_with("i-1", &t1, &fp("a"), 60_000, Value::Null)).await;
        assert_eq!(v, json!({"outcome": "acquired", "fencing_token": t1}));
    }
    // Another request gets in_flight with the lock's age.
    let v = claim_json(
        &app,
        &claim_with("i-1", &tok(2), &fp("a"), 60_000, Value::Null),
    )
    .await;
    assert_eq!(v["outcome"], "in_flight");
    assert!(v["age_ms"].as_u64().unwrap() < 5_000, "{v}");
    // A complete retried after a lost reply answers completed again and changes nothing.
    let body = complete_body(&s, "i-1", &t1, 201, Some(&stored(201, &[], b"one")), 60);
    for _ in 0..2 {
        let r = post(&app, "/v1/complete", &body).await;
        assert_eq!(r.json(), json!({"outcome": "completed"}));
    }
    let v = claim_json(
        &app,
        &claim_with("i-1", &tok(3), &fp("a"), 60_000, Value::Null),
    )
    .await;
    assert_eq!(v["outcome"], "replay");

    // A release that overtook its own claim: the late claim writes nothing.
    let t4 = tok(4);
    let r = post(&app, "/v1/release", &release_body(&s, "i-2", &t4)).await;
    assert_eq!(r.json(), json!({"outcome": "released"}));
    let v = claim_json(&app, &claim_with("i-2", &t4, &fp("b"), 60_000, Value::Null)).await;
    assert_eq!(v, json!({"outcome": "released"}));
    // Anyone else's claim treats the tombstone as absent.
    let v = claim_json(
        &app,
        &claim_with("i-2", &tok(5), &fp("b"), 60_000, Value::Null),
    )
    .await;
    assert_eq!(v["outcome"], "acquired");
}

#[tokio::test]
async fn unknown_outcomes_are_held_then_reexecuted_or_refused() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("erin");
    let reexecute = json!({"hold_s": 1, "then": "reexecute", "ttl_s": 30});
    let refuse = json!({"hold_s": 1, "then": "refuse", "ttl_s": 30});
    for (key, policy) in [("u-re", &reexecute), ("u-ref", &refuse)] {
        let t = tok(10);
        claim_json(&app, &claim_with(key, &t, &fp(key), 60_000, policy.clone())).await;
        let mut body = complete_body(&s, key, &t, 499, None, 30);
        body["outcome_unknown"] = json!(true);
        let r = post(&app, "/v1/complete", &body).await;
        assert_eq!(r.json(), json!({"outcome": "completed"}));
        let state: String = redis.conn().hget(record_key(&s, key), "state").unwrap();
        assert_eq!(state, "unknown");
        let v = claim_json(
            &app,
            &claim_with(key, &tok(11), &fp(key), 60_000, policy.clone()),
        )
        .await;
        assert_eq!(v["outcome"], "unknown", "{v}");
        let ms = v["retry_after_ms"].as_u64().unwrap();
        assert!(ms > 0 && ms <= 1_000, "{v}");
        // A different request with the key is still a mismatch.
        let v = claim_json(
            &app,
            &claim_with(key, &tok(12), &fp("x"), 60_000, policy.clone()),
        )
        .await;
        assert_eq!(v["outcome"], "mismatch");
    }
    tokio::time::sleep(Duration::from_millis(1_150)).await;
    let v = claim_json(
        &app,
        &claim_with("u-re", &tok(13), &fp("u-re"), 60_000, reexecute),
    )
    .await;
    assert_eq!(v["outcome"], "acquired", "reexecute: the hold is over");
    let v = claim_json(
        &app,
        &claim_with("u-ref", &tok(14), &fp("u-ref"), 60_000, refuse),
    )
    .await;
    assert_eq!(
        v,
        json!({"outcome": "unknown", "retry_after_ms": null}),
        "refuse: final"
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg(record_key(&s, "u-ref"))
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        pttl > 25_000 && pttl <= 30_000,
        "refused until ttl_s: {pttl}"
    );

    // An unknown outcome with a response is a bad call.
    let mut body = complete_body(&s, "u-x", &tok(15), 200, Some(&stored(200, &[], b"")), 30);
    body["outcome_unknown"] = json!(true);
    assert_eq!(
        post(&app, "/v1/complete", &body).await.status,
        StatusCode::BAD_REQUEST
    );
    let bad = claim_with("u-x", "not-hex", &fp("u-x"), 60_000, Value::Null);
    assert_eq!(
        post(&app, "/v1/claim", &bad).await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn an_expired_lock_is_an_unknown_outcome_until_the_late_answer_lands() {
    let redis = RedisServer::start();
    let (app, _) = apps(&redis.url());
    let s = scope("erin");
    let policy = json!({"hold_s": 5, "then": "refuse", "ttl_s": 60});
    let t = tok(20);
    claim_json(&app, &claim_with("late", &t, &fp("l"), 300, policy.clone())).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The lock expired with nothing stored: not re-executable, not in flight.
    let v = claim_json(
        &app,
        &claim_with("late", &tok(21), &fp("l"), 300, policy.clone()),
    )
    .await;
    assert_eq!(v["outcome"], "unknown", "{v}");
    // The first execution's late answer still lands (its token is still current)...
    let body = complete_body(&s, "late", &t, 201, Some(&stored(201, &[], b"late")), 60);
    assert_eq!(
        post(&app, "/v1/complete", &body).await.json(),
        json!({"outcome": "completed"})
    );
    // ...and the retry replays it.
    let v = claim_json(&app, &claim_with("late", &tok(22), &fp("l"), 300, policy)).await;
    assert_eq!(v["outcome"], "replay", "{v}");
}
