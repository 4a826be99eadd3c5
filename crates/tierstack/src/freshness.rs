//! Generations that keep a stale L1 fill from landing after an invalidation, and per-key write
//! locks that keep one process's writes of a key in order.
//!
//! Every invalidation bumps a generation *before* it evicts: the key's stripe for a key, the
//! global one for a prefix or everything. A fill snapshots both generations before it reads L2 or
//! runs the loader, inserts into L1, and then checks the snapshot: if anything was bumped in
//! between, it evicts what it inserted. Whichever way the two race, the stale value does not
//! survive: either the fill sees the bump and evicts, or the invalidation's evict comes after the
//! insert.

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, MutexGuard};

const STRIPES: usize = 256;

#[derive(Debug)]
pub(crate) struct Freshness {
    global: AtomicU64,
    stripes: Box<[AtomicU64]>,
    write_locks: Box<[Mutex<()>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// The generations a fill saw when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    global: u64,
    stripe: u64,
}

impl Freshness {
    pub(crate) fn new() -> Self {
        Self {
            global: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            write_locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn stripe(&self, key: &str) -> usize {
        let mut state = self.hasher.build_hasher();
        key.hash(&mut state);
        #[expect(clippy::cast_possible_truncation, reason = "reduced modulo STRIPES")]
        let index = (std::hash::Hasher::finish(&state) % STRIPES as u64) as usize;
        index
    }

    pub(crate) fn snapshot(&self, key: &str) -> Snapshot {
        Snapshot {
            global: self.global.load(Ordering::SeqCst),
            stripe: self.stripes[self.stripe(key)].load(Ordering::SeqCst),
        }
    }

    pub(crate) fn is_current(&self, key: &str, snapshot: Snapshot) -> bool {
        self.snapshot(key) == snapshot
    }

    /// Marks `key` as changed; returns the snapshot that includes this change.
    pub(crate) fn bump_key(&self, key: &str) -> Snapshot {
        self.stripes[self.stripe(key)].fetch_add(1, Ordering::SeqCst);
        self.snapshot(key)
    }

    /// Marks every key as changed.
    pub(crate) fn bump_all(&self) {
        self.global.fetch_add(1, Ordering::SeqCst);
    }

    /// Serialises this process's writes of one key (and of the keys sharing its stripe), so that
    /// L1 ends with the value of the write that reached L2 last.
    pub(crate) async fn lock_key(&self, key: &str) -> MutexGuard<'_, ()> {
        self.write_locks[self.stripe(key)].lock().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bumps_invalidate_snapshots() {
        let f = Freshness::new();
        let snap = f.snapshot("a");
        assert!(f.is_current("a", snap));
        f.bump_key("a");
        assert!(!f.is_current("a", snap));
        let snap = f.snapshot("a");
        f.bump_all();
        assert!(!f.is_current("a", snap));
        let after_own_bump = f.bump_key("b");
        assert!(f.is_current("b", after_own_bump));
    }
}
