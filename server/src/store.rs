//! The idempotency store on Redis: one hash per record, three single-key Lua scripts.
//!
//! # Key layout
//!
//! One hash per record at `{prefix}:rec:{scope}:{key}` ([`Store::record_key`]): `prefix` is
//! `--key-prefix`, `scope` is 64 lowercase hex or `global` and `key` the client's
//! idempotency key (printable ASCII, validated by [`idemgate_protocol::RecordId::validate`]).
//! Key names are built here, never inside Lua, and every script touches exactly that one
//! key (`KEYS[1]`), so the layout works on Redis Cluster without cross-slot errors.
//!
//! # Hash fields
//!
//! | field | written by | meaning |
//! |---|---|---|
//! | `state` | claim, complete, release | `in_flight`, `completed`, `unknown`, or `released` (a tombstone: `state` and `token` only) |
//! | `token` | claim | the current fencing token (32 lowercase hex) |
//! | `fp` | claim | request fingerprint (64 lowercase hex) |
//! | `route`, `method`, `path` | claim | what the request was, for the admin side |
//! | `created_ms`, `lock_expires_ms` | claim | Unix time in ms (Redis clock) |
//! | `after`, `hold_ms`, `refuse_ttl_ms` | claim | the route's unknown-outcome policy (`reexecute`/`refuse`/empty) |
//! | `status` | complete | upstream status code |
//! | `headers` | complete | JSON array of `[name, value]` pairs, order and repeats kept |
//! | `body` | complete | raw body bytes (binary-safe, not base64) |
//! | `replayable` | complete | `1` or `0` |
//! | `completed_ms`, `expires_ms` | complete | Unix time in ms (Redis clock) |
//! | `unknown_until_ms` | complete (unknown) | end of the unknown outcome's hold, ms |
//! | `replays`, `last_replay_ms` | complete (0), claim (replay) | replay count and last time |
//!
//! Every record has a TTL: while in flight the lock TTL plus the unknown-outcome hold
//! (`reexecute`) or the completed TTL (`refuse`), so an expired lock reads as an unknown
//! outcome instead of vanishing; `ttl_s` once completed; the hold (or `ttl_s` under
//! `refuse`) once unknown; [`RELEASE_TOMBSTONE_MS`] for a tombstone.
//!
//! # Fencing
//!
//! The fencing token fences by equality, and the caller makes it (unique per request), so
//! every store call is idempotent: a claim retried with its token recognises its own lock,
//! a `complete` or `release` retried after a lost reply answers the same success. A late
//! `complete` lands while the record still holds its token (also after the lock expired:
//! the outcome becomes known again); once a retry re-acquired the key under another token,
//! it is refused as `lock_lost` and writes nothing. A `release` leaves a tombstone, so a
//! claim that it overtook (the client left before the claim answered) writes nothing.

use std::sync::LazyLock;
use std::time::Duration;

use idemgate_protocol::{
    AfterUnknown, ClaimOutcome, ClaimRequest, CompleteOutcome, CompleteRequest, RecordId,
    ReleaseOutcome, ReleaseRequest, StoredResponse,
};
use redis::{Script, Value};

use crate::backend::{Backend, Conn};

/// `claim` script; see `lua/claim.lua` for KEYS, ARGV and the return shape.
static CLAIM_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));
/// `complete` script; see `lua/complete.lua` for KEYS, ARGV and the return shape.
static COMPLETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/complete.lua")));
/// `release` script; see `lua/release.lua` for KEYS, ARGV and the return shape.
static RELEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/release.lua")));

/// Why a store call could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection failed.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the configured timeout (`--redis-timeout-ms`).
    #[error("redis did not answer within {timeout_ms} ms")]
    Timeout {
        /// The timeout that passed, in milliseconds.
        timeout_ms: u64,
    },
    /// A script answered with a shape this server does not understand, or a record holds
    /// data it cannot decode (e.g. a record written by something else).
    #[error("unexpected store data: {0}")]
    Corrupt(String),
    /// `WAIT` (`--redis-wait-replicas`) counted fewer replicas than required within its
    /// timeout: the write could be lost in a failover. A claim is undone; both answer 503.
    #[error("{call}: {acked} of {wanted} replicas acknowledged within {timeout_ms} ms")]
    WaitShortfall {
        /// `claim` or `complete`.
        call: &'static str,
        /// Replicas that acknowledged.
        acked: i64,
        /// Replicas required.
        wanted: u32,
        /// The WAIT timeout, ms.
        timeout_ms: u64,
    },
}

/// `WAIT` after each claim and complete (`--redis-wait-replicas`,
/// `--redis-wait-timeout-ms`): Redis replicates asynchronously, so a write acknowledged only
/// by a primary that dies before replicating is lost when a replica is promoted. WAIT
/// narrows that to writes no replica acknowledged, which are then refused. (It does not
/// make Redis strongly consistent: a replica that acknowledged may still not be the one
/// promoted, and acknowledged means received, not written to disk.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Replicas that must acknowledge, 1..=16.
    pub replicas: u32,
    /// How long WAIT waits for them.
    pub timeout: Duration,
}

impl WaitPolicy {
    fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Handle to the Redis store. Cheap to clone; holds no state a second instance would need.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    key_prefix: String,
    timeout: Duration,
    wait: Option<WaitPolicy>,
}

impl Store {
    /// Creates a store over one Redis server without connecting: the connection manager
    /// connects on first use and reconnects by itself, so the server starts while Redis is
    /// down.
    ///
    /// `timeout` bounds every store call (connect, command and response together).
    ///
    /// # Errors
    /// Only a client configuration the connection manager refuses.
    pub fn new(
        client: redis::Client,
        key_prefix: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self::with_backend(
            Backend::single(client, timeout)?,
            key_prefix,
            timeout,
        ))
    }

    /// A store over any [`Backend`] (single server or cluster).
    pub fn with_backend(
        backend: Backend,
        key_prefix: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        Self {
            backend,
            key_prefix: key_prefix.into(),
            timeout,
            wait: None,
        }
    }

    /// Requires `WAIT` acknowledgements after claims and completes (`None`: no WAIT).
    #[must_use]
    pub fn with_wait(mut self, wait: Option<WaitPolicy>) -> Self {
        self.wait = wait;
        self
    }

    /// The WAIT policy, if any.
    pub fn wait(&self) -> Option<WaitPolicy> {
        self.wait
    }

    /// The backend (for per-node work: SCAN, keyspace notifications).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The key prefix (`--key-prefix`).
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The Redis key of a record: `{prefix}:rec:{scope}:{key}`.
    pub fn record_key(&self, id: &RecordId) -> String {
        format!("{}:rec:{}:{}", self.key_prefix, id.scope, id.key)
    }

    /// The Redis key of an admin-side key `name`: `{prefix}` as a hash tag, so every admin
    /// key (event stream, stat buckets, confirmations, expiration markers) lives in one
    /// cluster slot and can be pipelined: `{<prefix>}:<name>`.
    pub fn admin_key(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.key_prefix)
    }

    /// A connection, within the timeout.
    ///
    /// # Errors
    /// [`StoreError::Redis`] or [`StoreError::Timeout`].
    pub async fn conn(&self) -> Result<Conn, StoreError> {
        self.timed(self.backend.conn()).await
    }

    /// Runs `fut` under the store timeout.
    ///
    /// # Errors
    /// The future's Redis error, or [`StoreError::Timeout`].
    pub async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        self.timed_for(self.timeout, fut).await
    }

    /// Runs `fut` under `limit` instead of the store timeout (longer admin work).
    ///
    /// # Errors
    /// The future's Redis error, or [`StoreError::Timeout`].
    pub async fn timed_for<T>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => {
                self.backend.call_timed_out();
                Err(StoreError::Timeout {
                    timeout_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }

    /// `PING`: `Ok(())` when Redis answers within the timeout.
    ///
    /// # Errors
    /// [`StoreError::Redis`] or [`StoreError::Timeout`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let pong: String = self
            .timed(async move { conn.query(&redis::cmd("PING")).await })
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!("PING answered {pong:?}")))
        }
    }

    /// Runs the claim script with the caller's fencing token, or a fresh one when the
    /// request has none. The request must be validated.
    ///
    /// # Errors
    /// [`StoreError`] when Redis cannot answer in time or answers something unexpected.
    pub async fn claim(&self, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let key = self.record_key(&req.record);
        let (token, own_token) = match &req.fencing_token {
            Some(t) => (t.clone(), true),
            None => (new_fencing_token(), false),
        };
        let (after, hold_ms, refuse_ttl_ms) = match &req.unknown_outcome {
            Some(p) => (
                p.then.as_str(),
                p.hold_s.saturating_mul(1000),
                match p.then {
                    AfterUnknown::Refuse => p.ttl_s.saturating_mul(1000),
                    AfterUnknown::Reexecute => 0,
                },
            ),
            None => ("", 0, 0),
        };
        let mut invocation = CLAIM_SCRIPT.key(&key);
        invocation
            .arg(&token)
            .arg(&req.fingerprint)
            .arg(&req.route)
            .arg(&req.method)
            .arg(&req.path)
            .arg(req.lock_ttl_ms)
            .arg(after)
            .arg(hold_ms)
            .arg(refuse_ttl_ms);
        let mut conn = self.conn().await?;
        let result = self
            .timed(self.eval_maybe_wait(&mut conn, &invocation, &key))
            .await;
        match result {
            Ok((value, acked)) => {
                let outcome = parse_claim(value, token.clone())?;
                if let (Some(wait), Some(acked), ClaimOutcome::Acquired { .. }) =
                    (self.wait, acked, &outcome)
                {
                    if acked < i64::from(wait.replicas) {
                        // Not on enough replicas to survive a failover: undo it (fenced,
                        // also when the caller made the token) and answer a store failure.
                        self.undo_late_claim(req.record.clone(), token);
                        return Err(StoreError::WaitShortfall {
                            call: "claim",
                            acked,
                            wanted: wait.replicas,
                            timeout_ms: wait.timeout_ms(),
                        });
                    }
                }
                Ok(outcome)
            }
            Err(e) => {
                // The script may have been sent and run later, or run with its answer lost.
                // A caller with its own token releases (or retries) it itself; a lock taken
                // with a token only this server knew is undone here.
                if !own_token {
                    self.undo_late_claim(req.record.clone(), token);
                }
                Err(e)
            }
        }
    }

    /// Runs `invocation` on `conn`, followed by `WAIT` when a [`WaitPolicy`] is set;
    /// returns the script's answer and the acknowledging replicas (`None` without WAIT).
    async fn eval_maybe_wait(
        &self,
        conn: &mut Conn,
        invocation: &redis::ScriptInvocation<'_>,
        key: &str,
    ) -> Result<(Value, Option<i64>), redis::RedisError> {
        match self.wait {
            None => Ok((invocation.invoke_async(conn).await?, None)),
            Some(w) => {
                let (value, acked) = conn
                    .eval_then_wait(invocation, key, w.replicas, w.timeout_ms())
                    .await?;
                Ok((value, Some(acked)))
            }
        }
    }

    /// After a claim failed or timed out (the filter answered 503 or failed open), Redis
    /// may still run the script once it catches up (a stall rather than an outage), or may
    /// have run it with the answer lost. Such a lock has no holder and would block the key
    /// for its whole lock TTL, so a fenced release follows (retried at 1, 2, 4, 8 and 16 s
    /// while Redis fails): it releases exactly that orphaned lock, or leaves a tombstone
    /// that makes the late claim write nothing. At most
    /// [`MAX_LATE_CLAIMS`] are watched at once.
    fn undo_late_claim(&self, record: RecordId, token: String) {
        let Ok(permit) = LATE_CLAIMS.clone().try_acquire_owned() else {
            tracing::warn!(key = %record.key, "too many failed claims to watch; a late one may hold its key until its lock TTL");
            return;
        };
        let store = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let req = ReleaseRequest {
                record,
                fencing_token: token,
                status: None,
            };
            // The first release that Redis runs leaves a tombstone: a claim that runs even
            // later finds it and writes nothing.
            for delay_s in [0, 1, 2, 4, 8, 16] {
                tokio::time::sleep(Duration::from_secs(delay_s)).await;
                if let Ok((ReleaseOutcome::Released, route)) = store.release(&req).await {
                    if route.is_some_and(|r| !r.is_empty()) {
                        tracing::warn!(
                            key = %req.record.key,
                            "a claim that failed acquired the lock later; released it so the key is not blocked"
                        );
                    }
                    return;
                }
            }
        });
    }

    /// Runs the complete script. `ttl_ms` is the completed record's lifetime; the request
    /// must be validated (see [`crate::api`]). Returns the outcome and, when completed, the
    /// record's route (for events).
    ///
    /// # Errors
    /// [`StoreError`] when Redis cannot answer in time or answers something unexpected.
    pub async fn complete(
        &self,
        req: &CompleteRequest,
        ttl_ms: u64,
    ) -> Result<(CompleteOutcome, Option<String>), StoreError> {
        let key = self.record_key(&req.record);
        let (headers_json, body, replayable): (Vec<u8>, &[u8], u8) = match &req.response {
            Some(resp) => (
                serde_json::to_vec(&resp.headers)
                    .map_err(|e| StoreError::Corrupt(format!("encoding headers: {e}")))?,
                &resp.body,
                1,
            ),
            None => (Vec::new(), &[], 0),
        };
        let unknown = u8::from(req.outcome_unknown);
        let mut conn = self.conn().await?;
        let mut invocation = COMPLETE_SCRIPT.key(&key);
        invocation
            .arg(&req.fencing_token)
            .arg(req.status)
            .arg(headers_json)
            .arg(body)
            .arg(replayable)
            .arg(ttl_ms)
            .arg(unknown);
        let (value, acked) = self
            .timed(self.eval_maybe_wait(&mut conn, &invocation, &key))
            .await?;
        let answer = <Vec<String> as redis::FromRedisValue>::from_redis_value(value)
            .map_err(|e| StoreError::Corrupt(format!("complete answered {e}")))?;
        let route = fenced_answer(answer, "completed", "complete")?;
        if let (Some(wait), Some(acked), Some(_)) = (self.wait, acked, &route) {
            if acked < i64::from(wait.replicas) {
                // The record is written on the primary; the filter retries this complete
                // with the same token (idempotent) until it is acknowledged.
                return Err(StoreError::WaitShortfall {
                    call: "complete",
                    acked,
                    wanted: wait.replicas,
                    timeout_ms: wait.timeout_ms(),
                });
            }
        }
        let outcome = if route.is_some() {
            CompleteOutcome::Completed
        } else {
            CompleteOutcome::LockLost
        };
        Ok((outcome, route))
    }

    /// Runs the release script. Returns the outcome and, when released, the record's route.
    ///
    /// # Errors
    /// [`StoreError`] when Redis cannot answer in time or answers something unexpected.
    pub async fn release(
        &self,
        req: &ReleaseRequest,
    ) -> Result<(ReleaseOutcome, Option<String>), StoreError> {
        let key = self.record_key(&req.record);
        let mut conn = self.conn().await?;
        let mut invocation = RELEASE_SCRIPT.key(&key);
        invocation.arg(&req.fencing_token).arg(RELEASE_TOMBSTONE_MS);
        let answer: Vec<String> = self
            .timed(async { invocation.invoke_async(&mut conn).await })
            .await?;
        let route = fenced_answer(answer, "released", "release")?;
        let outcome = if route.is_some() {
            ReleaseOutcome::Released
        } else {
            ReleaseOutcome::LockLost
        };
        Ok((outcome, route))
    }
}

/// Lifetime of a release tombstone, ms: longer than any store call can be delayed (the
/// filter's store timeout is at most 60 s), so a claim overtaken by its own release always
/// finds it.
pub const RELEASE_TOMBSTONE_MS: u64 = 120_000;

/// Most timed-out claims watched at once (see `Store::undo_late_claim`).
pub const MAX_LATE_CLAIMS: usize = 1024;

static LATE_CLAIMS: LazyLock<std::sync::Arc<tokio::sync::Semaphore>> =
    LazyLock::new(|| std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_LATE_CLAIMS)));

/// A fresh fencing token: 128 random bits as 32 lowercase hex digits.
pub fn new_fencing_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Decodes the answer of a fenced script (`complete`, `release`): `{ok_tag, route}` is
/// `Some(route)`, `{"lock_lost"}` is `None`.
fn fenced_answer(
    answer: Vec<String>,
    ok_tag: &str,
    call: &str,
) -> Result<Option<String>, StoreError> {
    let mut it = answer.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(tag), Some(route), None) if tag == ok_tag => Ok(Some(route)),
        (Some(tag), None, None) if tag == "lock_lost" => Ok(None),
        (tag, route, _) => Err(StoreError::Corrupt(format!(
            "{call} answered {tag:?} {route:?}"
        ))),
    }
}

/// Decodes the claim script's array answer (see `lua/claim.lua`).
fn parse_claim(value: Value, token: String) -> Result<ClaimOutcome, StoreError> {
    let items = match value {
        Value::Array(items) => items,
        other => return Err(StoreError::Corrupt(format!("claim answered {other:?}"))),
    };
    let mut items = items.into_iter();
    let tag = match items.next() {
        Some(Value::BulkString(b)) => b,
        Some(Value::SimpleString(s)) => s.into_bytes(),
        other => return Err(StoreError::Corrupt(format!("claim tag {other:?}"))),
    };
    let mut rest: Vec<Value> = items.collect();
    if tag == b"replay" {
        // Take the stored body by value: it may be hundreds of kilobytes.
        if let [Value::Int(status), Value::BulkString(headers_json), Value::BulkString(body)] =
            rest.as_mut_slice()
        {
            let headers: Vec<(String, String)> = serde_json::from_slice(headers_json)
                .map_err(|e| StoreError::Corrupt(format!("stored headers: {e}")))?;
            return Ok(ClaimOutcome::Replay {
                response: StoredResponse {
                    status: status_from(*status)?,
                    headers,
                    body: std::mem::take(body),
                },
            });
        }
    }
    match (tag.as_slice(), rest.as_slice()) {
        (b"acquired", []) => Ok(ClaimOutcome::Acquired {
            fencing_token: token,
        }),
        (b"in_flight", [Value::Int(ms), Value::Int(age)]) => Ok(ClaimOutcome::InFlight {
            retry_after_ms: u64::try_from(*ms).unwrap_or(0),
            age_ms: u64::try_from(*age).unwrap_or(0),
        }),
        (b"unknown", [Value::Int(ms)]) => Ok(ClaimOutcome::Unknown {
            retry_after_ms: Some(u64::try_from(*ms).unwrap_or(0)),
        }),
        (b"unknown_final", []) => Ok(ClaimOutcome::Unknown {
            retry_after_ms: None,
        }),
        (b"released", []) => Ok(ClaimOutcome::Released),
        (b"mismatch", []) => Ok(ClaimOutcome::Mismatch),
        (b"not_replayable", [Value::Int(status)]) => Ok(ClaimOutcome::NotReplayable {
            status: status_from(*status)?,
        }),
        (b"corrupt", _) => Err(StoreError::Corrupt(format!(
            "record in an unknown state: {rest:?}"
        ))),
        (tag, rest) => Err(StoreError::Corrupt(format!(
            "claim answered {:?} {rest:?}",
            String::from_utf8_lossy(tag)
        ))),
    }
}

fn status_from(raw: i64) -> Result<u16, StoreError> {
    u16::try_from(raw).map_err(|_| StoreError::Corrupt(format!("stored status {raw}")))
}
