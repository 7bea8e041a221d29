//! `cargo xtask bench`: the filter's cost, measured A/B in one run.
//!
//! The same Envoy binary runs `envoy/passthrough.yaml` (no filter) and `envoy/gateway.yaml`
//! (the idemgate filter, `envoy/demo-filter.json`) in front of the same demo upstream, with
//! the server and upstream built with optimisations. `wrk` (Debian) drives each scenario
//! against each Envoy, interleaved (A, B, A, B, ...) so drift hits both alike:
//!
//! - `get`: `GET` on an unprotected route: the cost of the filter on pass-through traffic;
//! - `post-new`: `POST /v1/payments` with a fresh key each time: a claim and a complete;
//! - `post-replay`: `POST /v1/payments` with one key: a claim answered by a replay.
//!
//! Each row gives requests/s, p50 and p99 latency (ms) and Envoy's resident memory (MiB)
//! after the run. The targets ([`TARGETS`]) are checked at the end; a miss exits non-zero
//! unless `--no-check`. Results are written to `target/bench/results.json`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use idemgate_e2e::{Binaries, Component, EnvoyTemplate, Stack, StackOptions};

use crate::util::{cargo, root, run as run_cmd};

/// Benchmark the filter against the same Envoy without it.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measurement (each scenario runs `--rounds` times per Envoy).
    #[arg(long, default_value_t = 5)]
    duration_s: u32,
    /// Interleaved rounds per scenario and Envoy; the best round is kept.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Concurrent connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Report only; do not fail on a missed target.
    #[arg(long)]
    no_check: bool,
    /// Skip setup and build (use what is built).
    #[arg(long)]
    no_build: bool,
}

/// One measurement.
#[derive(Debug, Clone)]
struct Sample {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    rss_mib: f64,
}

/// A target: `(scenario, what, limit)`, checked against the filter's numbers relative to
/// the pass-through Envoy's in the same run.
pub const TARGETS: [(&str, &str, f64); 5] = [
    ("get", "p50 overhead ms <=", 1.0),
    ("get", "throughput ratio >=", 0.7),
    ("post-new", "p50 overhead ms <=", 5.0),
    ("post-replay", "p50 overhead ms <=", 3.0),
    ("any", "envoy rss overhead MiB <=", 64.0),
];

const SCENARIOS: [&str; 3] = ["get", "post-new", "post-replay"];

fn wrk_script(scenario: &str, run_id: &str) -> String {
    let body = r#"{"amount":1000,"currency":"eur"}"#;
    match scenario {
        "get" => "wrk.method = \"GET\"\nwrk.path = \"/v1/orders?limit=1\"\n".to_owned(),
        "post-new" => format!(
            r#"local n = 0
function setup(thread) thread:set("tid", tostring(math.random(1, 1000000000))) end
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/payments", {{["Authorization"] = "Bearer bench", ["Content-Type"] = "application/json", ["Idempotency-Key"] = "{run_id}-" .. tid .. "-" .. n}}, '{body}')
end
"#
        ),
        _ => format!(
            r#"request = function()
  return wrk.format("POST", "/v1/payments", {{["Authorization"] = "Bearer bench", ["Content-Type"] = "application/json", ["Idempotency-Key"] = "{run_id}-replay"}}, '{body}')
end
"#
        ),
    }
}

/// Parses wrk's `--latency` output.
fn parse_wrk(out: &str) -> Result<(f64, f64, f64, u64)> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut non_2xx = 0;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["50.000%" | "50%", v] => p50 = parse_duration_ms(v),
            ["99.000%" | "99%", v] => p99 = parse_duration_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", v] => non_2xx = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    match (rps, p50, p99) {
        (Some(r), Some(a), Some(b)) => Ok((r, a, b, non_2xx)),
        _ => bail!("cannot read wrk's output:\n{out}"),
    }
}

fn parse_duration_ms(v: &str) -> Option<f64> {
    let (num, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|x| x * factor)
}

fn rss_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn ensure_wrk() -> Result<PathBuf> {
    if let Some(p) = idemgate_e2e::bins::find_on_path("wrk") {
        return Ok(p);
    }
    eprintln!("bench: installing wrk (Debian package)");
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "wrk"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    match idemgate_e2e::bins::find_on_path("wrk") {
        Some(p) if ok => Ok(p),
        _ => bail!("wrk is not installed and `apt-get install -y wrk` failed; install wrk by hand and rerun"),
    }
}

fn binaries() -> Result<Binaries> {
    let mut b = Binaries::from_env()?;
    let release = root().join("target/perf");
    b.server = release.join("idemgate-server");
    b.upstream = release.join("demo-upstream");
    Ok(b)
}

fn start(template: EnvoyTemplate, log_dir: &Path) -> Result<Stack> {
    let mut opts = StackOptions::demo();
    opts.name = format!(
        "bench-{}",
        if matches!(template, EnvoyTemplate::Passthrough) {
            "passthrough"
        } else {
            "idemgate"
        }
    );
    opts.template = template;
    opts.binaries = Some(binaries()?);
    opts.envoy_log_level = "warning".into();
    opts.log_dir = Some(log_dir.to_path_buf());
    Stack::start(opts)
}

fn measure(
    wrk: &Path,
    stack: &Stack,
    scenario: &str,
    args: &Args,
    run_id: &str,
    dir: &Path,
) -> Result<Sample> {
    let script = dir.join(format!("{scenario}.lua"));
    fs::write(&script, wrk_script(scenario, run_id))?;
    if scenario == "post-replay" {
        // The first request executes; the measured ones replay.
        let first = stack
            .gateway()
            .post("/v1/payments")
            .header("authorization", "Bearer bench")
            .header("content-type", "application/json")
            .header("idempotency-key", format!("{run_id}-replay"))
            .body(br#"{"amount":1000,"currency":"eur"}"#.to_vec())
            .send()?;
        if first.status != 201 {
            bail!("warm-up POST answered {}: {}", first.status, first.text());
        }
    }
    let out = Command::new(wrk)
        .args([
            "-t2",
            &format!("-c{}", args.connections),
            &format!("-d{}s", args.duration_s),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(stack.gateway_url())
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (requests_per_s, p50_ms, p99_ms, non_2xx) = parse_wrk(&text)?;
    let pid = stack.pid(Component::Envoy).unwrap_or(0);
    Ok(Sample {
        requests_per_s,
        p50_ms,
        p99_ms,
        non_2xx,
        rss_mib: rss_mib(pid),
    })
}

/// Entry point of `cargo xtask bench`.
///
/// # Errors
/// Setup, build, a stack that does not start, wrk failing, or (without `--no-check`) a
/// missed target.
pub fn run(args: &Args) -> Result<()> {
    if !args.no_build {
        crate::setup::run_setup()?;
        crate::build::run_build()?;
        run_cmd(cargo().args([
            "build",
            "--profile",
            "perf",
            "-p",
            "idemgate-server",
            "-p",
            "idemgate-e2e",
            "--bins",
        ]))?;
    }
    let wrk = ensure_wrk()?;
    let dir = root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let run_id = format!("bench-{}", std::process::id());
    let base = start(EnvoyTemplate::Passthrough, &dir.join("passthrough"))?;
    let filt = start(EnvoyTemplate::Gateway, &dir.join("idemgate"))?;
    let mut best: Vec<(String, String, Sample)> = Vec::new();
    for scenario in SCENARIOS {
        let mut a: Option<Sample> = None;
        let mut b: Option<Sample> = None;
        for round in 0..args.rounds {
            let id = format!("{run_id}-{round}");
            let sa = measure(&wrk, &base, scenario, args, &id, &dir)?;
            let sb = measure(&wrk, &filt, scenario, args, &id, &dir)?;
            eprintln!(
                "bench: {scenario} round {}: passthrough {:.0} req/s p50 {:.2} ms, idemgate {:.0} req/s p50 {:.2} ms",
                round + 1,
                sa.requests_per_s,
                sa.p50_ms,
                sb.requests_per_s,
                sb.p50_ms
            );
            if a.as_ref().is_none_or(|x| sa.p50_ms < x.p50_ms) {
                a = Some(sa);
            }
            if b.as_ref().is_none_or(|x| sb.p50_ms < x.p50_ms) {
                b = Some(sb);
            }
        }
        if let (Some(a), Some(b)) = (a, b) {
            best.push((scenario.to_owned(), "passthrough".to_owned(), a));
            best.push((scenario.to_owned(), "idemgate".to_owned(), b));
        }
    }
    let executions = filt.executions("/v1/payments").unwrap_or(0);
    drop(base);
    drop(filt);

    let mut table = String::from(
        "scenario      envoy          req/s    p50 ms   p99 ms   non-2xx  envoy rss MiB\n",
    );
    for (s, e, x) in &best {
        let _ = writeln!(
            table,
            "{s:<13} {e:<12} {:>8.0} {:>8.2} {:>8.2} {:>9} {:>14.1}",
            x.requests_per_s, x.p50_ms, x.p99_ms, x.non_2xx, x.rss_mib
        );
    }
    println!("{table}");
    println!("upstream executions of POST /v1/payments behind idemgate: {executions}");

    let find = |s: &str, e: &str| {
        best.iter()
            .find(|(a, b, _)| a == s && b == e)
            .map(|(_, _, x)| x.clone())
    };
    let mut failures = Vec::new();
    let mut json_rows = Vec::new();
    for (scenario, what, limit) in TARGETS {
        let value = if scenario == "any" {
            let rss = |e: &str| {
                best.iter()
                    .filter(|(_, b, _)| b == e)
                    .map(|(_, _, x)| x.rss_mib)
                    .fold(0.0, f64::max)
            };
            Some(rss("idemgate") - rss("passthrough"))
        } else {
            match (find(scenario, "passthrough"), find(scenario, "idemgate")) {
                (Some(a), Some(b)) if what.starts_with("p50") => Some(b.p50_ms - a.p50_ms),
                (Some(a), Some(b)) => Some(b.requests_per_s / a.requests_per_s.max(1.0)),
                _ => None,
            }
        };
        let Some(v) = value else { continue };
        let ok = if what.ends_with(">=") {
            v >= limit
        } else {
            v <= limit
        };
        println!(
            "target {scenario:<12} {what:<28} {limit:>6}: {v:>8.2}  {}",
            if ok { "ok" } else { "MISSED" }
        );
        json_rows.push(serde_json::json!({
            "scenario": scenario, "target": what, "limit": limit, "value": v, "ok": ok,
        }));
        if !ok {
            failures.push(format!("{scenario}: {what} {limit} (measured {v:.2})"));
        }
    }
    let samples: Vec<serde_json::Value> = best
        .iter()
        .map(|(s, e, x)| {
            serde_json::json!({
                "scenario": s, "envoy": e, "requests_per_s": x.requests_per_s,
                "p50_ms": x.p50_ms, "p99_ms": x.p99_ms, "non_2xx": x.non_2xx,
                "envoy_rss_mib": x.rss_mib,
            })
        })
        .collect();
    let results = serde_json::json!({"samples": samples, "targets": json_rows});
    fs::write(dir.join("results.json"), format!("{results:#}\n"))?;
    println!("results: {}", dir.join("results.json").display());
    if !failures.is_empty() && !args.no_check {
        bail!("missed benchmark targets: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let out = "Running 5s test @ http://127.0.0.1:1\n  Latency Distribution\n     50%  512.00us\n     75%    1.02ms\n     90%    2.00ms\n     99%    1.50s\n  1000 requests in 5.00s\n  Non-2xx or 3xx responses: 7\nRequests/sec:   2000.50\n";
        let (rps, p50, p99, non) = parse_wrk(out).unwrap();
        assert!((rps - 2000.5).abs() < 1e-9);
        assert!((p50 - 0.512).abs() < 1e-9);
        assert!((p99 - 1500.0).abs() < 1e-9);
        assert_eq!(non, 7);
        assert!(parse_wrk("garbage").is_err());
    }
}
