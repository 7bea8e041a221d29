//! Demo traffic: a background thread that sends a steady mix through the gateway so every
//! dashboard widget has data — new keys, retries (replays), concurrent duplicates (409),
//! conflicting reuses (422), a few malformed or missing keys (400) and short-lived quotes
//! that expire (the demo's `quotes` route has `ttl_s: 30`).
//!
//! ```no_run
//! # fn f(stack: &idemgate_e2e::Stack) {
//! let traffic = idemgate_e2e::traffic::Traffic::start(stack.gateway_url());
//! // ... later: stop it (dropping it also stops it).
//! let sent = traffic.stop();
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::http::Client;

/// Pause between two steps of the generator, milliseconds.
pub const STEP_MS: u64 = 350;
/// Upstream delay of the first request of a concurrent duplicate, milliseconds.
pub const SLOW_MS: u64 = 1_500;
/// Tenants the generator sends as (scope) `Authorization` values.
pub const TENANTS: [&str; 3] = ["Bearer tenant-a", "Bearer tenant-b", "Bearer tenant-c"];

/// How many answers the generator got, per status code (0: transport error).
pub type StatusCounts = BTreeMap<u16, u64>;

/// A running generator; [`Traffic::stop`] (or dropping it) stops and joins it.
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<StatusCounts>>,
    handle: Option<JoinHandle<()>>,
}

/// A tiny xorshift generator: demo traffic needs variety, not secrecy.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        Self(t ^ (u64::from(std::process::id()) << 32) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// 0..n
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        let n = u64::try_from(items.len()).ok()?;
        items.get(usize::try_from(self.below(n)).ok()?)
    }
}

/// A request that completed and can be retried (replay) or reused wrongly (422).
#[derive(Debug, Clone)]
struct Sent {
    tenant: &'static str,
    path: &'static str,
    key: String,
    amount: u64,
}

impl Traffic {
    /// Starts the generator against `gateway` (e.g. `http://127.0.0.1:10000`).
    pub fn start(gateway: impl Into<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(StatusCounts::new()));
        let client = Client::with_timeout(gateway, Duration::from_secs(10));
        let handle = {
            let stop = Arc::clone(&stop);
            let counts = Arc::clone(&counts);
            std::thread::Builder::new()
                .name("demo-traffic".into())
                .spawn(move || run(&client, &stop, &counts))
                .ok()
        };
        Self {
            stop,
            counts,
            handle,
        }
    }

    /// Answers so far, per status code.
    pub fn counts(&self) -> StatusCounts {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Stops the generator, waits for it, and returns the answers per status code.
    pub fn stop(mut self) -> StatusCounts {
        self.halt();
        self.counts()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

fn record(counts: &Mutex<StatusCounts>, status: u16) {
    if let Ok(mut c) = counts.lock() {
        *c.entry(status).or_insert(0) += 1;
    }
}

fn post(client: &Client, counts: &Mutex<StatusCounts>, s: &Sent, extra: &[(&str, String)]) -> u16 {
    let mut req = client
        .post(s.path)
        .header("Authorization", s.tenant)
        .header("Idempotency-Key", format!("\"{}\"", s.key));
    for (name, value) in extra {
        req = req.header(*name, value.clone());
    }
    let status = req
        .json(&json!({"amount": s.amount, "currency": "eur"}))
        .send()
        .map_or(0, |r| r.status);
    record(counts, status);
    status
}

fn run(client: &Client, stop: &AtomicBool, counts: &Arc<Mutex<StatusCounts>>) {
    let mut rng = Rng::seeded();
    // A run id keeps keys unique across demo restarts sharing a Redis.
    let run_id = format!("{:04x}", rng.below(0x10000));
    let mut n: u64 = 0;
    let mut recent: VecDeque<Sent> = VecDeque::new();
    let mut slow: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let tenant = rng.pick(&TENANTS).copied().unwrap_or(TENANTS[0]);
        let fresh = |path: &'static str, prefix: &str, rng: &mut Rng| Sent {
            tenant,
            path,
            key: format!("{prefix}-{run_id}-{n:05}"),
            amount: 100 * (1 + rng.below(50)),
        };
        let roll = rng.below(100);
        match roll {
            // New payment.
            0..=29 => {
                let s = fresh("/v1/payments", "pay", &mut rng);
                if post(client, counts, &s, &[]) < 300 {
                    recent.push_back(s);
                }
            }
            // Retry of a completed request: replayed.
            30..=54 => {
                let pick = rng.pick(recent.make_contiguous()).cloned();
                if let Some(s) = pick {
                    post(client, counts, &s, &[]);
                }
            }
            // Concurrent duplicate: a slow first request, then the same again (409).
            55..=61 => {
                let s = fresh("/v1/payments", "slow", &mut rng);
                let (c, k, s2) = (client.clone(), Arc::clone(counts), s.clone());
                if let Ok(h) = std::thread::Builder::new()
                    .name("demo-traffic-slow".into())
                    .spawn(move || {
                        post(&c, &k, &s2, &[("x-demo-delay-ms", SLOW_MS.to_string())]);
                    })
                {
                    slow.push(h);
                }
                std::thread::sleep(Duration::from_millis(200));
                post(
                    client,
                    counts,
                    &s,
                    &[("x-demo-delay-ms", SLOW_MS.to_string())],
                );
                recent.push_back(s);
            }
            // Conflicting reuse: a known key with another amount (422).
            62..=68 => {
                let pick = rng.pick(recent.make_contiguous()).cloned();
                if let Some(mut s) = pick {
                    s.amount += 1;
                    post(client, counts, &s, &[]);
                }
            }
            // Malformed (too long) or missing key on a route that requires one (400).
            69..=72 => {
                let mut req = client.post("/v1/payments").header("Authorization", tenant);
                if rng.below(2) == 0 {
                    req = req.header("Idempotency-Key", format!("\"{}\"", "x".repeat(300)));
                }
                let status = req
                    .json(&json!({"amount": 1}))
                    .send()
                    .map_or(0, |r| r.status);
                record(counts, status);
            }
            // A quote: its record expires after 30 s (expired events).
            73..=86 => {
                let s = fresh("/v1/quotes", "quote", &mut rng);
                post(client, counts, &s, &[]);
            }
            // An order (optional key), sometimes retried at once.
            _ => {
                let s = fresh("/v1/orders", "ord", &mut rng);
                post(client, counts, &s, &[]);
                if rng.below(3) == 0 {
                    post(client, counts, &s, &[]);
                }
            }
        }
        while recent.len() > 40 {
            recent.pop_front();
        }
        slow.retain(|h| !h.is_finished());
        // Sleep in small steps so stop() returns quickly.
        for _ in 0..(STEP_MS / 50) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for h in slow {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::seeded();
        for _ in 0..1000 {
            assert!(r.below(7) < 7);
        }
        assert_eq!(r.below(0), 0);
        assert!(r.pick::<u8>(&[]).is_none());
    }
}
