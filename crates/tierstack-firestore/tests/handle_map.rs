//! Seed 000 on Firestore: a persistent map from a user key to an expensive remote resource,
//! created at most once when instances start together, surviving restarts, looked up without
//! creating, validated against the remote, and cleaned up through the sweep when it expires.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tierstack::handles::{HandleMap, Remote};
use tierstack_core::BoxError;
use tierstack_core::clock::ManualClock;
use tierstack_firestore::{FirestoreConfig, FirestoreStore};

/// A stand-in for the Gemini API: creating a cached content is slow and costs money.
#[derive(Default)]
struct SimulatedGemini {
    live: Mutex<HashSet<String>>,
    created: AtomicU32,
}

#[async_trait]
impl Remote for SimulatedGemini {
    async fn create(&self, key: &str) -> Result<String, BoxError> {
        // real time: a slow remote, so that instances overlap; one resource in any order.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = self.created.fetch_add(1, Ordering::SeqCst) + 1;
        let handle = format!("cachedContents/{key}-{n}");
        self.live.lock().unwrap().insert(handle.clone());
        Ok(handle)
    }

    async fn exists(&self, handle: &str) -> Result<bool, BoxError> {
        Ok(self.live.lock().unwrap().contains(handle))
    }

    async fn delete(&self, handle: &str) -> Result<(), BoxError> {
        self.live.lock().unwrap().remove(handle);
        Ok(())
    }
}

mod common;

fn config(collection: &str) -> FirestoreConfig {
    common::config(collection).key_prefix("user_caches:")
}

const TTL: Duration = Duration::from_secs(4 * 3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_are_created_once_survive_restarts_and_are_cleaned_up() {
    let collection = format!("handles-{}", std::process::id());
    let clock = ManualClock::new();
    let gemini = Arc::new(SimulatedGemini::default());
    let instance = async || {
        let store =
            FirestoreStore::connect_with_clock(&config(&collection), Arc::new(clock.clone()))
                .await
                .unwrap();
        HandleMap::new(
            Arc::new(store),
            gemini.clone(),
            TTL,
            Duration::from_secs(10),
        )
    };

    // Two server instances start at the same moment and both need the user's cache.
    let (a, b) = (instance().await, instance().await);
    let (ha, hb) = tokio::join!(
        a.get_or_create("account123_user456"),
        b.get_or_create("account123_user456")
    );
    let handle = ha.unwrap();
    assert_eq!(hb.unwrap(), handle);
    assert_eq!(
        gemini.created.load(Ordering::SeqCst),
        1,
        "created at most once"
    );

    // A restart: a new store and map find the mapping; nothing is created again.
    drop((a, b));
    let restarted = instance().await;
    assert_eq!(
        restarted.get_or_create("account123_user456").await.unwrap(),
        handle
    );
    assert_eq!(gemini.created.load(Ordering::SeqCst), 1);

    // A lookup on the request path finds it, creating nothing.
    assert_eq!(
        restarted.get("account123_user456").await.unwrap(),
        Some(handle.clone())
    );

    // Validated against the remote: a resource deleted there is no longer looked up, and is
    // recreated.
    gemini.delete(&handle).await.unwrap();
    assert_eq!(restarted.get("account123_user456").await.unwrap(), None);
    assert_eq!(gemini.created.load(Ordering::SeqCst), 1);
    let replacement = restarted.get_or_create("account123_user456").await.unwrap();
    assert_ne!(replacement, handle);
    assert_eq!(gemini.created.load(Ordering::SeqCst), 2);

    // Expiry: the sweep hands the expired entry to the remote before deleting it.
    clock.advance(TTL + Duration::from_secs(1));
    let store = FirestoreStore::connect_with_clock(&config(&collection), Arc::new(clock.clone()))
        .await
        .unwrap();
    let swept = store
        .sweep_expired_with(|entry| restarted.release(entry.value))
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert!(
        !gemini.exists(&replacement).await.unwrap(),
        "the remote resource was deleted"
    );
    assert!(
        gemini.live.lock().unwrap().is_empty(),
        "no orphaned resources"
    );
}
