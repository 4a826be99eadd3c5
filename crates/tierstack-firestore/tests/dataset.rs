//! A refreshing dataset on two instances over the Firestore emulator (no backplane: followers
//! read the index, and their L1 copies live one second): one refresh per interval between them,
//! both serve what changed and drop what was removed, and the index and lease documents work
//! with Firestore's conditional writes.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tierstack::TieredCache;
use tierstack::dataset::{Dataset, Role};
use tierstack_firestore::FirestoreStore;

mod common;

const EVERY: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_firestore_refresh_once_per_interval_and_serve_the_change() {
    let config = common::config(&format!("dataset-{}", std::process::id()));
    let rows = Arc::new(Mutex::new(HashMap::from([
        ("plan:basic".to_string(), "9".to_string()),
        ("plan:pro".to_string(), "29".to_string()),
    ])));
    let reads = Arc::new(AtomicUsize::new(0));
    let fetch_all = {
        let (rows, reads) = (Arc::clone(&rows), Arc::clone(&reads));
        move || {
            reads.fetch_add(1, Ordering::SeqCst);
            let rows = rows.lock().unwrap().clone();
            async move { Ok::<_, std::io::Error>(rows) }
        }
    };
    let mut instances = Vec::new();
    let started = Instant::now();
    for _ in 0..2 {
        let store = FirestoreStore::connect(&config).await.unwrap();
        let cache: TieredCache<String> = TieredCache::builder("prices")
            .l2(Arc::new(store))
            .l2_timeout(Duration::from_secs(5))
            .l1_ttl(Duration::from_secs(1))
            .build()
            .unwrap();
        let dataset = Dataset::builder(cache, fetch_all.clone())
            .refresh_every(EVERY)
            .start()
            .await
            .unwrap();
        instances.push(dataset);
    }
    assert_eq!(instances[1].state().role, Role::Follower);
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "the second took the first's data"
    );

    {
        let mut rows = rows.lock().unwrap();
        rows.insert("plan:pro".into(), "39".into());
        rows.remove("plan:basic");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for dataset in &instances {
        while dataset.get("plan:pro").await.unwrap().as_deref() != Some("39")
            || dataset.get("plan:basic").await.unwrap().is_some()
        {
            assert!(Instant::now() < deadline, "the change did not arrive");
            tokio::time::sleep(Duration::from_millis(50)).await; // poll loop
        }
    }
    // The follower's index follows at its next attempt.
    while instances[1].state().generation < 2 {
        assert!(
            Instant::now() < deadline,
            "the follower did not read the new index"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll loop
    }
    assert_eq!(instances[1].keys(), ["plan:pro"]);
    let intervals = started.elapsed().as_millis() / EVERY.as_millis();
    let read = reads.load(Ordering::SeqCst) as u128;
    assert!(
        read <= intervals + 2,
        "{read} reads in {intervals} intervals"
    );
    for dataset in &instances {
        dataset.shutdown().await;
    }
}
