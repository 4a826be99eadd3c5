//! A persistent map from a key to a handle of an expensive remote resource (seed 000: a Gemini
//! cached-content name per user), shared by every instance and surviving restarts.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tierstack_core::{BoxError, CacheError, Result, Store};

/// The remote side of a [`HandleMap`]: what creates, checks and deletes the resources.
#[async_trait]
pub trait Remote: Send + Sync + 'static {
    /// Creates the resource of `key`; returns its handle (a name, an id).
    async fn create(&self, key: &str) -> std::result::Result<String, BoxError>;
    /// Whether the resource behind `handle` still exists.
    async fn exists(&self, handle: &str) -> std::result::Result<bool, BoxError>;
    /// Deletes the resource behind `handle`.
    async fn delete(&self, handle: &str) -> std::result::Result<(), BoxError>;
}

const PENDING: &[u8] = b"\0pending";

/// Keys to handles of remote resources, kept in a [`Store`] (Firestore, Redis) so that every
/// instance shares them and a restart forgets nothing.
///
/// - **Created once**: the first instance to miss claims the key with `set_if_absent` (a
///   short-lived "pending" marker) and creates the resource; the others wait for its handle.
///   If the creator dies, its claim expires and another instance takes over.
/// - **Validated**: a stored handle whose resource no longer exists is replaced.
/// - **Cleaned up**: [`HandleMap::release`] deletes the remote resource of an expired entry,
///   from a store's sweep callback (Firestore's `sweep_expired_with`).
pub struct HandleMap<R> {
    store: Arc<dyn Store>,
    remote: Arc<R>,
    ttl: Duration,
    claim_ttl: Duration,
}

impl<R> fmt::Debug for HandleMap<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandleMap")
            .field("store", &self.store)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl<R: Remote> HandleMap<R> {
    /// Handles kept in `store` for `ttl`; a creation may take up to `claim_ttl` before another
    /// instance assumes its creator died.
    pub fn new(store: Arc<dyn Store>, remote: Arc<R>, ttl: Duration, claim_ttl: Duration) -> Self {
        Self {
            store,
            remote,
            ttl,
            claim_ttl,
        }
    }

    /// The handle of `key`: the stored one if its resource still exists, else a new one,
    /// created by exactly one of the instances that ask at the same moment.
    pub async fn get_or_create(&self, key: &str) -> Result<String> {
        let deadline = Instant::now() + self.claim_ttl * 3;
        loop {
            match self.store.get(key).await? {
                Some(stored) if stored.as_ref() == PENDING => {
                    // Another instance is creating it.
                    if Instant::now() > deadline {
                        return Err(CacheError::Timeout {
                            operation: "handle creation by another instance",
                            after: self.claim_ttl * 3,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(stored) => {
                    let handle =
                        String::from_utf8(stored.to_vec()).map_err(CacheError::serialization)?;
                    if self
                        .remote
                        .exists(&handle)
                        .await
                        .map_err(CacheError::Loader)?
                    {
                        return Ok(handle);
                    }
                    // The resource is gone (expired remotely, deleted by hand): forget it.
                    self.store.delete(key).await?;
                }
                None => {
                    if self
                        .store
                        .set_if_absent(key, Bytes::from_static(PENDING), self.claim_ttl)
                        .await?
                    {
                        return self.create(key).await;
                    }
                }
            }
        }
    }

    async fn create(&self, key: &str) -> Result<String> {
        match self.remote.create(key).await {
            Ok(handle) => {
                self.store
                    .set(key, Bytes::from(handle.clone()), self.ttl)
                    .await?;
                Ok(handle)
            }
            Err(error) => {
                // Release the claim so that the next caller tries again at once.
                let _ = self.store.delete(key).await;
                Err(CacheError::Loader(error))
            }
        }
    }

    /// Deletes the handle of `key` and its remote resource.
    pub async fn remove(&self, key: &str) -> Result<bool> {
        let Some(stored) = self.store.get(key).await? else {
            return Ok(false);
        };
        if stored.as_ref() != PENDING {
            let handle = String::from_utf8_lossy(&stored).into_owned();
            self.remote
                .delete(&handle)
                .await
                .map_err(CacheError::Loader)?;
        }
        self.store.delete(key).await
    }

    /// The remote deletion of an expired entry's handle, for a store's sweep callback:
    /// `store.sweep_expired_with(|entry| map.release(entry.value))`.
    pub fn release(
        &self,
        stored: Bytes,
    ) -> impl Future<Output = std::result::Result<(), BoxError>> + Send + 'static {
        let remote = Arc::clone(&self.remote);
        async move {
            if stored.as_ref() == PENDING {
                return Ok(());
            }
            let handle = String::from_utf8_lossy(&stored).into_owned();
            remote.delete(&handle).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use tierstack_core::testkit::MemoryStore;

    /// A remote that counts creations and can lose resources.
    #[derive(Default)]
    struct FakeRemote {
        live: Mutex<HashSet<String>>,
        created: Mutex<u32>,
    }

    #[async_trait]
    impl Remote for FakeRemote {
        async fn create(&self, key: &str) -> std::result::Result<String, BoxError> {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let mut created = self.created.lock().unwrap();
            *created += 1;
            let handle = format!("cachedContents/{key}-{created}");
            self.live.lock().unwrap().insert(handle.clone());
            Ok(handle)
        }

        async fn exists(&self, handle: &str) -> std::result::Result<bool, BoxError> {
            Ok(self.live.lock().unwrap().contains(handle))
        }

        async fn delete(&self, handle: &str) -> std::result::Result<(), BoxError> {
            self.live.lock().unwrap().remove(handle);
            Ok(())
        }
    }

    fn map(store: &Arc<MemoryStore>, remote: &Arc<FakeRemote>) -> HandleMap<FakeRemote> {
        HandleMap::new(
            store.clone(),
            remote.clone(),
            Duration::from_secs(3600),
            Duration::from_secs(5),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_instances_create_one_resource() {
        let store = Arc::new(MemoryStore::new());
        let remote = Arc::new(FakeRemote::default());
        let instances: Vec<_> = (0..8)
            .map(|_| {
                let map = map(&store, &remote);
                tokio::spawn(async move { map.get_or_create("acct1_user1").await.unwrap() })
            })
            .collect();
        let mut handles = HashSet::new();
        for instance in instances {
            handles.insert(instance.await.unwrap());
        }
        assert_eq!(handles.len(), 1, "{handles:?}");
        assert_eq!(*remote.created.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_lost_resource_is_recreated_and_removal_deletes_it() {
        let store = Arc::new(MemoryStore::new());
        let remote = Arc::new(FakeRemote::default());
        let map = map(&store, &remote);
        let first = map.get_or_create("k").await.unwrap();
        remote.delete(&first).await.unwrap();
        let second = map.get_or_create("k").await.unwrap();
        assert_ne!(first, second);
        assert!(map.remove("k").await.unwrap());
        assert!(!remote.exists(&second).await.unwrap());
    }
}
