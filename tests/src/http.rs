//! A small blocking HTTP client for tests (over `ureq`): 4xx/5xx are answers, not errors;
//! redirects are not followed; bodies are raw bytes (no decompression).
//!
//! ```no_run
//! # fn f(stack: &idemgate_e2e::Stack) -> anyhow::Result<()> {
//! let reply = stack
//!     .gateway()
//!     .post("/v1/payments")
//!     .header("Authorization", "Bearer tenant-a")
//!     .header("Idempotency-Key", "k-1")
//!     .json(&serde_json::json!({"amount": 1000}))
//!     .send()?;
//! assert_eq!(reply.status, 201);
//! assert_eq!(reply.header("location"), Some("/v1/payments/pay_000001"));
//! # Ok(()) }
//! ```

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::de::DeserializeOwned;

/// Default timeout for a whole request, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Largest response body [`RequestBuilder::send`] reads, in bytes (256 MiB).
pub const MAX_REPLY_BYTES: u64 = 256 << 20;

/// A client bound to a base URL such as `http://127.0.0.1:10000`. Cheap to clone; share it
/// between threads for concurrency tests.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `base` (no trailing slash needed) with [`DEFAULT_TIMEOUT_MS`].
    pub fn new(base: impl Into<String>) -> Self {
        Self::with_timeout(base, Duration::from_millis(DEFAULT_TIMEOUT_MS))
    }

    /// A client for `base` whose requests time out after `timeout` (connect included).
    pub fn with_timeout(base: impl Into<String>, timeout: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            .allow_non_standard_methods(true)
            .build()
            .into();
        Self {
            base: base.into().trim_end_matches('/').to_owned(),
            agent,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `base + path`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with any method to `path` (relative to the base, starting with `/`).
    pub fn request(&self, method: &str, path: &str) -> RequestBuilder {
        RequestBuilder {
            agent: self.agent.clone(),
            method: method.to_owned(),
            url: self.url(path),
            headers: Vec::new(),
            body: None,
        }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request("GET", path)
    }
    /// `POST path`.
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request("POST", path)
    }
    /// `PATCH path`.
    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.request("PATCH", path)
    }
    /// `PUT path`.
    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request("PUT", path)
    }
    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request("DELETE", path)
    }
}

/// One request being built; [`RequestBuilder::send`] runs it.
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    agent: ureq::Agent,
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl RequestBuilder {
    /// Adds a header field; calling it twice with the same name sends two fields.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body bytes.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets a JSON body and `Content-Type: application/json`.
    pub fn json(self, value: &serde_json::Value) -> Self {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.header("content-type", "application/json").body(bytes)
    }

    /// Sends the request and reads the whole answer.
    ///
    /// # Errors
    /// Transport failures only (connection refused, timeout, malformed response, body over
    /// [`MAX_REPLY_BYTES`]); any HTTP status is an `Ok` [`Reply`].
    pub fn send(self) -> Result<Reply> {
        let what = format!("{} {}", self.method, self.url);
        let mut req = ureq::http::Request::builder()
            .method(self.method.as_str())
            .uri(self.url.as_str());
        for (name, value) in &self.headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let result = match self.body {
            Some(body) => self
                .agent
                .run(req.body(body).with_context(|| format!("building {what}"))?),
            None => self
                .agent
                .run(req.body(()).with_context(|| format!("building {what}"))?),
        };
        let mut resp = result.with_context(|| format!("{what} failed"))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .with_context(|| format!("reading the body of {what}"))?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// A whole HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Header fields in arrival order, names lowercase, repeated fields kept apart.
    pub headers: Vec<(String, String)>,
    /// Body bytes as received.
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON into `T`.
    ///
    /// # Errors
    /// The body is not JSON of that shape; the message quotes the body.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "status {} body is not the expected JSON: {}",
                self.status,
                self.text()
            )
        })
    }
}
