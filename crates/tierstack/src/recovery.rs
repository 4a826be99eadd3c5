//! Auto-recovery: the writes and deletes that could not reach the L2 (down, timing out, its
//! breaker open), kept to be replayed once it answers again. The replay itself is in
//! `cache/recovery.rs`.
//!
//! The queue holds one entry per key, the last write winning (its bytes are the envelope the
//! write would have stored, a delete's being its tombstone), up to a bound; a key past the
//! bound is dropped and counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
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
    /// Orders the writes of the queue: a later one of the same key replaces it.
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
    kept: HashMap<Box<str>, Kept>,
    next_seq: u64,
    /// Whether a replay task runs (it ends once the queue is empty).
    replaying: bool,
}

/// The writes of one cache waiting for the L2.
#[derive(Debug)]
pub(crate) struct RecoveryQueue {
    settings: WriteRecovery,
    state: Mutex<State>,
}

impl RecoveryQueue {
    pub(crate) fn new(settings: WriteRecovery) -> Self {
        Self {
            settings,
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
        }
        if state.replaying {
            Pushed::Kept
        } else {
            state.replaying = true;
            Pushed::KeptFirst
        }
    }

    /// Takes every kept write, oldest first, for a replay.
    pub(crate) fn take_all(&self) -> Vec<(Box<str>, Kept)> {
        let mut taken: Vec<_> = self.lock().kept.drain().collect();
        taken.sort_by_key(|(_, kept)| kept.seq);
        taken
    }

    /// Puts back the writes a replay did not get to, unless a later write of the same key was
    /// kept meanwhile; how many were dropped because the queue filled up meanwhile.
    pub(crate) fn put_back(&self, writes: impl IntoIterator<Item = (Box<str>, Kept)>) -> u64 {
        let mut state = self.lock();
        let mut dropped = 0;
        for (key, kept) in writes {
            if state.kept.contains_key(&key) {
                continue;
            }
            if state.kept.len() >= self.settings.max_keys {
                dropped += 1;
                continue;
            }
            state.kept.insert(key, kept);
        }
        dropped
    }

    /// Forgets the kept write of `key`: a later write of the key reached the L2.
    pub(crate) fn forget(&self, key: &str) {
        let mut state = self.lock();
        if !state.kept.is_empty() {
            state.kept.remove(key);
        }
    }

    /// Forgets the kept writes of every key that starts with `prefix` (a prefix delete came
    /// after them, and leaves no tombstone a replay could compare with); how many.
    pub(crate) fn forget_prefix(&self, prefix: &str) -> u64 {
        let mut state = self.lock();
        let before = state.kept.len();
        state.kept.retain(|key, _| !key.starts_with(prefix));
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

    /// No replay task could be started: the next write kept starts one.
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

    #[test]
    fn the_last_write_of_a_key_wins_and_the_bound_drops_new_keys() {
        let queue = queue(2);
        assert_eq!(queue.push("a", Bytes::from("1")), Pushed::KeptFirst);
        assert_eq!(queue.push("a", Bytes::from("2")), Pushed::Kept);
        assert_eq!(queue.push("b", Bytes::from("3")), Pushed::Kept);
        assert_eq!(queue.push("c", Bytes::from("4")), Pushed::Dropped);
        // A key already kept is replaced, even when full.
        assert_eq!(queue.push("b", Bytes::from("5")), Pushed::Kept);
        let taken: Vec<_> = queue
            .take_all()
            .into_iter()
            .map(|(key, kept)| (key.to_string(), kept.bytes))
            .collect();
        assert_eq!(
            taken,
            [
                ("a".into(), Bytes::from("2")),
                ("b".into(), Bytes::from("5"))
            ]
        );
    }

    #[test]
    fn a_write_kept_during_a_replay_beats_the_one_put_back() {
        let queue = queue(10);
        queue.push("a", Bytes::from("old"));
        let taken = queue.take_all();
        queue.push("a", Bytes::from("new"));
        assert_eq!(queue.put_back(taken), 0);
        let kept = queue.take_all();
        assert_eq!(kept[0].1.bytes, Bytes::from("new"));
    }

    #[test]
    fn a_prefix_delete_forgets_the_kept_writes_under_it() {
        let queue = queue(10);
        for key in ["p:1", "p:2", "q:1"] {
            queue.push(key, Bytes::from("v"));
        }
        assert_eq!(queue.forget_prefix("p:"), 2);
        let kept: Vec<_> = queue.take_all().into_iter().map(|(key, _)| key).collect();
        assert_eq!(kept, [Box::from("q:1")]);
    }

    #[test]
    fn the_replay_ends_only_when_the_queue_is_empty() {
        let queue = queue(10);
        assert_eq!(queue.push("a", Bytes::from("1")), Pushed::KeptFirst);
        assert!(!queue.finish_if_empty());
        queue.forget("a");
        assert!(queue.finish_if_empty());
        assert_eq!(queue.push("b", Bytes::from("2")), Pushed::KeptFirst);
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
