//! The conformance suite over the in-memory store, on a manual clock.

use std::sync::Arc;

use tierstack_core::clock::ManualClock;
use tierstack_core::testkit::MemoryStore;
use tierstack_core::testkit::conformance::{Harness, TimeControl};

async fn harness() -> Harness {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(Arc::new(clock.clone()));
    Harness::new(Arc::new(store), TimeControl::Manual(clock))
}

tierstack_core::store_conformance_tests!(harness);

mod faulty_store_passes_through {
    use super::*;
    use tierstack_core::testkit::FaultyStore;

    pub(super) async fn harness() -> Harness {
        let clock = ManualClock::new();
        let inner = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        Harness::new(
            Arc::new(FaultyStore::new(inner)),
            TimeControl::Manual(clock),
        )
    }

    tierstack_core::store_conformance_tests!(harness);
}
