//! `cargo xtask bench [--quick]`: builds the benchmark binary in release mode and runs it
//! against a Redis server, then a Firestore emulator, that it starts and stops.

use crate::cmd::{cargo, run, target_dir};
use crate::services::{Services, Which};

/// The scenarios that need only Redis (or nothing); the rest need the Firestore emulator.
const WITHOUT_FIRESTORE: &str = "l1_hit,failsafe_outage,eager_refresh,soft_timeout,\
                                 l2_hit_memory,stampede,l2_hit_redis,get_many_redis,\
                                 set_many_redis,write_through_redis,invalidation_lag,mixed_zipf,\
                                 l2_outage,dataset_read,tag_invalidation,session_load,\
                                 http_cached_get,server_get,server_put,envelope_codec";
const WITH_FIRESTORE: &str = "l2_hit_firestore,get_many_firestore";

/// The benchmark's phases: scenarios, the one server running while they run, and whether the
/// phase appends to the results of the one before. Two phases, each with only the server it
/// measures running: the idle emulator (a JVM and its Python wrapper) takes enough CPU on a
/// small machine to blur the other scenarios.
pub(crate) const PHASES: [(&str, Which, bool); 2] = [
    (WITHOUT_FIRESTORE, Which::Redis, false),
    (WITH_FIRESTORE, Which::Firestore, true),
];

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
    for (scenarios, server, append) in PHASES {
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
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let field = |record: &serde_json::Value, name: &str| record[name].as_str().map(str::to_owned);
    for scenario in [
        "l1_hit/1task",
        "l1_hit/2task",
        "l1_hit_10k/1task",
        "l1_hit_10k/2task",
        "l1_hit_eager",
        "failsafe_outage",
        "eager_refresh",
        "soft_timeout",
        "l2_hit_memory",
        "dataset_read",
        "tag_invalidation",
        "session_load",
        "http_cached_get",
        "server_get",
        "server_put",
        "stampede",
        "stampede_redis",
        "stampede_distributed",
        "l2_outage",
        "l2_hit_redis",
        "l2_hit_redis_cold_l1",
        "l2_hit_redis_encrypted",
        "envelope_codec",
        "get_many_redis",
        "set_many_redis",
        "write_through_redis",
        "invalidation_lag",
        "mixed_zipf",
        "mixed_zipf_churn",
        "l2_hit_firestore",
        "get_many_firestore",
    ] {
        // A scenario's name, alone or followed by its shape (`/64task`).
        let found = records.iter().any(|record| {
            field(record, "scenario").is_some_and(|name| {
                name.strip_prefix(scenario)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
        });
        if !found {
            return Err(format!(
                "bench-check: no result for {scenario} in {}",
                path.display()
            ));
        }
    }
    check_promises(&records)?;
    eprintln!(
        "bench-check: every scenario reported; each stampede called the loader once and sent at \
         most a few L2 commands, four leased instances loaded once; fail-safe answered every \
         call of the origin and L2 outages"
    );
    Ok(())
}

/// The record of `system` in `scenario` (the first: `l1_hit`'s have two `tierstack` records,
/// against two baselines, and no promise looks at them).
fn record<'a>(
    records: &'a [serde_json::Value],
    scenario: &str,
    system: &str,
) -> Result<&'a serde_json::Value, String> {
    records
        .iter()
        .find(|record| record["scenario"] == scenario && record["system"] == system)
        .ok_or_else(|| format!("bench-check: no {scenario} record for {system}"))
}

/// The results that do not depend on timing.
fn check_promises(records: &[serde_json::Value]) -> Result<(), String> {
    // One loader call per stampede, and at most a few L2 commands (one read, one write of the
    // loaded value; GET and PTTL count as two on Redis).
    for (scenario, most_commands) in [("stampede", 2), ("stampede_redis", 3)] {
        let record = record(records, scenario, "tierstack")?;
        if record["loader_calls"].as_u64() != Some(1) {
            return Err(format!(
                "bench-check: {scenario} called the loader more than once: {record}"
            ));
        }
        match record["l2_commands"].as_u64() {
            Some(commands) if commands <= most_commands => {}
            _ => {
                return Err(format!(
                    "bench-check: {scenario} sent more than {most_commands} L2 commands: {record}"
                ));
            }
        }
    }
    // Compression stores a 64 KB JSON-like value in at most 0.3 of its plain size (sizes do not
    // depend on timing).
    let stored = |system: &str| {
        record(records, "envelope_codec/64KB", system)
            .map(|record| record["stored_bytes"].as_f64().unwrap_or(f64::NAN))
    };
    let (compressed, plain) = (stored("compressed")?, stored("plain")?);
    if compressed > 0.3 * plain || compressed.is_nan() || plain.is_nan() {
        return Err(format!(
            "bench-check: a 64 KB JSON-like value compressed to {compressed} bytes of {plain}"
        ));
    }
    // Four instances sharing a load lease load a cold key once between them (in every round:
    // the record keeps the most).
    let distributed = record(records, "stampede_distributed", "tierstack lease")?;
    if distributed["loader_calls"].as_u64() != Some(1) {
        return Err(format!(
            "bench-check: four instances with the load lease called the loader more than once: \
             {distributed}"
        ));
    }
    // Fail-safe answers every call through an origin outage, and every read through an L2
    // outage, breaker or not (its origin-call bound is checked by the scenario itself).
    for (scenario, system) in [
        ("failsafe_outage/64task", "fail-safe"),
        ("l2_outage/64task", "breaker"),
        ("l2_outage/64task", "no breaker"),
    ] {
        let record = record(records, scenario, system)?;
        if record["errors"].as_u64() != Some(0) {
            return Err(format!(
                "bench-check: fail-safe answered errors through the outage: {record}"
            ));
        }
    }
    Ok(())
}
