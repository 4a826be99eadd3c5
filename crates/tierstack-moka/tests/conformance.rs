//! `MokaStore` passes the core conformance suite on a manual clock.

use std::sync::Arc;

use tierstack_core::clock::ManualClock;
use tierstack_core::testkit::conformance::{Harness, TimeControl};
use tierstack_moka::MokaStore;

async fn harness() -> Harness {
    let clock = ManualClock::new();
    let store = MokaStore::with_clock(64 * 1024 * 1024, Arc::new(clock.clone()));
    Harness::new(Arc::new(store), TimeControl::Manual(clock))
}

tierstack_core::store_conformance_tests!(harness);
