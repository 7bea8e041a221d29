//! Servers over real TCP sharing one Redis: SSE with resume, two instances, expirations
//! reported once, graceful shutdown with an SSE client connected, and the operator CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use idemgate_protocol::admin::{Event, StatsResponse};
use serde_json::{json, Value};

async fn claim(server: &Server, key: &str, fp_seed: &str, lock_ttl_ms: u64) -> Value {
    http()
        .post(format!("{}/v1/claim", server.store))
        .json(&claim_body(&scope("live"), key, &fp(fp_seed), lock_ttl_ms))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A minimal SSE reader over a streaming response.
struct SseClient {
    resp: reqwest::Response,
    buf: String,
}

#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: String,
    data: Event,
}

impl SseClient {
    async fn connect(server: &Server, query: &str, last_event_id: Option<&str>) -> Self {
        let mut req = http()
            .get(format!("{}/api/events?{query}", server.admin))
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event within `wait`, or `None`. `Err` when the stream ended.
    async fn next(&mut self, wait: Duration) -> Result<Option<SseEvent>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    let data: Event = serde_json::from_str(&data).unwrap();
                    return Ok(Some(SseEvent { event, id, data }));
                }
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) => return Err(()),
            }
        }
    }

    async fn expect(&mut self) -> SseEvent {
        self.next(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("an event within 5 s")
    }
}

#[tokio::test]
async fn sse_across_instances_resumes_without_gaps_and_stats_agree() {
    let redis = RedisServer::start();
    let a = Server::start(&redis.url()).await;
    let b = Server::start(&redis.url()).await;

    // Token in the query (EventSource) works for /api/events; a wrong one does not.
    let r = http()
        .get(format!(
            "{}/api/events?access_token=nope-nope-nope-nope",
            b.admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut sse = SseClient::connect(&b, &format!("access_token={TOKEN}"), None).await;
    // A decision on A is seen on B's stream.
    assert_eq!(claim(&a, "k1", "1", 60_000).await["outcome"], "acquired");
    let first = sse.expect().await;
    assert_eq!(first.event, "claimed");
    assert_eq!(first.data.key.as_deref(), Some("k1"));
    assert_eq!(first.id, first.data.id);
    drop(sse);

    // While disconnected: three more events (through both instances).
    assert_eq!(claim(&a, "k1", "1", 60_000).await["outcome"], "in_flight");
    assert_eq!(
        claim(&b, "k1", "other", 60_000).await["outcome"],
        "mismatch"
    );
    assert_eq!(claim(&b, "k2", "2", 60_000).await["outcome"], "acquired");
    // Resume on A with Last-Event-ID: exactly the missed ones, in order, then live ones.
    let mut sse = SseClient::connect(&a, &format!("access_token={TOKEN}"), Some(&first.id)).await;
    let missed: Vec<String> = vec![sse.expect().await, sse.expect().await, sse.expect().await]
        .into_iter()
        .map(|e| format!("{}:{}", e.event, e.data.key.unwrap_or_default()))
        .collect();
    assert_eq!(
        missed,
        ["in_flight_conflict:k1", "mismatch:k1", "claimed:k2"]
    );
    assert!(
        sse.next(Duration::from_millis(500))
            .await
            .unwrap()
            .is_none(),
        "no repeats"
    );
    assert_eq!(claim(&b, "k3", "3", 60_000).await["outcome"], "acquired");
    let live = sse.expect().await;
    assert_eq!(
        (live.event.as_str(), live.data.key.as_deref()),
        ("claimed", Some("k3"))
    );

    // The query form of the id and the kind filter.
    let mut only = SseClient::connect(
        &b,
        &format!(
            "access_token={TOKEN}&last_event_id={}&kind=mismatch",
            first.id
        ),
        None,
    )
    .await;
    let e = only.expect().await;
    assert_eq!(e.event, "mismatch");
    assert!(only
        .next(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());

    // Stats: the same numbers from both instances.
    let stats = |s: &Server| {
        let url = format!("{}/api/stats", s.admin);
        async move {
            let v: StatsResponse = http()
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        }
    };
    let (sa, sb) = (stats(&a).await, stats(&b).await);
    assert_eq!(sa.hour.totals, sb.hour.totals);
    assert_eq!(sa.hour.totals.claims, 5);
    assert_eq!(sa.hour.totals.executions, 3);
    assert_eq!(sa.in_flight_now, Some(3));
}

#[tokio::test]
async fn an_expiration_is_reported_once_by_two_instances() {
    let redis = RedisServer::start();
    let a = Server::start(&redis.url()).await;
    let b = Server::start(&redis.url()).await;
    // Both subscribe to keyspace notifications (enabled by the servers with CONFIG SET).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut conn = redis.conn();
        let flags: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query(&mut conn)
            .unwrap();
        let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
        let subs = clients.lines().filter(|l| l.contains(" psub=1 ")).count();
        if flags[1].contains('E') && flags[1].contains('x') && subs >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "notifications not set up: {flags:?} {subs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sse = SseClient::connect(&a, &format!("access_token={TOKEN}&kind=expired"), None).await;
    assert_eq!(claim(&b, "short", "s", 200).await["outcome"], "acquired");
    let e = sse.expect().await;
    assert_eq!(e.event, "expired");
    assert_eq!(e.data.key.as_deref(), Some("short"));
    assert!(
        sse.next(Duration::from_millis(1500))
            .await
            .unwrap()
            .is_none(),
        "reported twice"
    );
    let r: Vec<Event> = http()
        .get(format!("{}/api/events/recent?kind=expired", b.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r.len(), 1, "{r:?}");
}

#[tokio::test]
async fn graceful_shutdown_ends_sse_streams() {
    let redis = RedisServer::start();
    let mut a = Server::start(&redis.url()).await;
    let mut sse = SseClient::connect(&a, &format!("access_token={TOKEN}"), None).await;
    assert!(sse
        .next(Duration::from_millis(200))
        .await
        .unwrap()
        .is_none());
    let took = a.stop().await;
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    // The stream ended instead of hanging.
    let ended = sse.next(Duration::from_secs(2)).await;
    assert!(ended.is_err(), "{ended:?}");
}

fn cli(admin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate-server"))
        .args(args)
        .env("IDEMGATE_ADMIN_URL", admin)
        .env("IDEMGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_shows_purges_and_reports_stats() {
    let redis = RedisServer::start();
    let a = Server::start(&redis.url()).await;
    for i in 0..3 {
        assert_eq!(
            claim(&a, &format!("cli-{i}"), "c", 60_000).await["outcome"],
            "acquired"
        );
    }
    let s = scope("live");
    let admin = a.admin.clone();
    let run = move |args: Vec<String>| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&admin, &refs)
        })
    };
    let v = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    let (code, out, err) = run(v(&["keys", "list"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    for i in 0..3 {
        assert!(out.contains(&format!("cli-{i}")), "{out}");
    }
    assert!(out.contains("in_flight"), "{out}");
    let (code, out, err) = run(v(&["keys", "list", "--json", "--prefix", "cli-1"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let items: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(items.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(items[0]["key"], "cli-1");

    let (code, out, err) = run(v(&["keys", "show", &s, "cli-0"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("fingerprint") && out.contains(&fp("c")),
        "{out}"
    );
    let (code, _, err) = run(v(&["keys", "show", &s, "absent"])).await.unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains("not-found") || err.contains("no record"),
        "{err}"
    );

    let (code, out, err) = run(v(&["keys", "release", &s, "cli-0", "--json"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"purged": true})
    );
    // An in-flight key is not purged (its request may still run): release is the tool.
    let (code, _, err) = run(v(&["keys", "purge", &s, "cli-1"])).await.unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains("in-flight") || err.contains("in flight"),
        "{err}"
    );

    // Bulk purge: a dry run without --yes deletes nothing; in-flight keys are left alone.
    let (code, out, err) = run(v(&["purge", "--prefix", "cli-"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 record(s) match (2 in flight"), "{out}");
    let (code, out, err) = run(v(&["purge", "--prefix", "cli-", "--yes"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("purged 0") && out.contains("2 in flight left alone"),
        "{out}"
    );

    let (code, out, err) = run(v(&["stats"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("claims") && out.contains("replay rate"),
        "{out}"
    );
    let (code, out, _) = run(v(&["stats", "--json"])).await.unwrap();
    assert_eq!(code, 0);
    let stats: StatsResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(stats.hour.totals.claims, 3);

    // A wrong token is refused with the problem's detail and exit code 1.
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate-server"))
        .args(["stats", "--server", &a.admin])
        .env("IDEMGATE_ADMIN_TOKEN", "wrong-token-wrong-token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}
