//! `cargo xtask ci`: the checks CI runs, each step also on its own.

use std::process::Command;

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
        "msrv" => msrv(),
        other => Err(format!(
            "unknown ci step {other:?}: expected fmt, tidy, clippy, doc, test, bench-check or msrv"
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

/// `cargo check` of every crate, target and feature with the toolchain of the MSRV the workspace
/// declares. Not one of [`STEPS`]: that toolchain is installed where the `msrv` job of CI runs,
/// not on every machine, and a missing one fails with the command that installs it.
fn msrv() -> Result<(), String> {
    let manifest = crate::cmd::root().join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    let version = crate::release::workspace_package_value(&text, "rust-version")?;
    let rustup = |args: &[&str]| {
        let mut command = Command::new("rustup");
        command.args(args).current_dir(crate::cmd::root());
        // Never a download in the middle of a check: a missing toolchain is an error.
        command.env("RUSTUP_AUTO_INSTALL", "0");
        command
    };
    let installed = rustup(&["run", version, "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !installed {
        return Err(format!(
            "the MSRV toolchain {version} is not installed (or rustup is missing): run \
             `rustup toolchain install {version} --profile minimal`"
        ));
    }
    run_command(&mut rustup(&[
        "run",
        version,
        "cargo",
        "check",
        "--workspace",
        "--all-targets",
        "--all-features",
    ]))
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

#[cfg(test)]
mod tests {
    use crate::release::workspace_package_value;

    #[test]
    fn the_msrv_is_read_from_the_workspace_manifest() {
        let text = "[package]\nrust-version.workspace = true\n\n[workspace.package]\nversion = \"0.1.0\"\nrust-version = \"1.91\"\n";
        assert_eq!(workspace_package_value(text, "rust-version"), Ok("1.91"));
        assert_eq!(workspace_package_value(text, "version"), Ok("0.1.0"));
        assert!(
            workspace_package_value("[package]\nrust-version.workspace = true\n", "rust-version")
                .is_err()
        );
        let manifest = std::fs::read_to_string(crate::cmd::root().join("Cargo.toml")).unwrap();
        let declared = workspace_package_value(&manifest, "rust-version").unwrap();
        assert!(
            declared.split('.').all(|part| part.parse::<u32>().is_ok()),
            "{declared:?}"
        );
    }
}
