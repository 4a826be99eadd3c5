//! The benchmarks of tierstack, side by side with the raw libraries in one run.
//!
//! Every scenario runs each system on the same key stream, in interleaved rounds whose order
//! rotates (ABC, BCA, CAB, ...) so that drifts of a shared, noisy machine hit every system alike.
//! A record's `ratio` is the median time per operation of the system over that of its baseline
//! (lower is better). Run through `cargo xtask bench [--quick]`; `--scenario PREFIX` runs only
//! the scenarios whose name starts with `PREFIX`; `--chart results.json` re-renders the SVG
//! chart of an earlier run.

mod chart;
mod firestore_scenarios;
mod harness;
mod redis_scenarios;
mod scenarios;

use std::path::PathBuf;

use harness::{Record, Sizes};

fn main() -> Result<(), String> {
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut out = PathBuf::from("target/bench/results.json");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().ok_or("--out needs a path")?.into(),
            "--scenario" => only = Some(args.next().ok_or("--scenario needs a name")?),
            "--chart" => {
                // Re-renders the chart of an earlier results file.
                let path: PathBuf = args.next().ok_or("--chart needs a results.json")?.into();
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let records: Vec<Record> =
                    serde_json::from_str(&text).map_err(|e| e.to_string())?;
                let chart = path.with_extension("svg");
                std::fs::write(&chart, chart::svg(&records))
                    .map_err(|e| format!("{}: {e}", chart.display()))?;
                println!("written to {}", chart.display());
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let sizes = if quick { Sizes::QUICK } else { Sizes::FULL };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let wanted = |name: &str| only.as_deref().is_none_or(|only| name.starts_with(only));
    let records: Vec<Record> = runtime.block_on(async {
        let mut records = Vec::new();
        if wanted("l1_hit") {
            records.extend(scenarios::l1_hit(&sizes, 1).await);
            records.extend(scenarios::l1_hit(&sizes, 2).await);
        }
        if wanted("l2_hit_memory") {
            records.extend(scenarios::l2_hit_memory(&sizes).await);
        }
        if wanted("stampede") {
            records.extend(scenarios::stampede(&sizes).await);
        }
        if wanted("l2_hit_redis") {
            records.extend(redis_scenarios::l2_hit_redis(&sizes).await);
        }
        if wanted("get_many_redis") {
            records.extend(redis_scenarios::get_many_redis(&sizes).await);
        }
        if wanted("write_through_redis") {
            records.extend(redis_scenarios::write_through_redis(&sizes).await);
        }
        if wanted("invalidation_lag") {
            records.extend(redis_scenarios::invalidation_lag(&sizes).await);
        }
        if wanted("mixed_zipf") {
            records.extend(redis_scenarios::mixed_zipf(&sizes).await);
        }
        if wanted("l2_hit_firestore") {
            records.extend(firestore_scenarios::l2_hit_firestore(&sizes).await);
        }
        if wanted("get_many_firestore") {
            records.extend(firestore_scenarios::get_many_firestore(&sizes).await);
        }
        if records.iter().any(|r| {
            r.scenario.contains("redis")
                || r.scenario.starts_with("invalidation")
                || r.scenario.starts_with("mixed")
        }) {
            redis_scenarios::cleanup().await;
        }
        records
    });
    harness::print_table(&records);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?;
    std::fs::write(&out, json + "\n").map_err(|e| format!("{}: {e}", out.display()))?;
    let chart = out.with_extension("svg");
    std::fs::write(&chart, chart::svg(&records))
        .map_err(|e| format!("{}: {e}", chart.display()))?;
    println!("\nwritten to {} and {}", out.display(), chart.display());
    Ok(())
}
