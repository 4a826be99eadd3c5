//! What the cache logs. This test is alone in its binary on purpose: tracing caches each
//! call site's interest globally, so a test on another thread that reaches the same call site
//! while this one installs its subscriber can leave the site switched off, and the log line
//! never arrives (seen once in CI). One test per binary leaves no other thread to race with.

mod common;

use std::time::Duration;

use common::Fixture;
use tierstack::JsonCodec;
use tierstack::core::clock::Clock;
use tierstack::core::envelope;

/// Records every event's fields as text, on the thread that installs it.
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<String>>);

impl CapturedLogs {
    fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl tracing::Subscriber for CapturedLogs {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields<'a>(&'a mut String);
        impl tracing::field::Visit for Fields<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                let _ = write!(self.0, "{}={value:?} ", field.name());
            }
        }
        event.record(&mut Fields(
            &mut self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A stored value that no longer decodes as the cache's type (a deploy changed it) is logged by
/// the kind of problem: serde's own message quotes the value, and values never reach logs.
#[tokio::test]
async fn an_entry_of_another_type_is_logged_without_its_value() {
    let logs = CapturedLogs::default();
    let _installed = tracing::subscriber::set_default(logs.clone());
    let fx = Fixture::new();
    let now = fx.clock.now();
    let later = now.saturating_add(Duration::from_secs(60));
    let secret = "hunter2-secret-token".to_string();
    let planted = envelope::encode(&JsonCodec, Some(&secret), now, later, 1 << 20).unwrap();
    fx.l2.put_raw("typed:k", planted, Duration::from_secs(60));
    let cache: tierstack::TieredCache<u64, JsonCodec> = tierstack::TieredCache::builder("typed")
        .l2(fx.faulty.clone())
        .codec(JsonCodec)
        .clock(std::sync::Arc::new(fx.clock.clone()))
        .build()
        .unwrap();
    assert_eq!(cache.get("k").await.unwrap(), None);
    assert_eq!(cache.stats().corrupt_entries, 1);
    let logged = logs.text();
    assert!(logged.contains("undecodable"), "{logged}");
    assert!(!logged.contains("hunter2"), "{logged}");
    // A breaker that opens says so in one line (in this test: one test per binary).
    let guarded = fx
        .builder("guarded")
        .l2_circuit_breaker(tierstack::CircuitBreaker::new(2, Duration::from_secs(60)))
        .build()
        .unwrap();
    fx.faulty.set_failing(true);
    for key in ["a", "b", "c"] {
        assert_eq!(guarded.get(key).await.unwrap(), None);
    }
    let logged = logs.text();
    assert_eq!(
        logged.matches("L2 circuit breaker opened").count(),
        1,
        "{logged}"
    );
    fx.faulty.set_failing(false);
    // Entries that do not open under a cache's key ring: logged by the kind of problem, never
    // with the key or the value (also in this test: one test per binary).
    let sentinel_key = "5e471e15e471e15e471e15e471e15e471e15e471e15e471e15e471e15e471e15";
    let sealed = |keys: &str| {
        fx.builder("sealed")
            .without_l1()
            .encryption(tierstack::Encryption::new(
                tierstack::KeyRing::parse(keys).unwrap(),
            ))
            .build()
            .unwrap()
    };
    let writer = sealed(&format!("7:{sentinel_key}"));
    writer.set("a", "hunter2-sealed".into()).await.unwrap();
    writer.set("b", "hunter2-sealed".into()).await.unwrap();
    let copied = tierstack::core::Store::get(&*fx.l2, "sealed:b")
        .await
        .unwrap()
        .unwrap();
    fx.l2
        .put_raw("sealed:a", copied.to_vec(), Duration::from_secs(60));
    assert_eq!(writer.get("a").await.unwrap(), None);
    let other_ring = sealed(&format!("8:{}", "0".repeat(64)));
    assert_eq!(other_ring.get("b").await.unwrap(), None);
    let logged = logs.text();
    assert!(logged.contains("does not authenticate"), "{logged}");
    assert!(logged.contains("key ring does not hold"), "{logged}");
    assert!(!logged.contains("hunter2"), "{logged}");
    assert!(!logged.contains("5e471e15"), "{logged}");
    assert!(!format!("{writer:?} {other_ring:?}").contains("5e471e15"));
}
