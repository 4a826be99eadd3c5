//! Tags: `invalidate_tag` and `expire_tag` reach every entry that carries the tag, on every
//! instance, without a scan; loads under way do not cache over them; bad tags are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Fixture, PickyStore, eventually, instances};
use tierstack::core::Store;
use tierstack::core::tag::{MAX_TAG_LEN, MAX_TAGS, TagProblem, TagRecord};
use tierstack::core::testkit::{MemoryBus, MemoryStore};
use tierstack::{CacheError, EntryOptions, FailSafe, Loaded, Source, TieredCache};
use tokio::sync::Notify;

/// How long a condition polled for may take.
const WITHIN: Duration = Duration::from_secs(2);

/// Fail-safe whose stale answers are re-tried after a millisecond.
fn fail_safe(cache: &TieredCache<String>) -> EntryOptions {
    cache.default_options().with_fail_safe(
        FailSafe::new(Duration::from_secs(600)).with_throttle(Duration::from_millis(1)),
    )
}

async fn failing_load(
    cache: &TieredCache<String>,
    key: &str,
    options: &EntryOptions,
) -> Option<(String, bool)> {
    cache
        .get_or_load_with(key, options, || async {
            Err::<String, _>(std::io::Error::other("origin down"))
        })
        .await
        .ok()
        .map(|fetched| (fetched.value, fetched.stale))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_tag_misses_on_every_instance_and_leaves_the_rest() {
    let caches = instances(2, Some(&Arc::new(MemoryStore::new())));
    let (a, b) = (&caches[0], &caches[1]);
    let options = a.default_options();
    a.set_with_tags("order:1", "o1".into(), &["user:7"], &options)
        .await
        .unwrap();
    a.set_with_tags("order:2", "o2".into(), &["user:7", "org:2"], &options)
        .await
        .unwrap();
    a.set_with_tags("order:3", "o3".into(), &["org:2"], &options)
        .await
        .unwrap();
    a.set("plain", "p".into()).await.unwrap();
    for cache in [a, b] {
        for key in ["order:1", "order:2", "order:3", "plain"] {
            assert!(cache.get(key).await.unwrap().is_some(), "{key} cached");
        }
    }
    b.invalidate_tag("user:7").await.unwrap();
    // At once on the instance that invalidated; within the delivery time on the other.
    assert_eq!(b.get("order:1").await.unwrap(), None);
    assert_eq!(b.get("order:2").await.unwrap(), None);
    eventually(WITHIN, async || a.get("order:1").await.unwrap().is_none()).await;
    for cache in [a, b] {
        assert_eq!(cache.get("order:2").await.unwrap(), None, "one tag of two");
        assert_eq!(cache.get("order:3").await.unwrap(), Some("o3".into()));
        assert_eq!(cache.get("plain").await.unwrap(), Some("p".into()));
        assert!(!cache.exists("order:1").await.unwrap());
    }
    assert_eq!(b.stats().tag_invalidations, 1);
    // Written after the invalidation: current again.
    a.set_with_tags("order:1", "o1 v2".into(), &["user:7"], &options)
        .await
        .unwrap();
    for cache in [a, b] {
        eventually(WITHIN, async || {
            cache.get("order:1").await.unwrap() == Some("o1 v2".into())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidated_while_its_load_runs_keeps_the_value_out() {
    for on_other_instance in [false, true] {
        let caches = instances(2, Some(&Arc::new(MemoryStore::new())));
        let (a, b) = (caches[0].clone(), caches[1].clone());
        let loads = Arc::new(AtomicUsize::new(0));
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let load = {
            let (a, loads, started, release) =
                (a.clone(), loads.clone(), started.clone(), release.clone());
            tokio::spawn(async move {
                let options = a.default_options();
                a.get_or_load_with("report", &options, move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>(Loaded::new("old".to_string()).with_tags(["user:7"]))
                })
                .await
            })
        };
        started.notified().await;
        if on_other_instance {
            b.invalidate_tag("user:7").await.unwrap();
            // The message has reached `a` once `a` counts it.
            eventually(WITHIN, async || a.stats().invalidations_received == 1).await;
        } else {
            a.invalidate_tag("user:7").await.unwrap();
        }
        release.notify_one();
        let fetched = load.await.unwrap().unwrap();
        assert_eq!(fetched.value, "old", "its callers get it");
        assert_eq!(fetched.ttl, None, "not cached");
        for cache in [&a, &b] {
            assert_eq!(cache.get("report").await.unwrap(), None);
        }
        let options = a.default_options();
        let again = a
            .get_or_load_with("report", &options, || async {
                Ok::<_, std::io::Error>(Loaded::new("new".to_string()).with_tags(["user:7"]))
            })
            .await
            .unwrap();
        assert_eq!(again.value, "new");
        assert!(again.ttl.is_some(), "cached this time");
        a.wait_for_background_fills().await;
        assert_eq!(b.get("report").await.unwrap(), Some("new".into()));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_keeps_a_fallback_only_for_fail_safe_entries_and_remove_keeps_none() {
    let caches = instances(2, Some(&Arc::new(MemoryStore::new())));
    let (a, b) = (&caches[0], &caches[1]);
    let safe = fail_safe(a);
    let plain = a.default_options();
    a.set_with_tags("safe", "kept".into(), &["t"], &safe)
        .await
        .unwrap();
    a.set_with_tags("plain", "gone".into(), &["t"], &plain)
        .await
        .unwrap();
    assert!(a.get("safe").await.unwrap().is_some());
    a.expire_tag("t").await.unwrap();
    assert_eq!(a.get("safe").await.unwrap(), None, "no longer fresh");
    // From L1 here, from L2 on the other instance (which never held it).
    assert_eq!(
        failing_load(a, "safe", &safe).await,
        Some(("kept".into(), true))
    );
    assert_eq!(
        failing_load(b, "safe", &fail_safe(b)).await,
        Some(("kept".into(), true))
    );
    assert_eq!(
        failing_load(a, "plain", &safe).await,
        None,
        "no fail-safe life"
    );
    assert_eq!(failing_load(b, "plain", &fail_safe(b)).await, None);
    // A reload after the expiry is current.
    tokio::time::sleep(Duration::from_millis(5)).await; // real time: past the throttle
    let reloaded = a
        .get_or_load_with("safe", &safe, || async {
            Ok::<_, std::io::Error>(Loaded::new("fresh".to_string()).with_tags(["t"]))
        })
        .await
        .unwrap();
    assert_eq!(
        (reloaded.value.as_str(), reloaded.source),
        ("fresh", Source::Loader)
    );
    eventually(WITHIN, async || {
        b.get("safe").await.unwrap() == Some("fresh".into())
    })
    .await;
    // A removal leaves no fallback, not even the stale copies re-armed above.
    a.set_with_tags("other", "x".into(), &["t"], &safe)
        .await
        .unwrap();
    a.expire_tag("t").await.unwrap();
    assert_eq!(
        failing_load(a, "other", &safe).await,
        Some(("x".into(), true))
    );
    let heard = a.stats().invalidations_received;
    b.invalidate_tag("t").await.unwrap();
    eventually(WITHIN, async || a.stats().invalidations_received > heard).await;
    for cache in [a, b] {
        assert_eq!(failing_load(cache, "safe", &fail_safe(cache)).await, None);
        assert_eq!(failing_load(cache, "other", &fail_safe(cache)).await, None);
    }
}

/// Conditional writes carry tags too: a session created and saved tagged with its user is
/// ended on every instance by one invalidation of the tag, and a save that runs after it
/// (a request that began before the logout) brings nothing back. A session created after the
/// invalidation is current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_carry_tags_and_an_invalidated_tag_ends_them_everywhere() {
    let caches = instances(2, Some(&Arc::new(MemoryStore::new())));
    let (a, b) = (&caches[0], &caches[1]);
    let options = a.default_options();
    let tags = ["user:7"];
    assert!(
        a.set_if_absent_with_tags("s1", "v1".into(), &tags, &options)
            .await
            .unwrap()
    );
    assert!(
        !b.set_if_absent_with_tags("s1", "other".into(), &tags, &options)
            .await
            .unwrap(),
        "a value is there"
    );
    assert!(
        b.set_if_present_with_tags("s1", "v2".into(), &tags, &options)
            .await
            .unwrap()
    );
    assert!(
        a.set_if_absent_with_tags("s2", "w1".into(), &["user:8"], &options)
            .await
            .unwrap()
    );
    for cache in [a, b] {
        eventually(WITHIN, async || {
            cache.get("s1").await.unwrap() == Some("v2".into())
        })
        .await;
    }
    a.invalidate_tag("user:7").await.unwrap();
    assert_eq!(a.get("s1").await.unwrap(), None);
    eventually(WITHIN, async || b.get("s1").await.unwrap().is_none()).await;
    assert!(
        !b.set_if_present_with_tags("s1", "v3".into(), &tags, &options)
            .await
            .unwrap(),
        "an entry of an invalidated tag holds no value"
    );
    for cache in [a, b] {
        assert_eq!(cache.get("s1").await.unwrap(), None, "not brought back");
        assert_eq!(
            cache.get("s2").await.unwrap(),
            Some("w1".into()),
            "another tag"
        );
    }
    assert!(
        b.set_if_absent_with_tags("s1", "new".into(), &tags, &options)
            .await
            .unwrap()
    );
    for cache in [a, b] {
        eventually(WITHIN, async || {
            cache.get("s1").await.unwrap() == Some("new".into())
        })
        .await;
    }
    let bad = a
        .set_if_absent_with_tags("s3", "v".into(), &[""], &options)
        .await;
    assert!(matches!(bad, Err(CacheError::InvalidTag { .. })), "{bad:?}");
    assert_eq!(a.get("s3").await.unwrap(), None, "nothing written");
}

/// Without a backplane, an instance learns of another's invalidation only when it reads the
/// tag's record again (a recheck later). A write must not stamp what it remembers: an entry
/// stamped with the version before the invalidation reads as removed on every instance that
/// knows the current one (a session created right after its user was logged out everywhere
/// would be ended at once elsewhere).
#[tokio::test]
async fn without_a_backplane_a_write_stamps_the_current_version() {
    let l2 = Arc::new(MemoryStore::new());
    let instance = || {
        TieredCache::<String>::builder("svc")
            .l2(l2.clone())
            .build()
            .unwrap()
    };
    let (a, b, c) = (instance(), instance(), instance());
    let options = a.default_options();
    a.set_with_tags("order:1", "o1".into(), &["user:7"], &options)
        .await
        .unwrap();
    // `c` reads the tag's record before the invalidation, and hears nothing of it.
    assert_eq!(c.get("order:1").await.unwrap(), Some("o1".into()));
    b.invalidate_tag("user:7").await.unwrap();
    assert_eq!(b.get("order:1").await.unwrap(), None);
    // `a` still remembers the record it read before the invalidation.
    a.set_with_tags("order:2", "o2".into(), &["user:7"], &options)
        .await
        .unwrap();
    assert!(
        a.set_if_absent_with_tags("order:3", "o3".into(), &["user:7"], &options)
            .await
            .unwrap()
    );
    // Stamped with the current version, they are current everywhere, also on `c`, whose
    // record is behind their stamps: it reads the record anew rather than take them for
    // removed (and a conditional write there finds the value).
    for (name, cache) in [("c", &c), ("a", &a), ("b", &b), ("a fourth", &instance())] {
        assert_eq!(
            cache.get("order:2").await.unwrap(),
            Some("o2".into()),
            "{name}"
        );
        assert_eq!(
            cache.get("order:3").await.unwrap(),
            Some("o3".into()),
            "{name}"
        );
    }
    assert!(
        !c.set_if_absent_with_tags("order:2", "other".into(), &["user:7"], &options)
            .await
            .unwrap(),
        "a value is there"
    );
    // What `c` read before the invalidation is removed, on `c` too once it read the record.
    assert_eq!(c.get("order:1").await.unwrap(), None);
}

#[tokio::test]
async fn bad_tags_are_refused_clearly_and_nothing_is_written() {
    let cache = Fixture::new().cache();
    let options = cache.default_options();
    let too_many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
    let cases: Vec<(Vec<String>, TagProblem)> = vec![
        (vec![String::new()], TagProblem::Empty),
        (
            vec!["x".repeat(MAX_TAG_LEN + 1)],
            TagProblem::TooLong {
                len: MAX_TAG_LEN + 1,
            },
        ),
        (vec!["a\u{0}b".into()], TagProblem::ControlCharacter),
        (
            too_many,
            TagProblem::TooMany {
                count: MAX_TAGS + 1,
            },
        ),
    ];
    for (tags, problem) in cases {
        let result = cache.set_with_tags("k", "v".into(), &tags, &options).await;
        assert!(
            matches!(&result, Err(CacheError::InvalidTag { reason }) if *reason == problem),
            "{problem:?}: {result:?}"
        );
        assert_eq!(cache.get("k").await.unwrap(), None, "nothing written");
    }
    assert!(matches!(
        cache.invalidate_tag("").await,
        Err(CacheError::InvalidTag {
            reason: TagProblem::Empty
        })
    ));
    // A loader's bad tag: its callers get the value, nothing is cached.
    let loads = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let loads = loads.clone();
        let fetched = cache
            .get_or_load_with("k", &options, move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Loaded::new("v".to_string()).with_tags([""]))
            })
            .await
            .unwrap();
        assert_eq!((fetched.value.as_str(), fetched.ttl), ("v", None));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_tagged_entry_may_not_outlive_its_tags_records() {
    let fixture = Fixture::new();
    let cache = fixture
        .builder("test")
        .tag_record_ttl(Duration::from_secs(3600))
        .build()
        .unwrap();
    let long = cache.default_options().with_ttl(Duration::from_secs(7200));
    assert!(matches!(
        cache.set_with_tags("k", "v".into(), &["t"], &long).await,
        Err(CacheError::InvalidTtl { .. })
    ));
    let stale_too_long = cache
        .default_options()
        .with_fail_safe(FailSafe::new(Duration::from_secs(3600)));
    assert!(matches!(
        cache
            .set_with_tags("k", "v".into(), &["t"], &stale_too_long)
            .await,
        Err(CacheError::InvalidTtl { .. })
    ));
    assert_eq!(cache.get("k").await.unwrap(), None);
    // Untagged, the same options are fine.
    cache.set_with("k", "v".into(), &long).await.unwrap();
    assert!(matches!(
        TieredCache::<String>::builder("x")
            .tag_record_ttl(Duration::ZERO)
            .build(),
        Err(CacheError::Configuration(message)) if message.contains("tag_record_ttl")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_l2_tags_reach_every_instance_through_the_backplane() {
    let caches = instances(2, None);
    let (a, b) = (&caches[0], &caches[1]);
    let options = a.default_options();
    // Each instance its own keys: without an L2, another instance's write of a key evicts
    // this one's copy.
    for (cache, own) in [(a, "a"), (b, "b")] {
        cache
            .set_with_tags(own, "v".into(), &["t"], &options)
            .await
            .unwrap();
        cache
            .set(&format!("plain-{own}"), "p".into())
            .await
            .unwrap();
    }
    a.invalidate_tag("t").await.unwrap();
    assert_eq!(a.get("a").await.unwrap(), None);
    eventually(WITHIN, async || b.get("b").await.unwrap().is_none()).await;
    assert_eq!(b.get("plain-b").await.unwrap(), Some("p".into()));
    assert_eq!(a.get("plain-a").await.unwrap(), Some("p".into()));
    for (cache, own) in [(a, "a"), (b, "b")] {
        cache
            .set_with_tags(own, "v2".into(), &["t"], &options)
            .await
            .unwrap();
        assert_eq!(cache.get(own).await.unwrap(), Some("v2".into()));
    }
}

#[tokio::test]
async fn a_record_lost_from_the_l2_removes_what_was_stamped_under_it() {
    let fixture = Fixture::new();
    let writer = fixture.cache();
    let options = writer.default_options();
    // Stamped when the tag was first used, before any invalidation.
    writer
        .set_with_tags("early", "e".into(), &["t"], &options)
        .await
        .unwrap();
    let record = fixture.l2.get("test!tag:t").await.unwrap().unwrap();
    assert_eq!(
        TagRecord::decode(&record).map(|r| r.counter),
        Some(0),
        "created at first use"
    );
    writer.invalidate_tag("t").await.unwrap();
    writer
        .set_with_tags("late", "l".into(), &["t"], &options)
        .await
        .unwrap();
    assert_eq!(fixture.cache().get("early").await.unwrap(), None);
    assert_eq!(fixture.cache().get("late").await.unwrap(), Some("l".into()));
    // Evicted, say: an instance that reads it again misses both rather than trust either (the
    // one removed before must not come back).
    fixture.l2.delete("test!tag:t").await.unwrap();
    assert_eq!(fixture.cache().get("early").await.unwrap(), None);
    assert_eq!(fixture.cache().get("late").await.unwrap(), None);
}

#[tokio::test]
async fn a_record_in_use_is_kept_past_its_first_ttl() {
    let fixture = Fixture::new();
    let hour = Duration::from_secs(3600);
    let cache = || {
        fixture
            .builder("test")
            .tag_record_ttl(hour)
            .build()
            .unwrap()
    };
    let options = cache()
        .default_options()
        .with_ttl(Duration::from_secs(1800));
    cache()
        .set_with_tags("k", "v".into(), &["t"], &options)
        .await
        .unwrap();
    fixture.clock.advance(Duration::from_secs(40 * 60));
    // Read with 20 minutes left, under half its TTL: given a whole one again.
    assert_eq!(
        cache().get("k").await.unwrap(),
        None,
        "the entry itself expired"
    );
    cache()
        .set_with_tags("k", "v2".into(), &["t"], &options)
        .await
        .unwrap();
    fixture.clock.advance(Duration::from_secs(25 * 60));
    assert!(
        fixture.l2.get("test!tag:t").await.unwrap().is_some(),
        "past its first hour"
    );
    assert_eq!(cache().get("k").await.unwrap(), Some("v2".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_whose_tag_was_removed_during_the_load_is_not_served() {
    let caches = instances(1, Some(&Arc::new(MemoryStore::new())));
    let cache = caches[0].clone();
    let safe = fail_safe(&cache);
    cache
        .set_with_tags("k", "old".into(), &["t"], &safe)
        .await
        .unwrap();
    cache.expire_tag("t").await.unwrap();
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let load = {
        let (cache, started, release) = (cache.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            let options = fail_safe(&cache);
            cache
                .get_or_load_with("k", &options, move || async move {
                    started.notify_one();
                    release.notified().await;
                    Err::<String, _>(std::io::Error::other("origin down"))
                })
                .await
        })
    };
    started.notified().await;
    cache.invalidate_tag("t").await.unwrap();
    release.notify_one();
    assert!(
        load.await.unwrap().is_err(),
        "no stale answer after a removal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_message_this_build_would_refuse_is_dropped() {
    let bus = MemoryBus::new();
    let cache = TieredCache::<String>::builder("shared")
        .backplane(Arc::new(bus.backplane()))
        .build()
        .unwrap();
    let options = cache.default_options();
    cache
        .set_with_tags("k", "v".into(), &["t"], &options)
        .await
        .unwrap();
    let other = bus.backplane();
    for bad in [String::new(), "x".repeat(10_000), "a\nb".into()] {
        let message = tierstack::core::Invalidation::Tag {
            tag: bad,
            remove: true,
        };
        tierstack::core::Backplane::publish(&other, "shared", &message)
            .await
            .unwrap();
    }
    eventually(WITHIN, async || cache.stats().invalidations_received == 3).await;
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
}

#[tokio::test]
async fn an_l2_that_fails_the_invalidation_fails_it_and_changes_nothing() {
    let fixture = Fixture::new();
    let cache = fixture.cache();
    let options = cache.default_options();
    cache
        .set_with_tags("k", "v".into(), &["t"], &options)
        .await
        .unwrap();
    fixture.faulty.set_failing(true);
    assert!(cache.invalidate_tag("t").await.is_err());
    fixture.faulty.set_failing(false);
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
    assert_eq!(fixture.cache().get("k").await.unwrap(), Some("v".into()));
    assert_eq!(cache.stats().tag_invalidations, 0);
    // And a tagged write whose tag cannot be read fails without writing.
    let other = fixture.cache();
    fixture.faulty.set_failing(true);
    assert!(
        other
            .set_with_tags("k2", "v".into(), &["new-tag"], &options)
            .await
            .is_err()
    );
    fixture.faulty.set_failing(false);
    assert_eq!(other.get("k2").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invalidations_of_one_tag_all_land() {
    let l2 = Arc::new(MemoryStore::new());
    let caches = instances(2, Some(&l2));
    let mut tasks = Vec::new();
    for round in 0..20 {
        let cache = caches[round % 2].clone();
        tasks.push(tokio::spawn(
            async move { cache.invalidate_tag("hot").await },
        ));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let bytes = l2.get("shared!tag:hot").await.unwrap().unwrap();
    let record = TagRecord::decode(&bytes).unwrap();
    assert_eq!(record.counter, 20, "each raised the record once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_l1_judges_tagged_entries_from_the_l2_again() {
    let caches = instances(1, Some(&Arc::new(MemoryStore::new())));
    let cache = &caches[0];
    let options = cache.default_options();
    cache
        .set_with_tags("before", "b".into(), &["t"], &options)
        .await
        .unwrap();
    cache.invalidate_tag("t").await.unwrap();
    cache
        .set_with_tags("after", "a".into(), &["t"], &options)
        .await
        .unwrap();
    cache.invalidate_local_all();
    assert_eq!(cache.get("before").await.unwrap(), None);
    assert_eq!(cache.get("after").await.unwrap(), Some("a".into()));
    let loaded = cache
        .get_or_load("before", || async {
            Ok::<_, std::io::Error>("b2".to_string())
        })
        .await
        .unwrap();
    assert_eq!(loaded, "b2");
}

/// A tagged entry whose tags' records cannot be read is not known to be current, nor gone: a
/// read returning L2 errors fails (a session's load, which must not sign its user out), a plain
/// read misses as on a failed L2, and a conditional write fails rather than replace it. Once
/// the records read again, the entry is there, untouched.
#[tokio::test]
async fn an_entry_whose_tag_records_cannot_be_read_is_neither_gone_nor_replaced() {
    let l2 = Arc::new(PickyStore::new());
    let writer = TieredCache::<String>::builder("svc")
        .l2(l2.clone())
        .build()
        .unwrap();
    let options = writer.default_options();
    writer
        .set_with_tags("s1", "v".into(), &["user:7"], &options)
        .await
        .unwrap();
    // Another instance, without L1: every read judges the L2's entry, and it knows no record.
    let reader = TieredCache::<String>::builder("svc")
        .without_l1()
        .l2(l2.clone())
        .build()
        .unwrap();
    l2.fail_reads_of(Some("!tag:"));
    let strict = reader.default_options().with_l2_errors_returned(true);
    let read = reader.get_with("s1", &strict).await;
    assert!(matches!(read, Err(CacheError::Timeout { .. })), "{read:?}");
    assert_eq!(
        reader.get("s1").await.unwrap(),
        None,
        "a miss, as on a failed L2"
    );
    let replaced = reader.set_if_absent("s1", "other".into(), &options).await;
    assert!(replaced.is_err(), "{replaced:?}");
    l2.fail_reads_of(None);
    assert_eq!(reader.get("s1").await.unwrap(), Some("v".into()));
}

/// A write kept for a replay never answers for a later write of the key that cannot be
/// judged (its tags' records cannot be read): the read fails as a failed L2 read would,
/// rather than serve the older kept value.
#[tokio::test]
async fn a_kept_write_does_not_answer_for_a_later_entry_that_cannot_be_judged() {
    let l2 = Arc::new(PickyStore::new());
    let clock = tierstack::core::clock::ManualClock::new();
    let instance = |recovering: bool| {
        let builder = TieredCache::<String>::builder("svc")
            .without_l1()
            .l2(l2.clone())
            .clock(Arc::new(clock.clone()));
        if recovering {
            // A replay an hour away: the kept write stays kept for the whole test.
            builder
                .write_recovery(
                    tierstack::WriteRecovery::new(16).with_retry_interval(Duration::from_hours(1)),
                )
                .default_options(EntryOptions::default().with_write_recovery(true))
        } else {
            builder
        }
        .build()
        .unwrap()
    };
    let (a, b) = (instance(true), instance(false));
    l2.fail_writes_of(Some(""), true);
    a.set("k", "kept".into()).await.unwrap();
    l2.fail_writes_of(None, true);
    assert_eq!(
        a.get("k").await.unwrap(),
        Some("kept".into()),
        "the kept write answers"
    );
    clock.advance(Duration::from_secs(1));
    b.set_with_tags("k", "later".into(), &["t"], &b.default_options())
        .await
        .unwrap();
    l2.fail_reads_of(Some("!tag:"));
    let strict = a.default_options().with_l2_errors_returned(true);
    let read = a.get_with("k", &strict).await;
    assert!(matches!(read, Err(CacheError::Timeout { .. })), "{read:?}");
    assert_eq!(a.get("k").await.unwrap(), None, "not the older kept value");
    l2.fail_reads_of(None);
    assert_eq!(a.get("k").await.unwrap(), Some("later".into()));
}
