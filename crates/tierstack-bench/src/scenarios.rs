//! The scenarios of the foundation: L1 hits, L2 hits over `MokaStore`, and a stampede.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tierstack::TieredCache;
use tierstack_core::testkit::FaultyStore;
use tierstack_core::{BincodeCodec, Codec, Store};
use tierstack_moka::{L1Capacity, MokaStore};

use crate::harness::{
    Record, Round, Sizes, TieredGet, Workload, head_to_head, interleave, record_against, records,
    run_round, shuffled,
};

const TTL: Duration = Duration::from_hours(1);

pub(crate) fn keys(n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| format!("key-{i:06}")).collect())
}

pub(crate) fn value(i: usize) -> String {
    format!("value-{i:06}-{}", "x".repeat(24))
}

struct MokaGet {
    cache: moka::sync::Cache<String, String>,
    keys: Arc<Vec<String>>,
}

impl Workload for MokaGet {
    async fn op(&self, i: usize) {
        black_box(self.cache.get(&self.keys[i]));
    }
}

/// `moka::future::Cache` (an async service's natural pick of raw moka, and this scenario's
/// baseline before the L1 moved to `moka::sync`), for context.
struct MokaFutureGet {
    cache: moka::future::Cache<String, String>,
    keys: Arc<Vec<String>>,
}

impl Workload for MokaFutureGet {
    async fn op(&self, i: usize) {
        black_box(self.cache.get(&self.keys[i]).await);
    }
}

/// amalgam-cache's memory-only cache (its own L1, not moka), the peer the read-path issue
/// measured.
struct AmalgamGet {
    cache: amalgam::Cache<String>,
    keys: Arc<Vec<String>>,
}

impl Workload for AmalgamGet {
    async fn op(&self, i: usize) {
        black_box(self.cache.try_get(&self.keys[i]).await.ok().flatten());
    }
}

/// The values of a moka cache with a deadline each, expired by moka at that deadline: what the
/// L1 asks of moka, without the rest of the cache.
struct PerEntryDeadline;

impl moka::Expiry<String, (String, Instant)> for PerEntryDeadline {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &(String, Instant),
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.1.saturating_duration_since(created_at))
    }
}

struct MokaExpiryGet {
    cache: moka::sync::Cache<String, (String, Instant)>,
    keys: Arc<Vec<String>>,
}

impl Workload for MokaExpiryGet {
    async fn op(&self, i: usize) {
        black_box(self.cache.get(&self.keys[i]));
    }
}

/// `TieredCache::get` on an L1 hit vs raw `moka::sync::Cache::get` (the cache type of the L1)
/// of the same values, over `key_count` hot keys. A third system, moka with a deadline per
/// entry (as the L1 keeps), shows how much of the difference is moka's per-entry expiry; a
/// fourth, `moka::future::Cache`, what moka's async cache costs; a fifth, amalgam-cache, where
/// the peer the read-path issue measured stands (its own L1, each entry with its own duration).
pub(crate) async fn l1_hit(sizes: &Sizes, tasks: usize, key_count: usize) -> Vec<Record> {
    let keys = keys(key_count);
    let capacity = u64::try_from(key_count * 2).unwrap_or(u64::MAX);
    let tiered = TieredCache::builder("bench")
        .l1_capacity(L1Capacity::Entries(capacity))
        .default_ttl(TTL)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let raw = moka::sync::Cache::builder().max_capacity(capacity).build();
    let expiring = moka::sync::Cache::builder()
        .max_capacity(capacity)
        .expire_after(PerEntryDeadline)
        .build();
    let future = moka::future::Cache::builder()
        .max_capacity(capacity)
        .build();
    let amalgam: amalgam::Cache<String> = amalgam::Cache::builder()
        .max_capacity(capacity)
        .default_options(amalgam::options::EntryOptions::new(TTL))
        .try_build()
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + TTL;
    for (i, key) in keys.iter().enumerate() {
        tiered
            .set(key, value(i))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        raw.insert(key.clone(), value(i));
        expiring.insert(key.clone(), (value(i), deadline));
        future.insert(key.clone(), value(i)).await;
        amalgam
            .set(key, value(i))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // A miss would make the peer look cheaper: every key must hit.
    for key in keys.iter() {
        let hit = amalgam.try_get(key).await.ok().flatten();
        assert!(hit.is_some(), "amalgam-cache misses {key}");
    }
    let amalgam = Arc::new(AmalgamGet {
        cache: amalgam,
        keys: keys.clone(),
    });
    let tiered = Arc::new(TieredGet {
        cache: tiered,
        keys: keys.clone(),
    });
    let expiring = Arc::new(MokaExpiryGet {
        cache: expiring,
        keys: keys.clone(),
    });
    let future = Arc::new(MokaFutureGet {
        cache: future,
        keys: keys.clone(),
    });
    let raw = Arc::new(MokaGet { cache: raw, keys });
    let order = shuffled(key_count);
    let (tiered, raw, expiring, future, amalgam, order) =
        (&tiered, &raw, &expiring, &future, &amalgam, &order);
    let rounds = interleave(5, sizes.rounds, |system| async move {
        match system {
            0 => run_round(tiered, order, tasks, sizes.ops_per_task).await,
            1 => run_round(raw, order, tasks, sizes.ops_per_task).await,
            2 => run_round(expiring, order, tasks, sizes.ops_per_task).await,
            3 => run_round(future, order, tasks, sizes.ops_per_task).await,
            _ => run_round(amalgam, order, tasks, sizes.ops_per_task).await,
        }
    })
    .await;
    let scenario = if key_count == sizes.keys {
        format!("l1_hit_10k/{tasks}task")
    } else {
        format!("l1_hit/{tasks}task")
    };
    let names = [
        "tierstack",
        "moka",
        "moka+expiry",
        "moka::future",
        "amalgam-cache",
    ];
    let mut found = records(&scenario, &names, 1, &rounds);
    // And tierstack against moka::future, round by round.
    found.push(record_against(
        &scenario,
        (names[0], &rounds[0]),
        (names[3], &rounds[3]),
    ));
    // And tierstack against the peer, round by round.
    found.push(record_against(
        &scenario,
        (names[0], &rounds[0]),
        (names[4], &rounds[4]),
    ));
    found
}

struct RawStoreGet {
    store: Arc<MokaStore>,
    keys: Arc<Vec<String>>,
}

impl Workload for RawStoreGet {
    async fn op(&self, i: usize) {
        let bytes = self.store.get(&self.keys[i]).await.ok().flatten();
        if let Some(bytes) = bytes {
            black_box(BincodeCodec::default().decode::<String>(&bytes).ok());
        }
    }
}

/// A cold L1 over `MokaStore` as L2 vs raw `MokaStore` get + decode.
///
/// Both sides read the same `MokaStore` instance (tierstack's entries under `bench:`, the raw
/// side's plain encodings under `raw:`): two instances would each seed their hasher at random,
/// and their different table layouts moved the ratio between runs by more than the bar's margin.
pub(crate) async fn l2_hit_memory(sizes: &Sizes) -> Vec<Record> {
    let keys = keys(sizes.keys);
    let store = Arc::new(MokaStore::new(1 << 30));
    let tiered = TieredCache::builder("bench")
        .without_l1()
        .l2(store.clone())
        .default_ttl(TTL)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let raw_keys: Arc<Vec<String>> = Arc::new(keys.iter().map(|k| format!("raw:{k}")).collect());
    for (i, (key, raw_key)) in keys.iter().zip(raw_keys.iter()).enumerate() {
        tiered
            .set(key, value(i))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = Vec::new();
        BincodeCodec::default()
            .encode_into(&value(i), &mut bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .set(raw_key, bytes.into(), TTL)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let tiered = Arc::new(TieredGet {
        cache: tiered,
        keys,
    });
    let raw = Arc::new(RawStoreGet {
        store,
        keys: raw_keys,
    });
    let order = shuffled(sizes.keys);
    let ops = sizes.ops_per_task / 2;
    let rounds = head_to_head(&tiered, &raw, &order, sizes.rounds, 1, ops).await;
    records(
        "l2_hit_memory",
        &["tierstack", "mokastore+decode"],
        1,
        &rounds,
    )
}

const LOADER_DELAY: Duration = Duration::from_millis(20);

async fn slow_origin(calls: &AtomicU64) -> String {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(LOADER_DELAY).await;
    value(0)
}

/// `callers` concurrent read-through calls of one missing key, per system.
async fn stampede_round(system: usize, round: usize, callers: usize) -> Round {
    let calls = Arc::new(AtomicU64::new(0));
    let key = format!("hot-{round}");
    // Counts the calls that reach the L2 (it injects nothing).
    let l2 = Arc::new(FaultyStore::new(Arc::new(MokaStore::new(1 << 20))));
    let tiered: TieredCache<String> = TieredCache::builder("stampede")
        .l2(l2.clone())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let moka: moka::future::Cache<String, String> = moka::future::Cache::new(1_000);
    let started = Instant::now();
    let handles: Vec<_> = (0..callers)
        .map(|_| {
            let (calls, key, tiered, moka) =
                (calls.clone(), key.clone(), tiered.clone(), moka.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                match system {
                    0 => {
                        let loader = move || async move {
                            Ok::<_, std::io::Error>(slow_origin(&calls).await)
                        };
                        black_box(tiered.get_or_load(&key, loader).await.ok());
                    }
                    1 => {
                        black_box(
                            moka.get_with(key, async move { slow_origin(&calls).await })
                                .await,
                        );
                    }
                    _ => {
                        // The naive composition: look, load, insert; no coalescing.
                        if moka.get(&key).await.is_none() {
                            let loaded = slow_origin(&calls).await;
                            moka.insert(key, loaded).await;
                        }
                    }
                }
                crate::harness::nanos(t.elapsed())
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(callers);
    for handle in handles {
        samples.push(
            handle
                .await
                .unwrap_or_else(|e| panic!("a stampede caller failed: {e}")),
        );
    }
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let nanos_per_op = started.elapsed().as_nanos() as f64 / callers as f64;
    // The L2 calls of the tierstack side, its background fill included.
    tiered.wait_for_background_fills().await;
    Round {
        nanos_per_op,
        samples,
        loader_calls: Some(calls.load(Ordering::SeqCst)),
        l2_commands: (system == 0).then(|| l2.calls()),
        errors: None,
        recovery_ms: None,
    }
}

/// 1,000 concurrent `get_or_load` of one missing key with a 20 ms origin: loader calls, L2
/// calls and time.
pub(crate) async fn stampede(sizes: &Sizes) -> Vec<Record> {
    let mut round = 0;
    let rounds = interleave(3, sizes.rounds, |system| {
        round += 1;
        stampede_round(system, round, sizes.stampede_callers)
    })
    .await;
    records(
        "stampede",
        &["tierstack", "moka_get_with", "naive"],
        1,
        &rounds,
    )
}
