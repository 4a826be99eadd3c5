//! `RedisBackplane`: invalidations over Redis pub/sub.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use redis::{PushInfo, PushKind, Value, cmd};
use tierstack_core::backplane::{Backplane, BackplaneHub, Invalidation, Subscription};
use tierstack_core::{CacheError, Result};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

use crate::config::{RedisConfig, endpoint_of};
use crate::connection::{Connection, client_for};
use crate::errors::map_error;

/// The first pause between two attempts to resubscribe, doubled after each failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause before jitter (which adds up to as much again): short, because a deaf
/// cache reads every value from L2.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// The pauses between attempts to resubscribe: from 50 ms, doubling, at most 250 ms plus a
/// random jitter of up to as much again (instances that lost the server together do not all
/// come back at the same instant), for as long as it takes.
fn resubscribe_pauses() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A [`Backplane`] on Redis pub/sub (standalone or cluster: a cluster forwards `PUBLISH` to
/// every node).
///
/// On a standalone server it listens, by default, on the connection it publishes on (RESP3,
/// Redis 6 or later; see [`RedisConfig::resp3_backplane`]). A cluster, or
/// `resp3_backplane(false)`, listens on a dedicated pub/sub connection instead.
///
/// Connected on its own, it publishes what the composer asks it to, after each write: two
/// round trips per write. Connected with its store
/// ([`RedisStore::connect_with_backplane`](crate::RedisStore::connect_with_backplane)), the
/// store announces each key write in the write's own pipeline: one round trip.
///
/// Pub/sub delivers at most once: a subscriber that is disconnected misses what is published
/// meanwhile. So when the subscription is lost every subscriber receives
/// [`Lost`](tierstack_core::BackplaneEvent::Lost) (a cache serves nothing from L1 as fresh and
/// fills it no more),
/// and once it is re-established [`Resync`](tierstack_core::BackplaneEvent::Resync) (it clears
/// L1 again and fills it again). The backplane resubscribes by itself, with a backoff of up to
/// 500 ms (jitter included).
pub struct RedisBackplane {
    hub: BackplaneHub,
    publisher: Connection,
    /// Set when `publisher` is also the subscribed connection: whether it is listening.
    hearing: Option<Arc<Hearing>>,
    channel: String,
    /// Whether the store this backplane was connected with announces its own writes (see
    /// [`RedisStore::connect_with_backplane`](crate::RedisStore::connect_with_backplane)).
    store_publishes: bool,
    /// A plain connection to publish on while `publisher`, which is also the subscribed
    /// connection, is down: connected on first need.
    fallback: tokio::sync::OnceCell<Connection>,
    config: RedisConfig,
    /// The task that keeps the subscription alive.
    listener: AbortHandle,
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("endpoint", &self.publisher.endpoint())
            .field("channel", &self.channel)
            .field("listens_on_publisher", &self.hearing.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl RedisBackplane {
    /// Connects the publisher and subscribes; returns once the subscription is active, so that
    /// nothing published afterwards is missed. Needs a Tokio runtime. A configuration that
    /// [`RedisConfig::validate`] refuses fails before any connection is tried.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        config.validate()?;
        if config.cluster || !config.resp3_backplane {
            Self::connect_dedicated(config).await
        } else {
            Self::connect_on_publisher(config).await
        }
    }

    /// One RESP3 connection publishes and listens; its pushes go to [`on_push`].
    async fn connect_on_publisher(config: &RedisConfig) -> Result<Self> {
        let hub = BackplaneHub::new();
        let channel = config.channel_name();
        let hearing = Arc::new(Hearing::default());
        let pushes = on_push(hub.clone(), channel.clone(), hearing.clone());
        let publisher = Connection::connect_for_pushes(config, &channel, pushes).await?;
        let listener = tokio::spawn(keep_subscribed(
            publisher.clone(),
            hearing.clone(),
            config.backplane_ping_interval,
        ));
        Ok(Self {
            hub,
            publisher,
            hearing: Some(hearing),
            channel,
            store_publishes: false,
            fallback: tokio::sync::OnceCell::new(),
            config: config.clone(),
            listener: listener.abort_handle(),
        })
    }

    /// A publishing connection, and a pub/sub connection kept alive by a task.
    async fn connect_dedicated(config: &RedisConfig) -> Result<Self> {
        let publisher = Connection::connect(config).await?;
        let hub = BackplaneHub::new();
        let channel = config.channel_name();
        let (ready, subscribed) = oneshot::channel();
        let listener = tokio::spawn(listen(config.clone(), channel.clone(), hub.clone(), ready));
        let limit = config.connect_timeout + config.response_timeout;
        match tokio::time::timeout(limit, subscribed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => {
                listener.abort();
                return Err(error);
            }
            Ok(Err(_)) | Err(_) => {
                listener.abort();
                return Err(CacheError::Connection {
                    endpoint: config.endpoint(),
                    source: format!("no pub/sub subscription within {limit:?}").into(),
                });
            }
        }
        Ok(Self {
            hub,
            publisher,
            hearing: None,
            channel,
            store_publishes: false,
            fallback: tokio::sync::OnceCell::new(),
            config: config.clone(),
            listener: listener.abort_handle(),
        })
    }

    /// The hub that filters this instance's own messages and fans the others out.
    pub(crate) fn hub(&self) -> &BackplaneHub {
        &self.hub
    }

    /// Records that the store this backplane was connected with announces its own writes.
    pub(crate) fn mark_store_publishes(&mut self) {
        self.store_publishes = true;
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    /// Publishes on the publishing connection. When that connection is also the subscribed one
    /// (RESP3) and it is down, or its publish fails, the message goes out on a plain connection
    /// instead: other instances must hear of a write even while this one cannot listen.
    async fn publish(&self, namespace: &str, invalidation: &Invalidation) -> Result<()> {
        let message = self.hub.encode(namespace, invalidation)?;
        let mut publish = cmd("PUBLISH");
        publish.arg(&self.channel).arg(message);
        let Some(hearing) = &self.hearing else {
            return self
                .publisher
                .query::<u64>("publish", &publish)
                .await
                .map(drop);
        };
        if !hearing.deaf.load(Ordering::SeqCst)
            && self
                .publisher
                .query::<u64>("publish", &publish)
                .await
                .is_ok()
        {
            return Ok(());
        }
        let fallback = self
            .fallback
            .get_or_try_init(|| Connection::connect(&self.config))
            .await?;
        fallback.query::<u64>("publish", &publish).await.map(drop)
    }

    fn subscribe(&self) -> Subscription {
        self.hub.subscribe()
    }

    fn publishes_store_writes(&self) -> bool {
        self.store_publishes
    }
}

/// Whether the subscription of a publishing connection is lost, and a wake-up for the task
/// that restores it.
#[derive(Default)]
struct Hearing {
    deaf: AtomicBool,
    lost: Notify,
}

/// Handles the pushes of a publishing connection, called by redis-rs's driver as it reads them
/// (no channel or task in between): messages on `channel` go to the hub (an instance's own are
/// dropped after a look at their header), a lost connection resyncs and wakes
/// [`keep_subscribed`], and the first subscription confirmed after that resyncs again (whatever
/// was published meanwhile is lost).
fn on_push(
    hub: BackplaneHub,
    channel: String,
    hearing: Arc<Hearing>,
) -> impl Fn(PushInfo) + Send + Sync + 'static {
    move |push| match push.kind {
        PushKind::Message => {
            if let [Value::BulkString(from), Value::BulkString(message)] = push.data.as_slice()
                && from.as_slice() == channel.as_bytes()
                && let Err(error) = hub.deliver_wire(message)
            {
                tracing::warn!(error = %error, "undecodable backplane message");
            }
        }
        PushKind::Disconnection if !hearing.deaf.swap(true, Ordering::SeqCst) => {
            tracing::warn!("backplane connection lost; resubscribing");
            hub.lost();
            hearing.lost.notify_one();
        }
        PushKind::Subscribe if hearing.deaf.swap(false, Ordering::SeqCst) => {
            tracing::info!("backplane resubscribed; L1 is cleared");
            hub.resync();
        }
        _ => {}
    }
}

/// Replaces the socket of a publishing connection after each loss (reported by the socket, or
/// found by a `PING` every `ping_every` that went unanswered): a new socket, subscribed, tried at
/// once and then with a backoff until the server answers.
async fn keep_subscribed(
    connection: Connection,
    hearing: Arc<Hearing>,
    ping_every: Option<Duration>,
) {
    loop {
        tokio::select! {
            biased;
            () = hearing.lost.notified() => {}
            () = until_unanswered(ping_every, || {
                let connection = connection.clone();
                async move { connection.query::<Value>("ping", &cmd("PING")).await.map(drop) }
            }) => {
                tracing::warn!("backplane connection stopped answering; resubscribing");
                // Its handler hears of the loss as if the socket had reported it: it resyncs
                // and wakes this loop again, which then replaces the socket.
                connection.abandon();
                continue;
            }
        }
        let mut pauses = resubscribe_pauses();
        while let Err(error) = connection.reconnect().await {
            let pause = pauses.next().unwrap_or(MAX_BACKOFF);
            tracing::warn!(error = %error, retry_in = ?pause, "backplane cannot resubscribe");
            tokio::time::sleep(pause).await;
        }
    }
}

/// Calls `ping` every `interval` and returns once a ping goes unanswered: it timed out, or found
/// the connection gone. Any reply, even a refusal, shows that the connection is alive. Without an
/// interval, never returns.
///
/// A subscription that hears nothing looks the same whether nobody publishes or the network in
/// between went silent without closing anything; only asking tells them apart.
async fn until_unanswered<F>(interval: Option<Duration>, mut ping: impl FnMut() -> F)
where
    F: Future<Output = Result<()>>,
{
    let Some(interval) = interval else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        if let Err(CacheError::Timeout { .. } | CacheError::Connection { .. }) = ping().await {
            return;
        }
    }
}

/// One `PING` on a dedicated subscription, within `limit`.
async fn ping_subscribed(mut sink: PubSubSink, endpoint: String, limit: Duration) -> Result<()> {
    match tokio::time::timeout(limit, sink.ping::<Value>()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(map_error("ping", &endpoint, limit, error)),
        Err(_) => Err(CacheError::Timeout {
            operation: "ping",
            after: limit,
        }),
    }
}

/// Keeps one dedicated subscription alive: subscribe, forward messages, and on loss resync and
/// start over.
async fn listen(
    config: RedisConfig,
    channel: String,
    hub: BackplaneHub,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut pauses = resubscribe_pauses();
    let mut node = 0;
    loop {
        let info = config.nodes[node % config.nodes.len()].clone();
        let endpoint = endpoint_of(&info);
        let subscribed = async {
            let client = client_for(info, &config)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let limit = config.connect_timeout + config.response_timeout;
        let pubsub = match tokio::time::timeout(limit, subscribed).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => {
                let error = map_error("subscribe", &endpoint, limit, error);
                if let Some(ready) = ready.take() {
                    // The first attempt decides whether `connect` succeeds.
                    let _ = ready.send(Err(error));
                    return;
                }
                tracing::warn!(endpoint = %endpoint, error = %error, "backplane cannot resubscribe; retrying");
                node += 1;
                tokio::time::sleep(pauses.next().unwrap_or(MAX_BACKOFF)).await;
                continue;
            }
            Err(_) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(CacheError::Timeout {
                        operation: "subscribe",
                        after: limit,
                    }));
                    return;
                }
                node += 1;
                tokio::time::sleep(pauses.next().unwrap_or(MAX_BACKOFF)).await;
                continue;
            }
        };
        pauses = resubscribe_pauses();
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        } else {
            // Subscribed again: whatever was published while we were away is lost.
            tracing::info!(endpoint = %endpoint, "backplane resubscribed; L1 is cleared");
            hub.resync();
        }
        let (sink, mut messages) = pubsub.split();
        let silent = until_unanswered(config.backplane_ping_interval, || {
            ping_subscribed(sink.clone(), endpoint.clone(), config.response_timeout)
        });
        let mut silent = std::pin::pin!(silent);
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => {
                        if let Err(error) = hub.deliver_wire(message.get_payload_bytes()) {
                            tracing::warn!(error = %error, "undecodable backplane message");
                        }
                    }
                    None => break,
                },
                () = &mut silent => {
                    tracing::warn!(endpoint = %endpoint, "backplane subscription stopped answering");
                    break;
                }
            }
        }
        // The connection is gone (server restart, CLIENT KILL, network) or silent: the caches
        // clear L1 now and keep nothing in it while we are deaf, and clear it again once we are
        // back.
        tracing::warn!(endpoint = %endpoint, "backplane subscription lost; resubscribing");
        hub.lost();
    }
}
