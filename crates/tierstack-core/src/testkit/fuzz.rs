//! The envelope decoder's fuzz body, shared by the libFuzzer target (`fuzz/`, run by
//! `cargo xtask fuzz`) and the test that replays the kept corpus on the stable toolchain.
//!
//! The first byte of the input picks what is exercised; the rest is the input:
//!
//! - 0: parse as an envelope and open with no sealing configured;
//! - 1: the same with compression configured and a cap of [`FUZZ_SMALL_MAX`] (the caps'
//!   edges);
//! - 2: with encryption required (the ring of [`ring`]);
//! - 3: with encryption, accepting plaintext;
//! - 4: LZ4 decompression of the rest after a 4-byte claimed length;
//! - 5: a round trip: the rest as a value, sealed (compressed and encrypted) and opened again.
//!
//! Every path checks that nothing panics and that an opened payload is within the cap; the
//! round trip checks that the value comes back.

use std::sync::OnceLock;

use crate::clock::Timestamp;
use crate::codec::{BincodeCodec, Codec};
use crate::envelope::{
    self, Compression, Encryption, EncryptionKey, Envelope, KeyRing, Lifetime, Sealing,
};

/// The cap the fuzz body reads with: small, so that a bomb shows at once.
pub const FUZZ_MAX: usize = 64 * 1024;
/// The smaller cap of mode 1.
pub const FUZZ_SMALL_MAX: usize = 1024;
/// The store key every fuzzed envelope is opened under.
pub const FUZZ_STORE_KEY: &str = "fuzz:key";

/// The ring the fuzz body decrypts with: key 1 current, key 2 older.
///
/// # Panics
///
/// Never: its two ids differ.
pub fn ring() -> KeyRing {
    KeyRing::new(1, &EncryptionKey::from_bytes([0x11; 32]))
        .with_old_key(2, &EncryptionKey::from_bytes([0x22; 32]))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn sealings() -> &'static [Sealing; 4] {
    static SEALINGS: OnceLock<[Sealing; 4]> = OnceLock::new();
    SEALINGS.get_or_init(|| {
        [
            Sealing::none(),
            Sealing::none().compression(Compression::lz4().min_size(16)),
            Sealing::none()
                .compression(Compression::lz4().min_size(16))
                .encryption(Encryption::new(ring())),
            Sealing::none().encryption(Encryption::new(ring()).accept_plaintext(true)),
        ]
    })
}

/// One fuzz execution on `data`.
///
/// # Panics
///
/// When the envelope code misbehaves: that is what the fuzzer looks for.
pub fn envelope(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 6 {
        4 => {
            let Some((claim, block)) = rest.split_first_chunk::<4>() else {
                return;
            };
            let claim = u32::from_le_bytes(*claim) as usize;
            if let Ok(out) = envelope::decompress(block, claim, FUZZ_MAX) {
                assert_eq!(out.len(), claim);
            }
        }
        5 => round_trip(rest),
        1 => open(&sealings()[1], rest, FUZZ_SMALL_MAX),
        reader => open(&sealings()[usize::from(reader)], rest, FUZZ_MAX),
    }
}

fn open(sealing: &Sealing, bytes: &[u8], max: usize) {
    let Ok(parsed) = Envelope::parse::<BincodeCodec>(bytes, max) else {
        return;
    };
    let _ = parsed.tags();
    if let Ok(payload) = sealing.open(&parsed, FUZZ_STORE_KEY, max) {
        assert!(payload.len() <= max);
        let _ = BincodeCodec::default().decode::<Vec<String>>(&payload);
    }
}

fn round_trip(value: &[u8]) {
    let sealing = &sealings()[2];
    let lifetime = Lifetime {
        written_at: Timestamp::from_millis(1),
        fresh_until: Timestamp::from_millis(2),
        expires_at: Timestamp::from_millis(3),
        stale: false,
    };
    let codec = BincodeCodec::default();
    let Ok(bytes) = envelope::encode_sealed(
        &codec,
        Some(value),
        lifetime,
        None,
        sealing,
        FUZZ_STORE_KEY,
        FUZZ_MAX,
    ) else {
        return;
    };
    let parsed =
        Envelope::parse::<BincodeCodec>(&bytes, FUZZ_MAX).unwrap_or_else(|e| panic!("{e}"));
    let payload = sealing
        .open(&parsed, FUZZ_STORE_KEY, FUZZ_MAX)
        .unwrap_or_else(|e| panic!("{e}"));
    let back: Vec<u8> = codec.decode(&payload).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, value);
}

/// Inputs to start fuzzing from: one of every kind of envelope, for every mode.
///
/// # Panics
///
/// If a seed cannot be encoded (a bug in the envelope code).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let codec = BincodeCodec::default();
    let lifetime = Lifetime {
        written_at: Timestamp::from_millis(1_000),
        fresh_until: Timestamp::from_millis(2_000),
        expires_at: Timestamp::from_millis(3_000),
        stale: false,
    };
    let words: Vec<String> = (0..40).map(|i| format!("word {i} word")).collect();
    let mut seeds = Vec::new();
    for mode in 0..4u8 {
        // Modes 2 and 3 read encrypted entries; both are written as mode 2 seals.
        let writer = &sealings()[usize::from(mode.min(2))];
        for (name, value) in [("value", Some(&words)), ("negative", None)] {
            let bytes = envelope::encode_sealed(
                &codec,
                value,
                lifetime,
                None,
                writer,
                FUZZ_STORE_KEY,
                FUZZ_MAX,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let mut input = vec![mode];
            input.extend_from_slice(&bytes);
            seeds.push((format!("mode{mode}-{name}"), input));
        }
    }
    let tombstone = envelope::encode_tombstone::<BincodeCodec>(
        Timestamp::from_millis(1),
        Timestamp::from_millis(2),
        7,
    );
    seeds.push(("mode0-tombstone".into(), [&[0u8][..], &tombstone].concat()));
    let text = "compressible ".repeat(50);
    let block = lz4_flex::block::compress(text.as_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "a short constant text")]
    let claim = (text.len() as u32).to_le_bytes();
    seeds.push(("mode4-block".into(), [&[4u8][..], &claim, &block].concat()));
    seeds.push(("mode5-value".into(), [&[5u8][..], text.as_bytes()].concat()));
    seeds
}
