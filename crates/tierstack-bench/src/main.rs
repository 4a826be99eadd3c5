//! The benchmarks of tierstack, side by side with the raw libraries in one run.
//!
//! Every scenario runs each system on the same key stream, in interleaved rounds whose order
//! rotates (ABC, BCA, CAB, ...) so that drifts of a shared, noisy machine hit every system alike.
//! A record's `ratio` is the median time per operation of the system over that of its baseline
//! (lower is better). Run through `cargo xtask bench [--quick]`. Options:
//!
//! - `--scenario PREFIX[,PREFIX...]` runs only the scenarios whose name starts with one of them;
//! - `--append` adds the records to those already in the results file instead of replacing them
//!   (`cargo xtask bench` runs the Firestore scenarios last, with only the emulator running);
//! - `--out FILE.json` names the results file (the chart goes beside it, as `.svg`);
//! - `--chart FILE.json` re-renders the chart of an earlier run.

mod chart;
mod dataset_scenarios;
mod envelope_scenarios;
mod firestore_scenarios;
mod harness;
mod http_scenarios;
mod outage_scenarios;
mod policy_scenarios;
mod redis_scenarios;
mod scenarios;
mod session_scenarios;
mod tag_scenarios;

use std::path::{Path, PathBuf};

use harness::{Record, Sizes};

/// What the command line asks for.
enum Command {
    Chart(PathBuf),
    Run(RunOptions),
}

struct RunOptions {
    quick: bool,
    only: Option<Vec<String>>,
    append: bool,
    out: PathBuf,
}

impl RunOptions {
    fn wants(&self, scenario: &str) -> bool {
        self.only.as_ref().is_none_or(|prefixes| {
            prefixes
                .iter()
                .any(|prefix| scenario.starts_with(prefix.as_str()))
        })
    }
}

fn parse_args() -> Result<Command, String> {
    let mut options = RunOptions {
        quick: false,
        only: None,
        append: false,
        out: PathBuf::from("target/bench/results.json"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--append" => options.append = true,
            "--out" => options.out = args.next().ok_or("--out needs a path")?.into(),
            "--scenario" => {
                let names = args.next().ok_or("--scenario needs a name")?;
                options.only = Some(names.split(',').map(str::to_owned).collect());
            }
            "--chart" => {
                let path = args.next().ok_or("--chart needs a results.json")?;
                return Ok(Command::Chart(path.into()));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Command::Run(options))
}

fn read_records(path: &Path) -> Result<Vec<Record>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_chart(results: &Path, records: &[Record]) -> Result<PathBuf, String> {
    let chart = results.with_extension("svg");
    std::fs::write(&chart, chart::svg(records)).map_err(|e| format!("{}: {e}", chart.display()))?;
    Ok(chart)
}

fn main() -> Result<(), String> {
    let options = match parse_args()? {
        Command::Chart(path) => {
            let chart = write_chart(&path, &read_records(&path)?)?;
            println!("written to {}", chart.display());
            return Ok(());
        }
        Command::Run(options) => options,
    };
    let mut records = if options.append && options.out.exists() {
        read_records(&options.out)?
    } else {
        Vec::new()
    };
    let measured = run_scenarios(&options)?;
    harness::print_table(&measured);
    records.extend(measured);
    let out = &options.out;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?;
    std::fs::write(out, json + "\n").map_err(|e| format!("{}: {e}", out.display()))?;
    let chart = write_chart(out, &records)?;
    println!("\nwritten to {} and {}", out.display(), chart.display());
    Ok(())
}

fn run_scenarios(options: &RunOptions) -> Result<Vec<Record>, String> {
    let sizes = if options.quick {
        Sizes::QUICK
    } else {
        Sizes::FULL
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    Ok(runtime.block_on(async {
        let mut records = local_scenarios(options, &sizes).await;
        records.extend(server_scenarios(options, &sizes).await);
        if records.iter().any(|r| {
            r.scenario.contains("redis")
                || r.scenario.starts_with("stampede")
                || r.scenario.starts_with("invalidation")
                || r.scenario.starts_with("mixed")
                || r.scenario.starts_with("l2_outage")
                || r.scenario.starts_with("tag_")
                || r.scenario.starts_with("session_")
                || r.scenario.starts_with("server_put")
        }) {
            redis_scenarios::cleanup().await;
        }
        records
    }))
}

/// The scenarios that need no server.
async fn local_scenarios(options: &RunOptions, sizes: &Sizes) -> Vec<Record> {
    let mut records = Vec::new();
    if options.wants("l1_hit") {
        // A hundred hot keys, then the 10,000 of a larger working set.
        for key_count in [100, sizes.keys] {
            for tasks in [1, 2] {
                records.extend(scenarios::l1_hit(sizes, tasks, key_count).await);
            }
        }
    }
    if options.wants("l1_hit_eager") {
        records.extend(policy_scenarios::l1_hit_eager(sizes).await);
    }
    if options.wants("failsafe_outage") {
        records.extend(policy_scenarios::failsafe_outage(sizes).await);
    }
    if options.wants("eager_refresh") {
        records.extend(policy_scenarios::eager_refresh(sizes).await);
    }
    if options.wants("soft_timeout") {
        records.extend(policy_scenarios::soft_timeout(sizes).await);
    }
    if options.wants("dataset_read") {
        records.extend(dataset_scenarios::dataset_read(sizes).await);
    }
    if options.wants("l2_hit_memory") {
        records.extend(scenarios::l2_hit_memory(sizes).await);
    }
    if options.wants("stampede") {
        records.extend(scenarios::stampede(sizes).await);
    }
    if options.wants("envelope_codec") {
        records.extend(envelope_scenarios::envelope_codec(sizes).await);
    }
    records
}

/// The scenarios on Redis (started by `cargo xtask bench`), the Firestore emulator or a local
/// HTTP server.
async fn server_scenarios(options: &RunOptions, sizes: &Sizes) -> Vec<Record> {
    let mut records = Vec::new();
    if options.wants("stampede_redis") {
        records.extend(redis_scenarios::stampede_redis(sizes).await);
    }
    if options.wants("stampede_distributed") {
        records.extend(redis_scenarios::stampede_distributed(sizes).await);
    }
    if options.wants("l2_outage") {
        records.extend(outage_scenarios::l2_outage(sizes).await);
    }
    if options.wants("http_cached_get") {
        records.extend(http_scenarios::http_cached_get(sizes).await);
    }
    if options.wants("server_get") {
        records.extend(http_scenarios::server_get(sizes).await);
    }
    if options.wants("server_put") {
        records.extend(http_scenarios::server_put(sizes).await);
    }
    if options.wants("session_load") {
        records.extend(session_scenarios::session_load(sizes).await);
    }
    if options.wants("tag_invalidation") {
        records.extend(tag_scenarios::tag_invalidation(sizes).await);
    }
    if options.wants("l2_hit_redis") {
        records.extend(redis_scenarios::l2_hit_redis(sizes).await);
        records.extend(redis_scenarios::l2_hit_redis_cold_l1(sizes).await);
    }
    if options.wants("l2_hit_redis_encrypted") {
        records.extend(envelope_scenarios::l2_hit_redis_encrypted(sizes).await);
    }
    if options.wants("get_many_redis") {
        records.extend(redis_scenarios::get_many_redis(sizes).await);
    }
    if options.wants("set_many_redis") {
        records.extend(redis_scenarios::set_many_redis(sizes).await);
    }
    if options.wants("write_through_redis") {
        records.extend(redis_scenarios::write_through_redis(sizes).await);
    }
    if options.wants("invalidation_lag") {
        records.extend(redis_scenarios::invalidation_lag(sizes).await);
    }
    if options.wants("mixed_zipf") {
        records.extend(redis_scenarios::mixed_zipf(sizes).await);
        records.extend(redis_scenarios::mixed_zipf_churn(sizes).await);
    }
    if options.wants("l2_hit_firestore") {
        records.extend(firestore_scenarios::l2_hit_firestore(sizes).await);
    }
    if options.wants("get_many_firestore") {
        records.extend(firestore_scenarios::get_many_firestore(sizes).await);
    }
    records
}
