//! Warming a cache before it takes traffic: every key of a list or stream, loaded in batches
//! through [`TieredCache::get_or_load_many_with`] (so keys already cached cost the origin
//! nothing), a few batches at a time, with progress reported as it goes.
//!
//! ```
//! use std::collections::HashMap;
//! use tierstack::TieredCache;
//! use tierstack::warm::Warmer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tierstack::CacheError> {
//! let cache: TieredCache<String> = TieredCache::builder("profiles").build()?;
//! let keys = (0..1_000).map(|i| format!("user:{i}"));
//! let report = Warmer::new(&cache)
//!     .batch_size(100)
//!     .concurrency(4)
//!     .on_progress(|progress| eprintln!("{} of 1000 keys", progress.done))
//!     .run(keys, |missing: Vec<String>| async move {
//!         // One query for the whole batch (`WHERE id = ANY($1)` in production).
//!         let rows: HashMap<String, String> =
//!             missing.into_iter().map(|key| (key.clone(), format!("profile of {key}"))).collect();
//!         Ok::<_, std::io::Error>(rows)
//!     })
//!     .await;
//! assert_eq!((report.progress.loaded, report.progress.failed), (1_000, 0));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::{BincodeCodec, Codec};

use crate::TieredCache;
use crate::error::LoadError;
use crate::options::EntryOptions;

/// The most failed keys a report names (it counts them all).
const MAX_FAILED_KEYS: usize = 1_000;

/// Warms a cache; see the [module docs](self).
pub struct Warmer<'c, V, C = BincodeCodec> {
    cache: &'c TieredCache<V, C>,
    batch_size: usize,
    concurrency: usize,
    options: Option<EntryOptions>,
    progress: Option<OnProgress<'c>>,
}

/// The progress callback.
type OnProgress<'c> = Box<dyn Fn(&WarmProgress) + Send + Sync + 'c>;

impl<V, C> fmt::Debug for Warmer<'_, V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Warmer")
            .field("namespace", &self.cache.namespace())
            .field("batch_size", &self.batch_size)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// How far a warm-up has got, after each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmProgress {
    /// Keys done (in batches that finished, whatever their outcome).
    pub done: u64,
    /// Keys the loader answered.
    pub loaded: u64,
    /// Keys that were cached already.
    pub cached: u64,
    /// Keys the loader had no value for.
    pub absent: u64,
    /// Keys in batches that failed.
    pub failed: u64,
}

/// What a warm-up did.
#[derive(Debug)]
#[non_exhaustive]
pub struct WarmReport<E> {
    /// Keys warmed, by outcome; `done` is all of them.
    pub progress: WarmProgress,
    /// The first keys of the failed batches (up to 1,000), to retry or report.
    pub failed_keys: Vec<String>,
    /// The first error of a failed batch, if any (not of one fail-safe answered).
    pub first_error: Option<LoadError<E>>,
    /// How long it took.
    pub took: Duration,
}

impl<'c, V, C> Warmer<'c, V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    /// Warms `cache`: batches of 100 keys, 4 at a time, with the cache's default options.
    pub fn new(cache: &'c TieredCache<V, C>) -> Self {
        Self {
            cache,
            batch_size: 100,
            concurrency: 4,
            options: None,
            progress: None,
        }
    }

    /// How many keys one loader call gets at most (default 100; at least 1).
    #[must_use]
    pub fn batch_size(mut self, keys: usize) -> Self {
        self.batch_size = keys.max(1);
        self
    }

    /// How many loader calls run at once at most (default 4; at least 1): the origin sees no
    /// more than this, however many keys there are.
    #[must_use]
    pub fn concurrency(mut self, batches: usize) -> Self {
        self.concurrency = batches.max(1);
        self
    }

    /// The options the values are cached with (default: the cache's default options).
    #[must_use]
    pub fn options(mut self, options: EntryOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// Called after each batch with the progress so far (in the warming task: keep it short).
    #[must_use]
    pub fn on_progress(mut self, progress: impl Fn(&WarmProgress) + Send + Sync + 'c) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Warms the cache with `keys`; `loader` gets the keys of a batch that no tier holds and
    /// answers the values it has (keys it leaves out have none). A key that appears twice is
    /// warmed twice: the second time from the cache, unless the two batches run at once. A
    /// batch that fails (the loader's error, an invalid key in it) fails as a whole, is counted
    /// and named in the report, and the rest go on; so does one whose loader failed and which
    /// fail-safe answered with stale values (its error is not kept: the cache took it).
    pub async fn run<I, K, F, Fut, E>(self, keys: I, loader: F) -> WarmReport<E>
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
        F: Fn(Vec<String>) -> Fut,
        Fut: Future<Output = Result<HashMap<String, V>, E>>,
        E: Send + Sync + 'static,
    {
        self.run_stream(stream::iter(keys.into_iter().map(Into::into)), loader)
            .await
    }

    /// As [`run`](Self::run), with the keys from a stream (read as the batches go).
    pub async fn run_stream<S, F, Fut, E>(self, keys: S, loader: F) -> WarmReport<E>
    where
        S: Stream<Item = String>,
        F: Fn(Vec<String>) -> Fut,
        Fut: Future<Output = Result<HashMap<String, V>, E>>,
        E: Send + Sync + 'static,
    {
        let started = tokio::time::Instant::now();
        let options = self.options.unwrap_or_else(|| self.cache.default_options());
        let (cache, loader) = (self.cache, &loader);
        let mut batches = std::pin::pin!(
            keys.chunks(self.batch_size)
                .map(|batch| warm_batch(cache, &options, batch, loader))
                .buffer_unordered(self.concurrency)
        );
        let mut progress = WarmProgress {
            done: 0,
            loaded: 0,
            cached: 0,
            absent: 0,
            failed: 0,
        };
        let (mut failed_keys, mut first_error) = (Vec::new(), None);
        while let Some(batch) = batches.next().await {
            progress.done += batch.keys.len() as u64;
            if let Outcome::Warmed = batch.outcome {
                progress.loaded += batch.loaded;
                progress.absent += batch.asked - batch.loaded;
                progress.cached += batch.keys.len() as u64 - batch.asked;
            } else {
                progress.failed += batch.keys.len() as u64;
                let room = MAX_FAILED_KEYS.saturating_sub(failed_keys.len());
                failed_keys.extend(batch.keys.into_iter().take(room));
                if let Outcome::Failed(error) = batch.outcome {
                    first_error.get_or_insert(error);
                }
            }
            if let Some(report) = &self.progress {
                report(&progress);
            }
        }
        WarmReport {
            progress,
            failed_keys,
            first_error,
            took: started.elapsed(),
        }
    }
}

/// One batch's outcome.
struct Batch<E> {
    keys: Vec<String>,
    /// How many keys the loader was asked for, and how many it answered.
    asked: u64,
    loaded: u64,
    outcome: Outcome<E>,
}

async fn warm_batch<V, C, F, Fut, E>(
    cache: &TieredCache<V, C>,
    options: &EntryOptions,
    keys: Vec<String>,
    loader: &F,
) -> Batch<E>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = Result<HashMap<String, V>, E>>,
    E: Send + Sync + 'static,
{
    let (asked, answered) = (AtomicU64::new(0), AtomicU64::new(0));
    let loader_failed = AtomicBool::new(false);
    let result = cache
        .get_or_load_many_with(&keys, options, |missing: Vec<String>| async {
            asked.store(missing.len() as u64, Ordering::Relaxed);
            let wanted = missing.clone();
            let values = loader(missing).await.inspect_err(|_| {
                loader_failed.store(true, Ordering::Relaxed);
            })?;
            // Only keys asked for count (the cache ignores the others).
            let found = wanted
                .iter()
                .filter(|key| values.contains_key(*key))
                .count();
            answered.store(found as u64, Ordering::Relaxed);
            Ok(values)
        })
        .await
        .map(|_| ());
    // With fail-safe, a loader that failed leaves the batch answered by stale values: not
    // warmed all the same (its error went to the cache, which answered without it).
    let outcome = match result {
        Ok(()) if loader_failed.into_inner() => Outcome::StaleAfterFailure,
        Ok(()) => Outcome::Warmed,
        Err(error) => Outcome::Failed(error),
    };
    Batch {
        keys,
        asked: asked.into_inner(),
        loaded: answered.into_inner(),
        outcome,
    }
}

/// What became of one batch.
enum Outcome<E> {
    Warmed,
    /// The loader failed and fail-safe answered stale values.
    StaleAfterFailure,
    Failed(LoadError<E>),
}
