//! The Firestore tier of [tierstack](https://docs.rs/tierstack), on the
//! [`firestore`](https://docs.rs/firestore) crate (rustls, no OpenSSL).
//!
//! [`FirestoreStore`] keeps one document per key in one collection:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | document id | hex SHA-256 of the key | never one of Firestore's forbidden ids |
//! | `key` | string | the key, compared on read: a document with another key is a miss |
//! | `value` | bytes | the stored bytes (the composer's envelope) |
//! | `created_at`, `last_accessed` | timestamp | when written, when last extended |
//! | `expires_at` | timestamp | the field to name in a Firestore TTL policy |
//!
//! Firestore's TTL deletion runs up to a day late, so every read checks `expires_at` itself, and
//! [`FirestoreStore::sweep_expired_with`] deletes expired entries in batches, handing each to a
//! callback first (to release what it points at). It passes the core conformance suite against
//! the real Firestore emulator.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tierstack_core::Store;
//! use tierstack_firestore::{FirestoreConfig, FirestoreStore};
//!
//! # async fn run() -> Result<(), tierstack_core::CacheError> {
//! let config = FirestoreConfig::new("my-project").collection("cache_entries");
//! let store = FirestoreStore::connect(&config).await?;
//! store.set("user:42", "cached".into(), Duration::from_secs(3600)).await?;
//! let swept = store
//!     .sweep_expired_with(|entry| async move {
//!         println!("{} expired", entry.key);
//!         Ok(())
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

mod document;
mod emulator;
mod store;

pub use store::{
    DEFAULT_COLLECTION, ExpiredEntry, FirestoreConfig, FirestoreStore, MAX_DOCUMENT_LEN,
};
