//! `l2_outage`: reads through an L2 outage, with the L2 circuit breaker against without it.
//!
//! 64 tasks read 1,000 warm keys (one read per millisecond each) for a second, then the Redis
//! server is stopped (`SIGSTOP` to its process, found by `INFO server`: connections stay open
//! and nothing answers) for 5 s and started again (`SIGCONT`), and the reads go on for 2 s. The origin fails
//! throughout the outage, so fail-safe's copies carry the reads. The round's time per operation
//! is the p99 latency of the reads made during the outage (so the ratio is one of p99s); it
//! also counts failed reads and the milliseconds from the restart to the first L2 hit.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tierstack::{CircuitBreaker, EntryOptions, FailSafe, TieredCache};
use tierstack_redis::RedisStore;

use crate::harness::{Record, Round, Sizes, interleave, nanos, records};
use crate::redis_scenarios::{config, fail, raw_connection};

const KEYS: usize = 1_000;
const TASKS: usize = 64;
const BEFORE: Duration = Duration::from_secs(1);
const OUTAGE: Duration = Duration::from_secs(5);
const AFTER: Duration = Duration::from_secs(2);
const L2_TIMEOUT: Duration = Duration::from_millis(200);
/// How long L1 serves a value before reading L2 again: short, so that the reads keep reaching
/// the L2 through the outage.
const L1_TTL: Duration = Duration::from_millis(50);

fn options() -> EntryOptions {
    EntryOptions::default()
        .with_ttl(Duration::from_secs(60))
        .with_l1_ttl(L1_TTL)
        .with_fail_safe(
            FailSafe::new(Duration::from_secs(3600)).with_throttle(Duration::from_millis(500)),
        )
}

/// A cache over Redis (with the breaker, or without) holding every key.
async fn warm_cache(breaker: bool, round: usize) -> TieredCache<String> {
    let prefix = format!("bench-outage-{round}-{breaker}:");
    let store = RedisStore::connect(&config(&prefix))
        .await
        .unwrap_or_else(|e| fail(e));
    let mut builder = TieredCache::<String>::builder("o")
        .l2(Arc::new(store))
        .l2_timeout(L2_TIMEOUT)
        .default_options(options());
    if breaker {
        builder = builder.l2_circuit_breaker(CircuitBreaker::new(5, Duration::from_secs(1)));
    }
    let cache = builder.build().unwrap_or_else(|e| fail(e));
    for key in 0..KEYS {
        cache
            .set(&format!("k{key}"), format!("value {key}"))
            .await
            .unwrap_or_else(|e| fail(e));
    }
    cache
}

/// The benchmark's Redis server process, stopped: started again when dropped, so that no
/// failure of the benchmark leaves it stopped.
struct Stopped(String);

impl Stopped {
    /// Stops the Redis server's process (`SIGSTOP`), found by the `process_id` its `INFO`
    /// gives (the benchmark's Redis runs on this machine).
    async fn redis() -> Self {
        let mut admin = raw_connection().await;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut admin)
            .await
            .unwrap_or_else(|e| fail(e));
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .map_or_else(
                || fail("INFO server names no process_id"),
                |pid| pid.trim().to_owned(),
            );
        signal("-STOP", &pid);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

fn signal(which: &str, pid: &str) {
    let sent = std::process::Command::new("kill")
        .args([which, pid])
        .status()
        .unwrap_or_else(|e| fail(e));
    if !sent.success() {
        fail(format!("kill {which} {pid}: {sent}"));
    }
}

/// Milliseconds from `since` to the cache's first L2 hit after it, watched until `until`.
async fn first_l2_hit(cache: &TieredCache<String>, since: Instant, until: Instant) -> Option<u64> {
    let hits = cache.stats().l2_hits;
    while Instant::now() < until {
        if cache.stats().l2_hits > hits {
            #[expect(clippy::cast_possible_truncation, reason = "milliseconds of a run")]
            return Some(since.elapsed().as_millis() as u64);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

async fn round(breaker: bool, round: usize) -> Round {
    let cache = warm_cache(breaker, round).await;
    let origin_down = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (outage_from, outage_to) = (started + BEFORE, started + BEFORE + OUTAGE);
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (cache, origin_down, errors) =
                (cache.clone(), Arc::clone(&origin_down), Arc::clone(&errors));
            tokio::spawn(async move {
                let mut during = Vec::new();
                let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ (task as u64 + 1);
                while started.elapsed() < BEFORE + OUTAGE + AFTER {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    #[expect(clippy::cast_possible_truncation, reason = "reduced modulo KEYS")]
                    let key = format!("k{}", (state % KEYS as u64) as usize);
                    let (origin_down, reloaded) = (Arc::clone(&origin_down), key.clone());
                    let call = Instant::now();
                    let answer = cache
                        .get_or_load_with(&key, &options(), move || async move {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            if origin_down.load(Ordering::Relaxed) {
                                Err(std::io::Error::other("origin down"))
                            } else {
                                Ok(format!("reloaded {reloaded}"))
                            }
                        })
                        .await;
                    if answer.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    black_box(answer.ok());
                    if call >= outage_from && call < outage_to {
                        during.push(nanos(call.elapsed()));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                during
            })
        })
        .collect();
    tokio::time::sleep_until(outage_from.into()).await;
    origin_down.store(true, Ordering::Relaxed);
    let stopped = Stopped::redis().await;
    tokio::time::sleep_until(outage_to.into()).await;
    drop(stopped);
    origin_down.store(false, Ordering::Relaxed);
    let recovery_ms = first_l2_hit(&cache, outage_to, started + BEFORE + OUTAGE + AFTER).await;
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap_or_else(|e| fail(e)));
    }
    samples.sort_unstable();
    let p99 = samples
        .get(samples.len() * 99 / 100)
        .copied()
        .unwrap_or_else(|| fail("no read ran during the outage"));
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let nanos_per_op = p99 as f64;
    Round {
        nanos_per_op,
        samples,
        loader_calls: None,
        l2_commands: None,
        errors: Some(errors.load(Ordering::Relaxed)),
        recovery_ms,
    }
}

/// `l2_outage`: the L2 circuit breaker on, against the same cache without it.
pub(crate) async fn l2_outage(sizes: &Sizes) -> Vec<Record> {
    // Eight seconds a round: three rounds each in a full run, one in a quick one.
    let rounds = if sizes.rounds > 5 { 3 } else { 1 };
    let mut n = 0;
    let measured = interleave(2, rounds, |system| {
        n += 1;
        round(system == 0, n)
    })
    .await;
    records("l2_outage/64task", &["breaker", "no breaker"], 1, &measured)
}
