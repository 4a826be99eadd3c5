//! Tenants: their names, their limits, the keys of their entries (each tenant's own
//! namespace), and the rate of their requests.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tierstack::CacheError;
use tierstack::core::key::compose_key;
use tierstack::redis::{RateLimiter as RedisRateLimiter, RedisStore};
use tokio::time::Instant;

use crate::error::ApiError;

/// A tenant's name: 1 to 64 of `[a-z0-9_-]`. It starts every storage key of the tenant, and
/// holds no `:`, which ends it there.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TenantName(Arc<str>);

// Cloned on every request: shared, not copied.
impl Serialize for TenantName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl TenantName {
    /// `name`, if it is a valid tenant name.
    ///
    /// # Errors
    ///
    /// A message saying what a tenant name may hold.
    pub fn new(name: &str) -> Result<Self, String> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(Arc::from(name)))
        } else {
            Err("a tenant name is 1 to 64 of a-z, 0-9, _ and -".into())
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The storage key of the tenant's entry `key`: `tenant:escaped key`. The escaping
    /// (`compose_key`) keeps every key, however crafted, inside the tenant's namespace, and
    /// keeps prefixes: the storage keys of the tenant's keys under `prefix` all start with the
    /// storage key of `prefix`.
    pub(crate) fn storage_key(&self, key: &str) -> String {
        compose_key(&[&self.0, key])
    }
}

impl fmt::Debug for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::new(&name).map_err(serde::de::Error::custom)
    }
}

/// What a tenant may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The longest key, in bytes.
    pub max_key_bytes: usize,
    /// The largest value, in bytes (and the largest request body, beside bulk writes).
    pub max_value_bytes: usize,
    /// The most keys in one bulk request.
    pub max_bulk: usize,
    /// The largest body of a bulk request, in bytes.
    pub max_bulk_body_bytes: usize,
    /// Requests per `rate_window_secs` (0: no limit).
    pub rate_limit: u64,
    /// The rate limit's window, in seconds.
    pub rate_window_secs: u64,
    /// The TTL of a write that names none, in seconds.
    pub default_ttl_secs: u64,
    /// The longest TTL a write may ask for, in seconds.
    pub max_ttl_secs: u64,
    /// The most live entries the tenant may hold (0: no quota).
    pub max_entries: u64,
    /// The most bytes (keys and values) the tenant's live entries may hold (0: no quota).
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 256,
            max_value_bytes: 1 << 20,
            max_bulk: 100,
            max_bulk_body_bytes: 8 << 20,
            rate_limit: 6_000,
            rate_window_secs: 60,
            default_ttl_secs: 3_600,
            max_ttl_secs: 30 * 86_400,
            max_entries: 1_000_000,
            max_bytes: 1 << 30,
        }
    }
}

impl Limits {
    /// Checks the limits themselves.
    ///
    /// # Errors
    ///
    /// A message naming the first setting out of range.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.max_key_bytes == 0, "max_key_bytes must be at least 1"),
            (
                self.max_value_bytes == 0,
                "max_value_bytes must be at least 1",
            ),
            (self.max_bulk == 0, "max_bulk must be at least 1"),
            (
                self.max_bulk_body_bytes == 0,
                "max_bulk_body_bytes must be at least 1",
            ),
            (
                self.rate_window_secs == 0,
                "rate_window_secs must be at least 1",
            ),
            (
                self.default_ttl_secs == 0,
                "default_ttl_secs must be at least 1",
            ),
            (
                self.max_ttl_secs < self.default_ttl_secs,
                "max_ttl_secs must be at least default_ttl_secs",
            ),
        ];
        match checks.iter().find(|(failed, _)| *failed) {
            Some((_, message)) => Err((*message).into()),
            None => Ok(()),
        }
    }

    /// The TTL of a write: `asked`, or the default.
    pub(crate) fn ttl(&self, asked: Option<Duration>) -> Result<Duration, ApiError> {
        match asked {
            None => Ok(Duration::from_secs(self.default_ttl_secs)),
            Some(Duration::ZERO) => Err(ApiError::bad_request(
                "invalid_ttl",
                "a ttl is a whole number of seconds (or of milliseconds, ttl_ms) above zero",
            )),
            Some(ttl) if ttl > Duration::from_secs(self.max_ttl_secs) => {
                Err(ApiError::bad_request(
                    "invalid_ttl",
                    format!("a ttl is at most {} seconds", self.max_ttl_secs),
                ))
            }
            Some(ttl) => Ok(ttl),
        }
    }

    /// Checks a key against the tenant's limit (the cache checks the rest).
    pub(crate) fn check_key(&self, key: &str) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_key",
                "a key must not be empty",
            ));
        }
        if key.len() > self.max_key_bytes {
            return Err(ApiError::bad_request(
                "invalid_key",
                format!("a key is at most {} bytes", self.max_key_bytes),
            ));
        }
        Ok(())
    }

    /// Checks a value's size.
    pub(crate) fn check_value(&self, len: usize) -> Result<(), ApiError> {
        if len > self.max_value_bytes {
            return Err(ApiError::too_large(
                "value_too_large",
                format!("a value is at most {} bytes", self.max_value_bytes),
            ));
        }
        Ok(())
    }

    /// Checks a bulk request's size.
    pub(crate) fn check_bulk(&self, count: usize) -> Result<(), ApiError> {
        if count == 0 {
            return Err(ApiError::bad_request(
                "invalid_bulk",
                "a bulk request names at least one key",
            ));
        }
        if count > self.max_bulk {
            return Err(ApiError::too_large(
                "bulk_too_large",
                format!("a bulk request holds at most {} keys", self.max_bulk),
            ));
        }
        Ok(())
    }
}

/// The rate limits of every tenant: on this instance, or shared by every instance through
/// Redis (falling back to this instance's count while Redis fails).
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    local: RateLimiter,
    shared: Option<Shared>,
}

/// Limits counted in Redis: one limiter per tenant, made on its first request.
#[derive(Debug)]
struct Shared {
    store: RedisStore,
    limiters: Mutex<HashMap<TenantName, (Limits, RedisRateLimiter)>>,
}

impl RateLimits {
    /// Limits counted in `store`, shared with every instance that counts there.
    pub(crate) fn shared(store: RedisStore) -> Self {
        Self {
            local: RateLimiter::default(),
            shared: Some(Shared {
                store,
                limiters: Mutex::default(),
            }),
        }
    }

    /// Counts a request of `tenant`; 429 with the seconds to wait if it is over `limits`.
    pub(crate) async fn check(&self, tenant: &TenantName, limits: &Limits) -> Result<(), ApiError> {
        if limits.rate_limit == 0 {
            return Ok(());
        }
        let Some(shared) = &self.shared else {
            return self.local.check(tenant, limits);
        };
        match shared.hit(tenant, limits).await {
            Ok(None) => Ok(()),
            Ok(Some(retry_after)) => Err(ApiError::rate_limited(retry_after)),
            Err(error) => {
                tracing::warn!(error = %error, "shared rate limit unavailable: counting on this instance");
                self.local.check(tenant, limits)
            }
        }
    }
}

impl Shared {
    /// `None` if the request is within the limit, else the seconds to wait.
    async fn hit(&self, tenant: &TenantName, limits: &Limits) -> Result<Option<u64>, CacheError> {
        let limiter = {
            let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
            match limiters.get(tenant) {
                Some((made_for, limiter)) if made_for == limits => limiter.clone(),
                _ => {
                    let limiter = RedisRateLimiter::new(
                        &self.store,
                        "tierstack-server",
                        limits.rate_limit,
                        Duration::from_secs(limits.rate_window_secs),
                    )?;
                    limiters.insert(tenant.clone(), (*limits, limiter.clone()));
                    limiter
                }
            }
        };
        let decision = limiter.hit(tenant.as_str()).await?;
        Ok((!decision.allowed).then(|| {
            let wait = decision.retry_after.unwrap_or(Duration::from_secs(1));
            // Whole seconds, rounded up: a client that waits that long is let in.
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        }))
    }
}

/// A sliding-window rate limiter per tenant, on this instance: the count of the current
/// window plus the previous window's, weighted by how much of it the sliding window still
/// covers.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    windows: Mutex<HashMap<TenantName, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    current: u64,
    previous: u64,
}

impl RateLimiter {
    /// Counts a request of `tenant`; 429 with the seconds to wait if it is over `limits`.
    pub(crate) fn check(&self, tenant: &TenantName, limits: &Limits) -> Result<(), ApiError> {
        if limits.rate_limit == 0 {
            return Ok(());
        }
        let length = Duration::from_secs(limits.rate_window_secs);
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let window = windows.entry(tenant.clone()).or_insert(Window {
            started: now,
            current: 0,
            previous: 0,
        });
        let elapsed = now.duration_since(window.started);
        if elapsed >= length * 2 {
            *window = Window {
                started: now,
                current: 0,
                previous: 0,
            };
        } else if elapsed >= length {
            *window = Window {
                started: window.started + length,
                current: 0,
                previous: window.current,
            };
        }
        let into = now.duration_since(window.started).as_secs_f64() / length.as_secs_f64();
        #[expect(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "request counts far below 2^52; the estimate is a whole number of requests"
        )]
        let estimate = (window.previous as f64 * (1.0 - into)).floor() as u64 + window.current;
        if estimate >= limits.rate_limit {
            // Once the current window ends, the previous one's weight falls.
            let left = length.saturating_sub(now.duration_since(window.started));
            return Err(ApiError::rate_limited(left.as_secs().max(1)));
        }
        window.current += 1;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_and_their_keys() {
        assert!(TenantName::new("shop-1_a").is_ok());
        for bad in ["", "Shop", "a:b", "a/b", "é", &"a".repeat(65)] {
            assert!(TenantName::new(bad).is_err(), "{bad:?}");
        }
        let a = TenantName::new("a").unwrap_or_else(|_| unreachable!());
        let ab = TenantName::new("a-b").unwrap_or_else(|_| unreachable!());
        assert_ne!(a.storage_key("-b:x"), ab.storage_key("x"));
        assert_ne!(a.storage_key("b:x"), a.storage_key("b%3Ax"));
        assert!(
            a.storage_key("users:7")
                .starts_with(&a.storage_key("users:"))
        );
    }

    #[test]
    fn ttls_and_sizes() {
        let limits = Limits::default();
        assert_eq!(limits.ttl(None), Ok(Duration::from_secs(3_600)));
        assert_eq!(
            limits.ttl(Some(Duration::from_secs(5))),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(
            limits.ttl(Some(Duration::ZERO)).map_err(|e| e.code()),
            Err("invalid_ttl")
        );
        let longest = Duration::from_secs(limits.max_ttl_secs);
        assert!(
            limits
                .ttl(Some(longest + Duration::from_millis(1)))
                .is_err()
        );
        assert!(limits.check_value(1 << 20).is_ok());
        assert_eq!(
            limits.check_value((1 << 20) + 1).map_err(|e| e.code()),
            Err("value_too_large")
        );
        assert!(limits.check_bulk(0).is_err() && limits.check_bulk(101).is_err());
        assert!(
            Limits {
                max_bulk: 0,
                ..limits
            }
            .validate()
            .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_slides() {
        let limiter = RateLimiter::default();
        let tenant = TenantName::new("t").unwrap_or_else(|_| unreachable!());
        let limits = Limits {
            rate_limit: 10,
            rate_window_secs: 10,
            ..Limits::default()
        };
        for _ in 0..10 {
            assert!(limiter.check(&tenant, &limits).is_ok());
        }
        let refused = limiter.check(&tenant, &limits).unwrap_err();
        assert_eq!(refused.code(), "rate_limited");
        // Half-way into the next window, half of the previous one still counts.
        tokio::time::advance(Duration::from_secs(15)).await; // paused clock
        for _ in 0..5 {
            assert!(limiter.check(&tenant, &limits).is_ok());
        }
        assert!(limiter.check(&tenant, &limits).is_err());
        // Two windows later, nothing counts.
        tokio::time::advance(Duration::from_secs(20)).await; // paused clock
        for _ in 0..10 {
            assert!(limiter.check(&tenant, &limits).is_ok());
        }
        let other = TenantName::new("u").unwrap_or_else(|_| unreachable!());
        assert!(limiter.check(&other, &limits).is_ok(), "per tenant");
    }
}
