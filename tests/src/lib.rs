//! The idemgate end-to-end harness.
//!
//! [`Stack::start`] runs a real `redis-server`, the real `idemgate-server`, the
//! [`upstream`] demo API and Envoy 1.40 with the idemgate wasm filter, each on a free port
//! of 127.0.0.1, waits until each is ready and gives tests blocking [`http::Client`]s for
//! them. Every component logs (stdout and stderr) to `<log_dir>/<component>.log`, by default
//! a fresh directory under `target/e2e/`. Dropping the stack kills every process it
//! started; when the test is panicking it first prints the last
//! [`stack::PANIC_LOG_LINES`] lines of each log, so prefer `expect`/`assert!` over
//! returning `Err` from tests that hold a stack.
//!
//! ```no_run
//! use idemgate_e2e::{Stack, StackOptions};
//! use serde_json::json;
//!
//! let stack = Stack::start(StackOptions::new("replay", json!({
//!     "store": {"cluster": "idemgate_store", "timeout_ms": 1000},
//!     "routes": [{"name": "payments", "match": {"prefix": "/v1/payments"}, "key": "required"}]
//! }))).expect("stack starts");
//! let gw = stack.gateway();
//! let first = gw.post("/v1/payments")
//!     .header("Idempotency-Key", "k-1")
//!     .json(&json!({"amount": 1000}))
//!     .send()
//!     .expect("first POST");
//! assert_eq!(first.status, 201);
//! assert_eq!(stack.executions("/v1/payments").expect("upstream answers"), 1);
//! ```
//!
//! Binaries come from `IDEMGATE_ENVOY_BIN`, `IDEMGATE_FILTER_WASM`, `IDEMGATE_SERVER_BIN`,
//! `IDEMGATE_UPSTREAM_BIN` and `IDEMGATE_REDIS_SERVER`, defaulting to what
//! `cargo xtask setup` and `cargo xtask build` produce (see [`bins::Binaries`]).

pub mod bins;
pub mod cluster;
pub mod envoy;
pub mod http;
pub mod oci;
pub mod process;
pub mod redis;
pub mod schema;
pub mod sentinel;
pub mod stack;
pub mod traffic;
pub mod upstream;

pub use bins::{workspace_root, Binaries};
pub use cluster::RedisCluster;
pub use envoy::EnvoyTemplate;
pub use http::{Client, Reply, RequestBuilder};
pub use redis::RedisValue;
pub use sentinel::ReplicatedRedis;
pub use stack::{
    demo_filter_config, free_port, wait_until, Component, FixedPorts, Stack, StackOptions,
    StackPorts,
};
pub use upstream::{Executions, ReceivedRequest};
