//! `cargo xtask bench [--quick]`: builds the benchmark binary in release mode and runs it
//! against a Redis server, then a Firestore emulator, that it starts and stops.

use crate::cmd::{cargo, run, target_dir};
use crate::services::{Services, Which};

/// The scenarios that need only Redis (or nothing); the rest need the Firestore emulator.
const WITHOUT_FIRESTORE: &str = "l1_hit,l2_hit_memory,stampede,l2_hit_redis,get_many_redis,\
                                 write_through_redis,invalidation_lag,mixed_zipf";
const WITH_FIRESTORE: &str = "l2_hit_firestore,get_many_firestore";

pub(crate) fn run_bench(args: &[&str]) -> Result<(), String> {
    let quick = match args {
        [] => false,
        ["--quick"] => true,
        other => {
            return Err(format!(
                "unknown bench arguments {other:?}: expected [--quick]"
            ));
        }
    };
    let out = target_dir().join("bench").join("results.json");
    // Two phases, each with only the server it measures running: the idle emulator (a JVM and
    // its Python wrapper) takes enough CPU on a small machine to blur the other scenarios.
    let phases = [
        (WITHOUT_FIRESTORE, Which::Redis, false),
        (WITH_FIRESTORE, Which::Firestore, true),
    ];
    for (scenarios, server, append) in phases {
        let mut command = cargo();
        command.args(["run", "--release", "--quiet", "-p", "tierstack-bench", "--"]);
        if quick {
            command.arg("--quick");
        }
        if append {
            command.arg("--append");
        }
        command
            .args(["--scenario", scenarios])
            .arg("--out")
            .arg(&out);
        let services = Services::start(&[server])?;
        services.apply_env(&mut command);
        let result = run(&mut command);
        drop(services);
        result?;
    }
    Ok(())
}

/// `cargo xtask ci bench-check`: the quick benchmarks must run and report what they promise.
/// Timings are not asserted (shared machines are noisy); the deterministic results are: every
/// scenario reports, and a stampede of concurrent misses calls the loader exactly once.
pub(crate) fn check() -> Result<(), String> {
    run_bench(&["--quick"])?;
    let path = target_dir().join("bench").join("results.json");
    let results = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    for scenario in [
        "l1_hit/1task",
        "l1_hit/2task",
        "l2_hit_memory",
        "stampede",
        "l2_hit_redis",
        "get_many_redis",
        "write_through_redis",
        "invalidation_lag",
        "mixed_zipf",
        "l2_hit_firestore",
        "get_many_firestore",
    ] {
        if !results.contains(&format!("\"scenario\": \"{scenario}")) {
            return Err(format!(
                "bench-check: no result for {scenario} in {}",
                path.display()
            ));
        }
    }
    let stampede = results
        .split('{')
        .find(|record| {
            record.contains("\"scenario\": \"stampede\"")
                && record.contains("\"system\": \"tierstack\"")
        })
        .ok_or("bench-check: no stampede record for tierstack")?;
    if !stampede.contains("\"loader_calls\": 1\n") && !stampede.contains("\"loader_calls\": 1,") {
        return Err(format!(
            "bench-check: the stampede called the loader more than once: {stampede}"
        ));
    }
    eprintln!("bench-check: every scenario reported; the stampede called the loader once");
    Ok(())
}
