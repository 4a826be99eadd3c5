//! Auto-recovery (see [`crate::recovery`]): a write or delete whose L2 call failed is kept, and
//! a task replays the kept writes once the L2 answers again, then tells the other instances.
//!
//! A replay never overwrites what was written after the kept write: it reads the key, leaves a
//! newer entry (by the write time both envelopes carry) alone, and otherwise writes over exactly
//! the bytes it read (`set_if_absent` over nothing, `compare_and_set` over the rest), so that a
//! write landing in between wins too.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::Invalidation;
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope::Envelope;
use tierstack_core::{CacheError, Codec, Result};
use tokio::time::Instant;

use super::Inner;
use super::publish::KEYS_PER_MESSAGE;
use super::read::L2Read;
use crate::recovery::{Kept, Pushed, RecoveryQueue};
use crate::stats::{L2Op, RecoveryOutcome};

/// What the replay of one kept write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replayed {
    /// Written to the L2 (or already there).
    Written,
    /// A later write of the key is in the L2: it stays, and the kept one is dropped.
    Superseded,
    /// The kept write's entry has expired meanwhile: nothing to replay.
    Expired,
    /// This instance wrote the key, or replaced or forgot the kept write (a later write, a
    /// prefix delete), while the replay ran: not written.
    Overtaken,
}

impl<V, C> Inner<V, C> {
    /// A prefix delete began: the kept writes under `prefix` made by then are dropped, as
    /// superseded (it leaves no tombstone that a replay could compare their write time with).
    /// Another instance's began `at` (by its clock: instances' clocks are assumed in step, as
    /// for the replay's comparisons), and later writes stay however late its message arrives;
    /// this instance's own (`None`) came after every write it keeps.
    pub(super) fn forget_kept_prefix(&self, prefix: &str, at: Option<Timestamp>) {
        if let Some(queue) = &self.recovery {
            let forgotten = queue.forget_prefix(prefix, at);
            self.recorder
                .recovery(RecoveryOutcome::Superseded, forgotten);
        }
    }
}

impl<V, C> Inner<V, C> {
    /// The bytes of the write of `key` kept for a replay, if any (see
    /// [`read_with_kept`](Self::read_with_kept)).
    pub(super) fn kept_write(&self, key: &str) -> Option<Bytes> {
        self.recovery.as_ref()?.kept(key)
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// Keeps `bytes` (what a write of `key` would have stored) for a replay, if the call asked
    /// for it, the error may pass, and the cache has a recovery queue; whether it was kept.
    pub(super) fn keep_for_replay(
        self: &Arc<Self>,
        key: &str,
        bytes: Option<Bytes>,
        error: &CacheError,
    ) -> bool {
        let (Some(queue), Some(bytes)) = (&self.recovery, bytes) else {
            return false;
        };
        if !error.is_transient() {
            return false;
        }
        match queue.push(key, bytes) {
            Pushed::Dropped => {
                self.recorder.recovery(RecoveryOutcome::Dropped, 1);
                false
            }
            Pushed::Kept => {
                self.recorder.recovery(RecoveryOutcome::Kept, 1);
                true
            }
            Pushed::KeptFirst => {
                self.recorder.recovery(RecoveryOutcome::Kept, 1);
                self.start_replays(queue.settings().retry_interval());
                true
            }
        }
    }

    /// What a read of `key` sees while a write of it is kept: the later of the kept write and
    /// what the L2 answered (`found`, unless `l2_failed`), by the write times both carry, the
    /// kept one when the L2 failed (a recovered L2 may still hold what a kept delete removed).
    /// A kept write that has expired reads as a miss; its replay still removes the older
    /// value. A load after a kept write's miss replaces what the L2 holds, not the kept bytes.
    ///
    /// # Errors
    ///
    /// As [`classify`](Self::classify), for the L2's answer when it is the later, or for the
    /// kept write when it answers: an entry whose tags' records cannot be read is not known
    /// to be current (never does the kept write answer for a later one that cannot be judged).
    pub(super) async fn read_with_kept(
        &self,
        key: &str,
        kept: Bytes,
        found: Option<(Bytes, Duration)>,
        l2_failed: bool,
        deadline: Instant,
    ) -> Result<L2Read<V>> {
        let kept_at = Envelope::parse::<C>(&kept, usize::MAX)
            .map(|envelope| (envelope.written_at, envelope.expires_at));
        let Ok((written_at, expires_at)) = kept_at else {
            // Unreachable: the cache encoded these bytes itself.
            return Ok(L2Read::Miss { seen: None });
        };
        if let (Some((bytes, ttl)), false) = (&found, l2_failed) {
            let newer = Envelope::parse::<C>(bytes, usize::MAX)
                .is_ok_and(|stored| stored.written_at > written_at);
            if newer {
                return self.classify(key, bytes.clone(), *ttl, deadline).await;
            }
        }
        let stored = found.filter(|_| !l2_failed).map(|(bytes, _)| bytes);
        if expires_at <= self.clock.now() {
            return Ok(L2Read::Miss { seen: stored });
        }
        // What a load is to replace is what the L2 holds, not the kept bytes.
        Ok(
            match self.classify(key, kept, Duration::ZERO, deadline).await? {
                L2Read::Miss { .. } => L2Read::Miss { seen: stored },
                L2Read::Stale {
                    value,
                    expires_at,
                    tags,
                    ..
                } => L2Read::Stale {
                    value,
                    expires_at,
                    seen: stored,
                    tags,
                },
                L2Read::Hit { value, life, .. } => L2Read::Hit {
                    value,
                    life,
                    seen: stored,
                },
            },
        )
    }

    /// A write of `key` reached the L2: an earlier kept write of it has nothing left to do.
    pub(super) fn forget_kept(&self, key: &str) {
        if let Some(queue) = &self.recovery {
            queue.forget(key);
        }
    }

    /// Starts the task that replays the kept writes every `retry` until none is left. It holds
    /// the cache weakly: a dropped cache's kept writes are lost with it.
    fn start_replays(self: &Arc<Self>, retry: std::time::Duration) {
        let Some(queue) = &self.recovery else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Nowhere to replay from: the writes stay kept, and the next one kept tries again.
            queue.abandon_replays();
            return;
        };
        let mut task = ReplayTask {
            queue: Arc::clone(queue),
            finished: false,
        };
        let cache = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(retry).await;
                let Some(cache) = Weak::upgrade(&cache) else {
                    return;
                };
                cache.replay_kept(&task.queue).await;
                if task.finish_if_empty() {
                    return;
                }
            }
        });
    }

    /// Replays every kept write, oldest first, until the L2 fails; evicts this instance's copy
    /// of the superseded ones, and tells the other instances of the keys written and of the
    /// superseded ones. What superseded a kept write may not have been announced: a load here
    /// that the kept write hid from the L2's entry replaces that entry without a message, and
    /// the others may still hold it. Each write
    /// stays kept until it is done with (it counts toward the bound, and reads see it).
    async fn replay_kept(self: &Arc<Self>, queue: &RecoveryQueue) {
        let (mut written, mut superseded) = (Vec::new(), Vec::new());
        let mut expired = 0;
        for (key, kept) in queue.snapshot() {
            // Replaced by a later write (replayed next time) or forgotten (a prefix delete, a
            // later write that reached the L2) since the snapshot.
            if !queue.holds(&key, &kept) {
                continue;
            }
            match self.replay_one(queue, &key, &kept).await {
                Ok(Replayed::Written) => written.push(key.to_string()),
                Ok(Replayed::Superseded) => {
                    self.evict_local(&key);
                    superseded.push(key.to_string());
                }
                Ok(Replayed::Expired) => expired += 1,
                // Something changed the key here while it replayed: looked at again next time,
                // if it is still kept.
                Ok(Replayed::Overtaken) => continue,
                // An error about the write itself will not pass with time: dropped, so that
                // it does not hold the others back.
                Err(error) if !error.is_transient() => expired += 1,
                // Still down: this write and the rest wait for the next attempt.
                Err(_) => break,
            }
            queue.finish(&key, &kept);
        }
        self.recorder
            .recovery(RecoveryOutcome::Replayed, written.len() as u64);
        self.recorder
            .recovery(RecoveryOutcome::Superseded, superseded.len() as u64);
        self.recorder.recovery(RecoveryOutcome::Dropped, expired);
        if written.is_empty() && superseded.is_empty() {
            return;
        }
        tracing::info!(
            cache = %self.namespace,
            replayed = written.len(),
            superseded = superseded.len(),
            expired,
            "writes kept during an L2 failure replayed"
        );
        let mut changed = written;
        changed.extend(superseded);
        for keys in changed.chunks(KEYS_PER_MESSAGE) {
            let deadline = self.deadline();
            // Retried once later if it fails (the backplane may come back after the L2).
            self.publish(Invalidation::Keys(keys.to_vec()), deadline)
                .await;
        }
    }

    /// Writes one kept write over what the L2 holds for `key`, unless that is newer.
    ///
    /// The write itself is made under the key's lock, and only if the kept write is still the
    /// one kept and nothing wrote the key here since the replay began: a prefix delete (which,
    /// once the L2 admits its call, forgets the kept writes under it, then waits for the keys'
    /// locks and scans), a
    /// delete or a write of this instance either comes after it (and removes or replaces it)
    /// or makes it stand down.
    async fn replay_one(&self, queue: &RecoveryQueue, key: &str, kept: &Kept) -> Result<Replayed> {
        let Some(l2) = &self.l2 else {
            return Ok(Replayed::Written);
        };
        let Ok(envelope) = Envelope::parse::<C>(&kept.bytes, usize::MAX) else {
            // Unreachable: the cache encoded these bytes itself.
            return Ok(Replayed::Expired);
        };
        let (written_at, expires_at) = (envelope.written_at, envelope.expires_at);
        let store_key = self.namespace.store_key(key);
        let watch = self.freshness.watch(key);
        // A few rounds: each lost race means someone else wrote the key meanwhile.
        for _ in 0..3 {
            let now = self.clock.now();
            let deadline = self.deadline();
            let current = self
                .l2_call(L2Op::Get, deadline, l2.get(&store_key))
                .await?;
            let write = if expires_at <= now {
                // Nothing left to write, but what the kept write replaced must not come back
                // (a kept delete's tombstone outlived by the value it deleted): an entry older
                // than it is removed.
                match current {
                    Some(current)
                        if Envelope::parse::<C>(&current, usize::MAX)
                            .is_ok_and(|stored| stored.written_at < written_at) =>
                    {
                        ReplayWrite::Remove(current)
                    }
                    _ => return Ok(Replayed::Expired),
                }
            } else {
                match current {
                    None => ReplayWrite::IfAbsent,
                    Some(current) if current == kept.bytes => return Ok(Replayed::Written),
                    Some(current) => match Envelope::parse::<C>(&current, usize::MAX) {
                        Ok(stored) if stored.written_at > written_at => {
                            return Ok(Replayed::Superseded);
                        }
                        // Write times are in milliseconds: a tie does not say which write came
                        // first (this instance's own just before the failed one, or another
                        // instance's in the same millisecond). Neither value is written: a
                        // tombstone of that millisecond replaces the entry, so that the next
                        // read loads the origin's value and a replay of an older write still
                        // finds a later one there (a removal left nothing to lose to). A
                        // delete's tombstone stays as it is.
                        Ok(stored) if stored.written_at == written_at => {
                            if stored.tombstone {
                                return Ok(Replayed::Superseded);
                            }
                            ReplayWrite::Unordered(current)
                        }
                        _ => ReplayWrite::Over(current),
                    },
                }
            };
            let Ok(_lock) =
                tokio::time::timeout_at(deadline, self.freshness.lock_watched(&watch)).await
            else {
                return Ok(Replayed::Overtaken);
            };
            if !self.freshness.own_key_unchanged(&watch) || !queue.holds(key, kept) {
                return Ok(Replayed::Overtaken);
            }
            let ttl = now.until(expires_at);
            let replaced = match write {
                ReplayWrite::Remove(current) => {
                    let removal = l2.compare_and_set(&store_key, &current, None);
                    let removed = self.l2_call(L2Op::Delete, deadline, removal).await?;
                    return Ok(if removed {
                        Replayed::Written
                    } else {
                        Replayed::Expired
                    });
                }
                ReplayWrite::Unordered(current) => {
                    let tombstone = self.tombstone_written_at(written_at);
                    let removal = l2.compare_and_set(&store_key, &current, Some(tombstone));
                    if self.l2_call(L2Op::Delete, deadline, removal).await? {
                        // The kept write is not in the L2 either: this instance's copy goes
                        // too, and the others hear of the key.
                        return Ok(Replayed::Superseded);
                    }
                    continue;
                }
                ReplayWrite::IfAbsent => {
                    let write = l2.set_if_absent(&store_key, kept.bytes.clone(), ttl);
                    self.l2_call(L2Op::Set, deadline, write).await?
                }
                ReplayWrite::Over(current) => {
                    let write =
                        l2.compare_and_set(&store_key, &current, Some((kept.bytes.clone(), ttl)));
                    self.l2_call(L2Op::Set, deadline, write).await?
                }
            };
            if replaced {
                return Ok(Replayed::Written);
            }
        }
        Ok(Replayed::Superseded)
    }
}

/// How a replay writes over what it read.
enum ReplayWrite {
    /// Nothing was there: write if still nothing is.
    IfAbsent,
    /// Write over exactly these bytes.
    Over(Bytes),
    /// The kept write has expired: remove exactly these (older) bytes.
    Remove(Bytes),
    /// These bytes were written in the same millisecond as the kept write: replace exactly
    /// them with a tombstone of that millisecond (neither is known to be the later).
    Unordered(Bytes),
}

/// The replay task's hold on its queue: a task that ends without finishing (cancelled with its
/// runtime, or panicked) lets the next write kept start another.
struct ReplayTask {
    queue: Arc<RecoveryQueue>,
    finished: bool,
}

impl ReplayTask {
    /// Ends the task if nothing is kept; whether it ended.
    fn finish_if_empty(&mut self) -> bool {
        self.finished = self.queue.finish_if_empty();
        self.finished
    }
}

impl Drop for ReplayTask {
    fn drop(&mut self) {
        if !self.finished {
            self.queue.abandon_replays();
        }
    }
}
