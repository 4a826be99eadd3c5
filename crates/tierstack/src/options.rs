//! Per-call options, what a loader may say about what it loaded, and where a value came from.

use std::time::Duration;

use tierstack_core::store::{MAX_TTL, validate_ttl};
use tierstack_core::{CacheError, Result};

use crate::lease::LoadLease;

/// How a read-through call caches what it loads, and how it behaves when the origin fails.
///
/// The cache's builder holds the defaults ([`default_options`](crate::TieredCacheBuilder::default_options));
/// start a call's options from them with
/// [`TieredCache::default_options`](crate::TieredCache::default_options) and change what differs:
///
/// ```
/// # use std::time::Duration;
/// # use tierstack::{EntryOptions, FailSafe};
/// let options = EntryOptions::default()
///     .with_ttl(Duration::from_secs(30))
///     .with_fail_safe(FailSafe::new(Duration::from_secs(3600)))
///     .with_hard_timeout(Duration::from_millis(500));
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntryOptions {
    ttl: Duration,
    l1_ttl: Option<Duration>,
    jitter: f64,
    negative_ttl: Option<Duration>,
    fail_safe: Option<FailSafe>,
    soft_timeout: Option<Duration>,
    hard_timeout: Option<Duration>,
    background_completion: bool,
    eager_refresh: Option<f64>,
    load_lease: Option<LoadLease>,
    write_recovery: bool,
    l2_errors_returned: bool,
    skips: Skips,
}

/// Tiers (and the backplane) that a call leaves alone; see
/// [`EntryOptions::with_skips`]. All `false` by default.
///
/// ```
/// # use tierstack::{EntryOptions, Skips};
/// // A value that only this instance keeps (no L2 read or write, nobody told):
/// let local = EntryOptions::default().with_skips(Skips {
///     l2_read: true,
///     l2_write: true,
///     backplane: true,
///     ..Skips::default()
/// });
/// # let _ = local;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches, each named for what it leaves out"
)]
pub struct Skips {
    /// Do not answer from L1 (read L2, then the loader).
    pub l1_read: bool,
    /// Do not keep what was read, loaded or written in L1.
    pub l1_write: bool,
    /// Do not read L2. A loaded value is then written to L2 only where it holds no entry (a
    /// newer value or a delete there still wins).
    pub l2_read: bool,
    /// Do not write L2 (a loaded or written value stays in this instance's L1).
    pub l2_write: bool,
    /// Do not tell the other instances of a write: they keep their L1 copies until their TTL.
    /// A write whose outcome is unknown (an L2 failure or timeout) tells them all the same, and
    /// a store that announces its own writes (a Redis store paired with its backplane) still
    /// announces them.
    pub backplane: bool,
}

impl Default for EntryOptions {
    /// A TTL of 5 minutes; no L1 cap, jitter, negative caching, fail-safe, timeouts or eager
    /// refresh; a load that outlives its caller's timeout completes in the background.
    fn default() -> Self {
        Self {
            ttl: Duration::from_mins(5),
            l1_ttl: None,
            jitter: 0.0,
            negative_ttl: None,
            fail_safe: None,
            soft_timeout: None,
            hard_timeout: None,
            background_completion: true,
            eager_refresh: None,
            load_lease: None,
            write_recovery: false,
            l2_errors_returned: false,
            skips: Skips {
                l1_read: false,
                l1_write: false,
                l2_read: false,
                l2_write: false,
                backplane: false,
            },
        }
    }
}

impl EntryOptions {
    /// How long a loaded or written value is fresh.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// A shorter cap on how long L1 serves an entry before it reads L2 again, so that instances
    /// re-read L2 at least this often even if an invalidation is lost.
    #[must_use]
    pub fn with_l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_ttl = Some(ttl);
        self
    }

    /// Adds up to `fraction` (0 to 1) of each TTL at random, so that entries written together do
    /// not expire together.
    #[must_use]
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Caches a loader's "no value" answer for `ttl`.
    #[must_use]
    pub fn with_negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Keeps values past their TTL as a fallback for when the origin fails; see [`FailSafe`].
    #[must_use]
    pub fn with_fail_safe(mut self, fail_safe: FailSafe) -> Self {
        self.fail_safe = Some(fail_safe);
        self
    }

    /// Turns fail-safe off.
    #[must_use]
    pub fn without_fail_safe(mut self) -> Self {
        self.fail_safe = None;
        self
    }

    /// How long a call waits (L2 read and loader together) before it gives up: it answers the
    /// stale value if fail-safe holds one, else
    /// [`LoadError::TimedOut`](crate::LoadError::TimedOut).
    ///
    /// With [`get_or_load`](crate::TieredCache::get_or_load) the loader runs in the caller's
    /// task and is cancelled then. With [`get_or_load_with`](crate::TieredCache::get_or_load_with)
    /// it runs in a task of its own and, with
    /// [background completion](Self::with_background_completion) (the default), finishes and
    /// updates both tiers anyway.
    #[must_use]
    pub fn with_hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = Some(timeout);
        self
    }

    /// How long a call waits for a reload when fail-safe holds a stale value: past it, the call
    /// answers the stale value (marked stale) while the load goes on in the background and
    /// updates both tiers when it finishes. Without a stale value the call waits on, up to the
    /// hard timeout. Applies to [`get_or_load_with`](crate::TieredCache::get_or_load_with) and
    /// `get_or_load_optional_with`, whose loaders can outlive the call.
    #[must_use]
    pub fn with_soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// Whether a load that outlived its callers' hard timeout goes on in the background
    /// (default `true`) or is cancelled.
    #[must_use]
    pub fn with_background_completion(mut self, complete: bool) -> Self {
        self.background_completion = complete;
        self
    }

    /// Eager refresh: an L1 hit of [`get_or_load_with`](crate::TieredCache::get_or_load_with)
    /// after `fraction` (between 0 and 1, exclusive) of an entry's TTL starts one reload in the
    /// background, so that hot keys are reloaded before they expire
    /// and no caller waits for it. Callers keep getting the current value meanwhile.
    /// Concurrent hits and misses share that one reload. Applies to
    /// [`get_or_load_with`](crate::TieredCache::get_or_load_with).
    #[must_use]
    pub fn with_eager_refresh(mut self, fraction: f64) -> Self {
        self.eager_refresh = Some(fraction);
        self
    }

    /// Shares the call's load with the other instances: a miss takes a lease on the L2 before
    /// calling the loader, and a caller that finds another instance holding it waits for that
    /// instance's value instead (see [`LoadLease`]). Without an L2, or when the call skips
    /// reading or writing it, there is nothing to share and the lease is not taken.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tierstack::{EntryOptions, LoadLease};
    /// let shared = EntryOptions::default().with_load_lease(LoadLease::new(Duration::from_secs(5)));
    /// # let _ = shared;
    /// ```
    #[must_use]
    pub fn with_load_lease(mut self, lease: LoadLease) -> Self {
        self.load_lease = Some(lease);
        self
    }

    /// Loads on this instance without a lease (the default).
    #[must_use]
    pub fn without_load_lease(mut self) -> Self {
        self.load_lease = None;
        self
    }

    /// The load lease, if the call takes one.
    pub fn load_lease(&self) -> Option<LoadLease> {
        self.load_lease
    }

    /// What a write (`set_with`, `delete_with`) does when the L2 fails it (a timeout, a lost
    /// connection, the breaker open): with `true`, and a cache built with
    /// [`write_recovery`](crate::TieredCacheBuilder::write_recovery), the write is kept and
    /// replayed once the L2 answers again, and the call succeeds (this instance serves the
    /// written value meanwhile; the others learn of it at the replay). With `false` (the
    /// default), or when the queue is full, the call returns the error and keeps nothing.
    #[must_use]
    pub fn with_write_recovery(mut self, recover: bool) -> Self {
        self.write_recovery = recover;
        self
    }

    /// Whether a write that the L2 failed is kept for a replay.
    pub fn write_recovery(&self) -> bool {
        self.write_recovery
    }

    /// Whether a plain read ([`get_with`](crate::TieredCache::get_with)) that L1 cannot answer
    /// returns an L2 failure (an error, a timeout, the breaker open) as an error, instead of
    /// reading it as a miss (the default). For values where "not found" has a consequence that
    /// a failure must not have: a session read as missing logs its user out.
    #[must_use]
    pub fn with_l2_errors_returned(mut self, returned: bool) -> Self {
        self.l2_errors_returned = returned;
        self
    }

    /// Whether a plain read returns an L2 failure as an error.
    pub fn l2_errors_returned(&self) -> bool {
        self.l2_errors_returned
    }

    /// Leaves tiers (or the backplane) out of the call; see [`Skips`].
    #[must_use]
    pub fn with_skips(mut self, skips: Skips) -> Self {
        self.skips = skips;
        self
    }

    /// What the call leaves out.
    pub fn skips(&self) -> Skips {
        self.skips
    }

    /// The TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The L1 cap, if any.
    pub fn l1_ttl(&self) -> Option<Duration> {
        self.l1_ttl
    }

    /// The jitter fraction.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The TTL of negative entries, if they are cached.
    pub fn negative_ttl(&self) -> Option<Duration> {
        self.negative_ttl
    }

    /// The fail-safe settings, if fail-safe is on.
    pub fn fail_safe(&self) -> Option<FailSafe> {
        self.fail_safe
    }

    /// The hard timeout of loads, if any.
    pub fn hard_timeout(&self) -> Option<Duration> {
        self.hard_timeout
    }

    /// The soft timeout of loads, if any.
    pub fn soft_timeout(&self) -> Option<Duration> {
        self.soft_timeout
    }

    /// Whether a load outlives its callers' hard timeout.
    pub fn background_completion(&self) -> bool {
        self.background_completion
    }

    /// The eager refresh threshold, if any.
    pub fn eager_refresh(&self) -> Option<f64> {
        self.eager_refresh
    }

    pub(crate) fn without_hard_timeout(mut self) -> Self {
        self.hard_timeout = None;
        self
    }

    /// Checks every setting, naming the one that is out of range.
    pub(crate) fn validate(&self) -> Result<()> {
        let named = |name: &str, ttl: Duration| {
            validate_ttl(ttl).map_err(|e| CacheError::Configuration(format!("{name}: {e}")))
        };
        named("ttl", self.ttl)?;
        if let Some(ttl) = self.l1_ttl {
            named("l1_ttl", ttl)?;
        }
        if let Some(ttl) = self.negative_ttl {
            named("negative_ttl", ttl)?;
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(CacheError::Configuration(
                "ttl_jitter must be between 0 and 1".into(),
            ));
        }
        if let Some(fail_safe) = self.fail_safe {
            named("fail_safe max_stale", fail_safe.max_stale)?;
            named("fail_safe throttle", fail_safe.throttle)?;
        }
        for (name, timeout) in [
            ("hard_timeout", self.hard_timeout),
            ("soft_timeout", self.soft_timeout),
        ] {
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(CacheError::Configuration(format!(
                    "{name} must not be zero"
                )));
            }
        }
        if let Some(lease) = self.load_lease {
            lease.validate()?;
        }
        if self
            .eager_refresh
            .is_some_and(|fraction| !(fraction > 0.0 && fraction < 1.0))
        {
            return Err(CacheError::Configuration(
                "eager_refresh must be between 0 and 1 (exclusive)".into(),
            ));
        }
        Ok(())
    }

    /// How long an entry of `fresh` lives in the stores: longer by the fail-safe maximum.
    pub(crate) fn lives(&self, fresh: Duration) -> Duration {
        match self.fail_safe {
            Some(fail_safe) => fresh.saturating_add(fail_safe.max_stale).min(MAX_TTL),
            None => fresh,
        }
    }
}

/// Fail-safe: a value stays stored up to `max_stale` past its TTL, stale. A read after the TTL
/// reloads it; when the loader fails (an error, a panic, a hard timeout), the stale value is
/// served instead, marked [`Fetched::stale`], and is not retried for `throttle`, so that a
/// failing origin sees at most one call per key per throttle window from each instance. A
/// delete (on any instance) removes the stale value too. Negative entries are not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailSafe {
    max_stale: Duration,
    throttle: Duration,
}

impl FailSafe {
    /// Keeps values up to `max_stale` past their TTL; retries a failing origin every 30 seconds.
    pub fn new(max_stale: Duration) -> Self {
        Self {
            max_stale,
            throttle: Duration::from_secs(30),
        }
    }

    /// How long a stale value served after a failure is served before the origin is tried
    /// again.
    #[must_use]
    pub fn with_throttle(mut self, throttle: Duration) -> Self {
        self.throttle = throttle;
        self
    }

    /// How long past its TTL a value is kept.
    pub fn max_stale(&self) -> Duration {
        self.max_stale
    }

    /// How long a failing origin is left alone.
    pub fn throttle(&self) -> Duration {
        self.throttle
    }
}

/// What a loader answers when it decides how its value is cached (adaptive options): a plain
/// value converts into one cached with the call's options. Its `Debug` prints the value.
///
/// ```
/// # use std::time::Duration;
/// # use tierstack::Loaded;
/// // A token's own expiry as its TTL:
/// let token = Loaded::new("token").with_ttl(Duration::from_secs(90));
/// // A value for this caller only:
/// let partial = Loaded::new("partial").uncached();
/// # let _ = (token, partial);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<V> {
    pub(crate) value: V,
    pub(crate) ttl: Option<Duration>,
    pub(crate) cache: bool,
    pub(crate) tags: Vec<String>,
}

impl<V> Loaded<V> {
    /// `value`, cached with the call's options.
    pub fn new(value: V) -> Self {
        Self {
            value,
            ttl: None,
            cache: true,
            tags: Vec::new(),
        }
    }

    /// Cached for `ttl` instead of the call's TTL (fail-safe still adds its maximum).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Cached carrying `tags`, so that
    /// [`invalidate_tag`](crate::TieredCache::invalidate_tag) of any reaches it (see
    /// [`set_with_tags`](crate::TieredCache::set_with_tags) for what a tag may be). The tags'
    /// versions are taken when the loader answers: if one of them was invalidated while it
    /// ran, here or on an instance whose message arrived by then, the value answers its
    /// callers but is not cached. A tag that is not allowed leaves the value uncached too (and
    /// logs a warning).
    #[must_use]
    pub fn with_tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// The same answer, as a flight that may also answer "no value" holds it.
    pub(crate) fn into_optional(self) -> Loaded<Option<V>> {
        Loaded {
            value: Some(self.value),
            ttl: self.ttl,
            cache: self.cache,
            tags: self.tags,
        }
    }

    /// Answered to the callers of this load but cached in neither tier.
    #[must_use]
    pub fn uncached(mut self) -> Self {
        self.cache = false;
        self
    }
}

impl<V> From<V> for Loaded<V> {
    fn from(value: V) -> Self {
        Self::new(value)
    }
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// This instance's in-process tier.
    L1,
    /// The shared store.
    L2,
    /// The loader, just now.
    Loader,
}

/// A value with where it came from; see
/// [`get_or_load_with`](crate::TieredCache::get_or_load_with). Its `Debug` prints the value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fetched<V> {
    /// The value.
    pub value: V,
    /// The tier (or the loader) that answered.
    pub source: Source,
    /// Whether the value is past its TTL: fail-safe served it because the origin failed.
    pub stale: bool,
    /// How long, from when it was answered, the tier that answered serves the value as fresh:
    /// the remaining TTL of the L2 entry, the TTL a loaded value was cached with, or for an L1
    /// hit the time until L1 reads L2 again (an [L1 TTL](EntryOptions::with_l1_ttl) may end
    /// that before the entry's TTL). Never more than the remaining TTL, so it can bound an
    /// HTTP `max-age`. `None` for a stale value, and for a loaded value that was not cached:
    /// the loader said [`Loaded::uncached`], its TTL was refused, the call skipped the writes
    /// of every tier there is, or L2 already held another write of the key. (A write or
    /// invalidation of the key racing with the load may still remove a value reported as
    /// cached.)
    pub ttl: Option<Duration>,
}

impl<V> Fetched<V> {
    /// A fresh value, cached for `ttl` from now (`None`: not cached).
    pub(crate) fn new_fresh(value: V, source: Source, ttl: Option<Duration>) -> Self {
        Self {
            value,
            source,
            stale: false,
            ttl,
        }
    }

    /// A value past its TTL that fail-safe answers.
    pub(crate) fn new_stale(value: V, source: Source) -> Self {
        Self {
            value,
            source,
            stale: true,
            ttl: None,
        }
    }
}
