//! Replays the envelope fuzzer's kept corpus (`fuzz/corpus/envelope`, grown by
//! `cargo xtask fuzz`) through the fuzz body on the stable toolchain, and checks that the seeds
//! the corpus started from are still in it, byte for byte: a format change shows here first.
//!
//! `TIERSTACK_WRITE_FUZZ_SEEDS=1 cargo test -p tierstack-core --features testkit --test
//! fuzz_corpus` writes the seeds after a deliberate format change.
#![cfg(feature = "testkit")]

use std::path::PathBuf;

use tierstack_core::testkit::fuzz;

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
        // Encrypted seeds differ by their random nonce: compare what they open to.
        fuzz::envelope(&kept);
        if !name.starts_with("mode2") && !name.starts_with("mode3") {
            assert_eq!(
                kept, bytes,
                "seed {name} differs from what is written today"
            );
        } else {
            assert_eq!(kept.len(), bytes.len(), "seed {name}");
        }
    }
}
