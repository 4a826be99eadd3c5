//! Several server instances on one Redis: they share entries, revocations and rate limits.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{ADMIN_KEY, BLOG_KEY, Client, SHOP_KEY, config};
use reqwest::{Method, StatusCode};
use tierstack::StoreConfig;
use tierstack::redis::{RedisConfig, RedisStore};
use tierstack_server::Limits;

/// A fresh key prefix on the run's Redis, so that tests never meet.
fn redis_config(test: &str) -> RedisConfig {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    RedisConfig::from_url(&tierstack_test_support::redis::redis_url())
        .unwrap()
        .key_prefix(&format!("t-server-{test}-{nanos}:"))
}

/// An instance on `redis`, with its rate limits and quotas counted there.
async fn instance(redis: &RedisConfig, limits: Limits) -> (common::Running, String) {
    let backend = StoreConfig::Redis(redis.clone()).connect().await.unwrap();
    let running = common::start_with(config(limits), backend, |server| {
        let store = redis.clone();
        async move {
            let store = RedisStore::connect(&store).await.unwrap();
            server
                .share_quotas(&store)
                .unwrap()
                .share_rate_limits(store)
        }
    })
    .await;
    let base = running.base.clone();
    (running, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_entries_revocations_and_rate_limits() {
    let redis = redis_config("instances");
    let limits = Limits {
        rate_limit: 6,
        rate_window_secs: 1,
        ..Limits::default()
    };
    let ((_a, a), (_b, b)) = (
        instance(&redis, limits).await,
        instance(&redis, limits).await,
    );
    let (shop_a, shop_b) = (
        Client::new(&a, Some(SHOP_KEY)),
        Client::new(&b, Some(SHOP_KEY)),
    );
    assert_eq!(
        shop_a.put("k", "written on a").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(shop_b.get("k").await.1, "written on a");
    assert_eq!(shop_b.put("k", "then on b").await, StatusCode::NO_CONTENT);
    // `a` held the first value in its L1: the backplane takes it out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while shop_a.get("k").await.1 != "then on b" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a kept the old value"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
    // Another tenant: three requests on each instance, and the seventh, on either, is over
    // the shared limit.
    let (blog_a, blog_b) = (
        Client::new(&a, Some(BLOG_KEY)),
        Client::new(&b, Some(BLOG_KEY)),
    );
    for _ in 0..3 {
        assert_eq!(blog_a.get("k").await.0, StatusCode::NOT_FOUND);
        assert_eq!(blog_b.get("k").await.0, StatusCode::NOT_FOUND);
    }
    let over = blog_a
        .request(Method::GET, "/v1/cache/k")
        .send()
        .await
        .unwrap();
    assert_eq!(
        over.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "counted across instances"
    );
    assert!(over.headers().contains_key("retry-after"));
    // A key created on `a`, used on `b`, revoked on `a`: `b` refuses it at once.
    let admin = Client::new(&a, Some(ADMIN_KEY));
    let created = admin
        .json(Method::POST, "/v1/admin/tenants/news/keys")
        .await;
    let news_b = Client::new(&b, Some(created["key"].as_str().unwrap()));
    assert_eq!(
        news_b.get("k").await.0,
        StatusCode::NOT_FOUND,
        "accepted on b"
    );
    let id = created["id"].as_str().unwrap();
    let revoked = admin
        .request(Method::DELETE, &format!("/v1/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while news_b.get("k").await.0 != StatusCode::UNAUTHORIZED {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b still accepts the key"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_one_quota() {
    let redis = redis_config("quotas");
    let limits = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    let ((_a, a), (_b, b)) = (
        instance(&redis, limits).await,
        instance(&redis, limits).await,
    );
    let (shop_a, shop_b) = (
        Client::new(&a, Some(SHOP_KEY)),
        Client::new(&b, Some(SHOP_KEY)),
    );
    assert_eq!(shop_a.put("k1", "1").await, StatusCode::NO_CONTENT);
    assert_eq!(shop_b.put("k2", "2").await, StatusCode::NO_CONTENT);
    assert_eq!(
        shop_a.put("k3", "3").await,
        StatusCode::INSUFFICIENT_STORAGE,
        "b's entry counts on a"
    );
    let deleted = shop_b
        .request(Method::DELETE, "/v1/cache/k1")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        shop_a.put("k3", "3").await,
        StatusCode::NO_CONTENT,
        "a's entry deleted on b gave its room back"
    );
    let usage = Client::new(&b, Some(ADMIN_KEY))
        .json(Method::GET, "/v1/admin/tenants/shop/usage")
        .await;
    assert_eq!(usage["quota"]["entries"], 2);
    // Concurrent writes of new keys on both instances never pass the quota together.
    let flushed = Client::new(&a, Some(ADMIN_KEY))
        .request(Method::DELETE, "/v1/admin/tenants/shop/cache")
        .send()
        .await
        .unwrap();
    assert_eq!(flushed.status(), StatusCode::OK);
    let writes: Vec<_> = (0..10)
        .map(|i| {
            let base = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let client = Client::new(&base, Some(SHOP_KEY));
                client.put(&format!("n{i}"), "v").await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for write in writes {
        statuses.push(write.await.unwrap());
    }
    let admitted = statuses
        .iter()
        .filter(|status| **status == StatusCode::NO_CONTENT)
        .count();
    assert_eq!(admitted, 2, "{statuses:?}");
}
