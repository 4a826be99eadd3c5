//! Replays the envelope fuzzer's kept corpus (`fuzz/corpus/envelope`, grown by
//! `cargo xtask fuzz`) through the fuzz body on the stable toolchain, and checks that the seeds
//! the corpus started from are still in it, byte for byte: a format change shows here first.
//!
//! `TIERSTACK_WRITE_FUZZ_SEEDS=1 cargo test -p tierstack-core --features testkit --test
//! fuzz_corpus` writes the seeds after a deliberate format change.
#![cfg(feature = "testkit")]

use std::path::PathBuf;

use tierstack_core::envelope::{Encryption, Envelope, Sealing};
use tierstack_core::testkit::fuzz;
use tierstack_core::{BincodeCodec, Codec};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/envelope")
}

#[test]
fn every_kept_input_runs_clean() {
    let entries = std::fs::read_dir(corpus())
        .unwrap_or_else(|e| panic!("the corpus {} is missing: {e}", corpus().display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        fuzz::envelope(&input);
        count += 1;
    }
    assert!(
        count >= fuzz::seeds().len(),
        "only {count} inputs in the corpus"
    );
}

#[test]
fn the_seeds_are_kept_as_they_are_written_today() {
    let write = std::env::var_os("TIERSTACK_WRITE_FUZZ_SEEDS").is_some();
    for (name, bytes) in fuzz::seeds() {
        let path = corpus().join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(corpus()).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        }
        let kept = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "seed {} is missing ({e}); write the seeds with TIERSTACK_WRITE_FUZZ_SEEDS=1",
                path.display()
            )
        });
        fuzz::envelope(&kept);
        if name.starts_with("mode2") || name.starts_with("mode3") {
            // Encrypted seeds differ by their random nonce: what they open to must not. A
            // change to what encryption authenticates fails here, as it would fail every
            // entry a deployed cache wrote.
            assert_eq!(kept.len(), bytes.len(), "seed {name}");
            assert_eq!(opened(&kept), opened(&bytes), "seed {name}");
            assert!(opened(&kept).is_some(), "seed {name} does not open");
        } else {
            assert_eq!(
                kept, bytes,
                "seed {name} differs from what is written today"
            );
        }
    }
}

/// What an encrypted seed (after its mode byte) opens to with the fuzz body's ring: `None` if
/// it does not open, else whether it is a negative entry and the decoded words.
fn opened(seed: &[u8]) -> Option<(bool, Vec<String>)> {
    let sealing = Sealing::none().encryption(Encryption::new(fuzz::ring()));
    let parsed = Envelope::parse::<BincodeCodec>(&seed[1..], fuzz::FUZZ_MAX).ok()?;
    let payload = sealing
        .open(&parsed, fuzz::FUZZ_STORE_KEY, fuzz::FUZZ_MAX)
        .ok()?;
    if parsed.negative {
        return Some((true, Vec::new()));
    }
    BincodeCodec::default()
        .decode(&payload)
        .ok()
        .map(|words| (false, words))
}
