//! The resilience policies, each against the same cache with the policy off: fail-safe through
//! an origin outage, eager refresh and the soft timeout (their ratios are of p99 latency), and
//! what eager refresh costs an L1 hit.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tierstack::{EntryOptions, FailSafe, TieredCache};
use tierstack_moka::MokaStore;

use crate::harness::{Record, Round, Sizes, Workload, interleave, nanos, records, run_round};

/// An origin that fails every call after `delay`, counting its calls.
async fn failing_origin(calls: &AtomicU64, delay: Duration) -> Result<String, std::io::Error> {
    calls.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(delay).await;
    Err(std::io::Error::other("origin down"))
}

/// An origin that answers after `delay`, counting its calls.
async fn slow_origin(calls: &AtomicU64, delay: Duration) -> Result<String, std::io::Error> {
    calls.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(delay).await;
    Ok("fresh".to_owned())
}

fn cache(namespace: &str, options: EntryOptions) -> TieredCache<String> {
    TieredCache::builder(namespace)
        .l2(Arc::new(MokaStore::new(64 << 20)))
        .default_options(options)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Fills every key with `options`, then waits until all of them are past their TTL.
async fn warm_then_expire(cache: &TieredCache<String>, keys: usize, options: &EntryOptions) {
    for key in 0..keys {
        cache
            .get_or_load_with(&format!("k{key}"), options, || async {
                Ok::<_, std::io::Error>("warm".to_owned())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    cache.wait_for_background_fills().await;
    tokio::time::sleep(options.ttl() + Duration::from_millis(10)).await;
}

const OUTAGE_KEYS: usize = 1_000;
const OUTAGE_TTL: Duration = Duration::from_millis(100);
const OUTAGE_THROTTLE: Duration = Duration::from_millis(250);

/// One round of `failsafe_outage`: every entry expired, every origin call fails after 1 ms.
async fn outage_round(fail_safe: bool, tasks: usize, ops: usize) -> Round {
    let mut options = EntryOptions::default().with_ttl(OUTAGE_TTL);
    if fail_safe {
        options = options.with_fail_safe(
            FailSafe::new(Duration::from_secs(3600)).with_throttle(OUTAGE_THROTTLE),
        );
    }
    let cache = cache("outage", options);
    warm_then_expire(&cache, OUTAGE_KEYS, &options).await;
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (cache, calls, errors) = (cache.clone(), Arc::clone(&calls), Arc::clone(&errors));
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(ops);
                for j in 0..ops {
                    let key = format!("k{}", (task * 7919 + j) % OUTAGE_KEYS);
                    let calls = Arc::clone(&calls);
                    let t = Instant::now();
                    let answer = cache
                        .get_or_load_with(&key, &options, move || async move {
                            failing_origin(&calls, Duration::from_millis(1)).await
                        })
                        .await;
                    samples.push(nanos(t.elapsed()));
                    if answer.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for handle in handles {
        samples.extend(handle.await.unwrap_or_else(|e| panic!("{e}")));
    }
    let elapsed = started.elapsed();
    let calls = calls.load(Ordering::Relaxed);
    if fail_safe {
        // The promise: at most one origin call per key per throttle window.
        let windows = elapsed.as_secs_f64() / OUTAGE_THROTTLE.as_secs_f64();
        #[expect(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a bound on a count"
        )]
        let bound = (OUTAGE_KEYS as f64 * windows).ceil() as u64 + OUTAGE_KEYS as u64;
        assert!(
            calls <= bound,
            "fail-safe called a failing origin {calls} times in {elapsed:?} (bound {bound})"
        );
    }
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let nanos_per_op = elapsed.as_nanos() as f64 / (tasks * ops) as f64;
    Round {
        nanos_per_op,
        samples,
        loader_calls: Some(calls),
        l2_commands: None,
        errors: Some(errors.load(Ordering::Relaxed)),
        recovery_ms: None,
    }
}

/// `failsafe_outage`: 64 tasks over 1,000 expired keys while the origin fails every call; the
/// same cache with fail-safe off is the baseline (its calls all fail).
pub(crate) async fn failsafe_outage(sizes: &Sizes) -> Vec<Record> {
    let ops = sizes.ops_per_task / 500;
    let rounds = interleave(2, sizes.rounds, |system| outage_round(system == 0, 64, ops)).await;
    records(
        "failsafe_outage/64task",
        &["fail-safe", "fail-safe off"],
        1,
        &rounds,
    )
}

/// Each task reads random keys for `run`, one read per millisecond, and times every read. The round's
/// `nanos_per_op` is its p99, so that the scenario's ratio is a ratio of p99s.
async fn paced_reads(
    cache: &TieredCache<String>,
    options: EntryOptions,
    keys: usize,
    tasks: usize,
    run: Duration,
    delay: Duration,
) -> Round {
    let calls = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let started = Instant::now();
                // Each task draws its keys at random (xorshift), so that every key is read all
                // along the run rather than in sweeps.
                let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ (task as u64 + 1);
                while started.elapsed() < run {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    #[expect(clippy::cast_possible_truncation, reason = "reduced modulo keys")]
                    let key = format!("k{}", (state % keys as u64) as usize);
                    let calls = Arc::clone(&calls);
                    let t = Instant::now();
                    let answer = cache
                        .get_or_load_with(&key, &options, move || async move {
                            slow_origin(&calls, delay).await
                        })
                        .await;
                    samples.push(nanos(t.elapsed()));
                    black_box(answer.ok());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for handle in handles {
        samples.extend(handle.await.unwrap_or_else(|e| panic!("{e}")));
    }
    samples.sort_unstable();
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let p99 = samples
        .get(samples.len() * 99 / 100)
        .copied()
        .unwrap_or_default() as f64;
    Round {
        nanos_per_op: p99,
        samples,
        loader_calls: Some(calls.load(Ordering::Relaxed)),
        l2_commands: None,
        errors: None,
        recovery_ms: None,
    }
}

/// `eager_refresh`: 100 hot keys with a 200 ms TTL read by 64 tasks for a few TTLs, 50 ms
/// origin; the same cache without eager refresh is the baseline. The ratio is of p99 latency.
pub(crate) async fn eager_refresh(sizes: &Sizes) -> Vec<Record> {
    let run = Duration::from_millis(if sizes.rounds < 11 { 600 } else { 1_200 });
    let ttl = Duration::from_millis(200);
    let rounds = interleave(2, sizes.rounds, |system| async move {
        let mut options = EntryOptions::default().with_ttl(ttl);
        if system == 0 {
            options = options.with_eager_refresh(0.5);
        }
        let cache = cache("eager", options);
        for key in 0..100 {
            cache
                .set_with(&format!("k{key}"), "warm".to_owned(), &options)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        paced_reads(&cache, options, 100, 64, run, Duration::from_millis(50)).await
    })
    .await;
    records(
        "eager_refresh/64task",
        &["eager refresh", "without"],
        1,
        &rounds,
    )
}

/// `soft_timeout`: 1,000 keys whose values are stale, a 500 ms origin, 64 tasks; with a 20 ms
/// soft timeout against the same cache without one. The ratio is of p99 latency.
pub(crate) async fn soft_timeout(sizes: &Sizes) -> Vec<Record> {
    let run = Duration::from_millis(if sizes.rounds < 11 { 300 } else { 600 });
    let rounds = interleave(2, sizes.rounds, |system| async move {
        let mut options = EntryOptions::default()
            .with_ttl(Duration::from_millis(50))
            .with_fail_safe(FailSafe::new(Duration::from_secs(3600)));
        if system == 0 {
            options = options.with_soft_timeout(Duration::from_millis(20));
        }
        let cache = cache("soft", options);
        warm_then_expire(&cache, 1_000, &options).await;
        // Each read is of a key no task read before: every read meets a stale value.
        paced_reads(&cache, options, 1_000, 64, run, Duration::from_millis(500)).await
    })
    .await;
    records(
        "soft_timeout/64task",
        &["soft timeout 20ms", "without"],
        1,
        &rounds,
    )
}

/// `get_or_load_with` of key `i`: an L1 hit.
struct LoadWithHit {
    cache: TieredCache<String>,
    options: EntryOptions,
    keys: Arc<Vec<String>>,
}

impl Workload for LoadWithHit {
    async fn op(&self, i: usize) {
        let answer = self
            .cache
            .get_or_load_with(&self.keys[i], &self.options, || async {
                Ok::<_, std::io::Error>(String::new())
            })
            .await;
        black_box(answer.ok());
    }
}

/// `l1_hit_eager`: an L1 hit of `get_or_load_with` with eager refresh on (never due) against
/// one with it off.
pub(crate) async fn l1_hit_eager(sizes: &Sizes) -> Vec<Record> {
    let keys: Arc<Vec<String>> = Arc::new((0..100).map(|i| format!("k{i}")).collect());
    let ttl = Duration::from_secs(3600);
    let mut systems = Vec::new();
    for eager in [true, false] {
        let mut options = EntryOptions::default().with_ttl(ttl);
        if eager {
            options = options.with_eager_refresh(0.9);
        }
        let cache = cache("hit", options);
        for key in keys.iter() {
            cache
                .set_with(key, "v".to_owned(), &options)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        systems.push(Arc::new(LoadWithHit {
            cache,
            options,
            keys: Arc::clone(&keys),
        }));
    }
    let order = crate::harness::shuffled(keys.len());
    let (on, off) = (&systems[0], &systems[1]);
    let order = &order;
    let ops = sizes.ops_per_task;
    let rounds = interleave(2, sizes.rounds, |system| async move {
        match system {
            0 => run_round(on, order, 1, ops).await,
            _ => run_round(off, order, 1, ops).await,
        }
    })
    .await;
    records(
        "l1_hit_eager/1task",
        &["eager refresh on", "off"],
        1,
        &rounds,
    )
}
