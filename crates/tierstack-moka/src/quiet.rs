//! Awaiting a moka call without letting it wake the task that awaits it.
//!
//! moka runs its housekeeping inline, every few dozen calls, as a shared future. When that future
//! completes, it wakes every task that polled it, the caller included, although the caller's own
//! poll is about to return the result. A task woken while it runs is queued again once it next
//! waits, as if it had yielded, and Tokio wakes another worker to take it. So without this, a task
//! doing one L1 write per Redis round trip moved to the other worker of a 2-core runtime every
//! hundred writes or so; see docs/benchmarks.md ("A task that stays on its thread").

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Awaits `call`. Its first poll gets a waker that ignores wakes; if `call` is not ready after
/// that poll, it is polled again at once with the caller's waker. Any future must arrange to wake
/// the waker of the latest poll that returned `Pending`, so no wake is lost.
///
/// `call` comes pinned by the caller, so that it is not moved into another future: moka's are
/// large, and the L1's read path is short.
pub(crate) fn without_self_wake<F: Future>(
    mut call: Pin<&mut F>,
) -> impl Future<Output = F::Output> + '_ {
    let mut first = true;
    std::future::poll_fn(move |cx| {
        if std::mem::take(&mut first)
            && let Poll::Ready(output) = call.as_mut().poll(&mut Context::from_waker(Waker::noop()))
        {
            return Poll::Ready(output);
        }
        call.as_mut().poll(cx)
    })
}

/// Polling by hand, with a waker that counts its wakes.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker, and how many times it has been woken.
    #[derive(Default)]
    pub(crate) struct CountingWaker(Arc<Count>);

    impl CountingWaker {
        pub(crate) fn poll<F: Future>(&self, future: Pin<&mut F>) -> Poll<F::Output> {
            let waker = Waker::from(Arc::clone(&self.0));
            future.poll(&mut Context::from_waker(&waker))
        }

        pub(crate) fn wakes(&self) -> usize {
            self.0.0.load(Ordering::SeqCst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::CountingWaker;
    use super::*;
    use std::pin::pin;

    /// A call that wakes whatever waker polls it, and is ready at once (as moka's housekeeping
    /// does when it completes).
    fn wakes_and_answers(answer: u32) -> impl Future<Output = u32> {
        std::future::poll_fn(move |cx| {
            cx.waker().wake_by_ref();
            Poll::Ready(answer)
        })
    }

    #[test]
    fn a_call_ready_at_once_does_not_wake_the_caller() {
        let caller = CountingWaker::default();
        let polled = caller.poll(pin!(without_self_wake(pin!(wakes_and_answers(7)))));
        assert_eq!(polled, Poll::Ready(7));
        assert_eq!(caller.wakes(), 0);
    }

    #[test]
    fn a_call_that_waits_is_woken_through_the_caller() {
        let caller = CountingWaker::default();
        let (send, receive) = tokio::sync::oneshot::channel::<u32>();
        let mut receive = pin!(receive);
        let mut call = pin!(without_self_wake(receive.as_mut()));
        assert!(caller.poll(call.as_mut()).is_pending());
        send.send(5).unwrap();
        assert_eq!(caller.wakes(), 1);
        assert_eq!(caller.poll(call), Poll::Ready(Ok(5)));
    }
}
