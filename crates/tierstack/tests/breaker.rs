//! The L2's circuit breaker: after a run of failures the L2 is skipped (reads answer at once
//! from L1, fail-safe and the loader; writes fail at once), then one call probes it. Time runs
//! on Tokio's paused clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Fixture;
use tierstack::core::CacheError;
use tierstack::{CacheEvent, CircuitBreaker, CircuitState, TieredCache};

const TIMEOUT: Duration = Duration::from_millis(100);
const OPEN_FOR: Duration = Duration::from_secs(5);

fn cache(fx: &Fixture) -> TieredCache<String> {
    fx.builder("test")
        .l2_timeout(TIMEOUT)
        .l2_circuit_breaker(CircuitBreaker::new(3, OPEN_FOR))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_skips_l2_until_a_probe_succeeds() {
    let fx = Fixture::new();
    let cache = cache(&fx);
    let mut events = cache.events();
    cache.set("k", "v".into()).await.unwrap();
    cache.invalidate_local("k");
    // L2 stalls: three reads time out, one L2 timeout each, and the breaker opens.
    fx.faulty.set_delay(Duration::from_secs(60));
    for key in ["a", "b", "c"] {
        let started = tokio::time::Instant::now();
        assert_eq!(cache.get(key).await.unwrap(), None);
        assert_eq!(started.elapsed(), TIMEOUT);
    }
    assert_eq!(cache.stats().l2_circuit_opens, 1);
    // Open: nothing reaches L2 and nobody waits for it.
    let calls = fx.faulty.calls();
    let started = tokio::time::Instant::now();
    assert_eq!(cache.get("k").await.unwrap(), None);
    let loaded = cache
        .get_or_load("n", || async {
            Ok::<_, std::io::Error>("loaded".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(loaded, "loaded");
    let refused = cache.set("w", "x".into()).await.unwrap_err();
    assert!(
        matches!(refused, CacheError::CircuitOpen { .. }) && refused.is_transient(),
        "{refused:?}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(fx.faulty.calls(), calls, "L2 was not called");
    // After the open time L2 is back: the first call probes it and closes the breaker.
    tokio::time::sleep(OPEN_FOR).await; // paused clock
    fx.faulty.set_delay(Duration::ZERO);
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
    cache.set("w", "x".into()).await.unwrap();
    assert!(fx.faulty.calls() > calls);
    let mut changes = Vec::new();
    while let Some(event) = events.try_recv() {
        if let CacheEvent::L2Circuit { state } = event {
            changes.push(state);
        }
    }
    assert_eq!(
        changes,
        [
            CircuitState::Open,
            CircuitState::HalfOpen,
            CircuitState::Closed
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_fails_opens_it_for_another_period() {
    let fx = Fixture::new();
    let cache = cache(&fx);
    fx.faulty.set_failing(true);
    for key in ["a", "b", "c"] {
        cache.get(key).await.unwrap();
    }
    tokio::time::sleep(OPEN_FOR).await; // paused clock
    // The probe fails: open again, and the next call is refused without reaching L2.
    cache.get("probe").await.unwrap();
    let calls = fx.faulty.calls();
    assert!(matches!(
        cache.set("w", "x".into()).await,
        Err(CacheError::CircuitOpen { .. })
    ));
    assert_eq!(fx.faulty.calls(), calls);
    assert_eq!(cache.stats().l2_circuit_opens, 2);
}

#[tokio::test]
async fn answers_that_are_errors_about_the_request_do_not_open_it() {
    let fx = Fixture::new();
    let cache = cache(&fx);
    // Bytes that are no envelope: L2 answers, the read is a counted miss. Not a failure.
    for key in ["a", "b", "c", "d"] {
        fx.l2
            .put_raw(&format!("test:{key}"), "garbage", Duration::from_secs(60));
        assert_eq!(cache.get(key).await.unwrap(), None);
    }
    assert_eq!(cache.stats().l2_circuit_opens, 0);
    cache.set("w", "x".into()).await.unwrap();
}

#[test]
fn a_breaker_out_of_range_is_refused() {
    let fx = Fixture::new();
    let error = fx
        .builder("test")
        .l2_circuit_breaker(CircuitBreaker::new(0, OPEN_FOR))
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, CacheError::Configuration(m) if m.contains("l2_circuit_breaker")),
        "{error:?}"
    );
}
