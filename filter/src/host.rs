//! What the decision logic needs from Envoy, as a trait: the wasm glue implements it
//! with proxy-wasm hostcalls, the unit tests with a recording test double.
//!
//! Every method is infallible from the logic's point of view: the glue maps a failed
//! hostcall to "absent" (`None`, empty) or logs it, because a trapped VM stays broken.

/// Log levels the logic uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Per-request detail.
    Debug,
    /// Lifecycle facts.
    Info,
    /// Something an operator should look at (lock lost, store error).
    Warn,
    /// A fault in the filter or its configuration.
    Error,
}

/// Counters the filter exports as Envoy stats (`define_metric`, counter type).
///
/// Envoy shows them as `idemgate.<name>` (see [`Metric::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Requests that matched a protected route and method.
    Checked,
    /// Claims acquired: the request went upstream as the one execution.
    Acquired,
    /// Stored responses replayed.
    Replayed,
    /// 409 answers: the key is in flight.
    InFlightConflicts,
    /// 422 answers: the key was used with another request.
    Mismatches,
    /// 400/401 answers: missing or malformed key, or missing scope.
    RejectedKeys,
    /// Store calls that failed, timed out or answered something unexpected.
    StoreErrors,
    /// Requests forwarded unprotected because the store failed on a fail-open route.
    FailOpenPasses,
    /// Request bodies over the cap (413) and response bodies over the cap (not stored).
    BodyCapEvents,
    /// Responses stored (`complete` answered completed).
    Completed,
    /// Keys released after an unstored status (`release` answered released).
    Released,
    /// `complete`/`release` refused because the fencing token was no longer current.
    LockLost,
    /// 409 answers for a completed key whose response was not stored.
    NotReplayable,
    /// Requests that reached the upstream but whose outcome is unknown (the client went
    /// away, Envoy timed out or reset the stream, a detached upstream call failed):
    /// recorded as unknown outcomes, which the route's `unknown_outcome` policy governs.
    Abandoned,
    /// Protected requests executed detached from the client's stream.
    DetachedExecutions,
    /// Detached executions whose client had gone when the response arrived: stored for
    /// the retry to replay.
    DetachedClientGone,
    /// Locks given back at once because the client left before the claim answered (the
    /// request never left Envoy).
    EarlyReleases,
    /// Claims sent a second time because no store server answered the first.
    ClaimRetries,
    /// `complete`/`release` calls retried from the root context after a failure.
    CompletionRetries,
    /// `complete`/`release` calls given up because the lock ended first (the record then
    /// reads as an unknown outcome).
    CompletionAbandoned,
}

impl Metric {
    /// Every metric, in the order they are defined with Envoy.
    pub const ALL: [Metric; 20] = [
        Self::Checked,
        Self::Acquired,
        Self::Replayed,
        Self::InFlightConflicts,
        Self::Mismatches,
        Self::RejectedKeys,
        Self::StoreErrors,
        Self::FailOpenPasses,
        Self::BodyCapEvents,
        Self::Completed,
        Self::Released,
        Self::LockLost,
        Self::NotReplayable,
        Self::Abandoned,
        Self::DetachedExecutions,
        Self::DetachedClientGone,
        Self::EarlyReleases,
        Self::ClaimRetries,
        Self::CompletionRetries,
        Self::CompletionAbandoned,
    ];

    /// Position in [`Metric::ALL`] (the declaration order).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The Envoy stat name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Checked => "idemgate.checked",
            Self::Acquired => "idemgate.acquired",
            Self::Replayed => "idemgate.replayed",
            Self::InFlightConflicts => "idemgate.in_flight_conflicts",
            Self::Mismatches => "idemgate.mismatches",
            Self::RejectedKeys => "idemgate.rejected_keys",
            Self::StoreErrors => "idemgate.store_errors",
            Self::FailOpenPasses => "idemgate.fail_open_passes",
            Self::BodyCapEvents => "idemgate.body_cap_events",
            Self::Completed => "idemgate.completed",
            Self::Released => "idemgate.released",
            Self::LockLost => "idemgate.lock_lost",
            Self::NotReplayable => "idemgate.not_replayable",
            Self::Abandoned => "idemgate.abandoned",
            Self::DetachedExecutions => "idemgate.detached_executions",
            Self::DetachedClientGone => "idemgate.detached_client_gone",
            Self::EarlyReleases => "idemgate.early_releases",
            Self::ClaimRetries => "idemgate.claim_retries",
            Self::CompletionRetries => "idemgate.completion_retries",
            Self::CompletionAbandoned => "idemgate.completion_abandoned",
        }
    }
}

/// One store call to dispatch (`POST` to the store cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    /// Store API path, e.g. [`idemgate_protocol::CLAIM_PATH`].
    pub path: &'static str,
    /// JSON body.
    pub body: Vec<u8>,
    /// Whether the call must outlive the HTTP stream (dispatched from the root context):
    /// true for `complete` and `release`, so a client that disconnects while the response
    /// is being stored cannot cancel the store write.
    pub detached: bool,
}

/// A callout's answer (a store call or a detached upstream call) as the glue read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReply {
    /// The HTTP status, or `None` when the call failed or timed out (Envoy delivers
    /// such a callout with zero headers).
    pub status: Option<u16>,
    /// The response headers in order, pseudo-headers included (values as in
    /// [`Host::request_headers`]); empty when the call failed.
    pub headers: Vec<(String, String)>,
    /// The body bytes (empty when none).
    pub body: Vec<u8>,
}

/// The upstream call of a detached execution (see `config::Execution::Detached`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCall {
    /// Envoy cluster to call.
    pub cluster: String,
    /// Request headers in order, pseudo-headers (`:method`, `:path`, `:authority`)
    /// included, hop-by-hop headers left out.
    pub headers: Vec<(String, String)>,
    /// The buffered request body.
    pub body: Vec<u8>,
    /// How long the upstream may take, milliseconds.
    pub timeout_ms: u64,
}

/// The host operations the per-request logic uses.
pub trait Host {
    /// All request headers in order (names lowercase, pseudo-headers included).
    fn request_headers(&self) -> Vec<(String, String)>;
    /// One request header's (first) value, `None` when absent; cheaper than the whole map.
    fn request_header(&self, name: &str) -> Option<String>;
    /// The buffered request body, up to `max_bytes`.
    fn request_body(&self, max_bytes: usize) -> Vec<u8>;
    /// All response headers in order.
    fn response_headers(&self) -> Vec<(String, String)>;
    /// Replaces the response headers (used to make a replay byte-faithful).
    fn set_response_headers(&self, headers: &[(String, String)]);
    /// The current response body chunk, up to `max_bytes`.
    fn response_body(&self, max_bytes: usize) -> Vec<u8>;
    /// An Envoy attribute (`get_property`), `None` when absent.
    fn property(&self, path: &[String]) -> Option<Vec<u8>>;
    /// Dispatches a store call; returns its token.
    ///
    /// # Errors
    /// The host refused the call (unknown cluster, bad arguments): a reason for the log.
    fn dispatch(&self, call: &StoreCall) -> Result<u32, String>;
    /// Resumes a request paused in a request callback.
    fn resume_request(&self);
    /// Resumes a response paused in a response callback.
    fn resume_response(&self);
    /// Answers the request locally; the upstream never sees it.
    fn local_reply(&self, status: u16, headers: &[(String, String)], body: &[u8]);
    /// Dispatches the upstream call of a detached execution, owned by the root context so
    /// that the end of the client's stream does not cancel it. Only called from
    /// `Exchange::on_root_turn`.
    ///
    /// # Errors
    /// The host refused the call (unknown cluster, bad arguments): a reason for the log.
    fn dispatch_upstream(&self, call: UpstreamCall) -> Result<u32, String>;
    /// A fresh fencing token: 128 random bits as 32 lowercase hex digits.
    fn new_fencing_token(&self) -> String;
    /// The current time, Unix milliseconds.
    fn now_ms(&self) -> u64;
    /// Adds `delta` to a counter.
    fn count(&self, metric: Metric, delta: i64);
    /// Writes a log line.
    fn log(&self, level: Level, message: &str);
}

#[cfg(test)]
mod tests {
    use super::Metric;

    #[test]
    fn metric_indexes_follow_all() {
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(m.index(), i, "{m:?}");
        }
    }
}
