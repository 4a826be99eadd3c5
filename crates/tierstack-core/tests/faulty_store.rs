//! The fault-injecting wrapper's own behaviour.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tierstack_core::Store;
use tierstack_core::testkit::{FaultyStore, MemoryStore};

/// Waits (bounded) until `store` holds `count` writes.
async fn until_held(store: &FaultyStore, count: u64) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while store.held_writes() != count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} writes were never held"));
}

#[tokio::test]
async fn held_writes_wait_until_released_while_reads_pass() {
    let store = FaultyStore::new(Arc::new(MemoryStore::new()));
    store.hold_writes(true);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .set("k", Bytes::from_static(b"v"), Duration::from_secs(60))
                .await
        })
    };
    until_held(&store, 1).await;
    assert_eq!(store.get("k").await.unwrap(), None, "reads are not held");
    assert!(!writer.is_finished());
    store.hold_writes(false);
    writer.await.unwrap().unwrap();
    assert_eq!(store.held_writes(), 0);
    assert_eq!(
        store.get("k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
    // Released writes pass straight through.
    assert!(
        store
            .set_if_absent("other", Bytes::new(), Duration::from_secs(60))
            .await
            .unwrap()
    );
}
