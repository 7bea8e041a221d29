//! Wire types shared by the idemgate filter, server and dashboard.
//!
//! The filter talks to the server's *store API* with three calls, each a JSON `POST`
//! answered by exactly one atomic Redis script on the server:
//!
//! | call | path | request | answer (HTTP 200) |
//! |---|---|---|---|
//! | claim | [`CLAIM_PATH`] | [`ClaimRequest`] | [`ClaimOutcome`] |
//! | complete | [`COMPLETE_PATH`] | [`CompleteRequest`] | [`CompleteOutcome`] |
//! | release | [`RELEASE_PATH`] | [`ReleaseRequest`] | [`ReleaseOutcome`] |
//!
//! Any other status from the store API (400 for a malformed call, 503 when Redis cannot
//! answer) carries an RFC 9457 problem details body ([`Problem`]); the filter maps it to
//! the route's failure mode.
//!
//! This crate has no runtime dependencies beyond serde, sha2, hex and base64 so it builds
//! for `wasm32-wasip1` (the filter), `wasm32-unknown-unknown` (the dashboard) and the host.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

pub mod admin;
pub mod canonical;
pub mod fingerprint;
pub mod problem;

pub use fingerprint::{scope_hash, Fingerprint};
pub use problem::{Problem, ProblemType};

/// Path of the store API's claim call.
pub const CLAIM_PATH: &str = "/v1/claim";
/// Path of the store API's complete call.
pub const COMPLETE_PATH: &str = "/v1/complete";
/// Path of the store API's release call.
pub const RELEASE_PATH: &str = "/v1/release";

/// Longest idempotency key accepted, in characters (bytes: keys are ASCII).
///
/// The IETF draft (draft-ietf-httpapi-idempotency-key-header-07, section 2) leaves the
/// length to the resource; 255 matches Stripe's documented limit.
pub const MAX_KEY_LEN: usize = 255;

/// The scope value used by routes configured with a global scope.
///
/// Every other scope is a 64-character lowercase hex SHA-256 ([`scope_hash`]), so this
/// value can never collide with a hashed scope.
pub const GLOBAL_SCOPE: &str = "global";

/// Which record a store call is about: the scope and the client's idempotency key.
///
/// The server builds the Redis key from both, so the same client key used by two
/// tenants (two scopes) names two different records.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordId {
    /// Lowercase hex SHA-256 of the scope source (see [`scope_hash`]), or [`GLOBAL_SCOPE`].
    /// Never the raw secret.
    pub scope: String,
    /// The idempotency key as the client sent it, already validated by the filter
    /// (1..=[`MAX_KEY_LEN`] visible ASCII characters).
    pub key: String,
}

impl RecordId {
    /// Checks the shapes the server relies on; returns a human-readable reason.
    ///
    /// # Errors
    /// A scope that is neither [`GLOBAL_SCOPE`] nor 64 lowercase hex digits, or a key
    /// that is empty, longer than [`MAX_KEY_LEN`] or holds a character outside `0x21..=0x7e`
    /// (space inside is allowed, as in an sf-string).
    pub fn validate(&self) -> Result<(), String> {
        validate_scope(&self.scope)?;
        validate_key(&self.key)
    }
}

/// Whether `s` is exactly `len` lowercase hex digits (a SHA-256 is 64, a fencing token 32).
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Validates a scope: [`GLOBAL_SCOPE`] or a [`scope_hash`] (64 lowercase hex digits).
///
/// # Errors
/// A human-readable reason.
pub fn validate_scope(scope: &str) -> Result<(), String> {
    if scope == GLOBAL_SCOPE || is_lower_hex(scope, 64) {
        Ok(())
    } else {
        Err("scope must be \"global\" or 64 lowercase hex digits".into())
    }
}

/// Validates an idempotency key value (after sf-string unquoting).
///
/// Rules: 1..=[`MAX_KEY_LEN`] characters, each printable ASCII (`0x20..=0x7e`), not
/// starting or ending with a space.
///
/// # Errors
/// A static reason naming the broken rule, suitable for problem details `detail`.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the idempotency key is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "the idempotency key is {} characters long; at most {MAX_KEY_LEN} are allowed",
            key.len()
        ));
    }
    if let Some(b) = key.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
        return Err(format!(
            "the idempotency key holds a control or non-ASCII byte 0x{b:02x}"
        ));
    }
    if key.starts_with(' ') || key.ends_with(' ') {
        return Err("the idempotency key starts or ends with a space".into());
    }
    Ok(())
}

/// Longest accepted [`ClaimRequest::lock_ttl_ms`]: one day.
pub const MAX_LOCK_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Longest accepted `ttl_s` of a completed or refused record: 365 days.
pub const MAX_TTL_S: u64 = 365 * 24 * 60 * 60;

fn check_token(token: &str) -> Result<(), String> {
    if is_lower_hex(token, 32) {
        Ok(())
    } else {
        Err("fencing_token must be 32 lowercase hex digits, as returned by claim".into())
    }
}

fn check_status(status: u16, field: &str) -> Result<(), String> {
    if (100..=599).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "{field} must be an HTTP status code (100..=599), got {status}"
        ))
    }
}

fn check_range(value: u64, max: u64, field: &str) -> Result<(), String> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!("{field} must be 1..={max}, got {value}"))
    }
}

/// `POST /v1/claim`: try to become the one execution of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Which record.
    pub record: RecordId,
    /// Lowercase hex SHA-256 request fingerprint ([`Fingerprint`]).
    pub fingerprint: String,
    /// Name of the filter route that matched (for the admin side and events).
    pub route: String,
    /// Request method, e.g. `POST`.
    pub method: String,
    /// Request path with query, as the client sent it.
    pub path: String,
    /// How long the in-flight lock lives, in milliseconds. After it a duplicate no longer
    /// gets [`ClaimOutcome::InFlight`]: with [`ClaimRequest::unknown_outcome`] the record's
    /// outcome becomes unknown (a late `complete` with this token still lands); without
    /// it the record vanishes and the next claim acquires.
    pub lock_ttl_ms: u64,
    /// The fencing token this claim writes: 32 lowercase hex digits made by the caller,
    /// unique per request, so the claim is idempotent. A claim retried with the same token
    /// after its reply was lost answers [`ClaimOutcome::Acquired`] again with that token,
    /// and a `release` that overtook its own claim (the client left before the claim
    /// answered) makes the late claim answer [`ClaimOutcome::Released`], writing nothing.
    /// `None`: the server makes a fresh random token (older callers, the CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<String>,
    /// What a retry gets when this execution's outcome becomes unknown (the lock expired
    /// with nothing stored, or `complete` reports [`CompleteRequest::outcome_unknown`]).
    /// `None`: the legacy rule (an expired lock vanishes; an unknown outcome is stored as
    /// a completed, not replayable record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_outcome: Option<UnknownOutcomePolicy>,
}

impl ClaimRequest {
    /// Checks what serde cannot: the rules the store API enforces before a claim reaches
    /// Redis (the server answers 400 with the reason).
    ///
    /// # Errors
    /// A human-readable reason: a bad [`RecordId`], a fingerprint that is not 64
    /// lowercase hex digits, `lock_ttl_ms` outside 1..=[`MAX_LOCK_TTL_MS`], a fencing
    /// token that is not 32 lowercase hex digits, or an [`UnknownOutcomePolicy`] with
    /// `hold_s` outside 1..=[`MAX_UNKNOWN_HOLD_S`] or `ttl_s` outside 1..=[`MAX_TTL_S`].
    pub fn validate(&self) -> Result<(), String> {
        self.record.validate()?;
        if !is_lower_hex(&self.fingerprint, 64) {
            return Err("fingerprint must be 64 lowercase hex digits".into());
        }
        check_range(self.lock_ttl_ms, MAX_LOCK_TTL_MS, "lock_ttl_ms")?;
        if let Some(token) = &self.fencing_token {
            check_token(token)?;
        }
        if let Some(p) = &self.unknown_outcome {
            check_range(p.hold_s, MAX_UNKNOWN_HOLD_S, "unknown_outcome.hold_s")?;
            check_range(p.ttl_s, MAX_TTL_S, "unknown_outcome.ttl_s")?;
        }
        Ok(())
    }
}

/// Longest accepted `unknown_outcome.hold_s`: one day.
pub const MAX_UNKNOWN_HOLD_S: u64 = 86_400;

/// How long a record whose outcome is unknown is held, and what happens after.
///
/// An outcome is unknown when the request may have reached the upstream but no response
/// was stored: the client's stream was reset after the request left Envoy, Envoy timed
/// out waiting for the upstream, or the in-flight lock expired with nothing stored. Such a
/// record is never confused with one whose response was too large to store
/// ([`ClaimOutcome::NotReplayable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnknownOutcomePolicy {
    /// Seconds the unknown outcome is held (1..=[`MAX_UNKNOWN_HOLD_S`]): a retry gets
    /// [`ClaimOutcome::Unknown`] with a retry time, and a late `complete` from the first
    /// execution (its fencing token) can still store the real response.
    pub hold_s: u64,
    /// What the record does once `hold_s` has passed.
    pub then: AfterUnknown,
    /// With [`AfterUnknown::Refuse`], how long the record keeps refusing after it became
    /// unknown, seconds (the route's completed-record TTL).
    pub ttl_s: u64,
}

/// What a record with an unknown outcome does once its hold time has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AfterUnknown {
    /// The record is gone: the next retry executes the request again. Right for upstreams
    /// that are idempotent themselves or cancel work when the connection closes.
    Reexecute,
    /// Retries get a final 409 ([`ClaimOutcome::Unknown`] with no retry time) until the
    /// record expires after `ttl_s`: a person checks what happened and uses a new key.
    Refuse,
}

impl AfterUnknown {
    /// The name stored in the record and used in configuration (`reexecute`, `refuse`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reexecute => "reexecute",
            Self::Refuse => "refuse",
        }
    }
}

/// The store's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClaimOutcome {
    /// No record existed (or its lock had expired): the caller holds the lock and must
    /// forward the request, then call `complete` or `release` with this token.
    Acquired {
        /// Fencing token: `complete`/`release` succeed only while it is the current one.
        fencing_token: String,
    },
    /// Another request with this key holds the lock now (IETF draft section 2.7: 409).
    InFlight {
        /// Remaining lock time in milliseconds: the latest the answer can be ready.
        retry_after_ms: u64,
        /// How long ago the lock was taken, milliseconds (Redis clock); with the route's
        /// usual latency the filter estimates when the answer will be ready.
        #[serde(default)]
        age_ms: u64,
    },
    /// The first execution's outcome is unknown (see [`UnknownOutcomePolicy`]): 409 of its
    /// own type, never an execution.
    Unknown {
        /// While the outcome is held: milliseconds until the hold ends (a retry then
        /// replays a late-stored response, executes under [`AfterUnknown::Reexecute`], or
        /// gets the final refusal). `None` once held out under [`AfterUnknown::Refuse`]:
        /// the answer will not change until the record expires.
        retry_after_ms: Option<u64>,
    },
    /// This claim's own fencing token was already released: its client left before the
    /// claim answered and the filter gave the key up. Nothing was written; nobody waits
    /// for this answer.
    Released,
    /// A completed record with the same fingerprint: replay this response.
    Replay {
        /// The stored response.
        response: StoredResponse,
    },
    /// A completed record (or a lock) with another fingerprint: the key was reused for a
    /// different request (IETF draft section 2.7: 422).
    Mismatch,
    /// A completed record whose response was not stored (it exceeded the response body
    /// cap): the request must not run again and cannot be replayed (409 of its own type).
    NotReplayable {
        /// The status the original execution answered with.
        status: u16,
    },
}

/// `POST /v1/complete`: store the response of the execution that holds the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// Which record.
    pub record: RecordId,
    /// The token from [`ClaimOutcome::Acquired`].
    pub fencing_token: String,
    /// The upstream's status code.
    pub status: u16,
    /// The response to replay, or `None` when it is not replayable (body over the cap):
    /// the record is then completed but a retry gets [`ClaimOutcome::NotReplayable`].
    pub response: Option<StoredResponse>,
    /// How long the completed record lives, in seconds.
    pub ttl_s: u64,
    /// The request may have reached the upstream but its response is unknown (the client
    /// reset the stream, Envoy timed out or reset the upstream request). `response` must
    /// be `None`. With the claim's [`UnknownOutcomePolicy`] the record becomes unknown;
    /// without one it is completed as not replayable.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outcome_unknown: bool,
}

impl CompleteRequest {
    /// Checks the rules the store API enforces before a complete reaches Redis; returns
    /// the completed record's TTL in milliseconds.
    ///
    /// # Errors
    /// A human-readable reason: a bad [`RecordId`] or fencing token, `status` outside
    /// 100..=599 or unlike `response.status`, `outcome_unknown` with a response, or
    /// `ttl_s` outside 1..=[`MAX_TTL_S`].
    pub fn validate(&self) -> Result<u64, String> {
        self.record.validate()?;
        check_token(&self.fencing_token)?;
        check_status(self.status, "status")?;
        if self.outcome_unknown && self.response.is_some() {
            return Err(
                "outcome_unknown needs response null: an unknown outcome has no response".into(),
            );
        }
        if let Some(resp) = &self.response {
            if resp.status != self.status {
                return Err(format!(
                    "response.status ({}) differs from status ({})",
                    resp.status, self.status
                ));
            }
        }
        check_range(self.ttl_s, MAX_TTL_S, "ttl_s")?;
        Ok(self.ttl_s * 1000)
    }
}

/// The store's answer to a complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum CompleteOutcome {
    /// The response is stored; retries replay it. A `complete` retried with the same
    /// token after its reply was lost answers this again.
    Completed,
    /// The fencing token is no longer current (the lock expired and maybe another request
    /// claimed the key, or an operator released it). Nothing was written.
    LockLost,
}

/// `POST /v1/release`: give the key up so a retry executes again (e.g. after a 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// Which record.
    pub record: RecordId,
    /// The token from [`ClaimOutcome::Acquired`].
    pub fencing_token: String,
    /// The upstream's status code that made the filter release (for events), if any.
    pub status: Option<u16>,
}

impl ReleaseRequest {
    /// Checks the rules the store API enforces before a release reaches Redis.
    ///
    /// # Errors
    /// A human-readable reason: a bad [`RecordId`] or fencing token, or a `status`
    /// outside 100..=599.
    pub fn validate(&self) -> Result<(), String> {
        self.record.validate()?;
        check_token(&self.fencing_token)?;
        if let Some(status) = self.status {
            check_status(status, "status")?;
        }
        Ok(())
    }
}

/// The store's answer to a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReleaseOutcome {
    /// The lock is gone; the next claim acquires. A release retried with the same token
    /// after its reply was lost, or one that overtook its own claim, answers this too.
    Released,
    /// The fencing token is no longer current; nothing was deleted.
    LockLost,
}

/// A response as stored for replay: byte-faithful.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredResponse {
    /// HTTP status code.
    pub status: u16,
    /// Header fields in the order the upstream sent them, names lowercase, each value as
    /// it was (repeated fields stay separate entries, values are never split at commas).
    pub headers: Vec<(String, String)>,
    /// Body bytes, base64 (RFC 4648 standard alphabet, padded) on the wire.
    #[serde(with = "b64")]
    pub body: Vec<u8>,
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> RecordId {
        RecordId {
            scope: scope_hash("authorization", b"Bearer a"),
            key: "k-1".into(),
        }
    }

    #[test]
    fn claim_outcomes_round_trip_with_a_tag() {
        let replay = ClaimOutcome::Replay {
            response: StoredResponse {
                status: 201,
                headers: vec![("location".into(), "/v1/payments/1".into())],
                body: vec![0, 159, 146, 150],
            },
        };
        let json = serde_json::to_string(&replay).unwrap_or_default();
        assert!(json.contains("\"outcome\":\"replay\""), "{json}");
        assert!(json.contains("\"body\":\"AJ+Slg==\""), "{json}");
        let back: ClaimOutcome = serde_json::from_str(&json).unwrap_or(ClaimOutcome::Mismatch);
        assert_eq!(back, replay);
        let acquired: ClaimOutcome =
            serde_json::from_str(r#"{"outcome":"acquired","fencing_token":"7"}"#)
                .unwrap_or(ClaimOutcome::Mismatch);
        assert_eq!(
            acquired,
            ClaimOutcome::Acquired {
                fencing_token: "7".into()
            }
        );
    }

    #[test]
    fn claim_request_round_trips() {
        let req = ClaimRequest {
            record: id(),
            fingerprint: "00".repeat(32),
            route: "payments".into(),
            method: "POST".into(),
            path: "/v1/payments".into(),
            lock_ttl_ms: 60_000,
            fencing_token: None,
            unknown_outcome: None,
        };
        let json = serde_json::to_value(&req).unwrap_or_default();
        assert_eq!(json["record"]["key"], "k-1");
        assert_eq!(json["record"]["scope"].as_str().map(str::len), Some(64));
        let back: Result<ClaimRequest, _> = serde_json::from_value(json);
        assert_eq!(back.ok(), Some(req));
    }

    #[test]
    fn record_id_validation() {
        assert!(id().validate().is_ok());
        let mut bad = id();
        bad.scope = "ABC".into();
        assert!(bad.validate().is_err());
        bad = id();
        bad.key = String::new();
        assert!(bad.validate().is_err());
        bad.key = "x".repeat(256);
        assert!(bad.validate().is_err());
        bad.key = "a\u{7}b".into();
        assert!(bad.validate().is_err());
        bad.key = "x".repeat(255);
        assert!(bad.validate().is_ok());
        bad.scope = GLOBAL_SCOPE.into();
        assert!(bad.validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<ReleaseRequest, _> = serde_json::from_str(
            r#"{"record":{"scope":"global","key":"a"},"fencing_token":"1","status":null,"extra":1}"#,
        );
        assert!(r.is_err());
    }
}
