//! Several instances of one service racing on one Redis while it fails under them.
#![allow(clippy::unwrap_used)]

mod common;

#[path = "../../tierstack-test-support/races/model.rs"]
mod model;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Partition, RedisServer, private_redis};
use model::{
    Course, Policies, l2_keeps_no_value_a_successful_write_replaced, settle, start_racing,
    stop_racing,
};
use tierstack::TieredCache;
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};
use tierstack_test_support::Launch;
use tierstack_test_support::redis::RedisCluster;

/// Enough keys that the calls after the restart leave most of them alone: what an instance
/// serves for those was settled by the outage and the restart alone.
const KEYS: usize = 512;

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
        caches.push(policies.apply(builder).build().unwrap());
    }
    caches
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

/// The same with circuit breakers alone: writes the open breaker refuses fail fast and are not
/// kept, yet the database behind them changed. The other instances must drop their copies, or
/// they would serve the old value for its TTL once Redis is back empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_breakers_racing_through_a_restart_agree_with_redis() {
    race_through(Fault::Restart { args: Vec::new() }, Policies::Breakers).await;
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

/// The same on a Redis Cluster of three nodes, one of which stalls for longer than the
/// timeouts and then goes on: the calls to its slots time out while those to the others go on,
/// the writes among them land late, and the backplane's subscription may be on the stalled node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_through_a_stalled_cluster_node_agree_with_redis() {
    race_through_a_cluster(Policies::Plain).await;
}

/// The same with circuit breakers, fail-safe and write recovery on. Before a take-back left a
/// tombstone, about one run in fifteen failed: late writes landed over a write answered first,
/// and replays of older kept writes compared themselves with them; then about one in 135, until
/// a late delete's tombstone was taken back too (see "Late writes and replays" in
/// `docs/backends/redis.md`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilient_instances_racing_through_a_stalled_cluster_node_agree_with_redis() {
    race_through_a_cluster(Policies::Resilient).await;
}

async fn race_through_a_cluster(policies: Policies) {
    let cluster = RedisCluster::start(&Launch::for_tests()).unwrap_or_else(|e| panic!("{e}"));
    let config = RedisConfig::cluster(&cluster.urls()).unwrap();
    let caches = Arc::new(instances(&config, &config, policies).await);
    let redis = TieredCache::<String>::builder("svc")
        .without_l1()
        .l2(Arc::new(RedisStore::connect(&config).await.unwrap()))
        .build()
        .unwrap();
    let course = Course::new(KEYS);
    let tasks = start_racing(&caches, &course);
    // The first node serves a third of the slots, so about a third of the keys.
    let (_, group) = cluster.record().swap_remove(0);
    // real time: the calls race against a sound cluster, through the stall, and after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal_group(group, "-STOP");
    // real time: longer than the timeouts and the pings, shorter than the cluster's node
    // timeout (5 s), so that the other nodes do not mark it failing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal_group(group, "-CONT");
    course.fault_over.store(true, Ordering::SeqCst);
    // real time: calls go on after the fault, briefly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_and_check(&caches, &redis, &course, tasks).await;
    drop(cluster);
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
    let course = Course::new(KEYS);
    let tasks = start_racing(&caches, &course);
    server = run_the_fault(server, &fault, partition.as_ref(), &course).await;
    stop_and_check(&caches, &redis, &course, tasks).await;
    drop(server);
}

/// Stops the race, checks that the fault was seen and that calls succeeded after it, then that
/// the instances and Redis (read through `redis`) agree.
async fn stop_and_check(
    caches: &[TieredCache<String>],
    redis: &TieredCache<String>,
    course: &Course,
    tasks: Vec<tokio::task::JoinHandle<model::Tally>>,
) {
    let model::Tally {
        calls,
        failed,
        ok_after_fault,
    } = stop_racing(course, tasks).await;
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
        caches,
        ("Redis", redis),
        &course.origin,
        &format!("{calls} calls, {failed} failed, {l2_errors} failed L2 calls"),
    )
    .await;
    l2_keeps_no_value_a_successful_write_replaced(("Redis", redis), &course.origin).await;
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
    signal_group(group, signal);
}

/// Sends `signal` to the process group `group`.
fn signal_group(group: u32, signal: &str) {
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
