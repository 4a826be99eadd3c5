//! How the composer runs one L2 call: a timer only where one is needed, timing, failure counts
//! and a rate-limited log line.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use tierstack_core::{CacheError, Result};

use crate::cache::Inner;
use crate::stats::L2Op;

impl<V, C> Inner<V, C> {
    /// Runs a single-key L2 call: under the L2 timeout, unless the store bounds it within that
    /// timeout itself. (Plain functions returning the future, not `async fn`s: each async layer
    /// adds a state machine to every read.)
    pub(crate) fn l2_single_key_call<T>(
        &self,
        op: L2Op,
        call: impl Future<Output = Result<T>>,
    ) -> impl Future<Output = Result<T>> {
        self.l2_call_bounded(op, call, !self.l2_bounds_single_keys)
    }

    /// Runs a backplane's write and publish: under the L2 timeout, unless the backplane bounds
    /// it within that timeout itself.
    pub(crate) fn l2_backplane_write_call<T>(
        &self,
        call: impl Future<Output = Result<T>>,
    ) -> impl Future<Output = Result<T>> {
        self.l2_call_bounded(L2Op::Set, call, !self.backplane_bounds_writes)
    }

    /// Runs an L2 call under the L2 timeout, timing it and counting (and logging once per burst)
    /// its failure.
    pub(crate) fn l2_call<T>(
        &self,
        op: L2Op,
        call: impl Future<Output = Result<T>>,
    ) -> impl Future<Output = Result<T>> {
        self.l2_call_bounded(op, call, true)
    }

    /// Runs an L2 call, under the L2 timeout if `guard`; see [`Self::l2_call`].
    async fn l2_call_bounded<T>(
        &self,
        op: L2Op,
        call: impl Future<Output = Result<T>>,
        guard: bool,
    ) -> Result<T> {
        let mut call = std::pin::pin!(call);
        // In-process stores answer on the first poll: such a call arms no timer and is not timed
        // (two clock reads would cost more than the call).
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(result) => self.l2_answered(op, result),
            Poll::Pending => {
                // A call that waits on I/O is timed from its first poll, which sent the request.
                let started = Instant::now();
                let timeout = guard.then_some(self.settings.l2_timeout);
                let result = wait_for_polled(call, timeout).await.unwrap_or_else(|| {
                    Err(CacheError::Timeout {
                        operation: op.label(),
                        after: self.settings.l2_timeout,
                    })
                });
                self.recorder
                    .l2_call(op, result.is_ok(), Some(started.elapsed()));
                self.log_l2_failure(op, &result);
                result
            }
        }
    }

    /// Counts (and logs, once per burst, if it failed) an L2 call that answered without
    /// waiting, so not timed.
    pub(crate) fn l2_answered<T>(&self, op: L2Op, result: Result<T>) -> Result<T> {
        self.recorder.l2_call(op, result.is_ok(), None);
        self.log_l2_failure(op, &result);
        result
    }

    fn log_l2_failure<T>(&self, op: L2Op, result: &Result<T>) {
        if let Err(error) = result
            && let Some(suppressed) = self.l2_failures.should_log()
        {
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

/// Waits for `call`, which has just been polled in this same task poll and answered `Pending`,
/// for at most `timeout`; `None` when the timeout passed first.
///
/// The call is not polled again until it wakes the task: awaiting it directly would poll it a
/// second time at once, walking the store's whole future (for Redis: its timer, its in-flight
/// slot and its reply channel) for nothing.
async fn wait_for_polled<F: Future>(
    mut call: Pin<&mut F>,
    timeout: Option<Duration>,
) -> Option<F::Output> {
    let mut just_polled = true;
    let Some(timeout) = timeout else {
        return std::future::poll_fn(|cx| {
            if std::mem::take(&mut just_polled) {
                Poll::Pending
            } else {
                call.as_mut().poll(cx).map(Some)
            }
        })
        .await;
    };
    let mut timer = std::pin::pin!(tokio::time::sleep(timeout));
    std::future::poll_fn(|cx| {
        if !std::mem::take(&mut just_polled)
            && let Poll::Ready(output) = call.as_mut().poll(cx)
        {
            return Poll::Ready(Some(output));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A call that answers once `done` is set, counting its polls.
    async fn counted_call(done: Arc<AtomicBool>, polls: Arc<AtomicUsize>) -> u32 {
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            if done.load(Ordering::SeqCst) {
                Poll::Ready(7)
            } else {
                // Woken once, when the answer arrives (like a reply channel).
                let (done, waker) = (done.clone(), cx.waker().clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    done.store(true, Ordering::SeqCst);
                    waker.wake();
                });
                Poll::Pending
            }
        })
        .await
    }

    /// Polls `call` once, as `l2_call_bounded` does, then waits for it.
    async fn first_poll_then_wait(timeout: Option<Duration>) -> (Option<u32>, usize) {
        let (done, polls) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let mut call = std::pin::pin!(counted_call(done, polls.clone()));
        let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        let output = wait_for_polled(call, timeout).await;
        (output, polls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_pending_call_is_polled_again_only_when_it_wakes() {
        for timeout in [None, Some(Duration::from_secs(30))] {
            let (output, polls) = first_poll_then_wait(timeout).await;
            assert_eq!(output, Some(7), "timeout {timeout:?}");
            assert_eq!(
                polls, 2,
                "one poll that sends, one when the answer arrives ({timeout:?})"
            );
        }
    }

    #[tokio::test]
    async fn a_call_slower_than_its_timeout_gives_none() {
        let (output, polls) = first_poll_then_wait(Some(Duration::from_millis(1))).await;
        assert_eq!(output, None, "the timer fired before the call's answer");
        assert_eq!(
            polls, 2,
            "polled once more when the timer woke the task, then given up"
        );
    }
}
