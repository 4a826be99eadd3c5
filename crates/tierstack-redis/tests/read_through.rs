//! Read-through over a real Redis: where loaded values land, and that a write or delete from the
//! same cache is never undone by the fill of an earlier load.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::core::envelope::Envelope;
use tierstack::core::{BincodeCodec, Store};
use tierstack::{L2Fill, TieredCache};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};
use tokio::sync::Notify;

mod common;

struct Service {
    config: RedisConfig,
    /// A store of its own, to look at what L2 holds.
    raw: RedisStore,
}

impl Service {
    async fn new(test: &str) -> Self {
        let (config, raw) = common::prefixed(test).await;
        Self { config, raw }
    }

    async fn instance(&self, fill: L2Fill) -> TieredCache<String> {
        let store = RedisStore::connect(&self.config).await.unwrap();
        let backplane = RedisBackplane::connect(&self.config).await.unwrap();
        TieredCache::builder("svc")
            .l2(Arc::new(store))
            .backplane(Arc::new(backplane))
            .l2_fill(fill)
            .build()
            .unwrap()
    }

    /// Whether Redis holds an entry of `key`: a value or a negative entry, not a delete's
    /// tombstone.
    async fn in_l2(&self, key: &str) -> bool {
        let Some(bytes) = self.raw.get(&format!("svc:{key}")).await.unwrap() else {
            return false;
        };
        !Envelope::parse::<BincodeCodec>(&bytes, usize::MAX).is_ok_and(|e| e.tombstone)
    }
}

fn counting(
    calls: &Arc<AtomicUsize>,
    value: &str,
) -> impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + Send + 'static {
    let calls = Arc::clone(calls);
    let value = value.to_owned();
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(value))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_value_reaches_redis_for_the_other_instances() {
    let service = Service::new("rt-fill").await;
    for fill in [L2Fill::DEFAULT, L2Fill::Inline] {
        let key = format!("{fill:?}");
        let a = service.instance(fill).await;
        let b = service.instance(fill).await;
        let calls = Arc::new(AtomicUsize::new(0));
        assert_eq!(
            a.get_or_load(&key, counting(&calls, "v")).await.unwrap(),
            "v"
        );
        a.wait_for_background_fills().await;
        assert!(service.in_l2(&key).await, "{fill:?}");
        assert_eq!(
            b.get_or_load(&key, counting(&calls, "other"))
                .await
                .unwrap(),
            "v"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "{fill:?}: B read it from Redis"
        );
        assert_eq!(b.stats().l2_hits, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_after_the_load_stays_deleted_in_redis() {
    let service = Service::new("rt-del").await;
    let cache = service.instance(L2Fill::DEFAULT).await;
    let calls = Arc::new(AtomicUsize::new(0));
    for round in 0..20 {
        let key = format!("k{round}");
        cache
            .get_or_load(&key, counting(&calls, "v"))
            .await
            .unwrap();
        // Whether the fill is still queued, writing, or done, the delete comes after it.
        cache.delete(&key).await.unwrap();
        cache.wait_for_background_fills().await;
        assert!(
            !service.in_l2(&key).await,
            "round {round}: the fill came back"
        );
        assert_eq!(cache.get(&key).await.unwrap(), None);
    }
}

/// Instance `loading` loads `key` (its loader waits for a signal) while `deleting` (the same
/// instance or another) deletes it; returns the load's answer.
async fn delete_during_a_load(
    loading: &TieredCache<String>,
    deleting: &TieredCache<String>,
    key: &str,
) -> String {
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let load = {
        let (cache, key) = (loading.clone(), key.to_owned());
        let (started, release) = (Arc::clone(&started), Arc::clone(&release));
        tokio::spawn(async move {
            cache
                .get_or_load(&key, move || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>("read before the delete".to_owned())
                })
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("the loader starts");
    deleting.delete(key).await.unwrap();
    release.notify_one();
    let loaded = load.await.unwrap().unwrap();
    loading.wait_for_background_fills().await;
    loaded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_the_load_keeps_the_old_value_out_of_redis() {
    let service = Service::new("rt-during").await;
    for fill in [L2Fill::DEFAULT, L2Fill::Inline] {
        let cache = service.instance(fill).await;
        let key = format!("{fill:?}");
        assert_eq!(
            delete_during_a_load(&cache, &cache, &key).await,
            "read before the delete"
        );
        assert!(!service.in_l2(&key).await, "{fill:?}");
    }
}

/// The delete runs on another instance, which shares only Redis with the loading one: its
/// tombstone makes the load's conditional fill fail. (The fill used to land over the deleted
/// key: 3 to 23 of 240 trials.) Twenty rounds per fill mode, alternating which instance loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_on_another_instance_wins_over_a_load_already_running() {
    let service = Service::new("rt-cross").await;
    for fill in [L2Fill::DEFAULT, L2Fill::Inline] {
        let a = service.instance(fill).await;
        let b = service.instance(fill).await;
        for round in 0..20 {
            let key = format!("{fill:?}-{}", round % 4);
            let (loading, deleting) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
            assert_eq!(
                delete_during_a_load(loading, deleting, &key).await,
                "read before the delete"
            );
            assert!(!service.in_l2(&key).await, "{fill:?} round {round}");
            assert_eq!(a.get(&key).await.unwrap(), None, "{fill:?} round {round}");
            assert_eq!(b.get(&key).await.unwrap(), None, "{fill:?} round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_writing_during_the_load_keeps_its_value() {
    let service = Service::new("rt-race").await;
    let a = service.instance(L2Fill::DEFAULT).await;
    let b = service.instance(L2Fill::DEFAULT).await;
    let loaded = a
        .get_or_load("k", move || async move {
            b.set("k", "written by B".into()).await.unwrap();
            Ok::<_, std::io::Error>("loaded by A".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(loaded, "loaded by A");
    a.wait_for_background_fills().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // B's invalidation reaches A over pub/sub; from then on A serves what Redis kept.
    while a.get("k").await.unwrap().as_deref() != Some("written by B") {
        assert!(std::time::Instant::now() < deadline, "A kept its own load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stored = service.raw.get("svc:k").await.unwrap().unwrap();
    let envelope =
        tierstack::core::envelope::Envelope::parse::<tierstack::BincodeCodec>(&stored, 1 << 20)
            .unwrap();
    let value: String =
        tierstack::core::Codec::decode(&tierstack::BincodeCodec::default(), envelope.payload)
            .unwrap();
    assert_eq!(value, "written by B", "Redis holds B's write, not A's load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_writes_reach_redis_and_every_instance() {
    let service = Service::new("rt-bulk").await;
    let a = service.instance(L2Fill::DEFAULT).await;
    let b = service.instance(L2Fill::DEFAULT).await;
    let batch = |version: &str| {
        (0..200)
            .map(|i| (format!("k{i}"), format!("{version}{i}")))
            .collect::<Vec<_>>()
    };
    a.set_many(batch("old")).await.unwrap();
    for i in 0..200 {
        // Into B's L1.
        let value = b.get(&format!("k{i}")).await.unwrap();
        assert_eq!(value, Some(format!("old{i}")));
    }
    a.set_many(batch("new")).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for i in 0..200 {
        let key = format!("k{i}");
        while b.get(&key).await.unwrap() != Some(format!("new{i}")) {
            assert!(std::time::Instant::now() < deadline, "B kept {key}");
            // poll loop
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    assert_eq!(a.delete_many(&keys).await.unwrap(), 100);
    for i in 0..200 {
        let key = format!("k{i}");
        assert_eq!(service.in_l2(&key).await, i >= 100, "{key}");
        let expected = (i >= 100).then(|| format!("new{i}"));
        while b.get(&key).await.unwrap() != expected {
            assert!(std::time::Instant::now() < deadline, "B kept {key}");
            // poll loop
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
