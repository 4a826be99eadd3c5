//! The `metrics` counters a cache reports, through a local debugging recorder.

mod common;

use std::time::Duration;

use common::{Calls, Fixture, loader};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// A metric: its name, labels and value.
type Metric = (String, Vec<(String, String)>, DebugValue);
type Snapshot = [Metric];

fn counter(snapshot: &Snapshot, name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, value)| match value {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

/// Every metric the recorder holds: its name, labels and value.
fn flatten(snapshotter: &metrics_util::debugging::Snapshotter) -> Vec<Metric> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect()
}

#[tokio::test]
async fn hits_misses_loads_and_l2_errors_are_counted_per_tier() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let fx = Fixture::new();
    // Handles are created once, at build; they keep reporting to this recorder afterwards.
    let cache = metrics::with_local_recorder(&recorder, || fx.builder("metered").build().unwrap());
    let calls = Calls::default();
    cache.get_or_load("a", loader(&calls, "1")).await.unwrap(); // miss + load
    cache.wait_for_background_fills().await; // the L2 write of the loaded value
    cache.get("a").await.unwrap(); // L1 hit
    cache.invalidate_local("a");
    cache.get("a").await.unwrap(); // L2 hit
    fx.faulty.fail_next(1);
    cache.get("b").await.unwrap(); // L2 error, then miss
    fx.l2
        .put_raw("metered:c", b"junk".to_vec(), Duration::from_secs(60));
    cache.get("c").await.unwrap(); // corrupt entry

    let snapshot = flatten(&snapshotter);
    let cache_label = ("cache", "metered");
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_hits_total",
            &[cache_label, ("tier", "l1")]
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_hits_total",
            &[cache_label, ("tier", "l2")]
        ),
        1
    );
    assert_eq!(
        counter(&snapshot, "tierstack_misses_total", &[cache_label]),
        3
    );
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_loads_total",
            &[cache_label, ("result", "ok")]
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_l2_errors_total",
            &[cache_label, ("op", "get")]
        ),
        1
    );
    assert_eq!(
        counter(&snapshot, "tierstack_corrupt_entries_total", &[cache_label]),
        1
    );
    let histograms = snapshot
        .iter()
        .filter(|(n, _, _)| n == "tierstack_l2_duration_seconds")
        .count();
    assert_eq!(histograms, 4, "one L2 latency histogram per operation kind");
    let stats = cache.stats();
    assert_eq!(
        (stats.l1_hits, stats.l2_hits, stats.misses, stats.l2_errors),
        (1, 1, 3, 1)
    );
}

/// The counters of the resilience features: the L2 breaker's changes of state, tag
/// invalidations and writes kept for a replay.
#[tokio::test]
async fn breaker_changes_tag_invalidations_and_kept_writes_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let fx = Fixture::new();
    let cache = metrics::with_local_recorder(&recorder, || {
        fx.builder("resilient")
            .l2_circuit_breaker(tierstack::CircuitBreaker::new(2, Duration::from_secs(60)))
            .write_recovery(tierstack::WriteRecovery::new(100))
            .build()
            .unwrap()
    });
    let options = cache.default_options();
    cache
        .set_with_tags("tagged", "v".into(), &["t"], &options)
        .await
        .unwrap();
    cache.invalidate_tag("t").await.unwrap();
    let leased = options.with_load_lease(tierstack::LoadLease::new(Duration::from_secs(10)));
    let loaded = cache
        .get_or_load_inline("leased", &leased, || async {
            Ok::<_, std::io::Error>("v".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(loaded, "v");
    fx.faulty.set_failing(true);
    let recovering = options.with_write_recovery(true);
    cache
        .set_with("kept", "v".into(), &recovering)
        .await
        .unwrap();
    for key in ["a", "b", "c"] {
        assert_eq!(cache.get(key).await.unwrap(), None);
    }
    let snapshot = flatten(&snapshotter);
    let cache_label = ("cache", "resilient");
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_l2_circuit_changes_total",
            &[cache_label, ("state", "open")]
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_tag_invalidations_total",
            &[cache_label, ("mode", "remove")]
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_write_recovery_total",
            &[cache_label, ("outcome", "kept")]
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            "tierstack_load_leases_total",
            &[cache_label, ("outcome", "taken")]
        ),
        1
    );
    let stats = cache.stats();
    assert_eq!((stats.l2_circuit_opens, stats.writes_kept), (1, 1));
}

fn gauge(snapshot: &Snapshot, name: &str, cache: &str) -> Option<f64> {
    snapshot.iter().find_map(|(n, labels, value)| match value {
        DebugValue::Gauge(value)
            if n == name && labels.iter().any(|(k, v)| k == "cache" && v == cache) =>
        {
            Some(value.0)
        }
        _ => None,
    })
}

#[tokio::test]
async fn l1_size_is_reported_by_gauges_and_stats() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let fx = Fixture::new();
    let weigher: tierstack::moka::Weigher<String> =
        std::sync::Arc::new(|key: &str, value: &String| {
            u32::try_from(key.len() + value.len()).unwrap()
        });
    let capacity = tierstack::moka::L1Capacity::Bytes {
        max_bytes: 1 << 20,
        weigher,
    };
    let cache = metrics::with_local_recorder(&recorder, || {
        fx.builder("sized").l1_capacity(capacity).build().unwrap()
    });
    for i in 0..10 {
        // 100 bytes each: a key of 2, a value of 98.
        cache.set(&format!("k{i}"), "x".repeat(98)).await.unwrap();
    }
    // moka counts as its housekeeping runs, which the cache's use drives: the next fills (of
    // the same value) report its count.
    let size = async |entries: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            cache.set("k1", "x".repeat(98)).await.unwrap();
            let stats = cache.stats();
            let snapshot = flatten(&snapshotter);
            let reported = (
                gauge(&snapshot, "tierstack_l1_entries", "sized"),
                gauge(&snapshot, "tierstack_l1_weighted_size", "sized"),
            );
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let expected = (Some(entries as f64), Some((entries * 100) as f64));
            if (stats.l1_entries, stats.l1_weighted_size) == (entries, entries * 100)
                && reported == expected
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{stats:?} {reported:?}, expected {entries} entries"
            );
            // poll loop
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    size(10).await;
    cache.invalidate_local("k0");
    size(9).await;
    let without_l1 = fx.builder("none").without_l1().build().unwrap();
    without_l1.set("k", "v".into()).await.unwrap();
    assert_eq!(without_l1.stats().l1_entries, 0);
}
