//! The per-request decision state machine: one [`Exchange`] per HTTP stream.
//!
//! ```text
//! request headers ──(no route / optional key absent)──────────────► PassThrough
//!        │ protected, key valid
//!        ▼
//!   Buffering ──(end of stream)──► Claiming ──acquired──► Forwarded ──resp headers──► Capturing
//!        │ (413)                       │ replay ──► Replaying (local reply, headers fixed up)
//!        ▼                             │ in_flight 409 / mismatch 422 / not_replayable 409
//!     Answered ◄───────────────────────┘ store error: 503 (closed) or PassThrough (open)
//!   Capturing ──(end of stream)──► Finishing (complete or release sent, response paused) ──► Done
//! ```
//!
//! The upstream never sees a request the filter answers itself: request headers are held
//! (`allow_on_headers_stop_iteration`) until the claim says `acquired`.

use std::rc::Rc;

use idemgate_protocol::admin::{FilterReport, ReportKind, REPORT_PATH};
use idemgate_protocol::fingerprint::Fingerprint;
use idemgate_protocol::problem::PROBLEM_JSON;
use idemgate_protocol::{
    scope_hash, ClaimOutcome, ClaimRequest, CompleteOutcome, CompleteRequest, Problem, ProblemType,
    RecordId, ReleaseOutcome, ReleaseRequest, StoredResponse, CLAIM_PATH, COMPLETE_PATH,
    GLOBAL_SCOPE, RELEASE_PATH,
};
use serde::de::DeserializeOwned;

use crate::config::{Config, FailureMode, KeyRequirement, Route, ScopeSource};
use crate::host::{Host, Level, Metric, StoreCall, StoreReply};
use crate::key::parse_key;

/// The header that carries the key (IETF draft section 2).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The marker on replayed responses (Stripe's name).
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Status recorded for a request whose client went away before any response (nginx's 499).
pub const CLIENT_CLOSED_REQUEST: u16 = 499;
/// `Retry-After` on 503 when the store cannot answer, seconds.
pub const STORE_UNAVAILABLE_RETRY_AFTER_S: u64 = 1;

/// What the glue returns to Envoy from a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Let the stream go on.
    Continue,
    /// Hold it (headers: `StopIteration`; body: `StopIterationAndBuffer`).
    Pause,
}

/// A protected request waiting for its body or its claim.
struct Pending {
    route: Rc<Route>,
    record: RecordId,
    method: String,
    path: String,
    fingerprint: Fingerprint,
}

/// A request that holds the lock and went upstream.
struct Forwarded {
    route: Rc<Route>,
    record: RecordId,
    fencing_token: String,
}

/// The upstream response being copied for storage.
struct Capture {
    fwd: Forwarded,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// False when the response will not be stored for replay (over the cap, a header value
    /// that is not UTF-8, an outcome nobody can vouch for); the key still stays used.
    replayable: bool,
    /// What the status decides.
    disposition: Disposition,
}

/// How the end of an exchange is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// The route's `store_statuses` decide: complete (replayable unless `unstored`) or release.
    ByStatus,
    /// Release whatever the status: the request never reached the upstream.
    Release,
    /// Complete as not replayable whatever the status: the upstream may have executed it
    /// and its answer is unknown (Envoy timeout or reset, the client went away).
    Unknown,
}

/// Where a response came from, by Envoy's `response.code_details`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// The upstream answered (`via_upstream`).
    Upstream,
    /// Envoy answered before the request was sent (no healthy host, connection failure,
    /// circuit breaker overflow, no route or cluster): the upstream never saw it.
    NeverSent(String),
    /// Envoy answered after the request may have reached the upstream (timeout, reset):
    /// the upstream may have executed it.
    Unknown(String),
}

impl Origin {
    fn classify(details: Option<&str>) -> Self {
        let Some(d) = details.filter(|d| !d.is_empty()) else {
            return Self::Upstream;
        };
        if d == "via_upstream" {
            return Self::Upstream;
        }
        let never_sent = [
            "no_healthy_upstream",
            "cluster_not_found",
            "route_not_found",
            "maintenance_mode",
            "direct_response",
        ]
        .iter()
        .any(|p| d.starts_with(p))
            || (d.starts_with("upstream_reset_before_response_started")
                && (d.contains("connection_failure") || d.contains("overflow")));
        if never_sent {
            Self::NeverSent(d.to_owned())
        } else {
            Self::Unknown(d.to_owned())
        }
    }
}

/// Envoy attribute holding why a response was sent (`via_upstream` for an upstream's).
const CODE_DETAILS: [&str; 2] = ["response", "code_details"];

/// Marks a header value that was not UTF-8 (see the glue's `read_map`).
pub const OPAQUE_VALUE_PREFIX: char = '\0';

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FinishKind {
    Complete,
    Release,
}

enum Phase {
    Start,
    PassThrough,
    Buffering(Pending),
    Claiming {
        route: Rc<Route>,
        record: RecordId,
        token: u32,
    },
    Forwarded(Forwarded),
    Capturing(Capture),
    Finishing {
        token: u32,
        kind: FinishKind,
        record: RecordId,
        /// Whether the response is held until the store answers.
        paused: bool,
    },
    Replaying {
        status: u16,
        headers: Vec<(String, String)>,
    },
    Answered,
    Done,
}

/// One HTTP stream's idempotency state.
pub struct Exchange {
    config: Option<Rc<Config>>,
    phase: Phase,
}

impl Exchange {
    /// A new stream. With `config` `None` (the plugin failed to configure) every request
    /// passes through.
    pub fn new(config: Option<Rc<Config>>) -> Self {
        Self {
            config,
            phase: Phase::Start,
        }
    }

    /// `on_http_request_headers`.
    pub fn on_request_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        let Some(config) = self.config.clone() else {
            self.phase = Phase::PassThrough;
            return Flow::Continue;
        };
        // Only the two pseudo-headers decide whether the request is protected; the whole
        // map is read for protected requests alone.
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        let Some(route) = config.route_for(&method, &path).cloned() else {
            self.phase = Phase::PassThrough;
            return Flow::Continue;
        };
        let headers = host.request_headers();
        host.count(Metric::Checked, 1);

        let keys: Vec<&str> = values(&headers, IDEMPOTENCY_KEY).collect();
        let key = match (keys.as_slice(), route.key) {
            ([], KeyRequirement::Optional) => {
                self.phase = Phase::PassThrough;
                return Flow::Continue;
            }
            ([], KeyRequirement::Required) => {
                let detail = format!("{method} {path} requires an Idempotency-Key header");
                return self.reject_request(host, &route, ProblemType::KeyMissing, detail, None);
            }
            ([one], _) => match parse_key(one) {
                Ok(k) => k,
                Err(detail) => {
                    return self.reject_request(
                        host,
                        &route,
                        ProblemType::KeyMalformed,
                        detail,
                        None,
                    )
                }
            },
            (many, _) => {
                let detail = format!(
                    "the request has {} Idempotency-Key fields; send exactly one",
                    many.len()
                );
                return self.reject_request(host, &route, ProblemType::KeyMalformed, detail, None);
            }
        };

        let scope = match scope_of(host, &route, &headers) {
            Ok(scope) => scope,
            Err(detail) => {
                return self.reject_request(
                    host,
                    &route,
                    ProblemType::ScopeMissing,
                    detail,
                    Some(&key),
                )
            }
        };

        if let Some(len) =
            header(&headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok())
        {
            if len > route.max_request_body_bytes {
                return self.too_large(host, &route, Some(&RecordId { scope, key }), len);
            }
        }

        let mut fingerprint = Fingerprint::new(&method, &path);
        for name in &route.fingerprint_headers {
            let mut any = false;
            for v in values(&headers, name) {
                fingerprint.header(name, v.as_bytes());
                any = true;
            }
            if !any {
                fingerprint.absent_header(name);
            }
        }
        let pending = Pending {
            route,
            record: RecordId { scope, key },
            method,
            path,
            fingerprint,
        };
        if end_of_stream {
            self.claim(host, pending, &[])
        } else {
            self.phase = Phase::Buffering(pending);
            Flow::Pause
        }
    }

    /// `on_http_request_body`. `body_size` is the size of the buffered body so far.
    pub fn on_request_body(
        &mut self,
        host: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Buffering(pending) => {
                if body_size as u64 > pending.route.max_request_body_bytes {
                    let route = pending.route.clone();
                    return self.too_large(host, &route, Some(&pending.record), body_size as u64);
                }
                if !end_of_stream {
                    self.phase = Phase::Buffering(pending);
                    return Flow::Pause;
                }
                let body = host.request_body(body_size);
                self.claim(host, pending, &body)
            }
            other => {
                self.phase = other;
                self.request_flow()
            }
        }
    }

    /// Request data after the decision: held while the claim is out or the filter answered
    /// the request itself (the upstream must see none of it), else passed on.
    fn request_flow(&self) -> Flow {
        match self.phase {
            Phase::Claiming { .. } | Phase::Answered | Phase::Replaying { .. } => Flow::Pause,
            _ => Flow::Continue,
        }
    }

    /// `on_http_request_trailers`: the request ends here if the body had no end flag.
    pub fn on_request_trailers(&mut self, host: &dyn Host) -> Flow {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Buffering(pending) => {
                let cap = pending.route.max_request_body_bytes;
                let body =
                    host.request_body(usize::try_from(cap).unwrap_or(usize::MAX).saturating_add(1));
                if body.len() as u64 > cap {
                    let route = pending.route.clone();
                    return self.too_large(host, &route, Some(&pending.record), body.len() as u64);
                }
                self.claim(host, pending, &body)
            }
            other => {
                self.phase = other;
                self.request_flow()
            }
        }
    }

    /// `on_http_call_response` for a store call.
    pub fn on_store_reply(&mut self, host: &dyn Host, token: u32, reply: StoreReply) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Claiming {
                route,
                record,
                token: t,
            } if t == token => self.on_claim_reply(host, route, record, reply),
            Phase::Finishing {
                token: t,
                kind,
                record,
                paused,
            } if t == token => {
                self.on_finish_reply(host, kind, &record, reply);
                if paused {
                    host.resume_response();
                }
            }
            other => {
                self.phase = other;
                host.log(
                    Level::Debug,
                    &format!("idemgate: store reply for unknown call {token} ignored"),
                );
            }
        }
    }

    /// `on_http_response_headers`.
    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Replaying { status, headers } => {
                // Envoy built the local reply's headers; make them exactly the stored ones.
                let current = host.response_headers();
                let mut exact = Vec::with_capacity(headers.len() + 3);
                exact.push((":status".to_owned(), status.to_string()));
                if let Some(len) = header(&current, "content-length") {
                    exact.push(("content-length".to_owned(), len.to_owned()));
                }
                exact.extend(headers);
                exact.push((REPLAYED_HEADER.to_owned(), "true".to_owned()));
                host.set_response_headers(&exact);
                Flow::Continue
            }
            Phase::Forwarded(fwd) => {
                let all = host.response_headers();
                let status = header(&all, ":status")
                    .and_then(|s| s.parse::<u16>().ok())
                    .unwrap_or(0);
                let declared =
                    header(&all, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
                let opaque = all
                    .iter()
                    .any(|(n, v)| v.starts_with(OPAQUE_VALUE_PREFIX) && fwd.route.stores_header(n));
                let headers = all
                    .into_iter()
                    .filter(|(n, _)| fwd.route.stores_header(n))
                    .collect();
                let details = host
                    .property(&CODE_DETAILS.map(str::to_owned))
                    .and_then(|v| String::from_utf8(v).ok());
                let mut capture = Capture {
                    fwd,
                    status,
                    headers,
                    body: Vec::new(),
                    replayable: true,
                    disposition: Disposition::ByStatus,
                };
                match Origin::classify(details.as_deref()) {
                    Origin::Upstream => {}
                    Origin::NeverSent(d) => {
                        host.log(Level::Debug, &format!("idemgate: Envoy answered {status} ({d}) before the request reached the upstream; releasing the key"));
                        capture.disposition = Disposition::Release;
                        return self.finish(host, capture, false);
                    }
                    Origin::Unknown(d) => {
                        host.count(Metric::Abandoned, 1);
                        let detail = format!("Envoy answered {status} ({d}) after the request may have reached the upstream; the outcome is unknown, so the key will not execute again");
                        host.log(
                            Level::Warn,
                            &format!(
                                "idemgate: route {} key {:?}: {detail}",
                                capture.fwd.route.name, capture.fwd.record.key
                            ),
                        );
                        capture.replayable = false;
                        capture.disposition = Disposition::Unknown;
                        return self.finish(host, capture, false);
                    }
                }
                if opaque {
                    // Replaying it would alter it: complete it as not replayable.
                    capture.replayable = false;
                    return self.finish(host, capture, false);
                }
                if declared.is_some_and(|len| len > capture.fwd.route.max_response_body_bytes) {
                    self.mark_over_cap(host, &mut capture);
                    return self.finish(host, capture, false);
                }
                if end_of_stream {
                    self.finish(host, capture, true)
                } else {
                    self.phase = Phase::Capturing(capture);
                    Flow::Continue
                }
            }
            other => {
                self.phase = other;
                Flow::Continue
            }
        }
    }

    /// `on_http_response_body`. The response is buffered in Envoy (`Pause`, so
    /// `body_size` is the whole body so far) until its end, because a client that has
    /// every byte may close the connection before the response is stored. A body over the
    /// cap is not stored: the record is completed as not replayable at once (before the
    /// client can have the whole body), then the body streams on unbuffered.
    pub fn on_response_body(
        &mut self,
        host: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Capturing(mut capture) => {
                if body_size as u64 > capture.fwd.route.max_response_body_bytes {
                    // Stored as not replayable now, then streamed on unbuffered: holding a
                    // large body would overflow Envoy's buffer and reset the stream.
                    self.mark_over_cap(host, &mut capture);
                    return self.finish(host, capture, false);
                }
                if end_of_stream {
                    capture.body = host.response_body(body_size);
                    return self.finish(host, capture, true);
                }
                self.phase = Phase::Capturing(capture);
                Flow::Pause
            }
            other => {
                self.phase = other;
                if matches!(self.phase, Phase::Finishing { paused: true, .. }) {
                    Flow::Pause
                } else {
                    Flow::Continue
                }
            }
        }
    }

    fn mark_over_cap(&self, host: &dyn Host, capture: &mut Capture) {
        host.count(Metric::BodyCapEvents, 1);
        let detail = format!(
            "the response exceeds {} bytes; it is passed on but will not be replayable",
            capture.fwd.route.max_response_body_bytes
        );
        capture.replayable = false;
        host.log(
            Level::Info,
            &format!(
                "idemgate: route {} key {:?}: {detail}",
                capture.fwd.route.name, capture.fwd.record.key
            ),
        );
        self.report(
            host,
            &capture.fwd.route,
            ReportKind::BodyCap,
            Some(&capture.fwd.record),
            detail,
        );
    }

    /// `on_http_response_trailers`: the response ends here.
    pub fn on_response_trailers(&mut self, host: &dyn Host) -> Flow {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Capturing(capture) => self.finish(host, capture, true),
            other => {
                self.phase = other;
                Flow::Continue
            }
        }
    }

    /// `on_done`: the stream is over. A request that went upstream but whose outcome was
    /// not recorded (the client went away, Envoy reset the stream mid-response) is recorded
    /// now: as not replayable (status 499 when no response had started), so a retry can
    /// never execute it a second time, as it could once the lock expired. The store call
    /// is detached, so it outlives the stream.
    pub fn on_done(&mut self, host: &dyn Host) {
        let capture = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Forwarded(fwd) => Capture {
                fwd,
                status: CLIENT_CLOSED_REQUEST,
                headers: Vec::new(),
                body: Vec::new(),
                replayable: false,
                disposition: Disposition::Unknown,
            },
            Phase::Capturing(mut capture) => {
                capture.replayable = false;
                capture
            }
            other => {
                self.phase = other;
                return;
            }
        };
        host.count(Metric::Abandoned, 1);
        host.log(
            Level::Warn,
            &format!(
                "idemgate: route {} key {:?}: the stream ended before the outcome was stored; recording it as not replayable so a retry cannot execute again",
                capture.fwd.route.name, capture.fwd.record.key
            ),
        );
        let _ = self.finish(host, capture, false);
    }

    /// Tells the server about a decision it did not see (fire-and-forget, detached so it
    /// outlives the stream; the answer is ignored). Off when `store.report_events` is false.
    fn report(
        &self,
        host: &dyn Host,
        route: &Route,
        kind: ReportKind,
        record: Option<&RecordId>,
        detail: String,
    ) {
        let (scope, key) = record.map_or((None, None), |r| {
            (Some(r.scope.as_str()), Some(r.key.as_str()))
        });
        self.report_key(host, route, kind, scope, key, detail);
    }

    /// [`Exchange::report`] when only part of the record is known (a rejected request).
    fn report_key(
        &self,
        host: &dyn Host,
        route: &Route,
        kind: ReportKind,
        scope: Option<&str>,
        key: Option<&str>,
        detail: String,
    ) {
        if !self.config.as_ref().is_some_and(|c| c.store.report_events) {
            return;
        }
        let report = FilterReport {
            kind,
            route: route.name.clone(),
            scope: scope.map(str::to_owned),
            key: key.map(str::to_owned),
            detail,
        };
        let call = StoreCall {
            path: REPORT_PATH,
            body: to_json(&report),
            detached: true,
        };
        if let Err(reason) = host.dispatch(call) {
            host.log(
                Level::Debug,
                &format!("idemgate: report not sent: {reason}"),
            );
        }
    }

    fn claim(&mut self, host: &dyn Host, pending: Pending, body: &[u8]) -> Flow {
        let Pending {
            route,
            record,
            method,
            path,
            fingerprint,
        } = pending;
        let request = ClaimRequest {
            fingerprint: fingerprint.finish_with_body(body, &route.body_mode),
            record,
            route: route.name.clone(),
            method,
            path,
            lock_ttl_ms: route.lock_ttl_ms,
        };
        let call = StoreCall {
            path: CLAIM_PATH,
            body: to_json(&request),
            detached: false,
        };
        let record = request.record;
        match host.dispatch(call) {
            Ok(token) => {
                self.phase = Phase::Claiming {
                    route,
                    record,
                    token,
                };
                Flow::Pause
            }
            Err(reason) => self.store_failed(
                host,
                &route,
                &record,
                &format!("claim could not be dispatched: {reason}"),
            ),
        }
    }

    fn on_claim_reply(
        &mut self,
        host: &dyn Host,
        route: Rc<Route>,
        record: RecordId,
        reply: StoreReply,
    ) {
        let outcome = match decode::<ClaimOutcome>(&reply) {
            Ok(o) => o,
            Err(reason) => {
                let failed = format!("claim failed: {reason}");
                if self.store_failed(host, &route, &record, &failed) == Flow::Continue {
                    host.resume_request();
                }
                return;
            }
        };
        let key = &record.key;
        match outcome {
            ClaimOutcome::Acquired { fencing_token } => {
                host.count(Metric::Acquired, 1);
                self.phase = Phase::Forwarded(Forwarded {
                    route,
                    record,
                    fencing_token,
                });
                host.resume_request();
            }
            ClaimOutcome::Replay { response } => {
                host.count(Metric::Replayed, 1);
                let StoredResponse {
                    status,
                    headers,
                    body,
                } = response;
                host.local_reply(status, &headers, &body);
                self.phase = Phase::Replaying { status, headers };
            }
            ClaimOutcome::InFlight { retry_after_ms } => {
                host.count(Metric::InFlightConflicts, 1);
                let secs = retry_after_ms.div_ceil(1000).max(1);
                let detail = format!("a request with Idempotency-Key {key:?} is still being processed; retry after {secs} s");
                self.reject(host, ProblemType::InFlight, detail, Some(secs));
            }
            ClaimOutcome::Mismatch => {
                host.count(Metric::Mismatches, 1);
                let detail = format!("Idempotency-Key {key:?} was already used with a different request (method, path, or body differ)");
                self.reject(host, ProblemType::KeyReused, detail, None);
            }
            ClaimOutcome::NotReplayable { status } => {
                host.count(Metric::NotReplayable, 1);
                let detail = format!("the request with Idempotency-Key {key:?} completed with status {status}, but its response was not stored (too large, or its outcome is unknown because the stream ended or Envoy answered for the upstream); it will not be executed again: use a new key after checking the result");
                self.reject(host, ProblemType::NotReplayable, detail, None);
            }
        }
    }

    /// The store could not answer: the route's failure mode decides.
    fn store_failed(
        &mut self,
        host: &dyn Host,
        route: &Route,
        record: &RecordId,
        reason: &str,
    ) -> Flow {
        host.count(Metric::StoreErrors, 1);
        match route.failure_mode {
            FailureMode::Closed => {
                host.log(
                    Level::Warn,
                    &format!(
                        "idemgate: route {}: {reason}; failing closed (503)",
                        route.name
                    ),
                );
                self.report(
                    host,
                    route,
                    ReportKind::StoreError,
                    Some(record),
                    format!("{reason}; failed closed (503)"),
                );
                self.reject(
                    host,
                    ProblemType::StoreUnavailable,
                    "the idempotency store did not answer; retry later".to_owned(),
                    Some(STORE_UNAVAILABLE_RETRY_AFTER_S),
                )
            }
            FailureMode::Open => {
                host.log(
                    Level::Warn,
                    &format!(
                        "idemgate: route {}: {reason}; failing open (forwarding unprotected)",
                        route.name
                    ),
                );
                host.count(Metric::FailOpenPasses, 1);
                self.report(
                    host,
                    route,
                    ReportKind::FailOpen,
                    Some(record),
                    format!("{reason}; forwarded unprotected"),
                );
                self.phase = Phase::PassThrough;
                Flow::Continue
            }
        }
    }

    fn too_large(
        &mut self,
        host: &dyn Host,
        route: &Route,
        record: Option<&RecordId>,
        size: u64,
    ) -> Flow {
        host.count(Metric::BodyCapEvents, 1);
        let detail = format!(
            "the request body has at least {size} bytes; route {} fingerprints at most {} bytes",
            route.name, route.max_request_body_bytes
        );
        self.report(host, route, ReportKind::BodyCap, record, detail.clone());
        self.reject(host, ProblemType::RequestTooLarge, detail, None)
    }

    /// A 400/401 for the request itself (key or scope), counted and reported.
    fn reject_request(
        &mut self,
        host: &dyn Host,
        route: &Route,
        kind: ProblemType,
        detail: String,
        key: Option<&str>,
    ) -> Flow {
        host.count(Metric::RejectedKeys, 1);
        self.report_key(host, route, ReportKind::Rejected, None, key, detail.clone());
        self.reject(host, kind, detail, None)
    }

    fn reject(
        &mut self,
        host: &dyn Host,
        kind: ProblemType,
        detail: String,
        retry_after_s: Option<u64>,
    ) -> Flow {
        let mut problem = Problem::new(kind, detail);
        let mut headers = vec![
            ("content-type".to_owned(), PROBLEM_JSON.to_owned()),
            ("cache-control".to_owned(), "no-store".to_owned()),
        ];
        if let Some(s) = retry_after_s {
            problem = problem.with_retry_after_s(s);
            headers.push(("retry-after".to_owned(), s.to_string()));
        }
        host.local_reply(kind.status(), &headers, &problem.to_json());
        self.phase = Phase::Answered;
        Flow::Pause
    }

    /// The outcome is known: store the response (`complete`, replayable or not) or give
    /// the key up (`release`). With `hold` the response waits for the store's answer.
    fn finish(&mut self, host: &dyn Host, capture: Capture, hold: bool) -> Flow {
        let Capture {
            fwd,
            status,
            headers,
            body,
            replayable,
            disposition,
        } = capture;
        let route = fwd.route.clone();
        let complete = match disposition {
            Disposition::ByStatus => route.store_statuses.stores(status),
            Disposition::Release => false,
            Disposition::Unknown => true,
        };
        let (kind, call) = if complete {
            let response = replayable.then_some(StoredResponse {
                status,
                headers,
                body,
            });
            let request = CompleteRequest {
                record: fwd.record.clone(),
                fencing_token: fwd.fencing_token,
                status,
                response,
                ttl_s: route.ttl_s,
            };
            (
                FinishKind::Complete,
                StoreCall {
                    path: COMPLETE_PATH,
                    body: to_json(&request),
                    detached: true,
                },
            )
        } else {
            let request = ReleaseRequest {
                record: fwd.record.clone(),
                fencing_token: fwd.fencing_token,
                status: Some(status),
            };
            (
                FinishKind::Release,
                StoreCall {
                    path: RELEASE_PATH,
                    body: to_json(&request),
                    detached: true,
                },
            )
        };
        match host.dispatch(call) {
            Ok(token) => {
                self.phase = Phase::Finishing {
                    token,
                    kind,
                    record: fwd.record,
                    paused: hold,
                };
                if hold {
                    Flow::Pause
                } else {
                    Flow::Continue
                }
            }
            Err(reason) => {
                host.count(Metric::StoreErrors, 1);
                let detail = format!(
                    "{kind:?} could not be dispatched ({reason}); the lock expires after {} ms",
                    route.lock_ttl_ms
                );
                host.log(
                    Level::Warn,
                    &format!(
                        "idemgate: route {} key {:?}: {detail}",
                        route.name, fwd.record.key
                    ),
                );
                self.report(
                    host,
                    &route,
                    ReportKind::StoreError,
                    Some(&fwd.record),
                    detail,
                );
                self.phase = Phase::Done;
                Flow::Continue
            }
        }
    }

    fn on_finish_reply(
        &mut self,
        host: &dyn Host,
        kind: FinishKind,
        record: &RecordId,
        reply: StoreReply,
    ) {
        let lost = match kind {
            FinishKind::Complete => {
                decode::<CompleteOutcome>(&reply).map(|o| o == CompleteOutcome::LockLost)
            }
            FinishKind::Release => {
                decode::<ReleaseOutcome>(&reply).map(|o| o == ReleaseOutcome::LockLost)
            }
        };
        match (lost, kind) {
            (Ok(false), FinishKind::Complete) => host.count(Metric::Completed, 1),
            (Ok(false), FinishKind::Release) => host.count(Metric::Released, 1),
            (Ok(true), _) => {
                host.count(Metric::LockLost, 1);
                host.log(Level::Warn, &format!(
                    "idemgate: {kind:?} for key {:?} refused: the lock expired or was released before the upstream answered (lock lost)",
                    record.key
                ));
            }
            (Err(reason), _) => {
                host.count(Metric::StoreErrors, 1);
                host.log(Level::Warn, &format!("idemgate: {kind:?} for key {:?} failed: {reason}; the lock expires by itself", record.key));
            }
        }
        self.phase = Phase::Done;
    }
}

/// The request's scope per its route, or why it has none (never a shared scope by accident).
fn scope_of(
    host: &dyn Host,
    route: &Route,
    headers: &[(String, String)],
) -> Result<String, String> {
    match &route.scope {
        ScopeSource::Global => Ok(GLOBAL_SCOPE.to_owned()),
        ScopeSource::Header(name) => {
            // Repeated fields are joined in order, so no part of the credential is ignored.
            let vals: Vec<&str> = values(headers, name).collect();
            // An empty credential is no credential: it must not become a shared scope.
            if vals.iter().all(|v| v.trim().is_empty()) {
                return Err(format!("route {} scopes idempotency keys by the {name} header, which the request lacks or sends empty", route.name));
            }
            Ok(scope_hash(&route.scope.label(), vals.join("\n").as_bytes()))
        }
        ScopeSource::Property(path) => match host.property(path) {
            Some(v) if !v.is_empty() => Ok(scope_hash(&route.scope.label(), &v)),
            _ => Err(format!(
                "route {} scopes idempotency keys by the attribute {}, which the request lacks",
                route.name,
                path.join(".")
            )),
        },
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn values<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Our wire types hold strings, integers and byte vectors only: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(reply: &StoreReply) -> Result<T, String> {
    match reply.status {
        None => Err("the store call failed or timed out".into()),
        Some(200) => {
            serde_json::from_slice(&reply.body).map_err(|e| format!("unreadable store answer: {e}"))
        }
        Some(status) => {
            let detail = serde_json::from_slice::<Problem>(&reply.body)
                .ok()
                .and_then(|p| p.detail)
                .unwrap_or_default();
            Err(format!("the store answered {status} {detail}"))
        }
    }
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;
