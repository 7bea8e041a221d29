//! Every call to the admin API, with typed errors.
//!
//! Calls carry `Authorization: Bearer <token>` from the [`Session`]. A 401 signs the user
//! out with a notice (the token was rotated or the server restarted with another one).
//! Error bodies are RFC 9457 problem details; anything else is reported as is. Nothing
//! here panics on unexpected data: a body that does not parse is an
//! [`ApiError::Decode`].

use gloo_net::http::{Request, RequestBuilder};
use idemgate_protocol::admin::{
    BulkPurgeOutcome, BulkPurgeRequest, Event, Health, KeyDetail, KeyListQuery, KeyPage,
    PurgeOutcome, StatsResponse,
};
use idemgate_protocol::problem::Problem;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::session::Session;
use crate::format::{encode_component, query_string, state_name};

/// What can go wrong talking to the admin API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 401: the token is wrong or no longer valid.
    #[error("The server refused the admin token (401). Sign in again with the token the server was started with (IDEMGATE_ADMIN_TOKEN or --admin-token-file).")]
    Unauthorized,
    /// 404: the record (or route) does not exist.
    #[error("Not found: {0}")]
    NotFound(String),
    /// Any other error status, with the problem details when the server sent them.
    #[error("{title} (HTTP {status}){}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Problem {
        /// HTTP status.
        status: u16,
        /// Problem title (or the status text).
        title: String,
        /// Problem detail.
        detail: Option<String>,
    },
    /// The request did not reach the server or got no answer.
    #[error("Cannot reach the idemgate server ({0}). Check that it is running; this page retries on its own.")]
    Network(String),
    /// The answer was not what this dashboard expects.
    #[error(
        "Unexpected answer from the server ({0}). Is the dashboard the same version as the server?"
    )]
    Decode(String),
}

/// The URL of one record: `/api/record?scope=…&key=…` (the query form, because a key `.`
/// or `..` in a path is a dot segment the browser resolves away, even percent-encoded);
/// `suffix` is `""` or `"/release"`.
pub fn key_path(scope: &str, key: &str, suffix: &str) -> String {
    format!(
        "/api/record{suffix}?scope={}&key={}",
        encode_component(scope),
        encode_component(key)
    )
}

/// The query string of a key listing.
pub fn keys_query(q: &KeyListQuery) -> String {
    query_string(&[
        ("state", q.state.map(|s| state_name(s).to_owned())),
        ("route", q.route.clone()),
        ("scope", q.scope.clone()),
        ("prefix", q.prefix.clone()),
        ("min_age_ms", q.min_age_ms.map(|v| v.to_string())),
        ("max_age_ms", q.max_age_ms.map(|v| v.to_string())),
        ("cursor", q.cursor.clone()),
        ("limit", q.limit.map(|v| v.to_string())),
    ])
}

/// URL of the live event stream (`EventSource` cannot send headers, so the token goes in
/// the query), resuming after `last_event_id` when given.
pub fn events_url(token: &str, last_event_id: Option<&str>) -> String {
    format!(
        "/api/events{}",
        query_string(&[
            ("access_token", Some(token.to_owned())),
            ("last_event_id", last_event_id.map(str::to_owned)),
        ])
    )
}

/// Turns an error answer into an [`ApiError`].
fn error_from(status: u16, body: &str) -> ApiError {
    let problem = serde_json::from_str::<Problem>(body).ok();
    match status {
        401 => ApiError::Unauthorized,
        404 => ApiError::NotFound(
            problem
                .and_then(|p| p.detail.or(Some(p.title)))
                .unwrap_or_else(|| "no such record".to_owned()),
        ),
        _ => match problem {
            Some(p) => ApiError::Problem {
                status,
                title: p.title,
                detail: p.detail,
            },
            None => ApiError::Problem {
                status,
                title: "Request failed".to_owned(),
                detail: Some(body.chars().take(300).collect::<String>())
                    .filter(|d| !d.trim().is_empty()),
            },
        },
    }
}

/// Parses a success body.
fn decode<T: DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    serde_json::from_str(body).map_err(|e| ApiError::Decode(e.to_string()))
}

/// The admin API client. Cheap to copy; get it with [`use_api`].
#[derive(Debug, Clone, Copy)]
pub struct Api {
    session: Session,
}

impl Api {
    /// A client using `session`'s token.
    pub fn new(session: Session) -> Self {
        Self { session }
    }

    fn authorize(&self, rb: RequestBuilder, token: Option<&str>) -> RequestBuilder {
        let rb = rb.header("Accept", "application/json");
        match token.map(str::to_owned).or_else(|| self.session.token()) {
            Some(t) => rb.header("Authorization", &format!("Bearer {t}")),
            None => rb,
        }
    }

    /// Sends, reads the body, maps errors; a 401 signs out unless `probe` (sign-in check).
    async fn exec<T: DeserializeOwned>(
        &self,
        req: Result<Request, gloo_net::Error>,
        probe: bool,
    ) -> Result<T, ApiError> {
        let req = req.map_err(|e| ApiError::Network(e.to_string()))?;
        let resp = req
            .send()
            .await
            .map_err(|e| ApiError::Network(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| ApiError::Network(e.to_string()))?;
        if (200..300).contains(&status) {
            return decode(&body);
        }
        let err = error_from(status, &body);
        if err == ApiError::Unauthorized && !probe {
            self.session.sign_out(Some(err.to_string()));
        }
        Err(err)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.exec(self.authorize(Request::get(path), None).build(), false)
            .await
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        body: &B,
    ) -> Result<T, ApiError> {
        self.exec(self.authorize(rb, None).json(body), false).await
    }

    /// Checks a token before saving it: `Ok` when the server accepts it.
    ///
    /// # Errors
    /// [`ApiError::Unauthorized`] for a wrong token, or why the server could not be asked.
    pub async fn check_token(&self, token: &str) -> Result<(), ApiError> {
        let path = format!(
            "/api/keys{}",
            keys_query(&KeyListQuery {
                limit: Some(1),
                ..KeyListQuery::default()
            })
        );
        self.exec::<KeyPage>(
            self.authorize(Request::get(&path), Some(token)).build(),
            true,
        )
        .await
        .map(|_| ())
    }

    /// `GET /api/health` (no token needed).
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn health(&self) -> Result<Health, ApiError> {
        self.get("/api/health").await
    }

    /// `GET /api/stats`.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn stats(&self) -> Result<StatsResponse, ApiError> {
        self.get("/api/stats").await
    }

    /// `GET /api/keys?...`: one page of records.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn keys(&self, q: &KeyListQuery) -> Result<KeyPage, ApiError> {
        self.get(&format!("/api/keys{}", keys_query(q))).await
    }

    /// `GET /api/keys/{scope}/{key}`.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] when the record does not exist (any more); see [`ApiError`].
    pub async fn key(&self, scope: &str, key: &str) -> Result<KeyDetail, ApiError> {
        self.get(&key_path(scope, key, "")).await
    }

    /// `DELETE /api/keys/{scope}/{key}`: purge one record.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn purge_key(&self, scope: &str, key: &str) -> Result<PurgeOutcome, ApiError> {
        let rb = self.authorize(Request::delete(&key_path(scope, key, "")), None);
        self.exec(rb.build(), false).await
    }

    /// `POST /api/keys/{scope}/{key}/release`: release an in-flight lock.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn release_key(&self, scope: &str, key: &str) -> Result<PurgeOutcome, ApiError> {
        let path = key_path(scope, key, "/release");
        let rb = self.authorize(Request::post(&path), None);
        self.exec(rb.build(), false).await
    }

    /// `POST /api/purge`: a bulk purge (dry run or real run).
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn bulk_purge(&self, req: &BulkPurgeRequest) -> Result<BulkPurgeOutcome, ApiError> {
        self.send_json(Request::post("/api/purge"), req).await
    }

    /// `GET /api/events/recent`: recent events, newest first, optionally of one key.
    ///
    /// # Errors
    /// See [`ApiError`].
    pub async fn recent_events(
        &self,
        scope: Option<&str>,
        key: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Event>, ApiError> {
        let q = query_string(&[
            ("limit", Some(limit.to_string())),
            ("scope", scope.map(str::to_owned)),
            ("key", key.map(str::to_owned)),
        ]);
        self.get(&format!("/api/events/recent{q}")).await
    }
}

/// The [`Api`] client for the current [`Session`].
pub fn use_api() -> Api {
    Api::new(crate::core::session::use_session())
}

#[cfg(test)]
mod tests {
    use super::*;
    use idemgate_protocol::admin::KeyState;

    #[test]
    fn paths_and_queries() {
        assert_eq!(
            key_path("global", "a/b c", ""),
            "/api/record?scope=global&key=a%2Fb%20c"
        );
        assert_eq!(
            key_path("global", "..", "/release"),
            "/api/record/release?scope=global&key=%2E%2E"
        );
        let q = KeyListQuery {
            state: Some(KeyState::InFlight),
            prefix: Some("ord-".into()),
            cursor: Some("c:1".into()),
            limit: Some(25),
            ..KeyListQuery::default()
        };
        assert_eq!(
            keys_query(&q),
            "?state=in_flight&prefix=ord-&cursor=c%3A1&limit=25"
        );
        assert_eq!(
            events_url("t/k", Some("1-2")),
            "/api/events?access_token=t%2Fk&last_event_id=1-2"
        );
    }

    #[test]
    fn errors_read_problem_details() {
        assert_eq!(error_from(401, ""), ApiError::Unauthorized);
        let body = r#"{"type":"about:blank","title":"Bad filter","status":400,"detail":"scope is not hex"}"#;
        let e = error_from(400, body);
        assert_eq!(e.to_string(), "Bad filter (HTTP 400): scope is not hex");
        assert!(matches!(error_from(404, ""), ApiError::NotFound(_)));
        let e = error_from(502, "<html>bad gateway</html>");
        assert!(e.to_string().contains("HTTP 502"), "{e}");
        assert!(matches!(decode::<KeyPage>("{}"), Err(ApiError::Decode(_))));
    }
}
