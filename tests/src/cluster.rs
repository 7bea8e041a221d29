//! A three-master Redis Cluster on free ports, for tests of the cluster mode.
//!
//! ```no_run
//! let cluster = idemgate_e2e::RedisCluster::start().expect("cluster");
//! let seeds = cluster.url(); // "redis://127.0.0.1:P1,redis://127.0.0.1:P2,..."
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::bins::redis_server_bin;
use crate::stack::free_port;

/// Three `redis-server --cluster-enabled yes` masters joined with `redis-cli --cluster
/// create` (no replicas). Dropping it kills the nodes; when the thread is panicking it
/// first prints each node's log.
pub struct RedisCluster {
    ports: Vec<u16>,
    dir: PathBuf,
    children: Vec<Child>,
    cli: PathBuf,
}

impl RedisCluster {
    /// Starts the nodes in a fresh directory under `target/e2e/` and waits (20 s at most)
    /// until `CLUSTER INFO` says `cluster_state:ok` on every node.
    ///
    /// # Errors
    /// A node or `redis-cli` cannot start, or the cluster does not form in time.
    pub fn start() -> Result<Self> {
        let server = redis_server_bin()?;
        let cli = server.with_file_name("redis-cli");
        let dir = crate::bins::workspace_root()
            .join("target/e2e")
            .join(format!("cluster-{}-{}", std::process::id(), free_port()?));
        let mut cluster = Self {
            ports: Vec::new(),
            dir,
            children: Vec::new(),
            cli,
        };
        for _ in 0..3 {
            let port = free_port()?;
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)
                .with_context(|| format!("creating {}", node_dir.display()))?;
            let child = Command::new(&server)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(node_dir.join("nodes.conf"))
                .arg("--dir")
                .arg(&node_dir)
                .args(["--save", "", "--appendonly", "no"])
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", server.display()))?;
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        for p in cluster.ports.clone() {
            cluster.wait(|c| c.cli(p, &["PING"]).contains("PONG"), "PING")?;
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(str::to_owned));
        let out = Command::new(&cluster.cli)
            .args(&create)
            .output()
            .with_context(|| format!("running {}", cluster.cli.display()))?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        for p in cluster.ports.clone() {
            cluster.wait(
                |c| c.cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"),
                "cluster_state:ok",
            )?;
        }
        Ok(cluster)
    }

    fn wait(&self, ok: impl Fn(&Self) -> bool, what: &str) -> Result<()> {
        crate::wait_until(&format!("redis cluster: {what}"), 20_000, || Ok(ok(self)))
    }

    /// `redis-cli -p PORT ARGS...`'s standard output (empty when it cannot run).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        crate::redis::cli_output(&self.cli, port, args)
    }

    /// The nodes' ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Comma-separated seed URLs, the server's `--redis-url` with `--redis-cluster`.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for p in &self.ports {
                let log = std::fs::read_to_string(self.dir.join(p.to_string()).join("redis.log"))
                    .unwrap_or_default();
                eprintln!("----- redis cluster node {p} -----\n{log}");
            }
        }
    }
}
