//! Single-flight: concurrent misses of one key share one L2 read and one loader call.
//!
//! The first caller registers a flight and runs it itself (no task); later callers of the key
//! wait for its outcome. A leader that is cancelled (its future dropped, a timeout) or unwinds
//! strands nobody: its guard unregisters the flight and tells the waiters, and one of them leads
//! a new flight with its own loader. Flights are told apart by the loader's error type too (as
//! moka's `try_get_with` does), so that every waiter can receive the leader's error as its own
//! type.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::freshness::Stamp;
use crate::options::Fetched;

/// A loader's error as the waiters of its flight receive it: an `Arc<E>` behind `Any`, so that
/// one registry holds flights of every error type.
pub(crate) type SharedError = Arc<dyn Any + Send + Sync>;

/// How a flight ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome<V> {
    /// A value, with where it came from.
    Found(Fetched<V>),
    /// No value: the loader answered `None`, or a negative entry was found.
    Absent,
    /// The loader failed with this error (an `Arc<E>`).
    Failed(SharedError),
    /// The loader panicked.
    Panicked,
    /// The loader ran past this hard timeout and was cancelled.
    TimedOut(std::time::Duration),
    /// The leader was cancelled before it finished: a waiter leads a new flight.
    Abandoned,
}

/// What a caller of a flight does.
pub(crate) enum Role<V> {
    /// Wait for the outcome of the running flight.
    Wait(FlightWait<V>),
    /// Lead a new flight; completing the guard (or dropping it) ends the flight.
    Lead(Leader<V>),
    /// The caller is already leading this flight further up its own call stack (a loader that
    /// asked the cache for the key it is loading): waiting would wait for itself.
    Reentrant,
}

/// What a flight has to say: its outcome once it ends, and before that the stale value it found
/// (fail-safe), which a caller whose soft timeout passes answers instead.
#[derive(Debug)]
pub(crate) struct FlightState<V> {
    stale: Option<Fetched<V>>,
    outcome: Option<Outcome<V>>,
}

impl<V> Default for FlightState<V> {
    fn default() -> Self {
        Self {
            stale: None,
            outcome: None,
        }
    }
}

/// The outcome of a running flight, awaited.
pub(crate) struct FlightWait<V>(watch::Receiver<FlightState<V>>);

impl<V: Clone> FlightWait<V> {
    /// The flight's outcome; [`Outcome::Abandoned`] if its leader went away without one.
    pub(crate) async fn outcome(&mut self) -> Outcome<V> {
        match self.0.wait_for(|state| state.outcome.is_some()).await {
            Ok(state) => state.outcome.clone().unwrap_or(Outcome::Abandoned),
            Err(_) => Outcome::Abandoned,
        }
    }

    /// The stale value the flight offers (fail-safe), if any.
    pub(crate) fn stale(&self) -> Option<Fetched<V>> {
        self.0.borrow().stale.clone()
    }

    /// The flight's outcome if it ends before `deadline`; else `Err` with the stale value the
    /// flight found meanwhile, if any.
    pub(crate) async fn outcome_until(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome<V>, Option<Fetched<V>>> {
        let ended = self.0.wait_for(|state| state.outcome.is_some());
        let ended = match tokio::time::timeout_at(deadline, ended).await {
            Ok(Ok(state)) => Some(state.outcome.clone().unwrap_or(Outcome::Abandoned)),
            Ok(Err(_)) => Some(Outcome::Abandoned),
            Err(_) => None,
        };
        ended.ok_or_else(|| self.0.borrow().stale.clone())
    }

    /// The flight's outcome, or the first stale value it offers, whichever comes first (by
    /// `deadline`, if any); `Err(None)` if the deadline passed with neither.
    pub(crate) async fn outcome_or_stale_until(
        &mut self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Outcome<V>, Option<Fetched<V>>> {
        let first = self
            .0
            .wait_for(|state| state.outcome.is_some() || state.stale.is_some());
        let first = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, first).await,
            None => Ok(first.await),
        };
        match first {
            Ok(Ok(state)) => match &state.outcome {
                Some(outcome) => Ok(outcome.clone()),
                None => Err(state.stale.clone()),
            },
            Ok(Err(_)) => Ok(Outcome::Abandoned),
            Err(_) => Err(None),
        }
    }
}

type FlightKey = (Box<str>, TypeId);

struct Registered<V> {
    id: u64,
    /// What the leader knew of the key when the flight began.
    stamp: Stamp,
    receiver: watch::Receiver<FlightState<V>>,
}

/// The running flights of one cache.
pub(crate) struct Flights<V> {
    running: Arc<Mutex<HashMap<FlightKey, Registered<V>>>>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Self {
            running: Arc::default(),
        }
    }
}

impl<V> std::fmt::Debug for Flights<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

/// Flight ids, unique in the process, so that a task can tell the flights it leads.
static NEXT_FLIGHT: AtomicU64 = AtomicU64::new(1);

tokio::task_local! {
    /// The flights that the current task leads, innermost last.
    static LEADING: Vec<u64>;
}

impl<V: Clone> Flights<V> {
    /// Joins the running flight of `key` for loaders failing with `kind`, or registers a new
    /// one led by the caller. A flight that began before an invalidation the caller has seen
    /// (its `stamp` differs) may carry the old value: the caller leads a new one instead.
    pub(crate) fn join_or_lead(&self, key: &str, kind: TypeId, stamp: Stamp) -> Role<V> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let flight_key: FlightKey = (key.into(), kind);
        if let Some(flight) = running.get(&flight_key).filter(|f| f.stamp == stamp) {
            let own = LEADING
                .try_with(|leading| leading.contains(&flight.id))
                .unwrap_or(false);
            if own {
                return Role::Reentrant;
            }
            return Role::Wait(FlightWait(flight.receiver.clone()));
        }
        let (sender, receiver) = watch::channel(FlightState::default());
        let id = NEXT_FLIGHT.fetch_add(1, Ordering::Relaxed);
        running.insert(
            flight_key.clone(),
            Registered {
                id,
                stamp,
                receiver,
            },
        );
        Role::Lead(Leader {
            running: Arc::clone(&self.running),
            key: flight_key,
            id,
            sender: Some(sender),
        })
    }
}

/// The leader's registration of its flight. Completing it unregisters the flight, then
/// publishes the outcome; dropping it uncompleted (the leader was cancelled, or unwound)
/// unregisters it and tells the waiters to lead again.
pub(crate) struct Leader<V> {
    running: Arc<Mutex<HashMap<FlightKey, Registered<V>>>>,
    key: FlightKey,
    id: u64,
    sender: Option<watch::Sender<FlightState<V>>>,
}

impl<V> Leader<V> {
    fn unregister(&self) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.get(&self.key).is_some_and(|f| f.id == self.id) {
            running.remove(&self.key);
        }
    }

    /// Unregisters, then publishes `outcome`: a caller arriving from now on starts a fresh
    /// flight (which finds what this one cached) instead of taking an outcome that a later
    /// invalidation may have outdated.
    pub(crate) fn complete(mut self, outcome: Outcome<V>) {
        self.unregister();
        if let Some(sender) = self.sender.take() {
            sender.send_modify(|state| state.outcome = Some(outcome));
        }
    }

    /// Tells the waiters of the stale value the flight found (or that there is none after
    /// all), for a soft timeout or a failed load to answer.
    pub(crate) fn offer_stale(&self, stale: Option<Fetched<V>>) {
        if let Some(sender) = &self.sender {
            sender.send_modify(|state| state.stale = stale);
        }
    }

    /// A wait for this flight's outcome, for a leader that runs the flight in a task.
    pub(crate) fn waiter(&self) -> Option<FlightWait<V>> {
        self.sender
            .as_ref()
            .map(|sender| FlightWait(sender.subscribe()))
    }

    /// Runs `work` (the loader) marked as led by this flight, so that the loader's own call
    /// for the same key is recognised as [`Role::Reentrant`] instead of waiting for itself.
    pub(crate) async fn run_marked<F: Future>(&self, work: F) -> F::Output {
        let mut leading = LEADING.try_with(Clone::clone).unwrap_or_default();
        leading.push(self.id);
        LEADING.scope(leading, work).await
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.unregister();
            sender.send_modify(|state| state.outcome = Some(Outcome::Abandoned));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind() -> TypeId {
        TypeId::of::<std::io::Error>()
    }

    fn stamp(f: &crate::freshness::Freshness) -> Stamp {
        f.watch("k").stamp()
    }

    #[tokio::test]
    async fn one_leader_per_key_and_error_type() {
        let f = crate::freshness::Freshness::new();
        let flights: Flights<u32> = Flights::default();
        let Role::Lead(leader) = flights.join_or_lead("k", kind(), stamp(&f)) else {
            panic!("the first caller leads");
        };
        let Role::Wait(mut waiter) = flights.join_or_lead("k", kind(), stamp(&f)) else {
            panic!("the second waits");
        };
        assert!(matches!(
            flights.join_or_lead("k", TypeId::of::<String>(), stamp(&f)),
            Role::Lead(_)
        ));
        leader.complete(Outcome::Found(Fetched::new_fresh(
            7,
            crate::Source::Loader,
            None,
        )));
        assert!(matches!(waiter.outcome().await, Outcome::Found(f) if f.value == 7));
        assert!(matches!(
            flights.join_or_lead("k", kind(), stamp(&f)),
            Role::Lead(_)
        ));
    }

    #[tokio::test]
    async fn a_caller_that_saw_an_invalidation_leads_a_new_flight() {
        let f = crate::freshness::Freshness::new();
        let flights: Flights<u32> = Flights::default();
        let watch = f.watch("k");
        let Role::Lead(_old) = flights.join_or_lead("k", kind(), watch.stamp()) else {
            panic!("the first caller leads");
        };
        f.bump_key("k");
        assert!(matches!(
            flights.join_or_lead("k", kind(), stamp(&f)),
            Role::Lead(_)
        ));
    }

    #[tokio::test]
    async fn a_dropped_leader_abandons_its_flight() {
        let f = crate::freshness::Freshness::new();
        let flights: Flights<u32> = Flights::default();
        let Role::Lead(leader) = flights.join_or_lead("k", kind(), stamp(&f)) else {
            panic!("the first caller leads");
        };
        let Role::Wait(mut waiter) = flights.join_or_lead("k", kind(), stamp(&f)) else {
            panic!("the second waits");
        };
        drop(leader);
        assert!(matches!(waiter.outcome().await, Outcome::Abandoned));
    }

    #[tokio::test]
    async fn the_leader_asking_for_its_own_key_is_told_so() {
        let f = crate::freshness::Freshness::new();
        let flights: Flights<u32> = Flights::default();
        let Role::Lead(leader) = flights.join_or_lead("k", kind(), stamp(&f)) else {
            panic!("the first caller leads");
        };
        let inner = leader
            .run_marked(async {
                matches!(
                    flights.join_or_lead("k", kind(), stamp(&f)),
                    Role::Reentrant
                )
            })
            .await;
        assert!(inner);
        assert!(
            matches!(flights.join_or_lead("k", kind(), stamp(&f)), Role::Wait(_)),
            "another caller waits"
        );
    }
}
