#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The filter configuration's JSON Schema, `filter/idemgate-filter.schema.json`: it is what
//! the config types generate (a type changed without `cargo xtask schema` fails here), and
//! the configurations we ship and test with validate against it. (Every e2e stack also
//! checks its configuration against it before Envoy starts: `Stack::start`.)

use idemgate_e2e::schema::{check_filter_config, committed_schema, SCHEMA_PATH};
use idemgate_e2e::{demo_filter_config, workspace_root};
use serde_json::{json, Value};

#[test]
fn committed_schema_is_what_the_config_types_generate() {
    let schema = idemgate_filter::config::schema();
    let generated = serde_json::to_value(&schema).expect("schema");
    let committed = committed_schema().expect("committed schema");
    assert!(
        generated == committed,
        "{SCHEMA_PATH} is stale: the filter's config types changed; run `cargo xtask schema` \
         (or `cargo xtask dist`) and commit the result"
    );
    // The file is byte for byte what `cargo xtask schema` writes (pretty, final newline).
    let text = std::fs::read_to_string(workspace_root().join(SCHEMA_PATH)).expect("read");
    let pretty = serde_json::to_string_pretty(&schema).expect("pretty") + "\n";
    assert!(
        text == pretty,
        "{SCHEMA_PATH} is not formatted as `cargo xtask schema` writes it"
    );
}

#[test]
fn demo_and_documented_configs_validate() {
    let demo = demo_filter_config().expect("envoy/demo-filter.json");
    check_filter_config(&demo).unwrap_or_else(|e| panic!("envoy/demo-filter.json: {e:#}"));
    // The shape documented in filter/src/config.rs and the harness's example.
    let documented = json!({
      "store":    {"cluster": "idemgate_store", "timeout_ms": 1000, "authority": "idemgate-store"},
      "defaults": {"methods": ["POST", "PATCH"], "key": "required", "ttl_s": 86400},
      "routes": [
        {"name": "payments", "match": {"prefix": "/v1/payments"},
         "fingerprint": {"body": "canonical_json", "exclude_json": ["/client_ts"]}},
        {"name": "orders", "match": {"prefix": "/v1/orders"}, "key": "optional"},
        {"name": "refunds", "match": {"path": "/v1/refunds"}, "scope": "global",
         "execution": "detached", "upstream_timeout_ms": 5000,
         "unknown_outcome": {"hold_s": 30, "then": "reexecute"}},
        {"name": "tenants", "match": {"prefix": "/v1/t"},
         "scope": {"property": ["metadata", "filter_metadata", "idemgate.e2e", "tenant"]},
         "failure_mode": "open", "store_statuses": ["2xx", "!202"],
         "deny_response_headers": ["x-secret-*"]}
      ]
    });
    check_filter_config(&documented).unwrap_or_else(|e| panic!("documented config: {e:#}"));
}

#[test]
fn the_schema_refuses_what_the_filter_refuses_by_shape() {
    let bad: [(&str, Value); 5] = [
        ("no store", json!({"routes": []})),
        (
            "unknown top-level field",
            json!({"store": {"cluster": "s"}, "routes": [], "extra": 1}),
        ),
        (
            "unknown route field",
            json!({"store": {"cluster": "s"}, "routes": [{"name": "a", "match": {"prefix": "/"}, "tll_s": 5}]}),
        ),
        (
            "wrong enum value",
            json!({"store": {"cluster": "s"}, "routes": [{"name": "a", "match": {"prefix": "/"}, "key": "sometimes"}]}),
        ),
        (
            "two matchers",
            json!({"store": {"cluster": "s"}, "routes": [{"name": "a", "match": {"prefix": "/", "path": "/x"}}]}),
        ),
    ];
    for (what, config) in bad {
        assert!(
            check_filter_config(&config).is_err(),
            "{what}: the schema should refuse {config}"
        );
        assert!(
            idemgate_filter::config::Config::from_json(config.to_string().as_bytes()).is_err(),
            "{what}: the filter refuses it too"
        );
    }
}
