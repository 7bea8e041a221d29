//! The idemgate server: the store API the Envoy filter calls and the admin listener.
//!
//! - [`store_app`]: `POST /v1/claim`, `POST /v1/complete`, `POST /v1/release` (JSON per
//!   [`idemgate_protocol`]) and `GET /healthz`; see [`api`].
//! - [`admin_app`]: the admin API under `/api` (bearer tokens, see [`auth`]), `/metrics`
//!   and the dashboard; see [`admin`].
//! - [`store`]: the Redis layout and the store's Lua scripts; [`keys`]: listing, detail and
//!   deletion for the admin side; [`backend`]: single server, Sentinel or cluster.
//! - [`events`]: the event stream and counters in Redis; [`stats`]: reading the counters;
//!   [`expiry`]: expirations reported once; [`metrics`]: Prometheus.
//! - [`cli`]: the operator CLI (`keys`, `purge`, `stats`) over the admin API.
//!
//! Redis keys (`{prefix}` = `--key-prefix`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{prefix}:rec:{scope}:{key}` | hash | one idempotency record ([`store`]) |
//! | `{{prefix}}:events` | stream | the event stream, `MAXLEN ~ 10000` ([`events`]) |
//! | `{{prefix}}:stats:<5s\|1m\|1h>:<bucket_start_ms>` | hash | counters ([`stats`]) |
//! | `{{prefix}}:purge:<token>` | string | a bulk purge confirmation, 5 min ([`admin`]) |
//! | `{{prefix}}:expired:<record key>` | string | expiration dedupe marker ([`expiry`]) |
//!
//! The admin keys share the `{prefix}` hash tag: one cluster slot, so they pipeline.
//!
//! The server keeps no state of its own: several instances can share one Redis.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod error;
pub mod events;
pub mod expiry;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod safety;
pub mod stats;
pub mod store;

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::routing::{any, get, post};
use axum::Router;
use idemgate_protocol::admin::REPORT_PATH;
use idemgate_protocol::{CLAIM_PATH, COMPLETE_PATH, RELEASE_PATH};
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

pub use auth::AdminTokens;
pub use backend::Backend;
pub use config::{Cli, Command, Config, ServeArgs};
pub use error::AppError;
pub use store::{Store, StoreError};

/// Shared state of both listeners, behind an `Arc`.
pub struct AppState {
    /// The Redis store (a self-reconnecting connection; every call bounded by the
    /// configured timeout).
    pub store: Store,
    /// Admin API tokens.
    pub tokens: AdminTokens,
    /// Prometheus metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Publishes events (never blocks).
    pub events: events::EventBus,
    /// Fans the event stream out to SSE clients.
    pub hub: events::EventHub,
    /// Cancelled on shutdown: SSE streams and background tasks end.
    pub shutdown: CancellationToken,
    /// Directory of the built dashboard, if any.
    pub dashboard_dir: Option<std::path::PathBuf>,
    /// The latest Redis safety report ([`safety`]).
    pub safety: Arc<safety::Safety>,
}

impl AppState {
    /// State over a store with these admin tokens; starts the event writer and reader
    /// tasks (call inside a tokio runtime). They stop when the state is dropped or
    /// [`AppState::shutdown`] is cancelled.
    ///
    /// # Errors
    /// Only a metric definition Prometheus refuses (a programming error).
    pub fn new(store: Store, tokens: AdminTokens) -> Result<Arc<Self>, prometheus::Error> {
        let metrics = Arc::new(metrics::Metrics::new()?);
        let shutdown = CancellationToken::new();
        let events = events::EventBus::start(store.clone(), metrics.clone());
        let hub = events::EventHub::start(store.clone(), metrics.clone(), shutdown.clone());
        Ok(Arc::new(Self {
            store,
            tokens,
            metrics,
            events,
            hub,
            shutdown,
            dashboard_dir: None,
            safety: Arc::default(),
        }))
    }

    /// Serves the built dashboard from `dir` (builder style, before sharing the state).
    pub fn with_dashboard_dir(mut self: Arc<Self>, dir: Option<std::path::PathBuf>) -> Arc<Self> {
        if let Some(state) = Arc::get_mut(&mut self) {
            state.dashboard_dir = dir;
        }
        self
    }
}

impl Drop for AppState {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Request tracing at DEBUG, with the path only: query strings are never logged (the
/// SSE endpoint takes the admin token as `?access_token=`). Failures are not logged here
/// because [`AppError`] logs each one once, with its cause.
type MakeSpan = fn(&axum::http::Request<axum::body::Body>) -> tracing::Span;

fn trace_layer() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    MakeSpan,
    tower_http::trace::DefaultOnRequest,
    tower_http::trace::DefaultOnResponse,
    tower_http::trace::DefaultOnBodyChunk,
    tower_http::trace::DefaultOnEos,
    (),
> {
    fn span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
        tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
    }
    TraceLayer::new_for_http()
        .make_span_with(span as MakeSpan)
        .on_failure(())
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
        .route(REPORT_PATH, post(api::report))
        .route("/healthz", get(api::healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(api::MAX_BODY_BYTES))
        .layer(trace_layer())
        .with_state(state)
}

/// The admin router (see [`admin`]): `/api/*` behind [`auth::require_token`] except
/// `/api/health`; `/metrics`; the dashboard (or the placeholder) at `/`.
pub fn admin_app(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/keys", get(admin::keys_list))
        .route(
            "/api/keys/{scope}/{key}",
            get(admin::key_show).delete(admin::key_purge),
        )
        .route("/api/keys/{scope}/{key}/release", post(admin::key_release))
        .route(
            "/api/record",
            get(admin::record_show).delete(admin::record_purge),
        )
        .route("/api/record/release", post(admin::record_release))
        .route("/api/purge", post(admin::bulk_purge))
        .route("/api/stats", get(admin::stats))
        .route("/api/events", get(admin::events))
        .route("/api/events/recent", get(admin::events_recent))
        .route("/api/openapi.json", get(admin::openapi))
        .route("/api/{*rest}", any(not_found))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let router = Router::new()
        .route("/api/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .merge(api);
    let router = match &state.dashboard_dir {
        Some(dir) => router.fallback_service(
            tower_http::services::ServeDir::new(dir)
                .fallback(tower_http::services::ServeFile::new(dir.join("index.html"))),
        ),
        None => router.route("/", get(admin::index)).fallback(not_found),
    };
    router.layer(trace_layer()).with_state(state)
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
    /// The metrics registry refused a definition (a programming error).
    #[error("metrics: {0}")]
    Metrics(String),
    /// Redis evicts keys and `--allow-evicting-redis` is not set (the message names the
    /// node, the setting and the fix).
    #[error("{0}")]
    UnsafeRedis(String),
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
/// Redis settings are checked first ([`safety::check_at_start`]); Redis that cannot be
/// reached does not stop the start: while it is down the store API answers 503.
///
/// # Errors
/// [`ServeError`] when a listener cannot bind or fails, or Redis evicts keys without
/// `--allow-evicting-redis`.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let backend = match config.redis {
        config::RedisSpec::Single(client) => Backend::single(*client, config.redis_timeout),
        config::RedisSpec::Cluster(seeds) => Backend::cluster(&seeds, config.redis_timeout),
        config::RedisSpec::Sentinel {
            sentinels,
            master,
            client,
        } => Backend::sentinel(&sentinels, &master, &client, config.redis_timeout),
    }
    .map_err(StoreError::from)?;
    let store = Store::with_backend(backend, config.key_prefix.clone(), config.redis_timeout)
        .with_wait(config.wait);
    if let Some(w) = config.wait {
        tracing::info!(
            replicas = w.replicas,
            timeout_ms = w.timeout.as_millis() as u64,
            "claims and completes wait for replica acknowledgements (WAIT)"
        );
    }
    let state = AppState::new(store.clone(), config.tokens.clone())
        .map_err(|e| ServeError::Metrics(e.to_string()))?
        .with_dashboard_dir(config.dashboard_dir.clone());
    if config.tokens.is_empty() {
        tracing::warn!(
            "NO ADMIN TOKEN IS CONFIGURED: every /api call except /api/health answers 401; \
             set IDEMGATE_ADMIN_TOKEN or --admin-token-file"
        );
    }
    safety::check_at_start(
        &store,
        &state.safety,
        &config.safety,
        &state.metrics,
        &state.events,
    )
    .await
    .map_err(ServeError::UnsafeRedis)?;
    tokio::spawn(safety::run(
        store.clone(),
        state.safety.clone(),
        config.safety.clone(),
        state.metrics.clone(),
        state.events.clone(),
        state.shutdown.clone(),
    ));
    tokio::spawn(expiry::run(
        store,
        state.events.clone(),
        state.metrics.clone(),
        state.shutdown.clone(),
    ));

    let bind = |what: &'static str, addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { what, addr, source })
    };
    let store_listener = bind("store API", config.store_listen).await?;
    let admin_listener = bind("admin", config.admin_listen).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let cancel = state.shutdown.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        // SSE streams and background tasks end; the listeners stop accepting.
        cancel.cancel();
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
