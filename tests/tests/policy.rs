//! The filter's policy end to end on real Envoy, server and Redis: per-route rules,
//! faithful replay, scoping, bounded bodies, lock recovery, failure modes and Envoy stats.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use idemgate_e2e::{EnvoyTemplate, Reply, Stack, StackOptions};
use serde_json::{json, Value};

const AUTH: &str = "Bearer tenant-a";

/// Three routes with different policies (see each test for what it relies on).
fn policy_config() -> Value {
    json!({
        "store": {"cluster": "idemgate_store", "timeout_ms": 1000},
        "defaults": {"scope": {"header": "authorization"}},
        "routes": [
            {"name": "payments", "match": {"prefix": "/v1/payments"},
             "fingerprint": {"body": "canonical_json", "exclude_json": ["/client_ts"]},
             "max_request_body_bytes": 4096, "max_response_body_bytes": 8192},
            {"name": "orders", "match": {"prefix": "/v1/orders"}, "key": "optional",
             "failure_mode": "open", "lock_ttl_ms": 1000,
             "store_statuses": ["2xx", "4xx", "5xx"], "scope": {"header": "x-api-key"}},
            {"name": "uploads", "match": {"path": "/v1/uploads"}, "scope": "global",
             "fingerprint": {"body": "raw", "headers": ["content-type", "content-encoding"]},
             "max_request_body_bytes": 65536,
             "deny_response_headers": ["set-cookie", "x-secret-*"]}
        ]
    })
}

fn stack(name: &str) -> Stack {
    Stack::start(StackOptions::new(name, policy_config())).expect("stack starts")
}

fn problem_type(reply: &Reply) -> String {
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json"),
        "{} {}",
        reply.status,
        reply.text()
    );
    reply.json::<Value>().expect("problem JSON")["type"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn post_payment(stack: &Stack, key: &str, body: &[u8]) -> Reply {
    stack
        .gateway()
        .post("/v1/payments")
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .expect("POST /v1/payments")
}

/// `POST /v1/orders` (the fail-open, 1 s lock route) with API key `k` and key `key`.
fn order(stack: &Stack, key: &str) -> Reply {
    stack
        .gateway()
        .post("/v1/orders")
        .header("x-api-key", "k")
        .header("idempotency-key", key)
        .json(&json!({"sku": "a"}))
        .send()
        .expect("POST /v1/orders")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn stat(stack: &Stack, name: &str) -> u64 {
    stack
        .envoy_stat(&format!("wasmcustom.idemgate.{name}"))
        .unwrap()
        .unwrap_or(0)
}

/// Sends a raw HTTP/1.1 request; returns the status line and the whole answer.
fn raw_request(stack: &Stack, request: &[u8]) -> String {
    let addr = stack.gateway_url().trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the upstream has received `n` requests.
fn wait_for_upstream(stack: &Stack, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.upstream_requests().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "the upstream never received request {n}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn canonical_json_ignores_member_order_whitespace_and_excluded_fields() {
    let stack = stack("canonical");
    let first = post_payment(
        &stack,
        "c-1",
        br#"{"amount":10,"currency":"eur","client_ts":1}"#,
    );
    assert_eq!(first.status, 201, "{}", first.text());
    let same = post_payment(
        &stack,
        "c-1",
        b"{ \"currency\" : \"eur\",\n  \"client_ts\": 99, \"amount\": 10 }",
    );
    assert_eq!(
        (same.status, same.header("idempotent-replayed")),
        (201, Some("true")),
        "{}",
        same.text()
    );
    assert_eq!(same.body, first.body);
    let other = post_payment(&stack, "c-1", br#"{"amount":11,"currency":"eur"}"#);
    assert_eq!(other.status, 422);
    assert_eq!(problem_type(&other), "urn:idemgate:problem:key-reused");
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
}

#[test]
fn replay_is_byte_faithful_for_binary_gzip_bodies_and_repeated_headers() {
    let stack = stack("faithful");
    let payload: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let body = gzip(&payload);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
    let send = || {
        stack
            .gateway()
            .post("/v1/uploads")
            .header("idempotency-key", "bin-1")
            .header("content-type", "application/octet-stream")
            .header("x-demo-body-b64", b64.as_str())
            .header(
                "x-demo-response-header",
                "content-type: application/vnd.demo+octet; charset=binary",
            )
            .header("x-demo-response-header", "content-encoding: gzip")
            .header(
                "x-demo-response-header",
                "link: </a>; rel=\"first\", </b>; rel=\"next\"",
            )
            .header("x-demo-response-header", "link: </c>; rel=\"last\"")
            .header("x-demo-response-header", "set-cookie: session=secret")
            .header("x-demo-response-header", "x-secret-token: abc")
            .header("x-demo-response-header", "x-request-id: r-1")
            .body(b"same request body".to_vec())
            .send()
            .unwrap()
    };
    let first = send();
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.body, body);
    let retry = send();
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, body, "binary gzip body replayed byte for byte");
    assert_eq!(retry.header("content-encoding"), Some("gzip"));
    assert_eq!(
        retry.header_all("content-type"),
        vec!["application/vnd.demo+octet; charset=binary"]
    );
    assert_eq!(
        retry.header_all("link"),
        vec![
            "</a>; rel=\"first\", </b>; rel=\"next\"",
            "</c>; rel=\"last\""
        ]
    );
    assert_eq!(retry.header("x-request-id"), Some("r-1"));
    assert_eq!(retry.header("location"), first.header("location"));
    assert_eq!(retry.header("set-cookie"), None, "deny-listed");
    assert_eq!(
        retry.header("x-secret-token"),
        None,
        "deny-listed by prefix"
    );
    // The stored order of the upstream's own headers is kept.
    let order = |r: &Reply| -> Vec<String> {
        r.headers
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| {
                [
                    "content-type",
                    "location",
                    "content-encoding",
                    "link",
                    "x-request-id",
                ]
                .contains(&n.as_str())
            })
            .collect()
    };
    assert_eq!(order(&retry), order(&first));
    assert_eq!(stack.executions("/v1/uploads").unwrap(), 1);
}

#[test]
fn a_204_replays_as_204_without_a_body_and_201_stays_201() {
    let stack = stack("no-content");
    let send = || {
        stack
            .gateway()
            .post("/v1/uploads")
            .header("idempotency-key", "nc-1")
            .header("x-demo-status", "204")
            .body(b"x".to_vec())
            .send()
            .unwrap()
    };
    assert_eq!(send().status, 204);
    let retry = send();
    assert_eq!(
        (retry.status, retry.header("idempotent-replayed")),
        (204, Some("true"))
    );
    assert!(retry.body.is_empty());
    assert_eq!(stack.executions("/v1/uploads").unwrap(), 1);
}

#[test]
fn stored_statuses_follow_the_route_policy() {
    let stack = stack("statuses");
    let pay = |key: &str, status: &str| {
        stack
            .gateway()
            .post("/v1/payments")
            .header("authorization", AUTH)
            .header("idempotency-key", key)
            .header("x-demo-status", status)
            .json(&json!({"amount": 1}))
            .send()
            .unwrap()
    };
    // Default policy: 404 is stored and replayed; 409, 429 and 500 release the key.
    assert_eq!(pay("s-404", "404").status, 404);
    let r = pay("s-404", "404");
    assert_eq!(
        (r.status, r.header("idempotent-replayed")),
        (404, Some("true"))
    );
    for s in ["409", "429", "500"] {
        let key = format!("s-{s}");
        assert_eq!(pay(&key, s).status.to_string(), s);
        let again = pay(&key, s);
        assert_eq!(
            again.status.to_string(),
            s,
            "{s} is not stored: the retry executes: {}",
            again.text()
        );
        assert_eq!(
            again.header("idempotent-replayed"),
            None,
            "{s} is not stored: the retry executes"
        );
    }
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1 + 3 * 2);
    // Stripe-style route (orders stores 5xx): a 500 is replayed.
    let order = || {
        stack
            .gateway()
            .post("/v1/orders")
            .header("x-api-key", "k")
            .header("idempotency-key", "o-500")
            .header("x-demo-status", "500")
            .json(&json!({"sku": "a"}))
            .send()
            .unwrap()
    };
    assert_eq!(order().status, 500);
    let r = order();
    assert_eq!(
        (r.status, r.header("idempotent-replayed")),
        (500, Some("true"))
    );
    assert_eq!(stack.executions("/v1/orders").unwrap(), 1);
    assert_eq!(
        stat(&stack, "released"),
        6,
        "each of the three statuses released twice"
    );
}

#[test]
fn request_bodies_over_the_cap_get_413_chunked_or_not() {
    let stack = stack("request-cap");
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000));
    let r = post_payment(&stack, "big-1", big.as_bytes());
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(problem_type(&r), "urn:idemgate:problem:request-too-large");
    // Chunked, without Content-Length: the cap applies as the body is buffered.
    let chunk = "y".repeat(3000);
    let request = format!(
        "POST /v1/payments HTTP/1.1\r\nHost: gw\r\nAuthorization: {AUTH}\r\nIdempotency-Key: big-2\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let answer = raw_request(&stack, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("urn:idemgate:problem:request-too-large"),
        "{answer}"
    );
    assert!(
        stack.upstream_requests().unwrap().is_empty(),
        "never a silent bypass"
    );
    assert_eq!(stat(&stack, "body_cap_events"), 2);
}

#[test]
fn chunked_and_compressed_request_bodies_are_fingerprinted_exactly() {
    let stack = stack("request-bytes");
    let body = gzip(b"{\"file\":\"contents\"}");
    let plain = stack
        .gateway()
        .post("/v1/uploads")
        .header("idempotency-key", "up-1")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(plain.status, 201, "{}", plain.text());
    // The same bytes sent chunked in two pieces: the same request, so a replay.
    let (a, b) = body.split_at(body.len() / 2);
    let mut request = format!(
        "POST /v1/uploads HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: up-1\r\nContent-Type: application/json\r\n\
         Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        a.len()
    )
    .into_bytes();
    request.extend_from_slice(a);
    request.extend_from_slice(format!("\r\n{:x}\r\n", b.len()).as_bytes());
    request.extend_from_slice(b);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = raw_request(&stack, &request);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{answer}"
    );
    // One byte different, or another content-encoding: another request.
    let mut changed = body.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    for (bytes, encoding) in [(changed, "gzip"), (body, "identity")] {
        let r = stack
            .gateway()
            .post("/v1/uploads")
            .header("idempotency-key", "up-1")
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(bytes)
            .send()
            .unwrap();
        assert_eq!(r.status, 422, "{encoding}: {}", r.text());
    }
    assert_eq!(stack.executions("/v1/uploads").unwrap(), 1);
}

#[test]
fn a_response_over_the_cap_is_delivered_but_never_replayed_or_executed_again() {
    let stack = stack("response-cap");
    // 20 kB is over the route's 8 kB cap; 2 MB is also over Envoy's 1 MiB buffer, which a
    // held response would overflow.
    for (key, size) in [("huge-1", 20_000usize), ("huge-2", 2_000_000)] {
        let send = || {
            stack
                .gateway()
                .post("/v1/payments")
                .header("authorization", AUTH)
                .header("idempotency-key", key)
                .header("x-demo-body-bytes", size.to_string())
                .json(&json!({"amount": 1}))
                .send()
                .unwrap()
        };
        let first = send();
        assert_eq!(first.status, 201);
        assert_eq!(first.body.len(), size, "the client gets the whole response");
        // The record may still be landing (409 in flight); then it is not replayable.
        let retry = eventually_problem(&stack, send, "urn:idemgate:problem:not-replayable");
        assert_eq!(retry.status, 409);
    }
    assert_eq!(stack.executions("/v1/payments").unwrap(), 2);
    assert_eq!(stat(&stack, "body_cap_events"), 2);
    assert_eq!(
        stack
            .envoy_stat("http.ingress.rs_too_large")
            .unwrap()
            .unwrap_or(0),
        0
    );
}

/// Retries until the answer is the problem `expected`; only 409 in-flight may come first.
fn eventually_problem(stack: &Stack, send: impl Fn() -> Reply, expected: &str) -> Reply {
    let _ = stack;
    for _ in 0..50 {
        let r = send();
        let t = problem_type(&r);
        if t == expected {
            return r;
        }
        assert_eq!(t, "urn:idemgate:problem:in-flight", "{}", r.text());
        thread::sleep(Duration::from_millis(50));
    }
    panic!("never answered {expected}");
}

#[test]
fn an_expired_lock_is_an_unknown_outcome_until_the_late_answer_lands() {
    let stack = stack("lock-expiry");
    let gw = stack.gateway();
    let slow = thread::spawn(move || {
        gw.post("/v1/orders")
            .header("x-api-key", "k")
            .header("idempotency-key", "lock-1")
            .header("x-demo-delay-ms", "2500")
            .json(&json!({"sku": "a"}))
            .send()
            .unwrap()
    });
    wait_for_upstream(&stack, 1);
    // Within the 1000 ms lock: 409 in-flight with a short Retry-After.
    let busy = order(&stack, "lock-1");
    assert_eq!(busy.status, 409, "{}", busy.text());
    assert_eq!(problem_type(&busy), "urn:idemgate:problem:in-flight");
    assert_eq!(busy.header("retry-after"), Some("1"));
    thread::sleep(Duration::from_millis(1100));
    // The lock expired with nothing stored while the first request still runs: its outcome
    // is unknown, so the key is not executed again.
    let second = order(&stack, "lock-1");
    assert_eq!(second.status, 409, "{}", second.text());
    assert_eq!(
        problem_type(&second),
        "urn:idemgate:problem:outcome-unknown"
    );
    let first = slow.join().unwrap();
    assert_eq!(
        first.status, 201,
        "the first client still gets its response"
    );
    // The first holder's late complete lands (no other claim took the key), and the
    // retry replays it.
    assert_eq!(stat(&stack, "lock_lost"), 0);
    let retry = order(&stack, "lock-1");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(stack.executions("/v1/orders").unwrap(), 1);
}

#[test]
fn a_client_that_disconnects_mid_request_does_not_release_the_key() {
    let stack = stack("disconnect");
    let body = r#"{"amount":1}"#;
    let request = format!(
        "POST /v1/payments HTTP/1.1\r\nHost: gw\r\nAuthorization: {AUTH}\r\nIdempotency-Key: gone-1\r\n\
         Content-Type: application/json\r\nx-demo-delay-ms: 1500\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    {
        let addr = stack.gateway_url().trim_start_matches("http://").to_owned();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        // Wait until the upstream has the request, then hang up.
        wait_for_upstream(&stack, 1);
    }
    thread::sleep(Duration::from_millis(300));
    let retry = post_payment(&stack, "gone-1", body.as_bytes());
    assert_eq!(
        retry.status,
        409,
        "the upstream may still execute, so no second execution: {}",
        retry.text()
    );
    // The stream's end recorded an unknown outcome: held (the route's default: 60 s, then
    // refused), never executed again.
    let retry = eventually_problem(
        &stack,
        || post_payment(&stack, "gone-1", body.as_bytes()),
        "urn:idemgate:problem:outcome-unknown",
    );
    assert!(retry.header("retry-after").is_some(), "{}", retry.text());
    assert_eq!(stack.upstream_requests().unwrap().len(), 1);
    assert_eq!(stat(&stack, "abandoned"), 1);
}

#[test]
fn an_envoy_timeout_never_releases_the_key() {
    // The gateway template with a 300 ms route timeout.
    let gateway = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoy/gateway.yaml"),
    )
    .unwrap();
    assert!(gateway.contains("timeout: 30s"));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join(format!("timeout-{}.yaml", std::process::id()));
    std::fs::write(&template, gateway.replace("timeout: 30s", "timeout: 0.3s")).unwrap();
    let mut opts = StackOptions::new("envoy-timeout", policy_config());
    opts.template = EnvoyTemplate::File(template);
    let stack = Stack::start(opts).expect("stack starts");
    let send = |delay: &str| {
        stack
            .gateway()
            .post("/v1/payments")
            .header("authorization", AUTH)
            .header("idempotency-key", "slow-1")
            .header("x-demo-delay-ms", delay)
            .json(&json!({"amount": 1}))
            .send()
            .unwrap()
    };
    let first = send("1500");
    assert_eq!(first.status, 504, "{}", first.text());
    // The upstream got the request and may have executed it: no second execution.
    let retry = eventually_problem(&stack, || send("0"), "urn:idemgate:problem:outcome-unknown");
    assert!(retry.header("retry-after").is_some(), "{}", retry.text());
    assert_eq!(stack.upstream_requests().unwrap().len(), 1);
    assert_eq!(stat(&stack, "abandoned"), 1);
    assert_eq!(stat(&stack, "released"), 0);
}

#[test]
fn a_connection_failure_before_sending_releases_the_key() {
    let mut stack = stack("connect-failure");
    stack.stop(idemgate_e2e::Component::Upstream);
    let down = post_payment(&stack, "cf-1", br#"{"amount":1}"#);
    assert_eq!(down.status, 503, "{}", down.text());
    stack.restart(idemgate_e2e::Component::Upstream).unwrap();
    // The upstream never saw the request, so the retry executes.
    let mut ok = None;
    for _ in 0..50 {
        let r = post_payment(&stack, "cf-1", br#"{"amount":1}"#);
        if r.status == 201 {
            ok = Some(r);
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let ok = ok.expect("the retry executes once the upstream is back");
    assert_eq!(ok.header("idempotent-replayed"), None);
    assert_eq!(stack.executions("/v1/payments").unwrap(), 1);
}

#[test]
fn credentials_that_are_not_utf8_keep_their_own_scopes() {
    let stack = stack("opaque-scope");
    let send = |auth: &[u8]| {
        let body = br#"{"amount":1}"#;
        let mut req =
            b"POST /v1/payments HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer s-".to_vec();
        req.extend_from_slice(auth);
        req.extend_from_slice(
            format!(
                "\r\nIdempotency-Key: opaque-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        req.extend_from_slice(body);
        raw_request(&stack, &req)
    };
    let a = send(b"\xff\xff");
    let b = send(b"\xfe\xfe");
    assert!(a.starts_with("HTTP/1.1 201"), "{a}");
    assert!(b.starts_with("HTTP/1.1 201"), "{b}");
    assert!(
        !b.to_ascii_lowercase().contains("idempotent-replayed"),
        "another tenant's response: {b}"
    );
    let a2 = send(b"\xff\xff");
    assert!(
        a2.to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{a2}"
    );
    assert_eq!(stack.executions("/v1/payments").unwrap(), 2);
}

#[test]
fn fail_open_routes_forward_and_count_while_fail_closed_routes_answer_503() {
    let mut stack = stack("failure-modes");
    stack.stop_redis();
    let open = order(&stack, "fo-1");
    assert_eq!(open.status, 201, "fail-open forwards: {}", open.text());
    let closed = post_payment(&stack, "fc-1", br#"{"amount":1}"#);
    assert_eq!(closed.status, 503);
    assert_eq!(
        problem_type(&closed),
        "urn:idemgate:problem:store-unavailable"
    );
    assert_eq!(closed.header("retry-after"), Some("1"));
    assert_eq!(stat(&stack, "fail_open_passes"), 1);
    assert_eq!(stat(&stack, "store_errors"), 2);
    assert_eq!(stack.executions("/v1/orders").unwrap(), 1);
    assert_eq!(stack.executions("/v1/payments").unwrap(), 0);
}

#[test]
fn a_missing_scope_source_is_401_on_header_and_metadata_routes() {
    let stack = stack("scope-missing");
    let r = stack
        .gateway()
        .post("/v1/orders")
        .header("authorization", AUTH)
        .header("idempotency-key", "s-1")
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(r.status, 401, "orders scope by x-api-key: {}", r.text());
    assert_eq!(problem_type(&r), "urn:idemgate:problem:scope-missing");
    assert!(stack.upstream_requests().unwrap().is_empty());
}

#[test]
fn scope_from_envoy_dynamic_metadata_separates_tenants() {
    let template = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoy/e2e-metadata.yaml");
    let mut opts = StackOptions::new(
        "metadata-scope",
        json!({
            "store": {"cluster": "idemgate_store"},
            "routes": [{"name": "tenants", "match": {"prefix": "/v1/payments"},
                        "scope": {"property": ["metadata", "filter_metadata", "idemgate.e2e", "tenant"]}}]
        }),
    );
    opts.template = EnvoyTemplate::File(template);
    let stack = Stack::start(opts).expect("stack starts");
    let send = |tenant: Option<&str>| {
        let mut req = stack
            .gateway()
            .post("/v1/payments")
            .header("idempotency-key", "m-1");
        if let Some(t) = tenant {
            req = req.header("x-tenant-id", t);
        }
        req.json(&json!({"amount": 1})).send().unwrap()
    };
    let a = send(Some("acme"));
    let b = send(Some("globex"));
    assert_eq!(
        (a.status, b.status),
        (201, 201),
        "{} {}",
        a.text(),
        b.text()
    );
    assert_eq!(b.header("idempotent-replayed"), None);
    let a2 = send(Some("acme"));
    assert_eq!(
        (a2.header("idempotent-replayed"), a2.body.clone()),
        (Some("true"), a.body)
    );
    let none = send(None);
    assert_eq!(none.status, 401, "{}", none.text());
    assert_eq!(stack.executions("/v1/payments").unwrap(), 2);
}

#[test]
fn a_bad_configuration_fails_the_load_with_the_field_named() {
    let bad = json!({
        "store": {"cluster": "idemgate_store"},
        "routes": [{"name": "a", "match": {"prefix": "/v1"}, "ttl_s": 0}]
    });
    let mut opts = StackOptions::new("bad-config", bad);
    opts.startup_timeout_ms = 10_000;
    let err = match Stack::start(opts) {
        Ok(_) => panic!("Envoy must refuse a filter configuration with ttl_s 0"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(
            "invalid idemgate filter configuration: field `routes[0].ttl_s`: must be between 1 and"
        ),
        "{err}"
    );
}

#[test]
fn the_filter_logs_its_version_and_configuration_hash() {
    let stack = stack("load-log");
    let log = stack.log_tail(idemgate_e2e::Component::Envoy, 2000);
    assert!(
        log.contains(&format!(
            "idemgate filter {} configured: config hash ",
            env!("CARGO_PKG_VERSION")
        )),
        "{log}"
    );
}

#[test]
fn default_deny_list_keeps_cookies_rate_limits_and_envoy_timing_out_of_replays() {
    let stack = stack("deny-list");
    let send = || {
        stack
            .gateway()
            .post("/v1/payments")
            .header("authorization", AUTH)
            .header("idempotency-key", "deny-1")
            .header("x-demo-response-header", "set-cookie: sid=abc; HttpOnly")
            .header("x-demo-response-header", "x-ratelimit-remaining: 41")
            .header("x-demo-response-header", "ratelimit-policy: 100;w=60")
            .header("x-demo-response-header", "retry-after: 5")
            .header("x-demo-response-header", "cache-control: no-cache, private")
            .json(&json!({"amount": 1}))
            .send()
            .unwrap()
    };
    let first = send();
    assert_eq!(first.status, 201);
    assert_eq!(
        first.header("set-cookie"),
        Some("sid=abc; HttpOnly"),
        "the first client gets everything"
    );
    let retry = send();
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    for h in [
        "set-cookie",
        "x-ratelimit-remaining",
        "ratelimit-policy",
        "retry-after",
        "x-envoy-upstream-service-time",
    ] {
        assert_eq!(retry.header(h), None, "{h} must not be replayed");
    }
    assert_eq!(
        retry.header("cache-control"),
        Some("no-cache, private"),
        "ordinary headers are kept whole"
    );
}
