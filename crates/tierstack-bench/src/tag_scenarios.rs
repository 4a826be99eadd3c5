//! `tag_invalidation`: two instances over one Redis hold 10,000 entries that carry one tag, in
//! L1 on both; the time until both miss on all of them, by one `invalidate_tag` against
//! deleting the 10,000 keys one by one.
//!
//! Timed from the first call to the moment the other instance has applied every message the
//! calls sent (its count of received invalidations); that every entry then misses on both
//! instances is checked after the timing (a round that finds one still served fails the run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tierstack::TieredCache;
use tierstack_moka::L1Capacity;
use tierstack_redis::RedisStore;

use crate::harness::{Record, Round, Sizes, interleave, nanos, records};
use crate::redis_scenarios::{config, fail};
use crate::scenarios::{keys, value};

const TTL: Duration = Duration::from_hours(1);
const TAG: &str = "tenant:1";
/// Calls in flight at once while the entries are written and read (setup, not timed).
const SETUP_CONCURRENCY: usize = 64;

async fn instance(prefix: &str, keys: usize) -> TieredCache<String> {
    let (store, backplane) = RedisStore::connect_with_backplane(&config(prefix))
        .await
        .unwrap_or_else(|e| fail(e));
    TieredCache::builder("tags")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .l1_capacity(L1Capacity::Entries(
            u64::try_from(keys * 2).unwrap_or(u64::MAX),
        ))
        .default_ttl(TTL)
        .l2_timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| fail(e))
}

/// Runs `op` for every key index, `SETUP_CONCURRENCY` at a time.
async fn for_each_key<F, Fut>(count: usize, op: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    for i in 0..count {
        if running.len() >= SETUP_CONCURRENCY {
            running.join_next().await;
        }
        running.spawn(op(i));
    }
    while running.join_next().await.is_some() {}
}

/// Every key, on both instances, hits (`expect_hits`) or misses.
async fn check_all(caches: &[TieredCache<String>], keys: &Arc<Vec<String>>, expect_hits: bool) {
    for cache in caches {
        let (cache, keys) = (cache.clone(), Arc::clone(keys));
        for_each_key(keys.len(), move |i| {
            let (cache, keys) = (cache.clone(), Arc::clone(&keys));
            async move {
                let found = cache.get(&keys[i]).await.unwrap_or_else(|e| fail(e));
                if found.is_some() != expect_hits {
                    fail(format!("{} answered {found:?}", keys[i]));
                }
            }
        })
        .await;
    }
}

/// Waits until `cache` has applied `count` invalidations from the other instance.
async fn wait_to_hear(cache: &TieredCache<String>, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while cache.stats().invalidations_received < count {
        if Instant::now() > deadline {
            fail("the other instance did not hear of the writes within a minute");
        }
        tokio::task::yield_now().await;
    }
}

async fn round(system: usize, round: usize, keys: &Arc<Vec<String>>) -> Round {
    let prefix = format!("bench-tags-{round}-{system}:");
    let caches = [
        instance(&prefix, keys.len()).await,
        instance(&prefix, keys.len()).await,
    ];
    let writer = caches[0].clone();
    let options = writer.default_options();
    {
        let keys = Arc::clone(keys);
        for_each_key(keys.len(), move |i| {
            let (writer, keys) = (writer.clone(), Arc::clone(&keys));
            async move {
                writer
                    .set_with_tags(&keys[i], value(i), &[TAG], &options)
                    .await
                    .unwrap_or_else(|e| fail(e));
            }
        })
        .await;
    }
    // Each write told the other instance; those messages are in before anything is timed.
    let written = u64::try_from(keys.len()).unwrap_or(u64::MAX);
    wait_to_hear(&caches[1], written).await;
    check_all(&caches, keys, true).await;
    let heard = caches[1].stats().invalidations_received;
    let started = Instant::now();
    let messages = if system == 0 {
        caches[0]
            .invalidate_tag(TAG)
            .await
            .unwrap_or_else(|e| fail(e));
        1
    } else {
        for key in keys.iter() {
            caches[0].delete(key).await.unwrap_or_else(|e| fail(e));
        }
        written
    };
    wait_to_hear(&caches[1], heard + messages).await;
    let took = nanos(started.elapsed());
    check_all(&caches, keys, false).await;
    #[expect(clippy::cast_precision_loss, reason = "timing report")]
    Round {
        nanos_per_op: took as f64,
        samples: vec![took],
        loader_calls: None,
        l2_commands: None,
        errors: None,
        recovery_ms: None,
    }
}

pub(crate) async fn tag_invalidation(sizes: &Sizes) -> Vec<Record> {
    let keys = keys(sizes.keys);
    let mut count = 0;
    let rounds = interleave(2, sizes.rounds, |system| {
        count += 1;
        let keys = Arc::clone(&keys);
        async move { round(system, count, &keys).await }
    })
    .await;
    records(
        "tag_invalidation",
        &["invalidate_tag", "delete each key"],
        1,
        &rounds,
    )
}
