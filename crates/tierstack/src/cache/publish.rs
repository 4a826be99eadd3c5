//! Publishing invalidations: by the operation's deadline, and tried once more later when it
//! fails; one that fails again is held and sent once the backplane answers. With a backplane
//! circuit breaker, invalidations are also held while the breaker is open, and sent once it
//! closes.
//!
//! A held invalidation is kept in a bounded set (keys, prefixes, or "everything" once the set is
//! full), not in a task per publish: an outage of the backplane costs neither a task nor a
//! timeout per write, and the other instances still hear of every change afterwards (an
//! instance cut off from Redis for longer than two L2 timeouts used to drop what it could not
//! publish, and the others kept their copies until they expired).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::Invalidation;
use tierstack_core::clock::Timestamp;
use tierstack_core::{CacheError, Codec};
use tokio::time::Instant;

use super::Inner;
use crate::breaker::{Admission, CircuitState, Outcome, ProbeGuard};
use crate::burst_log::BurstLog;
use crate::stats::Guarded;

/// The most keys held while the backplane's breaker is open; past it, everything is.
const MAX_HELD_KEYS: usize = 10_000;
/// The most prefixes held; past it, everything is.
const MAX_HELD_PREFIXES: usize = 64;
/// How many keys one invalidation names when many are sent at once (held ones, replayed ones).
pub(super) const KEYS_PER_MESSAGE: usize = 64;
/// Without a backplane breaker, the longest pause between two rounds of sending what is held
/// (unless the L2 timeout is longer): each round the backplane does not take doubles the pause
/// from the first, so a backplane that refuses for good costs a publish every 10 s, not every
/// L2 timeout. With a breaker, its `open_for` paces the rounds.
const MAX_HELD_PAUSE: Duration = Duration::from_secs(10);

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Published {
    Sent,
    /// It failed (counted and logged).
    Failed,
    /// Held, and sent later: the backplane's breaker is open, or has just opened.
    Held,
}

/// What a hold does when the set has no room for an invalidation as named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WhenFull {
    /// Holds everything instead: a change the others must hear of.
    HoldEverything,
    /// Drops it (logged once per burst): a notice the others can do without, worth less than
    /// their whole L1s, fail-safe's fallbacks included.
    Drop,
}

/// The invalidations held until the backplane takes them: while its breaker is open, and those
/// that failed twice.
#[derive(Debug, Default)]
pub(super) struct Held {
    state: Mutex<HeldState>,
    dropped: BurstLog,
}

#[derive(Debug, Default)]
struct HeldState {
    keys: HashSet<String>,
    /// Each prefix once, with the latest time it was deleted at (which covers the earlier).
    prefixes: Vec<(String, Timestamp)>,
    /// Too much was held to name: the whole namespace is invalidated on release.
    everything: bool,
    /// Whether a task will send what is held once the breaker lets a probe through.
    sender: bool,
}

impl HeldState {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty() && !self.everything
    }

    /// Whether `invalidation` fits as named (keys or a prefix held already take no more room).
    fn has_room_for(&self, invalidation: &Invalidation) -> bool {
        match invalidation {
            Invalidation::Keys(keys) => {
                let new = keys.iter().filter(|key| !self.keys.contains(*key)).count();
                self.keys.len() + new <= MAX_HELD_KEYS
            }
            Invalidation::Prefix { prefix, .. } => {
                self.prefixes.len() < MAX_HELD_PREFIXES
                    || self.prefixes.iter().any(|(held, _)| held == prefix)
            }
            _ => false,
        }
    }

    /// Adds `invalidation`; one that does not fit makes everything held instead, unless
    /// `when_full` drops it (a named one: keys or a prefix). Whether it is held. Prefixes stay
    /// named beside everything while they fit: a prefix delete's message also tells the others
    /// which kept writes it superseded, which an invalidation of everything does not.
    fn add(&mut self, invalidation: Invalidation, when_full: WhenFull) -> bool {
        let fits = self.has_room_for(&invalidation);
        match invalidation {
            Invalidation::Prefix { prefix, at } if fits => {
                match self.prefixes.iter_mut().find(|(held, _)| *held == prefix) {
                    Some((_, held_at)) => *held_at = (*held_at).max(at),
                    None => self.prefixes.push((prefix, at)),
                }
            }
            // Everything covers them already.
            Invalidation::Keys(_) if self.everything => {}
            Invalidation::Keys(keys) if fits => self.keys.extend(keys),
            Invalidation::Keys(_) | Invalidation::Prefix { .. } if when_full == WhenFull::Drop => {
                return false;
            }
            // Too many keys or prefixes, a tag, or everything.
            _ => {
                self.keys = HashSet::new();
                self.everything = true;
            }
        }
        true
    }
}

impl Held {
    /// Holds `invalidation` (or, if it does not fit, does what `when_full` says); whether the
    /// caller, which `can_send` (it can start a task), must start the task that sends what is
    /// held (none runs). A dropped invalidation starts nothing.
    fn hold(&self, invalidation: Invalidation, can_send: bool, when_full: WhenFull) -> bool {
        let mut state = self.lock();
        if !state.add(invalidation, when_full) {
            drop(state);
            if let Some(suppressed) = self.dropped.should_log() {
                tracing::warn!(
                    suppressed,
                    "too many invalidations held: the notice of a write that never reached the \
                     L2 was dropped"
                );
            }
            return false;
        }
        let start_sender = can_send && !state.sender;
        state.sender |= start_sender;
        start_sender
    }

    /// Everything held, as the invalidations to send, emptying the set.
    fn take(&self) -> Vec<Invalidation> {
        let mut guard = self.lock();
        let sender = guard.sender;
        let state = std::mem::replace(
            &mut *guard,
            HeldState {
                sender,
                ..HeldState::default()
            },
        );
        drop(guard);
        let keys: Vec<String> = state.keys.into_iter().collect();
        let mut out: Vec<Invalidation> = if state.everything {
            vec![Invalidation::All]
        } else {
            keys.chunks(KEYS_PER_MESSAGE)
                .map(|chunk| Invalidation::Keys(chunk.to_vec()))
                .collect()
        };
        out.extend(
            state
                .prefixes
                .into_iter()
                .map(|(prefix, at)| Invalidation::Prefix { prefix, at }),
        );
        out
    }

    /// For the sending task: everything held, or `None` (and the task ends) if nothing is.
    fn take_or_stop(&self) -> Option<Vec<Invalidation>> {
        {
            let mut state = self.lock();
            if state.is_empty() {
                state.sender = false;
                return None;
            }
        }
        Some(self.take())
    }

    /// The sending task is gone without stopping (cancelled with its runtime, or panicked):
    /// the next invalidation held starts another.
    fn sender_gone(&self) {
        self.lock().sender = false;
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HeldState> {
        // Each change is whole under the lock: a panic cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The sending task's hold on the set: a task that ends without stopping (cancelled with its
/// runtime, or panicked) lets the next invalidation held start another.
struct SenderTask {
    held: Arc<Held>,
    stopped: bool,
}

impl SenderTask {
    fn take_or_stop(&mut self) -> Option<Vec<Invalidation>> {
        let taken = self.held.take_or_stop();
        self.stopped = taken.is_none();
        taken
    }
}

impl Drop for SenderTask {
    fn drop(&mut self) {
        if !self.stopped {
            self.held.sender_gone();
        }
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// Publishes `invalidation` by the operation's `deadline`. If the deadline has passed (the
    /// L2 call took it all, and may still land), the publish goes on in a detached task,
    /// bounded by the L2 timeout: the caller returns on time and the others still evict. A
    /// publish that fails is tried once more an L2 timeout later, in a detached task: the write
    /// stands, and the others must hear of it. One that fails again is held until the backplane
    /// takes it; one the breaker holds is sent when it closes.
    pub(super) async fn publish(self: &Arc<Self>, invalidation: Invalidation, deadline: Instant) {
        if self.backplane.is_none() {
            return;
        }
        if Instant::now() >= deadline && tokio::runtime::Handle::try_current().is_ok() {
            self.detach(|this| async move {
                let deadline = this.deadline();
                if this.publish_by(&invalidation, deadline).await == Published::Failed {
                    this.invalidate_again_later(invalidation);
                }
            });
            return;
        }
        if self.publish_by(&invalidation, deadline).await == Published::Failed {
            self.invalidate_again_later(invalidation);
        }
    }

    /// One L2 timeout from now, in a detached task: evicts the keys of `invalidation` here
    /// again and publishes it again, holding it if that fails too. Serves a write of unknown
    /// fate (it may land late, after someone re-read the old value) and a publish that failed.
    pub(super) fn invalidate_again_later(self: &Arc<Self>, invalidation: Invalidation) {
        self.detach(|this| async move {
            tokio::time::sleep(this.settings.l2_timeout).await;
            if let Invalidation::Keys(keys) = &invalidation {
                for key in keys {
                    this.evict_local(key);
                }
            }
            let deadline = this.deadline();
            if this.publish_by(&invalidation, deadline).await == Published::Failed {
                this.hold(invalidation);
            }
        });
    }

    /// Publishes `invalidation` by `deadline` (a failure is counted and logged). With a
    /// backplane breaker, a publish it refuses is held instead, and the held ones go out, in a
    /// task, once a publish has closed it.
    pub(super) async fn publish_by(
        self: &Arc<Self>,
        invalidation: &Invalidation,
        deadline: Instant,
    ) -> Published {
        let Some(backplane) = &self.backplane else {
            return Published::Sent;
        };
        let admission = match &self.backplane_breaker {
            Some(breaker) => {
                let (admission, moved) = breaker.admit();
                if let Some(state) = moved {
                    self.recorder.circuit(Guarded::Backplane, state);
                }
                if let Admission::Refused { .. } = admission {
                    self.hold(invalidation.clone());
                    return Published::Held;
                }
                admission
            }
            None => Admission::Call { generation: 0 },
        };
        let probe = self
            .backplane_breaker
            .as_ref()
            .map(|breaker| ProbeGuard::new(breaker, admission));
        let started = Instant::now();
        let budget = deadline.saturating_duration_since(started);
        let call = backplane.publish(self.namespace.as_str(), invalidation);
        let (result, timed_out) = match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => (result, false),
            Err(_) => (
                Err(CacheError::Timeout {
                    operation: "publish",
                    after: budget,
                }),
                true,
            ),
        };
        let mut held = false;
        if let Some(breaker) = &self.backplane_breaker {
            let outcome = Outcome::of(&result, timed_out, budget, self.settings.l2_timeout);
            let moved = breaker.record(admission, outcome);
            if let Some(state) = moved {
                self.recorder.circuit(Guarded::Backplane, state);
            }
            if moved == Some(CircuitState::Open) {
                // This one is held too, with those that follow (and sent with them, not
                // retried on its own).
                self.hold(invalidation.clone());
                held = true;
            }
            if moved == Some(CircuitState::Closed) {
                self.release_held();
            }
        }
        if let Some(probe) = probe {
            probe.disarm();
        }
        match result {
            Ok(()) => {
                // The backplane takes messages again: what is held goes out now, not at the
                // sending task's next round, which may be seconds away after a long outage.
                // (With a breaker, the publish that closes it releases them.)
                if self.backplane_breaker.is_none() {
                    self.release_held();
                }
                Published::Sent
            }
            Err(error) => {
                self.publish_failed(&error);
                if held {
                    Published::Held
                } else {
                    Published::Failed
                }
            }
        }
    }

    /// Holds `invalidation` until the backplane takes it. The first one held starts a task
    /// that sends what is held every `open_for` of the breaker (once it lets a probe through,
    /// the first message being the probe: the breaker paces the attempts; the first round
    /// comes after an L2 timeout if the breaker was closed when it started), or, without one,
    /// after an L2 timeout, doubling the pause after each round the backplane does not take
    /// (up to [`MAX_HELD_PAUSE`]), until nothing is held: a cache that publishes nothing more
    /// still gets its held invalidations out. The task holds the cache weakly, and ends with
    /// it.
    pub(super) fn hold(self: &Arc<Self>, invalidation: Invalidation) {
        self.hold_unless_full(invalidation, WhenFull::HoldEverything);
    }

    /// [`hold`](Self::hold), doing what `when_full` says if the set has no room for
    /// `invalidation`.
    pub(super) fn hold_unless_full(
        self: &Arc<Self>,
        invalidation: Invalidation,
        when_full: WhenFull,
    ) {
        if self.backplane.is_none() {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current().ok();
        if !self.held.hold(invalidation, runtime.is_some(), when_full) {
            return;
        }
        // Started only from within a runtime; outside one, what is held goes out with the
        // task the next hold from within one starts, or when a publish closes the breaker.
        let Some(runtime) = runtime else { return };
        let (every, longest) = match &self.backplane_breaker {
            Some(breaker) => (breaker.open_for(), breaker.open_for()),
            None => (
                self.settings.l2_timeout,
                self.settings.l2_timeout.max(MAX_HELD_PAUSE),
            ),
        };
        // Held while the backplane's breaker is closed (a write the L2 breaker refused): the
        // backplane is taking messages, and the first round need not wait for an `open_for`.
        let first = match &self.backplane_breaker {
            Some(breaker) if breaker.is_closed() => self.settings.l2_timeout.min(every),
            _ => every,
        };
        let cache = Arc::downgrade(self);
        let mut sender = SenderTask {
            held: Arc::clone(&self.held),
            stopped: false,
        };
        runtime.spawn(async move {
            let mut pause = first;
            loop {
                tokio::time::sleep(pause).await;
                let Some(this) = cache.upgrade() else { return };
                let Some(held) = sender.take_or_stop() else {
                    return;
                };
                pause = if this.send_held(held).await {
                    every
                } else {
                    pause.saturating_mul(2).min(longest)
                };
            }
        });
    }

    /// Sends the invalidations held, in a task of its own; what fails to go out is held again.
    fn release_held(self: &Arc<Self>) {
        if self.held.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = Arc::clone(self);
        runtime.spawn(async move {
            let held = this.held.take();
            this.send_held(held).await;
        });
    }

    /// Sends `held`, stopping at the first message the backplane does not take: that one and
    /// the rest are held again, for the sending task's next round (rather than a timeout each
    /// now). Whether everything went out.
    async fn send_held(self: &Arc<Self>, held: Vec<Invalidation>) -> bool {
        let messages = held.len();
        let mut held = held.into_iter();
        while let Some(invalidation) = held.next() {
            let deadline = self.deadline();
            match self.publish_by(&invalidation, deadline).await {
                Published::Sent => {
                    // A write of unknown fate may have landed since it was held, after this
                    // instance read the key again: its copy goes too.
                    if let Invalidation::Keys(keys) = &invalidation {
                        for key in keys {
                            self.evict_local(key);
                        }
                    }
                }
                outcome => {
                    // `Held`: the breaker held this one itself.
                    if outcome == Published::Failed {
                        self.hold(invalidation);
                    }
                    for rest in held {
                        self.hold(rest);
                    }
                    return false;
                }
            }
        }
        if messages > 0 {
            tracing::info!(cache = %self.namespace, messages, "sent the invalidations held while the backplane did not take them");
        }
        true
    }

    fn publish_failed(&self, error: &CacheError) {
        self.recorder.publish_error();
        if let Some(suppressed) = self.l2_failures.should_log() {
            tracing::warn!(cache = %self.namespace, error = %error, suppressed, "invalidation not published; it is sent again until the backplane takes it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_gone_without_stopping_lets_the_next_hold_start_another() {
        let held = Arc::new(Held::default());
        assert!(held.hold(
            Invalidation::Keys(vec!["a".into()]),
            true,
            WhenFull::HoldEverything
        ));
        let sender = SenderTask {
            held: Arc::clone(&held),
            stopped: false,
        };
        // Cancelled with its runtime while it slept.
        drop(sender);
        assert!(held.hold(
            Invalidation::Keys(vec!["b".into()]),
            true,
            WhenFull::HoldEverything
        ));
        let mut sender = SenderTask {
            held: Arc::clone(&held),
            stopped: false,
        };
        assert!(sender.take_or_stop().is_some());
        assert!(sender.take_or_stop().is_none(), "stopped: nothing held");
        drop(sender);
        assert!(held.hold(
            Invalidation::Keys(vec!["c".into()]),
            true,
            WhenFull::HoldEverything
        ));
        assert!(
            !held.hold(
                Invalidation::Keys(vec!["d".into()]),
                true,
                WhenFull::HoldEverything
            ),
            "one sender"
        );
    }

    #[test]
    fn a_hold_that_cannot_start_a_sender_leaves_it_to_the_next_that_can() {
        let held = Held::default();
        assert!(!held.hold(
            Invalidation::Keys(vec!["a".into()]),
            false,
            WhenFull::HoldEverything
        ));
        assert!(held.hold(
            Invalidation::Keys(vec!["b".into()]),
            true,
            WhenFull::HoldEverything
        ));
        assert_eq!(held.take().len(), 1, "both keys in one message");
    }

    #[test]
    fn held_keys_past_the_bound_become_everything() {
        let held = Held::default();
        assert!(held.hold(
            Invalidation::Keys(vec!["a".into(), "b".into()]),
            true,
            WhenFull::HoldEverything
        ));
        let prefix = |millis| Invalidation::Prefix {
            prefix: "p:".into(),
            at: Timestamp::from_millis(millis),
        };
        assert!(
            !held.hold(prefix(20), true, WhenFull::HoldEverything),
            "one sender"
        );
        assert!(!held.hold(prefix(10), true, WhenFull::HoldEverything));
        let sent = held.take();
        assert_eq!(sent.len(), 2, "the same prefix is held once: {sent:?}");
        assert_eq!(sent[1], prefix(20), "at the later of its times");
        assert!(held.is_empty());
        assert_eq!(held.take_or_stop(), None);
        assert!(
            held.hold(
                Invalidation::Keys(vec!["c".into()]),
                true,
                WhenFull::HoldEverything
            ),
            "sender ended"
        );
        let many: Vec<String> = (0..=MAX_HELD_KEYS).map(|i| i.to_string()).collect();
        held.hold(Invalidation::Keys(many), true, WhenFull::HoldEverything);
        assert_eq!(held.take(), vec![Invalidation::All]);
    }

    #[test]
    fn a_notice_that_does_not_fit_is_dropped_rather_than_held_as_everything() {
        let held = Held::default();
        let full: Vec<String> = (0..MAX_HELD_KEYS).map(|i| i.to_string()).collect();
        assert!(held.hold(Invalidation::Keys(full), true, WhenFull::HoldEverything));
        let key = |key: &str| Invalidation::Keys(vec![key.to_owned()]);
        // A key held already takes no room, for either kind of hold.
        assert!(!held.hold(key("0"), true, WhenFull::Drop));
        assert!(!held.hold(key("0"), true, WhenFull::HoldEverything));
        assert!(!held.hold(key("new"), true, WhenFull::Drop));
        let sent = held.take();
        assert!(
            !sent.contains(&Invalidation::All),
            "dropped, not everything"
        );
        let named: usize = sent
            .iter()
            .map(|message| match message {
                Invalidation::Keys(keys) => keys.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(named, MAX_HELD_KEYS);
        let full: Vec<String> = (0..MAX_HELD_KEYS).map(|i| i.to_string()).collect();
        held.hold(Invalidation::Keys(full), true, WhenFull::HoldEverything);
        held.hold(key("new"), true, WhenFull::HoldEverything);
        assert_eq!(held.take(), vec![Invalidation::All]);
    }

    #[test]
    fn held_prefixes_stay_named_beside_everything() {
        let held = Held::default();
        let prefix = Invalidation::Prefix {
            prefix: "p:".into(),
            at: Timestamp::from_millis(20),
        };
        held.hold(prefix.clone(), true, WhenFull::HoldEverything);
        let many: Vec<String> = (0..=MAX_HELD_KEYS).map(|i| i.to_string()).collect();
        held.hold(Invalidation::Keys(many), true, WhenFull::HoldEverything);
        held.hold(Invalidation::Keys(vec!["k".into()]), true, WhenFull::Drop);
        assert_eq!(held.take(), vec![Invalidation::All, prefix]);
    }
}
