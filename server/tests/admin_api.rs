//! The admin API against a real redis-server, driven through `oneshot`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use common::*;
use idemgate_protocol::admin::{BulkPurgeOutcome, Event, KeyDetail, KeyPage, StatsResponse};
use idemgate_protocol::StoredResponse;
use serde_json::{json, Value};

async fn complete(app: &Router, scope: &str, key: &str, token: &str, body: &[u8]) {
    let response = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/octet-stream".into())],
        body: body.to_vec(),
    };
    let r = post(
        app,
        "/v1/complete",
        &json!({
            "record": {"scope": scope, "key": key},
            "fencing_token": token,
            "status": 201,
            "response": response,
            "ttl_s": 3600,
        }),
    )
    .await;
    assert_eq!(r.json()["outcome"], "completed");
}

/// Polls `/api/events/recent` until `pred` holds for the list (events are written in the
/// background).
async fn wait_events(admin: &Router, query: &str, pred: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = admin_get(admin, &format!("/api/events/recent?{query}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let events: Vec<Event> = serde_json::from_slice(&r.body).unwrap();
        if pred(&events) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "events never matched: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn api_requires_a_bearer_token_except_health_and_metrics() {
    let redis = RedisServer::start();
    let (_, admin) = apps(&redis.url());
    for (token, why) in [
        (None, "header is required"),
        (Some("wrong-token-0123456789"), "not valid"),
    ] {
        for path in ["/api/keys", "/api/stats", "/api/events/recent", "/api/nope"] {
            let r = send_auth(&admin, "GET", path, token, Body::empty()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(r.content_type(), "application/problem+json");
            assert!(r.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"));
            let v = r.json();
            assert_eq!(v["type"], "urn:idemgate:problem:unauthorized");
            assert!(v["detail"].as_str().unwrap().contains(why), "{v}");
        }
    }
    // access_token in the query is only for /api/events (EventSource).
    let r = send_auth(
        &admin,
        "GET",
        &format!("/api/keys?access_token={TOKEN}"),
        None,
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Unknown API paths with a token: 404 problem.
    let r = admin_get(&admin, "/api/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["type"], "urn:idemgate:problem:not-found");

    let r = send(&admin, "GET", "/api/health", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(&admin, "GET", "/metrics", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("idemgate_redis_errors_total"), "{text}");

    // Without any configured token every /api call is refused and says why.
    let client = redis::Client::open(redis.url()).unwrap();
    let store = idemgate_server::Store::new(client, PREFIX, Duration::from_millis(500)).unwrap();
    let state =
        idemgate_server::AppState::new(store, idemgate_server::AdminTokens::none()).unwrap();
    let bare = idemgate_server::admin_app(state);
    let r = admin_get(&bare, "/api/keys").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("no admin token is configured"));
}

#[tokio::test]
async fn keys_list_show_purge_release_and_their_events() {
    let redis = RedisServer::start();
    let (store, admin) = apps(&redis.url());
    let alice = scope("alice");
    let bob = scope("bob");
    let t1 = acquire(&store, &alice, "order-1", &fp("1"), 60_000).await;
    complete(&store, &alice, "order-1", &t1, &[0xff, 0x00, 0xfe]).await;
    let _t2 = acquire(&store, &alice, "order-2", &fp("2"), 60_000).await;
    let t3 = acquire(&store, &bob, "weird*[key]?", &fp("3"), 60_000).await;
    complete(&store, &bob, "weird*[key]?", &t3, b"{\"ok\":true}").await;

    let list = |q: &str| {
        let admin = admin.clone();
        let q = q.to_owned();
        async move {
            let r = admin_get(&admin, &format!("/api/keys?{q}")).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
            let page: KeyPage = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(page.next_cursor, None);
            let mut keys: Vec<String> = page.items.iter().map(|s| s.key.clone()).collect();
            keys.sort();
            keys
        }
    };
    assert_eq!(list("").await, ["order-1", "order-2", "weird*[key]?"]);
    assert_eq!(list("state=in_flight").await, ["order-2"]);
    assert_eq!(list("state=completed").await, ["order-1", "weird*[key]?"]);
    assert_eq!(
        list(&format!("scope={alice}")).await,
        ["order-1", "order-2"]
    );
    assert_eq!(list("prefix=weird*").await, ["weird*[key]?"]);
    assert_eq!(
        list(&format!("prefix={}", enc("weird*["))).await,
        ["weird*[key]?"]
    );
    assert!(list("prefix=weirdX").await.is_empty());
    assert_eq!(list("route=payments").await.len(), 3);
    assert!(list("route=other").await.is_empty());
    assert!(list("min_age_ms=600000").await.is_empty());
    assert_eq!(list("max_age_ms=600000").await.len(), 3);
    for bad in [
        "limit=0",
        "limit=501",
        "scope=nothex",
        "state=bogus",
        "cursor=zzz",
    ] {
        let r = admin_get(&admin, &format!("/api/keys?{bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.json()["type"], "urn:idemgate:problem:bad-request");
    }

    // Detail: binary body previewed as base64, never raw.
    let r = admin_get(&admin, &format!("/api/keys/{alice}/order-1")).await;
    assert_eq!(r.status, StatusCode::OK);
    let d: KeyDetail = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(d.summary.status, Some(201));
    assert_eq!(d.fingerprint, fp("1"));
    assert!(
        d.ttl_ms > 3_500_000 && d.ttl_ms <= 3_600_000,
        "{}",
        d.ttl_ms
    );
    let p = d.response.unwrap();
    assert!(p.body_preview_base64);
    assert_eq!(p.body_preview, "/wD+");
    assert_eq!(p.body_bytes, 3);
    let r = admin_get(&admin, &format!("/api/keys/{bob}/{}", enc("weird*[key]?"))).await;
    let d: KeyDetail = serde_json::from_slice(&r.body).unwrap();
    let p = d.response.unwrap();
    assert_eq!(
        (p.body_preview.as_str(), p.body_preview_base64),
        ("{\"ok\":true}", false)
    );
    let r = admin_get(&admin, &format!("/api/keys/{alice}/order-2")).await;
    let d: KeyDetail = serde_json::from_slice(&r.body).unwrap();
    assert!(d.lock_expires_ms.is_some() && d.response.is_none());
    let r = admin_get(&admin, &format!("/api/keys/{alice}/absent")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["type"], "urn:idemgate:problem:not-found");

    // Release only touches in-flight records.
    let r = admin_call(
        &admin,
        "POST",
        &format!("/api/keys/{alice}/order-1/release"),
        &json!({}),
    )
    .await;
    assert_eq!(r.json(), json!({"purged": false}));
    let r = admin_call(
        &admin,
        "POST",
        &format!("/api/keys/{alice}/order-2/release"),
        &json!({}),
    )
    .await;
    assert_eq!(r.json(), json!({"purged": true}));
    let r = admin_call(
        &admin,
        "POST",
        &format!("/api/keys/{alice}/order-2/release"),
        &json!({}),
    )
    .await;
    assert_eq!(r.json(), json!({"purged": false}));
    // Purge deletes a completed record once; a second purge finds nothing.
    let r = admin_call(
        &admin,
        "DELETE",
        &format!("/api/keys/{alice}/order-1"),
        &json!({}),
    )
    .await;
    assert_eq!(r.json(), json!({"purged": true}));
    let r = admin_call(
        &admin,
        "DELETE",
        &format!("/api/keys/{alice}/order-1"),
        &json!({}),
    )
    .await;
    assert_eq!(r.json(), json!({"purged": false}));
    assert_eq!(list("").await, ["weird*[key]?"]);

    // Every decision and operator action is an event, newest first, with the actor.
    let events = wait_events(&admin, &format!("scope={alice}&limit=20"), |e| e.len() >= 5).await;
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            serde_json::to_value(e.kind)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        ["purged", "lock_released", "claimed", "completed", "claimed"],
        "{events:#?}"
    );
    assert_eq!(events[0].actor.as_deref(), Some("tester"));
    assert_eq!(events[0].route.as_deref(), Some("payments"));
    assert_eq!(events[1].actor.as_deref(), Some("tester"));
    assert_eq!(events[3].route.as_deref(), Some("payments"));
    let only = wait_events(
        &admin,
        &format!("scope={alice}&key=order-2&kind=lock_released"),
        |e| !e.is_empty(),
    )
    .await;
    assert_eq!(only.len(), 1);
}

#[tokio::test]
async fn pagination_under_churn_returns_every_stable_key() {
    let redis = RedisServer::start();
    let (store, admin) = apps(&redis.url());
    let s = scope("churn");
    let mut stable = HashSet::new();
    for i in 0..300 {
        let key = format!("stable-{i}");
        acquire(&store, &s, &key, &fp("x"), 600_000).await;
        stable.insert(key);
    }
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    let mut churn = 0;
    loop {
        let mut q = "limit=7".to_owned();
        if let Some(c) = &cursor {
            q.push_str(&format!("&cursor={}", enc(c)));
        }
        let r = admin_get(&admin, &format!("/api/keys?{q}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let page: KeyPage = serde_json::from_slice(&r.body).unwrap();
        assert!(page.items.len() <= 7);
        let mut in_page = HashSet::new();
        for item in &page.items {
            assert!(
                in_page.insert(item.key.clone()),
                "duplicate within a page: {}",
                item.key
            );
            seen.insert(item.key.clone());
        }
        // Churn: keys come and go between pages (enough to make Redis rehash).
        for _ in 0..15 {
            acquire(&store, &s, &format!("churn-{churn}"), &fp("x"), 600_000).await;
            churn += 1;
        }
        for j in (0..churn).step_by(3) {
            let _ = admin_call(
                &admin,
                "DELETE",
                &format!("/api/keys/{s}/churn-{j}"),
                &json!({}),
            )
            .await;
        }
        pages += 1;
        assert!(pages < 500, "the listing does not end");
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let missing: Vec<_> = stable.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "missing after {pages} pages: {missing:?}"
    );
}

#[tokio::test]
async fn bulk_purge_needs_a_matching_fresh_confirmation() {
    let redis = RedisServer::start();
    let (store, admin) = apps(&redis.url());
    let a = scope("a");
    let b = scope("b");
    for i in 0..25 {
        completed(&store, &a, &format!("tmp-{i}"), &fp("x")).await;
        completed(&store, &a, &format!("keep-{i}"), &fp("x")).await;
        completed(&store, &b, &format!("tmp-{i}"), &fp("x")).await;
    }
    // In flight: a purge never deletes these (their request may still be executing).
    acquire(&store, &a, "tmp-running", &fp("x"), 600_000).await;
    let r = admin_call(&admin, "POST", "/api/purge", &json!({"dry_run": true})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let dry = |filter: Value| {
        let admin = admin.clone();
        async move {
            let mut body = filter;
            body["dry_run"] = json!(true);
            let r = admin_call(&admin, "POST", "/api/purge", &body).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
            match serde_json::from_slice(&r.body).unwrap() {
                BulkPurgeOutcome::DryRun {
                    matched,
                    confirmation,
                    confirmation_expires_ms,
                    ..
                } => {
                    assert!(confirmation_expires_ms > idemgate_server::events::now_ms());
                    (matched, confirmation)
                }
                other => panic!("{other:?}"),
            }
        }
    };
    let (matched, token) = dry(json!({"scope": a, "prefix": "tmp-"})).await;
    assert_eq!(matched, 25);
    // Nothing was deleted by the dry run.
    let (matched, _) = dry(json!({"prefix": "tmp-"})).await;
    assert_eq!(matched, 50);
    let (matched, _) = dry(json!({"route": "payments"})).await;
    assert_eq!(matched, 75);
    let (matched, _) = dry(json!({"route": "other"})).await;
    assert_eq!(matched, 0);

    // Missing, foreign-filter and wrong tokens: 409.
    let real = |body: Value| {
        let admin = admin.clone();
        async move { admin_call(&admin, "POST", "/api/purge", &body).await }
    };
    let r = real(json!({"scope": a, "prefix": "tmp-", "dry_run": false})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(
        r.json()["type"],
        "urn:idemgate:problem:confirmation-mismatch"
    );
    let r = real(
        json!({"scope": a, "prefix": "tmp-", "dry_run": false, "confirmation": "0".repeat(32)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = real(json!({"prefix": "tmp-", "dry_run": false, "confirmation": token})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "a token for another filter");
    // The token was consumed by that attempt: get a fresh one.
    let (_, token) = dry(json!({"scope": a, "prefix": "tmp-"})).await;
    // An expired token (simulated: the confirmation key's TTL runs out).
    let (_, expired) = dry(json!({"scope": a, "prefix": "tmp-"})).await;
    let mut conn = redis.conn();
    let _: () = redis::cmd("PEXPIRE")
        .arg(format!("{{{PREFIX}}}:purge:{expired}"))
        .arg(1)
        .query(&mut conn)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = real(json!({"scope": a, "prefix": "tmp-", "dry_run": false, "confirmation": expired}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // A record claimed after the dry run is not deleted by its confirmation.
    tokio::time::sleep(Duration::from_millis(5)).await;
    completed(&store, &a, "tmp-late", &fp("x")).await;
    let r =
        real(json!({"scope": a, "prefix": "tmp-", "dry_run": false, "confirmation": token})).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        r.json(),
        json!({"mode": "purged", "purged": 25, "skipped_in_flight": 1})
    );
    let late = admin_get(&admin, &format!("/api/keys/{a}/tmp-late")).await;
    assert_eq!(late.status, StatusCode::OK, "newer than the dry run: kept");
    let running = admin_get(&admin, &format!("/api/keys/{a}/tmp-running")).await;
    assert_eq!(running.json()["state"], "in_flight", "in flight: kept");
    // A misspelt filter field is refused, never ignored (which would widen the purge).
    let r = admin_call(
        &admin,
        "POST",
        "/api/purge",
        &json!({"dry_run": true, "scope": a, "prefx": "x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // One use only.
    let r =
        real(json!({"scope": a, "prefix": "tmp-", "dry_run": false, "confirmation": token})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let (matched, _) = dry(json!({"prefix": "tmp-"})).await;
    assert_eq!(
        matched, 26,
        "scope b's tmp- keys (and tmp-late) are untouched"
    );
    let (matched, _) = dry(json!({"scope": a})).await;
    assert_eq!(
        matched, 26,
        "scope a's keep- keys (and tmp-late) are untouched"
    );

    // By route (checked per record in the delete script).
    let (_, token) = dry(json!({"route": "payments"})).await;
    let r = real(json!({"route": "payments", "dry_run": false, "confirmation": token})).await;
    assert_eq!(
        r.json(),
        json!({"mode": "purged", "purged": 51, "skipped_in_flight": 1})
    );

    let events = wait_events(&admin, "kind=purged", |e| e.len() >= 2).await;
    assert_eq!(events[0].count, Some(51));
    assert_eq!(events[1].count, Some(25));
    assert_eq!(events[1].actor.as_deref(), Some("tester"));
    assert!(
        events[1].detail.as_deref().unwrap().contains("prefix=tmp-"),
        "{:?}",
        events[1]
    );
}

#[tokio::test]
async fn stats_count_decisions_and_reports() {
    let redis = RedisServer::start();
    let (store, admin) = apps(&redis.url());
    let s = scope("stats");
    let t = acquire(&store, &s, "k", &fp("k"), 60_000).await;
    complete(&store, &s, "k", &t, b"done").await;
    for _ in 0..3 {
        let r = post(&store, "/v1/claim", &claim_body(&s, "k", &fp("k"), 60_000)).await;
        assert_eq!(r.json()["outcome"], "replay");
    }
    let r = post(
        &store,
        "/v1/claim",
        &claim_body(&s, "k", &fp("other"), 60_000),
    )
    .await;
    assert_eq!(r.json()["outcome"], "mismatch");
    // Filter reports: 204, unknown fields refused.
    let r = post(&store, "/v1/report", &json!({"kind": "body_cap", "route": "payments", "scope": s, "key": "big", "detail": "request body over 1 MiB"})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = post(&store, "/v1/report", &json!({"kind": "fail_open", "route": "payments", "scope": null, "key": null, "detail": "store timeout"})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = post(&store, "/v1/report", &json!({"kind": "fail_open", "route": "p", "scope": null, "key": null, "detail": "", "extra": 1})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let r = admin_get(&admin, "/api/stats").await;
        assert_eq!(r.status, StatusCode::OK);
        let stats: StatsResponse = serde_json::from_slice(&r.body).unwrap();
        if stats.day.totals.fail_open_passes == 1 || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for w in [&stats.minute, &stats.hour, &stats.day] {
        let t = &w.totals;
        assert_eq!(
            (t.claims, t.executions, t.replays, t.mismatches),
            (5, 1, 3, 1),
            "{w:?}"
        );
        assert_eq!((t.completions, t.rejections, t.fail_open_passes), (1, 1, 1));
        assert_eq!(w.replay_rate, Some(0.75));
        let sum: u64 = w.series.iter().map(|b| b.counts.claims).sum();
        assert_eq!(sum, 5);
    }
    assert_eq!((stats.minute.series.len(), stats.minute.bucket_s), (12, 5));
    assert_eq!((stats.hour.series.len(), stats.hour.bucket_s), (60, 60));
    assert_eq!((stats.day.series.len(), stats.day.bucket_s), (24, 3600));
    assert_eq!(stats.in_flight_now, Some(0));

    let body_cap = wait_events(&admin, "kind=rejected", |e| !e.is_empty()).await;
    assert!(body_cap[0]
        .detail
        .as_deref()
        .unwrap()
        .starts_with("body_cap: "));

    let r = send(&admin, "GET", "/metrics", "").await;
    let text = String::from_utf8(r.body).unwrap();
    assert!(
        text.contains("idemgate_store_outcomes_total{call=\"claim\",outcome=\"replay\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("idemgate_store_call_duration_seconds_bucket{call=\"claim\""),
        "{text}"
    );
    assert!(
        text.contains("idemgate_filter_reports_total{kind=\"body_cap\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn admin_api_answers_503_while_redis_is_down_and_recovers() {
    let mut redis = RedisServer::start();
    let (store, admin) = apps(&redis.url());
    acquire(&store, &scope("o"), "k", &fp("k"), 60_000).await;
    redis.kill();
    for path in ["/api/keys", "/api/stats", "/api/events/recent"] {
        let started = Instant::now();
        let r = admin_get(&admin, path).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(r.json()["type"], "urn:idemgate:problem:store-unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path}: {:?}",
            started.elapsed()
        );
    }
    let r = send(&admin, "GET", "/api/health", "").await;
    assert_eq!(r.json()["redis"], "down");
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin_get(&admin, "/api/keys").await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "admin API still {} after Redis came back",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn openapi_document_and_dashboard_files() {
    let redis = RedisServer::start();
    let (_, admin) = apps(&redis.url());
    let r = admin_get(&admin, "/api/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/keys",
        "/api/keys/{scope}/{key}",
        "/api/purge",
        "/api/events",
        "/api/stats",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<html>dashboard</html>").unwrap();
    std::fs::write(dir.path().join("app.js"), "console.log(1)").unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let store = idemgate_server::Store::new(client, PREFIX, Duration::from_millis(500)).unwrap();
    let state = idemgate_server::AppState::new(store, idemgate_server::AdminTokens::none())
        .unwrap()
        .with_dashboard_dir(Some(dir.path().to_owned()));
    let app = idemgate_server::admin_app(state);
    let r = send(&app, "GET", "/app.js", "").await;
    assert_eq!(String::from_utf8(r.body).unwrap(), "console.log(1)");
    // Client-side routes fall back to index.html; /api stays the API.
    let r = send(&app, "GET", "/keys/global/abc", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(String::from_utf8(r.body).unwrap(), "<html>dashboard</html>");
    let r = send(&app, "GET", "/api/keys", "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&app, "GET", "/api/health", "").await;
    assert_eq!(r.json()["redis"], "up");
}

#[tokio::test]
async fn record_routes_carry_any_key_and_purge_never_deletes_an_in_flight_record() {
    let redis = RedisServer::start();
    let (store, admin) = apps(&redis.url());
    let s = scope("odd");
    completed(&store, &s, "..", &fp("x")).await;
    completed(&store, &s, "a%2Fb", &fp("x")).await;
    completed(&store, &s, "a/b", &fp("x")).await;
    acquire(&store, &s, "running", &fp("x"), 600_000).await;

    let r = admin_get(&admin, &format!("/api/record?scope={s}&key=%2E%2E")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["key"], "..");
    let r = admin_get(&admin, &format!("/api/record?scope={s}&key=a%252Fb")).await;
    assert_eq!(r.json()["key"], "a%2Fb", "decoded exactly once");
    let r = admin_get(&admin, &format!("/api/record?scope={s}&key=x&extra=1")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Purging an in-flight record is refused: its request may still run upstream.
    let r = admin_call(
        &admin,
        "DELETE",
        &format!("/api/record?scope={s}&key=running"),
        &json!(null),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CONFLICT,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["type"], "urn:idemgate:problem:in-flight");
    let r = admin_call(
        &admin,
        "DELETE",
        &format!("/api/keys/{s}/running"),
        &json!(null),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(
        admin_get(&admin, &format!("/api/record?scope={s}&key=running"))
            .await
            .json()["state"],
        "in_flight"
    );
    // Release is the deliberate tool; then a completed record purges.
    let r = admin_call(
        &admin,
        "POST",
        &format!("/api/record/release?scope={s}&key=running"),
        &json!(null),
    )
    .await;
    assert_eq!(r.json(), json!({"purged": true}));
    let r = admin_call(
        &admin,
        "DELETE",
        &format!("/api/record?scope={s}&key=%2E%2E"),
        &json!(null),
    )
    .await;
    assert_eq!(r.json(), json!({"purged": true}));
    let r = admin_get(&admin, &format!("/api/record?scope={s}&key=a%2Fb")).await;
    assert_eq!(r.json()["key"], "a/b", "the other record is untouched");
}
