//! `set_many` and `delete_many`: each key written as `set` and `delete` write one, at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Fixture, PickyStore, instances};
use tierstack::core::testkit::MemoryStore;
use tierstack::{CacheError, EntryOptions, TieredCache};

/// Polls `check` until it holds (the backplane delivers in a task of its own).
async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within 5 s"
        );
        // poll loop
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

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
        eventually(async || reader.get(&key).await.unwrap() == Some(format!("new{i}"))).await;
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
async fn bad_input_anywhere_refuses_the_whole_call_and_writes_nothing() {
    let fx = Fixture::new();
    let cache = fx.builder("test").max_value_len(64).build().unwrap();
    cache.set("kept", "before".into()).await.unwrap();
    let before = fx.faulty.calls();
    let empty_key = vec![
        ("kept".to_owned(), "after".to_owned()),
        (String::new(), "v".to_owned()),
    ];
    let error = cache.set_many(empty_key).await.unwrap_err();
    assert!(matches!(error, CacheError::InvalidKey { .. }), "{error:?}");
    let too_large = vec![
        ("kept".to_owned(), "after".to_owned()),
        ("big".to_owned(), "x".repeat(1_000)),
    ];
    let error = cache.set_many(too_large).await.unwrap_err();
    assert!(
        matches!(error, CacheError::ValueTooLarge { .. }),
        "{error:?}"
    );
    let zero_ttl = EntryOptions::default().with_ttl(Duration::ZERO);
    let error = cache
        .set_many_with(vec![("kept".to_owned(), "after".to_owned())], &zero_ttl)
        .await
        .unwrap_err();
    assert!(matches!(error, CacheError::InvalidTtl { .. }), "{error:?}");
    let error = cache.delete_many(&["kept", ""]).await.unwrap_err();
    assert!(matches!(error, CacheError::InvalidKey { .. }), "{error:?}");
    assert_eq!(fx.faulty.calls(), before, "no L2 call at all");
    assert_eq!(cache.get("kept").await.unwrap().as_deref(), Some("before"));
    assert!(fx.holds("test:kept").await);
}

#[tokio::test]
async fn a_failed_write_returns_its_error_and_the_other_writes_stand() {
    let l2 = Arc::new(PickyStore::new());
    let build = || {
        TieredCache::<String>::builder("test")
            .l2(l2.clone())
            .build()
            .unwrap()
    };
    let cache = build();
    cache
        .set_many(
            entries(0..3, "old")
                .into_iter()
                .chain([("bad".to_owned(), "old".to_owned())]),
        )
        .await
        .unwrap();
    l2.fail_writes_of(Some("bad"), true);
    let batch = entries(0..3, "new")
        .into_iter()
        .chain([("bad".to_owned(), "new".to_owned())]);
    let error = cache.set_many(batch).await.unwrap_err();
    assert!(matches!(error, CacheError::Timeout { .. }), "{error:?}");
    l2.fail_writes_of(None, false);
    let other = build();
    for i in 0..3 {
        let key = format!("k{i}");
        assert_eq!(cache.get(&key).await.unwrap(), Some(format!("new{i}")));
        assert_eq!(other.get(&key).await.unwrap(), Some(format!("new{i}")));
    }
    // The failed write left no local copy to serve: this instance reads L2 again.
    assert_eq!(cache.get("bad").await.unwrap().as_deref(), Some("old"));
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
        eventually(async || reader.get(key).await.unwrap().is_none()).await;
    }
    assert_eq!(reader.get("k2").await.unwrap().as_deref(), Some("v2"));
    let third = &instances(1, Some(&l2))[0];
    assert_eq!(third.get("k0").await.unwrap(), None);
}

/// An L2 whose writes take 10 ms (50 ms for a value that says "slow"), counting how many are
/// in flight at most.
#[derive(Debug, Default)]
struct SlowWrites {
    inner: MemoryStore,
    in_flight: AtomicUsize,
    most: AtomicUsize,
}

impl SlowWrites {
    async fn write(&self, value: &[u8]) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let slow = value.windows(4).any(|window| window == b"slow");
        // paused clock: the writes overlap only if they are made together.
        tokio::time::sleep(Duration::from_millis(if slow { 50 } else { 10 })).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
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
        self.write(&value).await;
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
        self.write(&value).await;
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
    cache.set_many(entries(0..32, "v")).await.unwrap();
    assert_eq!(l2.most(), 32, "every write at once");
    let keys: Vec<String> = (0..32).map(|i| format!("k{i}")).collect();
    assert_eq!(cache.delete_many(&keys).await.unwrap(), 32);
    // A delete holds its key's lock stripe (one of 256) through its L2 call, so that two
    // keys of one stripe wait for each other.
    assert!(l2.most() >= 16, "deletes in flight together");
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
