//! Cluster-wide single-flight: the settings of a load lease, and the registry through which a
//! caller waiting for another instance's load hears that the value has landed.
//!
//! A miss takes a lease on the L2 (`set_if_absent` of a key of its own, holding a random token,
//! for the lease's TTL) before it calls the loader. Callers on other instances that find the
//! lease taken wait for the value: the holder publishes the key's invalidation once the value
//! is in L2, which wakes them here; a bounded poll covers a lost message or a cache without a
//! backplane. The protocol itself is in `cache/lease.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tierstack_core::store::validate_ttl;
use tierstack_core::{CacheError, Result};
use tokio::sync::Notify;

/// How a read-through call shares its load with the other instances: it takes a lease on the L2
/// before calling the loader, and waits for the holder's value instead when another instance
/// holds it ([`EntryOptions::with_load_lease`](crate::EntryOptions::with_load_lease)).
///
/// A holder that dies, stalls or is cut off loses the lease at its `ttl`, and one waiter takes
/// it over: set the TTL above the loader's slowest ordinary time. A holder whose lease ran out
/// never overwrites a value written since its load began: its write only replaces what its own
/// read saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLease {
    ttl: Duration,
    poll: Duration,
}

impl LoadLease {
    /// A lease that lives `ttl`, polled every 50 ms (at most) by the callers waiting for it,
    /// backing off to eight times that while nothing changes.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            poll: Duration::from_millis(50).min(ttl),
        }
    }

    /// How often a waiting caller first looks at L2 when no notification came (a cache without
    /// a backplane, a lost message); each quiet wait doubles it, up to eight times this.
    #[must_use]
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// How long a lease lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often waiting callers poll.
    pub fn poll_interval(&self) -> Duration {
        self.poll
    }

    /// A TTL that stores accept and a poll interval from 1 ms to the TTL.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_ttl(self.ttl)
            .map_err(|e| CacheError::Configuration(format!("load_lease ttl: {e}")))?;
        if self.poll < Duration::from_millis(1) || self.poll > self.ttl {
            return Err(CacheError::Configuration(format!(
                "load_lease poll interval must be from 1 ms to the lease's ttl, not {:?}",
                self.poll
            )));
        }
        Ok(())
    }
}

/// Each waited-for key's notifier and how many registrations hold it.
type Waiting = HashMap<Box<str>, (Arc<Notify>, usize)>;

/// The callers of this cache waiting for another instance's load, by key.
#[derive(Debug, Default)]
pub(crate) struct LeaseWaiters {
    /// Each key's notifier and how many registrations hold it.
    keys: Mutex<Waiting>,
    /// How many keys are waited for: the listener skips the lock when nobody waits.
    waiting: AtomicUsize,
}

impl LeaseWaiters {
    /// Registers a wait for `key` until the registration is dropped.
    pub(crate) fn register(&self, key: &str) -> Registration<'_> {
        let mut keys = self.lock();
        let notify = if let Some((notify, holders)) = keys.get_mut(key) {
            *holders += 1;
            Arc::clone(notify)
        } else {
            let notify = Arc::new(Notify::new());
            keys.insert(key.into(), (Arc::clone(&notify), 1));
            self.waiting.fetch_add(1, Ordering::SeqCst);
            notify
        };
        Registration {
            waiters: self,
            key: key.into(),
            notify,
        }
    }

    /// Wakes the callers waiting for `key`.
    pub(crate) fn wake(&self, key: &str) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some((notify, _)) = self.lock().get(key) {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiting caller (a prefix or the whole namespace changed).
    pub(crate) fn wake_all(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (notify, _) in self.lock().values() {
            notify.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // The map is changed by single inserts and removes: a panic cannot leave it half-done.
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One caller's wait for a key; its notifications are [`Registration::notify`]'s.
pub(crate) struct Registration<'a> {
    waiters: &'a LeaseWaiters,
    key: Box<str>,
    notify: Arc<Notify>,
}

impl Registration<'_> {
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut keys = self.waiters.lock();
        // The count changes only under the lock (an `Arc`'s own count would not: two drops at
        // once could each see the other's).
        if let Some((_, holders)) = keys.get_mut(&self.key) {
            *holders -= 1;
            if *holders == 0 {
                keys.remove(&self.key);
                self.waiters.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// How much longer than `key` its lease's store key is, beside the namespace.
pub(crate) const LEASE_KEY_OVERHEAD: usize = "!lease:".len();

/// The key of `key`'s lease in the store, beside its value's `namespace:key`. A namespace
/// holds no `!`, so no namespace's keys (nor their prefix deletes) reach it.
pub(crate) fn lease_key(namespace: &str, key: &str) -> String {
    format!("{namespace}!lease:{key}")
}

/// A holder's token: random, so that a holder releases only its own lease.
pub(crate) fn token() -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&fastrand::u128(..).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(LoadLease::new(Duration::from_secs(5)).validate().is_ok());
        assert!(LoadLease::new(Duration::ZERO).validate().is_err());
        let lease = LoadLease::new(Duration::from_secs(1));
        assert!(lease.with_poll_interval(Duration::ZERO).validate().is_err());
        assert!(
            lease
                .with_poll_interval(Duration::from_secs(2))
                .validate()
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_wake_reaches_the_waiters_of_its_key_only() {
        let waiters = LeaseWaiters::default();
        let a = waiters.register("a");
        let b = waiters.register("b");
        let mut woken_a = std::pin::pin!(a.notify().notified());
        let mut woken_b = std::pin::pin!(b.notify().notified());
        woken_a.as_mut().enable();
        woken_b.as_mut().enable();
        waiters.wake("a");
        assert!(woken_a.as_mut().now_or_never().is_some());
        assert!(woken_b.as_mut().now_or_never().is_none());
        waiters.wake_all();
        assert!(woken_b.as_mut().now_or_never().is_some());
    }

    #[test]
    fn the_last_registration_of_a_key_removes_it() {
        let waiters = LeaseWaiters::default();
        let first = waiters.register("k");
        let second = waiters.register("k");
        assert_eq!(waiters.waiting.load(Ordering::SeqCst), 1);
        drop(first);
        assert_eq!(waiters.lock().len(), 1);
        drop(second);
        assert!(waiters.lock().is_empty());
        assert_eq!(waiters.waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn lease_keys_sit_outside_every_namespace() {
        let key = lease_key("users", "42");
        assert_eq!(key.len(), "users".len() + LEASE_KEY_OVERHEAD + "42".len());
        assert_eq!(key, "users!lease:42");
        assert!(!key.starts_with("users:"));
    }
}
