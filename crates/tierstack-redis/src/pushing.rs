//! The socket a standalone backplane writes, publishes and listens on: RESP3, with its pushes
//! handed by redis-rs's driver straight to a handler.
//!
//! redis-rs's `ConnectionManager` would reconnect by itself, but it forwards every push through
//! a channel to a task of its own, and a writer hears its own invalidation with every write:
//! waking that task each time made `SET` + `PUBLISH` from a spawned task cost 1.41–1.58 times a
//! plain `SET`, against 1.18–1.21 with the pushes handled on the reading task
//! (docs/benchmarks.md). So this socket is a plain multiplexed connection, replaced by
//! [`PushingSocket::reconnect`] after a loss.

use std::convert::Infallible;
use std::sync::{Arc, Weak};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, PushInfo, PushKind, RedisResult};
use tokio::sync::watch;

/// One subscribed RESP3 socket at a time; none between a loss and the next
/// [`reconnect`](Self::reconnect).
pub(crate) struct PushingSocket {
    client: Client,
    /// Carries the push handler, so that every socket hands its pushes to the same one.
    config: AsyncConnectionConfig,
    channel: String,
    /// Shared with the push handler by a weak reference: the handler lives in the socket's
    /// driver, and a strong one would keep the socket alive through its own handle.
    current: Arc<watch::Sender<Option<MultiplexedConnection>>>,
}

impl PushingSocket {
    /// Connects `client` (set up for RESP3) and subscribes to `channel`. Every push goes to
    /// `on_push`, a `Disconnection` after the socket is marked lost, so that requests wait for
    /// the next socket instead of failing on the dead one.
    pub(crate) async fn connect(
        client: Client,
        config: AsyncConnectionConfig,
        channel: &str,
        on_push: impl Fn(PushInfo) + Send + Sync + 'static,
    ) -> RedisResult<Self> {
        let current = Arc::new(watch::Sender::new(None));
        let lost: Weak<watch::Sender<_>> = Arc::downgrade(&current);
        let config = config.set_push_sender(move |push: PushInfo| {
            if push.kind == PushKind::Disconnection
                && let Some(current) = lost.upgrade()
            {
                current.send_replace(None);
            }
            on_push(push);
            Ok::<(), Infallible>(())
        });
        let socket = Self {
            client,
            config,
            channel: channel.to_owned(),
            current,
        };
        socket.reconnect().await?;
        Ok(socket)
    }

    /// Opens a new socket, subscribes it, and makes it the one requests use.
    pub(crate) async fn reconnect(&self) -> RedisResult<()> {
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        connection.subscribe(&self.channel).await?;
        self.current.send_replace(Some(connection));
        Ok(())
    }

    /// The live socket, waiting for [`reconnect`](Self::reconnect) while there is none (the
    /// caller bounds the wait).
    pub(crate) async fn live(&self) -> MultiplexedConnection {
        if let Some(connection) = self.current.borrow().as_ref() {
            return connection.clone();
        }
        let mut changes = self.current.subscribe();
        loop {
            if let Some(connection) = changes.borrow_and_update().as_ref() {
                return connection.clone();
            }
            changes
                .changed()
                .await
                .expect("the sender lives as long as `self`");
        }
    }
}
