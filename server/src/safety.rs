//! Whether Redis can keep the promise: the settings the guarantee depends on, read at start
//! and every `--redis-check-interval-s` from every master.
//!
//! | what | read with | rule |
//! |---|---|---|
//! | eviction | `CONFIG GET maxmemory`, `maxmemory-policy` | `allkeys-*` or `volatile-*` with `maxmemory` > 0 is **unsafe**: under memory pressure Redis evicts records, and every record has a TTL, so `volatile-*` evicts them too ([Redis key eviction](https://redis.io/docs/latest/develop/reference/eviction/)). Refused at start unless `--allow-evicting-redis`. |
//! | persistence | `CONFIG GET appendonly`, `appendfsync`, `save` | AOF is ok (`appendfsync no` is a warning: the OS decides when data reaches the disk); snapshots only or nothing is a **warning**: a restart forgets records ([Redis persistence](https://redis.io/docs/latest/operate/oss_and_stack/management/persistence/)). |
//! | restarts | `INFO server` `run_id` | a changed `run_id` (a restart or a failover to another process) is an event and counted. |
//! | role | `INFO replication` `role` | reported. |
//!
//! Where Redis refuses `CONFIG` (disabled or renamed, as on managed Redis, or no ACL
//! permission), both checks say **cannot verify**: nothing is guessed, and the server
//! starts. Where Redis cannot be reached the last result stays (with its `checked_ms`).
//!
//! Results go to `GET /api/health` (`redis_safety`), `/metrics`, the log (on changes) and
//! the event stream (`redis_unsafe`, `redis_restarted`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use idemgate_protocol::admin::{
    Event, EventKind, Persistence, RedisNodeSafety, RedisSafety, SafetyLevel,
};
use redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio_util::sync::CancellationToken;

use crate::backend::Node;
use crate::events::{event, now_ms, EventBus};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Default of `--redis-check-interval-s`, seconds.
pub const DEFAULT_CHECK_INTERVAL_S: u64 = 60;
/// Largest `--redis-check-interval-s`, seconds (one day).
pub const MAX_CHECK_INTERVAL_S: u64 = 86_400;

/// Flags of the Redis safety checks (part of `serve`).
#[derive(Debug, Clone, Args)]
pub struct SafetyArgs {
    /// Start even when Redis evicts keys (an `allkeys-*` or `volatile-*` maxmemory-policy
    /// with maxmemory > 0). Records can then be evicted under memory pressure and a retry
    /// executes a second time; /api/health says "unsafe".
    #[arg(long, env = "IDEMGATE_ALLOW_EVICTING_REDIS")]
    pub allow_evicting_redis: bool,

    /// How often the Redis settings are checked again, in seconds (1..=86400).
    #[arg(long, env = "IDEMGATE_REDIS_CHECK_INTERVAL_S", default_value_t = DEFAULT_CHECK_INTERVAL_S)]
    pub redis_check_interval_s: u64,
}

impl Default for SafetyArgs {
    fn default() -> Self {
        Self {
            allow_evicting_redis: false,
            redis_check_interval_s: DEFAULT_CHECK_INTERVAL_S,
        }
    }
}

impl SafetyArgs {
    /// Validates the flags.
    ///
    /// # Errors
    /// The interval is outside 1..=[`MAX_CHECK_INTERVAL_S`]; the message names the flag.
    pub fn validate(&self) -> Result<SafetyConfig, String> {
        if !(1..=MAX_CHECK_INTERVAL_S).contains(&self.redis_check_interval_s) {
            return Err(format!(
                "--redis-check-interval-s / IDEMGATE_REDIS_CHECK_INTERVAL_S must be 1..={MAX_CHECK_INTERVAL_S}, got {}",
                self.redis_check_interval_s
            ));
        }
        Ok(SafetyConfig {
            allow_evicting: self.allow_evicting_redis,
            interval: Duration::from_secs(self.redis_check_interval_s),
        })
    }
}

/// Validated safety settings.
#[derive(Debug, Clone)]
pub struct SafetyConfig {
    /// `--allow-evicting-redis`.
    pub allow_evicting: bool,
    /// `--redis-check-interval-s`.
    pub interval: Duration,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        Self {
            allow_evicting: false,
            interval: Duration::from_secs(DEFAULT_CHECK_INTERVAL_S),
        }
    }
}

/// Whether a `maxmemory-policy` evicts keys: `allkeys-*` and `volatile-*` (all our records
/// have a TTL, so `volatile-*` evicts them as well). `noeviction` does not.
pub fn is_evicting(policy: &str) -> bool {
    policy.starts_with("allkeys-") || policy.starts_with("volatile-")
}

/// The settings of one node as read from Redis (`None`: refused or absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSettings {
    /// `maxmemory`, bytes.
    pub maxmemory_bytes: Option<u64>,
    /// `maxmemory-policy`.
    pub maxmemory_policy: Option<String>,
    /// `appendonly` is `yes`.
    pub appendonly: Option<bool>,
    /// `appendfsync`.
    pub appendfsync: Option<String>,
    /// `save`.
    pub save: Option<String>,
    /// `INFO replication` `role`.
    pub role: Option<String>,
    /// `INFO server` `run_id`.
    pub run_id: Option<String>,
    /// Why `CONFIG GET` was refused, when it was.
    pub config_error: Option<String>,
}

/// Applies the rules of this module to one node's settings; returns its report and one
/// message per problem (naming the node, the setting and the fix).
pub fn evaluate(node: &str, s: &NodeSettings) -> (RedisNodeSafety, Vec<String>) {
    let mut messages = Vec::new();
    let eviction = match (s.maxmemory_bytes, s.maxmemory_policy.as_deref()) {
        (Some(max), Some(policy)) if max > 0 && is_evicting(policy) => {
            messages.push(format!(
                "{node}: maxmemory-policy {policy} with maxmemory {max} bytes evicts idempotency records under memory pressure (every record has a TTL, so volatile-* policies evict them too) and a retry then executes a second time; set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf)"
            ));
            SafetyLevel::Unsafe
        }
        (Some(_), Some(_)) => SafetyLevel::Ok,
        _ => SafetyLevel::CannotVerify,
    };
    let persistence = match (s.appendonly, s.save.as_deref()) {
        (Some(true), _) => Some(Persistence::Aof),
        (Some(false), Some(save)) if !save.trim().is_empty() => Some(Persistence::Rdb),
        (Some(false), Some(_)) => Some(Persistence::None),
        _ => None,
    };
    let persistence_check = match persistence {
        Some(Persistence::Aof) if s.appendfsync.as_deref() == Some("no") => {
            messages.push(format!(
                "{node}: appendfsync no leaves it to the operating system when the append-only file reaches the disk (a crash can lose about 30 s of records); set appendfsync everysec"
            ));
            SafetyLevel::Warning
        }
        Some(Persistence::Aof) => SafetyLevel::Ok,
        Some(Persistence::Rdb) => {
            messages.push(format!(
                "{node}: only RDB snapshots (save \"{}\", appendonly no): a restart loses the records written since the last snapshot and their retries execute again; set appendonly yes and appendfsync everysec",
                s.save.as_deref().unwrap_or_default()
            ));
            SafetyLevel::Warning
        }
        Some(Persistence::None) => {
            messages.push(format!(
                "{node}: no persistence (appendonly no, save \"\"): a restart forgets every record and their retries execute again; set appendonly yes and appendfsync everysec"
            ));
            SafetyLevel::Warning
        }
        None => SafetyLevel::CannotVerify,
    };
    if let Some(err) = &s.config_error {
        messages.push(format!(
            "{node}: CONFIG GET is refused ({err}): eviction and persistence cannot be verified; make sure maxmemory-policy is noeviction and appendonly is yes (ask your provider)"
        ));
    } else if eviction == SafetyLevel::CannotVerify
        || persistence_check == SafetyLevel::CannotVerify
    {
        messages.push(format!(
            "{node}: CONFIG GET did not report every setting: what it left out cannot be verified"
        ));
    }
    let report = RedisNodeSafety {
        node: node.to_owned(),
        maxmemory_bytes: s.maxmemory_bytes,
        maxmemory_policy: s.maxmemory_policy.clone(),
        appendonly: s.appendonly,
        appendfsync: s.appendfsync.clone(),
        save: s.save.clone(),
        persistence,
        role: s.role.clone(),
        run_id: s.run_id.clone(),
        eviction,
        persistence_check,
    };
    (report, messages)
}

/// Whether an error means Redis answered and refused the command (unknown or renamed
/// command, no ACL permission) rather than being unreachable.
fn refused(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::ResponseError | ServerErrorKind::NoPerm)
            | ErrorKind::Extension
    )
}

/// The value of `field` in `INFO` text (`field:value` lines).
fn info_field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim_end().split_once(':')?;
        (k == field).then(|| v.to_owned())
    })
}

/// Reads one node's settings. A refused `CONFIG`/`INFO` leaves the fields `None`.
///
/// # Errors
/// Redis cannot be reached, or does not answer within the store timeout.
pub async fn read_node(store: &Store, node: &Node) -> Result<NodeSettings, StoreError> {
    let mut conn = store.conn().await?;
    let mut s = NodeSettings::default();
    let mut config = BTreeMap::new();
    for name in [
        "maxmemory",
        "maxmemory-policy",
        "appendonly",
        "appendfsync",
        "save",
    ] {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let mut c = conn.clone();
        let answer: Result<BTreeMap<String, String>, StoreError> =
            store.timed(async move { c.on_node(node, cmd).await }).await;
        match answer {
            Ok(map) => config.extend(map),
            Err(StoreError::Redis(e)) if refused(&e) => {
                s.config_error = Some(e.to_string());
                break;
            }
            Err(e) => return Err(e),
        }
    }
    s.maxmemory_bytes = config.get("maxmemory").and_then(|v| v.parse().ok());
    s.maxmemory_policy = config.get("maxmemory-policy").cloned();
    s.appendonly = config.get("appendonly").map(|v| v == "yes");
    s.appendfsync = config.get("appendfsync").cloned();
    s.save = config.get("save").cloned();
    for (section, field) in [("server", "run_id"), ("replication", "role")] {
        let mut cmd = redis::cmd("INFO");
        cmd.arg(section);
        let answer: Result<String, StoreError> =
            store.timed(async { conn.on_node(node, cmd).await }).await;
        let value = match answer {
            Ok(text) => info_field(&text, field),
            Err(StoreError::Redis(e)) if refused(&e) => None,
            Err(e) => return Err(e),
        };
        match field {
            "run_id" => s.run_id = value,
            _ => s.role = value,
        }
    }
    Ok(s)
}

/// Reads every master's settings (one node for a single server).
///
/// # Errors
/// Redis cannot be reached or does not answer in time.
pub async fn read_all(store: &Store) -> Result<Vec<(Node, NodeSettings)>, StoreError> {
    let nodes = store.timed(store.backend().nodes()).await?;
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        let settings = read_node(store, &node).await?;
        out.push((node, settings));
    }
    Ok(out)
}

#[derive(Default)]
struct Inner {
    last: Option<RedisSafety>,
    run_ids: BTreeMap<String, String>,
    restarts: u64,
}

/// The latest safety report and what the next check compares against. Shared by the
/// admin API and the checking task.
#[derive(Default)]
pub struct Safety {
    inner: Mutex<Inner>,
}

impl Safety {
    /// The latest report, `None` before a check answered.
    pub fn current(&self) -> Option<RedisSafety> {
        self.lock().last.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one check: builds the report, compares it with the previous one (run ids,
    /// newly unsafe nodes), updates the metrics and logs what changed. Returns the report
    /// and the events to publish.
    pub fn record(
        &self,
        nodes: &[(Node, NodeSettings)],
        config: &SafetyConfig,
        metrics: &Metrics,
    ) -> (RedisSafety, Vec<Event>) {
        let mut inner = self.lock();
        let previous = inner.last.take();
        let mut events = Vec::new();
        let mut reports = Vec::new();
        let mut messages = Vec::new();
        for (node, settings) in nodes {
            let name = node.to_string();
            let (report, mut msgs) = evaluate(&name, settings);
            let before = previous
                .as_ref()
                .and_then(|p| p.nodes.iter().find(|n| n.node == name));
            if report.eviction == SafetyLevel::Unsafe
                && before.is_none_or(|b| b.eviction != SafetyLevel::Unsafe)
            {
                let mut e = event(EventKind::RedisUnsafe);
                e.detail = msgs.first().cloned();
                events.push(e);
            }
            // One master (a single server, or the master Sentinel names): its run_id is
            // compared whatever its address, so a failover to another host counts too.
            let identity = if nodes.len() == 1 {
                "master".to_owned()
            } else {
                name.clone()
            };
            if let Some(run_id) = &report.run_id {
                if let Some(old) = inner.run_ids.insert(identity, run_id.clone()) {
                    if &old != run_id {
                        inner.restarts += 1;
                        metrics.redis_restarts.inc();
                        let lost = match report.persistence {
                            Some(Persistence::Aof) => {
                                "records it had not yet written to its append-only file are gone"
                            }
                            Some(Persistence::Rdb) => {
                                "records written since its last snapshot are gone"
                            }
                            Some(Persistence::None) => {
                                "it has no persistence: every record it held is gone"
                            }
                            None => "what it had not persisted is gone",
                        };
                        let detail = format!(
                            "{name}: run_id changed from {} to {}: Redis restarted or failed over; {lost}",
                            short(&old),
                            short(run_id)
                        );
                        tracing::warn!("{detail}");
                        let mut e = event(EventKind::RedisRestarted);
                        e.detail = Some(detail);
                        events.push(e);
                    }
                }
            }
            messages.append(&mut msgs);
            reports.push(report);
        }
        let worst = |f: fn(&RedisNodeSafety) -> SafetyLevel| {
            reports
                .iter()
                .map(f)
                .max()
                .unwrap_or(SafetyLevel::CannotVerify)
        };
        let eviction = worst(|n| n.eviction);
        let persistence = worst(|n| n.persistence_check);
        let report = RedisSafety {
            status: eviction.max(persistence),
            eviction,
            persistence,
            evicting_allowed: config.allow_evicting,
            messages,
            nodes: reports,
            restarts: inner.restarts,
            checked_ms: now_ms(),
        };
        let changed = previous
            .as_ref()
            .is_none_or(|p| p.messages != report.messages);
        if changed {
            for m in &report.messages {
                if report.eviction == SafetyLevel::Unsafe && m.contains("maxmemory-policy") {
                    tracing::error!("UNSAFE REDIS: {m}");
                } else {
                    tracing::warn!("{m}");
                }
            }
            if report.messages.is_empty() {
                tracing::info!("Redis settings keep the promise: noeviction (or no memory limit) and AOF on every master");
            }
        }
        for (check, level) in [
            ("eviction", eviction),
            ("persistence", persistence),
            ("overall", report.status),
        ] {
            metrics
                .redis_safety
                .with_label_values(&[check])
                .set(level_value(level));
        }
        metrics
            .redis_persistence
            .set(persistence_value(&report.nodes));
        inner.last = Some(report.clone());
        (report, events)
    }
}

fn short(run_id: &str) -> &str {
    run_id.get(..8).unwrap_or(run_id)
}

/// `idemgate_redis_safety` value of a level: 0 ok, 1 cannot verify, 2 warning, 3 unsafe.
pub fn level_value(level: SafetyLevel) -> i64 {
    match level {
        SafetyLevel::Ok => 0,
        SafetyLevel::CannotVerify => 1,
        SafetyLevel::Warning => 2,
        SafetyLevel::Unsafe => 3,
    }
}

/// `idemgate_redis_persistence` value, the weakest over the nodes: 2 AOF, 1 RDB snapshots
/// only, 0 none, -1 cannot verify.
pub fn persistence_value(nodes: &[RedisNodeSafety]) -> i64 {
    nodes
        .iter()
        .map(|n| match n.persistence {
            Some(Persistence::Aof) => 2,
            Some(Persistence::Rdb) => 1,
            Some(Persistence::None) => 0,
            None => -1,
        })
        .min()
        .unwrap_or(-1)
}

/// The start-time check: records the first report (publishing its events). Refuses an
/// evicting Redis unless allowed; Redis that cannot be reached is only logged (the
/// periodic check tries again).
///
/// # Errors
/// The report's messages about eviction, when a node evicts and `--allow-evicting-redis`
/// is not set.
pub async fn check_at_start(
    store: &Store,
    safety: &Safety,
    config: &SafetyConfig,
    metrics: &Metrics,
    events: &EventBus,
) -> Result<(), String> {
    match read_all(store).await {
        Ok(nodes) => {
            let (report, evs) = safety.record(&nodes, config, metrics);
            if report.eviction == SafetyLevel::Unsafe && !config.allow_evicting {
                let why: Vec<&str> = report
                    .messages
                    .iter()
                    .filter(|m| m.contains("maxmemory-policy"))
                    .map(String::as_str)
                    .collect();
                return Err(format!(
                    "refusing to start: Redis can evict idempotency records. {} (or start with --allow-evicting-redis / IDEMGATE_ALLOW_EVICTING_REDIS=true to accept that a retry may execute twice)",
                    why.join("; ")
                ));
            }
            for e in evs {
                events.publish(e);
            }
        }
        Err(err) => {
            metrics.redis_errors.inc();
            tracing::warn!(
                error = %err,
                "cannot check the Redis settings at start; trying again every {} s",
                config.interval.as_secs()
            );
        }
    }
    Ok(())
}

/// Checks again every `config.interval` until `shutdown`; publishes the events of each
/// check. A check that cannot reach Redis keeps the last report.
pub async fn run(
    store: Store,
    safety: std::sync::Arc<Safety>,
    config: SafetyConfig,
    metrics: std::sync::Arc<Metrics>,
    events: EventBus,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the start-time check just ran.
    tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match read_all(&store).await {
            Ok(nodes) => {
                let (_, evs) = safety.record(&nodes, &config, &metrics);
                for e in evs {
                    events.publish(e);
                }
            }
            Err(err) => {
                metrics.redis_errors.inc();
                tracing::debug!(error = %err, "Redis settings check: Redis did not answer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max: u64, policy: &str, aof: bool, save: &str) -> NodeSettings {
        NodeSettings {
            maxmemory_bytes: Some(max),
            maxmemory_policy: Some(policy.into()),
            appendonly: Some(aof),
            appendfsync: Some("everysec".into()),
            save: Some(save.into()),
            role: Some("master".into()),
            run_id: Some("abc".into()),
            config_error: None,
        }
    }

    #[test]
    fn evicting_policies_with_a_limit_are_unsafe() {
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-ttl",
            "volatile-lfu",
            "volatile-random",
        ] {
            let (r, m) = evaluate("n", &settings(1 << 20, policy, true, ""));
            assert_eq!(r.eviction, SafetyLevel::Unsafe, "{policy}");
            assert!(m[0].contains("noeviction"), "{m:?}");
            let (r, _) = evaluate("n", &settings(0, policy, true, ""));
            assert_eq!(r.eviction, SafetyLevel::Ok, "{policy} without a limit");
        }
        let (r, m) = evaluate("n", &settings(1 << 20, "noeviction", true, ""));
        assert_eq!(
            (r.eviction, r.persistence_check),
            (SafetyLevel::Ok, SafetyLevel::Ok)
        );
        assert!(m.is_empty(), "{m:?}");
    }

    #[test]
    fn persistence_is_aof_rdb_or_none() {
        let (r, _) = evaluate("n", &settings(0, "noeviction", false, "3600 1"));
        assert_eq!(
            (r.persistence, r.persistence_check),
            (Some(Persistence::Rdb), SafetyLevel::Warning)
        );
        let (r, m) = evaluate("n", &settings(0, "noeviction", false, ""));
        assert_eq!(
            (r.persistence, r.persistence_check),
            (Some(Persistence::None), SafetyLevel::Warning)
        );
        assert!(m[0].contains("no persistence"), "{m:?}");
        let mut s = settings(0, "noeviction", true, "");
        s.appendfsync = Some("no".into());
        assert_eq!(evaluate("n", &s).0.persistence_check, SafetyLevel::Warning);
    }

    #[test]
    fn a_refused_config_cannot_be_verified() {
        let s = NodeSettings {
            config_error: Some("ERR unknown command 'CONFIG'".into()),
            run_id: Some("abc".into()),
            ..NodeSettings::default()
        };
        let (r, m) = evaluate("n", &s);
        assert_eq!(
            (r.eviction, r.persistence_check),
            (SafetyLevel::CannotVerify, SafetyLevel::CannotVerify)
        );
        assert!(m[0].contains("cannot be verified"), "{m:?}");
    }

    #[test]
    fn info_fields_are_read_from_lines() {
        let text = "# Server\r\nredis_version:7.0.15\r\nrun_id:0123456789abcdef\r\n";
        assert_eq!(
            info_field(text, "run_id").as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(info_field(text, "role"), None);
    }

    #[test]
    fn interval_is_validated() {
        let mut a = SafetyArgs::default();
        assert_eq!(
            a.validate().map(|c| c.interval),
            Ok(Duration::from_secs(60))
        );
        a.redis_check_interval_s = 0;
        assert!(a
            .validate()
            .unwrap_err()
            .contains("--redis-check-interval-s"));
    }
}
