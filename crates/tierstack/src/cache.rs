//! `TieredCache`: L1, then L2, then the loader.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::{BackplaneEvent, Invalidation, Subscription};
use tierstack_core::clock::SharedClock;
use tierstack_core::envelope::{self, Envelope};
use tierstack_core::key::{Namespace, fingerprint, validate_key};
use tierstack_core::store::{MAX_TTL, StoreWrite, StoredEntry, validate_ttl};
use tierstack_core::{Backplane, BincodeCodec, BoxError, CacheError, Codec, Result, Store};
use tierstack_moka::L1Cache;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::builder::TieredCacheBuilder;
use crate::burst_log::BurstLog;
use crate::fill::FillBudget;
use crate::flight::{Absent, FlightHandle, LoadFailure, Loader, LoaderPanicked, Outcome};
use crate::freshness::{Freshness, Snapshot};
use crate::key_buffer::BufferedKey;
use crate::stats::{CacheStats, L2Op, Recorder};

/// A two-level read-through cache of `V`: a typed in-process L1 over an optional shared L2
/// [`Store`], kept fresh across instances by an optional [`Backplane`].
///
/// - Reads try L1, then L2 (filling L1 with the L2 entry's remaining TTL), then the loader
///   (writing both tiers). Concurrent misses of one key run one loader call.
/// - Writes go to L2, then L1, then an invalidation is published to the other instances.
/// - An L2 that fails or is slow does not fail a read that L1 or the loader can serve: the error is
///   counted and logged once per burst.
///
/// Cloning is cheap and clones share everything.
pub struct TieredCache<V, C = BincodeCodec> {
    pub(crate) inner: Arc<Inner<V, C>>,
}

impl<V, C> Clone for TieredCache<V, C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V, C: fmt::Debug> fmt::Debug for TieredCache<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredCache")
            .field("namespace", &self.inner.namespace)
            .field("l1", &self.inner.l1.is_some())
            .field("l2", &self.inner.l2)
            .field("backplane", &self.inner.backplane)
            .field("codec", &self.inner.codec)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) default_ttl: Duration,
    pub(crate) l1_ttl: Option<Duration>,
    pub(crate) jitter: f64,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) max_key_len: usize,
    pub(crate) max_value_len: usize,
    pub(crate) l2_timeout: Duration,
}

pub(crate) struct Inner<V, C> {
    pub(crate) namespace: Namespace,
    pub(crate) l1: Option<L1Cache<V>>,
    pub(crate) l2: Option<Arc<dyn Store>>,
    /// Whether L2 bounds its single-key calls within `settings.l2_timeout` itself.
    pub(crate) l2_bounds_single_keys: bool,
    /// Whether the backplane bounds a write and its publish within `l2_timeout` itself.
    pub(crate) backplane_bounds_writes: bool,
    pub(crate) backplane: Option<Arc<dyn Backplane>>,
    pub(crate) codec: C,
    pub(crate) clock: SharedClock,
    pub(crate) settings: Settings,
    pub(crate) flights: Mutex<HashMap<String, FlightHandle<V>>>,
    pub(crate) next_flight: AtomicU64,
    pub(crate) freshness: Freshness,
    /// The budget of background L2 fills; `None` when fills are written inline.
    pub(crate) fill_budget: Option<FillBudget>,
    pub(crate) recorder: Recorder,
    pub(crate) l2_failures: BurstLog,
    pub(crate) listener: Mutex<Option<AbortHandle>>,
}

impl<V, C> Drop for Inner<V, C> {
    fn drop(&mut self) {
        let listener = self
            .listener
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = listener.take() {
            handle.abort();
        }
    }
}

/// What became of a loaded value's L2 write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Yes,
    /// Not written: another writer had the key, or it changed since the load began.
    No,
    /// The L2 call failed.
    Failed,
}

/// A read of L2 answered without waiting, or the store key to await it with.
enum L2Now<V> {
    Answered(Result<L2Read<V>>),
    Await(BufferedKey),
}

/// What an L2 read found.
enum L2Read<V> {
    /// A value or a negative entry, with its remaining time to live.
    Hit(Option<V>, Duration),
    Miss,
}

impl<V> TieredCache<V, BincodeCodec>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    /// Starts building a cache whose keys live under `namespace` (`[A-Za-z0-9_.-]`, up to 128
    /// bytes). Caches sharing an L2 must use distinct namespaces unless they hold the same data.
    pub fn builder(namespace: &str) -> TieredCacheBuilder<V, BincodeCodec> {
        TieredCacheBuilder::new(namespace)
    }
}

impl<V, C> TieredCache<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// The value under `key` from L1 or L2, or `None`. An L2 failure reads as a miss (counted).
    ///
    /// Plain reads go to L2 directly: coalescing protects the origin, which only
    /// [`get_or_load`](Self::get_or_load) calls.
    pub async fn get(&self, key: &str) -> Result<Option<V>> {
        let inner = &self.inner;
        inner.check_key(key)?;
        if inner.l1.is_none() {
            // Without an L1 there is nothing to fill: read L2 directly. (`read_l2`, spelled out:
            // its async layer cost an in-memory read about 2 % more instructions.)
            let read = match inner.read_l2_now(key) {
                L2Now::Answered(read) => read,
                L2Now::Await(store_key) => inner.read_l2_awaiting(key, &store_key).await,
            };
            if let Ok(L2Read::Hit(value, _)) = read {
                inner.recorder.l2_hit();
                return Ok(value);
            }
        } else {
            if let Some(hit) = inner.l1_get(key).await {
                return Ok(hit);
            }
            if let Ok(Some(hit)) = inner.l2_lookup(key).await {
                return Ok(hit);
            }
        }
        // A miss, or an L2 failure (counted and logged) read as one.
        inner.recorder.miss();
        Ok(None)
    }

    /// The value under `key`, loading it with `loader` on a miss of both tiers and writing it to
    /// both with the default TTL.
    ///
    /// Concurrent calls for one key run the loader once; every caller receives its value or its
    /// error, and errors are not cached. The first caller runs the loader itself, without
    /// spawning a task: if that caller is cancelled, a waiting caller takes over with its own
    /// loader, and a loader that panics fails every waiter with [`LoaderPanicked`] instead of
    /// hanging them.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, loader: F) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<V, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let optional = move || async move { loader().await.map(Some) };
        match self.get_or_load_optional(key, optional).await? {
            Some(value) => Ok(value),
            None => Err(CacheError::Loader(Box::new(Absent))),
        }
    }

    /// Like [`get_or_load`](Self::get_or_load) for origins that may have no value: the loader
    /// answers `Ok(None)`, and with [`negative_ttl`](TieredCacheBuilder::negative_ttl) set that
    /// answer is cached too.
    pub async fn get_or_load_optional<F, Fut, E>(&self, key: &str, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let inner = &self.inner;
        inner.check_key(key)?;
        if let Some(hit) = inner.l1_get(key).await {
            return Ok(hit);
        }
        // An L2 hit needs no flight: only a miss of both tiers (or a failed L2) reaches the
        // origin.
        if let Ok(Some(hit)) = inner.l2_lookup(key).await {
            return Ok(hit);
        }
        let loader: Loader<V> =
            Box::new(move || Box::pin(async move { loader().await.map_err(Into::into) }));
        match inner.flight(key, loader).await {
            Outcome::Found(value) => Ok(Some(value)),
            Outcome::Absent => Ok(None),
            Outcome::Failed(failure) => Err(CacheError::Loader(Box::new(failure))),
            // `flight` never returns it: waiters of an abandoned flight lead a new one.
            Outcome::Abandoned => Err(CacheError::Loader(Box::new(LoaderPanicked))),
        }
    }

    /// The values under `keys`, in order, from L1 and then from L2 in one round trip.
    pub async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<V>>> {
        let found = self.inner.lookup_many(keys).await?;
        Ok(found.into_iter().map(Option::flatten).collect())
    }

    /// The values under `keys`, in order: from L1, then from L2 in one round trip, then from one
    /// call of `loader` with the keys still missing (each once). Keys the loader leaves out of its
    /// map have no value (and are negatively cached if configured). Loaded values are written to
    /// both tiers.
    pub async fn get_or_load_many<F, Fut, E>(
        &self,
        keys: &[&str],
        loader: F,
    ) -> Result<Vec<Option<V>>>
    where
        F: FnOnce(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<HashMap<String, V>, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let mut found = self.inner.lookup_many(keys).await?;
        let mut seen = HashSet::new();
        let missing: Vec<String> = keys
            .iter()
            .zip(&found)
            .filter(|(key, hit)| hit.is_none() && seen.insert(**key))
            .map(|(key, _)| (*key).to_owned())
            .collect();
        if missing.is_empty() {
            return Ok(found.into_iter().map(Option::flatten).collect());
        }
        let snapshots: Vec<Snapshot> = missing
            .iter()
            .map(|key| self.inner.freshness.snapshot(key))
            .collect();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            match loader(missing.clone()).await {
                Ok(map) => Ok((missing, map)),
                Err(error) => Err(error.into()),
            }
        });
        let (missing, mut origin_values) = match task.await {
            Ok(Ok(result)) => {
                self.inner.recorder.load(true, started.elapsed());
                result
            }
            Ok(Err(error)) => {
                self.inner.recorder.load(false, started.elapsed());
                return Err(CacheError::Loader(error));
            }
            Err(_) => {
                self.inner.recorder.load(false, started.elapsed());
                return Err(CacheError::Loader(Box::new(LoaderPanicked)));
            }
        };
        let mut results: HashMap<String, Option<V>> = HashMap::with_capacity(missing.len());
        self.inner
            .store_loaded_many(&missing, &mut origin_values, &snapshots, &mut results)
            .await;
        for (key, slot) in keys.iter().zip(found.iter_mut()) {
            if slot.is_none() {
                *slot = Some(results.get(*key).cloned().flatten());
            }
        }
        Ok(found.into_iter().map(Option::flatten).collect())
    }

    /// Writes `value` under `key` with the default TTL: L2, then L1, then an invalidation to the
    /// other instances.
    pub async fn set(&self, key: &str, value: V) -> Result<()> {
        self.set_with_ttl(key, value, self.inner.settings.default_ttl)
            .await
    }

    /// Writes `value` under `key` for `ttl`.
    ///
    /// Bad input (an empty or long key, a TTL out of range, a value over the maximum) is refused
    /// before anything is written. If the L2 write fails, the error is returned and this
    /// instance's L1 entry is evicted, so that no tier serves a value the L2 does not hold.
    pub async fn set_with_ttl(&self, key: &str, value: V, ttl: Duration) -> Result<()> {
        let inner = &self.inner;
        inner.check_key(key)?;
        validate_ttl(ttl)?;
        let ttl = inner.jittered(ttl);
        let now = inner.clock.now();
        let bytes = envelope::encode(
            &inner.codec,
            Some(&value),
            now,
            now.saturating_add(ttl),
            inner.settings.max_value_len,
        )?;
        let invalidation = Invalidation::Keys(vec![key.to_owned()]);
        let _write = inner.freshness.lock_key(key).await;
        let mut published = false;
        if let Some(l2) = &inner.l2 {
            let store_key = inner.namespace.store_key(key);
            let written = match &inner.backplane {
                // The backplane orders the publish after the write (in one round trip when it
                // shares a connection with the store).
                Some(backplane) => {
                    let write = StoreWrite {
                        key: &store_key,
                        value: bytes,
                        ttl,
                    };
                    let namespace = inner.namespace.as_str();
                    let call =
                        backplane.write_then_publish(l2.as_ref(), write, namespace, &invalidation);
                    inner
                        .l2_backplane_write_call(call)
                        .await
                        .map(|publish_error| {
                            published = true;
                            if let Some(error) = publish_error {
                                inner.publish_failed(&error);
                            }
                        })
                }
                None => {
                    inner
                        .l2_single_key_call(L2Op::Set, l2.set(&store_key, bytes, ttl))
                        .await
                }
            };
            if let Err(error) = written {
                inner.evict_local(key).await;
                return Err(error);
            }
        }
        let snapshot = inner.freshness.bump_key(key);
        inner.fill_l1(key, Some(value), ttl, snapshot).await;
        if !published {
            inner.publish(invalidation).await;
        }
        Ok(())
    }

    /// Removes `key` from both tiers and tells the other instances; `true` if a tier held it.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let inner = &self.inner;
        inner.check_key(key)?;
        let _write = inner.freshness.lock_key(key).await;
        let in_l1 = match &inner.l1 {
            Some(l1) => l1.get(key).await.is_some(),
            None => false,
        };
        let l2_result = match &inner.l2 {
            Some(l2) => {
                let store_key = inner.namespace.store_key(key);
                inner
                    .l2_single_key_call(L2Op::Delete, l2.delete(&store_key))
                    .await
            }
            None => Ok(false),
        };
        inner.evict_local(key).await;
        inner
            .publish(Invalidation::Keys(vec![key.to_owned()]))
            .await;
        Ok(l2_result? || in_l1)
    }

    /// Removes every key that starts with `prefix` (literally) from both tiers and tells the other
    /// instances; returns how many L2 entries were removed. An empty prefix clears the namespace.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let inner = &self.inner;
        if prefix.len() > inner.settings.max_key_len {
            inner.check_key(prefix)?;
        }
        // Fills of loads that began before this call skip their L2 write from now on; the
        // barrier waits for those already writing, so the scan below sees (and removes) them.
        inner.freshness.bump_all();
        inner.freshness.wait_for_writes().await;
        let removed = match &inner.l2 {
            Some(l2) => {
                let store_prefix = inner.namespace.store_key(prefix);
                inner
                    .l2_call(L2Op::Delete, l2.delete_prefix(&store_prefix))
                    .await
            }
            None => Ok(0),
        };
        inner.freshness.bump_all();
        if let Some(l1) = &inner.l1 {
            l1.invalidate_prefix(prefix).await;
        }
        inner.publish(Invalidation::Prefix(prefix.to_owned())).await;
        removed
    }

    /// Whether a value exists under `key` in L1 or L2 (a negative entry does not count).
    pub async fn exists(&self, key: &str) -> Result<bool> {
        let inner = &self.inner;
        inner.check_key(key)?;
        if let Some(hit) = inner.l1_get(key).await {
            return Ok(hit.is_some());
        }
        match inner.read_l2(key).await? {
            L2Read::Hit(value, _) => Ok(value.is_some()),
            L2Read::Miss => Ok(false),
        }
    }

    /// The remaining time to live of `key`: L2's answer where there is an L2, else L1's.
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        let inner = &self.inner;
        inner.check_key(key)?;
        if let Some(l2) = &inner.l2 {
            let store_key = inner.namespace.store_key(key);
            return inner
                .l2_single_key_call(L2Op::Other, l2.ttl(&store_key))
                .await;
        }
        match &inner.l1 {
            Some(l1) => Ok(l1.ttl(key).await),
            None => Ok(None),
        }
    }

    /// Sets the remaining time to live of `key` to `ttl` in both tiers (a sliding expiry calls it
    /// on each access); `false` if there is no entry. Other instances evict their copy, so none
    /// serves it past a shortened deadline.
    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let inner = &self.inner;
        inner.check_key(key)?;
        validate_ttl(ttl)?;
        let _write = inner.freshness.lock_key(key).await;
        let local = match &inner.l1 {
            Some(l1) => l1.get(key).await,
            None => None,
        };
        let existed = match &inner.l2 {
            Some(l2) => {
                let store_key = inner.namespace.store_key(key);
                match inner
                    .l2_single_key_call(L2Op::Other, l2.expire(&store_key, ttl))
                    .await
                {
                    Ok(existed) => existed,
                    Err(error) => {
                        inner.evict_local(key).await;
                        return Err(error);
                    }
                }
            }
            None => local.is_some(),
        };
        let snapshot = inner.freshness.bump_key(key);
        match local {
            Some(entry) if existed => inner.fill_l1(key, entry.value, ttl, snapshot).await,
            _ => inner.evict_local(key).await,
        }
        inner
            .publish(Invalidation::Keys(vec![key.to_owned()]))
            .await;
        Ok(existed)
    }

    /// Waits until the L2 writes that [`get_or_load`](Self::get_or_load) left to background
    /// tasks (see [`L2Fill`](crate::L2Fill)) have finished: before a graceful shutdown, or before
    /// another process is expected to find the values in L2.
    pub async fn wait_for_background_fills(&self) {
        if let Some(budget) = &self.inner.fill_budget {
            budget.settle().await;
        }
    }

    /// Evicts `key` from this instance's L1 only (L2 and other instances are untouched).
    pub async fn invalidate_local(&self, key: &str) {
        let inner = &self.inner;
        inner.freshness.bump_local_key(key);
        if let Some(l1) = &inner.l1 {
            l1.invalidate(key).await;
        }
    }

    /// Evicts everything from this instance's L1 only.
    pub fn invalidate_local_all(&self) {
        self.inner.freshness.bump_local();
        if let Some(l1) = &self.inner.l1 {
            l1.invalidate_all();
        }
    }

    /// The counters of this cache since it was built.
    pub fn stats(&self) -> CacheStats {
        self.inner.recorder.snapshot()
    }

    /// The namespace of this cache.
    pub fn namespace(&self) -> &str {
        self.inner.namespace.as_str()
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    fn check_key(&self, key: &str) -> Result<()> {
        validate_key(key, self.settings.max_key_len)
    }

    /// The live L1 entry of `key`: `Some(Some(v))` a value, `Some(None)` a negative entry.
    async fn l1_get(&self, key: &str) -> Option<Option<V>> {
        let entry = self.l1.as_ref()?.get(key).await?;
        self.recorder.l1_hit();
        Some(entry.value)
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        if self.settings.jitter <= 0.0 {
            return ttl;
        }
        let extra = ttl.mul_f64(self.settings.jitter * fastrand::f64());
        (ttl + extra).min(MAX_TTL)
    }

    /// Inserts into L1 for at most `ttl` (capped by the L1 TTL), unless an invalidation of `key`
    /// came after `snapshot`: then whatever was inserted is evicted again.
    async fn fill_l1(&self, key: &str, value: Option<V>, ttl: Duration, snapshot: Snapshot) {
        let Some(l1) = &self.l1 else { return };
        let ttl = self.settings.l1_ttl.map_or(ttl, |cap| ttl.min(cap));
        let deadline = self.clock.now().saturating_add(ttl);
        l1.insert(key.to_owned(), value, deadline).await;
        if !self.freshness.is_current(snapshot) {
            l1.invalidate(key).await;
        }
    }

    async fn evict_local(&self, key: &str) {
        self.freshness.bump_key(key);
        if let Some(l1) = &self.l1 {
            l1.invalidate(key).await;
        }
    }

    /// Decodes an L2 entry: `Some(v)` a value, `None` a negative entry.
    fn decode_entry(&self, bytes: &[u8]) -> Result<Option<V>> {
        let envelope = Envelope::parse::<C>(bytes, self.settings.max_value_len)?;
        if envelope.negative {
            Ok(None)
        } else {
            self.codec.decode::<V>(envelope.payload).map(Some)
        }
    }

    /// Counts, logs and deletes an L2 entry that did not decode; the read goes on as a miss.
    async fn discard_corrupt(&self, key: &str, store_key: &str, error: CacheError) {
        self.recorder.corrupt_entry();
        tracing::warn!(
            cache = %self.namespace,
            key = %fingerprint(key),
            error = %error,
            "undecodable L2 entry read as a miss and deleted"
        );
        if let Some(l2) = &self.l2 {
            let _ = self
                .l2_single_key_call(L2Op::Delete, l2.delete(store_key))
                .await;
        }
    }

    /// Reads `key` from L2 and fills L1 on a hit: `Some(v)` a hit (`v` is `None` for a negative
    /// entry), `None` a miss. Counts the hit; a miss is counted by the caller.
    async fn l2_lookup(&self, key: &str) -> Result<Option<Option<V>>> {
        let snapshot = self.l1.as_ref().map(|_| self.freshness.snapshot(key));
        match self.read_l2(key).await? {
            L2Read::Hit(value, ttl) => {
                self.recorder.l2_hit();
                if let Some(snapshot) = snapshot {
                    self.fill_l1(key, value.clone(), ttl, snapshot).await;
                }
                Ok(Some(value))
            }
            L2Read::Miss => Ok(None),
        }
    }

    /// Reads `key` from a store that answers at once (an in-process one), with no boxed future
    /// and no async layers; otherwise hands back the store key for
    /// [`read_l2_awaiting`](Self::read_l2_awaiting) to await the read with. A corrupt entry is
    /// handed back too: the awaited read discards it.
    fn read_l2_now(&self, key: &str) -> L2Now<V> {
        let Some(l2) = &self.l2 else {
            return L2Now::Answered(Ok(L2Read::Miss));
        };
        let store_key = BufferedKey::new(&self.namespace, key);
        let found = if self.l1.is_some() {
            match l2.get_with_ttl_now(&store_key) {
                Some(found) => found.map(|found| found.map(|entry| (entry.value, entry.ttl))),
                None => return L2Now::Await(store_key),
            }
        } else {
            match l2.get_now(&store_key) {
                Some(found) => found.map(|found| found.map(|value| (value, Duration::ZERO))),
                None => return L2Now::Await(store_key),
            }
        };
        match self.l2_answered(L2Op::Get, found) {
            Err(error) => L2Now::Answered(Err(error)),
            Ok(None) => L2Now::Answered(Ok(L2Read::Miss)),
            Ok(Some((bytes, ttl))) => match self.decode_entry(&bytes) {
                Ok(value) => L2Now::Answered(Ok(L2Read::Hit(value, ttl))),
                Err(_) => L2Now::Await(store_key),
            },
        }
    }

    /// Reads and decodes `key` from L2: at once from a store that answers so, else awaiting it.
    async fn read_l2(&self, key: &str) -> Result<L2Read<V>> {
        match self.read_l2_now(key) {
            L2Now::Answered(read) => read,
            L2Now::Await(store_key) => self.read_l2_awaiting(key, &store_key).await,
        }
    }

    /// Reads and decodes `key` (under `store_key`) from L2, awaiting the store; a corrupt entry
    /// is discarded and reads as a miss.
    async fn read_l2_awaiting(&self, key: &str, store_key: &str) -> Result<L2Read<V>> {
        let Some(l2) = &self.l2 else {
            return Ok(L2Read::Miss);
        };
        // The remaining TTL only serves to fill L1: without one, a plain GET will do.
        let found = if self.l1.is_some() {
            self.l2_single_key_call(L2Op::Get, l2.get_with_ttl(store_key))
                .await?
                .map(|entry| (entry.value, entry.ttl))
        } else {
            self.l2_single_key_call(L2Op::Get, l2.get(store_key))
                .await?
                .map(|value| (value, Duration::ZERO))
        };
        let Some((bytes, ttl)) = found else {
            return Ok(L2Read::Miss);
        };
        match self.decode_entry(&bytes) {
            Ok(value) => Ok(L2Read::Hit(value, ttl)),
            Err(error) => {
                // Boxed, so that this rare path does not enlarge every read's future.
                Box::pin(self.discard_corrupt(key, store_key, error)).await;
                Ok(L2Read::Miss)
            }
        }
    }

    /// Runs `loader` as the flight of `key`, or waits for the flight already running.
    ///
    /// The first caller leads: it runs the load inline (no task, no extra wake-up) behind a
    /// guard. If the leader is cancelled or unwinds, the guard unregisters the flight and tells
    /// the waiters, and one of them leads again with its own loader: nobody is stranded.
    async fn flight(self: &Arc<Self>, key: &str, loader: Loader<V>) -> Outcome<V> {
        let mut loader = Some(loader);
        loop {
            match self.join_or_lead(key) {
                Role::Wait(mut receiver) => {
                    let outcome = match receiver.wait_for(Option::is_some).await {
                        Ok(outcome) => outcome.clone(),
                        Err(_) => None,
                    };
                    match outcome {
                        Some(Outcome::Abandoned) | None => {}
                        Some(outcome) => {
                            self.recorder.miss();
                            return outcome;
                        }
                    }
                }
                Role::Lead(mut guard) => {
                    let Some(loader) = loader.take() else {
                        // Unreachable: a caller leads at most once, and returns.
                        return Outcome::Failed(LoadFailure::new(Box::new(LoaderPanicked)));
                    };
                    let outcome = self.load(key, loader, guard.snapshot).await;
                    guard.complete(outcome.clone());
                    self.recorder.miss();
                    return outcome;
                }
            }
        }
    }

    fn lock_flights(&self) -> MutexGuard<'_, HashMap<String, FlightHandle<V>>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the running flight of `key`, or registers a new one led by the caller.
    fn join_or_lead<'a>(&'a self, key: &'a str) -> Role<'a, V, C> {
        let snapshot = self.freshness.snapshot(key);
        let mut flights = self.lock_flights();
        if let Some(running) = flights.get(key)
            && running.snapshot == snapshot
        {
            return Role::Wait(running.receiver.clone());
        }
        // No flight, or one that started before an invalidation of the key (it may carry the
        // old value): lead a new one.
        let (sender, receiver) = watch::channel(None);
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        flights.insert(
            key.to_owned(),
            FlightHandle {
                id,
                receiver,
                snapshot,
            },
        );
        Role::Lead(LeaderGuard {
            inner: self,
            key,
            id,
            snapshot,
            sender: Some(sender),
        })
    }

    /// The work of a flight: the loader, then caching what it answered. (Its callers have each
    /// just missed L2; a writer that stores the key meanwhile wins, through `set_if_absent`.)
    async fn load(
        self: &Arc<Self>,
        key: &str,
        loader: Loader<V>,
        snapshot: Snapshot,
    ) -> Outcome<V> {
        let started = Instant::now();
        // A panicking loader is caught here and becomes every waiter's error (the leader's
        // guard covers only cancellation and unwinding outside the loader).
        let result = match AssertUnwindSafe(loader()).catch_unwind().await {
            Ok(result) => result,
            Err(_) => Err(Box::new(LoaderPanicked) as BoxError),
        };
        self.recorder.load(result.is_ok(), started.elapsed());
        match result {
            Ok(Some(value)) => {
                self.store_loaded(key, Some(&value), self.settings.default_ttl, snapshot)
                    .await;
                Outcome::Found(value)
            }
            Ok(None) => {
                if let Some(ttl) = self.settings.negative_ttl {
                    self.store_loaded(key, None, ttl, snapshot).await;
                }
                Outcome::Absent
            }
            Err(error) => {
                tracing::warn!(cache = %self.namespace, key = %fingerprint(key), error = %error, "loader failed");
                Outcome::Failed(LoadFailure::new(error))
            }
        }
    }

    /// Caches a loaded value (or a negative entry) in both tiers.
    ///
    /// With a background fill and room in its budget, L1 is filled first and the L2 write is
    /// left to a task, so that the callers have the value one L2 round trip sooner. Otherwise
    /// the L2 write comes first, and L1 is filled only if it stored the value. An L2 that fails
    /// does not stop the L1 fill: L1 and the loader keep serving.
    async fn store_loaded(
        self: &Arc<Self>,
        key: &str,
        value: Option<&V>,
        ttl: Duration,
        snapshot: Snapshot,
    ) {
        let ttl = self.jittered(ttl);
        let now = self.clock.now();
        let bytes = match envelope::encode(
            &self.codec,
            value,
            now,
            now.saturating_add(ttl),
            self.settings.max_value_len,
        ) {
            Ok(bytes) => bytes,
            Err(error) => {
                // Served to the callers, but cached in neither tier.
                tracing::warn!(cache = %self.namespace, key = %fingerprint(key), error = %error, "loaded value not cached");
                return;
            }
        };
        let reserved = self
            .fill_budget
            .as_ref()
            .and_then(|budget| budget.try_reserve(bytes.len()));
        let runtime = reserved
            .as_ref()
            .and_then(|_| tokio::runtime::Handle::try_current().ok());
        if let (Some(reserved), Some(runtime)) = (reserved, runtime) {
            self.fill_l1(key, value.cloned(), ttl, snapshot).await;
            let this = Arc::clone(self);
            let key = key.to_owned();
            runtime.spawn(async move {
                if this.write_loaded(&key, bytes, ttl, snapshot).await == Written::No {
                    this.drop_unwritten_fill(&key, snapshot).await;
                }
                drop(reserved);
            });
            return;
        }
        if self.write_loaded(key, bytes, ttl, snapshot).await != Written::No {
            self.fill_l1(key, value.cloned(), ttl, snapshot).await;
        }
    }

    /// Writes a loaded entry to L2 with `set_if_absent`, under the key's write lock, unless the
    /// key was written or invalidated since `snapshot`.
    ///
    /// The lock orders this write before any later `set`, `delete` or `touch` of the key from
    /// this cache (they take it too, and bump the generation before they release it), and
    /// `delete_prefix` waits for every lock: so a fill never brings back what this cache
    /// deleted after the load began.
    async fn write_loaded(
        &self,
        key: &str,
        bytes: Bytes,
        ttl: Duration,
        snapshot: Snapshot,
    ) -> Written {
        let Some(l2) = &self.l2 else {
            return Written::Yes;
        };
        let _write = self.freshness.lock_key_of(snapshot).await;
        if !self.freshness.key_unchanged(snapshot) {
            return Written::No;
        }
        let store_key = self.namespace.store_key(key);
        let call = l2.set_if_absent(&store_key, bytes, ttl);
        match self.l2_single_key_call(L2Op::Set, call).await {
            Ok(true) => Written::Yes,
            // Another writer stored a value meanwhile; it is at least as new as ours, so let the
            // next read take it from L2.
            Ok(false) => Written::No,
            // Counted and logged; L1 and the loader keep serving.
            Err(_) => Written::Failed,
        }
    }

    /// Takes back the L1 fill of a background write that L2 did not take, unless the key has
    /// changed since (then whatever L1 holds is newer than the fill, or already gone).
    async fn drop_unwritten_fill(&self, key: &str, snapshot: Snapshot) {
        let Some(l1) = &self.l1 else { return };
        let _write = self.freshness.lock_key_of(snapshot).await;
        if self.freshness.is_current(snapshot) {
            l1.invalidate(key).await;
        }
    }

    /// L1 then one L2 round trip for `keys`: `Some(v)` per found key (`v` `None` for a negative
    /// entry), `None` where both tiers missed.
    async fn lookup_many(&self, keys: &[&str]) -> Result<Vec<Option<Option<V>>>> {
        for key in keys {
            self.check_key(key)?;
        }
        let mut found = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let hit = self.l1_get(key).await;
            if hit.is_none() {
                missing.push(index);
            }
            found.push(hit);
        }
        let Some(l2) = self.l2.as_ref().filter(|_| !missing.is_empty()) else {
            for _ in &missing {
                self.recorder.miss();
            }
            return Ok(found);
        };
        let snapshots: Vec<Snapshot> = missing
            .iter()
            .map(|&i| self.freshness.snapshot(keys[i]))
            .collect();
        let store_keys: Vec<String> = missing
            .iter()
            .map(|&i| self.namespace.store_key(keys[i]))
            .collect();
        let refs: Vec<&str> = store_keys.iter().map(String::as_str).collect();
        let read = if self.l1.is_some() {
            self.l2_call(L2Op::Get, l2.get_many_with_ttl(&refs)).await
        } else {
            // Without an L1 to fill, the remaining TTLs are not needed.
            self.l2_call(L2Op::Get, l2.get_many(&refs))
                .await
                .map(|values| {
                    values
                        .into_iter()
                        .map(|value| {
                            value.map(|value| StoredEntry {
                                value,
                                ttl: Duration::ZERO,
                            })
                        })
                        .collect()
                })
        };
        let entries = match read {
            Ok(entries) if entries.len() == refs.len() => entries,
            Ok(_) | Err(_) => vec![None; refs.len()],
        };
        for (((&index, entry), snapshot), store_key) in
            missing.iter().zip(entries).zip(snapshots).zip(&refs)
        {
            let key = keys[index];
            let read = match entry.map(|entry| (self.decode_entry(&entry.value), entry.ttl)) {
                Some((Ok(value), ttl)) => L2Read::Hit(value, ttl),
                Some((Err(error), _)) => {
                    self.discard_corrupt(key, store_key, error).await;
                    L2Read::Miss
                }
                None => L2Read::Miss,
            };
            match read {
                L2Read::Hit(value, ttl) => {
                    self.recorder.l2_hit();
                    self.fill_l1(key, value.clone(), ttl, snapshot).await;
                    found[index] = Some(value);
                }
                L2Read::Miss => self.recorder.miss(),
            }
        }
        Ok(found)
    }

    /// Writes what a batched loader returned to L2 in one call, then to L1.
    async fn store_loaded_many(
        &self,
        missing: &[String],
        loaded: &mut HashMap<String, V>,
        snapshots: &[Snapshot],
        results: &mut HashMap<String, Option<V>>,
    ) {
        let now = self.clock.now();
        let mut writes = Vec::new();
        let mut to_fill = Vec::new();
        // As for a single key's fill: under the keys' write locks, a `set`, `delete` or `touch`
        // of one of them either came before the check below or waits for the write.
        let locks = match &self.l2 {
            Some(_) => {
                self.freshness
                    .lock_keys(missing.iter().map(String::as_str))
                    .await
            }
            None => Vec::new(),
        };
        for (key, snapshot) in missing.iter().zip(snapshots) {
            let value = loaded.remove(key);
            results.insert(key.clone(), value.clone());
            if !self.freshness.key_unchanged(*snapshot) {
                // Written or invalidated since the load began: caching the loaded value could
                // bring back what was deleted.
                continue;
            }
            let ttl = match (&value, self.settings.negative_ttl) {
                (Some(_), _) => self.jittered(self.settings.default_ttl),
                (None, Some(negative)) => self.jittered(negative),
                (None, None) => continue,
            };
            match envelope::encode(
                &self.codec,
                value.as_ref(),
                now,
                now.saturating_add(ttl),
                self.settings.max_value_len,
            ) {
                Ok(bytes) => {
                    writes.push((self.namespace.store_key(key), bytes, ttl));
                    to_fill.push((key, value, ttl, *snapshot));
                }
                Err(error) => {
                    tracing::warn!(cache = %self.namespace, key = %fingerprint(key), error = %error, "loaded value not cached");
                }
            }
        }
        if let Some(l2) = self.l2.as_ref().filter(|_| !writes.is_empty()) {
            let batch: Vec<StoreWrite<'_>> = writes
                .iter()
                .map(|(key, value, ttl)| StoreWrite {
                    key,
                    value: value.clone(),
                    ttl: *ttl,
                })
                .collect();
            let _ = self.l2_call(L2Op::Set, l2.set_many(&batch)).await;
        }
        drop(locks);
        for (key, value, ttl, snapshot) in to_fill {
            self.fill_l1(key, value, ttl, snapshot).await;
        }
    }

    async fn publish(&self, invalidation: Invalidation) {
        let Some(backplane) = &self.backplane else {
            return;
        };
        if let Err(error) = backplane
            .publish(self.namespace.as_str(), &invalidation)
            .await
        {
            self.publish_failed(&error);
        }
    }

    fn publish_failed(&self, error: &CacheError) {
        self.recorder.publish_error();
        if let Some(suppressed) = self.l2_failures.should_log() {
            tracing::warn!(cache = %self.namespace, error = %error, suppressed, "invalidation not published; other instances keep their L1 copy until it expires");
        }
    }

    /// Spawns the task that applies other instances' invalidations to this L1.
    pub(crate) fn listen(
        this: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        mut subscription: Subscription,
    ) {
        let weak = Arc::downgrade(this);
        let task = runtime.spawn(async move {
            while let Some(event) = subscription.recv().await {
                let Some(inner) = weak.upgrade() else { break };
                inner.apply(event).await;
            }
        });
        *this.listener.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    }

    /// Applies an event to L1, then counts it: whoever watches the counters (a test, a
    /// dashboard) sees an invalidation only once it has taken effect.
    async fn apply(&self, event: BackplaneEvent) {
        match event {
            BackplaneEvent::Invalidate(message) => {
                if message.namespace != self.namespace.as_str() {
                    return;
                }
                match &message.invalidation {
                    Invalidation::Keys(keys) => {
                        for key in keys {
                            self.evict_local(key).await;
                        }
                    }
                    Invalidation::Prefix(prefix) => {
                        self.freshness.bump_all();
                        if let Some(l1) = &self.l1 {
                            l1.invalidate_prefix(prefix).await;
                        }
                    }
                    // Invalidation is non-exhaustive: anything unknown may have changed any
                    // key, so it counts as a change of every key and clears L1.
                    _ => {
                        self.freshness.bump_all();
                        self.clear_local();
                    }
                }
                self.recorder.invalidation_received();
            }
            BackplaneEvent::Resync => {
                self.clear_local();
                self.recorder.resync();
            }
        }
    }

    fn clear_local(&self) {
        self.freshness.bump_local();
        if let Some(l1) = &self.l1 {
            l1.invalidate_all();
        }
    }
}

/// What a caller of a flight does: wait for the leader's outcome, or lead.
enum Role<'a, V, C> {
    Wait(watch::Receiver<Option<Outcome<V>>>),
    Lead(LeaderGuard<'a, V, C>),
}

/// The leader's registration of its flight. Completing it unregisters the flight, then
/// publishes the outcome; dropping it uncompleted (the leader was cancelled, or unwound)
/// unregisters it and tells the waiters to lead again.
struct LeaderGuard<'a, V, C> {
    inner: &'a Inner<V, C>,
    key: &'a str,
    id: u64,
    snapshot: Snapshot,
    sender: Option<watch::Sender<Option<Outcome<V>>>>,
}

impl<V, C> LeaderGuard<'_, V, C> {
    fn unregister(&self) {
        let mut flights = self
            .inner
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if flights.get(self.key).is_some_and(|f| f.id == self.id) {
            flights.remove(self.key);
        }
    }

    /// Unregisters before publishing, so that a caller arriving from now on starts a fresh
    /// flight instead of taking an outcome that a later invalidation may have outdated.
    fn complete(&mut self, outcome: Outcome<V>) {
        self.unregister();
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(Some(outcome));
        }
    }
}

impl<V, C> Drop for LeaderGuard<'_, V, C> {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.unregister();
            let _ = sender.send(Some(Outcome::Abandoned));
        }
    }
}
