//! `set_many` and `delete_many`: each key written as `set` and `delete` write one, at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Fixture, PickyStore, eventually, instances};
use tierstack::core::clock::ManualClock;
use tierstack::core::testkit::MemoryStore;
use tierstack::{CacheError, EntryOptions, TieredCache};

/// How long a condition polled for may take.
const WITHIN: Duration = Duration::from_secs(5);

fn entries(range: std::ops::Range<usize>, version: &str) -> Vec<(String, String)> {
    range
        .map(|i| (format!("k{i}"), format!("{version}{i}")))
        .collect()
}

#[tokio::test]
async fn set_many_writes_both_tiers_and_the_other_instances_evict_their_copies() {
    let l2 = Arc::new(MemoryStore::new());
    let caches = instances(2, Some(&l2));
    let (writer, reader) = (&caches[0], &caches[1]);
    writer.set_many(entries(0..100, "old")).await.unwrap();
    for i in 0..100 {
        // Read into the reader's L1.
        assert_eq!(
            reader.get(&format!("k{i}")).await.unwrap(),
            Some(format!("old{i}"))
        );
    }
    writer.set_many(entries(0..100, "new")).await.unwrap();
    for i in 0..100 {
        let key = format!("k{i}");
        assert_eq!(writer.get(&key).await.unwrap(), Some(format!("new{i}")));
        eventually(WITHIN, async || {
            reader.get(&key).await.unwrap() == Some(format!("new{i}"))
        })
        .await;
    }
    // A third instance reads them from L2.
    let third = &instances(1, Some(&l2))[0];
    assert_eq!(third.get("k99").await.unwrap().as_deref(), Some("new99"));
}

#[tokio::test(start_paused = true)]
async fn of_two_entries_with_one_key_the_later_is_written() {
    // The first write of `a` is the slower: made at once, it would land last.
    let l2 = Arc::new(SlowWrites::default());
    let build = || {
        TieredCache::<String>::builder("test")
            .l2(l2.clone())
            .build()
            .unwrap()
    };
    let cache = build();
    let batch = vec![
        ("a".to_owned(), "slow first".to_owned()),
        ("b".to_owned(), "b".to_owned()),
        ("a".to_owned(), "second".to_owned()),
    ];
    cache.set_many(batch).await.unwrap();
    assert_eq!(cache.get("a").await.unwrap().as_deref(), Some("second"));
    // From L2 too.
    let other = build();
    assert_eq!(other.get("a").await.unwrap().as_deref(), Some("second"));
    assert_eq!(other.get("b").await.unwrap().as_deref(), Some("b"));
}

#[tokio::test]
async fn a_bad_key_or_bad_options_refuse_the_whole_call_and_write_nothing() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("kept", "before".into()).await.unwrap();
    let before = fx.faulty.calls();
    let empty_key = vec![
        ("kept".to_owned(), "after".to_owned()),
        (String::new(), "v".to_owned()),
    ];
    let error = cache.set_many(empty_key).await.unwrap_err();
    assert!(matches!(error, CacheError::InvalidKey { .. }), "{error:?}");
    // A bad key is refused even where a later entry of the same key replaces it.
    let long_key = vec![
        ("x".repeat(10_000), "v".to_owned()),
        ("x".repeat(10_000), "w".to_owned()),
    ];
    let error = cache.set_many(long_key).await.unwrap_err();
    assert!(matches!(error, CacheError::InvalidKey { .. }), "{error:?}");
    let batch = || vec![("kept".to_owned(), "after".to_owned())];
    let zero_ttl = EntryOptions::default().with_ttl(Duration::ZERO);
    let error = cache.set_many_with(batch(), &zero_ttl).await.unwrap_err();
    assert!(matches!(error, CacheError::InvalidTtl { .. }), "{error:?}");
    let bad_jitter = EntryOptions::default().with_jitter(2.0);
    let error = cache.set_many_with(batch(), &bad_jitter).await.unwrap_err();
    assert!(matches!(error, CacheError::Configuration(_)), "{error:?}");
    let error = cache.delete_many(&["kept", ""]).await.unwrap_err();
    assert!(matches!(error, CacheError::InvalidKey { .. }), "{error:?}");
    assert_eq!(fx.faulty.calls(), before, "no L2 call at all");
    assert_eq!(cache.get("kept").await.unwrap().as_deref(), Some("before"));
    // Empty calls do nothing.
    cache
        .set_many(Vec::<(String, String)>::new())
        .await
        .unwrap();
    assert_eq!(cache.delete_many::<&str>(&[]).await.unwrap(), 0);
    assert_eq!(fx.faulty.calls(), before);
}

#[tokio::test]
async fn a_value_over_the_maximum_is_refused_alone() {
    let fx = Fixture::new();
    let cache = fx.builder("test").max_value_len(64).build().unwrap();
    cache.set("big", "before".into()).await.unwrap();
    let batch = vec![
        ("big".to_owned(), "x".repeat(1_000)),
        ("small".to_owned(), "v".to_owned()),
    ];
    let error = cache.set_many(batch).await.unwrap_err();
    assert!(
        matches!(error, CacheError::ValueTooLarge { .. }),
        "{error:?}"
    );
    let other = fx.cache();
    assert_eq!(other.get("big").await.unwrap().as_deref(), Some("before"));
    assert_eq!(other.get("small").await.unwrap().as_deref(), Some("v"));
}

#[tokio::test]
async fn failed_writes_return_the_first_error_and_the_other_writes_stand() {
    let l2 = Arc::new(PickyStore::new());
    let bus = tierstack::core::testkit::MemoryBus::new();
    let build = || {
        TieredCache::<String>::builder("test")
            .l2(l2.clone())
            .backplane(Arc::new(bus.backplane()))
            .build()
            .unwrap()
    };
    let (cache, other) = (build(), build());
    let keys = ["bad-1", "k0", "bad-2", "k1"];
    cache
        .set_many(keys.map(|key| (key, "old".to_owned())))
        .await
        .unwrap();
    for key in keys {
        // Into the other instance's L1.
        assert_eq!(other.get(key).await.unwrap().as_deref(), Some("old"));
    }
    l2.fail_writes_of(Some("bad-1"), true);
    let error = cache
        .set_many(keys.map(|key| (key, "new".to_owned())))
        .await
        .unwrap_err();
    assert!(matches!(error, CacheError::Timeout { .. }), "{error:?}");
    // Then both refused for good.
    l2.fail_writes_of(Some("bad"), false);
    let refused = cache
        .set_many(keys.map(|key| (key, "newer".to_owned())))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, CacheError::ValueTooLarge { .. }),
        "{refused:?}"
    );
    l2.fail_writes_of(None, false);
    for key in ["k0", "k1"] {
        assert_eq!(cache.get(key).await.unwrap().as_deref(), Some("newer"));
        eventually(WITHIN, async || {
            other.get(key).await.unwrap().as_deref() == Some("newer")
        })
        .await;
    }
    // bad-2 was written by the first call. After a failed write, the writer and the others
    // read L2 again.
    for (key, in_l2) in [("bad-1", "old"), ("bad-2", "new")] {
        assert_eq!(cache.get(key).await.unwrap().as_deref(), Some(in_l2));
        eventually(WITHIN, async || {
            let l2_hits = other.stats().l2_hits;
            other.get(key).await.unwrap();
            other.stats().l2_hits > l2_hits
        })
        .await;
    }
}

#[tokio::test]
async fn delete_many_removes_from_both_tiers_counts_and_the_others_evict() {
    let l2 = Arc::new(MemoryStore::new());
    let caches = instances(2, Some(&l2));
    let (writer, reader) = (&caches[0], &caches[1]);
    writer.set_many(entries(0..3, "v")).await.unwrap();
    for i in 0..3 {
        assert!(reader.get(&format!("k{i}")).await.unwrap().is_some());
    }
    let removed = writer
        .delete_many(&["k0", "k1", "missing", "k0"])
        .await
        .unwrap();
    assert_eq!(removed, 2, "the two keys that held a value, k0 once");
    for key in ["k0", "k1"] {
        assert_eq!(writer.get(key).await.unwrap(), None);
        eventually(WITHIN, async || reader.get(key).await.unwrap().is_none()).await;
    }
    assert_eq!(reader.get("k2").await.unwrap().as_deref(), Some("v2"));
    let third = &instances(1, Some(&l2))[0];
    assert_eq!(third.get("k0").await.unwrap(), None);
}

/// An L2 whose writes take 10 ms (50 ms for a value that says "slow"), counting them and how
/// many are in flight at most. A value that says "fail-slow" times out after its 50 ms; one
/// that says "fail-fast" is refused at once. With a `clock`, each write moves it on by 100 ms.
#[derive(Debug, Default)]
struct SlowWrites {
    inner: MemoryStore,
    in_flight: AtomicUsize,
    most: AtomicUsize,
    writes: AtomicUsize,
    clock: Option<ManualClock>,
}

impl SlowWrites {
    async fn write(&self, value: &[u8]) -> tierstack::Result<()> {
        let says = |word: &[u8]| value.windows(word.len()).any(|window| window == word);
        if says(b"fail-fast") {
            return Err(CacheError::ValueTooLarge { size: 2, max: 1 });
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        if let Some(clock) = &self.clock {
            clock.advance(Duration::from_millis(100));
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        // paused clock: the writes overlap only if they are made together.
        tokio::time::sleep(Duration::from_millis(if says(b"slow") { 50 } else { 10 })).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if says(b"fail-slow") {
            return Err(CacheError::Timeout {
                operation: "set",
                after: Duration::from_millis(50),
            });
        }
        Ok(())
    }

    /// The most writes in flight at once since the last call.
    fn most(&self) -> usize {
        self.most.swap(0, Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl tierstack::core::Store for SlowWrites {
    async fn get(&self, key: &str) -> tierstack::Result<Option<bytes::Bytes>> {
        self.inner.get(key).await
    }
    async fn set(&self, key: &str, value: bytes::Bytes, ttl: Duration) -> tierstack::Result<()> {
        self.write(&value).await?;
        self.inner.set(key, value, ttl).await
    }
    async fn set_if_absent(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> tierstack::Result<bool> {
        self.inner.set_if_absent(key, value, ttl).await
    }
    async fn replace(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> tierstack::Result<Option<bytes::Bytes>> {
        self.write(&value).await?;
        self.inner.replace(key, value, ttl).await
    }
    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(bytes::Bytes, Duration)>,
    ) -> tierstack::Result<bool> {
        self.inner.compare_and_set(key, current, new).await
    }
    async fn delete(&self, key: &str) -> tierstack::Result<bool> {
        self.inner.delete(key).await
    }
    async fn expire(&self, key: &str, ttl: Duration) -> tierstack::Result<bool> {
        self.inner.expire(key, ttl).await
    }
    async fn ttl(&self, key: &str) -> tierstack::Result<Option<Duration>> {
        self.inner.ttl(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> tierstack::Result<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn ping(&self) -> tierstack::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_writes_of_a_call_are_in_flight_together() {
    let l2 = Arc::new(SlowWrites::default());
    let cache = TieredCache::<String>::builder("test")
        .l2(l2.clone())
        .build()
        .unwrap();
    cache.set_many(entries(0..100, "v")).await.unwrap();
    assert_eq!(l2.most(), 64, "as many at once as the call allows");
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    assert_eq!(cache.delete_many(&keys).await.unwrap(), 100);
    assert_eq!(l2.most(), 64, "no delete waits for another's lock");
}

#[tokio::test(start_paused = true)]
async fn the_writer_keeps_every_value_it_wrote_in_l1() {
    // Writes of keys that share a freshness stripe, made at once, would each read the other's
    // as a change and leave L1 unfilled.
    let cache = TieredCache::<String>::builder("test")
        .l2(Arc::new(SlowWrites::default()))
        .build()
        .unwrap();
    cache.set_many(entries(0..300, "v")).await.unwrap();
    for i in 0..300 {
        assert_eq!(
            cache.get(&format!("k{i}")).await.unwrap(),
            Some(format!("v{i}"))
        );
    }
    let stats = cache.stats();
    assert_eq!(
        (stats.l1_hits, stats.l2_hits),
        (300, 0),
        "every read an L1 hit"
    );
}

#[tokio::test(start_paused = true)]
async fn each_entry_lives_its_ttl_from_its_own_write() {
    let clock = ManualClock::new();
    let l2 = Arc::new(SlowWrites {
        inner: MemoryStore::with_clock(Arc::new(clock.clone())),
        clock: Some(clock.clone()),
        ..SlowWrites::default()
    });
    let build = || {
        TieredCache::<String>::builder("test")
            .l2(l2.clone())
            .clock(Arc::new(clock.clone()))
            .default_ttl(Duration::from_mins(1))
            .build()
            .unwrap()
    };
    build().set_many(entries(0..100, "v")).await.unwrap();
    // 10 s passed over the 100 writes; the last of them was written, and encoded, at their end.
    let reader = build();
    let mut longest = Duration::ZERO;
    for i in 0..100 {
        let ttl = reader.ttl(&format!("k{i}")).await.unwrap().unwrap();
        longest = longest.max(ttl);
    }
    assert!(longest >= Duration::from_secs(59), "{longest:?}");
}

#[tokio::test(start_paused = true)]
async fn the_first_error_is_that_of_the_first_failed_entry_not_the_first_to_fail() {
    let cache = TieredCache::<String>::builder("test")
        .l2(Arc::new(SlowWrites::default()))
        .build()
        .unwrap();
    // Several that fail fast, so that one at least has a stripe of its own and fails first.
    let batch = [("a", "fail-slow")]
        .into_iter()
        .chain((0..8).map(|i| {
            (
                ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"][i],
                "fail-fast",
            )
        }))
        .chain([("c", "v")])
        .map(|(key, value)| (key.to_owned(), value.to_owned()));
    let error = cache.set_many(batch).await.unwrap_err();
    assert!(matches!(error, CacheError::Timeout { .. }), "{error:?}");
    assert_eq!(cache.get("c").await.unwrap().as_deref(), Some("v"));
}

#[tokio::test(start_paused = true)]
async fn a_key_listed_twice_is_written_once() {
    let l2 = Arc::new(SlowWrites::default());
    let cache = TieredCache::<String>::builder("test")
        .l2(l2.clone())
        .build()
        .unwrap();
    let batch = vec![
        ("a".to_owned(), "1".to_owned()),
        ("b".to_owned(), "2".to_owned()),
        ("a".to_owned(), "3".to_owned()),
    ];
    cache.set_many(batch).await.unwrap();
    assert_eq!(l2.writes.swap(0, Ordering::SeqCst), 2);
    assert_eq!(cache.delete_many(&["a", "b", "a"]).await.unwrap(), 2);
    assert_eq!(l2.writes.load(Ordering::SeqCst), 2, "a tombstone each");
}

#[tokio::test]
async fn bulk_calls_run_in_spawned_tasks() {
    // Their futures are `Send`: a service calls them from any task.
    let cache = Fixture::new().cache();
    let writer = cache.clone();
    tokio::spawn(async move { writer.set_many(entries(0..10, "v")).await })
        .await
        .unwrap()
        .unwrap();
    let deleter = cache.clone();
    let removed = tokio::spawn(async move { deleter.delete_many(&["k0", "k1"]).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(cache.get("k2").await.unwrap().as_deref(), Some("v2"));
}
