//! Sessions in Firestore (the emulator): served through the cache, never once expired, and
//! deleted by `delete_expired` although Firestore keeps them past their expiry.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration as StdDuration;

use tierstack::core::clock::ManualClock;
use tierstack_firestore::{FirestoreConfig, FirestoreStore};
use tierstack_sessions::{TieredSessionStore, cache_builder};
use time::{Duration, OffsetDateTime};
use tower_sessions::session::{Id, Record};
use tower_sessions::{ExpiredDeletion, SessionStore};

/// The emulator's configuration, with a collection of this test's own.
fn config(collection: &str) -> FirestoreConfig {
    let (host, project) = tierstack_test_support::firestore::emulator();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    FirestoreConfig::new(&project)
        .emulator_host(&host)
        .collection(&format!("{collection}-{nanos}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_are_swept_from_firestore() {
    let config = config("sessions");
    // The store's clock decides what has expired: moved by hand past the sessions' hour.
    let clock = ManualClock::new();
    let firestore = Arc::new(
        FirestoreStore::connect_with_clock(&config, Arc::new(clock.clone()))
            .await
            .unwrap(),
    );
    let store = TieredSessionStore::new(
        cache_builder("sessions")
            .l2(firestore.clone())
            .build()
            .unwrap(),
    );
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut record = Record {
            id: Id::default(),
            data: std::collections::HashMap::new(),
            expiry_date: OffsetDateTime::now_utc() + Duration::hours(1),
        };
        store.create(&mut record).await.unwrap();
        sessions.push(record);
    }
    let reader = TieredSessionStore::new(
        cache_builder("sessions")
            .l2(firestore.clone())
            .build()
            .unwrap(),
    );
    for record in &sessions {
        assert_eq!(
            reader.load(&record.id).await.unwrap().as_ref(),
            Some(record)
        );
    }
    clock.advance(StdDuration::from_secs(2 * 3600));
    let fresh_reader = TieredSessionStore::new(
        cache_builder("sessions")
            .l2(firestore.clone())
            .build()
            .unwrap(),
    );
    for record in &sessions {
        assert_eq!(
            fresh_reader.load(&record.id).await.unwrap(),
            None,
            "expired in the store"
        );
    }
    store.delete_expired().await.unwrap();
    assert_eq!(
        tierstack::core::Store::sweep_expired(firestore.as_ref())
            .await
            .unwrap(),
        0,
        "delete_expired left nothing to sweep"
    );
}

/// Two instances on one Firestore (which has no backplane): sessions bypass L1, so a save and a
/// logout on one are seen by the other at once, and a save that ran beside the logout does not
/// bring the session back (`set_if_present`: Firestore's compare-and-set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_beside_a_logout_keeps_the_session_ended_on_firestore() {
    let config = config("sessions-logout");
    let firestore = Arc::new(FirestoreStore::connect(&config).await.unwrap());
    let instance = || {
        let cache = cache_builder("sessions")
            .l2(firestore.clone())
            .build()
            .unwrap();
        assert!(!cache.l1_kept_coherent());
        TieredSessionStore::new(cache)
    };
    let (a, b) = (instance(), instance());
    let mut session = Record {
        id: Id::default(),
        data: std::collections::HashMap::new(),
        expiry_date: OffsetDateTime::now_utc() + Duration::hours(1),
    };
    a.create(&mut session).await.unwrap();
    let mut loaded = b.load(&session.id).await.unwrap().unwrap();
    loaded.data.insert("visits".into(), serde_json::json!(1));
    b.save(&loaded).await.unwrap();
    assert_eq!(a.load(&session.id).await.unwrap(), Some(loaded.clone()));
    // `b` runs a request beside the logout on `a`, and saves after it.
    a.delete(&session.id).await.unwrap();
    assert_eq!(b.load(&session.id).await.unwrap(), None, "seen at once");
    loaded.data.insert("visits".into(), serde_json::json!(2));
    b.save(&loaded).await.unwrap();
    for store in [&a, &b] {
        assert_eq!(store.load(&session.id).await.unwrap(), None);
    }
    assert_eq!(
        instance()
            .cache()
            .get(&session.id.to_string())
            .await
            .unwrap(),
        None,
        "nothing written under the ended id"
    );
}
