//! Tags: names an entry carries so that one call can invalidate every entry that has it.
//!
//! Each tag in use has a small *record* in the shared store: a random *incarnation* (chosen
//! when the record is created, the first time an entry is stamped with the tag) and a
//! *counter* that every invalidation raises. An entry carries, for each of its tags, the
//! version of the record it was written under ([`TagVersion`]). A reader compares the two: the
//! entry is current only while its tag's record has not moved since. Nothing is scanned and no
//! clock is compared. A record that is missing (expired, evicted, never there) makes every
//! entry stamped under any version read as removed, never as current: losing records costs
//! reloads, never freshness.
//!
//! A record also remembers the counter of its last *removal*: an entry written before it is
//! gone, one written after it but before a later *expiry* is stale (a fail-safe fallback).

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{CacheError, Result};

/// The most tags one entry may carry.
pub const MAX_TAGS: usize = 16;
/// The longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// Why a tag was refused; part of [`CacheError::InvalidTag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TagProblem {
    /// The tag is the empty string.
    Empty,
    /// The tag is longer than [`MAX_TAG_LEN`].
    TooLong {
        /// The tag's length in bytes.
        len: usize,
    },
    /// The tag holds a control character.
    ControlCharacter,
    /// More than [`MAX_TAGS`] distinct tags on one entry.
    TooMany {
        /// How many were given.
        count: usize,
    },
}

impl fmt::Display for TagProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("tag is empty"),
            Self::TooLong { len } => {
                write!(f, "tag is {len} bytes, the maximum is {MAX_TAG_LEN}")
            }
            Self::ControlCharacter => f.write_str("tag holds a control character"),
            Self::TooMany { count } => {
                write!(f, "{count} tags on one entry, the maximum is {MAX_TAGS}")
            }
        }
    }
}

/// Checks one tag: not empty, at most [`MAX_TAG_LEN`] bytes, no control characters.
pub fn validate_tag(tag: &str) -> Result<()> {
    let problem = if tag.is_empty() {
        TagProblem::Empty
    } else if tag.len() > MAX_TAG_LEN {
        TagProblem::TooLong { len: tag.len() }
    } else if tag.chars().any(char::is_control) {
        TagProblem::ControlCharacter
    } else {
        return Ok(());
    };
    Err(CacheError::InvalidTag { reason: problem })
}

/// Checks every tag of one entry and returns them sorted, each once.
pub fn validate_tags<T: AsRef<str>>(tags: &[T]) -> Result<Vec<Arc<str>>> {
    let mut out: Vec<Arc<str>> = Vec::with_capacity(tags.len());
    for tag in tags {
        validate_tag(tag.as_ref())?;
        out.push(tag.as_ref().into());
    }
    out.sort_unstable();
    out.dedup();
    if out.len() > MAX_TAGS {
        return Err(CacheError::InvalidTag {
            reason: TagProblem::TooMany { count: out.len() },
        });
    }
    Ok(out)
}

/// The version of a tag's record an entry was written under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TagVersion {
    /// The record's random incarnation.
    pub incarnation: u64,
    /// How many times the tag had been invalidated in that incarnation.
    pub counter: u64,
}

/// What a tag's record says of an entry stamped with some version of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TagVerdict {
    /// The tag was not invalidated since the entry was written.
    Current,
    /// The tag was expired since: the entry is stale (a fail-safe fallback, never fresh).
    Expired,
    /// The tag was removed since (or its record was lost): the entry is gone.
    Removed,
}

/// A tag's record, as the shared store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagRecord {
    /// Random, non-zero: chosen when the record is created.
    pub incarnation: u64,
    /// Raised by every invalidation.
    pub counter: u64,
    /// The counter at the last removal (zero if there was none).
    pub removed_at: u64,
}

const RECORD_MAGIC: [u8; 2] = *b"TG";
const RECORD_VERSION: u8 = 1;
const RECORD_LEN: usize = 3 + 24;

impl TagRecord {
    /// A new record: a fresh incarnation, never invalidated.
    pub fn create() -> Self {
        Self {
            incarnation: random_incarnation(),
            counter: 0,
            removed_at: 0,
        }
    }

    /// The version entries written now are stamped with.
    pub fn version(&self) -> TagVersion {
        TagVersion {
            incarnation: self.incarnation,
            counter: self.counter,
        }
    }

    /// The record after one more invalidation of `current` (`None`: no record yet): a removal
    /// if `remove`, else an expiry. A counter that cannot grow starts a new incarnation (every
    /// entry of the old one reads as removed).
    pub fn next(current: Option<&Self>, remove: bool) -> Self {
        let current = current.copied().unwrap_or_else(Self::create);
        let mut next = match current.counter.checked_add(1) {
            Some(counter) => Self { counter, ..current },
            None => Self {
                counter: 1,
                ..Self::create()
            },
        };
        if remove {
            next.removed_at = next.counter;
        }
        next
    }

    /// What `record` (`None`: none in the store) says of an entry stamped with `stamp`.
    pub fn judge(record: Option<&Self>, stamp: TagVersion) -> TagVerdict {
        // No record, or another incarnation: whatever came since is unknown, so the entry is
        // gone.
        let Some(record) = record.filter(|record| record.incarnation == stamp.incarnation) else {
            return TagVerdict::Removed;
        };
        let counter = stamp.counter;
        if counter == record.counter {
            TagVerdict::Current
        } else if counter >= record.removed_at && counter < record.counter {
            TagVerdict::Expired
        } else {
            TagVerdict::Removed
        }
    }

    /// The record's bytes in the store.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(RECORD_LEN);
        out.extend_from_slice(&RECORD_MAGIC);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.incarnation.to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes());
        out.extend_from_slice(&self.removed_at.to_le_bytes());
        Bytes::from(out)
    }

    /// Reads a record's bytes; `None` for anything else (which callers treat as a lost record:
    /// every entry stamped under it is removed).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; RECORD_LEN] = bytes.try_into().ok()?;
        if bytes[0..2] != RECORD_MAGIC || bytes[2] != RECORD_VERSION {
            return None;
        }
        let field = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        let record = Self {
            incarnation: field(3),
            counter: field(11),
            removed_at: field(19),
        };
        (record.incarnation != 0 && record.removed_at <= record.counter).then_some(record)
    }
}

fn random_incarnation() -> u64 {
    use std::hash::BuildHasher;
    loop {
        let value = std::collections::hash_map::RandomState::new()
            .hash_one(crate::envelope::tombstone_nonce());
        if value != 0 {
            return value;
        }
    }
}

/// The tags of one entry with the versions it was written under, sorted by tag. Cloning is
/// cheap (shared).
#[derive(Clone, PartialEq, Eq)]
pub struct TagStamps(Arc<[(Arc<str>, TagVersion)]>);

impl TagStamps {
    /// Stamps from `(tag, version)` pairs, sorted by tag and checked like [`validate_tags`].
    pub fn new(mut stamps: Vec<(Arc<str>, TagVersion)>) -> Result<Self> {
        for (tag, _) in &stamps {
            validate_tag(tag)?;
        }
        stamps.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        stamps.dedup_by(|a, b| a.0 == b.0);
        if stamps.len() > MAX_TAGS {
            return Err(CacheError::InvalidTag {
                reason: TagProblem::TooMany {
                    count: stamps.len(),
                },
            });
        }
        Ok(Self(stamps.into()))
    }

    /// Each tag with its version.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, TagVersion)> {
        self.0.iter().map(|(tag, version)| (tag, *version))
    }

    /// How many tags.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The envelope section of these stamps: a count, then per tag its length, its bytes, its
    /// incarnation and counter (little-endian).
    pub(crate) fn write_section(&self, out: &mut Vec<u8>) {
        #[expect(clippy::cast_possible_truncation, reason = "at most MAX_TAGS")]
        out.push(self.0.len() as u8);
        for (tag, version) in self.0.iter() {
            #[expect(clippy::cast_possible_truncation, reason = "at most MAX_TAG_LEN")]
            out.push(tag.len() as u8);
            out.extend_from_slice(tag.as_bytes());
            out.extend_from_slice(&version.incarnation.to_le_bytes());
            out.extend_from_slice(&version.counter.to_le_bytes());
        }
    }

    /// Splits an envelope's tag section off the front of `bytes`, checking every field; the
    /// rest follows it.
    pub(crate) fn split_section(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
        let (&count, mut rest) = bytes.split_first()?;
        let count = usize::from(count);
        if count == 0 || count > MAX_TAGS {
            return None;
        }
        let mut len = 1;
        for _ in 0..count {
            let (&tag_len, after) = rest.split_first()?;
            let tag_len = usize::from(tag_len);
            let tag = after.get(..tag_len)?;
            let tag = std::str::from_utf8(tag).ok()?;
            validate_tag(tag).ok()?;
            rest = after.get(tag_len + 16..)?;
            len += 1 + tag_len + 16;
        }
        Some(bytes.split_at(len))
    }

    /// Reads a section that [`split_section`](Self::split_section) checked.
    pub(crate) fn read_section(section: &[u8]) -> Self {
        let mut stamps = Vec::with_capacity(usize::from(section[0]));
        let mut rest = &section[1..];
        while let Some((&tag_len, after)) = rest.split_first() {
            let tag_len = usize::from(tag_len);
            let tag = std::str::from_utf8(&after[..tag_len]).unwrap_or_default();
            let field = |at: usize| {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&after[at..at + 8]);
                u64::from_le_bytes(raw)
            };
            stamps.push((
                Arc::from(tag),
                TagVersion {
                    incarnation: field(tag_len),
                    counter: field(tag_len + 8),
                },
            ));
            rest = &after[tag_len + 16..];
        }
        Self(stamps.into())
    }
}

impl fmt::Debug for TagStamps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_current_until_its_tag_moves() {
        let created = TagRecord::create();
        assert_eq!(
            TagRecord::judge(Some(&created), created.version()),
            TagVerdict::Current
        );
        let expired = TagRecord::next(Some(&created), false);
        assert_eq!(
            TagRecord::judge(Some(&expired), created.version()),
            TagVerdict::Expired
        );
        assert_eq!(
            TagRecord::judge(Some(&expired), expired.version()),
            TagVerdict::Current
        );
        let removed = TagRecord::next(Some(&expired), true);
        assert_eq!(
            TagRecord::judge(Some(&removed), created.version()),
            TagVerdict::Removed,
            "a removal after an expiry removes"
        );
        assert_eq!(
            TagRecord::judge(Some(&removed), expired.version()),
            TagVerdict::Removed
        );
        let expired_again = TagRecord::next(Some(&removed), false);
        assert_eq!(
            TagRecord::judge(Some(&expired_again), removed.version()),
            TagVerdict::Expired,
            "written after the removal, stale after the expiry"
        );
    }

    #[test]
    fn a_missing_record_or_another_incarnation_removes() {
        let record = TagRecord::create();
        assert_eq!(
            TagRecord::judge(None, record.version()),
            TagVerdict::Removed
        );
        let other = TagRecord::create();
        assert_eq!(
            TagRecord::judge(Some(&other), record.version()),
            TagVerdict::Removed
        );
        let worn = TagRecord {
            counter: u64::MAX,
            ..record
        };
        let next = TagRecord::next(Some(&worn), false);
        assert_ne!(
            next.incarnation, worn.incarnation,
            "a counter that cannot grow"
        );
        assert_eq!(
            TagRecord::judge(Some(&next), worn.version()),
            TagVerdict::Removed
        );
    }

    #[test]
    fn records_round_trip_and_garbage_is_no_record() {
        let record = TagRecord::next(Some(&TagRecord::next(None, true)), false);
        assert_eq!(TagRecord::decode(&record.encode()), Some(record));
        let created = TagRecord::create();
        assert_eq!(TagRecord::decode(&created.encode()), Some(created));
        assert_eq!(TagRecord::decode(b"TG"), None);
        let mut bad = record.encode().to_vec();
        bad[0] = b'X';
        assert_eq!(TagRecord::decode(&bad), None);
        let mut zero = record.encode().to_vec();
        zero[3..11].copy_from_slice(&[0; 8]);
        assert_eq!(TagRecord::decode(&zero), None);
    }

    #[test]
    fn bad_tags_are_refused_clearly() {
        let problem = |tags: &[&str]| match validate_tags(tags) {
            Err(CacheError::InvalidTag { reason }) => Some(reason),
            _ => None,
        };
        assert_eq!(problem(&[""]), Some(TagProblem::Empty));
        assert_eq!(
            problem(&[&"x".repeat(MAX_TAG_LEN + 1)]),
            Some(TagProblem::TooLong {
                len: MAX_TAG_LEN + 1
            })
        );
        assert_eq!(problem(&["a\nb"]), Some(TagProblem::ControlCharacter));
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            problem(&many),
            Some(TagProblem::TooMany {
                count: MAX_TAGS + 1
            })
        );
        assert_eq!(problem(&["a", "a", "b"]), None, "repeats count once");
        assert!(
            CacheError::InvalidTag {
                reason: TagProblem::Empty
            }
            .to_string()
            .contains("tag is empty")
        );
    }

    #[test]
    fn sections_round_trip_and_every_truncation_is_refused() {
        let stamps = TagStamps::new(vec![
            ("user:7".into(), TagRecord::create().version()),
            (
                "org:2".into(),
                TagVersion {
                    incarnation: 9,
                    counter: 3,
                },
            ),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let mut section = Vec::new();
        stamps.write_section(&mut section);
        section.extend_from_slice(b"payload");
        let (own, rest) = TagStamps::split_section(&section).unwrap_or_else(|| panic!("section"));
        assert_eq!(rest, b"payload");
        assert_eq!(TagStamps::read_section(own), stamps);
        let len = own.len();
        for cut in 0..len {
            assert!(TagStamps::split_section(&section[..cut]).is_none(), "{cut}");
        }
    }
}
