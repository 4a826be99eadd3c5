//! Seed 001's move from Firestore to Redis, live: a `MigratingStore` serves every key throughout,
//! and afterwards Redis alone has them all.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tierstack::TieredCache;
use tierstack::migrate::MigratingStore;
use tierstack_core::Store;
use tierstack_firestore::FirestoreStore;
use tierstack_redis::{RedisConfig, RedisStore};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_data_moves_from_firestore_to_redis_without_a_miss() {
    let redis_url = tierstack_test_support::redis::redis_url();
    let run = std::process::id();
    let firestore: Arc<dyn Store> = Arc::new(
        FirestoreStore::connect(&common::config(&format!("migration-{run}")))
            .await
            .unwrap(),
    );
    let redis: Arc<dyn Store> = Arc::new(
        RedisStore::connect(
            &RedisConfig::from_url(&redis_url)
                .unwrap()
                .key_prefix(&format!("migration-{run}:")),
        )
        .await
        .unwrap(),
    );
    let build = |l2: Arc<dyn Store>| {
        TieredCache::<String>::builder("sessions")
            .l2(l2)
            .without_l1()
            .build()
            .unwrap()
    };

    // Before: the service runs on Firestore.
    let before = build(firestore.clone());
    for i in 0..40 {
        before
            .set(&format!("s{i}"), format!("session {i}"))
            .await
            .unwrap();
    }

    // During: reads and writes through the migrating store; not one read misses.
    let during = build(Arc::new(MigratingStore::new(
        firestore.clone(),
        redis.clone(),
    )));
    for round in 0..2 {
        for i in 0..40 {
            let value = during.get(&format!("s{i}")).await.unwrap();
            assert_eq!(
                value,
                Some(format!("session {i}")),
                "round {round}, key s{i}"
            );
        }
    }
    during
        .set("s-new", "written during the move".into())
        .await
        .unwrap();
    assert!(
        firestore.exists("sessions:s-new").await.unwrap(),
        "writes reach the old backend too"
    );

    // After: Redis alone holds everything, with the TTLs carried over.
    let after = build(redis.clone());
    for i in 0..40 {
        assert_eq!(
            after.get(&format!("s{i}")).await.unwrap(),
            Some(format!("session {i}"))
        );
    }
    assert_eq!(
        after.get("s-new").await.unwrap(),
        Some("written during the move".into())
    );
    let ttl = redis.ttl("sessions:s0").await.unwrap().unwrap();
    assert!(
        ttl > Duration::from_secs(200) && ttl <= Duration::from_secs(300),
        "{ttl:?}"
    );
    redis.delete_prefix("sessions:").await.unwrap();
}
