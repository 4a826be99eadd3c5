//! How a loaded value reaches L2: in the caller's time, or in a background task bounded by a
//! byte budget.
//!
//! A value that `get_or_load` loaded came from the origin: nobody wrote it, so no reader depends
//! on finding it in L2 at once. Once L1 holds it, the callers can have it; the L2 write only
//! spares the other instances a load of their own. Writing it in the
//! background takes one L2 round trip out of every miss.
//!
//! The budget bounds what background writes may hold (their encoded values) while L2 is slow or
//! down. When it is spent, callers write inline again: the cache slows down instead of growing.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How [`get_or_load`](crate::TieredCache::get_or_load) writes a loaded value to L2.
///
/// Either way the write only replaces what the load saw in L2 (nothing: `set_if_absent`; a
/// tombstone, a negative entry or undecodable bytes: `compare_and_set`), so a value another
/// writer stored meanwhile wins, and so does a delete on any instance; it is skipped if the key
/// was written, deleted or invalidated since the load began, and it is ordered before any later
/// `set`, `delete`, `touch` or `delete_prefix` of the key from this cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum L2Fill {
    /// The callers wait for the L2 write.
    Inline,
    /// The callers return once L1 holds the value; the L2 write follows in a Tokio task. At most
    /// `max_pending_bytes` wait in such tasks (their encoded values and keys, and about 1 KiB
    /// per task for the task itself); beyond that, and for a value
    /// larger than the budget, callers write inline. A cache without an L1 always writes inline:
    /// it would have nowhere to serve the value from meanwhile.
    Background {
        /// The budget of encoded bytes that background writes may hold at once.
        max_pending_bytes: u32,
    },
}

impl L2Fill {
    /// [`Background`](Self::Background) with an 8 MiB budget: the default.
    pub const DEFAULT: Self = Self::Background {
        max_pending_bytes: 8 << 20,
    };
}

impl Default for L2Fill {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What one background fill holds besides its encoded value and key: its task, its future and
/// the bookkeeping that follows it. Counting it keeps a flood of tiny fills within the budget.
const FILL_OVERHEAD: u32 = 1024;

/// The byte budget of background fills.
#[derive(Debug)]
pub(crate) struct FillBudget {
    bytes: Arc<Semaphore>,
    total: u32,
}

impl FillBudget {
    pub(crate) fn new(total: u32) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Reserves `len` bytes (and the fill's own overhead) for one background write, or `None`
    /// if the budget cannot hold them now (the caller then writes inline).
    pub(crate) fn try_reserve(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let len = u32::try_from(len).ok()?.checked_add(FILL_OVERHEAD)?;
        Arc::clone(&self.bytes).try_acquire_many_owned(len).ok()
    }

    /// Waits until every background write reserved before this call has finished.
    pub(crate) async fn settle(&self) {
        // Holding the whole budget means that no write holds any of it. The semaphore is never
        // closed, so the acquire cannot fail.
        let _all = self.bytes.acquire_many(self.total).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_what_it_cannot_hold_and_returns_what_is_released() {
        let budget = FillBudget::new(100 + 2 * FILL_OVERHEAD);
        let first = budget.try_reserve(60);
        assert!(first.is_some());
        assert!(budget.try_reserve(60).is_none(), "only 40 bytes are left");
        assert!(
            budget.try_reserve(10_000).is_none(),
            "larger than the budget"
        );
        drop(first);
        assert!(budget.try_reserve(100).is_some());
    }

    #[test]
    fn an_empty_value_still_takes_its_overhead() {
        let budget = FillBudget::new(FILL_OVERHEAD);
        let held = budget.try_reserve(0);
        assert!(held.is_some());
        assert!(budget.try_reserve(0).is_none());
    }

    #[tokio::test]
    async fn settle_waits_for_every_reservation() {
        let budget = Arc::new(FillBudget::new(10 + FILL_OVERHEAD));
        let held = budget.try_reserve(5);
        let waiter = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.settle().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a reservation is still held");
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("settle returns once the reservation is released")
            .expect("the waiter does not panic");
    }
}
