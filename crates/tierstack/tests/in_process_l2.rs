//! An L2 that answers reads at once (an in-process store, `Store::get_now`) is read without
//! awaiting it, and reads the same as an L2 that is awaited.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tierstack::TieredCache;
use tierstack::core::Result;
use tierstack::core::clock::ManualClock;
use tierstack::core::store::{Store, StoredEntry};
use tierstack::core::testkit::MemoryStore;

use common::{Calls, loader};

/// A `MemoryStore` that counts the reads awaited through `get` / `get_with_ttl`.
#[derive(Debug)]
struct CountsAwaitedReads {
    inner: MemoryStore,
    awaited_reads: AtomicUsize,
}

impl CountsAwaitedReads {
    fn awaited_reads(&self) -> usize {
        self.awaited_reads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for CountsAwaitedReads {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.awaited_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key).await
    }
    fn get_now(&self, key: &str) -> Option<Result<Option<Bytes>>> {
        self.inner.get_now(key)
    }
    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        self.awaited_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_with_ttl(key).await
    }
    fn get_with_ttl_now(&self, key: &str) -> Option<Result<Option<StoredEntry>>> {
        self.inner.get_with_ttl_now(key)
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        self.inner.set(key, value, ttl).await
    }
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        self.inner.set_if_absent(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.inner.expire(key, ttl).await
    }
    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        self.inner.ttl(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

struct Fixture {
    clock: ManualClock,
    l2: Arc<CountsAwaitedReads>,
}

impl Fixture {
    fn new() -> Self {
        let clock = ManualClock::new();
        let l2 = Arc::new(CountsAwaitedReads {
            inner: MemoryStore::with_clock(Arc::new(clock.clone())),
            awaited_reads: AtomicUsize::new(0),
        });
        Self { clock, l2 }
    }

    fn cache(&self, with_l1: bool) -> TieredCache<String> {
        let builder = TieredCache::builder("test")
            .l2(self.l2.clone())
            .clock(Arc::new(self.clock.clone()))
            .default_ttl(Duration::from_secs(60));
        let builder = if with_l1 {
            builder
        } else {
            builder.without_l1()
        };
        builder.build().expect("a valid configuration")
    }
}

#[tokio::test]
async fn an_in_process_l2_is_read_without_awaiting_it() {
    let fx = Fixture::new();
    let (l1_less, tiered) = (fx.cache(false), fx.cache(true));
    l1_less.set("k", "v".into()).await.unwrap();
    assert_eq!(l1_less.get("k").await.unwrap().as_deref(), Some("v"));
    assert_eq!(l1_less.get("missing").await.unwrap(), None);
    let calls = Calls::default();
    assert_eq!(
        tiered
            .get_or_load("k", loader(&calls, "loaded"))
            .await
            .unwrap(),
        "v"
    );
    assert_eq!(calls.count(), 0);
    assert_eq!(tiered.stats().l2_hits, 1);
    assert_eq!(l1_less.stats().l2_hits, 1);
    assert_eq!(fx.l2.awaited_reads(), 0, "every read was answered at once");
}

#[tokio::test]
async fn an_l2_hit_read_at_once_fills_l1_with_the_remaining_ttl() {
    let fx = Fixture::new();
    let (writer, reader) = (fx.cache(true), fx.cache(true));
    writer
        .set_with_ttl("k", "v".into(), Duration::from_secs(30))
        .await
        .unwrap();
    fx.clock.advance(Duration::from_secs(20));
    assert_eq!(reader.get("k").await.unwrap().as_deref(), Some("v"));
    assert_eq!(reader.stats().l2_hits, 1);
    // Served by L1 now; and that copy expires with the L2 entry, 10 s later.
    assert_eq!(reader.get("k").await.unwrap().as_deref(), Some("v"));
    assert_eq!(reader.stats().l1_hits, 1);
    fx.clock.advance(Duration::from_secs(10));
    assert_eq!(reader.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn a_corrupt_entry_read_at_once_is_counted_once_and_deleted() {
    for with_l1 in [false, true] {
        let fx = Fixture::new();
        let cache = fx.cache(with_l1);
        fx.l2
            .inner
            .put_raw("test:bad", b"junk".to_vec(), Duration::from_secs(60));
        assert_eq!(cache.get("bad").await.unwrap(), None);
        assert_eq!(cache.stats().corrupt_entries, 1, "with L1: {with_l1}");
        assert_eq!(cache.stats().misses, 1);
        assert_eq!(fx.l2.inner.get("test:bad").await.unwrap(), None);
    }
}
