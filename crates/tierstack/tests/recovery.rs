//! Auto-recovery: writes and deletes that the L2 failed are kept, replayed once it answers, and
//! never overwrite a later write. Tokio's clock is paused (the replay's retry interval); the
//! entries' write times come from the fixture's manual clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, FlakyBackplane};
use tierstack::core::envelope::Envelope;
use tierstack::core::testkit::{FaultyStore, MemoryBus};
use tierstack::core::{BincodeCodec, CacheError, Codec as _, Store as _};
use tierstack::{CircuitBreaker, EntryOptions, FailSafe, TieredCache, WriteRecovery};

const RETRY: Duration = Duration::from_millis(500);

fn recovering() -> EntryOptions {
    EntryOptions::default()
        .with_ttl(Duration::from_secs(60))
        .with_write_recovery(true)
}

/// An instance over its own fault injector around the fixture's L2, on `bus`.
fn instance(fx: &Fixture, bus: &MemoryBus, recovery: usize) -> (TieredCache<String>, FaultyStore) {
    let faulty = FaultyStore::new(fx.l2.clone());
    let cache = TieredCache::builder("test")
        .l2(Arc::new(faulty.clone()))
        .clock(Arc::new(fx.clock.clone()))
        .backplane(Arc::new(bus.backplane()))
        .l2_timeout(Duration::from_millis(100))
        .write_recovery(WriteRecovery::new(recovery).with_retry_interval(RETRY))
        .build()
        .unwrap();
    (cache, faulty)
}

/// `k` read through `cache`, its loader answering "reloaded".
async fn reload(cache: &TieredCache<String>) -> String {
    cache
        .get_or_load("k", || async {
            Ok::<_, std::io::Error>("reloaded".to_string())
        })
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_write_the_l2_failed_is_kept_and_replayed_once_it_answers() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    let (b, _) = instance(&fx, &bus, 100);
    a.set("k", "old".into()).await.unwrap();
    tokio::time::sleep(RETRY).await; // paused clock: B hears of the write
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    // A millisecond later (a write of the same millisecond is another test's).
    fx.clock.advance(Duration::from_millis(1));
    a_l2.set_failing(true);
    a.set_with("k", "new".into(), &recovering()).await.unwrap();
    assert!(a.delete_with("gone", &recovering()).await.is_ok());
    // This instance serves its write; the L2 and the others still have the old value.
    assert_eq!(a.get("k").await.unwrap(), Some("new".into()));
    assert_eq!(b.get("k").await.unwrap(), Some("old".into()));
    assert_eq!(a.stats().writes_kept, 2);
    // Still failing: the replay keeps trying.
    tokio::time::sleep(RETRY * 3).await; // paused clock
    assert_eq!(a.stats().writes_replayed, 0);
    a_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock: the next attempt replays
    assert_eq!(a.stats().writes_replayed, 2);
    assert_eq!(b.get("k").await.unwrap(), Some("new".into()), "B was told");
    assert!(!fx.holds("test:gone").await);
}

#[tokio::test(start_paused = true)]
async fn a_replay_never_overwrites_a_later_write_of_another_instance() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    let (b, _) = instance(&fx, &bus, 100);
    a_l2.set_failing(true);
    a.set_with("k", "a's, during the outage".into(), &recovering())
        .await
        .unwrap();
    a.set_with("d", "a's".into(), &recovering()).await.unwrap();
    // Later, another instance writes both keys (it deletes one).
    fx.clock.advance(Duration::from_millis(5));
    b.set("k", "b's, later".into()).await.unwrap();
    assert!(!b.delete("d").await.unwrap());
    a_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock: the replay
    assert_eq!(a.stats().writes_superseded, 2);
    assert_eq!(a.stats().writes_replayed, 0);
    // Every instance converges on the later writes, A included (its own copies were evicted).
    for cache in [&a, &b] {
        assert_eq!(cache.get("k").await.unwrap(), Some("b's, later".into()));
        assert_eq!(cache.get("d").await.unwrap(), None);
    }
}

/// Write times are in milliseconds: a write of another instance in the same millisecond as a
/// kept one may have come before it or after it. The replay writes neither: a tombstone of
/// that millisecond replaces the entry, the replaying instance drops its own copy, and the
/// next read loads the origin's value. A third instance's kept write from an earlier
/// millisecond, replayed after, still loses to it. (A replay that won the tie kept an older
/// value in the L2 for its whole TTL when the other write was the later one; one that removed
/// the entry let the earlier write in. The races test found both.)
#[tokio::test(start_paused = true)]
async fn a_replay_removes_a_write_of_the_same_millisecond_rather_than_guess_the_order() {
    let fx = Fixture::new();
    // Apart, as when the outage takes the backplane down too: none hears of the others.
    let (a, a_l2) = instance(&fx, &MemoryBus::new(), 100);
    let (b, _) = instance(&fx, &MemoryBus::new(), 100);
    let (c, c_l2) = instance(&fx, &MemoryBus::new(), 100);
    c_l2.set_failing(true);
    c.set_with("k", "c's, kept, earlier".into(), &recovering())
        .await
        .unwrap();
    fx.clock.advance(Duration::from_millis(1));
    a_l2.set_failing(true);
    a.set_with("k", "a's, kept".into(), &recovering())
        .await
        .unwrap();
    b.set("k", "b's, same millisecond".into()).await.unwrap();
    a_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock: A's replay
    assert_eq!(a.stats().writes_superseded, 1);
    c_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock: C's replay
    assert_eq!(c.stats().writes_superseded, 1, "the earlier write loses");
    let stored = fx.l2.get("test:k").await.unwrap().expect("a tombstone");
    assert!(
        tierstack::core::envelope::is_tombstone(&stored),
        "neither write stays in L2"
    );
    // A's own copy of its kept write goes too: it serves nothing, then the origin's value.
    assert_eq!(a.get("k").await.unwrap(), None);
    assert_eq!(reload(&a).await, "reloaded");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_returns_the_error_and_counts_the_write_dropped() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 1);
    a_l2.set_failing(true);
    a.set_with("one", "1".into(), &recovering()).await.unwrap();
    // The same key again replaces it; another key does not fit.
    a.set_with("one", "2".into(), &recovering()).await.unwrap();
    let error = a
        .set_with("two", "2".into(), &recovering())
        .await
        .unwrap_err();
    assert!(matches!(error, CacheError::Connection { .. }), "{error:?}");
    // A call that does not ask for recovery gets its error too.
    let error = a.set("three", "3".into()).await.unwrap_err();
    assert!(error.is_transient());
    let stats = a.stats();
    assert_eq!((stats.writes_kept, stats.writes_dropped), (2, 1));
    a_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock
    assert_eq!(a.stats().writes_replayed, 1);
    assert_eq!(b_reads(&fx, &bus, "one").await, Some("2".into()));
}

#[tokio::test(start_paused = true)]
async fn a_kept_write_that_expires_before_the_l2_answers_is_not_replayed() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    a_l2.set_failing(true);
    let short = recovering().with_ttl(Duration::from_secs(1));
    a.set_with("k", "short-lived".into(), &short).await.unwrap();
    fx.clock.advance(Duration::from_secs(2));
    a_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock
    let stats = a.stats();
    assert_eq!((stats.writes_replayed, stats.writes_dropped), (0, 1));
    assert!(!fx.holds("test:k").await);
}

/// What a new instance reads under `key`.
async fn b_reads(fx: &Fixture, bus: &MemoryBus, key: &str) -> Option<String> {
    instance(fx, bus, 1).0.get(key).await.unwrap()
}

#[test]
fn a_queue_out_of_range_is_refused() {
    let fx = Fixture::new();
    let error = fx
        .builder("test")
        .write_recovery(WriteRecovery::new(0))
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("write_recovery"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_prefix_delete_after_a_kept_write_wins_over_its_replay() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    let (b, _) = instance(&fx, &bus, 100);
    a_l2.set_failing(true);
    a.set_with("p:1", "kept".into(), &recovering())
        .await
        .unwrap();
    a.set_with("q:1", "kept".into(), &recovering())
        .await
        .unwrap();
    // Another instance deletes the prefix: it leaves no tombstone to compare with, so A's
    // listener drops the kept write under it.
    b.delete_prefix("p:").await.unwrap();
    tokio::time::sleep(RETRY).await; // paused clock: A hears of it
    a_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock: the replay
    let stats = a.stats();
    assert_eq!((stats.writes_replayed, stats.writes_superseded), (1, 1));
    assert!(!fx.holds("test:p:1").await);
    assert!(fx.holds("test:q:1").await);
}

#[tokio::test(start_paused = true)]
async fn a_prefix_delete_heard_late_leaves_the_writes_kept_after_it() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    // B deletes the prefix while its backplane is down: the others hear of it only later.
    let b_backplane = Arc::new(FlakyBackplane::new(bus.backplane()));
    let b = TieredCache::<String>::builder("test")
        .l2(fx.l2.clone())
        .clock(Arc::new(fx.clock.clone()))
        .backplane(b_backplane.clone())
        .l2_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    a_l2.set_failing(true);
    a.set_with("p:before", "kept".into(), &recovering())
        .await
        .unwrap();
    fx.clock.advance(Duration::from_millis(1));
    b_backplane.set_failing(true);
    b.delete_prefix("p:").await.unwrap();
    fx.clock.advance(Duration::from_millis(1));
    // Made after the delete: newer than it, however late its message comes.
    a.set_with("p:after", "kept".into(), &recovering())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // paused clock: B holds the message
    assert_eq!(a.stats().invalidations_received, 0);
    b_backplane.set_failing(false);
    // paused clock: B's next round of sending what it held (its pause doubles while it fails)
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.stats().invalidations_received, 1);
    a_l2.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock: the replay
    let stats = a.stats();
    assert_eq!((stats.writes_replayed, stats.writes_superseded), (1, 1));
    assert!(!fx.holds("test:p:before").await);
    assert!(fx.holds("test:p:after").await, "the later write was lost");
    assert_eq!(b_reads(&fx, &bus, "p:after").await, Some("kept".into()));
}

#[tokio::test(start_paused = true)]
async fn a_prefix_delete_the_breaker_refused_leaves_every_kept_write() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (b, b_l2) = instance(&fx, &bus, 100);
    let a_l2 = FaultyStore::new(fx.l2.clone());
    let a = TieredCache::<String>::builder("test")
        .l2(Arc::new(a_l2.clone()))
        .clock(Arc::new(fx.clock.clone()))
        .backplane(Arc::new(bus.backplane()))
        .l2_timeout(Duration::from_millis(100))
        .l2_circuit_breaker(CircuitBreaker::new(1, Duration::from_secs(5)))
        .write_recovery(WriteRecovery::new(100).with_retry_interval(RETRY))
        .build()
        .unwrap();
    a_l2.set_failing(true);
    b_l2.set_failing(true);
    // Each keeps a write; A's failure opens its breaker.
    a.set_with("p:1", "kept".into(), &recovering())
        .await
        .unwrap();
    b.set_with("p:2", "kept".into(), &recovering())
        .await
        .unwrap();
    fx.clock.advance(Duration::from_millis(1));
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: B hears of A's write
    let heard = b.stats().invalidations_received;
    let refused = a.delete_prefix("p:").await.unwrap_err();
    assert!(
        matches!(refused, CacheError::CircuitOpen { .. }),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await; // paused clock: B hears of the delete
    assert_eq!(b.stats().invalidations_received, heard + 1);
    // The delete deleted nothing: the kept writes, newer than what the L2 holds, stay.
    a_l2.set_failing(false);
    b_l2.set_failing(false);
    tokio::time::sleep(Duration::from_secs(6)).await; // paused clock: breaker, then replays
    assert_eq!(a.stats().writes_superseded + b.stats().writes_superseded, 0);
    assert!(fx.holds("test:p:1").await, "A's kept write was lost");
    assert!(fx.holds("test:p:2").await, "B's kept write was lost");
}

#[tokio::test(start_paused = true)]
async fn a_kept_delete_whose_tombstone_expired_still_removes_the_older_value() {
    let fx = Fixture::new();
    let faulty = FaultyStore::new(fx.l2.clone());
    let a: TieredCache<String> = TieredCache::builder("test")
        .l2(Arc::new(faulty.clone()))
        .clock(Arc::new(fx.clock.clone()))
        .l2_timeout(Duration::from_millis(100))
        .tombstone_ttl(Duration::from_secs(1))
        .write_recovery(WriteRecovery::new(10).with_retry_interval(RETRY))
        .build()
        .unwrap();
    a.set_with("k", "deleted later".into(), &recovering())
        .await
        .unwrap();
    fx.clock.advance(Duration::from_millis(1));
    faulty.set_failing(true);
    assert!(a.delete_with("k", &recovering()).await.is_ok());
    // The outage outlasts the tombstone; the value it deleted is still in L2.
    fx.clock.advance(Duration::from_secs(2));
    assert!(fx.holds("test:k").await);
    faulty.set_failing(false);
    tokio::time::sleep(RETRY * 2).await; // paused clock: the replay
    assert!(
        !fx.holds("test:k").await,
        "the deleted value did not come back"
    );
    assert_eq!(a.get("k").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_kept_delete_is_what_this_instance_reads_until_it_is_replayed() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    let (b, _) = instance(&fx, &bus, 100);
    b.set("k", "deleted".into()).await.unwrap();
    a_l2.set_failing(true);
    assert!(a.delete_with("k", &recovering()).await.is_ok());
    // The L2 answers again, but the replay has not run: the deleted value is still there,
    // and this instance must not read it back.
    a_l2.set_failing(false);
    assert!(fx.holds("test:k").await);
    assert_eq!(a.get("k").await.unwrap(), None);
    assert_eq!(a.get_many(&["k"]).await.unwrap(), vec![None]);
    assert_eq!(reload(&a).await, "reloaded");
    tokio::time::sleep(RETRY * 2).await; // paused clock: the replay
    assert_eq!(b.get("k").await.unwrap(), None, "the delete reached the L2");
}

#[tokio::test(start_paused = true)]
async fn a_prefix_delete_during_a_replay_removes_what_it_wrote_and_stops_the_rest() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    a_l2.set_failing(true);
    for key in ["p:1", "p:2"] {
        a.set_with(key, "kept".into(), &recovering()).await.unwrap();
    }
    // The replay's first write is frozen in flight while this instance deletes the prefix.
    a_l2.hold_writes(true);
    a_l2.set_failing(false);
    while a_l2.held_writes() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await; // poll loop, paused clock
    }
    let deleting = tokio::spawn({
        let a = a.clone();
        async move { a.delete_prefix("p:").await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: the delete waits
    a_l2.hold_writes(false);
    deleting.await.unwrap().unwrap();
    tokio::time::sleep(RETRY * 3).await; // paused clock: any replay left would run
    assert!(!fx.holds("test:p:1").await, "written before the scan");
    assert!(!fx.holds("test:p:2").await, "not replayed after it");
    assert_eq!(a.get("p:2").await.unwrap(), None);
}

#[test]
fn a_replay_cancelled_with_its_runtime_is_started_again_by_the_next_kept_write() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let first = paused();
    let (a, a_l2) = first.block_on(async { instance(&fx, &bus, 100) });
    a_l2.set_failing(true);
    first.block_on(async {
        a.set_with("one", "1".into(), &recovering()).await.unwrap();
    });
    // Its replay task dies with the runtime.
    drop(first);
    paused().block_on(async {
        a.set_with("two", "2".into(), &recovering()).await.unwrap();
        a_l2.set_failing(false);
        tokio::time::sleep(RETRY * 2).await; // paused clock: the new task replays both
        assert_eq!(a.stats().writes_replayed, 2);
        assert!(fx.holds("test:one").await && fx.holds("test:two").await);
    });
}

#[tokio::test(start_paused = true)]
async fn a_kept_write_that_has_expired_is_not_served() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    a_l2.set_failing(true);
    let short = recovering().with_ttl(Duration::from_secs(1));
    a.set_with("k", "short-lived".into(), &short).await.unwrap();
    assert_eq!(a.get("k").await.unwrap(), Some("short-lived".into()));
    fx.clock.advance(Duration::from_secs(2));
    a.invalidate_local("k");
    // Still down: the kept write is what this instance has, but it has expired.
    assert_eq!(a.get("k").await.unwrap(), None);
    assert_eq!(a.get_many(&["k"]).await.unwrap(), vec![None]);
}

#[tokio::test(start_paused = true)]
async fn a_later_write_of_another_instance_is_read_over_a_kept_one() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    let (b, _) = instance(&fx, &bus, 100);
    a_l2.set_failing(true);
    a.set_with("k", "a's, kept".into(), &recovering())
        .await
        .unwrap();
    fx.clock.advance(Duration::from_millis(5));
    b.set("k", "b's, later".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: A hears of it
    // The L2 answers again before A's replay: A reads B's later write, not its own.
    a_l2.set_failing(false);
    assert_eq!(a.get("k").await.unwrap(), Some("b's, later".into()));
    assert_eq!(
        a.get_many(&["k"]).await.unwrap(),
        vec![Some("b's, later".into())]
    );
    tokio::time::sleep(RETRY * 2).await; // paused clock: the replay
    assert_eq!(a.stats().writes_superseded, 1);
    assert_eq!(b.get("k").await.unwrap(), Some("b's, later".into()));
}

/// A value loaded after a kept delete is cached over what the L2 holds (the delete never
/// reached it). The replayed delete, older, stands down without removing it, and tells the
/// other instances, as a replay does: one that read the old value again after the delete holds
/// it in L1. (It used to keep serving it: the fill published nothing, and the superseded replay
/// evicted only this instance's copy.) Found by the races test (tierstack-redis `races.rs`).
#[tokio::test(start_paused = true)]
async fn a_value_loaded_over_a_kept_delete_reaches_an_instance_that_reread_the_old_one() {
    loaded_over_a_kept_delete(false).await;
}

/// The same for a batch's fill (`get_or_load_many`).
#[tokio::test(start_paused = true)]
async fn a_batch_loaded_over_a_kept_delete_reaches_an_instance_that_reread_the_old_one() {
    loaded_over_a_kept_delete(true).await;
}

async fn loaded_over_a_kept_delete(batched: bool) {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    let (b, _) = instance(&fx, &bus, 100);
    b.set("k", "deleted".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: A hears of it
    fx.clock.advance(Duration::from_millis(5));
    a_l2.set_failing(true);
    assert!(a.delete_with("k", &recovering()).await.is_ok());
    a_l2.set_failing(false);
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: B hears of the delete
    // The delete never reached the L2: B reads the old value again, into its L1.
    assert_eq!(b.get("k").await.unwrap(), Some("deleted".into()));
    fx.clock.advance(Duration::from_millis(5));
    if batched {
        let loaded = a
            .get_or_load_many(&["k"], |keys: Vec<String>| async move {
                let loaded = keys.into_iter().map(|key| (key, "reloaded".to_string()));
                Ok::<_, std::io::Error>(loaded.collect())
            })
            .await
            .unwrap();
        assert_eq!(loaded, vec![Some("reloaded".to_string())]);
    } else {
        assert_eq!(reload(&a).await, "reloaded");
    }
    a.wait_for_background_fills().await;
    let stored = fx.l2.get("test:k").await.unwrap().unwrap();
    let envelope = Envelope::parse::<BincodeCodec>(&stored, usize::MAX).unwrap();
    let value: String = BincodeCodec::default().decode(envelope.payload).unwrap();
    assert_eq!(
        value, "reloaded",
        "the fill replaced the deleted value in L2"
    );
    tokio::time::sleep(RETRY * 2).await; // paused clock: the replay stands down, and tells B
    assert_eq!(a.stats().writes_superseded, 1);
    assert_eq!(b.get("k").await.unwrap(), Some("reloaded".into()));
}

/// A load over a live entry that no kept delete hid (here a fail-safe entry past its fresh
/// time) tells nobody, as before: the others' copies are theirs to refresh, and a refresh on
/// one instance must not empty every other's L1.
#[tokio::test(start_paused = true)]
async fn a_reload_over_a_live_entry_tells_nobody() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, _) = instance(&fx, &bus, 100);
    let (b, _) = instance(&fx, &bus, 100);
    let options = EntryOptions::default()
        .with_ttl(Duration::from_secs(60))
        .with_fail_safe(FailSafe::new(Duration::from_secs(3600)));
    let load = |value: &'static str| async move { Ok::<_, std::io::Error>(value.to_string()) };
    let first = a.get_or_load_inline("k", &options, || load("v1")).await;
    assert_eq!(first.unwrap(), "v1");
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: anything sent arrives
    let heard = b.stats().invalidations_received;
    fx.clock.advance(Duration::from_secs(61));
    let reloaded = a.get_or_load_inline("k", &options, || load("v2")).await;
    assert_eq!(reloaded.unwrap(), "v2");
    a.wait_for_background_fills().await;
    let stored = fx.l2.get("test:k").await.unwrap().unwrap();
    let envelope = Envelope::parse::<BincodeCodec>(&stored, usize::MAX).unwrap();
    let value: String = BincodeCodec::default().decode(envelope.payload).unwrap();
    assert_eq!(value, "v2", "the reload wrote over the live entry");
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: anything sent arrives
    assert_eq!(b.stats().invalidations_received, heard);
}

#[tokio::test(start_paused = true)]
async fn a_value_loaded_over_a_stale_kept_write_lands_in_an_empty_l2() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let (a, a_l2) = instance(&fx, &bus, 100);
    let options = recovering()
        .with_ttl(Duration::from_secs(1))
        .with_fail_safe(tierstack::FailSafe::new(Duration::from_secs(3600)));
    a_l2.set_failing(true);
    a.set_with("k", "kept".into(), &options).await.unwrap();
    fx.clock.advance(Duration::from_secs(2));
    a_l2.set_failing(false);
    // The kept write is stale and the L2 holds nothing: the load writes over nothing.
    let loaded = a
        .get_or_load_with("k", &options, || async {
            Ok::<_, std::io::Error>("fresh".to_string())
        })
        .await
        .unwrap();
    assert_eq!(loaded.value, "fresh");
    a.wait_for_background_fills().await;
    let stored = fx.l2.get("test:k").await.unwrap().expect("cached in L2");
    let envelope = Envelope::parse::<BincodeCodec>(&stored, usize::MAX).unwrap();
    let value: String = BincodeCodec::default().decode(envelope.payload).unwrap();
    assert_eq!(value, "fresh");
}

/// A load that began before another instance's kept write, and whose fill reaches the L2 first
/// (after the outage), loses to that write's replay: the loaded value is as old as its
/// loader's start, and the entry says so. (Stamped with the time of its fill, it passed for
/// newer and the replay stood down: the L2 kept the older value for its whole TTL.)
#[tokio::test(start_paused = true)]
async fn a_load_that_began_before_a_kept_write_loses_to_its_replay() {
    for batched in [false, true] {
        let fx = Fixture::new();
        // Apart, as when the outage takes the backplane down too: A does not hear of B's
        // write before its fill.
        let (a, _) = instance(&fx, &MemoryBus::new(), 100);
        let (b, b_l2) = instance(&fx, &MemoryBus::new(), 100);
        let release = Arc::new(tokio::sync::Notify::new());
        let started = Arc::new(tokio::sync::Notify::new());
        let load = {
            let (a, release, started) = (a.clone(), release.clone(), started.clone());
            tokio::spawn(async move {
                // The database's value when the loader reads it.
                if batched {
                    a.get_or_load_many(&["k"], |_| async move {
                        started.notify_one();
                        release.notified().await;
                        Ok::<_, std::io::Error>(std::collections::HashMap::from([(
                            "k".to_owned(),
                            "loaded before".to_owned(),
                        )]))
                    })
                    .await
                    .map(|_| ())
                } else {
                    a.get_or_load("k", || async move {
                        started.notify_one();
                        release.notified().await;
                        Ok::<_, std::io::Error>("loaded before".to_owned())
                    })
                    .await
                    .map(|_| ())
                }
            })
        };
        started.notified().await;
        // Meanwhile, B writes the key during its outage: kept for a replay.
        fx.clock.advance(Duration::from_millis(5));
        b_l2.set_failing(true);
        b.set_with("k", "written later".into(), &recovering())
            .await
            .unwrap();
        // The load's fill reaches the L2 later still, before B's replay.
        fx.clock.advance(Duration::from_millis(5));
        release.notify_one();
        load.await.unwrap().unwrap();
        a.wait_for_background_fills().await;
        b_l2.set_failing(false);
        tokio::time::sleep(RETRY * 2).await; // paused clock: B's replay
        assert_eq!(b.stats().writes_replayed, 1, "batched {batched}");
        let stored = fx.l2.get("test:k").await.unwrap().expect("cached in L2");
        let envelope = Envelope::parse::<BincodeCodec>(&stored, usize::MAX).unwrap();
        let value: String = BincodeCodec::default().decode(envelope.payload).unwrap();
        assert_eq!(value, "written later", "batched {batched}");
    }
}
