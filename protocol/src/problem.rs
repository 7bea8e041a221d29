//! RFC 9457 problem details with a stable `type` URI per case.
//!
//! Clients branch on `type`, never on `title` or `detail`. The URIs are URNs
//! (`urn:idemgate:problem:<slug>`): stable identifiers that are not meant to be fetched
//! (RFC 9457 section 3.1.1 allows that).

use serde::{Deserialize, Serialize};

/// Media type of a problem details body (RFC 9457 section 3).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every problem idemgate answers with, filter and server alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemType {
    /// 400: the route requires an `Idempotency-Key` and the request has none
    /// (IETF draft section 2.7).
    KeyMissing,
    /// 400: the `Idempotency-Key` is not a valid sf-string or token, empty, too long,
    /// holds control characters, or appears more than once.
    KeyMalformed,
    /// 401: the route's scope source (a header or metadata) is absent, so the request
    /// cannot be tied to a tenant; idemgate never falls back to a shared scope.
    ScopeMissing,
    /// 409: a request with this key is still being processed (IETF draft section 2.7).
    InFlight,
    /// 409: the key completed but its response was too large to store, so it cannot be
    /// replayed and will not execute again.
    NotReplayable,
    /// 409: the first execution's outcome is unknown (its client or Envoy gave up after the
    /// request reached the upstream, or its lock expired with nothing stored). Comes with
    /// `Retry-After`: once the hold ends, the retry replays a late-stored response,
    /// executes (`reexecute`) or gets [`ProblemType::OutcomeUnknownRefused`].
    OutcomeUnknown,
    /// 409, final: the outcome is unknown and the route refuses to execute the key again
    /// until the record expires. No `Retry-After`: check the result, then use a new key.
    OutcomeUnknownRefused,
    /// 504: the upstream call that ran detached from the client failed or timed out after
    /// the request may have reached the upstream: the outcome is unknown.
    UpstreamOutcomeUnknown,
    /// 413: the request body exceeds the route's cap, so it cannot be fingerprinted.
    RequestTooLarge,
    /// 422: the key was used before with a different request (IETF draft section 2.7).
    KeyReused,
    /// 503: the idempotency store cannot answer and the route fails closed.
    StoreUnavailable,
    /// 400: a store API call that does not parse or validate (server side).
    BadStoreCall,
    /// 401: the admin API's bearer token is missing or wrong.
    Unauthorized,
    /// 404: no such record or resource.
    NotFound,
    /// 400: an admin API call with bad parameters.
    BadRequest,
    /// 409: a bulk purge confirmation token that is unknown, expired or for another filter.
    ConfirmationMismatch,
    /// 500: an unexpected server fault (logged once, generic body out).
    Internal,
}

impl ProblemType {
    /// Every variant, for documentation and tests.
    pub const ALL: [ProblemType; 17] = [
        Self::KeyMissing,
        Self::KeyMalformed,
        Self::ScopeMissing,
        Self::InFlight,
        Self::NotReplayable,
        Self::OutcomeUnknown,
        Self::OutcomeUnknownRefused,
        Self::UpstreamOutcomeUnknown,
        Self::RequestTooLarge,
        Self::KeyReused,
        Self::StoreUnavailable,
        Self::BadStoreCall,
        Self::Unauthorized,
        Self::NotFound,
        Self::BadRequest,
        Self::ConfirmationMismatch,
        Self::Internal,
    ];

    /// The stable `type` URI.
    pub fn uri(self) -> &'static str {
        match self {
            Self::KeyMissing => "urn:idemgate:problem:key-missing",
            Self::KeyMalformed => "urn:idemgate:problem:key-malformed",
            Self::ScopeMissing => "urn:idemgate:problem:scope-missing",
            Self::InFlight => "urn:idemgate:problem:in-flight",
            Self::NotReplayable => "urn:idemgate:problem:not-replayable",
            Self::OutcomeUnknown => "urn:idemgate:problem:outcome-unknown",
            Self::OutcomeUnknownRefused => "urn:idemgate:problem:outcome-unknown-refused",
            Self::UpstreamOutcomeUnknown => "urn:idemgate:problem:upstream-outcome-unknown",
            Self::RequestTooLarge => "urn:idemgate:problem:request-too-large",
            Self::KeyReused => "urn:idemgate:problem:key-reused",
            Self::StoreUnavailable => "urn:idemgate:problem:store-unavailable",
            Self::BadStoreCall => "urn:idemgate:problem:bad-store-call",
            Self::Unauthorized => "urn:idemgate:problem:unauthorized",
            Self::NotFound => "urn:idemgate:problem:not-found",
            Self::BadRequest => "urn:idemgate:problem:bad-request",
            Self::ConfirmationMismatch => "urn:idemgate:problem:confirmation-mismatch",
            Self::Internal => "urn:idemgate:problem:internal",
        }
    }

    /// The HTTP status this problem is answered with.
    pub fn status(self) -> u16 {
        match self {
            Self::KeyMissing | Self::KeyMalformed | Self::BadStoreCall | Self::BadRequest => 400,
            Self::ScopeMissing | Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::InFlight
            | Self::NotReplayable
            | Self::OutcomeUnknown
            | Self::OutcomeUnknownRefused
            | Self::ConfirmationMismatch => 409,
            Self::UpstreamOutcomeUnknown => 504,
            Self::RequestTooLarge => 413,
            Self::KeyReused => 422,
            Self::Internal => 500,
            Self::StoreUnavailable => 503,
        }
    }

    /// A short, human-readable summary that does not change between occurrences.
    pub fn title(self) -> &'static str {
        match self {
            Self::KeyMissing => "Idempotency-Key is required",
            Self::KeyMalformed => "Idempotency-Key is malformed",
            Self::ScopeMissing => "The request has no idempotency scope",
            Self::InFlight => "A request with this Idempotency-Key is in progress",
            Self::NotReplayable => "The original response cannot be replayed",
            Self::OutcomeUnknown => "The outcome of the first request is not known yet",
            Self::OutcomeUnknownRefused => {
                "The outcome of the first request is unknown; it will not be executed again"
            }
            Self::UpstreamOutcomeUnknown => {
                "The upstream did not answer; the outcome of the request is unknown"
            }
            Self::RequestTooLarge => "The request body is too large for idempotency",
            Self::KeyReused => "Idempotency-Key was used with a different request",
            Self::StoreUnavailable => "The idempotency store is unavailable",
            Self::BadStoreCall => "Malformed store call",
            Self::Unauthorized => "Missing or invalid bearer token",
            Self::NotFound => "Not found",
            Self::BadRequest => "Bad request",
            Self::ConfirmationMismatch => "Confirmation token does not match",
            Self::Internal => "Internal error",
        }
    }
}

/// A problem details object (RFC 9457 section 3.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The stable type URI ([`ProblemType::uri`]).
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, for a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Seconds to wait before retrying, mirrored from `Retry-After` (extension member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

impl Problem {
    /// A problem of `kind` with a request-specific `detail`.
    pub fn new(kind: ProblemType, detail: impl Into<String>) -> Self {
        Self {
            type_uri: kind.uri().to_owned(),
            title: kind.title().to_owned(),
            status: kind.status(),
            detail: Some(detail.into()),
            retry_after_s: None,
        }
    }

    /// Sets the `retry_after_s` extension member.
    pub fn with_retry_after_s(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// The JSON body bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn type_uris_are_unique_and_statuses_are_errors() {
        let uris: HashSet<_> = ProblemType::ALL.iter().map(|p| p.uri()).collect();
        assert_eq!(uris.len(), ProblemType::ALL.len());
        for p in ProblemType::ALL {
            assert!((400..600).contains(&p.status()), "{p:?}");
        }
    }

    #[test]
    fn problem_json_uses_rfc_9457_member_names() {
        let p = Problem::new(ProblemType::InFlight, "try later").with_retry_after_s(3);
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap_or_default();
        assert_eq!(v["type"], "urn:idemgate:problem:in-flight");
        assert_eq!(v["status"], 409);
        assert_eq!(v["retry_after_s"], 3);
    }
}
