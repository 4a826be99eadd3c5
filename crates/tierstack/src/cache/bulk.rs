//! Bulk reads: L1 per key, one L2 round trip for the rest, one batched loader call for what is
//! still missing.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::clock::Timestamp;
use tierstack_core::key::fingerprint;
use tierstack_core::{Codec, Result};

use tierstack_core::envelope;

use super::Inner;
use super::load::Fallback;
use super::read::L2Read;
use crate::error::LoadError;
use crate::events::StaleReason;
use crate::freshness::{KeyWatch, Snapshot};
use crate::options::{EntryOptions, Skips, Source};
use crate::stats::L2Op;

/// How many conditional writes of one bulk fill are in flight at once.
const BULK_FILL_CONCURRENCY: usize = 64;

/// What a batch's look in L1 and L2 found, per key of the call.
struct BatchLook<V> {
    /// `Some(v)` where a tier answered (`v` `None` for a negative entry), `None` to load.
    #[expect(
        clippy::option_option,
        reason = "a negative entry is a hit with no value, unlike a miss"
    )]
    found: Vec<Option<Option<V>>>,
    /// What L2 held instead of a usable entry (see [`L2Read::Miss`]), for a loaded value to
    /// replace.
    seen: Vec<Option<Bytes>>,
    /// With fail-safe, the stale value that answers if the loader fails.
    fallbacks: Vec<Option<Fallback<V>>>,
}

/// A key the batch loads (each once, however often the call names it).
struct Missing<'a, V> {
    key: &'a str,
    seen: Option<Bytes>,
    fallback: Option<Fallback<V>>,
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn get_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        // A plain read never answers a stale value, not even one that fail-safe re-armed.
        // As `get`: fresh values only (not even one that fail-safe re-armed), and every tier
        // read whatever the defaults skip.
        let defaults = self.settings.defaults;
        let options = defaults.without_fail_safe().with_skips(Skips {
            l1_read: false,
            l2_read: false,
            ..defaults.skips()
        });
        let looked = self.lookup_many(keys, &options).await?;
        Ok(looked.found.into_iter().map(Option::flatten).collect())
    }

    /// `get_many` with `options`' skips and, if they ask, an L2 failure as an error.
    pub(super) async fn get_many_with<K: AsRef<str>>(
        &self,
        keys: &[K],
        options: &EntryOptions,
    ) -> Result<Vec<Option<V>>> {
        let looked = self.lookup_many(keys, &options.without_fail_safe()).await?;
        Ok(looked.found.into_iter().map(Option::flatten).collect())
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
        for key in keys {
            self.check_key(key.as_ref())?;
        }
        // Watched from before L1 is read, as a single key's flight is: a write, delete or
        // invalidation of a key from now on keeps what this batch reads, loads or falls back on
        // out of both tiers. Dropped (with the call, if it is cancelled), the watches leave
        // nothing behind.
        let mut by_key: HashMap<&str, KeyWatch> = keys
            .iter()
            .map(|key| (key.as_ref(), self.freshness.watch(key.as_ref())))
            .collect();
        let BatchLook {
            mut found,
            mut seen,
            mut fallbacks,
        } = self
            // A read-through batch loads what L2 could not answer.
            .lookup_many(keys, &options.with_l2_errors_returned(false))
            .await?;
        let mut missing = Vec::new();
        let mut watches = Vec::new();
        for (index, key) in keys.iter().map(AsRef::as_ref).enumerate() {
            // The first time a missing key is named (`remove` answers it once).
            if found[index].is_none()
                && let Some(watch) = by_key.remove(key)
            {
                missing.push(Missing {
                    key,
                    seen: seen[index].take(),
                    fallback: fallbacks[index].take(),
                });
                watches.push(watch);
            }
        }
        drop(by_key);
        if missing.is_empty() {
            return Ok(found.into_iter().map(Option::flatten).collect());
        }
        let started = Instant::now();
        let loaded_since = self.clock.now();
        let request: Vec<String> = missing.iter().map(|m| m.key.to_owned()).collect();
        let run = AssertUnwindSafe(async move { loader(request).await }).catch_unwind();
        // The hard timeout cancels the batch loader (it runs in the caller's task).
        let answer = match options.hard_timeout() {
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
            None => Some(run.await),
        };
        let origin = match answer {
            Some(Ok(Ok(map))) => Ok(map),
            Some(Ok(Err(error))) => Err(LoadError::Loader(std::sync::Arc::new(error))),
            Some(Err(_)) => Err(LoadError::Panicked),
            None => Err(LoadError::TimedOut {
                after: options.hard_timeout().unwrap_or_default(),
            }),
        };
        self.recorder.load(origin.is_ok(), started.elapsed());
        let values: Vec<Option<V>> = match origin {
            Ok(mut origin_values) => {
                let values: Vec<Option<V>> = missing
                    .iter()
                    .map(|missing| origin_values.remove(missing.key))
                    .collect();
                let seen = missing.iter_mut().map(|missing| missing.seen.take());
                self.store_loaded_many(&watches, &values, seen.collect(), options, loaded_since)
                    .await;
                values
            }
            Err(error) => {
                self.serve_stale_many(missing, &watches, options, error)
                    .await?
            }
        };
        let by_key: HashMap<&str, &Option<V>> =
            watches.iter().map(KeyWatch::key).zip(&values).collect();
        for (key, slot) in keys.iter().zip(found.iter_mut()) {
            if slot.is_none() {
                *slot = Some(by_key.get(key.as_ref()).and_then(|value| (*value).clone()));
            }
        }
        Ok(found.into_iter().map(Option::flatten).collect())
    }

    /// Fail-safe for a batch whose loader failed (or timed out): if every key the batch
    /// loaded has a stale value, those answer, each re-armed for the throttle as a single key's
    /// is; otherwise the load's error stands (no key answers "not found" in place of a value).
    async fn serve_stale_many<E>(
        &self,
        missing: Vec<Missing<'_, V>>,
        watches: &[KeyWatch],
        options: &EntryOptions,
        error: LoadError<E>,
    ) -> std::result::Result<Vec<Option<V>>, LoadError<E>> {
        let fallbacks: Option<Vec<(&str, Fallback<V>)>> = missing
            .into_iter()
            .map(|missing| Some((missing.key, missing.fallback?)))
            .collect();
        let (Some(fallbacks), Some(_)) = (fallbacks, options.fail_safe()) else {
            return Err(error);
        };
        let reason = match error {
            LoadError::TimedOut { .. } => StaleReason::HardTimeout,
            _ => StaleReason::LoaderFailed,
        };
        let mut values = Vec::with_capacity(fallbacks.len());
        let mut stale = fallbacks.into_iter().zip(watches);
        // Re-armed at most `BULK_FILL_CONCURRENCY` at a time (in L2, each is a conditional
        // write), as a batch's fill is.
        loop {
            let chunk: Vec<_> = stale.by_ref().take(BULK_FILL_CONCURRENCY).collect();
            if chunk.is_empty() {
                break;
            }
            let rearms = chunk.into_iter().map(|((key, fallback), watch)| {
                self.recorder.stale_served(key, reason);
                self.serve_stale(key, fallback, options, watch)
            });
            let served = futures_util::future::join_all(rearms).await;
            values.extend(served.into_iter().map(|fetched| Some(fetched.value)));
        }
        Ok(values)
    }

    /// L1 then one L2 round trip for `keys`, under a call's `options` (the tiers it skips, and
    /// with fail-safe, the stale values that answer if the loader fails).
    async fn lookup_many<K: AsRef<str>>(
        &self,
        keys: &[K],
        options: &EntryOptions,
    ) -> Result<BatchLook<V>> {
        for key in keys {
            self.check_key(key.as_ref())?;
        }
        let skips = options.skips();
        let fail_safe = options.fail_safe().is_some();
        let mut looked = BatchLook {
            found: Vec::with_capacity(keys.len()),
            seen: vec![None; keys.len()],
            fallbacks: std::iter::repeat_with(|| None).take(keys.len()).collect(),
        };
        let mut missing = Vec::new();
        let now = self.clock.now();
        for (index, key) in keys.iter().enumerate() {
            let key = key.as_ref();
            let Some(entry) = self.l1_entry(key).filter(|_| !skips.l1_read) else {
                missing.push(index);
                looked.found.push(None);
                continue;
            };
            // As for a single key: a stale value that fail-safe re-armed answers only calls
            // with fail-safe, and one past its throttle is their fallback.
            if self.serving(&entry, now) && (!entry.stale || fail_safe) {
                self.recorder.l1_hit(key);
                looked.found.push(Some(entry.value));
                continue;
            }
            if let (Some(value), true) = (entry.value, fail_safe) {
                looked.fallbacks[index] = Some(Fallback {
                    value,
                    source: Source::L1,
                    expires_at: entry.expires_at,
                    bytes: None,
                    tags: entry.tags.clone(),
                });
            }
            missing.push(index);
            looked.found.push(None);
        }
        let l2 = self
            .l2
            .as_ref()
            .filter(|_| !missing.is_empty() && !skips.l2_read);
        let Some(l2) = l2 else {
            for &index in &missing {
                self.recorder.miss(keys[index].as_ref());
            }
            return Ok(looked);
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
        // Looked at before the L2 call too (see `read_l2`).
        let kept_before: Vec<Option<Bytes>> = missing
            .iter()
            .map(|&i| self.kept_write(keys[i].as_ref()))
            .collect();
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
        let (entries, answered) = match read {
            Ok(entries) if entries.len() == refs.len() => (entries, true),
            Err(error) if options.l2_errors_returned() => return Err(error),
            // A failed L2 (counted and logged) reads as misses.
            Ok(_) | Err(_) => (vec![None; refs.len()], false),
        };
        let reads = missing.iter().zip(entries).zip(snapshots).zip(kept_before);
        for (((&index, entry), snapshot), kept_before) in reads {
            let key = keys[index].as_ref();
            let kept = self.kept_write(key).or(kept_before);
            let read = self
                .batch_read(key, kept, entry, answered, deadline, options)
                .await?;
            self.take_l2_read(key, index, read, options, snapshot, &mut looked);
        }
        Ok(looked)
    }

    /// One key's entry in a batch's L2 read (`entry`; nothing if the read was not `answered`),
    /// as a read sees it beside a write of the key kept for a replay (`kept`). One whose tags'
    /// records cannot be read is the error if the options return L2 errors, else a miss with
    /// nothing known to replace, as on a failed L2.
    async fn batch_read(
        &self,
        key: &str,
        kept: Option<Bytes>,
        entry: Option<(Bytes, Duration)>,
        answered: bool,
        deadline: tokio::time::Instant,
        options: &EntryOptions,
    ) -> Result<L2Read<V>> {
        let read = match (kept, entry) {
            (Some(kept), entry) => {
                self.read_with_kept(key, kept, entry, !answered, deadline)
                    .await
            }
            (None, Some((bytes, ttl))) => self.classify(key, bytes, ttl, deadline).await,
            (None, None) => Ok(L2Read::Miss { seen: None }),
        };
        match read {
            Err(_) if !options.l2_errors_returned() => Ok(L2Read::Miss { seen: None }),
            read => read,
        }
    }

    /// What one key's L2 read in a batch answers, or leaves to load (and fall back on).
    fn take_l2_read(
        &self,
        key: &str,
        index: usize,
        read: L2Read<V>,
        options: &EntryOptions,
        snapshot: Snapshot,
        looked: &mut BatchLook<V>,
    ) {
        let fail_safe = options.fail_safe().is_some();
        match read {
            // A stale value re-armed in L2 answers only calls with fail-safe.
            L2Read::Hit { value, life, .. } if !life.stale || fail_safe => {
                self.recorder.l2_hit(key);
                self.fill_l1_since(key, value.clone(), &life.under(options), snapshot);
                looked.found[index] = Some(value);
            }
            L2Read::Hit { seen, .. } => {
                self.recorder.miss(key);
                looked.seen[index] = seen;
            }
            L2Read::Stale {
                value,
                expires_at,
                seen,
                tags,
            } => {
                self.recorder.miss(key);
                looked.seen[index].clone_from(&seen);
                let fallback = &mut looked.fallbacks[index];
                // The newer of L1's and L2's stale values; a stale "not found" is none.
                let newer = fallback
                    .as_ref()
                    .is_none_or(|l1| expires_at > l1.expires_at);
                match value {
                    Some(value) if newer && fail_safe => {
                        *fallback = Some(Fallback {
                            value,
                            source: Source::L2,
                            expires_at,
                            bytes: seen,
                            tags,
                        });
                    }
                    Some(_) => {}
                    None => *fallback = None,
                }
            }
            L2Read::Miss { seen } => {
                self.recorder.miss(key);
                // A delete's tombstone takes this instance's old copy with it.
                if seen.as_deref().is_some_and(envelope::is_tombstone) {
                    looked.fallbacks[index] = None;
                }
                looked.seen[index] = seen;
            }
        }
    }

    /// Writes what a batched loader returned to L2, each key over exactly what its read saw
    /// there (as a single key's fill does; the writes go out together), then to L1, skipping
    /// keys that changed since their watch began. Their entries record when the loader
    /// started as their write time, as a single key's fill does (see `Caching::since`).
    async fn store_loaded_many(
        &self,
        watches: &[KeyWatch],
        values: &[Option<V>],
        seen: Vec<Option<Bytes>>,
        options: &EntryOptions,
        loaded_since: Timestamp,
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
            match self.encode_loaded(watch.key(), value.as_ref(), &life, loaded_since) {
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
                self.fill_l1(watch.key(), (*value).clone(), life, || {
                    self.freshness.watch_is_current(watch)
                });
            }
        }
    }
}
