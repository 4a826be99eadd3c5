//! Keys Firestore forbids as ids, oversized values, late TTL deletion, forged documents and an
//! emulator that goes away, against the real emulator.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tierstack_core::clock::ManualClock;
use tierstack_core::{CacheError, Store};
use tierstack_firestore::{FirestoreConfig, FirestoreStore, MAX_DOCUMENT_LEN};

mod common;

fn collection(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("faults-{test}-{nanos}")
}

fn config(test: &str) -> FirestoreConfig {
    common::config(&collection(test))
}

#[tokio::test]
async fn keys_firestore_forbids_as_ids_round_trip_and_never_share_a_document() {
    let store = FirestoreStore::connect(&config("ids")).await.unwrap();
    let long = "k".repeat(10 * 1024);
    let keys = [
        "a/b",
        "/",
        ".",
        "..",
        "__reserved__",
        "__x__/..",
        "ü日本",
        long.as_str(),
        "a:b",
        "a%2Fb",
    ];
    for (i, key) in keys.iter().enumerate() {
        store
            .set(
                key,
                format!("{i}").into_bytes().into(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        let value = store.get(key).await.unwrap();
        assert_eq!(
            value.as_deref(),
            Some(format!("{i}").as_bytes()),
            "{key:.20}"
        );
    }
}

#[tokio::test]
async fn a_value_over_the_document_limit_fails_before_any_request() {
    let mut config = config("big");
    // Not even reachable: the size check must come first.
    config = config.request_timeout(Duration::from_millis(200));
    let store = FirestoreStore::connect(&config).await.unwrap();
    let err = store
        .set(
            "big",
            vec![0u8; MAX_DOCUMENT_LEN].into(),
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::ValueTooLarge { .. }), "{err:?}");
    assert_eq!(store.get("big").await.unwrap(), None, "nothing was written");
    let fits = vec![7u8; 900 * 1024];
    store
        .set("fits", fits.clone().into(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.get("fits").await.unwrap().as_deref(), Some(&fits[..]));
}

#[tokio::test]
async fn an_expired_document_that_firestore_has_not_deleted_is_a_miss() {
    let clock = ManualClock::new();
    let store = FirestoreStore::connect_with_clock(&config("late"), Arc::new(clock.clone()))
        .await
        .unwrap();
    store
        .set("k", "v".into(), Duration::from_secs(10))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(11));
    // The document is still in Firestore (no TTL policy deleted it), but every read treats it
    // as gone, and it no longer blocks a create.
    assert_eq!(store.get("k").await.unwrap(), None);
    assert!(!store.exists("k").await.unwrap());
    assert!(
        store
            .set_if_absent("k", "new".into(), Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"new"[..]));
}

/// A document planted under another key's id.
#[derive(serde::Serialize, serde::Deserialize)]
struct Forged {
    key: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    expires_at: std::time::SystemTime,
}

#[tokio::test]
async fn a_document_whose_stored_key_differs_is_a_miss() {
    let collection = collection("forged");
    let store = FirestoreStore::connect(&common::config(&collection))
        .await
        .unwrap();
    // A store with another prefix writes the same document id for a different key only if the
    // hashes collide; forge that by writing under the victim's id through a raw client.
    let victim_id = store.document_id("victim").unwrap();
    assert_eq!(
        victim_id,
        tierstack_firestore_test_support::document_id("victim"),
        "the documented id scheme: hex SHA-256 of the prefixed key"
    );
    let db = common::raw_client().await;
    let forged = Forged {
        key: "attacker".into(),
        value: b"planted".to_vec(),
        expires_at: std::time::SystemTime::now() + Duration::from_secs(3600),
    };
    db.fluent()
        .update()
        .in_col(&collection)
        .document_id(&victim_id)
        .object(&forged)
        .execute::<()>()
        .await
        .unwrap();
    assert_eq!(
        store.get("victim").await.unwrap(),
        None,
        "a document with another key is a miss"
    );
    assert!(
        store
            .set_if_absent("victim", "mine".into(), Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert_eq!(
        store.get("victim").await.unwrap().as_deref(),
        Some(&b"mine"[..])
    );
}

/// The document id scheme, mirrored here to pin down the documented layout.
mod tierstack_firestore_test_support {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;

    pub(super) fn document_id(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .fold(String::new(), |mut out, b| {
                let _ = write!(out, "{b:02x}");
                out
            })
    }
}
