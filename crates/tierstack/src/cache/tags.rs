//! Tags: stamping an entry with its tags' versions, judging a tagged entry, and invalidating a
//! tag (its record raised in the L2, then announced).

use std::sync::Arc;

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
    /// The records of `tags` (`None`: no record), from what this instance knows, else read
    /// from the L2 in one call.
    async fn tag_records(
        &self,
        tags: &[&str],
        deadline: Instant,
    ) -> Result<Vec<Option<TagRecord>>> {
        let mut records = Vec::with_capacity(tags.len());
        let mut unknown = Vec::new();
        for (index, tag) in tags.iter().enumerate() {
            let known = self.tags.known(tag);
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
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let found = self
            .l2_call(L2Op::Get, deadline, l2.get_many(&keys))
            .await?;
        for (&index, bytes) in unknown.iter().zip(found) {
            // Bytes that are not a record count as none: the entries stamped under a record
            // read as removed.
            let record = bytes.as_deref().and_then(TagRecord::decode);
            self.tags.remember_read(tags[index], record, mark);
            records[index] = record;
        }
        Ok(records)
    }

    /// Refuses a tagged entry that would outlive its tags' records (which would then read as
    /// never invalidated).
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
        let records = self.tag_records(&names, deadline).await?;
        let stamps = tags
            .iter()
            .zip(&records)
            .map(|(tag, record)| (Arc::clone(tag), TagRecord::version(record.as_ref())))
            .collect();
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
        let names: Vec<&str> = stamps.iter().map(|(tag, _)| &**tag).collect();
        let records = self.tag_records(&names, deadline).await?;
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
    /// again when needed); without, raises this instance's own record.
    pub(super) fn apply_tag_message(&self, tag: &str, remove: bool) {
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
            let record = self
                .raise_tag_record(l2.as_ref(), tag, remove, deadline)
                .await?;
            // Forgotten first, so that a read of the old record now under way is not kept.
            self.tags.note_change(tag);
            self.tags.remember(tag, Some(record));
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
