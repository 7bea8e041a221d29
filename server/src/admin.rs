//! The admin API (`/api/*`, bearer token except health), `/metrics` and the dashboard.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/health` (no token) | [`Health`] |
//! | GET | `/api/keys?<KeyListQuery>` | [`KeyPage`] |
//! | GET | `/api/keys/{scope}/{key}` | [`KeyDetail`], 404 when absent |
//! | DELETE | `/api/keys/{scope}/{key}` | [`PurgeOutcome`] + event `purged` |
//! | POST | `/api/keys/{scope}/{key}/release` | [`PurgeOutcome`] + event `lock_released` |
//! | POST | `/api/purge` | [`BulkPurgeOutcome`] (dry run + confirmation, then real run) |
//! | GET | `/api/stats` | [`StatsResponse`] |
//! | GET | `/api/events` | SSE; see [`events`] |
//! | GET | `/api/events/recent` | `Vec<Event>`, newest first |
//! | GET | `/api/openapi.json` | OpenAPI 3.1 document |
//! | GET | `/metrics` (no token) | Prometheus text |
//!
//! Errors are problem details ([`AppError`]); Redis trouble answers 503.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::Stream;
use idemgate_protocol::admin::{
    BulkPurgeOutcome, BulkPurgeRequest, Event, EventKind, Health, KeyDetail, KeyListQuery, KeyPage,
    PurgeOutcome, StatsResponse,
};
use idemgate_protocol::RecordId;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::auth::Actor;
use crate::error::AppError;
use crate::events::{self as ev, event, now_ms};
use crate::keys;
use crate::AppState;

/// The placeholder dashboard page served at `GET /` without `--dashboard-dir`.
pub const PLACEHOLDER_HTML: &str = include_str!("../assets/placeholder.html");

/// How long a bulk purge confirmation stays valid, milliseconds.
pub const CONFIRMATION_TTL_MS: u64 = 5 * 60 * 1000;
/// Longest a bulk purge (dry run or real) may scan, seconds.
pub const BULK_BUDGET: Duration = Duration::from_secs(120);
/// Default and largest `limit` of `/api/events/recent`.
pub const RECENT_DEFAULT: usize = 50;
/// Largest `limit` of `/api/events/recent`.
pub const RECENT_MAX: usize = 500;
/// Most stream entries `/api/events/recent` reads to fill a filtered answer.
pub const RECENT_SCAN_MAX: usize = 5000;
/// SSE keep-alive comment interval.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /`: the placeholder page.
pub async fn index() -> Html<&'static str> {
    Html(PLACEHOLDER_HTML)
}

/// `GET /api/health`: always 200 with [`Health`] (`redis` is `up` when a PING answered
/// within `--redis-timeout-ms`, with its round trip in ms; `redis_safety` is the latest
/// settings check, see [`crate::safety`]).
pub async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    let started = Instant::now();
    let up = state.store.ping().await.is_ok();
    Json(Health {
        redis: if up { "up" } else { "down" }.to_owned(),
        redis_latency_ms: up.then(|| started.elapsed().as_secs_f64() * 1000.0),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        redis_safety: state.safety.current(),
    })
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, AppError> {
    q.map(|Query(t)| t)
        .map_err(|e| AppError::BadRequest(e.body_text()))
}

/// `GET /api/keys`: one page of the listing ([`keys::list`]).
pub async fn keys_list(
    State(state): State<Arc<AppState>>,
    q: Result<Query<KeyListQuery>, QueryRejection>,
) -> Result<Json<KeyPage>, AppError> {
    let q = query(q)?;
    Ok(Json(keys::list(&state.store, &q).await?))
}

fn record_id(scope: String, key: String) -> Result<RecordId, AppError> {
    let id = RecordId { scope, key };
    id.validate().map_err(AppError::BadRequest)?;
    Ok(id)
}

/// `GET /api/keys/{scope}/{key}`.
pub async fn key_show(
    State(state): State<Arc<AppState>>,
    Path((scope, key)): Path<(String, String)>,
) -> Result<Json<KeyDetail>, AppError> {
    let id = record_id(scope, key)?;
    Ok(Json(keys::detail(&state.store, &id).await?))
}

/// `?scope=…&key=…` of the `/api/record` routes: the same as `/api/keys/{scope}/{key}`,
/// for keys a URL path cannot carry (`.` and `..` are dot segments to every WHATWG URL
/// parser, browsers and the CLI's HTTP client alike, even percent-encoded).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordQuery {
    /// Scope hash or `global`.
    pub scope: String,
    /// The idempotency key.
    pub key: String,
}

/// `GET /api/record?scope=…&key=…`: as [`key_show`].
pub async fn record_show(
    state: State<Arc<AppState>>,
    q: Result<Query<RecordQuery>, QueryRejection>,
) -> Result<Json<KeyDetail>, AppError> {
    let Query(q) = q.map_err(|e| AppError::BadRequest(e.body_text()))?;
    key_show(state, Path((q.scope, q.key))).await
}

/// `DELETE /api/record?scope=…&key=…`: as [`key_purge`].
pub async fn record_purge(
    state: State<Arc<AppState>>,
    actor: Extension<Actor>,
    q: Result<Query<RecordQuery>, QueryRejection>,
) -> Result<Json<PurgeOutcome>, AppError> {
    let Query(q) = q.map_err(|e| AppError::BadRequest(e.body_text()))?;
    key_purge(state, actor, Path((q.scope, q.key))).await
}

/// `POST /api/record/release?scope=…&key=…`: as [`key_release`].
pub async fn record_release(
    state: State<Arc<AppState>>,
    actor: Extension<Actor>,
    q: Result<Query<RecordQuery>, QueryRejection>,
) -> Result<Json<PurgeOutcome>, AppError> {
    let Query(q) = q.map_err(|e| AppError::BadRequest(e.body_text()))?;
    key_release(state, actor, Path((q.scope, q.key))).await
}

async fn delete_one(
    state: &AppState,
    id: &RecordId,
    rule: keys::DeleteRule<'_>,
    kind: EventKind,
    actor: String,
) -> Result<PurgeOutcome, AppError> {
    let mut conn = state.store.conn().await?;
    let rkey = state.store.record_key(id);
    let d = keys::delete(&state.store, &mut conn, &rkey, rule).await?;
    if !d.deleted && rule.skip_state.is_some() && d.state.as_deref() == rule.skip_state {
        return Err(AppError::InFlight(format!(
            "key {:?} is in flight: purging it would let a retry execute while the first request may still run upstream; release its lock instead if you know it is stuck",
            id.key
        )));
    }
    if d.deleted {
        let mut e = event(kind);
        e.scope = Some(id.scope.clone());
        e.key = Some(id.key.clone());
        e.route = d.route;
        e.actor = Some(actor);
        state.events.publish(e);
    }
    Ok(PurgeOutcome { purged: d.deleted })
}

/// `DELETE /api/keys/{scope}/{key}`: deletes a completed record; event `purged`. An
/// in-flight record is refused with 409 `in-flight` (its request may still execute
/// upstream; the release endpoint is the deliberate tool for a stuck lock).
pub async fn key_purge(
    State(state): State<Arc<AppState>>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((scope, key)): Path<(String, String)>,
) -> Result<Json<PurgeOutcome>, AppError> {
    let id = record_id(scope, key)?;
    let purge = keys::DeleteRule {
        skip_state: Some(IN_FLIGHT),
        ..keys::DeleteRule::default()
    };
    Ok(Json(
        delete_one(&state, &id, purge, EventKind::Purged, actor).await?,
    ))
}

/// `POST /api/keys/{scope}/{key}/release`: deletes the record only while in flight or
/// while its outcome is unknown (the holder's late `complete` then gets `lock_lost`, and
/// the next retry executes); event `lock_released`.
pub async fn key_release(
    State(state): State<Arc<AppState>>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((scope, key)): Path<(String, String)>,
) -> Result<Json<PurgeOutcome>, AppError> {
    let id = record_id(scope, key)?;
    let release = keys::DeleteRule {
        only_state: Some(RELEASABLE),
        ..keys::DeleteRule::default()
    };
    Ok(Json(
        delete_one(&state, &id, release, EventKind::LockReleased, actor).await?,
    ))
}

/// The record state a purge never deletes (see [`keys::DeleteRule::skip_state`]).
const IN_FLIGHT: &str = "in_flight";
/// The record states a lock release deletes: a stuck lock, or an unknown outcome.
const RELEASABLE: &str = "in_flight,unknown";

/// The filter a confirmation token is bound to (stored as this JSON, then a newline and
/// the dry run's time in milliseconds).
#[derive(Debug, Serialize, PartialEq)]
struct BulkFilter<'a> {
    scope: Option<&'a str>,
    route: Option<&'a str>,
    prefix: Option<&'a str>,
}

impl BulkFilter<'_> {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.scope {
            parts.push(format!("scope={s}"));
        }
        if let Some(r) = self.route {
            parts.push(format!("route={r}"));
        }
        if let Some(p) = self.prefix {
            parts.push(format!("prefix={p}"));
        }
        parts.join(" ")
    }
}

/// `POST /api/purge`: bulk purge, see [`BulkPurgeRequest`].
///
/// The dry run counts and stores a random confirmation token at `{prefix}:purge:<token>`
/// holding the filter, for [`CONFIRMATION_TTL_MS`]. The real run consumes the token
/// (`GETDEL`; one use) and refuses with 409 `confirmation-mismatch` when it is unknown,
/// expired or bound to another filter. Deletion runs in SCAN batches; one `purged` event
/// names the filter, the count and the actor.
pub async fn bulk_purge(
    State(state): State<Arc<AppState>>,
    Extension(Actor(actor)): Extension<Actor>,
    body: Result<Json<BulkPurgeRequest>, JsonRejection>,
) -> Result<Json<BulkPurgeOutcome>, AppError> {
    let Json(req) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let empty = |o: &Option<String>| o.as_deref().is_none_or(str::is_empty);
    if empty(&req.scope) && empty(&req.route) && empty(&req.prefix) {
        return Err(AppError::BadRequest(
            "a bulk purge needs at least one of scope, route, prefix".into(),
        ));
    }
    let filter = BulkFilter {
        scope: req.scope.as_deref().filter(|s| !s.is_empty()),
        route: req.route.as_deref().filter(|s| !s.is_empty()),
        prefix: req.prefix.as_deref().filter(|s| !s.is_empty()),
    };
    if let Some(scope) = filter.scope {
        keys::check_scope(scope)?;
    }
    let canonical = serde_json::to_string(&filter).unwrap_or_default();
    let store = &state.store;
    let pattern = keys::match_pattern(store, filter.scope, filter.prefix);
    let route = filter.route.unwrap_or("");

    if req.dry_run {
        let matched = std::sync::atomic::AtomicU64::new(0);
        let in_flight = std::sync::atomic::AtomicU64::new(0);
        let dry_run_ms = now_ms();
        let conn = store.conn().await?;
        keys::scan_all(store, &pattern, BULK_BUDGET, |batch| {
            let conn = conn.clone();
            let (matched, in_flight) = (&matched, &in_flight);
            async move {
                let cmds = batch
                    .iter()
                    .map(|k| {
                        let mut c = redis::cmd("HMGET");
                        c.arg(k).arg("state").arg("route");
                        c
                    })
                    .collect();
                let fields: Vec<redis::RedisResult<(Option<String>, Option<String>)>> =
                    conn.many(cmds).await;
                for f in fields {
                    let (st, rt) = f.map_err(crate::store::StoreError::from)?;
                    if !route.is_empty() && rt.as_deref() != Some(route) {
                        continue;
                    }
                    let counter = if st.as_deref() == Some(IN_FLIGHT) {
                        in_flight
                    } else {
                        matched
                    };
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            }
        })
        .await?;
        let canonical = format!("{canonical}\n{dry_run_ms}");
        let token = crate::store::new_fencing_token();
        let mut conn = store.conn().await?;
        let key = store.admin_key(&format!("purge:{token}"));
        store
            .timed(async {
                conn.query::<()>(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&canonical)
                        .arg("PX")
                        .arg(CONFIRMATION_TTL_MS),
                )
                .await
            })
            .await?;
        return Ok(Json(BulkPurgeOutcome::DryRun {
            matched: matched.into_inner(),
            in_flight: in_flight.into_inner(),
            confirmation: token,
            confirmation_expires_ms: now_ms() + CONFIRMATION_TTL_MS,
        }));
    }

    let Some(token) = req.confirmation.as_deref() else {
        return Err(AppError::ConfirmationMismatch(
            "a real bulk purge needs the confirmation token of a dry run with the same filter"
                .into(),
        ));
    };
    if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AppError::ConfirmationMismatch(
            "the confirmation token is not one this server issued".into(),
        ));
    }
    let mut conn = store.conn().await?;
    let key = store.admin_key(&format!("purge:{token}"));
    let bound: Option<String> = store
        .timed(async { conn.query(redis::cmd("GETDEL").arg(&key)).await })
        .await?;
    let dry_run_ms = match bound.as_deref().and_then(|b| b.rsplit_once('\n')) {
        None => {
            return Err(AppError::ConfirmationMismatch(
                "the confirmation token is unknown, used or expired; run the dry run again".into(),
            ))
        }
        Some((f, _)) if f != canonical => {
            return Err(AppError::ConfirmationMismatch(
                "the confirmation token was issued for another filter; run the dry run again"
                    .into(),
            ))
        }
        Some((_, ms)) => ms.parse::<u64>().ok(),
    };
    // Only what the dry run could count: no record claimed after it, none in flight.
    let rule = keys::DeleteRule {
        only_route: filter.route,
        skip_state: Some(IN_FLIGHT),
        created_before_ms: dry_run_ms,
        ..keys::DeleteRule::default()
    };
    let purged = std::sync::atomic::AtomicU64::new(0);
    let skipped = std::sync::atomic::AtomicU64::new(0);
    keys::scan_all(store, &pattern, BULK_BUDGET, |batch| {
        let conn = conn.clone();
        let (purged, skipped) = (&purged, &skipped);
        async move {
            let futures = batch.iter().map(|k| {
                let mut conn = conn.clone();
                async move { keys::delete(store, &mut conn, k, rule).await }
            });
            for d in futures_util::future::join_all(futures).await {
                let d = d?;
                if d.deleted {
                    purged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else if d.state.as_deref() == Some(IN_FLIGHT) {
                    skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Ok(())
        }
    })
    .await?;
    let purged = purged.into_inner();
    let skipped_in_flight = skipped.into_inner();
    let mut e = event(EventKind::Purged);
    e.scope = filter.scope.map(str::to_owned);
    e.route = filter.route.map(str::to_owned);
    e.detail = Some(format!(
        "bulk purge {}: {purged} records ({skipped_in_flight} in flight left alone)",
        filter.describe()
    ));
    e.actor = Some(actor);
    e.count = Some(purged);
    state.events.publish(e);
    Ok(Json(BulkPurgeOutcome::Purged {
        purged,
        skipped_in_flight,
    }))
}

/// `GET /api/stats`: the three windows from Redis, plus `in_flight_now` (counted by a
/// bounded scan; `None` when the keyspace is too large to count within one request).
pub async fn stats(State(state): State<Arc<AppState>>) -> Result<Json<StatsResponse>, AppError> {
    let mut s = crate::stats::read(&state.store, now_ms()).await?;
    s.in_flight_now = count_in_flight(&state).await;
    Ok(Json(s))
}

/// Counts in-flight records when the listing finishes within a few pages.
async fn count_in_flight(state: &AppState) -> Option<u64> {
    let mut q = idemgate_protocol::admin::KeyListQuery {
        state: Some(idemgate_protocol::admin::KeyState::InFlight),
        limit: Some(keys::MAX_LIMIT),
        ..Default::default()
    };
    let mut n = 0u64;
    for _ in 0..4 {
        let page = keys::list(&state.store, &q).await.ok()?;
        n += page.items.len() as u64;
        match page.next_cursor {
            None => return Some(n),
            Some(c) => q.cursor = Some(c),
        }
    }
    None
}

/// `GET /api/events` query parameters.
#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Resume after this stream id (also `Last-Event-ID`; the header wins).
    pub last_event_id: Option<String>,
    /// Comma-separated snake_case kinds to receive (default: all).
    pub kind: Option<String>,
    /// The token, for EventSource (checked by the auth middleware; never logged).
    pub access_token: Option<String>,
}

fn parse_kinds(s: Option<&str>) -> Result<Option<HashSet<EventKind>>, AppError> {
    let Some(s) = s.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    s.split(',')
        .map(|k| {
            serde_json::from_value::<EventKind>(serde_json::Value::String(k.trim().to_owned()))
                .map_err(|_| AppError::BadRequest(format!("unknown event kind {k:?}")))
        })
        .collect::<Result<HashSet<_>, _>>()
        .map(Some)
}

fn kind_name(kind: EventKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `GET /api/events`: Server-Sent Events, one per stream entry:
/// `event: <kind>`, `id: <stream id>`, `data: <Event JSON>`. Resumes after
/// `Last-Event-ID` (header) or `?last_event_id=` without gaps while the id is still in
/// the capped stream; `?kind=a,b` filters. Keep-alive comments every
/// [`SSE_KEEP_ALIVE`]; the stream ends when the server shuts down.
pub async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>, AppError> {
    let q = query(q)?;
    let kinds = parse_kinds(q.kind.as_deref())?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.last_event_id)
        .filter(|s| !s.is_empty());
    if let Some(id) = &last {
        if ev::parse_id(id).is_none() {
            return Err(AppError::BadRequest(format!(
                "last event id {id:?} is not a stream id (<ms>-<seq>)"
            )));
        }
    }
    // The hub must know its position first: it then broadcasts every entry after it, and
    // this client's own position (below) is no older than the hub's.
    if !state.hub.wait_ready(state.store.timeout() * 4).await {
        return Err(AppError::Store(crate::store::StoreError::Timeout {
            timeout_ms: u64::try_from((state.store.timeout() * 4).as_millis()).unwrap_or(0),
        }));
    }
    let rx = state.hub.subscribe();
    // Without a position, start at the stream's newest entry: only later events follow.
    let last = match last {
        Some(id) => Some(id),
        None => ev::read_newest(&state.store, None, 1)
            .await
            .ok()
            .map(|v| v.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone())),
    };
    let (tx, out) = mpsc::channel::<Arc<Event>>(256);
    tokio::spawn(sse_feed(state.clone(), rx, tx, last, kinds));
    let stream = futures_util::stream::unfold(out, |mut out| async move {
        let e = out.recv().await?;
        let data = serde_json::to_string(&*e).unwrap_or_default();
        let item = sse::Event::default()
            .event(kind_name(e.kind))
            .id(e.id.clone())
            .data(data);
        Some((Ok(item), out))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE)))
}

fn newer(id: &str, last: Option<&str>) -> bool {
    match (ev::parse_id(id), last.and_then(ev::parse_id)) {
        (Some(a), Some(b)) => a > b,
        _ => true,
    }
}

/// Feeds one SSE client: catch-up from the stream, then the broadcast; ends on shutdown
/// or when the client is gone.
async fn sse_feed(
    state: Arc<AppState>,
    mut rx: broadcast::Receiver<Arc<Event>>,
    tx: mpsc::Sender<Arc<Event>>,
    mut last: Option<String>,
    kinds: Option<HashSet<EventKind>>,
) {
    state.metrics.sse_clients.inc();
    let stop = state.shutdown.clone();
    let wanted = |e: &Event| kinds.as_ref().is_none_or(|k| k.contains(&e.kind));
    let mut catch_up = last.is_some();
    'feed: loop {
        if catch_up {
            let Some(from) = last.clone() else {
                catch_up = false;
                continue;
            };
            match ev::read_after(&state.store, &from, ev::READ_BATCH).await {
                Ok(batch) => {
                    let full = batch.len() == ev::READ_BATCH;
                    for e in batch {
                        last = Some(e.id.clone());
                        if wanted(&e) && tx.send(Arc::new(e)).await.is_err() {
                            break 'feed;
                        }
                    }
                    catch_up = full;
                }
                Err(err) => {
                    tracing::debug!(error = %err, "sse catch-up failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => break 'feed,
                        () = tx.closed() => break 'feed,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tx.closed() => break,
            r = rx.recv() => match r {
                Ok(e) => {
                    if newer(&e.id, last.as_deref()) {
                        last = Some(e.id.clone());
                        if wanted(&e) && tx.send(e).await.is_err() {
                            break;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => catch_up = true,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
    state.metrics.sse_clients.dec();
}

/// `GET /api/events/recent` query parameters.
#[derive(Debug, Default, Deserialize)]
pub struct RecentQuery {
    /// Most events (1..=500, default 50).
    pub limit: Option<usize>,
    /// Only this scope.
    pub scope: Option<String>,
    /// Only this idempotency key.
    pub key: Option<String>,
    /// Comma-separated kinds.
    pub kind: Option<String>,
}

/// `GET /api/events/recent`: newest first, at most `limit`, reading at most
/// [`RECENT_SCAN_MAX`] stream entries to satisfy the filters.
pub async fn events_recent(
    State(state): State<Arc<AppState>>,
    q: Result<Query<RecentQuery>, QueryRejection>,
) -> Result<Json<Vec<Event>>, AppError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(RECENT_DEFAULT);
    if !(1..=RECENT_MAX).contains(&limit) {
        return Err(AppError::BadRequest(format!(
            "limit must be 1..={RECENT_MAX}, got {limit}"
        )));
    }
    let kinds = parse_kinds(q.kind.as_deref())?;
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    let mut read = 0;
    while out.len() < limit && read < RECENT_SCAN_MAX {
        let batch = ev::read_newest(&state.store, before.as_deref(), ev::READ_BATCH).await?;
        let n = batch.len();
        read += n;
        for e in batch {
            before = Some(e.id.clone());
            let ok = kinds.as_ref().is_none_or(|k| k.contains(&e.kind))
                && q.scope.as_ref().is_none_or(|s| e.scope.as_ref() == Some(s))
                && q.key.as_ref().is_none_or(|k| e.key.as_ref() == Some(k));
            if ok && out.len() < limit {
                out.push(e);
            }
        }
        if n < ev::READ_BATCH {
            break;
        }
    }
    Ok(Json(out))
}

/// `GET /api/openapi.json`: an OpenAPI 3.1 description of the admin API (paths,
/// parameters, auth; bodies are the `idemgate_protocol::admin` types, named in each
/// operation's description).
pub async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}
