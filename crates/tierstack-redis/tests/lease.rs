//! Cluster-wide single-flight over real Redis, standalone and cluster: four instances (each
//! with its own connections and backplane) and 250 callers each on one cold key call the loader
//! once, and a holder that stalls past its lease cannot overwrite the value of the instance
//! that took the lease over.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::core::Store as _;
use tierstack::{EntryOptions, LoadLease, TieredCache};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};
use tokio::sync::oneshot;

mod common;

const ORIGIN: Duration = Duration::from_millis(20);

fn leased(ttl: Duration) -> EntryOptions {
    EntryOptions::default()
        .with_ttl(Duration::from_secs(60))
        .with_load_lease(LoadLease::new(ttl))
}

async fn instance(config: &RedisConfig) -> TieredCache<String> {
    let store = RedisStore::connect(config).await.unwrap();
    let backplane = RedisBackplane::connect(config).await.unwrap();
    TieredCache::builder("svc")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .build()
        .unwrap()
}

/// 4 instances × 250 callers on one cold key; how many times the loader ran.
async fn stampede(config: &RedisConfig) -> usize {
    let mut caches = Vec::new();
    for _ in 0..4 {
        caches.push(instance(config).await);
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..250 {
            let (cache, calls) = (cache.clone(), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                let options = leased(Duration::from_secs(10));
                cache
                    .get_or_load_with("hot", &options, move || async move {
                        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::time::sleep(ORIGIN).await; // real time: the origin's latency
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
    let taken: u64 = caches.iter().map(|c| c.stats().leased_loads).sum();
    let waited: u64 = caches.iter().map(|c| c.stats().lease_waits).sum();
    assert_eq!((taken, waited), (1, 3));
    calls.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_one_redis_load_a_cold_key_once() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("lease"));
    assert_eq!(stampede(&config).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_the_cluster_load_a_cold_key_once() {
    let config = RedisConfig::cluster(&common::cluster_urls())
        .unwrap()
        .key_prefix(&common::unique_prefix("lease-cluster"));
    assert_eq!(stampede(&config).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_stalls_past_its_lease_cannot_overwrite_the_newer_value() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("lease-stall"));
    let raw = RedisStore::connect(&config).await.unwrap();
    let (holder, waiter) = (instance(&config).await, instance(&config).await);
    let lease = Duration::from_millis(300);
    let (answer, answered) = oneshot::channel::<String>();
    let stalled = {
        let holder = holder.clone();
        tokio::spawn(async move {
            holder
                .get_or_load_with("k", &leased(lease), move || async move {
                    Ok::<_, std::io::Error>(answered.await.unwrap())
                })
                .await
                .unwrap()
                .value
        })
    };
    let started = std::time::Instant::now();
    while !raw.exists("svc!lease:k").await.unwrap() {
        assert!(started.elapsed() < Duration::from_secs(5), "no lease taken");
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
    // The waiter takes the lease over once it has run out in Redis, and loads.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let fetched = waiter
        .get_or_load_with("k", &leased(lease), move || async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("new".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(fetched.value, "new");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for the lease to run out"
    );
    // The stalled holder answers its own callers; its late write loses to the newer value.
    answer.send("old".to_owned()).unwrap();
    assert_eq!(stalled.await.unwrap(), "old");
    holder.wait_for_background_fills().await;
    let fresh = instance(&config).await;
    assert_eq!(fresh.get("k").await.unwrap(), Some("new".into()));
}
