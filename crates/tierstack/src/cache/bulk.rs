//! Bulk reads: L1 per key, one L2 round trip for the rest, one batched loader call for what is
//! still missing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::key::fingerprint;
use tierstack_core::{Codec, Result};

use super::Inner;

/// How many conditional writes of one bulk fill are in flight at once.
const BULK_FILL_CONCURRENCY: usize = 64;
use super::read::L2Read;
use crate::error::LoadError;
use crate::freshness::KeyWatch;
use crate::options::EntryOptions;
use crate::stats::L2Op;

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn get_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        let (found, _) = self.lookup_many(keys).await?;
        Ok(found.into_iter().map(Option::flatten).collect())
    }

    pub(super) async fn get_or_load_many<K, F, Fut, E>(
        &self,
        keys: &[K],
        options: &EntryOptions,
        loader: F,
    ) -> std::result::Result<Vec<Option<V>>, LoadError<E>>
    where
        K: AsRef<str>,
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<HashMap<String, V>, E>>,
    {
        options.validate()?;
        let (mut found, mut seen_in_l2) = self.lookup_many(keys).await?;
        let mut distinct = HashSet::new();
        let (missing, seen): (Vec<&str>, Vec<Option<Bytes>>) = keys
            .iter()
            .map(AsRef::as_ref)
            .zip(&found)
            .zip(seen_in_l2.iter_mut())
            .filter(|((key, hit), _)| hit.is_none() && distinct.insert(*key))
            .map(|((key, _), seen)| (key, seen.take()))
            .unzip();
        if missing.is_empty() {
            return Ok(found.into_iter().map(Option::flatten).collect());
        }
        // Watched before the load: a write or delete of one of these keys meanwhile keeps its
        // loaded value out of both tiers. Dropped (with the call, if it is cancelled), the
        // watches leave nothing behind.
        let watches: Vec<KeyWatch> = missing
            .iter()
            .map(|key| self.freshness.watch(key))
            .collect();
        let started = Instant::now();
        let request: Vec<String> = missing.iter().map(|key| (*key).to_owned()).collect();
        let run = AssertUnwindSafe(async move { loader(request).await }).catch_unwind();
        // The hard timeout cancels the batch loader (it runs in the caller's task).
        let answer = match options.hard_timeout() {
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
            None => Some(run.await),
        };
        let mut origin_values = match answer {
            Some(Ok(Ok(map))) => {
                self.recorder.load(true, started.elapsed());
                map
            }
            Some(Ok(Err(error))) => {
                self.recorder.load(false, started.elapsed());
                return Err(LoadError::Loader(std::sync::Arc::new(error)));
            }
            Some(Err(_)) => {
                self.recorder.load(false, started.elapsed());
                return Err(LoadError::Panicked);
            }
            None => {
                self.recorder.load(false, started.elapsed());
                return Err(LoadError::TimedOut {
                    after: options.hard_timeout().unwrap_or_default(),
                });
            }
        };
        let values: Vec<Option<V>> = missing
            .iter()
            .map(|key| origin_values.remove(*key))
            .collect();
        self.store_loaded_many(&watches, &values, seen, options)
            .await;
        let by_key: HashMap<&str, &Option<V>> = missing.iter().copied().zip(&values).collect();
        for (key, slot) in keys.iter().zip(found.iter_mut()) {
            if slot.is_none() {
                *slot = Some(by_key.get(key.as_ref()).and_then(|value| (*value).clone()));
            }
        }
        Ok(found.into_iter().map(Option::flatten).collect())
    }

    /// L1 then one L2 round trip for `keys`: `Some(v)` per found key (`v` `None` for a negative
    /// entry), `None` where both tiers missed; and, per key, what L2 held instead of a usable
    /// entry (see [`L2Read::Miss`]), for a loaded value to replace.
    async fn lookup_many<K: AsRef<str>>(
        &self,
        keys: &[K],
    ) -> Result<(Vec<Option<Option<V>>>, Vec<Option<Bytes>>)> {
        for key in keys {
            self.check_key(key.as_ref())?;
        }
        let mut found = Vec::with_capacity(keys.len());
        let mut seen = vec![None; keys.len()];
        let mut missing = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let hit = self.l1_get(key.as_ref());
            if hit.is_none() {
                missing.push(index);
            }
            found.push(hit);
        }
        let Some(l2) = self.l2.as_ref().filter(|_| !missing.is_empty()) else {
            for &index in &missing {
                self.recorder.miss(keys[index].as_ref());
            }
            return Ok((found, seen));
        };
        let deadline = self.deadline();
        let snapshots: Vec<_> = missing
            .iter()
            .map(|&i| self.freshness.snapshot(keys[i].as_ref()))
            .collect();
        let store_keys: Vec<String> = missing
            .iter()
            .map(|&i| self.namespace.store_key(keys[i].as_ref()))
            .collect();
        let refs: Vec<&str> = store_keys.iter().map(String::as_str).collect();
        let read = if self.l1.is_some() {
            self.l2_call(L2Op::Get, deadline, l2.get_many_with_ttl(&refs))
                .await
                .map(|entries| {
                    entries
                        .into_iter()
                        .map(|entry| entry.map(|entry| (entry.value, entry.ttl)))
                        .collect::<Vec<_>>()
                })
        } else {
            // Without an L1 to fill, the remaining TTLs are not needed.
            self.l2_call(L2Op::Get, deadline, l2.get_many(&refs))
                .await
                .map(|values| {
                    values
                        .into_iter()
                        .map(|value| value.map(|value| (value, Duration::ZERO)))
                        .collect()
                })
        };
        let entries = match read {
            Ok(entries) if entries.len() == refs.len() => entries,
            // A failed L2 (counted and logged) reads as misses.
            Ok(_) | Err(_) => vec![None; refs.len()],
        };
        for ((&index, entry), snapshot) in missing.iter().zip(entries).zip(snapshots) {
            let key = keys[index].as_ref();
            let read = match entry {
                Some((bytes, ttl)) => self.classify(key, bytes, ttl, deadline).await,
                None => L2Read::Miss { seen: None },
            };
            match read {
                L2Read::Hit { value, life, .. } if !life.stale => {
                    self.recorder.l2_hit(key);
                    self.fill_l1_since(key, value.clone(), life, snapshot);
                    found[index] = Some(value);
                }
                // A stale entry (or a stale value re-armed) is replaced by what the batch loads.
                L2Read::Stale { bytes, .. } | L2Read::Hit { bytes, .. } => {
                    self.recorder.miss(key);
                    seen[index] = Some(bytes);
                }
                L2Read::Miss { seen: there } => {
                    self.recorder.miss(key);
                    seen[index] = there;
                }
            }
        }
        Ok((found, seen))
    }

    /// Writes what a batched loader returned to L2, each key over exactly what its read saw
    /// there (as a single key's fill does; the writes go out together), then to L1, skipping
    /// keys that changed since their watch began.
    async fn store_loaded_many(
        &self,
        watches: &[KeyWatch],
        values: &[Option<V>],
        seen: Vec<Option<Bytes>>,
        options: &EntryOptions,
    ) {
        let deadline = self.deadline();
        // As for a single key's fill: under the keys' locks, a `delete` or `touch` of one of them
        // either came before the check below or waits for the write.
        let locks = match &self.l2 {
            Some(_) => {
                let keys = watches.iter().map(KeyWatch::key);
                // L2 busy with these keys past the deadline: keep the values in L1 only.
                tokio::time::timeout_at(deadline, self.freshness.lock_keys(keys))
                    .await
                    .ok()
            }
            None => None,
        };
        let mut writes = Vec::new();
        for ((watch, value), seen) in watches.iter().zip(values).zip(seen) {
            if !self.freshness.key_unchanged(watch) {
                // Written or invalidated since the load began: caching the loaded value could
                // bring back what was deleted.
                continue;
            }
            // A "not found" is no fallback: it is not kept past its TTL.
            let life = match (value, options.negative_ttl()) {
                (Some(_), _) => Self::life(options, options.ttl()),
                (None, Some(negative)) => Self::life(&options.without_fail_safe(), negative),
                (None, None) => continue,
            };
            match self.encode_with_life(value.as_ref(), life) {
                Ok(bytes) => writes.push((watch, value, life, bytes, seen)),
                Err(error) => {
                    tracing::warn!(cache = %self.namespace, key = %fingerprint(watch.key()), error = %error, "loaded value not cached");
                }
            }
        }
        let written: Vec<bool> = match (&self.l2, &locks) {
            (Some(l2), Some(_)) if !options.skips().l2_write => {
                let mut written = Vec::with_capacity(writes.len());
                // At most `BULK_FILL_CONCURRENCY` at a time, in order: a large batch does not
                // take every slot of the L2 connection from other callers.
                for chunk in writes.chunks(BULK_FILL_CONCURRENCY) {
                    let calls = chunk.iter().map(|(watch, _, life, bytes, seen)| {
                        let (bytes, seen) = (bytes.clone(), seen.as_deref());
                        self.write_over_seen(
                            l2.as_ref(),
                            watch.key(),
                            bytes,
                            life.lives,
                            seen,
                            deadline,
                        )
                    });
                    // Like a single fill: L1 keeps a value that L2 did not refuse (a failing L2
                    // keeps serving from L1), and drops one that lost to another writer.
                    let results = futures_util::future::join_all(calls).await;
                    written.extend(results.into_iter().map(|result| result.unwrap_or(true)));
                }
                written
            }
            // No L2, or its locks timed out: L1 only.
            _ => vec![true; writes.len()],
        };
        drop(locks);
        for ((watch, value, life, _, _), written) in writes.iter().zip(written) {
            if written {
                self.fill_l1(watch.key(), (*value).clone(), *life, || {
                    self.freshness.watch_is_current(watch)
                });
            }
        }
    }
}
