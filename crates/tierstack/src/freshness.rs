//! Generations that keep a stale L1 fill from landing after an invalidation, and per-key write
//! locks that keep one process's writes of a key in order.
//!
//! Every invalidation bumps a generation *before* it evicts: the key's stripe for a key, the
//! global one for a prefix, the local one for an L1-only clear. A fill snapshots the generations
//! before it reads L2 or runs the loader, inserts into L1, and then checks the snapshot: if
//! anything was bumped in between, it evicts what it inserted. Whichever way the two race, the
//! stale value does not survive: either the fill sees the bump and evicts, or the invalidation's
//! evict comes after the insert.
//!
//! The L2 write of a loaded value checks the key and global generations only: a clear of this
//! process's L1 says nothing about what L2 should hold.

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, MutexGuard};

const STRIPES: usize = 256;

#[derive(Debug)]
pub(crate) struct Freshness {
    global: AtomicU64,
    local: AtomicU64,
    stripes: Box<[AtomicU64]>,
    local_stripes: Box<[AtomicU64]>,
    write_locks: Box<[Mutex<()>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// The generations a fill saw when it started, and the stripe of its key (so that the checks
/// that follow need not hash the key again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    index: usize,
    global: u64,
    local: u64,
    stripe: u64,
    local_stripe: u64,
}

impl Freshness {
    pub(crate) fn new() -> Self {
        Self {
            global: AtomicU64::new(0),
            local: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            local_stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
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
        self.snapshot_of_stripe(self.stripe(key))
    }

    fn snapshot_of_stripe(&self, index: usize) -> Snapshot {
        Snapshot {
            index,
            global: self.global.load(Ordering::SeqCst),
            local: self.local.load(Ordering::SeqCst),
            stripe: self.stripes[index].load(Ordering::SeqCst),
            local_stripe: self.local_stripes[index].load(Ordering::SeqCst),
        }
    }

    /// Whether nothing invalidated the key of `snapshot` since it was taken.
    pub(crate) fn is_current(&self, snapshot: Snapshot) -> bool {
        self.snapshot_of_stripe(snapshot.index) == snapshot
    }

    /// Whether no write or invalidation of the key of `snapshot` (or of every key) came after
    /// it, L1-only clears aside.
    pub(crate) fn key_unchanged(&self, snapshot: Snapshot) -> bool {
        let now = self.snapshot_of_stripe(snapshot.index);
        now.global == snapshot.global && now.stripe == snapshot.stripe
    }

    /// Marks `key` as changed; returns the snapshot that includes this change.
    pub(crate) fn bump_key(&self, key: &str) -> Snapshot {
        let index = self.stripe(key);
        self.stripes[index].fetch_add(1, Ordering::SeqCst);
        self.snapshot_of_stripe(index)
    }

    /// Marks every key as changed.
    pub(crate) fn bump_all(&self) {
        self.global.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks `key`'s L1 copy as gone (an L1-only eviction).
    pub(crate) fn bump_local_key(&self, key: &str) {
        self.local_stripes[self.stripe(key)].fetch_add(1, Ordering::SeqCst);
    }

    /// Marks every key's L1 copy as gone (an L1-only clear).
    pub(crate) fn bump_local(&self) {
        self.local.fetch_add(1, Ordering::SeqCst);
    }

    /// The write locks of all `keys` (each stripe once), taken in ascending stripe order so that
    /// two callers locking overlapping sets cannot deadlock.
    pub(crate) async fn lock_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys.into_iter().map(|key| self.stripe(key)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.write_locks[stripe].lock().await);
        }
        guards
    }

    /// The write lock of the key of `snapshot` (see [`lock_key`](Self::lock_key)).
    pub(crate) async fn lock_key_of(&self, snapshot: Snapshot) -> MutexGuard<'_, ()> {
        self.write_locks[snapshot.index].lock().await
    }

    /// Waits until every write that holds a key's lock now has released it.
    pub(crate) async fn wait_for_writes(&self) {
        for lock in &self.write_locks {
            drop(lock.lock().await);
        }
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
        assert!(f.is_current(snap));
        f.bump_key("a");
        assert!(!f.is_current(snap));
        let snap = f.snapshot("a");
        f.bump_all();
        assert!(!f.is_current(snap));
        let after_own_bump = f.bump_key("b");
        assert!(f.is_current(after_own_bump));
    }

    #[tokio::test]
    async fn locking_many_keys_takes_each_stripe_once_and_excludes_single_writers() {
        let f = Freshness::new();
        let guards = f.lock_keys(["a", "b", "a", "c"]).await;
        let distinct = ["a", "b", "c"]
            .iter()
            .map(|key| f.stripe(key))
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert_eq!(guards.len(), distinct);
        assert!(
            f.write_locks[f.stripe("b")].try_lock().is_err(),
            "a single-key writer waits"
        );
        drop(guards);
        assert!(f.write_locks[f.stripe("b")].try_lock().is_ok());
    }

    #[test]
    fn an_l1_only_clear_leaves_keys_unchanged() {
        let f = Freshness::new();
        let snap = f.snapshot("a");
        f.bump_local();
        assert!(!f.is_current(snap), "an L1 fill must not survive the clear");
        assert!(f.key_unchanged(snap), "but the key itself did not change");
        let snap = f.snapshot("a");
        f.bump_local_key("a");
        assert!(!f.is_current(snap), "nor an L1-only eviction of its key");
        assert!(f.key_unchanged(snap));
        f.bump_all();
        assert!(!f.key_unchanged(snap));
        let snap = f.snapshot("a");
        f.bump_key("a");
        assert!(!f.key_unchanged(snap));
    }
}
