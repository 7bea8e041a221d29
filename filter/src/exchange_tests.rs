//! Host-side tests of the decision logic through a recording test double.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use idemgate_protocol::admin::{FilterReport, ReportKind, REPORT_PATH};
use idemgate_protocol::{
    AfterUnknown, ClaimOutcome, ClaimRequest, CompleteOutcome, CompleteRequest, ReleaseRequest,
    StoredResponse,
};

use super::*;
use crate::config::Config;

/// Everything the logic did to the host, in order.
#[derive(Debug, Clone, PartialEq)]
enum Effect {
    Dispatch {
        path: &'static str,
        detached: bool,
        token: u32,
    },
    ResumeRequest,
    ResumeResponse,
    LocalReply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    SetResponseHeaders(Vec<(String, String)>),
}

#[derive(Default)]
struct FakeHost {
    request_headers: Vec<(String, String)>,
    request_body: Vec<u8>,
    response_headers: RefCell<Vec<(String, String)>>,
    response_chunk: RefCell<Vec<u8>>,
    properties: HashMap<Vec<String>, Vec<u8>>,
    refuse_dispatch: bool,
    effects: RefCell<Vec<Effect>>,
    calls: RefCell<Vec<(u32, &'static str, Vec<u8>)>>,
    counters: RefCell<HashMap<Metric, i64>>,
    next_token: RefCell<u32>,
    upstream_calls: RefCell<Vec<(u32, UpstreamCall)>>,
    now_ms: RefCell<u64>,
}

impl FakeHost {
    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Self {
        let mut all = vec![
            (":method".to_owned(), method.to_owned()),
            (":path".to_owned(), path.to_owned()),
            (":authority".to_owned(), "api".to_owned()),
        ];
        all.extend(
            headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
        );
        Self {
            request_headers: all,
            next_token: RefCell::new(1),
            ..Self::default()
        }
    }

    fn with_body(mut self, body: &[u8]) -> Self {
        self.request_body = body.to_vec();
        self
    }

    fn effects(&self) -> Vec<Effect> {
        self.effects.borrow().clone()
    }

    fn count_of(&self, m: Metric) -> i64 {
        self.counters.borrow().get(&m).copied().unwrap_or(0)
    }

    /// The last store call other than a report.
    fn last_call<T: serde::de::DeserializeOwned>(&self) -> (u32, T) {
        let calls = self.calls.borrow();
        let (token, _, body) = calls
            .iter()
            .rev()
            .find(|(_, path, _)| *path != REPORT_PATH)
            .expect("a store call");
        (
            *token,
            serde_json::from_slice(body).expect("a store call body"),
        )
    }

    /// Store calls other than reports.
    fn store_calls(&self) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|(_, path, _)| *path != REPORT_PATH)
            .count()
    }

    /// The reports sent, in order.
    fn reports(&self) -> Vec<FilterReport> {
        self.calls
            .borrow()
            .iter()
            .filter(|(_, path, _)| *path == REPORT_PATH)
            .map(|(_, _, body)| serde_json::from_slice(body).expect("a report"))
            .collect()
    }

    fn last_reply(&self) -> (u16, Vec<(String, String)>, serde_json::Value) {
        let effects = self.effects.borrow();
        let Some(Effect::LocalReply {
            status,
            headers,
            body,
        }) = effects
            .iter()
            .rev()
            .find(|e| matches!(e, Effect::LocalReply { .. }))
        else {
            panic!("no local reply in {effects:?}");
        };
        (
            *status,
            headers.clone(),
            serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl Host for FakeHost {
    fn request_headers(&self) -> Vec<(String, String)> {
        self.request_headers.clone()
    }
    fn request_header(&self, name: &str) -> Option<String> {
        self.request_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
    fn request_body(&self, max_bytes: usize) -> Vec<u8> {
        self.request_body.iter().take(max_bytes).copied().collect()
    }
    fn response_headers(&self) -> Vec<(String, String)> {
        self.response_headers.borrow().clone()
    }
    fn set_response_headers(&self, headers: &[(String, String)]) {
        *self.response_headers.borrow_mut() = headers.to_vec();
        self.effects
            .borrow_mut()
            .push(Effect::SetResponseHeaders(headers.to_vec()));
    }
    fn response_body(&self, max_bytes: usize) -> Vec<u8> {
        self.response_chunk
            .borrow()
            .iter()
            .take(max_bytes)
            .copied()
            .collect()
    }
    fn property(&self, path: &[String]) -> Option<Vec<u8>> {
        self.properties.get(path).cloned()
    }
    fn dispatch(&self, call: &StoreCall) -> Result<u32, String> {
        if self.refuse_dispatch {
            return Err("BadArgument".into());
        }
        let token = *self.next_token.borrow();
        *self.next_token.borrow_mut() += 1;
        self.calls
            .borrow_mut()
            .push((token, call.path, call.body.clone()));
        self.effects.borrow_mut().push(Effect::Dispatch {
            path: call.path,
            detached: call.detached,
            token,
        });
        Ok(token)
    }
    fn resume_request(&self) {
        self.effects.borrow_mut().push(Effect::ResumeRequest);
    }
    fn resume_response(&self) {
        self.effects.borrow_mut().push(Effect::ResumeResponse);
    }
    fn local_reply(&self, status: u16, headers: &[(String, String)], body: &[u8]) {
        self.effects.borrow_mut().push(Effect::LocalReply {
            status,
            headers: headers.to_vec(),
            body: body.to_vec(),
        });
    }
    fn dispatch_upstream(&self, call: UpstreamCall) -> Result<u32, String> {
        if self.refuse_dispatch {
            return Err("BadArgument".into());
        }
        let token = *self.next_token.borrow();
        *self.next_token.borrow_mut() += 1;
        self.upstream_calls.borrow_mut().push((token, call));
        Ok(token)
    }
    fn new_fencing_token(&self) -> String {
        let n = *self.next_token.borrow();
        format!("{n:032x}")
    }
    fn now_ms(&self) -> u64 {
        *self.now_ms.borrow()
    }
    fn count(&self, metric: Metric, delta: i64) {
        *self.counters.borrow_mut().entry(metric).or_default() += delta;
    }
    fn log(&self, _level: Level, _message: &str) {}
}

const CONFIG: &str = r#"{
  "store": {"cluster": "idemgate_store"},
  "defaults": {"scope": {"header": "authorization"}},
  "routes": [
    {"name": "payments", "match": {"prefix": "/v1/payments"}, "key": "required",
     "fingerprint": {"body": "canonical_json", "exclude_json": ["/sent_at"]},
     "max_request_body_bytes": 64, "max_response_body_bytes": 32},
    {"name": "orders", "match": {"prefix": "/v1/orders"}, "key": "optional", "failure_mode": "open"},
    {"name": "jwt", "match": {"prefix": "/v1/jwt"}, "scope": {"property": ["metadata", "sub"]}},
    {"name": "global", "match": {"prefix": "/v1/global"}, "scope": "global", "store_statuses": ["2xx", "5xx"]}
  ]
}"#;

fn exchange() -> Exchange {
    Exchange::new(Some(Rc::new(
        Config::from_json(CONFIG.as_bytes()).expect("test config"),
    )))
}

fn ok(body: &impl serde::Serialize) -> StoreReply {
    StoreReply {
        status: Some(200),
        body: serde_json::to_vec(body).expect("json"),
        ..StoreReply::default()
    }
}

const AUTH: (&str, &str) = ("authorization", "Bearer tenant-a");

/// A `POST /v1/payments` of tenant A with key `key` and body `{}`.
fn payment(key: &str) -> FakeHost {
    FakeHost::request("POST", "/v1/payments", &[AUTH, ("idempotency-key", key)]).with_body(b"{}")
}

/// Drives a POST with a body up to the claim; returns the claim request.
fn claim_payment(x: &mut Exchange, host: &FakeHost) -> (u32, ClaimRequest) {
    assert_eq!(
        x.on_request_headers(host, false),
        Flow::Pause,
        "headers are held"
    );
    let len = host.request_body.len();
    assert_eq!(
        x.on_request_body(host, len, true),
        Flow::Pause,
        "held while claiming"
    );
    host.last_call::<ClaimRequest>()
}

/// No store server answers the claim `token`, nor its retries.
fn claim_unanswered(x: &mut Exchange, host: &FakeHost, token: u32) {
    let mut token = token;
    for _ in 0..CLAIM_TRIES {
        x.on_store_reply(host, token, StoreReply::default());
        let last = host.calls.borrow().last().map(|(t, p, _)| (*t, *p));
        match last {
            Some((retry, CLAIM_PATH)) if retry != token => token = retry,
            _ => return,
        }
    }
}

/// A payment whose claim the store answered with `outcome`.
fn answered(host: &FakeHost, outcome: ClaimOutcome) -> Exchange {
    let mut x = exchange();
    let (token, _) = claim_payment(&mut x, host);
    x.on_store_reply(host, token, ok(&outcome));
    x
}

/// A payment whose claim acquired the lock with fencing token `ft`: the upstream runs.
fn forwarded_payment(host: &FakeHost) -> Exchange {
    answered(
        host,
        ClaimOutcome::Acquired {
            fencing_token: "ft".into(),
        },
    )
}

#[test]
fn first_request_is_claimed_forwarded_and_completed() {
    let host = FakeHost::request(
        "POST",
        "/v1/payments",
        &[
            AUTH,
            ("idempotency-key", "\"k1\""),
            ("content-type", "application/json"),
        ],
    )
    .with_body(br#"{"amount": 10}"#);
    let mut x = exchange();
    let (token, claim) = claim_payment(&mut x, &host);
    assert_eq!(claim.record.key, "k1");
    assert_eq!(claim.route, "payments");
    assert_eq!(claim.lock_ttl_ms, crate::config::DEFAULT_LOCK_TTL_MS);
    assert_eq!(claim.record.scope.len(), 64);
    assert!(
        !host.effects().contains(&Effect::ResumeRequest),
        "nothing forwarded before the claim answers"
    );

    x.on_store_reply(
        &host,
        token,
        ok(&ClaimOutcome::Acquired {
            fencing_token: "ft".into(),
        }),
    );
    assert_eq!(host.effects().last(), Some(&Effect::ResumeRequest));
    assert_eq!(host.count_of(Metric::Acquired), 1);

    *host.response_headers.borrow_mut() = vec![
        (":status".into(), "201".into()),
        ("location".into(), "/v1/payments/1".into()),
        ("content-length".into(), "20".into()),
        ("set-cookie".into(), "s=1".into()),
        ("link".into(), "<a>; rel=x, <b>; rel=y".into()),
        ("link".into(), "<c>".into()),
    ];
    assert_eq!(x.on_response_headers(&host, false), Flow::Continue);
    *host.response_chunk.borrow_mut() = b"0123456789".to_vec();
    assert_eq!(
        x.on_response_body(&host, 10, false),
        Flow::Pause,
        "buffered until the end"
    );
    *host.response_chunk.borrow_mut() = b"0123456789abcdefghij".to_vec();
    assert_eq!(
        x.on_response_body(&host, 20, true),
        Flow::Pause,
        "held until stored"
    );
    let (token, complete) = host.last_call::<CompleteRequest>();
    assert!(matches!(
        host.effects().last(),
        Some(Effect::Dispatch {
            path: "/v1/complete",
            detached: true,
            ..
        })
    ));
    assert_eq!(complete.fencing_token, "ft");
    assert_eq!(complete.status, 201);
    assert_eq!(complete.ttl_s, crate::config::DEFAULT_TTL_S);
    let stored = complete.response.expect("replayable");
    assert_eq!(stored.body, b"0123456789abcdefghij");
    assert_eq!(
        stored.headers,
        vec![
            ("location".to_owned(), "/v1/payments/1".to_owned()),
            ("link".to_owned(), "<a>; rel=x, <b>; rel=y".to_owned()),
            ("link".to_owned(), "<c>".to_owned()),
        ],
        "hop-by-hop, content-length and set-cookie are not stored; repeats and commas are kept"
    );
    x.on_store_reply(&host, token, ok(&CompleteOutcome::Completed));
    assert_eq!(host.effects().last(), Some(&Effect::ResumeResponse));
    assert_eq!(host.count_of(Metric::Completed), 1);
}

#[test]
fn replay_answers_locally_with_exact_headers_and_marker() {
    let host = payment("k1");
    let mut x = exchange();
    let (token, _) = claim_payment(&mut x, &host);
    let stored = StoredResponse {
        status: 201,
        headers: vec![
            ("location".into(), "/v1/payments/1".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: b"{\"id\":1}".to_vec(),
    };
    x.on_store_reply(
        &host,
        token,
        ok(&ClaimOutcome::Replay {
            response: stored.clone(),
        }),
    );
    let (status, headers, _) = host.last_reply();
    assert_eq!(status, 201);
    assert_eq!(headers, stored.headers);
    assert!(
        !host.effects().contains(&Effect::ResumeRequest),
        "a replay never reaches the upstream"
    );
    // Envoy's local reply passes our response callback: the headers become exactly the stored ones.
    *host.response_headers.borrow_mut() = vec![
        (":status".into(), "201".into()),
        ("content-length".into(), "8".into()),
        ("content-type".into(), "text/plain".into()),
        ("location".into(), "/v1/payments/1".into()),
        ("content-type".into(), "application/json".into()),
    ];
    assert_eq!(x.on_response_headers(&host, false), Flow::Continue);
    assert_eq!(
        *host.response_headers.borrow(),
        vec![
            (":status".to_owned(), "201".to_owned()),
            ("content-length".to_owned(), "8".to_owned()),
            ("location".to_owned(), "/v1/payments/1".to_owned()),
            ("content-type".to_owned(), "application/json".to_owned()),
            ("idempotent-replayed".to_owned(), "true".to_owned()),
        ]
    );
    assert_eq!(host.count_of(Metric::Replayed), 1);
}

#[test]
fn in_flight_retry_after_follows_the_usual_latency_not_the_lock() {
    let config = Config::from_json(CONFIG.as_bytes()).expect("config");
    let route = &config.routes[0];
    // No sample yet: 1 s, even with 59 s of lock left.
    assert_eq!(in_flight_retry_after_s(route, 59_000, 0), 1);
    // Usually 2.5 s; held 400 ms: ready in about 2.1 s -> 3.
    route.usual_latency_ms.set(2_500);
    assert_eq!(in_flight_retry_after_s(route, 59_000, 400), 3);
    // Overdue: at least 1 s.
    assert_eq!(in_flight_retry_after_s(route, 59_000, 9_000), 1);
    // Never past the lock's end.
    route.usual_latency_ms.set(30_000);
    assert_eq!(in_flight_retry_after_s(route, 2_001, 0), 3);
}

#[test]
fn in_flight_gets_409_with_retry_after_rounded_up() {
    let host = payment("k1");
    answered(
        &host,
        ClaimOutcome::InFlight {
            retry_after_ms: 2_001,
            age_ms: 0,
        },
    );
    let (status, headers, body) = host.last_reply();
    assert_eq!(status, 409);
    // No latency measured yet on this route: the 1 s default, not the lock's 2.001 s.
    assert!(headers.contains(&("retry-after".to_owned(), "1".to_owned())));
    assert!(headers.contains(&(
        "content-type".to_owned(),
        "application/problem+json".to_owned()
    )));
    assert_eq!(body["type"], "urn:idemgate:problem:in-flight");
    assert_eq!(body["retry_after_s"], 1);
    assert_eq!(host.count_of(Metric::InFlightConflicts), 1);
}

#[test]
fn mismatch_gets_422_and_not_replayable_gets_409_of_its_own_type() {
    let host = payment("k1");
    answered(&host, ClaimOutcome::Mismatch);
    let (status, _, body) = host.last_reply();
    assert_eq!(
        (status, body["type"].as_str()),
        (422, Some("urn:idemgate:problem:key-reused"))
    );

    answered(&host, ClaimOutcome::NotReplayable { status: 200 });
    let (status, _, body) = host.last_reply();
    assert_eq!(
        (status, body["type"].as_str()),
        (409, Some("urn:idemgate:problem:not-replayable"))
    );
}

/// Found by the `filter_store_reply` fuzz target: a replay whose stored status Envoy
/// cannot send (699, 0) went to `send_http_response` as it was.
#[test]
fn a_replay_with_an_impossible_status_is_not_replayable_and_never_executes() {
    for status in [0, 99, 600, 699, u16::MAX] {
        let host = payment("k1");
        answered(
            &host,
            ClaimOutcome::Replay {
                response: StoredResponse {
                    status,
                    headers: vec![],
                    body: b"{}".to_vec(),
                },
            },
        );
        let (reply, _, body) = host.last_reply();
        assert_eq!(
            (reply, body["type"].as_str()),
            (409, Some("urn:idemgate:problem:not-replayable")),
            "stored status {status}"
        );
        assert!(!host.effects().contains(&Effect::ResumeRequest));
        assert_eq!(
            host.store_calls(),
            1,
            "no release, no retry: the record is complete"
        );
    }
}

#[test]
fn key_errors_are_400_and_never_reach_the_store() {
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![AUTH], "urn:idemgate:problem:key-missing"),
        (
            vec![AUTH, ("idempotency-key", "")],
            "urn:idemgate:problem:key-malformed",
        ),
        (
            vec![AUTH, ("idempotency-key", "\"open")],
            "urn:idemgate:problem:key-malformed",
        ),
        (
            vec![AUTH, ("idempotency-key", "a"), ("idempotency-key", "b")],
            "urn:idemgate:problem:key-malformed",
        ),
    ];
    let long = "x".repeat(256);
    let mut cases = cases;
    cases.push((
        vec![AUTH, ("idempotency-key", long.as_str())],
        "urn:idemgate:problem:key-malformed",
    ));
    for (headers, expected) in cases {
        let host = FakeHost::request("POST", "/v1/payments", &headers);
        let mut x = exchange();
        assert_eq!(x.on_request_headers(&host, false), Flow::Pause);
        let (status, _, body) = host.last_reply();
        assert_eq!(
            (status, body["type"].as_str()),
            (400, Some(expected)),
            "{headers:?}"
        );
        assert_eq!(host.store_calls(), 0);
        let reports = host.reports();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(
            (
                reports[0].kind,
                reports[0].route.as_str(),
                reports[0].key.as_deref()
            ),
            (ReportKind::Rejected, "payments", None)
        );
        assert_eq!(
            x.on_request_body(&host, 3, true),
            Flow::Pause,
            "the answered request's body is held"
        );
    }
}

#[test]
fn missing_scope_is_401_never_a_shared_scope() {
    let host = FakeHost::request("POST", "/v1/payments", &[("idempotency-key", "k")]);
    let mut x = exchange();
    x.on_request_headers(&host, true);
    let (status, _, body) = host.last_reply();
    assert_eq!(
        (status, body["type"].as_str()),
        (401, Some("urn:idemgate:problem:scope-missing"))
    );

    let host = FakeHost::request("POST", "/v1/jwt", &[("idempotency-key", "k")]);
    let mut x = exchange();
    x.on_request_headers(&host, true);
    assert_eq!(host.last_reply().0, 401);

    let mut host = FakeHost::request("POST", "/v1/jwt", &[("idempotency-key", "k")]);
    host.properties
        .insert(vec!["metadata".into(), "sub".into()], b"user-7".to_vec());
    let mut x = exchange();
    assert_eq!(x.on_request_headers(&host, true), Flow::Pause);
    let (_, claim) = host.last_call::<ClaimRequest>();
    assert_eq!(
        claim.record.scope,
        scope_hash("property:metadata/sub", b"user-7")
    );
}

#[test]
fn scopes_differ_per_tenant_and_global_is_explicit() {
    let scope_of = |auth: &str| {
        let host = FakeHost::request(
            "POST",
            "/v1/payments",
            &[("authorization", auth), ("idempotency-key", "k")],
        );
        let mut x = exchange();
        x.on_request_headers(&host, true);
        host.last_call::<ClaimRequest>().1.record.scope
    };
    assert_ne!(scope_of("Bearer a"), scope_of("Bearer b"));
    assert!(!scope_of("Bearer a").contains("Bearer"));
    let host = FakeHost::request("POST", "/v1/global", &[("idempotency-key", "k")]);
    let mut x = exchange();
    x.on_request_headers(&host, true);
    assert_eq!(
        host.last_call::<ClaimRequest>().1.record.scope,
        GLOBAL_SCOPE
    );
}

#[test]
fn unprotected_requests_pass_through_untouched() {
    for (method, path, headers) in [
        ("GET", "/v1/payments", vec![AUTH, ("idempotency-key", "k")]),
        ("HEAD", "/v1/payments", vec![]),
        ("OPTIONS", "/v1/payments", vec![]),
        ("POST", "/v1/orders", vec![AUTH]),
        ("POST", "/elsewhere", vec![("idempotency-key", "\"bad")]),
    ] {
        let host = FakeHost::request(method, path, &headers);
        let mut x = exchange();
        assert_eq!(
            x.on_request_headers(&host, false),
            Flow::Continue,
            "{method} {path}"
        );
        assert_eq!(x.on_request_body(&host, 10, true), Flow::Continue);
        *host.response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
        assert_eq!(x.on_response_headers(&host, true), Flow::Continue);
        assert!(
            host.effects().is_empty(),
            "{method} {path}: {:?}",
            host.effects()
        );
    }
}

#[test]
fn canonical_json_fingerprint_ignores_order_and_excluded_fields() {
    let fp = |body: &[u8]| {
        let host = FakeHost::request("POST", "/v1/payments", &[AUTH, ("idempotency-key", "k")])
            .with_body(body);
        let mut x = exchange();
        claim_payment(&mut x, &host).1.fingerprint
    };
    let a = fp(br#"{"amount":10,"currency":"eur","sent_at":1}"#);
    assert_eq!(
        a,
        fp(b"{ \"currency\": \"eur\", \"sent_at\": 2, \"amount\": 10 }")
    );
    assert_ne!(a, fp(br#"{"amount":11,"currency":"eur"}"#));
}

#[test]
fn request_over_the_cap_is_413_before_any_claim() {
    let host = FakeHost::request(
        "POST",
        "/v1/payments",
        &[AUTH, ("idempotency-key", "k"), ("content-length", "65")],
    );
    let mut x = exchange();
    assert_eq!(x.on_request_headers(&host, false), Flow::Pause);
    let (status, _, body) = host.last_reply();
    assert_eq!(
        (status, body["type"].as_str()),
        (413, Some("urn:idemgate:problem:request-too-large"))
    );

    // Chunked: no content-length, the buffered size crosses the cap.
    let host = FakeHost::request("POST", "/v1/payments", &[AUTH, ("idempotency-key", "k")]);
    let mut x = exchange();
    assert_eq!(x.on_request_headers(&host, false), Flow::Pause);
    assert_eq!(x.on_request_body(&host, 40, false), Flow::Pause);
    assert_eq!(x.on_request_body(&host, 80, false), Flow::Pause);
    assert_eq!(host.last_reply().0, 413);
    assert_eq!(host.store_calls(), 0);
    assert_eq!(host.count_of(Metric::BodyCapEvents), 1);
    assert_eq!(host.reports()[0].kind, ReportKind::BodyCap);
    assert_eq!(host.reports()[0].key.as_deref(), Some("k"));
}

#[test]
fn response_over_the_cap_completes_as_not_replayable() {
    let host = payment("k");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
    x.on_response_headers(&host, false);
    *host.response_chunk.borrow_mut() = vec![b'x'; 20];
    assert_eq!(
        x.on_response_body(&host, 20, false),
        Flow::Pause,
        "under the cap: buffered"
    );
    assert_eq!(
        x.on_response_body(&host, 40, false),
        Flow::Continue,
        "over the cap: recorded at once and streamed on, never held past Envoy's buffer"
    );
    let (token, complete) = host.last_call::<CompleteRequest>();
    assert_eq!(complete.status, 200);
    assert!(complete.response.is_none());
    assert_eq!(x.on_response_body(&host, 50, false), Flow::Continue);
    x.on_store_reply(&host, token, ok(&CompleteOutcome::Completed));
    assert_ne!(
        host.effects().last(),
        Some(&Effect::ResumeResponse),
        "nothing was paused"
    );
    assert_eq!(x.on_response_body(&host, 0, true), Flow::Continue);
    assert_eq!(host.count_of(Metric::BodyCapEvents), 1);
    assert_eq!(host.store_calls(), 2, "one claim, one complete");

    // A declared content-length over the cap is known at the headers.
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![
        (":status".into(), "200".into()),
        ("content-length".into(), "33".into()),
    ];
    assert_eq!(x.on_response_headers(&host, false), Flow::Continue);
    assert!(host.last_call::<CompleteRequest>().1.response.is_none());
    assert_eq!(x.on_response_body(&host, 33, true), Flow::Continue);
}

#[test]
fn envoy_answers_are_classified_by_code_details() {
    let details = |d: &str| {
        let path = vec!["response".to_owned(), "code_details".to_owned()];
        HashMap::from([(path, d.as_bytes().to_vec())])
    };
    // A timeout after the request was sent: the outcome is unknown, never released.
    let mut host = payment("k");
    host.properties = details("upstream_response_timeout");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "504".into())];
    assert_eq!(x.on_response_headers(&host, false), Flow::Continue);
    let (_, complete) = host.last_call::<CompleteRequest>();
    assert_eq!((complete.status, complete.response), (504, None));
    assert_eq!(host.count_of(Metric::Abandoned), 1);

    // A connection failure before anything was sent: safe to release.
    host.properties = details("upstream_reset_before_response_started{remote_connection_failure}");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "503".into())];
    assert_eq!(x.on_response_headers(&host, false), Flow::Continue);
    assert_eq!(host.last_call::<ReleaseRequest>().1.status, Some(503));

    // A reset after the request was sent: unknown.
    host.properties = details("upstream_reset_before_response_started{remote_reset}");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "503".into())];
    x.on_response_headers(&host, false);
    assert!(host.last_call::<CompleteRequest>().1.response.is_none());

    // The upstream's own 503 follows the route policy (released).
    host.properties = details("via_upstream");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "503".into())];
    assert_eq!(x.on_response_headers(&host, true), Flow::Pause);
    assert_eq!(host.last_call::<ReleaseRequest>().1.status, Some(503));
}

#[test]
fn a_stream_that_ends_mid_exchange_is_recorded_as_not_replayable() {
    let host = payment("k");
    // The client went away while the upstream ran.
    let mut x = forwarded_payment(&host);
    x.on_done(&host);
    let (_, complete) = host.last_call::<CompleteRequest>();
    assert_eq!(
        (complete.status, complete.response, complete.outcome_unknown),
        (CLIENT_CLOSED_REQUEST, None, true)
    );
    assert!(matches!(
        host.effects().last(),
        Some(Effect::Dispatch { detached: true, .. })
    ));
    assert_eq!(host.count_of(Metric::Abandoned), 1);

    // The response had started: its status decides (a 500 releases, per the policy).
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "500".into())];
    x.on_response_headers(&host, false);
    x.on_done(&host);
    assert_eq!(host.last_call::<ReleaseRequest>().1.status, Some(500));
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "201".into())];
    x.on_response_headers(&host, false);
    x.on_done(&host);
    assert_eq!(host.last_call::<CompleteRequest>().1.response, None);

    // A finished exchange records nothing more.
    let before = host.store_calls();
    x.on_done(&host);
    let mut done = exchange();
    done.on_done(&host);
    assert_eq!(host.store_calls(), before);
}

#[test]
fn a_response_header_that_is_not_utf8_makes_the_response_not_replayable() {
    let host = payment("k");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![
        (":status".into(), "201".into()),
        (
            "content-disposition".into(),
            format!("{OPAQUE_VALUE_PREFIX}ff00"),
        ),
    ];
    x.on_response_headers(&host, false);
    assert_eq!(host.last_call::<CompleteRequest>().1.response, None);
}

#[test]
fn an_empty_scope_header_is_401_not_a_shared_scope() {
    for empty in ["", "  "] {
        let host = FakeHost::request(
            "POST",
            "/v1/payments",
            &[("authorization", empty), ("idempotency-key", "k")],
        );
        let mut x = exchange();
        x.on_request_headers(&host, true);
        assert_eq!(host.last_reply().0, 401, "{empty:?}");
    }
}

#[test]
fn unstored_status_releases_the_key() {
    let host = payment("k");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "503".into())];
    assert_eq!(
        x.on_response_headers(&host, true),
        Flow::Pause,
        "no body: finish at headers"
    );
    let (token, release) = host.last_call::<ReleaseRequest>();
    assert_eq!(release.fencing_token, "ft");
    assert_eq!(release.status, Some(503));
    x.on_store_reply(&host, token, ok(&ReleaseOutcome::Released));
    assert_eq!(host.effects().last(), Some(&Effect::ResumeResponse));
    assert_eq!(host.count_of(Metric::Released), 1);
}

#[test]
fn lock_lost_on_complete_is_counted_and_the_response_still_flows() {
    let host = payment("k");
    let mut x = answered(
        &host,
        ClaimOutcome::Acquired {
            fencing_token: "old".into(),
        },
    );
    *host.response_headers.borrow_mut() = vec![(":status".into(), "201".into())];
    x.on_response_headers(&host, true);
    let (token, _) = host.last_call::<CompleteRequest>();
    x.on_store_reply(&host, token, ok(&CompleteOutcome::LockLost));
    assert_eq!(host.count_of(Metric::LockLost), 1);
    assert_eq!(host.effects().last(), Some(&Effect::ResumeResponse));
}

#[test]
fn store_failures_follow_the_failure_mode() {
    // Closed (payments): a timed-out claim (zero headers) gives 503 with Retry-After.
    let host = payment("k");
    let mut x = exchange();
    let (token, _) = claim_payment(&mut x, &host);
    claim_unanswered(&mut x, &host, token);
    let (status, headers, body) = host.last_reply();
    assert_eq!(
        (status, body["type"].as_str()),
        (503, Some("urn:idemgate:problem:store-unavailable"))
    );
    assert!(headers.contains(&("retry-after".to_owned(), "1".to_owned())));
    assert!(!host.effects().contains(&Effect::ResumeRequest));

    // A 503 problem from the server and garbage with 200 are store errors too.
    for reply in [
        StoreReply {
            status: Some(503),
            body: br#"{"type":"x","title":"t","status":503}"#.to_vec(),
            ..StoreReply::default()
        },
        StoreReply {
            status: Some(200),
            body: b"<html>".to_vec(),
            ..StoreReply::default()
        },
    ] {
        let mut x = exchange();
        let (token, _) = claim_payment(&mut x, &host);
        x.on_store_reply(&host, token, reply);
        assert_eq!(host.last_reply().0, 503);
    }
    assert_eq!(host.count_of(Metric::StoreErrors), 3);
    assert_eq!(
        host.reports()
            .iter()
            .filter(|r| r.kind == ReportKind::StoreError)
            .count(),
        3
    );

    // Open (orders): forwarded unprotected and counted.
    let host = FakeHost::request("POST", "/v1/orders", &[AUTH, ("idempotency-key", "k")]);
    let mut x = exchange();
    assert_eq!(x.on_request_headers(&host, true), Flow::Pause);
    let (token, _) = host.last_call::<ClaimRequest>();
    claim_unanswered(&mut x, &host, token);
    assert_eq!(host.effects().last(), Some(&Effect::ResumeRequest));
    assert_eq!(host.count_of(Metric::FailOpenPasses), 1);
    assert_eq!(
        host.reports().last().map(|r| r.kind),
        Some(ReportKind::FailOpen)
    );
    *host.response_headers.borrow_mut() = vec![(":status".into(), "201".into())];
    assert_eq!(
        x.on_response_headers(&host, true),
        Flow::Continue,
        "no complete after fail-open"
    );

    // A refused dispatch (unknown cluster) fails closed at once.
    let mut host = FakeHost::request("POST", "/v1/payments", &[AUTH, ("idempotency-key", "k")]);
    host.refuse_dispatch = true;
    let mut x = exchange();
    assert_eq!(x.on_request_headers(&host, true), Flow::Pause);
    assert_eq!(host.last_reply().0, 503);
}

#[test]
fn stale_or_foreign_tokens_are_ignored() {
    let host = payment("k");
    let mut x = exchange();
    let (token, _) = claim_payment(&mut x, &host);
    x.on_store_reply(
        &host,
        token + 100,
        ok(&ClaimOutcome::Acquired {
            fencing_token: "x".into(),
        }),
    );
    assert!(!host.effects().contains(&Effect::ResumeRequest));
    x.on_store_reply(
        &host,
        token,
        ok(&ClaimOutcome::Acquired {
            fencing_token: "x".into(),
        }),
    );
    assert_eq!(host.effects().last(), Some(&Effect::ResumeRequest));
}

#[test]
fn request_trailers_end_the_body() {
    let host = payment("k");
    let mut x = exchange();
    assert_eq!(x.on_request_headers(&host, false), Flow::Pause);
    assert_eq!(x.on_request_body(&host, 2, false), Flow::Pause);
    assert_eq!(x.on_request_trailers(&host), Flow::Pause);
    assert_eq!(host.store_calls(), 1);
}

#[test]
fn unconfigured_filter_passes_everything() {
    let host = FakeHost::request("POST", "/v1/payments", &[("idempotency-key", "k")]);
    let mut x = Exchange::new(None);
    assert_eq!(x.on_request_headers(&host, true), Flow::Continue);
    assert!(host.effects().is_empty());
}

#[test]
fn reports_can_be_turned_off() {
    let config = CONFIG.replace(
        r#""store": {"cluster": "idemgate_store"}"#,
        r#""store": {"cluster": "idemgate_store", "report_events": false}"#,
    );
    let mut x = Exchange::new(Some(Rc::new(
        Config::from_json(config.as_bytes()).expect("config"),
    )));
    let host = FakeHost::request("POST", "/v1/payments", &[AUTH]);
    x.on_request_headers(&host, true);
    assert_eq!(host.last_reply().0, 400);
    assert!(host.calls.borrow().is_empty());
}

// ---- detached execution, unknown outcomes, early release -------------------------------

const DETACHED: &str = r#"{
  "store": {"cluster": "idemgate_store"},
  "routes": [
    {"name": "pay", "match": {"prefix": "/v1/pay"}, "execution": "detached",
     "upstream_timeout_ms": 2500, "lock_ttl_ms": 10000, "max_response_body_bytes": 16,
     "unknown_outcome": {"hold_s": 5, "then": "reexecute"}},
    {"name": "nocluster", "match": {"prefix": "/v1/nocluster"}, "execution": "detached"}
  ]
}"#;

fn detached_exchange() -> Exchange {
    Exchange::new(Some(Rc::new(
        Config::from_json(DETACHED.as_bytes()).expect("detached config"),
    )))
}

/// A detached `POST /v1/pay` (Envoy route cluster `api`) whose claim was acquired and
/// whose root turn dispatched the upstream call; returns the exchange and that call.
fn executing(host: &mut FakeHost) -> (Exchange, u32, UpstreamCall) {
    host.properties
        .insert(vec!["xds".into(), "cluster_name".into()], b"api".to_vec());
    let mut x = detached_exchange();
    assert_eq!(x.on_request_headers(host, false), Flow::Pause);
    assert_eq!(x.on_request_body(host, 2, true), Flow::Pause);
    let (token, claim) = host.last_call::<ClaimRequest>();
    let ft = claim
        .fencing_token
        .clone()
        .expect("the filter makes the fencing token");
    assert_eq!(
        claim.unknown_outcome.map(|p| (p.hold_s, p.then)),
        Some((5, AfterUnknown::Reexecute))
    );
    x.on_store_reply(
        host,
        token,
        ok(&ClaimOutcome::Acquired { fencing_token: ft }),
    );
    assert!(
        !host.effects().contains(&Effect::ResumeRequest),
        "a detached execution never resumes the client's request into the router"
    );
    assert!(
        x.take_root_turn_request(),
        "the root must dispatch the upstream call"
    );
    assert!(!x.take_root_turn_request(), "asked once");
    x.on_root_turn(host);
    let (utoken, call) = host
        .upstream_calls
        .borrow()
        .last()
        .cloned()
        .expect("upstream call");
    assert_eq!(x.awaiting_root_callout(), Some(utoken));
    (x, utoken, call)
}

fn detached_host() -> FakeHost {
    FakeHost::request(
        "POST",
        "/v1/pay",
        &[
            AUTH,
            ("idempotency-key", "k"),
            ("connection", "keep-alive"),
            ("content-length", "2"),
            ("x-trace", "t1"),
        ],
    )
    .with_body(b"{}")
}

fn upstream_reply(status: u16, headers: &[(&str, &str)], body: &[u8]) -> StoreReply {
    let mut all = vec![(":status".to_owned(), status.to_string())];
    all.extend(
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
    );
    StoreReply {
        status: Some(status),
        headers: all,
        body: body.to_vec(),
    }
}

#[test]
fn detached_execution_sends_the_request_to_the_route_cluster_without_hop_by_hop_headers() {
    let mut host = detached_host();
    let (_, _, call) = executing(&mut host);
    assert_eq!(call.cluster, "api");
    assert_eq!(call.timeout_ms, 2500);
    assert_eq!(call.body, b"{}");
    let names: Vec<&str> = call.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            ":method",
            ":path",
            ":authority",
            "authorization",
            "idempotency-key",
            "x-trace"
        ]
    );
    assert_eq!(host.count_of(Metric::DetachedExecutions), 1);
}

#[test]
fn detached_answer_is_stored_then_given_to_the_waiting_client_without_the_marker() {
    let mut host = detached_host();
    let (mut x, utoken, _) = executing(&mut host);
    x.on_store_reply(
        &host,
        utoken,
        upstream_reply(
            201,
            &[
                ("location", "/p/1"),
                ("set-cookie", "s=1"),
                ("connection", "close"),
            ],
            b"{\"id\":1}",
        ),
    );
    let (ctoken, complete) = host.last_call::<CompleteRequest>();
    let stored = complete.response.expect("replayable");
    assert_eq!(stored.status, 201);
    assert_eq!(
        stored.headers,
        vec![("location".to_owned(), "/p/1".to_owned())]
    );
    assert!(!complete.outcome_unknown);
    // The client waits for the store.
    assert!(!host
        .effects()
        .iter()
        .any(|e| matches!(e, Effect::LocalReply { .. })));
    assert_eq!(x.awaiting_root_callout(), Some(ctoken));
    x.on_store_reply(&host, ctoken, ok(&CompleteOutcome::Completed));
    let Some(Effect::LocalReply {
        status,
        headers,
        body,
    }) = host.effects().last().cloned()
    else {
        panic!("the client gets the answer: {:?}", host.effects());
    };
    assert_eq!((status, body.as_slice()), (201, b"{\"id\":1}".as_slice()));
    // The first client gets what the upstream sent (cookies too), hop-by-hop left out.
    assert_eq!(
        headers,
        vec![
            ("location".to_owned(), "/p/1".to_owned()),
            ("set-cookie".to_owned(), "s=1".to_owned())
        ]
    );
    *host.response_headers.borrow_mut() = vec![(":status".into(), "201".into())];
    x.on_response_headers(&host, false);
    let exact = host.response_headers.borrow().clone();
    assert!(
        !exact.iter().any(|(n, _)| n == REPLAYED_HEADER),
        "{exact:?}"
    );
    assert!(!x.is_active());
}

#[test]
fn detached_execution_outlives_its_client_and_stores_for_the_retry() {
    let mut host = detached_host();
    let (mut x, utoken, _) = executing(&mut host);
    x.on_done(&host);
    assert_eq!(
        host.count_of(Metric::Abandoned),
        0,
        "not an unknown outcome"
    );
    assert!(x.is_active(), "the root keeps it");
    x.on_store_reply(&host, utoken, upstream_reply(201, &[], b"ok"));
    let (ctoken, complete) = host.last_call::<CompleteRequest>();
    assert_eq!(complete.response.map(|r| r.body), Some(b"ok".to_vec()));
    x.on_store_reply(&host, ctoken, ok(&CompleteOutcome::Completed));
    assert!(!host
        .effects()
        .iter()
        .any(|e| matches!(e, Effect::LocalReply { .. })));
    assert_eq!(host.count_of(Metric::DetachedClientGone), 1);
    assert!(!x.is_active());
}

#[test]
fn detached_failure_is_an_unknown_outcome_and_a_504_problem() {
    for reply in [
        StoreReply::default(),
        upstream_reply(504, &[("content-type", "text/plain")], b"upstream request timeout"),
        upstream_reply(503, &[], b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
    ] {
        let mut host = detached_host();
        let (mut x, utoken, _) = executing(&mut host);
        x.on_store_reply(&host, utoken, reply);
        let (ctoken, complete) = host.last_call::<CompleteRequest>();
        assert!(complete.outcome_unknown);
        assert_eq!(complete.response, None);
        x.on_store_reply(&host, ctoken, ok(&CompleteOutcome::Completed));
        let (status, headers, body) = host.last_reply();
        assert_eq!(status, 504);
        assert_eq!(body["type"], "urn:idemgate:problem:upstream-outcome-unknown");
        assert!(!headers.iter().any(|(n, _)| n == "retry-after"));
        assert_eq!(host.count_of(Metric::Abandoned), 1);
    }
}

#[test]
fn detached_call_that_never_reached_the_upstream_releases_the_key() {
    let mut host = detached_host();
    let (mut x, utoken, _) = executing(&mut host);
    x.on_store_reply(
        &host,
        utoken,
        upstream_reply(
            503,
            &[("content-type", "text/plain")],
            b"no healthy upstream",
        ),
    );
    let (_, release) = host.last_call::<ReleaseRequest>();
    assert_eq!(release.status, Some(503));
}

#[test]
fn detached_response_over_the_cap_is_delivered_but_not_replayable() {
    let mut host = detached_host();
    let (mut x, utoken, _) = executing(&mut host);
    let big = vec![b'x'; 100];
    x.on_store_reply(&host, utoken, upstream_reply(201, &[], &big));
    let (ctoken, complete) = host.last_call::<CompleteRequest>();
    assert_eq!((complete.response, complete.outcome_unknown), (None, false));
    x.on_store_reply(&host, ctoken, ok(&CompleteOutcome::Completed));
    let Some(Effect::LocalReply { status, body, .. }) = host.effects().last().cloned() else {
        panic!("delivered");
    };
    assert_eq!((status, body.len()), (201, 100));
    assert_eq!(host.count_of(Metric::BodyCapEvents), 1);
}

#[test]
fn detached_route_without_a_cluster_goes_through_the_router() {
    let host = FakeHost::request("POST", "/v1/nocluster", &[AUTH, ("idempotency-key", "k")]);
    let mut x = detached_exchange();
    x.on_request_headers(&host, true);
    let (token, claim) = host.last_call::<ClaimRequest>();
    x.on_store_reply(
        &host,
        token,
        ok(&ClaimOutcome::Acquired {
            fencing_token: claim.fencing_token.unwrap_or_default(),
        }),
    );
    assert!(!x.take_root_turn_request());
    assert_eq!(host.effects().last(), Some(&Effect::ResumeRequest));
}

#[test]
fn a_client_that_leaves_before_the_claim_answers_releases_the_lock_at_once() {
    let host = payment("k");
    let mut x = exchange();
    let (_, claim) = claim_payment(&mut x, &host);
    x.on_done(&host);
    let (_, release) = host.last_call::<ReleaseRequest>();
    assert_eq!(Some(release.fencing_token), claim.fencing_token);
    assert!(matches!(
        host.effects().last(),
        Some(Effect::Dispatch { detached: true, .. })
    ));
    assert_eq!(host.count_of(Metric::EarlyReleases), 1);
    assert_eq!(host.count_of(Metric::Abandoned), 0);
}

#[test]
fn a_failed_claim_gives_its_own_lock_back() {
    let host = payment("k");
    let mut x = exchange();
    let (token, claim) = claim_payment(&mut x, &host);
    claim_unanswered(&mut x, &host, token);
    let (_, release) = host.last_call::<ReleaseRequest>();
    assert_eq!(Some(release.fencing_token), claim.fencing_token);
    assert_eq!(host.last_reply().0, 503);
}

#[test]
fn unknown_outcomes_get_409_of_their_own_types() {
    let host = payment("k");
    answered(
        &host,
        ClaimOutcome::Unknown {
            retry_after_ms: Some(4_200),
        },
    );
    let (status, headers, body) = host.last_reply();
    assert_eq!(status, 409);
    assert_eq!(body["type"], "urn:idemgate:problem:outcome-unknown");
    assert!(headers.contains(&("retry-after".to_owned(), "5".to_owned())));

    let host = payment("k");
    answered(
        &host,
        ClaimOutcome::Unknown {
            retry_after_ms: None,
        },
    );
    let (status, headers, body) = host.last_reply();
    assert_eq!(status, 409);
    assert_eq!(body["type"], "urn:idemgate:problem:outcome-unknown-refused");
    assert!(
        !headers.iter().any(|(n, _)| n == "retry-after"),
        "final: nothing to wait for"
    );
}

#[test]
fn envoy_timeouts_in_router_mode_are_unknown_outcomes() {
    let mut host = payment("k");
    host.properties.insert(
        vec!["response".into(), "code_details".into()],
        b"upstream_response_timeout".to_vec(),
    );
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "504".into())];
    x.on_response_headers(&host, false);
    let (_, complete) = host.last_call::<CompleteRequest>();
    assert!(complete.outcome_unknown);
}

#[test]
fn a_claim_no_server_answered_is_tried_once_more_with_the_same_token() {
    let host = payment("k");
    let mut x = exchange();
    let (t1, first) = claim_payment(&mut x, &host);
    // Envoy's own 503 (no server answered): retried.
    x.on_store_reply(
        &host,
        t1,
        StoreReply {
            status: Some(503),
            body: b"no healthy upstream".to_vec(),
            ..StoreReply::default()
        },
    );
    let (t2, second) = host.last_call::<ClaimRequest>();
    assert_ne!(t1, t2);
    assert_eq!(second, first, "the same claim, same fencing token");
    assert_eq!(host.count_of(Metric::ClaimRetries), 1);
    // The last failure applies the failure mode.
    claim_unanswered(&mut x, &host, t2);
    assert_eq!(host.last_reply().0, 503);
    assert_eq!(
        host.count_of(Metric::ClaimRetries),
        i64::from(CLAIM_TRIES - 1)
    );

    // A problem from a server is an answer: not retried.
    let mut x = exchange();
    let (t, _) = claim_payment(&mut x, &host);
    x.on_store_reply(
        &host,
        t,
        StoreReply {
            status: Some(503),
            body: br#"{"type":"urn:idemgate:problem:store-unavailable","title":"t","status":503}"#
                .to_vec(),
            ..StoreReply::default()
        },
    );
    assert_eq!(
        host.count_of(Metric::ClaimRetries),
        i64::from(CLAIM_TRIES - 1)
    );
}

#[test]
fn a_failed_complete_is_retried_from_root_ticks_while_the_response_goes_on() {
    let host = payment("k");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "201".into())];
    assert_eq!(x.on_response_headers(&host, true), Flow::Pause);
    let (t1, call) = host.last_call::<CompleteRequest>();
    x.on_store_reply(&host, t1, StoreReply::default());
    assert_eq!(
        host.effects().last(),
        Some(&Effect::ResumeResponse),
        "the client gets its answer"
    );
    assert!(x.take_timer_request());
    assert!(x.waits_for_timer());
    assert!(x.is_active(), "the root keeps it after the stream ends");
    x.on_done(&host);
    let calls = host.store_calls();
    x.on_tick(&host);
    assert_eq!(host.store_calls(), calls, "not yet due");
    *host.now_ms.borrow_mut() += RETRY_FIRST_DELAY_MS;
    x.on_tick(&host);
    let (t2, again) = host.last_call::<CompleteRequest>();
    assert_eq!(again, call, "the same complete, same token");
    assert_eq!(x.awaiting_root_callout(), Some(t2));
    // Still failing: the backoff doubles.
    x.on_store_reply(
        &host,
        t2,
        StoreReply {
            status: Some(503),
            ..StoreReply::default()
        },
    );
    assert!(x.take_timer_request());
    *host.now_ms.borrow_mut() += RETRY_FIRST_DELAY_MS;
    x.on_tick(&host);
    assert_eq!(host.store_calls(), calls + 1, "200 ms now");
    *host.now_ms.borrow_mut() += RETRY_FIRST_DELAY_MS;
    x.on_tick(&host);
    let (t3, _) = host.last_call::<CompleteRequest>();
    x.on_store_reply(&host, t3, ok(&CompleteOutcome::Completed));
    assert!(!x.is_active());
    assert_eq!(host.count_of(Metric::CompletionRetries), 2);
    assert_eq!(host.count_of(Metric::Completed), 1);
}

#[test]
fn a_complete_retry_stops_at_the_lock_end() {
    let host = payment("k");
    let mut x = forwarded_payment(&host);
    *host.response_headers.borrow_mut() = vec![(":status".into(), "201".into())];
    x.on_response_headers(&host, true);
    let (t1, _) = host.last_call::<CompleteRequest>();
    *host.now_ms.borrow_mut() += crate::config::DEFAULT_LOCK_TTL_MS;
    x.on_store_reply(&host, t1, StoreReply::default());
    assert!(!x.is_active());
    assert_eq!(host.count_of(Metric::CompletionAbandoned), 1);
    // A refusal (lock lost) or a bad call is never retried.
    let mut x = forwarded_payment(&host);
    x.on_response_headers(&host, true);
    let (t, _) = host.last_call::<CompleteRequest>();
    x.on_store_reply(&host, t, ok(&CompleteOutcome::LockLost));
    assert!(!x.is_active());
}
