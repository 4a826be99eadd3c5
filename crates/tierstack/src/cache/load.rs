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
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope::{self, Lifetime};
use tierstack_core::key::fingerprint;
use tierstack_core::store::validate_ttl;
use tierstack_core::tag::{TagStamps, TagVerdict, validate_tags};
use tierstack_core::{CacheError, Codec, Store};
use tierstack_moka::L1Entry;

use super::Inner;
use super::lease::{Asking, ToLoad};
use super::read::{L2Read, Life};
use crate::error::LoadError;
use crate::events::StaleReason;
use crate::flight::{Leader, Outcome, Role, SharedError};
use crate::freshness::KeyWatch;
use crate::options::{EntryOptions, Fetched, Loaded, Source};
use crate::stats::L2Op;

/// Whether a negative entry answers the call (`get_or_load_optional`) or not (`get_or_load`).
/// Part of the flight's identity, so that the two never share an outcome.
pub(super) struct AcceptsAbsent<E>(std::marker::PhantomData<E>);
pub(super) struct NeedsValue<E>(std::marker::PhantomData<E>);

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
    /// `get_or_load` and `get_or_load_inline`: the loader runs in the caller's task (it may
    /// borrow).
    pub(super) async fn get_or_load<F, Fut, R, E>(
        self: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<V, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R, E>>,
        R: Into<Loaded<V>>,
        E: Send + Sync + 'static,
    {
        self.check_key(key)?;
        if !options.skips().l1_read
            && let Some(Some(value)) = self.l1_get(key)
        {
            return Ok(value);
        }
        options.validate()?;
        let optional = || async move {
            loader()
                .await
                .map(|answer| Into::<Loaded<V>>::into(answer).into_optional())
        };
        let kind = TypeId::of::<NeedsValue<E>>();
        match self.flight(key, kind, false, options, optional).await? {
            Some(fetched) => Ok(fetched.value),
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
        let options = self.settings.defaults;
        let loader = || async move { loader().await.map(Loaded::new) };
        let fetched = self.flight(key, kind, true, &options, loader).await?;
        Ok(fetched.map(|fetched| fetched.value))
    }

    /// Runs the flight of `key`, or waits for the one already running. A waiter whose leader
    /// went away (cancelled, unwound) leads a new flight with its own loader.
    async fn flight<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        kind: TypeId,
        accepts_absent: bool,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Option<Fetched<V>>, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<Option<V>>, E>>,
        E: Send + Sync + 'static,
    {
        loop {
            // Watched from before the flight: a write or delete of the key from now on keeps
            // what the flight reads or loads out of both tiers, and keeps later callers out of
            // this flight.
            let watch = self.freshness.watch(key);
            match self.flights.join_or_lead(key, kind, watch.stamp()) {
                Role::Reentrant => return Err(LoadError::Reentrant),
                Role::Wait(mut waiting) => {
                    drop(watch);
                    match waiting.outcome().await {
                        Outcome::Abandoned => {}
                        // Another caller's fail-safe answer: this call has none, so it leads a
                        // flight of its own (which answers its own loader's outcome).
                        Outcome::Found(found) if found.stale && options.fail_safe().is_none() => {}
                        outcome => return answer(outcome),
                    }
                }
                Role::Lead(guard) => {
                    let outcome = self
                        .lead(accepts_absent, false, options, watch, &guard, loader)
                        .await;
                    guard.complete(outcome.clone());
                    return answer(outcome);
                }
            }
        }
    }

    /// The work of a flight: [`look`](Self::look) in L1 and L2, and on a miss the loader, whose
    /// answer is cached. With fail-safe, a stale value found on the way answers instead if the
    /// loader fails.
    pub(super) async fn lead<F, Fut, E>(
        self: &Arc<Self>,
        accepts_absent: bool,
        refreshing: bool,
        options: &EntryOptions,
        watch: KeyWatch,
        guard: &Leader<V>,
        loader: F,
    ) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<Option<V>>, E>>,
        E: Send + Sync + 'static,
    {
        // Tags the loader names are judged against changes from here on.
        let tag_mark = self.tags.mark();
        // The hard timeout bounds the whole call: the L2 read, then the loader.
        let hard_deadline = options
            .hard_timeout()
            .map(|limit| tokio::time::Instant::now() + limit);
        let deadline = hard_deadline.map_or(self.deadline(), |hard| hard.min(self.deadline()));
        let looked = self
            .look(accepts_absent, refreshing, options, &watch, guard, deadline)
            .await;
        let (seen, fallback) = match looked {
            Looked::Answered(outcome) => return outcome,
            Looked::Load { seen, fallback } => (seen, fallback),
        };
        let asking = Asking {
            accepts_absent,
            refreshing,
            options,
            guard,
        };
        let ToLoad {
            lease,
            watch,
            seen,
            fallback,
        } = match self
            .lease_first(asking, watch, seen, fallback, hard_deadline)
            .await
        {
            Ok(to_load) => to_load,
            Err(outcome) => return outcome,
        };
        let key = watch.key().to_owned();
        let key = key.as_str();
        self.recorder.miss(key);
        let started = Instant::now();
        let loaded_since = self.clock.now();
        // A panicking loader is caught here and becomes every waiter's outcome.
        let run = AssertUnwindSafe(guard.run_marked(async move { loader().await })).catch_unwind();
        let ran = match hard_deadline {
            Some(hard) => tokio::time::timeout_at(hard, run).await.ok(),
            None => Some(run.await),
        };
        let result = match ran {
            Some(Ok(Ok(answer))) => Ok(answer),
            Some(Ok(Err(error))) => Err(Failure::Loader(error)),
            Some(Err(_)) => Err(Failure::Panicked),
            None => Err(Failure::TimedOut(
                options.hard_timeout().unwrap_or_default(),
            )),
        };
        self.recorder.load(result.is_ok(), started.elapsed());
        match result {
            Ok(Loaded {
                value,
                ttl,
                cache,
                tags,
            }) => {
                let ttl = if value.is_some() {
                    Some(ttl.unwrap_or(options.ttl()))
                } else {
                    ttl.or(options.negative_ttl())
                };
                let caching = self
                    .caching_of(key, ttl.filter(|_| cache), &tags, tag_mark, loaded_since)
                    .await;
                let cached_for = match (lease, caching) {
                    (Some(lease), caching) => {
                        let to_store = caching.map(|caching| (value.clone(), caching));
                        self.finish_leased_load(
                            lease,
                            to_store,
                            *options,
                            watch,
                            seen,
                            hard_deadline,
                        )
                        .await
                    }
                    (None, Some(caching)) => {
                        self.store_loaded(value.as_ref(), options, caching, watch, seen, false)
                            .await
                    }
                    (None, None) => None,
                };
                match value {
                    Some(value) => {
                        Outcome::Found(Fetched::new_fresh(value, Source::Loader, cached_for))
                    }
                    None => Outcome::Absent,
                }
            }
            Err(failure) => {
                if let Some(lease) = lease {
                    lease.release().await;
                }
                self.after_failure(failure, fallback, options, &watch, guard)
                    .await
            }
        }
    }

    /// How a loaded value is cached: for `ttl` (`None`: it is not), carrying `tags` at their
    /// versions now; not at all if a tag is not allowed, changed while the loader ran (here,
    /// or in a message from another instance: the value may predate the change), or its
    /// version cannot be read.
    async fn caching_of(
        &self,
        key: &str,
        ttl: Option<Duration>,
        tags: &[String],
        tag_mark: u64,
        since: Timestamp,
    ) -> Option<Caching> {
        let ttl = ttl?;
        if tags.is_empty() {
            return Some(Caching {
                ttl,
                tags: None,
                since,
            });
        }
        let tags = match validate_tags(tags) {
            Ok(tags) => tags,
            Err(error) => {
                tracing::warn!(cache = %self.namespace, key = %fingerprint(key), error = %error, "loaded value not cached");
                return None;
            }
        };
        // An L2 failure is counted and logged; the value is served, not cached.
        let stamps = self.stamp_tags(&tags, self.deadline()).await.ok()?;
        // Checked after the stamps were read: a change before this check keeps the value out;
        // one after it came after the read too, so the stamps are older than it.
        if self
            .tags
            .changed_since(tag_mark, tags.iter().map(|tag| &**tag))
        {
            tracing::debug!(cache = %self.namespace, key = %fingerprint(key), "a tag of the loaded value changed during the load: not cached");
            return None;
        }
        Some(Caching {
            ttl,
            tags: stamps,
            since,
        })
    }

    /// A flight whose loader failed, panicked or timed out (or that timed out waiting for
    /// another instance's load): with fail-safe, its stale value answers; else the failure.
    pub(super) async fn after_failure<E: Send + Sync + 'static>(
        &self,
        failure: Failure<E>,
        fallback: Option<Fallback<V>>,
        options: &EntryOptions,
        watch: &KeyWatch,
        guard: &Leader<V>,
    ) -> Outcome<V> {
        let key = watch.key();
        // The loader's error is the callers' business; its text may hold anything.
        tracing::debug!(cache = %self.namespace, key = %fingerprint(key), "loader failed");
        // A fallback found before a tag of it was removed is no fallback now, for this flight
        // or for the callers waiting on it (which were offered it).
        let removed = match &fallback {
            Some(Fallback {
                tags: Some(stamps), ..
            }) => matches!(
                self.tag_verdict(stamps, self.deadline()).await,
                Ok(TagVerdict::Removed)
            ),
            _ => false,
        };
        if removed {
            guard.offer_stale(None);
        }
        let fallback = fallback.filter(|_| !removed);
        if let (Some(fallback), Some(_)) = (fallback, options.fail_safe()) {
            let reason = match failure {
                Failure::TimedOut(_) => StaleReason::HardTimeout,
                Failure::Loader(_) | Failure::Panicked => StaleReason::LoaderFailed,
            };
            self.recorder.stale_served(key, reason);
            return Outcome::Found(self.serve_stale(key, fallback, options, watch).await);
        }
        match failure {
            Failure::Loader(error) => Outcome::Failed(Arc::new(error) as SharedError),
            Failure::Panicked => Outcome::Panicked,
            Failure::TimedOut(after) => Outcome::TimedOut(after),
        }
    }

    /// The part of a flight before the loader: L1 again (a flight that just finished may have
    /// filled it), then L2. Answers, or says what the loader's value may replace and which stale
    /// value answers if the loader fails.
    ///
    /// The stale value (fail-safe) is offered to the flight's waiters as soon as L1 shows one,
    /// so that a soft timeout can answer it while L2 is slow; L2 then has the last word: its own
    /// stale value if newer, and no stale value at all if it holds a delete's tombstone or a
    /// "not found" (a delete on another instance wins over this instance's old copy).
    ///
    /// An eager refresh (`refreshing`) does not answer L1's value (it is the one to replace),
    /// nor an L2 value that is as old: only one that another instance refreshed already.
    #[expect(
        clippy::too_many_lines,
        reason = "one decision over L1 then L2; split, its cases would lose their order"
    )]
    pub(super) async fn look(
        &self,
        accepts_absent: bool,
        refreshing: bool,
        options: &EntryOptions,
        watch: &KeyWatch,
        guard: &Leader<V>,
        deadline: tokio::time::Instant,
    ) -> Looked<V> {
        let key = watch.key();
        let mut fallback = None;
        let skips = options.skips();
        if let Some(entry) = self.l1_entry(key).filter(|_| !skips.l1_read) {
            // A re-armed stale value answers only calls with fail-safe.
            let now = self.clock.now();
            let serving =
                self.serving(&entry, now) && (!entry.stale || options.fail_safe().is_some());
            match entry.value {
                Some(value) if !refreshing && serving => {
                    return Looked::Answered(Outcome::Found(if entry.stale {
                        Fetched::new_stale(value, Source::L1)
                    } else {
                        Fetched::new_fresh(value, Source::L1, Some(now.until(entry.fresh_until)))
                    }));
                }
                None if accepts_absent && serving => {
                    return Looked::Answered(Outcome::Absent);
                }
                Some(value) if !refreshing => {
                    let stale = Fallback {
                        value,
                        source: Source::L1,
                        expires_at: entry.expires_at,
                        bytes: None,
                        tags: entry.tags.clone(),
                    };
                    // Offered before L2 answers, so that a soft timeout can answer it while L2 is
                    // slow; not by a deaf instance, whose copy may be outdated.
                    if !self.is_deaf() {
                        guard.offer_stale(Some(stale.offered()));
                    }
                    fallback = Some(stale);
                }
                _ => {}
            }
        }
        // What the load's value may replace in L2: what this read saw there (nothing, a
        // tombstone, a negative entry this call cannot use, a stale entry, bytes that stayed
        // undecodable). After an L2 failure, nothing is known: the value is only written over
        // no entry.
        // With the store's own time to live: it fills L1, and it is the `Fetched::ttl` a read
        // answers (a `touch` moved it without rewriting the envelope).
        let read = if skips.l2_read {
            Ok(L2Read::Miss { seen: None })
        } else {
            self.read_l2(key, deadline, true).await
        };
        let seen = match read {
            Ok(L2Read::Hit { value, life, seen }) => {
                let life = life.under(options);
                // A stale value re-armed in L2 answers only calls with fail-safe.
                let unwanted = life.stale && options.fail_safe().is_none();
                let due = unwanted
                    || (refreshing
                        && life
                            .refresh_in(self.clock.now())
                            .is_none_or(|after| after.is_zero()));
                match value {
                    Some(_) if due => seen,
                    Some(value) => {
                        self.recorder.l2_hit(key);
                        self.fill_l1(key, Some(value.clone()), &life, || {
                            self.freshness.watch_is_current(watch)
                        });
                        return Looked::Answered(Outcome::Found(if life.stale {
                            Fetched::new_stale(value, Source::L2)
                        } else {
                            Fetched::new_fresh(value, Source::L2, Some(life.fresh))
                        }));
                    }
                    None if accepts_absent => {
                        self.recorder.l2_hit(key);
                        self.fill_l1(key, None, &life, || self.freshness.watch_is_current(watch));
                        return Looked::Answered(Outcome::Absent);
                    }
                    None => {
                        // A negative entry this call cannot use: no value to fall back on.
                        fallback = None;
                        seen
                    }
                }
            }
            Ok(L2Read::Stale {
                value,
                expires_at,
                seen,
                tags,
            }) => {
                // The newer of L1's and L2's stale values (a later expiry was written later).
                let newer = fallback
                    .as_ref()
                    .is_none_or(|l1: &Fallback<V>| expires_at > l1.expires_at);
                match value {
                    Some(value) if newer => {
                        fallback = Some(Fallback {
                            value,
                            source: Source::L2,
                            expires_at,
                            bytes: seen.clone(),
                            tags,
                        });
                    }
                    Some(_) => {}
                    // A stale "not found" is no value to fall back on, nor is L1's older one.
                    None => fallback = None,
                }
                seen
            }
            Ok(L2Read::Miss { seen }) => {
                // A delete's tombstone: the key was deleted (on any instance), and this
                // instance's old copy goes with it. (No entry at all says less: an eviction, or
                // this instance's own fill still on its way.)
                if seen.as_deref().is_some_and(envelope::is_tombstone) {
                    fallback = None;
                }
                seen
            }
            // Counted and logged: the origin answers.
            Err(_) => None,
        };
        let offered = fallback.as_ref().map(Fallback::offered);
        guard.offer_stale(offered);
        Looked::Load { seen, fallback }
    }

    /// Puts `entry` in L1 under `key` as it is, unless the key changed since `watch` began (or
    /// the cache is deaf).
    pub(super) fn replace_l1_entry(&self, key: &str, entry: L1Entry<V>, watch: &KeyWatch) {
        let Some(l1) = &self.l1 else { return };
        if self.is_deaf() && !entry.stale {
            return;
        }
        l1.insert(key.to_owned(), entry);
        if !self.freshness.watch_is_current(watch) {
            l1.invalidate(key);
        }
        self.report_l1_size(l1);
    }

    /// Fail-safe: answers a stale value after the loader failed, and re-arms it so that it
    /// answers for `throttle` before the origin is tried again: in L1 (marked stale, so even a
    /// deaf instance may answer it), or where the call keeps nothing in L1, in L2 (over the very
    /// bytes read, so that a newer value or a delete wins).
    pub(super) async fn serve_stale(
        &self,
        key: &str,
        fallback: Fallback<V>,
        options: &EntryOptions,
        watch: &KeyWatch,
    ) -> Fetched<V> {
        let throttle = options.fail_safe().map_or(Duration::ZERO, |f| f.throttle());
        let now = self.clock.now();
        let lives = now.until(fallback.expires_at);
        let life = Life {
            stale: true,
            tags: fallback.tags.clone(),
            ..Life::new(throttle.min(lives), lives, None)
        };
        if self.l1.is_some() && !options.skips().l1_write {
            let entry = life.l1_entry(Some(fallback.value.clone()), now);
            self.replace_l1_entry(key, entry, watch);
        } else if let (Some(l2), Some(seen)) = (&self.l2, &fallback.bytes)
            && self.may_reseal(seen)
        {
            let lifetime = Lifetime {
                written_at: now,
                fresh_until: now.saturating_add(life.fresh),
                expires_at: fallback.expires_at,
                stale: true,
            };
            let rearmed =
                self.encode_entry(key, Some(&fallback.value), lifetime, fallback.tags.as_ref());
            if let (Ok(bytes), false) = (rearmed, lives.is_zero()) {
                // Best effort: a failure is counted and logged, and the origin is tried again
                // sooner.
                let deadline = self.deadline();
                let _ = self
                    .write_over_seen(l2.as_ref(), key, bytes, lives, Some(seen), deadline)
                    .await;
            }
        }
        Fetched::new_stale(fallback.value, fallback.source)
    }

    /// Caches a loaded value (or a negative entry) in both tiers, unless the key was written or
    /// invalidated since `watch` began.
    ///
    /// With a background fill and room in its budget (and unless `inline`: a leased load's
    /// waiters are told once its value is in L2), L1 is filled first and the L2 write is
    /// left to a task, so that the callers have the value one L2 round trip sooner. Otherwise
    /// the L2 write comes first, and L1 is filled only if L2 took the value or failed (L1 and
    /// the loader keep serving while L2 is down).
    ///
    /// Returns how long the value is fresh as cached (`None`: cached in neither tier).
    pub(super) async fn store_loaded(
        self: &Arc<Self>,
        value: Option<&V>,
        options: &EntryOptions,
        caching: Caching,
        watch: KeyWatch,
        seen: Option<Bytes>,
        inline: bool,
    ) -> Option<Duration> {
        let key = watch.key().to_owned();
        let Caching { ttl, tags, since } = caching;
        if let Err(error) = validate_ttl(ttl) {
            // A loader's own TTL (adaptive options) out of range: served, not cached.
            tracing::warn!(cache = %self.namespace, key = %fingerprint(&key), error = %error, "loaded value not cached");
            return None;
        }
        // A "not found" is no fallback: it is not kept past its TTL.
        let mut life = match value {
            Some(_) => Self::life(options, ttl),
            None => Self::life(&options.without_fail_safe(), ttl),
        };
        if tags.is_some() {
            if let Err(error) = self.check_tagged_life(&life) {
                tracing::warn!(cache = %self.namespace, key = %fingerprint(&key), error = %error, "loaded value not cached");
                return None;
            }
            life.tags = tags;
        }
        if options.skips().l2_write {
            self.fill_l1(&key, value.cloned(), &life, || {
                self.freshness.watch_is_current(&watch)
            });
            let kept = life.to_l1 && self.l1.is_some() && !self.is_deaf();
            return kept.then_some(life.fresh);
        }
        let bytes = match self.encode_loaded(&key, value, &life, since) {
            Ok(bytes) => bytes,
            Err(error) => {
                // Served to the callers, but cached in neither tier.
                tracing::warn!(cache = %self.namespace, key = %fingerprint(&key), error = %error, "loaded value not cached");
                return None;
            }
        };
        let reserved = self
            .fill_budget
            .as_ref()
            .filter(|_| !inline)
            .and_then(|budget| budget.try_reserve(bytes.len() + key.len()));
        let runtime = reserved
            .as_ref()
            .and_then(|_| tokio::runtime::Handle::try_current().ok());
        if let (Some(reserved), Some(runtime)) = (reserved, runtime) {
            self.fill_l1(&key, value.cloned(), &life, || {
                self.freshness.watch_is_current(&watch)
            });
            let this = Arc::clone(self);
            runtime.spawn(async move {
                if this.write_loaded(bytes, life.lives, &watch, seen).await == Written::No {
                    this.drop_unwritten_fill(&watch);
                }
                drop(reserved);
            });
            return Some(life.fresh);
        }
        if self.write_loaded(bytes, life.lives, &watch, seen).await == Written::No {
            // Another writer's value or a delete won: the next read goes to L2.
            return None;
        }
        self.fill_l1(&key, value.cloned(), &life, || {
            self.freshness.watch_is_current(&watch)
        });
        Some(life.fresh)
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

/// What a flight's look in L1 and L2 found.
pub(super) enum Looked<V> {
    /// The flight's outcome, without the loader.
    Answered(Outcome<V>),
    /// A miss: load, and write over `seen`; answer `fallback` if the load fails.
    Load {
        seen: Option<Bytes>,
        fallback: Option<Fallback<V>>,
    },
}

/// A stale value that answers if the loader fails (fail-safe).
pub(super) struct Fallback<V> {
    pub(super) value: V,
    pub(super) source: Source,
    /// When it leaves the stores.
    pub(super) expires_at: Timestamp,
    /// The L2 bytes it was read from, if it came from L2.
    pub(super) bytes: Option<Bytes>,
    /// The tags it carries: a re-armed copy keeps them, so that a later removal of a tag
    /// reaches it too.
    pub(super) tags: Option<TagStamps>,
}

impl<V: Clone> Fallback<V> {
    /// The stale value as a flight offers it to its waiters.
    fn offered(&self) -> Fetched<V> {
        Fetched::new_stale(self.value.clone(), self.source)
    }
}

/// How a loaded value is cached: for how long, and with which tags' versions.
pub(super) struct Caching {
    pub(super) ttl: Duration,
    pub(super) tags: Option<TagStamps>,
    /// When the loader started: the value is at least that recent, and its entry records
    /// that time as its write time. A write kept for a replay from after it then wins over
    /// the loaded value, and one from before it loses (`replay_one`), whichever reaches the
    /// L2 first: a fill written after an outage must not pass for newer than a write made
    /// during it.
    pub(super) since: Timestamp,
}

/// Why a load gave no value.
pub(super) enum Failure<E> {
    Loader(E),
    Panicked,
    TimedOut(Duration),
}

/// A caller's answer from a flight's outcome.
pub(super) fn answer<V, E: Send + Sync + 'static>(
    outcome: Outcome<V>,
) -> Result<Option<Fetched<V>>, LoadError<E>> {
    match outcome {
        Outcome::Found(fetched) => Ok(Some(fetched)),
        Outcome::Absent => Ok(None),
        Outcome::Failed(error) => match error.downcast::<E>() {
            Ok(error) => Err(LoadError::Loader(error)),
            // Unreachable: a flight's waiters share its loader's error type.
            Err(_) => Err(LoadError::Panicked),
        },
        Outcome::TimedOut(after) => Err(LoadError::TimedOut { after }),
        // `flight` leads again instead of answering an abandoned flight.
        Outcome::Panicked | Outcome::Abandoned => Err(LoadError::Panicked),
    }
}
