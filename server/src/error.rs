//! The one error type of the HTTP side, answered as RFC 9457 problem details.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use idemgate_protocol::problem::PROBLEM_JSON;
use idemgate_protocol::{Problem, ProblemType};

use crate::store::StoreError;

/// Seconds a caller should wait after a 503 before it tries the store again.
pub const STORE_RETRY_AFTER_S: u64 = 1;

/// Everything a handler can fail with. Each variant maps to one [`ProblemType`]:
///
/// | variant | problem type | status |
/// |---|---|---|
/// | [`AppError::BadStoreCall`] | `urn:idemgate:problem:bad-store-call` | 400 |
/// | [`AppError::NotFound`], [`AppError::Missing`] | `urn:idemgate:problem:not-found` | 404 |
/// | [`AppError::BadRequest`] | `urn:idemgate:problem:bad-request` | 400 |
/// | [`AppError::Unauthorized`] | `urn:idemgate:problem:unauthorized` | 401, `WWW-Authenticate: Bearer` |
/// | [`AppError::ConfirmationMismatch`] | `urn:idemgate:problem:confirmation-mismatch` | 409 |
/// | [`AppError::Store`] (Redis error, timeout, or a write too few replicas acknowledged) | `urn:idemgate:problem:store-unavailable` | 503, `Retry-After: 1` |
/// | [`AppError::Store`] (undecodable data) | `urn:idemgate:problem:internal` | 500 |
///
/// Store failures are logged once here, with the cause; the body says nothing internal.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The store call does not parse or validate; the reason goes to `detail`.
    #[error("bad store call: {0}")]
    BadStoreCall(String),
    /// No such route.
    #[error("not found: {0}")]
    NotFound(String),
    /// No such resource (e.g. record); the text goes to `detail`.
    #[error("missing: {0}")]
    Missing(String),
    /// An admin call with bad parameters; the reason goes to `detail`.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Missing or wrong admin bearer token; the reason goes to `detail`.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A bulk purge confirmation that is unknown, expired or for another filter.
    #[error("confirmation mismatch: {0}")]
    ConfirmationMismatch(String),
    /// 409 `in-flight`: an operator tried to purge a record whose request may still be
    /// executing upstream.
    #[error("in flight: {0}")]
    InFlight(String),
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let problem = match &self {
            AppError::BadStoreCall(detail) => {
                tracing::debug!(%detail, "bad store call");
                Problem::new(ProblemType::BadStoreCall, detail.clone())
            }
            AppError::NotFound(path) => {
                Problem::new(ProblemType::NotFound, format!("no route for {path}"))
            }
            AppError::Missing(detail) => Problem::new(ProblemType::NotFound, detail.clone()),
            AppError::BadRequest(detail) => Problem::new(ProblemType::BadRequest, detail.clone()),
            AppError::Unauthorized(detail) => {
                let mut response =
                    problem_response(&Problem::new(ProblemType::Unauthorized, detail.clone()));
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"idemgate-admin\""),
                );
                return response;
            }
            AppError::InFlight(detail) => Problem::new(ProblemType::InFlight, detail.clone()),
            AppError::ConfirmationMismatch(detail) => {
                Problem::new(ProblemType::ConfirmationMismatch, detail.clone())
            }
            AppError::Store(
                err @ (StoreError::Redis(_)
                | StoreError::Timeout { .. }
                | StoreError::WaitShortfall { .. }),
            ) => {
                tracing::warn!(error = %err, "store unavailable");
                Problem::new(
                    ProblemType::StoreUnavailable,
                    "the idempotency store cannot answer right now; retry later",
                )
                .with_retry_after_s(STORE_RETRY_AFTER_S)
            }
            AppError::Store(err @ StoreError::Corrupt(_)) => {
                tracing::error!(error = %err, "internal store error");
                Problem::new(ProblemType::Internal, "internal error; see the server log")
            }
        };
        problem_response(&problem)
    }
}

/// Builds an `application/problem+json` response with the problem's status (and
/// `Retry-After` when the problem carries `retry_after_s`).
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
        problem.to_json(),
    )
        .into_response();
    if let Some(seconds) = problem.retry_after_s {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}
