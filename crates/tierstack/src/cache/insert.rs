//! `set_if_absent`: a write that never replaces another writer's value (a new session under a
//! fresh id, a handle created once).

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::Invalidation;
use tierstack_core::store::validate_ttl;
use tierstack_core::{CacheError, Codec, Result};
use tokio::time::Instant;

use super::Inner;
use super::read::{L2Read, Life};
use crate::options::EntryOptions;

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn set_if_absent(
        self: &Arc<Self>,
        key: &str,
        value: V,
        options: &EntryOptions,
    ) -> Result<bool> {
        self.check_key(key)?;
        validate_ttl(options.ttl())?;
        options.validate()?;
        let life = Self::life(options, options.ttl());
        let deadline = self.deadline();
        // The key's lock orders this against the other writes of the key from this instance
        // (and, without an L2, is what makes the check and the write one step).
        let _lock = tokio::time::timeout_at(deadline, self.freshness.lock_key(key))
            .await
            .map_err(|_| CacheError::Timeout {
                operation: "set_if_absent",
                after: self.settings.l2_timeout,
            })?;
        let Some(l2) = self.l2.as_ref().filter(|_| !options.skips().l2_write) else {
            let now = self.clock.now();
            let held = self
                .l1_entry(key)
                .is_some_and(|entry| entry.value.is_some() && entry.is_fresh_at(now));
            if held {
                return Ok(false);
            }
            self.keep_inserted(key, value, &life);
            return Ok(true);
        };
        let bytes = self.encode_with_life(Some(&value), &life)?;
        loop {
            // What the key holds now: a value ends it; anything else (nothing, a delete's
            // tombstone, a "not found", a stale or undecodable entry, an entry of a removed
            // tag) is replaced, over exactly those bytes.
            let seen = match self.read_l2(key, deadline, false).await? {
                L2Read::Hit {
                    value: Some(_),
                    life,
                    ..
                } if !life.stale => return Ok(false),
                L2Read::Hit { seen, .. } | L2Read::Stale { seen, .. } | L2Read::Miss { seen } => {
                    seen
                }
            };
            let written = self
                .write_over_seen(
                    l2.as_ref(),
                    key,
                    bytes.clone(),
                    life.lives,
                    seen.as_deref(),
                    deadline,
                )
                .await?;
            if written {
                break;
            }
            // Another write came between the read and this one: look again.
            if Instant::now() >= deadline {
                return Err(CacheError::Timeout {
                    operation: "set_if_absent",
                    after: self.settings.l2_timeout,
                });
            }
        }
        self.keep_inserted(key, value, &life);
        if !options.skips().backplane {
            // A compare-and-set is not among the writes a store announces itself.
            self.publish(Invalidation::Keys(vec![key.to_owned()]), deadline)
                .await;
        }
        Ok(true)
    }

    /// Puts what `set_if_absent` wrote in L1, as `set` does.
    fn keep_inserted(&self, key: &str, value: V, life: &Life) {
        self.forget_kept(key);
        let after = self.freshness.bump_key(key);
        if life.to_l1 {
            self.fill_l1_since(key, Some(value), life, after);
        } else {
            self.evict_local(key);
        }
    }
}
