//! The Redis tier of [tierstack](https://docs.rs/tierstack), on redis-rs 1.8.
//!
//! - [`RedisStore`]: a byte [`Store`](tierstack_core::Store) on standalone Redis or Redis Cluster.
//!   One connection that reconnects by itself, `TCP_NODELAY`, explicit connect and response
//!   timeouts, a bound on requests in flight, bulk operations in one round trip (per slot in a
//!   cluster), `delete_prefix` by SCAN with escaped patterns (never KEYS). It passes the core
//!   conformance suite against a real server and a real cluster.
//! - [`RedisBackplane`]: invalidations between instances over pub/sub, with resyncs when the
//!   subscription is lost. Connected with its store
//!   ([`RedisStore::connect_with_backplane`]), the store announces each write in the write's
//!   own round trip.
//! - The data structures of services that use Redis directly: [`Sessions`] (hashes with partial
//!   update and a touch that extends every key of a session), [`CappedList`], [`RateLimiter`]
//!   (sliding window, one atomic script) and [`Lease`] (a lock only its holder can release).
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use tierstack::TieredCache;
//! use tierstack_redis::{RedisConfig, RedisStore};
//!
//! # async fn run() -> Result<(), tierstack_core::CacheError> {
//! let config = RedisConfig::from_url("redis://127.0.0.1:6379/")?.key_prefix("shop:");
//! // Paired: the store announces each write in the write's own round trip.
//! let (store, backplane) = RedisStore::connect_with_backplane(&config).await?;
//! let cache: TieredCache<String> = TieredCache::builder("products")
//!     .l2(Arc::new(store))
//!     .backplane(Arc::new(backplane))
//!     .build()?;
//! let name = cache
//!     .get_or_load("sku-1", || async { Ok::<_, std::io::Error>("Teapot".to_string()) })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Features
//!
// The link names its anchor so that the docs build without the feature too.
//! - `tls`: `rediss://` URLs and
//!   [`RedisConfig::tls_root_certificate`](RedisConfig#method.tls_root_certificate), on rustls
//!   with the aws-lc-rs provider (installed as the process default if none is). Cluster support
//!   is always built.

mod backplane;
mod config;
mod connection;
mod errors;
mod managed;
mod pushing;
mod quota;
mod store;
mod structures;
mod take_back;

pub use backplane::RedisBackplane;
pub use config::RedisConfig;
pub use quota::{QuotaDecision, QuotaLedger, QuotaLimits, QuotaTicket, QuotaUsage, QuotaWrite};
pub use store::{DEFAULT_MAX_VALUE_LEN, RedisStore};
pub use structures::{CappedList, Lease, RateDecision, RateLimiter, Sessions};
