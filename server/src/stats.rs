//! Counters per time bucket in Redis, so every server instance answers the same numbers.
//!
//! Layout: one hash per resolution and bucket, `{prefix}:stats:<res>:<bucket_start_ms>`,
//! field = counter name ([`Counter::field`]), value = count; written by the event writer
//! ([`crate::events`]) with `HINCRBY` and a TTL a little longer than the window it serves.
//!
//! | resolution | bucket | window read | TTL |
//! |---|---|---|---|
//! | `5s` | 5 s | last minute (12 buckets) | 2 min |
//! | `1m` | 1 min | last hour (60 buckets) | 2 h |
//! | `1h` | 1 h | last day (24 buckets) | 2 days |
//!
//! A window is the bucket holding "now" and the buckets before it, so the window's
//! oldest bucket may reach up to one bucket further back than its nominal length.

use idemgate_protocol::admin::{replay_rate, Counters, StatsBucket, StatsResponse, StatsWindow};

use crate::store::{Store, StoreError};

/// A counter of [`Counters`], by its field name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// `claims`
    Claims,
    /// `executions`
    Executions,
    /// `replays`
    Replays,
    /// `in_flight_conflicts`
    InFlightConflicts,
    /// `mismatches`
    Mismatches,
    /// `rejections`
    Rejections,
    /// `expirations`
    Expirations,
    /// `purges`
    Purges,
    /// `store_errors`
    StoreErrors,
    /// `fail_open_passes`
    FailOpenPasses,
    /// `completions`
    Completions,
    /// `releases`
    Releases,
    /// `lock_lost`
    LockLost,
    /// `unknown_outcomes`
    UnknownOutcomes,
}

impl Counter {
    /// The hash field, equal to the [`Counters`] field name.
    pub fn field(self) -> &'static str {
        match self {
            Self::Claims => "claims",
            Self::Executions => "executions",
            Self::Replays => "replays",
            Self::InFlightConflicts => "in_flight_conflicts",
            Self::Mismatches => "mismatches",
            Self::Rejections => "rejections",
            Self::Expirations => "expirations",
            Self::Purges => "purges",
            Self::StoreErrors => "store_errors",
            Self::FailOpenPasses => "fail_open_passes",
            Self::Completions => "completions",
            Self::Releases => "releases",
            Self::LockLost => "lock_lost",
            Self::UnknownOutcomes => "unknown_outcomes",
        }
    }
}

impl Counter {
    /// Every counter.
    pub const ALL: [Counter; 14] = [
        Self::Claims,
        Self::Executions,
        Self::Replays,
        Self::InFlightConflicts,
        Self::Mismatches,
        Self::Rejections,
        Self::Expirations,
        Self::Purges,
        Self::StoreErrors,
        Self::FailOpenPasses,
        Self::Completions,
        Self::Releases,
        Self::LockLost,
        Self::UnknownOutcomes,
    ];

    /// Its field of `c`.
    pub fn slot(self, c: &mut Counters) -> &mut u64 {
        match self {
            Self::Claims => &mut c.claims,
            Self::Executions => &mut c.executions,
            Self::Replays => &mut c.replays,
            Self::InFlightConflicts => &mut c.in_flight_conflicts,
            Self::Mismatches => &mut c.mismatches,
            Self::Rejections => &mut c.rejections,
            Self::Expirations => &mut c.expirations,
            Self::Purges => &mut c.purges,
            Self::StoreErrors => &mut c.store_errors,
            Self::FailOpenPasses => &mut c.fail_open_passes,
            Self::Completions => &mut c.completions,
            Self::Releases => &mut c.releases,
            Self::LockLost => &mut c.lock_lost,
            Self::UnknownOutcomes => &mut c.unknown_outcomes,
        }
    }
}

/// Adds `n` to the counter stored under hash field `field` (unknown fields are ignored).
fn add_field(c: &mut Counters, field: &str, n: u64) {
    if let Some(counter) = Counter::ALL.iter().find(|k| k.field() == field) {
        *counter.slot(c) += n;
    }
}

fn add(total: &mut Counters, c: &Counters) {
    let mut c = c.clone();
    for counter in Counter::ALL {
        *counter.slot(total) += *counter.slot(&mut c);
    }
}

/// One bucket resolution.
#[derive(Debug, Clone, Copy)]
pub struct Resolution {
    /// Name in the key (`5s`, `1m`, `1h`).
    pub name: &'static str,
    /// Bucket width, seconds.
    pub bucket_s: u64,
    /// Window read by `/api/stats`, seconds.
    pub window_s: u64,
}

impl Resolution {
    /// Start of the bucket holding `at_ms`.
    pub fn bucket_start(self, at_ms: u64) -> u64 {
        let w = self.bucket_s * 1000;
        at_ms - at_ms % w
    }

    /// The admin key name (without the `{prefix}:` tag) of the bucket holding `at_ms`.
    pub fn bucket_key(self, at_ms: u64) -> String {
        format!("stats:{}:{}", self.name, self.bucket_start(at_ms))
    }

    /// Lifetime of a bucket hash: twice the window, milliseconds.
    pub fn ttl_ms(self) -> u64 {
        2 * self.window_s * 1000
    }

    /// Number of buckets in the window.
    pub fn buckets(self) -> u64 {
        self.window_s / self.bucket_s
    }
}

/// The three resolutions: minute, hour, day.
pub const RESOLUTIONS: [Resolution; 3] = [
    Resolution {
        name: "5s",
        bucket_s: 5,
        window_s: 60,
    },
    Resolution {
        name: "1m",
        bucket_s: 60,
        window_s: 3600,
    },
    Resolution {
        name: "1h",
        bucket_s: 3600,
        window_s: 86_400,
    },
];

/// Reads the three windows ending at `now_ms` in one pipeline (96 `HGETALL`s, one slot).
/// `in_flight_now` is left `None` for the caller to fill.
///
/// # Errors
/// Redis errors or timeout.
pub async fn read(store: &Store, now_ms: u64) -> Result<StatsResponse, StoreError> {
    let mut pipe = redis::pipe();
    let mut plan = Vec::new();
    for res in RESOLUTIONS {
        let newest = res.bucket_start(now_ms);
        let step = res.bucket_s * 1000;
        let n = res.buckets();
        let starts: Vec<u64> = (0..n)
            .rev()
            .map(|i| newest.saturating_sub(i * step))
            .collect();
        for start in &starts {
            pipe.cmd("HGETALL")
                .arg(store.admin_key(&format!("stats:{}:{start}", res.name)));
        }
        plan.push((res, starts));
    }
    let mut conn = store.conn().await?;
    let hashes: Vec<Vec<(String, u64)>> =
        store.timed(async move { conn.pipe(&pipe).await }).await?;
    let mut hashes = hashes.into_iter();
    let mut windows = Vec::new();
    for (res, starts) in plan {
        let mut totals = Counters::default();
        let mut series = Vec::with_capacity(starts.len());
        for start in starts {
            let mut counts = Counters::default();
            for (field, n) in hashes.next().unwrap_or_default() {
                add_field(&mut counts, &field, n);
            }
            add(&mut totals, &counts);
            series.push(StatsBucket {
                start_ms: start,
                counts,
            });
        }
        windows.push(StatsWindow {
            window_s: res.window_s,
            bucket_s: res.bucket_s,
            replay_rate: replay_rate(&totals),
            totals,
            series,
        });
    }
    let mut windows = windows.into_iter();
    let (Some(minute), Some(hour), Some(day)) = (windows.next(), windows.next(), windows.next())
    else {
        return Err(StoreError::Corrupt("stats windows".into()));
    };
    Ok(StatsResponse {
        generated_ms: now_ms,
        minute,
        hour,
        day,
        in_flight_now: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_align_and_cover_the_window() {
        let m = RESOLUTIONS[0];
        assert_eq!(m.bucket_start(12_345), 10_000);
        assert_eq!(m.bucket_key(12_345), "stats:5s:10000");
        assert_eq!(m.buckets(), 12);
        assert_eq!(RESOLUTIONS[1].buckets(), 60);
        assert_eq!(RESOLUTIONS[2].buckets(), 24);
    }

    #[test]
    fn every_counter_field_is_read_back() {
        let all = [
            Counter::Claims,
            Counter::Executions,
            Counter::Replays,
            Counter::InFlightConflicts,
            Counter::Mismatches,
            Counter::Rejections,
            Counter::Expirations,
            Counter::Purges,
            Counter::StoreErrors,
            Counter::FailOpenPasses,
            Counter::Completions,
            Counter::Releases,
            Counter::LockLost,
        ];
        let mut c = Counters::default();
        for f in all {
            add_field(&mut c, f.field(), 1);
        }
        let v = serde_json::to_value(&c).unwrap_or_default();
        for f in all {
            assert_eq!(v[f.field()], 1, "{f:?}");
        }
    }
}
