use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::backplane_conformance::SubscriptionOutage;
use crate::backplane::{Backplane, BackplaneHub, Invalidation, Subscription};
use crate::clock::{SharedClock, Timestamp, system_clock};
use crate::error::Result;
use crate::key::{DEFAULT_MAX_STORE_KEY_LEN, validate_key};
use crate::store::{Store, StoredEntry, validate_prefix, validate_ttl};

/// An in-memory [`Store`] for tests and examples: a mutex-guarded map whose entries expire by the
/// injected clock.
#[derive(Clone)]
pub struct MemoryStore {
    entries: Arc<Mutex<HashMap<String, (Bytes, Timestamp)>>>,
    clock: SharedClock,
}

// Hand-written: values must never reach logs through `Debug`.
impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(system_clock())
    }

    /// An empty store on `clock`.
    pub fn with_clock(clock: SharedClock) -> Self {
        Self {
            entries: Arc::default(),
            clock,
        }
    }

    /// Writes raw bytes under `key`, as another client (or an attacker) with access to the
    /// backend could. Tests use it to plant corrupt entries.
    pub fn put_raw(&self, key: &str, value: impl Into<Bytes>, ttl: Duration) {
        let expires = self.clock.now().saturating_add(ttl);
        self.lock().insert(key.to_owned(), (value.into(), expires));
    }

    /// The number of live entries.
    pub fn len(&self) -> usize {
        let now = self.clock.now();
        self.lock().values().filter(|(_, exp)| *exp > now).count()
    }

    /// Whether no live entry exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (Bytes, Timestamp)>> {
        // A panic while holding the lock cannot leave the map half-updated: every operation
        // is a single map call.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live<'a>(
        map: &'a mut HashMap<String, (Bytes, Timestamp)>,
        key: &str,
        now: Timestamp,
    ) -> Option<&'a mut (Bytes, Timestamp)> {
        if map.get(key).is_some_and(|(_, exp)| *exp <= now) {
            map.remove(key);
        }
        map.get_mut(key)
    }

    fn read(&self, key: &str) -> Result<Option<Bytes>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(Self::live(&mut self.lock(), key, now).map(|(v, _)| v.clone()))
    }

    fn read_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(
            Self::live(&mut self.lock(), key, now).map(|(value, exp)| StoredEntry {
                value: value.clone(),
                ttl: now.until(*exp),
            }),
        )
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.read(key)
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        self.read_with_ttl(key)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let expires = self.clock.now().saturating_add(ttl);
        self.lock().insert(key.to_owned(), (value, expires));
        Ok(())
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let mut map = self.lock();
        if Self::live(&mut map, key, now).is_some() {
            return Ok(false);
        }
        map.insert(key.to_owned(), (value, now.saturating_add(ttl)));
        Ok(true)
    }

    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let now = self.clock.now();
        let old = self
            .lock()
            .insert(key.to_owned(), (value, now.saturating_add(ttl)));
        Ok(old.filter(|(_, exp)| *exp > now).map(|(value, _)| value))
    }

    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        if let Some((_, ttl)) = &new {
            validate_ttl(*ttl)?;
        }
        let now = self.clock.now();
        let mut map = self.lock();
        if Self::live(&mut map, key, now).is_none_or(|(value, _)| value.as_ref() != current) {
            return Ok(false);
        }
        match new {
            Some((value, ttl)) => map.insert(key.to_owned(), (value, now.saturating_add(ttl))),
            None => map.remove(key),
        };
        Ok(true)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(self.lock().remove(key).is_some_and(|(_, exp)| exp > now))
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let now = self.clock.now();
        Ok(Self::live(&mut self.lock(), key, now)
            .filter(|(value, _)| !crate::envelope::is_tombstone(value))
            .map(|(_, exp)| *exp = now.saturating_add(ttl))
            .is_some())
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let now = self.clock.now();
        Ok(Self::live(&mut self.lock(), key, now).map(|(_, exp)| now.until(*exp)))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        validate_prefix(prefix)?;
        let now = self.clock.now();
        let mut removed = 0;
        self.lock().retain(|key, (_, exp)| {
            let hit = key.starts_with(prefix);
            removed += u64::from(hit && *exp > now);
            !hit
        });
        Ok(removed)
    }

    async fn sweep_expired(&self) -> Result<u64> {
        let now = self.clock.now();
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, (_, exp)| *exp > now);
        Ok((before - map.len()) as u64)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

/// An in-process message bus; every [`MemoryBackplane`] made from it receives the others'
/// invalidations, through the same wire encoding as a networked backplane.
#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    members: Arc<Mutex<Vec<BusMember>>>,
    deaf: Arc<std::sync::atomic::AtomicBool>,
}

/// A member's hub, and whether its subscription is lost.
#[derive(Debug)]
struct BusMember {
    hub: BackplaneHub,
    deaf: bool,
}

impl MemoryBus {
    /// A bus with no members.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new member of the bus, as one instance of a service would hold it.
    pub fn backplane(&self) -> MemoryBackplane {
        let hub = BackplaneHub::new();
        self.lock().push(BusMember {
            hub: hub.clone(),
            deaf: false,
        });
        MemoryBackplane {
            bus: self.clone(),
            hub,
        }
    }

    /// Sends a resync to every member, as a regained subscription would; a bus that
    /// [`lose_all`](Self::lose_all) made deaf, and every member that [`lose`](Self::lose) made
    /// deaf, hear again.
    pub fn resync_all(&self) {
        self.deaf.store(false, std::sync::atomic::Ordering::SeqCst);
        for member in self.lock().iter_mut() {
            member.deaf = false;
            member.hub.resync();
        }
    }

    /// Tells every member that its subscription is lost, and drops every message published
    /// until [`resync_all`](Self::resync_all), as a lost subscription would.
    pub fn lose_all(&self) {
        self.deaf.store(true, std::sync::atomic::Ordering::SeqCst);
        for member in self.lock().iter() {
            member.hub.lost();
        }
    }

    /// Tells member `index` (numbered from 0 in the order [`backplane`](Self::backplane) made
    /// them) that its subscription is lost: it hears nothing until [`resync`](Self::resync),
    /// while what it publishes still reaches the others, as one instance whose subscription
    /// alone is lost.
    ///
    /// # Panics
    ///
    /// If the bus has no member `index`.
    pub fn lose(&self, index: usize) {
        let mut members = self.lock();
        let member = &mut members[index];
        member.deaf = true;
        member.hub.lost();
    }

    /// Sends a resync to member `index`, as its regained subscription would; if
    /// [`lose`](Self::lose) made it deaf, it hears again.
    ///
    /// # Panics
    ///
    /// If the bus has no member `index`.
    pub fn resync(&self, index: usize) {
        let mut members = self.lock();
        let member = &mut members[index];
        member.deaf = false;
        member.hub.resync();
    }

    fn lock(&self) -> MutexGuard<'_, Vec<BusMember>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A member's subscription is lost with [`lose`](MemoryBus::lose) and restored with
/// [`resync`](MemoryBus::resync); members are numbered in the order they were made.
#[async_trait]
impl SubscriptionOutage for MemoryBus {
    async fn lose(&self, member: usize) {
        MemoryBus::lose(self, member);
    }

    async fn restore(&self, member: usize) {
        self.resync(member);
    }
}

/// One member of a [`MemoryBus`].
#[derive(Debug, Clone)]
pub struct MemoryBackplane {
    bus: MemoryBus,
    hub: BackplaneHub,
}

#[async_trait]
impl Backplane for MemoryBackplane {
    async fn publish(&self, namespace: &str, invalidation: &Invalidation) -> Result<()> {
        let wire = self.hub.encode(namespace, invalidation)?;
        if self.bus.deaf.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        for member in self.bus.lock().iter().filter(|member| !member.deaf) {
            member.hub.deliver_wire(&wire)?;
        }
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        self.hub.subscribe()
    }
}
