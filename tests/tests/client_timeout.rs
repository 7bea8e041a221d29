#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The scenario idempotency keys exist for, on real Envoy + filter, the real server and
//! real Redis: a client whose own timeout fires before the upstream answers retries with
//! the same key, and gets the first execution's result (detached execution), or a clear,
//! bounded "unknown outcome" answer (router mode) — never a second execution.

use std::thread;
use std::time::{Duration, Instant};

use idemgate_e2e::{demo_filter_config, Client, Reply, Stack, StackOptions};
use serde_json::{json, Value};

const AUTH: &str = "Bearer tenant-a";
const ADMIN_TOKEN: &str = "client-timeout-admin-token-0123456789";
/// The upstream's delay: longer than the client's patience.
const UPSTREAM_DELAY_MS: &str = "2500";
/// The client's own timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

fn demo_stack(name: &str) -> Stack {
    Stack::start(StackOptions::new(name, demo_filter_config().unwrap())).expect("stack starts")
}

/// `POST /v1/payments` through `client`; `Err` when the client's timeout fired.
fn pay(client: &Client, key: &str, delay_ms: &str) -> anyhow::Result<Reply> {
    client
        .post("/v1/payments")
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .header("x-demo-delay-ms", delay_ms)
        .json(&json!({"amount": 4200, "currency": "eur"}))
        .send()
}

fn problem_type(reply: &Reply) -> String {
    let v: Value = reply.json().unwrap_or(Value::Null);
    v["type"].as_str().unwrap_or_default().to_owned()
}

fn stat(stack: &Stack, name: &str) -> u64 {
    stack
        .envoy_stat(&format!("wasmcustom.idemgate.{name}"))
        .unwrap()
        .unwrap_or(0)
}

/// Retries every `every` until `send` gives a non-409 answer, at most `limit`.
fn until_not_409(send: impl Fn() -> Reply, every: Duration, limit: Duration) -> Reply {
    let started = Instant::now();
    loop {
        let r = send();
        if r.status != 409 || started.elapsed() > limit {
            return r;
        }
        thread::sleep(every);
    }
}

#[test]
fn detached_http1_client_timeout_then_retry_replays_the_first_execution() {
    let stack = demo_stack("detached-h1");
    let impatient = Client::with_timeout(stack.gateway_url(), CLIENT_TIMEOUT);
    let first = pay(&impatient, "pay-timeout-1", UPSTREAM_DELAY_MS);
    assert!(
        first.is_err(),
        "the client's timeout fires first: {first:?}"
    );

    // While the detached execution runs: 409 in-flight, worth retrying soon.
    let patient = stack.gateway();
    let busy = pay(&patient, "pay-timeout-1", "0").unwrap();
    assert_eq!(busy.status, 409, "{}", busy.text());
    assert_eq!(problem_type(&busy), "urn:idemgate:problem:in-flight");
    let retry_after: u64 = busy.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry_after), "Retry-After {retry_after}");

    let replay = until_not_409(
        || pay(&patient, "pay-timeout-1", "0").unwrap(),
        Duration::from_millis(250),
        Duration::from_secs(10),
    );
    assert_eq!(replay.status, 201, "{}", replay.text());
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let body: Value = replay.json().unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("pay_"), "{body}");
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
    assert_eq!(stat(&stack, "detached_executions"), 1);
    assert_eq!(stat(&stack, "detached_client_gone"), 1);
    assert_eq!(stat(&stack, "abandoned"), 0);
}

#[test]
fn detached_client_that_stays_gets_the_first_answer_unmarked_and_retries_replay_it() {
    let stack = demo_stack("detached-stays");
    let gw = stack.gateway();
    let first = gw
        .post("/v1/payments")
        .header("authorization", AUTH)
        .header("idempotency-key", "pay-stay-1")
        .header("x-demo-response-header", "set-cookie: s=1")
        .json(&json!({"amount": 1}))
        .send()
        .unwrap();
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(
        first.header("set-cookie"),
        Some("s=1"),
        "the first answer is the upstream's"
    );
    assert!(first
        .header("location")
        .unwrap()
        .starts_with("/v1/payments/pay_"));
    let retry = gw
        .post("/v1/payments")
        .header("authorization", AUTH)
        .header("idempotency-key", "pay-stay-1")
        .json(&json!({"amount": 1}))
        .send()
        .unwrap();
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body, "byte-identical");
    assert_eq!(retry.header("location"), first.header("location"));
    assert_eq!(
        retry.header("set-cookie"),
        None,
        "cookies are never replayed"
    );
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
}

/// An HTTP/2 (h2c, prior knowledge) request whose future is dropped after `timeout`: the
/// client resets the stream (RST_STREAM), as an HTTP/2 client's own timeout does.
fn h2_pay(gateway: &str, key: &str, delay_ms: &str, timeout: Duration) -> Option<(u16, Vec<u8>)> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Full<axum::body::Bytes>>();
        let req = axum::http::Request::post(format!("{gateway}/v1/payments"))
            .header("authorization", AUTH)
            .header("idempotency-key", key)
            .header("x-demo-delay-ms", delay_ms)
            .header("content-type", "application/json")
            .body(Full::new(axum::body::Bytes::from_static(
                br#"{"amount":7}"#,
            )))
            .unwrap();
        let call = async {
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.version(), axum::http::Version::HTTP_2);
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec();
            (status, body)
        };
        tokio::time::timeout(timeout, call).await.ok()
    })
}

#[test]
fn detached_http2_stream_reset_then_retry_replays_the_first_execution() {
    let stack = demo_stack("detached-h2");
    let gateway = stack.gateway_url();
    assert!(
        h2_pay(&gateway, "pay-h2-1", UPSTREAM_DELAY_MS, CLIENT_TIMEOUT).is_none(),
        "the client gives up and resets the stream"
    );
    let started = Instant::now();
    let (status, body) = loop {
        let (status, body) =
            h2_pay(&gateway, "pay-h2-1", "0", Duration::from_secs(10)).expect("an answer");
        if status != 409 || started.elapsed() > Duration::from_secs(10) {
            break (status, body);
        }
        thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("pay_"));
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
}

#[test]
fn a_retrying_client_with_backoff_ends_with_the_first_executions_201() {
    let stack = demo_stack("retry-loop");
    let client = Client::with_timeout(stack.gateway_url(), CLIENT_TIMEOUT);
    // A common SDK's policy: retry timeouts and 409s, exponential backoff from 0.5 s.
    let mut backoff = Duration::from_millis(500);
    let mut attempts = Vec::new();
    let answer = loop {
        assert!(attempts.len() < 8, "gave up after {attempts:?}");
        match pay(&client, "pay-loop-1", UPSTREAM_DELAY_MS) {
            Err(_) => attempts.push("timeout".to_owned()),
            Ok(r) if r.status == 409 => {
                assert_eq!(
                    problem_type(&r),
                    "urn:idemgate:problem:in-flight",
                    "{}",
                    r.text()
                );
                attempts.push("409".to_owned());
            }
            Ok(r) => break r,
        }
        thread::sleep(backoff);
        backoff *= 2;
    };
    assert_eq!(answer.status, 201, "{}", answer.text());
    let body: Value = answer.json().unwrap();
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("pay_"), "{body}");
    assert_eq!(
        stack.executions("/v1/payments").unwrap(),
        1,
        "after {attempts:?}"
    );
    eprintln!("retrying client: {attempts:?} then 201 {id}");
}

#[test]
fn a_detached_response_over_the_cap_is_delivered_once_and_never_executed_again() {
    let mut config = demo_filter_config().unwrap();
    config["routes"][0]["max_response_body_bytes"] = json!(4096);
    let stack = Stack::start(StackOptions::new("detached-cap", config)).expect("stack starts");
    let send = || {
        stack
            .gateway()
            .post("/v1/payments")
            .header("authorization", AUTH)
            .header("idempotency-key", "pay-big-1")
            .header("x-demo-body-bytes", "100000")
            .json(&json!({"amount": 1}))
            .send()
            .unwrap()
    };
    let first = send();
    assert_eq!(first.status, 201, "{}", first.status);
    assert_eq!(
        first.body.len(),
        100_000,
        "delivered whole to the client that waited"
    );
    let retry = send();
    assert_eq!(retry.status, 409);
    assert_eq!(problem_type(&retry), "urn:idemgate:problem:not-replayable");
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
}

/// Router mode with a short hold: orders re-execute after it, payments are refused.
fn router_config() -> Value {
    json!({
        "store": {"cluster": "idemgate_store", "timeout_ms": 1000},
        "defaults": {"scope": {"header": "authorization"}},
        "routes": [
            {"name": "payments", "match": {"prefix": "/v1/payments"},
             "unknown_outcome": {"hold_s": 2, "then": "refuse"}},
            {"name": "orders", "match": {"prefix": "/v1/orders"},
             "unknown_outcome": {"hold_s": 2, "then": "reexecute"}}
        ]
    })
}

fn post(client: &Client, path: &str, key: &str, delay_ms: &str) -> anyhow::Result<Reply> {
    client
        .post(path)
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .header("x-demo-delay-ms", delay_ms)
        .json(&json!({"amount": 3}))
        .send()
}

#[test]
fn router_mode_records_an_unknown_outcome_then_reexecutes_or_refuses_after_the_hold() {
    let mut opts = StackOptions::new("router-unknown", router_config());
    opts.server_env = vec![("IDEMGATE_ADMIN_TOKEN".into(), ADMIN_TOKEN.into())];
    let stack = Stack::start(opts).expect("stack starts");
    let impatient = Client::with_timeout(stack.gateway_url(), Duration::from_millis(500));
    let gw = stack.gateway();
    for path in ["/v1/payments", "/v1/orders"] {
        let r = post(&impatient, path, &format!("u{path}"), "1500");
        assert!(
            r.is_err(),
            "{path}: client timeout expected, got {:?}",
            r.as_ref().map(|r| (r.status, r.text()))
        );
    }
    // Held: 409 outcome-unknown with a Retry-After within the hold.
    for path in ["/v1/payments", "/v1/orders"] {
        let r = until_not_409(
            || {
                let r = post(&gw, path, &format!("u{path}"), "0").unwrap();
                // 409 in-flight until the stream's end has been recorded.
                if problem_type(&r) == "urn:idemgate:problem:in-flight" {
                    r
                } else {
                    Reply { status: 200, ..r }
                }
            },
            Duration::from_millis(50),
            Duration::from_secs(5),
        );
        assert_eq!(
            problem_type(&r),
            "urn:idemgate:problem:outcome-unknown",
            "{path}: {}",
            r.text()
        );
        let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&ra), "{path}: Retry-After {ra}");
    }
    // The admin API lists them as unknown.
    let page: Value = stack
        .admin()
        .get("/api/keys?state=unknown")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "{page}");
    thread::sleep(Duration::from_millis(2200));
    // reexecute: the next retry executes.
    let again = post(&gw, "/v1/orders", "u/v1/orders", "0").unwrap();
    assert_eq!(again.status, 201, "{}", again.text());
    assert_eq!(again.header("idempotent-replayed"), None);
    // refuse: a final 409 without Retry-After.
    let refused = post(&gw, "/v1/payments", "u/v1/payments", "0").unwrap();
    assert_eq!(refused.status, 409);
    assert_eq!(
        problem_type(&refused),
        "urn:idemgate:problem:outcome-unknown-refused"
    );
    assert_eq!(refused.header("retry-after"), None);
    assert_eq!(
        stack.executions("/v1/payments").unwrap(),
        0,
        "Envoy's reset cancelled it"
    );
    assert_eq!(stat(&stack, "abandoned"), 2);
}

#[test]
fn a_client_that_leaves_before_the_claim_answers_releases_the_lock_at_once() {
    let stack = demo_stack("early-release");
    let impatient = Client::with_timeout(stack.gateway_url(), Duration::from_millis(300));
    // Redis stalls for 800 ms (under the filter's 1 s store timeout): the claim waits.
    idemgate_e2e::redis::command(stack.ports().redis, &["CLIENT", "PAUSE", "800", "ALL"]).unwrap();
    let gone = post(&impatient, "/v1/orders", "early-1", "0");
    assert!(
        gone.is_err(),
        "the client left before the claim answered: {gone:?}"
    );
    thread::sleep(Duration::from_millis(900));
    // The retry executes at once: no 409 for the lock TTL (60 s).
    let retry = post(&stack.gateway(), "/v1/orders", "early-1", "0").unwrap();
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(retry.header("idempotent-replayed"), None);
    assert_eq!(stack.executions("/v1/orders").unwrap(), 1);
    assert_eq!(stat(&stack, "early_releases"), 1);
}
