//! What one instance knows of its tags' records (see [`tierstack_core::tag`]), and which tags
//! changed while a load ran.
//!
//! With an L2, the records live there and this is a bounded cache of them: a record is known
//! until a message says its tag changed, the backplane may have lost messages, or
//! [`RECHECK`] passes; an unknown tag is read from the L2 again. Without an L2 there is nobody
//! to share records with: this instance keeps them itself (as many as [`KNOWN_CAPACITY`]),
//! each for the record TTL after it was last used. Either way a record that is gone makes
//! the entries stamped under it read as removed, so the bound costs reloads, never freshness.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tierstack_core::clock::SharedClock;
use tierstack_core::tag::{TagRecord, TagStamps, TagVerdict};
use tierstack_moka::{L1Cache, L1Capacity, L1Entry};

/// How long a record read from the L2 is trusted without a message: the bound on how late an
/// instance that lost a tag's message (without noticing) sees its invalidation.
pub(crate) const RECHECK: Duration = Duration::from_secs(30);
/// How many records an instance keeps in memory.
pub(crate) const KNOWN_CAPACITY: u64 = 100_000;
/// The stripes of the change log: a load's tags are "changed" when any tag of their stripes
/// changed during it, so there are enough that unrelated invalidations rarely keep a value
/// out.
const STRIPES: usize = 4096;

pub(crate) struct TagRegistry {
    /// `Some(record)` or `None` (no record) per known tag.
    known: L1Cache<TagRecord>,
    /// Whether the records live in the L2 (else `known` is where they live).
    shared: bool,
    /// How long a record lives past its last invalidation.
    record_ttl: Duration,
    clock: SharedClock,
    /// Raised by every change of any tag; each stripe holds its value at its tags' last change.
    changes: AtomicU64,
    changed_at: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    /// Orders the raises of this instance's own records (without an L2).
    local_raise: std::sync::Mutex<()>,
}

impl std::fmt::Debug for TagRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagRegistry")
            .field("shared", &self.shared)
            .field("record_ttl", &self.record_ttl)
            .finish_non_exhaustive()
    }
}

impl TagRegistry {
    pub(crate) fn new(shared: bool, record_ttl: Duration, clock: SharedClock) -> Self {
        Self {
            known: L1Cache::with_clock(L1Capacity::Entries(KNOWN_CAPACITY), Arc::clone(&clock)),
            shared,
            record_ttl,
            clock,
            changes: AtomicU64::new(0),
            changed_at: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            local_raise: std::sync::Mutex::default(),
        }
    }

    /// Without an L2: raises this instance's own record of `tag` (a removal if `remove`).
    pub(crate) fn raise_local(&self, tag: &str, remove: bool) {
        let _raising = self
            .local_raise
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.known(tag).flatten();
        self.remember(tag, Some(TagRecord::next(current.as_ref(), remove)));
    }

    /// Whether the records live in the L2.
    pub(crate) fn shared(&self) -> bool {
        self.shared
    }

    /// How long a record lives past its last invalidation, and so the longest a tagged entry
    /// may live.
    pub(crate) fn record_ttl(&self) -> Duration {
        self.record_ttl
    }

    /// What this instance knows of `tag`: `Some(None)` that it has no record, `None` that it
    /// does not know (only with an L2).
    #[expect(
        clippy::option_option,
        reason = "an unknown tag differs from one without a record"
    )]
    pub(crate) fn known(&self, tag: &str) -> Option<Option<TagRecord>> {
        match self.known.get(tag) {
            Some(entry) => Some(entry.value),
            None if self.shared => None,
            None => Some(None),
        }
    }

    /// Keeps `record` (`None`: the tag has none) as what this instance knows of `tag`.
    fn remember(&self, tag: &str, record: Option<TagRecord>) {
        let keep = if self.shared {
            RECHECK
        } else if record.is_some() {
            self.record_ttl
        } else {
            return;
        };
        let expires_at = self.clock.now().saturating_add(keep);
        self.known
            .insert(tag.to_owned(), L1Entry::fresh(record, expires_at));
    }

    /// Keeps what a read of the L2 found for `tag`, unless the tag changed since `mark` (the
    /// read may have come before the change). Checked again after the insert: a change between
    /// the check and the insert forgets it (a change counts itself before it forgets).
    pub(crate) fn remember_read(&self, tag: &str, record: Option<TagRecord>, mark: u64) {
        if self.changed_since(mark, [tag]) {
            return;
        }
        self.remember(tag, record);
        if self.changed_since(mark, [tag]) {
            self.known.invalidate(tag);
        }
    }

    /// Without an L2: this instance's record of `tag`, created if it has none, and kept for
    /// another record TTL from now (it is in use).
    pub(crate) fn local_record(&self, tag: &str) -> TagRecord {
        let _raising = self
            .local_raise
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = self.known(tag).flatten().unwrap_or_else(TagRecord::create);
        self.remember(tag, Some(record));
        record
    }

    /// What the known records say of `stamps` (the worst of its tags), or `None` if a tag is
    /// unknown, or (with an L2) known behind the stamp: a stamp newer than the known record,
    /// of another incarnation, or of a tag known to have none was taken from a record read
    /// since, by a write here or on another instance; judged by what is known, the entry would
    /// read as removed until the next recheck (a session created after its user was logged
    /// out everywhere, say). The caller reads such records anew.
    pub(crate) fn verdict_now(&self, stamps: &TagStamps) -> Option<TagVerdict> {
        let mut verdict = TagVerdict::Current;
        for (tag, version) in stamps.iter() {
            let record = self.known(tag)?;
            let behind = record.is_none_or(|record| {
                record.incarnation != version.incarnation || record.counter < version.counter
            });
            if self.shared && behind {
                return None;
            }
            verdict = verdict.max(TagRecord::judge(record.as_ref(), version));
        }
        Some(verdict)
    }

    /// A mark to ask [`changed_since`](Self::changed_since) with later.
    pub(crate) fn mark(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Whether any of `tags` changed (here, or in a message from another instance) since
    /// `mark`. May say so of a tag that shares a stripe with one that changed.
    pub(crate) fn changed_since<'a>(
        &self,
        mark: u64,
        tags: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        if self.changes.load(Ordering::SeqCst) == mark {
            return false;
        }
        tags.into_iter()
            .any(|tag| self.changed_at[self.stripe(tag)].load(Ordering::SeqCst) > mark)
    }

    /// Notes that `tag` changed: what is known of it is forgotten (with an L2) and loads that
    /// ran meanwhile see the change.
    pub(crate) fn note_change(&self, tag: &str) {
        let now = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed_at[self.stripe(tag)].fetch_max(now, Ordering::SeqCst);
        if self.shared {
            self.known.invalidate(tag);
        }
    }

    /// Notes that any tag may have changed (messages were lost): with an L2, every record is
    /// read again.
    pub(crate) fn note_all_changed(&self) {
        let now = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        for stripe in &self.changed_at {
            stripe.fetch_max(now, Ordering::SeqCst);
        }
        if self.shared {
            self.known.invalidate_all();
        }
    }

    fn stripe(&self, tag: &str) -> usize {
        #[expect(clippy::cast_possible_truncation, reason = "reduced modulo STRIPES")]
        let index = (self.hasher.hash_one(tag) % STRIPES as u64) as usize;
        index
    }
}

/// The key of `tag`'s record in the store. A namespace holds no `!`, so no namespace's keys
/// (nor their prefix deletes) reach it.
pub(crate) fn record_key(namespace: &str, tag: &str) -> String {
    format!("{namespace}!tag:{tag}")
}

#[cfg(test)]
mod tests {
    use tierstack_core::clock::ManualClock;

    use super::*;

    fn registry(shared: bool) -> (TagRegistry, ManualClock) {
        let clock = ManualClock::new();
        let registry = TagRegistry::new(shared, Duration::from_secs(60), Arc::new(clock.clone()));
        (registry, clock)
    }

    #[test]
    fn with_an_l2_records_are_known_until_a_change_or_the_recheck() {
        let (registry, clock) = registry(true);
        assert_eq!(registry.known("t"), None, "unknown until read");
        registry.remember("t", None);
        assert_eq!(registry.known("t"), Some(None));
        clock.advance(RECHECK);
        assert_eq!(registry.known("t"), None, "read again after the recheck");
        let record = TagRecord::next(None, true);
        registry.remember("t", Some(record));
        registry.note_change("t");
        assert_eq!(registry.known("t"), None, "forgotten on a change");
        registry.remember("u", None);
        registry.note_all_changed();
        assert_eq!(registry.known("u"), None);
    }

    #[test]
    fn without_an_l2_records_are_kept_while_in_use() {
        let (registry, clock) = registry(false);
        assert_eq!(registry.known("t"), Some(None), "no record");
        let record = registry.local_record("t");
        assert_eq!(registry.local_record("t"), record, "created once");
        registry.raise_local("t", true);
        registry.note_change("t");
        let raised = registry
            .known("t")
            .flatten()
            .unwrap_or_else(|| panic!("kept"));
        assert_eq!(
            raised.counter,
            record.counter + 1,
            "a change keeps it, raised"
        );
        clock.advance(Duration::from_secs(40));
        assert_eq!(registry.local_record("t"), raised, "used: kept another TTL");
        clock.advance(Duration::from_secs(40));
        assert_eq!(registry.known("t"), Some(Some(raised)));
        clock.advance(Duration::from_secs(60));
        assert_eq!(registry.known("t"), Some(None), "unused for a TTL");
    }

    #[test]
    fn a_read_from_before_a_change_is_not_kept_and_loads_see_changes() {
        let (registry, _clock) = registry(true);
        let mark = registry.mark();
        assert!(!registry.changed_since(mark, ["t"]));
        registry.note_change("t");
        assert!(registry.changed_since(mark, ["t"]));
        registry.remember_read("t", None, mark);
        assert_eq!(registry.known("t"), None);
        let after = registry.mark();
        registry.remember_read("t", None, after);
        assert_eq!(registry.known("t"), Some(None));
        registry.note_all_changed();
        assert!(registry.changed_since(after, ["anything"]));
    }

    #[test]
    fn verdicts_take_the_worst_tag_and_need_every_tag_known() {
        let (shared, _clock) = registry(true);
        let (a, b) = (TagRecord::create(), TagRecord::create());
        let stamps = TagStamps::new(vec![("a".into(), a.version()), ("b".into(), b.version())])
            .unwrap_or_else(|e| panic!("{e}"));
        shared.remember("a", Some(a));
        assert_eq!(shared.verdict_now(&stamps), None);
        shared.remember("b", Some(b));
        assert_eq!(shared.verdict_now(&stamps), Some(TagVerdict::Current));
        shared.remember("b", Some(TagRecord::next(Some(&b), true)));
        assert_eq!(shared.verdict_now(&stamps), Some(TagVerdict::Removed));
        // Known behind the stamp (none, an older counter, another incarnation): to be read
        // anew, not judged by it.
        shared.remember("b", None);
        assert_eq!(shared.verdict_now(&stamps), None, "no record");
        let newer = TagRecord::next(Some(&a), true);
        let ahead =
            TagStamps::new(vec![("a".into(), newer.version())]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shared.verdict_now(&ahead), None, "an older record");
        shared.remember("a", Some(TagRecord::create()));
        assert_eq!(shared.verdict_now(&ahead), None, "another incarnation");
        // Without an L2 the instance's own records are the truth.
        let (local, _clock) = registry(false);
        local.remember("b", None);
        assert_eq!(local.verdict_now(&stamps), Some(TagVerdict::Removed));
    }
}
