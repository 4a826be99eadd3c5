//! The write path: `set`, `delete`, `delete_prefix` and `touch`, and the invalidations that tell
//! the other instances.
//!
//! A write whose L2 call fails or times out may still land, so every outcome evicts the local
//! copy and invalidates the other instances' copies. Other instances are told after the write,
//! never before: told first, one could evict, re-read the old value and keep it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::Invalidation;
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope;
use tierstack_core::store::validate_ttl;
use tierstack_core::{CacheError, Codec, Result};
use tokio::time::Instant;

use super::Inner;
use super::publish::WhenFull;
use super::read::Life;
use crate::options::{EntryOptions, Skips};
use crate::stats::L2Op;

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn set(
        self: &Arc<Self>,
        key: &str,
        value: V,
        options: &EntryOptions,
        tags: &[Arc<str>],
    ) -> Result<()> {
        self.check_key(key)?;
        validate_ttl(options.ttl())?;
        options.validate()?;
        let mut life = Self::life(options, options.ttl());
        let skips = options.skips();
        if !tags.is_empty() {
            self.check_tagged_life(&life)?;
            match self.stamp_tags(tags, self.deadline()).await {
                Ok(stamps) => life.tags = stamps,
                Err(error) => {
                    // The L2 failed before the value was written: as for a refused write.
                    if error.is_transient() {
                        self.evict_local(key);
                        if !skips.backplane && !skips.l2_write {
                            self.tell_of_refused_write(key);
                        }
                    }
                    return Err(error);
                }
            }
        }
        let bytes = self.encode_with_life(key, Some(&value), &life)?;
        // Taken before the write: an invalidation of the key that arrives while the write is in
        // flight (another instance's write, which may have landed after this one) keeps this
        // value out of L1, so that every instance converges on what L2 holds.
        let before = self.freshness.snapshot(key);
        let deadline = self.deadline();
        let in_flight = InFlightWrite::new(self, key);
        let mut kept = false;
        if let Some(l2) = self.l2.as_ref().filter(|_| !skips.l2_write) {
            let store_key = self.namespace.store_key(key);
            let keep = options.write_recovery().then(|| bytes.clone());
            let written = self
                .l2_call(L2Op::Set, deadline, l2.set(&store_key, bytes, life.lives))
                .await;
            match written {
                Ok(()) => self.forget_kept(key),
                Err(error) if self.keep_for_replay(key, keep, &error) => {
                    // Kept: served here as written; the others hear of it at the replay (and
                    // now, if the failed write may have landed).
                    self.tell_of_kept_write(key, &error, deadline, !skips.backplane)
                        .await;
                    kept = true;
                }
                Err(error) => {
                    self.after_failed_write(key, &error, deadline, !skips.backplane)
                        .await;
                    in_flight.finished();
                    return Err(error);
                }
            }
        }
        if self.freshness.is_current(before) && life.to_l1 {
            let after = self.freshness.bump_key(key);
            // A kept write on an instance cut off from its backplane is the newest value it
            // knows, but nobody would tell it of a later one: kept as fail-safe's fallback.
            let life = if kept && self.is_deaf() {
                Life {
                    stale: true,
                    ..life
                }
            } else {
                life
            };
            self.fill_l1_since(key, Some(value), &life, after);
        } else {
            self.evict_local(key);
        }
        // A write that left L2 alone changed nothing the others read.
        if !skips.backplane && !skips.l2_write && !kept {
            self.publish_keys(key, deadline).await;
        }
        in_flight.finished();
        Ok(())
    }

    /// A delete's tombstone, written now, and how long it lives.
    pub(super) fn tombstone(&self) -> (bytes::Bytes, std::time::Duration) {
        self.tombstone_written_at(self.clock.now())
    }

    /// A tombstone that records `written_at` as its write time (a replay's, for a write of
    /// another millisecond to be ordered against), living from now.
    pub(super) fn tombstone_written_at(
        &self,
        written_at: Timestamp,
    ) -> (bytes::Bytes, std::time::Duration) {
        let ttl = self.settings.tombstone_ttl;
        let tombstone = envelope::encode_tombstone::<C>(
            written_at,
            self.clock.now().saturating_add(ttl),
            envelope::tombstone_nonce(),
        );
        (tombstone, ttl)
    }

    pub(super) async fn delete(
        self: &Arc<Self>,
        key: &str,
        options: &EntryOptions,
    ) -> Result<bool> {
        let skips = options.skips();
        self.check_key(key)?;
        let deadline = self.deadline();
        let in_l1 = self.l1.as_ref().is_some_and(|l1| l1.get(key).is_some());
        if skips.l2_write {
            // This instance's copy only: the others read nothing that changed.
            self.evict_l1_only(key);
            return Ok(in_l1);
        }
        let in_flight = InFlightWrite::new(self, key);
        // A tombstone, not a removal: a load that is running anywhere saw the key before it,
        // and may only write its value over what it saw.
        let (tombstone, ttl) = self.tombstone();
        let keep = options.write_recovery().then(|| tombstone.clone());
        let removed = if let Some(l2) = &self.l2 {
            let store_key = self.namespace.store_key(key);
            // The key's lock waits for a load's L2 write of the key already under way, so that
            // the delete comes after it; bounded by the same deadline as the call.
            if let Ok(_lock) = tokio::time::timeout_at(deadline, self.freshness.lock_key(key)).await
            {
                let replaced = self
                    .l2_call(
                        L2Op::Delete,
                        deadline,
                        l2.replace(&store_key, tombstone, ttl),
                    )
                    .await;
                // Under the lock: a fill that takes it next sees the key changed.
                self.evict_local(key);
                replaced.map(|old| old.is_some_and(|bytes| !envelope::is_tombstone(&bytes)))
            } else {
                self.evict_local(key);
                Err(CacheError::Timeout {
                    operation: L2Op::Delete.label(),
                    after: self.settings.l2_timeout,
                })
            }
        } else {
            self.evict_local(key);
            Ok(false)
        };
        let answer = match removed {
            Ok(removed) => {
                self.forget_kept(key);
                if !skips.backplane {
                    self.publish_keys(key, deadline).await;
                }
                Ok(removed || in_l1)
            }
            Err(error) if self.keep_for_replay(key, keep, &error) => {
                self.tell_of_kept_write(key, &error, deadline, !skips.backplane)
                    .await;
                Ok(in_l1)
            }
            Err(error) => {
                self.after_failed_write(key, &error, deadline, !skips.backplane)
                    .await;
                Err(error)
            }
        };
        in_flight.finished();
        answer
    }

    pub(super) async fn delete_prefix(self: &Arc<Self>, prefix: &str, skips: Skips) -> Result<u64> {
        if prefix.len() > self.settings.max_key_len {
            self.check_key(prefix)?;
        }
        if skips.l2_write {
            self.freshness.bump_local();
            self.evict_prefix_locally(prefix);
            return Ok(0);
        }
        let deadline = self.deadline();
        let at = self.clock.now();
        // Whether the scan began: only then are the writes kept under the prefix forgotten,
        // here and on the other instances. A call refused or given up before it deleted
        // nothing, and forgetting them would lose writes newer than what the L2 holds.
        let scanned = AtomicBool::new(false);
        // Loads that began before this call skip their L2 write from now on; the barrier waits
        // for those already writing, so the scan below sees (and removes) them.
        self.freshness.bump_all();
        let removed = match &self.l2 {
            Some(l2) => {
                let store_prefix = self.namespace.store_key(prefix);
                // Waited for apart from the L2 call: a slow fill is no failure of the L2.
                if tokio::time::timeout_at(deadline, self.freshness.wait_for_writes())
                    .await
                    .is_ok()
                {
                    let scan = async {
                        // Every write kept here was made before this call: all of them go,
                        // by that order rather than by a clock that may step back.
                        self.forget_kept_prefix(prefix, None);
                        scanned.store(true, Ordering::SeqCst);
                        // A replay that found its write still kept, under the key's lock,
                        // before the forget may be writing it now: the scan comes after.
                        self.freshness.wait_for_writes().await;
                        l2.delete_prefix(&store_prefix).await
                    };
                    self.l2_call(L2Op::Delete, deadline, scan).await
                } else {
                    Err(CacheError::Timeout {
                        operation: L2Op::Delete.label(),
                        after: self.settings.l2_timeout,
                    })
                }
            }
            None => Ok(0),
        };
        self.freshness.bump_all();
        self.evict_prefix_locally(prefix);
        // Whatever the scan did, it may have removed entries: the others evict too (a call
        // that skips the backplane tells them only when the outcome is unknown). One the
        // breaker refused removed nothing: told as a refused write is, without a wait. The
        // others forget what they keep under the prefix only if the scan began.
        let invalidation = Invalidation::Prefix {
            prefix: prefix.to_owned(),
            at: if scanned.load(Ordering::SeqCst) {
                at
            } else {
                Timestamp::EPOCH
            },
        };
        match &removed {
            Err(CacheError::CircuitOpen { .. }) if !skips.backplane => {
                self.hold_unless_full(invalidation, WhenFull::Drop);
            }
            Err(CacheError::CircuitOpen { .. }) => {}
            Err(_) => self.publish(invalidation, deadline).await,
            Ok(_) if !skips.backplane => self.publish(invalidation, deadline).await,
            Ok(_) => {}
        }
        removed
    }

    /// Sets `key`'s time to live to `options.ttl()`, with their skips and L1 TTL.
    pub(super) async fn touch(self: &Arc<Self>, key: &str, options: &EntryOptions) -> Result<bool> {
        let (ttl, skips) = (options.ttl(), options.skips());
        self.check_key(key)?;
        validate_ttl(ttl)?;
        let deadline = self.deadline();
        // Taken before L1 is read: an invalidation after it keeps the L1 copy from coming back.
        let before = self.freshness.snapshot(key);
        let local = self.l1.as_ref().and_then(|l1| l1.get(key));
        let in_flight = InFlightWrite::new(self, key);
        let existed = match self.l2.as_ref().filter(|_| !skips.l2_write) {
            Some(l2) => {
                let store_key = self.namespace.store_key(key);
                let extended =
                    match tokio::time::timeout_at(deadline, self.freshness.lock_key(key)).await {
                        // A tombstone is no entry to `expire`: it stays as it is.
                        Ok(_lock) => {
                            self.l2_call(L2Op::Other, deadline, l2.expire(&store_key, ttl))
                                .await
                        }
                        Err(_) => Err(CacheError::Timeout {
                            operation: L2Op::Other.label(),
                            after: self.settings.l2_timeout,
                        }),
                    };
                match extended {
                    Ok(existed) => existed,
                    Err(error) => {
                        // A refused `touch` changed no data: the others' copies stand.
                        self.after_failed_write(key, &error, deadline, false).await;
                        in_flight.finished();
                        return Err(error);
                    }
                }
            }
            None => local.is_some(),
        };
        match local {
            // A fail-safe entry is evicted instead: `touch` moves when it leaves the stores, not
            // when it stops being fresh, and a refill here would make it fresh for `ttl`.
            Some(entry)
                if existed
                    && self.freshness.is_current(before)
                    && entry.fresh_until == entry.expires_at
                    && !entry.stale =>
            {
                let after = self.freshness.bump_key(key);
                // Its tags stay with it, at the versions it was written under.
                let life = Life {
                    tags: entry.tags,
                    ..Life::new(ttl, ttl, options.l1_ttl())
                };
                self.fill_l1_since(key, entry.value, &life, after);
            }
            _ => self.evict_local(key),
        }
        if !skips.backplane && !skips.l2_write {
            self.publish_keys(key, deadline).await;
        }
        in_flight.finished();
        Ok(existed)
    }

    /// After a write of `key` that failed and was kept for a replay: the other instances evict
    /// their copy now (one the breaker refused, unless the call skips the backplane: see
    /// [`tell_of_refused_write`](Self::tell_of_refused_write)); the replay tells them again.
    async fn tell_of_kept_write(
        self: &Arc<Self>,
        key: &str,
        error: &CacheError,
        deadline: Instant,
        announce: bool,
    ) {
        if matches!(error, CacheError::CircuitOpen { .. }) {
            if announce {
                self.tell_of_refused_write(key);
            }
        } else {
            self.publish(Invalidation::Keys(vec![key.to_owned()]), deadline)
                .await;
        }
    }

    /// After a write of `key` that failed: one the circuit breaker refused never reached L2, so
    /// the others are told as of a write that landed, if the call `announce`s its writes (see
    /// [`tell_of_refused_write`](Self::tell_of_refused_write)); any other failure may have
    /// landed, or may still land, and is invalidated everywhere, now and once more later,
    /// whatever the call skips.
    pub(super) async fn after_failed_write(
        self: &Arc<Self>,
        key: &str,
        error: &CacheError,
        deadline: Instant,
        announce: bool,
    ) {
        if matches!(error, CacheError::CircuitOpen { .. }) {
            self.evict_local(key);
            if announce {
                self.tell_of_refused_write(key);
            }
        } else {
            self.invalidate_after_failure(key, deadline).await;
        }
    }

    /// A write of `key` that never reached L2 (the L2 breaker refused it) did not change L2,
    /// but the application writes because its data changed: the other instances drop their
    /// copy too, and read L2 again (the old value while it holds one; the loader's, once it
    /// holds none, as after a restart that lost it). The invalidation is held, not published:
    /// a refused write fails fast, even when the backplane is down with the L2; it goes out
    /// with the held invalidations. It is a notice the others can do without: when the held
    /// set is full it is dropped, never turned into an invalidation of everything, which
    /// would empty every L1 of the fallbacks it keeps through the outage.
    fn tell_of_refused_write(self: &Arc<Self>, key: &str) {
        self.hold_unless_full(Invalidation::Keys(vec![key.to_owned()]), WhenFull::Drop);
    }

    /// After a write of `key` that failed or timed out, and so may still land: evicts the local
    /// copy and tells the other instances, now and once more one L2 timeout later, so that an
    /// instance (this one included) that re-read the old value between now and the write's late
    /// landing drops it too. The cache publishes even when its store announces its writes: the
    /// announcement went out with a write whose fate is unknown.
    async fn invalidate_after_failure(self: &Arc<Self>, key: &str, deadline: Instant) {
        self.evict_local(key);
        self.publish(Invalidation::Keys(vec![key.to_owned()]), deadline)
            .await;
        self.invalidate_again_later(Invalidation::Keys(vec![key.to_owned()]));
    }

    /// Tells the other instances that `key` changed, unless the store announced the write
    /// itself.
    async fn publish_keys(self: &Arc<Self>, key: &str, deadline: Instant) {
        if self.publishes_key_writes {
            self.publish(Invalidation::Keys(vec![key.to_owned()]), deadline)
                .await;
        }
    }
}

/// Armed from before a write's L2 call until the other instances have been told. If the caller
/// drops the call in between (a timeout of its own, a `select!`), the write may have landed or
/// may still land: the drop evicts the local copy and tells the other instances, in a detached
/// task, as a failed write does.
pub(super) struct InFlightWrite<'a, V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    cache: &'a Arc<Inner<V, C>>,
    key: &'a str,
    armed: bool,
}

impl<'a, V, C> InFlightWrite<'a, V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) fn new(cache: &'a Arc<Inner<V, C>>, key: &'a str) -> Self {
        Self {
            cache,
            key,
            armed: true,
        }
    }

    /// The call came back (with whatever outcome): its caller handles it from here.
    pub(super) fn finished(mut self) {
        self.armed = false;
    }
}

impl<V, C> Drop for InFlightWrite<'_, V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.cache.evict_local(self.key);
        let key = self.key.to_owned();
        self.cache.detach(|cache| async move {
            let deadline = cache.deadline();
            cache.invalidate_after_failure(&key, deadline).await;
        });
    }
}
