//! `MokaStore`: a byte [`Store`] on moka, for single-process use and for tests.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use tierstack_core::clock::{SharedClock, Timestamp, system_clock};
use tierstack_core::error::Result;
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, validate_key};
use tierstack_core::store::{Store, StoredEntry, validate_prefix, validate_ttl};

use crate::expiry::{Deadline, DeadlineExpiry, keys_where};
use crate::quiet::without_self_wake;

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
    async fn live_at(&self, key: &str, now: Timestamp) -> Option<StoredBytes> {
        without_self_wake(pin!(self.cache.get(key)))
            .await
            .filter(|e| e.expires_at > now)
    }

    /// [`live_at`](Self::live_at) in one poll, with a waker that ignores wakes (so, like
    /// `live_at`, it cannot wake the caller): `Pending` if moka has to wait (for its own
    /// housekeeping lock). moka's operations are cancel-safe, so dropping the read then is fine:
    /// the caller reads again, awaiting.
    fn live_at_now(&self, key: &str, now: Timestamp) -> Poll<Option<StoredBytes>> {
        pin!(self.cache.get(key))
            .poll(&mut Context::from_waker(Waker::noop()))
            .map(|entry| entry.filter(|e| e.expires_at > now))
    }
}

#[async_trait]
impl Store for MokaStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        Ok(self.live_at(key, self.clock.now()).await.map(|e| e.value))
    }

    fn get_now(&self, key: &str) -> Option<Result<Option<Bytes>>> {
        if let Err(error) = validate_key(key, DEFAULT_MAX_STORE_KEY_LEN) {
            return Some(Err(error));
        }
        match self.live_at_now(key, self.clock.now()) {
            Poll::Ready(entry) => Some(Ok(entry.map(|e| e.value))),
            Poll::Pending => None,
        }
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(self.live_at(key, now).await.map(|e| e.with_ttl_at(now)))
    }

    fn get_with_ttl_now(&self, key: &str) -> Option<Result<Option<StoredEntry>>> {
        if let Err(error) = validate_key(key, DEFAULT_MAX_STORE_KEY_LEN) {
            return Some(Err(error));
        }
        let now = self.clock.now();
        match self.live_at_now(key, now) {
            Poll::Ready(entry) => Some(Ok(entry.map(|e| e.with_ttl_at(now)))),
            Poll::Pending => None,
        }
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let expires_at = self.clock.now().saturating_add(ttl);
        without_self_wake(pin!(
            self.cache
                .insert(key.to_owned(), StoredBytes { value, expires_at }),
        ))
        .await;
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
        let result = without_self_wake(pin!(self.cache.entry(key.to_owned()).and_compute_with(
            |current| async move {
                match current {
                    Some(entry) if entry.value().expires_at > now => Op::Nop,
                    _ => Op::Put(fresh),
                }
            },
        )))
        .await;
        Ok(matches!(
            result,
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        ))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        Ok(without_self_wake(pin!(self.cache.remove(key)))
            .await
            .is_some_and(|e| self.is_live(&e)))
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let result = without_self_wake(pin!(self.cache.entry(key.to_owned()).and_compute_with(
            |current| async move {
                match current {
                    Some(entry) if entry.value().expires_at > now => Op::Put(StoredBytes {
                        value: entry.into_value().value,
                        expires_at: now.saturating_add(ttl),
                    }),
                    Some(_) => Op::Remove,
                    None => Op::Nop,
                }
            },
        )))
        .await;
        Ok(matches!(result, CompResult::ReplacedWith(_)))
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(self
            .live_at(key, now)
            .await
            .map(|e| now.until(e.expires_at)))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        validate_prefix(prefix)?;
        let mut removed = 0;
        for key in keys_where(&self.cache, |key, _| key.starts_with(prefix)) {
            if let Some(entry) = without_self_wake(pin!(self.cache.remove(key.as_str()))).await {
                removed += u64::from(self.is_live(&entry));
            }
        }
        Ok(removed)
    }

    async fn sweep_expired(&self) -> Result<u64> {
        let now = self.clock.now();
        let expired = keys_where(&self.cache, |_, entry| entry.expires_at <= now);
        let count = expired.len() as u64;
        for key in expired {
            without_self_wake(pin!(self.cache.invalidate(key.as_str()))).await;
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
    use crate::quiet::testing::CountingWaker;

    /// As for the L1: moka's inline housekeeping does not wake the store's caller.
    #[test]
    fn writes_and_reads_answer_at_once_without_waking_the_caller() {
        let store = MokaStore::new(1024 * 1024);
        let ttl = Duration::from_secs(10);
        let caller = CountingWaker::default();
        for i in 0..1_000 {
            let key = format!("k{i}");
            let written = caller.poll(pin!(store.set(&key, Bytes::from_static(b"v"), ttl)));
            assert!(matches!(written, Poll::Ready(Ok(()))), "write {i}");
            let read = caller.poll(pin!(store.get(&key)));
            assert!(matches!(read, Poll::Ready(Ok(Some(_)))), "read {i}");
            let deleted = caller.poll(pin!(store.delete(&key)));
            assert!(matches!(deleted, Poll::Ready(Ok(true))), "delete {i}");
        }
        assert_eq!(caller.wakes(), 0);
    }
}
