//! The server against a three-node Redis Cluster started by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use idemgate_protocol::admin::{BulkPurgeOutcome, Event, KeyPage};
use idemgate_protocol::ClaimOutcome;
use serde_json::{json, Value};

/// The three-master cluster of the e2e harness (killed on drop, logs on panic).
struct Cluster(idemgate_e2e::RedisCluster);

impl Cluster {
    fn start() -> Self {
        Self(idemgate_e2e::RedisCluster::start().expect("a three-node cluster forms"))
    }

    fn url(&self) -> String {
        self.0.url()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_admin_and_events_run_unchanged_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let mut server = Server::start_with(&cluster.url(), true).await;
    let (store, admin) = (server.store.clone(), server.admin.clone());
    let http = http();
    let get = |path: String| {
        let http = http.clone();
        let admin = admin.clone();
        async move {
            let r = http
                .get(format!("{admin}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            r.json::<Value>().await.unwrap()
        }
    };

    // Claim / complete / replay on keys spread over the slots (and so the nodes).
    let s = scope("cluster");
    let n = 60;
    for i in 0..n {
        let key = format!("ck-{i}");
        let r: ClaimOutcome = http
            .post(format!("{store}/v1/claim"))
            .json(&claim_body(&s, &key, &fp("c"), 60_000))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ClaimOutcome::Acquired { fencing_token } = r else {
            panic!("{r:?}")
        };
        if i % 2 == 0 {
            let r: Value = http
                .post(format!("{store}/v1/complete"))
                .json(&json!({
                    "record": {"scope": s, "key": key},
                    "fencing_token": fencing_token,
                    "status": 200,
                    "response": {"status": 200, "headers": [], "body": "aGk="},
                    "ttl_s": 600,
                }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(r["outcome"], "completed");
        }
    }
    let r: Value = http
        .post(format!("{store}/v1/claim"))
        .json(&claim_body(&s, "ck-0", &fp("c"), 60_000))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["outcome"], "replay");
    // The records really are spread over the three masters.
    let spread = cluster
        .0
        .ports()
        .iter()
        .filter(|p| cluster.0.cli(**p, &["DBSIZE"]).trim() != "0")
        .count();
    assert_eq!(spread, 3);

    // Listing with pagination visits every node.
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut path = "/api/keys?limit=7".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page: KeyPage = serde_json::from_value(get(path).await).unwrap();
        for item in page.items {
            assert!(seen.insert(item.key.clone()), "{} twice", item.key);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), n);
    let page: KeyPage =
        serde_json::from_value(get("/api/keys?state=in_flight&limit=500".into()).await).unwrap();
    assert_eq!(page.items.len(), n / 2);
    let detail = get(format!("/api/keys/{s}/ck-0")).await;
    assert_eq!(detail["response"]["body_preview"], "hi");
    assert_eq!(detail["replays"], 1);

    // Purge one, release one, then bulk purge the rest.
    let r: Value = http
        .delete(format!("{admin}/api/keys/{s}/ck-0"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"purged": true}));
    let r: Value = http
        .post(format!("{admin}/api/keys/{s}/ck-1/release"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"purged": true}));
    let dry: BulkPurgeOutcome = http
        .post(format!("{admin}/api/purge"))
        .bearer_auth(TOKEN)
        .json(&json!({"prefix": "ck-", "dry_run": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let BulkPurgeOutcome::DryRun {
        matched,
        in_flight,
        confirmation,
        ..
    } = dry
    else {
        panic!("{dry:?}")
    };
    // Half the records are in flight: a purge leaves those alone.
    assert_eq!((matched, in_flight), (n as u64 / 2 - 1, n as u64 / 2 - 1));
    let done: Value = http
        .post(format!("{admin}/api/purge"))
        .bearer_auth(TOKEN)
        .json(&json!({"prefix": "ck-", "dry_run": false, "confirmation": confirmation}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        done,
        json!({"mode": "purged", "purged": n / 2 - 1, "skipped_in_flight": n / 2 - 1})
    );

    // Events and stats went through the cluster too.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events: Vec<Event> =
            serde_json::from_value(get("/api/events/recent?limit=500".into()).await).unwrap();
        let purged = events
            .iter()
            .filter(|e| e.kind == idemgate_protocol::admin::EventKind::Purged)
            .count();
        let claimed = events
            .iter()
            .filter(|e| e.kind == idemgate_protocol::admin::EventKind::Claimed)
            .count();
        if purged == 2 && claimed == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events: purged {purged}, claimed {claimed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = get("/api/stats".into()).await;
    assert_eq!(stats["hour"]["totals"]["claims"], n + 1);
    assert_eq!(stats["hour"]["totals"]["replays"], 1);
    assert_eq!(stats["hour"]["totals"]["purges"], n / 2);
    let health = http
        .get(format!("{admin}/api/health"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(health["redis"], "up");

    assert!(server.stop().await < Duration::from_secs(5));
}

/// `--redis-wait-replicas` on a cluster: the script and WAIT go to each key's master as
/// one pipeline. This cluster has no replicas, so every claim is acknowledged by none: it
/// is undone on its own node (the key is free again) and answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_goes_to_each_keys_master_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let mut args = Server::args(&cluster.url());
    args.redis_cluster = true;
    args.redis_timeout_ms = 1000;
    args.failover.redis_wait_replicas = 1;
    args.failover.redis_wait_timeout_ms = 20;
    let waiting = Server::start_from(args).await;
    let plain = Server::start_with(&cluster.url(), true).await;
    let http = http();
    let s = scope("cluster-wait");
    let n = 12;
    for i in 0..n {
        let body = claim_body(&s, &format!("w-{i}"), &fp("w"), 60_000);
        let r = http
            .post(format!("{}/v1/claim", waiting.store))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{:?}", r.text().await);
    }
    let metrics = waiting.metrics().await;
    assert!(
        metrics.contains(&format!(
            "idemgate_redis_wait_shortfalls_total{{call=\"claim\"}} {n}"
        )),
        "{metrics}"
    );
    // Every refused claim was undone on its own node: the keys are free.
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..n {
        let body = claim_body(&s, &format!("w-{i}"), &fp("w"), 60_000);
        loop {
            let r: ClaimOutcome = http
                .post(format!("{}/v1/claim", plain.store))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if matches!(r, ClaimOutcome::Acquired { .. }) {
                break;
            }
            assert!(Instant::now() < deadline, "w-{i} still held: {r:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
