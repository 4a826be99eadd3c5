//! A two-level read-through cache for services: an in-process L1 on
//! [moka](https://docs.rs/moka) over a shared L2 (Redis, Firestore, or any
//! [`Store`]), loading each key once, writing through, and keeping every
//! instance's L1 fresh through a [`Backplane`].
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tierstack::TieredCache;
//! use tierstack::moka::MokaStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tierstack::CacheError> {
//! let cache: TieredCache<String> = TieredCache::builder("profiles")
//!     .l2(Arc::new(MokaStore::new(64 << 20)))   // Redis or Firestore in production
//!     .default_ttl(Duration::from_secs(600))
//!     .l1_ttl(Duration::from_secs(30))
//!     .build()?;
//!
//! // Concurrent misses of one key run this loader once; the value lands in both tiers.
//! let name = cache
//!     .get_or_load("user:42", || async { Ok::<_, std::io::Error>("Ada".to_string()) })
//!     .await?;
//! assert_eq!(name, "Ada");
//! assert_eq!(cache.get("user:42").await?, Some("Ada".to_string()));
//!
//! cache.set("user:42", "Ada L.".to_string()).await?;       // L2, then L1, then invalidation
//! assert_eq!(cache.stats().l1_hits, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Design
//!
//! A read tries L1 (decoded values, no decode on a hit), then L2 (bytes in a versioned
//! [envelope](tierstack_core::envelope); L1 is filled with the L2 entry's remaining TTL), then the
//! loader. Misses of one key share one *flight*: one loader call, run by the first caller, whose
//! cancellation or panic strands nobody (a waiter takes over, or every waiter gets the error).
//! The loaded value is in L1 when the callers get it; its L2 write follows in the background
//! ([`L2Fill`]). Writes go to L2, then L1, then an invalidation is published. Every invalidation bumps a generation before it evicts, and
//! every L1 fill re-checks the generation after it inserts, so a fill that started before an
//! invalidation never survives it. An L2 that fails or stalls (bounded by
//! [`l2_timeout`](TieredCacheBuilder::l2_timeout)) degrades reads to L1 and the loader.
//!
//! # Features
//!
// These crates are optional dependencies: links to docs.rs keep the docs building without them.
//! - `testkit`: the in-memory store and backplane and the fault-injecting store of
//!   [`tierstack_core::testkit`](https://docs.rs/tierstack-core/latest/tierstack_core/testkit/),
//!   for testing code that uses a cache.
//! - `redis`: re-exports [`tierstack_redis`](https://docs.rs/tierstack-redis) as
//!   `tierstack::redis`; [`StoreConfig`] can choose it.
//! - `firestore`: re-exports [`tierstack_firestore`](https://docs.rs/tierstack-firestore) as
//!   `tierstack::firestore`; [`StoreConfig`] can choose it.

pub mod backend;
mod breaker;
mod burst_log;
mod cache;
pub mod dataset;
mod error;
mod events;
mod fill;
mod flight;
mod freshness;
pub mod handles;
mod lease;
pub mod migrate;
mod options;
mod recovery;
mod stats;
mod tags;
pub mod warm;

pub use backend::{Backend, StoreConfig};
pub use breaker::{CircuitBreaker, CircuitState};
pub use cache::{TieredCache, TieredCacheBuilder};
pub use error::LoadError;
pub use events::{CacheEvent, CacheEvents, EventsError, StaleReason};
pub use fill::L2Fill;
pub use lease::LoadLease;
pub use options::{EntryOptions, FailSafe, Fetched, Loaded, Skips, Source};
pub use recovery::WriteRecovery;
pub use stats::CacheStats;
pub use tierstack_core::envelope::{Compression, Encryption, EncryptionKey, KeyRing};
pub use tierstack_core::{
    Backplane, BincodeCodec, BoxError, CacheError, Codec, JsonCodec, Result, Store,
};

/// The core contracts (stores, backplanes, codecs, keys, clocks).
pub use tierstack_core as core;
/// The Firestore L2 (feature `firestore`).
#[cfg(feature = "firestore")]
pub use tierstack_firestore as firestore;
/// The moka L1 and `MokaStore`.
pub use tierstack_moka as moka;
/// The Redis L2 and backplane (feature `redis`).
#[cfg(feature = "redis")]
pub use tierstack_redis as redis;

/// The workspace README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))]
pub struct ReadmeDoctests;

/// The getting-started guide's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/getting-started.md"))]
pub struct GettingStartedDoctests;

/// This crate's README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct CrateReadmeDoctests;
