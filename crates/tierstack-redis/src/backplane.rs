//! `RedisBackplane`: invalidations over Redis pub/sub.

use std::any::Any;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::cmd;
use tierstack_core::backplane::{
    Backplane, BackplaneHub, Invalidation, Subscription, write_then_publish_in_order,
};
use tierstack_core::store::{Store, StoreWrite};
use tierstack_core::{CacheError, Result};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::config::{RedisConfig, endpoint_of};
use crate::connection::{Connection, client_for, map_error};
use crate::store::RedisStore;

/// The longest pause between two attempts to resubscribe.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A [`Backplane`] on Redis pub/sub (standalone or cluster: a cluster forwards `PUBLISH` to
/// every node).
///
/// Pub/sub delivers at most once: a subscriber that is disconnected misses what is published
/// meanwhile. So when the subscription is lost, and again once it is re-established, every
/// subscriber receives [`Resync`](tierstack_core::BackplaneEvent::Resync) and clears its L1.
/// The listener resubscribes by itself, with a backoff of up to 2 s.
pub struct RedisBackplane {
    hub: BackplaneHub,
    publisher: Connection,
    channel: String,
    listener: AbortHandle,
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("endpoint", &self.publisher.endpoint())
            .field("channel", &self.channel)
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
    /// nothing published afterwards is missed. Needs a Tokio runtime.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
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
            channel,
            listener: listener.abort_handle(),
        })
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    async fn publish(&self, namespace: &str, invalidation: &Invalidation) -> Result<()> {
        let message = self.hub.encode(namespace, invalidation)?;
        let mut publish = cmd("PUBLISH");
        publish.arg(&self.channel).arg(message);
        self.publisher.query::<u64>("publish", &publish).await?;
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        self.hub.subscribe()
    }

    /// On a standalone [`RedisStore`] of the same server: one script writes and then publishes,
    /// so a write costs one round trip instead of two. Anything else (a cluster, another store,
    /// a wrapped store): the write, then the publish.
    async fn write_then_publish(
        &self,
        store: &dyn Store,
        write: StoreWrite<'_>,
        namespace: &str,
        invalidation: &Invalidation,
    ) -> Result<Option<CacheError>> {
        let any: &dyn Any = store;
        if let Some(redis) = any.downcast_ref::<RedisStore>()
            && !redis.connection().is_cluster()
            && redis.connection().endpoint() == self.publisher.endpoint()
            && let Ok(message) = self.hub.encode(namespace, invalidation)
        {
            redis
                .set_and_publish(write.key, &write.value, write.ttl, &self.channel, &message)
                .await?;
            return Ok(None);
        }
        write_then_publish_in_order(self, store, write, namespace, invalidation).await
    }
}

/// Keeps one subscription alive: subscribe, forward messages, and on loss resync and start over.
async fn listen(
    config: RedisConfig,
    channel: String,
    hub: BackplaneHub,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        } else {
            // Subscribed again: whatever was published while we were away is lost.
            tracing::info!(endpoint = %endpoint, "backplane resubscribed; clearing L1");
            hub.resync();
        }
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            if let Err(error) = hub.deliver_wire(message.get_payload_bytes()) {
                tracing::warn!(error = %error, "undecodable backplane message dropped");
            }
        }
        // The connection is gone (server restart, CLIENT KILL, network): resync now, so nothing
        // stale is served while we are deaf, and again once we are back.
        tracing::warn!(endpoint = %endpoint, "backplane subscription lost; clearing L1 and resubscribing");
        hub.resync();
    }
}
