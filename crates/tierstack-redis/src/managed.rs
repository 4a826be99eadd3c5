//! A standalone server's connection. redis-rs's manager reconnects it after any loss it can
//! see (a reset, a closed socket, a refused write). A socket that stops answering without any
//! error (a partition that sends no reset, a NAT or firewall that forgot it) would otherwise
//! time every call out until the kernel gives up on it, about 15 minutes later on Linux's
//! defaults; so after a few calls in a row go unanswered, it is replaced here.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult};

use crate::errors::map_error;

/// Calls in a row, sent on one socket, that must go unanswered before it is replaced: one slow
/// command may time out, but three with no reply in between mean the socket is dead.
const UNANSWERED_BEFORE_REPLACING: u32 = 3;

/// The connection calls go on now, numbered so that calls sent on one it replaced do not
/// count against it.
struct Numbered {
    number: u64,
    connection: ConnectionManager,
}

pub(crate) struct ManagedSocket {
    client: Client,
    config: ConnectionManagerConfig,
    current: RwLock<Numbered>,
    /// Calls sent on the current connection that timed out since its last reply.
    unanswered: AtomicU32,
    replacing: AtomicBool,
}

impl ManagedSocket {
    /// Connects (the caller bounds the wait).
    pub(crate) async fn connect(
        client: Client,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        let connection = client
            .get_connection_manager_with_config(config.clone())
            .await?;
        Ok(Self {
            client,
            config,
            current: RwLock::new(Numbered {
                number: 0,
                connection,
            }),
            unanswered: AtomicU32::new(0),
            replacing: AtomicBool::new(false),
        })
    }

    /// The connection to send a call on, and its number (for [`answered`](Self::answered) and
    /// [`unanswered`](Self::unanswered)).
    pub(crate) fn current(&self) -> (ConnectionManager, u64) {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (current.connection.clone(), current.number)
    }

    /// A call sent on connection `number` got a reply (a refusal counts: the server is there).
    pub(crate) fn answered(&self, number: u64) {
        // Read first: every call comes here, and a write would bounce the cache line between
        // the cores for nothing.
        if self.unanswered.load(Ordering::Relaxed) != 0 && number == self.number() {
            self.unanswered.store(0, Ordering::Relaxed);
        }
    }

    /// A call sent on connection `number` got no reply within its timeout. After enough in a
    /// row on the current connection, a new one is opened, on a task of its own, within `limit`,
    /// and replaces it once it is up; calls go on over the old one meanwhile.
    pub(crate) fn unanswered(self: &Arc<Self>, number: u64, endpoint: &Arc<str>, limit: Duration) {
        if number != self.number() {
            return;
        }
        let in_a_row = self.unanswered.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= UNANSWERED_BEFORE_REPLACING && !self.replacing.swap(true, Ordering::AcqRel) {
            tokio::spawn(Arc::clone(self).replace(Arc::clone(endpoint), limit));
        }
    }

    fn number(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .number
    }

    async fn replace(self: Arc<Self>, endpoint: Arc<str>, limit: Duration) {
        tracing::warn!(endpoint = %endpoint, "Redis connection stopped answering; opening a new one");
        let started = tokio::time::Instant::now();
        let connecting = self
            .client
            .get_connection_manager_with_config(self.config.clone());
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(connection)) => {
                {
                    let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
                    current.number += 1;
                    current.connection = connection;
                }
                self.unanswered.store(0, Ordering::Relaxed);
                tracing::info!(endpoint = %endpoint, "Redis connection replaced");
            }
            Ok(Err(error)) => {
                let error = map_error("connect", &endpoint, limit, error);
                tracing::warn!(endpoint = %endpoint, error = %error, "cannot open a new Redis connection");
            }
            Err(_) => {
                tracing::warn!(endpoint = %endpoint, after = ?limit, "cannot open a new Redis connection in time");
            }
        }
        // The next attempt follows the next call that goes unanswered, but not before `limit`
        // has passed since this one began: a server that is down is not dialled (and logged)
        // on every timeout.
        tokio::time::sleep_until(started + limit).await;
        self.replacing.store(false, Ordering::Release);
    }
}
