//! Keeping every instance's L1 fresh: the backplane, resyncs, and the generation check that stops
//! a stale fill from landing after an invalidation.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Fixture, eventually};
use tierstack::TieredCache;
use tierstack::core::testkit::{MemoryBus, MemoryStore};
use tokio::sync::Notify;

/// How long a condition polled for may take.
const WITHIN: Duration = Duration::from_secs(1);

fn instances(count: usize) -> (Arc<MemoryStore>, MemoryBus, Vec<TieredCache<String>>) {
    let l2 = Arc::new(MemoryStore::new());
    let bus = MemoryBus::new();
    let caches = (0..count)
        .map(|_| {
            TieredCache::builder("shared")
                .l2(l2.clone())
                .backplane(Arc::new(bus.backplane()))
                .build()
                .unwrap()
        })
        .collect();
    (l2, bus, caches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_evicts_every_other_l1() {
    let (_l2, _bus, caches) = instances(3);
    caches[0].set("k", "v1".into()).await.unwrap();
    for cache in &caches {
        assert_eq!(cache.get("k").await.unwrap(), Some("v1".into()));
    }
    caches[1].set("k", "v2".into()).await.unwrap();
    for cache in &caches {
        eventually(WITHIN, async || {
            cache.get("k").await.unwrap() == Some("v2".into())
        })
        .await;
    }
    // Once delivered, no instance serves the old value again.
    for cache in &caches {
        for _ in 0..10 {
            assert_eq!(cache.get("k").await.unwrap(), Some("v2".into()));
        }
    }
    // Each instance receives the other writers' messages, never its own. Two writers' messages
    // travel independently: the first write's may still be on its way to the third instance
    // once the second's has arrived (seen once in a loaded run).
    let received = || -> Vec<u64> {
        caches
            .iter()
            .map(|c| c.stats().invalidations_received)
            .collect()
    };
    eventually(WITHIN, async || received() == [1, 1, 2]).await;
    assert_eq!(received(), vec![1, 1, 2], "no more than that");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_prefix_deletes_reach_every_instance() {
    let (_l2, _bus, caches) = instances(3);
    for key in ["a:1", "a:2", "b:1"] {
        caches[0].set(key, key.into()).await.unwrap();
    }
    for cache in &caches {
        assert!(
            cache.get("a:1").await.unwrap().is_some() && cache.get("b:1").await.unwrap().is_some()
        );
    }
    caches[2].delete("b:1").await.unwrap();
    caches[2].delete_prefix("a:").await.unwrap();
    for cache in &caches {
        eventually(WITHIN, async || {
            cache.get("a:1").await.unwrap().is_none()
                && cache.get("a:2").await.unwrap().is_none()
                && cache.get("b:1").await.unwrap().is_none()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_clears_l1() {
    let (l2, bus, caches) = instances(2);
    caches[0].set("k", "v1".into()).await.unwrap();
    eventually(WITHIN, async || {
        caches[1].stats().invalidations_received == 1
    })
    .await;
    assert_eq!(caches[1].get("k").await.unwrap(), Some("v1".into()));
    // A write whose invalidation is lost (a writer without the backplane)...
    let other: TieredCache<String> = TieredCache::builder("shared")
        .l2(l2.clone())
        .build()
        .unwrap();
    other.set("k", "v2".into()).await.unwrap();
    assert_eq!(
        caches[1].get("k").await.unwrap(),
        Some("v1".into()),
        "stale until resync"
    );
    // ...is repaired by the resync that follows a lost subscription.
    bus.resync_all();
    eventually(WITHIN, async || {
        caches[1].get("k").await.unwrap() == Some("v2".into())
    })
    .await;
    assert!(caches[1].stats().resyncs >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_started_before_an_invalidation_does_not_land_after_it() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let loader_started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let reader = {
        let cache = cache.clone();
        let (started, release) = (loader_started.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_load("k", move || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>("stale".to_string())
                })
                .await
        })
    };
    loader_started.notified().await;
    // While the loader is out, the key is written and the invalidation happens.
    cache.set("k", "fresh".into()).await.unwrap();
    release.notify_one();
    assert_eq!(
        reader.await.unwrap().unwrap(),
        "stale",
        "the slow caller gets what it loaded"
    );
    for _ in 0..5 {
        assert_eq!(
            cache.get("k").await.unwrap(),
            Some("fresh".into()),
            "but it never reaches L1 or L2"
        );
    }
}

/// On the paused clock: the early caller's loader has started (it says so) and runs for 100 ms of
/// paused time, so the second caller arrives while its flight runs.
#[tokio::test(start_paused = true)]
async fn a_caller_arriving_after_an_invalidation_does_not_join_an_older_flight() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = common::Calls::default();
    let slow_loader = |calls: &common::Calls, started: Arc<Notify>| {
        let calls = calls.clone();
        move || async move {
            calls.hit();
            started.notify_one();
            // paused clock: the load takes 100 ms.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, std::io::Error>("v".to_string())
        }
    };
    let concurrent_loads = async |key: &str, invalidate_between: bool| {
        let before = calls.count();
        let started = Arc::new(Notify::new());
        let early = {
            let loader = slow_loader(&calls, started.clone());
            let (cache, key) = (cache.clone(), key.to_owned());
            tokio::spawn(async move { cache.get_or_load(&key, loader).await })
        };
        started.notified().await;
        if invalidate_between {
            cache.invalidate_local(key);
        }
        let loader = slow_loader(&calls, Arc::new(Notify::new()));
        assert_eq!(cache.get_or_load(key, loader).await.unwrap(), "v");
        assert_eq!(early.await.unwrap().unwrap(), "v");
        calls.count() - before
    };
    assert_eq!(
        concurrent_loads("a", false).await,
        1,
        "the second caller joins the running flight"
    );
    assert_eq!(
        concurrent_loads("b", true).await,
        2,
        "after an invalidation it starts its own"
    );
}

/// Each cache listens in a task of its own. Dropping a cache ends it, before any message arrives:
/// nothing the task holds keeps the dropped cache alive, and the cache that is left still listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cache_stops_listening() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let (l2, bus, mut caches) = instances(3);
    assert_eq!(
        metrics.num_alive_tasks(),
        before + 3,
        "one listening task per cache"
    );
    let survivor = caches.pop().unwrap();
    drop(caches);
    assert_eq!(
        Arc::strong_count(&l2),
        2,
        "the dropped caches are gone at once: only the test and the survivor hold the L2"
    );
    eventually(WITHIN, async || metrics.num_alive_tasks() == before + 1).await;
    survivor.set("k", "v".into()).await.unwrap();
    bus.resync_all();
    eventually(WITHIN, async || survivor.stats().resyncs == 1).await;
}

/// While the subscription is lost, writes of other instances go unannounced: a deaf instance
/// clears its L1 and reads every value from L2 until it hears again, instead of filling L1 with
/// values nobody will invalidate. (After a Redis restart an instance used to serve an
/// overwritten value from such a fill until its resubscription.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_instance_serves_from_l2_until_it_hears_again() {
    let (_l2, bus, caches) = instances(2);
    let (writer, deaf) = (&caches[0], &caches[1]);
    writer.set("k", "v1".into()).await.unwrap();
    assert_eq!(deaf.get("k").await.unwrap(), Some("v1".into()));
    bus.lose_all();
    eventually(WITHIN, async || deaf.stats().resyncs == 1).await;
    let hits = deaf.stats().l1_hits;
    assert_eq!(deaf.get("k").await.unwrap(), Some("v1".into()));
    assert_eq!(deaf.get("k").await.unwrap(), Some("v1".into()));
    assert_eq!(
        deaf.stats().l1_hits,
        hits,
        "cleared, and not filled while deaf"
    );
    writer.set("k", "v2".into()).await.unwrap(); // nobody hears of it
    assert_eq!(deaf.get("k").await.unwrap(), Some("v2".into()));
    bus.resync_all();
    eventually(WITHIN, async || deaf.stats().resyncs == 2).await;
    assert_eq!(deaf.get("k").await.unwrap(), Some("v2".into()));
    assert_eq!(deaf.get("k").await.unwrap(), Some("v2".into()));
    assert_eq!(deaf.stats().l1_hits, hits + 1, "filled again once it hears");
}

/// What becomes of a backplane member's first publish.
#[derive(Debug)]
enum FirstPublish {
    /// It fails.
    Fails,
    /// It never finishes; it says when it started.
    Hangs(Arc<Notify>),
}

/// A backplane member whose first publish goes wrong, and whose others go through.
#[derive(Debug)]
struct FirstPublishGoesWrong {
    inner: tierstack::core::testkit::MemoryBackplane,
    first: std::sync::Mutex<Option<FirstPublish>>,
}

impl FirstPublishGoesWrong {
    fn new(inner: tierstack::core::testkit::MemoryBackplane, first: FirstPublish) -> Self {
        Self {
            inner,
            first: std::sync::Mutex::new(Some(first)),
        }
    }
}

#[async_trait::async_trait]
impl tierstack::core::Backplane for FirstPublishGoesWrong {
    async fn publish(
        &self,
        namespace: &str,
        invalidation: &tierstack::core::backplane::Invalidation,
    ) -> tierstack::core::Result<()> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match first {
            Some(FirstPublish::Fails) => {
                return Err(tierstack::core::CacheError::backend(
                    "publish", true, "refused",
                ));
            }
            Some(FirstPublish::Hangs(started)) => {
                started.notify_one();
                std::future::pending::<()>().await;
            }
            None => {}
        }
        self.inner.publish(namespace, invalidation).await
    }

    fn subscribe(&self) -> tierstack::core::backplane::Subscription {
        self.inner.subscribe()
    }
}

/// A publish that fails is tried again: the write stands, and the other instances must hear of
/// it. (It used to be counted and dropped, and the others kept serving the old value.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_is_tried_again() {
    let l2 = Arc::new(MemoryStore::new());
    let bus = MemoryBus::new();
    let writer = TieredCache::<String>::builder("shared")
        .l2(l2.clone())
        .backplane(Arc::new(FirstPublishGoesWrong::new(
            bus.backplane(),
            FirstPublish::Fails,
        )))
        .l2_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let reader = TieredCache::<String>::builder("shared")
        .l2(l2.clone())
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap();
    reader.set("k", "v1".into()).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap(), Some("v1".into()), "in L1");
    writer.set("k", "v2".into()).await.unwrap();
    assert_eq!(writer.stats().publish_errors, 1, "the first publish failed");
    eventually(WITHIN, async || {
        reader.get("k").await.unwrap() == Some("v2".into())
    })
    .await;
}

/// A backplane member that refuses its first `refusals` publishes: a backplane cut off for
/// longer than a publish and its one retry.
#[derive(Debug)]
struct RefusesPublishes {
    inner: tierstack::core::testkit::MemoryBackplane,
    refusals: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl tierstack::core::Backplane for RefusesPublishes {
    async fn publish(
        &self,
        namespace: &str,
        invalidation: &tierstack::core::backplane::Invalidation,
    ) -> tierstack::core::Result<()> {
        let refused = self
            .refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if refused {
            return Err(tierstack::core::CacheError::backend(
                "publish", true, "refused",
            ));
        }
        self.inner.publish(namespace, invalidation).await
    }

    fn subscribe(&self) -> tierstack::core::backplane::Subscription {
        self.inner.subscribe()
    }
}

/// A writer whose backplane refuses its first `refusals` publishes, and a reader holding `k`
/// = `v1` in L1, on one L2 and one bus.
async fn refused_writer_and_reader(
    refusals: u32,
    l2_timeout: Duration,
) -> (TieredCache<String>, TieredCache<String>) {
    let l2 = Arc::new(MemoryStore::new());
    let bus = MemoryBus::new();
    let writer = TieredCache::<String>::builder("shared")
        .l2(l2.clone())
        .backplane(Arc::new(RefusesPublishes {
            inner: bus.backplane(),
            refusals: refusals.into(),
        }))
        .l2_timeout(l2_timeout)
        .build()
        .unwrap();
    let reader = TieredCache::<String>::builder("shared")
        .l2(l2)
        .backplane(Arc::new(bus.backplane()))
        .default_ttl(Duration::from_hours(1))
        .build()
        .unwrap();
    reader.set("k", "v1".into()).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap(), Some("v1".into()), "in L1");
    (writer, reader)
}

/// A publish that fails, and fails again when tried once more, is held and sent until the
/// backplane takes it, without a breaker and without another write: the others hear of the
/// write once the backplane is back. (After the second failure it used to be dropped, and
/// the others served the old value until it expired.)
#[tokio::test(start_paused = true)]
async fn a_publish_that_fails_twice_is_sent_once_the_backplane_is_back() {
    let (writer, reader) = refused_writer_and_reader(5, Duration::from_millis(20)).await;
    writer.set("k", "v2".into()).await.unwrap();
    eventually(WITHIN, async || {
        reader.get("k").await.unwrap() == Some("v2".into())
    })
    .await;
    assert_eq!(
        writer.stats().publish_errors,
        5,
        "every refusal was counted"
    );
}

/// A backplane that refuses every publish for good is tried ever less often: the pause between
/// two rounds of sending what is held doubles from the L2 timeout up to 10 s. In a minute,
/// with a 100 ms L2 timeout: the write's publish (0 s), its retry (0.1 s), then rounds at
/// 0.2, 0.4, 0.8, 1.6, 3.2, 6.4 and 12.8 s, and every 10 s from there (22.8 to 52.8 s): 13
/// publishes, not the 600 of a retry every L2 timeout.
#[tokio::test(start_paused = true)]
async fn a_backplane_that_refuses_for_good_is_tried_ever_less_often() {
    let bus = MemoryBus::new();
    let writer = TieredCache::<String>::builder("shared")
        .l2(Arc::new(MemoryStore::new()))
        .backplane(Arc::new(RefusesPublishes {
            inner: bus.backplane(),
            refusals: u32::MAX.into(),
        }))
        .l2_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    writer.set("k", "v".into()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await; // paused clock: timer to timer
    assert_eq!(writer.stats().publish_errors, 13);
}

/// Held invalidations go out as soon as a publish gets through again, not at the sending task's
/// next round: after four refusals (at 0, 1, 2 and 4 s with a 1 s L2 timeout) the next round
/// would be at 8 s, but a write at 4.5 s, whose publish goes through, releases them.
#[tokio::test(start_paused = true)]
async fn held_invalidations_go_out_with_the_first_publish_that_gets_through() {
    let (writer, reader) = refused_writer_and_reader(4, Duration::from_secs(1)).await;
    writer.set("k", "v2".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4_500)).await; // paused clock: four refusals
    assert_eq!(writer.stats().publish_errors, 4);
    assert_eq!(
        reader.get("k").await.unwrap(),
        Some("v1".into()),
        "still held"
    );
    writer.set("other", "o".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: the release goes out
    assert_eq!(reader.get("k").await.unwrap(), Some("v2".into()));
}

/// A `set` whose caller gives up while its invalidation is being published has written L2: the
/// others are still told, by a detached task. (The cancelled publish used to be the only one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_cancelled_while_publishing_still_reaches_the_others() {
    let l2 = Arc::new(MemoryStore::new());
    let bus = MemoryBus::new();
    let started = Arc::new(Notify::new());
    let writer = TieredCache::<String>::builder("shared")
        .l2(l2.clone())
        .backplane(Arc::new(FirstPublishGoesWrong::new(
            bus.backplane(),
            FirstPublish::Hangs(started.clone()),
        )))
        .build()
        .unwrap();
    let reader = TieredCache::<String>::builder("shared")
        .l2(l2.clone())
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap();
    reader.set("k", "v1".into()).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap(), Some("v1".into()), "in L1");
    let set = {
        let writer = writer.clone();
        tokio::spawn(async move { writer.set("k", "v2".into()).await })
    };
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("the publish starts");
    set.abort();
    assert!(set.await.unwrap_err().is_cancelled());
    eventually(WITHIN, async || {
        reader.get("k").await.unwrap() == Some("v2".into())
    })
    .await;
}
