//! The versioned envelope around every value written to an L2.
//!
//! Layout (integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 2 | magic `TS` |
//! | 1 | format version: 1, or 2 for a sealed (compressed or encrypted) entry |
//! | 1 | codec id ([`Codec::ID`]) |
//! | 1 | flags: bit 0 = negative entry (a cached "not found"); bit 1 = tombstone; bit 2 = fresh-until field present; bit 3 = stale; bit 4 = tags present; bit 5 = compressed (version 2); bit 6 = encrypted (version 2); bit 7 reserved |
//! | 8 | written at, ms since the Unix epoch |
//! | 8 | expires at, ms since the Unix epoch |
//! | 4 | payload length |
//! | 8 | fresh until, ms since the Unix epoch (only with flag bit 2) |
//! | t | tags (only with flag bit 4): a count (1 to 16), then per tag its length (1 byte), its UTF-8 bytes, and the incarnation and counter of its record (8 bytes each) |
//! | 5 | compression (only with flag bit 5): the algorithm (1 = LZ4 block), then the payload's length before compression (4 bytes) |
//! | 29 | encryption (only with flag bit 6): the algorithm (1 = XAES-256-GCM), the key's id in the ring (4 bytes), the nonce (24 bytes) |
//! | n | payload: the codec's bytes, compressed if flag bit 5, then encrypted if flag bit 6 (the ciphertext followed by its 16-byte tag) |
//!
//! Version 2 is version 1 with the two sealing flags and their fields. An entry that is neither
//! compressed nor encrypted is still written as version 1, byte for byte as before, so that
//! instances of an earlier release keep reading it during a rolling upgrade. See [`Sealing`] for
//! what encryption authenticates.
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
//! # Encryption
//!
//! Encryption authenticates, beside the payload, the store key the entry was written under and
//! every byte of the envelope before the payload except the expiry (which stores rewrite when
//! they change a time to live): a ciphertext copied under another key, namespace or tenant, or
//! given other flags, tags, a write time or a fresh-until, does not decrypt.
//!
//! What it does not stop, by design of a cache without state of its own: someone who can write
//! to the L2 can put back an earlier ciphertext of the *same* key (a replay, also over a
//! delete's tombstone, which carries no secret and is not encrypted), extend an entry's expiry,
//! delete entries, or wind a tag's record back (records are not encrypted) to revive the
//! entries its tag invalidated. What stays readable in the L2: the key, the tag names, the
//! timestamps, whether an entry is a cached "not found", the key id and the payload's length
//! (with compression, both lengths: do not compress values that mix secrets with text an
//! attacker chooses, as compression then leaks through length). Two applications that share a
//! key ring and a Redis under different key prefixes can read each other's entries under the
//! same namespaced key: give each its own ring.
//!
//! # Parsing
//!
//! Parsing checks every field before it touches the payload: bytes that are truncated, of another
//! version or codec, carry unknown flags, or claim a payload over the cap are an [`EnvelopeError`]
//! (which readers treat as a miss), never a panic and never an allocation.
//! [`Sealing::open`] then decrypts and decompresses, refusing a decompressed size over the cap
//! before it allocates.

mod keys;
mod sealing;
mod xaes;

pub use keys::{EncryptionKey, KEY_LEN, KeyRing, MAX_KEYS};
pub use sealing::{Compression, DEFAULT_COMPRESSION_THRESHOLD, Encryption, Sealing, decompress};

use bytes::Bytes;
use serde::Serialize;

use crate::clock::Timestamp;
use crate::codec::Codec;
use crate::error::{CacheError, Result};
use crate::tag::TagStamps;

/// The first two bytes of every envelope.
pub const MAGIC: [u8; 2] = *b"TS";
/// The version of plain entries (and of tombstones).
const VERSION: u8 = 1;
/// The version of sealed entries: version 1 with the compression and encryption fields.
const VERSION_SEALED: u8 = 2;
/// The size of the envelope header in bytes.
pub const HEADER_LEN: usize = 25;
/// Where the expiry (ms since the Unix epoch, 8 bytes little-endian) sits in the header: a store
/// that changes an entry's time to live rewrites it there, so that readers can take the
/// remaining time from the bytes.
pub const EXPIRES_AT: std::ops::Range<usize> = 13..21;
/// Where the write time (ms since the Unix epoch, 8 bytes little-endian) sits in the header: a
/// store that takes back a late write stamps its tombstone's time there (see
/// [`tombstone_in_place_of`]).
pub const WRITTEN_AT: std::ops::Range<usize> = 5..13;

const FLAG_NEGATIVE: u8 = 0b0000_0001;
const FLAG_TOMBSTONE: u8 = 0b0000_0010;
const FLAG_FRESH_UNTIL: u8 = 0b0000_0100;
const FLAG_STALE: u8 = 0b0000_1000;
const FLAG_TAGS: u8 = 0b0001_0000;
const FLAG_COMPRESSED: u8 = 0b0010_0000;
const FLAG_ENCRYPTED: u8 = 0b0100_0000;
const PLAIN_FLAGS: u8 = FLAG_NEGATIVE | FLAG_TOMBSTONE | FLAG_FRESH_UNTIL | FLAG_STALE | FLAG_TAGS;
const SEALING_FLAGS: u8 = FLAG_COMPRESSED | FLAG_ENCRYPTED;
/// The length of the compression field: the algorithm and the length before compression.
const COMPRESSION_LEN: usize = 5;
/// The length of the encryption field: the algorithm, the key id and the nonce.
const ENCRYPTION_LEN: usize = 1 + 4 + xaes::NONCE_LEN;
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
    /// Flags this build does not understand (or sealing flags in a version 1 envelope).
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
    /// The payload (stored, or claimed after decompression) is larger than the reader accepts.
    #[error("payload of {len} bytes exceeds the cap of {max}")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A compression or encryption field that is truncated or names an unknown algorithm.
    #[error("malformed compression or encryption field")]
    MalformedSealing,
    /// A compressed payload that is corrupt or does not expand to its declared length.
    #[error("the compressed payload does not decompress to its declared length")]
    Decompression,
    /// Encrypted with a key this reader's ring does not hold (removed, or never added here).
    #[error("encrypted with key id {id}, which the key ring does not hold")]
    UnknownKey {
        /// The key id in the envelope.
        id: u32,
    },
    /// The ciphertext did not authenticate: tampered, truncated, or copied from another key.
    #[error("the encrypted payload does not authenticate under this key")]
    Unauthentic,
    /// An encrypted entry read by a cache that does not encrypt.
    #[error("an encrypted entry, and no key ring to open it")]
    EncryptionNotConfigured,
    /// A plaintext entry read by a cache that requires encryption.
    #[error("a plaintext entry where encryption is required")]
    PlaintextRefused,
    /// The system's random number generator failed (no nonce could be drawn).
    #[error("no randomness for a nonce")]
    NoRandomness,
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
    /// The stored payload: the codec's bytes only if the entry is not sealed. Check
    /// [`is_sealed`](Self::is_sealed), or read every entry through [`Sealing::open`], which
    /// gives the codec's bytes of both.
    pub payload: &'a [u8],
    /// The tag section, checked, if the entry is tagged (see [`tags`](Self::tags)).
    tag_section: Option<&'a [u8]>,
    /// The payload's length before compression, if it is compressed.
    compression: Option<usize>,
    /// The key id and nonce, if the payload is encrypted.
    encryption: Option<Sealed<'a>>,
    /// Every byte before the payload (what encryption authenticates, less the expiry).
    authenticated: &'a [u8],
}

/// The encryption field of a parsed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sealed<'a> {
    key_id: u32,
    nonce: &'a [u8; xaes::NONCE_LEN],
}

impl<'a> Envelope<'a> {
    /// Parses `bytes` written with codec `C`, refusing payloads over `max_payload` bytes.
    pub fn parse<C: Codec>(bytes: &'a [u8], max_payload: usize) -> Result<Self, EnvelopeError> {
        Self::parse_as(bytes, C::ID, max_payload)
    }

    /// [`parse`](Self::parse) for the codec whose id is `codec`.
    fn parse_as(bytes: &'a [u8], codec: u8, max_payload: usize) -> Result<Self, EnvelopeError> {
        let Some((header, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(EnvelopeError::Truncated { len: bytes.len() });
        };
        if header[0..2] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        let known_flags = match header[2] {
            VERSION => PLAIN_FLAGS,
            VERSION_SEALED => PLAIN_FLAGS | SEALING_FLAGS,
            other => return Err(EnvelopeError::UnknownVersion(other)),
        };
        if header[3] != codec {
            return Err(EnvelopeError::CodecMismatch {
                found: header[3],
                expected: codec,
            });
        }
        let flags = header[4];
        let both = FLAG_NEGATIVE | FLAG_TOMBSTONE;
        if flags & !known_flags != 0 || flags & both == both {
            return Err(EnvelopeError::UnknownFlags(flags));
        }
        let tombstone = flags & FLAG_TOMBSTONE != 0;
        let written_at = read_u64(header, WRITTEN_AT.start);
        let expires_at = read_u64(header, EXPIRES_AT.start);
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
        let (compression, encryption, payload) = split_sealing_fields(flags, payload)?;
        if declared != payload.len() {
            return Err(EnvelopeError::LengthMismatch {
                declared,
                present: payload.len(),
            });
        }
        if tombstone
            && (declared != TOMBSTONE_PAYLOAD_LEN
                || tag_section.is_some()
                || flags & SEALING_FLAGS != 0)
        {
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
            compression,
            encryption,
            authenticated: &bytes[..bytes.len() - payload.len()],
        })
    }

    /// Whether the payload is compressed or encrypted: [`Sealing::open`] gives the codec's
    /// bytes.
    pub fn is_sealed(&self) -> bool {
        self.compression.is_some() || self.encryption.is_some()
    }

    /// Whether the payload is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// The id of the key that encrypted the payload, if it is encrypted.
    pub fn key_id(&self) -> Option<u32> {
        self.encryption.map(|sealed| sealed.key_id)
    }

    /// The payload's length before compression, if it is compressed.
    pub fn uncompressed_len(&self) -> Option<usize> {
        self.compression
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

    /// Reads only the write time of an envelope (a value's or a tombstone's).
    pub fn written_at_of(bytes: &[u8]) -> Option<Timestamp> {
        let header = bytes.first_chunk::<HEADER_LEN>()?;
        (header[0..2] == MAGIC).then(|| Timestamp::from_millis(read_u64(header, WRITTEN_AT.start)))
    }
}

/// Splits the compression and encryption fields that `flags` announce off the front of `rest`.
#[expect(clippy::type_complexity, reason = "a private helper of parse")]
fn split_sealing_fields(
    flags: u8,
    rest: &[u8],
) -> Result<(Option<usize>, Option<Sealed<'_>>, &[u8]), EnvelopeError> {
    let (compression, rest) = if flags & FLAG_COMPRESSED == 0 {
        (None, rest)
    } else {
        let Some(([sealing::COMPRESSION_LZ4, len @ ..], rest)) =
            rest.split_first_chunk::<COMPRESSION_LEN>()
        else {
            return Err(EnvelopeError::MalformedSealing);
        };
        (Some(u32::from_le_bytes(*len) as usize), rest)
    };
    let (encryption, rest) = if flags & FLAG_ENCRYPTED == 0 {
        (None, rest)
    } else {
        let Some((field, rest)) = rest.split_first_chunk::<ENCRYPTION_LEN>() else {
            return Err(EnvelopeError::MalformedSealing);
        };
        let (algorithm, id_and_nonce) = field.split_at(1);
        let (key_id, nonce) = id_and_nonce.split_at(4);
        let (Ok(key_id), Ok(nonce)) = (<[u8; 4]>::try_from(key_id), nonce.try_into()) else {
            return Err(EnvelopeError::MalformedSealing);
        };
        if algorithm[0] != sealing::ENCRYPTION_XAES_256_GCM || rest.len() < xaes::TAG_LEN {
            return Err(EnvelopeError::MalformedSealing);
        }
        let sealed = Sealed {
            key_id: u32::from_le_bytes(key_id),
            nonce,
        };
        (Some(sealed), rest)
    };
    Ok((compression, encryption, rest))
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
    encode_entry(
        codec,
        value,
        Lifetime::plain(written_at, expires_at),
        max_len,
    )
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

impl Lifetime {
    /// An entry written at `written_at`, fresh until it expires at `expires_at` (no fail-safe).
    pub fn plain(written_at: Timestamp, expires_at: Timestamp) -> Self {
        Self {
            written_at,
            fresh_until: expires_at,
            expires_at,
            stale: false,
        }
    }
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
    encode_sealed(codec, value, lifetime, tags, &Sealing::none(), "", max_len)
}

/// [`encode_tagged_entry`] sealed by `sealing` for the store key `store_key` (which encryption
/// authenticates: the entry decrypts under this key only).
///
/// Fails with [`CacheError::ValueTooLarge`] when the envelope, sealed or not, would exceed
/// `max_len` bytes: compression does not raise the limit, so that every reader can hold what it
/// decompresses.
pub fn encode_sealed<C: Codec, T: Serialize + ?Sized>(
    codec: &C,
    value: Option<&T>,
    lifetime: Lifetime,
    tags: Option<&TagStamps>,
    sealing: &Sealing,
    store_key: &str,
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
    if sealing.is_plain() {
        if let Some(value) = value {
            codec.encode_into(value, &mut out)?;
        }
        set_payload_len(&mut out, payload_start, max_len)?;
        return Ok(Bytes::from(out));
    }
    let mut raw = Vec::new();
    if let Some(value) = value {
        codec.encode_into(value, &mut raw)?;
    }
    check_len(payload_start + raw.len(), max_len)?;
    let compressed = sealing.compress(&raw);
    if compressed.is_some() {
        out[4] |= FLAG_COMPRESSED;
        out.push(sealing::COMPRESSION_LZ4);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "checked against max_len above"
        )]
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    }
    let body = compressed.unwrap_or(raw);
    let encryption = sealing.sealer().map_err(CacheError::from)?;
    let tag_len = if encryption.is_some() {
        xaes::TAG_LEN
    } else {
        0
    };
    if let Some((key_id, sealer)) = &encryption {
        out[4] |= FLAG_ENCRYPTED;
        out.push(sealing::ENCRYPTION_XAES_256_GCM);
        out.extend_from_slice(&key_id.to_le_bytes());
        out.extend_from_slice(sealer.nonce());
    }
    if out[4] & SEALING_FLAGS != 0 {
        out[2] = VERSION_SEALED;
    }
    let sealed_start = out.len();
    check_len(sealed_start + body.len() + tag_len, max_len)?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "checked against max_len above"
    )]
    let payload_len = (body.len() + tag_len) as u32;
    out[21..25].copy_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&body);
    let Some((_, sealer)) = encryption else {
        return Ok(Bytes::from(out));
    };
    let (authenticated, payload) = out.split_at_mut(sealed_start);
    let tag =
        sealing::encrypt(sealer, store_key, authenticated, payload).map_err(CacheError::from)?;
    out.extend_from_slice(tag.as_slice());
    Ok(Bytes::from(out))
}

/// Refuses an envelope of `len` bytes over `max_len` (or over what the length field holds).
fn check_len(len: usize, max_len: usize) -> Result<()> {
    if len > max_len.min(HEADER_LEN + u32::MAX as usize) {
        return Err(CacheError::ValueTooLarge {
            size: len,
            max: max_len,
        });
    }
    Ok(())
}

/// Checks the plain envelope in `out` against `max_len` and writes its payload length.
fn set_payload_len(out: &mut [u8], payload_start: usize, max_len: usize) -> Result<()> {
    check_len(out.len(), max_len)?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "checked against max_len above"
    )]
    let payload_len = (out.len() - payload_start) as u32;
    out[21..25].copy_from_slice(&payload_len.to_le_bytes());
    Ok(())
}

/// Encodes a tombstone for a cache of codec `C`: the marker a delete leaves for `expires_at`.
/// `nonce` should differ between deletions (see [`tombstone_nonce`]).
pub fn encode_tombstone<C: Codec>(
    written_at: Timestamp,
    expires_at: Timestamp,
    nonce: u64,
) -> Bytes {
    tombstone_of_codec(C::ID, written_at, expires_at, nonce)
}

/// [`encode_tombstone`] for the codec whose id is `codec`.
fn tombstone_of_codec(
    codec: u8,
    written_at: Timestamp,
    expires_at: Timestamp,
    nonce: u64,
) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + TOMBSTONE_PAYLOAD_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(codec);
    out.push(FLAG_TOMBSTONE);
    out.extend_from_slice(&written_at.as_millis().to_le_bytes());
    out.extend_from_slice(&expires_at.as_millis().to_le_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "a constant of 8")]
    out.extend_from_slice(&(TOMBSTONE_PAYLOAD_LEN as u32).to_le_bytes());
    out.extend_from_slice(&nonce.to_le_bytes());
    Bytes::from(out)
}

/// A tombstone to leave in place of the envelope `bytes` (of a value, or itself a tombstone):
/// of the same codec, with their expiry in its header (the store chooses how long it keeps the
/// tombstone itself), a fresh nonce and their write time. `None`
/// if `bytes` are not a whole, well-formed envelope (of any codec): bytes that only begin like
/// one are no cache entry.
///
/// A store that takes back a write which landed late writes this over it, with the time of the
/// take-back at [`WRITTEN_AT`]: a replay of a write kept before then sees a newer delete rather
/// than the late value (which may hide a later write) or an empty key.
pub fn tombstone_in_place_of(bytes: &[u8]) -> Option<Bytes> {
    let codec = *bytes.get(3)?;
    let envelope = Envelope::parse_as(bytes, codec, usize::MAX).ok()?;
    Some(tombstone_of_codec(
        codec,
        envelope.written_at,
        envelope.expires_at,
        tombstone_nonce(),
    ))
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
    fn a_tombstone_in_place_of_a_value_keeps_its_codec_times_and_expiry() {
        let tombstone = tombstone_in_place_of(&sample()).unwrap_or_else(|| panic!("an envelope"));
        let env = Envelope::parse::<Bin>(&tombstone, MAX).unwrap_or_else(|e| panic!("{e}"));
        assert!(env.tombstone);
        assert_eq!(env.written_at.as_millis(), 1_000);
        assert_eq!(env.expires_at.as_millis(), 61_000);
        // A JSON cache does not read it as one of its own.
        assert!(Envelope::parse::<JsonCodec>(&tombstone, MAX).is_err());
        let again = tombstone_in_place_of(&sample()).unwrap_or_else(|| panic!("an envelope"));
        assert_ne!(tombstone, again, "each carries a nonce of its own");
        assert!(tombstone_in_place_of(b"plain bytes, no envelope of any kind").is_none());
        assert!(tombstone_in_place_of(&sample()[..HEADER_LEN - 1]).is_none());
        // Bytes that only begin like an envelope are no cache entry.
        let mut foreign = sample().to_vec();
        foreign.push(0);
        assert!(tombstone_in_place_of(&foreign).is_none());
        let json = encode(
            &JsonCodec,
            Some("hello"),
            Timestamp::from_millis(1_000),
            Timestamp::from_millis(61_000),
            MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let of_json = tombstone_in_place_of(&json).unwrap_or_else(|| panic!("an envelope"));
        assert!(Envelope::parse::<JsonCodec>(&of_json, MAX).is_ok_and(|env| env.tombstone));
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
