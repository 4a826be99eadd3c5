//! Quotas per tenant: how many entries and bytes (of keys and values) a tenant's live entries
//! may hold. Counted on this instance, or in Redis by every instance together.
//!
//! The ledger follows the writes the server makes: a write reserves room before it lands, a
//! delete, a prefix delete or a flush gives it back, and an entry leaves the count at its TTL.
//! It may count an entry the backend dropped early (evicted under memory pressure, say) until
//! that entry's TTL passes. It can miss an entry whose write raced a delete of the same key, or
//! whose write timed out but landed, until that key is written or deleted again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tierstack::redis::{QuotaDecision, QuotaLedger, QuotaLimits, QuotaUsage, QuotaWrite};

use crate::error::ApiError;
use crate::tenant::{Limits, TenantName};

/// A write to make room for: the tenant's key, and its value's size.
pub(crate) struct Room<'a> {
    pub(crate) key: &'a str,
    pub(crate) value_bytes: usize,
    pub(crate) ttl: Duration,
}

impl Room<'_> {
    /// What the entry counts for: its key and its value.
    fn size(&self) -> u64 {
        u64::try_from(self.key.len() + self.value_bytes).unwrap_or(u64::MAX)
    }
}

/// A tenant's usage against its quota, as the usage route answers it.
#[derive(Debug, Serialize)]
pub(crate) struct QuotaReport {
    entries: u64,
    bytes: u64,
    /// `null`: no quota.
    max_entries: Option<u64>,
    max_bytes: Option<u64>,
}

/// The quotas of every tenant.
#[derive(Debug, Default)]
pub(crate) struct Quotas {
    local: LocalLedger,
    shared: Option<QuotaLedger>,
}

/// The limits of `limits` as the ledger takes them (0: none).
fn quota_limits(limits: &Limits) -> Option<QuotaLimits> {
    let none_if_zero = |limit: u64| if limit == 0 { u64::MAX } else { limit };
    (limits.max_entries != 0 || limits.max_bytes != 0).then(|| QuotaLimits {
        max_entries: none_if_zero(limits.max_entries),
        max_bytes: none_if_zero(limits.max_bytes),
    })
}

fn unavailable(error: &tierstack::CacheError) -> ApiError {
    tracing::warn!(error = %error, "the quota ledger is unavailable");
    ApiError::unavailable("the quota ledger is unavailable")
}

impl Quotas {
    /// Quotas counted in Redis, shared with every instance that counts there.
    pub(crate) fn shared(ledger: QuotaLedger) -> Self {
        Self {
            local: LocalLedger::default(),
            shared: Some(ledger),
        }
    }

    /// Records `writes` of `tenant` if together they keep it within its quota: 507 with the
    /// reason if not (nothing recorded), 503 if the shared ledger cannot be reached (a write
    /// that cannot be counted is not made).
    pub(crate) async fn reserve(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        writes: &[Room<'_>],
    ) -> Result<(), ApiError> {
        let Some(quota) = quota_limits(limits) else {
            return Ok(());
        };
        let decision = match &self.shared {
            Some(ledger) => {
                let writes: Vec<QuotaWrite<'_>> = writes
                    .iter()
                    .map(|room| QuotaWrite {
                        member: room.key,
                        size: room.size(),
                        ttl: room.ttl,
                    })
                    .collect();
                ledger
                    .reserve(tenant.as_str(), quota, &writes)
                    .await
                    .map_err(|error| unavailable(&error))?
            }
            None => self.local.reserve(tenant, quota, writes),
        };
        match decision {
            QuotaDecision::TooManyEntries(usage) => Err(ApiError::over_quota(format!(
                "the tenant holds {} entries, and its quota is {}",
                usage.entries, quota.max_entries
            ))),
            QuotaDecision::TooManyBytes(usage) => Err(ApiError::over_quota(format!(
                "the tenant's entries hold {} bytes, and its quota is {}",
                usage.bytes, quota.max_bytes
            ))),
            _ => Ok(()),
        }
    }

    /// Gives back the room of `keys` of `tenant` (deleted, or a write that failed). A ledger
    /// that cannot be reached keeps counting them until their TTL: logged, not an error.
    pub(crate) async fn release(&self, tenant: &TenantName, limits: &Limits, keys: &[&str]) {
        if quota_limits(limits).is_none() {
            return;
        }
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.release(tenant.as_str(), keys).await {
                    tracing::warn!(error = %error, "quota not released: counted until the TTL");
                }
            }
            None => self.local.release(tenant, |key| keys.contains(&key)),
        }
    }

    /// Gives back the room of `tenant`'s keys under `prefix`.
    pub(crate) async fn release_prefix(&self, tenant: &TenantName, limits: &Limits, prefix: &str) {
        if quota_limits(limits).is_none() {
            return;
        }
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.release_prefix(tenant.as_str(), prefix).await {
                    tracing::warn!(error = %error, "quota not released: counted until the TTL");
                }
            }
            None => self.local.release(tenant, |key| key.starts_with(prefix)),
        }
    }

    /// Gives back all of `tenant`'s room (flushed).
    pub(crate) async fn clear(&self, tenant: &TenantName) {
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.clear(tenant.as_str()).await {
                    tracing::warn!(error = %error, "quota not cleared: counted until the TTL");
                }
            }
            None => self.local.release(tenant, |_| true),
        }
    }

    /// Moves the expiry of `tenant`'s `key` to `ttl` from now.
    pub(crate) async fn touch(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        key: &str,
        ttl: Duration,
    ) {
        if quota_limits(limits).is_none() {
            return;
        }
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.touch(tenant.as_str(), key, ttl).await {
                    tracing::warn!(error = %error, "quota expiry not moved");
                }
            }
            None => self.local.touch(tenant, key, ttl),
        }
    }

    /// What `tenant` holds against its quota.
    pub(crate) async fn report(
        &self,
        tenant: &TenantName,
        limits: &Limits,
    ) -> Result<QuotaReport, ApiError> {
        let usage = match &self.shared {
            Some(ledger) => ledger
                .usage(tenant.as_str())
                .await
                .map_err(|error| unavailable(&error))?,
            None => self.local.usage(tenant),
        };
        Ok(QuotaReport {
            entries: usage.entries,
            bytes: usage.bytes,
            max_entries: (limits.max_entries != 0).then_some(limits.max_entries),
            max_bytes: (limits.max_bytes != 0).then_some(limits.max_bytes),
        })
    }
}

/// The ledger of this instance: per tenant, each entry's size and expiry.
#[derive(Debug, Default)]
struct LocalLedger {
    tenants: Mutex<HashMap<TenantName, Book>>,
}

/// One tenant's entries.
#[derive(Debug, Default)]
struct Book {
    entries: HashMap<String, (u64, Instant)>,
    /// The same entries by expiry, to drop the expired ones in order.
    by_expiry: BTreeSet<(Instant, String)>,
    bytes: u64,
}

impl Book {
    fn purge(&mut self, now: Instant) {
        while let Some((expires, _)) = self.by_expiry.first()
            && *expires <= now
        {
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.remove(&key);
            }
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some((size, expires)) = self.entries.remove(key) {
            self.bytes -= size;
            self.by_expiry.remove(&(expires, key.to_owned()));
        }
    }

    fn usage(&self) -> QuotaUsage {
        QuotaUsage {
            entries: self.entries.len() as u64,
            bytes: self.bytes,
        }
    }
}

impl LocalLedger {
    fn book<T>(&self, tenant: &TenantName, use_it: impl FnOnce(&mut Book) -> T) -> T {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        let book = tenants.entry(tenant.clone()).or_default();
        book.purge(Instant::now());
        use_it(book)
    }

    fn reserve(
        &self,
        tenant: &TenantName,
        quota: QuotaLimits,
        writes: &[Room<'_>],
    ) -> QuotaDecision {
        self.book(tenant, |book| {
            let before = book.usage();
            let (mut entries, mut bytes) = (before.entries, before.bytes);
            let mut seen: HashMap<&str, u64> = HashMap::new();
            for room in writes {
                let old = seen
                    .get(room.key)
                    .copied()
                    .or_else(|| book.entries.get(room.key).map(|(size, _)| *size));
                if let Some(old) = old {
                    bytes = bytes - old + room.size();
                } else {
                    entries += 1;
                    bytes += room.size();
                }
                seen.insert(room.key, room.size());
            }
            if entries > quota.max_entries && entries > before.entries {
                return QuotaDecision::TooManyEntries(before);
            }
            if bytes > quota.max_bytes && bytes > before.bytes {
                return QuotaDecision::TooManyBytes(before);
            }
            let now = Instant::now();
            for room in writes {
                book.remove(room.key);
                let expires = now + room.ttl;
                book.entries
                    .insert(room.key.to_owned(), (room.size(), expires));
                book.by_expiry.insert((expires, room.key.to_owned()));
                book.bytes += room.size();
            }
            QuotaDecision::Admitted(book.usage())
        })
    }

    fn release(&self, tenant: &TenantName, released: impl Fn(&str) -> bool) {
        self.book(tenant, |book| {
            let keys: Vec<String> = book
                .entries
                .keys()
                .filter(|key| released(key))
                .cloned()
                .collect();
            for key in keys {
                book.remove(&key);
            }
        });
    }

    fn touch(&self, tenant: &TenantName, key: &str, ttl: Duration) {
        self.book(tenant, |book| {
            if let Some(&(size, expires)) = book.entries.get(key) {
                book.by_expiry.remove(&(expires, key.to_owned()));
                let expires = Instant::now() + ttl;
                book.entries.insert(key.to_owned(), (size, expires));
                book.by_expiry.insert((expires, key.to_owned()));
            }
        });
    }

    fn usage(&self, tenant: &TenantName) -> QuotaUsage {
        self.book(tenant, |book| book.usage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(key: &str, value_bytes: usize, ttl_ms: u64) -> Room<'_> {
        Room {
            key,
            value_bytes,
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    #[test]
    fn the_local_ledger_counts_as_the_shared_one() {
        let ledger = LocalLedger::default();
        let tenant = TenantName::new("t").unwrap();
        let quota = QuotaLimits {
            max_entries: 3,
            max_bytes: 100,
        };
        let usage = |entries, bytes| QuotaUsage { entries, bytes };
        let minute = 60_000;
        assert_eq!(
            ledger.reserve(
                &tenant,
                quota,
                &[room("a", 39, minute), room("b", 39, minute)]
            ),
            QuotaDecision::Admitted(usage(2, 80))
        );
        assert_eq!(
            ledger.reserve(
                &tenant,
                quota,
                &[room("a", 9, minute), room("a", 19, minute)]
            ),
            QuotaDecision::Admitted(usage(2, 60))
        );
        assert_eq!(
            ledger.reserve(&tenant, quota, &[room("c", 40, minute)]),
            QuotaDecision::TooManyBytes(usage(2, 60))
        );
        assert_eq!(
            ledger.reserve(
                &tenant,
                quota,
                &[room("c", 0, minute), room("d", 0, minute)]
            ),
            QuotaDecision::TooManyEntries(usage(2, 60))
        );
        ledger.release(&tenant, |key| key == "a");
        assert_eq!(ledger.usage(&tenant), usage(1, 40));
        ledger.reserve(&tenant, quota, &[room("short", 9, 1)]);
        ledger.touch(&tenant, "b", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5)); // real time: both entries expire
        assert_eq!(ledger.usage(&tenant), usage(0, 0));
    }
}
