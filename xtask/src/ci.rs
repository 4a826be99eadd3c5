//! `cargo xtask ci`: the checks CI runs, each step also on its own.

use crate::cmd::{cargo, run as run_command};
use crate::services::{Services, Which};

/// The steps of `cargo xtask ci`, in order.
pub(crate) const STEPS: [&str; 6] = ["fmt", "tidy", "clippy", "doc", "test", "bench-check"];

/// The test servers the workspace's tests need. The backend crates add theirs here.
pub(crate) const TEST_SERVICES: &[Which] = &[Which::Redis, Which::RedisCluster, Which::Firestore];

fn run_step(step: &str) -> Result<(), String> {
    match step {
        "fmt" => run_command(cargo().args(["fmt", "--all", "--", "--check"])),
        "tidy" => crate::tidy::check(),
        "clippy" => run_command(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ])),
        // With every feature (as docs.rs builds them) and with none (as a user's `cargo doc`
        // does): a link to an item behind a feature breaks the second.
        "doc" => run_command(
            cargo()
                .args(["doc", "--workspace", "--all-features", "--no-deps"])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )
        .and_then(|()| {
            run_command(
                cargo()
                    .args(["doc", "--workspace", "--no-deps"])
                    .env("RUSTDOCFLAGS", "-D warnings"),
            )
        }),
        "test" => test(),
        "bench-check" => crate::bench::check(),
        other => Err(format!(
            "unknown ci step {other:?}: expected fmt, tidy, clippy, doc, test or bench-check"
        )),
    }
}

pub(crate) fn run(step: Option<&str>) -> Result<(), String> {
    if let Some(step) = step {
        return run_step(step);
    }
    for step in STEPS {
        eprintln!("\n== ci: {step}");
        run_step(step)?;
    }
    eprintln!("\n== ci: all steps passed");
    Ok(())
}

/// Starts the servers the tests need, runs every test, and stops the servers whatever happened.
fn test() -> Result<(), String> {
    let services = Services::start(TEST_SERVICES)?;
    let mut command = cargo();
    command.args(["test", "--workspace", "--all-features", "--no-fail-fast"]);
    services.apply_env(&mut command);
    let result = run_command(&mut command);
    drop(services);
    result
}

/// `cargo xtask deny [CHECK ...]`: cargo-deny over licenses, advisories, bans and sources
/// (`deny.toml`), or the checks named. `advisories` fetches the advisory database from GitHub;
/// the others run offline.
pub(crate) fn deny(checks: &[&str]) -> Result<(), String> {
    let installed = cargo()
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        return Err("cargo-deny is not installed: cargo install --locked cargo-deny".into());
    }
    run_command(
        cargo()
            .args(["deny", "--all-features", "check"])
            .args(checks),
    )
}
