//! Command line and environment: `idemgate-server serve [flags]`, validated at start.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The idemgate server: the store API the Envoy filter calls and the admin listener.
#[derive(Debug, Parser)]
#[command(name = "idemgate-server", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the store API and the admin listener until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Work with the filter's JSON configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Records through the admin API: list, show, purge, release.
    Keys {
        /// Server, token, output.
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        /// What to do.
        #[command(subcommand)]
        command: crate::cli::KeysCommand,
    },
    /// Bulk purge by scope, route or key prefix: a dry-run count, then with --yes the
    /// deletion.
    Purge {
        /// Server, token, output.
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        /// The filter.
        #[command(flatten)]
        args: crate::cli::BulkArgs,
    },
    /// Counters of the last minute, hour and day.
    Stats {
        /// Server, token, output.
        #[command(flatten)]
        client: crate::cli::ClientArgs,
    },
}

/// `idemgate-server config ...`
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// Validate a filter configuration file exactly as the filter does when Envoy loads it;
    /// prints the resolved routes, or the field and reason of the first error (exit 1).
    Check {
        /// Path of the JSON file (the plugin's `configuration` value).
        file: std::path::PathBuf,
    },
}

/// Flags of `serve`; each also reads an environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Redis URL: redis://[user:password@]host:port[/db], rediss://... (TLS, verified
    /// against the system's CA store; `rediss://host:port/#insecure` skips verification,
    /// for tests only) or redis+unix:///path. With --redis-cluster: comma-separated seed node URLs of a Redis
    /// Cluster (redis:// or rediss://).
    #[arg(
        long,
        env = "IDEMGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Address of the store API listener (the Envoy cluster the filter calls).
    #[arg(long, env = "IDEMGATE_STORE_LISTEN", default_value = "127.0.0.1:8180")]
    pub store_listen: SocketAddr,

    /// Address of the admin listener (dashboard and /api).
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8181")]
    pub admin_listen: SocketAddr,

    /// Longest a store call may wait for Redis, in milliseconds (1..=60000); slower calls
    /// answer 503.
    #[arg(long, env = "IDEMGATE_REDIS_TIMEOUT_MS", default_value_t = 500)]
    pub redis_timeout_ms: u64,

    /// Prefix of every Redis key (1..=64 of A-Z a-z 0-9 _ - . :); records live at
    /// `{prefix}:rec:{scope}:{key}`.
    #[arg(long, env = "IDEMGATE_KEY_PREFIX", default_value = "idemgate")]
    pub key_prefix: String,

    /// Treat --redis-url as the seed nodes of a Redis Cluster.
    #[arg(long, env = "IDEMGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// File of admin API tokens: one `label token` per line, `#` comments. The label names
    /// the operator in events. (One token can also come from IDEMGATE_ADMIN_TOKEN, label
    /// `admin`; tokens are never taken from a command-line value.)
    #[arg(long, env = "IDEMGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,

    /// Directory of the built dashboard, served at / on the admin listener (index.html for
    /// client-side routes); without it a placeholder page.
    #[arg(long, env = "IDEMGATE_DASHBOARD_DIR")]
    pub dashboard_dir: Option<std::path::PathBuf>,

    /// The admin token from IDEMGATE_ADMIN_TOKEN (read by `main`, never a flag).
    #[arg(skip)]
    pub admin_token: Option<String>,

    /// Sentinel and WAIT: claims that survive a primary failover.
    #[command(flatten)]
    pub failover: FailoverArgs,
    /// The Redis safety checks (`--allow-evicting-redis`, `--redis-check-interval-s`).
    #[command(flatten)]
    pub safety: crate::safety::SafetyArgs,
}

/// Flags for a replicated Redis: Sentinel discovery and `WAIT` after writes.
#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// Comma-separated Redis Sentinel URLs (`redis://host:26379`, `rediss://...`): the
    /// server asks them for the master of --redis-sentinel-master and follows a failover
    /// without a restart. --redis-url then only supplies the master's credentials, TLS
    /// and database. Not with --redis-cluster.
    #[arg(long, env = "IDEMGATE_REDIS_SENTINEL")]
    pub redis_sentinel: Option<String>,

    /// The master (service) name the Sentinels monitor.
    #[arg(
        long,
        env = "IDEMGATE_REDIS_SENTINEL_MASTER",
        default_value = DEFAULT_SENTINEL_MASTER
    )]
    pub redis_sentinel_master: String,

    /// Replicas that must acknowledge each claim and complete (`WAIT N timeout`), 0..=16;
    /// 0 (the default) turns WAIT off. A claim acknowledged by fewer is undone and answers
    /// 503; a complete answers 503 and the filter retries it.
    #[arg(long, env = "IDEMGATE_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// How long WAIT waits for the replicas, in milliseconds (1..=60000, and below
    /// --redis-timeout-ms, which bounds the whole store call).
    #[arg(
        long,
        env = "IDEMGATE_REDIS_WAIT_TIMEOUT_MS",
        default_value_t = DEFAULT_WAIT_TIMEOUT_MS
    )]
    pub redis_wait_timeout_ms: u64,
}

impl Default for FailoverArgs {
    fn default() -> Self {
        Self {
            redis_sentinel: None,
            redis_sentinel_master: DEFAULT_SENTINEL_MASTER.to_owned(),
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: DEFAULT_WAIT_TIMEOUT_MS,
        }
    }
}

/// Default `--redis-sentinel-master` (the name in Redis' sample `sentinel.conf`).
pub const DEFAULT_SENTINEL_MASTER: &str = "mymaster";
/// Default `--redis-wait-timeout-ms`.
pub const DEFAULT_WAIT_TIMEOUT_MS: u64 = 100;
/// Largest `--redis-wait-replicas`.
pub const MAX_WAIT_REPLICAS: u32 = 16;
/// Largest `--redis-wait-timeout-ms`.
pub const MAX_WAIT_TIMEOUT_MS: u64 = 60_000;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub enum RedisSpec {
    /// One server (plain or TLS).
    Single(Box<redis::Client>),
    /// Seed node URLs of a Redis Cluster.
    Cluster(Vec<String>),
    /// A master found through Redis Sentinel.
    Sentinel {
        /// Sentinel URLs.
        sentinels: Vec<String>,
        /// The monitored master's name.
        master: String,
        /// Credentials, TLS mode and database for the master (from `--redis-url`).
        client: Box<redis::Client>,
    },
}

/// Largest accepted `--redis-timeout-ms`.
pub const MAX_REDIS_TIMEOUT_MS: u64 = 60_000;

/// A `serve` configuration that passed validation.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach Redis (nothing is connected yet).
    pub redis: RedisSpec,
    /// The Redis URL with any password replaced by `***`, for logs.
    pub redis_url_redacted: String,
    /// Store API listen address.
    pub store_listen: SocketAddr,
    /// Admin listen address.
    pub admin_listen: SocketAddr,
    /// Per-call Redis timeout.
    pub redis_timeout: Duration,
    /// Redis key prefix.
    pub key_prefix: String,
    /// Admin API tokens (may be empty on a loopback admin listener).
    pub tokens: crate::auth::AdminTokens,
    /// Directory of the built dashboard.
    pub dashboard_dir: Option<std::path::PathBuf>,
    /// `WAIT` after claims and completes; `None` when `--redis-wait-replicas` is 0.
    pub wait: Option<crate::store::WaitPolicy>,
    /// The Redis safety checks.
    pub safety: crate::safety::SafetyConfig,
}

/// Why a configuration was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--redis-url` does not parse.
    #[error("--redis-url / IDEMGATE_REDIS_URL {url:?} is not a usable Redis URL: {source}")]
    RedisUrl {
        /// The URL, redacted.
        url: String,
        /// The parser's reason.
        source: redis::RedisError,
    },
    /// `--redis-timeout-ms` out of range.
    #[error("--redis-timeout-ms / IDEMGATE_REDIS_TIMEOUT_MS must be 1..={MAX_REDIS_TIMEOUT_MS}, got {0}")]
    RedisTimeout(u64),
    /// `--key-prefix` empty, too long or with characters outside the allowed set.
    #[error(
        "--key-prefix / IDEMGATE_KEY_PREFIX {0:?} must be 1..=64 characters of A-Z a-z 0-9 _ - . :"
    )]
    KeyPrefix(String),
    /// Both listeners on one address.
    #[error("--store-listen and --admin-listen are both {0}; they must differ")]
    SameListen(SocketAddr),
    /// The token file cannot be read or parsed, or a token breaks a rule.
    #[error("admin tokens (--admin-token-file / IDEMGATE_ADMIN_TOKEN): {0}")]
    Tokens(String),
    /// No token and a non-loopback admin listener.
    #[error("--admin-listen {0} is not a loopback address and no admin token is configured; set IDEMGATE_ADMIN_TOKEN or --admin-token-file (or listen on 127.0.0.1)")]
    TokenRequired(SocketAddr),
    /// `--redis-sentinel` without a URL, with a bad one, or together with --redis-cluster.
    #[error("--redis-sentinel / IDEMGATE_REDIS_SENTINEL: {0}")]
    Sentinel(String),
    /// `--redis-wait-replicas` or `--redis-wait-timeout-ms` out of range.
    #[error("{0}")]
    Wait(String),
    /// `--dashboard-dir` is not a directory with an index.html.
    #[error(
        "--dashboard-dir / IDEMGATE_DASHBOARD_DIR {0:?} is not a directory holding index.html"
    )]
    DashboardDir(std::path::PathBuf),
    /// A Redis safety flag out of range.
    #[error("{0}")]
    Safety(String),
}

impl ServeArgs {
    /// Validates the flags into a [`Config`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the flag, its environment variable and the rule.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let redacted = redact_url(&self.redis_url);
        let redis = if let Some(urls) = &self.failover.redis_sentinel {
            self.sentinel_spec(urls, &redacted)?
        } else if self.redis_cluster {
            let seeds: Vec<String> = self
                .redis_url
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            for seed in &seeds {
                redis::Client::open(seed.as_str()).map_err(|source| ConfigError::RedisUrl {
                    url: redact_url(seed),
                    source,
                })?;
            }
            if seeds.is_empty() {
                return Err(ConfigError::RedisUrl {
                    url: redacted,
                    source: redis::RedisError::from((redis::ErrorKind::Client, "no seed node URL")),
                });
            }
            RedisSpec::Cluster(seeds)
        } else {
            RedisSpec::Single(Box::new(
                redis::Client::open(self.redis_url.as_str()).map_err(|source| {
                    ConfigError::RedisUrl {
                        url: redacted.clone(),
                        source,
                    }
                })?,
            ))
        };
        if !(1..=MAX_REDIS_TIMEOUT_MS).contains(&self.redis_timeout_ms) {
            return Err(ConfigError::RedisTimeout(self.redis_timeout_ms));
        }
        let wait = self.wait_policy()?;
        let prefix_ok = (1..=64).contains(&self.key_prefix.len())
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
        if !prefix_ok {
            return Err(ConfigError::KeyPrefix(self.key_prefix.clone()));
        }
        if self.store_listen == self.admin_listen {
            return Err(ConfigError::SameListen(self.store_listen));
        }
        let mut entries = Vec::new();
        if let Some(token) = self.admin_token.as_deref().filter(|t| !t.is_empty()) {
            entries.push(("admin".to_owned(), token.to_owned()));
        }
        if let Some(file) = &self.admin_token_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| ConfigError::Tokens(format!("cannot read {}: {e}", file.display())))?;
            let parsed = crate::auth::AdminTokens::parse_file(&text)
                .map_err(|e| ConfigError::Tokens(format!("{}: {e}", file.display())))?;
            entries.extend(parsed);
        }
        let tokens = crate::auth::AdminTokens::new(entries).map_err(ConfigError::Tokens)?;
        if tokens.is_empty() && !self.admin_listen.ip().is_loopback() {
            return Err(ConfigError::TokenRequired(self.admin_listen));
        }
        if let Some(dir) = &self.dashboard_dir {
            if !dir.join("index.html").is_file() {
                return Err(ConfigError::DashboardDir(dir.clone()));
            }
        }
        let safety = self.safety.validate().map_err(ConfigError::Safety)?;
        Ok(Config {
            safety,
            redis,
            redis_url_redacted: redacted,
            store_listen: self.store_listen,
            admin_listen: self.admin_listen,
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            key_prefix: self.key_prefix.clone(),
            tokens,
            dashboard_dir: self.dashboard_dir.clone(),
            wait,
        })
    }

    /// `--redis-sentinel` URLs (comma-separated, at least one, each a Redis URL) and the
    /// master's connection settings from `--redis-url`.
    fn sentinel_spec(&self, urls: &str, redacted: &str) -> Result<RedisSpec, ConfigError> {
        if self.redis_cluster {
            return Err(ConfigError::Sentinel(
                "Sentinel and --redis-cluster exclude each other (a Redis Cluster fails over by itself)".into(),
            ));
        }
        let sentinels: Vec<String> = urls
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if sentinels.is_empty() {
            return Err(ConfigError::Sentinel("no Sentinel URL".into()));
        }
        for url in &sentinels {
            redis::Client::open(url.as_str()).map_err(|e| {
                ConfigError::Sentinel(format!("{:?} is not a Redis URL: {e}", redact_url(url)))
            })?;
        }
        let master = self.failover.redis_sentinel_master.trim();
        if master.is_empty() || master.len() > 128 || master.contains(char::is_whitespace) {
            return Err(ConfigError::Sentinel(format!(
                "--redis-sentinel-master / IDEMGATE_REDIS_SENTINEL_MASTER {master:?} must be 1..=128 characters without spaces"
            )));
        }
        let client = redis::Client::open(self.redis_url.as_str()).map_err(|source| {
            ConfigError::RedisUrl {
                url: redacted.to_owned(),
                source,
            }
        })?;
        Ok(RedisSpec::Sentinel {
            sentinels,
            master: master.to_owned(),
            client: Box::new(client),
        })
    }

    /// The WAIT policy: `None` with 0 replicas; else 1..=[`MAX_WAIT_REPLICAS`] replicas
    /// and a timeout of 1..=[`MAX_WAIT_TIMEOUT_MS`] ms below `--redis-timeout-ms` (WAIT runs
    /// inside the store call that the Redis timeout bounds).
    fn wait_policy(&self) -> Result<Option<crate::store::WaitPolicy>, ConfigError> {
        let f = &self.failover;
        if f.redis_wait_replicas > MAX_WAIT_REPLICAS {
            return Err(ConfigError::Wait(format!(
                "--redis-wait-replicas / IDEMGATE_REDIS_WAIT_REPLICAS must be 0..={MAX_WAIT_REPLICAS}, got {}",
                f.redis_wait_replicas
            )));
        }
        if !(1..=MAX_WAIT_TIMEOUT_MS).contains(&f.redis_wait_timeout_ms) {
            return Err(ConfigError::Wait(format!(
                "--redis-wait-timeout-ms / IDEMGATE_REDIS_WAIT_TIMEOUT_MS must be 1..={MAX_WAIT_TIMEOUT_MS}, got {}",
                f.redis_wait_timeout_ms
            )));
        }
        if f.redis_wait_replicas == 0 {
            return Ok(None);
        }
        if f.redis_wait_timeout_ms >= self.redis_timeout_ms {
            return Err(ConfigError::Wait(format!(
                "--redis-wait-timeout-ms / IDEMGATE_REDIS_WAIT_TIMEOUT_MS ({} ms) must be below --redis-timeout-ms ({} ms), which bounds the whole store call including WAIT",
                f.redis_wait_timeout_ms, self.redis_timeout_ms
            )));
        }
        Ok(Some(crate::store::WaitPolicy {
            replicas: f.redis_wait_replicas,
            timeout: Duration::from_millis(f.redis_wait_timeout_ms),
        }))
    }
}

/// Replaces the userinfo of a URL (`user:password@`) with `***@`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// `idemgate-server config check FILE`: the filter's own validation
/// ([`idemgate_filter::config::Config::from_json`]) run before deployment.
///
/// Returns the report to print on success.
///
/// # Errors
/// The file cannot be read, or the configuration is invalid (the message names the
/// field and the reason, the same line Envoy would log when the plugin fails to load).
pub fn check_filter_config(file: &std::path::Path) -> Result<String, String> {
    use std::fmt::Write as _;
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let config = idemgate_filter::config::Config::from_json(&bytes).map_err(|e| e.to_string())?;
    let mut out = format!(
        "ok: {} is a valid idemgate filter configuration (hash {}, store cluster {:?}, timeout {} ms)\n",
        file.display(),
        config.hash,
        config.store.cluster,
        config.store.timeout_ms
    );
    let mut notes = Vec::new();
    for r in &config.routes {
        for (field, cap) in [
            ("max_request_body_bytes", r.max_request_body_bytes),
            ("max_response_body_bytes", r.max_response_body_bytes),
        ] {
            if cap > ENVOY_DEFAULT_BUFFER_LIMIT_BYTES / 2 {
                notes.push(format!(
                    "note: route {} {field} is {cap} bytes: set Envoy's per_connection_buffer_limit_bytes (listener) above {} so the filter, not Envoy's buffer limit, decides what happens to a large body",
                    r.name,
                    cap.saturating_mul(2)
                ));
            }
        }
        let _ = writeln!(
            out,
            "  route {:<16} {:<28} methods {:<12} key {:<8} ttl_s {:<6} lock_ttl_ms {:<6} failure {:?}, scope {}",
            r.name,
            format!("{:?}", r.matcher),
            r.methods.join(","),
            format!("{:?}", r.key).to_lowercase(),
            r.ttl_s,
            r.lock_ttl_ms,
            r.failure_mode,
            r.scope.label()
        );
    }
    for n in notes {
        let _ = writeln!(out, "{n}");
    }
    Ok(out)
}

/// Envoy's default `per_connection_buffer_limit_bytes` (1 MiB).
pub const ENVOY_DEFAULT_BUFFER_LIMIT_BYTES: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            redis_url: "redis://127.0.0.1:6379".into(),
            store_listen: "127.0.0.1:8180".parse().unwrap(),
            admin_listen: "127.0.0.1:8181".parse().unwrap(),
            redis_timeout_ms: 500,
            key_prefix: "idemgate".into(),
            redis_cluster: false,
            admin_token_file: None,
            dashboard_dir: None,
            admin_token: None,
            failover: FailoverArgs::default(),
            safety: Default::default(),
        }
    }

    #[test]
    fn defaults_validate() {
        let cfg = args().validate().unwrap();
        assert_eq!(cfg.redis_timeout, Duration::from_millis(500));
        assert_eq!(cfg.key_prefix, "idemgate");
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_name() {
        let mut a = args();
        a.redis_url = "http://x".into();
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--redis-url"));
        let mut a = args();
        a.redis_timeout_ms = 0;
        assert!(matches!(a.validate(), Err(ConfigError::RedisTimeout(0))));
        let mut a = args();
        a.key_prefix = "has space".into();
        assert!(matches!(a.validate(), Err(ConfigError::KeyPrefix(_))));
        let mut a = args();
        a.key_prefix = "tag{x}".into();
        assert!(matches!(a.validate(), Err(ConfigError::KeyPrefix(_))));
        let mut a = args();
        a.admin_listen = a.store_listen;
        assert!(matches!(a.validate(), Err(ConfigError::SameListen(_))));
    }

    #[test]
    fn cli_parses_serve_flags() {
        let cli = Cli::try_parse_from([
            "idemgate-server",
            "serve",
            "--redis-url",
            "redis://10.0.0.1:7000",
            "--store-listen",
            "0.0.0.0:9000",
            "--redis-timeout-ms",
            "250",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("expected the serve command");
        };
        assert_eq!(s.redis_url, "redis://10.0.0.1:7000");
        assert_eq!(s.store_listen.port(), 9000);
        assert_eq!(s.redis_timeout_ms, 250);
    }

    #[test]
    fn admin_tokens_come_from_env_or_file_and_are_required_off_loopback() {
        let mut a = args();
        a.admin_listen = "0.0.0.0:8181".parse().unwrap();
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        a.admin_token = Some("short".into());
        assert!(matches!(a.validate(), Err(ConfigError::Tokens(_))));
        a.admin_token = Some("a-long-enough-token-123".into());
        assert_eq!(
            a.validate()
                .unwrap()
                .tokens
                .check("a-long-enough-token-123")
                .as_deref(),
            Some("admin")
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# ops\nalice alice-token-0123456789\n").unwrap();
        let mut a = args();
        a.admin_token_file = Some(file.clone());
        let cfg = a.validate().unwrap();
        assert_eq!(
            cfg.tokens.check("alice-token-0123456789").as_deref(),
            Some("alice")
        );
        std::fs::write(&file, "alice\n").unwrap();
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(!err.contains("alice-token"), "{err}");
        a.admin_token_file = Some(dir.path().join("absent"));
        assert!(matches!(a.validate(), Err(ConfigError::Tokens(_))));

        let mut a = args();
        a.dashboard_dir = Some(dir.path().to_owned());
        assert!(matches!(a.validate(), Err(ConfigError::DashboardDir(_))));
        std::fs::write(dir.path().join("index.html"), "<html>").unwrap();
        assert!(a.validate().is_ok());
    }

    #[test]
    fn cluster_urls_are_comma_separated_seeds() {
        let mut a = args();
        a.redis_cluster = true;
        a.redis_url = "redis://127.0.0.1:7000, rediss://127.0.0.1:7001".into();
        match a.validate().unwrap().redis {
            RedisSpec::Cluster(seeds) => assert_eq!(seeds.len(), 2),
            other => panic!("expected a cluster, got {other:?}"),
        }
        a.redis_url = "redis://127.0.0.1:7000,http://x".into();
        assert!(matches!(a.validate(), Err(ConfigError::RedisUrl { .. })));
        let mut a = args();
        a.redis_url = "rediss://user:pw@redis.example:6380".into();
        assert!(a.validate().is_ok(), "TLS URLs are supported");
    }

    #[test]
    fn wait_flags_are_validated() {
        let mut a = args();
        assert_eq!(a.validate().unwrap().wait, None, "WAIT is off by default");
        a.failover.redis_wait_replicas = 1;
        let wait = a.validate().unwrap().wait.unwrap();
        assert_eq!(wait.replicas, 1);
        assert_eq!(wait.timeout, Duration::from_millis(DEFAULT_WAIT_TIMEOUT_MS));
        a.failover.redis_wait_replicas = MAX_WAIT_REPLICAS;
        assert!(a.validate().is_ok());
        a.failover.redis_wait_replicas = MAX_WAIT_REPLICAS + 1;
        let err = a.validate().unwrap_err().to_string();
        assert!(
            err.contains("--redis-wait-replicas") && err.contains("0..=16"),
            "{err}"
        );
        a.failover.redis_wait_replicas = 1;
        for bad in [0, MAX_WAIT_TIMEOUT_MS + 1] {
            a.failover.redis_wait_timeout_ms = bad;
            let err = a.validate().unwrap_err().to_string();
            assert!(
                err.contains("--redis-wait-timeout-ms") && err.contains("1..=60000"),
                "{err}"
            );
        }
        // WAIT runs inside the store call that --redis-timeout-ms bounds.
        a.failover.redis_wait_timeout_ms = 500;
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("below --redis-timeout-ms (500 ms)"), "{err}");
        a.redis_timeout_ms = 501;
        assert!(a.validate().is_ok());
        // With WAIT off the timeout is still range-checked, but need not be below.
        a.failover.redis_wait_replicas = 0;
        a.redis_timeout_ms = 100;
        assert_eq!(a.validate().unwrap().wait, None);
        // On a cluster WAIT goes to each key's master: allowed.
        let mut a = args();
        a.redis_cluster = true;
        a.failover.redis_wait_replicas = 1;
        assert!(a.validate().unwrap().wait.is_some());
    }

    #[test]
    fn sentinel_flags_are_validated() {
        let mut a = args();
        a.failover.redis_sentinel = Some("redis://127.0.0.1:26379, redis://127.0.0.1:26380".into());
        match a.validate().unwrap().redis {
            RedisSpec::Sentinel {
                sentinels, master, ..
            } => {
                assert_eq!(sentinels.len(), 2);
                assert_eq!(master, "mymaster");
            }
            other => panic!("expected Sentinel, got {other:?}"),
        }
        a.failover.redis_sentinel = Some(" , ".into());
        let err = a.validate().unwrap_err().to_string();
        assert!(
            err.contains("--redis-sentinel") && err.contains("no Sentinel URL"),
            "{err}"
        );
        a.failover.redis_sentinel = Some("redis://127.0.0.1:26379,http://x".into());
        assert!(matches!(a.validate(), Err(ConfigError::Sentinel(_))));
        a.failover.redis_sentinel = Some("redis://127.0.0.1:26379".into());
        a.failover.redis_sentinel_master = "has space".into();
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("--redis-sentinel-master"), "{err}");
        a.failover.redis_sentinel_master = "payments".into();
        a.redis_cluster = true;
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("--redis-cluster"), "{err}");
    }

    #[test]
    fn cli_parses_failover_flags() {
        let cli = Cli::try_parse_from([
            "idemgate-server",
            "serve",
            "--redis-sentinel",
            "redis://127.0.0.1:26379",
            "--redis-sentinel-master",
            "payments",
            "--redis-wait-replicas",
            "2",
            "--redis-wait-timeout-ms",
            "50",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("expected the serve command");
        };
        assert_eq!(
            s.failover.redis_sentinel.as_deref(),
            Some("redis://127.0.0.1:26379")
        );
        assert_eq!(s.failover.redis_sentinel_master, "payments");
        assert_eq!(s.failover.redis_wait_replicas, 2);
        assert_eq!(s.failover.redis_wait_timeout_ms, 50);
        let cfg = s.validate().unwrap();
        assert_eq!(cfg.wait.unwrap().replicas, 2);
        assert!(
            Cli::try_parse_from(["idemgate-server", "serve", "--redis-wait-replicas", "-1"])
                .is_err()
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://u:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
