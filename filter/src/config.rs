//! The filter's JSON configuration: parsed and validated once when the plugin loads.
//!
//! A bad configuration fails the load with one error that names the field and the reason
//! ([`ConfigError`]); it never fails a request. `idemgate-server config check FILE` runs
//! the same [`Config::from_json`] before deployment.
//!
//! Shape (every field but `store.cluster` and each route's `name` and `match` has a
//! default; `defaults` supplies policy fields a route leaves out):
//!
//! ```json
//! {
//!   "store":    {"cluster": "idemgate_store", "timeout_ms": 1000, "authority": "idemgate-store"},
//!   "defaults": {"methods": ["POST", "PATCH"], "key": "required", "ttl_s": 86400},
//!   "routes": [
//!     {"name": "payments", "match": {"prefix": "/v1/payments"},
//!      "fingerprint": {"body": "canonical_json", "exclude_json": ["/client_ts"]}},
//!     {"name": "orders", "match": {"prefix": "/v1/orders"}, "key": "optional"}
//!   ]
//! }
//! ```
//!
//! Requests that match no route pass through untouched. A route matches when its path
//! matcher and one of its methods match; the first matching route wins.

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;

use idemgate_protocol::fingerprint::BodyMode;
use idemgate_protocol::{AfterUnknown, UnknownOutcomePolicy, MAX_UNKNOWN_HOLD_S};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Default lifetime of a completed record: 24 h (Stripe keeps keys 24 hours).
pub const DEFAULT_TTL_S: u64 = 86_400;
/// Default in-flight lock TTL: 60 s, above Envoy's default 15 s route timeout so a lock
/// never expires while the upstream may still be executing.
pub const DEFAULT_LOCK_TTL_MS: u64 = 60_000;
/// Default store call timeout.
pub const DEFAULT_STORE_TIMEOUT_MS: u64 = 1_000;
/// Default request and response body caps: 512 KiB, below Envoy's default 1 MiB stream
/// buffer limit (`per_connection_buffer_limit_bytes`), so the filter, not Envoy, decides
/// what happens to a large body. Raise both together.
pub const DEFAULT_BODY_CAP_BYTES: u64 = 512 << 10;
/// Largest body cap accepted: 64 MiB (the store keeps the response in one Redis hash).
pub const MAX_BODY_CAP_BYTES: u64 = 64 << 20;
/// Largest completed TTL accepted: 30 days. Nothing lives forever.
pub const MAX_TTL_S: u64 = 30 * 86_400;
/// Default upstream timeout of a detached execution: 15 s, Envoy's default route timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 15_000;
/// Default hold of an unknown outcome: 60 s, long enough for an upstream that kept working
/// after its connection closed to have finished.
pub const DEFAULT_UNKNOWN_HOLD_S: u64 = 60;

/// Default statuses stored for replay: success, redirects and client errors, except
/// 408, 409, 425 and 429, which say "try again" and so release the key (IETF draft
/// section 2.6 leaves this to the server; Stripe likewise does not store 409/429).
pub const DEFAULT_STORE_STATUSES: [&str; 7] = ["2xx", "3xx", "4xx", "!408", "!409", "!425", "!429"];
/// Response headers never stored by default: credentials, cookies, per-moment rate-limit
/// state and Envoy's own timing header. Hop-by-hop headers (RFC 9110 section 7.6.1) and
/// `content-length` are never stored whatever the list says.
pub const DEFAULT_DENY_RESPONSE_HEADERS: [&str; 8] = [
    "set-cookie",
    "authorization",
    "proxy-authorization",
    "www-authenticate",
    "x-ratelimit-*",
    "ratelimit*",
    "retry-after",
    "x-envoy-*",
];

/// The JSON Schema (draft 2020-12) of the configuration, generated from the types
/// [`Config::from_json`] deserializes: the shape and the descriptions, not the ranges and
/// cross-field rules `from_json` also checks. Committed as
/// `filter/idemgate-filter.schema.json` (`cargo xtask schema` regenerates it).
#[cfg(feature = "schema")]
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(ConfigFile)
}

/// A configuration that fails validation: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the field, e.g. `routes[1].ttl_s` (or `.` for the whole document).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid idemgate filter configuration: field `{}`: {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// idemgate filter configuration
///
/// The plugin configuration of the idemgate proxy-wasm filter (Envoy
/// `plugin_config`, Istio `pluginConfig`). The schema gives the shape; the filter also
/// checks ranges and cross-field rules when it loads (`idemgate-server config check`).
/// These doc comments are the schema's descriptions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct ConfigFile {
    /// Where the filter sends its store calls.
    store: StoreFile,
    /// Policy fields a route leaves out (no `name` or `match` here).
    #[serde(default)]
    defaults: PolicyFile,
    /// Protected routes in match order (at least one); the first route whose `match` and
    /// one of whose methods match wins. Requests that match no route pass through.
    routes: Vec<PolicyFile>,
}

/// Where the filter sends its store calls.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct StoreFile {
    /// Envoy cluster of the idemgate server's store listener (required, not empty).
    cluster: String,
    /// Timeout of one store call, milliseconds (1..=60000, default 1000).
    timeout_ms: Option<u64>,
    /// `:authority` of store calls (default `idemgate-store`).
    authority: Option<String>,
    /// Report decisions the store does not see (rejections, body caps, store errors,
    /// fail-open passes) with a fire-and-forget `POST /v1/report` (default true).
    report_events: Option<bool>,
}

/// Policy fields shared by `defaults` and each route; `name` and `match` only in routes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct PolicyFile {
    /// Route name, unique, 1..=64 characters (routes only, required there).
    name: Option<String>,
    /// Path matcher on the path without the query (routes only, required there).
    #[serde(rename = "match")]
    matcher: Option<PathMatch>,
    /// Protected methods, uppercase (default `["POST", "PATCH"]`).
    methods: Option<Vec<String>>,
    /// Whether the `Idempotency-Key` header is required (default `required`).
    key: Option<KeyRequirement>,
    /// Lifetime of a completed record, seconds (1..=2592000, default 86400).
    ttl_s: Option<u64>,
    /// In-flight lock TTL, milliseconds (100..=86400000, default 60000).
    lock_ttl_ms: Option<u64>,
    /// Statuses stored for replay: classes (`"2xx"`), codes (`"201"`) and negations
    /// (`"!429"`) that win (default `["2xx", "3xx", "4xx", "!408", "!409", "!425", "!429"]`).
    store_statuses: Option<Vec<String>>,
    /// What happens when the store cannot answer (default `closed`).
    failure_mode: Option<FailureMode>,
    /// Request body cap, bytes; a larger request gets 413 (1..=67108864, default 524288).
    max_request_body_bytes: Option<u64>,
    /// Response body cap, bytes; a larger response is passed on but not stored
    /// (1..=67108864, default 524288).
    max_response_body_bytes: Option<u64>,
    /// What enters the request fingerprint besides method and path.
    fingerprint: Option<FingerprintFile>,
    /// Where a request's scope (tenant) comes from (default `{"header": "authorization"}`).
    scope: Option<ScopeSource>,
    /// Response headers not stored for replay: lowercase names or prefixes ending in `*`
    /// (default: credentials, cookies, rate-limit state, `retry-after`, `x-envoy-*`).
    deny_response_headers: Option<Vec<String>>,
    /// How a request whose claim was acquired reaches the upstream (default `router`).
    execution: Option<Execution>,
    /// Detached execution: the Envoy cluster to call (default: the matched route's).
    upstream_cluster: Option<String>,
    /// Detached execution: upstream timeout, milliseconds, below `lock_ttl_ms`
    /// (default 15000).
    upstream_timeout_ms: Option<u64>,
    /// What a retry gets when the first execution's outcome is unknown.
    unknown_outcome: Option<UnknownOutcomeFile>,
}

/// What a retry gets when the first execution's outcome is unknown.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct UnknownOutcomeFile {
    /// Seconds the unknown outcome is held with `409` and `Retry-After` (1..=86400,
    /// default 60).
    hold_s: Option<u64>,
    /// What happens once `hold_s` has passed (default `refuse`).
    then: Option<AfterUnknown>,
}

/// How a protected request whose claim was acquired reaches the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Execution {
    /// Resume the request through the rest of the filter chain and Envoy's router (route
    /// retries, header mutations and streaming apply). When the client goes away, Envoy
    /// resets the upstream request and the outcome becomes unknown.
    Router,
    /// Send the buffered request to the upstream cluster from the filter's root context,
    /// detached from the client's stream (nginx's `proxy_ignore_client_abort`): a client
    /// that times out does not cancel it, its response is stored, and the retry replays it.
    /// Later HTTP filters, the route's retry policy, rewrites and header mutations do not
    /// apply, and the response is buffered whole before the client gets it.
    Detached,
}

/// What enters the request fingerprint besides method and path.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
struct FingerprintFile {
    /// How the body enters the fingerprint (default `raw`).
    body: Option<BodyKind>,
    /// Request headers (lowercase) that enter the fingerprint, in this order (default none).
    headers: Option<Vec<String>>,
    /// JSON Pointers (RFC 6901) left out of a `canonical_json` body, e.g. `/client_ts`.
    exclude_json: Option<Vec<String>>,
}

/// How the body enters the fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
enum BodyKind {
    /// The body's bytes as sent.
    Raw,
    /// The body parsed as JSON and written canonically (member order and whitespace do not
    /// matter), without the `exclude_json` members.
    CanonicalJson,
}

/// How a route's path is matched (on the path without the query).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PathMatch {
    /// `{"prefix": "/v1/payments"}`: the path starts with this string (Envoy's `prefix`
    /// semantics: `/v1/payments` also matches `/v1/payments-old`).
    Prefix(String),
    /// `{"path": "/v1/refunds"}`: the path equals this string.
    Path(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Prefix(p) => path.starts_with(p.as_str()),
            Self::Path(p) => path == p,
        }
    }
}

/// Whether a protected route requires the `Idempotency-Key` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum KeyRequirement {
    /// A request without a key gets 400 problem details (IETF draft section 2.7).
    Required,
    /// A request without a key passes through untouched.
    Optional,
}

/// What the filter does when the store cannot answer (error, timeout, bad answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum FailureMode {
    /// 503 problem details with `Retry-After: 1`; the upstream sees nothing.
    Closed,
    /// Forward the request without idempotency protection and count it
    /// (`idemgate.fail_open_passes`).
    Open,
}

/// Where a request's scope (tenant) comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ScopeSource {
    /// `{"header": "authorization"}`: the SHA-256 of this request header's value.
    /// A request without it gets 401 problem details.
    Header(String),
    /// `{"property": ["metadata", "filter_metadata", "envoy.filters.http.jwt_authn",
    /// "jwt_payload", "sub"]}`: the SHA-256 of an Envoy attribute, e.g. a JWT subject
    /// that `jwt_authn` placed in dynamic metadata. Absent: 401.
    Property(Vec<String>),
    /// `"global"`: one scope for every client (only for single-tenant upstreams).
    Global,
}

impl ScopeSource {
    /// The label hashed with the value so two sources never share a scope.
    pub fn label(&self) -> String {
        match self {
            Self::Header(h) => format!("header:{h}"),
            Self::Property(p) => format!("property:{}", p.join("/")),
            Self::Global => "global".into(),
        }
    }
}

/// One entry of `store_statuses`: a class (`"2xx"`), a code (`"404"`), or a negated
/// code or class (`"!429"`) that wins over the positive entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusRule {
    Class(u16),
    Code(u16),
}

impl StatusRule {
    fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && &s[1..].to_ascii_lowercase() == "xx" {
            return Some(Self::Class(u16::from(b[0] - b'0')));
        }
        match s.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Some(Self::Code(code)),
            _ => None,
        }
    }

    fn matches(self, status: u16) -> bool {
        match self {
            Self::Class(c) => status / 100 == c,
            Self::Code(c) => status == c,
        }
    }
}

/// Which upstream statuses are stored for replay; the others release the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet {
    allow: Vec<StatusRule>,
    deny: Vec<StatusRule>,
}

impl StatusSet {
    /// Whether a response with `status` is stored (else the key is released).
    pub fn stores(&self, status: u16) -> bool {
        self.allow.iter().any(|r| r.matches(status)) && !self.deny.iter().any(|r| r.matches(status))
    }
}

/// A response header name pattern: exact (lowercase) or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderPattern(String);

impl HeaderPattern {
    /// Whether `name` (lowercase) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == self.0,
        }
    }
}

/// Where the filter sends its store calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Envoy cluster name of the idemgate server's store listener.
    pub cluster: String,
    /// `:authority` of store calls.
    pub authority: String,
    /// Timeout of one store call, milliseconds.
    pub timeout_ms: u64,
    /// Whether the filter reports decisions the store does not see (rejections, body cap
    /// events, store errors, fail-open passes) with a fire-and-forget `POST /v1/report`,
    /// so the server's events and stats include them. Default true.
    pub report_events: bool,
}

/// A validated route: every field resolved against `defaults`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Unique name, used in store records, events and logs.
    pub name: String,
    /// Path matcher.
    pub matcher: PathMatch,
    /// Methods protected on this route (uppercase). Default `POST`, `PATCH`.
    pub methods: Vec<String>,
    /// Whether a key is required. Default required.
    pub key: KeyRequirement,
    /// Completed record lifetime, seconds. Default [`DEFAULT_TTL_S`]; 1..=[`MAX_TTL_S`].
    pub ttl_s: u64,
    /// In-flight lock TTL, milliseconds. Default [`DEFAULT_LOCK_TTL_MS`]; at least 100.
    pub lock_ttl_ms: u64,
    /// Statuses stored for replay. Default [`DEFAULT_STORE_STATUSES`].
    pub store_statuses: StatusSet,
    /// Behaviour when the store cannot answer. Default closed.
    pub failure_mode: FailureMode,
    /// Request body cap, bytes: a larger request gets 413. Default 512 KiB.
    pub max_request_body_bytes: u64,
    /// Response body cap, bytes: a larger response is passed on but not stored, and the
    /// key becomes completed-but-not-replayable. Default 512 KiB.
    pub max_response_body_bytes: u64,
    /// How the body enters the fingerprint. Default raw bytes.
    pub body_mode: BodyMode,
    /// Request headers (lowercase) that enter the fingerprint, in this order. Default none.
    pub fingerprint_headers: Vec<String>,
    /// Scope source. Default `{"header": "authorization"}`.
    pub scope: ScopeSource,
    /// Response headers not stored. Default [`DEFAULT_DENY_RESPONSE_HEADERS`].
    pub deny_response_headers: Vec<HeaderPattern>,
    /// How the request reaches the upstream. Default [`Execution::Router`].
    pub execution: Execution,
    /// Detached execution: the Envoy cluster to call. `None` (default): the cluster of the
    /// Envoy route the request matched (the `xds.cluster_name` attribute).
    pub upstream_cluster: Option<String>,
    /// Detached execution: how long the upstream may take, milliseconds. Default
    /// [`DEFAULT_UPSTREAM_TIMEOUT_MS`]; below `lock_ttl_ms`.
    pub upstream_timeout_ms: u64,
    /// What a retry gets when the first execution's outcome is unknown. Default: held
    /// [`DEFAULT_UNKNOWN_HOLD_S`], then refused until `ttl_s` passes.
    pub unknown_outcome: UnknownOutcomePolicy,
    /// The usual time from an acquired claim to the complete response on this route, ms
    /// (an exponentially weighted moving average per worker; 0 before the first). The
    /// `Retry-After` of a 409 in-flight is based on it.
    pub usual_latency_ms: Cell<u64>,
}

impl Route {
    /// Whether a response header is stored for replay.
    pub fn stores_header(&self, name: &str) -> bool {
        !is_hop_by_hop(name) && !self.deny_response_headers.iter().any(|p| p.matches(name))
    }
}

/// Hop-by-hop and framing headers that are never stored (RFC 9110 section 7.6.1;
/// `content-length` is recomputed by Envoy on replay), plus pseudo-headers.
pub fn is_hop_by_hop(name: &str) -> bool {
    name.starts_with(':')
        || matches!(
            name,
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
                | "content-length"
        )
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Store call target.
    pub store: StoreConfig,
    /// Routes in match order.
    pub routes: Vec<Rc<Route>>,
    /// First 16 hex digits of the SHA-256 of the configuration's canonical JSON (member
    /// order and whitespace do not matter), logged at load.
    pub hash: String,
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first offending field: not JSON, unknown field, wrong
    /// type, a TTL or cap of 0 or above its maximum, an empty cluster name, a duplicate or
    /// empty route name, a path matcher not starting with `/`, an unknown method, a bad
    /// status rule, a JSON pointer not starting with `/`, `exclude_json` without
    /// `canonical_json`, uppercase header names.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let file: ConfigFile = serde_path_to_error::deserialize(de).map_err(|e| ConfigError {
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })?;
        // Over the canonical JSON, so the hash names the configuration, not its formatting:
        // `config check` on a file and Envoy's log of the same document agree.
        let canonical = idemgate_protocol::fingerprint::canonical_json(bytes, &[])
            .unwrap_or_else(|| bytes.to_vec());
        let hash = hex::encode(Sha256::digest(&canonical))[..16].to_owned();
        let store = validate_store(file.store)?;
        if file.defaults.name.is_some() {
            return err("defaults.name", "a route name is not allowed in defaults");
        }
        if file.defaults.matcher.is_some() {
            return err(
                "defaults.match",
                "a path matcher is not allowed in defaults",
            );
        }
        if file.routes.is_empty() {
            return err("routes", "at least one route is required");
        }
        let mut names = HashSet::new();
        let mut routes = Vec::with_capacity(file.routes.len());
        for (i, r) in file.routes.iter().enumerate() {
            let route = resolve_route(&format!("routes[{i}]"), r, &file.defaults)?;
            if !names.insert(route.name.clone()) {
                return err(
                    format!("routes[{i}].name"),
                    format!("duplicate route name {:?}", route.name),
                );
            }
            routes.push(Rc::new(route));
        }
        Ok(Self {
            store,
            routes,
            hash,
        })
    }

    /// The first route that protects `method` on `path` (query ignored), if any.
    pub fn route_for(&self, method: &str, path: &str) -> Option<&Rc<Route>> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.routes
            .iter()
            .find(|r| r.matcher.matches(path) && r.methods.iter().any(|m| m == method))
    }
}

fn validate_store(s: StoreFile) -> Result<StoreConfig, ConfigError> {
    if s.cluster.trim().is_empty() {
        return err(
            "store.cluster",
            "must name the Envoy cluster of the idemgate store",
        );
    }
    let timeout_ms = s.timeout_ms.unwrap_or(DEFAULT_STORE_TIMEOUT_MS);
    if !(1..=60_000).contains(&timeout_ms) {
        return err(
            "store.timeout_ms",
            "must be between 1 and 60000 milliseconds",
        );
    }
    let authority = s.authority.unwrap_or_else(|| "idemgate-store".into());
    if authority.is_empty() {
        return err("store.authority", "must not be empty");
    }
    Ok(StoreConfig {
        cluster: s.cluster,
        authority,
        timeout_ms,
        report_events: s.report_events.unwrap_or(true),
    })
}

const KNOWN_METHODS: [&str; 8] = [
    "POST", "PATCH", "PUT", "DELETE", "GET", "HEAD", "OPTIONS", "QUERY",
];

fn resolve_route(at: &str, r: &PolicyFile, d: &PolicyFile) -> Result<Route, ConfigError> {
    let name = match &r.name {
        Some(n) if !n.trim().is_empty() && n.len() <= 64 => n.clone(),
        Some(_) => return err(format!("{at}.name"), "must be 1..=64 characters"),
        None => return err(format!("{at}.name"), "is required"),
    };
    let matcher = match &r.matcher {
        Some(m) => m.clone(),
        None => {
            return err(
                format!("{at}.match"),
                "is required: {\"prefix\": \"/...\"} or {\"path\": \"/...\"}",
            )
        }
    };
    let (PathMatch::Prefix(p) | PathMatch::Path(p)) = &matcher;
    if !p.starts_with('/') {
        return err(format!("{at}.match"), "must start with '/'");
    }

    let (methods_at, methods) = pick(at, "methods", &r.methods, &d.methods, || {
        vec!["POST".into(), "PATCH".into()]
    });
    if methods.is_empty() {
        return err(methods_at, "must list at least one method");
    }
    if let Some(m) = methods
        .iter()
        .find(|m| !KNOWN_METHODS.contains(&m.as_str()))
    {
        return err(
            methods_at,
            format!("unknown or lowercase method {m:?}; use one of {KNOWN_METHODS:?}"),
        );
    }

    let (ttl_at, ttl_s) = pick(at, "ttl_s", &r.ttl_s, &d.ttl_s, || DEFAULT_TTL_S);
    if ttl_s == 0 || ttl_s > MAX_TTL_S {
        return err(ttl_at, format!("must be between 1 and {MAX_TTL_S} seconds"));
    }
    let (lock_at, lock_ttl_ms) = pick(at, "lock_ttl_ms", &r.lock_ttl_ms, &d.lock_ttl_ms, || {
        DEFAULT_LOCK_TTL_MS
    });
    if !(100..=86_400_000).contains(&lock_ttl_ms) {
        return err(lock_at, "must be between 100 and 86400000 milliseconds");
    }
    let req_cap = pick(
        at,
        "max_request_body_bytes",
        &r.max_request_body_bytes,
        &d.max_request_body_bytes,
        || DEFAULT_BODY_CAP_BYTES,
    );
    let resp_cap = pick(
        at,
        "max_response_body_bytes",
        &r.max_response_body_bytes,
        &d.max_response_body_bytes,
        || DEFAULT_BODY_CAP_BYTES,
    );
    for (field, v) in [&req_cap, &resp_cap] {
        if *v == 0 || *v > MAX_BODY_CAP_BYTES {
            return err(
                field.clone(),
                format!("must be between 1 and {MAX_BODY_CAP_BYTES} bytes"),
            );
        }
    }

    let (statuses_at, statuses) = pick(
        at,
        "store_statuses",
        &r.store_statuses,
        &d.store_statuses,
        || owned(&DEFAULT_STORE_STATUSES),
    );
    let mut store_statuses = StatusSet {
        allow: vec![],
        deny: vec![],
    };
    for s in &statuses {
        let (neg, body) = s
            .strip_prefix('!')
            .map_or((false, s.as_str()), |b| (true, b));
        let Some(rule) = StatusRule::parse(body) else {
            return err(
                statuses_at,
                format!(
                    "{s:?} is not a status (\"201\"), a class (\"2xx\") or a negation (\"!429\")"
                ),
            );
        };
        if neg {
            store_statuses.deny.push(rule)
        } else {
            store_statuses.allow.push(rule)
        }
    }

    let (fp_at, fp) = pick(
        at,
        "fingerprint",
        &r.fingerprint,
        &d.fingerprint,
        Default::default,
    );
    let exclude = fp.exclude_json.unwrap_or_default();
    if let Some(p) = exclude.iter().find(|p| !p.starts_with('/')) {
        return err(
            format!("{fp_at}.exclude_json"),
            format!("{p:?} is not a JSON Pointer (RFC 6901): it must start with '/'"),
        );
    }
    let body_mode = match fp.body.unwrap_or(BodyKind::Raw) {
        BodyKind::Raw if !exclude.is_empty() => {
            return err(
                format!("{fp_at}.exclude_json"),
                "needs \"body\": \"canonical_json\"",
            );
        }
        BodyKind::Raw => BodyMode::Raw,
        BodyKind::CanonicalJson => BodyMode::CanonicalJson { exclude },
    };
    let fingerprint_headers = fp.headers.unwrap_or_default();
    if let Some(h) = fingerprint_headers.iter().find(|h| !is_lowercase_name(h)) {
        return err(
            format!("{fp_at}.headers"),
            format!("{h:?} must be a lowercase header name"),
        );
    }

    let (scope_at, scope) = pick(at, "scope", &r.scope, &d.scope, || {
        ScopeSource::Header("authorization".into())
    });
    match &scope {
        ScopeSource::Header(h) if !is_lowercase_name(h) => {
            return err(scope_at, "the header name must be lowercase and not empty");
        }
        ScopeSource::Property(p) if p.is_empty() || p.iter().any(String::is_empty) => {
            return err(scope_at, "the property path must have non-empty segments");
        }
        _ => {}
    }

    let (deny_at, deny) = pick(
        at,
        "deny_response_headers",
        &r.deny_response_headers,
        &d.deny_response_headers,
        || owned(&DEFAULT_DENY_RESPONSE_HEADERS),
    );
    if let Some(bad) = deny.iter().find(|h| !is_lowercase_name(h)) {
        return err(
            deny_at,
            format!("{bad:?} must be a lowercase header name or prefix*"),
        );
    }

    let execution = r.execution.or(d.execution).unwrap_or(Execution::Router);
    let upstream_cluster = r
        .upstream_cluster
        .clone()
        .or_else(|| d.upstream_cluster.clone());
    if upstream_cluster
        .as_ref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return err(format!("{at}.upstream_cluster"), "must not be empty");
    }
    let (timeout_at, upstream_timeout_ms) = pick(
        at,
        "upstream_timeout_ms",
        &r.upstream_timeout_ms,
        &d.upstream_timeout_ms,
        || DEFAULT_UPSTREAM_TIMEOUT_MS,
    );
    if upstream_timeout_ms == 0
        || (execution == Execution::Detached && upstream_timeout_ms >= lock_ttl_ms)
    {
        return err(
            timeout_at,
            format!("must be at least 1 and below lock_ttl_ms ({lock_ttl_ms}): the lock must outlive the upstream call"),
        );
    }
    let (unknown_at, unknown) = pick(
        at,
        "unknown_outcome",
        &r.unknown_outcome,
        &d.unknown_outcome,
        Default::default,
    );
    let hold_s = unknown.hold_s.unwrap_or(DEFAULT_UNKNOWN_HOLD_S);
    if !(1..=MAX_UNKNOWN_HOLD_S).contains(&hold_s) {
        return err(
            format!("{unknown_at}.hold_s"),
            format!("must be between 1 and {MAX_UNKNOWN_HOLD_S} seconds"),
        );
    }

    Ok(Route {
        execution,
        upstream_cluster,
        upstream_timeout_ms,
        unknown_outcome: UnknownOutcomePolicy {
            hold_s,
            then: unknown.then.unwrap_or(AfterUnknown::Refuse),
            ttl_s,
        },
        usual_latency_ms: Cell::new(0),
        name,
        matcher,
        methods,
        key: r.key.or(d.key).unwrap_or(KeyRequirement::Required),
        ttl_s,
        lock_ttl_ms,
        store_statuses,
        failure_mode: r
            .failure_mode
            .or(d.failure_mode)
            .unwrap_or(FailureMode::Closed),
        max_request_body_bytes: req_cap.1,
        max_response_body_bytes: resp_cap.1,
        body_mode,
        fingerprint_headers,
        scope,
        deny_response_headers: deny.into_iter().map(HeaderPattern).collect(),
    })
}

/// The route's value, else the default's, else `fallback()`, with the path of the field
/// that supplied it (for the error message).
fn pick<T: Clone>(
    at: &str,
    field: &str,
    route: &Option<T>,
    default: &Option<T>,
    fallback: impl FnOnce() -> T,
) -> (String, T) {
    match (route, default) {
        (Some(v), _) => (format!("{at}.{field}"), v.clone()),
        (None, Some(v)) => (format!("defaults.{field}"), v.clone()),
        (None, None) => (format!("{at}.{field}"), fallback()),
    }
}

fn owned(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A header name as the configuration must spell it: not empty, lowercase, no spaces.
fn is_lowercase_name(name: &str) -> bool {
    !name.is_empty() && !name.bytes().any(|b| b.is_ascii_uppercase() || b == b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = r#"{
      "store": {"cluster": "idemgate_store", "timeout_ms": 1000},
      "defaults": {"methods": ["POST","PATCH"], "key": "optional", "scope": {"header": "authorization"}},
      "routes": [
        {"name": "payments", "match": {"prefix": "/v1/payments"}, "key": "required", "fingerprint": {"body": "canonical_json"}},
        {"name": "orders",   "match": {"prefix": "/v1/orders"},   "key": "optional"}
      ]
    }"#;

    fn check(json: &str) -> Result<Config, ConfigError> {
        Config::from_json(json.as_bytes())
    }

    fn failing(json: &str) -> ConfigError {
        match check(json) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn the_hash_ignores_formatting() {
        let a = check(DEMO).unwrap().hash;
        let compact: serde_json::Value = serde_json::from_str(DEMO).unwrap();
        let b = check(&compact.to_string()).unwrap().hash;
        assert_eq!(a, b);
        let other = DEMO.replace("/v1/orders", "/v1/order");
        assert_ne!(a, check(&other).unwrap().hash);
    }

    #[test]
    fn demo_config_resolves_defaults() {
        let c = check(DEMO).unwrap();
        assert_eq!(c.routes.len(), 2);
        let p = &c.routes[0];
        assert_eq!(p.key, KeyRequirement::Required);
        assert_eq!(p.ttl_s, DEFAULT_TTL_S);
        assert_eq!(p.lock_ttl_ms, DEFAULT_LOCK_TTL_MS);
        assert_eq!(p.body_mode, BodyMode::CanonicalJson { exclude: vec![] });
        assert_eq!(c.routes[1].key, KeyRequirement::Optional);
        assert_eq!(c.routes[1].body_mode, BodyMode::Raw);
        assert_eq!(c.store.authority, "idemgate-store");
        assert_eq!(c.hash.len(), 16);
    }

    #[test]
    fn route_matching_is_first_match_by_path_and_method() {
        let c = check(DEMO).unwrap();
        assert_eq!(
            c.route_for("POST", "/v1/payments?x=1")
                .map(|r| r.name.as_str()),
            Some("payments")
        );
        assert_eq!(
            c.route_for("PATCH", "/v1/orders/1")
                .map(|r| r.name.as_str()),
            Some("orders")
        );
        assert!(c.route_for("GET", "/v1/payments").is_none());
        assert!(c.route_for("POST", "/v2/payments").is_none());
        assert!(c.route_for("POST", "/v1/pay").is_none());
    }

    #[test]
    fn default_statuses() {
        let c = check(DEMO).unwrap();
        let s = &c.routes[0].store_statuses;
        for code in [200, 201, 204, 303, 400, 404, 422] {
            assert!(s.stores(code), "{code}");
        }
        for code in [408, 409, 425, 429, 500, 502, 503, 100] {
            assert!(!s.stores(code), "{code}");
        }
    }

    #[test]
    fn stripe_style_store_5xx() {
        let c = check(r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"store_statuses":["2xx","4xx","5xx","!429"]}]}"#).unwrap();
        assert!(c.routes[0].store_statuses.stores(500));
        assert!(!c.routes[0].store_statuses.stores(429));
    }

    #[test]
    fn errors_name_the_field() {
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"ttl_s":0}]}"#,
        );
        assert_eq!(e.field, "routes[0].ttl_s");
        let e = failing(r#"{"store":{"cluster":""},"routes":[]}"#);
        assert_eq!(e.field, "store.cluster");
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"ttl":5}]}"#,
        );
        assert_eq!(e.field, "routes[0].ttl");
        assert!(e.reason.contains("unknown field `ttl`"), "{e}");
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"lock_ttl_ms":"5"}]}"#,
        );
        assert_eq!(e.field, "routes[0].lock_ttl_ms");
        let e = failing(
            r#"{"store":{"cluster":"s"},"defaults":{"lock_ttl_ms":0},"routes":[{"name":"a","match":{"path":"/a"}}]}"#,
        );
        assert_eq!(e.field, "defaults.lock_ttl_ms");
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"}},{"name":"a","match":{"path":"/b"}}]}"#,
        );
        assert_eq!(e.field, "routes[1].name");
        let e =
            failing(r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"a"}}]}"#);
        assert_eq!(e.field, "routes[0].match");
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"methods":["post"]}]}"#,
        );
        assert_eq!(e.field, "routes[0].methods");
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"store_statuses":["2x"]}]}"#,
        );
        assert_eq!(e.field, "routes[0].store_statuses");
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"fingerprint":{"exclude_json":["/t"]}}]}"#,
        );
        assert_eq!(e.field, "routes[0].fingerprint.exclude_json");
        let e = failing(
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"max_response_body_bytes":0}]}"#,
        );
        assert_eq!(e.field, "routes[0].max_response_body_bytes");
        let e = failing("not json");
        assert_eq!(e.field, ".");
        assert!(e
            .to_string()
            .contains("invalid idemgate filter configuration"));
    }

    #[test]
    fn scope_sources_parse() {
        let c = check(r#"{"store":{"cluster":"s"},"routes":[
            {"name":"a","match":{"path":"/a"},"scope":"global"},
            {"name":"b","match":{"path":"/b"},"scope":{"property":["metadata","filter_metadata","jwt","sub"]}},
            {"name":"c","match":{"path":"/c"},"scope":{"header":"x-api-key"}}]}"#)
        .unwrap();
        assert_eq!(c.routes[0].scope, ScopeSource::Global);
        assert_eq!(
            c.routes[1].scope.label(),
            "property:metadata/filter_metadata/jwt/sub"
        );
        assert_eq!(c.routes[2].scope, ScopeSource::Header("x-api-key".into()));
    }

    #[test]
    fn header_storage_rules() {
        let c = check(DEMO).unwrap();
        let r = &c.routes[0];
        assert!(r.stores_header("location"));
        assert!(r.stores_header("content-type"));
        for h in [
            "set-cookie",
            "transfer-encoding",
            "content-length",
            ":status",
            "x-ratelimit-remaining",
            "ratelimit-policy",
            "x-envoy-upstream-service-time",
        ] {
            assert!(!r.stores_header(h), "{h}");
        }
    }
}
