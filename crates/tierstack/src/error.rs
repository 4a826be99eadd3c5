//! The error of a read-through call.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use tierstack_core::CacheError;

/// Why [`get_or_load`](crate::TieredCache::get_or_load) and its relatives returned no value.
///
/// Every caller of one flight receives the same outcome: the loader's own error is shared as an
/// `Arc<E>`, so it reaches each waiter as the type the loader returned, without a downcast.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError<E> {
    /// The loader returned this error. Errors are not cached.
    Loader(Arc<E>),
    /// The loader panicked. The panic is caught, so no caller hangs.
    Panicked,
    /// The loader asked the cache for the key it is loading (directly, on the same task): it
    /// would have waited for itself.
    Reentrant,
    /// The loader ran past the call's hard timeout and was cancelled (fail-safe had no stale
    /// value to answer instead).
    TimedOut {
        /// The hard timeout.
        after: std::time::Duration,
    },
    /// The cache refused the call: an invalid key, for instance.
    Cache(CacheError),
}

impl<E> LoadError<E> {
    /// The loader's own error, if that is what this is.
    pub fn loader_error(&self) -> Option<&E> {
        match self {
            Self::Loader(error) => Some(error),
            _ => None,
        }
    }
}

impl<E> From<CacheError> for LoadError<E> {
    fn from(error: CacheError) -> Self {
        Self::Cache(error)
    }
}

impl<E: fmt::Display> fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loader(error) => write!(f, "loader failed: {error}"),
            Self::Panicked => f.write_str("the loader panicked"),
            Self::Reentrant => f.write_str("the loader asked the cache for the key it is loading"),
            Self::TimedOut { after } => write!(f, "the loader timed out after {after:?}"),
            Self::Cache(error) => fmt::Display::fmt(error, f),
        }
    }
}

impl<E: StdError + 'static> StdError for LoadError<E> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Loader(error) => Some(&**error),
            Self::Cache(error) => Some(error),
            Self::Panicked | Self::Reentrant | Self::TimedOut { .. } => None,
        }
    }
}

/// For callers that report every failure as a [`CacheError`]: the cache's own errors as they
/// are, anything else as [`CacheError::Loader`] with this error as its source.
impl<E: StdError + Send + Sync + 'static> From<LoadError<E>> for CacheError {
    fn from(error: LoadError<E>) -> Self {
        match error {
            LoadError::Cache(error) => error,
            other => CacheError::Loader(Box::new(other)),
        }
    }
}
