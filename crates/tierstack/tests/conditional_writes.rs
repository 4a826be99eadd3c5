//! Conditional writes: `set_if_absent` writes only where no value is, never over another
//! writer's value; `set_if_present` only where one is, never bringing back what a delete
//! removed; on one instance or many.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, instances};
use tierstack::FailSafe;
use tierstack::core::testkit::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_absent_key_is_written() {
    let caches = instances(2, Some(&Arc::new(MemoryStore::new())));
    let (a, b) = (&caches[0], &caches[1]);
    let options = a.default_options();
    assert!(
        a.set_if_absent("k", "first".into(), &options)
            .await
            .unwrap()
    );
    assert!(
        !a.set_if_absent("k", "second".into(), &options)
            .await
            .unwrap()
    );
    assert!(
        !b.set_if_absent("k", "third".into(), &options)
            .await
            .unwrap(),
        "through the L2"
    );
    for cache in [a, b] {
        assert_eq!(cache.get("k").await.unwrap(), Some("first".into()));
    }
    // A delete leaves a tombstone: the key is absent again.
    b.delete("k").await.unwrap();
    assert!(
        a.set_if_absent("k", "after delete".into(), &options)
            .await
            .unwrap()
    );
    assert_eq!(b.get("k").await.unwrap(), Some("after delete".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_found_or_a_stale_value_is_no_value() {
    let fixture = Fixture::new();
    let cache = fixture.cache();
    let negative = cache
        .default_options()
        .with_negative_ttl(Duration::from_secs(60));
    let absent = cache
        .get_or_load_optional_with("missing", &negative, || async {
            Ok::<_, std::io::Error>(None)
        })
        .await
        .unwrap();
    assert!(absent.is_none());
    let options = cache.default_options();
    assert!(
        cache
            .set_if_absent("missing", "now here".into(), &options)
            .await
            .unwrap()
    );
    assert_eq!(cache.get("missing").await.unwrap(), Some("now here".into()));

    let fail_safe = cache
        .default_options()
        .with_ttl(Duration::from_secs(10))
        .with_fail_safe(FailSafe::new(Duration::from_secs(600)));
    cache
        .set_with("old", "stale".into(), &fail_safe)
        .await
        .unwrap();
    fixture.clock.advance(Duration::from_secs(11));
    assert!(
        cache
            .set_if_absent("old", "fresh".into(), &options)
            .await
            .unwrap()
    );
    assert_eq!(
        fixture.cache().get("old").await.unwrap(),
        Some("fresh".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_concurrent_calls_on_many_instances_exactly_one_writes() {
    for l2 in [Some(Arc::new(MemoryStore::new())), None] {
        let shared = l2.is_some();
        let caches = instances(if shared { 3 } else { 1 }, l2.as_ref());
        let mut calls = Vec::new();
        for i in 0..30 {
            let cache = caches[i % caches.len()].clone();
            calls.push(tokio::spawn(async move {
                let options = cache.default_options();
                let won = cache
                    .set_if_absent("id", format!("writer {i}"), &options)
                    .await
                    .unwrap();
                won.then_some(i)
            }));
        }
        let mut winners = Vec::new();
        for call in calls {
            winners.extend(call.await.unwrap());
        }
        assert_eq!(winners.len(), 1, "shared: {shared}, winners {winners:?}");
        let expected = format!("writer {}", winners[0]);
        for cache in &caches {
            assert_eq!(cache.get("id").await.unwrap(), Some(expected.clone()));
        }
    }
}

#[tokio::test]
async fn an_l2_that_fails_fails_the_call() {
    let fixture = Fixture::new();
    let cache = fixture.cache();
    let options = cache.default_options();
    fixture.faulty.set_failing(true);
    assert!(
        cache
            .set_if_absent("k", "v".into(), &options)
            .await
            .is_err()
    );
    fixture.faulty.set_failing(false);
    assert_eq!(cache.get("k").await.unwrap(), None, "nothing kept");
    assert!(
        cache
            .set_if_absent("k", "v".into(), &options)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_instances_drop_what_they_held() {
    let caches = instances(2, Some(&Arc::new(MemoryStore::new())));
    let (a, b) = (&caches[0], &caches[1]);
    let negative = b
        .default_options()
        .with_negative_ttl(Duration::from_secs(60));
    let held = b
        .get_or_load_optional_with("k", &negative, || async { Ok::<_, std::io::Error>(None) })
        .await
        .unwrap();
    assert!(held.is_none(), "b holds a cached not-found");
    let options = a.default_options();
    assert!(
        a.set_if_absent("k", "created".into(), &options)
            .await
            .unwrap()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while b.get("k").await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b kept its not-found"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
    assert_eq!(b.get("k").await.unwrap(), Some("created".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_present_key_is_written() {
    for l2 in [Some(Arc::new(MemoryStore::new())), None] {
        let shared = l2.is_some();
        let caches = instances(if shared { 2 } else { 1 }, l2.as_ref());
        let (a, b) = (&caches[0], &caches[caches.len() - 1]);
        let options = a.default_options();
        assert!(
            !a.set_if_present("k", "nobody".into(), &options)
                .await
                .unwrap()
        );
        assert_eq!(a.get("k").await.unwrap(), None, "shared: {shared}");
        a.set("k", "first".into()).await.unwrap();
        assert!(
            b.set_if_present("k", "second".into(), &options)
                .await
                .unwrap()
        );
        assert_eq!(b.get("k").await.unwrap(), Some("second".into()));
        b.delete("k").await.unwrap();
        assert!(
            !a.set_if_present("k", "after delete".into(), &options)
                .await
                .unwrap(),
            "shared: {shared}"
        );
        // `a` may still hold the first value until the invalidations arrive.
        assert_eq!(converged(&caches, "k").await, None, "shared: {shared}");
    }
}

/// What every instance reads under `key` once they agree (within two seconds, the
/// invalidations' delivery).
async fn converged(caches: &[tierstack::TieredCache<String>], key: &str) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let mut values = Vec::new();
        for cache in caches {
            values.push(cache.get(key).await.unwrap());
        }
        if values.windows(2).all(|pair| pair[0] == pair[1]) {
            return values.pop().flatten();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the instances disagree: {values:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_present_write_after_another_instances_delete_writes_nothing() {
    let l2 = Arc::new(MemoryStore::new());
    for round in 0..20 {
        // A fresh pair each round: `b`'s L1 still holds the value when the write starts,
        // since the delete's invalidation may not have reached it yet.
        let caches = instances(2, Some(&l2));
        let (a, b) = (&caches[0], &caches[1]);
        let key = format!("k{round}");
        a.set(&key, "live".into()).await.unwrap();
        assert_eq!(b.get(&key).await.unwrap(), Some("live".into()));
        a.delete(&key).await.unwrap();
        let options = b.default_options();
        assert!(
            !b.set_if_present(&key, "resurrected".into(), &options)
                .await
                .unwrap(),
            "round {round}"
        );
        assert_eq!(a.get(&key).await.unwrap(), None, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn present_writes_racing_a_delete_leave_a_winner_or_nothing() {
    let l2 = Arc::new(MemoryStore::new());
    let caches = instances(3, Some(&l2));
    for round in 0..10 {
        let key = format!("k{round}");
        caches[0].set(&key, "initial".into()).await.unwrap();
        let mut calls = Vec::new();
        for i in 0..12 {
            let cache = caches[i % caches.len()].clone();
            let key = key.clone();
            calls.push(tokio::spawn(async move {
                let options = cache.default_options();
                let written = cache
                    .set_if_present(&key, format!("writer {i}"), &options)
                    .await
                    .unwrap();
                written.then(|| format!("writer {i}"))
            }));
        }
        let deleter = caches[1].clone();
        let deleted_key = key.clone();
        let delete = tokio::spawn(async move { deleter.delete(&deleted_key).await.unwrap() });
        let mut written = Vec::new();
        for call in calls {
            written.extend(call.await.unwrap());
        }
        delete.await.unwrap();
        let left = converged(&caches, &key).await;
        if let Some(value) = &left {
            assert!(
                written.contains(value),
                "round {round}: {value} was not written by a call that said so"
            );
        }
    }
}

#[tokio::test]
async fn a_cache_with_no_tier_refuses_a_conditional_write() {
    let cache = tierstack::TieredCache::<String>::builder("nothing")
        .without_l1()
        .build()
        .unwrap();
    let options = cache.default_options();
    let refused = cache.set_if_absent("k", "v".into(), &options).await;
    assert!(
        matches!(refused, Err(tierstack::CacheError::Configuration(_))),
        "{refused:?}"
    );
    // An L1 only, and options that skip writing it: nothing would hold the value either.
    let l1_only = tierstack::TieredCache::<String>::builder("l1")
        .build()
        .unwrap();
    let mut skips = l1_only.default_options().skips();
    skips.l1_write = true;
    let skipping = l1_only.default_options().with_skips(skips);
    let refused = l1_only.set_if_absent("k", "v".into(), &skipping).await;
    assert!(
        matches!(refused, Err(tierstack::CacheError::Configuration(_))),
        "{refused:?}"
    );
    assert_eq!(l1_only.get("k").await.unwrap(), None);
}

/// An instance cut off from its backplane can neither vouch for its L1 copies nor keep new
/// ones: a conditional write that leaves L2 alone is refused until it hears again, never
/// answered from a copy another instance may have replaced (nor two `set_if_absent` winners).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_l1_refuses_conditional_writes_until_it_hears_again() {
    let bus = tierstack::core::testkit::MemoryBus::new();
    let cache = tierstack::TieredCache::<String>::builder("deaf")
        .l2(Arc::new(MemoryStore::new()))
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap();
    let mut skips = cache.default_options().skips();
    skips.l2_write = true;
    let l1_only = cache.default_options().with_skips(skips);
    cache.set_with("k", "v1".into(), &l1_only).await.unwrap();
    let resyncs = async |count: u64| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while cache.stats().resyncs < count {
            assert!(tokio::time::Instant::now() < deadline, "never heard it");
            tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
        }
    };
    bus.lose_all();
    resyncs(1).await;
    // Its L1 still holds v1 (kept as fail-safe's last resort), which nobody would say was
    // deleted meanwhile.
    let refused = [
        cache.set_if_absent("k", "v2".into(), &l1_only).await,
        cache.set_if_present("k", "v2".into(), &l1_only).await,
        cache
            .compare_and_set("k", &"v1".to_owned(), Some("v2".into()), &l1_only)
            .await,
        cache.set_if_absent("free", "v".into(), &l1_only).await,
    ];
    for answer in refused {
        assert!(
            matches!(
                answer,
                Err(tierstack::CacheError::Backend {
                    transient: true,
                    ..
                })
            ),
            "{answer:?}"
        );
    }
    bus.resync_all();
    resyncs(2).await;
    assert!(
        cache
            .set_if_absent("free", "v".into(), &l1_only)
            .await
            .unwrap()
    );
    assert!(
        !cache
            .set_if_absent("free", "again".into(), &l1_only)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_replaces_or_removes_only_the_value_it_was_given() {
    for l2 in [Some(Arc::new(MemoryStore::new())), None] {
        let shared = l2.is_some();
        let caches = instances(2, l2.as_ref());
        let (a, b) = (&caches[0], &caches[1]);
        let options = a.default_options();
        let cas = async |current: &str, new: Option<&str>| {
            a.compare_and_set("k", &current.to_owned(), new.map(str::to_owned), &options)
                .await
                .unwrap()
        };
        assert!(
            !cas("v1", Some("v2")).await,
            "shared: {shared}: no value yet"
        );
        a.set("k", "v1".into()).await.unwrap();
        assert!(!cas("other", Some("v2")).await, "shared: {shared}");
        assert!(cas("v1", Some("v2")).await, "shared: {shared}");
        assert_eq!(a.get("k").await.unwrap().as_deref(), Some("v2"));
        if shared {
            // The other instance read v2 and wrote v3: a's view of v2 no longer holds.
            let b_options = b.default_options();
            assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
            assert!(
                b.compare_and_set("k", &"v2".to_owned(), Some("v3".into()), &b_options)
                    .await
                    .unwrap()
            );
            assert!(!cas("v2", Some("v4")).await, "b's write came between");
            assert!(cas("v3", None).await, "a removal");
            assert_eq!(a.get("k").await.unwrap(), None);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while b.get("k").await.unwrap().is_some() {
                assert!(tokio::time::Instant::now() < deadline, "b kept its copy");
                tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
            }
        } else {
            assert!(cas("v2", None).await, "a removal");
            assert_eq!(a.get("k").await.unwrap(), None);
        }
        assert!(!cas("v3", Some("v5")).await, "shared: {shared}: removed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_concurrent_compare_and_sets_over_one_value_exactly_one_wins() {
    let caches = instances(3, Some(&Arc::new(MemoryStore::new())));
    caches[0].set("counter", "0".into()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..30 {
        let cache = caches[i % caches.len()].clone();
        calls.push(tokio::spawn(async move {
            let options = cache.default_options();
            cache
                .compare_and_set(
                    "counter",
                    &"0".to_owned(),
                    Some(format!("writer {i}")),
                    &options,
                )
                .await
                .unwrap()
                .then_some(i)
        }));
    }
    let mut winners = Vec::new();
    for call in calls {
        winners.extend(call.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    // The other instances drop "0" when the winner's invalidation reaches them.
    let expected = Some(format!("writer {}", winners[0]));
    for cache in &caches {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while cache.get("counter").await.unwrap() != expected {
            assert!(tokio::time::Instant::now() < deadline, "never converged");
            tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
        }
    }
}

/// Without an L2, a conditional write tells the other instances, as `set` does: each drops
/// its own copy of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_l2_a_conditional_write_tells_the_others() {
    let caches = instances(2, None);
    let (a, b) = (&caches[0], &caches[1]);
    b.set("k", "b's own".into()).await.unwrap();
    let options = a.default_options();
    assert!(a.set_if_absent("k", "a's".into(), &options).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.get("k").await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "b kept its copy");
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
}

#[tokio::test]
async fn compare_and_set_does_not_see_a_stale_copy_as_its_value() {
    let fixture = Fixture::new();
    let options = tierstack::EntryOptions::default()
        .with_ttl(Duration::from_secs(1))
        .with_fail_safe(FailSafe::new(Duration::from_secs(600)));
    let cache = fixture
        .builder("cas")
        .default_options(options)
        .build()
        .unwrap();
    cache.set("k", "v1".into()).await.unwrap();
    fixture.clock.advance(Duration::from_secs(2));
    assert!(
        !cache
            .compare_and_set("k", &"v1".to_owned(), Some("v2".into()), &options)
            .await
            .unwrap(),
        "a value past its TTL is no value"
    );
}
