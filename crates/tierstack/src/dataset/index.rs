//! A dataset's index: every key it holds, with a fingerprint of its value and when the value
//! was last written. The refresher compares a new `fetch_all` with it (what changed, what was
//! removed) and stores it beside the entries, so that whichever instance refreshes next starts
//! from it, and the others report from it.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope::{self, Envelope, Lifetime, Sealing};
use tierstack_core::{BincodeCodec, Codec, Result};

/// The largest index stored or read (about 300,000 keys of 32 bytes). A store may hold less in
/// one entry: a Firestore document holds 1 MiB.
pub(super) const MAX_INDEX_LEN: usize = 16 << 20;

/// What the index knows of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Stamp {
    /// The value's version (the user's) or a 128-bit hash of its encoding.
    pub(super) fingerprint: u128,
    /// When the entry was last written to the cache, in the refresher's clock.
    pub(super) written_at: u64,
}

/// The index of a dataset, as the last refresh left it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Index {
    /// How many refreshes made it: one more each time.
    pub(super) generation: u64,
    /// When the refresh that made it ended (milliseconds since the epoch).
    pub(super) refreshed_at: u64,
    /// How long that refresh took (milliseconds).
    pub(super) took: u64,
    /// How many entries it wrote because they changed (or were new), and how many it removed.
    pub(super) changed: u64,
    pub(super) removed: u64,
    pub(super) entries: HashMap<String, Stamp>,
}

impl Index {
    /// The index as stored under `store_key`: in the cache's envelope (so that a format change
    /// is detected), sealed as the cache seals its entries (it holds every key and a
    /// fingerprint of every value), living `lives`.
    pub(super) fn encode(
        &self,
        sealing: &Sealing,
        store_key: &str,
        now: Timestamp,
        lives: Duration,
    ) -> Result<Bytes> {
        envelope::encode_sealed(
            &BincodeCodec::default(),
            Some(self),
            Lifetime::plain(now, now.saturating_add(lives)),
            None,
            sealing,
            store_key,
            MAX_INDEX_LEN,
        )
    }

    /// An index read back from `store_key`; `None` for anything that is not one, or does not
    /// open as `sealing` reads (a format this version does not read, or an index planted
    /// without the key, is rebuilt by the next refresh). A cache that encrypts reads no
    /// plaintext index, even while it accepts plaintext entries: the next refresh would write
    /// its stamps back encrypted, making what anyone could have planted authentic.
    pub(super) fn decode(sealing: &Sealing, store_key: &str, bytes: &[u8]) -> Option<Self> {
        let envelope = Envelope::parse::<BincodeCodec>(bytes, MAX_INDEX_LEN).ok()?;
        if envelope.negative || envelope.tombstone {
            return None;
        }
        if !sealing.vouches_for(&envelope) {
            return None;
        }
        let payload = sealing.open(&envelope, store_key, MAX_INDEX_LEN).ok()?;
        BincodeCodec::default().decode(&payload).ok()
    }
}

/// The fingerprint of a value without a user version: a 128-bit FNV-1a hash of its encoding.
/// Equal values encode equally, except where the encoding depends on iteration order (a
/// `HashMap` field): such values read as changed at every refresh, which costs a write, never
/// a missed change. (FNV is no cryptographic hash: a source that crafts colliding values on
/// purpose could hide a change; give such data a version.)
pub(super) fn fingerprint<V: Serialize>(value: &V) -> Result<u128> {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut encoded = Vec::new();
    BincodeCodec::default().encode_into(value, &mut encoded)?;
    Ok(encoded.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u128::from(*byte)).wrapping_mul(PRIME)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierstack_core::envelope::{Encryption, EncryptionKey, KeyRing};

    #[test]
    fn an_index_survives_its_encoding() {
        let mut index = Index {
            generation: 3,
            refreshed_at: 1_000,
            took: 12,
            changed: 1,
            removed: 2,
            entries: HashMap::new(),
        };
        index.entries.insert(
            "tool:1".into(),
            Stamp {
                fingerprint: 42,
                written_at: 900,
            },
        );
        let now = Timestamp::from_millis(1_000);
        let plain = Sealing::none();
        let bytes = index
            .encode(&plain, "ns!dataset:index", now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            Index::decode(&plain, "ns!dataset:index", &bytes),
            Some(index.clone())
        );
        assert_eq!(
            Index::decode(&plain, "ns!dataset:index", b"not an index"),
            None
        );
        // Sealed: it opens under its own key only, and a cache that requires encryption
        // ignores a plaintext index.
        let ring = KeyRing::new(1, &EncryptionKey::from_bytes([3; 32]));
        let sealed = Sealing::none().encryption(Encryption::new(ring.clone()));
        let bytes_sealed = index
            .encode(&sealed, "ns!dataset:index", now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            Index::decode(&sealed, "ns!dataset:index", &bytes_sealed),
            Some(index)
        );
        assert_eq!(
            Index::decode(&sealed, "other!dataset:index", &bytes_sealed),
            None
        );
        assert_eq!(Index::decode(&sealed, "ns!dataset:index", &bytes), None);
        assert_eq!(
            Index::decode(&plain, "ns!dataset:index", &bytes_sealed),
            None
        );
        let migrating = Sealing::none().encryption(Encryption::new(ring).accept_plaintext(true));
        assert_eq!(Index::decode(&migrating, "ns!dataset:index", &bytes), None);
    }

    #[test]
    fn fingerprints_tell_values_apart() {
        let a = fingerprint(&("tool", 1_u32)).unwrap();
        assert_eq!(a, fingerprint(&("tool", 1_u32)).unwrap());
        assert_ne!(a, fingerprint(&("tool", 2_u32)).unwrap());
        assert_ne!(a, fingerprint(&("toom", 1_u32)).unwrap());
    }
}
