//! One L2 call: under a deadline, timed, and counted and logged (once per burst) when it fails.

use std::future::Future;

use tierstack_core::{CacheError, Result};
use tokio::time::Instant;

use super::Inner;
use crate::stats::L2Op;

impl<V, C> Inner<V, C> {
    /// The deadline of an operation that starts now: the L2 timeout from now. Every L2 call and
    /// every wait (for a lock, for a publish) of the operation shares it.
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.settings.l2_timeout
    }

    /// Runs `call` until `deadline`, timing it and counting (and logging once per burst) its
    /// failure.
    pub(super) async fn l2_call<T>(
        &self,
        op: L2Op,
        deadline: Instant,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(CacheError::Timeout {
                operation: op.label(),
                after: deadline.saturating_duration_since(started),
            }),
        };
        self.recorder
            .l2_call(op, result.is_ok(), Some(started.elapsed()));
        if let Err(error) = &result {
            self.log_l2_failure(op, error);
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
