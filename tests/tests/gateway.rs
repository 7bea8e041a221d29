#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! End to end on real Envoy + the wasm filter, the real idemgate server and real Redis:
//! a retried POST executes once, duplicates are refused, misuse is rejected, and the
//! upstream never sees a request the filter answered itself.

use std::sync::{Arc, Barrier};
use std::thread;

use idemgate_e2e::{demo_filter_config, Reply, Stack, StackOptions};
use serde_json::{json, Value};

const TENANT_A: &str = "Bearer tenant-a";
const TENANT_B: &str = "Bearer tenant-b";

fn demo_stack(name: &str) -> Stack {
    Stack::start(StackOptions::new(
        name,
        demo_filter_config().expect("demo filter config"),
    ))
    .expect("stack starts")
}

fn pay(stack: &Stack, auth: &str, key: Option<&str>, body: &Value) -> Reply {
    let mut req = stack
        .gateway()
        .post("/v1/payments")
        .header("authorization", auth);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    req.json(body)
        .send()
        .expect("POST /v1/payments through the gateway")
}

fn problem_type(reply: &Reply) -> String {
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json"),
        "status {}: {}",
        reply.status,
        reply.text()
    );
    let v: Value = reply.json().expect("problem JSON");
    v["type"].as_str().unwrap_or_default().to_owned()
}

/// Every request the upstream saw, as `METHOD path`.
fn upstream_saw(stack: &Stack) -> Vec<String> {
    stack
        .upstream_requests()
        .expect("upstream introspection")
        .into_iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn a_retry_replays_status_body_and_headers_and_executes_once() {
    let stack = demo_stack("replay");
    let body = json!({"amount": 1000, "currency": "eur"});
    let first = pay(&stack, TENANT_A, Some("\"pay-1\""), &body);
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    let location = first.header("location").expect("Location").to_owned();
    assert!(location.starts_with("/v1/payments/pay_"), "{location}");

    for _ in 0..3 {
        let retry = pay(&stack, TENANT_A, Some("pay-1"), &body);
        assert_eq!(retry.status, 201, "{}", retry.text());
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
        assert_eq!(retry.body, first.body, "byte-identical body");
        assert_eq!(retry.header("location"), Some(location.as_str()));
        assert_eq!(retry.header("content-type"), first.header("content-type"));
        assert_eq!(
            retry.header_all("content-type").len(),
            1,
            "{:?}",
            retry.headers
        );
        assert_eq!(
            retry.header("content-length"),
            first.header("content-length")
        );
    }
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
    assert_eq!(upstream_saw(&stack), vec!["POST /v1/payments"]);
    assert_eq!(
        stack.envoy_stat("wasmcustom.idemgate.replayed").unwrap(),
        Some(3)
    );
    assert_eq!(
        stack.envoy_stat("wasmcustom.idemgate.completed").unwrap(),
        Some(1)
    );
}

#[test]
fn twenty_concurrent_duplicates_execute_once_without_5xx() {
    let stack = demo_stack("concurrent");
    let gateway = stack.gateway();
    let start = Arc::new(Barrier::new(20));
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let gw = gateway.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                gw.post("/v1/payments")
                    .header("authorization", TENANT_A)
                    .header("idempotency-key", "dup-1")
                    .header("x-demo-delay-ms", "400")
                    .json(&json!({"amount": 5}))
                    .send()
                    .expect("concurrent POST")
            })
        })
        .collect();
    let replies: Vec<Reply> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
    let executed: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == 201 && r.header("idempotent-replayed").is_none())
        .collect();
    assert_eq!(
        executed.len(),
        1,
        "exactly one execution answered: {statuses:?}"
    );
    for r in replies.iter().filter(|r| r.status == 409) {
        assert_eq!(problem_type(r), "urn:idemgate:problem:in-flight");
        let retry_after: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
    }
    for r in replies.iter().filter(|r| r.status == 201) {
        assert_eq!(r.body, executed[0].body);
    }
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
    assert_eq!(upstream_saw(&stack).len(), 1);
    // Once done, a retry replays.
    let after = pay(&stack, TENANT_A, Some("dup-1"), &json!({"amount": 5}));
    assert_eq!(
        (after.status, after.header("idempotent-replayed")),
        (201, Some("true"))
    );
}

#[test]
fn the_same_key_with_another_request_is_422() {
    let stack = demo_stack("mismatch");
    assert_eq!(
        pay(&stack, TENANT_A, Some("k-422"), &json!({"amount": 1})).status,
        201
    );
    let other = pay(&stack, TENANT_A, Some("k-422"), &json!({"amount": 2}));
    assert_eq!(other.status, 422, "{}", other.text());
    assert_eq!(problem_type(&other), "urn:idemgate:problem:key-reused");
    // The same key on another path of the same route is another request too.
    let elsewhere = stack
        .gateway()
        .post("/v1/payments/refunds")
        .header("authorization", TENANT_A)
        .header("idempotency-key", "k-422")
        .json(&json!({"amount": 1}))
        .send()
        .unwrap();
    assert_eq!(elsewhere.status, 422, "{}", elsewhere.text());
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
    assert_eq!(upstream_saw(&stack), vec!["POST /v1/payments"]);
}

#[test]
fn malformed_missing_or_duplicated_keys_are_400_and_never_reach_the_upstream() {
    let stack = demo_stack("bad-keys");
    let long = "k".repeat(256);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "urn:idemgate:problem:key-missing"),
        (vec![""], "urn:idemgate:problem:key-malformed"),
        (vec!["\"unterminated"], "urn:idemgate:problem:key-malformed"),
        (vec!["a b"], "urn:idemgate:problem:key-malformed"),
        (vec!["\"a\", \"b\""], "urn:idemgate:problem:key-malformed"),
        (vec![long.as_str()], "urn:idemgate:problem:key-malformed"),
        (vec!["k1", "k2"], "urn:idemgate:problem:key-malformed"),
    ];
    for (keys, expected) in cases {
        let mut req = stack
            .gateway()
            .post("/v1/payments")
            .header("authorization", TENANT_A);
        for k in &keys {
            req = req.header("idempotency-key", *k);
        }
        let reply = req.json(&json!({"amount": 1})).send().unwrap();
        assert_eq!(reply.status, 400, "{keys:?}: {}", reply.text());
        assert_eq!(problem_type(&reply), expected, "{keys:?}");
    }
    // 255 characters is the longest key accepted.
    let ok = pay(
        &stack,
        TENANT_A,
        Some(&"k".repeat(255)),
        &json!({"amount": 1}),
    );
    assert_eq!(ok.status, 201, "{}", ok.text());
    assert_eq!(upstream_saw(&stack), vec!["POST /v1/payments"]);
    assert_eq!(
        stack
            .envoy_stat("wasmcustom.idemgate.rejected_keys")
            .unwrap(),
        Some(7)
    );
}

#[test]
fn two_scopes_with_the_same_key_stay_separate() {
    let stack = demo_stack("scopes");
    let body = json!({"amount": 7});
    let a = pay(&stack, TENANT_A, Some("shared"), &body);
    let b = pay(&stack, TENANT_B, Some("shared"), &body);
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(
        b.header("idempotent-replayed"),
        None,
        "tenant B must not see tenant A's response"
    );
    assert_ne!(a.header("location"), b.header("location"));
    let a2 = pay(&stack, TENANT_A, Some("shared"), &body);
    let b2 = pay(&stack, TENANT_B, Some("shared"), &body);
    assert_eq!((a2.body.clone(), b2.body.clone()), (a.body, b.body));
    assert_eq!(stack.executions("/v1/payments").unwrap(), 2);
    // No raw credential is stored in Redis: keys and fields carry only the scope hash.
    let keys: Vec<String> = stack
        .redis(&["KEYS", "*"])
        .unwrap()
        .as_text_list()
        .into_iter()
        .filter(|k| k.contains(":rec:"))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for k in &keys {
        assert!(!k.contains("tenant"), "{k}");
        let fields = stack
            .redis(&["HGETALL", k])
            .unwrap()
            .as_text_list()
            .join(" ");
        assert!(
            !fields.contains("tenant-a") && !fields.contains("tenant-b"),
            "{fields}"
        );
    }
    // A request without the scope header cannot share anyone's scope.
    let anonymous = stack
        .gateway()
        .post("/v1/payments")
        .header("idempotency-key", "shared")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(
        problem_type(&anonymous),
        "urn:idemgate:problem:scope-missing"
    );
}

#[test]
fn reads_and_keyless_optional_routes_pass_through_untouched() {
    let stack = demo_stack("passthrough");
    let gw = stack.gateway();
    for method in ["GET", "HEAD", "OPTIONS"] {
        let r = gw
            .request(method, "/v1/payments")
            .header("idempotency-key", "\"bad")
            .send()
            .unwrap();
        let direct = stack
            .upstream()
            .request(method, "/v1/payments")
            .send()
            .unwrap();
        assert_eq!(
            r.status,
            direct.status,
            "{method}: the upstream's own answer, {}",
            r.text()
        );
        assert_ne!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.header("idempotent-replayed"), None);
    }
    // /v1/orders accepts a key optionally: without one, every POST executes.
    for _ in 0..2 {
        let r = gw
            .post("/v1/orders")
            .header("authorization", TENANT_A)
            .json(&json!({"sku": "x"}))
            .send()
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    }
    assert_eq!(stack.executions("/v1/orders").unwrap(), 2);
    // With one, it is protected.
    for _ in 0..2 {
        let r = gw
            .post("/v1/orders")
            .header("authorization", TENANT_A)
            .header("idempotency-key", "order-1")
            .json(&json!({"sku": "x"}))
            .send()
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    }
    assert_eq!(stack.executions("/v1/orders").unwrap(), 3);
    let posts = upstream_saw(&stack)
        .into_iter()
        .filter(|r| r.starts_with("POST"))
        .count();
    assert_eq!(posts, 3);
    assert_eq!(
        stack.envoy_stat("wasmcustom.idemgate.checked").unwrap(),
        Some(4)
    );
}

#[test]
fn a_5xx_releases_the_key_so_the_retry_executes_again() {
    let stack = demo_stack("release");
    let body = json!({"amount": 3});
    let failed = stack
        .gateway()
        .post("/v1/payments")
        .header("authorization", TENANT_A)
        .header("idempotency-key", "flaky")
        .header("x-demo-status", "503")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(failed.status, 503);
    assert_eq!(failed.header("idempotent-replayed"), None);
    let retry = pay(&stack, TENANT_A, Some("flaky"), &body);
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(
        retry.header("idempotent-replayed"),
        None,
        "executed again, not replayed"
    );
    let again = pay(&stack, TENANT_A, Some("flaky"), &body);
    assert_eq!(
        (again.status, again.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(stack.executions("/v1/payments").unwrap(), 2);
    assert_eq!(
        stack.envoy_stat("wasmcustom.idemgate.released").unwrap(),
        Some(1)
    );
}

#[test]
fn a_redis_outage_fails_closed_with_503_and_recovers_without_restarts() {
    let mut stack = demo_stack("outage");
    stack.stop_redis();
    let down = pay(
        &stack,
        TENANT_A,
        Some("during-outage"),
        &json!({"amount": 1}),
    );
    assert_eq!(down.status, 503, "{}", down.text());
    assert_eq!(
        problem_type(&down),
        "urn:idemgate:problem:store-unavailable"
    );
    assert_eq!(down.header("retry-after"), Some("1"));
    assert!(
        upstream_saw(&stack).is_empty(),
        "fail-closed: nothing executed"
    );
    stack.start_redis().expect("redis restarts");
    let mut last = None;
    for _ in 0..50 {
        let r = pay(
            &stack,
            TENANT_A,
            Some("after-outage"),
            &json!({"amount": 1}),
        );
        if r.status == 201 {
            last = Some(r);
            break;
        }
        thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(last.is_some(), "the gateway recovers once Redis is back");
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
}

/// Resumes a SIGSTOPped process when dropped, also when the test fails.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        let ok = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -STOP {pid}");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[test]
fn a_redis_stall_leaves_no_orphaned_lock() {
    let stack = demo_stack("stall");
    let pid = stack
        .pid(idemgate_e2e::Component::Redis)
        .expect("redis runs");
    let body = json!({"amount": 1});
    // A first claim loads the scripts into Redis, so the stalled one is a plain EVALSHA.
    assert_eq!(pay(&stack, TENANT_A, Some("warm-up"), &body).status, 201);
    {
        let _stall = Stopped::new(pid);
        let r = pay(&stack, TENANT_A, Some("stalled"), &body);
        assert_eq!(r.status, 503, "{}", r.text());
    }
    // Redis runs the queued claim when it resumes; the server undoes that orphaned lock, so
    // the retry executes instead of waiting out the 60 s lock TTL.
    let mut statuses = Vec::new();
    for _ in 0..50 {
        let r = pay(&stack, TENANT_A, Some("stalled"), &body);
        statuses.push(r.status);
        if r.status == 201 {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(statuses.last(), Some(&201), "{statuses:?}");
    assert_eq!(stack.executions("/v1/payments").unwrap(), 2);
}
