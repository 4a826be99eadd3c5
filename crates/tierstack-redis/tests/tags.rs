//! Tags over real Redis: a tag invalidated on one instance reaches the other's entries within
//! the backplane's delivery time, untagged and other-tagged entries stay, and a load under way
//! when the tag changes does not cache its value.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tierstack::core::Store;
use tierstack::core::tag::TagRecord;
use tierstack::{Loaded, TieredCache};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};
use tokio::sync::Notify;

mod common;

async fn instance(config: &RedisConfig) -> TieredCache<String> {
    let store = RedisStore::connect(config).await.unwrap();
    let backplane = RedisBackplane::connect(config).await.unwrap();
    TieredCache::builder("orders")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .build()
        .unwrap()
}

/// Waits (bounded) until `check` holds; returns how long it took.
async fn within(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "not reached within {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await; // poll loop
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidated_on_one_instance_reaches_the_other_within_the_delivery_time() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("tags"));
    let (a, b) = (instance(&config).await, instance(&config).await);
    let options = a.default_options();
    a.set_with_tags("order:1", "o1".into(), &["user:7"], &options)
        .await
        .unwrap();
    a.set_with_tags("order:2", "o2".into(), &["org:2"], &options)
        .await
        .unwrap();
    a.set("plain", "p".into()).await.unwrap();
    for cache in [&a, &b] {
        for key in ["order:1", "order:2", "plain"] {
            assert!(cache.get(key).await.unwrap().is_some(), "{key}");
        }
    }
    b.invalidate_tag("user:7").await.unwrap();
    assert_eq!(
        b.get("order:1").await.unwrap(),
        None,
        "at once where invalidated"
    );
    let took = within(Duration::from_secs(5), async || {
        a.get("order:1").await.unwrap().is_none()
    })
    .await;
    eprintln!("the other instance missed after {took:?}");
    for cache in [&a, &b] {
        assert_eq!(cache.get("order:2").await.unwrap(), Some("o2".into()));
        assert_eq!(cache.get("plain").await.unwrap(), Some("p".into()));
    }
    // The record is Redis's: a third instance, which heard nothing, judges by it too.
    let record = RedisStore::connect(&config)
        .await
        .unwrap()
        .get("orders!tag:user:7")
        .await
        .unwrap()
        .and_then(|bytes| TagRecord::decode(&bytes))
        .unwrap();
    assert_eq!((record.counter, record.removed_at), (1, 1));
    assert_eq!(instance(&config).await.get("order:1").await.unwrap(), None);

    // A load on `a` under way while `b` invalidates its tag answers, and is not cached.
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let load = {
        let (a, started, release) = (a.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            let options = a.default_options();
            a.get_or_load_with("report", &options, move || async move {
                started.notify_one();
                release.notified().await;
                Ok::<_, std::io::Error>(Loaded::new("old".to_string()).with_tags(["org:2"]))
            })
            .await
        })
    };
    started.notified().await;
    b.invalidate_tag("org:2").await.unwrap();
    within(Duration::from_secs(5), async || {
        a.get("order:2").await.unwrap().is_none()
    })
    .await;
    release.notify_one();
    let fetched = load.await.unwrap().unwrap();
    assert_eq!((fetched.value.as_str(), fetched.ttl), ("old", None));
    a.wait_for_background_fills().await;
    for cache in [&a, &b] {
        assert_eq!(cache.get("report").await.unwrap(), None);
    }
}
