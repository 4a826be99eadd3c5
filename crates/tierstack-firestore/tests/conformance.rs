//! `FirestoreStore` passes the core conformance suite against the real Firestore emulator.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use tierstack_core::clock::ManualClock;
use tierstack_core::testkit::conformance::{Harness, TimeControl};
use tierstack_firestore::{FirestoreConfig, FirestoreStore};

mod common;

fn config() -> FirestoreConfig {
    common::config(&format!("conformance-{:016x}", fastrand_u64()))
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    hasher.finish()
}

/// Expiry is decided by the store's clock (Firestore stores the deadline; the emulator never
/// deletes by itself), so a manual clock lets the suite run without sleeping.
async fn harness() -> Harness {
    let clock = ManualClock::new();
    let store = FirestoreStore::connect_with_clock(&config(), Arc::new(clock.clone()))
        .await
        .unwrap();
    Harness::new(Arc::new(store), TimeControl::Manual(clock))
}

tierstack_core::store_conformance_tests!(harness);
