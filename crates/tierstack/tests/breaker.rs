//! The L2's circuit breaker: after a run of failures the L2 is skipped (reads answer at once
//! from L1, fail-safe and the loader; writes fail at once), then one call probes it. Time runs
//! on Tokio's paused clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Fixture, FlakyBackplane};
use tierstack::core::testkit::MemoryBus;
use tierstack::core::{CacheError, Result, Store};
use tierstack::{CacheEvent, CircuitBreaker, CircuitState, EntryOptions, Skips, TieredCache};

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

/// A store whose server refuses every request (as Redis answers `WRONGTYPE`): it answers.
#[derive(Debug)]
struct Refusing;

#[async_trait::async_trait]
impl Store for Refusing {
    async fn get(&self, _: &str) -> Result<Option<Bytes>> {
        Err(refusal())
    }
    async fn set(&self, _: &str, _: Bytes, _: Duration) -> Result<()> {
        Err(refusal())
    }
    async fn set_if_absent(&self, _: &str, _: Bytes, _: Duration) -> Result<bool> {
        Err(refusal())
    }
    async fn replace(&self, _: &str, _: Bytes, _: Duration) -> Result<Option<Bytes>> {
        Err(refusal())
    }
    async fn compare_and_set(
        &self,
        _: &str,
        _: &[u8],
        _: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        Err(refusal())
    }
    async fn delete(&self, _: &str) -> Result<bool> {
        Err(refusal())
    }
    async fn expire(&self, _: &str, _: Duration) -> Result<bool> {
        Err(refusal())
    }
    async fn ttl(&self, _: &str) -> Result<Option<Duration>> {
        Err(refusal())
    }
    async fn delete_prefix(&self, _: &str) -> Result<u64> {
        Err(refusal())
    }
    async fn ping(&self) -> Result<()> {
        Err(refusal())
    }
}

/// A second instance on `fx`'s L2 that hears `bus`, with no policies of its own.
fn listener(fx: &Fixture, bus: &MemoryBus) -> TieredCache<String> {
    fx.builder("test")
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap()
}

fn refusal() -> CacheError {
    CacheError::backend("call", false, "WRONGTYPE")
}

#[tokio::test(start_paused = true)]
async fn answers_that_are_errors_about_the_request_do_not_open_it() {
    let cache: TieredCache<String> = TieredCache::builder("test")
        .l2(Arc::new(Refusing))
        .l2_timeout(TIMEOUT)
        .l2_circuit_breaker(CircuitBreaker::new(3, OPEN_FOR))
        .build()
        .unwrap();
    for key in ["a", "b", "c", "d"] {
        assert_eq!(cache.get(key).await.unwrap(), None);
        let refused = cache.set(key, "v".into()).await.unwrap_err();
        assert!(matches!(refused, CacheError::Backend { .. }), "{refused:?}");
    }
    assert_eq!(cache.stats().l2_errors, 8, "every call reached the store");
    assert_eq!(cache.stats().l2_circuit_opens, 0);
}

#[tokio::test(start_paused = true)]
async fn a_callers_own_short_deadline_does_not_open_it() {
    let fx = Fixture::new();
    let cache = cache(&fx);
    fx.faulty.set_delay(Duration::from_secs(60));
    // A hard timeout of a fifth of the L2 timeout cuts each L2 read short: no failure of L2.
    let hurried = EntryOptions::default().with_hard_timeout(TIMEOUT / 5);
    for key in ["a", "b", "c", "d"] {
        let started = tokio::time::Instant::now();
        let _ = cache
            .get_or_load_with(key, &hurried, || async {
                Ok::<_, std::io::Error>("loaded".to_owned())
            })
            .await;
        assert!(started.elapsed() <= TIMEOUT / 5);
    }
    assert_eq!(cache.stats().l2_circuit_opens, 0);
    // Reads with the whole L2 timeout to run in do count.
    for key in ["e", "f", "g"] {
        assert_eq!(cache.get(key).await.unwrap(), None);
    }
    assert_eq!(cache.stats().l2_circuit_opens, 1);
}

#[tokio::test(start_paused = true)]
async fn a_refused_write_tells_the_others_without_waiting_for_the_backplane() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let flaky = Arc::new(FlakyBackplane::new(bus.backplane()));
    let a = fx
        .builder("test")
        .l2_timeout(TIMEOUT)
        .l2_circuit_breaker(CircuitBreaker::new(3, OPEN_FOR))
        .backplane(flaky.clone())
        .build()
        .unwrap();
    let b = fx
        .builder("test")
        .l2_timeout(TIMEOUT)
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap();
    // One key per kind of write, and one written with the backplane skipped.
    let keys = [
        "set",
        "delete",
        "if_absent",
        "tagged",
        "compare",
        "touch",
        "quiet",
        "p:1",
    ];
    for key in keys {
        a.set(key, "old".into()).await.unwrap();
    }
    tokio::time::sleep(TIMEOUT).await; // paused clock: B's listener takes the sets' news
    for key in keys {
        assert_eq!(b.get(key).await.unwrap(), Some("old".into()), "{key}");
    }
    let heard = b.stats().invalidations_received;
    fx.faulty.set_failing(true);
    for key in ["x", "y", "z"] {
        a.get(key).await.unwrap();
    }
    assert_eq!(a.stats().l2_circuit_opens, 1);
    // Refused writes fail at once, even with a backplane that would hang a publish until the
    // deadline.
    flaky.set_stalling(true);
    let refused = |result: Result<()>| {
        let error = result.unwrap_err();
        assert!(matches!(error, CacheError::CircuitOpen { .. }), "{error:?}");
    };
    let options = EntryOptions::default();
    let started = tokio::time::Instant::now();
    refused(a.set("set", "new".into()).await);
    refused(a.delete("delete").await.map(drop));
    refused(
        a.set_if_absent("if_absent", "new".into(), &options)
            .await
            .map(drop),
    );
    let old = String::from("old");
    let compared = a.compare_and_set("compare", &old, Some("new".into()), &options);
    refused(compared.await.map(drop));
    // A tagged write reads its tags' records first: refused there, it never wrote either.
    refused(
        a.set_with_tags("tagged", "new".into(), &["t"], &options)
            .await,
    );
    refused(a.touch("touch", Duration::from_secs(600)).await.map(drop));
    let quiet = options.with_skips(Skips {
        backplane: true,
        ..Skips::default()
    });
    refused(a.set_with("quiet", "new".into(), &quiet).await);
    refused(a.delete_prefix("p:").await.map(drop));
    assert_eq!(started.elapsed(), Duration::ZERO);
    // A dropped its own copies: what it wrote did not land, and the old value is not served
    // as if it were the new one.
    assert_eq!(a.get("set").await.unwrap(), None);
    flaky.set_stalling(false);
    tokio::time::sleep(TIMEOUT * 3).await; // paused clock: the held set's sender runs
    assert!(b.stats().invalidations_received > heard);
    assert_eq!(a.stats().invalidation_sweeps, 0);
    // The data behind each write changed (that is why it was written): B dropped its copy and
    // reads L2 (failing: a miss). A refused `touch` changed no data, and a call that skips the
    // backplane tells nobody: B still serves those from L1.
    for key in ["set", "delete", "if_absent", "compare", "tagged", "p:1"] {
        assert_eq!(b.get(key).await.unwrap(), None, "{key}");
    }
    for key in ["touch", "quiet"] {
        assert_eq!(b.get(key).await.unwrap(), Some("old".into()), "{key}");
    }
    // L2 still holds the old values (the writes never reached it): B reads them again.
    fx.faulty.set_failing(false);
    assert_eq!(b.get("set").await.unwrap(), Some("old".into()));
}

#[tokio::test(start_paused = true)]
async fn a_refused_write_reaches_the_others_within_an_l2_timeout_through_a_closed_backplane_breaker()
 {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let a = fx
        .builder("test")
        .l2_timeout(TIMEOUT)
        .l2_circuit_breaker(CircuitBreaker::new(3, OPEN_FOR))
        .backplane(Arc::new(bus.backplane()))
        .backplane_circuit_breaker(CircuitBreaker::new(3, OPEN_FOR))
        .build()
        .unwrap();
    let b = listener(&fx, &bus);
    a.set("k", "old".into()).await.unwrap();
    tokio::time::sleep(TIMEOUT).await; // paused clock: B hears of the write
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    let heard = b.stats().invalidations_received;
    fx.faulty.set_failing(true);
    for key in ["x", "y", "z"] {
        a.get(key).await.unwrap();
    }
    let refused = a.set("k", "new".into()).await.unwrap_err();
    assert!(
        matches!(refused, CacheError::CircuitOpen { .. }),
        "{refused:?}"
    );
    // The backplane takes messages: the notice does not wait for the backplane breaker's
    // `open_for` (5 s).
    tokio::time::sleep(TIMEOUT * 2).await; // paused clock: the held set's first round
    assert_eq!(b.stats().invalidations_received, heard + 1);
    assert_eq!(a.stats().backplane_circuit_opens, 0);
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
    // The backplane's breaker takes the same settings, checked the same way.
    let error = fx
        .builder("test")
        .backplane_circuit_breaker(CircuitBreaker::new(1, Duration::ZERO))
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, CacheError::Configuration(m) if m.contains("backplane_circuit_breaker")),
        "{error:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backplane_breaker_holds_invalidations_and_sends_them_when_it_closes() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let flaky = Arc::new(FlakyBackplane::new(bus.backplane()));
    let a = fx
        .builder("test")
        .l2_timeout(TIMEOUT)
        .backplane(flaky.clone())
        .backplane_circuit_breaker(CircuitBreaker::new(2, OPEN_FOR))
        .build()
        .unwrap();
    let b = listener(&fx, &bus);
    for key in ["k1", "k2", "k3"] {
        a.set(key, "old".into()).await.unwrap();
    }
    tokio::time::sleep(TIMEOUT).await; // paused clock: B hears of the writes
    for key in ["k1", "k2", "k3"] {
        assert_eq!(b.get(key).await.unwrap(), Some("old".into()));
    }
    flaky.set_failing(true);
    // Two failed publishes open it; the writes go on, and nobody waits for the backplane.
    a.set("k1", "new".into()).await.unwrap();
    a.set("k2", "new".into()).await.unwrap();
    assert_eq!(a.stats().backplane_circuit_opens, 1);
    let errors = a.stats().publish_errors;
    let started = tokio::time::Instant::now();
    a.set("k3", "new".into()).await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(a.stats().publish_errors, errors, "held, not sent");
    // B still serves its old copies: it was not told.
    assert_eq!(b.get("k3").await.unwrap(), Some("old".into()));
    // The backplane is back: after the open time, a publish probes it and the held ones follow.
    flaky.set_failing(false);
    tokio::time::sleep(OPEN_FOR).await; // paused clock
    a.set("probe", "p".into()).await.unwrap();
    tokio::time::sleep(TIMEOUT).await; // paused clock: the held invalidations go out
    for key in ["k1", "k2", "k3"] {
        assert_eq!(b.get(key).await.unwrap(), Some("new".into()), "{key}");
    }
}

#[tokio::test(start_paused = true)]
async fn held_invalidations_go_out_without_another_publish_once_the_backplane_is_back() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let flaky = Arc::new(FlakyBackplane::new(bus.backplane()));
    let a = fx
        .builder("test")
        .l2_timeout(TIMEOUT)
        .backplane(flaky.clone())
        .backplane_circuit_breaker(CircuitBreaker::new(1, OPEN_FOR))
        .build()
        .unwrap();
    let b = listener(&fx, &bus);
    a.set("k", "old".into()).await.unwrap();
    tokio::time::sleep(TIMEOUT).await; // paused clock: B hears of it
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    flaky.set_failing(true);
    a.set("k", "new".into()).await.unwrap();
    a.delete_prefix("p:").await.unwrap();
    assert_eq!(a.stats().backplane_circuit_opens, 1);
    // Still down when the breaker first lets a probe through: held again.
    tokio::time::sleep(OPEN_FOR + TIMEOUT).await; // paused clock
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    assert_eq!(a.stats().backplane_circuit_opens, 2, "the probe failed");
    // Back: the next probe sends what is held, though this instance writes nothing more.
    flaky.set_failing(false);
    tokio::time::sleep(OPEN_FOR + TIMEOUT).await; // paused clock
    assert_eq!(b.get("k").await.unwrap(), Some("new".into()));
}
