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
//!
//! detached execution (route `execution: detached`):
//!   Claiming ──acquired──► Detaching ──root turn──► Executing (upstream call owned by the root)
//!     ──upstream answer──► Delivering (complete/release sent) ──► Replaying (first answer,
//!     no marker) or Done when the client has gone; the root context keeps the exchange
//!     alive after the client's stream ends.
//! ```
//!
//! The upstream never sees a request the filter answers itself: request headers are held
//! (`allow_on_headers_stop_iteration`) until the claim says `acquired`.

use std::rc::Rc;

use idemgate_protocol::admin::{FilterReport, ReportKind, REPORT_PATH};
use idemgate_protocol::fingerprint::Fingerprint;
use idemgate_protocol::problem::PROBLEM_JSON;
use idemgate_protocol::{
    scope_hash, AfterUnknown, ClaimOutcome, ClaimRequest, CompleteOutcome, CompleteRequest,
    Problem, ProblemType, RecordId, ReleaseOutcome, ReleaseRequest, StoredResponse, CLAIM_PATH,
    COMPLETE_PATH, GLOBAL_SCOPE, RELEASE_PATH,
};
use serde::de::DeserializeOwned;

use crate::config::{
    is_hop_by_hop, Config, Execution, FailureMode, KeyRequirement, Route, ScopeSource,
};
use crate::host::{Host, Level, Metric, StoreCall, StoreReply, UpstreamCall};
use crate::key::parse_key;

/// The header that carries the key (IETF draft section 2).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The marker on replayed responses (Stripe's name).
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Status recorded for a request whose client went away before any response (nginx's 499).
pub const CLIENT_CLOSED_REQUEST: u16 = 499;
/// Status recorded for a detached execution whose upstream call failed or timed out.
pub const GATEWAY_TIMEOUT: u16 = 504;
/// Expected time to an answer before a route has measured any, ms (`Retry-After` rule).
pub const DEFAULT_USUAL_LATENCY_MS: u64 = 1_000;
/// Envoy attribute naming the cluster of the route the request matched.
const ROUTE_CLUSTER: [&str; 2] = ["xds", "cluster_name"];
/// First delay before retrying a failed `complete`/`release`, ms; doubled per retry.
pub const RETRY_FIRST_DELAY_MS: u64 = 100;
/// Longest delay between two retries of a `complete`/`release`, ms.
pub const RETRY_MAX_DELAY_MS: u64 = 2_000;
/// Tries of a claim when no store server answered, within the store timeout. Three, so
/// that with the templates' outlier detection (a host is ejected after two consecutive
/// local-origin failures) the last try reaches another server even if the load balancer
/// picked the dead one twice.
pub const CLAIM_TRIES: u32 = 3;
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
    /// Detached routes only: the request headers to send upstream.
    headers: Vec<(String, String)>,
}

/// A claim that is out (the parts of [`Phase::Claiming`] its answer needs).
struct PendingClaim {
    route: Rc<Route>,
    record: RecordId,
    fencing_token: String,
    upstream: Option<UpstreamCall>,
    call: StoreCall,
    tries: u32,
    first_sent_ms: u64,
}

/// A request that holds the lock and went upstream.
struct Forwarded {
    route: Rc<Route>,
    record: RecordId,
    fencing_token: String,
    /// When the lock was acquired, Unix ms (for the route's usual latency).
    started_ms: u64,
}

/// What a client waiting on a detached execution gets once its outcome is recorded.
enum Answer {
    /// The upstream's response, as the upstream sent it (hop-by-hop headers left out).
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A problem details answer (the outcome is unknown).
    Problem(ProblemType, String),
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
    /// Where a detached upstream call's answer came from. Envoy's HTTP async client does
    /// not expose `response.code_details`, so its own answers are told by their fixed
    /// bodies: `no healthy upstream` and a connection failure or overflow before headers
    /// never reached the upstream; `upstream request timeout` and any other reset may have.
    /// An upstream that sends exactly those bodies is taken for Envoy, which errs on the
    /// side of never executing twice.
    fn of_callout(status: u16, body: &[u8]) -> Self {
        let text = std::str::from_utf8(body).unwrap_or_default();
        match status {
            503 if text.starts_with("no healthy upstream") => Self::NeverSent(text.to_owned()),
            503 if text
                .starts_with("upstream connect error or disconnect/reset before headers") =>
            {
                if text.contains("connection failure") || text.contains("overflow") {
                    Self::NeverSent(text.to_owned())
                } else {
                    Self::Unknown(text.to_owned())
                }
            }
            504 if text.starts_with("upstream request timeout") => Self::Unknown(text.to_owned()),
            _ => Self::Upstream,
        }
    }

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
        /// The token this claim writes, so the lock can be given back without its answer.
        fencing_token: String,
        /// Detached routes: the upstream call to make once the claim is acquired.
        upstream: Option<UpstreamCall>,
        /// The claim call, kept for a retry on another store server.
        call: StoreCall,
        /// Tries so far, and when the first was sent (Unix ms).
        tries: u32,
        first_sent_ms: u64,
    },
    /// Detached: acquired, waiting for the root context to dispatch the upstream call.
    Detaching {
        fwd: Forwarded,
        call: UpstreamCall,
    },
    /// Detached: the upstream call is out.
    Executing {
        fwd: Forwarded,
        token: u32,
    },
    /// Detached: the outcome is being recorded; the client gets `answer` afterwards.
    Delivering {
        token: u32,
        call: StoreCall,
        kind: FinishKind,
        record: RecordId,
        deadline_ms: u64,
        answer: Answer,
    },
    Forwarded(Forwarded),
    Capturing(Capture),
    Finishing {
        token: u32,
        /// The call, kept for a retry.
        call: StoreCall,
        kind: FinishKind,
        record: RecordId,
        /// Until when the call is worth retrying (the lock's end), Unix ms.
        deadline_ms: u64,
        /// Whether the response is held until the store answers.
        paused: bool,
    },
    Replaying {
        status: u16,
        headers: Vec<(String, String)>,
        /// False for the first execution's own answer (a detached execution).
        replayed: bool,
    },
    Answered,
    Done,
}

/// One HTTP stream's idempotency state.
pub struct Exchange {
    config: Option<Rc<Config>>,
    phase: Phase,
    /// The client's stream has ended (`on_done`); only a detached execution goes on.
    client_gone: bool,
    /// The glue should call [`Exchange::on_root_turn`] from the root context.
    wants_root_turn: bool,
    /// A `complete`/`release` being retried from the root context (independent of the
    /// stream's phase: the client already has its answer).
    retry: Option<RetryJob>,
    /// The glue should give this exchange root ticks ([`Exchange::on_tick`]).
    wants_timer: bool,
}

/// A `complete` or `release` whose store call failed, retried with backoff from the root
/// context until it lands or the lock's end passes.
struct RetryJob {
    call: StoreCall,
    kind: FinishKind,
    record: RecordId,
    /// Retries dispatched so far.
    attempt: u32,
    deadline_ms: u64,
    /// When to dispatch next (Unix ms); meaningful while `token` is `None`.
    due_ms: u64,
    /// The retry in flight.
    token: Option<u32>,
}

impl Exchange {
    /// A new stream. With `config` `None` (the plugin failed to configure) every request
    /// passes through.
    pub fn new(config: Option<Rc<Config>>) -> Self {
        Self {
            config,
            phase: Phase::Start,
            client_gone: false,
            wants_root_turn: false,
            retry: None,
            wants_timer: false,
        }
    }

    /// Whether the glue must give this exchange root ticks ([`Exchange::on_tick`]); reading
    /// it clears it.
    pub fn take_timer_request(&mut self) -> bool {
        std::mem::take(&mut self.wants_timer)
    }

    /// Whether a retry waits for its time (the glue keeps ticking this exchange).
    pub fn waits_for_timer(&self) -> bool {
        self.retry.as_ref().is_some_and(|j| j.token.is_none())
    }

    /// A root tick: dispatches a due `complete`/`release` retry (from the root context, so
    /// its answer comes back through [`Exchange::awaiting_root_callout`]).
    pub fn on_tick(&mut self, host: &dyn Host) {
        let now = host.now_ms();
        let Some(job) = self.retry.as_mut() else {
            return;
        };
        if job.token.is_some() || now < job.due_ms {
            return;
        }
        host.count(Metric::CompletionRetries, 1);
        match host.dispatch(&job.call) {
            Ok(token) => job.token = Some(token),
            Err(reason) => {
                if let Some(job) = self.retry.take() {
                    host.log(
                        Level::Warn,
                        &format!("idemgate: {:?} retry not sent: {reason}", job.kind),
                    );
                    self.schedule_retry(host, job);
                }
            }
        }
    }

    /// Puts `job` back to wait for its next try, or gives up once the lock's end is near.
    fn schedule_retry(&mut self, host: &dyn Host, mut job: RetryJob) {
        let now = host.now_ms();
        let delay_ms = (RETRY_FIRST_DELAY_MS << job.attempt.min(8)).min(RETRY_MAX_DELAY_MS);
        if now.saturating_add(delay_ms) >= job.deadline_ms {
            host.count(Metric::CompletionAbandoned, 1);
            host.log(
                Level::Warn,
                &format!(
                    "idemgate: {:?} for key {:?} abandoned after {} retries: the lock has ended; the outcome reads as unknown",
                    job.kind, job.record.key, job.attempt
                ),
            );
            return;
        }
        job.attempt += 1;
        job.due_ms = now + delay_ms;
        job.token = None;
        self.retry = Some(job);
        self.wants_timer = true;
    }

    /// Whether the glue must give this exchange a root turn ([`Exchange::on_root_turn`]);
    /// reading it clears it.
    pub fn take_root_turn_request(&mut self) -> bool {
        std::mem::take(&mut self.wants_root_turn)
    }

    /// The callout a detached execution waits for, if any: the glue routes that token's
    /// answer (which arrives at the root context) back to this exchange.
    pub fn awaiting_root_callout(&self) -> Option<u32> {
        match self.phase {
            Phase::Executing { token, .. } | Phase::Delivering { token, .. } => Some(token),
            _ => self.retry.as_ref().and_then(|j| j.token),
        }
    }

    /// Whether the exchange still has work (the root context drops it when not).
    pub fn is_active(&self) -> bool {
        self.retry.is_some()
            || matches!(
                self.phase,
                Phase::Detaching { .. } | Phase::Executing { .. } | Phase::Delivering { .. }
            )
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
        let headers = if route.execution == Execution::Detached {
            headers
        } else {
            Vec::new()
        };
        let pending = Pending {
            route,
            record: RecordId { scope, key },
            method,
            path,
            fingerprint,
            headers,
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
            Phase::Claiming { .. }
            | Phase::Detaching { .. }
            | Phase::Executing { .. }
            | Phase::Delivering { .. }
            | Phase::Answered
            | Phase::Replaying { .. } => Flow::Pause,
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
        if self.retry.as_ref().and_then(|j| j.token) == Some(token) {
            if let Some(job) = self.retry.take() {
                if self.on_finish_reply(host, job.kind, &job.record, &reply) {
                    self.schedule_retry(host, job);
                }
            }
            return;
        }
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Claiming {
                route,
                record,
                token: t,
                fencing_token,
                upstream,
                call,
                tries,
                first_sent_ms,
            } if t == token => {
                let claim = PendingClaim {
                    route,
                    record,
                    fencing_token,
                    upstream,
                    call,
                    tries,
                    first_sent_ms,
                };
                self.on_claim_reply(host, claim, reply)
            }
            Phase::Executing { fwd, token: t } if t == token => {
                self.on_upstream_reply(host, fwd, reply)
            }
            Phase::Delivering {
                token: t,
                call,
                kind,
                record,
                deadline_ms,
                answer,
            } if t == token => {
                if self.on_finish_reply(host, kind, &record, &reply) {
                    self.start_retry(host, call, kind, record, deadline_ms);
                }
                // The client gets its answer now; a retry lands in the background.
                self.deliver(host, answer);
            }
            Phase::Finishing {
                token: t,
                call,
                kind,
                record,
                deadline_ms,
                paused,
            } if t == token => {
                if self.on_finish_reply(host, kind, &record, &reply) {
                    self.start_retry(host, call, kind, record, deadline_ms);
                }
                self.phase = Phase::Done;
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
            Phase::Replaying {
                status,
                headers,
                replayed,
            } => {
                // Envoy built the local reply's headers; make them exactly the stored ones.
                let current = host.response_headers();
                let mut exact = Vec::with_capacity(headers.len() + 3);
                exact.push((":status".to_owned(), status.to_string()));
                if let Some(len) = header(&current, "content-length") {
                    exact.push(("content-length".to_owned(), len.to_owned()));
                }
                exact.extend(headers);
                if replayed {
                    exact.push((REPLAYED_HEADER.to_owned(), "true".to_owned()));
                }
                host.set_response_headers(&exact);
                Flow::Continue
            }
            Phase::Forwarded(fwd) => {
                observe_latency(&fwd.route, host.now_ms().saturating_sub(fwd.started_ms));
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

    /// `on_done`: the stream is over.
    ///
    /// - A claim still out: the request never left Envoy, so its lock is given back at
    ///   once (`release` with the claim's own fencing token; if the release overtakes the
    ///   claim, the claim finds its tombstone and writes nothing).
    /// - Forwarded through the router but not recorded (the client went away, Envoy reset
    ///   the stream mid-response): the upstream may have executed it, so it is recorded as
    ///   an unknown outcome (status 499) when no response had started, which the route's
    ///   `unknown_outcome` policy governs; never a silent re-execution. When the response
    ///   had started, its status decides as usual, but its body is not replayable.
    /// - A detached execution goes on without the client: its response is stored for the
    ///   retry.
    ///
    /// Store calls made here are detached, so they outlive the stream.
    pub fn on_done(&mut self, host: &dyn Host) {
        self.client_gone = true;
        let capture = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Claiming {
                route,
                record,
                fencing_token,
                ..
            } => {
                host.count(Metric::EarlyReleases, 1);
                host.log(
                    Level::Debug,
                    &format!(
                        "idemgate: route {} key {:?}: the client left before the claim answered; releasing the lock",
                        route.name, record.key
                    ),
                );
                let call = release_call(&record, fencing_token, None);
                if let Err(reason) = host.dispatch(&call) {
                    host.log(
                        Level::Warn,
                        &format!("idemgate: early release not sent: {reason}"),
                    );
                }
                return;
            }
            Phase::Forwarded(fwd) => Capture {
                fwd,
                status: CLIENT_CLOSED_REQUEST,
                headers: Vec::new(),
                body: Vec::new(),
                replayable: false,
                disposition: Disposition::Unknown,
            },
            // The status is the upstream's own; only the body is incomplete.
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
                "idemgate: route {} key {:?}: the stream ended before the outcome was stored; recording an unknown outcome",
                capture.fwd.route.name, capture.fwd.record.key
            ),
        );
        let _ = self.finish(host, capture, false);
    }

    /// Detached execution: called by the glue from the root context after
    /// [`Exchange::take_root_turn_request`]; dispatches the upstream call there, so it is
    /// owned by the root and survives the client's stream.
    pub fn on_root_turn(&mut self, host: &dyn Host) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Detaching { fwd, call } => {
                let cluster = call.cluster.clone();
                match host.dispatch_upstream(call) {
                    Ok(token) => {
                        host.count(Metric::DetachedExecutions, 1);
                        self.phase = Phase::Executing { fwd, token };
                    }
                    Err(reason) => {
                        // Never sent: give the key back and tell the client.
                        let detail = format!(
                            "the detached upstream call to cluster {cluster:?} could not be dispatched: {reason}"
                        );
                        host.log(
                            Level::Error,
                            &format!("idemgate: route {}: {detail}", fwd.route.name),
                        );
                        let answer = Answer::Response {
                            status: 503,
                            headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
                            body: b"idemgate: the upstream cannot be called".to_vec(),
                        };
                        self.record_detached(host, fwd, 503, Outcome::Release, answer);
                    }
                }
            }
            other => self.phase = other,
        }
    }

    /// Detached execution: the upstream call answered (or failed: zero headers).
    fn on_upstream_reply(&mut self, host: &dyn Host, fwd: Forwarded, reply: StoreReply) {
        observe_latency(&fwd.route, host.now_ms().saturating_sub(fwd.started_ms));
        let StoreReply {
            status,
            headers,
            body,
        } = reply;
        let Some(status) = status else {
            return self.unknown_detached(
                host,
                fwd,
                "the upstream call failed or timed out after the request was sent",
            );
        };
        match Origin::of_callout(status, &body) {
            Origin::Upstream => {}
            Origin::NeverSent(d) => {
                host.log(Level::Debug, &format!("idemgate: Envoy answered {status} ({d}) before the request reached the upstream; releasing the key"));
                let answer = Answer::Response {
                    status,
                    headers: forwardable(headers),
                    body,
                };
                return self.record_detached(host, fwd, status, Outcome::Release, answer);
            }
            Origin::Unknown(d) => {
                let detail = format!(
                    "Envoy answered {status} ({d}) after the request may have reached the upstream"
                );
                return self.unknown_detached(host, fwd, &detail);
            }
        }
        let route = fwd.route.clone();
        let headers = forwardable(headers);
        let opaque = headers
            .iter()
            .any(|(n, v)| v.starts_with(OPAQUE_VALUE_PREFIX) && route.stores_header(n));
        let over_cap = body.len() as u64 > route.max_response_body_bytes;
        if over_cap {
            host.count(Metric::BodyCapEvents, 1);
            let detail = format!(
                "the response has {} bytes, over the cap of {}; it is delivered but will not be replayable",
                body.len(),
                route.max_response_body_bytes
            );
            self.report(host, &route, ReportKind::BodyCap, Some(&fwd.record), detail);
        }
        let outcome = if route.store_statuses.stores(status) {
            Outcome::Store((!opaque && !over_cap).then(|| {
                StoredResponse {
                    status,
                    headers: headers
                        .iter()
                        .filter(|(n, _)| route.stores_header(n))
                        .cloned()
                        .collect(),
                    body: body.clone(),
                }
            }))
        } else {
            Outcome::Release
        };
        // A header that is not UTF-8 cannot be sent on as it was: leave it out.
        let headers = headers
            .into_iter()
            .filter(|(_, v)| !v.starts_with(OPAQUE_VALUE_PREFIX))
            .collect();
        let answer = Answer::Response {
            status,
            headers,
            body,
        };
        self.record_detached(host, fwd, status, outcome, answer);
    }

    /// Detached execution whose outcome is unknown: recorded as such, and a waiting
    /// client gets 504 problem details.
    fn unknown_detached(&mut self, host: &dyn Host, fwd: Forwarded, detail: &str) {
        host.count(Metric::Abandoned, 1);
        host.log(
            Level::Warn,
            &format!(
                "idemgate: route {} key {:?}: {detail}; recording an unknown outcome",
                fwd.route.name, fwd.record.key
            ),
        );
        let answer = Answer::Problem(
            ProblemType::UpstreamOutcomeUnknown,
            format!("{detail}; the outcome of the request is unknown. A retry with the same Idempotency-Key gets the route's unknown-outcome answer"),
        );
        self.record_detached(host, fwd, GATEWAY_TIMEOUT, Outcome::Unknown, answer);
    }

    /// Records a detached execution's outcome, then answers the client (if still there)
    /// once the store has answered.
    fn record_detached(
        &mut self,
        host: &dyn Host,
        fwd: Forwarded,
        status: u16,
        outcome: Outcome,
        answer: Answer,
    ) {
        let (call, kind) = outcome_call(&fwd, status, outcome);
        let deadline_ms = fwd.started_ms.saturating_add(fwd.route.lock_ttl_ms);
        match host.dispatch(&call) {
            Ok(token) => {
                self.phase = Phase::Delivering {
                    token,
                    call,
                    kind,
                    record: fwd.record,
                    deadline_ms,
                    answer,
                };
            }
            Err(reason) => {
                self.store_call_not_sent(host, &fwd, &format!("{kind:?}: {reason}"));
                self.start_retry(host, call, kind, fwd.record.clone(), deadline_ms);
                self.deliver(host, answer);
            }
        }
    }

    /// Gives a detached execution's answer to its client, or ends when the client left.
    fn deliver(&mut self, host: &dyn Host, answer: Answer) {
        if self.client_gone {
            host.count(Metric::DetachedClientGone, 1);
            self.phase = Phase::Done;
            return;
        }
        match answer {
            Answer::Response {
                status,
                headers,
                body,
            } => {
                host.local_reply(status, &headers, &body);
                self.phase = Phase::Replaying {
                    status,
                    headers,
                    replayed: false,
                };
            }
            Answer::Problem(kind, detail) => {
                let _ = self.reject(host, kind, detail, None);
            }
        }
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
        if let Err(reason) = host.dispatch(&call) {
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
            headers,
        } = pending;
        let upstream = if route.execution == Execution::Detached {
            upstream_call(host, &route, headers, body)
        } else {
            None
        };
        let fencing_token = host.new_fencing_token();
        let request = ClaimRequest {
            fingerprint: fingerprint.finish_with_body(body, &route.body_mode),
            record,
            route: route.name.clone(),
            method,
            path,
            lock_ttl_ms: route.lock_ttl_ms,
            fencing_token: Some(fencing_token.clone()),
            unknown_outcome: Some(route.unknown_outcome),
        };
        let call = StoreCall {
            path: CLAIM_PATH,
            body: to_json(&request),
            detached: false,
        };
        let record = request.record;
        match host.dispatch(&call) {
            Ok(token) => {
                self.phase = Phase::Claiming {
                    route,
                    record,
                    token,
                    fencing_token,
                    upstream,
                    call,
                    tries: 1,
                    first_sent_ms: host.now_ms(),
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

    fn on_claim_reply(&mut self, host: &dyn Host, claim: PendingClaim, reply: StoreReply) {
        // No store server answered (connection failure, or Envoy's own 503: a server's
        // answer is problem JSON): try again, same fencing token, so another server of
        // the cluster takes it; a claim that did run answers `acquired` again.
        let unanswered = reply
            .status
            .is_none_or(|s| s >= 500 && serde_json::from_slice::<Problem>(&reply.body).is_err());
        let timeout_ms = self.config.as_ref().map_or(0, |c| c.store.timeout_ms);
        if unanswered
            && claim.tries < CLAIM_TRIES
            && host.now_ms().saturating_sub(claim.first_sent_ms) < timeout_ms
        {
            host.count(Metric::ClaimRetries, 1);
            if let Ok(token) = host.dispatch(&claim.call) {
                self.phase = Phase::Claiming {
                    token,
                    tries: claim.tries + 1,
                    route: claim.route,
                    record: claim.record,
                    fencing_token: claim.fencing_token,
                    upstream: claim.upstream,
                    call: claim.call,
                    first_sent_ms: claim.first_sent_ms,
                };
                return;
            }
        }
        let PendingClaim {
            route,
            record,
            fencing_token,
            upstream,
            ..
        } = claim;
        let outcome = match decode::<ClaimOutcome>(&reply) {
            Ok(ClaimOutcome::Released) => Err("the claim ran after its own release".to_owned()),
            Ok(o) => Ok(o),
            Err(reason) => Err(reason),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(reason) => {
                // The claim may have run with its answer lost: give its lock back (a
                // tombstone makes a claim that runs even later write nothing).
                let _ = host.dispatch(&release_call(&record, fencing_token, None));
                let failed = format!("claim failed: {reason}");
                if self.store_failed(host, &route, &record, &failed) == Flow::Continue {
                    host.resume_request();
                }
                return;
            }
        };
        let outcome = match outcome {
            // A stored status Envoy cannot send (the server refuses one when storing, but
            // Redis may hold a record another writer made): the request did complete, so
            // it must not run again, and it cannot be replayed.
            ClaimOutcome::Replay { response } if !(100..=599).contains(&response.status) => {
                host.log(
                    Level::Warn,
                    &format!(
                        "idemgate: the stored response of key {:?} has status {}, which cannot be replayed; answering not-replayable",
                        record.key, response.status
                    ),
                );
                ClaimOutcome::NotReplayable {
                    status: response.status,
                }
            }
            o => o,
        };
        let key = &record.key;
        match outcome {
            ClaimOutcome::Acquired { fencing_token } => {
                host.count(Metric::Acquired, 1);
                let fwd = Forwarded {
                    route,
                    record,
                    fencing_token,
                    started_ms: host.now_ms(),
                };
                if let Some(call) = upstream {
                    self.phase = Phase::Detaching { fwd, call };
                    self.wants_root_turn = true;
                } else {
                    self.phase = Phase::Forwarded(fwd);
                    host.resume_request();
                }
            }
            ClaimOutcome::Replay { response } => {
                host.count(Metric::Replayed, 1);
                let StoredResponse {
                    status,
                    headers,
                    body,
                } = response;
                host.local_reply(status, &headers, &body);
                self.phase = Phase::Replaying {
                    status,
                    headers,
                    replayed: true,
                };
            }
            ClaimOutcome::InFlight {
                retry_after_ms,
                age_ms,
            } => {
                host.count(Metric::InFlightConflicts, 1);
                let secs = in_flight_retry_after_s(&route, retry_after_ms, age_ms);
                let detail = format!("a request with Idempotency-Key {key:?} is still being processed; retry after {secs} s");
                self.reject(host, ProblemType::InFlight, detail, Some(secs));
            }
            ClaimOutcome::Unknown {
                retry_after_ms: Some(ms),
            } => {
                host.count(Metric::NotReplayable, 1);
                let secs = ms.div_ceil(1000).max(1);
                let then = match route.unknown_outcome.then {
                    AfterUnknown::Reexecute => "the next retry executes the request again",
                    AfterUnknown::Refuse => "retries are refused until the key expires",
                };
                let detail = format!("the outcome of the request with Idempotency-Key {key:?} is unknown: it may have reached the upstream, but no response was stored. If the first execution's answer is stored within {secs} s, a retry gets it; otherwise {then}");
                self.reject(host, ProblemType::OutcomeUnknown, detail, Some(secs));
            }
            ClaimOutcome::Unknown {
                retry_after_ms: None,
            } => {
                host.count(Metric::NotReplayable, 1);
                let detail = format!("the outcome of the request with Idempotency-Key {key:?} is unknown and this route does not execute it again; check whether it took effect, then use a new key");
                self.reject(host, ProblemType::OutcomeUnknownRefused, detail, None);
            }
            ClaimOutcome::Mismatch => {
                host.count(Metric::Mismatches, 1);
                let detail = format!("Idempotency-Key {key:?} was already used with a different request (method, path, or body differ)");
                self.reject(host, ProblemType::KeyReused, detail, None);
            }
            ClaimOutcome::NotReplayable { status } => {
                host.count(Metric::NotReplayable, 1);
                let detail = format!("the request with Idempotency-Key {key:?} completed with status {status}, but its response was not stored (larger than the route's response cap, or a header value that cannot be replayed faithfully); it will not be executed again: use a new key after checking the result");
                self.reject(host, ProblemType::NotReplayable, detail, None);
            }
            ClaimOutcome::Released => {}
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

    /// The outcome is settled: store the response (`complete`, replayable or not), record
    /// it as unknown, or give the key up (`release`). With `hold` the response waits for
    /// the store's answer.
    fn finish(&mut self, host: &dyn Host, capture: Capture, hold: bool) -> Flow {
        let Capture {
            fwd,
            status,
            headers,
            body,
            replayable,
            disposition,
        } = capture;
        let outcome = match disposition {
            Disposition::ByStatus if fwd.route.store_statuses.stores(status) => {
                Outcome::Store(replayable.then_some(StoredResponse {
                    status,
                    headers,
                    body,
                }))
            }
            Disposition::ByStatus | Disposition::Release => Outcome::Release,
            Disposition::Unknown => Outcome::Unknown,
        };
        let (call, kind) = outcome_call(&fwd, status, outcome);
        let deadline_ms = fwd.started_ms.saturating_add(fwd.route.lock_ttl_ms);
        match host.dispatch(&call) {
            Ok(token) => {
                self.phase = Phase::Finishing {
                    token,
                    call,
                    kind,
                    record: fwd.record,
                    deadline_ms,
                    paused: hold,
                };
                if hold {
                    Flow::Pause
                } else {
                    Flow::Continue
                }
            }
            Err(reason) => {
                self.store_call_not_sent(host, &fwd, &format!("{kind:?}: {reason}"));
                self.start_retry(host, call, kind, fwd.record, deadline_ms);
                self.phase = Phase::Done;
                Flow::Continue
            }
        }
    }

    /// A `complete`/`release` that could not be dispatched: counted, logged, reported.
    fn store_call_not_sent(&self, host: &dyn Host, fwd: &Forwarded, reason: &str) {
        host.count(Metric::StoreErrors, 1);
        let detail = format!(
            "recording the outcome could not be dispatched ({reason}); retrying until the lock ends ({} ms after the claim)",
            fwd.route.lock_ttl_ms
        );
        host.log(
            Level::Warn,
            &format!(
                "idemgate: route {} key {:?}: {detail}",
                fwd.route.name, fwd.record.key
            ),
        );
        self.report(
            host,
            &fwd.route,
            ReportKind::StoreError,
            Some(&fwd.record),
            detail,
        );
    }

    /// Counts and logs a `complete`/`release` answer; true when it failed in a way worth
    /// retrying (no answer, or a 5xx: the store server or Redis was unavailable).
    fn on_finish_reply(
        &mut self,
        host: &dyn Host,
        kind: FinishKind,
        record: &RecordId,
        reply: &StoreReply,
    ) -> bool {
        let lost = match kind {
            FinishKind::Complete => {
                decode::<CompleteOutcome>(reply).map(|o| o == CompleteOutcome::LockLost)
            }
            FinishKind::Release => {
                decode::<ReleaseOutcome>(reply).map(|o| o == ReleaseOutcome::LockLost)
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
                let retry = reply.status.is_none_or(|s| s >= 500);
                host.log(
                    Level::Warn,
                    &format!(
                        "idemgate: {kind:?} for key {:?} failed: {reason}; {}",
                        record.key,
                        if retry {
                            "retrying until the lock ends"
                        } else {
                            "not retried"
                        }
                    ),
                );
                return retry;
            }
        }
        false
    }

    fn start_retry(
        &mut self,
        host: &dyn Host,
        call: StoreCall,
        kind: FinishKind,
        record: RecordId,
        deadline_ms: u64,
    ) {
        let job = RetryJob {
            call,
            kind,
            record,
            attempt: 0,
            deadline_ms,
            due_ms: 0,
            token: None,
        };
        self.schedule_retry(host, job);
    }
}

/// What `complete` or `release` records.
enum Outcome {
    /// `complete`: the response (`None`: not replayable, e.g. over the cap).
    Store(Option<StoredResponse>),
    /// `complete` with `outcome_unknown`: the request may have reached the upstream.
    Unknown,
    /// `release`: the key is given back; a retry executes.
    Release,
}

/// The store call that records `outcome` for `fwd` (detached: it outlives the stream).
fn outcome_call(fwd: &Forwarded, status: u16, outcome: Outcome) -> (StoreCall, FinishKind) {
    match outcome {
        Outcome::Release => (
            release_call(&fwd.record, fwd.fencing_token.clone(), Some(status)),
            FinishKind::Release,
        ),
        Outcome::Store(response) => (
            complete_call(fwd, status, response, false),
            FinishKind::Complete,
        ),
        Outcome::Unknown => (complete_call(fwd, status, None, true), FinishKind::Complete),
    }
}

fn complete_call(
    fwd: &Forwarded,
    status: u16,
    response: Option<StoredResponse>,
    outcome_unknown: bool,
) -> StoreCall {
    let request = CompleteRequest {
        record: fwd.record.clone(),
        fencing_token: fwd.fencing_token.clone(),
        status,
        response,
        ttl_s: fwd.route.ttl_s,
        outcome_unknown,
    };
    StoreCall {
        path: COMPLETE_PATH,
        body: to_json(&request),
        detached: true,
    }
}

/// A detached `release` of the lock `fencing_token` holds on `record`.
fn release_call(record: &RecordId, fencing_token: String, status: Option<u16>) -> StoreCall {
    let request = ReleaseRequest {
        record: record.clone(),
        fencing_token,
        status,
    };
    StoreCall {
        path: RELEASE_PATH,
        body: to_json(&request),
        detached: true,
    }
}

/// The upstream call of a detached execution: the request's headers without hop-by-hop
/// ones (Envoy frames the body itself), to the route's cluster. `None` when no cluster is
/// known (then the request goes through the router, logged).
fn upstream_call(
    host: &dyn Host,
    route: &Route,
    headers: Vec<(String, String)>,
    body: &[u8],
) -> Option<UpstreamCall> {
    let cluster = route.upstream_cluster.clone().or_else(|| {
        host.property(&ROUTE_CLUSTER.map(str::to_owned))
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|c| !c.is_empty())
    });
    let Some(cluster) = cluster else {
        host.log(Level::Warn, &format!("idemgate: route {}: no upstream cluster for a detached execution (set upstream_cluster, or match an Envoy route with a cluster); forwarding through the router", route.name));
        return None;
    };
    let headers = headers
        .into_iter()
        .filter(|(n, _)| {
            matches!(n.as_str(), ":method" | ":path" | ":authority") || !is_hop_by_hop(n)
        })
        .collect();
    Some(UpstreamCall {
        cluster,
        headers,
        body: body.to_vec(),
        timeout_ms: route.upstream_timeout_ms,
    })
}

/// A callout's response headers as a client may get them: no pseudo-headers, no
/// hop-by-hop headers (Envoy frames the local reply itself).
fn forwardable(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter(|(n, _)| !is_hop_by_hop(n))
        .collect()
}

/// Folds one execution's latency (claim acquired to response) into the route's usual
/// latency: an exponentially weighted moving average with weight 1/8.
fn observe_latency(route: &Route, sample_ms: u64) {
    let old = route.usual_latency_ms.get();
    let new = if old == 0 {
        sample_ms.max(1)
    } else {
        (old.saturating_mul(7).saturating_add(sample_ms) / 8).max(1)
    };
    route.usual_latency_ms.set(new);
}

/// `Retry-After` of a 409 in-flight, seconds: when the first execution's answer should be
/// ready, from the route's usual latency (per worker; [`DEFAULT_USUAL_LATENCY_MS`] before
/// any sample) minus how long the lock has been held, rounded up, at least 1 s and at most
/// the lock's remaining time (after which the answer is certain to be known or unknown).
pub fn in_flight_retry_after_s(route: &Route, lock_remaining_ms: u64, age_ms: u64) -> u64 {
    let usual = match route.usual_latency_ms.get() {
        0 => DEFAULT_USUAL_LATENCY_MS,
        ms => ms,
    };
    let expected_s = usual.saturating_sub(age_ms).div_ceil(1000).max(1);
    expected_s.min(lock_remaining_ms.div_ceil(1000).max(1))
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
