//! Invalidations that outlive the call that needed them (the second notice after a write of
//! unknown fate, a publish whose deadline the write used up), in tasks of their own: bounded.
//!
//! At most [`MAX_DETACHED`] such tasks run at once. Past that (L2 failing every write of a busy
//! service), the work is folded into *sweeps*: the whole namespace is invalidated, on this
//! instance as a change of every key and on the others by one message, now and once more an L2
//! timeout later, for as long as work keeps overflowing. Coarser, but never weaker: nothing that
//! would have been invalidated is kept, and the memory of waiting work stays fixed.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::Codec;
use tierstack_core::backplane::Invalidation;
use tokio::sync::Semaphore;

use super::Inner;
use super::publish::Published;

/// How many detached invalidation tasks may run at once.
pub(super) const MAX_DETACHED: usize = 1024;

#[derive(Debug)]
pub(super) struct Detached {
    tasks: Arc<Semaphore>,
    sweeps: Mutex<Sweeps>,
}

#[derive(Debug, Default)]
struct Sweeps {
    /// Counts the work folded into sweeps.
    requested: u64,
    /// Whether a sweeping task is running.
    running: bool,
}

impl Default for Detached {
    fn default() -> Self {
        Self {
            tasks: Arc::new(Semaphore::new(MAX_DETACHED)),
            sweeps: Mutex::default(),
        }
    }
}

impl Detached {
    fn sweeps(&self) -> std::sync::MutexGuard<'_, Sweeps> {
        self.sweeps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// Runs `work` (an invalidation of one key, now or after a pause of at most one L2 timeout)
    /// in a task of its own, or, with [`MAX_DETACHED`] already running, folds it into sweeps.
    /// Outside a Tokio runtime there is nowhere to run it: the caller has already done what it
    /// could inline.
    pub(super) fn detach<F, Fut>(self: &Arc<Self>, work: F)
    where
        F: FnOnce(Arc<Self>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        match Arc::clone(&self.detached.tasks).try_acquire_owned() {
            Ok(permit) => {
                let work = work(Arc::clone(self));
                runtime.spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Err(_) => self.sweep_soon(&runtime),
        }
    }

    /// Starts the sweeping task unless it runs; it sweeps now and an L2 timeout later, and
    /// again for as long as work was folded in since its last round began.
    fn sweep_soon(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let mut sweeps = self.detached.sweeps();
        sweeps.requested += 1;
        if sweeps.running {
            return;
        }
        sweeps.running = true;
        drop(sweeps);
        let this = Arc::clone(self);
        runtime.spawn(async move {
            loop {
                let seen = this.detached.sweeps().requested;
                this.sweep().await;
                tokio::time::sleep(this.settings.l2_timeout).await;
                this.sweep().await;
                let mut sweeps = this.detached.sweeps();
                if sweeps.requested == seen {
                    sweeps.running = false;
                    return;
                }
            }
        });
    }

    /// Invalidates the whole namespace: here as a change of every key (fills in flight do not
    /// land), and on the other instances.
    async fn sweep(self: &Arc<Self>) {
        self.freshness.bump_all();
        self.clear_local();
        self.recorder.detached_sweep();
        let deadline = self.deadline();
        if self.publish_by(&Invalidation::All, deadline).await == Published::Failed {
            // Held until the backplane takes it, as a publish that failed twice is.
            self.hold(Invalidation::All);
        }
    }
}
