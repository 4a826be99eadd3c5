//! Counters of a cache: plain atomics for [`CacheStats`] snapshots, and `metrics` handles
//! registered once per cache (never per call).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tierstack_core::key::fingerprint;

use crate::breaker::CircuitState;
use crate::events::{CacheEvent, CacheEvents, EventHub, StaleReason};
use crate::options::Source;

/// A snapshot of a cache's counters since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads served by L1.
    pub l1_hits: u64,
    /// Reads served by L2 (after an L1 miss).
    pub l2_hits: u64,
    /// Reads that missed every tier (whether or not a loader then ran).
    pub misses: u64,
    /// Loader calls (single-flight: concurrent misses of one key count once). A batched loader
    /// call counts once.
    pub loads: u64,
    /// Loader calls that failed or panicked.
    pub load_errors: u64,
    /// L2 operations that failed or timed out.
    pub l2_errors: u64,
    /// L2 entries that could not be decoded (garbage, truncated, other version or codec); each
    /// was read as a miss and deleted.
    pub corrupt_entries: u64,
    /// Invalidations received from other instances.
    pub invalidations_received: u64,
    /// Tags this instance invalidated (`invalidate_tag` and `expire_tag`).
    pub tag_invalidations: u64,
    /// Resyncs: the subscription was lost (L1 no longer trusted) or came back (L1 cleared).
    pub resyncs: u64,
    /// Publishes that failed: each attempt counts, the rounds that send held invalidations
    /// again included.
    pub publish_errors: u64,
    /// Whole-namespace invalidations made because too many single-key ones were waiting (L2
    /// failing the writes of a busy service): each cleared this L1 and the other instances'.
    pub invalidation_sweeps: u64,
    /// Stale values served by fail-safe because the loader failed or timed out.
    pub stale_served: u64,
    /// Calls that answered a stale value at their soft timeout while the load went on.
    pub soft_timeouts: u64,
    /// Background reloads started by eager refresh.
    pub eager_refreshes: u64,
    /// Times the L2's circuit breaker opened.
    pub l2_circuit_opens: u64,
    /// Times the backplane's circuit breaker opened.
    pub backplane_circuit_opens: u64,
    /// Loads run under a load lease this instance took ([`LoadLease`](crate::LoadLease)).
    pub leased_loads: u64,
    /// Flights answered by another instance's leased load, which they waited for.
    pub lease_waits: u64,
    /// Flights that loaded without a lease: the L2 could not be asked for one, or the flight
    /// had waited twice the lease's TTL while others kept taking it.
    pub leases_unavailable: u64,
    /// Writes and deletes that failed to reach the L2 and were kept for a replay
    /// ([`WriteRecovery`](crate::WriteRecovery)).
    pub writes_kept: u64,
    /// Kept writes replayed to the L2 once it answered again.
    pub writes_replayed: u64,
    /// Kept writes not replayed because a later write of the key was in the L2.
    pub writes_superseded: u64,
    /// Writes not kept (the queue was full) or kept but not replayed (expired first).
    pub writes_dropped: u64,
    /// The entries L1 holds (0 without L1), as moka last counted them: its housekeeping runs
    /// as the cache is used.
    pub l1_entries: u64,
    /// What L1 holds by its bound's measure, as moka last counted it: bytes as the weigher
    /// counts them for an L1 bounded by bytes
    /// ([`L1Capacity::Bytes`](crate::moka::L1Capacity::Bytes)), else entries.
    pub l1_weighted_size: u64,
}

impl CacheStats {
    /// L1 hits over all reads, from 0 to 1.
    pub fn l1_hit_ratio(&self) -> f64 {
        ratio(self.l1_hits, self.reads())
    }

    /// L2 hits over all reads, from 0 to 1.
    pub fn l2_hit_ratio(&self) -> f64 {
        ratio(self.l2_hits, self.reads())
    }

    /// All reads counted.
    pub fn reads(&self) -> u64 {
        self.l1_hits + self.l2_hits + self.misses
    }
}

#[expect(clippy::cast_precision_loss, reason = "a ratio for reports")]
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The L2 operations that are timed and counted, as metric labels.
#[derive(Debug, Clone, Copy)]
pub(crate) enum L2Op {
    Get,
    Set,
    Delete,
    Other,
}

impl L2Op {
    const ALL: [Self; 4] = [Self::Get, Self::Set, Self::Delete, Self::Other];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Set => "set",
            Self::Delete => "delete",
            Self::Other => "other",
        }
    }
}

/// What a circuit breaker guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guarded {
    L2,
    Backplane,
}

/// What became of a flight's load lease, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseOutcome {
    /// This instance took it and loaded.
    Taken,
    /// Another instance held it; its value answered.
    Waited,
    /// The L2 could not be asked: loaded without one.
    Unavailable,
}

impl LeaseOutcome {
    const ALL: [Self; 3] = [Self::Taken, Self::Waited, Self::Unavailable];

    fn label(self) -> &'static str {
        match self {
            Self::Taken => "taken",
            Self::Waited => "waited",
            Self::Unavailable => "unavailable",
        }
    }
}

/// What became of writes handed to the recovery queue, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecoveryOutcome {
    Kept,
    Replayed,
    Superseded,
    Dropped,
}

impl RecoveryOutcome {
    const ALL: [Self; 4] = [Self::Kept, Self::Replayed, Self::Superseded, Self::Dropped];

    fn label(self) -> &'static str {
        match self {
            Self::Kept => "kept",
            Self::Replayed => "replayed",
            Self::Superseded => "superseded",
            Self::Dropped => "dropped",
        }
    }
}

const STRIPES: usize = 16;

/// A counter striped over cache lines, so that threads counting hits at once do not bounce one
/// line between their cores (that alone costs more than an L1 hit's bookkeeping).
#[derive(Debug, Default)]
struct StripedCounter {
    stripes: [Padded; STRIPES],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn this_threads_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STRIPE.with(|stripe| {
        if stripe.get() == usize::MAX {
            stripe.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
        }
        stripe.get()
    })
}

impl StripedCounter {
    fn add(&self, n: u64) {
        self.stripes[this_threads_stripe()]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[derive(Debug)]
pub(crate) struct Recorder {
    l1_hits: StripedCounter,
    l2_hits: StripedCounter,
    misses: StripedCounter,
    loads: AtomicU64,
    load_errors: AtomicU64,
    l2_errors: AtomicU64,
    corrupt_entries: AtomicU64,
    invalidations_received: AtomicU64,
    tag_invalidations: AtomicU64,
    resyncs: AtomicU64,
    publish_errors: AtomicU64,
    invalidation_sweeps: AtomicU64,
    stale_served: AtomicU64,
    soft_timeouts: AtomicU64,
    eager_refreshes: AtomicU64,
    /// Per [`Guarded`]: times its breaker opened.
    circuit_opens: [AtomicU64; 2],
    /// Taken, waited for, unavailable.
    leases: [AtomicU64; 3],
    /// Kept, replayed, superseded, dropped.
    recovery: [AtomicU64; 4],
    events: EventHub,
    /// The namespace, for logs.
    cache: Box<str>,
    metrics: Handles,
}

#[derive(Debug)]
struct Handles {
    l1_hits: Counter,
    l2_hits: Counter,
    misses: Counter,
    loads_ok: Counter,
    loads_failed: Counter,
    load_duration: Histogram,
    l2_errors: [Counter; 4],
    l2_duration: [Histogram; 4],
    corrupt_entries: Counter,
    invalidations_received: Counter,
    /// By mode: `remove`, `expire`.
    tag_invalidations: [Counter; 2],
    resyncs: Counter,
    publish_errors: Counter,
    invalidation_sweeps: Counter,
    stale_served: Counter,
    soft_timeouts: Counter,
    eager_refreshes: Counter,
    /// Per [`Guarded`], per state its breaker moved to: closed, open, half-open.
    circuit_changes: [[Counter; 3]; 2],
    /// Per lease outcome: taken, waited, unavailable.
    leases: [Counter; 3],
    /// Per recovery outcome: kept, replayed, superseded, dropped.
    recovery: [Counter; 4],
    l1_entries: Gauge,
    l1_weighted_size: Gauge,
}

impl Recorder {
    pub(crate) fn new(cache: &str) -> Self {
        let cache_name: Box<str> = cache.into();
        let cache = cache.to_owned();
        let hits = |tier: &'static str| metrics::counter!("tierstack_hits_total", "cache" => cache.clone(), "tier" => tier);
        let loads = |result: &'static str| metrics::counter!("tierstack_loads_total", "cache" => cache.clone(), "result" => result);
        let metrics = Handles {
            l1_hits: hits("l1"),
            l2_hits: hits("l2"),
            misses: metrics::counter!("tierstack_misses_total", "cache" => cache.clone()),
            loads_ok: loads("ok"),
            loads_failed: loads("error"),
            load_duration: metrics::histogram!("tierstack_load_duration_seconds", "cache" => cache.clone()),
            l2_errors: L2Op::ALL.map(|op| {
                metrics::counter!("tierstack_l2_errors_total", "cache" => cache.clone(), "op" => op.label())
            }),
            l2_duration: L2Op::ALL.map(|op| {
                metrics::histogram!("tierstack_l2_duration_seconds", "cache" => cache.clone(), "op" => op.label())
            }),
            corrupt_entries: metrics::counter!("tierstack_corrupt_entries_total", "cache" => cache.clone()),
            invalidations_received: metrics::counter!("tierstack_invalidations_received_total", "cache" => cache.clone()),
            tag_invalidations: ["remove", "expire"].map(|mode| {
                metrics::counter!("tierstack_tag_invalidations_total", "cache" => cache.clone(), "mode" => mode)
            }),
            resyncs: metrics::counter!("tierstack_resyncs_total", "cache" => cache.clone()),
            publish_errors: metrics::counter!("tierstack_publish_errors_total", "cache" => cache.clone()),
            invalidation_sweeps: metrics::counter!("tierstack_invalidation_sweeps_total", "cache" => cache.clone()),
            stale_served: metrics::counter!("tierstack_stale_served_total", "cache" => cache.clone()),
            soft_timeouts: metrics::counter!("tierstack_soft_timeouts_total", "cache" => cache.clone()),
            eager_refreshes: metrics::counter!("tierstack_eager_refreshes_total", "cache" => cache.clone()),
            circuit_changes: [
                "tierstack_l2_circuit_changes_total",
                "tierstack_backplane_circuit_changes_total",
            ]
            .map(|name| {
                ["closed", "open", "half_open"].map(|state| {
                    metrics::counter!(name, "cache" => cache.clone(), "state" => state)
                })
            }),
            leases: LeaseOutcome::ALL.map(|outcome| {
                metrics::counter!("tierstack_load_leases_total", "cache" => cache.clone(), "outcome" => outcome.label())
            }),
            recovery: RecoveryOutcome::ALL.map(|outcome| {
                metrics::counter!("tierstack_write_recovery_total", "cache" => cache.clone(), "outcome" => outcome.label())
            }),
            l1_entries: metrics::gauge!("tierstack_l1_entries", "cache" => cache.clone()),
            l1_weighted_size: metrics::gauge!("tierstack_l1_weighted_size", "cache" => cache.clone()),
        };
        Self {
            l1_hits: StripedCounter::default(),
            l2_hits: StripedCounter::default(),
            misses: StripedCounter::default(),
            loads: AtomicU64::new(0),
            load_errors: AtomicU64::new(0),
            l2_errors: AtomicU64::new(0),
            corrupt_entries: AtomicU64::new(0),
            invalidations_received: AtomicU64::new(0),
            tag_invalidations: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            invalidation_sweeps: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            soft_timeouts: AtomicU64::new(0),
            eager_refreshes: AtomicU64::new(0),
            circuit_opens: Default::default(),
            leases: Default::default(),
            recovery: Default::default(),
            events: EventHub::default(),
            cache: cache_name,
            metrics,
        }
    }

    /// L1's size as moka last counted it: entries, and their weight.
    #[expect(clippy::cast_precision_loss, reason = "a gauge, exact up to 2^53")]
    pub(crate) fn l1_size(&self, entries: u64, weighted: u64) {
        self.metrics.l1_entries.set(entries as f64);
        self.metrics.l1_weighted_size.set(weighted as f64);
    }

    pub(crate) fn l1_hit(&self, key: &str) {
        self.l1_hits.add(1);
        self.metrics.l1_hits.increment(1);
        self.events.emit(|| CacheEvent::Hit {
            key: key.into(),
            tier: Source::L1,
        });
    }

    pub(crate) fn l2_hit(&self, key: &str) {
        self.l2_hits.add(1);
        self.metrics.l2_hits.increment(1);
        self.events.emit(|| CacheEvent::Hit {
            key: key.into(),
            tier: Source::L2,
        });
    }

    pub(crate) fn miss(&self, key: &str) {
        self.misses.add(1);
        self.metrics.misses.increment(1);
        self.events.emit(|| CacheEvent::Miss { key: key.into() });
    }

    /// A load that ran in a task of its own finished (its duration is counted by `load`).
    pub(crate) fn background_load(&self, key: &str, ok: bool) {
        tracing::debug!(cache = %self.cache, key = %fingerprint(key), ok, "background load finished");
        self.events.emit(|| CacheEvent::BackgroundLoad {
            key: key.into(),
            ok,
        });
    }

    pub(crate) fn subscribe(&self) -> CacheEvents {
        self.events.subscribe()
    }

    pub(crate) fn load(&self, ok: bool, took: Duration) {
        self.loads.fetch_add(1, Ordering::Relaxed);
        self.metrics.load_duration.record(took.as_secs_f64());
        if ok {
            self.metrics.loads_ok.increment(1);
        } else {
            self.load_errors.fetch_add(1, Ordering::Relaxed);
            self.metrics.loads_failed.increment(1);
        }
    }

    /// Counts an L2 call; `took` is `None` for calls answered without waiting (not timed).
    pub(crate) fn l2_call(&self, op: L2Op, ok: bool, took: Option<Duration>) {
        if let Some(took) = took {
            self.metrics.l2_duration[op as usize].record(took.as_secs_f64());
        }
        if !ok {
            self.l2_errors.fetch_add(1, Ordering::Relaxed);
            self.metrics.l2_errors[op as usize].increment(1);
        }
    }

    pub(crate) fn stale_served(&self, key: &str, reason: StaleReason) {
        self.stale_served.fetch_add(1, Ordering::Relaxed);
        self.metrics.stale_served.increment(1);
        if reason == StaleReason::SoftTimeout {
            self.soft_timeouts.fetch_add(1, Ordering::Relaxed);
            self.metrics.soft_timeouts.increment(1);
        }
        tracing::debug!(cache = %self.cache, key = %fingerprint(key), ?reason, "fail-safe: stale value served");
        self.events.emit(|| CacheEvent::StaleServed {
            key: key.into(),
            reason,
        });
    }

    /// The circuit breaker of the L2 or of the backplane moved to `state`: one log line, a
    /// count, an event.
    pub(crate) fn circuit(&self, of: Guarded, state: CircuitState) {
        let index = match state {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        };
        self.metrics.circuit_changes[of as usize][index].increment(1);
        let cache = &self.cache;
        match (of, state) {
            (_, CircuitState::Open) => {
                self.circuit_opens[of as usize].fetch_add(1, Ordering::Relaxed);
                let message = match of {
                    Guarded::L2 => {
                        "L2 circuit breaker opened: L2 is skipped, reads are served by L1, fail-safe and the loader"
                    }
                    Guarded::Backplane => {
                        "backplane circuit breaker opened: invalidations are held until it closes"
                    }
                };
                tracing::warn!(cache = %cache, "{message}");
            }
            (Guarded::L2, CircuitState::HalfOpen) => {
                tracing::info!(cache = %cache, "L2 circuit breaker half-open: one call probes L2");
            }
            (Guarded::L2, CircuitState::Closed) => {
                tracing::info!(cache = %cache, "L2 circuit breaker closed: L2 answers again");
            }
            (Guarded::Backplane, CircuitState::HalfOpen) => {
                tracing::info!(cache = %cache, "backplane circuit breaker half-open: one publish probes the backplane");
            }
            (Guarded::Backplane, CircuitState::Closed) => {
                tracing::info!(cache = %cache, "backplane circuit breaker closed: held invalidations are sent");
            }
        }
        self.events.emit(|| match of {
            Guarded::L2 => CacheEvent::L2Circuit { state },
            Guarded::Backplane => CacheEvent::BackplaneCircuit { state },
        });
    }

    /// What became of a flight's load lease.
    pub(crate) fn lease(&self, outcome: LeaseOutcome) {
        self.leases[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.metrics.leases[outcome as usize].increment(1);
    }

    /// `count` writes of the recovery queue had `outcome`.
    pub(crate) fn recovery(&self, outcome: RecoveryOutcome, count: u64) {
        if count > 0 {
            self.recovery[outcome as usize].fetch_add(count, Ordering::Relaxed);
            self.metrics.recovery[outcome as usize].increment(count);
        }
    }

    pub(crate) fn eager_refresh(&self, key: &str) {
        self.eager_refreshes.fetch_add(1, Ordering::Relaxed);
        self.metrics.eager_refreshes.increment(1);
        tracing::debug!(cache = %self.cache, key = %fingerprint(key), "eager refresh started");
        self.events
            .emit(|| CacheEvent::EagerRefresh { key: key.into() });
    }

    pub(crate) fn corrupt_entry(&self) {
        self.corrupt_entries.fetch_add(1, Ordering::Relaxed);
        self.metrics.corrupt_entries.increment(1);
    }

    pub(crate) fn invalidation_received(&self) {
        self.invalidations_received.fetch_add(1, Ordering::Relaxed);
        self.metrics.invalidations_received.increment(1);
        self.events.emit(|| CacheEvent::InvalidationReceived);
    }

    pub(crate) fn tag_invalidated(&self, remove: bool) {
        self.tag_invalidations.fetch_add(1, Ordering::Relaxed);
        self.metrics.tag_invalidations[usize::from(!remove)].increment(1);
    }

    pub(crate) fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        self.metrics.resyncs.increment(1);
        self.events.emit(|| CacheEvent::Resync);
    }

    pub(crate) fn publish_error(&self) {
        self.publish_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.publish_errors.increment(1);
    }

    pub(crate) fn detached_sweep(&self) {
        self.invalidation_sweeps.fetch_add(1, Ordering::Relaxed);
        self.metrics.invalidation_sweeps.increment(1);
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            l1_hits: self.l1_hits.get(),
            l2_hits: self.l2_hits.get(),
            misses: self.misses.get(),
            loads: get(&self.loads),
            load_errors: get(&self.load_errors),
            l2_errors: get(&self.l2_errors),
            corrupt_entries: get(&self.corrupt_entries),
            invalidations_received: get(&self.invalidations_received),
            tag_invalidations: get(&self.tag_invalidations),
            resyncs: get(&self.resyncs),
            publish_errors: get(&self.publish_errors),
            invalidation_sweeps: get(&self.invalidation_sweeps),
            stale_served: get(&self.stale_served),
            soft_timeouts: get(&self.soft_timeouts),
            eager_refreshes: get(&self.eager_refreshes),
            l2_circuit_opens: get(&self.circuit_opens[Guarded::L2 as usize]),
            backplane_circuit_opens: get(&self.circuit_opens[Guarded::Backplane as usize]),
            leased_loads: get(&self.leases[LeaseOutcome::Taken as usize]),
            lease_waits: get(&self.leases[LeaseOutcome::Waited as usize]),
            leases_unavailable: get(&self.leases[LeaseOutcome::Unavailable as usize]),
            writes_kept: get(&self.recovery[RecoveryOutcome::Kept as usize]),
            writes_replayed: get(&self.recovery[RecoveryOutcome::Replayed as usize]),
            writes_superseded: get(&self.recovery[RecoveryOutcome::Superseded as usize]),
            writes_dropped: get(&self.recovery[RecoveryOutcome::Dropped as usize]),
            l1_entries: 0,
            l1_weighted_size: 0,
        }
    }
}
