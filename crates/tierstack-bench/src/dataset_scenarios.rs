//! `dataset_read`: reads from a refreshing dataset of 10,000 entries while it refreshes (every
//! 100 ms, 1% of its values changing each time), against L1 hits of a plain cache.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tierstack::dataset::Dataset;
use tierstack::{FailSafe, TieredCache};
use tierstack_moka::{L1Capacity, MokaStore};

use crate::harness::{
    Record, Sizes, TieredGet, Workload, interleave, records, run_round, shuffled,
};
use crate::scenarios::{keys, value};

const TTL: Duration = Duration::from_hours(1);

struct DatasetGet {
    dataset: Dataset<String>,
    keys: Arc<Vec<String>>,
}

impl Workload for DatasetGet {
    async fn op(&self, i: usize) {
        black_box(self.dataset.get(&self.keys[i]).await.ok().flatten());
    }
}

fn cache(name: &str, keys: usize) -> TieredCache<String> {
    TieredCache::builder(name)
        .l2(Arc::new(MokaStore::new(64 << 20)))
        .l1_capacity(L1Capacity::Entries(
            u64::try_from(keys * 2).unwrap_or(u64::MAX),
        ))
        .default_ttl(TTL)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) async fn dataset_read(sizes: &Sizes) -> Vec<Record> {
    let keys = keys(sizes.keys);
    let refreshes = Arc::new(AtomicU64::new(0));
    let fetch_all = {
        let (keys, refreshes) = (Arc::clone(&keys), Arc::clone(&refreshes));
        move || {
            let refresh = refreshes.fetch_add(1, Ordering::Relaxed);
            let rows: Vec<(String, String)> = keys
                .iter()
                .enumerate()
                .map(|(i, key)| {
                    let value = if i % 100 == 0 {
                        format!("{}-{refresh}", value(i))
                    } else {
                        value(i)
                    };
                    (key.clone(), value)
                })
                .collect();
            std::future::ready(Ok::<_, std::io::Error>(rows))
        }
    };
    let dataset = Dataset::builder(cache("dataset", keys.len()), fetch_all)
        .refresh_every(Duration::from_millis(100))
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let plain = cache("plain", keys.len());
    // The same cache with entries written as the dataset writes them (fail-safe), not
    // refreshing: what of the difference the entries' kind accounts for.
    let fail_safe = cache("fail_safe", keys.len());
    let fail_safe_options = fail_safe
        .default_options()
        .with_ttl(Duration::from_secs(600))
        .with_fail_safe(FailSafe::new(Duration::from_secs(24 * 3600)));
    for (i, key) in keys.iter().enumerate() {
        plain
            .set(key, value(i))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        fail_safe
            .set_with(key, value(i), &fail_safe_options)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let dataset = Arc::new(DatasetGet {
        dataset,
        keys: Arc::clone(&keys),
    });
    let fail_safe = Arc::new(TieredGet {
        cache: fail_safe,
        keys: Arc::clone(&keys),
    });
    let plain = Arc::new(TieredGet { cache: plain, keys });
    let order = shuffled(sizes.keys);
    let rounds = interleave(3, sizes.rounds, |system| {
        let (dataset, plain, fail_safe, order) = (
            dataset.clone(),
            plain.clone(),
            fail_safe.clone(),
            order.clone(),
        );
        async move {
            match system {
                0 => run_round(&dataset, &order, 1, sizes.ops_per_task).await,
                1 => run_round(&plain, &order, 1, sizes.ops_per_task).await,
                _ => run_round(&fail_safe, &order, 1, sizes.ops_per_task).await,
            }
        }
    })
    .await;
    let generation = dataset.dataset.state().generation;
    eprintln!("dataset_read: {generation} refreshes of 10,000 entries during the run");
    records(
        "dataset_read/1task",
        &[
            "dataset (refreshing)",
            "plain cache L1 hit",
            "fail-safe entry L1 hit",
        ],
        1,
        &rounds,
    )
}
