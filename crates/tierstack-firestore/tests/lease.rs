//! Cluster-wide single-flight on the Firestore emulator: four instances (each with its own
//! client, and no backplane, so waiters poll) and 250 callers each on one cold key call the
//! loader once.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::{EntryOptions, LoadLease, TieredCache};
use tierstack_firestore::FirestoreStore;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_firestore_load_a_cold_key_once() {
    let config = common::config(&format!("lease-{}", std::process::id()));
    let mut caches = Vec::new();
    for _ in 0..4 {
        let store = FirestoreStore::connect(&config).await.unwrap();
        let cache: TieredCache<String> = TieredCache::builder("svc")
            .l2(Arc::new(store))
            .l2_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        caches.push(cache);
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let options = EntryOptions::default()
        .with_ttl(Duration::from_secs(60))
        .with_load_lease(LoadLease::new(Duration::from_secs(10)));
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..250 {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load_with("hot", &options, move || async move {
                        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::time::sleep(Duration::from_millis(20)).await; // real time: the origin
                        Ok::<_, std::io::Error>(format!("v{n}"))
                    })
                    .await
                    .unwrap()
                    .value
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), "v1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let taken: u64 = caches.iter().map(|c| c.stats().leased_loads).sum();
    let waited: u64 = caches.iter().map(|c| c.stats().lease_waits).sum();
    assert_eq!((taken, waited), (1, 3));
}
