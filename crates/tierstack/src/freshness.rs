//! Generations that keep a stale fill from landing after an invalidation, and per-key locks that
//! order a load's L2 write before a later delete of its key.
//!
//! Every invalidation bumps a generation *before* it evicts. A fill takes a snapshot before it
//! reads L2 or runs the loader, inserts into L1, and then checks the snapshot: if anything was
//! bumped in between, it evicts what it inserted. Whichever way the two race, the stale value
//! does not survive: either the fill sees the bump and evicts, or the invalidation's evict comes
//! after the insert.
//!
//! Two kinds of snapshot:
//! - [`Snapshot`]: striped generations, four atomic loads (no lock). A write to another key of the same
//!   stripe reads as a change too, which costs at most one more L2 read; plain reads use it.
//! - [`KeyWatch`]: the exact generation of one key, kept in a table while a load of the key is
//!   in flight. A write to another key never discards a loaded value, so it never costs the
//!   origin another call.
//!
//! The L2 write of a loaded value checks the key and global generations only: a clear of this
//! process's L1 says nothing about what L2 should hold.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, MutexGuard as AsyncMutexGuard};

const STRIPES: usize = 256;

#[derive(Debug)]
pub(crate) struct Freshness {
    global: AtomicU64,
    local: AtomicU64,
    stripes: Box<[AtomicU64]>,
    local_stripes: Box<[AtomicU64]>,
    watched: Arc<Mutex<HashMap<Box<str>, Watched>>>,
    key_locks: Box<[AsyncMutex<()>]>,
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

#[derive(Debug)]
struct Watched {
    /// Bumped by every write or invalidation of the key (local or from the backplane).
    generation: u64,
    /// L1-only evictions of the key.
    local: u64,
    /// How many watches hold the entry: it is removed with the last.
    holders: u32,
}

/// The exact generation of one key while a load of it is in flight; dropping it stops the watch.
#[derive(Debug)]
pub(crate) struct KeyWatch {
    key: Box<str>,
    generation: u64,
    local_key: u64,
    /// The striped part: the global and local generations, and the key's stripe (for its lock).
    stripes: Snapshot,
    table: Arc<Mutex<HashMap<Box<str>, Watched>>>,
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = table.get_mut(&self.key) {
            entry.holders -= 1;
            if entry.holders == 0 {
                table.remove(&self.key);
            }
        }
    }
}

/// Every generation a watch saw when it began: two watches of a key with equal stamps saw the
/// same state of it, so a flight started under one may answer a caller holding the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    generation: u64,
    local_key: u64,
    global: u64,
    local: u64,
}

impl KeyWatch {
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn stamp(&self) -> Stamp {
        Stamp {
            generation: self.generation,
            local_key: self.local_key,
            global: self.stripes.global,
            local: self.stripes.local,
        }
    }
}

impl Freshness {
    pub(crate) fn new() -> Self {
        Self {
            global: AtomicU64::new(0),
            local: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            local_stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            watched: Arc::default(),
            key_locks: (0..STRIPES).map(|_| AsyncMutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The stripe of `key`: keys of one stripe share a generation and a lock.
    pub(crate) fn stripe(&self, key: &str) -> usize {
        let mut state = self.hasher.build_hasher();
        key.hash(&mut state);
        #[expect(clippy::cast_possible_truncation, reason = "reduced modulo STRIPES")]
        let index = (std::hash::Hasher::finish(&state) % STRIPES as u64) as usize;
        index
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Watched>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Whether nothing invalidated the key of `snapshot` (or a key of its stripe) since.
    pub(crate) fn is_current(&self, snapshot: Snapshot) -> bool {
        self.snapshot_of_stripe(snapshot.index) == snapshot
    }

    /// Starts watching `key` exactly, for a load.
    pub(crate) fn watch(&self, key: &str) -> KeyWatch {
        let mut table = self.lock_table();
        // Taken under the table's lock: a bump of the key either came before (and is in the
        // stripes, not in the entry) or after (and is in the entry).
        let stripes = self.snapshot(key);
        // A new entry starts from its stripe's generations, not from zero: a stripe counts every
        // bump of its keys, so a bump of this key while nobody watched it makes the new entry's
        // stamp differ from any stamp taken before that bump (a flight still finishing under an
        // old stamp must not answer a caller that came after a delete).
        let entry = table.entry(key.into()).or_insert_with(|| Watched {
            generation: stripes.stripe,
            local: stripes.local_stripe,
            holders: 0,
        });
        entry.holders += 1;
        KeyWatch {
            key: key.into(),
            generation: entry.generation,
            local_key: entry.local,
            stripes,
            table: Arc::clone(&self.watched),
        }
    }

    fn watched_now(&self, watch: &KeyWatch) -> (u64, u64) {
        self.lock_table()
            .get(&watch.key)
            .map_or((u64::MAX, u64::MAX), |entry| {
                (entry.generation, entry.local)
            })
    }

    /// Whether no write or invalidation of the watched key (or of every key) came since the
    /// watch began, L1-only evictions aside: whether its loaded value may go to L2.
    pub(crate) fn key_unchanged(&self, watch: &KeyWatch) -> bool {
        let (generation, _) = self.watched_now(watch);
        generation == watch.generation && self.global.load(Ordering::SeqCst) == watch.stripes.global
    }

    /// Whether no write or invalidation of the watched key itself came since the watch began
    /// (changes of every key aside).
    pub(crate) fn own_key_unchanged(&self, watch: &KeyWatch) -> bool {
        self.watched_now(watch).0 == watch.generation
    }

    /// Whether nothing at all invalidated the watched key since the watch began, L1-only
    /// evictions and clears included: whether its loaded value may stay in L1.
    pub(crate) fn watch_is_current(&self, watch: &KeyWatch) -> bool {
        let (generation, local) = self.watched_now(watch);
        generation == watch.generation
            && local == watch.local_key
            && self.global.load(Ordering::SeqCst) == watch.stripes.global
            && self.local.load(Ordering::SeqCst) == watch.stripes.local
    }

    /// Marks `key` as changed; returns the snapshot that includes this change.
    pub(crate) fn bump_key(&self, key: &str) -> Snapshot {
        let index = self.stripe(key);
        {
            let mut table = self.lock_table();
            self.stripes[index].fetch_add(1, Ordering::SeqCst);
            if let Some(entry) = table.get_mut(key) {
                entry.generation += 1;
            }
        }
        self.snapshot_of_stripe(index)
    }

    /// Marks every key as changed.
    pub(crate) fn bump_all(&self) {
        self.global.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks `key`'s L1 copy as gone (an L1-only eviction).
    pub(crate) fn bump_local_key(&self, key: &str) {
        let index = self.stripe(key);
        let mut table = self.lock_table();
        self.local_stripes[index].fetch_add(1, Ordering::SeqCst);
        if let Some(entry) = table.get_mut(key) {
            entry.local += 1;
        }
    }

    /// Marks every key's L1 copy as gone (an L1-only clear).
    pub(crate) fn bump_local(&self) {
        self.local.fetch_add(1, Ordering::SeqCst);
    }

    /// The lock that orders a load's L2 write of `key` against a `delete` or `touch` of it.
    pub(crate) async fn lock_key(&self, key: &str) -> AsyncMutexGuard<'_, ()> {
        self.key_locks[self.stripe(key)].lock().await
    }

    /// The lock of the watched key (see [`lock_key`](Self::lock_key)).
    pub(crate) async fn lock_watched(&self, watch: &KeyWatch) -> AsyncMutexGuard<'_, ()> {
        self.key_locks[watch.stripes.index].lock().await
    }

    /// The locks of all `keys` (each stripe once), taken in ascending stripe order so that two
    /// callers locking overlapping sets cannot deadlock.
    pub(crate) async fn lock_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<AsyncMutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys.into_iter().map(|key| self.stripe(key)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.key_locks[stripe].lock().await);
        }
        guards
    }

    /// Waits until every L2 write that holds a key's lock now has released it.
    pub(crate) async fn wait_for_writes(&self) {
        for lock in &self.key_locks {
            drop(lock.lock().await);
        }
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

    #[test]
    fn a_watch_begun_after_an_unwatched_bump_has_another_stamp() {
        let f = Freshness::new();
        let before = f.watch("a").stamp();
        f.bump_key("a");
        assert_ne!(f.watch("a").stamp(), before, "a delete in between");
        let again = f.watch("a").stamp();
        assert_eq!(f.watch("a").stamp(), again, "nothing in between");
        f.bump_local_key("a");
        assert_ne!(f.watch("a").stamp(), again, "an L1 eviction in between");
    }

    #[test]
    fn a_watch_sees_only_its_own_key() {
        let f = Freshness::new();
        let watch = f.watch("a");
        // Every other key, including all that share "a"'s stripe.
        for i in 0..10_000 {
            f.bump_key(&format!("other-{i}"));
        }
        assert!(f.key_unchanged(&watch) && f.watch_is_current(&watch));
        f.bump_key("a");
        assert!(!f.key_unchanged(&watch) && !f.watch_is_current(&watch));
    }

    #[test]
    fn watches_of_one_key_share_an_entry_until_the_last_is_dropped() {
        let f = Freshness::new();
        let first = f.watch("a");
        let second = f.watch("a");
        drop(first);
        f.bump_key("a");
        assert!(
            !f.key_unchanged(&second),
            "the entry outlived the first watch"
        );
        drop(second);
        assert!(f.lock_table().is_empty());
        let third = f.watch("a");
        assert!(f.key_unchanged(&third), "a new watch starts from now");
    }

    #[test]
    fn an_l1_only_eviction_leaves_the_key_unchanged() {
        let f = Freshness::new();
        let watch = f.watch("a");
        f.bump_local_key("a");
        assert!(
            !f.watch_is_current(&watch),
            "an L1 fill must not survive it"
        );
        assert!(f.key_unchanged(&watch), "but the key itself did not change");
        let watch = f.watch("b");
        f.bump_local();
        assert!(!f.watch_is_current(&watch) && f.key_unchanged(&watch));
        f.bump_all();
        assert!(!f.key_unchanged(&watch));
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
        assert!(f.key_locks[f.stripe("b")].try_lock().is_err());
        drop(guards);
        assert!(f.key_locks[f.stripe("b")].try_lock().is_ok());
    }
}
