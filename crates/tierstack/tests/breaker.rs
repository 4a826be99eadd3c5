//! The L2's circuit breaker: after a run of failures the L2 is skipped (reads answer at once
//! from L1, fail-safe and the loader; writes fail at once), then one call probes it. Time runs
//! on Tokio's paused clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Fixture;
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
    let instance = || {
        fx.builder("test")
            .l2_timeout(TIMEOUT)
            .l2_circuit_breaker(CircuitBreaker::new(3, OPEN_FOR))
            .backplane(Arc::new(bus.backplane()))
            .build()
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    for key in ["k", "j"] {
        a.set(key, "old".into()).await.unwrap();
    }
    tokio::time::sleep(TIMEOUT).await; // paused clock: B's listener takes the sets' news
    let heard = b.stats().invalidations_received;
    assert_eq!(heard, 2);
    for key in ["k", "j"] {
        assert_eq!(b.get(key).await.unwrap(), Some("old".into()));
    }
    fx.faulty.set_failing(true);
    for key in ["x", "y", "z"] {
        a.get(key).await.unwrap();
    }
    assert_eq!(a.stats().l2_circuit_opens, 1);
    // Refused writes fail at once, without a publish's wait, and drop A's own copy: what it
    // wrote did not land, and the old value is not served as if it were the new one.
    let started = tokio::time::Instant::now();
    for _ in 0..10 {
        let refused = a.set("k", "new".into()).await.unwrap_err();
        assert!(matches!(refused, CacheError::CircuitOpen { .. }));
        assert!(matches!(
            a.delete("k").await,
            Err(CacheError::CircuitOpen { .. })
        ));
    }
    // A write that skips the backplane tells nobody, refused or not.
    let quiet = EntryOptions::default().with_skips(Skips {
        backplane: true,
        ..Skips::default()
    });
    let refused = a.set_with("j", "new".into(), &quiet).await.unwrap_err();
    assert!(matches!(refused, CacheError::CircuitOpen { .. }));
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(a.get("k").await.unwrap(), None);
    // The data behind "k" changed (that is why it was written): B hears of it once, when the
    // held invalidation goes out, and drops its copy; of "j" it hears nothing.
    assert_eq!(b.stats().invalidations_received, heard);
    tokio::time::sleep(TIMEOUT * 3).await; // paused clock: the held set's sender runs
    assert_eq!(b.stats().invalidations_received, heard + 1);
    assert_eq!(a.stats().invalidation_sweeps, 0);
    fx.faulty.set_failing(false);
    let l2_hits = b.stats().l2_hits;
    assert_eq!(b.get("j").await.unwrap(), Some("old".into()));
    assert_eq!(b.stats().l2_hits, l2_hits, "B still had its copy of j");
    // L2 still holds the old value of "k" (the writes never reached it): B reads it again.
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    assert_eq!(b.stats().l2_hits, l2_hits + 1);
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

/// A backplane whose publishes fail while told to, over a memory bus.
#[derive(Debug)]
struct FlakyBackplane {
    inner: tierstack::core::testkit::MemoryBackplane,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl tierstack::core::Backplane for FlakyBackplane {
    async fn publish(
        &self,
        namespace: &str,
        invalidation: &tierstack::core::backplane::Invalidation,
    ) -> Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CacheError::Connection {
                endpoint: "bus".into(),
                source: "down".into(),
            });
        }
        self.inner.publish(namespace, invalidation).await
    }

    fn subscribe(&self) -> tierstack::core::backplane::Subscription {
        self.inner.subscribe()
    }
}

#[tokio::test(start_paused = true)]
async fn a_backplane_breaker_holds_invalidations_and_sends_them_when_it_closes() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let flaky = Arc::new(FlakyBackplane {
        inner: bus.backplane(),
        failing: std::sync::atomic::AtomicBool::new(false),
    });
    let a = fx
        .builder("test")
        .l2_timeout(TIMEOUT)
        .backplane(flaky.clone())
        .backplane_circuit_breaker(CircuitBreaker::new(2, OPEN_FOR))
        .build()
        .unwrap();
    let b = fx
        .builder("test")
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap();
    for key in ["k1", "k2", "k3"] {
        a.set(key, "old".into()).await.unwrap();
    }
    tokio::time::sleep(TIMEOUT).await; // paused clock: B hears of the writes
    for key in ["k1", "k2", "k3"] {
        assert_eq!(b.get(key).await.unwrap(), Some("old".into()));
    }
    flaky
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
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
    flaky
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
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
    let flaky = Arc::new(FlakyBackplane {
        inner: bus.backplane(),
        failing: std::sync::atomic::AtomicBool::new(false),
    });
    let a = fx
        .builder("test")
        .l2_timeout(TIMEOUT)
        .backplane(flaky.clone())
        .backplane_circuit_breaker(CircuitBreaker::new(1, OPEN_FOR))
        .build()
        .unwrap();
    let b = fx
        .builder("test")
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap();
    a.set("k", "old".into()).await.unwrap();
    tokio::time::sleep(TIMEOUT).await; // paused clock: B hears of it
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    flaky
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    a.set("k", "new".into()).await.unwrap();
    a.delete_prefix("p:").await.unwrap();
    assert_eq!(a.stats().backplane_circuit_opens, 1);
    // Still down when the breaker first lets a probe through: held again.
    tokio::time::sleep(OPEN_FOR + TIMEOUT).await; // paused clock
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    assert_eq!(a.stats().backplane_circuit_opens, 2, "the probe failed");
    // Back: the next probe sends what is held, though this instance writes nothing more.
    flaky
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(OPEN_FOR + TIMEOUT).await; // paused clock
    assert_eq!(b.get("k").await.unwrap(), Some("new".into()));
}
