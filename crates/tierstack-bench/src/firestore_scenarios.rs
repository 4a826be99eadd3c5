//! The Firestore scenarios, against the emulator: tierstack vs the raw firestore crate.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use firestore::FirestoreDb;
use serde::{Deserialize, Serialize};
use tierstack::TieredCache;
use tierstack_core::{BincodeCodec, Codec};
use tierstack_firestore::{FirestoreConfig, FirestoreStore};

use crate::harness::{
    GetMany, Record, SequentialGets, Sizes, TieredGet, Workload, head_to_head, records, shuffled,
};

const TTL: Duration = Duration::from_hours(1);
const BENCH_L2_TIMEOUT: Duration = Duration::from_secs(60);
const KEYS: usize = 1_000;

fn fail(e: impl std::fmt::Display) -> ! {
    panic!("firestore benchmark setup failed: {e}")
}

fn project() -> String {
    std::env::var("FIRESTORE_EMULATOR_HOST")
        .unwrap_or_else(|_| fail("FIRESTORE_EMULATOR_HOST is not set: run `cargo xtask bench`, which starts the emulator"));
    std::env::var("FIRESTORE_PROJECT_ID")
        .unwrap_or_else(|_| fail("FIRESTORE_PROJECT_ID is not set"))
}

/// A 1 KiB value.
fn value(i: usize) -> String {
    format!("{i:06}-{}", "v".repeat(1017))
}

/// The raw baseline's document: the same bytes, in the shape a hand-written service would use.
#[derive(Serialize, Deserialize)]
struct RawDocument {
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    expires_at: SystemTime,
}

async fn l2_only_cache(collection: &str) -> TieredCache<String> {
    let config = FirestoreConfig::new(&project()).collection(collection);
    let store = FirestoreStore::connect(&config)
        .await
        .unwrap_or_else(|e| fail(e));
    TieredCache::builder("bench")
        .without_l1()
        .l2(Arc::new(store))
        .default_ttl(TTL)
        // Throughput is measured here, not failure handling: never give up on a slow call.
        .l2_timeout(BENCH_L2_TIMEOUT)
        .build()
        .unwrap_or_else(|e| fail(e))
}

struct RawGet {
    db: FirestoreDb,
    collection: String,
    ids: Arc<Vec<String>>,
}

impl Workload for RawGet {
    async fn op(&self, i: usize) {
        let id = &self.ids[i % self.ids.len()];
        let document: Option<RawDocument> = self
            .db
            .fluent()
            .select()
            .by_id_in(&self.collection)
            .obj()
            .one(id)
            .await
            .ok()
            .flatten();
        if let Some(document) = document {
            black_box(
                BincodeCodec::default()
                    .decode::<String>(&document.value)
                    .ok(),
            );
        }
    }
}

/// `TieredCache::get` served by Firestore with L1 off vs the raw crate's get of the same
/// document, 1 KiB values, 8 tasks.
pub(crate) async fn l2_hit_firestore(sizes: &Sizes) -> Vec<Record> {
    let run = std::process::id();
    let collection = format!("bench-l2-{run}");
    let raw_collection = format!("bench-raw-{run}");
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("key-{i:06}")).collect());
    let cache = l2_only_cache(&collection).await;
    let db = FirestoreDb::new(project())
        .await
        .unwrap_or_else(|e| fail(e));
    let ids: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("raw-{i:06}")).collect());
    for (i, key) in keys.iter().enumerate() {
        cache.set(key, value(i)).await.unwrap_or_else(|e| fail(e));
        let mut bytes = Vec::new();
        BincodeCodec::default()
            .encode_into(&value(i), &mut bytes)
            .unwrap_or_else(|e| fail(e));
        let document = RawDocument {
            value: bytes,
            expires_at: SystemTime::now() + TTL,
        };
        db.fluent()
            .update()
            .in_col(&raw_collection)
            .document_id(&ids[i])
            .object(&document)
            .execute::<()>()
            .await
            .unwrap_or_else(|e| fail(e));
    }
    let tiered = Arc::new(TieredGet { cache, keys });
    let raw = Arc::new(RawGet {
        db,
        collection: raw_collection,
        ids,
    });
    let order = shuffled(KEYS);
    let ops = (sizes.redis_ops / 40).max(100);
    let rounds = head_to_head(&tiered, &raw, &order, sizes.rounds, 8, ops).await;
    records(
        "l2_hit_firestore/8task",
        &["tierstack", "firestore crate"],
        1,
        ops * 8,
        &rounds,
    )
}

/// `get_many` of 100 keys (one batch read) vs 100 sequential `get`s, L1 off, one task.
pub(crate) async fn get_many_firestore(sizes: &Sizes) -> Vec<Record> {
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("key-{i:06}")).collect());
    let cache = l2_only_cache(&format!("bench-many-{}", std::process::id())).await;
    for (i, key) in keys.iter().enumerate() {
        cache.set(key, value(i)).await.unwrap_or_else(|e| fail(e));
    }
    let many = Arc::new(GetMany {
        cache: cache.clone(),
        keys: keys.clone(),
    });
    let sequential = Arc::new(SequentialGets { cache, keys });
    let order = shuffled(KEYS);
    let ops = if sizes.rounds > 5 { 20 } else { 5 };
    let rounds = head_to_head(&many, &sequential, &order, sizes.rounds, 1, ops).await;
    records(
        "get_many_firestore/100keys",
        &["get_many", "100 sequential gets"],
        1,
        ops,
        &rounds,
    )
}
