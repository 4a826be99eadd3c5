//! Concurrent misses of one key: one loader call, shared errors, panics and cancellations that
//! strand nobody.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Calls, Fixture};
use tierstack::{CacheError, LoaderPanicked, TieredCache};
use tokio::sync::Notify;

fn slow_loader(
    calls: &Calls,
    value: &'static str,
) -> impl FnOnce() -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>,
> + Send
+ 'static {
    let calls = calls.clone();
    move || {
        calls.hit();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(value.to_owned())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_run_one_loader() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let cache = cache.clone();
            let loader = slow_loader(&calls, "v");
            tokio::spawn(async move { cache.get_or_load("hot", loader).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), "v");
    }
    assert_eq!(calls.count(), 1);
    // Each caller may read L2 once before it joins the flight; the flight re-reads once and
    // writes once.
    let l2_calls = fx.faulty.calls();
    assert!((3..=1_002).contains(&l2_calls), "{l2_calls} L2 calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_error_reaches_every_waiter_and_is_not_cached() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let cache = cache.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load("k", move || {
                        calls.hit();
                        async {
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            Err::<String, _>(std::io::Error::other("origin down"))
                        }
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, CacheError::Loader(_)));
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.to_string(), "origin down");
    }
    assert_eq!(calls.count(), 1);
    assert_eq!(cache.stats().load_errors, 1);
    assert!(fx.l2.is_empty(), "errors are not cached");
    let ok = cache
        .get_or_load("k", || async {
            Ok::<_, std::io::Error>("back".to_string())
        })
        .await;
    assert_eq!(ok.unwrap(), "back");
}

fn buggy_origin() -> Result<String, std::io::Error> {
    panic!("loader bug")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_fails_every_waiter_without_hanging_them() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load("k", || async {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        buggy_origin()
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        let result = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("no waiter hangs");
        let err = result.unwrap().unwrap_err();
        let source = std::error::Error::source(&err).unwrap();
        assert!(source.downcast_ref::<tierstack::LoadFailure>().is_some());
        assert!(source.to_string().contains(&LoaderPanicked.to_string()));
    }
    let ok = cache
        .get_or_load("k", || async {
            Ok::<_, std::io::Error>("fine".to_string())
        })
        .await;
    assert_eq!(ok.unwrap(), "fine", "a panic is not cached either");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_caller_does_not_strand_the_others() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let release = Arc::new(Notify::new());
    let first = {
        let cache = cache.clone();
        let calls = calls.clone();
        let release = release.clone();
        tokio::spawn(async move {
            cache
                .get_or_load("k", move || {
                    calls.hit();
                    async move {
                        release.notified().await;
                        Ok::<_, std::io::Error>("v".to_string())
                    }
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = {
        let cache = cache.clone();
        let loader = slow_loader(&calls, "other");
        tokio::spawn(async move { cache.get_or_load("k", loader).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // The leader's load was dropped with it; the waiter was told and led a new flight with its
    // own loader instead of waiting for ever.
    let value = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("waiter not stranded");
    assert_eq!(value.unwrap().unwrap(), "other");
    assert_eq!(calls.count(), 2);
    assert_eq!(cache.get("k").await.unwrap(), Some("other".into()));
    release.notify_one();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_load_in_parallel() {
    let cache: TieredCache<String> = TieredCache::builder("p").build().unwrap();
    let calls = Calls::default();
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let cache = cache.clone();
            let loader = slow_loader(&calls, "v");
            tokio::spawn(async move { cache.get_or_load(&format!("k{i}"), loader).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(calls.count(), 20);
    // 20 loaders of 50 ms in sequence would take a second.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}
