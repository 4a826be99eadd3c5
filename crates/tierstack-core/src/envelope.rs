//! The versioned envelope around every value written to an L2.
//!
//! Layout (version 1, integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 2 | magic `TS` |
//! | 1 | format version (1) |
//! | 1 | codec id ([`Codec::ID`]) |
//! | 1 | flags: bit 0 = negative entry (a cached "not found"); bit 1 = tombstone; bit 2 = fresh-until field present; bit 3 = stale; bit 4 = tags present; others reserved |
//! | 8 | written at, ms since the Unix epoch |
//! | 8 | expires at, ms since the Unix epoch |
//! | 4 | payload length |
//! | 8 | fresh until, ms since the Unix epoch (only with flag bit 2) |
//! | t | tags (only with flag bit 4): a count (1 to 16), then per tag its length (1 byte), its UTF-8 bytes, and the incarnation and counter of its record (8 bytes each) |
//! | n | payload |
//!
//! *Fail-safe* entries live past their time to live: they are fresh until *fresh until* and stay
//! in the store, stale, until *expires at*, as a fallback for when the origin fails. An envelope
//! without the field is fresh until it expires. The *stale* flag marks a stale value written back
//! after the origin failed (its fresh-until then only delays the next attempt).
//!
//! A *tombstone* marks a key deleted: readers treat it as no entry, and a loaded value may only
//! replace the very tombstone its load saw (`Store::compare_and_set`), so that a load that began
//! before a delete on any instance cannot bring the value back. Its payload is a nonce, so that no
//! two deletions write the same bytes.
//!
//! A *tagged* entry carries the version of each of its tags' records when it was written (see
//! [`tag`](crate::tag)); readers compare them with the records to tell whether a tag was
//! invalidated since.
//!
//! Parsing checks every field before it touches the payload: bytes that are truncated, of another
//! version or codec, carry unknown flags, or claim a payload over the cap are an [`EnvelopeError`]
//! (which readers treat as a miss), never a panic and never an allocation.

use bytes::Bytes;
use serde::Serialize;

use crate::clock::Timestamp;
use crate::codec::Codec;
use crate::error::{CacheError, Result};
use crate::tag::TagStamps;

/// The first two bytes of every envelope.
pub const MAGIC: [u8; 2] = *b"TS";
const VERSION: u8 = 1;
/// The size of the envelope header in bytes.
pub const HEADER_LEN: usize = 25;
/// Where the expiry (ms since the Unix epoch, 8 bytes little-endian) sits in the header: a store
/// that changes an entry's time to live rewrites it there, so that readers can take the
/// remaining time from the bytes.
pub const EXPIRES_AT: std::ops::Range<usize> = 13..21;

const FLAG_NEGATIVE: u8 = 0b0000_0001;
const FLAG_TOMBSTONE: u8 = 0b0000_0010;
const FLAG_FRESH_UNTIL: u8 = 0b0000_0100;
const FLAG_STALE: u8 = 0b0000_1000;
const FLAG_TAGS: u8 = 0b0001_0000;
const KNOWN_FLAGS: u8 = FLAG_NEGATIVE | FLAG_TOMBSTONE | FLAG_FRESH_UNTIL | FLAG_STALE | FLAG_TAGS;
/// The length of the optional fresh-until field.
const FRESH_UNTIL_LEN: usize = 8;
/// The length of a tombstone's payload: its nonce.
const TOMBSTONE_PAYLOAD_LEN: usize = 8;

/// Why stored bytes are not a readable envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Fewer bytes than a header.
    #[error("truncated envelope: {len} bytes")]
    Truncated {
        /// The number of bytes present.
        len: usize,
    },
    /// The bytes do not start with the magic number: not written by tierstack.
    #[error("not a tierstack envelope")]
    BadMagic,
    /// Written by a format version this build does not read.
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    /// Written with another codec than the reader's.
    #[error("envelope codec {found} differs from the reader's codec {expected}")]
    CodecMismatch {
        /// The codec id in the envelope.
        found: u8,
        /// The reader's codec id.
        expected: u8,
    },
    /// Flags this build does not understand (compression, encryption are reserved).
    #[error("unknown envelope flags {0:#04x}")]
    UnknownFlags(u8),
    /// The declared payload length does not match the bytes present.
    #[error("payload length {declared} does not match the {present} bytes present")]
    LengthMismatch {
        /// The declared length.
        declared: usize,
        /// The bytes actually present after the header.
        present: usize,
    },
    /// A tag section that is truncated or holds a tag that is not allowed.
    #[error("malformed tag section")]
    MalformedTags,
    /// A tombstone whose payload is not its 8-byte nonce.
    #[error("tombstone with a payload of {len} bytes instead of 8")]
    MalformedTombstone {
        /// The payload length.
        len: usize,
    },
    /// The payload is larger than the reader accepts.
    #[error("payload of {len} bytes exceeds the cap of {max}")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The cap.
        max: usize,
    },
}

impl From<EnvelopeError> for CacheError {
    fn from(err: EnvelopeError) -> Self {
        CacheError::serialization(err)
    }
}

/// The contents of a parsed envelope, borrowing the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Whether this is a cached "not found" (no payload).
    pub negative: bool,
    /// Whether this marks a deleted key (readers treat it as no entry; its payload is a nonce).
    pub tombstone: bool,
    /// When the value was written.
    pub written_at: Timestamp,
    /// When the value expires (leaves the store).
    pub expires_at: Timestamp,
    /// Until when the value is fresh: before [`expires_at`](Self::expires_at) for a fail-safe
    /// entry, which is stale in between; else equal to it.
    pub fresh_until: Timestamp,
    /// Whether this is a stale value written back after the origin failed.
    pub stale: bool,
    /// The codec's bytes.
    pub payload: &'a [u8],
    /// The tag section, checked, if the entry is tagged (see [`tags`](Self::tags)).
    tag_section: Option<&'a [u8]>,
}

impl<'a> Envelope<'a> {
    /// Parses `bytes` written with codec `C`, refusing payloads over `max_payload` bytes.
    pub fn parse<C: Codec>(bytes: &'a [u8], max_payload: usize) -> Result<Self, EnvelopeError> {
        let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(EnvelopeError::Truncated { len: bytes.len() });
        };
        if header[0..2] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        if header[2] != VERSION {
            return Err(EnvelopeError::UnknownVersion(header[2]));
        }
        if header[3] != C::ID {
            return Err(EnvelopeError::CodecMismatch {
                found: header[3],
                expected: C::ID,
            });
        }
        let flags = header[4];
        let both = FLAG_NEGATIVE | FLAG_TOMBSTONE;
        if flags & !KNOWN_FLAGS != 0 || flags & both == both {
            return Err(EnvelopeError::UnknownFlags(flags));
        }
        let tombstone = flags & FLAG_TOMBSTONE != 0;
        let written_at = read_u64(header, 5);
        let expires_at = read_u64(header, 13);
        let declared = read_u32(header, 21) as usize;
        let (fresh_until, payload) = if flags & FLAG_FRESH_UNTIL == 0 {
            (expires_at, payload)
        } else {
            let Some((field, payload)) = payload.split_first_chunk::<FRESH_UNTIL_LEN>() else {
                return Err(EnvelopeError::Truncated { len: bytes.len() });
            };
            (u64::from_le_bytes(*field), payload)
        };
        let (tag_section, payload) = if flags & FLAG_TAGS == 0 {
            (None, payload)
        } else {
            let Some((section, payload)) = TagStamps::split_section(payload) else {
                return Err(EnvelopeError::MalformedTags);
            };
            (Some(section), payload)
        };
        if declared != payload.len() {
            return Err(EnvelopeError::LengthMismatch {
                declared,
                present: payload.len(),
            });
        }
        if tombstone && (declared != TOMBSTONE_PAYLOAD_LEN || tag_section.is_some()) {
            return Err(EnvelopeError::MalformedTombstone { len: declared });
        }
        if declared > max_payload {
            return Err(EnvelopeError::TooLarge {
                len: declared,
                max: max_payload,
            });
        }
        Ok(Self {
            negative: flags & FLAG_NEGATIVE != 0,
            tombstone,
            written_at: Timestamp::from_millis(written_at),
            expires_at: Timestamp::from_millis(expires_at),
            fresh_until: Timestamp::from_millis(fresh_until.min(expires_at)),
            stale: flags & FLAG_STALE != 0,
            payload,
            tag_section,
        })
    }

    /// The entry's tags with the versions it was written under, if it is tagged.
    pub fn tags(&self) -> Option<TagStamps> {
        self.tag_section.map(TagStamps::read_section)
    }

    /// Reads only the expiry of an envelope, for stores that keep it beside the bytes.
    pub fn expires_at_of(bytes: &[u8]) -> Option<Timestamp> {
        let header = bytes.first_chunk::<HEADER_LEN>()?;
        (header[0..2] == MAGIC).then(|| Timestamp::from_millis(read_u64(header, EXPIRES_AT.start)))
    }
}

/// Encodes `value` (or a negative entry for `None`) with `codec` into an envelope.
///
/// Fails with [`CacheError::ValueTooLarge`] when the envelope would exceed `max_len` bytes.
pub fn encode<C: Codec, T: Serialize + ?Sized>(
    codec: &C,
    value: Option<&T>,
    written_at: Timestamp,
    expires_at: Timestamp,
    max_len: usize,
) -> Result<Bytes> {
    let lifetime = Lifetime {
        written_at,
        fresh_until: expires_at,
        expires_at,
        stale: false,
    };
    encode_entry(codec, value, lifetime, max_len)
}

/// When an entry was written, until when it is fresh, and when it leaves the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// When the value was written.
    pub written_at: Timestamp,
    /// Until when it is fresh (at most `expires_at`).
    pub fresh_until: Timestamp,
    /// When it leaves the store.
    pub expires_at: Timestamp,
    /// A stale value written back after the origin failed.
    pub stale: bool,
}

/// Encodes `value` (or a negative entry for `None`) with `codec` into an envelope with
/// `lifetime`. The fresh-until field is written only when it differs from the expiry or the value
/// is stale, so that entries without fail-safe keep the plain layout.
///
/// Fails with [`CacheError::ValueTooLarge`] when the envelope would exceed `max_len` bytes.
pub fn encode_entry<C: Codec, T: Serialize + ?Sized>(
    codec: &C,
    value: Option<&T>,
    lifetime: Lifetime,
    max_len: usize,
) -> Result<Bytes> {
    encode_tagged_entry(codec, value, lifetime, None, max_len)
}

/// [`encode_entry`] for an entry that carries `tags` (none if `None` or empty).
///
/// Fails with [`CacheError::ValueTooLarge`] when the envelope would exceed `max_len` bytes.
pub fn encode_tagged_entry<C: Codec, T: Serialize + ?Sized>(
    codec: &C,
    value: Option<&T>,
    lifetime: Lifetime,
    tags: Option<&TagStamps>,
    max_len: usize,
) -> Result<Bytes> {
    let tags = tags.filter(|tags| !tags.is_empty());
    let fresh_until = lifetime.fresh_until.min(lifetime.expires_at);
    let with_field = fresh_until != lifetime.expires_at || lifetime.stale;
    let mut flags = if value.is_none() { FLAG_NEGATIVE } else { 0 };
    if with_field {
        flags |= FLAG_FRESH_UNTIL;
    }
    if lifetime.stale {
        flags |= FLAG_STALE;
    }
    if tags.is_some() {
        flags |= FLAG_TAGS;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + FRESH_UNTIL_LEN + 64);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(C::ID);
    out.push(flags);
    out.extend_from_slice(&lifetime.written_at.as_millis().to_le_bytes());
    out.extend_from_slice(&lifetime.expires_at.as_millis().to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    if with_field {
        out.extend_from_slice(&fresh_until.as_millis().to_le_bytes());
    }
    if let Some(tags) = tags {
        tags.write_section(&mut out);
    }
    let payload_start = out.len();
    if let Some(value) = value {
        codec.encode_into(value, &mut out)?;
    }
    let max = max_len.min(HEADER_LEN + u32::MAX as usize);
    if out.len() > max {
        return Err(CacheError::ValueTooLarge {
            size: out.len(),
            max: max_len,
        });
    }
    let payload_len =
        u32::try_from(out.len() - payload_start).map_err(|_| CacheError::ValueTooLarge {
            size: out.len(),
            max: max_len,
        })?;
    out[21..25].copy_from_slice(&payload_len.to_le_bytes());
    Ok(Bytes::from(out))
}

/// Encodes a tombstone for a cache of codec `C`: the marker a delete leaves for `expires_at`.
/// `nonce` should differ between deletions (see [`tombstone_nonce`]).
pub fn encode_tombstone<C: Codec>(
    written_at: Timestamp,
    expires_at: Timestamp,
    nonce: u64,
) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + TOMBSTONE_PAYLOAD_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(C::ID);
    out.push(FLAG_TOMBSTONE);
    out.extend_from_slice(&written_at.as_millis().to_le_bytes());
    out.extend_from_slice(&expires_at.as_millis().to_le_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "a constant of 8")]
    out.extend_from_slice(&(TOMBSTONE_PAYLOAD_LEN as u32).to_le_bytes());
    out.extend_from_slice(&nonce.to_le_bytes());
    Bytes::from(out)
}

/// Whether `bytes` are a tombstone (of any codec). A store's
/// [`expire`](crate::Store::expire) checks it: a tombstone is no entry, and extending one would
/// keep a delete's marker alive as if it were a value.
pub fn is_tombstone(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN
        && bytes[0..2] == MAGIC
        && bytes[2] == VERSION
        && bytes[4] & FLAG_TOMBSTONE != 0
}

/// A number that differs between calls and between processes (a random per-process seed plus a
/// counter), for [`encode_tombstone`].
pub fn tombstone_nonce() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0u8));
    seed.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn read_u64(header: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&header[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn read_u32(header: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&header[at..at + 4]);
    u32::from_le_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{BincodeCodec, JsonCodec};

    type Bin = BincodeCodec;
    const MAX: usize = 1 << 20;

    fn sample() -> Bytes {
        encode(
            &Bin::default(),
            Some("hello"),
            Timestamp::from_millis(1_000),
            Timestamp::from_millis(61_000),
            MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let env = Envelope::parse::<Bin>(&bytes, MAX).unwrap_or_else(|e| panic!("{e}"));
        assert!(!env.negative);
        assert_eq!(env.written_at.as_millis(), 1_000);
        assert_eq!(env.expires_at.as_millis(), 61_000);
        let value: String = Bin::default()
            .decode(env.payload)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value, "hello");
        assert_eq!(Envelope::expires_at_of(&bytes), Some(env.expires_at));
    }

    #[test]
    fn fail_safe_entries_carry_when_they_stop_being_fresh() {
        let lifetime = Lifetime {
            written_at: Timestamp::from_millis(1_000),
            fresh_until: Timestamp::from_millis(11_000),
            expires_at: Timestamp::from_millis(61_000),
            stale: false,
        };
        let bytes = encode_entry(&Bin::default(), Some("hello"), lifetime, MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        let env = Envelope::parse::<Bin>(&bytes, MAX).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(env.fresh_until.as_millis(), 11_000);
        assert_eq!(env.expires_at.as_millis(), 61_000);
        assert!(!env.stale);
        let value: String = Bin::default()
            .decode(env.payload)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value, "hello");
        // The expiry stays where stores rewrite it.
        assert_eq!(Envelope::expires_at_of(&bytes), Some(env.expires_at));
        let stale = Lifetime {
            stale: true,
            ..lifetime
        };
        let bytes = encode_entry(&Bin::default(), Some("hello"), stale, MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(Envelope::parse::<Bin>(&bytes, MAX).is_ok_and(|env| env.stale));
    }

    #[test]
    fn plain_entries_are_fresh_until_they_expire_and_keep_their_layout() {
        let bytes = sample();
        assert_eq!(bytes.len(), HEADER_LEN + 6, "no fresh-until field");
        let env = Envelope::parse::<Bin>(&bytes, MAX).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(env.fresh_until, env.expires_at);
        assert!(!env.stale);
    }

    #[test]
    fn a_truncated_fresh_until_field_is_refused() {
        let lifetime = Lifetime {
            written_at: Timestamp::EPOCH,
            fresh_until: Timestamp::from_millis(5),
            expires_at: Timestamp::from_millis(10),
            stale: false,
        };
        let bytes = encode_entry::<Bin, str>(&Bin::default(), None, lifetime, MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        for cut in HEADER_LEN..bytes.len() {
            assert!(Envelope::parse::<Bin>(&bytes[..cut], MAX).is_err(), "{cut}");
        }
    }

    #[test]
    fn tagged_entries_carry_their_stamps_and_every_truncation_is_refused() {
        use crate::tag::{TagRecord, TagStamps, TagVersion};
        let tags = TagStamps::new(vec![
            ("user:7".into(), TagRecord::create().version()),
            (
                "org:2".into(),
                TagVersion {
                    incarnation: 5,
                    counter: 1,
                },
            ),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let lifetime = Lifetime {
            written_at: Timestamp::from_millis(1),
            fresh_until: Timestamp::from_millis(5),
            expires_at: Timestamp::from_millis(10),
            stale: false,
        };
        let bytes = encode_tagged_entry(&Bin::default(), Some("hello"), lifetime, Some(&tags), MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        let env = Envelope::parse::<Bin>(&bytes, MAX).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(env.tags(), Some(tags));
        assert_eq!(env.fresh_until.as_millis(), 5);
        let value: String = Bin::default()
            .decode(env.payload)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value, "hello");
        assert_eq!(Envelope::expires_at_of(&bytes), Some(env.expires_at));
        for cut in HEADER_LEN..bytes.len() {
            assert!(Envelope::parse::<Bin>(&bytes[..cut], MAX).is_err(), "{cut}");
        }
        assert_eq!(
            Envelope::parse::<Bin>(&sample(), MAX).map(|env| env.tags()),
            Ok(None)
        );
        let mut empty_tag = bytes.to_vec();
        // The first tag's length, after the header and the fresh-until field.
        empty_tag[HEADER_LEN + 9] = 0;
        assert!(Envelope::parse::<Bin>(&empty_tag, MAX).is_err());
    }

    #[test]
    fn negative_entries_have_no_payload() {
        let bytes = encode::<Bin, str>(
            &Bin::default(),
            None,
            Timestamp::EPOCH,
            Timestamp::from_millis(5),
            MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let env = Envelope::parse::<Bin>(&bytes, MAX).unwrap_or_else(|e| panic!("{e}"));
        assert!(env.negative);
        assert!(env.payload.is_empty());
    }

    #[test]
    fn tombstones_carry_distinct_nonces_and_no_value() {
        let (at, until) = (Timestamp::from_millis(1), Timestamp::from_millis(2));
        let first = encode_tombstone::<Bin>(at, until, tombstone_nonce());
        let second = encode_tombstone::<Bin>(at, until, tombstone_nonce());
        assert_ne!(first, second, "two deletions never write the same bytes");
        let env = Envelope::parse::<Bin>(&first, MAX).unwrap_or_else(|e| panic!("{e}"));
        assert!(env.tombstone && !env.negative);
        assert!(is_tombstone(&first) && !is_tombstone(&sample()) && !is_tombstone(b"TS"));
        assert_eq!(env.expires_at, until);
        assert!(
            !Envelope::parse::<Bin>(&sample(), MAX)
                .unwrap_or_else(|e| panic!("{e}"))
                .tombstone
        );
        let mut both = first.to_vec();
        both[4] = FLAG_NEGATIVE | FLAG_TOMBSTONE;
        assert_eq!(
            Envelope::parse::<Bin>(&both, MAX),
            Err(EnvelopeError::UnknownFlags(3))
        );
        let mut long = sample().to_vec();
        long[4] = FLAG_TOMBSTONE;
        assert!(
            Envelope::parse::<Bin>(&long, MAX).is_err(),
            "a tombstone holds only its nonce"
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(
                Envelope::parse::<Bin>(&bytes[..cut], MAX).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn foreign_bytes_are_refused() {
        let bytes = sample();
        assert_eq!(
            Envelope::parse::<Bin>(b"definitely not an envelope, but long", MAX),
            Err(EnvelopeError::BadMagic)
        );
        let mut wrong_version = bytes.to_vec();
        wrong_version[2] = 9;
        assert_eq!(
            Envelope::parse::<Bin>(&wrong_version, MAX),
            Err(EnvelopeError::UnknownVersion(9))
        );
        assert!(matches!(
            Envelope::parse::<JsonCodec>(&bytes, MAX),
            Err(EnvelopeError::CodecMismatch {
                found: 1,
                expected: 2
            })
        ));
        let mut wrong_flags = bytes.to_vec();
        wrong_flags[4] = 0b10_0000;
        assert_eq!(
            Envelope::parse::<Bin>(&wrong_flags, MAX),
            Err(EnvelopeError::UnknownFlags(0b10_0000))
        );
        let mut extra = bytes.to_vec();
        extra.push(0);
        assert!(matches!(
            Envelope::parse::<Bin>(&extra, MAX),
            Err(EnvelopeError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn a_huge_declared_length_is_refused_without_allocating() {
        let mut bytes = sample().to_vec();
        bytes[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Envelope::parse::<Bin>(&bytes, MAX),
            Err(EnvelopeError::LengthMismatch { .. })
        ));
        let big = encode(
            &Bin::default(),
            Some(&vec![7u8; 100]),
            Timestamp::EPOCH,
            Timestamp::EPOCH,
            MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            Envelope::parse::<Bin>(&big, 50),
            Err(EnvelopeError::TooLarge { max: 50, .. })
        ));
    }

    #[test]
    fn oversized_values_are_refused_at_encode() {
        let result = encode(
            &Bin::default(),
            Some(&vec![0u8; 1000]),
            Timestamp::EPOCH,
            Timestamp::EPOCH,
            500,
        );
        assert!(matches!(
            result,
            Err(CacheError::ValueTooLarge { max: 500, .. })
        ));
    }
}
