//! `get_or_load_with`: flights whose load runs in a task of its own, so that it can outlive its
//! callers. A caller waits for the flight under its own deadlines: past the soft timeout it
//! answers a stale value (fail-safe) and past the hard timeout the stale value or a timeout,
//! while the load goes on and updates both tiers (background completion). A hit past the eager
//! refresh threshold starts such a flight and does not wait for it.

use std::any::TypeId;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::clock::Timestamp;
use tierstack_core::{CacheError, Codec};
use tokio::runtime::Handle;
use tokio::time::Instant;

use super::Inner;
use super::load::{AcceptsAbsent, NeedsValue, answer};
use crate::error::LoadError;
use crate::events::StaleReason;
use crate::flight::{FlightWait, Leader, Outcome, Role};
use crate::freshness::KeyWatch;
use crate::options::{EntryOptions, Fetched, Loaded, Source};
use tierstack_moka::L1Entry;

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn get_or_load_with<F, Fut, R, E>(
        self: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Fetched<V>, LoadError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        R: Into<Loaded<V>> + 'static,
        E: Send + Sync + 'static,
    {
        let loader = move || async move {
            loader()
                .await
                .map(|answer| Into::<Loaded<V>>::into(answer).into_optional())
        };
        match self.fetch(key, options, false, loader).await? {
            Some(fetched) => Ok(fetched),
            // Unreachable: a flight that needs a value answers none only by failing.
            None => Err(LoadError::Panicked),
        }
    }

    pub(super) async fn get_or_load_optional_with<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Option<Fetched<V>>, LoadError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let loader = move || async move { loader().await.map(Loaded::new) };
        self.fetch(key, options, true, loader).await
    }

    /// The read-through of `get_or_load_with` and `get_or_load_optional_with`: L1, then the
    /// key's flight in a task of its own, waited for under the call's deadlines.
    async fn fetch<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
        accepts_absent: bool,
        loader: F,
    ) -> Result<Option<Fetched<V>>, LoadError<E>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Loaded<Option<V>>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        self.check_key(key)?;
        let kind = if accepts_absent {
            TypeId::of::<AcceptsAbsent<E>>()
        } else {
            TypeId::of::<NeedsValue<E>>()
        };
        let flight = FlightKind {
            kind,
            accepts_absent,
        };
        let l1_entry = self.l1_entry(key).filter(|_| !options.skips().l1_read);
        if let Some(entry) = l1_entry {
            let now = self.clock.now();
            // A re-armed stale value answers only calls with fail-safe (as in the flight).
            let serving =
                self.serving(&entry, now) && (!entry.stale || options.fail_safe().is_some());
            match &entry.value {
                Some(value) if serving => {
                    self.recorder.l1_hit(key);
                    if entry.refresh_at.is_some_and(|at| now >= at) {
                        self.refresh(key, flight, options, now, loader);
                    }
                    return Ok(Some(if entry.stale {
                        Fetched::new_stale(value.clone(), Source::L1)
                    } else {
                        Fetched::new_fresh(
                            value.clone(),
                            Source::L1,
                            Some(now.until(entry.fresh_until)),
                        )
                    }));
                }
                None if serving && accepts_absent => {
                    self.recorder.l1_hit(key);
                    return Ok(None);
                }
                // A stale value is the flight's to offer (it checks L2 first: a delete there
                // wins).
                _ => {}
            }
        }
        options.validate()?;
        let started = Instant::now();
        let deadlines = Deadlines {
            soft: options.soft_timeout().map(|limit| started + limit),
            hard: options.hard_timeout().map(|limit| started + limit),
        };
        let mut loader = Some(loader);
        loop {
            let watch = self.freshness.watch(key);
            let wait = match self.flights.join_or_lead(key, kind, watch.stamp()) {
                Role::Reentrant => return Err(LoadError::Reentrant),
                Role::Wait(wait) => wait,
                Role::Lead(guard) => {
                    let Ok(runtime) = Handle::try_current() else {
                        return Err(LoadError::Cache(CacheError::Configuration(
                            "get_or_load_with runs its load in a task: call it in a Tokio runtime"
                                .into(),
                        )));
                    };
                    // Only a flight of a task that was aborted (a runtime shutting down) comes
                    // back to lead again, and its loader is gone with it.
                    let (Some(loader), Some(wait)) = (loader.take(), guard.waiter()) else {
                        return Err(LoadError::Panicked);
                    };
                    self.spawn_flight(&runtime, flight, false, options, watch, guard, loader);
                    wait
                }
            };
            match self.await_flight(key, wait, deadlines, options).await {
                Outcome::Abandoned => {}
                // Another caller's fail-safe answer (this call's own flight gives none without
                // fail-safe): this call leads a flight of its own.
                Outcome::Found(found)
                    if found.stale && options.fail_safe().is_none() && loader.is_some() => {}
                outcome => return answer(outcome),
            }
        }
    }

    /// Starts an eager refresh of `key` unless a flight of it is running already; returns at
    /// once. The entry's refresh time is cleared first, so that later hits do not start another
    /// one; the refresh's value comes with its own. (A refresh that caches nothing, or fails,
    /// leaves the value until its TTL without refreshing it early again.)
    ///
    /// The entry cleared is the one L1 holds once the key is watched, not the one the hit read:
    /// a write or delete that landed in between must not be undone by putting that one back.
    fn refresh<F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        flight: FlightKind,
        options: &EntryOptions,
        now: Timestamp,
        loader: F,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Loaded<Option<V>>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        if options.validate().is_err() {
            return;
        }
        let watch = self.freshness.watch(key);
        let Some(entry) = self
            .l1_entry(key)
            .filter(|entry| entry.refresh_at.is_some_and(|at| now >= at))
        else {
            return;
        };
        if let Role::Lead(guard) = self.flights.join_or_lead(key, flight.kind, watch.stamp()) {
            self.recorder.eager_refresh(key);
            self.replace_l1_entry(
                key,
                L1Entry {
                    refresh_at: None,
                    ..entry
                },
                &watch,
            );
            self.spawn_flight(&runtime, flight, true, options, watch, guard, loader);
        }
    }

    /// Runs the flight that `guard` leads in a task: the caller waits for it like any other
    /// caller, and it goes on if they all stop waiting. With background completion off, the
    /// flight itself gives up at the hard timeout.
    #[expect(
        clippy::too_many_arguments,
        reason = "a flight's identity, mode, options, watch, registration and loader"
    )]
    fn spawn_flight<F, Fut, E>(
        self: &Arc<Self>,
        runtime: &Handle,
        flight: FlightKind,
        refreshing: bool,
        options: &EntryOptions,
        watch: KeyWatch,
        guard: Leader<V>,
        loader: F,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Loaded<Option<V>>, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let mut flight_options = *options;
        if options.background_completion() {
            flight_options = flight_options.without_hard_timeout();
        }
        let this = Arc::clone(self);
        let accepts_absent = flight.accepts_absent;
        let flight = async move {
            let key = watch.key().to_owned();
            let outcome = this
                .lead(
                    accepts_absent,
                    refreshing,
                    &flight_options,
                    watch,
                    &guard,
                    loader,
                )
                .await;
            match &outcome {
                Outcome::Found(found) if found.source == Source::Loader => {
                    this.recorder.background_load(&key, true);
                }
                Outcome::Found(Fetched { stale: true, .. })
                | Outcome::Failed(_)
                | Outcome::Panicked
                | Outcome::TimedOut(_) => this.recorder.background_load(&key, false),
                _ => {}
            }
            guard.complete(outcome);
        };
        runtime.spawn(flight);
    }

    /// A caller's wait for a flight under its deadlines. Past the soft one, the stale value the
    /// flight found answers (or, if it has found none yet, the first it finds before the load
    /// ends); past the hard one, that stale value with fail-safe, else a timeout. A flight
    /// that failed (it may have been started without fail-safe) also answers its stale value
    /// to a caller with fail-safe.
    async fn await_flight(
        &self,
        key: &str,
        mut wait: FlightWait<V>,
        deadlines: Deadlines,
        options: &EntryOptions,
    ) -> Outcome<V> {
        let fail_safe = options.fail_safe().is_some();
        let outcome = 'waited: {
            if let (Some(soft), true) = (deadlines.soft, fail_safe) {
                match wait.outcome_until(soft).await {
                    Ok(outcome) => break 'waited outcome,
                    Err(Some(stale)) => {
                        self.recorder.stale_served(key, StaleReason::SoftTimeout);
                        return Outcome::Found(stale);
                    }
                    // No stale value yet (L2 is slow to answer, say): the first one found
                    // answers, as it would have at the soft timeout.
                    Err(None) => match wait.outcome_or_stale_until(deadlines.hard).await {
                        Ok(outcome) => break 'waited outcome,
                        Err(Some(stale)) => {
                            self.recorder.stale_served(key, StaleReason::SoftTimeout);
                            return Outcome::Found(stale);
                        }
                        Err(None) => {
                            return Outcome::TimedOut(options.hard_timeout().unwrap_or_default());
                        }
                    },
                }
            }
            let Some(hard) = deadlines.hard else {
                break 'waited wait.outcome().await;
            };
            match wait.outcome_until(hard).await {
                Ok(outcome) => outcome,
                Err(Some(stale)) if fail_safe => {
                    self.recorder.stale_served(key, StaleReason::HardTimeout);
                    return Outcome::Found(stale);
                }
                Err(_) => return Outcome::TimedOut(options.hard_timeout().unwrap_or_default()),
            }
        };
        match (&outcome, fail_safe, wait.stale()) {
            (Outcome::Failed(_) | Outcome::Panicked | Outcome::TimedOut(_), true, Some(stale)) => {
                self.recorder.stale_served(key, StaleReason::LoaderFailed);
                Outcome::Found(stale)
            }
            _ => outcome,
        }
    }
}

/// Which flights a call may share: its loader's error type, and whether a "not found" answers
/// it.
#[derive(Debug, Clone, Copy)]
struct FlightKind {
    kind: TypeId,
    accepts_absent: bool,
}

/// When a caller stops waiting for a load.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    soft: Option<Instant>,
    hard: Option<Instant>,
}
