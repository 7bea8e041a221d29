//! Test access to the stack's Redis through redis-rs's blocking client: enough for tests
//! to inspect and poke the store (`KEYS`, `HGETALL`, `PTTL`, ...).

use std::time::Duration;

use anyhow::{Context as _, Result};

/// A reply, with text accessors for assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisValue(pub redis::Value);

impl RedisValue {
    /// The value as text for simple and bulk strings.
    pub fn as_text(&self) -> Option<String> {
        match &self.0 {
            redis::Value::SimpleString(_) | redis::Value::BulkString(_) => {
                redis::from_redis_value::<String>(self.0.clone()).ok()
            }
            _ => None,
        }
    }

    /// The value as an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self.0 {
            redis::Value::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The items of an array as text (non-text items are skipped).
    pub fn as_text_list(&self) -> Vec<String> {
        match &self.0 {
            redis::Value::Array(items) => items
                .iter()
                .filter_map(|v| RedisValue(v.clone()).as_text())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Sends one command to `127.0.0.1:port` on a fresh connection and returns its reply.
///
/// # Errors
/// Connection or protocol failures, and error replies.
pub fn command(port: u16, args: &[&str]) -> Result<RedisValue> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .with_context(|| format!("connecting to redis on port {port}"))?;
    let Some((name, rest)) = args.split_first() else {
        anyhow::bail!("an empty Redis command");
    };
    let mut cmd = redis::cmd(name);
    for a in rest {
        cmd.arg(*a);
    }
    let reply = cmd
        .query::<redis::Value>(&mut conn)
        .with_context(|| format!("redis {name}"))?;
    Ok(RedisValue(reply))
}

/// `redis-cli -p PORT ARGS...`'s standard output, `cli` being the `redis-cli` binary
/// (empty when it cannot run).
pub fn cli_output(cli: &std::path::Path, port: u16, args: &[&str]) -> String {
    std::process::Command::new(cli)
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
