//! [`Stack`]: Redis, the idemgate server, the demo upstream and Envoy with the filter,
//! each on its own port, with logs in a per-stack directory.

use std::collections::{BTreeMap, HashSet};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::bins::{workspace_root, Binaries};
use crate::envoy::{self, EnvoyTemplate, EnvoyVars};
use crate::http::Client;
use crate::process::{log_tail, Proc};
use crate::redis::{self, RedisValue};
use crate::upstream::{Executions, ReceivedRequest};

/// Lines of each log printed when a test panics with a stack alive.
pub const PANIC_LOG_LINES: usize = 200;
/// Lines of the failing component's log quoted in a startup error.
pub const STARTUP_ERROR_LOG_LINES: usize = 40;

/// One process of a stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// `redis-server`.
    Redis,
    /// `idemgate-server` (store API + admin listener).
    Server,
    /// `demo-upstream`.
    Upstream,
    /// Envoy with the rendered template.
    Envoy,
}

impl Component {
    /// Every component in start order.
    pub const ALL: [Component; 4] = [
        Component::Redis,
        Component::Server,
        Component::Upstream,
        Component::Envoy,
    ];

    /// Short name, also the log file stem (`redis.log`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Component::Redis => "redis",
            Component::Server => "server",
            Component::Upstream => "upstream",
            Component::Envoy => "envoy",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Ports to use instead of free ones; `None` picks a free port (the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedPorts {
    /// Envoy listener.
    pub gateway: Option<u16>,
    /// Envoy admin.
    pub envoy_admin: Option<u16>,
    /// Demo upstream.
    pub upstream: Option<u16>,
    /// idemgate server store API.
    pub store: Option<u16>,
    /// idemgate server admin listener (dashboard).
    pub admin: Option<u16>,
    /// Redis.
    pub redis: Option<u16>,
}

/// The ports a running stack uses (all on 127.0.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackPorts {
    /// Envoy listener.
    pub gateway: u16,
    /// Envoy admin.
    pub envoy_admin: u16,
    /// Demo upstream.
    pub upstream: u16,
    /// idemgate server store API.
    pub store: u16,
    /// idemgate server admin listener (dashboard).
    pub admin: u16,
    /// Redis.
    pub redis: u16,
}

/// How to start a [`Stack`]. Build it with [`StackOptions::new`], [`StackOptions::demo`]
/// or struct update syntax over `StackOptions::default()`.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// The filter's JSON configuration. `Value::Null` (the default) means
    /// `envoy/demo-filter.json`. [`Stack::start`] checks it against the committed JSON
    /// Schema first ([`crate::schema::check_filter_config`]): the schema checks shape, not
    /// ranges, so a configuration the filter refuses by value still reaches Envoy.
    pub filter_config: Value,
    /// The Envoy template (default [`EnvoyTemplate::Gateway`]).
    pub template: EnvoyTemplate,
    /// Label of the log directory, e.g. the test name (default `stack`).
    pub name: String,
    /// Exact log directory; `None` (default) makes a fresh one under
    /// `target/e2e/<name>-<unix_ms>-<pid>-<n>`. Logs are kept after the stack stops.
    pub log_dir: Option<PathBuf>,
    /// Fixed ports (default: all free ports).
    pub ports: FixedPorts,
    /// How long each component may take to become ready, in milliseconds (default 30 000).
    pub startup_timeout_ms: u64,
    /// Envoy `--concurrency` (worker threads, each with its own Wasm VM; default 2).
    pub envoy_concurrency: u32,
    /// Envoy `-l` log level (default `info`).
    pub envoy_log_level: String,
    /// Extra arguments appended to `idemgate-server serve ...`.
    pub server_args: Vec<String>,
    /// Extra environment variables for the server (`RUST_LOG` defaults to `info`).
    pub server_env: Vec<(String, String)>,
    /// Extra arguments appended to `redis-server ...` (after the defaults, so they win),
    /// e.g. `["--maxmemory", "64mb"]`.
    pub redis_args: Vec<String>,
    /// The Redis URL the server uses instead of the stack's own Redis, e.g. the seeds of a
    /// [`crate::RedisCluster`] (with `--redis-cluster` in `server_args`). The stack still
    /// runs its own Redis, unused by the server.
    pub server_redis_url: Option<String>,
    /// Binaries to run; `None` (default) resolves them with [`Binaries::from_env`].
    pub binaries: Option<Binaries>,
    /// When set to `true` (e.g. by a Ctrl-C handler), a start in progress gives up with an
    /// error and stops what it started.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            filter_config: Value::Null,
            template: EnvoyTemplate::Gateway,
            name: "stack".into(),
            log_dir: None,
            ports: FixedPorts::default(),
            startup_timeout_ms: 30_000,
            envoy_concurrency: 2,
            envoy_log_level: "info".into(),
            server_args: Vec::new(),
            server_env: Vec::new(),
            redis_args: Vec::new(),
            server_redis_url: None,
            binaries: None,
            cancel: None,
        }
    }
}

impl StackOptions {
    /// Options for a test named `name` with this filter configuration.
    pub fn new(name: &str, filter_config: Value) -> Self {
        Self {
            filter_config,
            name: name.into(),
            ..Self::default()
        }
    }

    /// The demo's options: `envoy/demo-filter.json`, logs (and Redis data) in
    /// `target/demo/`, truncated at each start.
    pub fn demo() -> Self {
        Self {
            name: "demo".into(),
            log_dir: Some(workspace_root().join("target/demo")),
            ..Self::default()
        }
    }
}

/// Reads `envoy/demo-filter.json`.
///
/// # Errors
/// The file is missing or is not JSON.
pub fn demo_filter_config() -> Result<Value> {
    let path = workspace_root().join("envoy/demo-filter.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: std::sync::OnceLock<Mutex<HashSet<u16>>> = std::sync::OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released). Never returns the same
/// port twice within one process, so parallel tests do not pick each other's ports.
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> Result<u16> {
    for _ in 0..64 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .context("binding 127.0.0.1:0 to find a free port")?
            .port();
        let mut set = handed_out().lock().unwrap_or_else(|e| e.into_inner());
        if set.insert(port) {
            return Ok(port);
        }
    }
    bail!("no fresh free port found after 64 tries")
}

fn unique_dir(root: &Path, name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    root.join(format!(
        "{safe}-{ms}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Calls `check` every 50 ms until it returns `Ok(true)` or `timeout_ms` pass.
///
/// # Errors
/// The timeout passed; the message names `what` and the last error from `check`.
pub fn wait_until(
    what: &str,
    timeout_ms: u64,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let mut last: String;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("{what} did not happen within {timeout_ms} ms (last: {last})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running stack. Dropping it kills every process it started (and, when the thread is
/// panicking, prints the tail of every log to stderr).
#[derive(Debug)]
pub struct Stack {
    bins: Binaries,
    ports: StackPorts,
    dir: PathBuf,
    envoy_config: PathBuf,
    opts: StackOptions,
    procs: BTreeMap<Component, Proc>,
    started: HashSet<Component>,
}

impl Stack {
    /// Starts Redis, the server, the demo upstream and Envoy, and waits until each is ready
    /// (Redis answers PING, the server's `GET /healthz` is 200, the upstream answers,
    /// Envoy's admin `GET /ready` says `LIVE`).
    ///
    /// # Errors
    /// A binary is missing (the message says to run `cargo xtask test`), the template
    /// cannot be rendered, or a component exits or is not ready within
    /// `startup_timeout_ms` (the message names it and quotes its log). Whatever was
    /// started is stopped again.
    pub fn start(mut opts: StackOptions) -> Result<Stack> {
        let bins = match opts.binaries.take() {
            Some(b) => b,
            None => Binaries::from_env()?,
        };
        if opts.filter_config.is_null() {
            opts.filter_config = demo_filter_config()?;
        }
        crate::schema::check_filter_config(&opts.filter_config)?;
        let pick = |fixed: Option<u16>| fixed.map_or_else(free_port, Ok);
        let ports = StackPorts {
            gateway: pick(opts.ports.gateway)?,
            envoy_admin: pick(opts.ports.envoy_admin)?,
            upstream: pick(opts.ports.upstream)?,
            store: pick(opts.ports.store)?,
            admin: pick(opts.ports.admin)?,
            redis: pick(opts.ports.redis)?,
        };
        let dir = match &opts.log_dir {
            Some(d) => d.clone(),
            None => unique_dir(&workspace_root().join("target/e2e"), &opts.name),
        };
        std::fs::create_dir_all(dir.join("redis-data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let envoy_config = dir.join("envoy.yaml");
        let template = opts.template.path();
        envoy::render_file(
            &template,
            &EnvoyVars {
                gateway_port: ports.gateway,
                admin_port: ports.envoy_admin,
                upstream_port: ports.upstream,
                store_port: ports.store,
                filter_wasm: bins.filter_wasm.clone(),
                filter_config: opts.filter_config.clone(),
            },
            &envoy_config,
        )?;
        let mut stack = Stack {
            bins,
            ports,
            dir,
            envoy_config,
            opts,
            procs: BTreeMap::new(),
            started: HashSet::new(),
        };
        // Start early what does not depend on anything, wait late.
        stack.spawn(Component::Redis)?;
        stack.spawn(Component::Upstream)?;
        stack.wait_ready(Component::Redis)?;
        stack.spawn(Component::Server)?;
        stack.spawn(Component::Envoy)?;
        stack.wait_ready(Component::Upstream)?;
        stack.wait_ready(Component::Server)?;
        stack.wait_ready(Component::Envoy)?;
        Ok(stack)
    }

    fn command(&self, c: Component) -> Command {
        let p = &self.ports;
        match c {
            Component::Redis => {
                let mut cmd = Command::new(&self.bins.redis_server);
                cmd.arg("--port")
                    .arg(p.redis.to_string())
                    .arg("--bind")
                    .arg("127.0.0.1")
                    .arg("--dir")
                    .arg(self.dir.join("redis-data"))
                    // AOF fsynced every second in the data directory, as production
                    // Redis must run (see README "Redis"): a restart keeps the records.
                    .args([
                        "--save",
                        "",
                        "--appendonly",
                        "yes",
                        "--appendfsync",
                        "everysec",
                    ])
                    .args(["--daemonize", "no"])
                    .args(&self.opts.redis_args);
                cmd
            }
            Component::Server => {
                let mut cmd = Command::new(&self.bins.server);
                cmd.arg("serve")
                    .arg("--redis-url")
                    .arg(
                        self.opts
                            .server_redis_url
                            .clone()
                            .unwrap_or_else(|| self.redis_url()),
                    )
                    .arg("--store-listen")
                    .arg(format!("127.0.0.1:{}", p.store))
                    .arg("--admin-listen")
                    .arg(format!("127.0.0.1:{}", p.admin))
                    .args(&self.opts.server_args);
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "info");
                }
                cmd.envs(self.opts.server_env.iter().map(|(k, v)| (k, v)));
                cmd
            }
            Component::Upstream => {
                let mut cmd = Command::new(&self.bins.upstream);
                cmd.arg("--listen").arg(format!("127.0.0.1:{}", p.upstream));
                cmd
            }
            Component::Envoy => {
                let mut cmd = Command::new(&self.bins.envoy);
                cmd.arg("-c")
                    .arg(&self.envoy_config)
                    .args(["--disable-hot-restart", "--concurrency"])
                    .arg(self.opts.envoy_concurrency.to_string())
                    .arg("-l")
                    .arg(&self.opts.envoy_log_level);
                cmd
            }
        }
    }

    fn spawn(&mut self, c: Component) -> Result<()> {
        if let Some(mut old) = self.procs.remove(&c) {
            old.kill();
        }
        let log = self.log_path(c);
        if self.started.insert(c) && self.opts.log_dir.is_some() {
            // A fixed log directory (the demo) starts each run with fresh logs.
            let _ = std::fs::remove_file(&log);
        }
        let proc = Proc::spawn(c.name(), self.command(c), &log)?;
        self.procs.insert(c, proc);
        Ok(())
    }

    fn probe(&self, c: Component) -> Result<bool> {
        let quick = |url: String| Client::with_timeout(url, Duration::from_millis(1000));
        Ok(match c {
            Component::Redis => {
                redis::command(self.ports.redis, &["PING"])?
                    .as_text()
                    .as_deref()
                    == Some("PONG")
            }
            Component::Server => {
                let r = quick(self.store_url()).get("/healthz").send()?;
                if r.status != 200 {
                    bail!("GET /healthz answered {}: {}", r.status, r.text());
                }
                TcpStream::connect(("127.0.0.1", self.ports.admin))
                    .context("admin listener not accepting")?;
                true
            }
            Component::Upstream => {
                quick(self.upstream_url())
                    .get("/__upstream/healthz")
                    .send()?
                    .status
                    == 200
            }
            Component::Envoy => {
                let r = quick(self.envoy_admin_url()).get("/ready").send()?;
                if r.status != 200 || r.text().trim() != "LIVE" {
                    bail!("GET /ready answered {} {:?}", r.status, r.text().trim());
                }
                true
            }
        })
    }

    fn wait_ready(&mut self, c: Component) -> Result<()> {
        let timeout = Duration::from_millis(self.opts.startup_timeout_ms);
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            if self
                .opts
                .cancel
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
            {
                bail!("cancelled while waiting for {c} to become ready");
            }
            let exited = self
                .procs
                .get_mut(&c)
                .map_or(Some(None), |p| p.exited().map(Some));
            if let Some(status) = exited {
                let how =
                    status.map_or_else(|| "is not running".to_owned(), |s| format!("exited ({s})"));
                return Err(self.startup_error(c, &format!("{c} {how} before becoming ready")));
            }
            match self.probe(c) {
                Ok(true) => return Ok(()),
                Ok(false) => last = "not ready yet".into(),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                return Err(self.startup_error(
                    c,
                    &format!(
                        "{c} did not become ready within {} ms (last: {last})",
                        self.opts.startup_timeout_ms
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn startup_error(&self, c: Component, msg: &str) -> anyhow::Error {
        let log = self.log_path(c);
        anyhow!(
            "{msg}\n---- last {STARTUP_ERROR_LOG_LINES} lines of {} ----\n{}",
            log.display(),
            log_tail(&log, STARTUP_ERROR_LOG_LINES)
        )
    }

    /// The OS process id of a running component.
    pub fn pid(&self, c: Component) -> Option<u32> {
        self.procs.get(&c).map(Proc::id)
    }

    /// Stops one component (SIGTERM, then SIGKILL after 5 s). Its port stays reserved.
    pub fn stop(&mut self, c: Component) {
        if let Some(mut p) = self.procs.remove(&c) {
            p.terminate(5_000);
        }
    }

    /// Kills one component at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, c: Component) {
        if let Some(mut p) = self.procs.remove(&c) {
            p.kill();
        }
    }

    /// Starts a stopped component again on the same port (and, for Redis, the same data
    /// directory) and waits until it is ready. Restarts it if it is running.
    ///
    /// # Errors
    /// It exits or is not ready within `startup_timeout_ms`.
    pub fn restart(&mut self, c: Component) -> Result<()> {
        self.stop(c);
        self.spawn(c)?;
        self.wait_ready(c)
    }

    /// Whether the component's process is running.
    pub fn is_running(&mut self, c: Component) -> bool {
        self.procs.get_mut(&c).is_some_and(|p| p.exited().is_none())
    }

    /// Stops Redis (for store outage tests; SIGTERM, so it flushes its append-only file and
    /// keeps its records across [`Stack::start_redis`]).
    pub fn stop_redis(&mut self) {
        self.stop(Component::Redis);
    }

    /// Starts Redis again on the same port and waits for PONG.
    ///
    /// # Errors
    /// Redis does not come up.
    pub fn start_redis(&mut self) -> Result<()> {
        self.restart(Component::Redis)
    }

    /// The ports in use.
    pub fn ports(&self) -> StackPorts {
        self.ports
    }

    /// The binaries in use.
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// `http://127.0.0.1:<gateway>`: Envoy's listener, what clients call.
    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.gateway)
    }
    /// `http://127.0.0.1:<upstream>`: the demo upstream, bypassing Envoy.
    pub fn upstream_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.upstream)
    }
    /// `http://127.0.0.1:<admin>`: the server's admin listener (dashboard, `/api`).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.admin)
    }
    /// `http://127.0.0.1:<store>`: the server's store API (what the filter calls).
    pub fn store_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.store)
    }
    /// `http://127.0.0.1:<envoy_admin>`: Envoy's admin interface.
    pub fn envoy_admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.envoy_admin)
    }
    /// `redis://127.0.0.1:<redis>`.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports.redis)
    }

    /// A client for [`Stack::gateway_url`].
    pub fn gateway(&self) -> Client {
        Client::new(self.gateway_url())
    }
    /// A client for [`Stack::upstream_url`].
    pub fn upstream(&self) -> Client {
        Client::new(self.upstream_url())
    }
    /// A client for [`Stack::admin_url`].
    pub fn admin(&self) -> Client {
        Client::new(self.admin_url())
    }
    /// A client for [`Stack::store_url`].
    pub fn store(&self) -> Client {
        Client::new(self.store_url())
    }
    /// A client for [`Stack::envoy_admin_url`].
    pub fn envoy_admin(&self) -> Client {
        Client::new(self.envoy_admin_url())
    }

    /// Every request the upstream received so far, oldest first.
    ///
    /// # Errors
    /// The upstream does not answer.
    pub fn upstream_requests(&self) -> Result<Vec<ReceivedRequest>> {
        self.upstream().get("/__upstream/requests").send()?.json()
    }

    /// Executed side effects per path (without query).
    ///
    /// # Errors
    /// The upstream does not answer.
    pub fn upstream_executions(&self) -> Result<Executions> {
        self.upstream().get("/__upstream/executions").send()?.json()
    }

    /// Executed side effects on one path (0 when none).
    ///
    /// # Errors
    /// The upstream does not answer.
    pub fn executions(&self, path: &str) -> Result<u64> {
        Ok(self.upstream_executions()?.get(path).copied().unwrap_or(0))
    }

    /// Envoy's counters and gauges (`GET /stats`), `name -> value`.
    ///
    /// # Errors
    /// Envoy's admin does not answer.
    pub fn envoy_stats(&self) -> Result<BTreeMap<String, u64>> {
        let r = self.envoy_admin().get("/stats").send()?;
        if r.status != 200 {
            bail!("envoy GET /stats answered {}", r.status);
        }
        Ok(envoy::parse_stats(&r.text()))
    }

    /// One Envoy counter or gauge; `None` when Envoy has not created it (yet).
    ///
    /// # Errors
    /// Envoy's admin does not answer.
    pub fn envoy_stat(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.envoy_stats()?.get(name).copied())
    }

    /// Runs one Redis command, e.g. `stack.redis(&["KEYS", "*"])`.
    ///
    /// # Errors
    /// Redis does not answer, or answers with an error reply.
    pub fn redis(&self, args: &[&str]) -> Result<RedisValue> {
        redis::command(self.ports.redis, args)
    }

    /// The per-stack directory holding the logs, `envoy.yaml` and `redis-data/`.
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// The log file of a component (`<log_dir>/<name>.log`, stdout and stderr).
    pub fn log_path(&self, c: Component) -> PathBuf {
        self.dir.join(format!("{}.log", c.name()))
    }

    /// The last `lines` lines of a component's log.
    pub fn log_tail(&self, c: Component, lines: usize) -> String {
        log_tail(&self.log_path(c), lines)
    }

    /// The rendered Envoy config file.
    pub fn envoy_config_path(&self) -> &Path {
        &self.envoy_config
    }

    /// Prints the last `lines` lines of every component's log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        for c in Component::ALL {
            let path = self.log_path(c);
            if path.exists() {
                eprintln!(
                    "\n==== {c} log ({}), last {lines} lines ====\n{}",
                    path.display(),
                    log_tail(&path, lines)
                );
            }
        }
    }

    /// Stops every process (Envoy first, Redis last).
    pub fn shutdown(&mut self) {
        for c in Component::ALL.iter().rev() {
            if let Some(mut p) = self.procs.remove(c) {
                p.kill();
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(PANIC_LOG_LINES);
        }
        self.shutdown();
    }
}
