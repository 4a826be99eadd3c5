//! One connection to standalone Redis or a Redis Cluster (reconnecting by itself, except a
//! backplane's subscribed socket, which the backplane replaces), with a bound on the requests in
//! flight, a timeout on each, and driver errors mapped into [`CacheError`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, FromRedisValue, Pipeline,
    ProtocolVersion, PushInfo, RedisError, RedisFuture, ServerError, Value,
};
use tierstack_core::{CacheError, Result};

use crate::config::RedisConfig;
use crate::errors::map_error;
use crate::managed::ManagedSocket;
use crate::pushing::PushingSocket;
pub(crate) use crate::take_back::Sent;
use crate::take_back::{Pending, TakeBack};

#[derive(Clone)]
enum Link {
    Standalone(Arc<ManagedSocket>),
    /// A standalone backplane's subscribed RESP3 socket.
    Pushing(Arc<PushingSocket>),
    Cluster(ClusterConnection),
}

/// What one request goes on: the link's connection at the time of the call.
#[derive(Clone)]
enum Handle {
    Managed(ConnectionManager),
    Direct(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Link {
    /// The handle to send one request on, and for a standalone connection the number of the
    /// socket it goes on (see [`ManagedSocket`]).
    async fn handle(&self) -> (Handle, Option<u64>) {
        match self {
            Link::Standalone(socket) => {
                let (connection, number) = socket.current();
                (Handle::Managed(connection), Some(number))
            }
            Link::Pushing(socket) => (Handle::Direct(socket.live().await), None),
            Link::Cluster(c) => (Handle::Cluster(c.clone()), None),
        }
    }
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Managed(c) => c.req_packed_command(cmd),
            Handle::Direct(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Managed(c) => c.get_db(),
            Handle::Direct(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

/// A cheap-to-clone handle on one connection: standalone, one multiplexed socket that
/// reconnects by itself and is replaced when it goes silent ([`ManagedSocket`]), or a
/// backplane's subscribed socket that its owner replaces ([`reconnect`](Self::reconnect));
/// cluster, one socket per node.
#[derive(Clone)]
pub(crate) struct Connection {
    link: Link,
    /// The in-flight bound. (async-lock's semaphore: tokio's takes a lock on every release.)
    permits: Arc<async_lock::Semaphore>,
    /// The bound on writes being taken back (see [`TakeBack`]).
    take_backs: Arc<Pending>,
    response_timeout: Duration,
    /// How long a connect may take: the connect timeout plus one round trip to log in.
    connect_limit: Duration,
    endpoint: Arc<str>,
}

impl Connection {
    /// Connects, failing within the connect timeout when the server is unreachable.
    pub(crate) async fn connect(config: &RedisConfig) -> Result<Self> {
        let connecting = async {
            if config.cluster {
                let builder = ClusterClientBuilder::new(config.nodes.clone());
                #[cfg(feature = "tls")]
                let builder = match &config.root_certificate {
                    Some(pem) => builder.certs(redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    }),
                    None => builder,
                };
                let client = builder
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(config.response_timeout)
                    .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
                    .retries(2)
                    .build()?;
                Ok(Link::Cluster(client.get_async_connection().await?))
            } else {
                let client = client_for(first_node(config)?, config)?;
                // No response timeout in the driver: `guarded` times each call end to end.
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(None)
                    // A reconnect is two connect attempts, 0-50 ms apart: the calls that find
                    // the connection lost start the reconnects, and those that come meanwhile
                    // wait for it, so a server that is down sees a few attempts per 50 ms per
                    // connection rather than one per call, and a call fails within 50 ms (twice
                    // that if it is sent again, see `guarded`).
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(25));
                Ok(Link::Standalone(Arc::new(
                    ManagedSocket::connect(client, manager).await?,
                )))
            }
        };
        Self::connect_within_limit(config, connecting).await
    }

    /// Connects to a standalone server over RESP3 and subscribes to `channel`, handing every
    /// push (the channel's messages, subscription confirmations, and a `Disconnection` when the
    /// socket is lost) to `on_push`, on the task that reads the socket. It does not reconnect
    /// by itself: after a loss, requests wait (within the response timeout) for
    /// [`reconnect`](Self::reconnect).
    pub(crate) async fn connect_for_pushes(
        config: &RedisConfig,
        channel: &str,
        on_push: impl Fn(PushInfo) + Send + Sync + 'static,
    ) -> Result<Self> {
        let connecting = async {
            let info = first_node(config)?;
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let client = client_for(info.set_redis_settings(resp3), config)?;
            let socket = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(None);
            let socket = PushingSocket::connect(client, socket, channel, on_push).await?;
            Ok(Link::Pushing(Arc::new(socket)))
        };
        Self::connect_within_limit(config, connecting).await
    }

    /// Replaces the socket of a connection made by
    /// [`connect_for_pushes`](Self::connect_for_pushes) with a new, subscribed one; a no-op
    /// on other connections, which reconnect by themselves.
    pub(crate) async fn reconnect(&self) -> Result<()> {
        let Link::Pushing(socket) = &self.link else {
            return Ok(());
        };
        let limit = self.connect_limit;
        match tokio::time::timeout(limit, socket.reconnect()).await {
            Ok(result) => {
                result.map_err(|error| map_error("reconnect", &self.endpoint, limit, error))
            }
            Err(_) => Err(CacheError::Timeout {
                operation: "reconnect",
                after: limit,
            }),
        }
    }

    /// Gives up the socket of a connection made by
    /// [`connect_for_pushes`](Self::connect_for_pushes) as lost, although it reported nothing
    /// (its handler gets a `Disconnection`; requests wait for [`reconnect`](Self::reconnect)).
    /// A no-op on other connections.
    pub(crate) fn abandon(&self) {
        if let Link::Pushing(socket) = &self.link {
            socket.abandon();
        }
    }

    async fn connect_within_limit(
        config: &RedisConfig,
        connecting: impl Future<Output = redis::RedisResult<Link>>,
    ) -> Result<Self> {
        let endpoint: Arc<str> = config.endpoint().into();
        #[cfg(feature = "tls")]
        if config.uses_tls() || config.root_certificate.is_some() {
            install_crypto_provider();
        }
        // The driver retries a failed connect; the caller asked for an answer within the
        // connect timeout (plus a margin for the authentication round trip).
        let limit = config.connect_timeout + config.response_timeout;
        let link = match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(link)) => link,
            Ok(Err(error)) => return Err(map_error("connect", &endpoint, limit, error)),
            Err(_) => {
                return Err(CacheError::Connection {
                    endpoint: endpoint.to_string(),
                    source: format!("no connection within {limit:?}").into(),
                });
            }
        };
        Ok(Self {
            link,
            permits: Arc::new(async_lock::Semaphore::new(config.max_in_flight)),
            take_backs: Arc::new(Pending::new()),
            response_timeout: config.response_timeout,
            connect_limit: limit,
            endpoint,
        })
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs `request` on the link under the in-flight bound, failing it with a timeout once the
    /// response timeout has passed since the call: waiting for a free slot, for a reconnect and
    /// for the reply all count. One timer per call: the standalone driver arms none of its own.
    /// A standalone socket hears whether its request was answered (see [`ManagedSocket`]).
    async fn guarded<T, F, Fut>(&self, operation: &'static str, request: F) -> Result<T>
    where
        F: Fn(Handle) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let limit = self.response_timeout;
        let mut sent_on = None;
        let call = async {
            let _permit = if let Some(permit) = self.permits.try_acquire() {
                permit
            } else {
                // Waited for a slot: if the deadline passed meanwhile, give up rather than send
                // a request whose caller is already gone (the timer below may not have fired yet
                // when the slot frees up).
                let deadline = Instant::now() + limit;
                let permit = self.permits.acquire().await;
                if Instant::now() >= deadline {
                    return Err(CacheError::Timeout {
                        operation,
                        after: limit,
                    });
                }
                permit
            };
            let (handle, socket) = self.link.handle().await;
            sent_on = socket;
            let mut result = request(handle).await;
            // A standalone manager that failed to reconnect keeps that failure until a request
            // finds it: that request fails without being sent and starts a new attempt. Once the
            // server is back, the first call would fail for nothing (and a breaker's probe with
            // it, keeping the L2 away for one more open time), so a request that never left is
            // sent once more, on the attempt it started, within the same time limit. Only a
            // refusal: it comes from connecting (socket, TLS and handshake, before any request is
            // written), where an open socket that fails reports a reset or a broken pipe, and a
            // timeout may be a request that was sent.
            if matches!(self.link, Link::Standalone(_))
                && result
                    .as_ref()
                    .is_err_and(RedisError::is_connection_refusal)
            {
                let (handle, socket) = self.link.handle().await;
                sent_on = socket;
                result = request(handle).await;
            }
            result.map_err(|error| map_error(operation, &self.endpoint, limit, error))
        };
        let result = match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(CacheError::Timeout {
                operation,
                after: limit,
            }),
        };
        if let (Link::Standalone(socket), Some(number)) = (&self.link, sent_on) {
            if matches!(result, Err(CacheError::Timeout { .. })) {
                socket.unanswered(number, &self.endpoint, self.connect_limit);
            } else {
                socket.answered(number);
            }
        }
        result
    }

    /// A command's refusal, found among a pipeline's replies, as the error the command alone
    /// would have returned.
    pub(crate) fn refused(&self, operation: &'static str, refusal: ServerError) -> CacheError {
        map_error(
            operation,
            &self.endpoint,
            self.response_timeout,
            RedisError::from(refusal),
        )
    }

    /// One command.
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &Cmd,
    ) -> Result<T> {
        self.guarded(operation, |mut handle| async move {
            cmd.query_async(&mut handle).await
        })
        .await
    }

    /// A write (one command, or a pipeline whose commands all address one slot in a
    /// cluster), sent as [`query`](Self::query) sends any, that is taken back if it gets no
    /// reply (see [`TakeBack`]): a `SET` whose call times out must not land later over what
    /// was written since.
    pub(crate) async fn write<T: FromRedisValue>(
        &self,
        operation: &'static str,
        sent: Sent<'_>,
    ) -> Result<T> {
        self.guarded(operation, |mut handle| async move {
            let take_back =
                TakeBack::arm(handle.clone(), sent, &self.take_backs, self.is_cluster());
            let result = match sent {
                Sent::Command(cmd) => cmd.query_async(&mut handle).await,
                Sent::Pipeline(pipe) => pipe.query_async(&mut handle).await,
            };
            take_back.disarm_if_answered(&result);
            result
        })
        .await
    }

    /// One pipeline. In a cluster every command of it must address one slot.
    pub(crate) async fn pipeline<T: FromRedisValue>(
        &self,
        operation: &'static str,
        pipe: &Pipeline,
    ) -> Result<T> {
        self.guarded(operation, |mut handle| async move {
            pipe.query_async(&mut handle).await
        })
        .await
    }

    /// A script (EVALSHA, loading it on NOSCRIPT). In a cluster its keys must share a slot.
    pub(crate) async fn script<T: FromRedisValue>(
        &self,
        operation: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        self.guarded(operation, |mut handle| async move {
            invocation.invoke_async(&mut handle).await
        })
        .await
    }

    /// One command to one node of a cluster, by address.
    pub(crate) async fn query_node<T: FromRedisValue>(
        &self,
        operation: &'static str,
        node: &(String, u16),
        cmd: &Cmd,
    ) -> Result<T> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: node.0.clone(),
            port: node.1,
        });
        let value = self
            .guarded(operation, |handle| {
                let routing = routing.clone();
                async move {
                    match handle {
                        Handle::Cluster(mut c) => c.route_command(cmd.clone(), routing).await,
                        mut standalone => cmd.query_async(&mut standalone).await,
                    }
                }
            })
            .await?;
        T::from_redis_value(value)
            .map_err(|e| CacheError::backend(operation, false, RedisError::from(e)))
    }

    /// The primaries of the cluster (`host`, `port`), from `CLUSTER NODES`.
    pub(crate) async fn primaries(&self) -> Result<Vec<(String, u16)>> {
        let nodes: String = self
            .query("cluster nodes", redis::cmd("CLUSTER").arg("NODES"))
            .await?;
        let mut primaries = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                continue;
            }
            // host:port@cluster-bus-port[,hostname]
            let address = address.split('@').next().unwrap_or_default();
            if let Some((host, port)) = address.rsplit_once(':')
                && let Ok(port) = port.parse()
            {
                primaries.push((host.to_owned(), port));
            }
        }
        if primaries.is_empty() {
            return Err(CacheError::backend(
                "cluster nodes",
                true,
                "CLUSTER NODES listed no healthy primary",
            ));
        }
        Ok(primaries)
    }
}

/// A client for one node, trusting the configured root certificate if there is one.
/// A standalone configuration's server.
fn first_node(config: &RedisConfig) -> redis::RedisResult<ConnectionInfo> {
    config
        .nodes
        .first()
        .cloned()
        .ok_or_else(|| RedisError::from((ErrorKind::InvalidClientConfig, "no node configured")))
}

pub(crate) fn client_for(
    info: ConnectionInfo,
    config: &RedisConfig,
) -> redis::RedisResult<redis::Client> {
    #[cfg(feature = "tls")]
    {
        if config.uses_tls() || config.root_certificate.is_some() {
            install_crypto_provider();
        }
        if let Some(pem) = &config.root_certificate {
            return redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            );
        }
    }
    let _ = config;
    redis::Client::open(info)
}

/// rustls needs one process-wide crypto provider; tierstack uses aws-lc-rs. Installing fails
/// harmlessly when the application (or the Firestore stack) installed one already.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Groups item indexes by the slot of their key (one group on a standalone server), so that a
/// bulk operation sends one pipeline per slot, all at once.
pub(crate) fn by_slot<K: AsRef<[u8]>>(
    cluster: bool,
    keys: impl Iterator<Item = K>,
) -> Vec<Vec<usize>> {
    if !cluster {
        let all: Vec<usize> = keys.enumerate().map(|(i, _)| i).collect();
        return if all.is_empty() {
            Vec::new()
        } else {
            vec![all]
        };
    }
    let mut groups: std::collections::HashMap<Slot, Vec<usize>> = std::collections::HashMap::new();
    for (index, key) in keys.enumerate() {
        groups.entry(Slot::for_key(key)).or_default().push(index);
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_keys_form_one_group_and_cluster_keys_group_by_slot() {
        let keys = ["a", "b", "{a}x", "c"];
        assert_eq!(by_slot(false, keys.iter().copied()), vec![vec![0, 1, 2, 3]]);
        let groups = by_slot(true, keys.iter().copied());
        assert!(
            groups.contains(&vec![0, 2]),
            "{groups:?}: a hash tag shares its slot"
        );
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 4);
        assert!(by_slot(false, std::iter::empty::<&str>()).is_empty());
    }
}
