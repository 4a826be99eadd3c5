//! How a loaded value reaches L2: in the background by default, inline on request, and never
//! after a write or delete of the key from this cache.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Calls, Fixture, loader};
use tierstack::core::clock::Clock;
use tierstack::{CacheError, L2Fill, TieredCache, TieredCacheBuilder};
use tokio::sync::Notify;

const BOUND: Duration = Duration::from_secs(5);

/// Waits (bounded) until the L2 holds `count` writes.
async fn until_held(fx: &Fixture, count: u64) {
    tokio::time::timeout(BOUND, async {
        while fx.faulty.held_writes() != count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} L2 writes were never held"));
}

async fn in_l2(fx: &Fixture, key: &str) -> bool {
    fx.holds(&format!("test:{key}")).await
}

/// A cache whose loaded `value` of `key` is served from L1 while its background L2 write is held.
async fn with_a_held_fill(key: &str, value: &str) -> (Fixture, TieredCache<String>) {
    let fx = Fixture::new();
    let cache = fx.cache();
    fx.faulty.hold_writes(true);
    let calls = Calls::default();
    cache
        .get_or_load(key, loader(&calls, value))
        .await
        .expect("the load succeeds");
    until_held(&fx, 1).await;
    (fx, cache)
}

#[tokio::test]
async fn a_background_fill_returns_before_the_l2_write_lands() {
    let fx = Fixture::new();
    let cache = fx.cache();
    fx.faulty.hold_writes(true);
    let calls = Calls::default();
    let loaded = tokio::time::timeout(BOUND, cache.get_or_load("k", loader(&calls, "v")))
        .await
        .expect("the caller does not wait for the held L2 write");
    assert_eq!(loaded.unwrap(), "v");
    until_held(&fx, 1).await;
    assert!(!in_l2(&fx, "k").await, "the write is still held");
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()), "L1 serves");
    assert_eq!(cache.stats().l1_hits, 1);
    fx.faulty.hold_writes(false);
    cache.wait_for_background_fills().await;
    assert!(in_l2(&fx, "k").await);
    assert_eq!(calls.count(), 1);
}

#[tokio::test]
async fn an_inline_fill_returns_after_the_l2_write() {
    let fx = Fixture::new();
    let cache = fx.builder("test").l2_fill(L2Fill::Inline).build().unwrap();
    fx.faulty.hold_writes(true);
    let calls = Calls::default();
    let task = {
        let cache = cache.clone();
        let calls = calls.clone();
        tokio::spawn(async move { cache.get_or_load("k", loader(&calls, "v")).await })
    };
    until_held(&fx, 1).await;
    assert!(!task.is_finished(), "the caller waits for the L2 write");
    fx.faulty.hold_writes(false);
    assert_eq!(task.await.unwrap().unwrap(), "v");
    assert!(in_l2(&fx, "k").await, "written before get_or_load returned");
}

type Configure = fn(TieredCacheBuilder<String>) -> TieredCacheBuilder<String>;

#[tokio::test]
async fn without_an_l1_or_room_in_the_budget_the_fill_is_inline() {
    let cases: [(&str, Configure); 2] = [
        ("no L1 could serve the value meanwhile", |builder| {
            builder.without_l1()
        }),
        ("the entry is larger than the budget", |builder| {
            builder.l2_fill(L2Fill::Background {
                max_pending_bytes: 8,
            })
        }),
    ];
    for (why, configure) in cases {
        let fx = Fixture::new();
        let cache = configure(fx.builder("test")).build().unwrap();
        let calls = Calls::default();
        cache.get_or_load("k", loader(&calls, "v")).await.unwrap();
        assert!(in_l2(&fx, "k").await, "written inline: {why}");
    }
}

#[tokio::test]
async fn a_delete_right_after_get_or_load_stays_deleted() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    cache.get_or_load("k", loader(&calls, "v")).await.unwrap();
    // On this single-threaded runtime the fill's task has not run yet: the delete comes first.
    cache.delete("k").await.unwrap();
    cache.wait_for_background_fills().await;
    assert!(
        !in_l2(&fx, "k").await,
        "the fill must not bring the key back"
    );
    assert_eq!(cache.get("k").await.unwrap(), None);
}

/// Starts `delete(key)` while L2 holds a write of it, and checks that the delete waits for it.
/// For tests on the paused clock.
async fn delete_behind_the_held_write(
    cache: &TieredCache<String>,
    key: &'static str,
) -> tokio::task::JoinHandle<Result<bool, CacheError>> {
    let delete = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.delete(key).await })
    };
    // paused clock: every task runs until it waits (the delete, behind the held write), then
    // 20 ms pass.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !delete.is_finished(),
        "the delete of {key} waits for the write that holds the key"
    );
    delete
}

#[tokio::test(start_paused = true)]
async fn a_delete_waits_for_a_fill_already_writing() {
    let (fx, cache) = with_a_held_fill("k", "v").await;
    let delete = delete_behind_the_held_write(&cache, "k").await;
    fx.faulty.hold_writes(false);
    delete.await.unwrap().unwrap();
    cache.wait_for_background_fills().await;
    assert!(!in_l2(&fx, "k").await, "the delete came after the fill");
}

#[tokio::test]
async fn a_set_after_get_or_load_wins_over_the_pending_fill() {
    let (fx, cache) = with_a_held_fill("k", "old").await;
    let set = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.set("k", "new".into()).await })
    };
    fx.faulty.hold_writes(false);
    set.await.unwrap().unwrap();
    cache.wait_for_background_fills().await;
    assert_eq!(cache.get("k").await.unwrap(), Some("new".into()));
    cache.invalidate_local_all();
    assert_eq!(cache.get("k").await.unwrap(), Some("new".into()), "L2 too");
}

#[tokio::test(start_paused = true)]
async fn delete_prefix_removes_fills_in_flight() {
    let (fx, cache) = with_a_held_fill("p:1", "v").await;
    let delete = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.delete_prefix("p:").await })
    };
    // paused clock: the delete runs until it waits behind the held write.
    tokio::time::sleep(Duration::from_millis(20)).await;
    fx.faulty.hold_writes(false);
    delete.await.unwrap().unwrap();
    cache.wait_for_background_fills().await;
    assert!(!in_l2(&fx, "p:1").await);
    assert_eq!(cache.get("p:1").await.unwrap(), None);
}

/// A loader that says it has `started`, waits for `release`, then answers `value`.
fn gated_loader(
    started: &Arc<Notify>,
    release: &Arc<Notify>,
    value: &'static str,
) -> impl FnOnce() -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>,
> + Send
+ 'static {
    let (started, release) = (Arc::clone(started), Arc::clone(release));
    move || {
        Box::pin(async move {
            started.notify_one();
            release.notified().await;
            Ok(value.to_owned())
        })
    }
}

async fn delete_during_load_keeps_the_value_out(cache: TieredCache<String>, fx: &Fixture) {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let load = {
        let cache = cache.clone();
        let loader = gated_loader(&started, &release, "read before the delete");
        tokio::spawn(async move { cache.get_or_load("k", loader).await })
    };
    started.notified().await;
    assert!(!load.is_finished(), "the loader is still running");
    cache.delete("k").await.expect("the delete succeeds");
    release.notify_one();
    assert_eq!(
        load.await
            .expect("the load does not panic")
            .expect("the load succeeds"),
        "read before the delete",
        "its callers still get the loaded value"
    );
    cache.wait_for_background_fills().await;
    assert!(
        !in_l2(fx, "k").await,
        "a value loaded before a delete must not be cached after it"
    );
    assert_eq!(cache.get("k").await.expect("the read succeeds"), None);
}

#[tokio::test]
async fn a_delete_during_the_load_keeps_the_loaded_value_out_of_both_tiers() {
    let fx = Fixture::new();
    delete_during_load_keeps_the_value_out(fx.cache(), &fx).await;
    let fx = Fixture::new();
    let inline = fx.builder("test").l2_fill(L2Fill::Inline).build().unwrap();
    delete_during_load_keeps_the_value_out(inline, &fx).await;
}

#[tokio::test]
async fn a_value_another_instance_stored_first_wins_over_the_fill() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let other = fx.cache();
    let loaded = cache
        .get_or_load("k", move || async move {
            // Another instance (no backplane here) stores its value while this load runs.
            other.set("k", "theirs".into()).await.unwrap();
            Ok::<_, std::io::Error>("ours".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(loaded, "ours", "the callers get what their loader answered");
    cache.wait_for_background_fills().await;
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some("theirs".into()),
        "then the cache serves what L2 kept"
    );
}

#[tokio::test]
async fn a_failing_background_fill_is_counted_and_l1_keeps_serving() {
    let fx = Fixture::new();
    let cache = fx.cache();
    fx.faulty.set_failing(true);
    let calls = Calls::default();
    assert_eq!(
        cache.get_or_load("k", loader(&calls, "v")).await.unwrap(),
        "v"
    );
    cache.wait_for_background_fills().await;
    assert!(cache.stats().l2_errors >= 2, "the read and the fill failed");
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
    assert_eq!(calls.count(), 1);
}

#[tokio::test]
async fn a_background_fill_needs_a_budget() {
    let fx = Fixture::new();
    let refused = fx
        .builder("test")
        .l2_fill(L2Fill::Background {
            max_pending_bytes: 0,
        })
        .build();
    assert!(matches!(refused, Err(CacheError::Configuration(_))));
}

#[tokio::test(start_paused = true)]
async fn a_delete_during_a_bulk_fill_waits_and_wins() {
    let fx = Fixture::new();
    let cache = fx.cache();
    fx.faulty.hold_writes(true);
    let load = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load_many(&["a", "b"], |keys: Vec<String>| async move {
                    Ok::<_, std::io::Error>(
                        keys.into_iter()
                            .map(|key| (key.clone(), format!("loaded {key}")))
                            .collect(),
                    )
                })
                .await
        })
    };
    // One conditional write per key, sent together.
    until_held(&fx, 2).await;
    let delete = delete_behind_the_held_write(&cache, "b").await;
    fx.faulty.hold_writes(false);
    let loaded = load
        .await
        .expect("the load does not panic")
        .expect("the load succeeds");
    assert_eq!(
        loaded,
        vec![Some("loaded a".into()), Some("loaded b".into())]
    );
    delete
        .await
        .expect("the delete does not panic")
        .expect("the delete succeeds");
    assert!(in_l2(&fx, "a").await);
    assert!(!in_l2(&fx, "b").await, "the delete came after the batch");
    assert_eq!(cache.get("b").await.expect("the read succeeds"), None);
}

/// Instance A loads `key` (its loader waits for a signal) while instance B deletes it; both
/// share the L2 and nothing else. Returns A's answer.
async fn load_on_a_while_b_deletes(a: &TieredCache<String>, b: &TieredCache<String>) -> String {
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let load = {
        let (a, started, release) = (a.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            a.get_or_load("k", move || async move {
                started.notify_one();
                release.notified().await;
                Ok::<_, std::io::Error>("loaded before the delete".to_owned())
            })
            .await
        })
    };
    tokio::time::timeout(BOUND, started.notified())
        .await
        .expect("the loader starts");
    b.delete("k").await.expect("the delete succeeds");
    release.notify_one();
    let loaded = load.await.expect("no panic").expect("the load succeeds");
    a.wait_for_background_fills().await;
    loaded
}

/// A delete on one instance wins over a load that began before it on another, although the
/// two share nothing but L2: the delete leaves a tombstone, and the load's value may only
/// replace what the load saw in L2. (The load used to write its value over the deleted key:
/// 3 to 23 of 240 trials on real Redis.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_on_another_instance_wins_over_a_load_already_running() {
    for fill in [L2Fill::DEFAULT, L2Fill::Inline] {
        let fx = Fixture::new();
        let a = fx.builder("test").l2_fill(fill).build().unwrap();
        let b = fx.cache();
        // Twice: over an absent key, then over the first round's tombstone.
        for round in 0..2 {
            let loaded = load_on_a_while_b_deletes(&a, &b).await;
            assert_eq!(
                loaded, "loaded before the delete",
                "A's callers get their load"
            );
            assert!(
                !in_l2(&fx, "k").await,
                "{fill:?} round {round}: L2 stays deleted"
            );
            assert_eq!(b.get("k").await.unwrap(), None, "{fill:?} round {round}");
            assert_eq!(a.get("k").await.unwrap(), None, "{fill:?} round {round}");
            assert_eq!(fx.cache().get("k").await.unwrap(), None);
        }
        // A load that begins after the delete fills over its tombstone.
        let calls = Calls::default();
        a.get_or_load("k", loader(&calls, "v")).await.unwrap();
        a.wait_for_background_fills().await;
        assert!(in_l2(&fx, "k").await, "{fill:?}: filled over the tombstone");
        assert_eq!(b.get("k").await.unwrap(), Some("v".into()));
    }
}

/// `get_or_load` cannot use a negative entry, so it loads; its value then replaces the
/// negative entry in L2 (it used to lose to it, and every later call loaded again).
#[tokio::test]
async fn a_loaded_value_replaces_a_negative_entry() {
    let fx = Fixture::new();
    let cache = fx
        .builder("test")
        .negative_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let absent = cache
        .get_or_load_optional("k", || async { Ok::<_, std::io::Error>(None) })
        .await
        .unwrap();
    assert_eq!(absent, None);
    cache.wait_for_background_fills().await;
    assert!(in_l2(&fx, "k").await, "the negative entry is cached");
    let calls = Calls::default();
    for _ in 0..3 {
        cache.invalidate_local("k");
        let value = cache.get_or_load("k", loader(&calls, "v")).await.unwrap();
        assert_eq!(value, "v");
        cache.wait_for_background_fills().await;
    }
    assert_eq!(calls.count(), 1, "later calls find the value in L2");
}

/// A `set` whose caller gives up while its L2 write is in flight may still land (the command
/// may have reached the server): the cache
/// evicts its own copy and tells the others, as for a failed write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_cancelled_in_flight_still_invalidates() {
    let fx = Fixture::new();
    let bus = tierstack::core::testkit::MemoryBus::new();
    let [a, b]: [TieredCache<String>; 2] = [0, 1].map(|_| {
        fx.builder("test")
            .backplane(Arc::new(bus.backplane()))
            .build()
            .unwrap()
    });
    a.set("k", "old".into()).await.unwrap();
    assert_eq!(
        b.get("k").await.unwrap(),
        Some("old".into()),
        "B holds it in L1"
    );
    let received = b.stats().invalidations_received;
    fx.faulty.hold_writes(true);
    let set = {
        let a = a.clone();
        tokio::spawn(async move { a.set("k", "new".into()).await })
    };
    until_held(&fx, 1).await;
    set.abort();
    assert!(set.await.unwrap_err().is_cancelled());
    tokio::time::timeout(BOUND, async {
        while b.stats().invalidations_received == received {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("B is told");
    // The write lands after all (here: planted as the server would have stored it); nobody
    // serves the old value from L1.
    fx.faulty.hold_writes(false);
    let now = fx.clock.now();
    let landed = tierstack::core::envelope::encode(
        &tierstack::core::BincodeCodec::default(),
        Some("new"),
        now,
        now.saturating_add(Duration::from_secs(60)),
        1 << 20,
    )
    .unwrap();
    fx.l2.put_raw("test:k", landed, Duration::from_secs(60));
    assert_eq!(a.get("k").await.unwrap(), Some("new".into()));
    assert_eq!(b.get("k").await.unwrap(), Some("new".into()));
}

/// A deleted key has no TTL and cannot be touched back to life: its tombstone is no entry.
#[tokio::test]
async fn a_deleted_key_has_no_ttl_and_touch_finds_nothing() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("k", "v".into()).await.unwrap();
    assert!(cache.ttl("k").await.unwrap().is_some());
    assert!(cache.delete("k").await.unwrap());
    assert_eq!(cache.ttl("k").await.unwrap(), None);
    assert!(!cache.touch("k", Duration::from_secs(600)).await.unwrap());
    assert!(!cache.exists("k").await.unwrap());
    assert_eq!(cache.get_many(&["k"]).await.unwrap(), vec![None]);
    assert_eq!(
        cache.stats().corrupt_entries,
        0,
        "a tombstone is not corrupt"
    );
}

/// A background fill that L2 refuses (another instance deleted the key meanwhile) takes its L1
/// copy back, even when an invalidation of every key (here an unrelated prefix) came in
/// between: that one need not have removed it. (It used to stay, served until its TTL.)
#[tokio::test]
async fn a_refused_fill_leaves_l1_even_after_an_unrelated_prefix_invalidation() {
    let (fx, cache) = with_a_held_fill("k", "loaded before the delete").await;
    fx.cache().delete("k").await.unwrap();
    let prefix = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.delete_prefix("unrelated:").await })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    fx.faulty.hold_writes(false);
    prefix.await.unwrap().unwrap();
    cache.wait_for_background_fills().await;
    assert_eq!(cache.get("k").await.unwrap(), None);
}
