//! Several instances of one service racing on one Redis while it fails under them.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Partition, RedisServer, private_redis};
use tierstack::{CircuitBreaker, EntryOptions, FailSafe, TieredCache, WriteRecovery};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};

/// Enough keys that the calls after the restart leave most of them alone: what an instance
/// serves for those was settled by the outage and the restart alone.
const KEYS: usize = 512;
/// A bound on each task's calls, whatever the machine's speed: far above what a task makes in
/// the race's 2.3 s (about 20,000 while a breaker answers calls at once), so that the bound
/// never ends a task before the fault is over.
const MAX_OPS_PER_TASK: u64 = 1_000_000;

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
    /// What a service that must ride out outages turns on: circuit breakers on L2 and on the
    /// backplane, fail-safe, and write recovery (writes that fail are kept and replayed).
    Resilient,
}

/// Three instances: two on a store and a backplane of their own, one on a store paired with its
/// backplane; the first reaches Redis through `first`, the others through `others`. Short
/// timeouts keep calls during a fault short.
async fn instances(
    first: &RedisConfig,
    others: &RedisConfig,
    policies: Policies,
) -> Vec<TieredCache<String>> {
    let mut caches = Vec::new();
    for (config, paired) in [(first, false), (others, false), (others, true)] {
        let config = config
            .clone()
            .connect_timeout(Duration::from_millis(250))
            .response_timeout(Duration::from_millis(250))
            .backplane_ping_interval(Some(Duration::from_millis(200)));
        let (store, backplane) = if paired {
            RedisStore::connect_with_backplane(&config).await.unwrap()
        } else {
            (
                RedisStore::connect(&config).await.unwrap(),
                RedisBackplane::connect(&config).await.unwrap(),
            )
        };
        let builder = TieredCache::builder("svc")
            .l2(Arc::new(store))
            .backplane(Arc::new(backplane))
            .default_ttl(Duration::from_hours(1))
            .l2_timeout(Duration::from_millis(250));
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

/// The service's own database, which the cache is in front of: loads read a key's row, and a
/// write changes the row and then the cache, under the row's lock (so that the cache sees each
/// key's writes in the database's order, as a service that writes through under a row lock
/// does).
struct Origin {
    rows: Vec<tokio::sync::Mutex<Option<String>>>,
    /// Whether the last write or delete of each row failed in the cache (the caller was told).
    failed: Vec<AtomicBool>,
}

impl Origin {
    fn new() -> Self {
        Self {
            rows: (0..KEYS).map(|_| tokio::sync::Mutex::new(None)).collect(),
            failed: (0..KEYS).map(|_| AtomicBool::new(false)).collect(),
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

/// One task's calls until `stop`: read-through loads from the database, writes and deletes
/// (the database's row first, then the cache), and plain reads, of random keys on random
/// instances. Errors are expected during the fault; what counts is where the instances end up.
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
                let ok = cache.set(&key, value).await.is_ok();
                course.origin.failed[i].store(!ok, Ordering::SeqCst);
                ok
            }
            7 => {
                let mut row = course.origin.rows[i].lock().await;
                *row = None;
                let ok = cache.delete(&key).await.is_ok();
                course.origin.failed[i].store(!ok, Ordering::SeqCst);
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

/// A directory of the test's own, removed when dropped (the test failing too).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tierstack-races-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether every instance serves, for every key, what Redis holds under it (read by an
/// instance without L1 that returns L2 errors rather than reading them as misses) or what the
/// database holds: an instance may keep a value it loaded while Redis was out of reach, but
/// nothing a write or a delete has replaced since.
async fn none_serves_a_replaced_value(
    caches: &[TieredCache<String>],
    redis: &TieredCache<String>,
    origin: &Origin,
) -> Result<(), String> {
    let strict = redis.default_options().with_l2_errors_returned(true);
    for i in 0..KEYS {
        let key = key(i);
        let held = redis
            .get_with(&key, &strict)
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        let current = Some(origin.load(i).await);
        for (n, cache) in caches.iter().enumerate() {
            let served = cache.get(&key).await.map_err(|e| e.to_string())?;
            if served != held && served != current {
                return Err(format!(
                    "instance {n} serves {served:?} for {key}: Redis holds {held:?}, the \
                     database {current:?}"
                ));
            }
        }
    }
    Ok(())
}

/// What goes wrong under the racing calls.
enum Fault {
    /// The server is killed and restarted on its port; `args` are its extra arguments.
    Restart { args: Vec<String> },
    /// The first instance's link to the server goes silent, closing nothing, then comes back;
    /// with `forget`, the connections it had stay silent for good (a NAT that lost their
    /// state) and only new ones pass.
    Partition { forget: bool },
    /// The server stops answering (`SIGSTOP`, as a frozen VM or a swap storm), then goes on
    /// (`SIGCONT`) with what it had and the commands that queued up meanwhile, timed-out
    /// writes among them.
    Stall,
}

/// Sixteen tasks race writes, deletes, read-through loads and reads of 512 keys over three
/// instances, while the server is killed and restarted under them, empty. Once the calls stop,
/// every instance serves what Redis holds, for every key, without waiting out a TTL: no L1 keeps
/// a value that a write or a delete during the outage, or the data the restart lost, made stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_a_restart_agree_with_redis_once_the_calls_stop() {
    race_through(Fault::Restart { args: Vec::new() }, Policies::Plain).await;
}

/// The same with circuit breakers, fail-safe and write recovery on: the writes kept during the
/// outage are replayed once Redis is back, and the instances still end up serving what Redis
/// holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilient_instances_racing_through_a_restart_agree_with_redis_once_the_calls_stop() {
    race_through(Fault::Restart { args: Vec::new() }, Policies::Resilient).await;
}

/// The same with a server that keeps every acknowledged write on disk (`appendfsync always`)
/// and comes back with its data: the values the instances held before the outage are still
/// in Redis, and those written or deleted since, on any instance, must not lose to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_a_restart_with_its_data_agree_with_redis() {
    let dir = TempDir::new();
    let args = ["--dir", &dir.0.to_string_lossy(), "--appendonly", "yes"]
        .into_iter()
        .chain(["--appendfsync", "always"])
        .map(str::to_owned)
        .collect();
    race_through(Fault::Restart { args }, Policies::Plain).await;
}

/// The same while one instance is cut off from Redis by a partition that sends no reset, and
/// the others go on writing: the cut-off instance misses their invalidations, and must not
/// serve what it held once the link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_racing_through_a_silent_partition_agrees_with_redis_once_the_calls_stop() {
    race_through(Fault::Partition { forget: false }, Policies::Plain).await;
}

/// The same when the partition's end leaves the cut-off instance's connections silent for
/// good: it must find them dead and connect again, on its store and on its backplane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_connections_were_forgotten_agrees_with_redis_once_the_calls_stop() {
    race_through(Fault::Partition { forget: true }, Policies::Plain).await;
}

/// The same with circuit breakers, fail-safe and write recovery on, on every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resilient_instance_whose_connections_were_forgotten_agrees_with_redis() {
    race_through(Fault::Partition { forget: true }, Policies::Resilient).await;
}

/// The same while the server stalls for longer than the timeouts and then goes on: every
/// instance's calls time out, the writes among them land late, and the instances must not
/// keep what those writes (or the ones after them) replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_a_stalled_server_agree_with_redis() {
    race_through(Fault::Stall, Policies::Plain).await;
}

/// The same with circuit breakers, fail-safe and write recovery on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilient_instances_racing_through_a_stalled_server_agree_with_redis() {
    race_through(Fault::Stall, Policies::Resilient).await;
}

async fn race_through(fault: Fault, policies: Policies) {
    let args = match &fault {
        Fault::Restart { args } => args.iter().map(String::as_str).collect(),
        Fault::Partition { .. } | Fault::Stall => Vec::new(),
    };
    let mut server: RedisServer = private_redis(&args);
    let direct = RedisConfig::from_url(&server.url()).unwrap();
    let partition = match fault {
        Fault::Partition { .. } => Some(Partition::start(server.port()).await),
        Fault::Restart { .. } | Fault::Stall => None,
    };
    let first = match &partition {
        Some(partition) => RedisConfig::from_url(&partition.url()).unwrap(),
        None => direct.clone(),
    };
    let caches = Arc::new(instances(&first, &direct, policies).await);
    let redis = TieredCache::<String>::builder("svc")
        .without_l1()
        .l2(Arc::new(RedisStore::connect(&direct).await.unwrap()))
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

    server = run_the_fault(server, &fault, partition.as_ref(), &course).await;
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
    let Tally {
        calls,
        failed,
        ok_after_fault,
    } = all;
    // Failed L2 calls, whether the caller saw them fail or a policy answered for them.
    let l2_errors: u64 = caches.iter().map(|cache| cache.stats().l2_errors).sum();
    assert!(
        l2_errors > 0,
        "no L2 call failed in {calls} calls: the fault was not seen"
    );
    assert!(
        ok_after_fault > 0,
        "no call succeeded after the fault ({calls} calls, {failed} failed)"
    );

    settle(
        &caches,
        &redis,
        &course.origin,
        &format!("{calls} calls, {failed} failed, {l2_errors} failed L2 calls"),
    )
    .await;
    if matches!(policies, Policies::Plain) {
        redis_keeps_no_value_a_successful_write_replaced(&redis, &course.origin).await;
    }
    drop(server);
}

/// Whether Redis holds, within a few seconds, for every key whose last write or delete
/// succeeded, the database's value or nothing: no write that timed out landed later over it
/// for good (a taken-back one lingers a second). (Write recovery answers a failed write with
/// success and replays it later; its cases are not checked here: see the note in
/// `docs/backends/redis.md`.)
async fn redis_keeps_no_value_a_successful_write_replaced(
    redis: &TieredCache<String>,
    origin: &Origin,
) {
    let strict = redis.default_options().with_l2_errors_returned(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..KEYS {
        if origin.failed[i].load(Ordering::SeqCst) {
            continue;
        }
        loop {
            let held = redis.get_with(&key(i), &strict).await.unwrap();
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
                "Redis holds {held:?} for {}, which a successful write replaced with {current:?}",
                key(i)
            );
            // poll loop: a taken-back write expires a second after its take-back.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Lets the calls race against a sound server, through `fault`, and briefly after it; returns
/// the server (restarted, for a restart).
async fn run_the_fault(
    mut server: RedisServer,
    fault: &Fault,
    partition: Option<&Partition>,
    course: &Course,
) -> RedisServer {
    // real time: the calls race against a sound server, through the fault, and after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    match (fault, partition) {
        (_, Some(partition)) => partition.freeze(),
        (Fault::Stall, None) => signal(&server, "-STOP"),
        _ => server = off_the_workers(server, RedisServer::kill).await,
    }
    // real time: longer than the timeouts, the pings and the driver's reconnect attempts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match (fault, partition) {
        (Fault::Partition { forget }, Some(partition)) => {
            if *forget {
                partition.forget_open_connections();
            }
            partition.thaw();
        }
        (Fault::Stall, _) => signal(&server, "-CONT"),
        _ => server = off_the_workers(server, RedisServer::restart).await,
    }
    course.fault_over.store(true, Ordering::SeqCst);
    // real time: calls go on after the fault, briefly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server
}

/// Sends `signal` (`-STOP`, `-CONT`) to `server`'s process group.
fn signal(server: &RedisServer, signal: &str) {
    let (_, group) = server.record().pop().expect("the server runs");
    let sent = std::process::Command::new("kill")
        .args([signal, "--", &format!("-{group}")])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} failed");
}

/// Runs `act` on `server` off the runtime's workers: it waits for the process to end or to
/// answer.
async fn off_the_workers(mut server: RedisServer, act: fn(&mut RedisServer)) -> RedisServer {
    tokio::task::spawn_blocking(move || {
        act(&mut server);
        server
    })
    .await
    .unwrap()
}

/// Waits until no instance serves a replaced value, then checks that each serves from L1 again.
async fn settle(
    caches: &[TieredCache<String>],
    redis: &TieredCache<String>,
    origin: &Origin,
    race: &str,
) {
    // Twice the longest pause between two rounds of sending held invalidations (10 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match none_serves_a_replaced_value(caches, redis, origin).await {
            Ok(()) => break,
            Err(disagreement) => assert!(
                Instant::now() < deadline,
                "not agreed within 20 s of the last call ({race}): {disagreement}"
            ),
        }
        // poll loop: reconnections and the backplane's resync take their own time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not agreeing by reading everything from Redis: every instance hears its backplane
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
