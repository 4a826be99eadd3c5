//! Helpers shared by the composer's integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::TieredCache;
use tierstack::core::clock::ManualClock;
use tierstack::core::testkit::{FaultyStore, MemoryStore};

/// A cache over a fault-injectable in-memory L2, all on one manual clock.
pub struct Fixture {
    pub clock: ManualClock,
    pub l2: Arc<MemoryStore>,
    pub faulty: Arc<FaultyStore>,
}

impl Fixture {
    pub fn new() -> Self {
        let clock = ManualClock::new();
        let l2 = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        let faulty = Arc::new(FaultyStore::new(l2.clone()));
        Self { clock, l2, faulty }
    }

    pub fn builder(&self, namespace: &str) -> tierstack::TieredCacheBuilder<String> {
        TieredCache::builder(namespace)
            .l2(self.faulty.clone())
            .clock(Arc::new(self.clock.clone()))
            .default_ttl(Duration::from_secs(60))
    }

    pub fn cache(&self) -> TieredCache<String> {
        self.builder("test").build().unwrap()
    }

    /// Whether L2 holds an entry (a value or a negative entry, not a delete's tombstone) under
    /// the store key `store_key`.
    pub async fn holds(&self, store_key: &str) -> bool {
        use tierstack::core::Store as _;
        use tierstack::core::envelope::Envelope;
        let Some(bytes) = self.l2.get(store_key).await.unwrap() else {
            return false;
        };
        !Envelope::parse::<tierstack::core::BincodeCodec>(&bytes, usize::MAX)
            .is_ok_and(|envelope| envelope.tombstone)
    }
}

/// Polls `check` until it holds, failing the test after `within` (a backplane delivers in a
/// task of its own).
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {within:?}"
        );
        // poll loop
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts calls of a loader.
#[derive(Clone, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A loader that counts its calls and answers `value`.
pub fn loader(
    calls: &Calls,
    value: &str,
) -> impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + Send + 'static {
    let calls = calls.clone();
    let value = value.to_owned();
    move || {
        calls.hit();
        std::future::ready(Ok(value))
    }
}

/// `count` instances of the namespace `shared` on one in-memory backplane, over `l2` if given
/// (else each with its L1 alone).
pub fn instances(
    count: usize,
    l2: Option<&Arc<tierstack::core::testkit::MemoryStore>>,
) -> Vec<TieredCache<String>> {
    let bus = tierstack::core::testkit::MemoryBus::new();
    (0..count)
        .map(|_| {
            let builder = TieredCache::builder("shared").backplane(Arc::new(bus.backplane()));
            match l2 {
                Some(l2) => builder.l2(l2.clone()),
                None => builder,
            }
            .build()
            .unwrap()
        })
        .collect()
}

/// A backplane whose publishes fail, or never answer, while told to, over a memory bus.
#[derive(Debug)]
pub struct FlakyBackplane {
    inner: tierstack::core::testkit::MemoryBackplane,
    failing: std::sync::atomic::AtomicBool,
    stalling: std::sync::atomic::AtomicBool,
}

impl FlakyBackplane {
    pub fn new(inner: tierstack::core::testkit::MemoryBackplane) -> Self {
        Self {
            inner,
            failing: std::sync::atomic::AtomicBool::new(false),
            stalling: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Publishes made while stalling never answer (their caller's deadline ends them).
    pub fn set_stalling(&self, stalling: bool) {
        self.stalling.store(stalling, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl tierstack::core::Backplane for FlakyBackplane {
    async fn publish(
        &self,
        namespace: &str,
        invalidation: &tierstack::core::backplane::Invalidation,
    ) -> tierstack::core::Result<()> {
        if self.stalling.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(tierstack::core::CacheError::Connection {
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

/// An in-memory L2 that fails some keys only: reads (`get`, `ttl`) of keys that contain one
/// pattern time out, and writes of keys that contain another fail, with a timeout or refused
/// for good (too large). A Redis that times out on some calls, or a Firestore that refuses a
/// document over 1 MiB, say.
#[derive(Debug, Default)]
pub struct PickyStore {
    inner: MemoryStore,
    failing_reads: std::sync::Mutex<Option<&'static str>>,
    failing_writes: std::sync::Mutex<Option<(&'static str, bool)>>,
    written: std::sync::Mutex<Vec<String>>,
}

impl PickyStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads of keys containing `pattern` time out (`None`: none do).
    pub fn fail_reads_of(&self, pattern: Option<&'static str>) {
        *self.failing_reads.lock().unwrap() = pattern;
    }

    /// Writes of keys containing `pattern` fail (`None`: none do): with a timeout if
    /// `transient`, else refused as too large.
    pub fn fail_writes_of(&self, pattern: Option<&'static str>, transient: bool) {
        *self.failing_writes.lock().unwrap() = pattern.map(|pattern| (pattern, transient));
    }

    fn check_read(&self, key: &str) -> tierstack::Result<()> {
        match *self.failing_reads.lock().unwrap() {
            Some(pattern) if key.contains(pattern) => Err(tierstack::CacheError::Timeout {
                operation: "get",
                after: Duration::from_millis(1),
            }),
            _ => Ok(()),
        }
    }

    /// How many writes of keys containing `pattern` were made (not failed here).
    pub fn writes_of(&self, pattern: &str) -> usize {
        let written = self.written.lock().unwrap();
        written.iter().filter(|key| key.contains(pattern)).count()
    }

    fn check_write(&self, key: &str) -> tierstack::Result<()> {
        self.check_write_failure(key)?;
        self.written.lock().unwrap().push(key.to_owned());
        Ok(())
    }

    fn check_write_failure(&self, key: &str) -> tierstack::Result<()> {
        match *self.failing_writes.lock().unwrap() {
            Some((pattern, true)) if key.contains(pattern) => Err(tierstack::CacheError::Timeout {
                operation: "set",
                after: Duration::from_millis(1),
            }),
            Some((pattern, false)) if key.contains(pattern) => {
                Err(tierstack::CacheError::ValueTooLarge { size: 2, max: 1 })
            }
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl tierstack::core::Store for PickyStore {
    async fn get(&self, key: &str) -> tierstack::Result<Option<bytes::Bytes>> {
        self.check_read(key)?;
        self.inner.get(key).await
    }
    async fn set(&self, key: &str, value: bytes::Bytes, ttl: Duration) -> tierstack::Result<()> {
        self.check_write(key)?;
        self.inner.set(key, value, ttl).await
    }
    async fn set_if_absent(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> tierstack::Result<bool> {
        self.check_write(key)?;
        self.inner.set_if_absent(key, value, ttl).await
    }
    async fn replace(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> tierstack::Result<Option<bytes::Bytes>> {
        self.check_write(key)?;
        self.inner.replace(key, value, ttl).await
    }
    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(bytes::Bytes, Duration)>,
    ) -> tierstack::Result<bool> {
        self.check_write(key)?;
        self.inner.compare_and_set(key, current, new).await
    }
    async fn delete(&self, key: &str) -> tierstack::Result<bool> {
        self.inner.delete(key).await
    }
    async fn expire(&self, key: &str, ttl: Duration) -> tierstack::Result<bool> {
        self.inner.expire(key, ttl).await
    }
    async fn ttl(&self, key: &str) -> tierstack::Result<Option<Duration>> {
        self.check_read(key)?;
        self.inner.ttl(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> tierstack::Result<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn ping(&self) -> tierstack::Result<()> {
        self.inner.ping().await
    }
}
