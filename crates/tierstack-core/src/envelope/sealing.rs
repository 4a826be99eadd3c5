//! Sealing: what a cache does to a payload between its codec and the L2. Compression first
//! (LZ4 blocks, above a size threshold), then authenticated encryption (XAES-256-GCM with a
//! [`KeyRing`]).
//!
//! What encryption authenticates and what it does not stop: see the [envelope](crate::envelope)
//! module.

use std::borrow::Cow;

use super::keys::KeyRing;
use super::xaes::{Sealer, TAG_LEN, XaesError};
use super::{EXPIRES_AT, EnvelopeError};

/// The id of LZ4 block compression in the envelope.
pub(super) const COMPRESSION_LZ4: u8 = 1;
/// The id of XAES-256-GCM in the envelope.
pub(super) const ENCRYPTION_XAES_256_GCM: u8 = 1;
/// The most an LZ4 block expands: a run costs one byte per 255 bytes of output.
const MAX_LZ4_RATIO: usize = 255;

/// The default size from which payloads are compressed: below it, LZ4 rarely saves enough to
/// pay for itself.
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 1024;

/// Compression of payloads of at least a threshold's size, with LZ4 (block format).
///
/// A payload that does not shrink is stored as it is. Reading never needs this setting: a
/// compressed entry says so, and any cache reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    threshold: usize,
}

impl Compression {
    /// LZ4 for payloads of at least [`DEFAULT_COMPRESSION_THRESHOLD`] bytes.
    pub fn lz4() -> Self {
        Self {
            threshold: DEFAULT_COMPRESSION_THRESHOLD,
        }
    }

    /// Compresses payloads of at least `bytes` bytes (0: every payload).
    #[must_use]
    pub fn min_size(self, bytes: usize) -> Self {
        Self { threshold: bytes }
    }

    /// The size from which payloads are compressed.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The compressed form of `raw`, if it is large enough to try and came out smaller.
    fn compress(self, raw: &[u8]) -> Option<Vec<u8>> {
        if raw.is_empty() || raw.len() < self.threshold {
            return None;
        }
        let mut out = vec![0; lz4_flex::block::get_maximum_output_size(raw.len())];
        let len = lz4_flex::block::compress_into(raw, &mut out).ok()?;
        out.truncate(len);
        (len < raw.len()).then_some(out)
    }
}

/// Authenticated encryption of every entry with a [`KeyRing`]'s current key.
///
/// By default a cache that encrypts refuses to read plaintext entries (they read as misses and
/// are replaced): someone with write access to the L2 but without the key cannot plant a new
/// value (see the [envelope](crate::envelope) module for what they can still do). While moving an existing cache to
/// encryption, [`accept_plaintext`](Self::accept_plaintext) reads the entries written before it.
#[derive(Debug, Clone)]
pub struct Encryption {
    ring: KeyRing,
    accept_plaintext: bool,
}

impl Encryption {
    /// Encrypts with `ring`'s current key, decrypts with any of its keys.
    pub fn new(ring: KeyRing) -> Self {
        Self {
            ring,
            accept_plaintext: false,
        }
    }

    /// Whether plaintext entries still read (for a migration; `false` by default).
    #[must_use]
    pub fn accept_plaintext(self, accept: bool) -> Self {
        Self {
            accept_plaintext: accept,
            ..self
        }
    }

    /// The key ring.
    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }
}

/// How a cache seals its payloads: compression, encryption, both or neither (the default).
#[derive(Debug, Clone, Default)]
pub struct Sealing {
    compression: Option<Compression>,
    encryption: Option<Encryption>,
}

impl Sealing {
    /// Neither compression nor encryption: payloads are the codec's bytes.
    pub fn none() -> Self {
        Self::default()
    }

    /// This sealing with `compression`.
    #[must_use]
    pub fn compression(self, compression: Compression) -> Self {
        Self {
            compression: Some(compression),
            ..self
        }
    }

    /// This sealing with `encryption`.
    #[must_use]
    pub fn encryption(self, encryption: Encryption) -> Self {
        Self {
            encryption: Some(encryption),
            ..self
        }
    }

    /// Whether payloads are written as the codec's bytes.
    pub fn is_plain(&self) -> bool {
        self.compression.is_none() && self.encryption.is_none()
    }

    /// The compression setting, if any.
    pub fn compression_setting(&self) -> Option<Compression> {
        self.compression
    }

    /// The encryption setting, if any.
    pub fn encryption_setting(&self) -> Option<&Encryption> {
        self.encryption.as_ref()
    }

    /// Whether this sealing vouches for `envelope`'s contents: it does not encrypt, or the entry
    /// is encrypted (and so authenticated once it opens). A plaintext entry that a cache which
    /// encrypts reads under [`Encryption::accept_plaintext`] may have been planted by anyone
    /// with write access to the L2: nothing built from it may be written back sealed, which
    /// would make it authentic.
    pub fn vouches_for(&self, envelope: &super::Envelope<'_>) -> bool {
        self.encryption.is_none() || envelope.is_encrypted()
    }

    /// The compressed form of `raw`, when this sealing compresses and it pays.
    pub(super) fn compress(&self, raw: &[u8]) -> Option<Vec<u8>> {
        self.compression.and_then(|c| c.compress(raw))
    }

    /// The current key's id and what one write encrypts with (a fresh nonce and its cipher),
    /// when this sealing encrypts.
    pub(super) fn sealer(&self) -> Result<Option<(u32, Sealer)>, EnvelopeError> {
        let Some(encryption) = &self.encryption else {
            return Ok(None);
        };
        let sealer = encryption
            .ring
            .current()
            .sealer()
            .map_err(EnvelopeError::from)?;
        Ok(Some((encryption.ring.current_id(), sealer)))
    }

    /// The codec's bytes of a parsed envelope read under `store_key`: decrypted and
    /// decompressed as its flags say, refusing plaintext when this sealing requires encryption,
    /// and a decompressed size over `max_payload` before allocating it.
    pub fn open<'a>(
        &self,
        envelope: &super::Envelope<'a>,
        store_key: &str,
        max_payload: usize,
    ) -> Result<Cow<'a, [u8]>, EnvelopeError> {
        let body: Cow<'a, [u8]> = match &envelope.encryption {
            Some(sealed) => {
                let Some(encryption) = &self.encryption else {
                    return Err(EnvelopeError::EncryptionNotConfigured);
                };
                let Some(key) = encryption.ring.get(sealed.key_id) else {
                    return Err(EnvelopeError::UnknownKey { id: sealed.key_id });
                };
                // Parsing checked that the payload holds a tag; `payload` is public, though.
                let (ciphertext, tag) = envelope
                    .payload
                    .split_last_chunk::<TAG_LEN>()
                    .ok_or(EnvelopeError::Unauthentic)?;
                let data = associated_data(store_key, envelope.authenticated);
                Cow::Owned(key.open(sealed.nonce, &data, ciphertext, tag)?)
            }
            None if self
                .encryption
                .as_ref()
                .is_some_and(|encryption| !encryption.accept_plaintext) =>
            {
                return Err(EnvelopeError::PlaintextRefused);
            }
            None => Cow::Borrowed(envelope.payload),
        };
        match envelope.compression {
            None => Ok(body),
            Some(raw_len) => decompress(&body, raw_len, max_payload).map(Cow::Owned),
        }
    }
}

/// Decompresses an LZ4 block that claims to expand to `raw_len` bytes: a claim over `max` is
/// refused before anything is allocated, and so is one that no block of this length can reach
/// (LZ4 expands at most 255 to 1); a block that expands to anything but its claim is an error
/// (the output buffer has exactly the claimed size, so it cannot grow past it).
///
/// Public for the fuzz body (`testkit::fuzz`); caches decompress through [`Sealing::open`].
#[doc(hidden)]
pub fn decompress(block: &[u8], raw_len: usize, max: usize) -> Result<Vec<u8>, EnvelopeError> {
    if raw_len > max {
        return Err(EnvelopeError::TooLarge { len: raw_len, max });
    }
    if raw_len > block.len().saturating_mul(MAX_LZ4_RATIO).saturating_add(16) {
        return Err(EnvelopeError::Decompression);
    }
    let mut out = vec![0; raw_len];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(len) if len == raw_len => Ok(out),
        _ => Err(EnvelopeError::Decompression),
    }
}

/// Encrypts `payload` in place with `sealer` and returns its tag. `authenticated` is the
/// envelope before the payload, complete.
pub(super) fn encrypt(
    sealer: Sealer,
    store_key: &str,
    authenticated: &[u8],
    payload: &mut [u8],
) -> Result<aes_gcm::Tag, EnvelopeError> {
    let data = associated_data(store_key, authenticated);
    Ok(sealer.seal(&data, payload)?)
}

impl From<XaesError> for EnvelopeError {
    fn from(err: XaesError) -> Self {
        match err {
            XaesError::NoRandomness => Self::NoRandomness,
            XaesError::Unauthentic => Self::Unauthentic,
        }
    }
}

/// The associated data of an encrypted entry: the store key (length first, so that no key and
/// header can spell another pair) and the envelope before the payload without the expiry.
fn associated_data(store_key: &str, authenticated: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(8 + store_key.len() + authenticated.len());
    data.extend_from_slice(&(store_key.len() as u64).to_le_bytes());
    data.extend_from_slice(store_key.as_bytes());
    data.extend_from_slice(&authenticated[..EXPIRES_AT.start]);
    data.extend_from_slice(&authenticated[EXPIRES_AT.end..]);
    data
}

#[cfg(test)]
mod tests {
    use super::super::{
        Envelope, HEADER_LEN, Lifetime, encode_sealed, encode_tagged_entry, encode_tombstone,
    };
    use super::*;
    use crate::clock::Timestamp;
    use crate::codec::{BincodeCodec, Codec, JsonCodec};
    use crate::envelope::keys::EncryptionKey;
    use crate::tag::{TagStamps, TagVersion};

    type Bin = BincodeCodec;
    const MAX: usize = 1 << 20;
    const KEY: &str = "users:42";

    fn key(byte: u8) -> EncryptionKey {
        EncryptionKey::from_bytes([byte; 32])
    }

    fn ring(current: u32) -> KeyRing {
        KeyRing::new(current, &key(u8::try_from(current).unwrap_or(0)))
    }

    fn lifetime() -> Lifetime {
        Lifetime {
            written_at: Timestamp::from_millis(1_000),
            fresh_until: Timestamp::from_millis(11_000),
            expires_at: Timestamp::from_millis(61_000),
            stale: false,
        }
    }

    /// A JSON-like value that compresses well.
    fn large_value() -> String {
        json_like(200)
    }

    fn json_like(records: usize) -> String {
        (0..records)
            .map(|i| format!("{{\"id\":{i},\"name\":\"user {i}\",\"active\":true}}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn combinations() -> Vec<(&'static str, Sealing)> {
        let both = Sealing::none()
            .compression(Compression::lz4().min_size(64))
            .encryption(Encryption::new(ring(1)));
        vec![
            ("plain", Sealing::none()),
            (
                "compressed",
                Sealing::none().compression(Compression::lz4().min_size(64)),
            ),
            (
                "encrypted",
                Sealing::none().encryption(Encryption::new(ring(1))),
            ),
            ("both", both),
        ]
    }

    fn seal(sealing: &Sealing, value: Option<&str>, store_key: &str) -> Vec<u8> {
        let tags = TagStamps::new(vec![(
            "org:2".into(),
            TagVersion {
                incarnation: 3,
                counter: 4,
            },
        )])
        .unwrap_or_else(|e| panic!("{e}"));
        encode_sealed(
            &Bin::default(),
            value,
            lifetime(),
            Some(&tags),
            sealing,
            store_key,
            MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .to_vec()
    }

    fn open(
        sealing: &Sealing,
        bytes: &[u8],
        store_key: &str,
    ) -> Result<Option<String>, EnvelopeError> {
        let envelope = Envelope::parse::<Bin>(bytes, MAX)?;
        let payload = sealing.open(&envelope, store_key, MAX)?;
        Ok((!envelope.negative).then(|| {
            Bin::default()
                .decode(&payload)
                .unwrap_or_else(|e| panic!("{e}"))
        }))
    }

    #[test]
    fn every_combination_round_trips_values_and_negative_entries() {
        let value = large_value();
        for (name, sealing) in combinations() {
            for written in [Some(value.as_str()), Some(""), None] {
                let bytes = seal(&sealing, written, KEY);
                let envelope =
                    Envelope::parse::<Bin>(&bytes, MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(envelope.fresh_until.as_millis(), 11_000, "{name}");
                assert!(envelope.tags().is_some(), "{name}");
                assert_eq!(
                    envelope.is_encrypted(),
                    name == "encrypted" || name == "both"
                );
                let compressed =
                    written == Some(value.as_str()) && name != "plain" && name != "encrypted";
                assert_eq!(envelope.uncompressed_len().is_some(), compressed, "{name}");
                assert_eq!(bytes[2], if envelope.is_sealed() { 2 } else { 1 }, "{name}");
                assert_eq!(
                    open(&sealing, &bytes, KEY).unwrap_or_else(|e| panic!("{name}: {e}")),
                    written.map(str::to_owned),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn plain_sealing_writes_the_version_1_bytes_of_earlier_releases() {
        let plain = seal(&Sealing::none(), Some("hello"), KEY);
        let tags = Envelope::parse::<Bin>(&plain, MAX)
            .ok()
            .and_then(|e| e.tags());
        let earlier = encode_tagged_entry(
            &Bin::default(),
            Some("hello"),
            lifetime(),
            tags.as_ref(),
            MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain, earlier.to_vec());
        // Compression that does not pay, or a value under the threshold, stays version 1 too.
        let small = Sealing::none().compression(Compression::lz4());
        assert_eq!(seal(&small, Some("hello"), KEY), plain);
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let random: String = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'!' + u8::try_from(state % 94).unwrap_or(0))
            })
            .collect();
        let incompressible = seal(
            &Sealing::none().compression(Compression::lz4().min_size(0)),
            Some(&random),
            KEY,
        );
        assert_eq!(incompressible[2], 1);
    }

    #[test]
    fn compression_shrinks_a_json_like_value() {
        let value = large_value();
        let plain = seal(&Sealing::none(), Some(&value), KEY);
        let compressed = seal(
            &Sealing::none().compression(Compression::lz4()),
            Some(&value),
            KEY,
        );
        assert!(
            compressed.len() * 3 < plain.len(),
            "{} vs {}",
            compressed.len(),
            plain.len()
        );
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_allocating() {
        // 1 GiB of zeros compresses to about 4 MB; a block that claims it is refused by its
        // claim, and one that claims less than it expands to fails without growing.
        let zeros = vec![0u8; 1 << 20];
        let block = lz4_flex::block::compress(&zeros);
        assert_eq!(
            decompress(&block, 1 << 30, MAX),
            Err(EnvelopeError::TooLarge {
                len: 1 << 30,
                max: MAX
            })
        );
        assert_eq!(
            decompress(&block, 1000, MAX),
            Err(EnvelopeError::Decompression)
        );
        assert_eq!(
            decompress(&block, (1 << 20) - 1, MAX),
            Err(EnvelopeError::Decompression)
        );
        assert_eq!(
            decompress(&block, 1 << 20, MAX).map(|out| out.len()),
            Ok(1 << 20)
        );
        assert_eq!(
            decompress(b"\xff\xff\xff", 10, MAX),
            Err(EnvelopeError::Decompression)
        );
        // A tiny block that claims the whole cap is refused before the cap is allocated.
        assert_eq!(
            decompress(&[0x1f, 0], MAX, MAX),
            Err(EnvelopeError::Decompression)
        );
        // The same through an envelope: its claimed length rewritten to 4 GiB - 1.
        let sealing = Sealing::none().compression(Compression::lz4());
        let mut bytes = seal(&sealing, Some(&large_value()), KEY);
        let field =
            bytes.len() - Envelope::parse::<Bin>(&bytes, MAX).map_or(0, |e| e.payload.len()) - 4;
        bytes[field..field + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            open(&sealing, &bytes, KEY),
            Err(EnvelopeError::TooLarge { .. })
        ));
    }

    #[test]
    fn rotation_reads_old_and_new_entries_until_the_old_key_is_removed() {
        let one = Sealing::none().encryption(Encryption::new(KeyRing::new(1, &key(1))));
        let old = seal(&one, Some("old"), KEY);
        // Step 1: key 2 added, decrypting only; step 2: key 2 current.
        let added = KeyRing::new(1, &key(1))
            .with_old_key(2, &key(2))
            .unwrap_or_else(|e| panic!("{e}"));
        let rotated = KeyRing::new(2, &key(2))
            .with_old_key(1, &key(1))
            .unwrap_or_else(|e| panic!("{e}"));
        let two = Sealing::none().encryption(Encryption::new(rotated));
        let new = seal(&two, Some("new"), KEY);
        assert_eq!(
            Envelope::parse::<Bin>(&new, MAX)
                .ok()
                .and_then(|e| e.key_id()),
            Some(2)
        );
        let added = Sealing::none().encryption(Encryption::new(added));
        for reader in [&added, &two] {
            assert_eq!(open(reader, &old, KEY), Ok(Some("old".into())));
            assert_eq!(open(reader, &new, KEY), Ok(Some("new".into())));
        }
        // Step 3: key 1 removed: its entries read as misses.
        let removed = Sealing::none().encryption(Encryption::new(KeyRing::new(2, &key(2))));
        assert_eq!(
            open(&removed, &old, KEY),
            Err(EnvelopeError::UnknownKey { id: 1 })
        );
        assert_eq!(open(&removed, &new, KEY), Ok(Some("new".into())));
        // A key under the same id with other bytes does not authenticate.
        let impostor = Sealing::none().encryption(Encryption::new(KeyRing::new(2, &key(9))));
        assert_eq!(open(&impostor, &new, KEY), Err(EnvelopeError::Unauthentic));
    }

    #[test]
    fn a_ciphertext_copied_under_another_key_namespace_or_tenant_does_not_decrypt() {
        let sealing = Sealing::none().encryption(Encryption::new(ring(1)));
        let bytes = seal(&sealing, Some("secret"), "users:42");
        for other in [
            "users:43",
            "admins:42",
            "tenant-b:users:42",
            "users:42 ",
            "",
        ] {
            assert_eq!(
                open(&sealing, &bytes, other),
                Err(EnvelopeError::Unauthentic),
                "{other}"
            );
        }
        // Two entries' ciphertexts swapped between their keys.
        let other = seal(&sealing, Some("other"), "users:43");
        assert_eq!(
            open(&sealing, &other, "users:42"),
            Err(EnvelopeError::Unauthentic)
        );
        // The same value twice: a fresh nonce each time.
        assert_ne!(seal(&sealing, Some("secret"), "users:42"), bytes);
    }

    #[test]
    fn a_bit_flip_anywhere_but_in_the_expiry_fails_to_open() {
        // Large enough to compress, small enough for every flip to run in a debug build.
        let value = json_like(6);
        for (name, sealing) in combinations().into_iter().skip(2) {
            let bytes = seal(&sealing, Some(&value), KEY);
            assert!(Envelope::parse::<Bin>(&bytes, MAX).is_ok_and(|e| e.is_sealed()));
            for position in 0..bytes.len() {
                for bit in 0..8 {
                    let mut flipped = bytes.clone();
                    flipped[position] ^= 1 << bit;
                    let result = open(&sealing, &flipped, KEY);
                    if (13..21).contains(&position) {
                        // Stores rewrite the expiry: it is not authenticated.
                        assert_eq!(result, Ok(Some(value.clone())), "{name} {position}");
                    } else {
                        assert!(result.is_err(), "{name}: flip at {position}.{bit} opened");
                    }
                }
            }
            for cut in 0..bytes.len() {
                assert!(
                    open(&sealing, &bytes[..cut], KEY).is_err(),
                    "{name}: cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn encryption_requires_encrypted_entries_unless_migrating() {
        let plain = seal(&Sealing::none(), Some("planted"), KEY);
        let negative = seal(&Sealing::none(), None, KEY);
        let strict = Sealing::none().encryption(Encryption::new(ring(1)));
        assert_eq!(
            open(&strict, &plain, KEY),
            Err(EnvelopeError::PlaintextRefused)
        );
        assert_eq!(
            open(&strict, &negative, KEY),
            Err(EnvelopeError::PlaintextRefused)
        );
        let migrating = Sealing::none().encryption(Encryption::new(ring(1)).accept_plaintext(true));
        assert_eq!(open(&migrating, &plain, KEY), Ok(Some("planted".into())));
        // A cache without a ring cannot read encrypted entries; any cache reads compressed ones.
        let encrypted = seal(&strict, Some("x"), KEY);
        assert_eq!(
            open(&Sealing::none(), &encrypted, KEY),
            Err(EnvelopeError::EncryptionNotConfigured)
        );
        let compressed = seal(
            &Sealing::none().compression(Compression::lz4()),
            Some(&large_value()),
            KEY,
        );
        assert_eq!(
            open(&Sealing::none(), &compressed, KEY),
            Ok(Some(large_value()))
        );
    }

    #[test]
    fn sealed_envelopes_are_refused_where_they_cannot_be() {
        let sealing = Sealing::none().encryption(Encryption::new(ring(1)));
        let bytes = seal(&sealing, Some("x"), KEY);
        // Version 1 does not know the sealing flags.
        let mut old_version = bytes.clone();
        old_version[2] = 1;
        assert!(matches!(
            Envelope::parse::<Bin>(&old_version, MAX),
            Err(EnvelopeError::UnknownFlags(_))
        ));
        // Another codec, an unknown algorithm, a tombstone with a sealing flag.
        assert!(Envelope::parse::<JsonCodec>(&bytes, MAX).is_err());
        let algorithm_at = bytes.len()
            - Envelope::parse::<Bin>(&bytes, MAX).map_or(0, |e| e.payload.len())
            - ENCRYPTION_FIELD;
        let mut unknown = bytes.clone();
        unknown[algorithm_at] = 9;
        assert_eq!(
            Envelope::parse::<Bin>(&unknown, MAX).map(|_| ()),
            Err(EnvelopeError::MalformedSealing)
        );
        let mut tombstone = encode_tombstone::<Bin>(Timestamp::EPOCH, Timestamp::EPOCH, 1).to_vec();
        tombstone[2] = 2;
        tombstone[4] |= 0b0100_0000;
        assert!(Envelope::parse::<Bin>(&tombstone, MAX).is_err());
        assert!(HEADER_LEN < bytes.len());
    }

    #[test]
    fn values_too_large_before_compression_are_refused_at_encode() {
        let sealing = Sealing::none().compression(Compression::lz4());
        let value = "a".repeat(10_000);
        let result = encode_sealed(
            &Bin::default(),
            Some(&value),
            lifetime(),
            None,
            &sealing,
            KEY,
            5_000,
        );
        assert!(matches!(
            result,
            Err(crate::CacheError::ValueTooLarge { max: 5_000, .. })
        ));
    }

    const ENCRYPTION_FIELD: usize = 29;
}
