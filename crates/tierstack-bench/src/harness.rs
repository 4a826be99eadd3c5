//! Interleaved rounds, medians, percentiles and the results file.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How much work a run does.
pub(crate) struct Sizes {
    pub(crate) rounds: usize,
    pub(crate) keys: usize,
    pub(crate) ops_per_task: usize,
    pub(crate) stampede_callers: usize,
    /// Operations per round of a Redis scenario (all tasks together).
    pub(crate) redis_ops: usize,
    /// The key space of `mixed_zipf`.
    pub(crate) zipf_keys: usize,
}

impl Sizes {
    pub(crate) const QUICK: Self = Self {
        rounds: 5,
        keys: 10_000,
        ops_per_task: 100_000,
        stampede_callers: 1_000,
        redis_ops: 20_000,
        zipf_keys: 100_000,
    };
    pub(crate) const FULL: Self = Self {
        rounds: 11,
        keys: 10_000,
        ops_per_task: 1_000_000,
        stampede_callers: 1_000,
        redis_ops: 200_000,
        zipf_keys: 1_000_000,
    };
}

/// One line of `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) scenario: String,
    pub(crate) system: String,
    pub(crate) baseline: String,
    /// The median over rounds of this round's time per operation over the baseline's in the
    /// same round.
    pub(crate) ratio: f64,
    /// The lowest and highest of those per-round ratios.
    #[serde(default)]
    pub(crate) ratio_min: f64,
    #[serde(default)]
    pub(crate) ratio_max: f64,
    pub(crate) ops_per_sec: f64,
    pub(crate) p50_ns: u64,
    pub(crate) p99_ns: u64,
    pub(crate) loader_calls: Option<u64>,
    /// Commands (or store calls) the system sent to L2 in its busiest round, where counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) l2_commands: Option<u64>,
    /// Calls that failed, in the round with the most, where counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) errors: Option<u64>,
    /// After an outage, the milliseconds from the L2's return to the first L2 hit: the median
    /// over rounds, where measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) recovery_ms: Option<u64>,
    /// The bytes one value takes in the store, where measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stored_bytes: Option<u64>,
}

/// `TieredCache::get` of key `i`: the tierstack side of the read scenarios. (`i` is an index
/// into `keys`, as on the raw sides: no modulo that only one side would pay.)
pub(crate) struct TieredGet {
    pub(crate) cache: tierstack::TieredCache<String>,
    pub(crate) keys: Arc<Vec<String>>,
}

impl Workload for TieredGet {
    async fn op(&self, i: usize) {
        std::hint::black_box(self.cache.get(&self.keys[i]).await.ok().flatten());
    }
}

/// The first key of the 100-key batch of operation `i`.
pub(crate) fn batch_start(i: usize, keys: usize) -> usize {
    (i * 100) % (keys - 100)
}

/// `TieredCache::get_many` of 100 keys: one L2 round trip.
pub(crate) struct GetMany {
    pub(crate) cache: tierstack::TieredCache<String>,
    pub(crate) keys: Arc<Vec<String>>,
}

impl Workload for GetMany {
    async fn op(&self, i: usize) {
        let start = batch_start(i, self.keys.len());
        let batch: Vec<&str> = self.keys[start..start + 100]
            .iter()
            .map(String::as_str)
            .collect();
        std::hint::black_box(self.cache.get_many(&batch).await.ok());
    }
}

/// The same 100 keys as [`GetMany`], one `TieredCache::get` after the other.
pub(crate) struct SequentialGets {
    pub(crate) cache: tierstack::TieredCache<String>,
    pub(crate) keys: Arc<Vec<String>>,
}

impl Workload for SequentialGets {
    async fn op(&self, i: usize) {
        let start = batch_start(i, self.keys.len());
        for key in &self.keys[start..start + 100] {
            std::hint::black_box(self.cache.get(key).await.ok());
        }
    }
}

/// One operation of a system under test; `i` picks the key.
pub(crate) trait Workload: Send + Sync + 'static {
    fn op(&self, i: usize) -> impl Future<Output = ()> + Send;
}

/// The timing of one round of one system.
#[derive(Debug, Clone, Default)]
pub(crate) struct Round {
    pub(crate) nanos_per_op: f64,
    pub(crate) samples: Vec<u64>,
    pub(crate) loader_calls: Option<u64>,
    pub(crate) l2_commands: Option<u64>,
    pub(crate) errors: Option<u64>,
    pub(crate) recovery_ms: Option<u64>,
}

/// Every 8th operation is timed on its own for the percentiles; the rest only count toward the
/// round's wall time, so the clock reads do not dominate sub-microsecond operations.
const SAMPLE_EVERY: usize = 8;

/// Runs `ops` operations in each of `tasks` tasks, each task walking `order` from its own offset.
pub(crate) async fn run_round<W: Workload>(
    workload: &Arc<W>,
    order: &Arc<Vec<usize>>,
    tasks: usize,
    ops: usize,
) -> Round {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let workload = Arc::clone(workload);
            let order = Arc::clone(order);
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(ops / SAMPLE_EVERY + 1);
                let offset = task * order.len() / tasks.max(1);
                for j in 0..ops {
                    let i = order[(offset + j) % order.len()];
                    if j % SAMPLE_EVERY == 0 {
                        let t = Instant::now();
                        workload.op(i).await;
                        samples.push(nanos(t.elapsed()));
                    } else {
                        workload.op(i).await;
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for handle in handles {
        samples.extend(
            handle
                .await
                .unwrap_or_else(|e| panic!("a benchmark task failed: {e}")),
        );
    }
    let elapsed = started.elapsed();
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let nanos_per_op = elapsed.as_nanos() as f64 / (tasks * ops) as f64;
    Round {
        nanos_per_op,
        samples,
        loader_calls: None,
        l2_commands: None,
        errors: None,
        recovery_ms: None,
    }
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A deterministic pseudo-random permutation of `0..n` (xorshift), the key stream of a scenario.
pub(crate) fn shuffled(n: usize) -> Arc<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        #[expect(clippy::cast_possible_truncation, reason = "reduced modulo i + 1")]
        let j = (state % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    Arc::new(order)
}

/// Runs `rounds` measured rounds (after one warm-up) of every system, rotating their order each
/// round; returns each system's rounds.
pub(crate) async fn interleave<F, Fut>(systems: usize, rounds: usize, mut run: F) -> Vec<Vec<Round>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Round>,
{
    let mut results = vec![Vec::new(); systems];
    for round in 0..=rounds {
        for k in 0..systems {
            let system = (round + k) % systems;
            let result = run(system).await;
            if round > 0 {
                results[system].push(result);
            }
        }
    }
    results
}

/// Two systems on the same key stream, `tasks` tasks of `ops` operations each, in interleaved
/// rounds: the common shape of a head-to-head scenario.
pub(crate) async fn head_to_head<A: Workload, B: Workload>(
    a: &Arc<A>,
    b: &Arc<B>,
    order: &Arc<Vec<usize>>,
    rounds: usize,
    tasks: usize,
    ops: usize,
) -> Vec<Vec<Round>> {
    interleave(2, rounds, |system| async move {
        match system {
            0 => run_round(a, order, tasks, ops).await,
            _ => run_round(b, order, tasks, ops).await,
        }
    })
    .await
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into the samples"
    )]
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

/// Turns each system's rounds into records against `names[baseline]` (see
/// [`record_against`]).
pub(crate) fn records(
    scenario: &str,
    names: &[&str],
    baseline: usize,
    rounds: &[Vec<Round>],
) -> Vec<Record> {
    names
        .iter()
        .zip(rounds)
        .map(|(name, system)| {
            record_against(
                scenario,
                (name, system),
                (names[baseline], &rounds[baseline]),
            )
        })
        .collect()
}

/// The record of one system's rounds against a baseline's: each round's ratio is taken against
/// the baseline's round of the same index (run next to it), and the record gives their median,
/// minimum and maximum.
pub(crate) fn record_against(
    scenario: &str,
    (name, rounds): (&str, &[Round]),
    (baseline, baseline_rounds): (&str, &[Round]),
) -> Record {
    let mut ratios: Vec<f64> = rounds
        .iter()
        .zip(baseline_rounds)
        .map(|(mine, base)| mine.nanos_per_op / base.nanos_per_op)
        .collect();
    let mut times: Vec<f64> = rounds.iter().map(|r| r.nanos_per_op).collect();
    let mut samples: Vec<u64> = rounds
        .iter()
        .flat_map(|r| r.samples.iter().copied())
        .collect();
    samples.sort_unstable();
    let mut recoveries: Vec<u64> = rounds.iter().filter_map(|r| r.recovery_ms).collect();
    recoveries.sort_unstable();
    Record {
        scenario: scenario.to_owned(),
        system: name.to_owned(),
        baseline: baseline.to_owned(),
        ratio: median(&mut ratios),
        ratio_min: ratios.first().copied().unwrap_or(f64::NAN),
        ratio_max: ratios.last().copied().unwrap_or(f64::NAN),
        ops_per_sec: 1e9 / median(&mut times),
        p50_ns: percentile(&samples, 0.50),
        p99_ns: percentile(&samples, 0.99),
        loader_calls: rounds.iter().filter_map(|r| r.loader_calls).max(),
        l2_commands: rounds.iter().filter_map(|r| r.l2_commands).max(),
        errors: rounds.iter().filter_map(|r| r.errors).max(),
        recovery_ms: recoveries.get(recoveries.len() / 2).copied(),
        stored_bytes: None,
    }
}

pub(crate) fn print_table(records: &[Record]) {
    println!(
        "{:<26} {:<22} {:<22} {:>7} {:>15} {:>13} {:>9} {:>9} {:>7} {:>6}",
        "scenario",
        "system",
        "baseline",
        "ratio",
        "min-max",
        "ops/s",
        "p50 ns",
        "p99 ns",
        "loads",
        "L2 cmd"
    );
    let count = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for r in records {
        println!(
            "{:<26} {:<22} {:<22} {:>7.3} {:>15} {:>13.0} {:>9} {:>9} {:>7} {:>6}",
            r.scenario,
            r.system,
            r.baseline,
            r.ratio,
            format!("{:.3}-{:.3}", r.ratio_min, r.ratio_max),
            r.ops_per_sec,
            r.p50_ns,
            r.p99_ns,
            count(r.loader_calls),
            count(r.l2_commands),
        );
    }
}
