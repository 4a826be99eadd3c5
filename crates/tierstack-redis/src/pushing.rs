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

type PushHandler = Arc<dyn Fn(PushInfo) + Send + Sync>;

/// Which socket is current. Each socket is numbered, so that the late `Disconnection` of one
/// that was [abandoned](PushingSocket::abandon) cannot mark its successor lost.
struct Slot {
    generation: u64,
    connection: Option<MultiplexedConnection>,
}

/// One subscribed RESP3 socket at a time; none between a loss and the next
/// [`reconnect`](Self::reconnect).
pub(crate) struct PushingSocket {
    client: Client,
    /// Without a push sender: each socket gets its own (see [`Slot`]).
    config: AsyncConnectionConfig,
    channel: String,
    on_push: PushHandler,
    /// Shared with the push senders by weak references: a sender lives in its socket's driver,
    /// and a strong one would keep the socket alive through its own handle.
    current: Arc<watch::Sender<Slot>>,
}

impl PushingSocket {
    /// Connects `client` (set up for RESP3) and subscribes to `channel`. Every push goes to
    /// `on_push`; the current socket's `Disconnection` after the socket is marked lost, so that
    /// requests wait for the next socket instead of failing on the dead one.
    pub(crate) async fn connect(
        client: Client,
        config: AsyncConnectionConfig,
        channel: &str,
        on_push: impl Fn(PushInfo) + Send + Sync + 'static,
    ) -> RedisResult<Self> {
        let socket = Self {
            client,
            config,
            channel: channel.to_owned(),
            on_push: Arc::new(on_push),
            current: Arc::new(watch::Sender::new(Slot {
                generation: 0,
                connection: None,
            })),
        };
        socket.reconnect().await?;
        Ok(socket)
    }

    /// Opens a new socket, subscribes it, and makes it the one requests use.
    pub(crate) async fn reconnect(&self) -> RedisResult<()> {
        let generation = self.retire_current();
        let config = self
            .config
            .clone()
            .set_push_sender(self.push_sender(generation));
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        connection.subscribe(&self.channel).await?;
        // A newer socket (or an abandonment) may have come meanwhile: then this one is dropped.
        replace_if_current(&self.current, generation, Some(connection));
        Ok(())
    }

    /// Gives the current socket up as lost although it reported nothing (it stopped answering),
    /// and tells the handler so with a `Disconnection`, as if the socket had reported it.
    pub(crate) fn abandon(&self) {
        self.retire_current();
        (self.on_push)(PushInfo {
            kind: PushKind::Disconnection,
            data: Vec::new(),
        });
    }

    /// Takes the current socket out of use; returns the number of its successor.
    fn retire_current(&self) -> u64 {
        let mut generation = 0;
        self.current.send_modify(|slot| {
            slot.generation += 1;
            slot.connection = None;
            generation = slot.generation;
        });
        generation
    }

    /// What socket number `generation` does with its pushes: hands them to the handler, except
    /// a `Disconnection` once it is no longer current (an abandoned socket that drops later
    /// concerns nobody). Messages are not checked: a late one from an abandoned socket only
    /// evicts again, and this runs for every write's own invalidation.
    fn push_sender(
        &self,
        generation: u64,
    ) -> impl Fn(PushInfo) -> Result<(), Infallible> + Send + Sync + 'static {
        let slot: Weak<watch::Sender<Slot>> = Arc::downgrade(&self.current);
        let on_push = Arc::clone(&self.on_push);
        move |push: PushInfo| {
            if push.kind == PushKind::Disconnection {
                let was_current = slot
                    .upgrade()
                    .is_some_and(|slot| replace_if_current(&slot, generation, None));
                if !was_current {
                    return Ok(());
                }
            }
            on_push(push);
            Ok(())
        }
    }

    /// The live socket, waiting for [`reconnect`](Self::reconnect) while there is none (the
    /// caller bounds the wait).
    pub(crate) async fn live(&self) -> MultiplexedConnection {
        if let Some(connection) = self.current.borrow().connection.as_ref() {
            return connection.clone();
        }
        let mut changes = self.current.subscribe();
        loop {
            if let Some(connection) = changes.borrow_and_update().connection.as_ref() {
                return connection.clone();
            }
            changes
                .changed()
                .await
                .expect("the sender lives as long as `self`");
        }
    }
}

/// Sets the connection of socket number `generation` if it is still the current one; whether
/// it was.
fn replace_if_current(
    slot: &watch::Sender<Slot>,
    generation: u64,
    connection: Option<MultiplexedConnection>,
) -> bool {
    slot.send_if_modified(|slot| {
        let current = slot.generation == generation;
        if current {
            slot.connection = connection;
        }
        current
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use redis::{ProtocolVersion, cmd};

    use super::*;

    /// A RESP3 client of the standalone server of the test run (started by this process if
    /// `cargo xtask ci` did not start one).
    fn resp3_client() -> Client {
        let url = tierstack_test_support::redis::redis_url();
        let info =
            redis::IntoConnectionInfo::into_connection_info(url.as_str()).expect("the URL parses");
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        Client::open(info.set_redis_settings(resp3)).expect("a client")
    }

    async fn client_id(connection: &mut MultiplexedConnection) -> i64 {
        cmd("CLIENT")
            .arg("ID")
            .query_async(connection)
            .await
            .expect("CLIENT ID")
    }

    #[tokio::test]
    async fn an_abandoned_socket_that_drops_later_does_not_take_its_successor_down() {
        let kinds = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&kinds);
        let socket = PushingSocket::connect(
            resp3_client(),
            AsyncConnectionConfig::new(),
            "tierstack:test:pushing",
            move |push| seen.lock().expect("not poisoned").push(push.kind),
        )
        .await
        .expect("connects");
        let mut abandoned = socket.live().await;
        let abandoned_id = client_id(&mut abandoned).await;

        socket.abandon();
        socket.reconnect().await.expect("a new socket");
        let mut successor = socket.live().await;
        assert_ne!(client_id(&mut successor).await, abandoned_id);
        // The abandoned socket now drops (we still hold a handle, so its driver is running and
        // reports the loss): that report is about a socket nobody uses any more.
        let killed: i64 = cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(abandoned_id)
            .query_async(&mut successor)
            .await
            .expect("CLIENT KILL");
        assert_eq!(killed, 1);
        let dropped = cmd("PING").query_async::<String>(&mut abandoned).await;
        assert!(dropped.is_err(), "the abandoned socket is gone");
        // real time: the abandoned socket's driver would report its loss on its own schedule.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let disconnections = kinds
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|kind| **kind == PushKind::Disconnection)
            .count();
        assert_eq!(disconnections, 1, "only the abandonment was reported");
        let mut current = tokio::time::timeout(Duration::from_secs(1), socket.live())
            .await
            .expect("the successor is still the current socket");
        let pong: String = cmd("PING")
            .query_async(&mut current)
            .await
            .expect("the successor answers");
        assert_eq!(pong, "PONG");
    }
}
