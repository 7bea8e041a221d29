//! Expirations, reported exactly once per key even with several server instances.
//!
//! Redis tells every subscriber when a key expires (keyspace notifications, channel
//! `__keyevent@<db>__:expired`). Each instance subscribes on every master (notifications
//! are node-local on a cluster) and, for each expired record key, tries
//! `SET {prefix}:expired:<record key> 1 NX PX 5000`: only the instance that sets the marker
//! publishes the `expired` event, so two instances report it once.
//!
//! Notifications must be enabled: at start the server adds `E` and `x` to
//! `notify-keyspace-events` with `CONFIG SET` on each master. Where `CONFIG` is refused
//! (managed Redis), enable `notify-keyspace-events Ex` in the server configuration; the
//! server logs a warning and expirations are not reported until then.
//!
//! Limits: Redis reports an expiration when it deletes the key (on access or by its
//! active expiry cycle), so the event may come a little after the TTL; notifications
//! published while an instance is disconnected from a node are lost (pub/sub is
//! fire-and-forget); a record that expires twice within the marker's 5 s is reported once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use idemgate_protocol::admin::EventKind;
use tokio_util::sync::CancellationToken;

use crate::backend::Node;
use crate::events::{event, EventBus};
use crate::keys::split_record_key;
use crate::metrics::Metrics;
use crate::store::Store;

/// Lifetime of a dedupe marker, milliseconds.
pub const MARKER_TTL_MS: u64 = 5000;
/// How often the set of masters is re-read.
pub const TOPOLOGY_REFRESH: Duration = Duration::from_secs(30);

/// Runs until `stop`: one subscriber per master.
pub async fn run(store: Store, events: EventBus, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut tasks: HashMap<Node, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        match store.timed(store.backend().nodes()).await {
            Ok(nodes) => {
                tasks.retain(|node, task| {
                    let keep = nodes.contains(node) && !task.is_finished();
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for node in nodes {
                    tasks.entry(node.clone()).or_insert_with(|| {
                        tokio::spawn(listen(
                            store.clone(),
                            node,
                            events.clone(),
                            metrics.clone(),
                            stop.clone(),
                        ))
                    });
                }
            }
            Err(err) => tracing::debug!(error = %err, "expirations: cannot list nodes yet"),
        }
        let wait = if tasks.is_empty() {
            Duration::from_secs(1)
        } else {
            TOPOLOGY_REFRESH
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    for (_, task) in tasks {
        task.abort();
    }
}

/// Adds `E` and `x` to the node's `notify-keyspace-events`; logs when it cannot.
async fn enable_notifications(store: &Store, node: &Node) {
    let result = async {
        let mut conn = store.conn().await?;
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("notify-keyspace-events");
        let current: Vec<String> = store.timed(conn.on_node(node, get)).await?;
        let flags = current.get(1).cloned().unwrap_or_default();
        let has_x = flags.contains('x') || flags.contains('A');
        if flags.contains('E') && has_x {
            return Ok::<_, crate::store::StoreError>(false);
        }
        let mut wanted = flags.clone();
        if !wanted.contains('E') {
            wanted.push('E');
        }
        if !has_x {
            wanted.push('x');
        }
        let mut set = redis::cmd("CONFIG");
        set.arg("SET").arg("notify-keyspace-events").arg(&wanted);
        store.timed(conn.on_node::<()>(node, set)).await?;
        Ok(true)
    }
    .await;
    match result {
        Ok(true) => tracing::info!(%node, "enabled keyspace notifications for expirations"),
        Ok(false) => {}
        Err(err) => tracing::warn!(
            %node,
            error = %err,
            "cannot enable keyspace notifications (CONFIG SET notify-keyspace-events Ex); \
             expirations are not reported until the Redis configuration enables them"
        ),
    }
}

async fn listen(
    store: Store,
    node: Node,
    events: EventBus,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut warned = false;
    while !stop.is_cancelled() {
        enable_notifications(&store, &node).await;
        let subscribed = async {
            let client = store.backend().node_client(&node)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe("__keyevent@*__:expired").await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(store.timeout() * 4, subscribed).await {
            Ok(Ok(p)) => p,
            Ok(Err(err)) => {
                if !warned {
                    tracing::warn!(%node, error = %err, "expirations: cannot subscribe; retrying");
                    warned = true;
                }
                metrics.redis_errors.inc();
                wait(&stop, Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => {
                wait(&stop, Duration::from_secs(1)).await;
                continue;
            }
        };
        warned = false;
        tracing::debug!(%node, "expirations: subscribed");
        let mut messages = pubsub.into_on_message();
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                m = messages.next() => m,
            };
            let Some(msg) = msg else {
                tracing::debug!(%node, "expirations: subscription ended; resubscribing");
                break;
            };
            let Ok(rkey) = msg.get_payload::<String>() else {
                continue;
            };
            if let Some((scope, key)) = split_record_key(&store, &rkey) {
                report_once(&store, &events, &metrics, &rkey, scope, key).await;
            }
        }
        wait(&stop, Duration::from_millis(200)).await;
    }
}

async fn report_once(
    store: &Store,
    events: &EventBus,
    metrics: &Metrics,
    rkey: &str,
    scope: &str,
    key: &str,
) {
    let marker = store.admin_key(&format!("expired:{rkey}"));
    let claimed = async {
        let mut conn = store.conn().await?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&marker)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(MARKER_TTL_MS);
        let set: Option<String> = store.timed(conn.query(&cmd)).await?;
        Ok::<_, crate::store::StoreError>(set.is_some())
    }
    .await;
    match claimed {
        Ok(true) => {
            let mut e = event(EventKind::Expired);
            e.scope = Some(scope.to_owned());
            e.key = Some(key.to_owned());
            events.publish(e);
        }
        Ok(false) => {}
        Err(err) => {
            metrics.redis_errors.inc();
            tracing::debug!(error = %err, "expirations: cannot set the dedupe marker");
        }
    }
}

async fn wait(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}
