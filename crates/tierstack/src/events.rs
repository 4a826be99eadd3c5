//! Events: what happened in a cache, for whoever listens ([`TieredCache::events`]).
//!
//! Nothing is built or sent while nobody listens: each event site costs one atomic load then.
//!
//! [`TieredCache::events`]: crate::TieredCache::events

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;

use crate::breaker::CircuitState;
use crate::options::Source;

/// How many events a listener may fall behind before it loses the oldest.
const BACKLOG: usize = 1024;

/// Something that happened in a cache. Keys are the caller's keys (without the namespace);
/// values are never part of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheEvent {
    /// A read answered from a tier ([`Source::L1`] or [`Source::L2`]).
    Hit {
        /// The key.
        key: Arc<str>,
        /// The tier.
        tier: Source,
    },
    /// A read found the key in no tier.
    Miss {
        /// The key.
        key: Arc<str>,
    },
    /// Fail-safe answered a stale value.
    StaleServed {
        /// The key.
        key: Arc<str>,
        /// Why the fresh value was not there.
        reason: StaleReason,
    },
    /// A load that ran in a task of its own (`get_or_load_with`) finished.
    BackgroundLoad {
        /// The key.
        key: Arc<str>,
        /// Whether the loader answered a value (`false`: it failed, panicked or was cancelled at
        /// the hard timeout).
        ok: bool,
    },
    /// A hit late in an entry's TTL started a background reload.
    EagerRefresh {
        /// The key.
        key: Arc<str>,
    },
    /// Another instance told this one to evict something.
    InvalidationReceived,
    /// The backplane's subscription came back after messages may have been lost: L1 was
    /// cleared.
    Resync,
    /// The L2's circuit breaker changed state.
    L2Circuit {
        /// The state it moved to.
        state: CircuitState,
    },
    /// The backplane's circuit breaker changed state.
    BackplaneCircuit {
        /// The state it moved to.
        state: CircuitState,
    },
}

/// Why fail-safe answered a stale value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StaleReason {
    /// The loader failed or panicked.
    LoaderFailed,
    /// The call's soft timeout passed while the load went on.
    SoftTimeout,
    /// The call's hard timeout passed.
    HardTimeout,
}

/// Why [`CacheEvents::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventsError {
    /// The listener fell more than 1,024 events behind: this many were dropped. Receiving goes
    /// on with the oldest event kept.
    #[error("{0} cache events were dropped: the listener fell behind")]
    Lagged(u64),
    /// The cache was dropped.
    #[error("the cache was dropped")]
    Closed,
}

/// A subscription to a cache's events; see [`TieredCache::events`](crate::TieredCache::events).
/// Dropping it stops the cache from building events for it.
#[derive(Debug)]
pub struct CacheEvents {
    receiver: broadcast::Receiver<CacheEvent>,
    listeners: Arc<AtomicUsize>,
}

impl CacheEvents {
    /// The next event.
    ///
    /// # Errors
    ///
    /// [`EventsError::Lagged`] if events were dropped because this listener fell behind,
    /// [`EventsError::Closed`] once the cache is gone.
    pub async fn recv(&mut self) -> Result<CacheEvent, EventsError> {
        self.receiver.recv().await.map_err(|error| match error {
            broadcast::error::RecvError::Lagged(dropped) => EventsError::Lagged(dropped),
            broadcast::error::RecvError::Closed => EventsError::Closed,
        })
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<CacheEvent> {
        loop {
            match self.receiver.try_recv() {
                Ok(event) => return Some(event),
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for CacheEvents {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The sending side, owned by the cache.
#[derive(Debug)]
pub(crate) struct EventHub {
    sender: broadcast::Sender<CacheEvent>,
    listeners: Arc<AtomicUsize>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            sender: broadcast::Sender::new(BACKLOG),
            listeners: Arc::default(),
        }
    }
}

impl EventHub {
    pub(crate) fn subscribe(&self) -> CacheEvents {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        CacheEvents {
            receiver: self.sender.subscribe(),
            listeners: Arc::clone(&self.listeners),
        }
    }

    /// Sends the event `build` makes, if anybody listens.
    pub(crate) fn emit(&self, build: impl FnOnce() -> CacheEvent) {
        if self.listeners.load(Ordering::Relaxed) > 0 {
            let _ = self.sender.send(build());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_built_while_nobody_listens() {
        let hub = EventHub::default();
        hub.emit(|| panic!("built without a listener"));
        let mut events = hub.subscribe();
        hub.emit(|| CacheEvent::Resync);
        assert_eq!(events.try_recv(), Some(CacheEvent::Resync));
        drop(events);
        hub.emit(|| panic!("built after the listener left"));
    }

    #[test]
    fn a_listener_that_falls_behind_keeps_the_newest() {
        let hub = EventHub::default();
        let mut events = hub.subscribe();
        for _ in 0..BACKLOG + 10 {
            hub.emit(|| CacheEvent::InvalidationReceived);
        }
        let received = std::iter::from_fn(|| events.try_recv()).count();
        assert_eq!(received, BACKLOG);
    }
}
