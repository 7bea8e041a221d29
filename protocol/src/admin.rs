//! Admin API types (server's admin listener, under `/api`), live events and the filter's
//! best-effort reports. Shared by the server, the operator CLI and the dashboard.
//!
//! Times are UTC milliseconds since the Unix epoch (`_ms`); durations carry their unit.

use serde::{Deserialize, Serialize};

/// Path of the store API's report call: the filter tells the server about decisions it
/// took without a store call (rejected keys, fail-open passes, store errors), so stats and
/// events see them. Fire-and-forget: the filter ignores the answer.
pub const REPORT_PATH: &str = "/v1/report";

/// State of an idempotency record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Claimed; the upstream is executing (or the holder went away and the lock has not
    /// expired yet).
    InFlight,
    /// The response is stored (or, if `replayable` is false, only its status).
    Completed,
    /// The request may have reached the upstream but no response was stored (the client
    /// or Envoy gave up, or the lock expired): retries get 409 until the route's hold time
    /// ends, then execute (`reexecute`) or keep getting a final 409 (`refuse`).
    Unknown,
}

/// One record in a key listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySummary {
    /// Scope hash (64 hex) or `global`.
    pub scope: String,
    /// The client's idempotency key.
    pub key: String,
    /// Record state.
    pub state: KeyState,
    /// Filter route name.
    pub route: String,
    /// Request method.
    pub method: String,
    /// Request path with query.
    pub path: String,
    /// Stored status (completed records).
    pub status: Option<u16>,
    /// Whether a retry replays the response (false: over the response cap).
    pub replayable: bool,
    /// When the record was claimed.
    pub created_ms: u64,
    /// When the response was stored.
    pub completed_ms: Option<u64>,
    /// When the record (or the in-flight lock) expires.
    pub expires_ms: u64,
    /// How many times the response was replayed.
    pub replays: u64,
}

/// `GET /api/keys` query parameters. Filters combine with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyListQuery {
    /// Only records in this state.
    pub state: Option<KeyState>,
    /// Only records of this route.
    pub route: Option<String>,
    /// Only records of this scope hash (or `global`).
    pub scope: Option<String>,
    /// Only keys starting with this prefix.
    pub prefix: Option<String>,
    /// Only records at least this old (since `created_ms`), milliseconds.
    pub min_age_ms: Option<u64>,
    /// Only records at most this old, milliseconds.
    pub max_age_ms: Option<u64>,
    /// Opaque cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1..=500 (default 50). A page may hold fewer items even when more exist;
    /// only `next_cursor == None` means the listing is complete.
    pub limit: Option<u32>,
}

/// One page of a key listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPage {
    /// Records of this page.
    pub items: Vec<KeySummary>,
    /// Cursor of the next page; `None` when the listing is complete.
    pub next_cursor: Option<String>,
}

/// A stored response as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponsePreview {
    /// Status code.
    pub status: u16,
    /// Header fields as stored (values of credential-like headers are never stored).
    pub headers: Vec<(String, String)>,
    /// Body size in bytes.
    pub body_bytes: u64,
    /// The first bytes of the body (at most [`PREVIEW_BYTES`]): UTF-8 text when the body
    /// is valid UTF-8, else base64 ([`ResponsePreview::body_preview_base64`]).
    pub body_preview: String,
    /// Whether `body_preview` is base64 (binary body).
    pub body_preview_base64: bool,
    /// Whether the preview is shorter than the body.
    pub truncated: bool,
}

/// Longest body preview, bytes.
pub const PREVIEW_BYTES: usize = 2048;

/// `GET /api/keys/{scope}/{key}`: everything known about one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDetail {
    /// The listing fields.
    #[serde(flatten)]
    pub summary: KeySummary,
    /// Request fingerprint (64 hex).
    pub fingerprint: String,
    /// Remaining TTL of the record in milliseconds (the lock's when in flight).
    pub ttl_ms: u64,
    /// When the in-flight lock expires (in-flight records).
    pub lock_expires_ms: Option<u64>,
    /// When the response was last replayed.
    pub last_replay_ms: Option<u64>,
    /// The stored response, when completed and replayable.
    pub response: Option<ResponsePreview>,
}

/// `DELETE /api/keys/{scope}/{key}` (a completed record; an in-flight one is refused with
/// 409 `in-flight`) and `POST /api/keys/{scope}/{key}/release` (an in-flight record only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeOutcome {
    /// Whether a record was deleted (false: it did not exist, or for release it was not
    /// in flight).
    pub purged: bool,
}

/// `POST /api/purge`: bulk purge by scope, route or key prefix (at least one).
///
/// Two steps: `dry_run: true` counts and returns a confirmation token bound to exactly
/// this filter; the real run repeats the filter with that token within its lifetime and
/// deletes only records claimed before the dry run. In-flight records are never purged
/// (their request may still execute upstream; releasing a stuck lock is a separate,
/// per-key action). Unknown fields are refused, so a misspelt filter cannot widen a purge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkPurgeRequest {
    /// Only records of this scope.
    pub scope: Option<String>,
    /// Only records of this route.
    pub route: Option<String>,
    /// Only keys with this prefix.
    pub prefix: Option<String>,
    /// Count only.
    pub dry_run: bool,
    /// The token from the dry run (required when `dry_run` is false).
    pub confirmation: Option<String>,
}

/// Answer to a bulk purge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum BulkPurgeOutcome {
    /// The dry run's count and the token that confirms the real run.
    DryRun {
        /// Completed records matching now (what the real run deletes at most).
        matched: u64,
        /// In-flight records matching now, which a purge leaves alone.
        #[serde(default)]
        in_flight: u64,
        /// Confirmation token for the real run.
        confirmation: String,
        /// When the token stops being accepted.
        confirmation_expires_ms: u64,
    },
    /// The real run's count.
    Purged {
        /// Records deleted.
        purged: u64,
        /// In-flight records left alone.
        #[serde(default)]
        skipped_in_flight: u64,
    },
}

/// What happened, for the live event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A claim acquired the lock: the request executes.
    Claimed,
    /// A stored response was replayed.
    Replayed,
    /// A duplicate arrived while the key was in flight (409).
    InFlightConflict,
    /// The key was reused with another request (422).
    Mismatch,
    /// A retry of a completed key whose response was too large to store (409).
    NotReplayable,
    /// An execution's outcome became unknown (the client or Envoy gave up after the
    /// request left), or a retry met such a record (409).
    OutcomeUnknown,
    /// The response was stored.
    Completed,
    /// The key was released after an unstored status; a retry executes again.
    Released,
    /// A record or an in-flight lock expired (reported once per key).
    Expired,
    /// An operator purged a record.
    Purged,
    /// An operator released an in-flight lock.
    LockReleased,
    /// A late `complete`/`release` was refused by the fencing token.
    LockLost,
    /// A store call failed (reported by the server or the filter).
    StoreError,
    /// The filter rejected a request: missing or malformed key, missing scope, body too
    /// large.
    Rejected,
    /// The filter forwarded a request unprotected because the store failed (fail-open).
    FailOpen,
    /// The server found a Redis setting that breaks the guarantee: an evicting
    /// `maxmemory-policy` with a memory limit (`detail` names the node and the setting).
    RedisUnsafe,
    /// A Redis node's `run_id` changed: it restarted or another node took its place
    /// (failover). What it had not persisted is gone.
    RedisRestarted,
}

/// One live event. Its `id` is the Redis Stream entry id (`<ms>-<seq>`), usable as SSE
/// `id:` and `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stream entry id; empty before the event is stored.
    #[serde(default)]
    pub id: String,
    /// When it happened.
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// Scope hash, when known.
    pub scope: Option<String>,
    /// Idempotency key, when known.
    pub key: Option<String>,
    /// Route name, when known.
    pub route: Option<String>,
    /// A status code, when relevant (stored status, released status).
    pub status: Option<u16>,
    /// Free text: the reason of a rejection or error, the bulk filter of a purge.
    pub detail: Option<String>,
    /// Who did it: the admin token's label for operator actions.
    pub actor: Option<String>,
    /// How many records the event covers, when more than one can be (a bulk purge's
    /// count); absent means one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// What the filter reports through [`REPORT_PATH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    /// Missing or malformed key, missing scope (400/401).
    Rejected,
    /// A request body over the cap (413) or a response over the cap (not replayable).
    BodyCap,
    /// A store call failed as seen by the filter (timeout, refused, bad answer).
    StoreError,
    /// Forwarded unprotected on a fail-open route.
    FailOpen,
}

/// `POST /v1/report` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterReport {
    /// What happened.
    pub kind: ReportKind,
    /// Route name.
    pub route: String,
    /// Scope hash, when known.
    pub scope: Option<String>,
    /// Idempotency key, when known (never for a malformed one).
    pub key: Option<String>,
    /// Human-readable reason.
    pub detail: String,
}

/// Counters of one time window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Claims made (every protected request that reached the store).
    pub claims: u64,
    /// Claims acquired: upstream executions.
    pub executions: u64,
    /// Replays.
    pub replays: u64,
    /// 409 in-flight conflicts.
    pub in_flight_conflicts: u64,
    /// 422 mismatches.
    pub mismatches: u64,
    /// Filter rejections (400/401/413).
    pub rejections: u64,
    /// Expirations.
    pub expirations: u64,
    /// Operator purges (records).
    pub purges: u64,
    /// Store errors.
    pub store_errors: u64,
    /// Fail-open passes.
    pub fail_open_passes: u64,
    /// Responses stored.
    pub completions: u64,
    /// Keys released.
    pub releases: u64,
    /// Fencing refusals.
    pub lock_lost: u64,
    /// Executions whose outcome became unknown (the client or Envoy gave up after the
    /// request left, or a detached upstream call failed).
    #[serde(default)]
    pub unknown_outcomes: u64,
}

/// One bucket of a window's series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsBucket {
    /// Bucket start.
    pub start_ms: u64,
    /// Counters in the bucket.
    pub counts: Counters,
}

/// Totals and a series over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsWindow {
    /// Window length in seconds (60, 3600, 86400).
    pub window_s: u64,
    /// Bucket width in seconds (the series' step).
    pub bucket_s: u64,
    /// Totals over the window.
    pub totals: Counters,
    /// replays / (replays + executions), `None` when both are 0.
    pub replay_rate: Option<f64>,
    /// Buckets, oldest first.
    pub series: Vec<StatsBucket>,
}

/// `GET /api/stats`: the same numbers whichever server instance answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsResponse {
    /// When the numbers were read.
    pub generated_ms: u64,
    /// Last minute (buckets of 5 s).
    pub minute: StatsWindow,
    /// Last hour (buckets of 1 min).
    pub hour: StatsWindow,
    /// Last day (buckets of 1 h).
    pub day: StatsWindow,
    /// Records in flight right now (approximate under churn).
    pub in_flight_now: Option<u64>,
}

/// `GET /api/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `up` or `down`.
    pub redis: String,
    /// Round trip of a Redis PING, milliseconds, when up.
    pub redis_latency_ms: Option<f64>,
    /// Server version.
    pub version: String,
    /// The last check of the Redis settings the guarantee depends on; absent before the
    /// first check answered (or from an older server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_safety: Option<RedisSafety>,
}

/// Result of one safety check, from best to worst as the server ranks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyLevel {
    /// The setting keeps the promise.
    Ok,
    /// The setting could not be read (`CONFIG` disabled or renamed, as on managed Redis):
    /// nothing is assumed.
    CannotVerify,
    /// The setting weakens the promise (no persistence: a restart forgets records).
    Warning,
    /// The setting breaks the promise (records can be evicted).
    Unsafe,
}

/// How a Redis node persists its data, from `appendonly` and `save`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Persistence {
    /// Append-only file (`appendonly yes`).
    Aof,
    /// Only RDB snapshots (`save` set, `appendonly no`): a restart loses the writes since
    /// the last snapshot.
    Rdb,
    /// None (`appendonly no`, `save ""`): a restart loses every record.
    None,
}

/// What one Redis node (a master) reported. `None` fields could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisNodeSafety {
    /// `host:port` of the node.
    pub node: String,
    /// `maxmemory`, bytes (0: no limit).
    pub maxmemory_bytes: Option<u64>,
    /// `maxmemory-policy`, e.g. `noeviction`.
    pub maxmemory_policy: Option<String>,
    /// `appendonly` is `yes`.
    pub appendonly: Option<bool>,
    /// `appendfsync`: `always`, `everysec` or `no`.
    pub appendfsync: Option<String>,
    /// `save` (the RDB snapshot schedule, `""` for none).
    pub save: Option<String>,
    /// Persistence derived from `appendonly` and `save`.
    pub persistence: Option<Persistence>,
    /// Replication role from `INFO replication` (`master` or `slave`).
    pub role: Option<String>,
    /// `run_id` from `INFO server`: changes on every restart.
    pub run_id: Option<String>,
    /// Eviction check of this node.
    pub eviction: SafetyLevel,
    /// Persistence check of this node.
    pub persistence_check: SafetyLevel,
}

/// The server's view of whether Redis can keep the promise (`GET /api/health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisSafety {
    /// The worst of the checks below.
    pub status: SafetyLevel,
    /// Eviction: `unsafe` when a node evicts (`allkeys-*` or `volatile-*` with
    /// `maxmemory` > 0; every record has a TTL, so `volatile-*` evicts records too).
    pub eviction: SafetyLevel,
    /// Persistence: `warning` without AOF (snapshots only, or nothing).
    pub persistence: SafetyLevel,
    /// Whether the server was started with `--allow-evicting-redis`.
    pub evicting_allowed: bool,
    /// One line per problem, naming the node, the setting and the fix.
    pub messages: Vec<String>,
    /// Per node (every master of a cluster).
    pub nodes: Vec<RedisNodeSafety>,
    /// Restarts or failovers seen by this server (`run_id` changes).
    pub restarts: u64,
    /// When this check ran.
    pub checked_ms: u64,
}

/// replays / (replays + executions), `None` when both are 0.
pub fn replay_rate(c: &Counters) -> Option<f64> {
    let total = c.replays + c.executions;
    (total > 0).then(|| c.replays as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_are_snake_case() {
        let e = Event {
            id: "1-0".into(),
            at_ms: 1,
            kind: EventKind::InFlightConflict,
            scope: None,
            key: Some("k".into()),
            route: None,
            status: None,
            detail: None,
            actor: None,
            count: None,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "in_flight_conflict");
    }

    #[test]
    fn replay_rate_is_replays_over_replays_plus_executions() {
        let c = Counters {
            replays: 3,
            executions: 1,
            ..Counters::default()
        };
        assert_eq!(replay_rate(&c), Some(0.75));
        assert_eq!(replay_rate(&Counters::default()), None);
    }

    #[test]
    fn key_detail_flattens_the_summary() {
        let d = KeyDetail {
            summary: KeySummary {
                scope: "global".into(),
                key: "k".into(),
                state: KeyState::Completed,
                route: "r".into(),
                method: "POST".into(),
                path: "/".into(),
                status: Some(201),
                replayable: true,
                created_ms: 1,
                completed_ms: Some(2),
                expires_ms: 3,
                replays: 0,
            },
            fingerprint: "0".repeat(64),
            ttl_ms: 5,
            lock_expires_ms: None,
            last_replay_ms: None,
            response: None,
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["state"], "completed");
        let back: KeyDetail = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
    }
}
