//! One Redis connection type for a single server (`redis://`, `rediss://`) and a Redis
//! Cluster, so the store scripts, the admin API, events and stats run unchanged on both.
//!
//! - Single server: a [`ConnectionManager`] (multiplexed, reconnects by itself).
//! - Cluster: a cluster-async connection made on first use (the server starts while the
//!   cluster is down) that follows slot moves and reconnects by itself.
//!
//! Commands that name one key are routed by the connection. Per-node work (SCAN, CONFIG,
//! keyspace notifications) goes through [`Backend::nodes`] and [`Conn::on_node`].

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, Pipeline, RedisFuture, Value};
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

impl Backend {
    /// A single-server backend over `client`, connecting lazily. `timeout` bounds connect
    /// and each response.
    ///
    /// # Errors
    /// A client configuration the connection manager refuses.
    pub fn single(client: redis::Client, timeout: Duration) -> redis::RedisResult<Self> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self::Single {
            conn,
            client: Box::new(client),
        })
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
            Self::Cluster { seed, .. } => {
                let addr = match seed.addr() {
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
                redis::Client::open((**seed).clone().set_addr(addr))
            }
        }
    }
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
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
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
