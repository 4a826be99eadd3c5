//! Tags: stamping an entry with its tags' versions (creating a tag's record when it is first
//! used), judging a tagged entry, and invalidating a tag (its record raised in the L2, then
//! announced).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::backplane::Invalidation;
use tierstack_core::tag::{TagRecord, TagStamps, TagVerdict, validate_tag};
use tierstack_core::{CacheError, Codec, Result, Store};
use tokio::time::Instant;

use super::Inner;
use super::read::Life;
use crate::stats::L2Op;
use crate::tags::record_key;

impl<V, C> Inner<V, C> {
    /// The records of `tags` (`None`: no record), from what this instance knows (unless
    /// `read_anew`, with an L2), else read from the L2 in one call. A record read with less
    /// than half its TTL left is given a whole one again (it is in use), so that records of
    /// live tags do not lapse.
    async fn tag_records(
        &self,
        tags: &[&str],
        deadline: Instant,
        read_anew: bool,
    ) -> Result<Vec<Option<TagRecord>>> {
        let read_anew = read_anew && self.l2.is_some();
        let mut records = Vec::with_capacity(tags.len());
        let mut unknown = Vec::new();
        for (index, tag) in tags.iter().enumerate() {
            let known = if read_anew {
                None
            } else {
                self.tags.known(tag)
            };
            if known.is_none() {
                unknown.push(index);
            }
            records.push(known.flatten());
        }
        // Without an L2 every tag is known.
        let (false, Some(l2)) = (unknown.is_empty(), &self.l2) else {
            return Ok(records);
        };
        let mark = self.tags.mark();
        let keys: Vec<String> = unknown
            .iter()
            .map(|&index| record_key(self.namespace.as_str(), tags[index]))
            .collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let found = self
            .l2_call(L2Op::Get, deadline, l2.get_many_with_ttl(&key_refs))
            .await?;
        let record_ttl = self.tags.record_ttl();
        for ((&index, key), entry) in unknown.iter().zip(&keys).zip(found) {
            // Bytes that are not a record count as none: the entries stamped under a record
            // read as removed.
            let record = entry
                .as_ref()
                .and_then(|entry| TagRecord::decode(&entry.value));
            if entry.is_some_and(|entry| entry.ttl < record_ttl / 2) && record.is_some() {
                // Best effort: a record that lapses costs reloads, not freshness.
                let _ = self
                    .l2_call(L2Op::Other, deadline, l2.expire(key, record_ttl))
                    .await;
            }
            self.tags.remember_read(tags[index], record, mark);
            records[index] = record;
        }
        Ok(records)
    }

    /// The record of `tag` for an entry written now: read (see `tag_records`), or created in
    /// the L2 if it has none (over no entry, reading again if another instance created it
    /// first).
    async fn record_for_stamp(
        &self,
        tag: &str,
        known: Option<TagRecord>,
        deadline: Instant,
    ) -> Result<TagRecord> {
        let Some(l2) = &self.l2 else {
            return Ok(self.tags.local_record(tag));
        };
        if let Some(record) = known {
            return Ok(record);
        }
        let key = record_key(self.namespace.as_str(), tag);
        loop {
            let mark = self.tags.mark();
            let created = TagRecord::create();
            let write = l2.set_if_absent(&key, created.encode(), self.tags.record_ttl());
            if self.l2_call(L2Op::Set, deadline, write).await? {
                self.tags.remember_read(tag, Some(created), mark);
                return Ok(created);
            }
            let current = self.l2_call(L2Op::Get, deadline, l2.get(&key)).await?;
            if let Some(record) = current.as_deref().and_then(TagRecord::decode) {
                self.tags.remember_read(tag, Some(record), mark);
                return Ok(record);
            }
            if let Some(bytes) = current {
                // Not a record: replaced by a new one (entries stamped under it are removed).
                let replace = l2.compare_and_set(
                    &key,
                    &bytes,
                    Some((created.encode(), self.tags.record_ttl())),
                );
                if self.l2_call(L2Op::Set, deadline, replace).await? {
                    self.tags.remember_read(tag, Some(created), mark);
                    return Ok(created);
                }
            }
            if Instant::now() >= deadline {
                return Err(CacheError::Timeout {
                    operation: "tag record",
                    after: self.settings.l2_timeout,
                });
            }
        }
    }

    /// Refuses a tagged entry that would outlive its tags' records' TTL (it would be removed
    /// before its time when they lapse).
    pub(super) fn check_tagged_life(&self, life: &Life) -> Result<()> {
        if life.lives > self.tags.record_ttl() {
            return Err(CacheError::InvalidTtl {
                ttl: life.lives,
                reason: "a tagged entry may live (TTL plus fail-safe's maximum) at most the cache's tag_record_ttl",
            });
        }
        Ok(())
    }

    /// The stamps of an entry written now with `tags` (checked, sorted, each once).
    pub(super) async fn stamp_tags(
        &self,
        tags: &[Arc<str>],
        deadline: Instant,
    ) -> Result<Option<TagStamps>> {
        if tags.is_empty() {
            return Ok(None);
        }
        let names: Vec<&str> = tags.iter().map(|tag| &**tag).collect();
        // Without a backplane (or while it is lost) no message tells this instance that a tag
        // changed: what it knows may be a recheck old, and an entry stamped with an older
        // version reads as removed on every instance that knows better (a session created
        // just after its user was logged out everywhere would be ended at once elsewhere). A
        // write reads the versions anew; if the L2 fails, what is known stamps it (a write
        // kept for a replay needs its stamps), and unknown tags fail it as before.
        let read_anew = self.backplane.is_none() || self.deaf.load(Ordering::SeqCst);
        let records = match self.tag_records(&names, deadline, read_anew).await {
            Ok(records) => records,
            Err(error) if read_anew && error.is_transient() => {
                self.tag_records(&names, deadline, false).await?
            }
            Err(error) => return Err(error),
        };
        let mut stamps = Vec::with_capacity(tags.len());
        for (tag, known) in tags.iter().zip(records) {
            let record = self.record_for_stamp(tag, known, deadline).await?;
            stamps.push((Arc::clone(tag), record.version()));
        }
        TagStamps::new(stamps).map(Some)
    }

    /// What the tags' records say of an entry stamped `stamps`: the worst of its tags.
    pub(super) async fn tag_verdict(
        &self,
        stamps: &TagStamps,
        deadline: Instant,
    ) -> Result<TagVerdict> {
        if let Some(verdict) = self.tags.verdict_now(stamps) {
            return Ok(verdict);
        }
        // A tag unknown, or known behind the stamp: read them all anew (one call either way).
        let names: Vec<&str> = stamps.iter().map(|(tag, _)| &**tag).collect();
        let records = self.tag_records(&names, deadline, true).await?;
        Ok(stamps
            .iter()
            .zip(&records)
            .map(|((_, version), record)| TagRecord::judge(record.as_ref(), version))
            .max()
            .unwrap_or(TagVerdict::Current))
    }

    /// Raises `tag`'s record in the L2 by compare-and-set, reading it again after a conflict,
    /// until `deadline`.
    async fn raise_tag_record(
        &self,
        l2: &dyn Store,
        tag: &str,
        remove: bool,
        deadline: Instant,
    ) -> Result<TagRecord> {
        let key = record_key(self.namespace.as_str(), tag);
        let ttl = self.tags.record_ttl();
        loop {
            let current = self.l2_call(L2Op::Get, deadline, l2.get(&key)).await?;
            let next = TagRecord::next(
                current.as_deref().and_then(TagRecord::decode).as_ref(),
                remove,
            );
            let write = async {
                match &current {
                    None => l2.set_if_absent(&key, next.encode(), ttl).await,
                    Some(bytes) => {
                        l2.compare_and_set(&key, bytes, Some((next.encode(), ttl)))
                            .await
                    }
                }
            };
            if self.l2_call(L2Op::Set, deadline, write).await? {
                return Ok(next);
            }
            // Another instance raised it meanwhile: read it again.
            if Instant::now() >= deadline {
                return Err(CacheError::Timeout {
                    operation: "invalidate_tag",
                    after: self.settings.l2_timeout,
                });
            }
        }
    }

    /// Applies another instance's invalidation of `tag`: with an L2, forgets its record (read
    /// again when needed); without, raises this instance's own record. A tag this build would
    /// not accept is dropped.
    pub(super) fn apply_tag_message(&self, tag: &str, remove: bool) {
        if validate_tag(tag).is_err() {
            return;
        }
        if !self.tags.shared() {
            self.tags.raise_local(tag, remove);
        }
        self.tags.note_change(tag);
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// `invalidate_tag` (`remove`) and `expire_tag`.
    pub(super) async fn invalidate_tag(self: &Arc<Self>, tag: &str, remove: bool) -> Result<()> {
        validate_tag(tag)?;
        let deadline = self.deadline();
        if let Some(l2) = &self.l2 {
            // Noted before the raise, so that a load stamping meanwhile keeps its value out,
            // and after, so that a read of the old record meanwhile is not kept. The new record
            // is not kept either: a later raise by another instance may already be on its way.
            self.tags.note_change(tag);
            self.raise_tag_record(l2.as_ref(), tag, remove, deadline)
                .await?;
            self.tags.note_change(tag);
        } else {
            self.tags.raise_local(tag, remove);
            self.tags.note_change(tag);
        }
        self.recorder.tag_invalidated(remove);
        let message = Invalidation::Tag {
            tag: tag.to_owned(),
            remove,
        };
        self.publish(message, deadline).await;
        Ok(())
    }
}
