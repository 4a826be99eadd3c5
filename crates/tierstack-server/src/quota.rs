//! Quotas per tenant: how many entries and bytes (of keys and values) a tenant's live entries
//! may hold. Counted on this instance, or in Redis by every instance together.
//!
//! The ledger follows the writes the server makes: a write reserves room before it lands, a
//! delete, a prefix delete or a flush gives it back, and an entry leaves the count at its TTL.
//! It may count an entry the backend dropped early (evicted under memory pressure, say), or one
//! a delete removed after a racing write of it had landed and settled, until that entry's TTL
//! passes. It can miss an entry whose write failed (timed out, say) but landed, if a delete of
//! its key released the reservation meanwhile, until that key is written or deleted again.
//!
//! Every write that lands is settled: recorded exactly, also when a removal released or held
//! its record while it was in flight. A delete or a compare-and-set removal holds the entry's
//! record (it keeps counting) and drops it once the removal has happened, or merges it back if
//! not. A write racing a removal of its key is thus counted, and a removal that fails frees no
//! room while it runs.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
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
    /// Added to each entry's TTL in the ledger: the data's TTL starts when its write lands,
    /// after the reservation, so the ledger's record must outlive it (by as long as a request
    /// may take), or a touch right after the write would find no record to move.
    slack: Duration,
}

/// A reservation, to [`settle`](Quotas::settle) once its writes have landed.
#[must_use]
pub(crate) struct Reserved {
    /// Whether the tenant has a quota (else nothing was recorded).
    counted: bool,
}

/// Whether [`Quotas::hold`] held a record, to [`finish`](Quotas::finish).
#[must_use]
pub(crate) struct Held(bool);

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
    /// Quotas counted on this instance; records outlive their entries by `slack`.
    pub(crate) fn local(slack: Duration) -> Self {
        Self {
            local: LocalLedger::default(),
            shared: None,
            slack,
        }
    }

    /// Quotas counted in Redis, shared with every instance that counts there.
    pub(crate) fn shared(ledger: QuotaLedger, slack: Duration) -> Self {
        Self {
            local: LocalLedger::default(),
            shared: Some(ledger),
            slack,
        }
    }

    fn ledger_writes<'a>(&self, rooms: &'a [Room<'a>]) -> Vec<QuotaWrite<'a>> {
        rooms
            .iter()
            .map(|room| QuotaWrite {
                member: room.key,
                size: room.size(),
                ttl: room.ttl.saturating_add(self.slack),
            })
            .collect()
    }

    /// Records `writes` of `tenant` if together they keep it within its quota: 507 with the
    /// reason if not (nothing recorded), 503 if the shared ledger cannot be reached (a write
    /// that cannot be counted is not made). A record never shrinks here: the write may not
    /// land. Once it has, [`settle`](Self::settle) it.
    pub(crate) async fn reserve(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        rooms: &[Room<'_>],
    ) -> Result<Reserved, ApiError> {
        let Some(quota) = quota_limits(limits) else {
            return Ok(Reserved { counted: false });
        };
        let writes = self.ledger_writes(rooms);
        let decision = match &self.shared {
            Some(ledger) => ledger
                .reserve(tenant.as_str(), quota, &writes)
                .await
                .map_err(|error| unavailable(&error))?,
            None => self.local.reserve(tenant, quota, &writes),
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
            _ => Ok(Reserved { counted: true }),
        }
    }

    /// Records `rooms` exactly once their writes have landed: smaller than the reservation
    /// kept, or back after a delete released them while the writes were in flight. A ledger
    /// that cannot be reached keeps the reservation until its expiry: logged.
    pub(crate) async fn settle(&self, tenant: &TenantName, rooms: &[Room<'_>], reserved: Reserved) {
        if !reserved.counted {
            return;
        }
        let writes = self.ledger_writes(rooms);
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.settle(tenant.as_str(), &writes).await {
                    tracing::warn!(error = %error, "quota not settled: counted as reserved until the TTL");
                }
            }
            None => self.local.settle(tenant, &writes),
        }
    }

    /// Holds `key`'s record for a removal that may not happen (a delete, a compare-and-set
    /// removal): it keeps counting, apart from the record of a write of `key` that lands
    /// meanwhile, until [`finish`](Self::finish) drops it or merges it back. Releasing first
    /// would free room that a failed removal never gave up; releasing after would drop the
    /// record of that write. A ledger that cannot be reached holds nothing (the record stays,
    /// counting until its TTL): logged.
    pub(crate) async fn hold(&self, tenant: &TenantName, limits: &Limits, key: &str) -> Held {
        if quota_limits(limits).is_none() {
            return Held(false);
        }
        match &self.shared {
            Some(ledger) => match ledger.hold(tenant.as_str(), key).await {
                Ok(held) => Held(held),
                Err(error) => {
                    tracing::warn!(error = %error, "quota not held: counted until the TTL");
                    Held(false)
                }
            },
            None => Held(self.local.hold(tenant, key)),
        }
    }

    /// Ends a [`hold`](Self::hold): drops the held record if `removed`, else merges it back
    /// (no quota check: it counted all along). A request dropped before this leaves the held
    /// record counting until its TTL.
    pub(crate) async fn finish(&self, tenant: &TenantName, key: &str, held: Held, removed: bool) {
        if !held.0 {
            return;
        }
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.finish(tenant.as_str(), key, removed).await {
                    tracing::warn!(error = %error, "quota hold not finished: counted until the TTL");
                }
            }
            None => self.local.finish(tenant, key, removed),
        }
    }

    /// Gives back the room of `tenant`'s keys under `prefix`, before they are deleted.
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
            None => self.local.release_prefix(tenant, prefix),
        }
    }

    /// Gives back all of `tenant`'s room, before it is flushed.
    pub(crate) async fn clear(&self, tenant: &TenantName) {
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.clear(tenant.as_str()).await {
                    tracing::warn!(error = %error, "quota not cleared: counted until the TTL");
                }
            }
            None => self.local.clear(tenant),
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
        let ttl = ttl.saturating_add(self.slack);
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

/// At most this many expired entries leave a tenant's book per call: a call's work stays
/// bounded however many expired since the last one.
const PURGE_PER_CALL: usize = 1_000;

/// The ledger of this instance: a book per tenant, each behind its own lock.
#[derive(Debug, Default)]
struct LocalLedger {
    tenants: Mutex<HashMap<TenantName, Arc<Mutex<Book>>>>,
}

/// A record in a tenant's book: an entry's, or one a removal in flight holds (as
/// `QuotaLedger::hold`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Slot {
    Entry(String),
    Held(String),
}

/// One tenant's records; every one counts.
#[derive(Debug, Default)]
struct Book {
    records: HashMap<Slot, (u64, Instant)>,
    /// The same records by expiry, to drop the expired ones in order.
    by_expiry: BTreeSet<(Instant, Slot)>,
    bytes: u64,
}

impl Book {
    fn purge(&mut self, now: Instant) {
        for _ in 0..PURGE_PER_CALL {
            match self.by_expiry.first() {
                Some((expires, _)) if *expires <= now => {}
                _ => return,
            }
            if let Some((_, slot)) = self.by_expiry.pop_first() {
                self.remove(&slot);
            }
        }
    }

    /// Drops `slot`'s record, and answers it.
    fn remove(&mut self, slot: &Slot) -> Option<(u64, Instant)> {
        let (size, expires) = self.records.remove(slot)?;
        self.bytes -= size;
        self.by_expiry.remove(&(expires, slot.clone()));
        Some((size, expires))
    }

    /// Records `slot` at `size`, expiring at `expires`.
    fn put(&mut self, slot: Slot, size: u64, expires: Instant) {
        self.remove(&slot);
        self.records.insert(slot.clone(), (size, expires));
        self.by_expiry.insert((expires, slot));
        self.bytes += size;
    }

    fn entry(&self, key: &str) -> Option<(u64, Instant)> {
        self.records.get(&Slot::Entry(key.to_owned())).copied()
    }

    fn usage(&self) -> QuotaUsage {
        QuotaUsage {
            entries: self.records.len() as u64,
            bytes: self.bytes,
        }
    }
}

impl LocalLedger {
    fn book<T>(&self, tenant: &TenantName, use_it: impl FnOnce(&mut Book) -> T) -> T {
        let book = {
            let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(tenants.entry(tenant.clone()).or_default())
        };
        let mut book = book.lock().unwrap_or_else(PoisonError::into_inner);
        book.purge(Instant::now());
        use_it(&mut book)
    }

    /// As `QuotaLedger::reserve`: a record only grows here.
    fn reserve(
        &self,
        tenant: &TenantName,
        quota: QuotaLimits,
        writes: &[QuotaWrite<'_>],
    ) -> QuotaDecision {
        self.book(tenant, |book| {
            let before = book.usage();
            let (mut entries, mut bytes, mut grown) = (before.entries, before.bytes, false);
            let now = Instant::now();
            let mut records: HashMap<&str, (u64, Instant)> = HashMap::new();
            for write in writes {
                let old = records
                    .get(write.member)
                    .copied()
                    .or_else(|| book.entry(write.member));
                let mut record = (write.size, now + write.ttl);
                if let Some((old_size, old_expiry)) = old {
                    grown |= old_size > write.size || old_expiry > record.1;
                    record = (old_size.max(write.size), old_expiry.max(record.1));
                    bytes = bytes - old_size + record.0;
                } else {
                    entries += 1;
                    bytes += record.0;
                }
                records.insert(write.member, record);
            }
            if entries > quota.max_entries && entries > before.entries {
                return QuotaDecision::TooManyEntries(before);
            }
            if bytes > quota.max_bytes && bytes > before.bytes {
                return QuotaDecision::TooManyBytes(before);
            }
            for (key, (size, expires)) in records {
                book.put(Slot::Entry(key.to_owned()), size, expires);
            }
            if grown {
                QuotaDecision::AdmittedToSettle(book.usage())
            } else {
                QuotaDecision::Admitted(book.usage())
            }
        })
    }

    /// As `QuotaLedger::settle`: exactly, whether or not a record is there.
    fn settle(&self, tenant: &TenantName, writes: &[QuotaWrite<'_>]) {
        self.book(tenant, |book| {
            let now = Instant::now();
            for write in writes {
                book.put(
                    Slot::Entry(write.member.to_owned()),
                    write.size,
                    now + write.ttl,
                );
            }
        });
    }

    /// As `QuotaLedger::hold`.
    fn hold(&self, tenant: &TenantName, key: &str) -> bool {
        self.book(tenant, |book| {
            let held = Slot::Held(key.to_owned());
            if book.records.contains_key(&held) {
                return false;
            }
            match book.remove(&Slot::Entry(key.to_owned())) {
                Some((size, expires)) => {
                    book.put(held, size, expires);
                    true
                }
                None => false,
            }
        })
    }

    /// As `QuotaLedger::finish`.
    fn finish(&self, tenant: &TenantName, key: &str, removed: bool) {
        self.book(tenant, |book| {
            let Some((size, expires)) = book.remove(&Slot::Held(key.to_owned())) else {
                return;
            };
            if removed {
                return;
            }
            let (size, expires) = match book.entry(key) {
                Some((old_size, old_expires)) => (size.max(old_size), expires.max(old_expires)),
                None => (size, expires),
            };
            book.put(Slot::Entry(key.to_owned()), size, expires);
        });
    }

    fn release_prefix(&self, tenant: &TenantName, prefix: &str) {
        self.book(tenant, |book| {
            let slots: Vec<Slot> = book
                .records
                .keys()
                .filter(|slot| matches!(slot, Slot::Entry(key) if key.starts_with(prefix)))
                .cloned()
                .collect();
            for slot in slots {
                book.remove(&slot);
            }
        });
    }

    fn clear(&self, tenant: &TenantName) {
        self.book(tenant, |book| *book = Book::default());
    }

    /// As `QuotaLedger::touch`: the entry's record, and a held one.
    fn touch(&self, tenant: &TenantName, key: &str, ttl: Duration) {
        self.book(tenant, |book| {
            let expires = Instant::now() + ttl;
            for slot in [Slot::Held(key.to_owned()), Slot::Entry(key.to_owned())] {
                if let Some(&(size, _)) = book.records.get(&slot) {
                    book.put(slot, size, expires);
                }
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

    #[test]
    fn the_local_ledger_counts_as_the_shared_one() {
        let ledger = LocalLedger::default();
        let tenant = TenantName::new("t").unwrap();
        let quota = QuotaLimits {
            max_entries: 3,
            max_bytes: 100,
        };
        let usage = |entries, bytes| QuotaUsage { entries, bytes };
        let minute = Duration::from_secs(60);
        let write = |member, size, ttl| QuotaWrite { member, size, ttl };
        assert_eq!(
            ledger.reserve(
                &tenant,
                quota,
                &[write("a", 40, minute), write("b", 40, minute)]
            ),
            QuotaDecision::Admitted(usage(2, 80))
        );
        // A smaller write keeps the larger record until it is settled.
        let shrink = [write("a", 10, minute), write("a", 20, minute)];
        assert_eq!(
            ledger.reserve(&tenant, quota, &shrink),
            QuotaDecision::AdmittedToSettle(usage(2, 80))
        );
        ledger.settle(&tenant, &shrink[1..]);
        assert_eq!(ledger.usage(&tenant), usage(2, 60));
        assert_eq!(
            ledger.reserve(&tenant, quota, &[write("c", 41, minute)]),
            QuotaDecision::TooManyBytes(usage(2, 60))
        );
        assert_eq!(
            ledger.reserve(
                &tenant,
                quota,
                &[write("c", 0, minute), write("d", 0, minute)]
            ),
            QuotaDecision::TooManyEntries(usage(2, 60))
        );
        assert!(ledger.hold(&tenant, "a"));
        ledger.finish(&tenant, "a", true);
        assert_eq!(ledger.usage(&tenant), usage(1, 40));
        let moment = Duration::from_millis(1);
        ledger.reserve(&tenant, quota, &[write("short", 9, moment)]);
        ledger.touch(&tenant, "b", moment);
        std::thread::sleep(Duration::from_millis(5)); // real time: both entries expire
        assert_eq!(ledger.usage(&tenant), usage(0, 0));
        ledger.reserve(
            &tenant,
            quota,
            &[write("p/1", 1, minute), write("q", 1, minute)],
        );
        ledger.release_prefix(&tenant, "p/");
        assert_eq!(ledger.usage(&tenant), usage(1, 1));
        ledger.clear(&tenant);
        assert_eq!(ledger.usage(&tenant), usage(0, 0));
    }

    #[test]
    fn a_held_record_counts_until_its_removal_happens() {
        let ledger = LocalLedger::default();
        let tenant = TenantName::new("t").unwrap();
        let quota = QuotaLimits {
            max_entries: 3,
            max_bytes: 100,
        };
        let usage = |entries, bytes| QuotaUsage { entries, bytes };
        let minute = Duration::from_secs(60);
        let write = |member, size| QuotaWrite {
            member,
            size,
            ttl: minute,
        };
        ledger.reserve(&tenant, quota, &[write("a", 40)]);
        assert!(ledger.hold(&tenant, "a"));
        assert!(!ledger.hold(&tenant, "a"), "held once");
        assert!(!ledger.hold(&tenant, "none"));
        // Held, it still counts: no room for 61 more bytes.
        assert_eq!(
            ledger.reserve(&tenant, quota, &[write("b", 61)]),
            QuotaDecision::TooManyBytes(usage(1, 40))
        );
        // A write of the key meanwhile counts apart; a removal that did not happen merges
        // back: the larger size.
        ledger.reserve(&tenant, quota, &[write("a", 5)]);
        ledger.settle(&tenant, &[write("a", 5)]);
        assert_eq!(ledger.usage(&tenant), usage(2, 45));
        ledger.finish(&tenant, "a", false);
        assert_eq!(ledger.usage(&tenant), usage(1, 40));
        // A removal that happened drops the held record, and leaves a newer write's.
        assert!(ledger.hold(&tenant, "a"));
        ledger.settle(&tenant, &[write("a", 7)]);
        ledger.finish(&tenant, "a", true);
        assert_eq!(ledger.usage(&tenant), usage(1, 7));
        // A touch moves the held record's expiry too: it merges back with it.
        assert!(ledger.hold(&tenant, "a"));
        ledger.finish(&tenant, "a", true);
        ledger.settle(&tenant, &[write("c", 9)]);
        assert!(ledger.hold(&tenant, "c"));
        ledger.touch(&tenant, "c", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5)); // real time: the touched expiry passes
        ledger.finish(&tenant, "c", false);
        assert_eq!(ledger.usage(&tenant), usage(0, 0));
    }
}
