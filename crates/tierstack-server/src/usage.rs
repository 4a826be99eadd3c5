//! What each tenant did on this instance: reads and hits, writes and their bytes, deletes,
//! requests refused by the rate limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;

use crate::tenant::TenantName;

/// The counters of every tenant seen (one entry per authenticated tenant: bounded by the
/// tenants there are).
#[derive(Debug, Default)]
pub(crate) struct Usage {
    tenants: RwLock<HashMap<TenantName, Arc<Counters>>>,
}

impl Usage {
    pub(crate) fn of(&self, tenant: &TenantName) -> Arc<Counters> {
        // Every request asks: a shared read, and a write only for a tenant's first.
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(counters) = tenants.get(tenant) {
            return Arc::clone(counters);
        }
        drop(tenants);
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(tenants.entry(tenant.clone()).or_default())
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    hits: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    deletes: AtomicU64,
    rate_limited: AtomicU64,
}

/// A tenant's counts, as the usage route answers them.
#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    reads: u64,
    hits: u64,
    hit_ratio: f64,
    writes: u64,
    bytes_written: u64,
    deletes: u64,
    rate_limited: u64,
}

impl Counters {
    pub(crate) fn read(&self, hit: bool) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn wrote(&self, bytes: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn deleted(&self) {
        self.deletes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let reads = self.reads.load(Ordering::Relaxed);
        let hits = self.hits.load(Ordering::Relaxed);
        #[expect(
            clippy::cast_precision_loss,
            reason = "a ratio for people to read; counts far below 2^52"
        )]
        let hit_ratio = if reads == 0 {
            0.0
        } else {
            hits as f64 / reads as f64
        };
        Snapshot {
            reads,
            hits,
            hit_ratio,
            writes: self.writes.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
        }
    }
}
