//! Quotas per tenant: how many entries and bytes (of keys and values) a tenant's live entries
//! may hold. Counted on this instance, or in Redis by every instance together.
//!
//! The ledger follows the writes the server makes: a write reserves room before it lands, a
//! delete, a prefix delete or a flush gives it back, and an entry leaves the count at its TTL.
//! It may count an entry the backend dropped early (evicted under memory pressure, say) until
//! that entry's TTL passes. It can miss an entry whose write raced a delete of the same key, or
//! whose write timed out but landed, until that key is written or deleted again. A
//! compare-and-set removal takes the record out before it removes and puts it back if the
//! removal does not happen, so a write racing it stays counted.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tierstack::redis::{
    QuotaDecision, QuotaLedger, QuotaLimits, QuotaRecord, QuotaUsage, QuotaWrite,
};

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

/// What a reservation asks of the write's caller once the write has landed.
#[must_use]
pub(crate) struct Reserved {
    /// The ledger kept an old record's larger size or later expiry: settle it.
    settle: bool,
}

/// A record [`Quotas::take`] took out of the ledger, to [`restore`](Quotas::restore).
#[must_use]
pub(crate) enum Taken {
    Local { size: u64, expires: Instant },
    Shared(QuotaRecord),
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
            return Ok(Reserved { settle: false });
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
            QuotaDecision::AdmittedToSettle(_) => Ok(Reserved { settle: true }),
            _ => Ok(Reserved { settle: false }),
        }
    }

    /// Records `rooms` exactly once their writes have landed, where the reservation kept more.
    /// A ledger that cannot be reached keeps the larger record until its expiry: logged.
    pub(crate) async fn settle(&self, tenant: &TenantName, rooms: &[Room<'_>], reserved: Reserved) {
        if !reserved.settle {
            return;
        }
        let writes = self.ledger_writes(rooms);
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.settle(tenant.as_str(), &writes).await {
                    tracing::warn!(error = %error, "quota not settled: counted larger until the TTL");
                }
            }
            None => self.local.settle(tenant, &writes),
        }
    }

    /// Gives back the room of `keys` of `tenant`, before they are deleted (a write racing the
    /// delete then stays counted, rather than uncounted). A ledger that cannot be reached
    /// keeps counting them until their TTL: logged, not an error.
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
            None => self.local.release(tenant, keys),
        }
    }

    /// Takes `key`'s record out of `tenant`'s ledger before a removal that may not happen:
    /// [`restore`](Self::restore) it if the removal did not. A write of `key` racing the
    /// removal then stays counted (released after the removal instead, that write's record
    /// would go with it). A ledger that cannot be reached takes nothing: the entry stays
    /// counted until its TTL, logged.
    pub(crate) async fn take(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        key: &str,
    ) -> Option<Taken> {
        quota_limits(limits)?;
        match &self.shared {
            Some(ledger) => match ledger.take(tenant.as_str(), key).await {
                Ok(record) => record.map(Taken::Shared),
                Err(error) => {
                    tracing::warn!(error = %error, "quota not released: counted until the TTL");
                    None
                }
            },
            None => self
                .local
                .take(tenant, key)
                .map(|(size, expires)| Taken::Local { size, expires }),
        }
    }

    /// Puts back a record [`take`](Self::take) took, with no quota check: it was counted
    /// before. Merged with a record written meanwhile (the larger size, the later expiry). A
    /// ledger that cannot be reached leaves the entry uncounted until it is written or
    /// deleted again: logged.
    pub(crate) async fn restore(&self, tenant: &TenantName, key: &str, taken: Taken) {
        match (taken, &self.shared) {
            (Taken::Shared(record), Some(ledger)) => {
                if let Err(error) = ledger.restore(tenant.as_str(), key, record).await {
                    tracing::warn!(error = %error, "quota not restored: uncounted until rewritten");
                }
            }
            (Taken::Local { size, expires }, None) => {
                self.local.restore(tenant, key, size, expires);
            }
            // A record goes back to the ledger it came from; a server has one.
            _ => {}
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
        for _ in 0..PURGE_PER_CALL {
            match self.by_expiry.first() {
                Some((expires, _)) if *expires <= now => {}
                _ => return,
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.remove(&key);
            }
        }
    }

    /// Drops `key`'s record, and answers it.
    fn remove(&mut self, key: &str) -> Option<(u64, Instant)> {
        let (size, expires) = self.entries.remove(key)?;
        self.bytes -= size;
        self.by_expiry.remove(&(expires, key.to_owned()));
        Some((size, expires))
    }

    /// Records `key` at `size`, expiring at `expires`.
    fn put(&mut self, key: &str, size: u64, expires: Instant) {
        self.remove(key);
        self.entries.insert(key.to_owned(), (size, expires));
        self.by_expiry.insert((expires, key.to_owned()));
        self.bytes += size;
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
                    .or_else(|| book.entries.get(write.member))
                    .copied();
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
                book.put(key, size, expires);
            }
            if grown {
                QuotaDecision::AdmittedToSettle(book.usage())
            } else {
                QuotaDecision::Admitted(book.usage())
            }
        })
    }

    fn settle(&self, tenant: &TenantName, writes: &[QuotaWrite<'_>]) {
        self.book(tenant, |book| {
            let now = Instant::now();
            for write in writes {
                if book.entries.contains_key(write.member) {
                    book.put(write.member, write.size, now + write.ttl);
                }
            }
        });
    }

    fn release(&self, tenant: &TenantName, keys: &[&str]) {
        self.book(tenant, |book| {
            for key in keys {
                book.remove(key);
            }
        });
    }

    fn take(&self, tenant: &TenantName, key: &str) -> Option<(u64, Instant)> {
        self.book(tenant, |book| book.remove(key))
    }

    /// As `QuotaLedger::restore`: no quota check, merged with a record written meanwhile.
    fn restore(&self, tenant: &TenantName, key: &str, size: u64, expires: Instant) {
        self.book(tenant, |book| {
            if expires <= Instant::now() {
                return;
            }
            let (size, expires) = match book.entries.get(key) {
                Some(&(old_size, old_expires)) => (size.max(old_size), expires.max(old_expires)),
                None => (size, expires),
            };
            book.put(key, size, expires);
        });
    }

    fn release_prefix(&self, tenant: &TenantName, prefix: &str) {
        self.book(tenant, |book| {
            let keys: Vec<String> = book
                .entries
                .keys()
                .filter(|key| key.starts_with(prefix))
                .cloned()
                .collect();
            for key in keys {
                book.remove(&key);
            }
        });
    }

    fn clear(&self, tenant: &TenantName) {
        self.book(tenant, |book| *book = Book::default());
    }

    fn touch(&self, tenant: &TenantName, key: &str, ttl: Duration) {
        self.book(tenant, |book| {
            if let Some(&(size, _)) = book.entries.get(key) {
                book.put(key, size, Instant::now() + ttl);
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
        ledger.release(&tenant, &["a"]);
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
    fn a_taken_record_goes_back_merged_with_a_newer_one() {
        let ledger = LocalLedger::default();
        let tenant = TenantName::new("t").unwrap();
        let quota = QuotaLimits {
            max_entries: 2,
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
        let (size, expires) = ledger.take(&tenant, "a").unwrap();
        assert_eq!((size, ledger.usage(&tenant)), (40, usage(0, 0)));
        assert_eq!(ledger.take(&tenant, "a"), None, "taken once");
        // Written meanwhile, smaller: the restore keeps the larger size, with no quota check.
        ledger.reserve(&tenant, quota, &[write("a", 5), write("b", 60)]);
        ledger.restore(&tenant, "a", size, expires);
        assert_eq!(ledger.usage(&tenant), usage(2, 100));
        // An expired record stays out.
        let (size, _) = ledger.take(&tenant, "a").unwrap();
        ledger.restore(&tenant, "a", size, Instant::now());
        assert_eq!(ledger.usage(&tenant), usage(1, 60));
    }
}
