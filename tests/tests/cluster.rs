//! The whole gateway against a three-node Redis Cluster: Envoy and the filter in front,
//! the server in `--redis-cluster` mode, keys spread over every node.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::{Arc, Barrier};
use std::thread;

use idemgate_e2e::{demo_filter_config, RedisCluster, Reply, Stack, StackOptions};
use serde_json::{json, Value};

const TOKEN: &str = "e2e-cluster-admin-token-0123456789";

fn pay(stack: &Stack, key: &str, amount: u64) -> Reply {
    stack
        .gateway()
        .post("/v1/payments")
        .header("authorization", "Bearer tenant-a")
        .header("idempotency-key", key)
        .json(&json!({"amount": amount}))
        .send()
        .unwrap()
}

#[test]
fn the_gateway_runs_unchanged_on_a_redis_cluster() {
    let cluster = RedisCluster::start().expect("a three-node cluster forms");
    let mut opts = StackOptions::new("cluster", demo_filter_config().unwrap());
    opts.server_redis_url = Some(cluster.url());
    opts.server_args = vec!["--redis-cluster".into()];
    opts.server_env = vec![("IDEMGATE_ADMIN_TOKEN".into(), TOKEN.into())];
    let stack = Stack::start(opts).expect("stack starts");

    // Thirty keys: they hash to slots on every node.
    let mut first = Vec::new();
    for i in 0..30 {
        let r = pay(&stack, &format!("cluster-{i}"), 100 + i);
        assert_eq!(r.status, 201, "{}", r.text());
        first.push(r.body);
    }
    for (i, body) in first.iter().enumerate() {
        let r = pay(&stack, &format!("cluster-{i}"), 100 + i as u64);
        assert_eq!(
            (r.status, r.header("idempotent-replayed")),
            (201, Some("true"))
        );
        assert_eq!(&r.body, body);
    }
    let per_node: Vec<u64> = cluster
        .ports()
        .iter()
        .map(|p| {
            cluster
                .cli(*p, &["DBSIZE"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .collect();
    assert!(
        per_node.iter().all(|n| *n > 0),
        "records on every node: {per_node:?}"
    );

    // 422 and concurrent duplicates behave as on one Redis.
    assert_eq!(pay(&stack, "cluster-0", 999).status, 422);
    let gw = stack.gateway();
    let start = Arc::new(Barrier::new(10));
    let replies: Vec<u16> = (0..10)
        .map(|_| {
            let gw = gw.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                gw.post("/v1/payments")
                    .header("authorization", "Bearer tenant-a")
                    .header("idempotency-key", "cluster-dup")
                    .header("x-demo-delay-ms", "300")
                    .json(&json!({"amount": 1}))
                    .send()
                    .unwrap()
                    .status
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(
        replies.iter().all(|s| *s == 201 || *s == 409),
        "{replies:?}"
    );
    assert_eq!(stack.executions("/v1/payments").unwrap(), 31);

    // The admin API pages over every node and purges on the right one.
    let admin = stack.admin();
    let mut seen = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/keys?limit=7&cursor={c}"),
            None => "/api/keys?limit=7".to_owned(),
        };
        let page: Value = admin
            .get(&path)
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        seen += page["items"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, 31);
    let scope = {
        let page: Value = admin
            .get("/api/keys?prefix=cluster-7&limit=10")
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        page["items"][0]["scope"].as_str().unwrap().to_owned()
    };
    let purged = admin
        .delete(&format!("/api/keys/{scope}/cluster-7"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .unwrap();
    assert_eq!(purged.status, 200, "{}", purged.text());
    let again = pay(&stack, "cluster-7", 107);
    assert_eq!(
        (again.status, again.header("idempotent-replayed")),
        (201, None)
    );
    assert_eq!(stack.executions("/v1/payments").unwrap(), 32);
}
