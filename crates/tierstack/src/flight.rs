//! Single-flight: concurrent read-through misses of one key share one loader call.
//!
//! The first caller registers a flight and runs the load itself; later callers subscribe to its
//! outcome. A leader that is cancelled (its future dropped, a timeout) strands nobody: its guard
//! tells the waiters, and one of them leads a new flight with its own loader. A loader that
//! panics is caught (`catch_unwind`) and every waiter gets [`LoaderPanicked`]; an error reaches
//! every waiter and is not cached.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tierstack_core::BoxError;
use tokio::sync::watch;

use crate::freshness::Snapshot;

/// A boxed, sendable future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A type-erased loader of one key: `Ok(None)` means the origin has no value.
pub(crate) type Loader<V> = Box<dyn FnOnce() -> BoxFuture<Result<Option<V>, BoxError>> + Send>;

/// How a flight ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome<V> {
    /// The loader's value.
    Found(V),
    /// The loader answered that the origin has no value.
    Absent,
    /// The loader failed or panicked.
    Failed(LoadFailure),
    /// The leader was cancelled before it finished: a waiter leads a new flight.
    Abandoned,
}

/// The registry entry of a running flight.
#[derive(Debug)]
pub(crate) struct FlightHandle<V> {
    pub(crate) id: u64,
    pub(crate) receiver: watch::Receiver<Option<Outcome<V>>>,
    /// The generations when the flight started: a caller that arrives after an invalidation
    /// must not join a flight that may have read the old value.
    pub(crate) snapshot: Snapshot,
}

/// A loader's failure as every waiter of the flight receives it (the source of
/// [`CacheError::Loader`](tierstack_core::CacheError::Loader)).
#[derive(Clone)]
pub struct LoadFailure(Arc<dyn StdError + Send + Sync>);

impl LoadFailure {
    pub(crate) fn new(error: BoxError) -> Self {
        Self(Arc::from(error))
    }

    /// The loader's own error.
    pub fn inner(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for LoadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl StdError for LoadFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// The loader panicked (or its task was cancelled by a runtime shutdown).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the loader panicked")]
pub struct LoaderPanicked;

/// The loader answered that the key has no value, and that answer is cached (negative caching).
/// [`TieredCache::get_or_load`](crate::TieredCache::get_or_load) returns it inside
/// [`CacheError::Loader`](tierstack_core::CacheError::Loader);
/// [`get_or_load_optional`](crate::TieredCache::get_or_load_optional) returns `Ok(None)` instead.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the key has no value (cached absence)")]
pub struct Absent;
