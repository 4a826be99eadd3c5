//! The read-through cache at work over a slow origin. Two service instances share an L2 and a
//! backplane. On the embedded default the L2 is a `MokaStore` standing in for a shared server
//! (no server needed); with `REDIS_URL` set it is Redis, with pub/sub invalidations.
//!
//! Run: `cargo run --release -p tierstack --example read_through`
//! or:  `REDIS_URL=redis://127.0.0.1:6379/ cargo run --release -p tierstack --example read_through`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tierstack::core::testkit::MemoryBus;
use tierstack::core::{Backplane, Store};
use tierstack::moka::MokaStore;
use tierstack::{CacheStats, TieredCache};
use tierstack_redis::{RedisConfig, RedisStore};

/// How many distinct keys the demo reads.
const KEYS: usize = 100;

/// A slow origin (a database, a remote API): 25 ms a call, counted.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicU64>,
}

impl Origin {
    async fn fetch(&self, key: String) -> Result<String, std::io::Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(25)).await;
        Ok(format!("profile of {key}"))
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Latencies of one phase, for percentiles.
struct Timings(Vec<Duration>);

impl Timings {
    fn percentile(&mut self, p: f64) -> Duration {
        self.0.sort_unstable();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into the samples"
        )]
        let index = ((self.0.len().saturating_sub(1)) as f64 * p).round() as usize;
        self.0.get(index).copied().unwrap_or_default()
    }

    fn report(&mut self, label: &str) {
        println!(
            "  {label:<28} p50 {:>10.1?}   p99 {:>10.1?}   ({} calls)",
            self.percentile(0.50),
            self.percentile(0.99),
            self.0.len()
        );
    }
}

/// Where the instances share their L2 and invalidations.
enum Shared {
    Embedded { l2: Arc<MokaStore>, bus: MemoryBus },
    Redis(RedisConfig),
}

impl Shared {
    async fn from_env() -> Result<Self, tierstack::CacheError> {
        let Ok(url) = std::env::var("REDIS_URL") else {
            return Ok(Self::Embedded {
                l2: Arc::new(MokaStore::new(64 << 20)),
                bus: MemoryBus::new(),
            });
        };
        let config = RedisConfig::from_url(&url)?.key_prefix("tierstack-demo:");
        // Start cold: remove what an earlier run left.
        RedisStore::connect(&config)
            .await?
            .delete_prefix("profiles:")
            .await?;
        Ok(Self::Redis(config))
    }

    fn describe(&self) -> String {
        match self {
            Self::Embedded { .. } => "L1 moka + shared L2 MokaStore (embedded, no server)".into(),
            Self::Redis(config) => format!(
                "L1 moka + L2 Redis at {} with pub/sub invalidations",
                config.endpoint()
            ),
        }
    }

    /// One service instance: its own L1, connections and subscription.
    async fn instance(&self) -> Result<TieredCache<String>, tierstack::CacheError> {
        let (l2, backplane): (Arc<dyn Store>, Arc<dyn Backplane>) = match self {
            Self::Embedded { l2, bus } => (l2.clone(), Arc::new(bus.backplane())),
            // Paired: each write and its invalidation in one round trip (what
            // `StoreConfig::connect` answers for CACHE_BACKEND=redis).
            Self::Redis(config) => {
                let (store, backplane) = RedisStore::connect_with_backplane(config).await?;
                (Arc::new(store), Arc::new(backplane))
            }
        };
        TieredCache::builder("profiles")
            .l2(l2)
            .backplane(backplane)
            .default_ttl(Duration::from_secs(600))
            .l1_ttl(Duration::from_secs(60))
            .build()
    }
}

async fn read(
    cache: &TieredCache<String>,
    origin: &Origin,
    key: String,
) -> Result<Duration, tierstack::LoadError<std::io::Error>> {
    let origin = origin.clone();
    let started = Instant::now();
    let loader_key = key.clone();
    cache
        .get_or_load(&key, move || async move { origin.fetch(loader_key).await })
        .await?;
    Ok(started.elapsed())
}

fn print_stats(name: &str, stats: &CacheStats) {
    println!(
        "  {name}: {} reads  L1 hit ratio {:>5.1}%  L2 hit ratio {:>5.1}%  misses {}  loader calls {}  invalidations received {}",
        stats.reads(),
        stats.l1_hit_ratio() * 100.0,
        stats.l2_hit_ratio() * 100.0,
        stats.misses,
        stats.loads,
        stats.invalidations_received,
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shared = Shared::from_env().await?;
    let a = shared.instance().await?;
    let b = shared.instance().await?;
    let origin = Origin::default();

    println!(
        "tierstack read-through demo: {}, origin 25 ms per call\n",
        shared.describe()
    );

    // 1. A concurrent burst on a cold cache: 1,000 callers over 100 keys, 10 per key.
    let started = Instant::now();
    let tasks: Vec<_> = (0..1_000)
        .map(|i| {
            let (a, origin) = (a.clone(), origin.clone());
            tokio::spawn(async move { read(&a, &origin, format!("user:{}", i % KEYS)).await })
        })
        .collect();
    let mut cold = Timings(Vec::new());
    for task in tasks {
        cold.0.push(task.await??);
    }
    println!(
        "1. cold burst: 1,000 concurrent reads of {KEYS} keys took {:.1?}; origin calls: {} (one per key)",
        started.elapsed(),
        origin.calls()
    );

    // 2. Steady reads on the warm instance: served by L1.
    let mut warm = Timings(Vec::new());
    for i in 0..20_000 {
        warm.0
            .push(read(&a, &origin, format!("user:{}", (i * 7) % KEYS)).await?);
    }
    // 3. A second instance with a cold L1: served by the shared L2, not the origin.
    let mut from_l2 = Timings(Vec::new());
    for i in 0..KEYS {
        from_l2
            .0
            .push(read(&b, &origin, format!("user:{i}")).await?);
    }
    println!(
        "2-3. after 20,000 warm reads on A and {KEYS} first reads on B, origin calls: {}",
        origin.calls()
    );

    // 4. A writes; B's L1 copy is invalidated through the backplane and B reads the new value.
    a.set("user:7", "profile of user:7 (edited)".to_string())
        .await?;
    let mut fresh = false;
    let edited_at = Instant::now();
    for _ in 0..1_000 {
        if b.get("user:7").await?.as_deref() == Some("profile of user:7 (edited)") {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let lag = edited_at.elapsed();
    println!("4. A edited user:7; B serves the new value: {fresh} (after {lag:.1?})");

    println!("\nlatency per tier:");
    cold.report("loader (cold, coalesced)");
    from_l2.report("L2 hit (instance B)");
    warm.report("L1 hit (instance A)");
    println!("\nper-instance counters:");
    print_stats("A", &a.stats());
    print_stats("B", &b.stats());
    if !fresh {
        return Err("instance B kept serving a stale value".into());
    }
    Ok(())
}
