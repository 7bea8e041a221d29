//! The store API the filter calls: `POST /v1/claim`, `/v1/complete`, `/v1/release`,
//! `POST /v1/report` and `GET /healthz`.
//!
//! After each store call the matching event (claimed, replayed, in_flight_conflict,
//! mismatch, not_replayable, completed, released, lock_lost, store_error) is queued for the
//! event stream and the stat counters ([`crate::events`]); that never delays or fails the
//! call. Latency and outcome go to the Prometheus metrics.
//!
//! Bodies are JSON exactly as in [`idemgate_protocol`]. A body that does not parse (bad
//! JSON, unknown field, wrong type) or breaks a rule below answers 400 `BadStoreCall`;
//! Redis errors, calls slower than `--redis-timeout-ms` and, with `--redis-wait-replicas`,
//! claims and completes too few replicas acknowledged answer 503 `StoreUnavailable`.
//!
//! Validation rules (server side, on top of serde; `ClaimRequest::validate` and its
//! siblings in `idemgate_protocol`, so the fuzz targets reach them without the server):
//! - `record`: [`idemgate_protocol::RecordId::validate`].
//! - `fingerprint`: 64 lowercase hex digits (a SHA-256, see `idemgate_protocol::fingerprint`).
//! - `lock_ttl_ms`: 1..=[`MAX_LOCK_TTL_MS`].
//! - `fencing_token` (claim, optional): 32 lowercase hex digits.
//! - `unknown_outcome` (claim, optional): `hold_s` 1..=[`idemgate_protocol::MAX_UNKNOWN_HOLD_S`], `ttl_s`
//!   1..=[`MAX_TTL_S`].
//! - `outcome_unknown` (complete): only with `response` null.
//! - `ttl_s`: 1..=[`MAX_TTL_S`].
//! - `fencing_token`: 32 lowercase hex digits (the shape [`crate::store::new_fencing_token`]
//!   issues).
//! - `status`: 100..=599, and equal to `response.status` when a response is given.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use idemgate_protocol::admin::{Event, EventKind, FilterReport, ReportKind};
use idemgate_protocol::{
    ClaimOutcome, ClaimRequest, CompleteOutcome, CompleteRequest, RecordId, ReleaseOutcome,
    ReleaseRequest,
};
use serde::de::DeserializeOwned;

use crate::error::AppError;
use crate::events::event;
use crate::store::StoreError;
use crate::AppState;

pub use idemgate_protocol::{MAX_LOCK_TTL_MS, MAX_TTL_S};
/// Largest store API request body, in bytes (stored responses can be big): 16 MiB.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Parses a JSON body into `T`, mapping every failure to [`AppError::BadStoreCall`].
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, AppError> {
    let bytes = body.map_err(|rejection| AppError::BadStoreCall(rejection.body_text()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AppError::BadStoreCall(format!("the body is not a valid store call: {e}")))
}

fn validate_claim(req: &ClaimRequest) -> Result<(), AppError> {
    req.validate().map_err(AppError::BadStoreCall)
}

/// Validates a complete call and returns the completed record's TTL in milliseconds.
fn validate_complete(req: &CompleteRequest) -> Result<u64, AppError> {
    req.validate().map_err(AppError::BadStoreCall)
}

fn validate_release(req: &ReleaseRequest) -> Result<(), AppError> {
    req.validate().map_err(AppError::BadStoreCall)
}

/// Runs one store call: its latency and outcome go to the metrics, and its event, built by
/// `describe` together with the outcome's metric label, to the event stream; a failure
/// queues a `store_error` event for the record instead.
async fn run<T>(
    state: &AppState,
    call: &'static str,
    record: &RecordId,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
    describe: impl FnOnce(&T) -> (&'static str, Event),
) -> Result<T, AppError> {
    let started = std::time::Instant::now();
    let result = fut.await;
    state
        .metrics
        .store_latency
        .with_label_values(&[call])
        .observe(started.elapsed().as_secs_f64());
    let (label, event) = match &result {
        Ok(t) => describe(t),
        Err(err) => {
            if matches!(err, StoreError::Redis(_) | StoreError::Timeout { .. }) {
                state.metrics.redis_errors.inc();
            }
            if let StoreError::WaitShortfall { call, .. } = err {
                state
                    .metrics
                    .wait_shortfalls
                    .with_label_values(&[call])
                    .inc();
            }
            let mut e = record_event(EventKind::StoreError, record, None);
            e.detail = Some(format!("{call}: {err}"));
            ("error", e)
        }
    };
    state
        .metrics
        .store_outcomes
        .with_label_values(&[call, label])
        .inc();
    state.events.publish(event);
    Ok(result?)
}

fn record_event(kind: EventKind, record: &RecordId, route: Option<String>) -> Event {
    let mut e = event(kind);
    e.scope = Some(record.scope.clone());
    e.key = Some(record.key.clone());
    e.route = route;
    e
}

/// `POST /v1/claim`: [`ClaimRequest`] in, 200 [`ClaimOutcome`] out.
pub async fn claim(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ClaimOutcome>, AppError> {
    let req: ClaimRequest = parse(body)?;
    validate_claim(&req)?;
    let outcome = run(&state, "claim", &req.record, state.store.claim(&req), |o| {
        let (label, kind, status) = match o {
            ClaimOutcome::Acquired { .. } => ("acquired", EventKind::Claimed, None),
            ClaimOutcome::InFlight { .. } => ("in_flight", EventKind::InFlightConflict, None),
            ClaimOutcome::Unknown { .. } => ("unknown", EventKind::OutcomeUnknown, None),
            ClaimOutcome::Released => ("released", EventKind::LockLost, None),
            ClaimOutcome::Replay { response } => {
                ("replay", EventKind::Replayed, Some(response.status))
            }
            ClaimOutcome::Mismatch => ("mismatch", EventKind::Mismatch, None),
            ClaimOutcome::NotReplayable { status } => {
                ("not_replayable", EventKind::NotReplayable, Some(*status))
            }
        };
        let mut e = record_event(kind, &req.record, Some(req.route.clone()));
        e.status = status;
        (label, e)
    })
    .await?;
    tracing::debug!(route = %req.route, ?outcome, "claim");
    Ok(Json(outcome))
}

/// `POST /v1/complete`: [`CompleteRequest`] in, 200 [`CompleteOutcome`] out.
pub async fn complete(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CompleteOutcome>, AppError> {
    let req: CompleteRequest = parse(body)?;
    let ttl_ms = validate_complete(&req)?;
    let store_call = state.store.complete(&req, ttl_ms);
    let (outcome, _) = run(&state, "complete", &req.record, store_call, |(o, route)| {
        let (label, kind) = match o {
            CompleteOutcome::Completed if req.outcome_unknown => {
                ("unknown", EventKind::OutcomeUnknown)
            }
            CompleteOutcome::Completed => ("completed", EventKind::Completed),
            CompleteOutcome::LockLost => ("lock_lost", EventKind::LockLost),
        };
        let mut e = record_event(kind, &req.record, route.clone());
        e.status = Some(req.status);
        if req.outcome_unknown && *o == CompleteOutcome::Completed {
            e.detail = Some(format!(
                "the request may have reached the upstream (status {}); its outcome is unknown",
                req.status
            ));
        } else if req.response.is_none() && *o == CompleteOutcome::Completed {
            e.detail = Some("response not stored: over the response body cap".into());
        }
        (label, e)
    })
    .await?;
    tracing::debug!(status = req.status, ?outcome, "complete");
    Ok(Json(outcome))
}

/// `POST /v1/release`: [`ReleaseRequest`] in, 200 [`ReleaseOutcome`] out.
pub async fn release(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReleaseOutcome>, AppError> {
    let req: ReleaseRequest = parse(body)?;
    validate_release(&req)?;
    let store_call = state.store.release(&req);
    let (outcome, _) = run(&state, "release", &req.record, store_call, |(o, route)| {
        let (label, kind) = match o {
            ReleaseOutcome::Released => ("released", EventKind::Released),
            ReleaseOutcome::LockLost => ("lock_lost", EventKind::LockLost),
        };
        let mut e = record_event(kind, &req.record, route.clone());
        e.status = req.status;
        (label, e)
    })
    .await?;
    tracing::debug!(status = ?req.status, ?outcome, "release");
    Ok(Json(outcome))
}

/// Longest `detail` of a filter report kept in its event, bytes.
pub const MAX_REPORT_DETAIL: usize = 512;

/// `POST /v1/report` ([`idemgate_protocol::admin::REPORT_PATH`]): a [`FilterReport`]
/// (unknown fields refused, 400) becomes an event and a counter; 204. Kinds: `rejected` ->
/// `rejected`, `body_cap` -> `rejected` with `detail` starting `body_cap: `,
/// `store_error` -> `store_error`, `fail_open` -> `fail_open`.
pub async fn report(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, AppError> {
    let r: FilterReport = parse(body)?;
    let (kind, label) = match r.kind {
        ReportKind::Rejected => (EventKind::Rejected, "rejected"),
        ReportKind::BodyCap => (EventKind::Rejected, "body_cap"),
        ReportKind::StoreError => (EventKind::StoreError, "store_error"),
        ReportKind::FailOpen => (EventKind::FailOpen, "fail_open"),
    };
    state
        .metrics
        .filter_reports
        .with_label_values(&[label])
        .inc();
    let mut detail = r.detail;
    if detail.len() > MAX_REPORT_DETAIL {
        let mut cut = MAX_REPORT_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
    }
    let mut e = event(kind);
    e.route = Some(r.route);
    e.scope = r.scope;
    e.key = r.key;
    e.detail = Some(if r.kind == ReportKind::BodyCap {
        format!("body_cap: {detail}")
    } else {
        detail
    });
    state.events.publish(e);
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /healthz`: 200 `{"redis":"up"}` when a Redis `PING` answers within the timeout,
/// else 503 `{"redis":"down"}`. The readiness probe of the harness.
pub async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"redis": "up"}))).into_response(),
        Err(err) => {
            tracing::debug!(error = %err, "healthz: redis down");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"redis": "down"})),
            )
                .into_response()
        }
    }
}
