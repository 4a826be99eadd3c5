//! Seed 000: a persistent map from a user to an expensive remote resource (a Gemini cached
//! content), on Firestore. Two service instances start at the same moment; the resource is
//! created once; a restarted instance finds it; an expired one is released by the sweep.
//!
//! Run against the emulator:
//!
//! ```text
//! cargo xtask services up firestore && source target/services.env
//! cargo run -p tierstack-firestore --example handle_map
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tierstack::handles::{HandleMap, Remote};
use tierstack_core::BoxError;
use tierstack_core::clock::ManualClock;
use tierstack_firestore::{FirestoreConfig, FirestoreStore};

/// Stands in for the Gemini API: creating a cached content takes time and costs money.
#[derive(Default)]
struct Gemini {
    live: Mutex<HashSet<String>>,
    created: AtomicU32,
}

#[async_trait]
impl Remote for Gemini {
    async fn create(&self, key: &str) -> Result<String, BoxError> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = self.created.fetch_add(1, Ordering::SeqCst) + 1;
        let name = format!("cachedContents/{key}-{n}");
        println!("  [gemini] created {name}");
        self.live
            .lock()
            .map_err(|_| "poisoned")?
            .insert(name.clone());
        Ok(name)
    }

    async fn exists(&self, handle: &str) -> Result<bool, BoxError> {
        Ok(self.live.lock().map_err(|_| "poisoned")?.contains(handle))
    }

    async fn delete(&self, handle: &str) -> Result<(), BoxError> {
        println!("  [gemini] deleted {handle}");
        self.live.lock().map_err(|_| "poisoned")?.remove(handle);
        Ok(())
    }
}

const TTL: Duration = Duration::from_secs(4 * 3600);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let project = std::env::var("FIRESTORE_PROJECT_ID").unwrap_or_else(|_| "tierstack-demo".into());
    if std::env::var("FIRESTORE_EMULATOR_HOST").is_err() {
        return Err("set FIRESTORE_EMULATOR_HOST (cargo xtask services up firestore), or run on Google Cloud with credentials".into());
    }
    let config = FirestoreConfig::new(&project)
        .collection("system_cache_manager_user_caches")
        .key_prefix(&format!("demo-{}:", std::process::id()));
    // A manual clock lets the demo jump past the 4-hour TTL.
    let clock = ManualClock::new();
    let gemini = Arc::new(Gemini::default());
    let instance = async || -> Result<HandleMap<Gemini>, tierstack_core::CacheError> {
        let store = FirestoreStore::connect_with_clock(&config, Arc::new(clock.clone())).await?;
        Ok(HandleMap::new(
            Arc::new(store),
            gemini.clone(),
            TTL,
            Duration::from_secs(30),
        ))
    };

    println!("1. two instances start at the same moment and both need account123_user456's cache");
    let (a, b) = (instance().await?, instance().await?);
    let (ha, hb) = tokio::join!(
        a.get_or_create("account123_user456"),
        b.get_or_create("account123_user456")
    );
    let handle = ha?;
    println!("   instance A: {handle}\n   instance B: {}", hb?);
    println!(
        "   resources created: {}",
        gemini.created.load(Ordering::SeqCst)
    );

    println!(
        "2. the server restarts: a request looks the mapping up in Firestore, creating nothing"
    );
    drop((a, b));
    let restarted = instance().await?;
    let found = restarted.get("account123_user456").await?;
    println!("   after restart: {}", found.as_deref().unwrap_or("(none)"));
    println!(
        "   resources created: {}",
        gemini.created.load(Ordering::SeqCst)
    );

    println!("3. four hours later the entry has expired; the sweep releases the remote resource");
    clock.advance(TTL + Duration::from_secs(1));
    let store = FirestoreStore::connect_with_clock(&config, Arc::new(clock.clone())).await?;
    let swept = store
        .sweep_expired_with(|entry| restarted.release(entry.value))
        .await?;
    println!(
        "   swept {swept} entry; orphaned resources left: {}",
        gemini.live.lock().map_err(|_| "poisoned")?.len()
    );
    Ok(())
}
