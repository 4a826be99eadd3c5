//! Several instances of one service racing on one Redis while it fails under them.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Partition, RedisServer, private_redis};
use tierstack::TieredCache;
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};

/// Enough keys that the calls after the restart leave most of them alone: what an instance
/// serves for those was settled by the outage and the restart alone.
const KEYS: usize = 512;
/// A bound on each task's operations, whatever the machine's speed.
const MAX_OPS_PER_TASK: u64 = 20_000;

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

/// Three instances: two on a store and a backplane of their own, one on a store paired with its
/// backplane; the first reaches Redis through `first`, the others through `others`. Short
/// timeouts keep calls during a fault short.
async fn instances(first: &RedisConfig, others: &RedisConfig) -> Vec<TieredCache<String>> {
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
        caches.push(
            TieredCache::builder("svc")
                .l2(Arc::new(store))
                .backplane(Arc::new(backplane))
                .default_ttl(Duration::from_hours(1))
                .l2_timeout(Duration::from_millis(250))
                .build()
                .unwrap(),
        );
    }
    caches
}

/// One task's calls until `stop`: read-through loads (each load answers a value no other load
/// answers), writes, deletes and plain reads of random keys on random instances. Errors are
/// expected while the server is down; what counts is where the instances end up. Returns how
/// many calls it made and how many failed.
async fn race(
    caches: Arc<Vec<TieredCache<String>>>,
    seed: u64,
    stop: Arc<AtomicBool>,
    values: Arc<AtomicU64>,
) -> (u64, u64) {
    let mut rng = Rng(seed);
    let (mut calls, mut failed) = (0, 0);
    while !stop.load(Ordering::SeqCst) && calls < MAX_OPS_PER_TASK {
        let cache = &caches[rng.below(caches.len())];
        let key = key(rng.below(KEYS));
        let value = || format!("v{}", values.fetch_add(1, Ordering::SeqCst));
        let ok = match rng.below(10) {
            0..=3 => cache
                .get_or_load(&key, || async { Ok::<_, Infallible>(value()) })
                .await
                .is_ok(),
            4..=6 => cache.set(&key, value()).await.is_ok(),
            7 => cache.delete(&key).await.is_ok(),
            _ => cache.get(&key).await.is_ok(),
        };
        calls += 1;
        if !ok {
            failed += 1;
        }
    }
    (calls, failed)
}

/// Whether every instance serves, for every key, what Redis holds under it (read by an
/// instance without L1 that returns L2 errors rather than reading them as misses).
async fn all_agree_with_redis(
    caches: &[TieredCache<String>],
    redis: &TieredCache<String>,
) -> Result<(), String> {
    let strict = redis.default_options().with_l2_errors_returned(true);
    for i in 0..KEYS {
        let key = key(i);
        let held = redis
            .get_with(&key, &strict)
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        for (n, cache) in caches.iter().enumerate() {
            let served = cache.get(&key).await.map_err(|e| e.to_string())?;
            if served != held {
                return Err(format!(
                    "instance {n} serves {served:?} for {key}, Redis holds {held:?}"
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
}

/// Sixteen tasks race writes, deletes, read-through loads and reads of 512 keys over three
/// instances, while the server is killed and restarted under them, empty. Once the calls stop,
/// every instance serves what Redis holds, for every key, without waiting out a TTL: no L1 keeps
/// a value that a write or a delete during the outage, or the data the restart lost, made stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_a_restart_agree_with_redis_once_the_calls_stop() {
    race_through(Fault::Restart { args: Vec::new() }).await;
}

/// The same with a server that keeps every acknowledged write on disk (`appendfsync always`)
/// and comes back with its data: the values the instances held before the outage are still
/// in Redis, and those written or deleted since, on any instance, must not lose to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_a_restart_with_its_data_agree_with_redis() {
    let dir = std::env::temp_dir().join(format!(
        "tierstack-races-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let args = ["--dir", &dir.to_string_lossy(), "--appendonly", "yes"]
        .into_iter()
        .chain(["--appendfsync", "always"])
        .map(str::to_owned)
        .collect();
    race_through(Fault::Restart { args }).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same while one instance is cut off from Redis by a partition that sends no reset, and
/// the others go on writing: the cut-off instance misses their invalidations, and must not
/// serve what it held once the link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_racing_through_a_silent_partition_agrees_with_redis_once_the_calls_stop() {
    race_through(Fault::Partition { forget: false }).await;
}

/// The same when the partition's end leaves the cut-off instance's connections silent for
/// good: it must find them dead and connect again, on its store and on its backplane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_connections_were_forgotten_agrees_with_redis_once_the_calls_stop() {
    race_through(Fault::Partition { forget: true }).await;
}

async fn race_through(fault: Fault) {
    let args = match &fault {
        Fault::Restart { args } => args.iter().map(String::as_str).collect(),
        Fault::Partition { .. } => Vec::new(),
    };
    let mut server: RedisServer = private_redis(&args);
    let direct = RedisConfig::from_url(&server.url()).unwrap();
    let partition = match fault {
        Fault::Partition { .. } => Some(Partition::start(server.port()).await),
        Fault::Restart { .. } => None,
    };
    let first = match &partition {
        Some(partition) => RedisConfig::from_url(&partition.url()).unwrap(),
        None => direct.clone(),
    };
    let caches = Arc::new(instances(&first, &direct).await);
    let redis = TieredCache::<String>::builder("svc")
        .without_l1()
        .l2(Arc::new(RedisStore::connect(&direct).await.unwrap()))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let values = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (1..=16_u64)
        .map(|seed| {
            tokio::spawn(race(
                caches.clone(),
                seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                stop.clone(),
                values.clone(),
            ))
        })
        .collect();

    // real time: the calls race against a sound server, through the fault, and after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    match (&fault, &partition) {
        (Fault::Partition { .. }, Some(partition)) => partition.freeze(),
        _ => server.kill(),
    }
    // real time: longer than the timeouts, the pings and the driver's reconnect attempts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match (&fault, &partition) {
        (Fault::Partition { forget }, Some(partition)) => {
            if *forget {
                partition.forget_open_connections();
            }
            partition.thaw();
        }
        _ => server.restart(),
    }
    // real time: calls go on after the fault, briefly.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut calls, mut failed) = (0, 0);
    for task in tasks {
        let (made, lost) = task.await.unwrap();
        calls += made;
        failed += lost;
    }
    assert!(
        failed > 0,
        "no call failed in {calls}: the fault was not seen"
    );
    assert!(
        failed < calls,
        "every one of {calls} calls failed: no race ran against a sound server"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match all_agree_with_redis(&caches, &redis).await {
            Ok(()) => break,
            Err(disagreement) => assert!(
                Instant::now() < deadline,
                "not agreed within 10 s of the last call ({calls} calls, {failed} failed): \
                 {disagreement}"
            ),
        }
        // poll loop: reconnections and the backplane's resync take their own time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
