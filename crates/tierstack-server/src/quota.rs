//! Quotas per tenant: how many entries and bytes (of keys and values) a tenant's live entries
//! may hold. Counted on this instance, or in Redis by every instance together.
//!
//! The ledger follows the protocol of `QuotaLedger` (in `tierstack-redis`), here or in Redis:
//! every write, touch and removal of an entry begins in the ledger before it is made and ends
//! once its outcome is known; while it runs it only raises what the entry counts for, and at
//! its end it is recorded exactly only if no other operation on the entry overlapped it. So
//! the count can run high until an entry's TTL (an entry the backend evicted, operations that
//! overlapped, a request dropped mid-operation) but not low, while every operation reaches the
//! data within [`in_flight_for`] of its beginning; an admin flush forgets the tenant's records
//! first, and a write dropped before it that lands after it is not counted.

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tierstack::core::store::MAX_TTL;
use tierstack::redis::{
    QuotaDecision, QuotaLedger, QuotaLimits, QuotaTicket, QuotaUsage, QuotaWrite,
};
// Tokio's clock: the real one, which tests can pause and move.
use tokio::time::Instant;

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
    /// `None` if the tenant has no quota (nothing was recorded).
    ticket: Option<QuotaTicket>,
}

/// A removal or a touch begun, to end once its outcome is known: its ticket (`None` if the
/// tenant has no quota or the ledger could not be reached), its keys, and whether it is the
/// tenant's prefix removal.
#[must_use]
pub(crate) struct Begun {
    ticket: Option<QuotaTicket>,
    keys: Vec<String>,
    prefix: bool,
}

impl Begun {
    fn nothing() -> Self {
        Self {
            ticket: None,
            keys: Vec::new(),
            prefix: false,
        }
    }
}

/// What the ledger records for an entry that lives `ttl`: its records outlive their entries
/// by the slack (an entry's TTL starts when its write lands), within the longest TTL.
fn ledger_ttl(ttl: Duration, slack: Duration) -> Duration {
    ttl.saturating_add(slack).min(MAX_TTL)
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

/// How long an operation whose request was dropped counts as in flight, and how long the
/// ledger's records outlive their entries: twice `request_timeout`, past which the operation
/// has reached the data or never will.
pub(crate) fn in_flight_for(request_timeout: Duration) -> Duration {
    request_timeout.saturating_mul(2)
}

impl Quotas {
    /// Quotas counted on this instance; operations stay in flight, and records outlive their
    /// entries, by `slack`.
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
                ttl: ledger_ttl(room.ttl, self.slack),
            })
            .collect()
    }

    /// Begins `writes` of `tenant` if together they keep it within its quota: 507 with the
    /// reason if not (nothing recorded), 503 if the shared ledger cannot be reached (a write
    /// that cannot be counted is not made). Once their outcome is known,
    /// [`settle`](Self::settle) them.
    pub(crate) async fn reserve(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        rooms: &[Room<'_>],
    ) -> Result<Reserved, ApiError> {
        let Some(quota) = quota_limits(limits) else {
            return Ok(Reserved { ticket: None });
        };
        let writes = self.ledger_writes(rooms);
        let ticket = QuotaTicket::new();
        let decision = match &self.shared {
            Some(ledger) => ledger
                .reserve(tenant.as_str(), quota, &writes, &ticket)
                .await
                .map_err(|error| unavailable(&error))?,
            None => self
                .local
                .reserve(tenant, quota, &writes, &ticket, self.slack),
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
            _ => Ok(Reserved {
                ticket: Some(ticket),
            }),
        }
    }

    /// Ends a reservation once its writes' outcome is known: `landed` or not (a condition
    /// did not hold). A write that failed (it may have landed) is not settled: it stays in
    /// flight, and its reservation counts until its TTL. A ledger that cannot be reached
    /// leaves the same: logged.
    pub(crate) async fn settle(
        &self,
        tenant: &TenantName,
        rooms: &[Room<'_>],
        reserved: Reserved,
        landed: bool,
    ) {
        let Some(ticket) = reserved.ticket else {
            return;
        };
        let writes = self.ledger_writes(rooms);
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger
                    .settle(tenant.as_str(), &writes, &ticket, landed)
                    .await
                {
                    tracing::warn!(error = %error, "quota not settled: counted as reserved until the TTL");
                }
            }
            None => self.local.settle(tenant, &writes, &ticket, landed),
        }
    }

    /// Begins a removal of `keys` (their records keep counting until it ends). A ledger that
    /// cannot be reached begins nothing: the records stay, counted until their TTL (logged).
    pub(crate) async fn begin_removal(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        keys: &[&str],
    ) -> Begun {
        if quota_limits(limits).is_none() {
            return Begun::nothing();
        }
        let ticket = QuotaTicket::new();
        if let Some(ledger) = &self.shared {
            if let Err(error) = ledger.begin_removal(tenant.as_str(), keys, &ticket).await {
                tracing::warn!(error = %error, "quota removal not begun: counted until the TTL");
                return Begun::nothing();
            }
        } else {
            self.local.begin_removal(tenant, keys, &ticket, self.slack);
        }
        Begun {
            ticket: Some(ticket),
            keys: keys.iter().map(|key| (*key).to_owned()).collect(),
            prefix: false,
        }
    }

    /// Begins a removal of `tenant`'s keys under `prefix`, as
    /// [`begin_removal`](Self::begin_removal): 409 while another prefix removal of the tenant
    /// runs (a tenant runs one at a time, so that what it begins stays within one operation
    /// per entry).
    pub(crate) async fn begin_removal_of_prefix(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        prefix: &str,
    ) -> Result<Begun, ApiError> {
        if quota_limits(limits).is_none() {
            return Ok(Begun::nothing());
        }
        let ticket = QuotaTicket::new();
        let keys = match &self.shared {
            Some(ledger) => {
                match ledger
                    .begin_removal_of_prefix(tenant.as_str(), prefix, &ticket)
                    .await
                {
                    Ok(keys) => keys,
                    Err(error) => {
                        tracing::warn!(error = %error, "quota removal not begun: counted until the TTL");
                        return Ok(Begun::nothing());
                    }
                }
            }
            None => self
                .local
                .begin_removal_of_prefix(tenant, prefix, &ticket, self.slack),
        };
        let keys = keys.ok_or_else(|| {
            ApiError::conflict(
                "prefix_delete_running",
                "another prefix delete of this tenant is running; retry once it is done",
            )
        })?;
        Ok(Begun {
            ticket: Some(ticket),
            keys,
            prefix: true,
        })
    }

    /// Ends a removal once its outcome is known: `removed`, or not. One whose outcome is not
    /// known (it failed) is not ended: its records count until their TTL.
    pub(crate) async fn end_removal(&self, tenant: &TenantName, begun: Begun, removed: bool) {
        let Some(ticket) = begun.ticket else {
            return;
        };
        match &self.shared {
            Some(ledger) => {
                let ended = if begun.prefix {
                    ledger
                        .end_removal_of_prefix(tenant.as_str(), &begun.keys, &ticket, removed)
                        .await
                } else {
                    ledger
                        .end_removal(tenant.as_str(), &begun.keys, &ticket, removed)
                        .await
                };
                if let Err(error) = ended {
                    tracing::warn!(error = %error, "quota removal not ended: counted until the TTL");
                }
            }
            None => self
                .local
                .end_removal(tenant, &begun.keys, &ticket, removed, begun.prefix),
        }
    }

    /// Begins a touch of `key` giving it `ttl` from now: its record's expiry becomes the
    /// later of its own and the touch's until the touch ends. 503 if the shared ledger cannot
    /// be reached: a touch that cannot be counted is not made.
    pub(crate) async fn begin_touch(
        &self,
        tenant: &TenantName,
        limits: &Limits,
        key: &str,
        ttl: Duration,
    ) -> Result<Begun, ApiError> {
        if quota_limits(limits).is_none() {
            return Ok(Begun::nothing());
        }
        let ttl = ledger_ttl(ttl, self.slack);
        let ticket = QuotaTicket::new();
        match &self.shared {
            Some(ledger) => ledger
                .begin_touch(tenant.as_str(), key, ttl, &ticket)
                .await
                .map_err(|error| unavailable(&error))?,
            None => self
                .local
                .begin_touch(tenant, key, ttl, &ticket, self.slack),
        }
        Ok(Begun {
            ticket: Some(ticket),
            keys: vec![key.to_owned()],
            prefix: false,
        })
    }

    /// Ends a touch begun with [`begin_touch`](Self::begin_touch) (the same `ttl`), once its
    /// outcome is known: whether it `touched` the entry. One that failed is not ended.
    pub(crate) async fn end_touch(
        &self,
        tenant: &TenantName,
        begun: Begun,
        ttl: Duration,
        touched: bool,
    ) {
        let (Some(ticket), [key]) = (begun.ticket, begun.keys.as_slice()) else {
            return;
        };
        let ttl = ledger_ttl(ttl, self.slack);
        match &self.shared {
            Some(ledger) => {
                if let Err(error) = ledger
                    .end_touch(tenant.as_str(), key, ttl, &ticket, touched)
                    .await
                {
                    tracing::warn!(error = %error, "quota touch not ended: counted until the later expiry");
                }
            }
            None => self.local.end_touch(tenant, key, ttl, &ticket, touched),
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

/// At most this many expired records (and as many expired tickets) leave a tenant's book per
/// call: a call's work stays bounded however many expired since the last one.
const PURGE_PER_CALL: usize = 1_000;

/// The ledger of this instance, as `QuotaLedger` keeps it in Redis: a book per tenant, each
/// behind its own lock.
#[derive(Debug, Default)]
struct LocalLedger {
    tenants: Mutex<HashMap<TenantName, Arc<Mutex<Book>>>>,
}

/// The operations on one key in flight.
#[derive(Debug, Default)]
struct Marks {
    count: u32,
    /// Whether two overlapped since the count was last zero.
    overlapped: bool,
    /// The latest expiry a touch in flight gave the key: a record made meanwhile lives at
    /// least as long.
    touched_until: Option<Instant>,
}

/// A map whose entries each carry a deadline, kept in deadline order too, so that the
/// passed ones leave first.
#[derive(Debug)]
struct Expiring<K, V> {
    entries: HashMap<K, (V, Instant)>,
    by_deadline: BTreeSet<(Instant, K)>,
}

impl<K, V> Default for Expiring<K, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            by_deadline: BTreeSet::new(),
        }
    }
}

impl<K: Hash + Eq + Ord + Clone, V> Expiring<K, V> {
    fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&(V, Instant)>
    where
        K: Borrow<Q>,
    {
        self.entries.get(key)
    }

    /// Puts `value` under `key` until `deadline`, in place of what was there.
    fn insert(&mut self, key: K, value: V, deadline: Instant) {
        self.remove(&key);
        self.by_deadline.insert((deadline, key.clone()));
        self.entries.insert(key, (value, deadline));
    }

    fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<(V, Instant)>
    where
        K: Borrow<Q>,
    {
        let (key, (value, deadline)) = self.entries.remove_entry(key)?;
        self.by_deadline.remove(&(deadline, key));
        Some((value, deadline))
    }

    /// Takes out the entry whose deadline passed first, if one has by `now`.
    fn pop_passed(&mut self, now: Instant) -> Option<(K, V)> {
        let (deadline, _) = self.by_deadline.first()?;
        if *deadline > now {
            return None;
        }
        let (_, key) = self.by_deadline.pop_first()?;
        let (value, _) = self.entries.remove(&key)?;
        Some((key, value))
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.keys()
    }
}

/// One tenant's records (sizes, until their expiry) and operations in flight.
#[derive(Debug, Default)]
struct Book {
    records: Expiring<String, u64>,
    bytes: u64,
    marks: HashMap<String, Marks>,
    /// Each operation in flight, (ticket, key), until its deadline.
    tickets: Expiring<(String, String), ()>,
    /// The ticket of the tenant's one prefix removal in flight, and its deadline.
    prefix_claim: Option<(String, Instant)>,
}

impl Book {
    fn purge(&mut self, now: Instant) {
        for _ in 0..PURGE_PER_CALL {
            let Some((_, size)) = self.records.pop_passed(now) else {
                break;
            };
            self.bytes -= size;
        }
        for _ in 0..PURGE_PER_CALL {
            let Some(((_, key), ())) = self.tickets.pop_passed(now) else {
                return;
            };
            self.drop_mark(&key);
        }
    }

    fn drop_mark(&mut self, key: &str) {
        if let Some(marks) = self.marks.get_mut(key) {
            marks.count = marks.count.saturating_sub(1);
            if marks.count == 0 {
                self.marks.remove(key);
            }
        }
    }

    /// As the script's `begin_op`.
    fn begin_op(&mut self, ticket: &QuotaTicket, key: &str, deadline: Instant) {
        let id = (ticket.as_ref().to_owned(), key.to_owned());
        let marks = self.marks.entry(key.to_owned()).or_default();
        if self.tickets.get(&id).is_some() {
            marks.overlapped = true;
            return;
        }
        marks.count += 1;
        marks.overlapped |= marks.count > 1;
        self.tickets.insert(id, (), deadline);
    }

    /// As the script's `end_op`: whether the operation ran alone.
    fn end_op(&mut self, ticket: &QuotaTicket, key: &str) -> bool {
        let id = (ticket.as_ref().to_owned(), key.to_owned());
        if self.tickets.remove(&id).is_none() {
            return false;
        }
        let alone = self.marks.get(key).is_none_or(|marks| !marks.overlapped);
        self.drop_mark(key);
        alone
    }

    /// Drops `key`'s record.
    fn remove(&mut self, key: &str) {
        if let Some((size, _)) = self.records.remove(key) {
            self.bytes -= size;
        }
    }

    /// The latest expiry a touch in flight gave `key`.
    fn touched_until(&self, key: &str) -> Option<Instant> {
        self.marks.get(key).and_then(|marks| marks.touched_until)
    }

    /// Records `key` at `size` and `expires`, or at the larger of those and its record (and
    /// of the expiry a touch in flight gave it).
    fn record(&mut self, key: &str, size: u64, expires: Instant, exactly: bool) {
        let (size, expires) = match self.records.get(key) {
            Some(&(old_size, old_expires)) if !exactly => {
                (size.max(old_size), expires.max(old_expires))
            }
            _ => (size, expires),
        };
        let expires = match self.touched_until(key) {
            Some(touched) if !exactly => expires.max(touched),
            _ => expires,
        };
        self.remove(key);
        self.records.insert(key.to_owned(), size, expires);
        self.bytes += size;
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
        ticket: &QuotaTicket,
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
                    .or_else(|| book.records.get(write.member).copied());
                let expires = now + write.ttl;
                let expires = book
                    .touched_until(write.member)
                    .map_or(expires, |touched| touched.max(expires));
                let mut record = (write.size, expires);
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
                book.record(key, size, expires, true);
            }
            for write in writes {
                book.begin_op(ticket, write.member, now + in_flight);
            }
            QuotaDecision::Admitted(book.usage())
        })
    }

    /// As `QuotaLedger::settle`.
    fn settle(
        &self,
        tenant: &TenantName,
        writes: &[QuotaWrite<'_>],
        ticket: &QuotaTicket,
        landed: bool,
    ) {
        self.book(tenant, |book| {
            let now = Instant::now();
            for write in writes {
                let alone = book.end_op(ticket, write.member);
                if landed {
                    book.record(write.member, write.size, now + write.ttl, alone);
                }
            }
        });
    }

    /// As `QuotaLedger::begin_removal`.
    fn begin_removal<S: AsRef<str>>(
        &self,
        tenant: &TenantName,
        keys: &[S],
        ticket: &QuotaTicket,
        in_flight: Duration,
    ) {
        self.book(tenant, |book| {
            let deadline = Instant::now() + in_flight;
            for key in keys {
                book.begin_op(ticket, key.as_ref(), deadline);
            }
        });
    }

    /// As `QuotaLedger::begin_removal_of_prefix`.
    fn begin_removal_of_prefix(
        &self,
        tenant: &TenantName,
        prefix: &str,
        ticket: &QuotaTicket,
        in_flight: Duration,
    ) -> Option<Vec<String>> {
        self.book(tenant, |book| {
            let now = Instant::now();
            if book
                .prefix_claim
                .as_ref()
                .is_some_and(|(_, deadline)| *deadline > now)
            {
                return None;
            }
            let deadline = now + in_flight;
            book.prefix_claim = Some((ticket.as_ref().to_owned(), deadline));
            let keys: Vec<String> = book
                .records
                .keys()
                .filter(|key| key.starts_with(prefix))
                .cloned()
                .collect();
            for key in &keys {
                book.begin_op(ticket, key, deadline);
            }
            Some(keys)
        })
    }

    /// As `QuotaLedger::end_removal` (and `end_removal_of_prefix` for a `prefix` removal).
    fn end_removal(
        &self,
        tenant: &TenantName,
        keys: &[String],
        ticket: &QuotaTicket,
        removed: bool,
        prefix: bool,
    ) {
        self.book(tenant, |book| {
            for key in keys {
                if book.end_op(ticket, key) && removed {
                    book.remove(key);
                }
            }
            if prefix
                && book
                    .prefix_claim
                    .as_ref()
                    .is_some_and(|(claim, _)| claim == ticket.as_ref())
            {
                book.prefix_claim = None;
            }
        });
    }

    /// As `QuotaLedger::begin_touch`.
    fn begin_touch(
        &self,
        tenant: &TenantName,
        key: &str,
        ttl: Duration,
        ticket: &QuotaTicket,
        in_flight: Duration,
    ) {
        self.book(tenant, |book| {
            let now = Instant::now();
            book.begin_op(ticket, key, now + in_flight);
            if let Some(marks) = book.marks.get_mut(key) {
                marks.touched_until = marks.touched_until.max(Some(now + ttl));
            }
            if let Some(&(size, expires)) = book.records.get(key)
                && expires < now + ttl
            {
                book.record(key, size, now + ttl, true);
            }
        });
    }

    /// As `QuotaLedger::end_touch`.
    fn end_touch(
        &self,
        tenant: &TenantName,
        key: &str,
        ttl: Duration,
        ticket: &QuotaTicket,
        touched: bool,
    ) {
        self.book(tenant, |book| {
            let alone = book.end_op(ticket, key);
            if touched && let Some(&(size, expires)) = book.records.get(key) {
                let touched_until = Instant::now() + ttl;
                if alone || expires < touched_until {
                    book.record(key, size, touched_until, true);
                }
            }
        });
    }

    fn clear(&self, tenant: &TenantName) {
        self.book(tenant, |book| *book = Book::default());
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
    const MOMENT: Duration = Duration::from_millis(1);

    fn usage(entries: u64, bytes: u64) -> QuotaUsage {
        QuotaUsage { entries, bytes }
    }

    fn write(member: &str, size: u64, ttl: Duration) -> QuotaWrite<'_> {
        QuotaWrite { member, size, ttl }
    }

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| (*key).to_owned()).collect()
    }

    /// A tenant's book, with the protocol's operations run alone.
    struct Alone {
        ledger: LocalLedger,
        t: TenantName,
    }

    impl Alone {
        fn new() -> Self {
            Self {
                ledger: LocalLedger::default(),
                t: TenantName::new("t").unwrap(),
            }
        }

        fn reserve(&self, writes: &[QuotaWrite<'_>], ticket: &QuotaTicket) -> QuotaDecision {
            self.ledger.reserve(&self.t, QUOTA, writes, ticket, MINUTE)
        }

        fn write(&self, writes: &[QuotaWrite<'_>]) -> QuotaDecision {
            let ticket = QuotaTicket::new();
            let decision = self.reserve(writes, &ticket);
            self.ledger.settle(&self.t, writes, &ticket, true);
            decision
        }

        fn remove(&self, removed: &[&str]) {
            let ticket = QuotaTicket::new();
            self.ledger
                .begin_removal(&self.t, &keys(removed), &ticket, MINUTE);
            self.ledger
                .end_removal(&self.t, &keys(removed), &ticket, true, false);
        }

        fn touch(&self, key: &str, ttl: Duration) {
            let ticket = QuotaTicket::new();
            self.ledger.begin_touch(&self.t, key, ttl, &ticket, MINUTE);
            self.ledger.end_touch(&self.t, key, ttl, &ticket, true);
        }

        fn usage(&self) -> QuotaUsage {
            self.ledger.usage(&self.t)
        }
    }

    /// As `the_quota_ledger_counts_live_entries_and_bytes_per_subject` on Redis.
    #[tokio::test(start_paused = true)]
    async fn the_local_ledger_counts_as_the_shared_one() {
        let book = Alone::new();
        let two = [write("a", 40, MINUTE), write("b", 40, MINUTE)];
        assert_eq!(book.write(&two), QuotaDecision::Admitted(usage(2, 80)));
        let ticket = QuotaTicket::new();
        let smaller = [write("a", 20, MINUTE)];
        assert_eq!(
            book.reserve(&smaller, &ticket),
            QuotaDecision::Admitted(usage(2, 80))
        );
        book.ledger.settle(&book.t, &smaller, &ticket, true);
        assert_eq!(book.usage(), usage(2, 60));
        let (ticket, failed) = (QuotaTicket::new(), [write("b", 1, MOMENT)]);
        let _ = book.reserve(&failed, &ticket);
        book.ledger.settle(&book.t, &failed, &ticket, false);
        assert_eq!(book.usage(), usage(2, 60));
        assert_eq!(
            book.reserve(&[write("c", 41, MINUTE)], &QuotaTicket::new()),
            QuotaDecision::TooManyBytes(usage(2, 60))
        );
        assert_eq!(
            book.reserve(
                &[write("c", 0, MINUTE), write("d", 0, MINUTE)],
                &QuotaTicket::new()
            ),
            QuotaDecision::TooManyEntries(usage(2, 60))
        );
        book.remove(&["a", "zz"]);
        assert_eq!(book.usage(), usage(1, 40));
        book.write(&[write("short", 9, MOMENT)]);
        book.touch("b", MOMENT);
        tokio::time::advance(Duration::from_millis(5)).await; // both entries expire
        assert_eq!(book.usage(), usage(0, 0));
        book.write(&[write("p/1", 1, MINUTE), write("q", 1, MINUTE)]);
        let ticket = QuotaTicket::new();
        let begun = book
            .ledger
            .begin_removal_of_prefix(&book.t, "p/", &ticket, MINUTE)
            .unwrap();
        assert_eq!(begun, ["p/1"]);
        let other = QuotaTicket::new();
        assert_eq!(
            book.ledger
                .begin_removal_of_prefix(&book.t, "q", &other, MINUTE),
            None,
            "one prefix removal at a time"
        );
        book.ledger
            .end_removal(&book.t, &begun, &ticket, true, true);
        assert_eq!(book.usage(), usage(1, 1));
        let begun = book
            .ledger
            .begin_removal_of_prefix(&book.t, "q", &other, MINUTE)
            .unwrap();
        book.ledger
            .end_removal(&book.t, &begun, &other, false, true);
        assert_eq!(book.usage(), usage(1, 1));
        book.ledger.clear(&book.t);
        assert_eq!(book.usage(), usage(0, 0));
    }

    /// As `overlapping_operations_never_count_low` on Redis.
    #[tokio::test(start_paused = true)]
    async fn overlapping_operations_never_count_low() {
        let book = Alone::new();
        let (ledger, t) = (&book.ledger, &book.t);
        book.write(&[write("a", 40, MINUTE)]);
        let removal = QuotaTicket::new();
        ledger.begin_removal(t, &keys(&["a"]), &removal, MINUTE);
        assert_eq!(
            book.reserve(&[write("b", 61, MINUTE)], &QuotaTicket::new()),
            QuotaDecision::TooManyBytes(usage(1, 40)),
            "a removal in flight frees no room"
        );
        let (w, small) = (QuotaTicket::new(), [write("a", 5, MINUTE)]);
        let _ = book.reserve(&small, &w);
        ledger.end_removal(t, &keys(&["a"]), &removal, true, false);
        ledger.settle(t, &small, &w, true);
        assert_eq!(book.usage(), usage(1, 40));
        book.write(&small);
        assert_eq!(book.usage(), usage(1, 5));
        // A removal whose ticket expired before it ended keeps the record: what overlapped
        // it is not known (here, a write that began and settled meanwhile).
        let removal = QuotaTicket::new();
        ledger.begin_removal(t, &keys(&["d"]), &removal, MOMENT);
        let (w, d) = (QuotaTicket::new(), [write("d", 3, MINUTE)]);
        let _ = book.reserve(&d, &w);
        ledger.settle(t, &d, &w, true);
        tokio::time::advance(Duration::from_millis(5)).await; // past the removal's deadline
        ledger.end_removal(t, &keys(&["d"]), &removal, true, false);
        assert_eq!(book.usage(), usage(2, 8));
        book.remove(&["d"]);
        assert_eq!(book.usage(), usage(1, 5));
        let (one, two) = (QuotaTicket::new(), QuotaTicket::new());
        let (big, small) = ([write("c", 50, MINUTE)], [write("c", 1, MINUTE)]);
        let _ = book.reserve(&big, &one);
        let _ = book.reserve(&small, &two);
        ledger.settle(t, &big, &one, true);
        ledger.settle(t, &small, &two, true);
        assert_eq!(book.usage(), usage(2, 55));
        book.write(&[write("c", 1, MINUTE), write("c", 2, MINUTE)]);
        assert_eq!(book.usage(), usage(2, 55), "a batch naming a key twice");
        book.write(&small);
        assert_eq!(book.usage(), usage(2, 6));
        book.touch("c", MOMENT);
        tokio::time::advance(Duration::from_millis(5)).await; // past the touched TTL
        assert_eq!(
            book.usage(),
            usage(1, 5),
            "a touch alone sets the TTL it asked"
        );
        // A touch overlapping a brief write of a new key keeps the touch's expiry.
        let brief_ttl = Duration::from_millis(50);
        let (w, brief) = (QuotaTicket::new(), [write("e", 1, brief_ttl)]);
        let _ = book.reserve(&brief, &w);
        book.touch("e", MINUTE);
        ledger.settle(t, &brief, &w, true);
        // A touch begun before a key had any record, and never ended (dropped), keeps the
        // record a write makes meanwhile.
        ledger.begin_touch(t, "n", MINUTE, &QuotaTicket::new(), MINUTE);
        let (w, brief) = (QuotaTicket::new(), [write("n", 1, brief_ttl)]);
        let _ = book.reserve(&brief, &w);
        ledger.settle(t, &brief, &w, true);
        tokio::time::advance(Duration::from_millis(80)).await; // past the brief writes' TTL
        assert_eq!(book.usage(), usage(3, 7));
        // A touch that never ends leaves the later expiry.
        ledger.begin_touch(t, "a", MINUTE, &QuotaTicket::new(), MINUTE);
        book.touch("a", MOMENT);
        tokio::time::advance(Duration::from_millis(5)).await; // past the second touch's TTL
        assert_eq!(book.usage(), usage(3, 7));
    }
}
