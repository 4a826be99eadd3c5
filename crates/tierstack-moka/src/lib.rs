//! The in-process tier of [tierstack](https://docs.rs/tierstack), on
//! [moka](https://docs.rs/moka)'s concurrent cache.
//!
//! - [`L1Cache`]: the typed L1 of the composer. It holds decoded values, so a hit costs a moka
//!   lookup and a clone of `V`, nothing more. Each entry has its own deadline (an entry filled
//!   from L2 keeps the L2 entry's remaining time), checked against an injectable clock on every
//!   read. Bounded by entry count or by bytes.
//! - [`MokaStore`]: a byte [`Store`](tierstack_core::Store) in process memory that passes the same
//!   conformance suite as the Redis and Firestore stores: the L2 of a single-process service, and a
//!   fast stand-in in tests.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tierstack_core::Store;
//! use tierstack_moka::MokaStore;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = MokaStore::new(64 * 1024 * 1024);
//! store.set("greeting", "hello".into(), Duration::from_secs(60)).await?;
//! assert_eq!(store.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! assert!(!store.set_if_absent("greeting", "again".into(), Duration::from_secs(60)).await?);
//! # Ok::<(), tierstack_core::CacheError>(())
//! # }).unwrap();
//! ```

mod expiry;
mod l1;
mod store;

pub use l1::{L1Cache, L1Capacity, L1Entry, NEGATIVE_ENTRY_OVERHEAD, Weigher};
pub use store::MokaStore;
