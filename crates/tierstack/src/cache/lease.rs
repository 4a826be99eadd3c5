//! Cluster-wide single-flight (see [`crate::lease`]): before its loader runs, a flight takes the
//! key's lease on the L2, or waits for the value of the instance that holds it.
//!
//! The lease is a `set_if_absent` of the key's lease key with a random token, for the lease's
//! TTL: of all the instances asking at once, exactly one gets it. The others wait, woken by the
//! holder's invalidation of the key once its value is in L2 (or by their poll), and look again:
//! the value answers them, or, if the lease is gone with no value (the holder failed, was
//! cancelled, or stalled past the TTL), one of them takes it over. Fencing needs nothing more:
//! every loaded value is written over exactly what its own read saw, so a holder that lost its
//! lease cannot overwrite the value of the one that took it over, nor any later write.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::Invalidation;
use tierstack_core::{CacheError, Codec};
use tokio::time::Instant;

use super::Inner;
use super::load::{Caching, Failure, Fallback, Looked};
use crate::flight::{Leader, Outcome};
use crate::freshness::KeyWatch;
use crate::lease::{LoadLease, lease_key, token};
use crate::options::EntryOptions;
use crate::stats::{L2Op, LeaseOutcome};

/// A flight that calls its loader: holding the lease, or without one (the call shares nothing,
/// or the L2 could not be asked). It writes the value over `seen` and falls back on `fallback`.
pub(super) struct ToLoad<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) lease: Option<HeldLease<V, C>>,
    pub(super) watch: KeyWatch,
    pub(super) seen: Option<Bytes>,
    pub(super) fallback: Option<Fallback<V>>,
}

/// What a flight found before its loader, and whether it may call it.
enum Leased<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    Load(ToLoad<V, C>),
    /// Another instance's load (or a write meanwhile) answers.
    Answered(Outcome<V>),
    /// The caller's hard deadline passed while another instance held the lease.
    TimedOut {
        watch: KeyWatch,
        fallback: Option<Fallback<V>>,
    },
}

/// What the flight asks of its look again after each wait.
pub(super) struct Asking<'a, V> {
    pub(super) accepts_absent: bool,
    pub(super) refreshing: bool,
    pub(super) options: &'a EntryOptions,
    pub(super) guard: &'a Leader<V>,
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// The lease a flight under `options` takes: `None` without an L2, or when the call skips
    /// reading or writing it (nothing another instance could share).
    pub(super) fn lease_settings(&self, options: &EntryOptions) -> Option<LoadLease> {
        let skips = options.skips();
        let shared = self.l2.is_some() && !skips.l2_read && !skips.l2_write;
        options.load_lease().filter(|_| shared)
    }

    /// Before a flight's loader: takes the key's lease if the call shares its load, or waits
    /// for the holder's value. `Err`: the flight's outcome without its loader (another
    /// instance's value, or a timeout while waiting for it).
    pub(super) async fn lease_first(
        self: &Arc<Self>,
        asking: Asking<'_, V>,
        watch: KeyWatch,
        seen: Option<Bytes>,
        fallback: Option<Fallback<V>>,
        hard_deadline: Option<Instant>,
    ) -> Result<ToLoad<V, C>, Outcome<V>> {
        let (options, guard) = (asking.options, asking.guard);
        let Some(settings) = self.lease_settings(options) else {
            return Ok(ToLoad {
                lease: None,
                watch,
                seen,
                fallback,
            });
        };
        match self
            .lease_or_wait(settings, asking, watch, seen, fallback, hard_deadline)
            .await
        {
            Leased::Load(to_load) => Ok(to_load),
            Leased::Answered(outcome) => Err(outcome),
            Leased::TimedOut { watch, fallback } => {
                let timed_out =
                    Failure::<Infallible>::TimedOut(options.hard_timeout().unwrap_or_default());
                Err(self
                    .after_failure(timed_out, fallback, options, &watch, guard)
                    .await)
            }
        }
    }

    /// Takes the lease of `watch`'s key, or waits for the value of the instance that holds it,
    /// until `hard_deadline`. `seen` and `fallback` are what the flight's look found; the answer
    /// carries the latest look's.
    async fn lease_or_wait(
        self: &Arc<Self>,
        settings: LoadLease,
        asking: Asking<'_, V>,
        mut watch: KeyWatch,
        mut seen: Option<Bytes>,
        mut fallback: Option<Fallback<V>>,
        hard_deadline: Option<Instant>,
    ) -> Leased<V, C> {
        let Some(l2) = self.l2.clone() else {
            return Leased::Load(ToLoad {
                lease: None,
                watch,
                seen,
                fallback,
            });
        };
        let key = watch.key().to_owned();
        let store_key = lease_key(self.namespace.as_str(), &key);
        let token = token();
        let registration = self.lease_waiters.register(&key);
        // Doubled after each quiet wait, up to eight times the setting: a notification wakes
        // the waiter at once, so a long load costs few polls.
        let mut poll = settings.poll_interval();
        // However others keep taking the lease (a holder that fails, then another), a caller
        // waits at most twice its TTL before loading on its own.
        let give_up = Instant::now() + settings.ttl() * 2;
        // Armed before the lease is asked for, and again before each look: a value that lands
        // from then on wakes the wait.
        let mut landed = Box::pin(registration.notify().notified());
        landed.as_mut().enable();
        loop {
            let deadline = hard_deadline.map_or(self.deadline(), |hard| hard.min(self.deadline()));
            let asked = l2.set_if_absent(&store_key, token.clone(), settings.ttl());
            match self.l2_call(L2Op::Other, deadline, asked).await {
                Ok(true) => {
                    let lease = HeldLease {
                        cache: Arc::clone(self),
                        store_key,
                        token,
                        held: true,
                    };
                    return self.took_lease(lease, &key, &asking, deadline).await;
                }
                Ok(false) => {}
                Err(error) => {
                    self.release_if_landed(&error, store_key, token);
                    if hard_deadline.is_some_and(|hard| Instant::now() >= hard) {
                        return Leased::TimedOut { watch, fallback };
                    }
                    // Down, or its breaker open: the origin answers, once per instance.
                    return self.load_unleased(watch, seen, fallback);
                }
            }
            let next_poll = Instant::now() + poll;
            let wake_at = hard_deadline.map_or(next_poll, |hard| hard.min(next_poll));
            if tokio::time::timeout_at(wake_at, landed.as_mut())
                .await
                .is_err()
            {
                poll = (poll * 2)
                    .min(settings.poll_interval() * 8)
                    .min(settings.ttl());
            }
            if hard_deadline.is_some_and(|hard| Instant::now() >= hard) {
                return Leased::TimedOut { watch, fallback };
            }
            landed = Box::pin(registration.notify().notified());
            landed.as_mut().enable();
            // A new watch: the holder's invalidation changed the key since the last one.
            watch = self.freshness.watch(&key);
            let deadline = hard_deadline.map_or(self.deadline(), |hard| hard.min(self.deadline()));
            let looked = self.look_again(&asking, &watch, deadline).await;
            match looked {
                Looked::Answered(outcome) => {
                    self.recorder.lease(LeaseOutcome::Waited);
                    return Leased::Answered(outcome);
                }
                Looked::Load {
                    seen: now_seen,
                    fallback: now_fallback,
                } => {
                    seen = now_seen;
                    fallback = now_fallback;
                    if Instant::now() >= give_up {
                        return self.load_unleased(watch, seen, fallback);
                    }
                }
            }
        }
    }

    /// The flight's look in L1 and L2 once more, under a new `watch`.
    async fn look_again(
        &self,
        asking: &Asking<'_, V>,
        watch: &KeyWatch,
        deadline: Instant,
    ) -> Looked<V> {
        self.look(
            asking.accepts_absent,
            asking.refreshing,
            asking.options,
            watch,
            asking.guard,
            deadline,
        )
        .await
    }

    /// The end of a leased load: its value (`to_store`, if it is to be cached) goes to L2
    /// inline, then the other instances are told and the lease is released, so that a waiter
    /// woken finds the value. How long the value is fresh as cached, if known.
    ///
    /// A flight with a hard timeout does not wait for these three round trips (its caller's
    /// wait would end at that timeout, with the loaded value lost): they go on in a task, and
    /// the value reports no TTL, since whether it is cached is not known yet.
    pub(super) async fn finish_leased_load(
        self: &Arc<Self>,
        lease: HeldLease<V, C>,
        to_store: Option<(Option<V>, Caching)>,
        options: EntryOptions,
        watch: KeyWatch,
        seen: Option<Bytes>,
        hard_deadline: Option<Instant>,
    ) -> Option<Duration> {
        let this = Arc::clone(self);
        let finish = async move {
            let key = watch.key().to_owned();
            let cached_for = match to_store {
                Some((value, caching)) => {
                    this.store_loaded(value.as_ref(), &options, caching, watch, seen, true)
                        .await
                }
                None => None,
            };
            this.announce_leased_load(&key, &options).await;
            lease.release().await;
            cached_for
        };
        let (Some(_), Ok(runtime)) = (hard_deadline, tokio::runtime::Handle::try_current()) else {
            return finish.await;
        };
        // Not awaited even while time is left: the caller's own wait for the flight ends at
        // the same instant, and would win with a timeout whenever the two coincide.
        runtime.spawn(finish);
        None
    }

    /// The flight loads without a lease (the L2 could not be asked, or it waited long enough),
    /// counted as such.
    fn load_unleased(
        &self,
        watch: KeyWatch,
        seen: Option<Bytes>,
        fallback: Option<Fallback<V>>,
    ) -> Leased<V, C> {
        self.recorder.lease(LeaseOutcome::Unavailable);
        Leased::Load(ToLoad {
            lease: None,
            watch,
            seen,
            fallback,
        })
    }

    /// This flight took the lease. It may be free because its last holder has just finished:
    /// one more look, so that its value answers instead of a second load.
    async fn took_lease(
        self: &Arc<Self>,
        lease: HeldLease<V, C>,
        key: &str,
        asking: &Asking<'_, V>,
        deadline: Instant,
    ) -> Leased<V, C> {
        self.recorder.lease(LeaseOutcome::Taken);
        let watch = self.freshness.watch(key);
        match self.look_again(asking, &watch, deadline).await {
            Looked::Answered(outcome) => {
                lease.release().await;
                Leased::Answered(outcome)
            }
            Looked::Load { seen, fallback } => Leased::Load(ToLoad {
                lease: Some(lease),
                watch,
                seen,
                fallback,
            }),
        }
    }

    /// A request for the lease that timed out may still have taken it: released (by its
    /// token, so only if it did) in a task, so that the others need not wait for its TTL.
    fn release_if_landed(self: &Arc<Self>, error: &CacheError, store_key: String, token: Bytes) {
        if matches!(error, CacheError::Timeout { .. }) {
            drop(HeldLease {
                cache: Arc::clone(self),
                store_key,
                token,
                held: true,
            });
        }
    }

    /// After a leased load: tells the instances waiting for the key that its value is in L2
    /// (unless the call skips the backplane; they poll), whatever became of the write: a
    /// value another writer stored meanwhile answers them as well.
    async fn announce_leased_load(self: &Arc<Self>, key: &str, options: &EntryOptions) {
        if options.skips().backplane {
            return;
        }
        let deadline = self.deadline();
        self.publish_by(&Invalidation::Keys(vec![key.to_owned()]), deadline)
            .await;
    }
}

/// A lease this instance holds. Released when the load is over; dropped unreleased (its
/// flight was cancelled), it is released in a task of its own, so that a waiter takes it over
/// at once rather than at its TTL.
pub(super) struct HeldLease<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    cache: Arc<Inner<V, C>>,
    store_key: String,
    token: Bytes,
    held: bool,
}

impl<V, C> HeldLease<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// Removes the lease if it is still this holder's (a lease that ran out may be another's).
    pub(super) async fn release(mut self) {
        release(&self.cache, &self.store_key, &self.token).await;
        // Only now: a release cancelled half-way is finished by `drop`.
        self.held = false;
    }
}

impl<V, C> Drop for HeldLease<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Nowhere to run the release: the lease ends at its TTL.
            return;
        };
        let cache = Arc::clone(&self.cache);
        let store_key = std::mem::take(&mut self.store_key);
        let token = self.token.clone();
        runtime.spawn(async move { release(&cache, &store_key, &token).await });
    }
}

async fn release<V, C>(cache: &Inner<V, C>, store_key: &str, token: &[u8])
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    let Some(l2) = &cache.l2 else { return };
    let deadline = cache.deadline();
    // A failure is counted and logged; the lease then ends at its TTL.
    let released = l2.compare_and_set(store_key, token, None);
    let _ = cache.l2_call(L2Op::Other, deadline, released).await;
}
