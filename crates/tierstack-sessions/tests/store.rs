//! The session store's contract on the in-memory L2: create never overwrites, load never
//! answers an expired record, a delete reaches every instance.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration as StdDuration;

use tierstack::core::testkit::{MemoryBus, MemoryStore};
use tierstack_sessions::{TieredSessionStore, cache_builder};
use time::{Duration, OffsetDateTime};
use tower_sessions::session::{Id, Record};
use tower_sessions::{ExpiredDeletion, SessionStore};

fn stores(count: usize) -> Vec<TieredSessionStore> {
    let (l2, bus) = (Arc::new(MemoryStore::new()), MemoryBus::new());
    (0..count)
        .map(|_| {
            let cache = cache_builder("sessions")
                .l2(l2.clone())
                .backplane(Arc::new(bus.backplane()))
                .build()
                .unwrap();
            TieredSessionStore::new(cache)
        })
        .collect()
}

fn record(expires_in: Duration) -> Record {
    let mut data = std::collections::HashMap::new();
    data.insert("user".to_owned(), serde_json::json!("ada"));
    Record {
        id: Id::default(),
        data,
        expiry_date: OffsetDateTime::now_utc() + expires_in,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_save_load_delete() {
    let stores = stores(2);
    let (a, b) = (&stores[0], &stores[1]);
    let mut session = record(Duration::hours(1));
    a.create(&mut session).await.unwrap();
    assert_eq!(b.load(&session.id).await.unwrap(), Some(session.clone()));
    session.data.insert("visits".into(), serde_json::json!(3));
    b.save(&session).await.unwrap();
    assert_eq!(b.load(&session.id).await.unwrap(), Some(session.clone()));
    // `a` holds the first version in L1 until the save's invalidation arrives.
    eventually(async || a.load(&session.id).await.unwrap() == Some(session.clone())).await;
    let ttl = a
        .cache()
        .ttl(&session.id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert!(ttl > StdDuration::from_secs(3590) && ttl <= StdDuration::from_secs(3600));
    a.delete(&session.id).await.unwrap();
    assert_eq!(a.load(&session.id).await.unwrap(), None);
    // The other instance held it in L1: the logout reaches it through the backplane.
    eventually(async || b.load(&session.id).await.unwrap().is_none()).await;
}

async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(2);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached within two seconds"
        );
        tokio::time::sleep(StdDuration::from_millis(5)).await; // poll loop
    }
}

#[tokio::test]
async fn create_never_overwrites_another_session() {
    let store = &stores(1)[0];
    let mut existing = record(Duration::hours(1));
    store.create(&mut existing).await.unwrap();
    let mut colliding = record(Duration::hours(1));
    colliding.id = existing.id;
    colliding
        .data
        .insert("user".into(), serde_json::json!("mallory"));
    store.create(&mut colliding).await.unwrap();
    assert_ne!(colliding.id, existing.id, "a new id was drawn");
    assert_eq!(store.load(&existing.id).await.unwrap(), Some(existing));
    assert_eq!(store.load(&colliding.id).await.unwrap(), Some(colliding));
}

#[tokio::test]
async fn an_expired_record_is_never_served() {
    let store = &stores(1)[0];
    // Written behind the store's back to outlive its expiry date, as a backend that deletes
    // late keeps it.
    let expired = record(Duration::seconds(-5));
    let options = store
        .cache()
        .default_options()
        .with_ttl(StdDuration::from_secs(600));
    store
        .cache()
        .set_with(&expired.id.to_string(), expired.clone(), &options)
        .await
        .unwrap();
    assert_eq!(store.load(&expired.id).await.unwrap(), None);
    // Saving or creating an expired record keeps nothing.
    let mut late = record(Duration::seconds(-1));
    store.create(&mut late).await.unwrap();
    store.save(&late).await.unwrap();
    assert_eq!(store.cache().get(&late.id.to_string()).await.unwrap(), None);
    // Saved with an expiry in the past: the record is removed.
    let mut ending = record(Duration::hours(1));
    store.create(&mut ending).await.unwrap();
    ending.expiry_date = OffsetDateTime::now_utc() - Duration::seconds(1);
    store.save(&ending).await.unwrap();
    assert_eq!(
        store.cache().get(&ending.id.to_string()).await.unwrap(),
        None
    );
    store.delete_expired().await.unwrap();
}

#[tokio::test]
async fn a_failing_backend_is_an_error_not_a_lost_session() {
    let l2 = Arc::new(MemoryStore::new());
    let faulty = Arc::new(tierstack::core::testkit::FaultyStore::new(l2));
    let store = TieredSessionStore::new(
        cache_builder("sessions")
            .l2(faulty.clone())
            .build()
            .unwrap(),
    );
    let mut session = record(Duration::hours(1));
    faulty.set_failing(true);
    assert!(store.create(&mut session).await.is_err());
    assert!(store.save(&session).await.is_err());
    assert!(
        store.load(&session.id).await.is_err(),
        "a failed read is no missing session: that would log its user out"
    );
    faulty.set_failing(false);
    store.create(&mut session).await.unwrap();
    assert_eq!(store.load(&session.id).await.unwrap(), Some(session));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_after_a_logout_does_not_bring_the_session_back() {
    let stores = stores(2);
    let (a, b) = (&stores[0], &stores[1]);
    let mut session = record(Duration::hours(1));
    a.create(&mut session).await.unwrap();
    // A request on `b` loaded the session and is still running...
    let mut loaded = b.load(&session.id).await.unwrap().unwrap();
    // ...when the user logs out on `a`.
    a.delete(&session.id).await.unwrap();
    loaded.data.insert("visits".into(), serde_json::json!(9));
    b.save(&loaded).await.unwrap();
    assert_eq!(a.load(&session.id).await.unwrap(), None);
    // `b`'s L1 copy goes when the logout's invalidation arrives.
    eventually(async || b.load(&session.id).await.unwrap().is_none()).await;
    assert_eq!(
        a.cache().get(&session.id.to_string()).await.unwrap(),
        None,
        "nothing written under the ended id"
    );
    // A save of a live session still lands.
    let mut live = record(Duration::hours(1));
    a.create(&mut live).await.unwrap();
    live.data.insert("visits".into(), serde_json::json!(1));
    b.save(&live).await.unwrap();
    eventually(async || a.load(&live.id).await.unwrap() == Some(live.clone())).await;
}

#[tokio::test]
async fn without_a_backplane_sessions_bypass_l1() {
    // Two instances share an L2 that has no backplane (Firestore, say).
    let l2 = Arc::new(MemoryStore::new());
    let instance = || {
        let cache = cache_builder("sessions").l2(l2.clone()).build().unwrap();
        assert!(!cache.l1_kept_coherent());
        TieredSessionStore::new(cache)
    };
    let (a, b) = (instance(), instance());
    let mut session = record(Duration::hours(1));
    a.create(&mut session).await.unwrap();
    assert_eq!(b.load(&session.id).await.unwrap(), Some(session.clone()));
    session.data.insert("visits".into(), serde_json::json!(2));
    a.save(&session).await.unwrap();
    // No waiting: no L1 copy on `b` to outlive the write or the logout.
    assert_eq!(b.load(&session.id).await.unwrap(), Some(session.clone()));
    a.delete(&session.id).await.unwrap();
    assert_eq!(b.load(&session.id).await.unwrap(), None);
    assert_eq!(b.cache().stats().l1_hits, 0, "L1 never answered");
}

/// A session tagged with its user that asks for more than a year (a "remember me" of two
/// years) is kept for a year, within its tag's record, rather than failing every create and
/// save.
#[tokio::test]
async fn a_tagged_session_is_kept_at_most_a_year() {
    let store = stores(1).remove(0).with_user_field("user");
    let mut session = record(Duration::days(730));
    store.create(&mut session).await.unwrap();
    session.data.insert("visits".into(), serde_json::json!(1));
    store.save(&session).await.unwrap();
    assert_eq!(
        store.load(&session.id).await.unwrap(),
        Some(session.clone())
    );
    let ttl = store
        .cache()
        .ttl(&session.id.to_string())
        .await
        .unwrap()
        .unwrap();
    let year = StdDuration::from_secs(366 * 24 * 3600);
    assert!(
        ttl <= year && ttl + StdDuration::from_secs(60) > year,
        "{ttl:?}"
    );
    store.end_user_sessions("ada").await.unwrap();
    assert_eq!(store.load(&session.id).await.unwrap(), None);
}

/// A user id whose tag is not allowed (over 123 bytes) is a clear error, for the write of its
/// session (nothing is kept, nothing else is touched) and for ending its sessions.
#[tokio::test]
async fn a_user_id_too_long_for_a_tag_is_a_clear_error_and_keeps_nothing() {
    let store = stores(1).remove(0).with_user_field("user");
    let mut other = record(Duration::hours(1));
    store.create(&mut other).await.unwrap();
    let long = "u".repeat(124);
    let mut session = record(Duration::hours(1));
    session
        .data
        .insert("user".to_owned(), serde_json::json!(long.clone()));
    let error = store.create(&mut session).await.unwrap_err();
    assert!(error.to_string().contains("tag"), "{error}");
    assert_eq!(store.load(&session.id).await.unwrap(), None, "nothing kept");
    let ended = store.end_user_sessions(&long).await.unwrap_err();
    assert!(
        matches!(ended, tierstack::CacheError::InvalidTag { .. }),
        "{ended:?}"
    );
    assert_eq!(store.load(&other.id).await.unwrap(), Some(other.clone()));
}
