//! Concurrent misses of one key: one L2 read and one loader call, typed errors shared by every
//! caller, panics, cancellations and re-entrant loaders that strand nobody.
//!
//! Ordering comes from Tokio's paused clock on a current-thread runtime: every task runs until
//! it waits before the clock moves, so "all callers have joined" needs no sleep.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Calls, Fixture};
use tierstack::{LoadError, TieredCache};
use tokio::sync::Notify;

/// A loader that counts its call and answers `value` after `delay` of (paused) time.
fn delayed_loader(
    calls: &Calls,
    value: &'static str,
    delay: Duration,
) -> impl FnOnce() -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>,
> + Send
+ 'static {
    let calls = calls.clone();
    move || {
        calls.hit();
        Box::pin(async move {
            // paused clock: the origin takes `delay`.
            tokio::time::sleep(delay).await;
            Ok(value.to_owned())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_misses_read_l2_once_and_run_one_loader() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let cache = cache.clone();
            let loader = delayed_loader(&calls, "v", Duration::from_millis(50));
            tokio::spawn(async move { cache.get_or_load("hot", loader).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), "v");
    }
    cache.wait_for_background_fills().await;
    assert_eq!(calls.count(), 1);
    // The flight covers the L2 read: one read, then one write of the loaded value.
    assert_eq!(fx.faulty.calls(), 2, "L2 calls for the whole stampede");
}

/// A caller that misses L1 while a flight is finishing must find the flight's value, not lead
/// a second load: with an L2 that answers after a delay and a loader that answers at once,
/// callers used to read L2 on their own and lead a new flight after the first had finished.
#[tokio::test(start_paused = true)]
async fn callers_arriving_as_a_flight_finishes_do_not_load_again() {
    let fx = Fixture::new();
    fx.faulty.set_delay(Duration::from_millis(1));
    let cache = fx.cache();
    let calls = Calls::default();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let cache = cache.clone();
            let loader = delayed_loader(&calls, "v", Duration::ZERO);
            tokio::spawn(async move {
                // paused clock: spread the callers over the flight's lifetime.
                tokio::time::sleep(Duration::from_micros(10 * i)).await;
                cache.get_or_load("k", loader).await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), "v");
    }
    assert_eq!(calls.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_loader_error_reaches_every_waiter_typed_and_is_not_cached() {
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
                            // paused clock: the origin takes 30 ms to fail.
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            Err::<String, _>(std::io::Error::other("origin down"))
                        }
                    })
                    .await
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Err(LoadError::Loader(error)) => errors.push(error),
            other => panic!("expected the loader's error, got {other:?}"),
        }
    }
    assert_eq!(errors[0].to_string(), "origin down");
    assert!(
        errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])),
        "one error, shared"
    );
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

#[tokio::test(start_paused = true)]
async fn a_panicking_loader_fails_every_waiter_without_hanging_them() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load("k", || async {
                        // paused clock: every caller joins before the loader panics.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        buggy_origin()
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert!(matches!(task.await.unwrap(), Err(LoadError::Panicked)));
    }
    let ok = cache
        .get_or_load("k", || async {
            Ok::<_, std::io::Error>("fine".to_string())
        })
        .await;
    assert_eq!(ok.unwrap(), "fine", "a panic is not cached either");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_leader_does_not_strand_its_waiters() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let started = Arc::new(Notify::new());
    let first = {
        let (cache, calls, started) = (cache.clone(), calls.clone(), started.clone());
        tokio::spawn(async move {
            cache
                .get_or_load("k", move || {
                    calls.hit();
                    async move {
                        started.notify_one();
                        std::future::pending::<()>().await;
                        Ok::<_, std::io::Error>("never".to_string())
                    }
                })
                .await
        })
    };
    started.notified().await;
    let second = {
        let cache = cache.clone();
        let loader = delayed_loader(&calls, "other", Duration::from_millis(10));
        tokio::spawn(async move { cache.get_or_load("k", loader).await })
    };
    // One turn of the scheduler: the second caller joins the flight and waits.
    tokio::task::yield_now().await;
    assert_eq!(calls.count(), 1, "the second caller waits for the first");
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // The waiter was told and led a new flight with its own loader.
    assert_eq!(second.await.unwrap().unwrap(), "other");
    assert_eq!(calls.count(), 2);
    assert_eq!(cache.get("k").await.unwrap(), Some("other".into()));
}

#[tokio::test(start_paused = true)]
async fn a_loader_that_asks_for_its_own_key_fails_instead_of_hanging() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let inner_result = Arc::new(std::sync::Mutex::new(None));
    let leader = {
        let (cache, inner_result) = (cache.clone(), inner_result.clone());
        tokio::spawn(async move {
            let again = cache.clone();
            cache
                .get_or_load("k", move || async move {
                    let inner = again
                        .get_or_load("k", || async { Ok::<_, std::io::Error>("x".into()) })
                        .await;
                    let reentrant = matches!(inner, Err(LoadError::Reentrant));
                    *inner_result.lock().unwrap() = Some(reentrant);
                    // paused clock: the bystander joins while the leader runs.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok::<_, std::io::Error>("outer".to_string())
                })
                .await
        })
    };
    tokio::task::yield_now().await;
    // An unrelated caller of the key waits for the leader, and is not stranded with it.
    let bystander = cache
        .get_or_load("k", || async { Ok::<_, std::io::Error>("mine".into()) })
        .await;
    assert_eq!(bystander.unwrap(), "outer");
    assert_eq!(leader.await.unwrap().unwrap(), "outer");
    assert_eq!(*inner_result.lock().unwrap(), Some(true));
}

#[tokio::test]
async fn a_loader_may_borrow_from_its_caller() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let profile = String::from("Ada");
    let borrowed: &str = &profile;
    let loaded = cache
        .get_or_load("user:1", || async move {
            Ok::<_, std::io::Error>(borrowed.to_owned())
        })
        .await
        .unwrap();
    assert_eq!(loaded, "Ada");
    let many = cache
        .get_or_load_many(&["user:1", "user:2"], |missing| async move {
            Ok::<_, std::io::Error>(
                missing
                    .into_iter()
                    .map(|key| (key, borrowed.to_owned()))
                    .collect(),
            )
        })
        .await
        .unwrap();
    assert_eq!(many, vec![Some("Ada".into()), Some("Ada".into())]);
}

#[tokio::test(start_paused = true)]
async fn different_keys_load_in_parallel() {
    let cache: TieredCache<String> = TieredCache::builder("p").build().unwrap();
    let calls = Calls::default();
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let cache = cache.clone();
            let loader = delayed_loader(&calls, "v", Duration::from_millis(50));
            tokio::spawn(async move { cache.get_or_load(&format!("k{i}"), loader).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(calls.count(), 20);
    // On the paused clock: 50 ms for all of them, not 20 × 50 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(50));
}
