//! A refreshing dataset on two instances over real Redis: one refresh per interval between
//! them (the refresh lease), and both serve what changed in the source.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tierstack::TieredCache;
use tierstack::dataset::{Dataset, Role};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};

mod common;

// Long enough that a loaded machine's late attempt stays inside the lease's half-interval
// margin.
const EVERY: Duration = Duration::from_secs(1);

async fn cache(config: &RedisConfig) -> TieredCache<String> {
    let store = RedisStore::connect(config).await.unwrap();
    let backplane = RedisBackplane::connect(config).await.unwrap();
    TieredCache::builder("flags")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_refresh_once_per_interval_and_serve_the_change() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("dataset"));
    let rows = Arc::new(Mutex::new(HashMap::from([(
        "dark-mode".to_string(),
        "off".to_string(),
    )])));
    let reads = Arc::new(AtomicUsize::new(0));
    let fetch_all = {
        let (rows, reads) = (Arc::clone(&rows), Arc::clone(&reads));
        move || {
            reads.fetch_add(1, Ordering::SeqCst);
            let rows = rows.lock().unwrap().clone();
            async move { Ok::<_, std::io::Error>(rows) }
        }
    };
    let started = Instant::now();
    let first = Dataset::builder(cache(&config).await, fetch_all.clone())
        .refresh_every(EVERY)
        .start()
        .await
        .unwrap();
    tokio::time::sleep(EVERY / 2).await; // real time: the second starts out of phase
    let second = Dataset::builder(cache(&config).await, fetch_all)
        .refresh_every(EVERY)
        .start()
        .await
        .unwrap();
    assert_eq!(second.state().role, Role::Follower);
    assert_eq!(second.get("dark-mode").await.unwrap(), Some("off".into()));

    rows.lock().unwrap().insert("dark-mode".into(), "on".into());
    let deadline = Instant::now() + Duration::from_secs(10);
    for dataset in [&first, &second] {
        while dataset.get("dark-mode").await.unwrap().as_deref() != Some("on") {
            assert!(Instant::now() < deadline, "the change did not arrive");
            tokio::time::sleep(Duration::from_millis(20)).await; // poll loop
        }
    }
    tokio::time::sleep(EVERY * 4).await; // real time: four more intervals
    // One refresh per interval between the two (without the lease, twice as many), plus the
    // first's start; slack of two for a slow machine's late attempts.
    let intervals = started.elapsed().as_millis() / EVERY.as_millis();
    let read = reads.load(Ordering::SeqCst) as u128;
    assert!(
        read <= intervals + 2,
        "{read} reads in {intervals} intervals"
    );
    first.shutdown().await;
    second.shutdown().await;
}
