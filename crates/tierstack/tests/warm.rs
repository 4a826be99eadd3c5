//! Warming a cache: batches through `get_or_load_many_with`, bounded concurrency (the origin
//! never sees more loader calls at once), keys already cached not loaded, progress after each
//! batch, failed batches counted and named while the rest go on.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Fixture;
use tierstack::warm::Warmer;

/// An origin that counts its batch calls and how many run at once.
#[derive(Default)]
struct Origin {
    calls: AtomicUsize,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
    asked: Mutex<Vec<String>>,
}

impl Origin {
    async fn load(&self, keys: Vec<String>) -> Result<HashMap<String, String>, std::io::Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: a query
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.asked.lock().unwrap().extend(keys.iter().cloned());
        if keys.iter().any(|key| key == "poison") {
            return Err(std::io::Error::other("the query failed"));
        }
        Ok(keys
            .into_iter()
            .filter(|key| !key.starts_with("absent"))
            .map(|key| (key.clone(), format!("value of {key}")))
            .collect())
    }
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_keys_are_warmed_in_batches_a_few_at_a_time() {
    let fx = Fixture::new();
    let cache = fx.cache();
    for i in 0..50 {
        cache.set(&format!("k{i}"), "cached".into()).await.unwrap();
    }
    let origin = Origin::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let report = Warmer::new(&cache)
        .batch_size(100)
        .concurrency(4)
        .on_progress({
            let seen = Arc::clone(&seen);
            move |progress| seen.lock().unwrap().push(*progress)
        })
        .run((0..10_000).map(|i| format!("k{i}")), |keys| {
            origin.load(keys)
        })
        .await;
    assert_eq!((report.progress.loaded, report.progress.failed), (9_950, 0));
    assert_eq!(report.progress.cached, 50);
    assert_eq!(origin.calls.load(Ordering::SeqCst), 100);
    assert!(origin.most_at_once.load(Ordering::SeqCst) <= 4);
    assert!(
        !origin.asked.lock().unwrap().contains(&"k7".to_string()),
        "cached: not asked"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 100);
    assert!(seen.windows(2).all(|pair| pair[0].done < pair[1].done));
    assert_eq!(seen.last().unwrap().done, 10_000);
    // Every key is served from the cache now.
    assert_eq!(
        cache.get("k9999").await.unwrap(),
        Some("value of k9999".into())
    );
    assert_eq!(
        cache.stats().loads,
        100,
        "one per batch; the read after it is a hit"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_counted_and_named_and_the_rest_go_on() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let origin = Origin::default();
    let keys = ["a1", "a2", "poison", "b1", "absent-1", "b2"];
    let report = Warmer::new(&cache)
        .batch_size(2)
        .concurrency(1)
        .run(keys, |keys| origin.load(keys))
        .await;
    assert_eq!(report.progress.failed, 2);
    assert_eq!(report.failed_keys, ["poison", "b1"]);
    assert!(report.first_error.is_some());
    assert_eq!((report.progress.loaded, report.progress.absent), (3, 1));
    assert_eq!(cache.get("b2").await.unwrap(), Some("value of b2".into()));
    assert_eq!(cache.get("b1").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn keys_can_come_from_a_stream() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let origin = Origin::default();
    let keys = futures_util::stream::iter((0..250).map(|i| format!("s{i}")));
    let report = Warmer::new(&cache)
        .run_stream(keys, |keys| origin.load(keys))
        .await;
    assert_eq!((report.progress.done, report.progress.loaded), (250, 250));
    assert_eq!(origin.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_key_fails_its_batch_only() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let origin = Origin::default();
    let report = Warmer::new(&cache)
        .batch_size(2)
        .run(["", "x", "y", "z"], |keys| origin.load(keys))
        .await;
    assert_eq!((report.progress.failed, report.progress.loaded), (2, 2));
    assert!(matches!(
        report.first_error,
        Some(tierstack::LoadError::Cache(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn only_the_keys_asked_for_count_as_loaded() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let report = Warmer::new(&cache)
        .run(["a", "b"], |keys: Vec<String>| async move {
            assert_eq!(keys, ["a", "b"]);
            // "a" and a key nobody asked for.
            Ok::<_, std::io::Error>(HashMap::from([
                ("a".to_string(), "1".to_string()),
                ("z".to_string(), "26".to_string()),
            ]))
        })
        .await;
    assert_eq!((report.progress.loaded, report.progress.absent), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_batch_fail_safe_answered_after_its_loader_failed_counts_as_failed() {
    let fx = Fixture::new();
    let options = tierstack::EntryOptions::default()
        .with_ttl(Duration::from_secs(1))
        .with_fail_safe(tierstack::FailSafe::new(Duration::from_secs(3600)));
    let cache = fx.builder("test").default_options(options).build().unwrap();
    cache.set("a", "old".into()).await.unwrap();
    fx.clock.advance(Duration::from_secs(2));
    let report = Warmer::new(&cache)
        .run(["a"], |_keys: Vec<String>| async {
            Err::<HashMap<String, String>, _>(std::io::Error::other("the origin is down"))
        })
        .await;
    assert_eq!((report.progress.failed, report.progress.loaded), (1, 0));
    assert_eq!(report.failed_keys, ["a"]);
}
