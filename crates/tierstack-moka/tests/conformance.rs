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

#[tokio::test]
async fn debug_output_never_shows_values_or_keys() {
    use tierstack_core::Store;
    let store = MokaStore::new(1 << 20);
    store
        .set(
            "user:alice",
            "s3cret".into(),
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
    let debug = format!("{store:?}");
    assert!(
        !debug.contains("s3cret") && !debug.contains("alice"),
        "{debug}"
    );
}
