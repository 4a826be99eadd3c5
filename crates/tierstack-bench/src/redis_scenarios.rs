//! The Redis scenarios: tierstack over Redis vs raw redis-rs on the same connection type, and
//! vs the naive "moka, then Redis, then the origin" composition.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tierstack::{EntryOptions, LoadLease, TieredCache};
use tierstack_core::{BincodeCodec, Codec};
use tierstack_moka::L1Capacity;
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};

use crate::harness::{
    GetMany, Record, Round, SequentialGets, Sizes, TieredGet, Workload, batch_start, head_to_head,
    interleave, nanos, record_against, records, run_round, shuffled,
};

const TTL: Duration = Duration::from_hours(1);
const BENCH_L2_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn fail(e: impl std::fmt::Display) -> ! {
    panic!("redis benchmark setup failed: {e}")
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| {
        fail("REDIS_URL is not set: run `cargo xtask bench`, which starts Redis itself")
    })
}

/// The prefix of every key this run writes: unique per run, so that runs against a long-lived
/// server never find each other's keys (a warm L2 would turn misses into hits).
pub(crate) fn run_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("tierstack-bench-{}-{nanos}:", std::process::id())
    })
}

/// `RedisStore`'s configuration: its response timeout is the one the raw side's driver arms by
/// default (500 ms), so that each side runs one timer of the same length per request.
pub(crate) fn config(prefix: &str) -> RedisConfig {
    RedisConfig::from_url(&redis_url())
        .unwrap_or_else(|e| fail(e))
        .key_prefix(&format!("{}{prefix}", run_prefix()))
        .response_timeout(Duration::from_millis(500))
}

/// Deletes every key this run wrote.
pub(crate) async fn cleanup() {
    let config = RedisConfig::from_url(&redis_url()).unwrap_or_else(|e| fail(e));
    let store = RedisStore::connect(&config)
        .await
        .unwrap_or_else(|e| fail(e));
    tierstack_core::Store::delete_prefix(&store, run_prefix())
        .await
        .unwrap_or_else(|e| fail(e));
}

/// The baselines' connection: the same type as `RedisStore`'s (a `ConnectionManager`) with the
/// same socket options. redis-rs leaves `TCP_NODELAY` off by default, and `RedisStore` turns it
/// on; with Nagle's algorithm left on, the raw side's loopback writes coalesce into fewer
/// packets, and the ratio would measure that socket option, not the library's overhead.
pub(crate) async fn raw_connection() -> ConnectionManager {
    let info = redis::IntoConnectionInfo::into_connection_info(redis_url())
        .unwrap_or_else(|e| fail(e))
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let client = redis::Client::open(info).unwrap_or_else(|e| fail(e));
    client
        .get_connection_manager()
        .await
        .unwrap_or_else(|e| fail(e))
}

fn value(i: usize) -> String {
    format!("value-{i:06}-{}", "x".repeat(48))
}

fn encoded(i: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    BincodeCodec::default()
        .encode_into(&value(i), &mut bytes)
        .unwrap_or_else(|e| fail(e));
    bytes
}

fn keys(n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| format!("key-{i:06}")).collect())
}

async fn l2_only_cache(prefix: &str) -> TieredCache<String> {
    let store = RedisStore::connect(&config(prefix))
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
    conn: ConnectionManager,
    keys: Arc<Vec<String>>,
}

impl Workload for RawGet {
    async fn op(&self, i: usize) {
        let mut conn = self.conn.clone();
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.keys[i])
            .query_async(&mut conn)
            .await
            .ok()
            .flatten();
        if let Some(bytes) = bytes {
            black_box(BincodeCodec::default().decode::<String>(&bytes).ok());
        }
    }
}

/// `TieredCache::get` served by Redis with L1 off vs raw GET + decode, 64 tasks.
pub(crate) async fn l2_hit_redis(sizes: &Sizes) -> Vec<Record> {
    let tiered = l2_only_cache("bench-l2:").await;
    reads_against_raw_get("l2_hit_redis/64task", "raw:", tiered, sizes).await
}

/// `TieredCache::get` that misses L1 and hits Redis (an L1 of 1 ms TTL, so every read of the
/// shuffled key stream finds its L1 entry expired: a read of L2, then an L1 fill) vs raw GET +
/// decode, 64 tasks. For context, the same read hand-written (a moka miss, GET, decode, moka
/// insert) with two L1s: the one a team would pick (`moka::future`, one `time_to_live`), and
/// one configured as tierstack's (`moka::sync`, a deadline per entry).
pub(crate) async fn l2_hit_redis_cold_l1(sizes: &Sizes) -> Vec<Record> {
    let store = RedisStore::connect(&config("bench-cold:"))
        .await
        .unwrap_or_else(|e| fail(e));
    let tiered = TieredCache::builder("bench")
        .l2(Arc::new(store))
        .l1_ttl(COLD_L1_TTL)
        .default_ttl(TTL)
        .l2_timeout(BENCH_L2_TIMEOUT)
        .build()
        .unwrap_or_else(|e| fail(e));
    let (tiered, raw) = seeded("raw-cold:", tiered, sizes.keys).await;
    let capacity = u64::try_from(sizes.keys).unwrap_or(u64::MAX);
    let naive = |l1| {
        Arc::new(NaiveColdGet {
            l1,
            conn: raw.conn.clone(),
            keys: raw.keys.clone(),
            unexpected: AtomicU64::new(0),
        })
    };
    let with_ttl = naive(NaiveL1::TimeToLive(
        moka::future::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(COLD_L1_TTL)
            .build(),
    ));
    let per_entry = naive(NaiveL1::PerEntry(
        moka::sync::Cache::builder()
            .max_capacity(capacity)
            .expire_after(EveryEntry(COLD_L1_TTL))
            .build(),
    ));
    let order = shuffled(sizes.keys);
    let ops = sizes.redis_ops / 64;
    let (tiered, raw, with_ttl, per_entry, order) = (&tiered, &raw, &with_ttl, &per_entry, &order);
    let rounds = interleave(4, sizes.rounds, |system| async move {
        match system {
            0 => run_round(tiered, order, 64, ops).await,
            1 => run_round(raw, order, 64, ops).await,
            2 => run_round(with_ttl, order, 64, ops).await,
            _ => run_round(per_entry, order, 64, ops).await,
        }
    })
    .await;
    for naive in [with_ttl, per_entry] {
        // A hit, or a read that failed and skipped its insert, would make the side look cheaper.
        assert_eq!(
            naive.unexpected.load(Ordering::Relaxed),
            0,
            "l2_hit_redis_cold_l1: a naive read hit its L1 or failed"
        );
    }
    let scenario = "l2_hit_redis_cold_l1/64task";
    let names = [
        "tierstack",
        "redis-rs",
        "naive moka+redis",
        "naive, per-entry expiry",
    ];
    let mut found = records(scenario, &names, 1, &rounds);
    // And tierstack against each hand-written read, round by round.
    for k in [2, 3] {
        found.push(record_against(
            scenario,
            (names[0], &rounds[0]),
            (names[k], &rounds[k]),
        ));
    }
    found
}

/// How long the cold-L1 scenario's L1 entries live: shorter than a pass over the key stream.
const COLD_L1_TTL: Duration = Duration::from_millis(1);

/// A hand-written read's L1.
enum NaiveL1 {
    /// What a team would pick: the async cache, one time to live for every entry.
    TimeToLive(moka::future::Cache<String, String>),
    /// Configured as tierstack's L1 is: the sync cache, a deadline per entry.
    PerEntry(moka::sync::Cache<String, String>),
}

impl NaiveL1 {
    async fn get(&self, key: &str) -> Option<String> {
        match self {
            Self::TimeToLive(cache) => cache.get(key).await,
            Self::PerEntry(cache) => cache.get(key),
        }
    }

    async fn insert(&self, key: String, value: String) {
        match self {
            Self::TimeToLive(cache) => cache.insert(key, value).await,
            Self::PerEntry(cache) => cache.insert(key, value),
        }
    }
}

/// Every entry's deadline is the same time after its write, given to moka per entry.
struct EveryEntry(Duration);

impl moka::Expiry<String, String> for EveryEntry {
    fn expire_after_create(
        &self,
        _key: &String,
        _value: &String,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(self.0)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        _value: &String,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.0)
    }
}

/// The hand-written read of a key its L1 no longer holds: a moka miss, Redis GET and a decode,
/// then a moka insert. It counts reads that did not take that path.
struct NaiveColdGet {
    l1: NaiveL1,
    conn: ConnectionManager,
    keys: Arc<Vec<String>>,
    unexpected: AtomicU64,
}

impl Workload for NaiveColdGet {
    async fn op(&self, i: usize) {
        let key = &self.keys[i];
        if let Some(hit) = self.l1.get(key).await {
            black_box(hit);
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut conn = self.conn.clone();
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .ok()
            .flatten();
        match bytes.and_then(|b| BincodeCodec::default().decode::<String>(&b).ok()) {
            Some(value) => self.l1.insert(key.clone(), value).await,
            None => {
                self.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes the run's keys through `tiered` and, as plain encodings under `raw_prefix`, through a
/// raw connection; then reads them back on both sides, 64 tasks, in interleaved rounds.
async fn reads_against_raw_get(
    scenario: &str,
    raw_prefix: &str,
    tiered: TieredCache<String>,
    sizes: &Sizes,
) -> Vec<Record> {
    let (tiered, raw) = seeded(raw_prefix, tiered, sizes.keys).await;
    let order = shuffled(sizes.keys);
    let ops = sizes.redis_ops / 64;
    let rounds = head_to_head(&tiered, &raw, &order, sizes.rounds, 64, ops).await;
    records(scenario, &["tierstack", "redis-rs"], 1, &rounds)
}

/// Writes `n` keys through `tiered` and, as plain encodings under `raw_prefix`, through a raw
/// connection: the two sides of a read scenario, each reading its own copy.
async fn seeded(
    raw_prefix: &str,
    tiered: TieredCache<String>,
    n: usize,
) -> (Arc<TieredGet>, Arc<RawGet>) {
    let keys = keys(n);
    let raw_keys: Arc<Vec<String>> = Arc::new(
        keys.iter()
            .map(|k| format!("{}{raw_prefix}{k}", run_prefix()))
            .collect(),
    );
    let mut raw = raw_connection().await;
    for (i, (key, raw_key)) in keys.iter().zip(raw_keys.iter()).enumerate() {
        tiered.set(key, value(i)).await.unwrap_or_else(|e| fail(e));
        let _: () = redis::cmd("SET")
            .arg(raw_key)
            .arg(encoded(i))
            .query_async(&mut raw)
            .await
            .unwrap_or_else(|e| fail(e));
    }
    let tiered = Arc::new(TieredGet {
        cache: tiered,
        keys,
    });
    let raw = Arc::new(RawGet {
        conn: raw,
        keys: raw_keys,
    });
    (tiered, raw)
}

/// `get_many` of 100 keys vs 100 sequential `get`s, L1 off, one task.
pub(crate) async fn get_many_redis(sizes: &Sizes) -> Vec<Record> {
    let keys = keys(sizes.keys);
    let cache = l2_only_cache("bench-many:").await;
    for (i, key) in keys.iter().enumerate() {
        cache.set(key, value(i)).await.unwrap_or_else(|e| fail(e));
    }
    let many = Arc::new(GetMany {
        cache: cache.clone(),
        keys: keys.clone(),
    });
    let sequential = Arc::new(SequentialGets { cache, keys });
    let order = shuffled(sizes.keys);
    let ops = (sizes.redis_ops / 1000).max(20);
    let rounds = head_to_head(&many, &sequential, &order, sizes.rounds, 1, ops).await;
    records(
        "get_many_redis/100keys",
        &["get_many", "100 sequential gets"],
        1,
        &rounds,
    )
}

struct TieredSet {
    cache: TieredCache<String>,
    keys: Arc<Vec<String>>,
}

impl Workload for TieredSet {
    async fn op(&self, i: usize) {
        black_box(self.cache.set(&self.keys[i], value(i)).await.ok());
    }
}

struct RawSet {
    conn: ConnectionManager,
    keys: Arc<Vec<String>>,
}

impl Workload for RawSet {
    async fn op(&self, i: usize) {
        let mut conn = self.conn.clone();
        let mut bytes = Vec::new();
        let _ = BincodeCodec::default().encode_into(&value(i), &mut bytes);
        let result: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&self.keys[i])
            .arg(bytes)
            .arg("PX")
            .arg(3_600_000)
            .query_async(&mut conn)
            .await;
        black_box(result.ok());
    }
}

/// A cache writing through to Redis under `prefix`, with L1 and a paired backplane (each
/// write publishes its invalidation in its own round trip).
async fn write_through_cache(prefix: &str) -> TieredCache<String> {
    let (store, backplane) = RedisStore::connect_with_backplane(&config(prefix))
        .await
        .unwrap_or_else(|e| fail(e));
    TieredCache::builder("bench")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .l1_capacity(L1Capacity::Entries(100_000))
        .default_ttl(TTL)
        // Throughput is measured here, not failure handling: never give up on a slow call.
        .l2_timeout(BENCH_L2_TIMEOUT)
        .build()
        .unwrap_or_else(|e| fail(e))
}

/// `set` (write-through, with the invalidation publish) vs raw SET, one task.
pub(crate) async fn write_through_redis(sizes: &Sizes) -> Vec<Record> {
    let keys = keys(sizes.keys);
    let cache = write_through_cache("bench-write:").await;
    let raw_keys = Arc::new(
        keys.iter()
            .map(|k| format!("{}raw-write:{k}", run_prefix()))
            .collect(),
    );
    let tiered = Arc::new(TieredSet { cache, keys });
    let raw = Arc::new(RawSet {
        conn: raw_connection().await,
        keys: raw_keys,
    });
    let order = shuffled(sizes.keys);
    let ops = sizes.redis_ops / 20;
    let rounds = head_to_head(&tiered, &raw, &order, sizes.rounds, 1, ops).await;
    records(
        "write_through_redis/1task",
        &["tierstack set+publish", "redis-rs SET"],
        1,
        &rounds,
    )
}

/// `set_many` of 100 entries: one call, its writes at once.
struct SetMany {
    cache: TieredCache<String>,
    keys: Arc<Vec<String>>,
}

impl Workload for SetMany {
    async fn op(&self, i: usize) {
        let start = batch_start(i, self.keys.len());
        let batch = (start..start + 100).map(|j| (self.keys[j].as_str(), value(j)));
        black_box(self.cache.set_many(batch).await.ok());
    }
}

/// The same 100 entries as [`SetMany`], one `set` after the other.
struct SequentialSets {
    cache: TieredCache<String>,
    keys: Arc<Vec<String>>,
}

impl Workload for SequentialSets {
    async fn op(&self, i: usize) {
        let start = batch_start(i, self.keys.len());
        for j in start..start + 100 {
            black_box(self.cache.set(&self.keys[j], value(j)).await.ok());
        }
    }
}

/// `set_many` of 100 entries vs 100 sequential `set`s, with L1 and a paired backplane (each
/// write publishes its invalidation), one task.
pub(crate) async fn set_many_redis(sizes: &Sizes) -> Vec<Record> {
    let keys = keys(sizes.keys);
    let cache = write_through_cache("bench-set-many:").await;
    let many = Arc::new(SetMany {
        cache: cache.clone(),
        keys: keys.clone(),
    });
    let sequential = Arc::new(SequentialSets { cache, keys });
    let order = shuffled(sizes.keys);
    let ops = (sizes.redis_ops / 1000).max(20);
    let rounds = head_to_head(&many, &sequential, &order, sizes.rounds, 1, ops).await;
    records(
        "set_many_redis/100keys",
        &["set_many", "100 sequential sets"],
        1,
        &rounds,
    )
}

/// From `set` returning on instance A until instance B's L1 stops serving the old value.
pub(crate) async fn invalidation_lag(sizes: &Sizes) -> Vec<Record> {
    let config = config("bench-lag:");
    let instance = async || {
        let (store, backplane) = RedisStore::connect_with_backplane(&config)
            .await
            .unwrap_or_else(|e| fail(e));
        TieredCache::<String>::builder("lag")
            .l2(Arc::new(store))
            .backplane(Arc::new(backplane))
            .default_ttl(TTL)
            .l2_timeout(BENCH_L2_TIMEOUT)
            .build()
            .unwrap_or_else(|e| fail(e))
    };
    let (a, b) = (instance().await, instance().await);
    let mut lags = Vec::new();
    let samples = (sizes.redis_ops / 100).clamp(100, 2_000);
    for i in 0..samples {
        let old = format!("old-{i}");
        a.set("hot", old.clone()).await.unwrap_or_else(|e| fail(e));
        // B holds the old value in L1.
        while b.get("hot").await.ok().flatten().as_deref() != Some(old.as_str()) {
            tokio::task::yield_now().await;
        }
        a.set("hot", format!("new-{i}"))
            .await
            .unwrap_or_else(|e| fail(e));
        let written = Instant::now();
        let deadline = written + Duration::from_secs(1);
        while b.get("hot").await.ok().flatten().as_deref() == Some(old.as_str()) {
            if Instant::now() > deadline {
                fail("instance B kept the old value for over a second");
            }
            tokio::task::yield_now().await;
        }
        lags.push(nanos(written.elapsed()));
    }
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let mean = lags.iter().sum::<u64>() as f64 / lags.len() as f64;
    let round = Round {
        nanos_per_op: mean,
        samples: lags,
        loader_calls: None,
        l2_commands: None,
        errors: None,
        recovery_ms: None,
    };
    records("invalidation_lag", &["tierstack"], 0, &[vec![round]])
}

/// A Zipf(s) sampler over `0..n` by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 1..=n {
            #[expect(clippy::cast_precision_loss, reason = "ranks are far below 2^52")]
            let weight = 1.0 / (rank as f64).powf(s);
            total += weight;
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self { cdf }
    }

    /// The rank for a uniform `u` in `0..1`.
    fn sample(&self, u: f64) -> usize {
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// A deterministic Zipf(0.9) stream of key indexes.
fn zipf_stream(keys: usize, len: usize) -> Arc<Vec<usize>> {
    let zipf = Zipf::new(keys, 0.9);
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    Arc::new(
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                #[expect(clippy::cast_precision_loss, reason = "a uniform sample")]
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                zipf.sample(u)
            })
            .collect(),
    )
}

const ORIGIN_DELAY: Duration = Duration::from_millis(2);

struct OurStack {
    cache: TieredCache<String>,
    origin_calls: Arc<AtomicU64>,
}

impl Workload for OurStack {
    async fn op(&self, i: usize) {
        let calls = self.origin_calls.clone();
        let loaded = self
            .cache
            .get_or_load(&format!("k{i}"), move || async move {
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(ORIGIN_DELAY).await;
                Ok::<_, std::io::Error>(value(i))
            })
            .await;
        black_box(loaded.ok());
    }
}

/// The naive composition teams hand-write: moka get, Redis GET, the origin, then SET + insert;
/// no single-flight, no envelope, no backplane.
struct Naive {
    l1: moka::future::Cache<String, String>,
    conn: ConnectionManager,
    prefix: String,
    origin_calls: Arc<AtomicU64>,
}

impl Workload for Naive {
    async fn op(&self, i: usize) {
        self.load_slowly(i, ORIGIN_DELAY).await;
    }
}

impl Naive {
    async fn load_slowly(&self, i: usize, origin_delay: Duration) {
        let key = format!("k{i}");
        if let Some(hit) = self.l1.get(&key).await {
            black_box(hit);
            return;
        }
        let mut conn = self.conn.clone();
        let redis_key = format!("{}{key}", self.prefix);
        let cached: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await
            .ok()
            .flatten();
        if let Some(value) = cached.and_then(|b| BincodeCodec::default().decode::<String>(&b).ok())
        {
            self.l1.insert(key, value).await;
            return;
        }
        self.origin_calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(origin_delay).await;
        let loaded = value(i);
        let mut bytes = Vec::new();
        let _ = BincodeCodec::default().encode_into(&loaded, &mut bytes);
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&redis_key)
            .arg(bytes)
            .arg("PX")
            .arg(3_600_000)
            .query_async(&mut conn)
            .await;
        self.l1.insert(key, loaded).await;
    }
}

/// Our stack vs the naive composition on one Zipf(0.9) stream, 2 ms origin, 64 tasks, each
/// round starting cold (fresh L1, fresh Redis prefix); L1 holds a tenth of the keys.
pub(crate) async fn mixed_zipf(sizes: &Sizes) -> Vec<Record> {
    zipf_against_naive("mixed_zipf/64task", sizes.zipf_keys, sizes).await
}

/// As [`mixed_zipf`] on 100,000 keys with an L1 of 10,000, whatever the run's size: an L1
/// that churns, where a write or invalidation that discards the wrong fill costs origin calls.
pub(crate) async fn mixed_zipf_churn(sizes: &Sizes) -> Vec<Record> {
    zipf_against_naive("mixed_zipf_churn/64task", 100_000, sizes).await
}

async fn zipf_against_naive(scenario: &str, key_count: usize, sizes: &Sizes) -> Vec<Record> {
    let stream = zipf_stream(key_count, sizes.redis_ops);
    let ops = sizes.redis_ops / 64;
    let l1_entries = u64::try_from(key_count / 10).unwrap_or(u64::MAX);
    let mut round = 0;
    let rounds = interleave(2, sizes.rounds, |system| {
        round += 1;
        let stream = stream.clone();
        async move {
            let origin_calls = Arc::new(AtomicU64::new(0));
            let tag = scenario.split('/').next().unwrap_or(scenario);
            let prefix = format!("bench-{tag}-{round}-{system}:");
            let mut result = if system == 0 {
                let (store, backplane) = RedisStore::connect_with_backplane(&config(&prefix))
                    .await
                    .unwrap_or_else(|e| fail(e));
                let cache = TieredCache::builder("z")
                    .l2(Arc::new(store))
                    .backplane(Arc::new(backplane))
                    .l1_capacity(L1Capacity::Entries(l1_entries))
                    .default_ttl(TTL)
                    .l2_timeout(BENCH_L2_TIMEOUT)
                    .build()
                    .unwrap_or_else(|e| fail(e));
                let stack = Arc::new(OurStack {
                    cache,
                    origin_calls: origin_calls.clone(),
                });
                run_round(&stack, &stream, 64, ops).await
            } else {
                let naive = Arc::new(Naive {
                    l1: moka::future::Cache::new(l1_entries),
                    conn: raw_connection().await,
                    prefix: format!("{}{prefix}z:", run_prefix()),
                    origin_calls: origin_calls.clone(),
                });
                run_round(&naive, &stream, 64, ops).await
            };
            result.loader_calls = Some(origin_calls.load(Ordering::Relaxed));
            result
        }
    })
    .await;
    records(scenario, &["tierstack", "naive moka+redis"], 1, &rounds)
}

/// Commands the server has processed so far (`INFO stats`), this query excluded.
async fn commands_processed(conn: &mut ConnectionManager) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap_or_else(|e| fail(e));
    info.lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| fail("no total_commands_processed in INFO stats"))
}

const STAMPEDE_ORIGIN: Duration = Duration::from_millis(20);

/// `callers` concurrent read-through calls of one missing key over Redis, per system: the
/// loader calls and the commands the server received.
async fn stampede_redis_round(system: usize, round: usize, callers: usize) -> Round {
    let prefix = format!("bench-stampede-{round}-{system}:");
    let origin_calls = Arc::new(AtomicU64::new(0));
    let mut counter = raw_connection().await;
    let tiered = {
        let store = RedisStore::connect(&config(&prefix))
            .await
            .unwrap_or_else(|e| fail(e));
        TieredCache::<String>::builder("s")
            .l2(Arc::new(store))
            .default_ttl(TTL)
            .l2_timeout(BENCH_L2_TIMEOUT)
            .build()
            .unwrap_or_else(|e| fail(e))
    };
    let naive = Arc::new(Naive {
        l1: moka::future::Cache::new(1_000),
        conn: raw_connection().await,
        prefix: format!("{}{prefix}s:", run_prefix()),
        origin_calls: origin_calls.clone(),
    });
    let before = commands_processed(&mut counter).await;
    let started = Instant::now();
    let handles: Vec<_> = (0..callers)
        .map(|_| {
            let (tiered, naive, calls) = (tiered.clone(), naive.clone(), origin_calls.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                if system == 0 {
                    let loader = move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(STAMPEDE_ORIGIN).await;
                        Ok::<_, std::io::Error>(value(0))
                    };
                    black_box(tiered.get_or_load("hot", loader).await.ok());
                } else {
                    naive.load_slowly(0, STAMPEDE_ORIGIN).await;
                }
                nanos(t.elapsed())
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(callers);
    for handle in handles {
        samples.push(handle.await.unwrap_or_else(|e| fail(e)));
    }
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let nanos_per_op = started.elapsed().as_nanos() as f64 / callers as f64;
    tiered.wait_for_background_fills().await;
    // The second INFO counts the first.
    let commands = commands_processed(&mut counter).await - before - 1;
    Round {
        nanos_per_op,
        samples,
        loader_calls: Some(origin_calls.load(Ordering::SeqCst)),
        l2_commands: Some(commands),
        errors: None,
        recovery_ms: None,
    }
}

/// 1,000 concurrent `get_or_load` of one missing key over Redis with a 20 ms origin, against
/// the naive composition: loader calls and Redis commands per stampede.
pub(crate) async fn stampede_redis(sizes: &Sizes) -> Vec<Record> {
    let mut round = 0;
    let rounds = interleave(2, sizes.rounds, |system| {
        round += 1;
        stampede_redis_round(system, round, sizes.stampede_callers)
    })
    .await;
    records(
        "stampede_redis",
        &["tierstack", "naive moka+redis"],
        1,
        &rounds,
    )
}

const INSTANCES: usize = 4;

/// `callers` concurrent read-through calls of one missing key on each of four instances (each
/// with its own connections and backplane) over one Redis, with the load lease (system 0) or
/// without (system 1): the loader calls of the whole stampede.
async fn stampede_distributed_round(system: usize, round: usize, callers: usize) -> Round {
    let prefix = format!("bench-stampede-distributed-{round}-{system}:");
    let origin_calls = Arc::new(AtomicU64::new(0));
    let mut caches = Vec::with_capacity(INSTANCES);
    for _ in 0..INSTANCES {
        let store = RedisStore::connect(&config(&prefix))
            .await
            .unwrap_or_else(|e| fail(e));
        let backplane = RedisBackplane::connect(&config(&prefix))
            .await
            .unwrap_or_else(|e| fail(e));
        let cache = TieredCache::<String>::builder("s")
            .l2(Arc::new(store))
            .backplane(Arc::new(backplane))
            .default_ttl(TTL)
            .l2_timeout(BENCH_L2_TIMEOUT)
            .build()
            .unwrap_or_else(|e| fail(e));
        caches.push(cache);
    }
    let options = match system {
        0 => EntryOptions::default()
            .with_ttl(TTL)
            .with_load_lease(LoadLease::new(Duration::from_secs(5))),
        _ => EntryOptions::default().with_ttl(TTL),
    };
    let started = Instant::now();
    let handles: Vec<_> = caches
        .iter()
        .flat_map(|cache| std::iter::repeat_n(cache, callers))
        .map(|cache| {
            let (cache, calls) = (cache.clone(), origin_calls.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let loader = move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(STAMPEDE_ORIGIN).await;
                    Ok::<_, std::io::Error>(value(0))
                };
                black_box(cache.get_or_load_with("hot", &options, loader).await.ok());
                nanos(t.elapsed())
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(handles.len());
    for handle in handles {
        samples.push(handle.await.unwrap_or_else(|e| fail(e)));
    }
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    let nanos_per_op = started.elapsed().as_nanos() as f64 / samples.len() as f64;
    Round {
        nanos_per_op,
        samples,
        loader_calls: Some(origin_calls.load(Ordering::SeqCst)),
        l2_commands: None,
        errors: None,
        recovery_ms: None,
    }
}

/// 4 instances x 1,000 concurrent `get_or_load_with` of one missing key over one Redis with a
/// 20 ms origin: loader calls with the load lease against the same caches without it.
pub(crate) async fn stampede_distributed(sizes: &Sizes) -> Vec<Record> {
    let mut round = 0;
    let rounds = interleave(2, sizes.rounds, |system| {
        round += 1;
        stampede_distributed_round(system, round, sizes.stampede_callers)
    })
    .await;
    records(
        "stampede_distributed",
        &["tierstack lease", "tierstack without lease"],
        1,
        &rounds,
    )
}
