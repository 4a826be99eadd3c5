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

/// Reads stay right while writers keep moka's housekeeping busy on both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_right_under_concurrent_writes() {
    use tierstack_core::Store;
    let store = Arc::new(MokaStore::new(1 << 30));
    let ttl = std::time::Duration::from_secs(60);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..2_000 {
                    let key = format!("w{w}-{i}");
                    store.set(&key, key.clone().into(), ttl).await.unwrap();
                    let read = store.get(&key).await.unwrap();
                    assert_eq!(read.as_deref(), Some(key.as_bytes()), "{key}");
                    // An earlier key of another writer: present or not yet written, never wrong.
                    let other = format!("w{}-{}", (w + 1) % 4, i / 2);
                    let read = store.get(&other).await.unwrap();
                    assert!(read.is_none() || read.as_deref() == Some(other.as_bytes()));
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}
