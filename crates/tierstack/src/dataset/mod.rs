//! A whole dataset kept fresh in a cache: loaded at start, re-read every interval, with only
//! what changed written and what disappeared removed, and the last good data served while the
//! source is down.
//!
//! ```
//! use std::collections::HashMap;
//! use std::time::Duration;
//! use tierstack::TieredCache;
//! use tierstack::dataset::Dataset;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let cache: TieredCache<String> = TieredCache::builder("flags").build()?;
//! let flags = Dataset::builder(cache, || async {
//!     // The whole table, as key -> value (a database query in production).
//!     Ok::<_, std::io::Error>(HashMap::from([("dark-mode".to_string(), "on".to_string())]))
//! })
//! .refresh_every(Duration::from_secs(60))
//! .start()
//! .await?;
//!
//! assert_eq!(flags.get("dark-mode").await?, Some("on".to_string()));
//! assert_eq!(flags.state().entries, 1);
//! flags.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! The entries live in the [`TieredCache`] the dataset is built on, one per key, so its L2 and
//! backplane work as everywhere else. Beside them the dataset stores an *index* (every key with
//! a fingerprint of its value and when it was written), which a refresh compares the new
//! `fetch_all` with: a changed or new value is written, a key that is gone is deleted, and an
//! unchanged one is left alone (rewritten only when half its TTL has passed). An L2 found
//! without its index (restarted without its data, flushed) gets every entry written again.
//!
//! With an L2, instances share the work: each interval, the one that holds the refresh lease
//! (an L2 entry living one and a half intervals, renewed by its holder at each attempt)
//! refreshes, and the others read the index it stored; their L1 copies are kept fresh by the
//! invalidations of its writes. A holder that shuts down releases it; one that dies loses it
//! within one and a half intervals. Without an L2, every instance refreshes for itself.
//!
//! A refresh that fails (the source is down, too slow, or the L2 fails) is retried with an
//! exponential backoff with jitter; meanwhile the entries stay. They live `entry_ttl` (a day by
//! default) and refreshes rewrite an unchanged one once half of that has passed, so the last
//! good data outlives an outage of at least half the TTL.

mod index;
mod refresh;
mod state;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::store::{MAX_TTL, validate_ttl};
use tierstack_core::{BincodeCodec, BoxError, CacheError, Codec};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::TieredCache;
use crate::error::LoadError;
use crate::options::{EntryOptions, FailSafe};
pub use state::{DatasetEvent, DatasetEvents, DatasetState, RefreshReport, Role};

use refresh::Shared;

/// The whole dataset, as key and value pairs.
type FetchAll<V> =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Vec<(String, V)>, BoxError>> + Send + Sync>;
/// One key's value, if the source has it.
type FetchSingle<V> =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<Option<V>, SourceError>> + Send + Sync>;
/// A value's version, as the user defines it.
type VersionOf<V> = Arc<dyn Fn(&V) -> u64 + Send + Sync>;

/// The error of `fetch_single`, as [`Dataset::get`]'s callers get it (in
/// [`LoadError::Loader`]): its source is the error `fetch_single` returned. Its own text names
/// nothing of it, so it can be logged.
#[derive(Debug, thiserror::Error)]
#[error("the dataset's source failed")]
pub struct SourceError(#[source] BoxError);

impl SourceError {
    /// The error `fetch_single` returned.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.0.as_ref()
    }
}

/// Why a dataset could not start or refresh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// `fetch_all` failed; its error is the source (never logged: it may name anything).
    #[error("fetch_all failed")]
    Fetch(#[source] BoxError),
    /// `fetch_all` ran past the fetch timeout and was cancelled.
    #[error("fetch_all took longer than {0:?}")]
    FetchTimedOut(Duration),
    /// Some entries could not be written or removed (they are retried at the next refresh).
    #[error("{failed} of the dataset's writes failed")]
    Apply {
        /// How many.
        failed: usize,
        /// The first error.
        #[source]
        first: CacheError,
    },
    /// The cache or its L2 failed (the lease, the index).
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Another instance holds the refresh lease: it refreshes (for
    /// [`refresh_now`](Dataset::refresh_now), at its next interval).
    #[error("another instance holds the dataset's refresh lease")]
    NotRefresher,
    /// Another refresh stored its index first (a refresh that outlasted the lease ran beside
    /// another): this one's writes stand, and the next refresh starts from that index.
    #[error("another refresh stored the dataset's index first")]
    Conflict,
    /// The dataset was shut down while `fetch_all` ran.
    #[error("the dataset was shut down")]
    ShutDown,
    /// At start: another instance holds the refresh lease, and its data did not appear in the
    /// L2 within the fetch timeout.
    #[error("another instance is refreshing the dataset, and its data did not appear in time")]
    NotReady,
}

/// The settings of a dataset; see [`DatasetBuilder`].
#[derive(Debug, Clone, Copy)]
struct Settings {
    interval: Duration,
    entry_ttl: Option<Duration>,
    fetch_timeout: Option<Duration>,
    initial_attempts: u32,
    backoff_from: Option<Duration>,
    backoff_to: Option<Duration>,
    write_concurrency: usize,
}

impl Settings {
    fn entry_ttl(&self) -> Duration {
        self.entry_ttl.unwrap_or_else(|| {
            self.interval
                .saturating_mul(10)
                .max(Duration::from_secs(24 * 3600))
                .min(MAX_TTL)
        })
    }

    fn fetch_timeout(&self) -> Duration {
        self.fetch_timeout.unwrap_or(self.interval / 2)
    }

    /// The options of on-demand fills, from the cache's `defaults`: they live an interval
    /// (the next refresh writes or removes them) and are served stale while the source fails.
    fn on_demand(&self, defaults: EntryOptions) -> EntryOptions {
        defaults
            .with_ttl(self.interval)
            .with_negative_ttl(self.interval)
            .with_fail_safe(FailSafe::new(self.entry_ttl()))
    }

    /// The options of the entries a refresh writes, from the cache's `defaults`. No fail-safe:
    /// the entries live long and are rewritten before they expire, and a plain entry's L1 hit
    /// reads no clock.
    fn entries(&self, defaults: EntryOptions) -> EntryOptions {
        defaults.with_ttl(self.entry_ttl()).without_fail_safe()
    }

    fn backoff_from(&self) -> Duration {
        self.backoff_from
            .unwrap_or_else(|| Duration::from_secs(1).min(self.backoff_to()))
    }

    fn backoff_to(&self) -> Duration {
        self.backoff_to.unwrap_or(self.interval)
    }

    fn validate(&self) -> Result<(), CacheError> {
        let invalid = |message: String| Err(CacheError::Configuration(message));
        if self.interval < Duration::from_millis(10) {
            return invalid(format!(
                "refresh_every must be at least 10 ms, not {:?}",
                self.interval
            ));
        }
        let ttl = self.entry_ttl();
        validate_ttl(ttl).map_err(|e| CacheError::Configuration(format!("entry_ttl: {e}")))?;
        if ttl < self.interval.saturating_mul(2) {
            return invalid(format!(
                "entry_ttl ({ttl:?}) must be at least twice refresh_every ({:?}): entries would \
                 expire between refreshes",
                self.interval
            ));
        }
        if self.fetch_timeout().is_zero() || self.fetch_timeout() > self.interval {
            return invalid(format!(
                "fetch_timeout must be above zero and at most refresh_every ({:?}), not {:?}",
                self.interval,
                self.fetch_timeout()
            ));
        }
        if self.initial_attempts == 0 {
            return invalid("initial_attempts must not be zero".into());
        }
        validate_ttl(self.backoff_to())
            .map_err(|e| CacheError::Configuration(format!("backoff: {e}")))?;
        if self.backoff_from().is_zero() || self.backoff_to() < self.backoff_from() {
            return invalid(format!(
                "backoff must start above zero and not end below its start, not {:?}..{:?}",
                self.backoff_from(),
                self.backoff_to()
            ));
        }
        if self.write_concurrency == 0 {
            return invalid("write_concurrency must not be zero".into());
        }
        Ok(())
    }
}

/// Builds a [`Dataset`]; see [`Dataset::builder`].
pub struct DatasetBuilder<V, C = BincodeCodec> {
    cache: TieredCache<V, C>,
    fetch_all: FetchAll<V>,
    fetch_single: Option<FetchSingle<V>>,
    version: Option<VersionOf<V>>,
    settings: Settings,
}

impl<V, C> fmt::Debug for DatasetBuilder<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatasetBuilder")
            .field("namespace", &self.cache.namespace())
            .field("fetch_single", &self.fetch_single.is_some())
            .field("version", &self.version.is_some())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<V, C> DatasetBuilder<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// How often the dataset is re-read (default 1 minute, at least 10 ms).
    #[must_use]
    pub fn refresh_every(mut self, interval: Duration) -> Self {
        self.settings.interval = interval;
        self
    }

    /// Fills a key that is not in the cache (`fetch_all` did not have it yet, or the L2 evicted
    /// it) from the source on demand, once per key however many callers ask at once. Such a
    /// value lives one interval (the next refresh writes or removes it); a key the source does
    /// not have is remembered as absent for as long.
    #[must_use]
    pub fn fetch_single<F, Fut, E>(mut self, fetch_single: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.fetch_single = Some(Arc::new(move |key| {
            let fetched = fetch_single(key);
            Box::pin(async move { fetched.await.map_err(|error| SourceError(error.into())) })
        }));
        self
    }

    /// Compares values by this version instead of by their encoding: a value is written when
    /// its version differs from the last one written. Give one when the encoding of equal
    /// values may differ (a `HashMap` field), or when the source keeps one (an `updated_at`).
    #[must_use]
    pub fn version(mut self, version: impl Fn(&V) -> u64 + Send + Sync + 'static) -> Self {
        self.version = Some(Arc::new(version));
        self
    }

    /// How long an entry lives unless a refresh rewrites it (default a day, or ten intervals
    /// if longer; at least two intervals). Unchanged entries are rewritten once half of it has
    /// passed, so the last good data outlives an outage of the source of at least half of it.
    #[must_use]
    pub fn entry_ttl(mut self, ttl: Duration) -> Self {
        self.settings.entry_ttl = Some(ttl);
        self
    }

    /// How long `fetch_all` may run before it is cancelled and the attempt fails (default half
    /// the interval).
    #[must_use]
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.settings.fetch_timeout = Some(timeout);
        self
    }

    /// How many attempts [`start`](Self::start) makes before it gives up (default 3).
    #[must_use]
    pub fn initial_attempts(mut self, attempts: u32) -> Self {
        self.settings.initial_attempts = attempts;
        self
    }

    /// The wait after a failed attempt: `from` after the first, doubling up to `to`, each
    /// between half and all of that at random (default 1 second, or the interval if shorter,
    /// up to the interval).
    #[must_use]
    pub fn backoff(mut self, from: Duration, to: Duration) -> Self {
        self.settings.backoff_from = Some(from);
        self.settings.backoff_to = Some(to);
        self
    }

    /// How many entries a refresh writes at once (default 16).
    #[must_use]
    pub fn write_concurrency(mut self, writes: usize) -> Self {
        self.settings.write_concurrency = writes;
        self
    }

    /// Loads the dataset (or, if another instance refreshes it, waits for its data in the L2),
    /// with up to `initial_attempts` attempts, then starts refreshing it in a task.
    ///
    /// # Errors
    ///
    /// [`DatasetError::Cache`] with [`CacheError::Configuration`] for settings out of range or
    /// outside a Tokio runtime; otherwise the last attempt's error.
    pub async fn start(self) -> Result<Dataset<V, C>, DatasetError> {
        self.settings.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            CacheError::Configuration("a dataset must be started inside a Tokio runtime".into())
        })?;
        let shared = Arc::new(Shared::new(
            self.cache,
            self.fetch_all,
            self.fetch_single,
            self.version,
            self.settings,
        ));
        shared.start().await?;
        let (stop, stopped) = watch::channel(false);
        let task = runtime.spawn(Arc::clone(&shared).run(stopped));
        Ok(Dataset {
            shared,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        })
    }
}

/// A dataset kept fresh in a cache; see the [module docs](self). Dropping it stops its
/// refreshes; [`shutdown`](Self::shutdown) also waits for the one under way and hands the
/// refresh lease to the other instances at once.
pub struct Dataset<V, C = BincodeCodec> {
    shared: Arc<Shared<V, C>>,
    stop: watch::Sender<bool>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl<V, C> fmt::Debug for Dataset<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("namespace", &self.shared.cache.namespace())
            .finish_non_exhaustive()
    }
}

impl<V, C> Dataset<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// A dataset over `cache`, read whole by `fetch_all` (any collection of key and value
    /// pairs; a key that appears twice keeps its last value). Nothing runs until
    /// [`start`](DatasetBuilder::start).
    pub fn builder<F, Fut, I, E>(cache: TieredCache<V, C>, fetch_all: F) -> DatasetBuilder<V, C>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<I, E>> + Send + 'static,
        I: IntoIterator<Item = (String, V)>,
        E: Into<BoxError>,
    {
        let fetch_all: FetchAll<V> = Arc::new(move || {
            let fetched = fetch_all();
            Box::pin(async move {
                fetched
                    .await
                    .map(|entries| entries.into_iter().collect())
                    .map_err(Into::into)
            })
        });
        DatasetBuilder {
            cache,
            fetch_all,
            fetch_single: None,
            version: None,
            settings: Settings {
                interval: Duration::from_secs(60),
                entry_ttl: None,
                fetch_timeout: None,
                initial_attempts: 3,
                backoff_from: None,
                backoff_to: None,
                write_concurrency: 16,
            },
        }
    }
}

impl<V, C> Dataset<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// The value of `key`: from L1, L2, or `fetch_single` (if set) when neither has it. A value
    /// `fetch_single` filled is served stale (for up to `entry_ttl`) while the source fails.
    ///
    /// # Errors
    ///
    /// [`LoadError::Loader`] when `fetch_single` failed (with no stale value to serve), and
    /// the cache's own errors (an invalid key).
    pub async fn get(&self, key: &str) -> Result<Option<V>, LoadError<SourceError>> {
        let shared = &self.shared;
        // A live entry answers as for any read; the rest (a miss, a stale entry past its TTL,
        // a key remembered as absent) goes the read-through way.
        if let Some(value) = shared.cache.get(key).await.map_err(LoadError::Cache)? {
            return Ok(Some(value));
        }
        // Without `fetch_single` there is nothing more to ask: the entries carry no fail-safe
        // value to fall back on.
        let Some(fetch_single) = &shared.fetch_single else {
            return Ok(None);
        };
        let (fetch_single, owned) = (Arc::clone(fetch_single), key.to_owned());
        let fetched = shared
            .cache
            .get_or_load_optional_with(key, &shared.on_demand, move || fetch_single(owned))
            .await?;
        Ok(fetched.map(|fetched| fetched.value))
    }

    /// Refreshes the dataset now (after a change the source announced, say), if this instance
    /// holds the refresh lease or can take it. The periodic refreshes go on as before.
    ///
    /// # Errors
    ///
    /// [`DatasetError::NotRefresher`] if another instance holds the lease (it refreshes at its
    /// next interval); otherwise as a refresh fails.
    pub async fn refresh_now(&self) -> Result<RefreshReport, DatasetError> {
        self.shared.refresh_and_report().await
    }

    /// The dataset's state: its last refresh (wherever it ran), its size, this instance's
    /// failures and next attempt.
    pub fn state(&self) -> DatasetState {
        self.shared.state()
    }

    /// The keys the dataset holds, as its last refresh left them.
    pub fn keys(&self) -> Vec<String> {
        self.shared.keys()
    }

    /// A subscription to the dataset's events: refreshes here and elsewhere, failures.
    pub fn events(&self) -> DatasetEvents {
        DatasetEvents(self.shared.events.subscribe())
    }

    /// Stops refreshing: waits for a refresh under way to finish its writes (a `fetch_all`
    /// still running is cancelled), then releases the refresh lease so that another instance
    /// takes over at its next attempt. The entries stay in the cache, and reads go on.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.lock().await.take() {
            // A panic of the task has been reported by the runtime already.
            let _ = task.await;
        }
        self.shared.release_lease().await;
    }
}

impl<V, C> Drop for Dataset<V, C> {
    /// Stops the refreshes as [`shutdown`](Dataset::shutdown) does, without waiting: a
    /// refresh under way finishes its writes in its task. The lease then runs out.
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
