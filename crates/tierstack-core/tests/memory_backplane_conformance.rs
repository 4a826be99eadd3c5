//! The backplane conformance suite over the in-memory bus.

use std::sync::Arc;

use tierstack_core::Backplane;
use tierstack_core::testkit::MemoryBus;
use tierstack_core::testkit::backplane_conformance::BackplaneHarness;

async fn harness() -> BackplaneHarness {
    let bus = MemoryBus::new();
    let members = (0..3)
        .map(|_| Arc::new(bus.backplane()) as Arc<dyn Backplane>)
        .collect();
    BackplaneHarness::new(members, bus)
}

tierstack_core::backplane_conformance_tests!(harness);
