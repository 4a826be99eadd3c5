//! Applying other instances' invalidations to this instance's L1.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tierstack_core::backplane::{BackplaneEvent, Invalidation, Subscription};

use super::Inner;

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + 'static,
    C: Send + Sync + 'static,
{
    /// Spawns the task that applies other instances' invalidations to this L1. It holds the
    /// cache weakly: dropping the last handle of the cache ends it.
    pub(super) fn listen(
        this: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        mut subscription: Subscription,
    ) {
        let weak = Arc::downgrade(this);
        let task = runtime.spawn(async move {
            while let Some(event) = subscription.recv().await {
                let Some(inner) = weak.upgrade() else { break };
                inner.apply(&event);
            }
        });
        *this.listener.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    }

    /// Applies an event to L1, then counts it: whoever watches the counters (a test, a
    /// dashboard) sees an invalidation only once it has taken effect.
    fn apply(&self, event: &BackplaneEvent) {
        match event {
            BackplaneEvent::Invalidate(message) => {
                if message.namespace != self.namespace.as_str() {
                    return;
                }
                match &message.invalidation {
                    Invalidation::Keys(keys) => {
                        for key in keys {
                            self.evict_local(key);
                            self.lease_waiters.wake(key);
                        }
                    }
                    Invalidation::Prefix { prefix, at } => {
                        self.forget_kept_prefix(prefix, Some(*at));
                        self.freshness.bump_all();
                        self.evict_prefix_locally(prefix);
                        self.lease_waiters.wake_all();
                    }
                    // Nothing to evict: each tagged entry is judged against the tag when read.
                    Invalidation::Tag { tag, remove } => self.apply_tag_message(tag, *remove),
                    // Invalidation is non-exhaustive: anything unknown may have changed any
                    // key, so it counts as a change of every key and clears L1.
                    _ => {
                        self.freshness.bump_all();
                        self.tags.note_all_changed();
                        self.clear_local();
                        self.lease_waiters.wake_all();
                    }
                }
                self.recorder.invalidation_received();
            }
            BackplaneEvent::Resync => {
                self.deaf.store(false, Ordering::SeqCst);
                self.tags.note_all_changed();
                self.clear_local();
                // Messages may have been lost: waiting flights look again at once.
                self.lease_waiters.wake_all();
                self.recorder.resync();
            }
            BackplaneEvent::Lost => {
                // Deaf: L1 serves nothing as fresh (nobody would say when it changed) and takes
                // no fills until `Resync` clears it. Its entries stay, as fail-safe's last
                // resort when L2 and the origin fail too. No generation is bumped: a fill that
                // missed the flag lands in an L1 that serves it only once `Resync` has cleared
                // it (and that clear's bump evicts a fill landing later), while a bump would
                // evict the stale copy a failed load re-arms meanwhile: the last resort itself.
                self.deaf.store(true, Ordering::SeqCst);
                self.tags.note_all_changed();
                self.recorder.resync();
            }
            // Unknown events: whatever they mean, a clear keeps nothing stale.
            _ => {
                self.tags.note_all_changed();
                self.clear_local();
                self.recorder.resync();
            }
        }
    }
}
