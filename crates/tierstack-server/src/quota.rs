//! Quotas per tenant: how many entries and bytes (of keys and values) a tenant's live entries
//! may hold. Counted on this instance, or in Redis by every instance together.
//!
//! The ledger follows the protocol of `QuotaLedger` (in `tierstack-redis`), here or in Redis:
//! a write reserves room before it is made and settles once its outcome is known; a delete, a
//! compare-and-set removal and a prefix delete hold the records they may remove and finish
//! them once their outcome is known (a held record keeps counting; one whose removal happened
//! while a write of its key was in flight stays); an entry leaves the count at its TTL. The
//! count can run high, until the entry's TTL: an entry the backend dropped early (evicted), one
//! removed after an overlapping write, a request dropped mid-removal. It does not run low while
//! every write lands within [`in_flight_for`] of its reservation, except after a flush that
//! failed (the flush forgets the tenant's records first).

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

/// A reservation, to [`settle`](Quotas::settle) once its writes' outcome is known.
#[must_use]
pub(crate) struct Reserved {
    /// Whether the tenant has a quota (else nothing was recorded).
    counted: bool,
}

/// The keys whose records [`Quotas::hold`] held, to [`finish`](Quotas::finish).
#[must_use]
pub(crate) struct Held(Vec<String>);

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

/// How long a write whose request was dropped counts as in flight: twice `request_timeout`,
/// past which its write has landed or never will.
pub(crate) fn in_flight_for(request_timeout: Duration) -> Duration {
    request_timeout.saturating_mul(2)
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
    /// land. Once its outcome is known, [`settle`](Self::settle) it.
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
            None => self
                .local
                .reserve(tenant, quota, &writes, in_flight_for(self.slack)),
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

    /// Ends a reservation once its writes' outcome is known: `landed` or not (a condition
    /// did not hold). A write that failed is not settled (it may have landed): it stays in
    /// flight until [`in_flight_for`] passes, and its reservation counts until its TTL. A
    /// ledger that cannot be reached leaves the same: logged.
    pub(crate) async fn settle(
        &self,
        tenant: &TenantName,
        rooms: &[Room<'_>],
        reserved: Reserved,
        landed: bool,
    ) {
        if !reserved.counted {
            return;
        }
        let writes = self.ledger_writes(rooms);
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.settle(tenant.as_str(), &writes, landed).await {
                    tracing::warn!(error = %error, "quota not settled: counted as reserved until the TTL");
                }
            }
            None => self.local.settle(tenant, &writes, landed),
        }
    }

    /// Holds the records of `keys` for a removal that may not happen (`QuotaLedger::hold`):
    /// they keep counting until [`finish`](Self::finish)ed. A ledger that cannot be reached
    /// holds nothing (the records stay, counting until their TTL): logged.
    pub(crate) async fn hold(&self, tenant: &TenantName, limits: &Limits, keys: &[&str]) -> Held {
        if quota_limits(limits).is_none() {
            return Held(Vec::new());
        }
        let outcome = match &self.shared {
            Some(ledger) => match ledger.hold(tenant.as_str(), keys).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::warn!(error = %error, "quota not held: counted until the TTL");
                    return Held(Vec::new());
                }
            },
            None => self.local.hold(tenant, keys),
        };
        Held(
            keys.iter()
                .zip(outcome)
                .filter(|(_, held)| *held)
                .map(|(key, _)| (*key).to_owned())
                .collect(),
        )
    }

    /// Holds the records of `tenant`'s keys under `prefix`, as [`hold`](Self::hold).
    pub(crate) async fn hold_prefix(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        prefix: &str,
    ) -> Held {
        if quota_limits(limits).is_none() {
            return Held(Vec::new());
        }
        match &self.shared {
            Some(ledger) => match ledger.hold_prefix(tenant.as_str(), prefix).await {
                Ok(held) => Held(held),
                Err(error) => {
                    tracing::warn!(error = %error, "quota not held: counted until the TTL");
                    Held(Vec::new())
                }
            },
            None => Held(self.local.hold_prefix(tenant, prefix)),
        }
    }

    /// Ends a [`hold`](Self::hold) once the removal's outcome is known (`QuotaLedger::finish`).
    /// A request dropped before this leaves the held records counting until their TTL.
    pub(crate) async fn finish(&self, tenant: &TenantName, held: Held, removed: bool) {
        if held.0.is_empty() {
            return;
        }
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger.finish(tenant.as_str(), &held.0, removed).await {
                    tracing::warn!(error = %error, "quota hold not finished: counted until the TTL");
                }
            }
            None => self.local.finish(tenant, &held.0, removed),
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

/// At most this many expired records (and as many expired in-flight marks) leave a tenant's
/// book per call: a call's work stays bounded however many expired since the last one.
const PURGE_PER_CALL: usize = 1_000;

/// The ledger of this instance, as `QuotaLedger` keeps it in Redis: a book per tenant, each
/// behind its own lock.
#[derive(Debug, Default)]
struct LocalLedger {
    tenants: Mutex<HashMap<TenantName, Arc<Mutex<Book>>>>,
}

/// A record in a tenant's book: an entry's, or one a removal in flight holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Slot {
    Entry(String),
    Held(String),
}

/// The writes of one key in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    count: u32,
    /// Whether another write or a touch overlapped them.
    overlapped: bool,
    deadline: Instant,
}

/// One tenant's records (every one counts) and writes in flight.
#[derive(Debug, Default)]
struct Book {
    records: HashMap<Slot, (u64, Instant)>,
    /// The same records by expiry, to drop the expired ones in order.
    by_expiry: BTreeSet<(Instant, Slot)>,
    bytes: u64,
    writes: HashMap<String, InFlight>,
    /// The same keys by deadline, to drop the abandoned ones in order.
    by_deadline: BTreeSet<(Instant, String)>,
}

impl Book {
    fn purge(&mut self, now: Instant) {
        for _ in 0..PURGE_PER_CALL {
            match self.by_expiry.first() {
                Some((expires, _)) if *expires <= now => {}
                _ => break,
            }
            if let Some((_, slot)) = self.by_expiry.pop_first() {
                self.remove(&slot);
            }
        }
        for _ in 0..PURGE_PER_CALL {
            match self.by_deadline.first() {
                Some((deadline, _)) if *deadline <= now => {}
                _ => return,
            }
            if let Some((_, key)) = self.by_deadline.pop_first() {
                self.writes.remove(&key);
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

    /// Records `key`'s entry at the larger size and later expiry of `record` and the one
    /// there.
    fn merge(&mut self, key: &str, (size, expires): (u64, Instant)) {
        let (size, expires) = match self.entry(key) {
            Some((old_size, old_expires)) => (size.max(old_size), expires.max(old_expires)),
            None => (size, expires),
        };
        self.put(Slot::Entry(key.to_owned()), size, expires);
    }

    fn entry(&self, key: &str) -> Option<(u64, Instant)> {
        self.records.get(&Slot::Entry(key.to_owned())).copied()
    }

    /// Marks a write of `key` in flight until `deadline` (or its settle).
    fn start_write(&mut self, key: &str, deadline: Instant) {
        let write = self.writes.entry(key.to_owned()).or_insert(InFlight {
            count: 0,
            overlapped: false,
            deadline,
        });
        write.count += 1;
        write.overlapped |= write.count > 1;
        let old = std::mem::replace(&mut write.deadline, deadline);
        self.by_deadline.remove(&(old, key.to_owned()));
        self.by_deadline.insert((deadline, key.to_owned()));
    }

    /// Ends a write of `key`: whether other writes or a touch overlapped it.
    fn end_write(&mut self, key: &str) -> bool {
        let Some(write) = self.writes.get_mut(key) else {
            return false;
        };
        let overlapped = write.overlapped;
        write.count -= 1;
        if write.count == 0 {
            let deadline = write.deadline;
            self.writes.remove(key);
            self.by_deadline.remove(&(deadline, key.to_owned()));
        }
        overlapped
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

    /// As `QuotaLedger::reserve`.
    fn reserve(
        &self,
        tenant: &TenantName,
        quota: QuotaLimits,
        writes: &[QuotaWrite<'_>],
        in_flight: Duration,
    ) -> QuotaDecision {
        self.book(tenant, |book| {
            let before = book.usage();
            let (mut entries, mut bytes) = (before.entries, before.bytes);
            let now = Instant::now();
            let mut records: HashMap<&str, (u64, Instant)> = HashMap::new();
            for write in writes {
                let old = records
                    .get(write.member)
                    .copied()
                    .or_else(|| book.entry(write.member));
                let mut record = (write.size, now + write.ttl);
                if let Some((old_size, old_expiry)) = old {
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
            for write in writes {
                book.start_write(write.member, now + in_flight);
            }
            QuotaDecision::Admitted(book.usage())
        })
    }

    /// As `QuotaLedger::settle`.
    fn settle(&self, tenant: &TenantName, writes: &[QuotaWrite<'_>], landed: bool) {
        self.book(tenant, |book| {
            let now = Instant::now();
            for write in writes {
                let overlapped = book.end_write(write.member);
                if !landed {
                    continue;
                }
                let record = (write.size, now + write.ttl);
                if overlapped {
                    book.merge(write.member, record);
                } else {
                    book.put(Slot::Entry(write.member.to_owned()), record.0, record.1);
                }
            }
        });
    }

    /// As `QuotaLedger::hold`.
    fn hold(&self, tenant: &TenantName, keys: &[&str]) -> Vec<bool> {
        self.book(tenant, |book| {
            keys.iter()
                .map(|key| {
                    let held = Slot::Held((*key).to_owned());
                    if book.records.contains_key(&held) {
                        return false;
                    }
                    match book.remove(&Slot::Entry((*key).to_owned())) {
                        Some((size, expires)) => {
                            book.put(held, size, expires);
                            true
                        }
                        None => false,
                    }
                })
                .collect()
        })
    }

    /// As `QuotaLedger::hold_prefix`.
    fn hold_prefix(&self, tenant: &TenantName, prefix: &str) -> Vec<String> {
        let keys: Vec<String> = self.book(tenant, |book| {
            book.records
                .keys()
                .filter_map(|slot| match slot {
                    Slot::Entry(key) if key.starts_with(prefix) => Some(key.clone()),
                    _ => None,
                })
                .collect()
        });
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let outcome = self.hold(tenant, &refs);
        keys.into_iter()
            .zip(outcome)
            .filter_map(|(key, held)| held.then_some(key))
            .collect()
    }

    /// As `QuotaLedger::finish`.
    fn finish(&self, tenant: &TenantName, keys: &[String], removed: bool) {
        self.book(tenant, |book| {
            for key in keys {
                let Some(record) = book.remove(&Slot::Held(key.clone())) else {
                    continue;
                };
                if !removed || book.writes.contains_key(key) {
                    book.merge(key, record);
                }
            }
        });
    }

    fn clear(&self, tenant: &TenantName) {
        self.book(tenant, |book| *book = Book::default());
    }

    /// As `QuotaLedger::touch`.
    fn touch(&self, tenant: &TenantName, key: &str, ttl: Duration) {
        self.book(tenant, |book| {
            if let Some(write) = book.writes.get_mut(key) {
                write.overlapped = true;
            }
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

    const QUOTA: QuotaLimits = QuotaLimits {
        max_entries: 3,
        max_bytes: 100,
    };
    const MINUTE: Duration = Duration::from_secs(60);

    fn usage(entries: u64, bytes: u64) -> QuotaUsage {
        QuotaUsage { entries, bytes }
    }

    fn write(member: &str, size: u64, ttl: Duration) -> QuotaWrite<'_> {
        QuotaWrite { member, size, ttl }
    }

    fn held(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| (*key).to_owned()).collect()
    }

    #[test]
    fn the_local_ledger_counts_as_the_shared_one() {
        let ledger = LocalLedger::default();
        let t = TenantName::new("t").unwrap();
        let reserve = |writes: &[QuotaWrite<'_>]| ledger.reserve(&t, QUOTA, writes, MINUTE);
        let two = [write("a", 40, MINUTE), write("b", 40, MINUTE)];
        assert_eq!(reserve(&two), QuotaDecision::Admitted(usage(2, 80)));
        ledger.settle(&t, &two, true);
        // A reservation keeps the larger record until the write lands.
        let smaller = [write("a", 20, MINUTE)];
        assert_eq!(reserve(&smaller), QuotaDecision::Admitted(usage(2, 80)));
        ledger.settle(&t, &smaller, true);
        assert_eq!(ledger.usage(&t), usage(2, 60));
        let failed = [write("b", 1, Duration::from_millis(1))];
        let _ = reserve(&failed);
        ledger.settle(&t, &failed, false);
        assert_eq!(ledger.usage(&t), usage(2, 60));
        assert_eq!(
            reserve(&[write("c", 41, MINUTE)]),
            QuotaDecision::TooManyBytes(usage(2, 60))
        );
        assert_eq!(
            reserve(&[write("c", 0, MINUTE), write("d", 0, MINUTE)]),
            QuotaDecision::TooManyEntries(usage(2, 60))
        );
        assert_eq!(ledger.hold(&t, &["a", "zz"]), [true, false]);
        ledger.finish(&t, &held(&["a"]), true);
        assert_eq!(ledger.usage(&t), usage(1, 40));
        let moment = Duration::from_millis(1);
        let short = [write("short", 9, moment)];
        let _ = reserve(&short);
        ledger.settle(&t, &short, true);
        ledger.touch(&t, "b", moment);
        std::thread::sleep(Duration::from_millis(5)); // real time: both entries expire
        assert_eq!(ledger.usage(&t), usage(0, 0));
        let two = [write("p/1", 1, MINUTE), write("q", 1, MINUTE)];
        let _ = reserve(&two);
        ledger.settle(&t, &two, true);
        let prefixed = ledger.hold_prefix(&t, "p/");
        assert_eq!(prefixed, ["p/1"]);
        ledger.finish(&t, &prefixed, true);
        assert_eq!(ledger.usage(&t), usage(1, 1));
        ledger.clear(&t);
        assert_eq!(ledger.usage(&t), usage(0, 0));
    }

    /// As `held_records_and_writes_in_flight_never_count_low` on Redis.
    #[test]
    fn held_records_and_writes_in_flight_never_count_low() {
        let ledger = LocalLedger::default();
        let t = TenantName::new("t").unwrap();
        let reserve = |writes: &[QuotaWrite<'_>]| ledger.reserve(&t, QUOTA, writes, MINUTE);
        let a40 = [write("a", 40, MINUTE)];
        let _ = reserve(&a40);
        ledger.settle(&t, &a40, true);
        assert_eq!(ledger.hold(&t, &["a"]), [true]);
        assert_eq!(ledger.hold(&t, &["a"]), [false], "held once");
        assert_eq!(
            reserve(&[write("b", 61, MINUTE)]),
            QuotaDecision::TooManyBytes(usage(1, 40)),
            "a held record still counts"
        );
        let a5 = [write("a", 5, MINUTE)];
        let _ = reserve(&a5);
        ledger.settle(&t, &a5, true);
        assert_eq!(ledger.usage(&t), usage(2, 45));
        ledger.finish(&t, &held(&["a"]), false);
        assert_eq!(ledger.usage(&t), usage(1, 40));
        // A write in flight keeps the record past a removal that happened.
        let a7 = [write("a", 7, MINUTE)];
        let _ = reserve(&a7);
        assert_eq!(ledger.hold(&t, &["a"]), [true]);
        ledger.finish(&t, &held(&["a"]), true);
        assert_eq!(ledger.usage(&t), usage(1, 40));
        ledger.settle(&t, &a7, true);
        assert_eq!(ledger.usage(&t), usage(1, 7));
        assert_eq!(ledger.hold(&t, &["a"]), [true]);
        ledger.finish(&t, &held(&["a"]), true);
        assert_eq!(ledger.usage(&t), usage(0, 0));
        // Overlapping writes keep the larger; alone again, exact.
        let (big, small) = ([write("c", 50, MINUTE)], [write("c", 1, MINUTE)]);
        let _ = reserve(&big);
        let _ = reserve(&small);
        ledger.settle(&t, &big, true);
        ledger.settle(&t, &small, true);
        assert_eq!(ledger.usage(&t), usage(1, 50));
        let _ = reserve(&small);
        ledger.settle(&t, &small, true);
        assert_eq!(ledger.usage(&t), usage(1, 1));
        // A touch overlapping a write keeps its later expiry past the settle.
        let brief = [write("c", 1, Duration::from_millis(1))];
        let _ = reserve(&brief);
        ledger.touch(&t, "c", MINUTE);
        ledger.settle(&t, &brief, true);
        std::thread::sleep(Duration::from_millis(5)); // real time: past the brief write's TTL
        assert_eq!(ledger.usage(&t), usage(1, 1));
        // A touch moves a held record's expiry.
        assert_eq!(ledger.hold(&t, &["c"]), [true]);
        assert!(ledger.hold_prefix(&t, "").is_empty());
        ledger.touch(&t, "c", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5)); // real time: past the touched expiry
        ledger.finish(&t, &held(&["c"]), false);
        assert_eq!(ledger.usage(&t), usage(0, 0));
        // A write never settled stays in flight until its deadline.
        let d = [write("d", 3, MINUTE)];
        let _ = ledger.reserve(&t, QUOTA, &d, Duration::from_millis(1));
        assert_eq!(ledger.hold(&t, &["d"]), [true]);
        ledger.finish(&t, &held(&["d"]), true);
        assert_eq!(ledger.usage(&t), usage(1, 3));
        std::thread::sleep(Duration::from_millis(5)); // real time: past the deadline
        assert_eq!(ledger.hold(&t, &["d"]), [true]);
        ledger.finish(&t, &held(&["d"]), true);
        assert_eq!(ledger.usage(&t), usage(0, 0));
    }
}
