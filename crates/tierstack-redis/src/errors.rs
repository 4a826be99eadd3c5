//! Driver errors mapped into the cache's [`CacheError`], naming the endpoint (never the
//! password).

use std::time::Duration;

use redis::{ErrorKind, RedisError, RetryMethod, ServerErrorKind};
use tierstack_core::CacheError;

/// Maps a driver error into the cache's error, naming the endpoint (never the password).
pub(crate) fn map_error(
    operation: &'static str,
    endpoint: &str,
    limit: Duration,
    error: RedisError,
) -> CacheError {
    let kind = error.kind();
    let refused_credentials = matches!(
        kind,
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
    ) || error
        .code()
        .is_some_and(|code| matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM"));
    if refused_credentials {
        return CacheError::Authentication {
            endpoint: endpoint.to_owned(),
            source: Box::new(error),
        };
    }
    if error.is_timeout() {
        return CacheError::Timeout {
            operation,
            after: limit,
        };
    }
    if error.is_io_error() || error.is_connection_refusal() || error.is_connection_dropped() {
        return CacheError::Connection {
            endpoint: endpoint.to_owned(),
            source: Box::new(error),
        };
    }
    let transient = !matches!(error.retry_method(), RetryMethod::NoRetry);
    CacheError::backend(operation, transient, error)
}

/// Whether `error` is the server's refusal to run a command on a key of another type (a list
/// where a string was expected): foreign data under a cache key.
pub(crate) fn is_wrong_type(error: &CacheError) -> bool {
    refused_with(error, "WRONGTYPE")
}

/// Whether `error` is the server's refusal to write because it is out of memory (`maxmemory`
/// reached under `noeviction`).
pub(crate) fn is_out_of_memory(error: &CacheError) -> bool {
    refused_with(error, "OOM")
}

fn refused_with(error: &CacheError, code: &str) -> bool {
    let CacheError::Backend { source, .. } = error else {
        return false;
    };
    source
        .downcast_ref::<RedisError>()
        .is_some_and(|error| error.code() == Some(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_kind_without_secrets() {
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "denied"));
        assert!(matches!(
            map_error("get", "h:1", Duration::ZERO, auth),
            CacheError::Authentication { .. }
        ));
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let mapped = map_error("get", "h:1", Duration::ZERO, io);
        assert!(matches!(mapped, CacheError::Connection { .. }) && mapped.is_transient());
        assert_eq!(mapped.to_string(), "cannot connect to h:1");
        let wrong_type = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!map_error("get", "h:1", Duration::ZERO, wrong_type).is_transient());
    }
}
