//! The L2's circuit breaker: after a run of failures the L2 is left alone for a while, so that
//! reads are served by L1, fail-safe and the loader at once instead of after a timeout each;
//! then one call at a time probes it, and the first that succeeds closes the breaker.

use std::sync::Mutex;
use std::time::Duration;

use tierstack_core::{CacheError, Result};
use tokio::time::Instant;

/// When the L2's circuit breaker opens, and for how long
/// ([`TieredCacheBuilder::l2_circuit_breaker`](crate::TieredCacheBuilder::l2_circuit_breaker)).
///
/// Only transient failures count (a lost connection, an overloaded server, a timeout with at
/// least half the L2 timeout to run in); an answer of any kind, an error about the request
/// itself included, resets the count. A check before any round trip, or a call cut short by
/// its caller's own deadline, counts for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    failures: u32,
    open_for: Duration,
}

impl CircuitBreaker {
    /// Opens after `failures` consecutive failed L2 calls, for `open_for`.
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Self { failures, open_for }
    }

    /// How many consecutive failures open it.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How long it stays open before a call probes the L2.
    pub fn open_for(&self) -> Duration {
        self.open_for
    }

    /// At least one failure, open from 1 ms to 1 h.
    /// `setting`: the builder method it came from, named in the error.
    pub(crate) fn validate(&self, setting: &str) -> Result<()> {
        let open_for = Duration::from_millis(1)..=Duration::from_secs(3600);
        if self.failures == 0 || !open_for.contains(&self.open_for) {
            return Err(CacheError::Configuration(format!(
                "{setting} needs at least 1 failure and an open time from 1 ms to 1 h, not {} \
                 and {:?}",
                self.failures, self.open_for
            )));
        }
        Ok(())
    }
}

/// The state of the L2's circuit breaker, as events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CircuitState {
    /// L2 calls go through.
    Closed,
    /// L2 calls are skipped: reads are served by L1, fail-safe and the loader, and writes fail
    /// with [`CacheError::CircuitOpen`].
    Open,
    /// The open time is over: one call probes the L2 while the others are still skipped.
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe runs; it ends by `until` (its L2 timeout) at the latest.
    Probing {
        until: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
struct State {
    phase: Phase,
    /// Counts the phase changes: the outcome of a call admitted in an earlier phase (a call
    /// still running when the breaker opened, then closed again) changes nothing.
    generation: u64,
}

/// Whether a call may go to the L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Call {
        generation: u64,
    },
    /// The one call that tests the L2 after the open time.
    Probe {
        generation: u64,
    },
    Refused {
        retry_in: Duration,
    },
}

/// What an admitted L2 call said about the L2's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The L2 answered (an error about the request included).
    Answered,
    /// The L2 failed: a lost connection, an overloaded server, no answer within its timeout.
    Failed,
    /// Nothing learned: the call ended for a reason of its own (a check before any round trip,
    /// a deadline that its caller or a lock wait had mostly used up).
    Unknown,
}

impl Outcome {
    /// What a call's `result` says of its server's health. `timed_out`: its deadline ended
    /// it, with `budget` of the full `timeout` to run in. A deadline mostly spent elsewhere (the
    /// caller's own hard timeout, a wait for a lock) says little: only a timeout with at least
    /// half of `timeout` to run in counts as a failure.
    pub(crate) fn of<T>(
        result: &Result<T>,
        timed_out: bool,
        budget: Duration,
        timeout: Duration,
    ) -> Self {
        match result {
            // An answer, or the server refusing the request: it is up.
            Ok(_)
            | Err(
                CacheError::Backend {
                    transient: false, ..
                }
                | CacheError::Authentication { .. },
            ) => Self::Answered,
            Err(_) if timed_out && budget >= timeout / 2 => Self::Failed,
            Err(_) if timed_out => Self::Unknown,
            Err(error) if error.is_transient() => Self::Failed,
            // A check before any round trip (a key, a TTL, a size), or a decorator's refusal.
            Err(_) => Self::Unknown,
        }
    }
}

/// The breaker of one cache's L2 (or backplane).
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: CircuitBreaker,
    /// How long a probe may run: the L2 timeout.
    probe_for: Duration,
    state: Mutex<State>,
}

impl Breaker {
    pub(crate) fn new(settings: CircuitBreaker, probe_for: Duration) -> Self {
        Self {
            settings,
            probe_for,
            state: Mutex::new(State {
                phase: Phase::Closed { failures: 0 },
                generation: 0,
            }),
        }
    }

    /// How long it stays open before a probe is let through.
    pub(crate) fn open_for(&self) -> Duration {
        self.settings.open_for()
    }

    /// Whether calls go through (no run of failures has opened it).
    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.lock().phase, Phase::Closed { .. })
    }

    /// Whether a call may go to the L2 now, and the state it moved to, if it moved.
    pub(crate) fn admit(&self) -> (Admission, Option<CircuitState>) {
        let now = Instant::now();
        let mut state = self.lock();
        let generation = state.generation;
        match state.phase {
            Phase::Closed { .. } => (Admission::Call { generation }, None),
            Phase::Open { until } | Phase::Probing { until } if now < until => {
                (Self::refused(now, until), None)
            }
            Phase::Open { .. } => {
                state.enter(Phase::Probing {
                    until: now + self.probe_for,
                });
                let generation = state.generation;
                (
                    Admission::Probe { generation },
                    Some(CircuitState::HalfOpen),
                )
            }
            // A probe past its time that nobody polls any more (a future kept but not
            // dropped): it is given up, and this call probes instead.
            Phase::Probing { .. } => {
                state.enter(Phase::Probing {
                    until: now + self.probe_for,
                });
                let generation = state.generation;
                (Admission::Probe { generation }, None)
            }
        }
    }

    /// A refusal until `until`: at least a millisecond, so that a retry loop that trusts it
    /// cannot spin.
    fn refused(now: Instant, until: Instant) -> Admission {
        Admission::Refused {
            retry_in: until
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        }
    }

    /// Records the outcome of an admitted call; the state it moved to, if it moved.
    pub(crate) fn record(&self, admission: Admission, outcome: Outcome) -> Option<CircuitState> {
        let mut state = self.lock();
        let (admitted, probe) = match admission {
            Admission::Call { generation } => (generation, false),
            Admission::Probe { generation } => (generation, true),
            Admission::Refused { .. } => return None,
        };
        // A call admitted in an earlier phase says nothing of this one.
        if admitted != state.generation {
            return None;
        }
        match (state.phase, outcome) {
            (Phase::Probing { .. }, Outcome::Unknown) if probe => {
                // The probe learned nothing: the next call probes.
                state.enter(Phase::Open {
                    until: Instant::now(),
                });
                None
            }
            // Nothing learned, or a call that ended while the breaker was open: no change.
            (_, Outcome::Unknown) | (Phase::Open { .. }, _) => None,
            (Phase::Probing { .. }, Outcome::Answered) => {
                state.enter(Phase::Closed { failures: 0 });
                Some(CircuitState::Closed)
            }
            (Phase::Probing { .. }, _) => {
                state.enter(self.opened());
                Some(CircuitState::Open)
            }
            (Phase::Closed { .. }, Outcome::Answered) => {
                state.phase = Phase::Closed { failures: 0 };
                None
            }
            (Phase::Closed { failures }, _) => {
                let failures = failures.saturating_add(1);
                if failures >= self.settings.failures {
                    state.enter(self.opened());
                    Some(CircuitState::Open)
                } else {
                    state.phase = Phase::Closed { failures };
                    None
                }
            }
        }
    }

    /// A probe that ended without an outcome (its caller went away): the next call probes.
    pub(crate) fn abandon_probe(&self, admission: Admission) {
        let mut state = self.lock();
        if matches!(state.phase, Phase::Probing { .. })
            && admission
                == (Admission::Probe {
                    generation: state.generation,
                })
        {
            state.enter(Phase::Open {
                until: Instant::now(),
            });
        }
    }

    fn opened(&self) -> Phase {
        Phase::Open {
            until: Instant::now() + self.settings.open_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a value replaced whole: a panic elsewhere cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.generation += 1;
    }
}

/// Ends a probe that is dropped before its outcome is recorded.
pub(crate) struct ProbeGuard<'a> {
    breaker: Option<(&'a Breaker, Admission)>,
}

impl<'a> ProbeGuard<'a> {
    pub(crate) fn new(breaker: &'a Breaker, admission: Admission) -> Self {
        Self {
            breaker: matches!(admission, Admission::Probe { .. }).then_some((breaker, admission)),
        }
    }

    /// The probe's outcome was recorded.
    pub(crate) fn disarm(mut self) {
        self.breaker = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some((breaker, admission)) = self.breaker {
            breaker.abandon_probe(admission);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(5);

    fn breaker() -> Breaker {
        Breaker::new(CircuitBreaker::new(3, OPEN_FOR), PROBE_FOR)
    }

    const PROBE_FOR: Duration = Duration::from_millis(100);

    fn fail(breaker: &Breaker) -> Option<CircuitState> {
        let (admission, _) = breaker.admit();
        breaker.record(admission, Outcome::Failed)
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_consecutive_failures_only() {
        let breaker = breaker();
        assert_eq!(fail(&breaker), None);
        assert_eq!(fail(&breaker), None);
        // A success in between starts the count again.
        let (admission, _) = breaker.admit();
        assert_eq!(breaker.record(admission, Outcome::Answered), None);
        assert_eq!(fail(&breaker), None);
        assert_eq!(fail(&breaker), None);
        assert_eq!(fail(&breaker), Some(CircuitState::Open));
        assert_eq!(
            breaker.admit(),
            (Admission::Refused { retry_in: OPEN_FOR }, None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_open_time_one_probe_decides() {
        let breaker = breaker();
        for _ in 0..3 {
            fail(&breaker);
        }
        tokio::time::advance(OPEN_FOR).await;
        let (probe, moved) = breaker.admit();
        assert!(matches!(probe, Admission::Probe { .. }));
        assert_eq!(moved, Some(CircuitState::HalfOpen));
        // Everyone else is still refused while the probe runs, until it ends at the latest.
        assert_eq!(
            breaker.admit().0,
            Admission::Refused {
                retry_in: PROBE_FOR
            }
        );
        // A failed probe opens it for another full period...
        assert_eq!(
            breaker.record(probe, Outcome::Failed),
            Some(CircuitState::Open)
        );
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert!(matches!(breaker.admit().0, Admission::Refused { .. }));
        tokio::time::advance(Duration::from_millis(1)).await;
        // ...and a successful one closes it.
        let (probe, _) = breaker.admit();
        assert_eq!(
            breaker.record(probe, Outcome::Answered),
            Some(CircuitState::Closed)
        );
        assert!(matches!(breaker.admit(), (Admission::Call { .. }, None)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_lets_the_next_call_probe() {
        let breaker = breaker();
        for _ in 0..3 {
            fail(&breaker);
        }
        tokio::time::advance(OPEN_FOR).await;
        let (probe, _) = breaker.admit();
        drop(ProbeGuard::new(&breaker, probe));
        assert!(matches!(
            breaker.admit(),
            (Admission::Probe { .. }, Some(CircuitState::HalfOpen))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_nobody_finishes_is_given_up_after_its_time() {
        let breaker = breaker();
        for _ in 0..3 {
            fail(&breaker);
        }
        tokio::time::advance(OPEN_FOR).await;
        let (stuck, _) = breaker.admit();
        tokio::time::advance(PROBE_FOR).await;
        let (next, _) = breaker.admit();
        assert!(matches!(next, Admission::Probe { .. }));
        // The stuck one's late outcome changes nothing; the new probe's does.
        assert_eq!(breaker.record(stuck, Outcome::Failed), None);
        assert_eq!(
            breaker.record(next, Outcome::Answered),
            Some(CircuitState::Closed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_learned_nothing_lets_the_next_call_probe() {
        let breaker = breaker();
        for _ in 0..3 {
            fail(&breaker);
        }
        tokio::time::advance(OPEN_FOR).await;
        let (probe, _) = breaker.admit();
        assert_eq!(breaker.record(probe, Outcome::Unknown), None);
        assert!(matches!(breaker.admit().0, Admission::Probe { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_calls_from_an_earlier_phase_change_nothing() {
        let breaker = breaker();
        // Admitted while closed, still running while the breaker opens and closes again.
        let (late, _) = breaker.admit();
        for _ in 0..3 {
            fail(&breaker);
        }
        tokio::time::advance(OPEN_FOR).await;
        let (probe, _) = breaker.admit();
        assert_eq!(
            breaker.record(probe, Outcome::Answered),
            Some(CircuitState::Closed)
        );
        assert_eq!(breaker.record(late, Outcome::Failed), None);
        // Two more failures do not open it: the late one was not counted.
        assert_eq!(fail(&breaker), None);
        assert_eq!(fail(&breaker), None);
        assert_eq!(fail(&breaker), Some(CircuitState::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_outcomes_neither_count_nor_reset() {
        let breaker = breaker();
        fail(&breaker);
        fail(&breaker);
        let (admission, _) = breaker.admit();
        assert_eq!(breaker.record(admission, Outcome::Unknown), None);
        assert_eq!(fail(&breaker), Some(CircuitState::Open));
    }

    #[test]
    fn results_say_whether_the_server_answered() {
        let of = |error: CacheError| Outcome::of::<()>(&Err(error), false, PROBE_FOR, PROBE_FOR);
        assert_eq!(
            of(CacheError::backend("get", false, "WRONGTYPE")),
            Outcome::Answered
        );
        assert_eq!(
            of(CacheError::backend("get", true, "reset")),
            Outcome::Failed
        );
        assert_eq!(
            of(CacheError::ValueTooLarge { size: 2, max: 1 }),
            Outcome::Unknown
        );
        let nested = CacheError::CircuitOpen {
            operation: "get",
            retry_in: Duration::from_secs(1),
        };
        assert_eq!(of(nested), Outcome::Failed);
        let timeout = || {
            Err::<(), _>(CacheError::Timeout {
                operation: "get",
                after: PROBE_FOR,
            })
        };
        // A timeout counts only with at least half the full timeout to run in.
        assert_eq!(
            Outcome::of(&timeout(), true, PROBE_FOR / 2, PROBE_FOR),
            Outcome::Failed
        );
        assert_eq!(
            Outcome::of(&timeout(), true, PROBE_FOR / 3, PROBE_FOR),
            Outcome::Unknown
        );
        assert_eq!(
            Outcome::of(&Ok(()), false, PROBE_FOR, PROBE_FOR),
            Outcome::Answered
        );
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(CircuitBreaker::new(0, OPEN_FOR).validate("b").is_err());
        assert!(
            CircuitBreaker::new(1, Duration::ZERO)
                .validate("b")
                .is_err()
        );
        assert!(
            CircuitBreaker::new(1, Duration::from_secs(7200))
                .validate("b")
                .is_err()
        );
        assert!(CircuitBreaker::new(1, OPEN_FOR).validate("b").is_ok());
    }
}
