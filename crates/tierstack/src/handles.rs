//! A persistent map from a key to a handle of an expensive remote resource (a Gemini
//! cached-content name per user, say), shared by every instance and surviving restarts.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tierstack_core::clock::{Clock, SystemClock};
use tierstack_core::envelope::{self, Envelope};
use tierstack_core::{BincodeCodec, BoxError, CacheError, Codec, Result, Store};

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

/// The claim marker of versions that stored raw bytes; still read, as a claim.
const LEGACY_PENDING: &[u8] = b"\0pending";

/// The largest entry a handle map reads (a handle is a name or an id).
const MAX_ENTRY_LEN: usize = 64 * 1024;

/// What a [`HandleMap`] keeps under a key, inside the cache's envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Entry {
    /// An instance is creating the resource. The token fences it: only the holder of this very
    /// claim may replace it with its handle.
    Claimed { token: u64 },
    /// The handle of the resource.
    Handle(String),
}

impl Entry {
    fn encode(&self, ttl: Duration) -> Result<Bytes> {
        let now = SystemClock.now();
        envelope::encode(
            &BincodeCodec::default(),
            Some(self),
            now,
            now.saturating_add(ttl),
            MAX_ENTRY_LEN,
        )
    }

    /// Reads an entry; raw bytes of earlier versions read as a claim or a handle, and
    /// anything else as `None`.
    fn decode(bytes: &[u8]) -> Option<Self> {
        if let Ok(envelope) = Envelope::parse::<BincodeCodec>(bytes, MAX_ENTRY_LEN) {
            // A handle map never seals its entries: sealed bytes are not its own.
            if envelope.negative || envelope.tombstone || envelope.is_sealed() {
                return None;
            }
            return BincodeCodec::default().decode(envelope.payload).ok();
        }
        if bytes == LEGACY_PENDING {
            return Some(Self::Claimed { token: 0 });
        }
        std::str::from_utf8(bytes)
            .ok()
            .map(|handle| Self::Handle(handle.to_owned()))
    }
}

/// Keys to handles of remote resources, kept in a [`Store`] (Firestore, Redis) so that every
/// instance shares them and a restart forgets nothing.
///
/// - **Created once**: the first instance to miss claims the key with `set_if_absent` (a
///   short-lived claim carrying a random token) and creates the resource; the others wait for
///   its handle. If the creator dies, its claim expires and another instance takes over.
/// - **Fenced**: a creator stores its handle only over its own claim (`compare_and_set`). One
///   that was too slow (its claim expired and another instance took over) deletes the resource
///   it created and takes its successor's handle: exactly one resource per key survives.
/// - **Validated**: a stored handle whose resource no longer exists is replaced.
/// - **Cleaned up**: [`HandleMap::release`] deletes the remote resource of an expired entry,
///   from a store's sweep callback (Firestore's `sweep_expired_with`). Give resources a time to
///   live of their own, no longer than the map's (Gemini's cached contents take one): nothing
///   releases an entry that expires on Redis (the server drops it), nor one that Firestore's
///   `set_if_absent` replaces, expired, before a sweep reached it.
///
/// Entries are the cache's envelope around a claim or a handle; raw handles written by earlier
/// versions still read.
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

/// What one look at a key decided.
enum Step {
    Done(String),
    Again,
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
    ///
    /// # Errors
    ///
    /// The store's errors; the remote's, as [`CacheError::Loader`]; a
    /// [`CacheError::Timeout`] when another instance's creation takes more than three claim
    /// times.
    pub async fn get_or_create(&self, key: &str) -> Result<String> {
        let deadline = Instant::now() + self.claim_ttl * 3;
        loop {
            if let Step::Done(handle) = self.step(key, deadline).await? {
                return Ok(handle);
            }
        }
    }

    /// The handle of `key` if one is stored and its resource still exists; `None` otherwise,
    /// creating nothing (a request path that would rather go without the resource than wait
    /// for its creation, while [`get_or_create`](Self::get_or_create) runs elsewhere). A
    /// handle whose resource is gone is forgotten, as `get_or_create` would; a key being
    /// created by another instance reads as `None`. It waits for the store and for the
    /// remote's `exists` (bound that call in [`Remote`] if the remote can hang).
    ///
    /// # Errors
    ///
    /// The store's errors; the remote's, as [`CacheError::Loader`].
    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        let Some(stored) = self.store.get(key).await? else {
            return Ok(None);
        };
        let Some(Entry::Handle(handle)) = Entry::decode(&stored) else {
            return Ok(None);
        };
        if self
            .remote
            .exists(&handle)
            .await
            .map_err(CacheError::Loader)?
        {
            return Ok(Some(handle));
        }
        // Only this entry: a handle stored since (a new creation) stays. Best effort: the
        // answer is known, and the next lookup or creation forgets it if this one fails.
        if let Err(error) = self.store.compare_and_set(key, &stored, None).await {
            tracing::debug!(error = %error, "could not forget a handle whose resource is gone");
        }
        Ok(None)
    }

    async fn step(&self, key: &str, deadline: Instant) -> Result<Step> {
        let stored = self.store.get(key).await?;
        let entry = stored.as_deref().map(Entry::decode);
        match (stored, entry) {
            (Some(_), Some(Some(Entry::Claimed { .. }))) => {
                // Another instance is creating it.
                if Instant::now() > deadline {
                    return Err(CacheError::Timeout {
                        operation: "handle creation by another instance",
                        after: self.claim_ttl * 3,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Step::Again)
            }
            (Some(bytes), Some(Some(Entry::Handle(handle)))) => {
                if self
                    .remote
                    .exists(&handle)
                    .await
                    .map_err(CacheError::Loader)?
                {
                    return Ok(Step::Done(handle));
                }
                // The resource is gone (expired remotely, deleted by hand): forget this entry,
                // and only this one.
                self.store.compare_and_set(key, &bytes, None).await?;
                Ok(Step::Again)
            }
            (seen, _) => {
                // No entry, or bytes that are none: claim the key.
                let claim = Entry::Claimed {
                    token: envelope::tombstone_nonce(),
                }
                .encode(self.claim_ttl)?;
                let claimed = match &seen {
                    None => {
                        self.store
                            .set_if_absent(key, claim.clone(), self.claim_ttl)
                            .await?
                    }
                    Some(bytes) => {
                        let new = Some((claim.clone(), self.claim_ttl));
                        self.store.compare_and_set(key, bytes, new).await?
                    }
                };
                if !claimed {
                    return Ok(Step::Again);
                }
                self.create(key, &claim).await
            }
        }
    }

    /// Creates the resource under the claim `claim`, and stores its handle over that claim.
    async fn create(&self, key: &str, claim: &Bytes) -> Result<Step> {
        let handle = match self.remote.create(key).await {
            Ok(handle) => handle,
            Err(error) => {
                // Give up the claim (only ours) so that the next caller tries again at once.
                let _ = self.store.compare_and_set(key, claim, None).await;
                return Err(CacheError::Loader(error));
            }
        };
        let stored = Entry::Handle(handle.clone()).encode(self.ttl)?;
        match self
            .store
            .compare_and_set(key, claim, Some((stored, self.ttl)))
            .await
        {
            Ok(true) => Ok(Step::Done(handle)),
            Ok(false) => {
                // The claim expired and another instance took over: the resource just created
                // is nobody's. Delete it and take the successor's.
                self.discard(&handle).await;
                Ok(Step::Again)
            }
            Err(error) => {
                // The handle may or may not be stored. Deleting the resource leaks nothing: a
                // stored handle whose resource is gone is replaced on its next read.
                self.discard(&handle).await;
                Err(error)
            }
        }
    }

    async fn discard(&self, handle: &str) {
        if let Err(error) = self.remote.delete(handle).await {
            tracing::warn!(error = %error, "could not delete a superseded remote resource");
        }
    }

    /// Deletes the handle of `key` and its remote resource.
    ///
    /// # Errors
    ///
    /// The store's errors; the remote's, as [`CacheError::Loader`] (the entry then stays).
    pub async fn remove(&self, key: &str) -> Result<bool> {
        let Some(stored) = self.store.get(key).await? else {
            return Ok(false);
        };
        if let Some(Entry::Handle(handle)) = Entry::decode(&stored) {
            self.remote
                .delete(&handle)
                .await
                .map_err(CacheError::Loader)?;
        }
        // Only what was read: a handle stored since (a new creation) stays.
        self.store.compare_and_set(key, &stored, None).await
    }

    /// The remote deletion of an expired entry's handle, for a store's sweep callback:
    /// `store.sweep_expired_with(|entry| map.release(entry.value))`.
    pub fn release(
        &self,
        stored: Bytes,
    ) -> impl Future<Output = std::result::Result<(), BoxError>> + Send + 'static {
        let remote = Arc::clone(&self.remote);
        async move {
            match Entry::decode(&stored) {
                Some(Entry::Handle(handle)) => remote.delete(&handle).await,
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use tierstack_core::testkit::MemoryStore;

    /// A remote that counts creations and can lose resources. With a gate, its first creation
    /// says it started and waits for the gate.
    #[derive(Default)]
    struct FakeRemote {
        live: Mutex<HashSet<String>>,
        created: Mutex<u32>,
        gate: Option<(tokio::sync::Notify, tokio::sync::Notify)>,
        gated: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Remote for FakeRemote {
        async fn create(&self, key: &str) -> std::result::Result<String, BoxError> {
            if let Some((started, open)) = &self.gate
                && !self.gated.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                started.notify_one();
                open.notified().await;
            }
            // real time: a slow remote, so that instances overlap; one resource in any order.
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

    /// A creator stalls past its claim; another instance takes over and stores its handle. The
    /// slow creator must not overwrite it: it deletes what it created and answers with its
    /// successor's handle. Exactly one resource survives. (The slow creator used to overwrite
    /// the handle, leaking its successor's resource.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_creator_that_outlived_its_claim_hands_over() {
        let clock = tierstack_core::clock::ManualClock::new();
        let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        let remote = Arc::new(FakeRemote {
            gate: Some((tokio::sync::Notify::new(), tokio::sync::Notify::new())),
            ..FakeRemote::default()
        });
        let slow = {
            let map = map(&store, &remote);
            tokio::spawn(async move { map.get_or_create("k").await })
        };
        let (started, open) = remote.gate.as_ref().unwrap();
        tokio::time::timeout(Duration::from_secs(5), started.notified())
            .await
            .expect("the first creation starts");
        clock.advance(Duration::from_secs(6)); // past the 5 s claim
        let successor = map(&store, &remote).get_or_create("k").await.unwrap();
        open.notify_one();
        let slow = slow.await.unwrap().unwrap();
        assert_eq!(
            slow, successor,
            "the slow creator takes its successor's handle"
        );
        assert_eq!(*remote.created.lock().unwrap(), 2);
        assert_eq!(
            *remote.live.lock().unwrap(),
            HashSet::from([successor.clone()]),
            "the superseded resource was deleted"
        );
        assert_eq!(
            map(&store, &remote).get_or_create("k").await.unwrap(),
            successor
        );
    }

    /// A lookup creates nothing: `None` before any creation and while another instance holds
    /// the claim, the handle once stored, and `None` again (the entry forgotten) once the
    /// resource is gone.
    #[tokio::test]
    async fn a_lookup_creates_nothing_and_forgets_a_lost_resource() {
        let store = Arc::new(MemoryStore::new());
        let remote = Arc::new(FakeRemote::default());
        let map = map(&store, &remote);
        assert_eq!(map.get("k").await.unwrap(), None);
        assert_eq!(
            *remote.created.lock().unwrap(),
            0,
            "a lookup creates nothing"
        );
        let claim = Entry::Claimed { token: 7 }
            .encode(Duration::from_secs(5))
            .unwrap();
        store.set("k", claim, Duration::from_secs(5)).await.unwrap();
        assert_eq!(map.get("k").await.unwrap(), None, "being created elsewhere");
        store.delete("k").await.unwrap();
        let handle = map.get_or_create("k").await.unwrap();
        assert_eq!(map.get("k").await.unwrap(), Some(handle.clone()));
        remote.delete(&handle).await.unwrap();
        assert_eq!(map.get("k").await.unwrap(), None);
        assert_eq!(
            store.get("k").await.unwrap(),
            None,
            "the lost handle is forgotten"
        );
        assert_eq!(*remote.created.lock().unwrap(), 1);
    }

    /// Handles written by earlier versions (raw bytes) still read, and a sweep releases them.
    #[tokio::test]
    async fn raw_handles_of_earlier_versions_still_read() {
        let store = Arc::new(MemoryStore::new());
        let remote = Arc::new(FakeRemote::default());
        remote
            .live
            .lock()
            .unwrap()
            .insert("cachedContents/old".into());
        store.put_raw("k", &b"cachedContents/old"[..], Duration::from_secs(60));
        let map = map(&store, &remote);
        assert_eq!(map.get_or_create("k").await.unwrap(), "cachedContents/old");
        map.release(Bytes::from_static(b"cachedContents/old"))
            .await
            .unwrap();
        assert!(remote.live.lock().unwrap().is_empty());
        map.release(Bytes::from_static(LEGACY_PENDING))
            .await
            .unwrap();
    }
}
