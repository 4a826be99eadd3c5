//! An L2 that fails or stalls degrades reads to L1 and the loader, and is used again when it
//! recovers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Calls, Fixture, loader};
use tierstack::core::testkit::{FaultyStore, MemoryStore};
use tierstack::{CacheError, TieredCache};

#[tokio::test]
async fn a_failing_l2_degrades_to_l1_and_the_loader_and_recovers() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("cached", "in-l1".into()).await.unwrap();
    fx.faulty.set_failing(true);

    assert_eq!(
        cache.get("cached").await.unwrap(),
        Some("in-l1".into()),
        "L1 keeps serving"
    );
    let calls = Calls::default();
    for _ in 0..3 {
        assert_eq!(
            cache
                .get_or_load("new", loader(&calls, "loaded"))
                .await
                .unwrap(),
            "loaded"
        );
    }
    assert_eq!(
        calls.count(),
        1,
        "the loaded value is kept in L1 while L2 is down"
    );
    assert_eq!(
        cache.get("missing").await.unwrap(),
        None,
        "a plain get reads as a miss"
    );
    let bulk = cache.get_many(&["cached", "missing"]).await.unwrap();
    assert_eq!(bulk, vec![Some("in-l1".into()), None]);
    assert!(cache.stats().l2_errors >= 3);
    // Writes report the failure instead of pretending.
    let err = cache.set("cached", "new".into()).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(
        cache.get("cached").await.unwrap(),
        None,
        "L1 no longer holds a value L2 lacks"
    );

    fx.faulty.set_failing(false);
    cache.set("after", "ok".into()).await.unwrap();
    cache.invalidate_local_all();
    assert_eq!(
        cache.get("after").await.unwrap(),
        Some("ok".into()),
        "served by L2 again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_l2_is_abandoned_after_the_l2_timeout() {
    let fx = Fixture::new();
    let cache = fx
        .builder("test")
        .l2_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    fx.faulty.set_delay(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let calls = Calls::default();
    assert_eq!(
        cache.get_or_load("k", loader(&calls, "v")).await.unwrap(),
        "v"
    );
    // One timed-out read and one timed-out write-through: about 200 ms, far from 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let err = cache.set("k", "w".into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::Timeout {
                operation: "set",
                ..
            }
        ),
        "{err:?}"
    );
}

/// A cache over `store`, stalled for 30 s per call, with a 100 ms L2 timeout.
fn stalled_cache(store: FaultyStore) -> TieredCache<String> {
    store.set_delay(Duration::from_secs(30));
    TieredCache::builder("test")
        .l2(Arc::new(store))
        .l2_timeout(Duration::from_millis(100))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Every operation has one deadline: its L2 call, the wait for the key's lock and the rest share
/// the L2 timeout. On the paused clock each call against a stalled store takes exactly that long.
#[tokio::test(start_paused = true)]
async fn every_operation_on_a_stalled_store_ends_at_one_l2_timeout() {
    let cache = stalled_cache(FaultyStore::new(Arc::new(MemoryStore::new())));
    let timeout = Duration::from_millis(100);
    let timed =
        async |name: &str,
               call: std::pin::Pin<Box<dyn std::future::Future<Output = bool> + '_>>| {
            let started = tokio::time::Instant::now();
            let timed_out = call.await;
            assert_eq!(started.elapsed(), timeout, "{name}");
            assert!(timed_out, "{name}");
        };
    let is_timeout = |e: &CacheError| matches!(e, CacheError::Timeout { .. });
    timed(
        "set",
        Box::pin(async {
            cache
                .set("k", "v".into())
                .await
                .is_err_and(|e| is_timeout(&e))
        }),
    )
    .await;
    timed(
        "delete",
        Box::pin(async { cache.delete("k").await.is_err_and(|e| is_timeout(&e)) }),
    )
    .await;
    timed(
        "touch",
        Box::pin(async {
            cache
                .touch("k", timeout)
                .await
                .is_err_and(|e| is_timeout(&e))
        }),
    )
    .await;
    timed(
        "delete_prefix",
        Box::pin(async {
            cache
                .delete_prefix("k")
                .await
                .is_err_and(|e| is_timeout(&e))
        }),
    )
    .await;
    // Reads: an L2 that stalls reads as a miss, within the same bound.
    timed(
        "get",
        Box::pin(async { cache.get("k").await.unwrap().is_none() }),
    )
    .await;
    timed(
        "exists",
        Box::pin(async { !cache.exists("k").await.unwrap() }),
    )
    .await;
    timed(
        "ttl",
        Box::pin(async { cache.ttl("k").await.unwrap().is_none() }),
    )
    .await;
}

#[tokio::test]
async fn intermittent_failures_never_surface_to_readers() {
    let fx = Fixture::new();
    let cache = fx.cache();
    fx.faulty.set_failure_probability(0.5);
    let calls = Calls::default();
    for i in 0..200 {
        let key = format!("k{}", i % 20);
        assert_eq!(
            cache.get_or_load(&key, loader(&calls, &key)).await.unwrap(),
            key
        );
    }
    assert!(fx.faulty.injected_failures() > 0);
    assert!(calls.count() >= 20);
}
