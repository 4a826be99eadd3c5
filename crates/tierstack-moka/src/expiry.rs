//! Per-entry expiry for moka from absolute deadlines.

use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;
use std::sync::Arc;
use tierstack_core::clock::{SharedClock, Timestamp};

/// Something that knows when it expires.
pub(crate) trait Deadline {
    fn expires_at(&self) -> Timestamp;
}

/// Tells moka to evict each entry at its own deadline. Correctness does not rest on it (every read
/// compares the deadline with the injected clock); it frees the memory of expired entries.
pub(crate) struct DeadlineExpiry {
    pub(crate) clock: SharedClock,
}

impl DeadlineExpiry {
    fn remaining(&self, deadline: Timestamp) -> Duration {
        self.clock.now().until(deadline)
    }
}

impl<K, V: Deadline> Expiry<K, V> for DeadlineExpiry {
    fn expire_after_create(&self, _key: &K, value: &V, _created_at: Instant) -> Option<Duration> {
        Some(self.remaining(value.expires_at()))
    }

    // Without this override an overwrite would keep the old deadline.
    fn expire_after_update(
        &self,
        _key: &K,
        value: &V,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.remaining(value.expires_at()))
    }
}

/// The keys of `cache` whose entries match `matches` (a weakly consistent snapshot).
pub(crate) fn keys_where<V: Clone + Send + Sync + 'static>(
    cache: &Cache<String, V>,
    matches: impl Fn(&str, &V) -> bool,
) -> Vec<Arc<String>> {
    cache
        .iter()
        .filter(|(key, value)| matches(key, value))
        .map(|(key, _)| key)
        .collect()
}
