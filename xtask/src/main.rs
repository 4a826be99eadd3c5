//! Project automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! - `ci [fmt|tidy|clippy|doc|test|bench-check]`: every check CI runs, or one step of it.
//!   `tidy` finds working notes in docs and sleeps that order tests; `test` starts the servers
//!   the tests need and stops them afterwards. `ci msrv` (the `msrv` job's step, not part of
//!   `ci`) checks every crate with the toolchain of the declared `rust-version`.
//! - `services up [all|redis|redis-cluster|firestore]`, `services down`, `services status`: test
//!   servers on free loopback ports, described in `target/services.env`.
//! - `bench [--quick]`: the side-by-side benchmarks; writes `target/bench/results.json` and
//!   `target/bench/results.svg`.
//! - `release <major|minor|patch|X.Y.Z> [--dry-run]`: version bump, changelogs, packaging, tag;
//!   `release --check-tag vX.Y.Z`: the tag names the release of the commit it is on.
//! - `deny`: licenses, advisories and duplicate versions with cargo-deny.
//! - `fuzz [--runs N]`: the envelope decoder under libFuzzer (nightly and cargo-fuzz), from and
//!   back into the kept corpus `fuzz/corpus/envelope`.

mod bench;
mod ci;
mod cmd;
mod fuzz;
mod release;
mod services;
mod tidy;
#[cfg(test)]
mod workflows;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci [fmt|tidy|clippy|doc|test|bench-check]
                                            run every CI check, or one step
  ci msrv                                   cargo check with the declared rust-version's
                                            toolchain (installed with rustup)
  services up [all|redis|redis-cluster|firestore]
                                            start test servers (writes target/services.env)
  services down                             stop every server `services up` started
  services status                           show the running servers
  bench [--quick]                           run the benchmarks, write target/bench/results.json
  release <major|minor|patch|X.Y.Z> [--dry-run]
                                            bump, update changelogs, package, commit and tag
  release --check-tag vX.Y.Z                the tag names this commit's release (release.yml)
  deny [CHECK ...]                          cargo-deny: licenses, advisories, bans, sources
  fuzz [--runs N]                           the envelope decoder under libFuzzer (default 1M runs)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["ci"] => ci::run(None),
        ["ci", step] => ci::run(Some(step)),
        ["services", "up"] => services::up_command("all"),
        ["services", "up", which] => services::up_command(which),
        ["services", "down"] => {
            services::down();
            Ok(())
        }
        ["services", "status"] => {
            services::status();
            Ok(())
        }
        ["bench", rest @ ..] => bench::run_bench(rest),
        ["release", rest @ ..] => release::run_release(rest),
        ["deny", checks @ ..] => ci::deny(checks),
        ["fuzz", rest @ ..] => fuzz::run_fuzz(rest),
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown command {args:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}
