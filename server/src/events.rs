//! Live events and their counters, through Redis so every server instance sees the same.
//!
//! # Writing
//! [`EventBus::publish`] never waits and never fails: it puts the event on a bounded
//! channel ([`EVENT_QUEUE`]). A background task takes batches off it and sends one
//! pipeline per batch (all keys share the `{prefix}` hash tag, so a cluster takes it):
//!
//! - `XADD {prefix}:events MAXLEN ~ 10000 * e <Event JSON>`: the one capped stream; its
//!   entry ids are the SSE ids.
//! - `HINCRBY {prefix}:stats:<res>:<bucket_start_ms> <counter> <n>` + `PEXPIRE` for the
//!   three resolutions of [`crate::stats`] (5 s, 1 min, 1 h).
//!
//! When Redis is down the batch is dropped and counted (`idemgate_events_dropped_total`);
//! a full channel drops the event and counts it too. Store calls never wait for events.
//!
//! # Reading
//! [`EventHub`] polls the stream (`XREAD` from the last id seen, every
//! [`POLL_INTERVAL`]) and fans entries out to SSE clients over a broadcast channel.
//! A client resuming after an id first reads the stream with `XRANGE (id +` ([`read_after`])
//! and then follows the broadcast, skipping ids it already sent, so nothing is lost or
//! repeated between the two, and a slow client that lags behind the broadcast reads the
//! stream again.

use std::sync::Arc;
use std::time::Duration;

use idemgate_protocol::admin::{Event, EventKind};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::stats::{self, Counter};
use crate::store::{Store, StoreError};

/// Capacity of the publish channel (events waiting to be written).
pub const EVENT_QUEUE: usize = 8192;
/// Most events written in one pipeline.
pub const WRITE_BATCH: usize = 256;
/// Approximate length cap of the stream (`XADD MAXLEN ~`).
pub const STREAM_MAXLEN: usize = 10_000;
/// How often the hub polls the stream for new entries.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Most entries read per poll or catch-up call.
pub const READ_BATCH: usize = 500;
/// Capacity of the broadcast to SSE clients (a client further behind re-reads the stream).
pub const BROADCAST_CAPACITY: usize = 2048;

/// Now, in Unix milliseconds (this server's clock; used for event times and stat buckets).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An event with empty optional fields, happening now.
pub fn event(kind: EventKind) -> Event {
    Event {
        id: String::new(),
        at_ms: now_ms(),
        kind,
        scope: None,
        key: None,
        route: None,
        status: None,
        detail: None,
        actor: None,
        count: None,
    }
}

/// The counters one event adds to, with the amount (a bulk purge counts its records).
pub fn counters_of(e: &Event) -> Vec<(Counter, u64)> {
    let n = e.count.unwrap_or(1);
    match e.kind {
        EventKind::Claimed => vec![(Counter::Claims, 1), (Counter::Executions, 1)],
        EventKind::Replayed => vec![(Counter::Claims, 1), (Counter::Replays, 1)],
        EventKind::InFlightConflict => {
            vec![(Counter::Claims, 1), (Counter::InFlightConflicts, 1)]
        }
        EventKind::Mismatch => vec![(Counter::Claims, 1), (Counter::Mismatches, 1)],
        EventKind::NotReplayable => vec![(Counter::Claims, 1)],
        // A claim that met an unknown outcome has no status; the `complete` that recorded
        // one carries the status the filter saw.
        EventKind::OutcomeUnknown if e.status.is_none() => vec![(Counter::Claims, 1)],
        EventKind::OutcomeUnknown => vec![(Counter::UnknownOutcomes, 1)],
        EventKind::Completed => vec![(Counter::Completions, 1)],
        EventKind::Released | EventKind::LockReleased => vec![(Counter::Releases, 1)],
        EventKind::Expired => vec![(Counter::Expirations, 1)],
        EventKind::Purged => vec![(Counter::Purges, n)],
        EventKind::LockLost => vec![(Counter::LockLost, 1)],
        EventKind::StoreError => vec![(Counter::StoreErrors, 1)],
        EventKind::Rejected => vec![(Counter::Rejections, 1)],
        EventKind::FailOpen => vec![(Counter::FailOpenPasses, 1)],
        // About Redis itself, not requests: counted in `/metrics`, not in the stats.
        EventKind::RedisUnsafe | EventKind::RedisRestarted => Vec::new(),
    }
}

/// The publishing side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct EventBus {
    tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
}

impl EventBus {
    /// Starts the writer task over `store`; it ends when every [`EventBus`] clone is gone
    /// (after writing what is queued).
    pub fn start(store: Store, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(write_loop(store, rx, metrics.clone()));
        Self { tx, metrics }
    }

    /// Queues `event` (its `id` is assigned by Redis). A full queue drops it and counts.
    pub fn publish(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<Event>, metrics: Arc<Metrics>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let pipe = write_pipeline(&store, &batch);
        let n = batch.len() as u64;
        let result = match store.conn().await {
            Ok(mut conn) => {
                store
                    .timed_for(Duration::from_secs(5), async move {
                        conn.pipe::<()>(&pipe).await
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(err) = result {
            metrics.redis_errors.inc();
            metrics.events_dropped.inc_by(n);
            tracing::warn!(error = %err, events = n, "cannot write events; dropped");
        } else {
            metrics.events_written.inc_by(n);
        }
        batch.clear();
    }
}

fn write_pipeline(store: &Store, batch: &[Event]) -> redis::Pipeline {
    let stream = store.admin_key("events");
    let mut pipe = redis::pipe();
    let mut incr: std::collections::BTreeMap<(String, &'static str), u64> = Default::default();
    let mut ttl: std::collections::BTreeMap<String, u64> = Default::default();
    for e in batch {
        let json = serde_json::to_string(e).unwrap_or_default();
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAXLEN)
            .arg("*")
            .arg("e")
            .arg(json)
            .ignore();
        for (counter, n) in counters_of(e) {
            for res in stats::RESOLUTIONS {
                let key = store.admin_key(&res.bucket_key(e.at_ms));
                ttl.insert(key.clone(), res.ttl_ms());
                *incr.entry((key, counter.field())).or_default() += n;
            }
        }
    }
    for ((key, field), n) in incr {
        pipe.cmd("HINCRBY").arg(&key).arg(field).arg(n).ignore();
    }
    for (key, ms) in ttl {
        pipe.cmd("PEXPIRE").arg(&key).arg(ms).ignore();
    }
    pipe
}

/// Orders stream ids (`<ms>-<seq>`); `None` for a malformed id.
pub fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

type Entries = Vec<(String, Vec<Vec<u8>>)>;

fn decode(entries: Entries) -> Vec<Event> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let mut it = fields.chunks(2);
            let json = it
                .find(|kv| kv.first().map(Vec::as_slice) == Some(b"e"))?
                .get(1)?;
            let mut e: Event = serde_json::from_slice(json).ok()?;
            e.id = id;
            Some(e)
        })
        .collect()
}

/// Up to `count` events after `id` (exclusive), oldest first.
///
/// # Errors
/// Redis errors or timeout.
pub async fn read_after(store: &Store, id: &str, count: usize) -> Result<Vec<Event>, StoreError> {
    let mut conn = store.conn().await?;
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(store.admin_key("events"))
        .arg(format!("({id}"))
        .arg("+")
        .arg("COUNT")
        .arg(count);
    let entries: Entries = store.timed(async move { conn.query(&cmd).await }).await?;
    Ok(decode(entries))
}

/// Up to `count` events, newest first, ending at `before` (exclusive) or the newest.
///
/// # Errors
/// Redis errors or timeout.
pub async fn read_newest(
    store: &Store,
    before: Option<&str>,
    count: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut conn = store.conn().await?;
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(store.admin_key("events"))
        .arg(before.map_or_else(|| "+".to_owned(), |b| format!("({b}")))
        .arg("-")
        .arg("COUNT")
        .arg(count);
    let entries: Entries = store.timed(async move { conn.query(&cmd).await }).await?;
    Ok(decode(entries))
}

/// Fans stream entries out to this instance's SSE clients.
#[derive(Clone)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<Event>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl EventHub {
    /// Starts the poller; it stops when `stop` is cancelled.
    pub fn start(store: Store, metrics: Arc<Metrics>, stop: CancellationToken) -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        tokio::spawn(poll_loop(store, tx.clone(), ready_tx, metrics, stop));
        Self { tx, ready }
    }

    /// A receiver of every event read from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Waits until the poller knows its position in the stream (it broadcasts every entry
    /// after it), at most `limit`; `false` when it does not in time (Redis down).
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let mut ready = self.ready.clone();
        let waited =
            tokio::time::timeout(limit, async move { ready.wait_for(|r| *r).await.is_ok() }).await;
        waited.unwrap_or(false)
    }
}

async fn poll_loop(
    store: Store,
    tx: broadcast::Sender<Arc<Event>>,
    ready: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut last: Option<String> = None;
    let mut failing = false;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
        first = false;
        let result = match &last {
            None => read_newest(&store, None, 1)
                .await
                .map(|v| v.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone()))
                .map(|id| {
                    last = Some(id);
                    Vec::new()
                }),
            Some(id) => read_after(&store, id, READ_BATCH).await,
        };
        match result {
            Ok(events) => {
                if failing {
                    tracing::info!("event reader: redis is back");
                    failing = false;
                }
                ready.send_if_modified(|r| !std::mem::replace(r, true));
                for e in events {
                    last = Some(e.id.clone());
                    // No receivers is fine.
                    let _ = tx.send(Arc::new(e));
                }
            }
            Err(err) => {
                metrics.redis_errors.inc();
                if !failing {
                    tracing::warn!(error = %err, "event reader: cannot read the stream; retrying");
                    failing = true;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_numerically() {
        assert!(parse_id("10-0") > parse_id("9-5"));
        assert!(parse_id("10-10") > parse_id("10-9"));
        assert_eq!(parse_id("x"), None);
    }

    #[test]
    fn every_store_decision_counts_a_claim_once() {
        for kind in [
            EventKind::Claimed,
            EventKind::Replayed,
            EventKind::InFlightConflict,
            EventKind::Mismatch,
            EventKind::NotReplayable,
        ] {
            let claims: u64 = counters_of(&event(kind))
                .iter()
                .filter(|(c, _)| *c == Counter::Claims)
                .map(|(_, n)| n)
                .sum();
            assert_eq!(claims, 1, "{kind:?}");
        }
        let mut purge = event(EventKind::Purged);
        purge.count = Some(7);
        assert_eq!(counters_of(&purge), vec![(Counter::Purges, 7)]);
    }
}
