//! `cargo xtask fuzz [--runs N]`: the envelope decoder under libFuzzer for a bounded number of
//! executions, starting from the kept corpus (`fuzz/corpus/envelope`), then the inputs that
//! found new coverage merged back into it.
//!
//! Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
//! `cargo install cargo-fuzz`); the stable test `tierstack-core/tests/fuzz_corpus.rs` replays
//! the kept corpus in every CI run.

use std::process::Command;

use crate::cmd::{self, root};

/// Executions when `--runs` is not given.
const DEFAULT_RUNS: u64 = 1_000_000;

pub(crate) fn run_fuzz(args: &[&str]) -> Result<(), String> {
    let runs = match args {
        [] => DEFAULT_RUNS,
        ["--runs", runs] => runs
            .replace('_', "")
            .parse()
            .map_err(|_| format!("--runs takes a number, not {runs}"))?,
        _ => return Err("usage: cargo xtask fuzz [--runs N]".into()),
    };
    let fuzz_dir = root().join("fuzz");
    let probe = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .current_dir(&fuzz_dir)
        .output();
    if !probe.is_ok_and(|out| out.status.success()) {
        return Err("cargo fuzz on a nightly toolchain is needed: \
             `rustup toolchain install nightly` and `cargo install cargo-fuzz`"
            .into());
    }
    std::fs::create_dir_all(fuzz_dir.join("work/envelope"))
        .map_err(|e| format!("cannot create fuzz/work/envelope: {e}"))?;
    let fuzz = |extra: &[&str]| {
        let mut command = Command::new("cargo");
        command
            .args(["+nightly", "fuzz", "run", "envelope"])
            .args(extra)
            .current_dir(&fuzz_dir)
            // The fuzz crate is its own workspace with its own target folder: the sanitizer
            // build must not replace the main one's artifacts.
            .env_remove("CARGO_TARGET_DIR");
        cmd::run(&mut command)
    };
    let runs = format!("-runs={runs}");
    // New inputs go to the first folder (work/), the kept corpus is read as seeds. The malloc
    // limit makes any single allocation over 64 MiB a crash: a decompression bomb shows.
    fuzz(&[
        "work/envelope",
        "corpus/envelope",
        "--",
        &runs,
        "-max_len=8192",
        "-malloc_limit_mb=64",
        "-rss_limit_mb=2048",
        "-timeout=10",
        "-print_final_stats=1",
    ])?;
    // Keep only what adds coverage.
    fuzz(&["corpus/envelope", "work/envelope", "--", "-merge=1"])
}
