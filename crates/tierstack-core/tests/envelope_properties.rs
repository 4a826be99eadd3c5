//! Properties of the envelope over arbitrary values, lifetimes, tags, compression thresholds
//! and key rings: what is sealed opens to what was written, under its own store key only; and
//! no bytes, however mangled, make parsing or opening panic or return more than the cap.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope::{
    self, Compression, Encryption, EncryptionKey, Envelope, KeyRing, Lifetime, Sealing,
};
use tierstack_core::tag::{TagStamps, TagVersion};
use tierstack_core::{BincodeCodec, Codec};

const MAX: usize = 1 << 20;

/// The keys of a ring: 1 to 4 with distinct ids, in the ring's order (the first encrypts).
type Keys = Vec<(u32, [u8; 32])>;

fn ring_of(keys: &[(u32, [u8; 32])]) -> KeyRing {
    let mut ring = KeyRing::new(keys[0].0, &EncryptionKey::from_bytes(keys[0].1));
    for (id, bytes) in &keys[1..] {
        ring = ring
            .with_old_key(*id, &EncryptionKey::from_bytes(*bytes))
            .unwrap();
    }
    ring
}

fn rings() -> impl Strategy<Value = (Keys, KeyRing)> {
    proptest::collection::btree_map(any::<u32>(), any::<[u8; 32]>(), 1..5).prop_flat_map(|keys| {
        Just(keys.into_iter().collect::<Keys>())
            .prop_shuffle()
            .prop_map(|keys| {
                let ring = ring_of(&keys);
                (keys, ring)
            })
    })
}

fn sealings() -> impl Strategy<Value = Sealing> {
    (
        proptest::option::of(0usize..2_048),
        proptest::option::of(rings()),
        any::<bool>(),
    )
        .prop_map(|(threshold, ring, accept_plaintext)| {
            let mut sealing = Sealing::none();
            if let Some(threshold) = threshold {
                sealing = sealing.compression(Compression::lz4().min_size(threshold));
            }
            if let Some((_, ring)) = ring {
                sealing =
                    sealing.encryption(Encryption::new(ring).accept_plaintext(accept_plaintext));
            }
            sealing
        })
}

fn lifetimes() -> impl Strategy<Value = Lifetime> {
    (0u64..1 << 50, 0u64..1 << 40, 0u64..1 << 40, any::<bool>()).prop_map(
        |(written, fresh, extra, stale)| Lifetime {
            written_at: Timestamp::from_millis(written),
            fresh_until: Timestamp::from_millis(written + fresh),
            expires_at: Timestamp::from_millis(written + fresh + extra),
            stale,
        },
    )
}

fn tags() -> impl Strategy<Value = Option<TagStamps>> {
    proptest::option::of(proptest::collection::btree_map(
        "[a-z:0-9]{1,12}",
        any::<(u64, u64)>(),
        1..4,
    ))
    .prop_map(|tags| {
        tags.map(|tags| {
            let stamps = tags
                .into_iter()
                .map(|(tag, (incarnation, counter))| {
                    (
                        Arc::from(tag.as_str()),
                        TagVersion {
                            incarnation,
                            counter,
                        },
                    )
                })
                .collect();
            TagStamps::new(stamps).unwrap()
        })
    })
}

/// Values that compress (repeated words) and values that do not (arbitrary bytes).
fn values() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..3_000),
        ("[a-c ]{1,8}", 0usize..400).prop_map(|(word, times)| word.repeat(times).into_bytes()),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn what_is_sealed_opens_to_what_was_written(
        value in values(),
        lifetime in lifetimes(),
        tags in tags(),
        sealing in sealings(),
        store_key in "[a-z]{1,8}:[ -~]{0,40}",
    ) {
        let codec = BincodeCodec::default();
        let bytes = envelope::encode_sealed(
            &codec, value.as_ref(), lifetime, tags.as_ref(), &sealing, &store_key, MAX,
        )
        .unwrap();
        let parsed = Envelope::parse::<BincodeCodec>(&bytes, MAX).unwrap();
        prop_assert_eq!(parsed.negative, value.is_none());
        prop_assert_eq!(parsed.written_at, lifetime.written_at);
        prop_assert_eq!(parsed.expires_at, lifetime.expires_at);
        prop_assert_eq!(parsed.fresh_until, lifetime.fresh_until);
        prop_assert_eq!(parsed.stale, lifetime.stale);
        prop_assert_eq!(parsed.tags(), tags);
        prop_assert_eq!(parsed.is_encrypted(), sealing.encryption_setting().is_some());
        prop_assert_eq!(bytes[2] == 2, parsed.is_sealed());
        let payload = sealing.open(&parsed, &store_key, MAX).unwrap();
        if let Some(value) = &value {
            let back: Vec<u8> = codec.decode(&payload).unwrap();
            prop_assert_eq!(&back, value);
        }
        if parsed.is_encrypted() {
            let other_key = format!("{store_key}x");
            prop_assert!(sealing.open(&parsed, &other_key, MAX).is_err());
        }
    }

    #[test]
    fn a_ring_with_the_writers_key_in_any_position_reads_its_entries(
        (keys, ring) in rings(),
        value in proptest::collection::vec(any::<u8>(), 0..256),
        keep_writer in any::<bool>(),
        rotate in 0usize..4,
    ) {
        let writer = Sealing::none().encryption(Encryption::new(ring));
        let bytes = envelope::encode_sealed(
            &BincodeCodec::default(), Some(&value), lifetime_at(5), None, &writer, "ns:k", MAX,
        )
        .unwrap();
        let parsed = Envelope::parse::<BincodeCodec>(&bytes, MAX).unwrap();
        prop_assert_eq!(parsed.key_id(), Some(keys[0].0));
        // The reader's ring: the writer's keys in another order, with or without the key that
        // wrote. With it the entry opens; without it, it is a miss.
        let mut reader_keys: Keys = keys.iter().copied().filter(|(id, _)| keep_writer || *id != keys[0].0).collect();
        prop_assume!(!reader_keys.is_empty());
        let turn = rotate % reader_keys.len();
        reader_keys.rotate_left(turn);
        let reader = Sealing::none().encryption(Encryption::new(ring_of(&reader_keys)));
        let opened = reader.open(&parsed, "ns:k", MAX);
        prop_assert_eq!(opened.is_ok(), keep_writer);
        if let Ok(payload) = opened {
            let back: Vec<u8> = BincodeCodec::default().decode(&payload).unwrap();
            prop_assert_eq!(back, value);
        }
    }

    #[test]
    fn no_bytes_make_parsing_or_opening_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        sealing in sealings(),
    ) {
        if let Ok(parsed) = Envelope::parse::<BincodeCodec>(&bytes, 4_096)
            && let Ok(payload) = sealing.open(&parsed, "ns:k", 4_096)
        {
            prop_assert!(payload.len() <= 4_096);
        }
    }

    #[test]
    fn a_mangled_sealed_envelope_never_opens_to_another_value(
        value in ("[a-z]{1,4}", 1usize..300).prop_map(|(w, n)| w.repeat(n)),
        sealing in sealings(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        prop_assume!(sealing.encryption_setting().is_some());
        let codec = BincodeCodec::default();
        let bytes = envelope::encode_sealed(
            &codec, Some(&value), lifetime_at(9), None, &sealing, "ns:k", MAX,
        )
        .unwrap();
        let mut mangled = bytes.to_vec();
        for (at, byte) in &edits {
            let at = at.index(mangled.len());
            if !(13..21).contains(&at) {
                mangled[at] = *byte;
            }
        }
        prop_assume!(mangled != bytes.to_vec());
        let opened = Envelope::parse::<BincodeCodec>(&mangled, MAX)
            .ok()
            .and_then(|parsed| sealing.open(&parsed, "ns:k", MAX).ok().map(std::borrow::Cow::into_owned));
        prop_assert!(opened.is_none(), "a mangled envelope opened");
    }
}

fn lifetime_at(millis: u64) -> Lifetime {
    Lifetime {
        written_at: Timestamp::from_millis(millis),
        fresh_until: Timestamp::from_millis(millis + 1_000),
        expires_at: Timestamp::from_millis(millis + 1_000),
        stale: false,
    }
}
