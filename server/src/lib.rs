//! The idemgate server: the store API the Envoy filter calls and the admin listener.
//!
//! - [`store_app`]: `POST /v1/claim`, `POST /v1/complete`, `POST /v1/release` (JSON per
//!   [`idemgate_protocol`]) and `GET /healthz`; see [`api`].
//! - [`admin_app`]: `GET /` (placeholder page) and `GET /api/health`; see [`admin`].
//! - [`store`]: the Redis layout and the three Lua scripts.
//!
//! The server keeps no state of its own: several instances can share one Redis.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod config;
pub mod error;
pub mod store;

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::routing::{get, post};
use axum::Router;
use idemgate_protocol::{CLAIM_PATH, COMPLETE_PATH, RELEASE_PATH};
use tower_http::trace::TraceLayer;

pub use config::{Cli, Command, Config, ServeArgs};
pub use error::AppError;
pub use store::{Store, StoreError};

/// Shared state of both listeners, behind an `Arc`.
pub struct AppState {
    /// The Redis store (a self-reconnecting connection; every call bounded by the
    /// configured timeout).
    pub store: Store,
}

impl AppState {
    /// State over a store.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self { store })
    }
}

/// Request tracing at DEBUG; failures are not logged here because [`AppError`] logs each
/// one once, with its cause.
fn trace_layer() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    tower_http::trace::DefaultMakeSpan,
    tower_http::trace::DefaultOnRequest,
    tower_http::trace::DefaultOnResponse,
    tower_http::trace::DefaultOnBodyChunk,
    tower_http::trace::DefaultOnEos,
    (),
> {
    TraceLayer::new_for_http().on_failure(())
}

async fn not_found(uri: Uri) -> AppError {
    AppError::NotFound(uri.path().to_owned())
}

/// The store API router (see [`api`]); request bodies up to [`api::MAX_BODY_BYTES`].
pub fn store_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route(CLAIM_PATH, post(api::claim))
        .route(COMPLETE_PATH, post(api::complete))
        .route(RELEASE_PATH, post(api::release))
        .route("/healthz", get(api::healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(api::MAX_BODY_BYTES))
        .layer(trace_layer())
        .with_state(state)
}

/// The admin router (see [`admin`]).
pub fn admin_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(admin::index))
        .route("/api/health", get(admin::health))
        .fallback(not_found)
        .layer(trace_layer())
        .with_state(state)
}

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not bind its address.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener failed while serving.
    #[error("{what} listener failed: {source}")]
    Serve {
        /// Which listener.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Binds both listeners, logs one line per listener when ready, and serves until
/// `shutdown` completes; then both stop gracefully (in-flight requests finish).
///
/// Redis is not contacted at start: while it is down the store API answers 503.
///
/// # Errors
/// [`ServeError`] when a listener cannot bind or fails.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = Store::new(
        config.redis,
        config.key_prefix.clone(),
        config.redis_timeout,
    )?;
    let state = AppState::new(store);

    let bind = |what: &'static str, addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { what, addr, source })
    };
    let store_listener = bind("store API", config.store_listen).await?;
    let admin_listener = bind("admin", config.admin_listen).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        // Receivers see the channel close; nothing else to do if all are gone.
        drop(stop_tx);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<()>| async move {
        while rx.changed().await.is_ok() {}
    };

    tracing::info!(
        addr = %config.store_listen,
        redis = %config.redis_url_redacted,
        key_prefix = %config.key_prefix,
        redis_timeout_ms = config.redis_timeout.as_millis() as u64,
        "store API listening on http://{}",
        config.store_listen
    );
    tracing::info!(
        addr = %config.admin_listen,
        "admin listening on http://{}",
        config.admin_listen
    );

    let store_server = axum::serve(store_listener, store_app(state.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let admin_server =
        axum::serve(admin_listener, admin_app(state)).with_graceful_shutdown(stopped(stop_rx));
    let (store_result, admin_result) =
        tokio::join!(store_server.into_future(), admin_server.into_future());
    store_result.map_err(|source| ServeError::Serve {
        what: "store API",
        source,
    })?;
    admin_result.map_err(|source| ServeError::Serve {
        what: "admin",
        source,
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
