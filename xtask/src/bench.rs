//! `cargo xtask bench [--quick]`: builds the benchmark binary in release mode and runs it
//! against a Redis and a Firestore emulator it starts and stops.

use crate::cmd::{cargo, run, target_dir};
use crate::services::{Services, Which};

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
    let mut command = cargo();
    command.args(["run", "--release", "--quiet", "-p", "tierstack-bench", "--"]);
    if quick {
        command.arg("--quick");
    }
    command.arg("--out").arg(&out);
    // The Redis scenarios run against a server of their own, stopped afterwards.
    let services = Services::start(&[Which::Redis, Which::Firestore])?;
    services.apply_env(&mut command);
    let result = run(&mut command);
    drop(services);
    result
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
