//! The builder of a [`TieredCache`].

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::clock::{SharedClock, system_clock};
use tierstack_core::envelope::{Compression, Encryption, HEADER_LEN, Sealing};
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, Namespace};
use tierstack_core::store::validate_ttl;
use tierstack_core::{Backplane, BincodeCodec, CacheError, Codec, Result, Store};
use tierstack_moka::{L1Cache, L1Capacity};

use super::{Inner, Settings, TieredCache};
use crate::breaker::{Breaker, CircuitBreaker};
use crate::burst_log::BurstLog;
use crate::fill::{FillBudget, L2Fill};
use crate::flight::Flights;
use crate::freshness::Freshness;
use crate::lease::LEASE_KEY_OVERHEAD;
use crate::options::EntryOptions;
use crate::recovery::{RecoveryQueue, WriteRecovery};
use crate::stats::Recorder;

/// Builds a [`TieredCache`]; start with [`TieredCache::builder`].
///
/// Defaults: an L1 of 10,000 entries, no L2, no backplane, bincode, a TTL of 5 minutes, no
/// separate L1 TTL, no jitter, no negative caching, keys up to 4 KiB, values up to 1 MiB encoded,
/// L2 calls limited to 1 s, loaded values written to L2 in the background (8 MiB budget).
#[must_use = "a builder does nothing until built"]
pub struct TieredCacheBuilder<V, C = BincodeCodec> {
    namespace: String,
    l1: Option<L1Capacity<V>>,
    l2: Option<Arc<dyn Store>>,
    backplane: Option<Arc<dyn Backplane>>,
    codec: C,
    clock: SharedClock,
    settings: Settings,
    l2_fill: L2Fill,
    l2_circuit_breaker: Option<CircuitBreaker>,
    write_recovery: Option<WriteRecovery>,
    backplane_circuit_breaker: Option<CircuitBreaker>,
    _value: PhantomData<fn() -> V>,
}

/// The default of [`TieredCacheBuilder::tag_record_ttl`].
const DEFAULT_TAG_RECORD_TTL: Duration = Duration::from_hours(24 * 7);

impl<V> TieredCacheBuilder<V, BincodeCodec> {
    pub(super) fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            l1: Some(L1Capacity::Entries(10_000)),
            l2: None,
            backplane: None,
            codec: BincodeCodec::default(),
            clock: system_clock(),
            settings: Settings {
                defaults: EntryOptions::default(),
                max_key_len: 4096,
                max_value_len: 1024 * 1024,
                l2_timeout: Duration::from_secs(1),
                tombstone_ttl: Duration::from_mins(1),
                tag_record_ttl: DEFAULT_TAG_RECORD_TTL,
                sealing: Sealing::none(),
            },
            l2_fill: L2Fill::DEFAULT,
            l2_circuit_breaker: None,
            write_recovery: None,
            backplane_circuit_breaker: None,
            _value: PhantomData,
        }
    }
}

impl<V, C> TieredCacheBuilder<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// Bounds the L1 by entry count or by bytes.
    pub fn l1_capacity(mut self, capacity: L1Capacity<V>) -> Self {
        self.l1 = Some(capacity);
        self
    }

    /// Runs without an L1: every read goes to L2 (for values that must never be served from
    /// process memory, and for measuring L2).
    pub fn without_l1(mut self) -> Self {
        self.l1 = None;
        self
    }

    /// The shared L2 (Redis, Firestore, moka, memory).
    pub fn l2(mut self, store: Arc<dyn Store>) -> Self {
        self.l2 = Some(store);
        self
    }

    /// The backplane that carries invalidations between instances. Building then needs a Tokio
    /// runtime: the cache listens in a task.
    pub fn backplane(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// The codec of L2 values (default [`BincodeCodec`]).
    pub fn codec<C2: Codec>(self, codec: C2) -> TieredCacheBuilder<V, C2> {
        TieredCacheBuilder {
            namespace: self.namespace,
            l1: self.l1,
            l2: self.l2,
            backplane: self.backplane,
            codec,
            clock: self.clock,
            settings: self.settings,
            l2_fill: self.l2_fill,
            l2_circuit_breaker: self.l2_circuit_breaker,
            write_recovery: self.write_recovery,
            backplane_circuit_breaker: self.backplane_circuit_breaker,
            _value: PhantomData,
        }
    }

    /// The time to live of entries written without one (default 5 minutes).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.settings.defaults = self.settings.defaults.with_ttl(ttl);
        self
    }

    /// A shorter cap on how long L1 keeps an entry, so that instances re-read L2 at least this
    /// often even if an invalidation is lost.
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.settings.defaults = self.settings.defaults.with_l1_ttl(ttl);
        self
    }

    /// Adds up to `fraction` (0 to 1) of each TTL at random, so entries written together do not
    /// expire together and stampede the origin.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.settings.defaults = self.settings.defaults.with_jitter(fraction);
        self
    }

    /// Caches "the origin has no value" answers of
    /// [`get_or_load_optional`](TieredCache::get_or_load_optional) for `ttl`, so that lookups of
    /// keys that do not exist stop reaching the origin.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.settings.defaults = self.settings.defaults.with_negative_ttl(ttl);
        self
    }

    /// The options of every call that names none (default: [`EntryOptions::default`]). Sets
    /// what [`default_ttl`](Self::default_ttl), [`l1_ttl`](Self::l1_ttl),
    /// [`ttl_jitter`](Self::ttl_jitter) and [`negative_ttl`](Self::negative_ttl) set, and
    /// fail-safe and the load timeout.
    pub fn default_options(mut self, options: EntryOptions) -> Self {
        self.settings.defaults = options;
        self
    }

    /// The longest user key accepted, in bytes (default 4096). With the namespace and the
    /// 7 bytes of a load lease's `!lease:` it must fit the stores' 64 KiB key limit.
    pub fn max_key_len(mut self, len: usize) -> Self {
        self.settings.max_key_len = len;
        self
    }

    /// The largest encoded value accepted, in bytes including the envelope (default 1 MiB).
    /// Larger values are refused with [`CacheError::ValueTooLarge`] before anything is written;
    /// larger L2 entries are read as misses.
    pub fn max_value_len(mut self, len: usize) -> Self {
        self.settings.max_value_len = len;
        self
    }

    /// Compresses the L2 payloads of at least [`Compression::min_size`] bytes (default: none
    /// compressed). Any cache reads compressed entries, with or without this setting;
    /// decompressing more than [`max_value_len`](Self::max_value_len) reads as a miss.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.settings.sealing = self.settings.sealing.compression(compression);
        self
    }

    /// Encrypts every L2 entry with the key ring's current key (default: plaintext), and
    /// decrypts with any of its keys. An entry that does not authenticate (tampered, copied from
    /// another key, namespace or tenant) or names a key the ring lacks reads as a counted miss
    /// and is deleted; so does a plaintext entry unless
    /// [`Encryption::accept_plaintext`] allows it. Entries are compressed before they are
    /// encrypted. See `docs/operations.md` for key rotation.
    pub fn encryption(mut self, encryption: Encryption) -> Self {
        self.settings.sealing = self.settings.sealing.encryption(encryption);
        self
    }

    /// How long one operation may wait on L2 and the backplane before the cache gives up on it
    /// (default 1 s): every L2 call, lock and publish of the operation shares this deadline. A
    /// read then falls back to the loader; a write returns a timeout.
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.settings.l2_timeout = timeout;
        self
    }

    /// How long a delete's tombstone stays in L2 (default 1 minute).
    ///
    /// A delete leaves a tombstone instead of removing the entry, and a loaded value only
    /// replaces the very entry its load saw: so a load that was running anywhere when the key was
    /// deleted cannot bring the value back. A load that outlasts the tombstone can; make this
    /// longer than your slowest loader. Tombstones read as misses and cost L2 a few dozen bytes
    /// each.
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.settings.tombstone_ttl = ttl;
        self
    }

    /// How long a tag's record stays in L2 after the tag's last invalidation (default 7 days),
    /// and so the longest an entry that carries tags may live (its TTL, plus fail-safe's
    /// maximum): a tagged write that would live longer is refused, and a loaded value that
    /// would is served but not cached. Records are a few dozen bytes each, one per tag ever
    /// invalidated within this time. Without an L2 this instance keeps them itself.
    pub fn tag_record_ttl(mut self, ttl: Duration) -> Self {
        self.settings.tag_record_ttl = ttl;
        self
    }

    /// How `get_or_load` writes a loaded value to L2 (default: [`L2Fill::DEFAULT`], in the
    /// background with an 8 MiB budget). Choose [`L2Fill::Inline`] if another process must find
    /// the value in L2 as soon as `get_or_load` returns, or call
    /// [`wait_for_background_fills`](TieredCache::wait_for_background_fills).
    pub fn l2_fill(mut self, fill: L2Fill) -> Self {
        self.l2_fill = fill;
        self
    }

    /// A circuit breaker for the L2 (default: none). After `failures` consecutive failed L2
    /// calls (timeouts, lost connections), the cache stops calling the L2 for `open_for`: reads
    /// are served by L1, fail-safe and the loader at once instead of after a timeout each, and
    /// writes fail with [`CacheError::CircuitOpen`] without waiting for L2 (a refused write
    /// never reached L2; it evicts this instance's copy, and the other instances are told
    /// with the held invalidations, without a wait: the application's data changed). Then one
    /// call at a time probes the L2; the first that succeeds closes the breaker. Each change is a
    /// [`CacheEvent::L2Circuit`](crate::CacheEvent::L2Circuit), a count in
    /// `tierstack_l2_circuit_changes_total` and one log line.
    pub fn l2_circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.l2_circuit_breaker = Some(breaker);
        self
    }

    /// A circuit breaker for the backplane (default: none): after `failures` consecutive
    /// failed publishes, invalidations are held for `open_for` instead of each waiting for the
    /// backplane, then one publish probes it; once one goes out, the held invalidations follow
    /// (the keys, up to 10,000; past that, the whole namespace's). Each change is a
    /// [`CacheEvent::BackplaneCircuit`](crate::CacheEvent::BackplaneCircuit), a count in
    /// `tierstack_backplane_circuit_changes_total` and one log line.
    pub fn backplane_circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.backplane_circuit_breaker = Some(breaker);
        self
    }

    /// A queue for the writes that fail to reach the L2 (default: none). A write or delete
    /// whose call asks for it ([`EntryOptions::with_write_recovery`]; turn it on for every
    /// call in [`default_options`](Self::default_options)) and that the L2 fails is kept,
    /// and replayed once the L2 answers again; see [`WriteRecovery`].
    pub fn write_recovery(mut self, recovery: WriteRecovery) -> Self {
        self.write_recovery = Some(recovery);
        self
    }

    /// The clock that decides expiry (tests inject a manual clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the cache, checking the configuration.
    ///
    /// The cache registers its [`metrics`](https://docs.rs/metrics) handles here, once (never per
    /// call): install the process's metrics recorder **before** building caches, or they
    /// record into the no-op recorder for good. (`metrics` gives no way to tell which recorder
    /// a handle went to.) [`stats`](TieredCache::stats) counts either way.
    ///
    /// # Errors
    ///
    /// [`CacheError::Configuration`], naming the setting: a namespace outside
    /// `[A-Za-z0-9_.-]{1,128}`, a TTL of zero or over the maximum, a jitter outside 0..=1, a key
    /// or value limit out of range, a zero `l2_timeout`, or a backplane without a Tokio runtime
    /// to listen on.
    pub fn build(self) -> Result<TieredCache<V, C>> {
        let namespace = Namespace::new(&self.namespace)
            .map_err(|e| CacheError::Configuration(format!("namespace: {e}")))?;
        let settings = self.settings;
        settings.validate(&namespace)?;
        if let Some(breaker) = &self.l2_circuit_breaker {
            breaker.validate("l2_circuit_breaker")?;
        }
        if let Some(recovery) = &self.write_recovery {
            recovery.validate()?;
        }
        if let Some(breaker) = &self.backplane_circuit_breaker {
            breaker.validate("backplane_circuit_breaker")?;
        }
        if settings.l2_timeout.is_zero() {
            return Err(CacheError::Configuration(
                "l2_timeout must not be zero".into(),
            ));
        }
        // Without an L1 to serve from while the write is in flight, fills stay inline.
        let fill_budget = match self.l2_fill {
            L2Fill::Background {
                max_pending_bytes: 0,
            } => {
                return Err(CacheError::Configuration(
                    "a background L2 fill needs a budget above zero bytes".into(),
                ));
            }
            L2Fill::Background { max_pending_bytes } if self.l1.is_some() && self.l2.is_some() => {
                Some(FillBudget::new(max_pending_bytes))
            }
            _ => None,
        };
        let runtime = match &self.backplane {
            Some(_) => Some(tokio::runtime::Handle::try_current().map_err(|_| {
                CacheError::Configuration(
                    "a cache with a backplane must be built inside a Tokio runtime".into(),
                )
            })?),
            None => None,
        };
        // The store announces its own key writes when its backplane says so.
        let publishes_key_writes = self
            .backplane
            .as_ref()
            .is_some_and(|backplane| !backplane.publishes_store_writes());
        let settings_l2_timeout = settings.l2_timeout;
        let breaker = self
            .l2_circuit_breaker
            .map(|breaker| Breaker::new(breaker, settings.l2_timeout));
        let tags = crate::tags::TagRegistry::new(
            self.l2.is_some(),
            settings.tag_record_ttl,
            Arc::clone(&self.clock),
        );
        let inner = Arc::new(Inner {
            recorder: Recorder::new(namespace.as_str()),
            publishes_key_writes,
            namespace,
            l1: self
                .l1
                .map(|capacity| L1Cache::with_clock(capacity, Arc::clone(&self.clock))),
            l2: self.l2,
            backplane: self.backplane,
            codec: self.codec,
            clock: self.clock,
            settings,
            flights: Flights::default(),
            freshness: Freshness::new(),
            fill_budget,
            l2_failures: BurstLog::default(),
            breaker,
            listener: Mutex::new(None),
            deaf: std::sync::atomic::AtomicBool::new(false),
            detached: super::detached::Detached::default(),
            lease_waiters: crate::lease::LeaseWaiters::default(),
            recovery: self
                .write_recovery
                .map(|settings| Arc::new(RecoveryQueue::new(settings))),
            backplane_breaker: self
                .backplane_circuit_breaker
                .map(|breaker| Breaker::new(breaker, settings_l2_timeout)),
            held: Arc::default(),
            tags,
        });
        if let (Some(runtime), Some(backplane)) = (runtime, &inner.backplane) {
            Inner::listen(&inner, &runtime, backplane.subscribe());
        }
        Ok(TieredCache { inner })
    }
}

impl Settings {
    /// Checks the options and limits, naming the setting that is out of range.
    fn validate(&self, namespace: &Namespace) -> Result<()> {
        self.defaults.validate()?;
        validate_ttl(self.tombstone_ttl)
            .map_err(|e| CacheError::Configuration(format!("tombstone_ttl: {e}")))?;
        validate_ttl(self.tag_record_ttl)
            .map_err(|e| CacheError::Configuration(format!("tag_record_ttl: {e}")))?;
        // The longest store key is a load lease's, `namespace!lease:key`; checked, since
        // `max_key_len` is the user's number.
        let overhead = namespace.as_str().len() + LEASE_KEY_OVERHEAD;
        let longest_store_key = self.max_key_len.checked_add(overhead);
        if self.max_key_len == 0
            || longest_store_key.is_none_or(|len| len > DEFAULT_MAX_STORE_KEY_LEN)
        {
            return Err(CacheError::Configuration(format!(
                "max_key_len must be between 1 and {} for this namespace",
                DEFAULT_MAX_STORE_KEY_LEN - overhead
            )));
        }
        if self.max_value_len <= HEADER_LEN {
            return Err(CacheError::Configuration(format!(
                "max_value_len must exceed the {HEADER_LEN}-byte envelope header"
            )));
        }
        Ok(())
    }
}
