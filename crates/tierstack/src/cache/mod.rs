//! `TieredCache`: the public API, and the state its operations share.
//!
//! Each concern lives in a child module, which sees this module's private fields:
//! - `read`: L1, then L2 (filling L1), decoding, corrupt entries; `get`, `exists`, `ttl`;
//! - `load`: read-through (`get_or_load*`): the flight that covers the L2 read and the loader,
//!   and caching what was loaded;
//! - `bulk`: `get_many`, `get_or_load_many`;
//! - `write`: `set`, `delete`, `delete_prefix`, `touch`, and their invalidations;
//! - `listener`: applying other instances' invalidations;
//! - `l2`: one L2 call under a deadline, timed, counted and logged;
//! - `builder`: configuration and its validation.

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::clock::SharedClock;
use tierstack_core::envelope::Sealing;
use tierstack_core::key::{Namespace, validate_key};
use tierstack_core::store::MAX_TTL;
use tierstack_core::tag::validate_tags;
use tierstack_core::{Backplane, BincodeCodec, Codec, Result, Store};
use tierstack_moka::L1Cache;

use crate::breaker::Breaker;
use tokio::task::AbortHandle;

use crate::burst_log::BurstLog;
use crate::error::LoadError;
use crate::events::CacheEvents;
use crate::fill::FillBudget;
use crate::flight::Flights;
use crate::freshness::Freshness;
use crate::lease::LeaseWaiters;
use crate::options::{EntryOptions, Fetched, Loaded};
use crate::recovery::RecoveryQueue;
use crate::stats::{CacheStats, Recorder};

/// The tags of an untagged write.
const NO_TAGS: &[&str] = &[];

mod background;
mod builder;
mod bulk;
mod detached;
mod insert;
mod l2;
mod lease;
mod listener;
mod load;
mod many;
mod publish;
mod read;
mod recovery;
mod tags;
mod write;

pub use builder::TieredCacheBuilder;

/// A two-level read-through cache of `V`: a typed in-process L1 over an optional shared L2
/// [`Store`], kept fresh across instances by an optional [`Backplane`].
///
/// - Reads try L1, then L2 (filling L1 with the L2 entry's remaining TTL), then the loader
///   (writing both tiers). Concurrent misses of one key share one L2 read and one loader call.
/// - Writes go to L2, then L1, and other instances are told to evict their copy.
/// - An L2 that fails or is slow does not fail a read that L1 or the loader can serve: the error
///   is counted and logged once per burst.
///
/// Cloning is cheap and clones share everything.
///
/// `V` must be `Serialize + DeserializeOwned` even without an L2: the L2 is chosen at run time
/// (an `Option<Arc<dyn Store>>`), so every operation may have to encode or decode.
pub struct TieredCache<V, C = BincodeCodec> {
    inner: Arc<Inner<V, C>>,
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

#[derive(Debug, Clone)]
struct Settings {
    /// The options of calls that name none.
    defaults: EntryOptions,
    max_key_len: usize,
    max_value_len: usize,
    l2_timeout: Duration,
    tombstone_ttl: Duration,
    /// How long a tag's record lives past its last invalidation.
    tag_record_ttl: Duration,
    /// Compression and encryption of L2 payloads.
    sealing: Sealing,
}

struct Inner<V, C> {
    namespace: Namespace,
    l1: Option<L1Cache<V>>,
    l2: Option<Arc<dyn Store>>,
    backplane: Option<Arc<dyn Backplane>>,
    /// Whether this cache publishes the invalidation of a key write itself (`false` when the
    /// store announces its own writes, or without a backplane).
    publishes_key_writes: bool,
    codec: C,
    clock: SharedClock,
    settings: Settings,
    flights: Flights<V>,
    freshness: Freshness,
    /// The budget of background L2 fills; `None` when fills are written inline.
    fill_budget: Option<FillBudget>,
    recorder: Recorder,
    l2_failures: BurstLog,
    /// The L2's circuit breaker, if the builder set one.
    breaker: Option<Breaker>,
    listener: Mutex<Option<AbortHandle>>,
    /// Whether the backplane's subscription is lost: L1 is then not filled, since nobody
    /// would say when what it holds changed.
    deaf: AtomicBool,
    detached: detached::Detached,
    /// Flights waiting for another instance's leased load, woken by the listener.
    lease_waiters: LeaseWaiters,
    /// The writes kept for a replay, if the builder set a recovery queue.
    recovery: Option<Arc<RecoveryQueue>>,
    /// The backplane's circuit breaker, if the builder set one.
    backplane_breaker: Option<Breaker>,
    /// Invalidations held while the backplane's breaker is open.
    held: Arc<publish::Held>,
    /// What this instance knows of its tags' records.
    tags: crate::tags::TagRegistry,
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

impl<V, C> TieredCache<V, C> {
    /// The namespace of this cache.
    pub fn namespace(&self) -> &str {
        self.inner.namespace.as_str()
    }

    /// How this cache seals its L2 payloads, for the modules that keep records of their own
    /// beside its entries (a dataset's index is sealed as the entries are).
    pub(crate) fn sealing(&self) -> &Sealing {
        &self.inner.settings.sealing
    }

    /// The L2, for the modules that keep records of their own beside the cache's entries (a
    /// dataset's index and lease).
    pub(crate) fn store(&self) -> Option<&Arc<dyn Store>> {
        self.inner.l2.as_ref()
    }

    /// One call to the L2 for a module that keeps records beside the entries, as the cache's
    /// own calls run: bounded by the L2 timeout, through the circuit breaker, timed and counted.
    pub(crate) async fn store_call<T>(
        &self,
        op: crate::stats::L2Op,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.inner.l2_call(op, self.inner.deadline(), call).await
    }

    /// The clock the cache tells time by: the builder's [`clock`](TieredCacheBuilder::clock),
    /// else the system's. Integrations that stamp times of their own beside the cache's (an
    /// HTTP response's `Age`) read this one, so that a test's manual clock moves them alike.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }
}

impl<V, C> TieredCache<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// The value under `key` from L1 or L2, or `None` (a negative entry reads as `None` too).
    ///
    /// Plain reads are not coalesced: only [`get_or_load`](Self::get_or_load) protects the
    /// origin.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidKey`](tierstack_core::CacheError::InvalidKey) for an empty or long
    /// key. An L2 that fails or times out reads as a miss (counted and logged), as in
    /// [`exists`](Self::exists).
    pub async fn get(&self, key: &str) -> Result<Option<V>> {
        self.inner.get(key).await
    }

    /// [`get`](Self::get), with `options`' [`Skips`](crate::Skips): `l1_read` reads L2 even
    /// when L1 holds the key, `l2_read` reads L1 only, and `l1_write` keeps what L2 answered
    /// out of L1. For a value other instances change without a backplane to tell this one:
    /// read it from L2 every time. With
    /// [`with_l2_errors_returned`](EntryOptions::with_l2_errors_returned), an L2 failure is
    /// an error rather than a miss.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get), and the L2's error (a
    /// [`CacheError::Timeout`](tierstack_core::CacheError::Timeout), say) when the options return L2 errors.
    pub async fn get_with(&self, key: &str, options: &EntryOptions) -> Result<Option<V>> {
        self.inner
            .get_with(key, options.skips(), options.l2_errors_returned())
            .await
    }

    /// [`get_with`](Self::get_with), answering where the value came from
    /// ([`Source::L1`](crate::Source::L1) or [`Source::L2`](crate::Source::L2)) and its
    /// remaining TTL. A plain read: nothing is loaded, and no task is started (a service that
    /// serves stored values, not an origin's, reads with it).
    ///
    /// ```
    /// # async fn run() -> tierstack::Result<()> {
    /// use std::time::Duration;
    /// let cache = tierstack::TieredCache::<String>::builder("tokens").build()?;
    /// cache.set_with_ttl("t", "abc".into(), Duration::from_secs(60)).await?;
    /// let found = cache.get_fetched("t", &cache.default_options()).await?.unwrap();
    /// assert_eq!(found.source, tierstack::Source::L1);
    /// assert!(found.ttl.unwrap() <= Duration::from_secs(60));
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`get_with`](Self::get_with).
    pub async fn get_fetched(
        &self,
        key: &str,
        options: &EntryOptions,
    ) -> Result<Option<Fetched<V>>> {
        self.inner
            .get_fetched(key, options.skips(), options.l2_errors_returned())
            .await
    }

    /// Whether other instances' writes reach this cache's L1 at once: `true` with a backplane,
    /// and when there is nothing to share (no L2); `false` for an L2 without a backplane,
    /// where L1 copies live out their TTL whatever other instances write.
    pub fn l1_kept_coherent(&self) -> bool {
        self.inner.l2.is_none() || self.inner.backplane.is_some()
    }

    /// The value under `key`, loading it with `loader` on a miss of both tiers and writing it to
    /// both with the default TTL.
    ///
    /// Concurrent calls for one key share one L2 read and one loader call; every caller receives
    /// its value or its error, and errors are not cached. The first caller runs the loader
    /// itself (no task is spawned), so the loader may borrow from the caller. If that caller is
    /// cancelled, a waiting caller takes over with its own loader. A negative entry (cached by
    /// [`get_or_load_optional`](Self::get_or_load_optional)) does not satisfy this call: the
    /// loader runs.
    ///
    /// The [default options](TieredCacheBuilder::default_options) apply: fail-safe answers a
    /// stale value when the loader fails, and at the hard timeout the loader (running in this
    /// task) is cancelled. The soft timeout and eager refresh need a load that outlives the
    /// call: use [`get_or_load_with`](Self::get_or_load_with).
    ///
    /// # Errors
    ///
    /// [`LoadError::Loader`] with the loader's error (shared by every caller of the flight),
    /// [`LoadError::Panicked`] if it panicked, [`LoadError::Reentrant`] if it asked the cache
    /// for the key it is loading, [`LoadError::TimedOut`] past the default hard timeout, and
    /// [`LoadError::Cache`] for an invalid key. An L2 failure is not an error: the loader serves
    /// the read.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, loader: F) -> Result<V, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Send + Sync + 'static,
    {
        let options = self.inner.settings.defaults;
        self.inner.get_or_load(key, &options, loader).await
    }

    /// [`get_or_load`](Self::get_or_load) with this call's `options` (start from
    /// [`default_options`](Self::default_options)): the loader still runs in the calling task,
    /// so it may borrow. It may answer a plain value or a [`Loaded`] (its own TTL, tags, or not
    /// cached), as for [`get_or_load_with`](Self::get_or_load_with). Every option that does not need the load to outlive the call applies:
    /// the TTLs, negative caching, fail-safe (a stale value answers a failed load), the hard
    /// timeout (which cancels the loader), the load lease and the skips. The soft timeout,
    /// background completion and eager refresh do not: use
    /// [`get_or_load_with`](Self::get_or_load_with) for those.
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load), and [`LoadError::Cache`] for options out of
    /// range.
    pub async fn get_or_load_inline<F, Fut, R, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<V, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
        R: Into<Loaded<V>>,
        E: Send + Sync + 'static,
    {
        self.inner.get_or_load(key, options, loader).await
    }

    /// [`get_or_load`](Self::get_or_load) with this call's `options` (start from
    /// [`default_options`](Self::default_options)), answering where the value came from and
    /// whether it is stale.
    ///
    /// The load runs in a task of its own (so the loader owns what it uses: clone your client
    /// into it), which lets it outlive the call:
    /// - [fail-safe](EntryOptions::with_fail_safe): a value past its TTL stays stored as a
    ///   fallback; when the loader fails, panics or passes the
    ///   [hard timeout](EntryOptions::with_hard_timeout), the stale value answers instead
    ///   ([`Fetched::stale`]) and the origin is left alone for the fail-safe throttle;
    /// - the [soft timeout](EntryOptions::with_soft_timeout): past it, the stale value answers
    ///   while the load finishes in the background and updates both tiers;
    /// - [eager refresh](EntryOptions::with_eager_refresh): a hit late in an entry's TTL starts
    ///   one background reload and answers the current value at once.
    ///
    /// The loader may answer a plain value, or a [`Loaded`] that says how to cache it (its own
    /// TTL, or not at all). A caller that stops waiting (cancelled, timed out) does not cancel
    /// the load, unless [background completion](EntryOptions::with_background_completion) is
    /// off and the hard timeout passed.
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load), and [`LoadError::TimedOut`] when the hard timeout
    /// passed with no stale value to answer; [`LoadError::Cache`] for options out of range, or
    /// outside a Tokio runtime.
    pub async fn get_or_load_with<F, Fut, R, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Fetched<V>, LoadError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: Into<Loaded<V>> + 'static,
        E: Send + Sync + 'static,
    {
        self.inner.get_or_load_with(key, options, loader).await
    }

    /// [`get_or_load_optional`](Self::get_or_load_optional) with this call's `options`, as
    /// [`get_or_load_with`](Self::get_or_load_with) runs it: the load in a task of its own, the
    /// answer with where it came from. `Ok(None)`: the origin has no value (cached for the
    /// options' negative TTL, if any).
    ///
    /// # Errors
    ///
    /// As [`get_or_load_with`](Self::get_or_load_with).
    pub async fn get_or_load_optional_with<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Option<Fetched<V>>, LoadError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        self.inner
            .get_or_load_optional_with(key, options, loader)
            .await
    }

    /// [`get_or_load_many`](Self::get_or_load_many) with this call's `options`: their TTLs,
    /// skips, and their hard timeout for the batch loader (which runs in the caller's task and
    /// is cancelled then). With fail-safe, a batch whose loader fails (or passes the hard
    /// timeout) answers the stale values of the keys it loaded, each re-armed for the throttle,
    /// if every one of them has one; otherwise the error stands. There is no soft timeout or
    /// eager refresh for a batch.
    ///
    /// # Errors
    ///
    /// As [`get_or_load_many`](Self::get_or_load_many), [`LoadError::TimedOut`] past the hard
    /// timeout, and options out of range.
    pub async fn get_or_load_many_with<K, F, Fut, E>(
        &self,
        keys: &[K],
        options: &EntryOptions,
        loader: F,
    ) -> Result<Vec<Option<V>>, LoadError<E>>
    where
        K: AsRef<str>,
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<std::collections::HashMap<String, V>, E>>,
    {
        self.inner.get_or_load_many(keys, options, loader).await
    }

    /// The options of calls that name none, as the builder set them.
    pub fn default_options(&self) -> EntryOptions {
        self.inner.settings.defaults
    }

    /// Like [`get_or_load`](Self::get_or_load) for origins that may have no value: the loader
    /// answers `Ok(None)`, and with [`negative_ttl`](TieredCacheBuilder::negative_ttl) set that
    /// answer is cached too.
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn get_or_load_optional<F, Fut, E>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Option<V>, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Send + Sync + 'static,
    {
        self.inner.get_or_load_optional(key, loader).await
    }

    /// The values under `keys`, in order, from L1 and then from L2 in one round trip.
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidKey`](tierstack_core::CacheError::InvalidKey) if any key is invalid
    /// (nothing is read then). An L2 failure reads as misses.
    pub async fn get_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        self.inner.get_many(keys).await
    }

    /// [`get_many`](Self::get_many) with `options`' [`Skips`](crate::Skips) and, with
    /// [`with_l2_errors_returned`](EntryOptions::with_l2_errors_returned), an L2 failure as an
    /// error rather than misses (a service answering for its clients, which must not take a
    /// failure for missing entries).
    ///
    /// # Errors
    ///
    /// As [`get_many`](Self::get_many), and the L2's error when the options return L2 errors.
    pub async fn get_many_with<K: AsRef<str>>(
        &self,
        keys: &[K],
        options: &EntryOptions,
    ) -> Result<Vec<Option<V>>> {
        self.inner.get_many_with(keys, options).await
    }

    /// The values under `keys`, in order: from L1, then from L2 in one round trip, then from one
    /// call of `loader` with the keys still missing (each once). Keys the loader leaves out of its
    /// map have no value (and are negatively cached if configured). Loaded values are written to
    /// both tiers.
    ///
    /// The loader runs inline in the caller's task; cancelling the call cancels it and leaves
    /// nothing behind. The [default options](TieredCacheBuilder::default_options) apply, their
    /// fail-safe too (see [`get_or_load_many_with`](Self::get_or_load_many_with)).
    ///
    /// # Errors
    ///
    /// As [`get_or_load`](Self::get_or_load) (but a batch is not coalesced with other callers,
    /// so [`LoadError::Reentrant`] does not occur).
    pub async fn get_or_load_many<K, F, Fut, E>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Option<V>>, LoadError<E>>
    where
        K: AsRef<str>,
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<std::collections::HashMap<String, V>, E>>,
    {
        let options = self.inner.settings.defaults;
        self.inner.get_or_load_many(keys, &options, loader).await
    }

    /// Writes `value` under `key` with the default TTL: L2, then L1, then the other instances
    /// evict their copy.
    ///
    /// # Errors
    ///
    /// As [`set_with_ttl`](Self::set_with_ttl).
    pub async fn set(&self, key: &str, value: V) -> Result<()> {
        let options = self.inner.settings.defaults;
        self.inner.set(key, value, &options, &[]).await
    }

    /// Writes `value` under `key` for `ttl`.
    ///
    /// # Errors
    ///
    /// Bad input (an empty or long key, a TTL out of range, a value over the maximum) is refused
    /// before anything is written. If the L2 write fails or times out, the error is returned,
    /// this instance's L1 entry is evicted and the other instances are told to evict theirs: the
    /// write may still land, and no tier keeps serving the old value.
    pub async fn set_with_ttl(&self, key: &str, value: V, ttl: Duration) -> Result<()> {
        let options = self.inner.settings.defaults.with_ttl(ttl);
        self.inner.set(key, value, &options, &[]).await
    }

    /// Writes `value` under `key` with this call's `options`: its TTL (and jitter), fail-safe
    /// (the value stays stored, stale, past its TTL), and the tiers it [skips](crate::Skips).
    ///
    /// # Errors
    ///
    /// As [`set_with_ttl`](Self::set_with_ttl), and options out of range.
    pub async fn set_with(&self, key: &str, value: V, options: &EntryOptions) -> Result<()> {
        self.inner.set(key, value, options, &[]).await
    }

    /// Writes every `(key, value)` of `entries` with the default TTL, each as
    /// [`set`](Self::set) writes one, up to 64 at once: on Redis their commands share round
    /// trips. Of two entries with the same key, the later is written. Two writes of one call
    /// never make each other's value leave this instance's L1 (keys that share a generation
    /// of the cache's freshness checks are written one after the other).
    ///
    /// The call is not atomic and its duration is not bounded by the L2 timeout (each write
    /// is). Cancelled, it leaves the writes it finished, and the ones in flight handled as a
    /// cancelled `set`'s; the rest are not made. A batch written while the L2 fails fast makes
    /// every failed write tell the other instances twice; past 1,024 such notices waiting they
    /// become one clear of every instance's L1 of the namespace: give the cache an
    /// [L2 circuit breaker](TieredCacheBuilder::l2_circuit_breaker) for large batches.
    ///
    /// # Errors
    ///
    /// An invalid key in any entry refuses the whole call before anything is written. Each
    /// value is encoded by its own write: one over the maximum is refused alone. Every write is
    /// attempted, and the first error (in the order of `entries`) is returned; each failed
    /// write is handled as [`set_with_ttl`](Self::set_with_ttl) says, and the others stand.
    pub async fn set_many<K: AsRef<str>>(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()> {
        let options = self.inner.settings.defaults;
        self.inner.set_many(entries, &options).await
    }

    /// [`set_many`](Self::set_many) with this call's `options`, as
    /// [`set_with`](Self::set_with) takes them (each entry draws its own jitter).
    ///
    /// # Errors
    ///
    /// As [`set_many`](Self::set_many); options out of range refuse the whole call.
    pub async fn set_many_with<K: AsRef<str>>(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
        options: &EntryOptions,
    ) -> Result<()> {
        self.inner.set_many(entries, options).await
    }

    /// Deletes the expired entries the L2 keeps until its own expiry runs (Firestore's TTL
    /// policy deletes them up to a day late; they are never read meanwhile), returning how
    /// many. Stores that expire entries themselves (Redis, moka) answer 0, as does a cache
    /// without an L2. The sweep covers the whole store, not only this namespace.
    ///
    /// # Errors
    ///
    /// The L2's error.
    pub async fn sweep_expired(&self) -> Result<u64> {
        match &self.inner.l2 {
            Some(l2) => l2.sweep_expired().await,
            None => Ok(0),
        }
    }

    /// Writes `value` under `key` with `options` only if the key holds no value: `true` if it
    /// wrote, `false` if a value was there (on any instance, through the L2). A new session
    /// under a fresh id, a resource created once: a write that must never replace someone
    /// else's.
    ///
    /// What it replaces is exactly what it read (nothing, a delete's tombstone, a cached "not
    /// found", a stale or undecodable entry), by compare-and-set, so that of two calls racing on
    /// one key only one writes. The other instances evict their copies, as after `set`. Without
    /// an L2 (or skipping L2 writes), the check and the write are one step on this instance
    /// only; a plain `set` of the key may still overwrite.
    ///
    /// # Errors
    ///
    /// As [`set_with`](Self::set_with); an L2 that fails or times out fails the call (nothing
    /// is kept for a replay: whether the key held a value is not known). Without L2 (or
    /// skipping its writes), a transient [`CacheError::Backend`](tierstack_core::CacheError::Backend)
    /// while this instance's backplane is lost: its L1 can neither vouch for a copy nor keep a
    /// new one until it hears again.
    pub async fn set_if_absent(&self, key: &str, value: V, options: &EntryOptions) -> Result<bool> {
        self.set_if_absent_with_tags(key, value, NO_TAGS, options)
            .await
    }

    /// Writes `value` under `key` with `options` only if the key holds a fresh value: `true`
    /// if it wrote, `false` if there was none (never written, deleted, expired, or only a
    /// stale fail-safe copy). A session saved after its logout, a record updated after its
    /// removal: a write that must not bring back what someone removed.
    ///
    /// As with [`set_if_absent`](Self::set_if_absent), it replaces exactly the bytes it read,
    /// by compare-and-set: a delete on any instance between the read and the write makes it
    /// look again, and then answer `false`.
    ///
    /// ```
    /// # async fn run() -> tierstack::Result<()> {
    /// let cache = tierstack::TieredCache::<u32>::builder("counters").build()?;
    /// let options = cache.default_options();
    /// assert!(!cache.set_if_present("visits", 1, &options).await?);
    /// cache.set("visits", 1).await?;
    /// assert!(cache.set_if_present("visits", 2, &options).await?);
    /// cache.delete("visits").await?;
    /// assert!(!cache.set_if_present("visits", 3, &options).await?);
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`set_if_absent`](Self::set_if_absent).
    pub async fn set_if_present(
        &self,
        key: &str,
        value: V,
        options: &EntryOptions,
    ) -> Result<bool> {
        self.set_if_present_with_tags(key, value, NO_TAGS, options)
            .await
    }

    /// [`set_if_absent`](Self::set_if_absent), the value carrying `tags` as
    /// [`set_with_tags`](Self::set_with_tags) writes them: a new session tagged with its user,
    /// so that one [`invalidate_tag`](Self::invalidate_tag) ends every session of the user.
    ///
    /// # Errors
    ///
    /// As [`set_if_absent`](Self::set_if_absent) and [`set_with_tags`](Self::set_with_tags).
    pub async fn set_if_absent_with_tags<T: AsRef<str>>(
        &self,
        key: &str,
        value: V,
        tags: &[T],
        options: &EntryOptions,
    ) -> Result<bool> {
        let tags = validate_tags(tags)?;
        self.inner
            .set_if(insert::Condition::Absent, key, Some(value), options, &tags)
            .await
    }

    /// [`set_if_present`](Self::set_if_present), the value carrying `tags` as
    /// [`set_with_tags`](Self::set_with_tags) writes them. An entry of an invalidated tag holds
    /// no value: once the invalidation is known here, the write answers `false` and keeps
    /// nothing. One that races the invalidation may answer `true`, its value stamped with the
    /// version before it, and so read as removed.
    ///
    /// ```
    /// # async fn run() -> tierstack::Result<()> {
    /// let cache = tierstack::TieredCache::<String>::builder("sessions").build()?;
    /// let options = cache.default_options();
    /// cache.set_if_absent_with_tags("s1", "cart".into(), &["user:7"], &options).await?;
    /// assert!(cache.set_if_present_with_tags("s1", "cart+1".into(), &["user:7"], &options).await?);
    /// cache.invalidate_tag("user:7").await?; // log user 7 out everywhere
    /// assert!(!cache.set_if_present_with_tags("s1", "cart+2".into(), &["user:7"], &options).await?);
    /// assert_eq!(cache.get("s1").await?, None);
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`set_if_present`](Self::set_if_present) and [`set_with_tags`](Self::set_with_tags).
    pub async fn set_if_present_with_tags<T: AsRef<str>>(
        &self,
        key: &str,
        value: V,
        tags: &[T],
        options: &EntryOptions,
    ) -> Result<bool> {
        let tags = validate_tags(tags)?;
        self.inner
            .set_if(insert::Condition::Present, key, Some(value), options, &tags)
            .await
    }

    /// Writes `new` under `key` with `options` (or removes the key, for `None`) only if the key
    /// holds a fresh value equal to `current`: `true` if it did, `false` if the key held
    /// another value or none. Optimistic concurrency: read a value, compute the next one, and
    /// write it only if nobody changed the key meanwhile; on `false`, read again.
    ///
    /// As with [`set_if_absent`](Self::set_if_absent), it replaces exactly the bytes it read
    /// in L2, by compare-and-set: of concurrent calls that read the same value, one wins; a
    /// write or delete on any instance between the read and the write makes it look again.
    /// A removal leaves a tombstone, as [`delete`](Self::delete) does. The other instances
    /// evict their copies.
    ///
    /// ```
    /// # async fn run() -> tierstack::Result<()> {
    /// let cache = tierstack::TieredCache::<u32>::builder("stock").build()?;
    /// let options = cache.default_options();
    /// cache.set("item:7", 3).await?;
    /// assert!(cache.compare_and_set("item:7", &3, Some(2), &options).await?);
    /// assert!(!cache.compare_and_set("item:7", &3, Some(1), &options).await?, "it is 2 now");
    /// assert!(cache.compare_and_set("item:7", &2, None, &options).await?);
    /// assert_eq!(cache.get("item:7").await?, None);
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`set_if_absent`](Self::set_if_absent).
    pub async fn compare_and_set(
        &self,
        key: &str,
        current: &V,
        new: Option<V>,
        options: &EntryOptions,
    ) -> Result<bool>
    where
        V: PartialEq,
    {
        let expected = |held: &V| held == current;
        self.inner
            .set_if(insert::Condition::Holds(&expected), key, new, options, &[])
            .await
    }

    /// Writes `value` under `key` with `options`, carrying `tags`: an
    /// [`invalidate_tag`](Self::invalidate_tag) of any of them, on any instance, then reaches
    /// it. A tag is 1 to 128 bytes without control characters, an entry carries at most 16
    /// (repeats count once), and a tagged entry lives at most
    /// [`tag_record_ttl`](TieredCacheBuilder::tag_record_ttl).
    ///
    /// ```
    /// # async fn run() -> tierstack::Result<()> {
    /// let cache = tierstack::TieredCache::<String>::builder("orders").build()?;
    /// let options = cache.default_options();
    /// cache.set_with_tags("order:9", "shipped".into(), &["user:7", "org:2"], &options).await?;
    /// cache.invalidate_tag("user:7").await?; // user 7 changed
    /// assert_eq!(cache.get("order:9").await?, None);
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`set_with`](Self::set_with), and [`CacheError::InvalidTag`](tierstack_core::CacheError::InvalidTag) for a tag that is not
    /// allowed (nothing is written). With an L2, the tags' current versions are read from it
    /// unless this instance knows them (without a backplane, or while it is lost, always: no
    /// message would have told it of a change): its failure fails the write, unless it is
    /// transient and this instance knows a record of every tag (then those stamp it).
    pub async fn set_with_tags<T: AsRef<str>>(
        &self,
        key: &str,
        value: V,
        tags: &[T],
        options: &EntryOptions,
    ) -> Result<()> {
        let tags = validate_tags(tags)?;
        self.inner.set(key, value, options, &tags).await
    }

    /// Removes every entry that carries `tag`, on every instance, without reading or scanning
    /// them: each is judged against the tag when read. This instance misses them at once; the
    /// others as soon as the backplane delivers the message (or, if they lost it unnoticed,
    /// within 30 seconds). A load of a tagged entry under way when the tag is removed does not
    /// cache its value over the removal. Fail-safe keeps nothing of them: see
    /// [`expire_tag`](Self::expire_tag).
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidTag`](tierstack_core::CacheError::InvalidTag) for a tag that is not allowed; the L2's error if the tag's
    /// record could not be raised (nothing changed then).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        self.inner.invalidate_tag(tag, true).await
    }

    /// Expires every entry that carries `tag`, on every instance, like
    /// [`invalidate_tag`](Self::invalidate_tag), but keeps them as fail-safe's fallback: the
    /// next read-through call reloads each, and serves the old value (marked stale) if its
    /// loader fails. Entries without fail-safe are simply gone.
    ///
    /// # Errors
    ///
    /// As [`invalidate_tag`](Self::invalidate_tag).
    pub async fn expire_tag(&self, tag: &str) -> Result<()> {
        self.inner.invalidate_tag(tag, false).await
    }

    /// Removes `key` from both tiers and tells the other instances; `true` if a tier held it.
    ///
    /// In L2 the entry is replaced by a tombstone that lives for
    /// [`tombstone_ttl`](TieredCacheBuilder::tombstone_ttl) and reads as no entry: a
    /// `get_or_load` of the key already running on any instance then cannot write its value
    /// back, because its write only replaces what it saw in L2.
    ///
    /// # Errors
    ///
    /// An invalid key; an L2 that fails or times out (the local copy is evicted and the other
    /// instances are told all the same). The whole call stays within the L2 timeout.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let options = self.inner.settings.defaults;
        self.inner.delete(key, &options).await
    }

    /// [`delete`](Self::delete) with this call's `options`; only their [skips](crate::Skips) and
    /// [write recovery](EntryOptions::with_write_recovery)
    /// apply. Skipping L2 writes removes this instance's L1 copy only (as
    /// [`invalidate_local`](Self::invalidate_local) does); skipping the backplane leaves the
    /// other instances' copies until their TTL, unless the outcome is unknown (an L2 failure or
    /// timeout), when they are told all the same.
    ///
    /// # Errors
    ///
    /// As [`delete`](Self::delete).
    pub async fn delete_with(&self, key: &str, options: &EntryOptions) -> Result<bool> {
        self.inner.delete(key, options).await
    }

    /// Deletes every key of `keys`, each as [`delete`](Self::delete) deletes one, up to 64 at
    /// once; returns how many of them held a value, as `delete` answers (a key listed twice is
    /// deleted once). Not atomic, and not bounded by the L2 timeout, as
    /// [`set_many`](Self::set_many).
    ///
    /// # Errors
    ///
    /// An invalid key refuses the whole call before anything is deleted. Every delete is
    /// attempted, and the first error (in the order of `keys`) is returned, without the count
    /// of the others; each failed delete is handled as [`delete`](Self::delete) says, and the
    /// others stand.
    pub async fn delete_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<u64> {
        let options = self.inner.settings.defaults;
        self.inner.delete_many(keys, &options).await
    }

    /// [`delete_many`](Self::delete_many) with this call's `options`, as
    /// [`delete_with`](Self::delete_with) takes them.
    ///
    /// # Errors
    ///
    /// As [`delete_many`](Self::delete_many).
    pub async fn delete_many_with<K: AsRef<str>>(
        &self,
        keys: &[K],
        options: &EntryOptions,
    ) -> Result<u64> {
        self.inner.delete_many(keys, options).await
    }

    /// Removes every key that starts with `prefix` (literally) from both tiers and tells the other
    /// instances; returns how many L2 entries were removed (the tombstones of recent deletes
    /// count too). An empty prefix clears the namespace.
    ///
    /// # Errors
    ///
    /// A prefix longer than the longest key; an L2 that fails or times out.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let skips = self.inner.settings.defaults.skips();
        self.inner.delete_prefix(prefix, skips).await
    }

    /// [`delete_prefix`](Self::delete_prefix) with this call's `options`; only their
    /// [skips](crate::Skips) apply, as in [`delete_with`](Self::delete_with). Skipping L2
    /// writes clears the prefix from this instance's L1 only and returns 0.
    ///
    /// # Errors
    ///
    /// As [`delete_prefix`](Self::delete_prefix).
    pub async fn delete_prefix_with(&self, prefix: &str, options: &EntryOptions) -> Result<u64> {
        self.inner.delete_prefix(prefix, options.skips()).await
    }

    /// Whether a value exists under `key` in L1 or L2 (a negative entry does not count).
    ///
    /// # Errors
    ///
    /// An invalid key. An L2 that fails or times out reads as a miss, as in [`get`](Self::get).
    pub async fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key).await
    }

    /// The remaining time to live of `key`: L2's answer where there is an L2, else L1's.
    ///
    /// # Errors
    ///
    /// An invalid key. An L2 that fails or times out reads as a miss of L2, as in
    /// [`get`](Self::get): L1 answers.
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        self.inner.ttl(key).await
    }

    /// Sets the remaining time to live of `key` to `ttl` in both tiers (a sliding expiry calls it
    /// on each access); `false` if there is no entry. Other instances evict their copy, so none
    /// serves it past a shortened deadline. A deleted key's tombstone is no entry: it is not
    /// extended.
    ///
    /// # Errors
    ///
    /// An invalid key or TTL; an L2 that fails or times out (the local copy is evicted).
    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool> {
        let options = self.inner.settings.defaults.with_ttl(ttl);
        self.inner.touch(key, &options).await
    }

    /// [`touch`](Self::touch) to the TTL of this call's `options`, with their L1 TTL and
    /// [skips](crate::Skips), as in [`delete_with`](Self::delete_with): skipping L2 writes
    /// extends this instance's L1 copy only (`false` if it holds none).
    ///
    /// # Errors
    ///
    /// As [`touch`](Self::touch), and options out of range.
    pub async fn touch_with(&self, key: &str, options: &EntryOptions) -> Result<bool> {
        options.validate()?;
        self.inner.touch(key, options).await
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
    pub fn invalidate_local(&self, key: &str) {
        self.inner.evict_l1_only(key);
    }

    /// Evicts everything from this instance's L1 only.
    pub fn invalidate_local_all(&self) {
        self.inner.clear_local();
    }

    /// A subscription to what happens in this cache from now on: hits per tier, misses, stale
    /// values served (and why), background loads, eager refreshes, invalidations received and
    /// resyncs. Events carry keys (never values). While nobody subscribes, no event is built;
    /// while someone does, every hit allocates its event and takes the channel's lock. A
    /// subscriber that falls more than 1,024 events behind loses the oldest
    /// ([`EventsError::Lagged`](crate::EventsError)).
    pub fn events(&self) -> CacheEvents {
        self.inner.recorder.subscribe()
    }

    /// The counters of this cache since it was built, and L1's size as moka last counted it
    /// (also reported to the `tierstack_l1_*` gauges: call it from a metrics scrape, say, for
    /// gauges that follow a cache at rest).
    pub fn stats(&self) -> CacheStats {
        let mut stats = self.inner.recorder.snapshot();
        if let Some(l1) = &self.inner.l1 {
            (stats.l1_entries, stats.l1_weighted_size) = (l1.entry_count(), l1.weighted_size());
            // And to the gauges, which an idle cache would not otherwise update.
            self.inner.report_l1_size(l1);
        }
        stats
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

    /// The life of an entry written with `options` and `ttl` (jittered): fresh for the TTL,
    /// stored longer by the fail-safe maximum.
    fn life(options: &EntryOptions, ttl: Duration) -> read::Life {
        let fresh = if options.jitter() <= 0.0 {
            ttl
        } else {
            let extra = ttl.mul_f64(options.jitter() * fastrand::f64());
            (ttl + extra).min(MAX_TTL)
        };
        read::Life::new(fresh, options.lives(fresh), None).under(options)
    }
}

/// What the listener needs too, under its weaker bounds.
impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + 'static,
{
    /// Evicts `key` from L1 as a change of the key: fills that started before do not land.
    fn evict_local(&self, key: &str) {
        self.freshness.bump_key(key);
        if let Some(l1) = &self.l1 {
            l1.invalidate(key);
        }
    }

    /// Evicts `key` from L1 as an L1-only change: a fill under way does not land in L1, and a
    /// load's L2 write goes on.
    fn evict_l1_only(&self, key: &str) {
        self.freshness.bump_local_key(key);
        if let Some(l1) = &self.l1 {
            l1.invalidate(key);
        }
    }

    /// Clears L1 as an L1-only change: fills under way do not land.
    fn clear_local(&self) {
        self.freshness.bump_local();
        if let Some(l1) = &self.l1 {
            l1.invalidate_all();
        }
    }

    /// Removes every key under `prefix` from L1 (the caller has bumped the generations).
    fn evict_prefix_locally(&self, prefix: &str) {
        if let Some(l1) = &self.l1 {
            l1.invalidate_prefix(prefix);
        }
    }

    /// L1's size as moka last counted it, to the gauges: at every fill (where it grows) and at
    /// `stats()`. moka counts in its housekeeping, which runs as the cache is used and before
    /// the operation that triggers it, so a report at a removal would not show it anyway.
    fn report_l1_size(&self, l1: &L1Cache<V>) {
        self.recorder.l1_size(l1.entry_count(), l1.weighted_size());
    }
}
