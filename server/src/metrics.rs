//! Prometheus metrics of this instance, served at `GET /metrics` on the admin listener.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `idemgate_store_call_duration_seconds` | histogram | `call` (claim, complete, release) |
//! | `idemgate_store_outcomes_total` | counter | `call`, `outcome` (e.g. acquired, replay, error) |
//! | `idemgate_redis_errors_total` | counter | |
//! | `idemgate_redis_wait_shortfalls_total` | counter | `call` (claim, complete): `WAIT` counted too few replicas |
//! | `idemgate_sse_clients` | gauge | |
//! | `idemgate_events_written_total` | counter | |
//! | `idemgate_events_dropped_total` | counter | |
//! | `idemgate_filter_reports_total` | counter | `kind` |
//! | `idemgate_redis_safety` | gauge | `check` (eviction, persistence, overall): 0 ok, 1 cannot verify, 2 warning, 3 unsafe ([`crate::safety`]) |
//! | `idemgate_redis_persistence` | gauge | none; weakest over the masters: 2 AOF, 1 RDB snapshots only, 0 none, -1 cannot verify |
//! | `idemgate_redis_restarts_total` | counter | none; `run_id` changes seen (restarts, failovers) |

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The metric handles and their registry.
pub struct Metrics {
    registry: Registry,
    /// Store call latency, seconds, by `call`.
    pub store_latency: HistogramVec,
    /// Store call outcomes by `call` and `outcome`.
    pub store_outcomes: IntCounterVec,
    /// Redis errors seen by any part of the server.
    pub redis_errors: IntCounter,
    /// Claims and completes that `WAIT` found acknowledged by too few replicas, by `call`.
    pub wait_shortfalls: IntCounterVec,
    /// Connected SSE clients.
    pub sse_clients: IntGauge,
    /// Events written to the stream.
    pub events_written: IntCounter,
    /// Events dropped (queue full or Redis down).
    pub events_dropped: IntCounter,
    /// Filter reports received, by `kind`.
    pub filter_reports: IntCounterVec,
    /// Redis safety by `check`: 0 ok, 1 cannot verify, 2 warning, 3 unsafe.
    pub redis_safety: IntGaugeVec,
    /// Weakest persistence over the masters: 2 AOF, 1 RDB only, 0 none, -1 cannot verify.
    pub redis_persistence: IntGauge,
    /// Redis `run_id` changes seen (restarts, failovers).
    pub redis_restarts: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Errors
    /// Only an invalid metric definition (a programming error).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let store_latency = HistogramVec::new(
            HistogramOpts::new(
                "idemgate_store_call_duration_seconds",
                "Store API call latency (including Redis), seconds.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["call"],
        )?;
        let store_outcomes = IntCounterVec::new(
            Opts::new(
                "idemgate_store_outcomes_total",
                "Store API call outcomes by call and outcome.",
            ),
            &["call", "outcome"],
        )?;
        let redis_errors =
            IntCounter::new("idemgate_redis_errors_total", "Redis errors and timeouts.")?;
        let wait_shortfalls = IntCounterVec::new(
            Opts::new(
                "idemgate_redis_wait_shortfalls_total",
                "Claims (undone) and completes (answered 503, retried by the filter) that fewer replicas acknowledged than --redis-wait-replicas.",
            ),
            &["call"],
        )?;
        let sse_clients = IntGauge::new("idemgate_sse_clients", "Connected SSE clients.")?;
        let events_written = IntCounter::new(
            "idemgate_events_written_total",
            "Events written to the Redis stream.",
        )?;
        let events_dropped = IntCounter::new(
            "idemgate_events_dropped_total",
            "Events dropped (queue full or Redis down).",
        )?;
        let filter_reports = IntCounterVec::new(
            Opts::new(
                "idemgate_filter_reports_total",
                "Reports received from the filter, by kind.",
            ),
            &["kind"],
        )?;
        let redis_safety = IntGaugeVec::new(
            Opts::new(
                "idemgate_redis_safety",
                "Redis settings check by check (eviction, persistence, overall): 0 ok, 1 cannot verify, 2 warning, 3 unsafe.",
            ),
            &["check"],
        )?;
        let redis_persistence = IntGauge::new(
            "idemgate_redis_persistence",
            "Weakest Redis persistence over the masters: 2 AOF, 1 RDB snapshots only, 0 none, -1 cannot verify.",
        )?;
        redis_persistence.set(-1);
        for check in ["eviction", "persistence", "overall"] {
            redis_safety.with_label_values(&[check]).set(1);
        }
        let redis_restarts = IntCounter::new(
            "idemgate_redis_restarts_total",
            "Redis run_id changes seen: restarts or failovers.",
        )?;
        registry.register(Box::new(redis_safety.clone()))?;
        registry.register(Box::new(redis_persistence.clone()))?;
        registry.register(Box::new(redis_restarts.clone()))?;
        registry.register(Box::new(store_latency.clone()))?;
        registry.register(Box::new(store_outcomes.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        registry.register(Box::new(wait_shortfalls.clone()))?;
        registry.register(Box::new(sse_clients.clone()))?;
        registry.register(Box::new(events_written.clone()))?;
        registry.register(Box::new(events_dropped.clone()))?;
        registry.register(Box::new(filter_reports.clone()))?;
        Ok(Self {
            registry,
            store_latency,
            store_outcomes,
            redis_errors,
            wait_shortfalls,
            sse_clients,
            events_written,
            events_dropped,
            filter_reports,
            redis_safety,
            redis_persistence,
            redis_restarts,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
