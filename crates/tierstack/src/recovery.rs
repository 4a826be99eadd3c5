//! Auto-recovery: the writes and deletes that could not reach the L2 (down, timing out, its
//! breaker open), kept to be replayed once it answers again. The replay itself is in
//! `cache/recovery.rs`.
//!
//! The queue holds one entry per key, the last write winning (its bytes are the envelope the
//! write would have stored, a delete's being its tombstone), up to a bound; a key past the
//! bound is dropped and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope::Envelope;
use tierstack_core::{CacheError, Result};

/// How a cache keeps the writes that failed to reach its L2, for calls that ask for it
/// ([`TieredCacheBuilder::write_recovery`](crate::TieredCacheBuilder::write_recovery) and
/// [`EntryOptions::with_write_recovery`](crate::EntryOptions::with_write_recovery)).
///
/// Up to `max_keys` keys are kept (one write each: the last). While any is kept, the cache
/// tries to replay them every `retry_interval`; the first L2 failure ends the attempt. A replay
/// never overwrites a value written after it (it compares the write times the entries carry),
/// and tells the other instances of every key it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRecovery {
    max_keys: usize,
    retry: Duration,
}

impl WriteRecovery {
    /// Keeps the failed writes of up to `max_keys` keys, retried every second.
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            retry: Duration::from_secs(1),
        }
    }

    /// How often the kept writes are retried while the L2 fails.
    #[must_use]
    pub fn with_retry_interval(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// How many keys are kept at most.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// How often the kept writes are retried.
    pub fn retry_interval(&self) -> Duration {
        self.retry
    }

    /// At least one key, and a retry interval from 1 ms to 1 h.
    pub(crate) fn validate(&self) -> Result<()> {
        let retry = Duration::from_millis(1)..=Duration::from_secs(3600);
        if self.max_keys == 0 || !retry.contains(&self.retry) {
            return Err(CacheError::Configuration(format!(
                "write_recovery needs at least 1 key and a retry interval from 1 ms to 1 h, not \
                 {} and {:?}",
                self.max_keys, self.retry
            )));
        }
        Ok(())
    }
}

/// A write kept for its replay: the bytes it would have stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kept {
    pub(crate) bytes: Bytes,
    /// Orders the writes of the queue, and tells a replay whether the write it is replaying is
    /// still the one kept (a later write of the key replaces it with a higher number).
    seq: u64,
}

/// What became of a write handed to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Kept (in place of an earlier write of the key, if any).
    Kept,
    /// Kept, and nothing is replaying the queue: start it.
    KeptFirst,
    /// The queue is full: not kept.
    Dropped,
}

#[derive(Debug, Default)]
struct State {
    kept: HashMap<Arc<str>, Kept>,
    next_seq: u64,
    /// Whether a replay task runs (it ends once the queue is empty).
    replaying: bool,
}

/// The writes of one cache waiting for the L2.
///
/// A replay works from a [`snapshot`](Self::snapshot) and removes each write only once it is
/// done with it ([`finish`](Self::finish)): the writes it has not reached yet still count
/// toward the bound, and a write kept, replaced or forgotten meanwhile is seen by the next
/// check of [`holds`](Self::holds).
#[derive(Debug)]
pub(crate) struct RecoveryQueue {
    settings: WriteRecovery,
    /// How many writes are kept: read without the lock by every L2 read, which looks for a
    /// kept write of its key only when there is one.
    len: AtomicUsize,
    state: Mutex<State>,
}

impl RecoveryQueue {
    pub(crate) fn new(settings: WriteRecovery) -> Self {
        Self {
            settings,
            len: AtomicUsize::new(0),
            state: Mutex::default(),
        }
    }

    pub(crate) fn settings(&self) -> WriteRecovery {
        self.settings
    }

    /// Keeps `bytes` as the write of `key` to replay, in place of any earlier one.
    pub(crate) fn push(&self, key: &str, bytes: Bytes) -> Pushed {
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        if let Some(kept) = state.kept.get_mut(key) {
            *kept = Kept { bytes, seq };
        } else if state.kept.len() >= self.settings.max_keys {
            return Pushed::Dropped;
        } else {
            state.kept.insert(key.into(), Kept { bytes, seq });
            self.len.store(state.kept.len(), Ordering::Release);
        }
        if state.replaying {
            Pushed::Kept
        } else {
            state.replaying = true;
            Pushed::KeptFirst
        }
    }

    /// The bytes of the write kept for `key`, if any: what a read of the key is to see until
    /// the replay has written it.
    pub(crate) fn kept(&self, key: &str) -> Option<Bytes> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.lock().kept.get(key).map(|kept| kept.bytes.clone())
    }

    /// Every kept write, oldest first, for a replay; they stay kept until finished.
    pub(crate) fn snapshot(&self) -> Vec<(Arc<str>, Kept)> {
        let mut writes: Vec<_> = self
            .lock()
            .kept
            .iter()
            .map(|(key, kept)| (Arc::clone(key), kept.clone()))
            .collect();
        writes.sort_by_key(|(_, kept)| kept.seq);
        writes
    }

    /// Whether `kept` is still the write kept for `key` (not replaced by a later one, nor
    /// forgotten).
    pub(crate) fn holds(&self, key: &str, kept: &Kept) -> bool {
        self.lock()
            .kept
            .get(key)
            .is_some_and(|current| current.seq == kept.seq)
    }

    /// A replay is done with `kept`: removed, unless a later write of `key` replaced it
    /// meanwhile (that one waits for the next replay).
    pub(crate) fn finish(&self, key: &str, kept: &Kept) {
        let mut state = self.lock();
        if state
            .kept
            .get(key)
            .is_some_and(|current| current.seq == kept.seq)
        {
            state.kept.remove(key);
            self.len.store(state.kept.len(), Ordering::Release);
        }
    }

    /// Forgets the kept write of `key`: a later write of the key reached the L2.
    pub(crate) fn forget(&self, key: &str) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = self.lock();
        state.kept.remove(key);
        self.len.store(state.kept.len(), Ordering::Release);
    }

    /// Forgets the kept writes of every key that starts with `prefix` made at or before `at`,
    /// or all of them without a time (a prefix delete began then, and leaves no tombstone a
    /// replay could compare with; one of the same millisecond is not known to come after it);
    /// how many.
    pub(crate) fn forget_prefix(&self, prefix: &str, at: Option<Timestamp>) -> u64 {
        let mut state = self.lock();
        let before = state.kept.len();
        state.kept.retain(|key, kept| {
            let after_the_delete = || {
                at.is_some_and(|at| {
                    Envelope::written_at_of(&kept.bytes).is_some_and(|written| written > at)
                })
            };
            !key.starts_with(prefix) || after_the_delete()
        });
        self.len.store(state.kept.len(), Ordering::Release);
        (before - state.kept.len()) as u64
    }

    /// Ends the replay task if nothing is kept; whether it ended.
    pub(crate) fn finish_if_empty(&self) -> bool {
        let mut state = self.lock();
        if state.kept.is_empty() {
            state.replaying = false;
            true
        } else {
            false
        }
    }

    /// The replay task is gone without finishing (none could be started, or it was cancelled
    /// with its runtime): the next write kept starts another.
    pub(crate) fn abandon_replays(&self) {
        self.lock().replaying = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change is one map operation: a panic cannot leave the state half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max_keys: usize) -> RecoveryQueue {
        RecoveryQueue::new(WriteRecovery::new(max_keys))
    }

    fn keys_and_bytes(queue: &RecoveryQueue) -> Vec<(String, Bytes)> {
        queue
            .snapshot()
            .into_iter()
            .map(|(key, kept)| (key.to_string(), kept.bytes))
            .collect()
    }

    #[test]
    fn the_last_write_of_a_key_wins_and_the_bound_drops_new_keys() {
        let queue = queue(2);
        assert_eq!(queue.push("a", Bytes::from("1")), Pushed::KeptFirst);
        assert_eq!(queue.push("a", Bytes::from("2")), Pushed::Kept);
        assert_eq!(queue.push("b", Bytes::from("3")), Pushed::Kept);
        assert_eq!(queue.push("c", Bytes::from("4")), Pushed::Dropped);
        // A key already kept is replaced, even when full.
        assert_eq!(queue.push("b", Bytes::from("5")), Pushed::Kept);
        assert_eq!(
            keys_and_bytes(&queue),
            [
                ("a".into(), Bytes::from("2")),
                ("b".into(), Bytes::from("5"))
            ]
        );
        assert_eq!(queue.kept("b"), Some(Bytes::from("5")));
        assert_eq!(queue.kept("c"), None);
    }

    #[test]
    fn writes_being_replayed_still_count_toward_the_bound() {
        let queue = queue(2);
        queue.push("a", Bytes::from("1"));
        queue.push("b", Bytes::from("2"));
        let replaying = queue.snapshot();
        assert_eq!(queue.push("c", Bytes::from("3")), Pushed::Dropped);
        queue.finish(&replaying[0].0, &replaying[0].1);
        assert_eq!(queue.push("c", Bytes::from("3")), Pushed::Kept);
        assert_eq!(queue.snapshot().len(), 2);
    }

    #[test]
    fn a_write_kept_during_a_replay_outlives_the_replay_of_the_older_one() {
        let queue = queue(10);
        queue.push("a", Bytes::from("old"));
        let replaying = queue.snapshot();
        let (key, old) = &replaying[0];
        assert!(queue.holds(key, old));
        queue.push("a", Bytes::from("new"));
        assert!(!queue.holds(key, old), "replaced: the replay must skip it");
        queue.finish(key, old);
        assert_eq!(keys_and_bytes(&queue), [("a".into(), Bytes::from("new"))]);
    }

    #[test]
    fn a_prefix_delete_forgets_the_kept_writes_under_it_even_mid_replay() {
        let queue = queue(10);
        for key in ["p:1", "p:2", "q:1"] {
            queue.push(key, Bytes::from("v"));
        }
        let replaying = queue.snapshot();
        assert_eq!(queue.forget_prefix("p:", None), 2);
        let still: Vec<bool> = replaying
            .iter()
            .map(|(key, kept)| queue.holds(key, kept))
            .collect();
        assert_eq!(still, [false, false, true]);
        assert_eq!(queue.kept("p:1"), None);
        assert_eq!(keys_and_bytes(&queue), [("q:1".into(), Bytes::from("v"))]);
    }

    #[test]
    fn a_prefix_delete_forgets_only_the_kept_writes_made_by_its_time() {
        let written_at = |millis| {
            tierstack_core::envelope::encode_tombstone::<tierstack_core::BincodeCodec>(
                Timestamp::from_millis(millis),
                Timestamp::from_millis(millis + 60_000),
                1,
            )
        };
        let queue = queue(10);
        queue.push("p:before", written_at(10));
        queue.push("p:same", written_at(15));
        queue.push("p:after", written_at(16));
        queue.push("q:before", written_at(10));
        assert_eq!(
            queue.forget_prefix("p:", Some(Timestamp::from_millis(15))),
            2
        );
        let mut kept: Vec<_> = keys_and_bytes(&queue).into_iter().map(|(k, _)| k).collect();
        kept.sort();
        assert_eq!(kept, ["p:after", "q:before"]);
    }

    #[test]
    fn the_replay_ends_only_when_the_queue_is_empty() {
        let queue = queue(10);
        assert_eq!(queue.push("a", Bytes::from("1")), Pushed::KeptFirst);
        assert!(!queue.finish_if_empty());
        queue.forget("a");
        assert!(queue.finish_if_empty());
        assert_eq!(queue.kept("a"), None);
        assert_eq!(queue.push("b", Bytes::from("2")), Pushed::KeptFirst);
        queue.abandon_replays();
        assert_eq!(queue.push("c", Bytes::from("3")), Pushed::KeptFirst);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(WriteRecovery::new(0).validate().is_err());
        let recovery = WriteRecovery::new(1);
        assert!(recovery.validate().is_ok());
        assert!(
            recovery
                .with_retry_interval(Duration::ZERO)
                .validate()
                .is_err()
        );
    }
}
