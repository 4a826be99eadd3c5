//! The read path (L1, L2, loader), the write path and the key operations of `TieredCache`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Calls, Fixture, loader};
use tierstack::core::Store;
use tierstack::core::clock::Clock;
use tierstack::core::envelope::Envelope;
use tierstack::{BincodeCodec, CacheError, JsonCodec, Source, TieredCache};

#[tokio::test]
async fn a_miss_loads_once_and_fills_both_tiers() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    assert_eq!(
        cache.get_or_load("k", loader(&calls, "v")).await.unwrap(),
        "v"
    );
    assert_eq!(
        cache
            .get_or_load("k", loader(&calls, "other"))
            .await
            .unwrap(),
        "v"
    );
    assert_eq!(calls.count(), 1);
    cache.wait_for_background_fills().await;
    let stored = fx.l2.get("test:k").await.unwrap().expect("written to L2");
    let envelope = Envelope::parse::<BincodeCodec>(&stored, 1 << 20).unwrap();
    assert_eq!(envelope.written_at, fx.clock.now());
    let stats = cache.stats();
    assert_eq!(
        (stats.l1_hits, stats.l2_hits, stats.misses, stats.loads),
        (1, 0, 1, 1)
    );
}

#[tokio::test]
async fn an_l1_miss_is_served_by_l2_with_the_remaining_ttl() {
    let fx = Fixture::new();
    let writer = fx.cache();
    let reader = fx.cache();
    writer
        .set_with_ttl("k", "v".into(), Duration::from_secs(30))
        .await
        .unwrap();
    fx.clock.advance(Duration::from_secs(20));
    let calls = Calls::default();
    assert_eq!(
        reader
            .get_or_load("k", loader(&calls, "loaded"))
            .await
            .unwrap(),
        "v"
    );
    assert_eq!(calls.count(), 0);
    assert_eq!(reader.stats().l2_hits, 1);
    // The L1 copy expires with the L2 entry, 10 s later, not a full TTL later.
    fx.clock.advance(Duration::from_secs(10));
    assert_eq!(reader.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn the_l1_ttl_caps_how_long_l1_serves() {
    let fx = Fixture::new();
    let cache = fx
        .builder("test")
        .l1_ttl(Duration::from_secs(5))
        .build()
        .unwrap();
    cache.set("k", "v".into()).await.unwrap();
    fx.clock.advance(Duration::from_secs(6));
    fx.faulty.set_failing(true);
    assert_eq!(
        cache.get("k").await.unwrap(),
        None,
        "L1 must not serve past its own TTL"
    );
    fx.faulty.set_failing(false);
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
}

#[tokio::test]
async fn write_through_then_delete_in_both_tiers() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("k", "v1".into()).await.unwrap();
    assert!(fx.l2.get("test:k").await.unwrap().is_some());
    assert!(cache.exists("k").await.unwrap());
    assert!(cache.delete("k").await.unwrap());
    assert!(!fx.holds("test:k").await, "only a tombstone is left");
    assert!(!cache.delete("k").await.unwrap(), "nothing left to delete");
    assert_eq!(cache.get("k").await.unwrap(), None);
    assert!(!cache.exists("k").await.unwrap());
    assert!(!cache.delete("k").await.unwrap());
}

#[tokio::test]
async fn ttl_and_touch_give_a_sliding_expiry() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let other = fx.cache();
    cache
        .set_with_ttl("session", "s".into(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        cache.ttl("session").await.unwrap(),
        Some(Duration::from_secs(10))
    );
    for _ in 0..3 {
        fx.clock.advance(Duration::from_secs(8));
        assert!(
            cache
                .touch("session", Duration::from_secs(10))
                .await
                .unwrap()
        );
    }
    assert_eq!(cache.get("session").await.unwrap(), Some("s".into()));
    // Another instance fills from L2 with the extended deadline.
    assert_eq!(other.get("session").await.unwrap(), Some("s".into()));
    fx.clock.advance(Duration::from_secs(9));
    assert_eq!(other.get("session").await.unwrap(), Some("s".into()));
    fx.clock.advance(Duration::from_secs(2));
    assert_eq!(cache.get("session").await.unwrap(), None);
    assert_eq!(other.get("session").await.unwrap(), None);
    assert!(
        !cache
            .touch("session", Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(cache.ttl("session").await.unwrap(), None);
}

#[tokio::test]
async fn delete_prefix_removes_literal_prefixes_in_both_tiers() {
    let fx = Fixture::new();
    let cache = fx.cache();
    for key in ["user:1", "user:2", "user*:3", "users:4", "order:1"] {
        cache.set(key, key.into()).await.unwrap();
    }
    assert_eq!(cache.delete_prefix("user:").await.unwrap(), 2);
    for key in ["user:1", "user:2"] {
        assert_eq!(cache.get(key).await.unwrap(), None);
    }
    for key in ["user*:3", "users:4", "order:1"] {
        assert_eq!(cache.get(key).await.unwrap(), Some(key.to_owned()));
    }
}

#[tokio::test]
async fn namespaces_sharing_an_l2_never_see_each_other() {
    let fx = Fixture::new();
    let users = fx.builder("users").build().unwrap();
    let admins = fx.builder("users-admin").build().unwrap();
    users.set("1", "user".into()).await.unwrap();
    admins.set("1", "admin".into()).await.unwrap();
    users.invalidate_local_all();
    assert_eq!(users.get("1").await.unwrap(), Some("user".into()));
    assert_eq!(users.delete_prefix("").await.unwrap(), 1);
    assert_eq!(admins.get("1").await.unwrap(), Some("admin".into()));
}

#[tokio::test]
async fn invalidate_local_only_touches_this_l1() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("k", "v".into()).await.unwrap();
    cache.invalidate_local("k");
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
    assert_eq!(
        cache.stats().l2_hits,
        1,
        "served by L2 after the local eviction"
    );
}

#[tokio::test]
async fn get_many_reads_l2_in_one_round_trip() {
    let fx = Fixture::new();
    let writer = fx.cache();
    let reader = fx.cache();
    for i in 0..10 {
        writer.set(&format!("k{i}"), i.to_string()).await.unwrap();
    }
    reader.get("k0").await.unwrap();
    let before = fx.faulty.calls();
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = reader.get_many(&refs).await.unwrap();
    assert_eq!(
        fx.faulty.calls() - before,
        1,
        "one L2 call for the 11 L1 misses"
    );
    for (i, value) in values.iter().enumerate() {
        assert_eq!(value.as_deref(), (i < 10).then(|| i.to_string()).as_deref());
    }
}

#[tokio::test]
async fn get_or_load_many_calls_the_loader_once_for_the_keys_still_missing() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("a", "A".into()).await.unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    let values = cache
        .get_or_load_many(&["a", "b", "c", "b"], move |keys| {
            seen.lock().unwrap().push(keys.clone());
            async move {
                Ok::<_, std::io::Error>(
                    keys.into_iter()
                        .filter(|k| k != "c")
                        .map(|k| (k.clone(), k.to_uppercase()))
                        .collect::<HashMap<_, _>>(),
                )
            }
        })
        .await
        .unwrap();
    assert_eq!(
        values,
        vec![Some("A".into()), Some("B".into()), None, Some("B".into())]
    );
    assert_eq!(
        *asked.lock().unwrap(),
        vec![vec!["b".to_owned(), "c".to_owned()]]
    );
    assert!(
        fx.l2.get("test:b").await.unwrap().is_some(),
        "loaded values are written through"
    );
    let again = cache
        .get_or_load_many(&["a", "b"], |_| async {
            Err::<HashMap<String, String>, _>("not called")
        })
        .await
        .unwrap();
    assert_eq!(again, vec![Some("A".into()), Some("B".into())]);
}

/// Looks up a key the origin does not have, `times` times; returns how often the origin was asked.
async fn ghost_lookups(cache: &TieredCache<String>, times: usize) -> usize {
    let calls = Calls::default();
    for _ in 0..times {
        let c = calls.clone();
        let found = cache
            .get_or_load_optional("ghost", move || {
                c.hit();
                async { Ok::<Option<String>, std::io::Error>(None) }
            })
            .await
            .unwrap();
        assert_eq!(found, None);
    }
    calls.count()
}

#[tokio::test]
async fn negative_caching_is_opt_in() {
    let fx = Fixture::new();
    let plain = fx.cache();
    assert_eq!(
        ghost_lookups(&plain, 2).await,
        2,
        "without negative_ttl every lookup asks the origin"
    );
    let negative = fx
        .builder("neg")
        .negative_ttl(Duration::from_secs(5))
        .build()
        .unwrap();
    assert_eq!(ghost_lookups(&negative, 3).await, 1);
    assert!(!negative.exists("ghost").await.unwrap());
    fx.clock.advance(Duration::from_secs(6));
    assert_eq!(ghost_lookups(&negative, 1).await, 1, "the absence expired");
}

#[tokio::test]
async fn a_cached_absence_does_not_answer_get_or_load() {
    let fx = Fixture::new();
    let negative = fx
        .builder("neg")
        .negative_ttl(Duration::from_secs(5))
        .build()
        .unwrap();
    assert_eq!(ghost_lookups(&negative, 2).await, 1);
    // `get_or_load` needs a value: the absence is not an error of its own, the loader runs.
    let calls = Calls::default();
    let loaded = negative.get_or_load("ghost", loader(&calls, "x")).await;
    assert_eq!(loaded.unwrap(), "x");
    assert_eq!(calls.count(), 1);
    assert_eq!(negative.get("ghost").await.unwrap(), Some("x".into()));
}

#[tokio::test]
async fn ttl_jitter_stays_within_its_fraction() {
    let fx = Fixture::new();
    let cache = fx.builder("jitter").ttl_jitter(0.5).build().unwrap();
    let mut seen = Vec::new();
    for i in 0..50 {
        let key = format!("k{i}");
        cache
            .set_with_ttl(&key, "v".into(), Duration::from_secs(100))
            .await
            .unwrap();
        let ttl = fx.l2.ttl(&format!("jitter:{key}")).await.unwrap().unwrap();
        assert!(
            ttl >= Duration::from_secs(100) && ttl <= Duration::from_secs(150),
            "{ttl:?}"
        );
        seen.push(ttl);
    }
    seen.dedup();
    assert!(seen.len() > 1, "jitter must vary the TTL");
}

#[tokio::test]
async fn a_json_cache_stores_json() {
    let fx = Fixture::new();
    let cache: TieredCache<serde_json::Value, JsonCodec> = TieredCache::builder("json")
        .l2(fx.faulty.clone())
        .codec(JsonCodec)
        .build()
        .unwrap();
    let value = serde_json::json!({"theme": "dark", "n": [1, 2]});
    cache.set("prefs", value.clone()).await.unwrap();
    let bytes = fx.l2.get("json:prefs").await.unwrap().unwrap();
    assert!(
        bytes.ends_with(br#"{"n":[1,2],"theme":"dark"}"#)
            || bytes.ends_with(br#"{"theme":"dark","n":[1,2]}"#)
    );
    cache.invalidate_local_all();
    assert_eq!(cache.get("prefs").await.unwrap(), Some(value));
}

#[tokio::test]
async fn an_l1_only_cache_works_without_l2() {
    let cache: TieredCache<u64> = TieredCache::builder("local").build().unwrap();
    assert_eq!(
        cache
            .get_or_load("n", || async { Ok::<_, std::io::Error>(7) })
            .await
            .unwrap(),
        7
    );
    assert_eq!(cache.get("n").await.unwrap(), Some(7));
    assert!(cache.ttl("n").await.unwrap().is_some());
    assert!(cache.touch("n", Duration::from_secs(1)).await.unwrap());
    assert!(cache.delete("n").await.unwrap());
    assert_eq!(cache.get("n").await.unwrap(), None);
}

#[tokio::test]
async fn builder_refuses_bad_configuration() {
    let bad = [
        TieredCache::<String>::builder("bad:ns").build().err(),
        TieredCache::<String>::builder("ok")
            .default_ttl(Duration::ZERO)
            .build()
            .err(),
        TieredCache::<String>::builder("ok")
            .ttl_jitter(2.0)
            .build()
            .err(),
        TieredCache::<String>::builder("ok")
            .max_value_len(3)
            .build()
            .err(),
        TieredCache::<String>::builder("ok")
            .max_key_len(0)
            .build()
            .err(),
        TieredCache::<String>::builder("ok")
            .l2_timeout(Duration::ZERO)
            .build()
            .err(),
        // Its load lease's key would not fit a store key.
        TieredCache::<String>::builder("ok")
            .max_key_len(tierstack::core::key::DEFAULT_MAX_STORE_KEY_LEN - "ok:".len())
            .build()
            .err(),
        // Would overflow the key-length arithmetic (a panic in debug builds).
        TieredCache::<String>::builder("ok")
            .max_key_len(usize::MAX)
            .build()
            .err(),
        TieredCache::<String>::builder("ok")
            .tombstone_ttl(Duration::ZERO)
            .build()
            .err(),
    ];
    for (i, err) in bad.into_iter().enumerate() {
        assert!(
            matches!(err, Some(CacheError::Configuration(_))),
            "case {i}: {err:?}"
        );
    }
}

#[test]
fn a_backplane_needs_a_runtime_at_build() {
    let bus = tierstack::core::testkit::MemoryBus::new();
    let err = TieredCache::<String>::builder("ns")
        .backplane(Arc::new(bus.backplane()))
        .build()
        .err();
    assert!(matches!(err, Some(CacheError::Configuration(_))));
}

#[tokio::test]
async fn get_with_reads_the_tiers_its_options_allow() {
    // Two instances on one L2 without a backplane: `b`'s L1 keeps what it read.
    let l2 = Arc::new(tierstack::core::testkit::MemoryStore::new());
    let instance = || {
        TieredCache::<String>::builder("shared")
            .l2(l2.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    assert!(!b.l1_kept_coherent());
    a.set("k", "old".into()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    a.set("k", "new".into()).await.unwrap();
    let options = b.default_options();
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()), "L1 answers");
    let mut skips = options.skips();
    skips.l1_read = true;
    skips.l1_write = true;
    let past_l1 = options.with_skips(skips);
    assert_eq!(b.get_with("k", &past_l1).await.unwrap(), Some("new".into()));
    assert_eq!(
        b.get("k").await.unwrap(),
        Some("old".into()),
        "l1_write kept the L2 answer out of L1"
    );
    let mut skips = options.skips();
    skips.l2_read = true;
    let l1_only = options.with_skips(skips);
    assert_eq!(b.get_with("other", &l1_only).await.unwrap(), None);
    a.set("other", "in L2".into()).await.unwrap();
    assert_eq!(b.get_with("other", &l1_only).await.unwrap(), None);
    assert_eq!(
        b.get_with("other", &options).await.unwrap(),
        Some("in L2".into())
    );
    let coherent = TieredCache::<String>::builder("alone").build().unwrap();
    assert!(coherent.l1_kept_coherent(), "no L2: nothing to share");
}

#[tokio::test]
async fn a_read_without_l1_reports_the_ttl_a_touch_gave() {
    let cache = TieredCache::<String>::builder("no-l1")
        .l2(Arc::new(tierstack::core::testkit::MemoryStore::new()))
        .without_l1()
        .build()
        .unwrap();
    cache
        .set_with_ttl("k", "v".into(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(cache.touch("k", Duration::from_secs(600)).await.unwrap());
    let options = cache.default_options();
    let fetched = cache
        .get_or_load_with("k", &options, || async {
            Err::<String, _>(std::io::Error::other("the value is in L2"))
        })
        .await
        .unwrap();
    assert_eq!(fetched.source, tierstack::Source::L2);
    let ttl = fetched.ttl.unwrap();
    assert!(ttl > Duration::from_secs(590), "{ttl:?}");
}

/// `get_fetched` is a plain read that says where the value came from and how long it lives:
/// L1 or L2, the TTL an `expire` moved included, nothing loaded.
#[tokio::test]
async fn a_plain_read_answers_its_source_and_remaining_ttl() {
    let fixture = Fixture::new();
    let cache = fixture.cache();
    let options = cache.default_options();
    cache
        .set_with_ttl("k", "v".into(), Duration::from_secs(60))
        .await
        .unwrap();
    let found = cache.get_fetched("k", &options).await.unwrap().unwrap();
    assert_eq!(
        (found.value.as_str(), found.source, found.stale),
        ("v", Source::L1, false)
    );
    assert_eq!(
        found.ttl,
        Some(Duration::from_secs(60)),
        "the manual clock stood still"
    );
    fixture.clock.advance(Duration::from_secs(10));
    assert!(cache.touch("k", Duration::from_secs(300)).await.unwrap());
    cache.invalidate_local("k");
    let found = cache.get_fetched("k", &options).await.unwrap().unwrap();
    assert_eq!(found.source, Source::L2);
    assert_eq!(
        found.ttl,
        Some(Duration::from_secs(300)),
        "the deadline touch moved"
    );
    assert_eq!(cache.get_fetched("missing", &options).await.unwrap(), None);
    fixture.faulty.set_failing(true);
    cache.invalidate_local("k");
    assert_eq!(
        cache.get_fetched("k", &options).await.unwrap(),
        None,
        "a failure reads as a miss"
    );
    let strict = options.with_l2_errors_returned(true);
    assert!(
        cache.get_fetched("k", &strict).await.is_err(),
        "unless asked otherwise"
    );
    // The same for a batch.
    assert_eq!(cache.get_many_with(&["k"], &options).await.unwrap(), [None]);
    assert!(cache.get_many_with(&["k"], &strict).await.is_err());
}
