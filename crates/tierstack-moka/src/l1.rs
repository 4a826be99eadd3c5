//! The typed L1: decoded values in moka, each with its own deadline.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use tierstack_core::clock::{SharedClock, Timestamp, system_clock};
use tierstack_core::tag::TagStamps;

use crate::expiry::{Deadline, DeadlineExpiry, keys_where};

/// How an [`L1Cache`] is bounded.
pub enum L1Capacity<V> {
    /// At most this many entries.
    Entries(u64),
    /// At most this many bytes, as the weigher counts them. Add ~300 bytes of moka overhead per
    /// entry to the weigher to bound real memory. A negative entry (no value to weigh) weighs
    /// its key and [`NEGATIVE_ENTRY_OVERHEAD`].
    Bytes {
        /// The budget in bytes.
        max_bytes: u64,
        /// The weight of one entry in bytes.
        weigher: Weigher<V>,
    },
}

/// The weight of one entry, in bytes.
pub type Weigher<V> = Arc<dyn Fn(&str, &V) -> u32 + Send + Sync>;

/// What a negative entry (no value for the weigher to weigh) weighs besides its key: moka's
/// overhead per entry, which [`L1Capacity::Bytes`] asks a weigher to add, so that a flood of
/// keys that are not found stays within the budget too.
pub const NEGATIVE_ENTRY_OVERHEAD: u32 = 300;

impl<V> Clone for L1Capacity<V> {
    fn clone(&self) -> Self {
        match self {
            Self::Entries(n) => Self::Entries(*n),
            Self::Bytes { max_bytes, weigher } => Self::Bytes {
                max_bytes: *max_bytes,
                weigher: Arc::clone(weigher),
            },
        }
    }
}

impl<V> fmt::Debug for L1Capacity<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Entries(n) => f.debug_tuple("Entries").field(n).finish(),
            Self::Bytes { max_bytes, .. } => f
                .debug_struct("Bytes")
                .field("max_bytes", max_bytes)
                .finish_non_exhaustive(),
        }
    }
}

/// One L1 entry: a value, or a cached "not found", with its deadlines.
///
/// An entry is *fresh* until `fresh_until`, then *stale* until `expires_at`, when it leaves the
/// cache. A stale entry is a fallback for when the origin fails (fail-safe); without fail-safe
/// both deadlines are the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L1Entry<V> {
    /// The value; `None` is a negative entry (the loader found nothing).
    pub value: Option<V>,
    /// Until when the entry is fresh (at most `expires_at`).
    pub fresh_until: Timestamp,
    /// When the entry stops being served at all.
    pub expires_at: Timestamp,
    /// Whether the value is a stale one kept after the origin failed: `fresh_until` then only
    /// delays the next attempt.
    pub stale: bool,
    /// When a hit should start reloading the entry in the background (eager refresh), if ever.
    pub refresh_at: Option<Timestamp>,
    /// The entry's tags with the versions it was written under, if it is tagged: a reader
    /// compares them with the tags' current versions.
    pub tags: Option<TagStamps>,
}

impl<V> L1Entry<V> {
    /// An entry that is fresh until it expires.
    pub fn fresh(value: Option<V>, expires_at: Timestamp) -> Self {
        Self {
            value,
            fresh_until: expires_at,
            expires_at,
            stale: false,
            refresh_at: None,
            tags: None,
        }
    }

    /// Whether the entry answers reads at `now` without a reload: before `fresh_until`. (A
    /// stale value re-armed after a failure answers until its next attempt, still marked
    /// `stale`.)
    pub fn is_fresh_at(&self, now: Timestamp) -> bool {
        now < self.fresh_until
    }
}

impl<V> Deadline for L1Entry<V> {
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
}

/// An in-process cache of decoded values with per-entry expiry.
///
/// A hit clones `V` and does nothing else: no decode, no copy of bytes. Put `Arc<T>` in when `T`
/// is large. moka expires every entry at its own deadline; with an injected clock (tests), every
/// read also compares the deadline with that clock, so time moved by hand is honoured too.
pub struct L1Cache<V> {
    cache: Cache<String, L1Entry<V>>,
    clock: SharedClock,
    /// moka expires each entry at its deadline on the system clock; an injected clock needs the
    /// deadline compared on every read instead.
    check_deadlines: bool,
}

impl<V> Clone for L1Cache<V> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            clock: Arc::clone(&self.clock),
            check_deadlines: self.check_deadlines,
        }
    }
}

impl<V> fmt::Debug for L1Cache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L1Cache")
            .field("entries", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl<V: Clone + Send + Sync + 'static> L1Cache<V> {
    /// An L1 bounded by `capacity`, on the system clock.
    pub fn new(capacity: L1Capacity<V>) -> Self {
        Self::with_clock(capacity, system_clock())
    }

    /// An L1 bounded by `capacity`, on `clock`.
    pub fn with_clock(capacity: L1Capacity<V>, clock: SharedClock) -> Self {
        let builder = Cache::builder().expire_after(DeadlineExpiry {
            clock: Arc::clone(&clock),
        });
        let cache = match capacity {
            L1Capacity::Entries(max) => builder.max_capacity(max).build(),
            L1Capacity::Bytes { max_bytes, weigher } => builder
                .max_capacity(max_bytes)
                .weigher(move |key: &String, entry: &L1Entry<V>| match &entry.value {
                    Some(value) => weigher(key, value),
                    None => u32::try_from(key.len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(NEGATIVE_ENTRY_OVERHEAD),
                })
                .build(),
        };
        Self {
            cache,
            check_deadlines: !clock.is_system_clock(),
            clock,
        }
    }

    /// The live entry under `key`.
    pub fn get(&self, key: &str) -> Option<L1Entry<V>> {
        let entry = self.cache.get(key)?;
        if self.check_deadlines && entry.expires_at <= self.clock.now() {
            return None;
        }
        Some(entry)
    }

    /// Stores `entry` under `key` until its `expires_at`. An entry whose deadline has already
    /// passed is not stored (and removes what was there).
    pub fn insert(&self, key: String, entry: L1Entry<V>) {
        if entry.expires_at > self.clock.now() {
            self.cache.insert(key, entry);
        } else {
            self.cache.invalidate(&key);
        }
    }

    /// Removes `key`.
    pub fn invalidate(&self, key: &str) {
        self.cache.invalidate(key);
    }

    /// Removes every key that starts with `prefix`.
    pub fn invalidate_prefix(&self, prefix: &str) {
        for key in keys_where(&self.cache, |key, _| key.starts_with(prefix)) {
            self.cache.invalidate(key.as_str());
        }
    }

    /// Removes every entry. Reads stop seeing them at once; memory is freed lazily.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    /// The remaining time of the live entry under `key`.
    pub fn ttl(&self, key: &str) -> Option<Duration> {
        let entry = self.get(key)?;
        Some(self.clock.now().until(entry.expires_at))
    }

    /// An estimate of the number of entries (moka counts lazily).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// An estimate of the entries' total weight: bytes as the weigher counts them for an L1
    /// bounded by bytes, else the number of entries (moka counts lazily).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Runs moka's pending housekeeping, so that counts are exact (for tests and reports).
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierstack_core::clock::ManualClock;

    fn l1(clock: &ManualClock) -> L1Cache<String> {
        L1Cache::with_clock(L1Capacity::Entries(100), Arc::new(clock.clone()))
    }

    #[test]
    fn entries_stop_being_served_at_their_deadline() {
        let clock = ManualClock::new();
        let cache = l1(&clock);
        let deadline = clock.now().saturating_add(Duration::from_secs(10));
        cache.insert("k".into(), L1Entry::fresh(Some("v".into()), deadline));
        assert_eq!(cache.get("k").and_then(|e| e.value), Some("v".into()));
        assert_eq!(cache.ttl("k"), Some(Duration::from_secs(10)));
        clock.advance(Duration::from_secs(10));
        assert_eq!(cache.get("k"), None);
    }

    #[test]
    fn a_stale_entry_outlives_its_freshness() {
        let clock = ManualClock::new();
        let cache = l1(&clock);
        let now = clock.now();
        let entry = L1Entry {
            value: Some("v".to_owned()),
            fresh_until: now.saturating_add(Duration::from_secs(1)),
            expires_at: now.saturating_add(Duration::from_secs(10)),
            stale: false,
            refresh_at: None,
            tags: None,
        };
        cache.insert("k".into(), entry);
        assert!(cache.get("k").is_some_and(|e| e.is_fresh_at(clock.now())));
        clock.advance(Duration::from_secs(2));
        let stale = cache.get("k").unwrap_or_else(|| panic!("kept while stale"));
        assert!(!stale.is_fresh_at(clock.now()));
        clock.advance(Duration::from_secs(8));
        assert_eq!(cache.get("k"), None);
    }

    #[test]
    fn overwrites_take_the_new_deadline() {
        let clock = ManualClock::new();
        let cache = l1(&clock);
        let now = clock.now();
        cache.insert(
            "k".into(),
            L1Entry::fresh(
                Some("a".into()),
                now.saturating_add(Duration::from_secs(100)),
            ),
        );
        cache.insert(
            "k".into(),
            L1Entry::fresh(Some("b".into()), now.saturating_add(Duration::from_secs(1))),
        );
        clock.advance(Duration::from_secs(2));
        assert_eq!(cache.get("k"), None);
    }

    #[test]
    fn already_expired_inserts_are_dropped_and_negative_entries_kept() {
        let clock = ManualClock::new();
        let cache = l1(&clock);
        cache.insert("old".into(), L1Entry::fresh(Some("v".into()), clock.now()));
        assert_eq!(cache.get("old"), None);
        let deadline = clock.now().saturating_add(Duration::from_secs(5));
        cache.insert("none".into(), L1Entry::fresh(None, deadline));
        assert_eq!(cache.get("none").map(|e| e.value), Some(None));
    }

    #[test]
    fn invalidation_by_key_prefix_and_all() {
        let clock = ManualClock::new();
        let cache = l1(&clock);
        let deadline = clock.now().saturating_add(Duration::from_mins(1));
        for key in ["a:1", "a:2", "b:1", "ab"] {
            cache.insert(key.into(), L1Entry::fresh(Some(key.into()), deadline));
        }
        cache.invalidate("b:1");
        assert!(cache.get("b:1").is_none());
        cache.invalidate_prefix("a:");
        assert!(cache.get("a:1").is_none() && cache.get("a:2").is_none());
        assert!(cache.get("ab").is_some());
        cache.invalidate_all();
        assert!(cache.get("ab").is_none());
    }

    #[test]
    fn a_byte_budget_bounds_the_cache() {
        let weigher: Weigher<String> = Arc::new(|key: &str, value: &String| {
            u32::try_from(key.len() + value.len()).unwrap_or(u32::MAX)
        });
        let cache: L1Cache<String> = L1Cache::new(L1Capacity::Bytes {
            max_bytes: 10_000,
            weigher,
        });
        let deadline = tierstack_core::clock::SystemClock
            .now()
            .saturating_add(Duration::from_mins(1));
        for i in 0..1_000 {
            cache.insert(
                format!("k{i:04}"),
                L1Entry::fresh(Some("x".repeat(95)), deadline),
            );
        }
        cache.run_pending_tasks();
        assert!(
            cache.entry_count() <= 100,
            "{} entries",
            cache.entry_count()
        );
        assert!(
            (9_000..=10_000).contains(&cache.weighted_size()),
            "{} bytes",
            cache.weighted_size()
        );
    }

    #[test]
    fn a_negative_entry_weighs_its_key_and_the_overhead() {
        let weigher: Weigher<String> = Arc::new(|_: &str, _: &String| 1);
        let cache: L1Cache<String> = L1Cache::new(L1Capacity::Bytes {
            max_bytes: 10_000,
            weigher,
        });
        let deadline = tierstack_core::clock::SystemClock
            .now()
            .saturating_add(Duration::from_mins(1));
        cache.insert("none".into(), L1Entry::fresh(None, deadline));
        cache.run_pending_tasks();
        assert_eq!(
            cache.weighted_size(),
            4 + u64::from(NEGATIVE_ENTRY_OVERHEAD)
        );
    }

    use tierstack_core::clock::Clock;
}
