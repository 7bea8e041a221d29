//! The admin listener, minimal for now: a placeholder page and a health endpoint.
//! (The admin API with bearer-token auth, events and purges comes in a later issue.)

use std::sync::Arc;

use axum::extract::State;
use axum::response::Html;
use axum::Json;
use serde::Serialize;

use crate::AppState;

/// The placeholder dashboard page served at `GET /`.
pub const PLACEHOLDER_HTML: &str = include_str!("../assets/placeholder.html");

/// `GET /`: the placeholder page.
pub async fn index() -> Html<&'static str> {
    Html(PLACEHOLDER_HTML)
}

/// Body of `GET /api/health`.
#[derive(Debug, Serialize)]
pub struct Health {
    /// `"up"` when a Redis `PING` answered within `--redis-timeout-ms`, else `"down"`.
    pub redis: &'static str,
    /// The server's package version.
    pub version: &'static str,
}

/// `GET /api/health`: always 200 with [`Health`] (the state is in the body; the store
/// listener's `/healthz` is the readiness probe that answers 503).
pub async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    let redis = if state.store.ping().await.is_ok() {
        "up"
    } else {
        "down"
    };
    Json(Health {
        redis,
        version: env!("CARGO_PKG_VERSION"),
    })
}
