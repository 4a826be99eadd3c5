//! The Firestore scenarios, against the emulator: tierstack vs the raw firestore crate.

use std::hint::black_box;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use firestore::{FirestoreDb, FirestoreDbOptions};
use serde::{Deserialize, Serialize};
use tierstack::TieredCache;
use tierstack_core::{BincodeCodec, Codec, envelope};
use tierstack_firestore::{FirestoreConfig, FirestoreStore};

use crate::harness::{
    GetMany, Record, SequentialGets, Sizes, TieredGet, Workload, head_to_head, interleave, records,
    run_round, shuffled,
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

/// The fields of tierstack's own document that a reader needs (the baseline reads the very
/// documents tierstack wrote, as the scenario asks).
#[derive(Deserialize)]
struct SameDocument {
    #[serde(rename = "key")]
    _key: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    #[serde(rename = "expires_at")]
    _expires_at: SystemTime,
}

/// A minimal hand-written document (value and expiry only), to show what tierstack's layout
/// (the key check, creation and access times) costs on top.
#[derive(Serialize, Deserialize)]
struct MinimalDocument {
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    expires_at: SystemTime,
}

async fn connect_store(collection: &str) -> FirestoreStore {
    let config = FirestoreConfig::new(&project()).collection(collection);
    FirestoreStore::connect(&config)
        .await
        .unwrap_or_else(|e| fail(e))
}

fn l2_only_cache(store: FirestoreStore) -> TieredCache<String> {
    TieredCache::builder("bench")
        .without_l1()
        .l2(Arc::new(store))
        .default_ttl(TTL)
        // Throughput is measured here, not failure handling: never give up on a slow call.
        .l2_timeout(BENCH_L2_TIMEOUT)
        .build()
        .unwrap_or_else(|e| fail(e))
}

/// The raw firestore crate's get of document `ids[i]`, deserialized as `D`, then the decode.
struct RawGet<D> {
    db: FirestoreDb,
    collection: String,
    ids: Arc<Vec<String>>,
    /// Where the bincode payload starts in the stored bytes (after tierstack's envelope header).
    payload_offset: usize,
    document: PhantomData<fn() -> D>,
}

trait HasValue {
    fn value(&self) -> &[u8];
}

impl HasValue for SameDocument {
    fn value(&self) -> &[u8] {
        &self.value
    }
}

impl HasValue for MinimalDocument {
    fn value(&self) -> &[u8] {
        &self.value
    }
}

impl<D> Workload for RawGet<D>
where
    D: HasValue + for<'de> Deserialize<'de> + Send + 'static,
{
    async fn op(&self, i: usize) {
        let id = &self.ids[i];
        let document: Option<D> = self
            .db
            .fluent()
            .select()
            .by_id_in(&self.collection)
            .obj()
            .one(id)
            .await
            .unwrap_or_else(|e| panic!("raw Firestore get failed: {e}"));
        let Some(document) = document else {
            panic!("raw Firestore get: no document {id} in {}", self.collection);
        };
        // A baseline that skipped its decode would look faster than it is: fail loudly instead.
        let payload = document
            .value()
            .get(self.payload_offset..)
            .unwrap_or_else(|| panic!("raw Firestore get: document {id} is too short"));
        let value = BincodeCodec::default()
            .decode::<String>(payload)
            .unwrap_or_else(|e| panic!("raw Firestore get: document {id}: {e}"));
        black_box(value);
    }
}

/// `TieredCache::get` served by Firestore with L1 off vs the raw crate's get of the same
/// document, 1 KiB values, 8 tasks; a third system reads a minimal hand-written document.
pub(crate) async fn l2_hit_firestore(sizes: &Sizes) -> Vec<Record> {
    let run = std::process::id();
    let collection = format!("bench-l2-{run}");
    let minimal_collection = format!("bench-raw-{run}");
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("key-{i:06}")).collect());
    let store = connect_store(&collection).await;
    // The cache stores `key` under its namespace: `bench:key`.
    let same_ids: Arc<Vec<String>> = Arc::new(
        keys.iter()
            .map(|key| {
                store
                    .document_id(&format!("bench:{key}"))
                    .unwrap_or_else(|e| fail(e))
            })
            .collect(),
    );
    let cache = l2_only_cache(store);
    // FirestoreConfig's default client options (5 s per request, 2 retries), so that both sides
    // send alike requests.
    let options = FirestoreDbOptions::new(project())
        .with_request_timeout(Duration::from_secs(5))
        .with_max_retries(2);
    let db = FirestoreDb::with_options(options)
        .await
        .unwrap_or_else(|e| fail(e));
    let minimal_ids: Arc<Vec<String>> =
        Arc::new((0..KEYS).map(|i| format!("raw-{i:06}")).collect());
    for (i, key) in keys.iter().enumerate() {
        cache.set(key, value(i)).await.unwrap_or_else(|e| fail(e));
        let mut bytes = Vec::new();
        BincodeCodec::default()
            .encode_into(&value(i), &mut bytes)
            .unwrap_or_else(|e| fail(e));
        let document = MinimalDocument {
            value: bytes,
            expires_at: SystemTime::now() + TTL,
        };
        db.fluent()
            .update()
            .in_col(&minimal_collection)
            .document_id(&minimal_ids[i])
            .object(&document)
            .execute::<()>()
            .await
            .unwrap_or_else(|e| fail(e));
    }
    let tiered = Arc::new(TieredGet { cache, keys });
    let same = Arc::new(RawGet::<SameDocument> {
        db: db.clone(),
        collection,
        ids: same_ids,
        payload_offset: envelope::HEADER_LEN,
        document: PhantomData,
    });
    let minimal = Arc::new(RawGet::<MinimalDocument> {
        db,
        collection: minimal_collection,
        ids: minimal_ids,
        payload_offset: 0,
        document: PhantomData,
    });
    let order = shuffled(KEYS);
    let ops = (sizes.redis_ops / 40).max(100);
    let rounds = interleave(3, sizes.rounds, |system| {
        let (tiered, same, minimal, order) = (&tiered, &same, &minimal, &order);
        async move {
            match system {
                0 => run_round(tiered, order, 8, ops).await,
                1 => run_round(same, order, 8, ops).await,
                _ => run_round(minimal, order, 8, ops).await,
            }
        }
    })
    .await;
    records(
        "l2_hit_firestore/8task",
        &["tierstack", "firestore crate", "minimal document"],
        1,
        &rounds,
    )
}

/// `get_many` of 100 keys (one batch read) vs 100 sequential `get`s, L1 off, one task.
pub(crate) async fn get_many_firestore(sizes: &Sizes) -> Vec<Record> {
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("key-{i:06}")).collect());
    let cache = l2_only_cache(connect_store(&format!("bench-many-{}", std::process::id())).await);
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
        &rounds,
    )
}
