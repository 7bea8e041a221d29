//! Admin API bearer tokens, each with a label that names the operator in events.
//!
//! Sources (never a command-line value): `IDEMGATE_ADMIN_TOKEN` (one token, label
//! `admin`) and `--admin-token-file FILE` (lines `label token`; blank lines and lines
//! starting with `#` are skipped). Presented tokens are compared in constant time with
//! every configured token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::AppError;
use crate::AppState;

/// Shortest accepted token, characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// The configured tokens.
#[derive(Clone, Default)]
pub struct AdminTokens {
    entries: Vec<(String, String)>,
}

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<&str> = self.entries.iter().map(|(l, _)| l.as_str()).collect();
        f.debug_struct("AdminTokens")
            .field("labels", &labels)
            .finish()
    }
}

/// The label of the token a request presented (a request extension on `/api/*`).
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl AdminTokens {
    /// No tokens: every `/api/*` call except health answers 401.
    pub fn none() -> Self {
        Self::default()
    }

    /// Tokens from `(label, token)` pairs.
    ///
    /// # Errors
    /// A token shorter than [`MIN_TOKEN_LEN`], a token or label with whitespace, or a
    /// duplicate label.
    pub fn new(entries: Vec<(String, String)>) -> Result<Self, String> {
        let mut labels = std::collections::HashSet::new();
        for (label, token) in &entries {
            if label.is_empty() || label.chars().any(char::is_whitespace) {
                return Err(format!("token label {label:?} is empty or has whitespace"));
            }
            if token.len() < MIN_TOKEN_LEN
                || token.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!(
                    "the token labelled {label:?} must be at least {MIN_TOKEN_LEN} characters without whitespace"
                ));
            }
            if !labels.insert(label.clone()) {
                return Err(format!("token label {label:?} appears twice"));
            }
        }
        Ok(Self { entries })
    }

    /// Parses a token file: `label token` per line, `#` comments, blank lines skipped.
    ///
    /// # Errors
    /// A line that is not `label token` (the message names the line number, never the
    /// token), or the rules of [`AdminTokens::new`].
    pub fn parse_file(text: &str) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(label), Some(token), None) => out.push((label.to_owned(), token.to_owned())),
                _ => {
                    return Err(format!(
                        "line {}: expected `label token` (two fields separated by spaces)",
                        n + 1
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Whether any token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The label of `presented` when it equals a configured token (constant time per
    /// token; every token is compared).
    pub fn check(&self, presented: &str) -> Option<String> {
        let mut found = None;
        for (label, token) in &self.entries {
            if bool::from(token.as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(label.clone());
            }
        }
        found
    }
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "access_token").then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// Middleware of `/api/*` (health excluded by the router): accepts `Authorization: Bearer
/// <token>`, and on `/api/events` also `?access_token=<token>` (EventSource cannot set
/// headers). Inserts [`Actor`]; else 401 with `WWW-Authenticate: Bearer`.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    if state.tokens.is_empty() {
        return AppError::Unauthorized(
            "no admin token is configured on this server (set IDEMGATE_ADMIN_TOKEN or --admin-token-file)"
                .into(),
        )
        .into_response();
    }
    let header_token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    let presented = header_token.or_else(|| {
        (req.uri().path() == "/api/events")
            .then(|| query_token(req.uri().query()))
            .flatten()
    });
    let Some(presented) = presented else {
        return AppError::Unauthorized(
            "an `Authorization: Bearer <token>` header is required".into(),
        )
        .into_response();
    };
    match state.tokens.check(&presented) {
        Some(label) => {
            req.extensions_mut().insert(Actor(label));
            next.run(req).await
        }
        None => AppError::Unauthorized("the bearer token is not valid".into()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_parse_with_comments_and_refuse_bad_lines() {
        let t = AdminTokens::parse_file(
            "# ops\n\nalice aaaaaaaaaaaaaaaaaaaa\nbob   bbbbbbbbbbbbbbbbbbbb  \n",
        )
        .unwrap_or_default();
        assert_eq!(t.len(), 2);
        let tokens = AdminTokens::new(t).unwrap_or_default();
        assert_eq!(tokens.check("bbbbbbbbbbbbbbbbbbbb").as_deref(), Some("bob"));
        assert_eq!(tokens.check("bbbbbbbbbbbbbbbbbbb"), None);
        assert!(AdminTokens::parse_file("alice\n").is_err());
        assert!(AdminTokens::parse_file("a b c\n").is_err());
        assert!(AdminTokens::new(vec![("a".into(), "short".into())]).is_err());
        let dup = vec![("a".into(), "x".repeat(20)), ("a".into(), "y".repeat(20))];
        assert!(AdminTokens::new(dup).is_err());
    }

    #[test]
    fn query_tokens_are_percent_decoded() {
        assert_eq!(
            query_token(Some("kind=a&access_token=a%2Bb")).as_deref(),
            Some("a+b")
        );
        assert_eq!(query_token(Some("kind=a")), None);
        assert_eq!(query_token(None), None);
    }
}
