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
/// Only transient failures count (a timeout, a lost connection, an overloaded server); an
/// answer of any kind, an error about the request itself included, resets the count.
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
    pub(crate) fn validate(&self) -> Result<()> {
        let open_for = Duration::from_millis(1)..=Duration::from_secs(3600);
        if self.failures == 0 || !open_for.contains(&self.open_for) {
            return Err(CacheError::Configuration(format!(
                "l2_circuit_breaker needs at least 1 failure and an open time from 1 ms to 1 h, \
                 not {} and {:?}",
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
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    Probing,
}

/// Whether a call may go to the L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Call,
    /// The one call that tests the L2 after the open time.
    Probe,
    Refused {
        retry_in: Duration,
    },
}

/// The breaker of one cache's L2.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: CircuitBreaker,
    state: Mutex<State>,
}

impl Breaker {
    pub(crate) fn new(settings: CircuitBreaker) -> Self {
        Self {
            settings,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Whether a call may go to the L2 now, and the state it moved to, if it moved.
    pub(crate) fn admit(&self) -> (Admission, Option<CircuitState>) {
        let now = Instant::now();
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => (Admission::Call, None),
            State::Open { until } if now < until => (
                Admission::Refused {
                    retry_in: until.saturating_duration_since(now),
                },
                None,
            ),
            State::Open { .. } => {
                *state = State::Probing;
                (Admission::Probe, Some(CircuitState::HalfOpen))
            }
            State::Probing => (
                Admission::Refused {
                    retry_in: Duration::ZERO,
                },
                None,
            ),
        }
    }

    /// Records the end of an admitted call (`healthy`: the L2 answered); the state it moved
    /// to, if it moved.
    pub(crate) fn record(&self, admission: Admission, healthy: bool) -> Option<CircuitState> {
        let mut state = self.lock();
        match (*state, healthy) {
            (State::Probing, true) if admission == Admission::Probe => {
                *state = State::Closed { failures: 0 };
                Some(CircuitState::Closed)
            }
            (State::Probing, false) if admission == Admission::Probe => {
                *state = self.opened();
                Some(CircuitState::Open)
            }
            (State::Closed { .. }, true) => {
                *state = State::Closed { failures: 0 };
                None
            }
            (State::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if failures >= self.settings.failures {
                    *state = self.opened();
                    Some(CircuitState::Open)
                } else {
                    *state = State::Closed { failures };
                    None
                }
            }
            // A call admitted before the breaker opened, ending after: the state stands.
            _ => None,
        }
    }

    /// A probe that ended without an outcome (its caller went away): the next call probes.
    pub(crate) fn abandon_probe(&self) {
        let mut state = self.lock();
        if matches!(*state, State::Probing) {
            *state = State::Open {
                until: Instant::now(),
            };
        }
    }

    fn opened(&self) -> State {
        State::Open {
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

/// Ends a probe that is dropped before its outcome is recorded.
pub(crate) struct ProbeGuard<'a> {
    breaker: Option<&'a Breaker>,
}

impl<'a> ProbeGuard<'a> {
    pub(crate) fn new(breaker: &'a Breaker, admission: Admission) -> Self {
        Self {
            breaker: (admission == Admission::Probe).then_some(breaker),
        }
    }

    /// The probe's outcome was recorded.
    pub(crate) fn disarm(mut self) {
        self.breaker = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker {
            breaker.abandon_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(5);

    fn breaker() -> Breaker {
        Breaker::new(CircuitBreaker::new(3, OPEN_FOR))
    }

    fn fail(breaker: &Breaker) -> Option<CircuitState> {
        let (admission, _) = breaker.admit();
        breaker.record(admission, false)
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_consecutive_failures_only() {
        let breaker = breaker();
        assert_eq!(fail(&breaker), None);
        assert_eq!(fail(&breaker), None);
        // A success in between starts the count again.
        let (admission, _) = breaker.admit();
        assert_eq!(breaker.record(admission, true), None);
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
        assert_eq!(
            (probe, moved),
            (Admission::Probe, Some(CircuitState::HalfOpen))
        );
        // Everyone else is still refused while the probe runs.
        assert!(matches!(breaker.admit().0, Admission::Refused { .. }));
        // A failed probe opens it for another full period...
        assert_eq!(breaker.record(probe, false), Some(CircuitState::Open));
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert!(matches!(breaker.admit().0, Admission::Refused { .. }));
        tokio::time::advance(Duration::from_millis(1)).await;
        // ...and a successful one closes it.
        let (probe, _) = breaker.admit();
        assert_eq!(breaker.record(probe, true), Some(CircuitState::Closed));
        assert_eq!(breaker.admit(), (Admission::Call, None));
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
        assert_eq!(
            breaker.admit(),
            (Admission::Probe, Some(CircuitState::HalfOpen))
        );
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(CircuitBreaker::new(0, OPEN_FOR).validate().is_err());
        assert!(CircuitBreaker::new(1, Duration::ZERO).validate().is_err());
        assert!(
            CircuitBreaker::new(1, Duration::from_secs(7200))
                .validate()
                .is_err()
        );
        assert!(CircuitBreaker::new(1, OPEN_FOR).validate().is_ok());
    }
}
