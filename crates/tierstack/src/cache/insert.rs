//! Conditional writes: `set_if_absent`, a write that never replaces another writer's value (a
//! new session under a fresh id, a handle created once), `set_if_present`, one that never
//! brings back a value someone removed (a session saved after its logout), and
//! `compare_and_set`, one that replaces (or removes) only the value its caller read.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::Invalidation;
use tierstack_core::store::validate_ttl;
use tierstack_core::{CacheError, Codec, Result};
use tokio::time::Instant;

use super::Inner;
use super::read::{L2Read, Life};
use super::write::InFlightWrite;
use crate::freshness::Snapshot;
use crate::options::EntryOptions;

/// What a conditional write needs the key to hold.
pub(super) enum Condition<'a, V> {
    /// No fresh value.
    Absent,
    /// A fresh value.
    Present,
    /// A fresh value this says is the one expected.
    Holds(&'a (dyn Fn(&V) -> bool + Sync)),
}

// By hand: a derive would ask `V: Copy`, and the condition holds only a reference.
impl<V> Clone for Condition<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for Condition<'_, V> {}

impl<V> Condition<'_, V> {
    fn operation(self) -> &'static str {
        match self {
            Self::Absent => "set_if_absent",
            Self::Present => "set_if_present",
            Self::Holds(_) => "compare_and_set",
        }
    }

    /// Whether a key holding `value` (a fresh one, or none) meets the condition.
    fn met_by(self, value: Option<&V>) -> bool {
        match self {
            Self::Absent => value.is_none(),
            Self::Present => value.is_some(),
            Self::Holds(expected) => value.is_some_and(expected),
        }
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// Writes `value` under `key` (or removes the key, for `None`) if the key meets
    /// `condition`; `true` if it did. A written value carries `tags`, stamped with their
    /// current versions.
    pub(super) async fn set_if(
        self: &Arc<Self>,
        condition: Condition<'_, V>,
        key: &str,
        value: Option<V>,
        options: &EntryOptions,
        tags: &[Arc<str>],
    ) -> Result<bool> {
        let operation = condition.operation();
        self.check_key(key)?;
        validate_ttl(options.ttl())?;
        options.validate()?;
        let mut life = Self::life(options, options.ttl());
        let deadline = self.deadline();
        if !tags.is_empty() {
            // Before the key's lock: the versions may take an L2 read.
            self.check_tagged_life(&life)?;
            life.tags = self.stamp_tags(tags, deadline).await?;
        }
        // The key's lock orders this against the other conditional writes of the key from this
        // instance.
        let _lock = tokio::time::timeout_at(deadline, self.freshness.lock_key(key))
            .await
            .map_err(|_| CacheError::Timeout {
                operation,
                after: self.settings.l2_timeout,
            })?;
        let Some(l2) = self.l2.as_ref().filter(|_| !options.skips().l2_write) else {
            if self.l1.is_none() || options.skips().l1_write {
                // Nothing would hold the value: a write that keeps nothing is not one.
                return Err(CacheError::Configuration(format!(
                    "{operation} needs a tier to write to: this cache has no L1 and no L2 \
                     (or the options skip the writes of every tier it has)"
                )));
            }
            loop {
                // Taken before the look: a write or delete of the key that lands after it
                // (they do not take the key's lock) makes this look again.
                let before = self.freshness.snapshot(key);
                let now = self.clock.now();
                // A deaf L1 (its backplane lost) can neither vouch for a copy nor keep a new
                // one (it takes no fills until it hears again): whether the condition holds
                // is not known, and a write would keep nothing.
                if self.is_deaf() {
                    return Err(CacheError::Backend {
                        operation,
                        transient: true,
                        source: "the backplane is lost: without L2, a conditional write waits \
                                 until this instance hears again"
                            .into(),
                    });
                }
                // As a plain read sees it: a stale value is no value.
                let entry = self
                    .l1_entry(key)
                    .filter(|entry| entry.is_fresh_at(now) && self.trusted_fresh(entry));
                if !condition.met_by(entry.as_ref().and_then(|entry| entry.value.as_ref())) {
                    return Ok(false);
                }
                if self.freshness.is_current(before) {
                    self.keep_inserted(key, value, &life, options, before);
                    // As `set` does: without an L2, the others hold copies of their own.
                    if self.l2.is_none() && !options.skips().backplane {
                        self.publish(Invalidation::Keys(vec![key.to_owned()]), deadline)
                            .await;
                    }
                    return Ok(true);
                }
                if Instant::now() >= deadline {
                    return Err(CacheError::Timeout {
                        operation,
                        after: self.settings.l2_timeout,
                    });
                }
            }
        };
        let (bytes, lives) = match &value {
            Some(value) => (self.encode_with_life(key, Some(value), &life)?, life.lives),
            // A tombstone, as `delete` writes: a load running anywhere may only write over it.
            None => self.tombstone(),
        };
        // Taken before the write, as `set` takes it: an invalidation that arrives while the
        // write is in flight keeps this value out of L1.
        let before = self.freshness.snapshot(key);
        let in_flight = InFlightWrite::new(self, key);
        match self
            .write_if(condition, l2.as_ref(), key, bytes, lives, deadline)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                in_flight.finished();
                return Ok(false);
            }
            Err(error) => {
                // A compare-and-set whose answer was lost may have landed: as after a failed
                // write, the local copy goes and the others are told.
                self.after_failed_write(key, &error, deadline, !options.skips().backplane)
                    .await;
                in_flight.finished();
                return Err(error);
            }
        }
        self.keep_inserted(key, value, &life, options, before);
        if !options.skips().backplane {
            // A compare-and-set is not among the writes a store announces itself.
            self.publish(Invalidation::Keys(vec![key.to_owned()]), deadline)
                .await;
        }
        in_flight.finished();
        Ok(true)
    }

    /// Writes `bytes` under `key` in L2 if the key meets `condition` there; `true` if it
    /// wrote. Replaces exactly the bytes it read, and reads again when another write came in
    /// between.
    async fn write_if(
        &self,
        condition: Condition<'_, V>,
        l2: &dyn tierstack_core::Store,
        key: &str,
        bytes: bytes::Bytes,
        lives: std::time::Duration,
        deadline: Instant,
    ) -> Result<bool> {
        let operation = condition.operation();
        loop {
            // What the key holds now, as a value (fresh) or not (nothing, a delete's tombstone,
            // a "not found", a stale or undecodable entry, an entry of a removed tag).
            let (held, seen) = match self.read_l2(key, deadline, false).await? {
                L2Read::Hit {
                    value: Some(value),
                    life,
                    seen,
                } if !life.stale => (Some(value), seen),
                L2Read::Hit { seen, .. } | L2Read::Stale { seen, .. } | L2Read::Miss { seen } => {
                    (None, seen)
                }
            };
            if !condition.met_by(held.as_ref()) {
                return Ok(false);
            }
            let holds_value = held.is_some();
            if holds_value && seen.is_none() {
                // The value is a write kept for a replay while the L2 fails: what the L2
                // holds is not known, so neither is whether the condition holds there.
                return Err(CacheError::Timeout {
                    operation,
                    after: self.settings.l2_timeout,
                });
            }
            let written = self
                .write_over_seen(l2, key, bytes.clone(), lives, seen.as_deref(), deadline)
                .await?;
            if written {
                return Ok(true);
            }
            // Another write came between the read and this one: look again.
            if Instant::now() >= deadline {
                return Err(CacheError::Timeout {
                    operation,
                    after: self.settings.l2_timeout,
                });
            }
        }
    }

    /// Puts what a conditional write wrote in L1, as `set` does: unless the key changed since
    /// `before` (taken before an L2 write), which may mean a newer write or a delete landed.
    /// A removal (`None`) leaves nothing in L1.
    fn keep_inserted(
        &self,
        key: &str,
        value: Option<V>,
        life: &Life,
        options: &EntryOptions,
        before: Snapshot,
    ) {
        self.forget_kept(key);
        let unchanged = self.freshness.is_current(before);
        let after = self.freshness.bump_key(key);
        match value {
            Some(value) if unchanged && life.to_l1 && !options.skips().l1_write => {
                self.fill_l1_since(key, Some(value), life, after);
            }
            _ => self.evict_local(key),
        }
    }
}
