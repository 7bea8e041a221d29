//! The demo upstream: a small payments/orders API whose side effects are countable.
//!
//! Every executed `POST /v1/payments`, `POST /v1/orders` or `POST /v1/quotes` creates a
//! record with a fresh id (`pay_000001`, `ord_000001`, `quo_000001`, ...) and answers `201 Created` with a `Location` header and
//! a JSON body echoing the request JSON plus `id` and `created_at_ms`. `PATCH` on a record
//! merges the request JSON into it and answers 200. `GET` reads one record or the list.
//!
//! Test knobs (request headers, on every route):
//! - [`DELAY_HEADER`] `x-demo-delay-ms: N`: sleep N milliseconds before answering
//!   (at most [`MAX_DELAY_MS`]).
//! - [`STATUS_HEADER`] `x-demo-status: NNN`: answer with this status instead (200..=599); the request still executes and is counted.
//! - [`BODY_BYTES_HEADER`] `x-demo-body-bytes: N`: pad the response body with trailing
//!   spaces (still valid JSON) to exactly N bytes; a body already longer stays as is.
//!   At most [`MAX_BODY_BYTES`].
//! - [`BODY_B64_HEADER`] `x-demo-body-b64: <base64>`: answer with exactly these body bytes
//!   (binary or gzip bodies for replay tests).
//! - [`RESPONSE_HEADER`] `x-demo-response-header: name: value` (repeatable): answer with
//!   these header fields, in order; a name given here replaces the upstream's own fields of
//!   that name (e.g. `content-type`).
//!
//! `POST /v1/uploads` accepts any body bytes (binary, compressed, chunked), counts an
//! execution and answers 201 with `{"id", "bytes", "sha256"}` of what it received.
//!
//! Introspection for tests (never recorded themselves):
//! - `GET /__upstream/requests`: [`ReceivedRequest`] list, oldest first.
//! - `GET /__upstream/executions`: executed side effects per path (without query), as
//!   `{"/v1/payments": 2, "/v1/orders/ord_000001": 1}`.
//! - `GET /__upstream/healthz`: 200 `ok` (readiness).
//!
//! Bad input (a body that is not a JSON object, a bad knob value, an unknown id) gets a
//! 4xx JSON error `{"error": "..."}`, never a panic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Request header: sleep this many milliseconds before answering.
pub const DELAY_HEADER: &str = "x-demo-delay-ms";
/// Request header: answer with this status code instead (the request still executes).
pub const STATUS_HEADER: &str = "x-demo-status";
/// Request header: pad the response body to this many bytes.
pub const BODY_BYTES_HEADER: &str = "x-demo-body-bytes";
/// Request header: the response body, base64 (RFC 4648 standard alphabet).
pub const BODY_B64_HEADER: &str = "x-demo-body-b64";
/// Request header (repeatable): `name: value` of a response header field to send.
pub const RESPONSE_HEADER: &str = "x-demo-response-header";
/// Largest accepted [`DELAY_HEADER`] value, in milliseconds (5 minutes).
pub const MAX_DELAY_MS: u64 = 300_000;
/// Largest accepted [`BODY_BYTES_HEADER`] value, in bytes (64 MiB).
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Largest accepted request body, in bytes (16 MiB).
pub const MAX_REQUEST_BODY_BYTES: usize = 16 << 20;

/// One request as the upstream received it (`GET /__upstream/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedRequest {
    /// Request method, e.g. `POST`.
    pub method: String,
    /// Path with query, e.g. `/v1/payments?x=1`.
    pub path: String,
    /// The `Idempotency-Key` header value, if any (the first one; see `idempotency_keys`).
    pub idempotency_key: Option<String>,
    /// Every `Idempotency-Key` field value, in order (a duplicate field shows up here).
    pub idempotency_keys: Vec<String>,
    /// The `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// Request body length in bytes.
    pub body_len: usize,
    /// When the request arrived, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
}

/// Executed side effects per path without query (`GET /__upstream/executions`).
pub type Executions = BTreeMap<String, u64>;

/// The demo resources.
#[derive(Debug, Clone, Copy)]
enum Resource {
    Payments,
    Orders,
    /// Short-lived price quotes (the demo protects them with a short TTL).
    Quotes,
}

impl Resource {
    fn id_prefix(self) -> &'static str {
        match self {
            Resource::Payments => "pay",
            Resource::Orders => "ord",
            Resource::Quotes => "quo",
        }
    }
    fn collection(self) -> &'static str {
        match self {
            Resource::Payments => "/v1/payments",
            Resource::Orders => "/v1/orders",
            Resource::Quotes => "/v1/quotes",
        }
    }
}

#[derive(Debug, Default)]
struct Store {
    next_id: u64,
    payments: BTreeMap<String, Value>,
    orders: BTreeMap<String, Value>,
    quotes: BTreeMap<String, Value>,
    requests: Vec<ReceivedRequest>,
    executions: Executions,
}

impl Store {
    fn records(&mut self, r: Resource) -> &mut BTreeMap<String, Value> {
        match r {
            Resource::Payments => &mut self.payments,
            Resource::Orders => &mut self.orders,
            Resource::Quotes => &mut self.quotes,
        }
    }
}

/// Shared state of the demo upstream: every record, request and execution, in memory.
#[derive(Debug, Clone, Default)]
pub struct AppState {
    store: Arc<Mutex<Store>>,
}

impl AppState {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A poisoned lock only means a handler panicked mid-update; the data is still usable.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A 4xx answer with a JSON `{"error": ...}` body.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The knobs a request carries.
#[derive(Debug, Default)]
struct Knobs {
    delay_ms: u64,
    status: Option<StatusCode>,
    body_bytes: Option<usize>,
    body: Option<Vec<u8>>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| bad_request(format!("{name} is not visible ASCII"))),
    }
}

fn parse_knobs(headers: &HeaderMap) -> Result<Knobs, ApiError> {
    let mut knobs = Knobs::default();
    if let Some(v) = header_str(headers, DELAY_HEADER)? {
        let ms: u64 = v.parse().map_err(|_| {
            bad_request(format!(
                "{DELAY_HEADER} must be a whole number of milliseconds, got {v:?}"
            ))
        })?;
        if ms > MAX_DELAY_MS {
            return Err(bad_request(format!(
                "{DELAY_HEADER} is at most {MAX_DELAY_MS}"
            )));
        }
        knobs.delay_ms = ms;
    }
    if let Some(v) = header_str(headers, STATUS_HEADER)? {
        let code = v
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| {
                bad_request(format!(
                    "{STATUS_HEADER} must be a status code 200..=599, got {v:?}"
                ))
            })?;
        knobs.status = Some(code);
    }
    if let Some(v) = header_str(headers, BODY_BYTES_HEADER)? {
        let n: usize = v.parse().map_err(|_| {
            bad_request(format!(
                "{BODY_BYTES_HEADER} must be a whole number of bytes, got {v:?}"
            ))
        })?;
        if n > MAX_BODY_BYTES {
            return Err(bad_request(format!(
                "{BODY_BYTES_HEADER} is at most {MAX_BODY_BYTES}"
            )));
        }
        knobs.body_bytes = Some(n);
    }
    if let Some(v) = header_str(headers, BODY_B64_HEADER)? {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|e| bad_request(format!("{BODY_B64_HEADER} is not base64: {e}")))?;
        knobs.body = Some(bytes);
    }
    for v in headers.get_all(RESPONSE_HEADER) {
        let text = v
            .to_str()
            .map_err(|_| bad_request(format!("{RESPONSE_HEADER} is not visible ASCII")))?;
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| bad_request(format!("{RESPONSE_HEADER} must be `name: value`")))?;
        let name = header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| bad_request(format!("{RESPONSE_HEADER}: bad header name {name:?}")))?;
        let value = HeaderValue::from_str(value.trim_start())
            .map_err(|_| bad_request(format!("{RESPONSE_HEADER}: bad header value")))?;
        knobs.headers.push((name, value));
    }
    Ok(knobs)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn parse_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad_request("the request body must be a JSON object")),
        Err(e) => Err(bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Builds the JSON response, applying the status, body and header knobs.
fn respond(knobs: &Knobs, status: StatusCode, location: Option<&str>, body: &Value) -> Response {
    let mut bytes = match &knobs.body {
        Some(raw) => raw.clone(),
        None => serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec()),
    };
    if let Some(n) = knobs.body_bytes {
        if n > bytes.len() {
            bytes.resize(n, b' ');
        }
    }
    let status = knobs.status.unwrap_or(status);
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        bytes.clear();
    }
    let mut resp = (status, bytes).into_response();
    let headers = resp.headers_mut();
    if status != StatusCode::NO_CONTENT {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        headers.insert(header::LOCATION, loc);
    }
    for (name, _) in &knobs.headers {
        headers.remove(name);
    }
    for (name, value) in &knobs.headers {
        headers.append(name.clone(), value.clone());
    }
    resp
}

/// `POST /v1/uploads`: any bytes; counts an execution and describes what arrived.
async fn upload(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    use sha2::Digest as _;
    let knobs = admit(&state, &method, &uri, &headers, body.len()).await?;
    let id = {
        let mut store = state.lock();
        store.next_id += 1;
        *store.executions.entry(uri.path().to_owned()).or_insert(0) += 1;
        format!("upl_{:06}", store.next_id)
    };
    let location = format!("/v1/uploads/{id}");
    let described = json!({
        "id": id,
        "bytes": body.len(),
        "sha256": hex::encode(sha2::Sha256::digest(&body)),
    });
    Ok(respond(
        &knobs,
        StatusCode::CREATED,
        Some(&location),
        &described,
    ))
}

/// Records the request, then applies the delay knob. Returns the parsed knobs.
async fn admit(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body_len: usize,
) -> Result<Knobs, ApiError> {
    let strings = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    let keys = strings("idempotency-key");
    let req = ReceivedRequest {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| uri.path().to_owned()),
        idempotency_key: keys.first().cloned(),
        idempotency_keys: keys,
        authorization: strings("authorization").into_iter().next(),
        body_len,
        received_at_ms: now_ms(),
    };
    state.lock().requests.push(req);
    let knobs = parse_knobs(headers)?;
    if knobs.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.delay_ms)).await;
    }
    Ok(knobs)
}

async fn create(
    state: AppState,
    r: Resource,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let knobs = admit(&state, &method, &uri, &headers, body.len()).await?;
    let mut record = parse_object(&body)?;
    let location = {
        let mut store = state.lock();
        store.next_id += 1;
        let id = format!("{}_{:06}", r.id_prefix(), store.next_id);
        record.insert("id".into(), Value::String(id.clone()));
        record.insert("created_at_ms".into(), json!(now_ms()));
        store
            .records(r)
            .insert(id.clone(), Value::Object(record.clone()));
        *store.executions.entry(uri.path().to_owned()).or_insert(0) += 1;
        format!("{}/{id}", r.collection())
    };
    Ok(respond(
        &knobs,
        StatusCode::CREATED,
        Some(&location),
        &Value::Object(record),
    ))
}

async fn update(
    state: AppState,
    r: Resource,
    id: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let knobs = admit(&state, &method, &uri, &headers, body.len()).await?;
    let patch = parse_object(&body)?;
    let mut store = state.lock();
    let Some(Value::Object(record)) = store.records(r).get_mut(&id) else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no record {id}")));
    };
    for (k, v) in patch {
        if k != "id" && k != "created_at_ms" {
            record.insert(k, v);
        }
    }
    record.insert("updated_at_ms".into(), json!(now_ms()));
    let out = Value::Object(record.clone());
    *store.executions.entry(uri.path().to_owned()).or_insert(0) += 1;
    Ok(respond(&knobs, StatusCode::OK, None, &out))
}

async fn read_one(
    state: AppState,
    r: Resource,
    id: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let knobs = admit(&state, &method, &uri, &headers, 0).await?;
    let found = state.lock().records(r).get(&id).cloned();
    match found {
        Some(v) => Ok(respond(&knobs, StatusCode::OK, None, &v)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no record {id}"))),
    }
}

async fn list(
    state: AppState,
    r: Resource,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let knobs = admit(&state, &method, &uri, &headers, 0).await?;
    let data: Vec<Value> = state.lock().records(r).values().cloned().collect();
    Ok(respond(
        &knobs,
        StatusCode::OK,
        None,
        &json!({ "data": data }),
    ))
}

fn resource_routes(r: Resource) -> Router<AppState> {
    Router::new()
        .route(
            r.collection(),
            get(
                move |State(s): State<AppState>, m: Method, u: Uri, h: HeaderMap| {
                    list(s, r, m, u, h)
                },
            )
            .post(
                move |State(s): State<AppState>, m: Method, u: Uri, h: HeaderMap, b: Bytes| {
                    create(s, r, m, u, h, b)
                },
            ),
        )
        .route(
            &format!("{}/{{id}}", r.collection()),
            get(
                move |State(s): State<AppState>,
                      Path(id): Path<String>,
                      m: Method,
                      u: Uri,
                      h: HeaderMap| { read_one(s, r, id, m, u, h) },
            )
            .patch(
                move |State(s): State<AppState>,
                      Path(id): Path<String>,
                      m: Method,
                      u: Uri,
                      h: HeaderMap,
                      b: Bytes| { update(s, r, id, m, u, h, b) },
            ),
        )
}

/// Any other path: record it, answer 404 JSON.
async fn fallback(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = admit(&state, &method, &uri, &headers, body.len()).await {
        return e.into_response();
    }
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
    .into_response()
}

/// The demo upstream's router (apart from `main` so tests can drive it with `oneshot`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(resource_routes(Resource::Payments))
        .merge(resource_routes(Resource::Orders))
        .merge(resource_routes(Resource::Quotes))
        .route("/v1/uploads", axum::routing::post(upload))
        .route("/__upstream/healthz", get(|| async { "ok" }))
        .route(
            "/__upstream/requests",
            get(|State(s): State<AppState>| async move { Json(s.lock().requests.clone()) }),
        )
        .route(
            "/__upstream/executions",
            get(|State(s): State<AppState>| async move { Json(s.lock().executions.clone()) }),
        )
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    async fn call(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes().to_vec(),
        )
    }

    fn post(path: &str) -> axum::http::request::Builder {
        Request::post(path).header("content-type", "application/json")
    }

    #[tokio::test]
    async fn post_creates_counts_and_echoes() {
        let app = app(AppState::default());
        let req = post("/v1/payments")
            .header("idempotency-key", "k1")
            .header("authorization", "Bearer a")
            .body(Body::from(r#"{"amount":1000,"currency":"eur"}"#))
            .unwrap();
        let (status, headers, body) = call(&app, req).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["location"], "/v1/payments/pay_000001");
        assert_eq!(headers["content-type"], "application/json");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["amount"], 1000);
        assert_eq!(v["id"], "pay_000001");
        assert!(v["created_at_ms"].as_u64().unwrap() > 0);

        let req = post("/v1/orders").body(Body::from("{}")).unwrap();
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["location"], "/v1/orders/ord_000002");

        let req = Request::patch("/v1/orders/ord_000002")
            .body(Body::from(r#"{"state":"paid"}"#))
            .unwrap();
        let (status, _, body) = call(&app, req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["state"],
            "paid"
        );

        let (status, _, body) = call(
            &app,
            Request::get("/v1/payments/pay_000001")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["currency"],
            "eur"
        );
        let (_, _, body) = call(
            &app,
            Request::get("/v1/payments?limit=5")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["data"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        let (_, _, body) = call(
            &app,
            Request::get("/__upstream/executions")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        let ex: Executions = serde_json::from_slice(&body).unwrap();
        assert_eq!(ex["/v1/payments"], 1);
        assert_eq!(ex["/v1/orders"], 1);
        assert_eq!(ex["/v1/orders/ord_000002"], 1);

        let (_, _, body) = call(
            &app,
            Request::get("/__upstream/requests")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        let reqs: Vec<ReceivedRequest> = serde_json::from_slice(&body).unwrap();
        assert_eq!(reqs.len(), 5, "{reqs:?}");
        assert_eq!(reqs[0].idempotency_key.as_deref(), Some("k1"));
        assert_eq!(reqs[0].authorization.as_deref(), Some("Bearer a"));
        assert_eq!(reqs[0].body_len, 32);
        assert_eq!(reqs[4].path, "/v1/payments?limit=5");
    }

    #[tokio::test]
    async fn knobs_apply_and_bad_input_is_400() {
        let app = app(AppState::default());
        let req = post("/v1/payments")
            .header(STATUS_HEADER, "503")
            .header(BODY_BYTES_HEADER, "1000")
            .body(Body::from("{}"))
            .unwrap();
        let (status, _, body) = call(&app, req).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.len(), 1000);
        assert!(serde_json::from_slice::<Value>(&body).is_ok());

        for (name, value) in [
            (DELAY_HEADER, "soon"),
            (STATUS_HEADER, "42"),
            (BODY_BYTES_HEADER, "-1"),
        ] {
            let req = post("/v1/payments")
                .header(name, value)
                .body(Body::from("{}"))
                .unwrap();
            let (status, _, body) = call(&app, req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {value}");
            assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());
        }
        for body in ["not json", "[1,2]"] {
            let (status, _, _) =
                call(&app, post("/v1/payments").body(Body::from(body)).unwrap()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        }
        let (status, _, _) = call(
            &app,
            Request::get("/v1/payments/pay_999999")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) =
            call(&app, Request::delete("/nope").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // Rejected requests executed nothing.
        let (_, _, body) = call(
            &app,
            Request::get("/__upstream/executions")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        let ex: Executions = serde_json::from_slice(&body).unwrap();
        assert_eq!(ex.get("/v1/payments"), Some(&1));
    }
}
