use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::error::{CacheError, Result};
use crate::store::{Store, StoreWrite, StoredEntry};

/// The error a [`FaultyStore`] injects; the source of the [`CacheError::Connection`] it returns.
#[derive(Debug, thiserror::Error)]
#[error("injected fault")]
pub struct InjectedFault;

/// Wraps a [`Store`] and makes its calls fail or stall, by probability or on command: the chaos
/// decorator for the composer's failure tests.
///
/// Injected failures are transient [`CacheError::Connection`] errors, like a dropped connection.
#[derive(Debug, Clone)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    state: Arc<FaultState>,
}

#[derive(Debug)]
struct FaultState {
    failing: AtomicBool,
    fail_next: AtomicU32,
    /// Failure probability in millionths.
    fail_ppm: AtomicU32,
    delay_micros: AtomicU64,
    calls: AtomicU64,
    injected: AtomicU64,
    /// Whether writes wait at their start, and how many are waiting.
    writes_held: watch::Sender<bool>,
    writes_waiting: AtomicU64,
}

impl Default for FaultState {
    fn default() -> Self {
        Self {
            failing: AtomicBool::default(),
            fail_next: AtomicU32::default(),
            fail_ppm: AtomicU32::default(),
            delay_micros: AtomicU64::default(),
            calls: AtomicU64::default(),
            injected: AtomicU64::default(),
            writes_held: watch::Sender::new(false),
            writes_waiting: AtomicU64::default(),
        }
    }
}

impl FaultyStore {
    /// Wraps `inner`; no fault is injected until told.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            state: Arc::default(),
        }
    }

    /// Makes every call fail (`true`) or pass (`false`) from now on.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes the next `count` calls fail.
    pub fn fail_next(&self, count: u32) {
        self.state.fail_next.store(count, Ordering::SeqCst);
    }

    /// Makes each call fail with probability `probability` (0.0 to 1.0).
    pub fn set_failure_probability(&self, probability: f64) {
        let ppm = (probability.clamp(0.0, 1.0) * 1_000_000.0).round();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped to 0..=1e6 above"
        )]
        self.state.fail_ppm.store(ppm as u32, Ordering::SeqCst);
    }

    /// Delays every call by `delay` before it runs (or fails).
    pub fn set_delay(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_micros.store(micros, Ordering::SeqCst);
    }

    /// Holds every conditional or plain write (`set`, `set_many`, `set_if_absent`,
    /// `compare_and_set`: a load's fill, the removal of undecodable bytes) at its start (`true`)
    /// until told to let them through (`false`): a write in flight, frozen, for ordering tests.
    /// `replace` and `delete` (a delete's writes) are not held.
    pub fn hold_writes(&self, held: bool) {
        self.state.writes_held.send_replace(held);
    }

    /// How many writes are held now.
    pub fn held_writes(&self) -> u64 {
        self.state.writes_waiting.load(Ordering::SeqCst)
    }

    /// How many calls reached this wrapper.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// How many calls failed by injection.
    pub fn injected_failures(&self) -> u64 {
        self.state.injected.load(Ordering::SeqCst)
    }

    async fn before_write(&self) -> Result<()> {
        let state = &self.state;
        let mut held = state.writes_held.subscribe();
        if *held.borrow_and_update() {
            // Counted while it waits, however the wait ends (a caller may give up on it).
            struct Waiting<'a>(&'a AtomicU64);
            impl Drop for Waiting<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            state.writes_waiting.fetch_add(1, Ordering::SeqCst);
            let _waiting = Waiting(&state.writes_waiting);
            // The sender lives in `state`, which outlives this call: the wait cannot fail.
            let _ = held.wait_for(|held| !held).await;
        }
        self.before_call().await
    }

    async fn before_call(&self) -> Result<()> {
        let state = &self.state;
        state.calls.fetch_add(1, Ordering::SeqCst);
        let delay = state.delay_micros.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        let counted = state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let ppm = state.fail_ppm.load(Ordering::SeqCst);
        let random = ppm > 0 && fastrand::u32(0..1_000_000) < ppm;
        if state.failing.load(Ordering::SeqCst) || counted || random {
            state.injected.fetch_add(1, Ordering::SeqCst);
            return Err(CacheError::Connection {
                endpoint: "faulty-store".into(),
                source: Box::new(InjectedFault),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.before_call().await?;
        self.inner.get(key).await
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        self.before_call().await?;
        self.inner.get_many(keys).await
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        self.before_call().await?;
        self.inner.get_with_ttl(key).await
    }

    async fn get_many_with_ttl(&self, keys: &[&str]) -> Result<Vec<Option<StoredEntry>>> {
        self.before_call().await?;
        self.inner.get_many_with_ttl(keys).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        self.before_write().await?;
        self.inner.set(key, value, ttl).await
    }

    async fn set_many(&self, writes: &[StoreWrite<'_>]) -> Result<()> {
        self.before_write().await?;
        self.inner.set_many(writes).await
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        self.before_write().await?;
        self.inner.set_if_absent(key, value, ttl).await
    }

    // A delete's write: not held, like `delete`.
    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        self.before_call().await?;
        self.inner.replace(key, value, ttl).await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        self.before_write().await?;
        self.inner.compare_and_set(key, current, new).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.before_call().await?;
        self.inner.delete(key).await
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        self.before_call().await?;
        self.inner.delete_many(keys).await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.before_call().await?;
        self.inner.exists(key).await
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.before_call().await?;
        self.inner.expire(key, ttl).await
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        self.before_call().await?;
        self.inner.ttl(key).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.before_call().await?;
        self.inner.delete_prefix(prefix).await
    }

    async fn sweep_expired(&self) -> Result<u64> {
        self.before_call().await?;
        self.inner.sweep_expired().await
    }

    async fn ping(&self) -> Result<()> {
        self.before_call().await?;
        self.inner.ping().await
    }
}
