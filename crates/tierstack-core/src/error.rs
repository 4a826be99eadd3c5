//! The one error type of tierstack.

use std::error::Error as StdError;
use std::time::Duration;

/// A boxed error that backends and loaders hand over as the source of a [`CacheError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Shorthand for `Result<T, CacheError>`.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Everything that can go wrong in a cache operation.
///
/// Backend crates convert their driver errors into these variants and keep the driver error as the
/// [`source`](StdError::source), so no information is flattened into a string. No variant's
/// `Display` or `Debug` ever contains a password: backends pass only the host they tried to reach.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The backend could not be reached, or the connection broke.
    #[error("cannot connect to {endpoint}")]
    Connection {
        /// The host (and port) that was tried, never with credentials.
        endpoint: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// The backend refused the credentials or the user lacks a permission.
    #[error("authentication or permission failure at {endpoint}")]
    Authentication {
        /// The host (and port) that was tried, never with credentials.
        endpoint: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// The configuration is invalid (bad URL, missing setting, contradictory options).
    #[error("invalid configuration: {0}")]
    Configuration(String),
    /// An operation did not finish within its time limit.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out, such as `get` or `set`.
        operation: &'static str,
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The L2 was not called: its circuit breaker is open after repeated failures, and lets a
    /// call through again (to probe it) in `retry_in`.
    #[error("{operation} skipped: the L2's circuit breaker is open (a probe in {retry_in:?})")]
    CircuitOpen {
        /// The operation that was skipped, such as `get` or `set`.
        operation: &'static str,
        /// When a call may probe the L2 again.
        retry_in: Duration,
    },
    /// The backend answered with an error.
    #[error("backend error during {operation}")]
    Backend {
        /// The operation, such as `get` or `delete_prefix`.
        operation: &'static str,
        /// Whether retrying the same operation later may succeed.
        transient: bool,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// A value could not be encoded, or stored bytes could not be decoded.
    #[error("serialization failed: {0}")]
    Serialization(#[source] BoxError),
    /// A key was empty, too long or otherwise not allowed.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// Why the key was refused.
        reason: KeyProblem,
    },
    /// A tag was empty, too long, or an entry carried too many.
    #[error("invalid tag: {reason}")]
    InvalidTag {
        /// Why the tag was refused.
        reason: crate::tag::TagProblem,
    },
    /// A time to live was zero or beyond the supported maximum.
    #[error("invalid ttl {ttl:?}: {reason}")]
    InvalidTtl {
        /// The refused duration.
        ttl: Duration,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An encoded value exceeded the configured or backend maximum; nothing was written.
    #[error("value of {size} bytes exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// The encoded size in bytes.
        size: usize,
        /// The maximum in bytes.
        max: usize,
    },
    /// The loader of a read-through call failed (or panicked); the failure is not cached.
    #[error("loader failed")]
    Loader(#[source] BoxError),
}

/// Why a key was refused; part of [`CacheError::InvalidKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyProblem {
    /// The key is the empty string.
    Empty,
    /// The key is longer than the configured maximum.
    TooLong {
        /// The key's length in bytes.
        len: usize,
        /// The maximum in bytes.
        max: usize,
    },
    /// A namespace contained a character outside `[A-Za-z0-9_.-]`.
    BadNamespaceChar,
    /// The key is `.` or `..`, which a store reached through URL paths cannot carry: URLs
    /// resolve them away, encoded or not.
    DotSegment,
}

impl std::fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => f.write_str("key is empty"),
            Self::TooLong { len, max } => write!(f, "key is {len} bytes, the maximum is {max}"),
            Self::BadNamespaceChar => {
                f.write_str("namespaces may only contain ASCII letters, digits, '_', '-' and '.'")
            }
            Self::DotSegment => {
                f.write_str("the keys \".\" and \"..\" cannot travel in a URL path")
            }
        }
    }
}

impl CacheError {
    /// Whether the failure may go away by itself (a dropped connection, a timeout, an overloaded
    /// server). The composer serves reads from L1 or the loader when an L2 error is transient, and
    /// callers may retry; a non-transient error (bad input, bad configuration) will fail again.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connection { .. } | Self::Timeout { .. } | Self::CircuitOpen { .. } => true,
            Self::Backend { transient, .. } => *transient,
            _ => false,
        }
    }

    /// Builds a [`CacheError::Backend`] from any error.
    pub fn backend(operation: &'static str, transient: bool, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            operation,
            transient,
            source: source.into(),
        }
    }

    /// Builds a [`CacheError::Serialization`] from any error.
    pub fn serialization(source: impl Into<BoxError>) -> Self {
        Self::Serialization(source.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_classification() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(
            CacheError::Connection {
                endpoint: "127.0.0.1:6379".into(),
                source: io.into()
            }
            .is_transient()
        );
        assert!(
            CacheError::Timeout {
                operation: "get",
                after: Duration::from_millis(5)
            }
            .is_transient()
        );
        assert!(CacheError::backend("get", true, "busy").is_transient());
        assert!(!CacheError::backend("get", false, "wrongtype").is_transient());
        assert!(
            !CacheError::InvalidKey {
                reason: KeyProblem::Empty
            }
            .is_transient()
        );
        assert!(!CacheError::Configuration("x".into()).is_transient());
    }

    #[test]
    fn source_chain_is_kept() {
        let io = std::io::Error::other("inner cause");
        let err = CacheError::backend("set", true, io);
        let source = err.source().map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("inner cause"));
        assert_eq!(err.to_string(), "backend error during set");
    }
}
