//! Smoke test: the whole stack starts with `envoy/demo-filter.json` and a GET passes
//! through the gateway to the upstream.

use idemgate_e2e::{demo_filter_config, Stack, StackOptions};

#[test]
fn get_passes_through_the_gateway() {
    let stack = Stack::start(StackOptions::new("smoke", demo_filter_config().unwrap())).unwrap();

    let reply = stack.gateway().get("/v1/payments?limit=1").send().unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body: serde_json::Value = reply.json().unwrap();
    assert!(body["data"].is_array(), "{body}");

    let seen = stack.upstream_requests().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/v1/payments?limit=1");
    assert!(stack.upstream_executions().unwrap().is_empty());
    assert_eq!(
        stack
            .envoy_stat("http.ingress.downstream_rq_completed")
            .unwrap(),
        Some(1)
    );
}
