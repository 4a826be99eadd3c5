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
    report_free_space();
    for step in STEPS {
        eprintln!("\n== ci: {step}");
        run_step(step)?;
    }
    eprintln!("\n== ci: all steps passed");
    Ok(())
}

/// About what a cold run needs on the target folder's disk: the debug builds of clippy, doc and
/// the ~75 test binaries, and the release build of the benchmarks (about 7.5 GB measured).
const COLD_RUN_NEEDS_GB: u64 = 10;

/// Prints the free space where the builds go, and warns below what a cold run needs: a full
/// disk shows up as a linker killed by SIGBUS, far from its cause.
fn report_free_space() {
    let target = crate::cmd::target_dir();
    let probe = if target.exists() {
        target
    } else {
        crate::cmd::root()
    };
    let output = std::process::Command::new("df")
        .args(["-Pk"])
        .arg(&probe)
        .output();
    let free_kb = output.ok().and_then(|out| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .parse::<u64>()
            .ok()
    });
    match free_kb {
        Some(kb) => {
            let gb = kb / (1024 * 1024);
            eprintln!("ci: {gb} GB free for {}", probe.display());
            if gb < COLD_RUN_NEEDS_GB {
                eprintln!(
                    "ci: warning: a cold run needs about {COLD_RUN_NEEDS_GB} GB; free space or \
                     point CARGO_TARGET_DIR at a larger disk"
                );
            }
        }
        None => eprintln!("ci: could not read the free space of {}", probe.display()),
    }
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
