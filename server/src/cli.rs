//! The operator CLI: `idemgate-server keys list|show|purge|release`, `purge`, `stats`,
//! talking to the admin API with the same bearer token. Tables by default, `--json` for
//! scripts. Exit code 0 on success, 1 when the server refuses (the problem's status, type
//! and detail go to stderr) or cannot be reached.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use idemgate_protocol::admin::{
    BulkPurgeOutcome, BulkPurgeRequest, KeyDetail, KeyPage, KeyState, KeySummary, PurgeOutcome,
    StatsResponse, StatsWindow,
};
use idemgate_protocol::Problem;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;

/// How the CLI reaches the admin API.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Admin listener URL.
    #[arg(
        long,
        env = "IDEMGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8181",
        global = true
    )]
    pub server: String,
    /// File holding the admin token (the token alone, or the server's `label token` file:
    /// the first entry is used). Without it, IDEMGATE_ADMIN_TOKEN.
    #[arg(long, env = "IDEMGATE_ADMIN_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `keys ...`
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// List records (follows the cursor up to --limit records).
    List(ListArgs),
    /// Show one record in detail.
    Show {
        /// Scope hash (64 hex) or `global`.
        scope: String,
        /// The idempotency key.
        key: String,
    },
    /// Delete one record in any state.
    Purge {
        /// Scope hash (64 hex) or `global`.
        scope: String,
        /// The idempotency key.
        key: String,
    },
    /// Release an in-flight lock (a completed record is left alone).
    Release {
        /// Scope hash (64 hex) or `global`.
        scope: String,
        /// The idempotency key.
        key: String,
    },
}

/// Filters of `keys list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// `in_flight` or `completed`.
    #[arg(long, value_parser = ["in_flight", "completed", "unknown"])]
    pub state: Option<String>,
    /// Route name.
    #[arg(long)]
    pub route: Option<String>,
    /// Scope hash or `global`.
    #[arg(long)]
    pub scope: Option<String>,
    /// Key prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// At least this old, milliseconds.
    #[arg(long)]
    pub min_age_ms: Option<u64>,
    /// At most this old, milliseconds.
    #[arg(long)]
    pub max_age_ms: Option<u64>,
    /// Most records to print.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// `purge` flags.
#[derive(Debug, Clone, Args)]
pub struct BulkArgs {
    /// Only records of this scope.
    #[arg(long)]
    pub scope: Option<String>,
    /// Only records of this route.
    #[arg(long)]
    pub route: Option<String>,
    /// Only keys with this prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Delete after the dry run (without it, only count).
    #[arg(long)]
    pub yes: bool,
}

/// A CLI failure, printed to stderr.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered with a problem.
    #[error("{status} {title}: {detail} ({type_uri})")]
    Problem {
        /// HTTP status.
        status: u16,
        /// Problem title.
        title: String,
        /// Problem detail.
        detail: String,
        /// Problem type URI.
        type_uri: String,
    },
    /// Transport, decoding or local trouble.
    #[error("{0}")]
    Other(String),
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn token(args: &ClientArgs) -> Result<String, CliError> {
    if let Some(file) = &args.token_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| CliError::Other(format!("cannot read {}: {e}", file.display())))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| CliError::Other(format!("{} holds no token", file.display())))?;
        return Ok(line
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_owned());
    }
    std::env::var("IDEMGATE_ADMIN_TOKEN").map_err(|_| {
        CliError::Other("no admin token: set IDEMGATE_ADMIN_TOKEN or --token-file".into())
    })
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| CliError::Other(e.to_string()))?;
        Ok(Self {
            http,
            base: args.server.trim_end_matches('/').to_owned(),
            token: token(args)?,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, CliError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CliError::Other(format!("cannot reach {}: {e}", self.base)))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::Other(e.to_string()))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<Problem>(&bytes) {
                Ok(p) => CliError::Problem {
                    status: p.status,
                    title: p.title,
                    detail: p.detail.unwrap_or_default(),
                    type_uri: p.type_uri,
                },
                Err(_) => CliError::Other(format!("{status}: {}", String::from_utf8_lossy(&bytes))),
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Other(format!("unexpected answer from the server: {e}")))
    }
}

/// `/api/record{suffix}?scope=…&key=…`: the query form, because a key `.` or `..` in a
/// URL path is a dot segment any WHATWG URL parser resolves away, even percent-encoded.
fn key_path(scope: &str, key: &str, suffix: &str) -> String {
    format!(
        "/api/record{suffix}?scope={}&key={}",
        utf8_percent_encode(scope, NON_ALPHANUMERIC),
        utf8_percent_encode(key, NON_ALPHANUMERIC)
    )
}

/// Prints a line to stdout, ignoring a closed pipe (`| head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn print_json(v: &impl serde::Serialize) {
    out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn time(ms: u64) -> String {
    let now = crate::events::now_ms();
    if ms >= now {
        format!("in {}", human(ms - now))
    } else {
        format!("{} ago", human(now - ms))
    }
}

fn human(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{} s", ms / 1000),
        60_000..3_600_000 => format!("{} min", ms / 60_000),
        3_600_000..86_400_000 => format!("{} h", ms / 3_600_000),
        _ => format!("{} d", ms / 86_400_000),
    }
}

fn state_name(s: KeyState) -> &'static str {
    match s {
        KeyState::InFlight => "in_flight",
        KeyState::Completed => "completed",
        KeyState::Unknown => "unknown",
    }
}

fn short_scope(s: &str) -> String {
    if s.len() > 12 {
        format!("{}…", &s[..12])
    } else {
        s.to_owned()
    }
}

fn keys_table(items: &[KeySummary]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "scope", "key", "state", "route", "method", "path", "status", "created", "expires",
        "replays",
    ]);
    for s in items {
        t.add_row(vec![
            short_scope(&s.scope),
            s.key.clone(),
            state_name(s.state).to_owned(),
            s.route.clone(),
            s.method.clone(),
            s.path.clone(),
            s.status.map(|x| x.to_string()).unwrap_or_default(),
            time(s.created_ms),
            time(s.expires_ms),
            s.replays.to_string(),
        ]);
    }
    t
}

fn stats_table(s: &StatsResponse) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(vec!["", "last minute", "last hour", "last day"]);
    let windows: [&StatsWindow; 3] = [&s.minute, &s.hour, &s.day];
    let row = |name: &str, f: &dyn Fn(&StatsWindow) -> String| {
        let mut r = vec![name.to_owned()];
        r.extend(windows.iter().map(|w| f(w)));
        r
    };
    let c = |f: fn(&idemgate_protocol::admin::Counters) -> u64| {
        move |w: &StatsWindow| f(&w.totals).to_string()
    };
    t.add_row(row("claims", &c(|c| c.claims)));
    t.add_row(row("executions", &c(|c| c.executions)));
    t.add_row(row("replays", &c(|c| c.replays)));
    t.add_row(row("in-flight conflicts", &c(|c| c.in_flight_conflicts)));
    t.add_row(row("mismatches", &c(|c| c.mismatches)));
    t.add_row(row("rejections", &c(|c| c.rejections)));
    t.add_row(row("completions", &c(|c| c.completions)));
    t.add_row(row("releases", &c(|c| c.releases)));
    t.add_row(row("expirations", &c(|c| c.expirations)));
    t.add_row(row("purges", &c(|c| c.purges)));
    t.add_row(row("lock lost", &c(|c| c.lock_lost)));
    t.add_row(row("store errors", &c(|c| c.store_errors)));
    t.add_row(row("fail-open passes", &c(|c| c.fail_open_passes)));
    t.add_row(row("replay rate", &|w: &StatsWindow| {
        w.replay_rate
            .map_or_else(|| "-".to_owned(), |r| format!("{:.1} %", r * 100.0))
    }));
    t
}

/// `keys ...`.
///
/// # Errors
/// [`CliError`] to print.
pub async fn keys(client: &ClientArgs, cmd: KeysCommand) -> Result<(), CliError> {
    let c = Client::new(client)?;
    match cmd {
        KeysCommand::List(a) => {
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            let mut complete = false;
            while items.len() < a.limit {
                let mut q = url_query(&a);
                q.push(("limit", (a.limit - items.len()).clamp(1, 500).to_string()));
                if let Some(cur) = &cursor {
                    q.push(("cursor", cur.clone()));
                }
                let qs = q
                    .iter()
                    .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
                    .collect::<Vec<_>>()
                    .join("&");
                let page: KeyPage = c
                    .call(
                        reqwest::Method::GET,
                        &format!("/api/keys?{qs}"),
                        None::<&()>,
                    )
                    .await?;
                items.extend(page.items);
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => {
                        complete = true;
                        break;
                    }
                }
            }
            items.truncate(a.limit);
            if client.json {
                print_json(&items);
            } else {
                out!("{}", keys_table(&items));
                out!(
                    "{} record(s){}",
                    items.len(),
                    if complete {
                        ""
                    } else {
                        " (more exist; raise --limit)"
                    }
                );
            }
        }
        KeysCommand::Show { scope, key } => {
            let d: KeyDetail = c
                .call(
                    reqwest::Method::GET,
                    &key_path(&scope, &key, ""),
                    None::<&()>,
                )
                .await?;
            if client.json {
                print_json(&d);
            } else {
                print_detail(&d);
            }
        }
        KeysCommand::Purge { scope, key } => return one(client, false, &scope, &key).await,
        KeysCommand::Release { scope, key } => return one(client, true, &scope, &key).await,
    }
    Ok(())
}

fn url_query(a: &ListArgs) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(v) = &a.state {
        q.push(("state", v.clone()));
    }
    if let Some(v) = &a.route {
        q.push(("route", v.clone()));
    }
    if let Some(v) = &a.scope {
        q.push(("scope", v.clone()));
    }
    if let Some(v) = &a.prefix {
        q.push(("prefix", v.clone()));
    }
    if let Some(v) = a.min_age_ms {
        q.push(("min_age_ms", v.to_string()));
    }
    if let Some(v) = a.max_age_ms {
        q.push(("max_age_ms", v.to_string()));
    }
    q
}

fn print_detail(d: &KeyDetail) {
    let s = &d.summary;
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    let mut add = |k: &str, v: String| {
        t.add_row(vec![k.to_owned(), v]);
    };
    add("scope", s.scope.clone());
    add("key", s.key.clone());
    add("state", state_name(s.state).to_owned());
    add("route", s.route.clone());
    add("request", format!("{} {}", s.method, s.path));
    add("fingerprint", d.fingerprint.clone());
    add("created", time(s.created_ms));
    if let Some(c) = s.completed_ms {
        add("completed", time(c));
    }
    add(
        "expires",
        format!("{} (ttl {})", time(s.expires_ms), human(d.ttl_ms)),
    );
    if let Some(l) = d.lock_expires_ms {
        add("lock expires", time(l));
    }
    if let Some(st) = s.status {
        add("status", st.to_string());
    }
    add("replayable", s.replayable.to_string());
    add("replays", s.replays.to_string());
    if let Some(l) = d.last_replay_ms {
        add("last replay", time(l));
    }
    if let Some(r) = &d.response {
        for (n, v) in &r.headers {
            add("header", format!("{n}: {v}"));
        }
        add(
            "body",
            format!(
                "{} bytes{}",
                r.body_bytes,
                if r.body_preview_base64 {
                    " (base64 preview)"
                } else {
                    ""
                }
            ),
        );
        add("preview", r.body_preview.clone());
    }
    out!("{t}");
}

/// `keys purge` / `keys release`: one record.
///
/// # Errors
/// [`CliError`] to print.
pub async fn one(
    client: &ClientArgs,
    release: bool,
    scope: &str,
    key: &str,
) -> Result<(), CliError> {
    let c = Client::new(client)?;
    let (method, path, verb) = if release {
        (
            reqwest::Method::POST,
            key_path(scope, key, "/release"),
            "released",
        )
    } else {
        (reqwest::Method::DELETE, key_path(scope, key, ""), "purged")
    };
    let out: PurgeOutcome = c.call(method, &path, None::<&()>).await?;
    if client.json {
        print_json(&out);
    } else if out.purged {
        out!("{verb} {key}");
    } else if release {
        out!("nothing released: {key} is absent or not in flight");
    } else {
        out!("nothing purged: {key} is absent");
    }
    Ok(())
}

/// `purge`: dry run, then (with `--yes`) the real run with the confirmation.
///
/// # Errors
/// [`CliError`] to print.
pub async fn bulk(client: &ClientArgs, a: BulkArgs) -> Result<(), CliError> {
    let c = Client::new(client)?;
    let mut req = BulkPurgeRequest {
        scope: a.scope,
        route: a.route,
        prefix: a.prefix,
        dry_run: true,
        confirmation: None,
    };
    let dry: BulkPurgeOutcome = c
        .call(reqwest::Method::POST, "/api/purge", Some(&req))
        .await?;
    let BulkPurgeOutcome::DryRun {
        matched,
        in_flight,
        confirmation,
        ..
    } = dry.clone()
    else {
        return Err(CliError::Other("the dry run answered a real run".into()));
    };
    if !a.yes {
        if client.json {
            print_json(&dry);
        } else {
            out!("{matched} record(s) match ({in_flight} in flight, which a purge leaves alone); run again with --yes to delete them");
        }
        return Ok(());
    }
    req.dry_run = false;
    req.confirmation = Some(confirmation);
    let done: BulkPurgeOutcome = c
        .call(reqwest::Method::POST, "/api/purge", Some(&req))
        .await?;
    if client.json {
        print_json(&done);
    } else if let BulkPurgeOutcome::Purged {
        purged,
        skipped_in_flight,
    } = done
    {
        out!("purged {purged} record(s) ({matched} matched the dry run; {skipped_in_flight} in flight left alone)");
    }
    Ok(())
}

/// `stats`.
///
/// # Errors
/// [`CliError`] to print.
pub async fn stats(client: &ClientArgs) -> Result<(), CliError> {
    let c = Client::new(client)?;
    let s: StatsResponse = c
        .call(reqwest::Method::GET, "/api/stats", None::<&()>)
        .await?;
    if client.json {
        print_json(&s);
    } else {
        out!("{}", stats_table(&s));
        if let Some(n) = s.in_flight_now {
            out!("in flight now: {n}");
        }
    }
    Ok(())
}
