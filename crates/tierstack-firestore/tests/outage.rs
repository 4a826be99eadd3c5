//! The Firestore emulator stopped mid-run: errors within the timeout, a cache that keeps serving
//! from L1 and the loader, and recovery when the emulator is back.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tierstack::TieredCache;
use tierstack_core::Store;
use tierstack_firestore::{FirestoreConfig, FirestoreStore};
use tierstack_test_support::Launch;
use tierstack_test_support::firestore::FirestoreEmulator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_emulator_degrades_the_cache_and_it_recovers() {
    // An emulator of this test's own, to stop and start again.
    let mut emulator =
        FirestoreEmulator::start(&Launch::for_tests()).unwrap_or_else(|error| panic!("{error}"));
    let config = FirestoreConfig::new("outage-test")
        .emulator_host(&emulator.host())
        .collection("outage")
        .request_timeout(Duration::from_millis(500))
        .max_retries(0);
    let store = Arc::new(FirestoreStore::connect(&config).await.unwrap());
    let cache: TieredCache<String> = TieredCache::builder("outage")
        .l2(store.clone())
        .l2_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    // A freshly started emulator answers its first requests slowly (a cold JVM).
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(error) = cache.set("warm", "in-l1".into()).await {
        assert!(
            Instant::now() < deadline,
            "the emulator never answered: {error:?}"
        );
    }

    emulator.stop();
    let started = Instant::now();
    let err = store.get("anything").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed within the timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(
        cache.get("warm").await.unwrap(),
        Some("in-l1".into()),
        "L1 keeps serving"
    );
    let loaded = cache
        .get_or_load("cold", || async {
            Ok::<_, std::io::Error>("loaded".to_string())
        })
        .await;
    assert_eq!(
        loaded.unwrap(),
        "loaded",
        "the loader serves while L2 is down"
    );
    assert!(cache.stats().l2_errors >= 1);

    tokio::task::block_in_place(|| emulator.restart()).unwrap_or_else(|error| panic!("{error}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while cache.set("after", "v".into()).await.is_err() {
        assert!(Instant::now() < deadline, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await; // poll loop
    }
    cache.invalidate_local("after");
    let l2_hits = cache.stats().l2_hits;
    assert_eq!(cache.get("after").await.unwrap(), Some("v".into()));
    assert_eq!(
        cache.stats().l2_hits,
        l2_hits + 1,
        "served by Firestore again, same store, no rebuild"
    );
}
