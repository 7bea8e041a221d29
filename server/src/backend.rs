//! One Redis connection type for a single server (`redis://`, `rediss://`), a master found
//! through Redis Sentinel, and a Redis Cluster, so the store scripts, the admin API, events
//! and stats run unchanged on all three.
//!
//! - Single server: a [`ConnectionManager`] (multiplexed, reconnects by itself).
//! - Sentinel: a [`ConnectionManager`] to the master the Sentinels name, asked for on
//!   first use and again after a connection error, a timeout or a `READONLY` answer (the
//!   old master came back as a replica), so a failover is followed without a restart.
//! - Cluster: a cluster-async connection made on first use (the server starts while the
//!   cluster is down) that follows slot moves and reconnects by itself.
//!
//! Commands that name one key are routed by the connection. Per-node work (SCAN, CONFIG,
//! keyspace notifications) goes through [`Backend::nodes`] and [`Conn::on_node`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue, Pipeline, RedisFuture,
    ServerErrorKind, Value,
};
use tokio::sync::OnceCell;

/// How the server reaches Redis. Cheap to clone.
#[derive(Clone)]
pub enum Backend {
    /// One Redis server (plain or TLS).
    Single {
        /// The self-reconnecting multiplexed connection.
        conn: ConnectionManager,
        /// The client, for pub/sub connections.
        client: Box<redis::Client>,
    },
    /// The master named by Redis Sentinel.
    Sentinel(Arc<SentinelBackend>),
    /// A Redis Cluster.
    Cluster {
        /// The cluster client (seed nodes, TLS, credentials, timeouts).
        client: Box<ClusterClient>,
        /// Connection info of the first seed node: the template for per-node clients.
        seed: Box<ConnectionInfo>,
        /// The connection, made on first use.
        conn: Arc<OnceCell<ClusterConnection>>,
    },
}

/// A live connection: clone it freely (multiplexed).
#[derive(Clone)]
pub enum Conn {
    /// Single server.
    Single(ConnectionManager),
    /// The master named by Sentinel; its errors make the backend ask Sentinel again.
    Sentinel(SentinelConn),
    /// Cluster.
    Cluster(ClusterConnection),
}

/// A node of the deployment: `host:port` of a master (the single server for `Single`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    /// Host name or address as the cluster announces it.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The master Sentinel named last, and how to ask again.
pub struct SentinelBackend {
    /// The Sentinels, asked one at a time (the lock also makes concurrent callers after a
    /// failure wait for one answer instead of each asking).
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The monitored master's name.
    master: String,
    /// Credentials, TLS and database of the master (from `--redis-url`): the template for
    /// node clients.
    template: ConnectionInfo,
    /// Settings of each master's connection manager.
    config: ConnectionManagerConfig,
    /// The current master; `None` until first use and after a failure.
    current: Mutex<Option<SentinelMaster>>,
}

#[derive(Clone)]
struct SentinelMaster {
    node: Node,
    client: redis::Client,
    conn: ConnectionManager,
    /// Counts resolutions, so an error on an old master's connection does not drop a newer
    /// one.
    generation: u64,
}

/// A connection to the master Sentinel named; see [`Conn::Sentinel`].
#[derive(Clone)]
pub struct SentinelConn {
    conn: ConnectionManager,
    backend: Arc<SentinelBackend>,
    generation: u64,
}

impl SentinelBackend {
    fn current(&self) -> Option<SentinelMaster> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Forgets the master of `generation` (any master with `None`) so the next
    /// [`Backend::conn`] asks the Sentinels again.
    fn forget(&self, generation: Option<u64>, why: &dyn std::fmt::Display) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if let Some(m) = current.as_ref() {
            if generation.is_none_or(|g| g == m.generation) {
                tracing::warn!(master = %m.node, reason = %why, "Redis master failed; asking Sentinel for the master again");
                *current = None;
            }
        }
    }

    async fn resolve(self: &Arc<Self>) -> redis::RedisResult<SentinelMaster> {
        let mut sentinel = self.sentinel.lock().await;
        // Another caller may have asked while this one waited for the lock.
        if let Some(m) = self.current() {
            return Ok(m);
        }
        let client = sentinel.async_get_client().await?;
        let node = node_of(client.get_connection_info());
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())?;
        let mut current = self.current.lock().map_err(|_| {
            redis::RedisError::from((ErrorKind::Client, "sentinel state lock poisoned"))
        })?;
        let generation = current.as_ref().map_or(0, |m| m.generation) + 1;
        let master = SentinelMaster {
            node,
            client,
            conn,
            generation,
        };
        tracing::info!(master = %master.node, name = %self.master, "Redis master (from Sentinel)");
        *current = Some(master.clone());
        Ok(master)
    }
}

/// Whether `err` means the master may have changed: the connection failed, timed out,
/// or the node answers `READONLY` (a demoted master).
fn is_failover_error(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_millis(500))
}

impl Backend {
    /// A single-server backend over `client`, connecting lazily. `timeout` bounds connect
    /// and each response.
    ///
    /// # Errors
    /// A client configuration the connection manager refuses.
    pub fn single(client: redis::Client, timeout: Duration) -> redis::RedisResult<Self> {
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config(timeout))?;
        Ok(Self::Single {
            conn,
            client: Box::new(client),
        })
    }

    /// A backend on the master that the Sentinels at `sentinels` (Redis URLs) name
    /// `master`, connecting lazily; `template` gives the master's credentials, TLS mode and
    /// database. `timeout` bounds connect and each response.
    ///
    /// # Errors
    /// A Sentinel URL that does not parse, or no URL.
    pub fn sentinel(
        sentinels: &[String],
        master: &str,
        template: &redis::Client,
        timeout: Duration,
    ) -> redis::RedisResult<Self> {
        let template = template.get_connection_info().clone();
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(template.redis_settings().clone());
        if let ConnectionAddr::TcpTls { insecure, .. } = template.addr() {
            node = node.set_tls_mode(if *insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            });
        }
        let urls: Vec<&str> = sentinels.iter().map(String::as_str).collect();
        let client = SentinelClient::build(urls, master, Some(node), SentinelServerType::Master)?;
        Ok(Self::Sentinel(Arc::new(SentinelBackend {
            sentinel: tokio::sync::Mutex::new(client),
            master: master.to_owned(),
            template,
            config: manager_config(timeout),
            current: Mutex::new(None),
        })))
    }

    /// Tells the backend that a call timed out: under Sentinel the master may be gone
    /// without a connection error (a network partition), so the next call asks again.
    pub fn call_timed_out(&self) {
        if let Self::Sentinel(s) = self {
            s.forget(None, &"a call timed out");
        }
    }

    /// A cluster backend over seed node URLs (`redis://` or `rediss://`), connecting
    /// lazily. `timeout` bounds connect and each response.
    ///
    /// # Errors
    /// A URL that does not parse, or no URL.
    pub fn cluster(seeds: &[String], timeout: Duration) -> redis::RedisResult<Self> {
        let infos = seeds
            .iter()
            .map(|s| redis::IntoConnectionInfo::into_connection_info(s.as_str()))
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let seed = infos.first().cloned().ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "a Redis Cluster needs at least one seed node URL",
            ))
        })?;
        let client = ClusterClient::builder(infos)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .build()?;
        Ok(Self::Cluster {
            client: Box::new(client),
            seed: Box::new(seed),
            conn: Arc::new(OnceCell::new()),
        })
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// A connection (connecting the cluster on first use).
    ///
    /// # Errors
    /// The cluster cannot be reached (the next call tries again).
    pub async fn conn(&self) -> redis::RedisResult<Conn> {
        match self {
            Self::Single { conn, .. } => Ok(Conn::Single(conn.clone())),
            Self::Sentinel(s) => {
                let m = match s.current() {
                    Some(m) => m,
                    None => s.resolve().await?,
                };
                Ok(Conn::Sentinel(SentinelConn {
                    conn: m.conn,
                    backend: s.clone(),
                    generation: m.generation,
                }))
            }
            Self::Cluster { client, conn, .. } => {
                let c = conn
                    .get_or_try_init(|| async { client.get_async_connection().await })
                    .await?;
                Ok(Conn::Cluster(c.clone()))
            }
        }
    }

    /// The masters to visit for per-node work, sorted (one entry for a single server).
    ///
    /// # Errors
    /// Redis errors (cluster: `CLUSTER SHARDS` failed).
    pub async fn nodes(&self) -> redis::RedisResult<Vec<Node>> {
        match self {
            Self::Single { client, .. } => Ok(vec![node_of(client.get_connection_info())]),
            Self::Sentinel(s) => {
                let m = match s.current() {
                    Some(m) => m,
                    None => s.resolve().await?,
                };
                Ok(vec![m.node])
            }
            Self::Cluster { .. } => {
                let mut conn = self.conn().await?;
                let nodes: String = conn.query(redis::cmd("CLUSTER").arg("NODES")).await?;
                let mut masters = parse_cluster_nodes(&nodes);
                masters.sort();
                Ok(masters)
            }
        }
    }

    /// A plain client for one node (pub/sub on that node), with the seed's TLS settings and
    /// credentials.
    ///
    /// # Errors
    /// The client cannot be built.
    pub fn node_client(&self, node: &Node) -> redis::RedisResult<redis::Client> {
        match self {
            Self::Single { client, .. } => Ok((**client).clone()),
            Self::Sentinel(s) => match s.current() {
                Some(m) if m.node == *node => Ok(m.client),
                _ => client_for(&s.template, node),
            },
            Self::Cluster { seed, .. } => client_for(seed, node),
        }
    }
}

/// A client for `node` with `template`'s TLS settings and credentials.
fn client_for(template: &ConnectionInfo, node: &Node) -> redis::RedisResult<redis::Client> {
    let addr = match template.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(node.host.clone(), node.port),
    };
    redis::Client::open(template.clone().set_addr(addr))
}

fn node_of(info: &ConnectionInfo) -> Node {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => Node {
            host: host.clone(),
            port: *port,
        },
        ConnectionAddr::Unix(path) => Node {
            host: path.display().to_string(),
            port: 0,
        },
        #[allow(unreachable_patterns)]
        _ => Node {
            host: "unknown".into(),
            port: 0,
        },
    }
}

/// Masters from `CLUSTER NODES` output (`<id> <ip:port@cport[,hostname]> <flags> ...`),
/// skipping failed ones.
fn parse_cluster_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let _id = parts.next()?;
            let addr = parts.next()?;
            let flags = parts.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.contains(&"fail") || flags.contains(&"noaddr") {
                return None;
            }
            let hostport = addr.split('@').next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some(Node {
                host: host.to_owned(),
                port: port.parse().ok()?,
            })
        })
        .collect()
}

impl Conn {
    /// Runs one command (routed by its key on a cluster).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> redis::RedisResult<T> {
        cmd.query_async(self).await
    }

    /// Runs a pipeline. On a cluster all its keys must share one slot (use a hash tag).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn pipe<T: FromRedisValue>(&mut self, pipe: &Pipeline) -> redis::RedisResult<T> {
        pipe.query_async(self).await
    }

    /// Runs `cmd` on one node (SCAN, CONFIG, DBSIZE...); on a single server, on the server.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn on_node<T: FromRedisValue>(
        &mut self,
        node: &Node,
        cmd: Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Self::Single(c) => cmd.query_async(c).await,
            Self::Sentinel(c) => cmd.query_async(c).await,
            Self::Cluster(c) => {
                let value = c
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: node.host.clone(),
                            port: node.port,
                        }),
                    )
                    .await?;
                T::from_redis_value(value).map_err(Into::into)
            }
        }
    }

    /// Runs `invocation` (a script on the one key `key`) followed by `WAIT replicas
    /// timeout_ms`, pipelined on one connection (on a cluster, the key's master), and
    /// returns the script's answer and the number of replicas that acknowledged.
    ///
    /// The two go together because WAIT waits for the replication offset of the last write
    /// *of the connection it is sent on*: sent on a connection reconnected in between, it
    /// would count replicas for nothing and acknowledge a write it never saw. On a
    /// multiplexed connection the offset is that of the latest write of any caller sharing
    /// it, at or after this script's, so the answer errs on the safe side. While WAIT
    /// blocks, Redis reads nothing else from that connection (up to `timeout_ms`).
    /// A `NOSCRIPT` answer loads the script and runs the pair once more (a pipeline does
    /// not do that by itself, unlike [`redis::ScriptInvocation::invoke_async`]).
    ///
    /// # Errors
    /// Redis errors (the script's own error included).
    pub async fn eval_then_wait(
        &mut self,
        invocation: &redis::ScriptInvocation<'_>,
        key: &str,
        replicas: u32,
        timeout_ms: u64,
    ) -> redis::RedisResult<(Value, i64)> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation)
            .cmd("WAIT")
            .arg(replicas)
            .arg(timeout_ms);
        let values = match self.pipeline_on_key(&pipe, key).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                invocation.load_async(self).await?;
                self.pipeline_on_key(&pipe, key).await?
            }
            other => other?,
        };
        let mut values = values.into_iter();
        match (values.next(), values.next()) {
            (Some(answer), Some(Value::Int(acked))) => Ok((answer, acked)),
            (answer, acked) => Err(redis::RedisError::from((
                ErrorKind::Client,
                "unexpected answer to a script and WAIT",
                format!("{answer:?} {acked:?}"),
            ))),
        }
    }

    /// Sends `pipe` on this connection; on a cluster, to the master of `key`'s slot.
    async fn pipeline_on_key(
        &mut self,
        pipe: &Pipeline,
        key: &str,
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            Self::Cluster(c) => c
                .route_pipeline(
                    pipe.clone(),
                    0,
                    pipe.len(),
                    SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master)),
                )
                .await?
                .into_iter()
                .map(|v| match v {
                    Value::ServerError(_) => v.extract_error(),
                    other => Ok(other),
                })
                .collect(),
            _ => pipe.query_async(self).await,
        }
    }

    /// Runs independent single-key commands concurrently (multiplexed; on a cluster each
    /// goes to its own slot's node). One result per command, in order.
    pub async fn many<T: FromRedisValue>(&self, cmds: Vec<Cmd>) -> Vec<redis::RedisResult<T>> {
        let futures = cmds.into_iter().map(|cmd| {
            let mut conn = self.clone();
            async move { cmd.query_async::<T>(&mut conn).await }
        });
        futures_util::future::join_all(futures).await
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Sentinel(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.conn.req_packed_command(cmd).await;
            if let Err(err) = &result {
                if is_failover_error(err) {
                    self.backend.forget(Some(self.generation), err);
                }
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(err) = &result {
                if is_failover_error(err) {
                    self.backend.forget(Some(self.generation), err);
                }
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lists_live_masters() {
        let text = "a 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
                    b 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922\n\
                    c 127.0.0.1:7003@17003,host master,fail - 0 0 3 connected\n\
                    d 127.0.0.1:7004@17004 slave a 0 0 1 connected\n";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(
            nodes,
            vec![
                Node {
                    host: "127.0.0.1".into(),
                    port: 7001
                },
                Node {
                    host: "127.0.0.1".into(),
                    port: 7002
                },
            ]
        );
    }
}
