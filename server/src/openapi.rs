//! The OpenAPI document of the admin API, served at `GET /api/openapi.json`.

use serde_json::{json, Value};

fn op(summary: &str, response: &str, params: Value) -> Value {
    json!({
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": {"description": response},
            "401": {"description": "missing or wrong bearer token (problem details, WWW-Authenticate: Bearer)"},
            "503": {"description": "Redis cannot answer (problem details)"}
        }
    })
}

fn q(name: &str, schema: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": {"type": schema}, "description": description})
}

fn p(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}, "description": description})
}

/// The document.
pub fn document() -> Value {
    let key_params = json!([
        p("scope", "scope hash (64 hex) or `global`"),
        p("key", "idempotency key, percent-encoded")
    ]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "idemgate admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Admin API of the idemgate server. JSON bodies are the types of idemgate_protocol::admin; errors are RFC 9457 problem details (application/problem+json) with a stable `type` URN."
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/api/health": {"get": {
                "summary": "Redis reachability, PING latency and version (no token)",
                "security": [],
                "responses": {"200": {"description": "Health"}}
            }},
            "/api/keys": {"get": op("List records, cursor-paginated", "KeyPage", json!([
                q("state", "string", "in_flight | completed"),
                q("route", "string", "route name"),
                q("scope", "string", "scope hash or global"),
                q("prefix", "string", "key prefix"),
                q("min_age_ms", "integer", "at least this old"),
                q("max_age_ms", "integer", "at most this old"),
                q("cursor", "string", "next_cursor of the previous page"),
                q("limit", "integer", "1..=500, default 50")
            ]))},
            "/api/keys/{scope}/{key}": {
                "get": op("One record in detail (404 when absent)", "KeyDetail", key_params.clone()),
                "delete": op("Purge one completed record; event `purged`. An in-flight record is refused with 409 in-flight (its request may still execute upstream: release is the stuck-lock tool)", "PurgeOutcome", key_params.clone())
            },
            "/api/keys/{scope}/{key}/release": {
                "post": op("Release an in-flight lock (completed records untouched); event `lock_released`", "PurgeOutcome", key_params)
            },
            "/api/record": {
                "get": op("As GET /api/keys/{scope}/{key}, with scope and key as query parameters (for keys such as `..` that a URL path cannot carry)", "KeyDetail", json!([q("scope", "string", "scope hash or global"), q("key", "string", "the idempotency key")])),
                "delete": op("As DELETE /api/keys/{scope}/{key} (409 in-flight for a record still executing)", "PurgeOutcome", json!([q("scope", "string", "scope hash or global"), q("key", "string", "the idempotency key")]))
            },
            "/api/record/release": {
                "post": op("As POST /api/keys/{scope}/{key}/release", "PurgeOutcome", json!([q("scope", "string", "scope hash or global"), q("key", "string", "the idempotency key")]))
            },
            "/api/purge": {"post": {
                "summary": "Bulk purge by scope/route/prefix: dry run with a confirmation token, then the real run",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"description": "BulkPurgeRequest"}}}},
                "responses": {
                    "200": {"description": "BulkPurgeOutcome (mode dry_run or purged)"},
                    "400": {"description": "no filter, or a bad scope"},
                    "409": {"description": "confirmation-mismatch: unknown, used, expired or for another filter"}
                }
            }},
            "/api/stats": {"get": op("Counters per minute/hour/day window", "StatsResponse", json!([]))},
            "/api/events": {"get": {
                "summary": "Server-Sent Events: `event: <kind>`, `id: <stream id>`, `data: <Event JSON>`",
                "parameters": [
                    q("last_event_id", "string", "resume after this id (or the Last-Event-ID header)"),
                    q("kind", "string", "comma-separated kinds"),
                    q("access_token", "string", "the bearer token, for EventSource")
                ],
                "responses": {"200": {"description": "text/event-stream"}}
            }},
            "/api/events/recent": {"get": op("Recent events, newest first", "Vec<Event>", json!([
                q("limit", "integer", "1..=500, default 50"),
                q("scope", "string", "only this scope"),
                q("key", "string", "only this key"),
                q("kind", "string", "comma-separated kinds")
            ]))},
            "/api/openapi.json": {"get": op("This document", "OpenAPI 3.1", json!([]))}
        }
    })
}
