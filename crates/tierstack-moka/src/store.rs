//! `MokaStore`: a byte [`Store`] on moka, for single-process use and for tests.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;
use tierstack_core::clock::{SharedClock, Timestamp, system_clock};
use tierstack_core::envelope::is_tombstone;
use tierstack_core::error::Result;
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, validate_key};
use tierstack_core::store::{Store, StoredEntry, validate_prefix, validate_ttl};

use crate::expiry::{Deadline, DeadlineExpiry, keys_where};

/// Bookkeeping bytes counted per entry on top of key and value, so that a byte budget of many
/// tiny entries still bounds memory.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Clone)]
struct StoredBytes {
    value: Bytes,
    expires_at: Timestamp,
}

impl StoredBytes {
    fn with_ttl_at(self, now: Timestamp) -> StoredEntry {
        StoredEntry {
            ttl: now.until(self.expires_at),
            value: self.value,
        }
    }
}

impl Deadline for StoredBytes {
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
}

/// A byte [`Store`] in process memory, bounded by bytes, with per-entry expiry.
///
/// It behaves like every other store (it passes the conformance suite), so a service can start
/// on it and move to Redis or Firestore without code changes.
#[derive(Clone)]
pub struct MokaStore {
    cache: Cache<String, StoredBytes>,
    clock: SharedClock,
}

// Hand-written: moka's own `Debug` prints every entry, and values must never reach logs.
impl std::fmt::Debug for MokaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MokaStore")
            .field("entries", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl MokaStore {
    /// A store holding at most `max_bytes` of keys and values (plus 64 bytes per entry).
    pub fn new(max_bytes: u64) -> Self {
        Self::with_clock(max_bytes, system_clock())
    }

    /// As [`MokaStore::new`], on `clock`.
    pub fn with_clock(max_bytes: u64, clock: SharedClock) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, entry: &StoredBytes| {
                let weight = key.len() + entry.value.len() + ENTRY_OVERHEAD;
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(DeadlineExpiry {
                clock: Arc::clone(&clock),
            })
            .build();
        Self { cache, clock }
    }

    fn is_live(&self, entry: &StoredBytes) -> bool {
        entry.expires_at > self.clock.now()
    }

    /// The entry under `key` if it is live at `now`.
    fn live_at(&self, key: &str, now: Timestamp) -> Option<StoredBytes> {
        self.cache.get(key).filter(|e| e.expires_at > now)
    }
}

impl MokaStore {
    /// Stores `entry` under `key`. Every write goes through moka's per-key compute, which runs
    /// one at a time per key: a `compare_and_set` that read the key cannot have a plain insert
    /// land between its read and its write.
    fn put(&self, key: &str, entry: StoredBytes) {
        self.cache
            .entry(key.to_owned())
            .and_compute_with(|_| Op::Put(entry));
    }

    /// Removes `key` (through the per-key compute, like [`put`](Self::put)); what it held.
    fn remove(&self, key: &str) -> Option<StoredBytes> {
        match self
            .cache
            .entry(key.to_owned())
            .and_compute_with(|current| match current {
                Some(_) => Op::Remove,
                None => Op::Nop,
            }) {
            CompResult::Removed(entry) => Some(entry.into_value()),
            _ => None,
        }
    }
}

#[async_trait]
impl Store for MokaStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        Ok(self.live_at(key, self.clock.now()).map(|e| e.value))
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(self.live_at(key, now).map(|e| e.with_ttl_at(now)))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let expires_at = self.clock.now().saturating_add(ttl);
        self.put(key, StoredBytes { value, expires_at });
        Ok(())
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let fresh = StoredBytes {
            value,
            expires_at: now.saturating_add(ttl),
        };
        // Compute calls on one key are serialised by moka: of concurrent callers exactly one
        // sees no live entry.
        let result = self
            .cache
            .entry(key.to_owned())
            .and_compute_with(|current| match current {
                Some(entry) if entry.value().expires_at > now => Op::Nop,
                _ => Op::Put(fresh),
            });
        Ok(matches!(
            result,
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        ))
    }

    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let fresh = StoredBytes {
            value,
            expires_at: now.saturating_add(ttl),
        };
        // Serialised with every other compute on the key: what it saw is what it replaced.
        let mut replaced = None;
        self.cache
            .entry(key.to_owned())
            .and_compute_with(|current| {
                replaced = current
                    .map(moka::Entry::into_value)
                    .filter(|entry| entry.expires_at > now)
                    .map(|entry| entry.value);
                Op::Put(fresh)
            });
        Ok(replaced)
    }

    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        let op = match new {
            Some((value, ttl)) => {
                validate_ttl(ttl)?;
                Op::Put(StoredBytes {
                    value,
                    expires_at: now.saturating_add(ttl),
                })
            }
            None => Op::Remove,
        };
        let result = self
            .cache
            .entry(key.to_owned())
            .and_compute_with(|entry| match entry {
                Some(entry) if entry.value().expires_at > now && entry.value().value == current => {
                    op
                }
                _ => Op::Nop,
            });
        Ok(matches!(
            result,
            CompResult::ReplacedWith(_) | CompResult::Removed(_)
        ))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        Ok(self.remove(key).is_some_and(|e| self.is_live(&e)))
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let result = self
            .cache
            .entry(key.to_owned())
            .and_compute_with(|current| match current {
                Some(entry) if entry.value().expires_at <= now => Op::Remove,
                Some(entry) if is_tombstone(&entry.value().value) => Op::Nop,
                Some(entry) => Op::Put(StoredBytes {
                    value: entry.into_value().value,
                    expires_at: now.saturating_add(ttl),
                }),
                None => Op::Nop,
            });
        Ok(matches!(result, CompResult::ReplacedWith(_)))
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(self.live_at(key, now).map(|e| now.until(e.expires_at)))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        validate_prefix(prefix)?;
        let mut removed = 0;
        for key in keys_where(&self.cache, |key, _| key.starts_with(prefix)) {
            if let Some(entry) = self.remove(key.as_str()) {
                removed += u64::from(self.is_live(&entry));
            }
        }
        Ok(removed)
    }

    async fn sweep_expired(&self) -> Result<u64> {
        let now = self.clock.now();
        let expired = keys_where(&self.cache, |_, entry| entry.expires_at <= now);
        let mut count = 0;
        for key in expired {
            // Only if still expired: the key may have been written since the scan.
            let result =
                self.cache
                    .entry(key.to_string())
                    .and_compute_with(|current| match current {
                        Some(entry) if entry.value().expires_at <= now => Op::Remove,
                        _ => Op::Nop,
                    });
            count += u64::from(matches!(result, CompResult::Removed(_)));
        }
        Ok(count)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The store's calls complete on their first poll and never wake their caller: moka's
    /// synchronous cache runs its housekeeping within the call, so a task that uses the store
    /// is not woken (and moved to another worker) by it.
    #[test]
    fn writes_and_reads_answer_at_once_without_waking_the_caller() {
        let store = MokaStore::new(1024 * 1024);
        let ttl = Duration::from_secs(10);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        for i in 0..1_000 {
            let key = format!("k{i}");
            let written = pin!(store.set(&key, Bytes::from_static(b"v"), ttl)).poll(&mut cx);
            assert!(matches!(written, Poll::Ready(Ok(()))), "write {i}");
            let read = pin!(store.get(&key)).poll(&mut cx);
            assert!(matches!(read, Poll::Ready(Ok(Some(_)))), "read {i}");
            let deleted = pin!(store.delete(&key)).poll(&mut cx);
            assert!(matches!(deleted, Poll::Ready(Ok(true))), "delete {i}");
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
    }
}
