//! The byte-level tier trait that every L2 implements.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{CacheError, Result};

/// The longest time to live any store accepts: ten years. Anything longer is almost certainly a
/// unit mistake (milliseconds passed as seconds), and some backends overflow past it.
pub const MAX_TTL: Duration = Duration::from_hours(10 * 365 * 24);

/// Checks that `ttl` is at least one millisecond and at most [`MAX_TTL`].
pub fn validate_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_millis(1) {
        return Err(CacheError::InvalidTtl {
            ttl,
            reason: "a time to live must be at least one millisecond",
        });
    }
    if ttl > MAX_TTL {
        return Err(CacheError::InvalidTtl {
            ttl,
            reason: "a time to live must be at most ten years",
        });
    }
    Ok(())
}

/// One write of a bulk [`Store::set_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreWrite<'a> {
    /// The key.
    pub key: &'a str,
    /// The bytes to store.
    pub value: Bytes,
    /// How long the entry lives.
    pub ttl: Duration,
}

/// Bytes read from a store together with their remaining time to live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The stored bytes.
    pub value: Bytes,
    /// How long the entry still lives.
    pub ttl: Duration,
}

/// A byte-level cache tier: Redis, Firestore, moka or memory.
///
/// Every entry has a time to live; a read never returns an entry past it, whatever the backend's
/// own expiry lag. A miss is `Ok(None)`, never an error. Keys are opaque strings (the composer
/// namespaces them); stores refuse empty keys and keys over their maximum with
/// [`CacheError::InvalidKey`], and TTLs outside [`validate_ttl`] with [`CacheError::InvalidTtl`].
///
/// Bulk operations have correct defaults that loop over the single ones; backends override them
/// with one round trip.
///
/// The trait is object-safe: the composer holds an `Arc<dyn Store>`, and a decorator (a
/// migration between stores, fault injection, a user's own) wraps one store in another.
#[async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    /// The bytes stored under `key`, or `None`.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// The bytes stored under each key, in the order of `keys`.
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// The bytes under `key` with their remaining time to live. The composer fills its L1 from
    /// this, so an entry extended by [`expire`](Store::expire) keeps its new deadline. The default
    /// asks [`get`](Store::get) then [`ttl`](Store::ttl); backends answer in one round trip.
    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        let Some(value) = self.get(key).await? else {
            return Ok(None);
        };
        Ok(self.ttl(key).await?.map(|ttl| StoredEntry { value, ttl }))
    }

    /// [`get_with_ttl`](Store::get_with_ttl) for each key, in the order of `keys`.
    async fn get_many_with_ttl(&self, keys: &[&str]) -> Result<Vec<Option<StoredEntry>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get_with_ttl(key).await?);
        }
        Ok(out)
    }

    /// Stores `value` under `key` for `ttl`, replacing any entry.
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()>;

    /// Stores every write. Not atomic: on error, some writes may have landed.
    async fn set_many(&self, writes: &[StoreWrite<'_>]) -> Result<()> {
        for write in writes {
            self.set(write.key, write.value.clone(), write.ttl).await?;
        }
        Ok(())
    }

    /// Stores `value` under `key` only if no live entry exists; `true` if it was written.
    /// Atomic: of concurrent callers on one key, exactly one wins.
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool>;

    /// Stores `value` under `key` for `ttl`, like [`set`](Store::set), and returns the live
    /// bytes it replaced. Atomic: what it returns is exactly what the write replaced. The
    /// composer writes its tombstones (see [`envelope`](crate::envelope)) with it, and reads
    /// from the answer whether a delete removed anything.
    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>>;

    /// Writes `new` under `key` (or removes the key, for `None`) only if its live entry holds
    /// exactly the bytes `current`; `true` if it did. Atomic: of concurrent callers that saw the
    /// same `current`, at most one wins, and a write of the key by anyone in between makes it
    /// fail. An entry the backend cannot read as bytes (a Redis list under the key, say) reads
    /// as empty bytes here, as in [`get`](Store::get).
    ///
    /// The composer fills a loaded value over the entry its load saw (a tombstone, a negative
    /// entry, undecodable bytes) with it: a delete on any instance while the load ran changed
    /// that entry, so the stale value stays out.
    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool>;

    /// Removes `key`; `true` if a live entry was removed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Removes every key; returns how many live entries were removed.
    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let mut removed = 0;
        for key in keys {
            removed += u64::from(self.delete(key).await?);
        }
        Ok(removed)
    }

    /// Whether a live entry exists under `key`.
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.get(key).await?.is_some())
    }

    /// Sets the remaining time to live of a live entry to `ttl` (extending or shortening it);
    /// `false` if there is no live entry. A sliding expiry calls this on access. A tombstone
    /// ([`envelope::is_tombstone`](crate::envelope::is_tombstone)) counts as no entry: it is
    /// left as it is, and the answer is `false`.
    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// The remaining time to live of `key`, or `None` if there is no live entry.
    async fn ttl(&self, key: &str) -> Result<Option<Duration>>;

    /// Removes every entry whose key starts with `prefix` (taken literally: glob characters are
    /// not patterns); returns how many were removed. An empty prefix is refused, so that a
    /// mistake cannot wipe the whole store.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64>;

    /// Deletes expired entries that the backend keeps until then (Firestore keeps them up to a day);
    /// returns how many. Backends that expire entries themselves return `Ok(0)`.
    async fn sweep_expired(&self) -> Result<u64> {
        Ok(0)
    }

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<()>;
}

/// Refuses an empty prefix for [`Store::delete_prefix`].
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Err(CacheError::InvalidKey {
            reason: crate::error::KeyProblem::Empty,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        assert!(validate_ttl(Duration::ZERO).is_err());
        assert!(validate_ttl(Duration::from_micros(999)).is_err());
        assert!(validate_ttl(Duration::from_millis(1)).is_ok());
        assert!(validate_ttl(MAX_TTL).is_ok());
        assert!(validate_ttl(MAX_TTL + Duration::from_secs(1)).is_err());
        assert!(validate_ttl(Duration::MAX).is_err());
    }

    #[test]
    fn store_is_object_safe() {
        fn takes(_: Option<std::sync::Arc<dyn Store>>) {}
        takes(None);
    }
}
