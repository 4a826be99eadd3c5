//! One L2 call: under a deadline, timed, and counted and logged (once per burst) when it fails.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;

use tierstack_core::{CacheError, Result};
use tokio::time::{Instant, Sleep, sleep_until};

use super::Inner;
use crate::breaker::{Admission, Outcome, ProbeGuard};
use crate::stats::{Guarded, L2Op};

impl<V, C> Inner<V, C> {
    /// The deadline of an operation that starts now: the L2 timeout from now. Every L2 call and
    /// every wait (for a lock, for a publish) of the operation shares it.
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.settings.l2_timeout
    }

    /// Runs `call` until `deadline`, timing it and counting (and logging once per burst) its
    /// failure.
    ///
    /// With a circuit breaker, a call it refuses fails at once with
    /// [`CacheError::CircuitOpen`], without calling L2 or counting an L2 error.
    pub(super) async fn l2_call<T>(
        &self,
        op: L2Op,
        deadline: Instant,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let admission = match &self.breaker {
            Some(breaker) => {
                let (admission, moved) = breaker.admit();
                if let Some(state) = moved {
                    self.recorder.circuit(Guarded::L2, state);
                }
                if let Admission::Refused { retry_in } = admission {
                    return Err(CacheError::CircuitOpen {
                        operation: op.label(),
                        retry_in,
                    });
                }
                admission
            }
            None => Admission::Call { generation: 0 },
        };
        let probe = self
            .breaker
            .as_ref()
            .map(|breaker| ProbeGuard::new(breaker, admission));
        let started = Instant::now();
        let budget = deadline.saturating_duration_since(started);
        let (result, timed_out) = match until(deadline, call).await {
            Some(result) => (result, false),
            None => (
                Err(CacheError::Timeout {
                    operation: op.label(),
                    after: budget,
                }),
                true,
            ),
        };
        self.recorder
            .l2_call(op, result.is_ok(), Some(started.elapsed()));
        if let Err(error) = &result {
            self.log_l2_failure(op, error);
        }
        if let Some(breaker) = &self.breaker {
            let outcome = Outcome::of(&result, timed_out, budget, self.settings.l2_timeout);
            if let Some(state) = breaker.record(admission, outcome) {
                self.recorder.circuit(Guarded::L2, state);
            }
        }
        if let Some(probe) = probe {
            probe.disarm();
        }
        result
    }

    fn log_l2_failure(&self, op: L2Op, error: &CacheError) {
        if let Some(suppressed) = self.l2_failures.should_log() {
            tracing::warn!(
                cache = %self.namespace,
                op = op.label(),
                error = %error,
                suppressed,
                "L2 call failed; reads fall back to L1 and the loader"
            );
        }
    }
}

/// `call`'s output, or `None` if `deadline` passed first: `tokio::time::timeout_at`, except that
/// the timer is armed only when `call` does not answer on its first poll. An in-process L2 (moka)
/// answers at once, and building a timer cost it about a sixth of a read.
async fn until<T>(deadline: Instant, call: impl Future<Output = T>) -> Option<T> {
    let mut call = pin!(call);
    let mut timer = pin!(None::<Sleep>);
    poll_fn(|cx| {
        if let Poll::Ready(output) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if timer.is_none() {
            timer.set(Some(sleep_until(deadline)));
        }
        match timer.as_mut().as_pin_mut() {
            Some(timer) => timer.poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_that_answers_at_once_is_not_timed_out() {
        // The deadline has passed already: `timeout_at` would still answer a ready call.
        let deadline = Instant::now();
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(until(deadline, async { 7 }).await, Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_hangs_ends_at_the_deadline() {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        let hung = until(deadline, std::future::pending::<()>()).await;
        assert_eq!(hung, None);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_answers_later_beats_a_later_deadline() {
        let deadline = Instant::now() + Duration::from_millis(300);
        let slow = async {
            tokio::time::sleep(Duration::from_millis(100)).await; // paused clock
            5
        };
        assert_eq!(until(deadline, slow).await, Some(5));
    }
}
