//! How the filter reads the store's answers: the input is a list of store replies, each
//! a status line and a body, separated by a line `===`:
//!
//! ```text
//! 200
//! {"outcome":"acquired","fencing_token":"00000000000000000000000000000001"}
//! ===
//! 200
//! {"outcome":"completed"}
//! ```
//!
//! A status line that is not a number is a failed callout (Envoy's zero headers). One
//! request on each route of `envoy/demo-filter.json` (forwarded `orders`, detached
//! `payments`) is driven through claim, response, complete/release and their retries,
//! every store call answered with the next reply (then with failures). Nothing may panic,
//! and every local reply must carry an HTTP status Envoy can send.
#![no_main]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use idemgate_filter::config::Config;
use idemgate_filter::exchange::Exchange;
use idemgate_filter::host::{Host, Level, Metric, StoreCall, StoreReply, UpstreamCall};
use libfuzzer_sys::fuzz_target;

const CONFIG: &[u8] = include_bytes!("../../envoy/demo-filter.json");

#[derive(Default)]
struct FuzzHost {
    request_headers: Vec<(String, String)>,
    request_body: Vec<u8>,
    response_headers: RefCell<Vec<(String, String)>>,
    response_chunk: RefCell<Vec<u8>>,
    next_token: RefCell<u32>,
    now_ms: RefCell<u64>,
    /// Store and upstream calls not answered yet: token, whether it is an upstream call.
    pending: RefCell<VecDeque<(u32, bool)>>,
    resumed: RefCell<bool>,
    local: RefCell<Option<(u16, Vec<u8>)>>,
}

impl FuzzHost {
    fn token(&self) -> u32 {
        let mut t = self.next_token.borrow_mut();
        *t += 1;
        *t
    }
}

impl Host for FuzzHost {
    fn request_headers(&self) -> Vec<(String, String)> {
        self.request_headers.clone()
    }
    fn request_header(&self, name: &str) -> Option<String> {
        self.request_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
    fn request_body(&self, max_bytes: usize) -> Vec<u8> {
        self.request_body.iter().take(max_bytes).copied().collect()
    }
    fn response_headers(&self) -> Vec<(String, String)> {
        self.response_headers.borrow().clone()
    }
    fn set_response_headers(&self, headers: &[(String, String)]) {
        *self.response_headers.borrow_mut() = headers.to_vec();
    }
    fn response_body(&self, max_bytes: usize) -> Vec<u8> {
        self.response_chunk
            .borrow()
            .iter()
            .take(max_bytes)
            .copied()
            .collect()
    }
    fn property(&self, _path: &[String]) -> Option<Vec<u8>> {
        None
    }
    fn dispatch(&self, _call: &StoreCall) -> Result<u32, String> {
        let t = self.token();
        self.pending.borrow_mut().push_back((t, false));
        Ok(t)
    }
    fn resume_request(&self) {
        *self.resumed.borrow_mut() = true;
    }
    fn resume_response(&self) {}
    fn local_reply(&self, status: u16, _headers: &[(String, String)], body: &[u8]) {
        assert!(
            (100..=599).contains(&status),
            "local reply with status {status}"
        );
        *self.local.borrow_mut() = Some((status, body.to_vec()));
    }
    fn dispatch_upstream(&self, _call: UpstreamCall) -> Result<u32, String> {
        let t = self.token();
        self.pending.borrow_mut().push_back((t, true));
        Ok(t)
    }
    fn new_fencing_token(&self) -> String {
        format!("{:032x}", *self.next_token.borrow())
    }
    fn now_ms(&self) -> u64 {
        *self.now_ms.borrow()
    }
    fn count(&self, _metric: Metric, _delta: i64) {}
    fn log(&self, _level: Level, _message: &str) {}
}

fn replies(data: &[u8]) -> VecDeque<StoreReply> {
    let text = String::from_utf8_lossy(data);
    text.split("\n===\n")
        .take(16)
        .map(|part| {
            let (line, body) = part.split_once('\n').unwrap_or((part, ""));
            let status = line.trim().parse::<u16>().ok();
            StoreReply {
                status,
                headers: status
                    .map(|s| vec![(":status".to_owned(), s.to_string())])
                    .unwrap_or_default(),
                body: body.as_bytes().to_vec(),
            }
        })
        .collect()
}

/// What the upstream answers, as Envoy delivers a detached call's response.
fn upstream_reply() -> StoreReply {
    StoreReply {
        status: Some(201),
        headers: vec![
            (":status".to_owned(), "201".to_owned()),
            ("content-type".to_owned(), "application/json".to_owned()),
        ],
        body: br#"{"id":1}"#.to_vec(),
    }
}

/// Plays the response (upstream or local) through the response callbacks.
fn respond(x: &mut Exchange, host: &FuzzHost, status: u16, body: Vec<u8>) {
    *host.response_headers.borrow_mut() = vec![
        (":status".to_owned(), status.to_string()),
        ("content-length".to_owned(), body.len().to_string()),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    let len = body.len();
    *host.response_chunk.borrow_mut() = body;
    x.on_response_headers(host, false);
    x.on_response_body(host, len, true);
    x.on_response_trailers(host);
}

fn drive(config: &Rc<Config>, path: &str, mut answers: VecDeque<StoreReply>) {
    let body = br#"{"amount": 10, "currency": "EUR"}"#.to_vec();
    let host = FuzzHost {
        request_headers: vec![
            (":method".to_owned(), "POST".to_owned()),
            (":path".to_owned(), path.to_owned()),
            (":authority".to_owned(), "api".to_owned()),
            ("authorization".to_owned(), "Bearer tenant-a".to_owned()),
            ("idempotency-key".to_owned(), "\"k-1\"".to_owned()),
            ("content-type".to_owned(), "application/json".to_owned()),
        ],
        request_body: body.clone(),
        now_ms: RefCell::new(1_800_000_000_000),
        ..FuzzHost::default()
    };
    let mut x = Exchange::new(Some(config.clone()));
    x.on_request_headers(&host, false);
    x.on_request_body(&host, body.len(), true);
    let mut responded = false;
    for _ in 0..32 {
        if x.take_root_turn_request() {
            x.on_root_turn(&host);
        }
        if let Some((status, body)) = host.local.borrow_mut().take() {
            respond(&mut x, &host, status, body);
            responded = true;
        }
        if *host.resumed.borrow() && !responded {
            respond(&mut x, &host, 201, br#"{"id":1}"#.to_vec());
            responded = true;
        }
        let next = host.pending.borrow_mut().pop_front();
        match next {
            Some((token, true)) => x.on_store_reply(&host, token, upstream_reply()),
            Some((token, false)) => {
                let reply = answers.pop_front().unwrap_or_default();
                x.on_store_reply(&host, token, reply);
            }
            None => {
                if !x.is_active() {
                    break;
                }
                *host.now_ms.borrow_mut() += 2_000;
                let _ = x.take_timer_request();
                x.on_tick(&host);
            }
        }
    }
    x.on_done(&host);
}

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::from_json(CONFIG) else {
        return;
    };
    let config = Rc::new(config);
    let answers = replies(data);
    drive(&config, "/v1/orders", answers.clone());
    drive(&config, "/v1/payments", answers);
});
