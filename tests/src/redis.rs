//! A minimal blocking RESP2 client, enough for tests to inspect and poke the store
//! (`KEYS`, `HGETALL`, `PTTL`, `FLUSHALL`, ...) without a Redis crate.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisValue {
    /// `+OK`-style simple string.
    Simple(String),
    /// `-ERR ...` error reply (returned as a value, not an `Err`).
    Error(String),
    /// `:N` integer.
    Int(i64),
    /// `$N` bulk string (`None` for the null bulk string).
    Bulk(Option<Vec<u8>>),
    /// `*N` array (`None` for the null array).
    Array(Option<Vec<RedisValue>>),
}

impl RedisValue {
    /// The value as text for simple and bulk strings.
    pub fn as_text(&self) -> Option<String> {
        match self {
            RedisValue::Simple(s) => Some(s.clone()),
            RedisValue::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The value as an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            RedisValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items of an array as text (non-text items are skipped).
    pub fn as_text_list(&self) -> Vec<String> {
        match self {
            RedisValue::Array(Some(items)) => {
                items.iter().filter_map(RedisValue::as_text).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Sends one command to `127.0.0.1:port` on a fresh connection and reads its reply.
///
/// # Errors
/// Connection or protocol failures (an error *reply* is `Ok(RedisValue::Error)`).
pub fn command(port: u16, args: &[&str]) -> Result<RedisValue> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to redis on port {port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    stream.write_all(&req).context("writing to redis")?;
    let mut reader = BufReader::new(stream);
    read_value(&mut reader)
}

fn read_line(r: &mut BufReader<TcpStream>) -> Result<String> {
    let mut line = String::new();
    r.read_line(&mut line).context("reading from redis")?;
    if !line.ends_with("\r\n") {
        bail!("redis closed the connection mid-reply");
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn read_value(r: &mut BufReader<TcpStream>) -> Result<RedisValue> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    let int = || {
        rest.parse::<i64>()
            .with_context(|| format!("bad RESP length/integer {rest:?}"))
    };
    Ok(match kind {
        "+" => RedisValue::Simple(rest.to_owned()),
        "-" => RedisValue::Error(rest.to_owned()),
        ":" => RedisValue::Int(int()?),
        "$" => match usize::try_from(int()?) {
            Err(_) => RedisValue::Bulk(None),
            Ok(n) => {
                let mut buf = vec![0; n + 2];
                r.read_exact(&mut buf)
                    .context("reading a redis bulk string")?;
                buf.truncate(n);
                RedisValue::Bulk(Some(buf))
            }
        },
        "*" => match usize::try_from(int()?) {
            Err(_) => RedisValue::Array(None),
            Ok(n) => {
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(read_value(r)?);
                }
                RedisValue::Array(Some(items))
            }
        },
        other => bail!("unexpected RESP type {other:?} in {line:?}"),
    })
}
