//! Several instances of one service racing on one Firestore, kept coherent by a Redis
//! backplane, while the emulator or the backplane's server fails under them.
#![allow(clippy::unwrap_used)]

#[path = "../../tierstack-test-support/races/model.rs"]
mod model;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use model::{
    Course, Policies, l2_keeps_no_value_a_successful_write_replaced, settle, start_racing,
    stop_racing,
};
use tierstack::TieredCache;
use tierstack_firestore::{FirestoreConfig, FirestoreStore};
use tierstack_redis::{RedisBackplane, RedisConfig};
use tierstack_test_support::Launch;
use tierstack_test_support::firestore::{FirestoreEmulator, unique_project};
use tierstack_test_support::redis::RedisServer;

/// Fewer keys than the Redis twin of this test (`tierstack-redis/tests/races.rs`): the
/// emulator answers in milliseconds, not microseconds, and the check reads every key.
const KEYS: usize = 128;
/// Each instance's bound on one Firestore request and on its L2 calls.
const TIMEOUT: Duration = Duration::from_millis(500);

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
        caches.push(policies.apply(builder).build().unwrap());
    }
    caches
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
    let course = Course::new(KEYS);
    let tasks = start_racing(&caches, &course);

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

    let all = stop_racing(&course, tasks).await;
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
    settle(&caches, ("Firestore", &firestore), &course.origin, &race).await;
    l2_keeps_no_value_a_successful_write_replaced(("Firestore", &firestore), &course.origin).await;
    drop((emulator, redis));
}
