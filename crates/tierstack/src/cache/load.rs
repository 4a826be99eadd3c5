//! Read-through: a miss of L1 runs one flight per key, which reads L2 and, on a miss there too,
//! calls the loader and caches what it answered.

use std::any::TypeId;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::envelope;
use tierstack_core::key::fingerprint;
use tierstack_core::{CacheError, Codec, Store};

use super::Inner;
use super::read::L2Read;
use crate::error::LoadError;
use crate::flight::{Leader, Outcome, Role, SharedError};
use crate::freshness::KeyWatch;
use crate::stats::L2Op;

/// Whether a negative entry answers the call (`get_or_load_optional`) or not (`get_or_load`).
/// Part of the flight's identity, so that the two never share an outcome.
struct AcceptsAbsent<E>(std::marker::PhantomData<E>);
struct NeedsValue<E>(std::marker::PhantomData<E>);

/// What became of a loaded value's L2 write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Yes,
    /// Not written: another writer had the key, or it changed since the load began.
    No,
    /// The L2 call failed.
    Failed,
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn get_or_load<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        loader: F,
    ) -> Result<V, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Send + Sync + 'static,
    {
        self.check_key(key)?;
        if let Some(Some(hit)) = self.l1_get(key) {
            return Ok(hit);
        }
        let optional = || async move { loader().await.map(Some) };
        let kind = TypeId::of::<NeedsValue<E>>();
        match self.flight(key, kind, false, optional).await? {
            Some(value) => Ok(value),
            // Unreachable: a flight that needs a value neither accepts a negative entry nor has a
            // loader that can answer `None`.
            None => Err(LoadError::Cache(CacheError::Configuration(
                "a loader of get_or_load answered no value".into(),
            ))),
        }
    }

    pub(super) async fn get_or_load_optional<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        loader: F,
    ) -> Result<Option<V>, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Send + Sync + 'static,
    {
        self.check_key(key)?;
        if let Some(hit) = self.l1_get(key) {
            return Ok(hit);
        }
        let kind = TypeId::of::<AcceptsAbsent<E>>();
        self.flight(key, kind, true, loader).await
    }

    /// Runs the flight of `key`, or waits for the one already running. A waiter whose leader
    /// went away (cancelled, unwound) leads a new flight with its own loader.
    async fn flight<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        kind: TypeId,
        accepts_absent: bool,
        loader: F,
    ) -> Result<Option<V>, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Send + Sync + 'static,
    {
        loop {
            // Watched from before the flight: a write or delete of the key from now on keeps
            // what the flight reads or loads out of both tiers, and keeps later callers out of
            // this flight.
            let watch = self.freshness.watch(key);
            match self.flights.join_or_lead(key, kind, watch.stamp()) {
                Role::Reentrant => return Err(LoadError::Reentrant),
                Role::Wait(waiting) => {
                    drop(watch);
                    match waiting.outcome().await {
                        Outcome::Abandoned => {}
                        outcome => return answer(outcome),
                    }
                }
                Role::Lead(guard) => {
                    let outcome = self.lead(accepts_absent, watch, &guard, loader).await;
                    guard.complete(outcome.clone());
                    return answer(outcome);
                }
            }
        }
    }

    /// The work of a flight: L1 again (a flight that just finished may have filled it), L2, and
    /// on a miss the loader, whose answer is cached.
    async fn lead<F, Fut, E>(
        self: &Arc<Self>,
        accepts_absent: bool,
        watch: KeyWatch,
        guard: &Leader<V>,
        loader: F,
    ) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Send + Sync + 'static,
    {
        let key = watch.key().to_owned();
        let key = key.as_str();
        match self.l1_get(key) {
            Some(Some(value)) => return Outcome::Found(value),
            Some(None) if accepts_absent => return Outcome::Absent,
            _ => {}
        }
        // What the load's value may replace in L2: what this read saw there (nothing, a
        // tombstone, a negative entry this call cannot use, bytes that stayed undecodable).
        // After an L2 failure, nothing is known: the value is only written over no entry.
        let seen = match self.read_l2(key, self.deadline(), self.l1.is_some()).await {
            Ok(L2Read::Hit {
                value: Some(value),
                ttl,
                ..
            }) => {
                self.recorder.l2_hit();
                self.fill_l1(key, Some(value.clone()), ttl, || {
                    self.freshness.watch_is_current(&watch)
                });
                return Outcome::Found(value);
            }
            Ok(L2Read::Hit {
                value: None, ttl, ..
            }) if accepts_absent => {
                self.recorder.l2_hit();
                self.fill_l1(key, None, ttl, || self.freshness.watch_is_current(&watch));
                return Outcome::Absent;
            }
            Ok(L2Read::Hit { bytes, .. }) => Some(bytes),
            Ok(L2Read::Miss { seen }) => seen,
            // Counted and logged: the origin answers.
            Err(_) => None,
        };
        self.recorder.miss();
        let started = Instant::now();
        // A panicking loader is caught here and becomes every waiter's outcome.
        let result = match AssertUnwindSafe(guard.run_marked(async move { loader().await }))
            .catch_unwind()
            .await
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Some(error)),
            Err(_) => Err(None),
        };
        self.recorder.load(result.is_ok(), started.elapsed());
        match result {
            Ok(Some(value)) => {
                self.store_loaded(Some(&value), self.settings.default_ttl, watch, seen)
                    .await;
                Outcome::Found(value)
            }
            Ok(None) => {
                if let Some(ttl) = self.settings.negative_ttl {
                    self.store_loaded(None, ttl, watch, seen).await;
                }
                Outcome::Absent
            }
            Err(error) => {
                // The loader's error is the callers' business; its text may hold anything.
                tracing::debug!(cache = %self.namespace, key = %fingerprint(key), "loader failed");
                match error {
                    Some(error) => Outcome::Failed(Arc::new(error) as SharedError),
                    None => Outcome::Panicked,
                }
            }
        }
    }

    /// Caches a loaded value (or a negative entry) in both tiers, unless the key was written or
    /// invalidated since `watch` began.
    ///
    /// With a background fill and room in its budget, L1 is filled first and the L2 write is
    /// left to a task, so that the callers have the value one L2 round trip sooner. Otherwise
    /// the L2 write comes first, and L1 is filled only if L2 took the value or failed (L1 and
    /// the loader keep serving while L2 is down).
    async fn store_loaded(
        self: &Arc<Self>,
        value: Option<&V>,
        ttl: Duration,
        watch: KeyWatch,
        seen: Option<Bytes>,
    ) {
        let key = watch.key().to_owned();
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
                tracing::warn!(cache = %self.namespace, key = %fingerprint(&key), error = %error, "loaded value not cached");
                return;
            }
        };
        let reserved = self
            .fill_budget
            .as_ref()
            .and_then(|budget| budget.try_reserve(bytes.len() + key.len()));
        let runtime = reserved
            .as_ref()
            .and_then(|_| tokio::runtime::Handle::try_current().ok());
        if let (Some(reserved), Some(runtime)) = (reserved, runtime) {
            self.fill_l1(&key, value.cloned(), ttl, || {
                self.freshness.watch_is_current(&watch)
            });
            let this = Arc::clone(self);
            runtime.spawn(async move {
                if this.write_loaded(bytes, ttl, &watch, seen).await == Written::No {
                    this.drop_unwritten_fill(&watch);
                }
                drop(reserved);
            });
            return;
        }
        if self.write_loaded(bytes, ttl, &watch, seen).await != Written::No {
            self.fill_l1(&key, value.cloned(), ttl, || {
                self.freshness.watch_is_current(&watch)
            });
        }
    }

    /// Writes a loaded entry to L2 over exactly what the load's L2 read saw there: over no entry
    /// (`set_if_absent`), or over the same bytes (`compare_and_set`). A value another writer
    /// stored meanwhile wins, and so does a delete on any instance meanwhile (its tombstone
    /// differs from what the load saw): a load never brings back what was deleted after it
    /// began. Skipped if this cache wrote or invalidated the key since the watch began.
    ///
    /// The key's lock orders the check and the write before any later `delete` or `touch` of the
    /// key from this cache (they take it too, and bump the key before they release it), and
    /// `delete_prefix` waits for every lock.
    async fn write_loaded(
        &self,
        bytes: Bytes,
        ttl: Duration,
        watch: &KeyWatch,
        seen: Option<Bytes>,
    ) -> Written {
        let Some(l2) = &self.l2 else {
            return Written::Yes;
        };
        let deadline = self.deadline();
        let Ok(_lock) = tokio::time::timeout_at(deadline, self.freshness.lock_watched(watch)).await
        else {
            return Written::Failed;
        };
        if !self.freshness.key_unchanged(watch) {
            return Written::No;
        }
        let written = self
            .write_over_seen(
                l2.as_ref(),
                watch.key(),
                bytes,
                ttl,
                seen.as_deref(),
                deadline,
            )
            .await;
        match written {
            Ok(true) => Written::Yes,
            // Another writer stored a value meanwhile, or deleted the key; either is newer than
            // the load, so let the next read take it from L2.
            Ok(false) => Written::No,
            // Counted and logged; L1 and the loader keep serving.
            Err(_) => Written::Failed,
        }
    }

    /// Writes a loaded entry of `key` over exactly what its read saw in L2: no entry
    /// (`set_if_absent`), or the bytes `seen` (`compare_and_set`). `false`: the key holds
    /// something else now (another writer's value, a delete's tombstone), which wins.
    pub(super) async fn write_over_seen(
        &self,
        l2: &dyn Store,
        key: &str,
        bytes: Bytes,
        ttl: Duration,
        seen: Option<&[u8]>,
        deadline: tokio::time::Instant,
    ) -> tierstack_core::Result<bool> {
        let store_key = self.namespace.store_key(key);
        let write = async {
            match seen {
                None => l2.set_if_absent(&store_key, bytes, ttl).await,
                Some(seen) => {
                    l2.compare_and_set(&store_key, seen, Some((bytes, ttl)))
                        .await
                }
            }
        };
        self.l2_call(L2Op::Set, deadline, write).await
    }

    /// Takes back the L1 fill of a background write that L2 did not take, unless the key itself
    /// was written or invalidated since (then whatever L1 holds is newer than the fill, or
    /// already gone). A change of every key (an unrelated prefix's invalidation) does not
    /// spare the fill: it may not have removed it.
    fn drop_unwritten_fill(&self, watch: &KeyWatch) {
        let Some(l1) = &self.l1 else { return };
        if self.freshness.own_key_unchanged(watch) {
            l1.invalidate(watch.key());
        }
    }
}

/// A caller's answer from a flight's outcome.
fn answer<V, E: Send + Sync + 'static>(outcome: Outcome<V>) -> Result<Option<V>, LoadError<E>> {
    match outcome {
        Outcome::Found(value) => Ok(Some(value)),
        Outcome::Absent => Ok(None),
        Outcome::Failed(error) => match error.downcast::<E>() {
            Ok(error) => Err(LoadError::Loader(error)),
            // Unreachable: a flight's waiters share its loader's error type.
            Err(_) => Err(LoadError::Panicked),
        },
        // `flight` leads again instead of answering an abandoned flight.
        Outcome::Panicked | Outcome::Abandoned => Err(LoadError::Panicked),
    }
}
