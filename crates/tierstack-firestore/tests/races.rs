//! Several instances of one service racing on one Firestore, kept coherent by a Redis
//! backplane, while the emulator or the backplane's server fails under them.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tierstack::{CircuitBreaker, EntryOptions, FailSafe, TieredCache, WriteRecovery};
use tierstack_firestore::{FirestoreConfig, FirestoreStore};
use tierstack_redis::{RedisBackplane, RedisConfig};
use tierstack_test_support::Launch;
use tierstack_test_support::firestore::{FirestoreEmulator, unique_project};
use tierstack_test_support::redis::RedisServer;

/// Fewer keys than the Redis twin of this test (`tierstack-redis/tests/races.rs`): the
/// emulator answers in milliseconds, not microseconds, and the check reads every key.
const KEYS: usize = 128;
/// A bound on each task's calls, whatever the machine's speed: far above what a task makes in
/// a race (a few thousand while a breaker answers calls at once).
const MAX_OPS_PER_TASK: u64 = 1_000_000;
/// Each instance's bound on one Firestore request and on its L2 calls.
const TIMEOUT: Duration = Duration::from_millis(500);

fn key(i: usize) -> String {
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
enum Policies {
    /// The defaults.
    Plain,
    /// Circuit breakers on L2 and on the backplane, fail-safe, and write recovery.
    Resilient,
}

/// What goes wrong under the racing calls.
#[derive(Clone, Copy)]
enum Fault {
    /// The emulator is stopped, then started again on its port, empty.
    EmulatorRestart,
    /// The backplane's Redis is killed, then started again on its port: the instances cannot
    /// tell each other of their writes meanwhile, and Firestore keeps working.
    BackplaneRestart,
}

/// Three instances, each with a store and a backplane of its own.
async fn instances(
    store: &FirestoreConfig,
    backplane: &RedisConfig,
    policies: Policies,
) -> Vec<TieredCache<String>> {
    let backplane = backplane
        .clone()
        .connect_timeout(Duration::from_millis(250))
        .response_timeout(Duration::from_millis(250))
        .backplane_ping_interval(Some(Duration::from_millis(200)));
    let mut caches = Vec::new();
    for _ in 0..3 {
        let builder = TieredCache::builder("svc")
            .l2(Arc::new(FirestoreStore::connect(store).await.unwrap()))
            .backplane(Arc::new(RedisBackplane::connect(&backplane).await.unwrap()))
            .default_ttl(Duration::from_hours(1))
            .l2_timeout(TIMEOUT);
        let builder = match policies {
            Policies::Plain => builder,
            Policies::Resilient => builder
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
        };
        caches.push(builder.build().unwrap());
    }
    caches
}

/// The service's own database: loads read a key's row, and a write changes the row and then
/// the cache, under the row's lock.
struct Origin {
    rows: Vec<tokio::sync::Mutex<Option<String>>>,
}

impl Origin {
    fn new() -> Self {
        Self {
            rows: (0..KEYS).map(|_| tokio::sync::Mutex::new(None)).collect(),
        }
    }

    /// What a load of row `i` answers now: its value, or a marker for a row that is absent.
    async fn load(&self, i: usize) -> String {
        self.rows[i]
            .lock()
            .await
            .clone()
            .unwrap_or_else(|| "absent".to_owned())
    }
}

/// Where the race is: whether the fault is over, whether to stop, the database, and the
/// counter that makes every written value unique.
struct Course {
    fault_over: AtomicBool,
    stop: AtomicBool,
    origin: Origin,
    values: AtomicU64,
}

/// What one task's calls came to.
#[derive(Default)]
struct Tally {
    calls: u64,
    failed: u64,
    /// Calls that succeeded once the fault was over.
    ok_after_fault: u64,
}

/// One task's calls until `stop`: read-through loads, writes and deletes (the database's row
/// first, then the cache), and plain reads, of random keys on random instances.
async fn race(caches: Arc<Vec<TieredCache<String>>>, seed: u64, course: Arc<Course>) -> Tally {
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    while !course.stop.load(Ordering::SeqCst) && tally.calls < MAX_OPS_PER_TASK {
        let after_fault = course.fault_over.load(Ordering::SeqCst);
        let cache = &caches[rng.below(caches.len())];
        let i = rng.below(KEYS);
        let key = key(i);
        let ok = match rng.below(10) {
            0..=3 => cache
                .get_or_load(&key, || async {
                    Ok::<_, Infallible>(course.origin.load(i).await)
                })
                .await
                .is_ok(),
            4..=6 => {
                let mut row = course.origin.rows[i].lock().await;
                let value = format!("v{}", course.values.fetch_add(1, Ordering::SeqCst));
                *row = Some(value.clone());
                cache.set(&key, value).await.is_ok()
            }
            7 => {
                let mut row = course.origin.rows[i].lock().await;
                *row = None;
                cache.delete(&key).await.is_ok()
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

/// Whether every instance serves, for every key, what Firestore holds under it (read by an
/// instance without L1 that returns L2 errors rather than reading them as misses) or what the
/// database holds.
async fn none_serves_a_replaced_value(
    caches: &[TieredCache<String>],
    firestore: &TieredCache<String>,
    origin: &Origin,
) -> Result<(), String> {
    let strict = firestore.default_options().with_l2_errors_returned(true);
    for i in 0..KEYS {
        let key = key(i);
        let held = firestore
            .get_with(&key, &strict)
            .await
            .map_err(|e| format!("Firestore: {e}"))?;
        let current = Some(origin.load(i).await);
        for (n, cache) in caches.iter().enumerate() {
            let served = cache.get(&key).await.map_err(|e| e.to_string())?;
            if served != held && served != current {
                return Err(format!(
                    "instance {n} serves {served:?} for {key}: Firestore holds {held:?}, the \
                     database {current:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Sixteen tasks race writes, deletes, read-through loads and reads over three instances while
/// the emulator is stopped and started again, empty. Once the calls stop, no instance serves a
/// value that a write or a delete during the outage, or the data the restart lost, replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_an_emulator_restart_agree_with_firestore() {
    race_through(Fault::EmulatorRestart, Policies::Plain).await;
}

/// The same with circuit breakers, fail-safe and write recovery on: the writes kept during the
/// outage are replayed once the emulator is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilient_instances_racing_through_an_emulator_restart_agree_with_firestore() {
    race_through(Fault::EmulatorRestart, Policies::Resilient).await;
}

/// The same while the backplane's server is killed and restarted and Firestore keeps
/// working: the instances' writes meanwhile reach Firestore but not the others' L1, which
/// must not keep serving what those writes replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_a_backplane_restart_agree_with_firestore() {
    race_through(Fault::BackplaneRestart, Policies::Plain).await;
}

async fn race_through(fault: Fault, policies: Policies) {
    let launch = Launch::for_tests();
    let mut emulator = FirestoreEmulator::start(&launch).unwrap_or_else(|e| panic!("{e}"));
    let project = unique_project();
    emulator.warm_up(&project).unwrap_or_else(|e| panic!("{e}"));
    let mut redis = RedisServer::start(&launch, &[]).unwrap_or_else(|e| panic!("{e}"));
    let store = FirestoreConfig::new(&project)
        .emulator_host(&emulator.host())
        .collection("races")
        .request_timeout(TIMEOUT)
        .max_retries(0);
    let backplane = RedisConfig::from_url(&redis.url()).unwrap();
    let caches = Arc::new(instances(&store, &backplane, policies).await);
    let firestore = TieredCache::<String>::builder("svc")
        .without_l1()
        .l2(Arc::new(FirestoreStore::connect(&store).await.unwrap()))
        .l2_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let course = Arc::new(Course {
        fault_over: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        origin: Origin::new(),
        values: AtomicU64::new(0),
    });
    let tasks: Vec<_> = (1..=16_u64)
        .map(|seed| {
            let seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tokio::spawn(race(caches.clone(), seed, course.clone()))
        })
        .collect();

    // real time: the calls race against sound servers, through the fault, and after it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    (emulator, redis) = tokio::task::spawn_blocking(move || {
        match fault {
            Fault::EmulatorRestart => {
                emulator.stop();
                // real time: longer than the timeouts and the breakers' open time.
                std::thread::sleep(Duration::from_millis(1500));
                emulator.restart().unwrap_or_else(|e| panic!("{e}"));
                emulator.warm_up(&project).unwrap_or_else(|e| panic!("{e}"));
            }
            Fault::BackplaneRestart => {
                redis.kill();
                // real time: longer than the timeouts and the backplane's pings.
                std::thread::sleep(Duration::from_millis(1500));
                redis.restart();
            }
        }
        (emulator, redis)
    })
    .await
    .unwrap();
    course.fault_over.store(true, Ordering::SeqCst);
    // real time: calls go on after the fault, briefly.
    tokio::time::sleep(Duration::from_millis(1000)).await;
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
    let race = format!("{} calls, {} failed", all.calls, all.failed);
    let (failed_calls, kind) = match fault {
        Fault::EmulatorRestart => (
            caches
                .iter()
                .map(|cache| cache.stats().l2_errors)
                .sum::<u64>(),
            "L2 call",
        ),
        Fault::BackplaneRestart => (
            caches
                .iter()
                .map(|cache| cache.stats().publish_errors)
                .sum(),
            "publish",
        ),
    };
    assert!(
        failed_calls > 0,
        "no {kind} failed ({race}): the fault was not seen"
    );
    assert!(
        all.ok_after_fault > 0,
        "no call succeeded after the fault ({race})"
    );
    settle(&caches, &firestore, &course.origin, &race).await;
    drop((emulator, redis));
}

/// Waits until no instance serves a replaced value, then checks that each serves from L1 again.
async fn settle(
    caches: &[TieredCache<String>],
    firestore: &TieredCache<String>,
    origin: &Origin,
    race: &str,
) {
    // Twice the longest pause between two rounds of sending held invalidations (10 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match none_serves_a_replaced_value(caches, firestore, origin).await {
            Ok(()) => break,
            Err(disagreement) => assert!(
                Instant::now() < deadline,
                "not agreed within 20 s of the last call ({race}): {disagreement}"
            ),
        }
        // poll loop: reconnections and the backplane's resync take their own time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not agreeing by reading everything from Firestore: every instance hears its backplane
    // again, so its L1 serves (a deaf one keeps nothing in L1).
    for (n, cache) in caches.iter().enumerate() {
        let hits = cache.stats().l1_hits;
        for _ in 0..2 {
            for i in 0..KEYS {
                cache.get(&key(i)).await.unwrap();
            }
        }
        assert!(
            cache.stats().l1_hits > hits,
            "instance {n} serves nothing from L1"
        );
    }
}
