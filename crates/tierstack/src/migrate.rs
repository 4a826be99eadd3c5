//! Moving a cache from one backend to another without a cold start (from Firestore to
//! Redis, for example).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use tierstack_core::{Result, Store, StoreWrite, StoredEntry};

/// A [`Store`] that moves entries from an `old` backend to a `new` one while serving.
///
/// Writes go to both (new first), so the old backend stays complete until the switch is final
/// and a rollback loses nothing. Reads try the new backend, then the old one; an entry found
/// only in the old one is copied to the new one with its remaining TTL (never over a newer
/// value: `set_if_absent`). Once reads stop finding entries only in the old backend (or once its
/// longest TTL has passed), configure the new backend alone.
///
/// ```
/// # use std::sync::Arc;
/// # use tierstack::migrate::MigratingStore;
/// # use tierstack::moka::MokaStore;
/// let old = Arc::new(MokaStore::new(1 << 20)); // Firestore, say
/// let new = Arc::new(MokaStore::new(1 << 20)); // Redis, say
/// let store = MigratingStore::new(old, new);
/// ```
#[derive(Debug, Clone)]
pub struct MigratingStore {
    old: Arc<dyn Store>,
    new: Arc<dyn Store>,
}

impl MigratingStore {
    /// Moves entries from `old` to `new`.
    pub fn new(old: Arc<dyn Store>, new: Arc<dyn Store>) -> Self {
        Self { old, new }
    }

    /// Copies an entry found only in the old backend to the new one. A failure is only logged:
    /// the read already has its value, and the next read tries again.
    async fn backfill(&self, key: &str, entry: &StoredEntry) {
        if entry.ttl.is_zero() {
            return;
        }
        if let Err(error) = self
            .new
            .set_if_absent(key, entry.value.clone(), entry.ttl)
            .await
        {
            tracing::warn!(error = %error, "migration backfill failed; the next read retries");
        }
    }
}

#[async_trait]
impl Store for MigratingStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.get_with_ttl(key).await?.map(|e| e.value))
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        if let Some(entry) = self.new.get_with_ttl(key).await? {
            return Ok(Some(entry));
        }
        let entry = self.old.get_with_ttl(key).await?;
        if let Some(entry) = &entry {
            self.backfill(key, entry).await;
        }
        Ok(entry)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let entries = self.get_many_with_ttl(keys).await?;
        Ok(entries.into_iter().map(|e| e.map(|e| e.value)).collect())
    }

    async fn get_many_with_ttl(&self, keys: &[&str]) -> Result<Vec<Option<StoredEntry>>> {
        let mut found = self.new.get_many_with_ttl(keys).await?;
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        let missing_keys: Vec<&str> = missing.iter().map(|&i| keys[i]).collect();
        let from_old = self.old.get_many_with_ttl(&missing_keys).await?;
        for (&index, entry) in missing.iter().zip(from_old) {
            if let Some(entry) = &entry {
                self.backfill(keys[index], entry).await;
            }
            found[index] = entry;
        }
        Ok(found)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        self.new.set(key, value.clone(), ttl).await?;
        self.old.set(key, value, ttl).await
    }

    async fn set_many(&self, writes: &[StoreWrite<'_>]) -> Result<()> {
        self.new.set_many(writes).await?;
        self.old.set_many(writes).await
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        // A live entry in either backend means the key is taken.
        if let Some(entry) = self.old.get_with_ttl(key).await? {
            self.backfill(key, &entry).await;
            return Ok(false);
        }
        if !self.new.set_if_absent(key, value.clone(), ttl).await? {
            return Ok(false);
        }
        self.old.set(key, value, ttl).await?;
        Ok(true)
    }

    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        let in_new = self.new.replace(key, value.clone(), ttl).await?;
        let in_old = self.old.replace(key, value, ttl).await?;
        Ok(in_new.or(in_old))
    }

    /// Atomic within each backend: decided by the new one, or by the old one for an entry that
    /// is still only there. The other backend follows on a condition too (the same bytes, or no
    /// entry), so that a write that reached it meanwhile (another instance's delete) stays.
    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        if self.new.compare_and_set(key, current, new.clone()).await? {
            self.old.compare_and_set(key, current, new).await?;
            return Ok(true);
        }
        if self.new.get(key).await?.is_some()
            || !self.old.compare_and_set(key, current, new.clone()).await?
        {
            return Ok(false);
        }
        if let Some((value, ttl)) = new {
            self.new.set_if_absent(key, value, ttl).await?;
        }
        Ok(true)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let in_new = self.new.delete(key).await?;
        let in_old = self.old.delete(key).await?;
        Ok(in_new || in_old)
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let in_new = self.new.delete_many(keys).await?;
        let in_old = self.old.delete_many(keys).await?;
        Ok(in_new.max(in_old))
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.new.exists(key).await? || self.old.exists(key).await?)
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        let in_new = self.new.expire(key, ttl).await?;
        let in_old = self.old.expire(key, ttl).await?;
        Ok(in_new || in_old)
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        match self.new.ttl(key).await? {
            Some(ttl) => Ok(Some(ttl)),
            None => self.old.ttl(key).await,
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let in_new = self.new.delete_prefix(prefix).await?;
        let in_old = self.old.delete_prefix(prefix).await?;
        Ok(in_new.max(in_old))
    }

    async fn sweep_expired(&self) -> Result<u64> {
        Ok(self.new.sweep_expired().await? + self.old.sweep_expired().await?)
    }

    async fn ping(&self) -> Result<()> {
        self.new.ping().await?;
        self.old.ping().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tierstack_core::testkit::MemoryStore;

    use super::*;

    /// A store that runs a hook right after its next `get`: another instance's write landing
    /// between two steps of a decorator.
    #[derive(Debug)]
    struct AfterGet {
        inner: MemoryStore,
        hook: Mutex<Option<Bytes>>,
    }

    #[async_trait]
    impl Store for AfterGet {
        async fn get(&self, key: &str) -> Result<Option<Bytes>> {
            let found = self.inner.get(key).await?;
            let landing = self
                .hook
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(bytes) = landing {
                self.inner.put_raw(key, bytes, Duration::from_secs(60));
            }
            Ok(found)
        }
        async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
            self.inner.set(key, value, ttl).await
        }
        async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
            self.inner.set_if_absent(key, value, ttl).await
        }
        async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
            self.inner.replace(key, value, ttl).await
        }
        async fn compare_and_set(
            &self,
            key: &str,
            current: &[u8],
            new: Option<(Bytes, Duration)>,
        ) -> Result<bool> {
            self.inner.compare_and_set(key, current, new).await
        }
        async fn delete(&self, key: &str) -> Result<bool> {
            self.inner.delete(key).await
        }
        async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
            self.inner.expire(key, ttl).await
        }
        async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
            self.inner.ttl(key).await
        }
        async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
            self.inner.delete_prefix(prefix).await
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    /// The old backend alone holds what a load saw; another instance's delete reaches the new
    /// backend while the migrating store is deciding. The loaded value wins in the old backend
    /// but must not overwrite the delete's marker in the new one (it used to: a plain `set`).
    #[tokio::test]
    async fn a_conditional_write_never_overwrites_what_landed_meanwhile() {
        let ttl = Duration::from_secs(60);
        let old = Arc::new(MemoryStore::new());
        old.put_raw("k", Bytes::from_static(b"seen"), ttl);
        let new = Arc::new(AfterGet {
            inner: MemoryStore::new(),
            hook: Mutex::new(Some(Bytes::from_static(b"deleted meanwhile"))),
        });
        let store = MigratingStore::new(old.clone(), new.clone());
        let loaded = Some((Bytes::from_static(b"loaded"), ttl));
        assert!(store.compare_and_set("k", b"seen", loaded).await.unwrap());
        assert_eq!(
            new.inner.get("k").await.unwrap().as_deref(),
            Some(&b"deleted meanwhile"[..])
        );
        assert_eq!(old.get("k").await.unwrap().as_deref(), Some(&b"loaded"[..]));
    }
}
