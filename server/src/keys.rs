//! The admin side of the record store: listing with SCAN, one record in detail, deleting.
//!
//! # Listing
//! `SCAN cursor MATCH {prefix}:rec:{scope|*}:{escaped key prefix}* COUNT n` on each master
//! in turn (one for a single server), at most [`MAX_SCANS_PER_PAGE`] SCAN calls per
//! request. SCAN returns every key present for the whole iteration at least once, so a
//! listing that follows `next_cursor` to the end sees every record that lived throughout.
//! A SCAN batch may hold more matches than the page has room for: the matches left over
//! travel in the cursor and open the next page. The cursor is opaque
//! (base64url of JSON `{"n": node, "c": node cursor, "p": pending keys}`): `n` names the
//! node (`host:port`), so it works on a cluster, where each master is scanned in turn.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use idemgate_protocol::admin::{
    KeyDetail, KeyListQuery, KeyPage, KeyState, KeySummary, ResponsePreview, PREVIEW_BYTES,
};
use idemgate_protocol::RecordId;
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::backend::{Conn, Node};
use crate::error::AppError;
use crate::events::now_ms;
use crate::store::Store;

/// `admin_delete` script; see `lua/admin_delete.lua`.
static ADMIN_DELETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/admin_delete.lua")));

/// Most SCAN calls one listing request makes.
pub const MAX_SCANS_PER_PAGE: usize = 16;
/// Default page size.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size.
pub const MAX_LIMIT: u32 = 500;
/// SCAN COUNT used by bulk purge.
pub const BULK_SCAN_COUNT: usize = 1000;

/// The fields a listing reads per record.
const SUMMARY_FIELDS: [&str; 11] = [
    "state",
    "route",
    "method",
    "path",
    "status",
    "replayable",
    "created_ms",
    "completed_ms",
    "expires_ms",
    "lock_expires_ms",
    "replays",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Cursor {
    /// Node being scanned (`host:port`); `None` once every node is done.
    n: Option<String>,
    /// That node's SCAN cursor.
    c: u64,
    /// Matching record keys (without `{prefix}:rec:`) not yet returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    p: Vec<String>,
}

fn encode_cursor(c: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(c).unwrap_or_default())
}

fn decode_cursor(s: &str) -> Result<Cursor, AppError> {
    let bad = || AppError::BadRequest("cursor is not one this server issued".into());
    let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// Escapes SCAN MATCH glob characters (`* ? [ ] \`).
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Checks a scope filter: `global` or 64 lowercase hex.
///
/// # Errors
/// [`AppError::BadRequest`].
pub fn check_scope(scope: &str) -> Result<(), AppError> {
    idemgate_protocol::validate_scope(scope).map_err(AppError::BadRequest)
}

/// The SCAN MATCH pattern for a scope and key prefix.
pub fn match_pattern(store: &Store, scope: Option<&str>, prefix: Option<&str>) -> String {
    format!(
        "{}:rec:{}:{}*",
        store.key_prefix(),
        scope.map_or_else(|| "*".to_owned(), glob_escape),
        prefix.map(glob_escape).unwrap_or_default()
    )
}

/// Splits a record key into (scope, key); `None` for keys of another shape.
pub fn split_record_key<'a>(store: &Store, rkey: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = rkey
        .strip_prefix(store.key_prefix())?
        .strip_prefix(":rec:")?;
    rest.split_once(':')
}

fn num(v: &Option<String>) -> Option<u64> {
    v.as_deref().and_then(|s| s.parse().ok())
}

fn summary_from(scope: &str, key: &str, f: &[Option<String>]) -> Option<KeySummary> {
    let get = |i: usize| f.get(i).cloned().flatten();
    let mut state = match get(0)?.as_str() {
        "in_flight" => KeyState::InFlight,
        "completed" => KeyState::Completed,
        "unknown" => KeyState::Unknown,
        // `released` tombstones and anything else are not records.
        _ => return None,
    };
    // A lock that expired with nothing stored is an unknown outcome (see `lua/claim.lua`).
    if state == KeyState::InFlight && num(&get(9)).is_some_and(|until| until <= now_ms()) {
        state = KeyState::Unknown;
    }
    let expires = match state {
        KeyState::InFlight => num(&get(9)),
        KeyState::Completed | KeyState::Unknown => num(&get(8)),
    };
    Some(KeySummary {
        scope: scope.to_owned(),
        key: key.to_owned(),
        state,
        route: get(1).unwrap_or_default(),
        method: get(2).unwrap_or_default(),
        path: get(3).unwrap_or_default(),
        status: num(&get(4)).and_then(|s| u16::try_from(s).ok()),
        replayable: get(5).as_deref() == Some("1"),
        created_ms: num(&get(6)).unwrap_or(0),
        completed_ms: num(&get(7)),
        expires_ms: expires.unwrap_or(0),
        replays: num(&get(10)).unwrap_or(0),
    })
}

/// Filters applied to fetched summaries.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// Only this state.
    pub state: Option<KeyState>,
    /// Only this route.
    pub route: Option<String>,
    /// Only records at least this old, ms.
    pub min_age_ms: Option<u64>,
    /// Only records at most this old, ms.
    pub max_age_ms: Option<u64>,
}

impl RecordFilter {
    fn matches(&self, s: &KeySummary, now: u64) -> bool {
        let age = now.saturating_sub(s.created_ms);
        self.state.is_none_or(|st| st == s.state)
            && self.route.as_ref().is_none_or(|r| *r == s.route)
            && self.min_age_ms.is_none_or(|m| age >= m)
            && self.max_age_ms.is_none_or(|m| age <= m)
    }
}

/// Reads the summaries of `rkeys` (full record keys) concurrently; absent records and keys
/// of another shape are skipped.
async fn summaries(
    store: &Store,
    conn: &Conn,
    rkeys: &[String],
) -> Result<Vec<(String, KeySummary)>, AppError> {
    let cmds = rkeys
        .iter()
        .map(|k| {
            let mut c = redis::cmd("HMGET");
            c.arg(k).arg(&SUMMARY_FIELDS[..]);
            c
        })
        .collect();
    let results: Vec<redis::RedisResult<Vec<Option<String>>>> = store
        .timed_for(store.timeout() * 4, async { Ok(conn.many(cmds).await) })
        .await?;
    let mut out = Vec::new();
    for (rkey, fields) in rkeys.iter().zip(results) {
        let fields = fields.map_err(crate::store::StoreError::from)?;
        if let Some((scope, key)) = split_record_key(store, rkey) {
            if let Some(s) = summary_from(scope, key, &fields) {
                out.push((rkey.clone(), s));
            }
        }
    }
    Ok(out)
}

/// One SCAN call on `node`: (next cursor, keys).
async fn scan(
    store: &Store,
    conn: &mut Conn,
    node: &Node,
    cursor: u64,
    pattern: &str,
    count: usize,
) -> Result<(u64, Vec<String>), AppError> {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count);
    Ok(store.timed(async { conn.on_node(node, cmd).await }).await?)
}

fn node_index(nodes: &[Node], name: &str) -> Result<usize, AppError> {
    nodes
        .iter()
        .position(|n| n.to_string() == name)
        .ok_or_else(|| {
            AppError::BadRequest(format!(
                "the cursor names node {name}, which is no longer a master; start the listing again"
            ))
        })
}

/// `GET /api/keys`: one page.
///
/// # Errors
/// 400 for bad parameters or a foreign cursor; 503 when Redis cannot answer.
pub async fn list(store: &Store, q: &KeyListQuery) -> Result<KeyPage, AppError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(AppError::BadRequest(format!(
            "limit must be 1..={MAX_LIMIT}, got {limit}"
        )));
    }
    let limit = limit as usize;
    if let Some(scope) = &q.scope {
        check_scope(scope)?;
    }
    let filter = RecordFilter {
        state: q.state,
        route: q.route.clone(),
        min_age_ms: q.min_age_ms,
        max_age_ms: q.max_age_ms,
    };
    let pattern = match_pattern(store, q.scope.as_deref(), q.prefix.as_deref());
    let nodes = store.timed(store.backend().nodes()).await?;
    let mut conn = store.conn().await?;
    let rec_prefix = format!("{}:rec:", store.key_prefix());

    let cursor = match &q.cursor {
        Some(c) => decode_cursor(c)?,
        None => Cursor {
            n: nodes.first().map(ToString::to_string),
            c: 0,
            p: Vec::new(),
        },
    };
    let mut idx = match &cursor.n {
        Some(name) => node_index(&nodes, name)?,
        None => nodes.len(),
    };
    let mut node_cursor = cursor.c;
    let mut pending: Vec<String> = cursor
        .p
        .iter()
        .map(|k| format!("{rec_prefix}{k}"))
        .collect();
    let count = (limit * 2).clamp(50, 1000);
    let now = now_ms();
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    let mut scans = 0;
    loop {
        if !pending.is_empty() {
            let mut overflow = Vec::new();
            for (rkey, s) in summaries(store, &conn, &pending).await? {
                if !filter.matches(&s, now) || !seen.insert(rkey.clone()) {
                    continue;
                }
                if items.len() < limit {
                    items.push(s);
                } else {
                    overflow.push(rkey);
                }
            }
            pending = overflow;
            if items.len() >= limit {
                break;
            }
        }
        if idx >= nodes.len() || scans >= MAX_SCANS_PER_PAGE {
            break;
        }
        let node = &nodes[idx];
        let (next, keys) = scan(store, &mut conn, node, node_cursor, &pattern, count).await?;
        scans += 1;
        pending = keys;
        if next == 0 {
            idx += 1;
            node_cursor = 0;
        } else {
            node_cursor = next;
        }
    }
    let next_cursor = if idx >= nodes.len() && pending.is_empty() {
        None
    } else {
        Some(encode_cursor(&Cursor {
            n: nodes.get(idx).map(ToString::to_string),
            c: node_cursor,
            p: pending
                .iter()
                .filter_map(|k| k.strip_prefix(&rec_prefix).map(str::to_owned))
                .collect(),
        }))
    };
    Ok(KeyPage { items, next_cursor })
}

/// `GET /api/keys/{scope}/{key}`.
///
/// # Errors
/// 400 for a bad scope/key, 404 when absent, 503 when Redis cannot answer.
pub async fn detail(store: &Store, id: &RecordId) -> Result<KeyDetail, AppError> {
    id.validate().map_err(AppError::BadRequest)?;
    let rkey = store.record_key(id);
    let mut conn = store.conn().await?;
    let (fields, pttl): (HashMap<String, Vec<u8>>, i64) = store
        .timed(async {
            let fields = conn.query(redis::cmd("HGETALL").arg(&rkey)).await?;
            let pttl = conn.query(redis::cmd("PTTL").arg(&rkey)).await?;
            Ok((fields, pttl))
        })
        .await?;
    let text = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let row: Vec<Option<String>> = SUMMARY_FIELDS.iter().map(|f| text(f)).collect();
    let summary = summary_from(&id.scope, &id.key, &row).ok_or_else(|| {
        AppError::Missing(format!("no record for key {:?} in this scope", id.key))
    })?;
    let response = match (&summary.state, summary.replayable, summary.status) {
        (KeyState::Completed, true, Some(status)) => {
            let headers: Vec<(String, String)> = fields
                .get("headers")
                .and_then(|h| serde_json::from_slice(h).ok())
                .unwrap_or_default();
            let body = fields.get("body").map(Vec::as_slice).unwrap_or_default();
            Some(preview(status, headers, body))
        }
        _ => None,
    };
    Ok(KeyDetail {
        lock_expires_ms: match summary.state {
            KeyState::InFlight | KeyState::Unknown => num(&text("lock_expires_ms")),
            KeyState::Completed => None,
        },
        fingerprint: text("fp").unwrap_or_default(),
        ttl_ms: u64::try_from(pttl).unwrap_or(0),
        last_replay_ms: num(&text("last_replay_ms")),
        response,
        summary,
    })
}

/// A safe preview of a stored body: the first [`PREVIEW_BYTES`] bytes as UTF-8 text when
/// they are valid UTF-8 (a multi-byte character cut at the end is dropped), else base64.
pub fn preview(status: u16, headers: Vec<(String, String)>, body: &[u8]) -> ResponsePreview {
    let head = &body[..body.len().min(PREVIEW_BYTES)];
    let (text, base64) = match std::str::from_utf8(head) {
        Ok(s) => (s.to_owned(), false),
        // Cut inside a multi-byte character at the end: keep the valid part.
        Err(e) if e.error_len().is_none() && e.valid_up_to() + 4 > head.len() => (
            String::from_utf8_lossy(&head[..e.valid_up_to()]).into_owned(),
            false,
        ),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(head), true),
    };
    let shown = if base64 { head.len() } else { text.len() };
    ResponsePreview {
        status,
        headers,
        body_bytes: body.len() as u64,
        body_preview: text,
        body_preview_base64: base64,
        truncated: shown < body.len(),
    }
}

/// What [`delete`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// Whether the record was deleted.
    pub deleted: bool,
    /// Its route, when it existed.
    pub route: Option<String>,
    /// Its state, when it existed.
    pub state: Option<String>,
}

/// Conditions of [`delete`], all checked in one script on the record's key.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteRule<'a> {
    /// Delete only in one of these states (comma-separated; `in_flight,unknown` for a lock release).
    pub only_state: Option<&'a str>,
    /// Delete only records of this route.
    pub only_route: Option<&'a str>,
    /// Leave records in this state alone (purges skip `in_flight`: deleting one would let
    /// a retry execute while the first request may still run upstream).
    pub skip_state: Option<&'a str>,
    /// Delete only records claimed at or before this time (a bulk purge's dry run).
    pub created_before_ms: Option<u64>,
}

/// Deletes one record if it satisfies `rule`.
///
/// # Errors
/// Redis errors or timeout.
pub async fn delete(
    store: &Store,
    conn: &mut Conn,
    rkey: &str,
    rule: DeleteRule<'_>,
) -> Result<Deleted, AppError> {
    let mut invocation = ADMIN_DELETE_SCRIPT.key(rkey);
    invocation
        .arg(rule.only_state.unwrap_or(""))
        .arg(rule.only_route.unwrap_or(""))
        .arg(rule.skip_state.unwrap_or(""))
        .arg(
            rule.created_before_ms
                .map(|t| t.to_string())
                .unwrap_or_default(),
        );
    let answer: (i64, Option<String>, Option<String>) = store
        .timed(async { invocation.invoke_async(conn).await })
        .await?;
    Ok(Deleted {
        deleted: answer.0 == 1,
        state: answer.1.filter(|s| !s.is_empty()),
        route: answer.2.filter(|r| !r.is_empty()),
    })
}

/// Visits every record key matching `pattern` on every node, `BULK_SCAN_COUNT` at a time,
/// calling `each` with each batch; stops after `budget`.
///
/// # Errors
/// Redis errors, a timeout of one call, or the budget exceeded (503).
pub async fn scan_all<F, Fut>(
    store: &Store,
    pattern: &str,
    budget: Duration,
    mut each: F,
) -> Result<(), AppError>
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(), AppError>>,
{
    let deadline = tokio::time::Instant::now() + budget;
    let nodes = store.timed(store.backend().nodes()).await?;
    let mut conn = store.conn().await?;
    for node in &nodes {
        let mut cursor = 0;
        loop {
            if tokio::time::Instant::now() > deadline {
                return Err(AppError::Store(crate::store::StoreError::Timeout {
                    timeout_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
                }));
            }
            let (next, keys) =
                scan(store, &mut conn, node, cursor, pattern, BULK_SCAN_COUNT).await?;
            if !keys.is_empty() {
                each(keys).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?c[d]e\\f"), "a\\*b\\?c\\[d\\]e\\\\f");
    }

    #[test]
    fn cursors_round_trip() {
        let c = Cursor {
            n: Some("127.0.0.1:7000".into()),
            c: 42,
            p: vec!["global:a:b".into()],
        };
        let back = decode_cursor(&encode_cursor(&c)).unwrap_or_default();
        assert_eq!(back.n, c.n);
        assert_eq!(back.c, 42);
        assert_eq!(back.p, c.p);
        assert!(decode_cursor("!!").is_err());
    }

    #[test]
    fn previews_are_text_or_base64_never_raw_binary() {
        let p = preview(200, vec![], b"hello");
        assert_eq!(p.body_preview, "hello");
        assert!(!p.body_preview_base64 && !p.truncated);
        let p = preview(200, vec![], &[0xff, 0x00, 0x01]);
        assert!(p.body_preview_base64);
        assert_eq!(p.body_preview, "/wAB");
        let mut long = "é".repeat(PREVIEW_BYTES);
        long.push('x');
        let p = preview(200, vec![], long.as_bytes());
        assert!(!p.body_preview_base64 && p.truncated);
        assert_eq!(p.body_preview.len(), PREVIEW_BYTES);
        assert_eq!(p.body_bytes, long.len() as u64);
    }
}
