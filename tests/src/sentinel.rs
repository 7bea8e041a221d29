//! A replicated Redis watched by Sentinel on free ports, for failover tests: a primary, one
//! replica and one Sentinel (quorum 1), with fast failure detection
//! ([`DOWN_AFTER_MS`]). Every process is killed on drop; when the thread is panicking the
//! logs are printed first.
//!
//! ```no_run
//! let mut r = idemgate_e2e::ReplicatedRedis::start().expect("primary, replica, sentinel");
//! let sentinels = r.sentinel_url(); // the server's --redis-sentinel
//! r.kill_primary();
//! let new_primary = r.wait_failover().expect("the replica is promoted");
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::bins::{find_on_path, redis_server_bin, workspace_root};
use crate::process::Proc;
use crate::stack::free_port;

/// The master name the Sentinel monitors.
pub const MASTER_NAME: &str = "mymaster";
/// `sentinel down-after-milliseconds`: how long the primary must be silent before the
/// Sentinel calls it down.
pub const DOWN_AFTER_MS: u64 = 500;
/// `sentinel failover-timeout`, ms.
pub const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// Primary, replica and Sentinel. Ports are fixed at start; after a failover
/// [`ReplicatedRedis::primary_port`] and [`ReplicatedRedis::replica_port`] keep naming the
/// processes started as such.
pub struct ReplicatedRedis {
    dir: PathBuf,
    primary: Option<Proc>,
    replica: Option<Proc>,
    sentinel: Option<Proc>,
    primary_port: u16,
    replica_port: u16,
    sentinel_port: u16,
    cli: PathBuf,
}

impl ReplicatedRedis {
    /// Starts the three in a fresh directory under `target/e2e/` and waits (20 s at most)
    /// until the replica is in sync and the Sentinel knows the replica.
    ///
    /// The Sentinel is Debian's `redis-sentinel` when on PATH, else `redis-server
    /// --sentinel` (the same program).
    ///
    /// # Errors
    /// A process cannot start, or the topology is not ready in time.
    pub fn start() -> Result<Self> {
        let server = redis_server_bin()?;
        let cli = server.with_file_name("redis-cli");
        let dir = workspace_root().join("target/e2e").join(format!(
            "sentinel-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (primary_port, replica_port, sentinel_port) =
            (free_port()?, free_port()?, free_port()?);
        let mut r = Self {
            dir,
            primary: None,
            replica: None,
            sentinel: None,
            primary_port,
            replica_port,
            sentinel_port,
            cli,
        };
        r.primary = Some(r.redis(&server, "primary", primary_port, None)?);
        r.replica = Some(r.redis(&server, "replica", replica_port, Some(primary_port))?);
        for p in [primary_port, replica_port] {
            r.wait(|r| r.cli(p, &["PING"]).contains("PONG"), "PING")?;
        }
        r.wait(
            |r| {
                r.cli(replica_port, &["INFO", "replication"])
                    .contains("master_link_status:up")
            },
            "replica in sync",
        )?;
        let conf = r.dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = r.dir.display()
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let mut cmd = match find_on_path("redis-sentinel") {
            Some(bin) => Command::new(bin),
            None => {
                let mut c = Command::new(&server);
                c.arg("--sentinel");
                c
            }
        };
        cmd.arg(&conf);
        r.sentinel = Some(Proc::spawn("sentinel", cmd, &r.dir.join("sentinel.log"))?);
        r.wait(
            |r| {
                r.cli(sentinel_port, &["SENTINEL", "REPLICAS", MASTER_NAME])
                    .contains(&replica_port.to_string())
            },
            "the sentinel to discover the replica",
        )?;
        Ok(r)
    }

    fn redis(&self, server: &Path, name: &str, port: u16, of: Option<u16>) -> Result<Proc> {
        let node_dir = self.dir.join(name);
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("creating {}", node_dir.display()))?;
        let mut cmd = Command::new(server);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&node_dir)
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(primary) = of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        Proc::spawn(name, cmd, &self.dir.join(format!("{name}.log")))
    }

    fn wait(&self, ok: impl Fn(&Self) -> bool, what: &str) -> Result<()> {
        crate::wait_until(&format!("replicated redis: {what}"), 20_000, || {
            Ok(ok(self))
        })
    }

    /// `redis-cli -p PORT ARGS...`'s standard output (empty when it cannot run).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        crate::redis::cli_output(&self.cli, port, args)
    }

    /// The Sentinel's URL (the server's `--redis-sentinel`).
    pub fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.sentinel_port)
    }

    /// Port of the process started as the primary.
    pub fn primary_port(&self) -> u16 {
        self.primary_port
    }

    /// Port of the process started as the replica.
    pub fn replica_port(&self) -> u16 {
        self.replica_port
    }

    /// SIGKILLs the primary (no chance to send anything more to the replica).
    pub fn kill_primary(&mut self) {
        if let Some(p) = self.primary.as_mut() {
            p.kill();
        }
    }

    /// SIGSTOPs (`true`) or SIGCONTs (`false`) the replica: stopped, it acknowledges
    /// nothing and reads nothing from its primary.
    ///
    /// # Errors
    /// `kill` cannot be run or fails.
    pub fn pause_replica(&self, stop: bool) -> Result<()> {
        let pid = self
            .replica
            .as_ref()
            .map(Proc::id)
            .context("the replica is not running")?;
        let status = Command::new("kill")
            .arg(if stop { "-STOP" } else { "-CONT" })
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill {pid} failed: {status}");
        }
        Ok(())
    }

    /// Drops the primary's link to its replicas (`CLIENT KILL TYPE replica`): while the
    /// replica is paused, writes after this reach no replica at all (nothing is left in
    /// the replica's socket buffer to read once it resumes).
    ///
    /// # Errors
    /// The primary did not kill exactly one replica connection.
    pub fn cut_replication(&self) -> Result<()> {
        let out = self.cli(self.primary_port, &["CLIENT", "KILL", "TYPE", "replica"]);
        if out.trim() != "1" {
            bail!("CLIENT KILL TYPE replica answered {out:?}");
        }
        Ok(())
    }

    /// Waits (15 s at most) until the Sentinel names the started replica as the master and
    /// that replica says it is one. Returns the time it took.
    ///
    /// # Errors
    /// No failover in time.
    pub fn wait_failover(&self) -> Result<Duration> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(15);
        let replica = self.replica_port.to_string();
        loop {
            let named = self.cli(
                self.sentinel_port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
            );
            if named.lines().nth(1).map(str::trim) == Some(replica.as_str())
                && self
                    .cli(self.replica_port, &["ROLE"])
                    .lines()
                    .next()
                    .is_some_and(|l| l.trim() == "master")
            {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("no failover within 15 s (sentinel names {named:?})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ReplicatedRedis {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for p in [&mut self.primary, &mut self.replica, &mut self.sentinel]
            .into_iter()
            .flatten()
        {
            p.kill();
            if panicking {
                eprintln!(
                    "----- {} -----\n{}",
                    p.name(),
                    crate::process::log_tail(p.log_path(), 200)
                );
            }
        }
    }
}
