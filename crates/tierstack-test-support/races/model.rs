//! The model of the races tests (`tierstack-redis/tests/races.rs`, `tierstack-firestore/tests/
//! races.rs`): instances of one service racing calls over a database the cache is in front of.
//! Included by path from each (it needs `tierstack`, which this crate does not depend on).
// Each test uses part of it.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tierstack::{
    CircuitBreaker, EntryOptions, FailSafe, TieredCache, TieredCacheBuilder, WriteRecovery,
};

/// A bound on each task's calls, whatever the machine's speed: far above what a task makes in
/// a race (about 20,000 on Redis while a breaker answers calls at once), so that the bound
/// never ends a task before the fault is over.
const MAX_OPS_PER_TASK: u64 = 1_000_000;

pub fn key(i: usize) -> String {
    format!("k{i}")
}

/// A small deterministic generator (xorshift), so that each task's mix of calls is the same
/// from run to run; the interleaving is not.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n as u64).unwrap()
    }
}

/// How the instances are configured.
#[derive(Clone, Copy)]
pub enum Policies {
    /// The defaults.
    Plain,
    /// Circuit breakers on L2 and on the backplane, and nothing else: writes fail fast while
    /// the L2 is down, and are not kept.
    Breakers,
    /// What a service that must ride out outages turns on: circuit breakers on L2 and on the
    /// backplane, fail-safe, and write recovery (writes that fail are kept and replayed).
    Resilient,
}

impl Policies {
    /// `builder` with these policies.
    pub fn apply(self, builder: TieredCacheBuilder<String>) -> TieredCacheBuilder<String> {
        match self {
            Self::Plain => builder,
            Self::Breakers => builder
                .l2_circuit_breaker(CircuitBreaker::new(3, Duration::from_millis(300)))
                .backplane_circuit_breaker(CircuitBreaker::new(3, Duration::from_millis(300))),
            Self::Resilient => builder
                .l2_circuit_breaker(CircuitBreaker::new(3, Duration::from_millis(300)))
                .backplane_circuit_breaker(CircuitBreaker::new(3, Duration::from_millis(300)))
                .write_recovery(
                    WriteRecovery::new(10_000).with_retry_interval(Duration::from_millis(200)),
                )
                .default_options(
                    EntryOptions::default()
                        .with_ttl(Duration::from_hours(1))
                        .with_fail_safe(FailSafe::new(Duration::from_hours(1)))
                        .with_write_recovery(true),
                ),
        }
    }
}

/// The service's own database, which the cache is in front of: loads read a key's row, and a
/// write changes the row and then the cache, under the row's lock (so that the cache sees each
/// key's writes in the database's order, as a service that writes through under a row lock
/// does).
pub struct Origin {
    pub rows: Vec<tokio::sync::Mutex<Option<String>>>,
    /// Whether the last write or delete of each row failed in the cache (the caller was told).
    pub failed: Vec<AtomicBool>,
}

impl Origin {
    /// What a load of row `i` answers now: its value, or a marker for a row that is absent.
    pub async fn load(&self, i: usize) -> String {
        self.rows[i]
            .lock()
            .await
            .clone()
            .unwrap_or_else(|| "absent".to_owned())
    }

    pub fn keys(&self) -> usize {
        self.rows.len()
    }
}

/// Where the race is: whether the fault is over, whether to stop, the database, and the
/// counter that makes every written value unique.
pub struct Course {
    pub fault_over: AtomicBool,
    pub stop: AtomicBool,
    pub origin: Origin,
    values: AtomicU64,
}

impl Course {
    /// A race over `keys` rows, all absent.
    pub fn new(keys: usize) -> Arc<Self> {
        Arc::new(Self {
            fault_over: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            origin: Origin {
                rows: (0..keys).map(|_| tokio::sync::Mutex::new(None)).collect(),
                failed: (0..keys).map(|_| AtomicBool::new(false)).collect(),
            },
            values: AtomicU64::new(0),
        })
    }
}

/// What the calls came to.
#[derive(Default)]
pub struct Tally {
    pub calls: u64,
    pub failed: u64,
    /// Calls that succeeded once the fault was over.
    pub ok_after_fault: u64,
}

/// Sixteen tasks racing calls over `caches` until the course says stop.
pub fn start_racing(
    caches: &Arc<Vec<TieredCache<String>>>,
    course: &Arc<Course>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    (1..=16_u64)
        .map(|seed| {
            let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tokio::spawn(race(caches.clone(), seed, course.clone()))
        })
        .collect()
}

/// Stops the race and adds up what its tasks' calls came to.
pub async fn stop_racing(course: &Course, tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    course.stop.store(true, Ordering::SeqCst);
    let mut all = Tally::default();
    for task in tasks {
        // Each call is bounded by the L2 timeout; a task that does not end is a hang.
        let tally = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a racing task ends once told to stop")
            .unwrap();
        all.calls += tally.calls;
        all.failed += tally.failed;
        all.ok_after_fault += tally.ok_after_fault;
    }
    all
}

/// One task's calls until `stop`: read-through loads from the database, writes and deletes
/// (the database's row first, then the cache), and plain reads, of random keys on random
/// instances. Errors are expected during the fault; what counts is where the instances end up.
async fn race(caches: Arc<Vec<TieredCache<String>>>, seed: u64, course: Arc<Course>) -> Tally {
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    let origin = &course.origin;
    while !course.stop.load(Ordering::SeqCst) && tally.calls < MAX_OPS_PER_TASK {
        let after_fault = course.fault_over.load(Ordering::SeqCst);
        let cache = &caches[rng.below(caches.len())];
        let i = rng.below(origin.keys());
        let key = key(i);
        let ok = match rng.below(10) {
            0..=3 => cache
                .get_or_load(&key, || async { Ok::<_, Infallible>(origin.load(i).await) })
                .await
                .is_ok(),
            4..=6 => {
                let mut row = origin.rows[i].lock().await;
                let value = format!("v{}", course.values.fetch_add(1, Ordering::SeqCst));
                *row = Some(value.clone());
                let ok = cache.set(&key, value).await.is_ok();
                origin.failed[i].store(!ok, Ordering::SeqCst);
                ok
            }
            7 => {
                let mut row = origin.rows[i].lock().await;
                *row = None;
                let ok = cache.delete(&key).await.is_ok();
                origin.failed[i].store(!ok, Ordering::SeqCst);
                ok
            }
            _ => cache.get(&key).await.is_ok(),
        };
        tally.calls += 1;
        if !ok {
            tally.failed += 1;
        } else if after_fault {
            tally.ok_after_fault += 1;
        }
    }
    tally
}

/// Whether every instance serves, for every key, what the L2 holds under it (read by `l2`, an
/// instance without L1 that returns L2 errors rather than reading them as misses) or what the
/// database holds: an instance may keep a value it loaded while the L2 was out of reach, but
/// nothing a write or a delete has replaced since.
async fn none_serves_a_replaced_value(
    caches: &[TieredCache<String>],
    (l2_name, l2): (&str, &TieredCache<String>),
    origin: &Origin,
) -> Result<(), String> {
    let strict = l2.default_options().with_l2_errors_returned(true);
    for i in 0..origin.keys() {
        let key = key(i);
        let held = l2
            .get_with(&key, &strict)
            .await
            .map_err(|e| format!("{l2_name}: {e}"))?;
        let current = Some(origin.load(i).await);
        for (n, cache) in caches.iter().enumerate() {
            let served = cache.get(&key).await.map_err(|e| e.to_string())?;
            if served != held && served != current {
                return Err(format!(
                    "instance {n} serves {served:?} for {key}: {l2_name} holds {held:?}, the \
                     database {current:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Waits until no instance serves a replaced value (the L2 named and read as in
/// [`none_serves_a_replaced_value`]), then checks that each serves from L1 again.
pub async fn settle(
    caches: &[TieredCache<String>],
    l2: (&str, &TieredCache<String>),
    origin: &Origin,
    race: &str,
) {
    // Twice the longest pause between two rounds of sending held invalidations (10 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match none_serves_a_replaced_value(caches, l2, origin).await {
            Ok(()) => break,
            Err(disagreement) => assert!(
                Instant::now() < deadline,
                "not agreed within 20 s of the last call ({race}): {disagreement}"
            ),
        }
        // poll loop: reconnections and the backplane's resync take their own time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not agreeing by reading everything from the L2: every instance hears its backplane
    // again, so its L1 serves (a deaf one keeps nothing in L1). Filled by reading through: the
    // L2 may hold nothing (a restart emptied it, and the race stopped before a write reached
    // it again), and plain reads would then fill no L1 on any instance, deaf or not. Counted
    // on plain reads: with fail-safe, a read-through call also answers from the stale copies
    // a deaf L1 keeps.
    for (n, cache) in caches.iter().enumerate() {
        for i in 0..origin.keys() {
            cache
                .get_or_load(&key(i), || async {
                    Ok::<_, Infallible>(origin.load(i).await)
                })
                .await
                .unwrap();
        }
        let hits = cache.stats().l1_hits;
        for i in 0..origin.keys() {
            cache.get(&key(i)).await.unwrap();
        }
        assert!(
            cache.stats().l1_hits > hits,
            "instance {n} serves nothing from L1"
        );
    }
}

/// Whether the L2 (read by `l2`, as in [`settle`]) holds, within a few seconds, for every key
/// whose last write or delete succeeded, the database's value or nothing: no write that timed
/// out landed later over it for good (on Redis a late one reads as deleted once its take-back
/// lands). With write recovery, a failed write kept for a replay counts as a success (the
/// caller was told so): its replay must not land over a later write either.
pub async fn l2_keeps_no_value_a_successful_write_replaced(
    (l2_name, l2): (&str, &TieredCache<String>),
    origin: &Origin,
) {
    let strict = l2.default_options().with_l2_errors_returned(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..origin.keys() {
        if origin.failed[i].load(Ordering::SeqCst) {
            continue;
        }
        loop {
            let held = l2.get_with(&key(i), &strict).await.unwrap();
            let current = origin.rows[i].lock().await.clone();
            // A load of an absent row caches its marker.
            let agrees = match held.as_deref() {
                None => true,
                Some("absent") => current.is_none(),
                Some(value) => current.as_deref() == Some(value),
            };
            if agrees {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{l2_name} holds {held:?} for {}, which a successful write replaced with \
                 {current:?}",
                key(i)
            );
            // poll loop: a late Redis write stands until its take-back lands.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
