//! Refreshing datasets over the in-memory L2 and bus: the start, refreshes that write only what
//! changed and remove what is gone, backoff while the source fails (the last good data served
//! meanwhile), on-demand fills, shutdown, and two instances sharing one refresh per interval.
//! Tokio's clock is paused (the schedule); the entries' times come from the fixture's clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Fixture, PickyStore};
use tierstack::TieredCache;
use tierstack::core::Store as _;
use tierstack::core::testkit::MemoryBus;
use tierstack::dataset::{Dataset, DatasetBuilder, DatasetError, DatasetEvent, Role};

const EVERY: Duration = Duration::from_secs(60);

/// A source table that tests change, fail, and count reads of.
#[derive(Clone, Default)]
struct Source {
    rows: Arc<Mutex<HashMap<String, String>>>,
    down: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    single_reads: Arc<AtomicUsize>,
}

impl Source {
    fn with(rows: &[(&str, &str)]) -> Self {
        let source = Self::default();
        for (key, value) in rows {
            source.put(key, value);
        }
        source
    }

    fn put(&self, key: &str, value: &str) {
        self.rows.lock().unwrap().insert(key.into(), value.into());
    }

    fn remove(&self, key: &str) {
        self.rows.lock().unwrap().remove(key);
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// `fetch_all` over this source.
    fn fetch_all(
        &self,
    ) -> impl Fn() -> std::future::Ready<Result<HashMap<String, String>, std::io::Error>>
    + Send
    + Sync
    + 'static {
        let source = self.clone();
        move || {
            source.reads.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if source.down.load(Ordering::SeqCst) {
                Err(std::io::Error::other("the database is down"))
            } else {
                Ok(source.rows.lock().unwrap().clone())
            })
        }
    }
}

fn cache(fx: &Fixture, bus: Option<&MemoryBus>) -> TieredCache<String> {
    let builder = fx.builder("tools");
    match bus {
        Some(bus) => builder.backplane(Arc::new(bus.backplane())),
        None => builder,
    }
    .build()
    .unwrap()
}

/// A dataset of `source` on the fixture's L2 (no backplane), refreshed every `EVERY`.
fn dataset(fx: &Fixture, source: &Source) -> DatasetBuilder<String> {
    Dataset::builder(cache(fx, None), source.fetch_all()).refresh_every(EVERY)
}

#[tokio::test(start_paused = true)]
async fn a_dataset_is_loaded_at_start_and_served() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1"), ("b", "2"), ("c", "3")]);
    let tools = dataset(&fx, &source).start().await.unwrap();
    assert_eq!(tools.get("a").await.unwrap(), Some("1".into()));
    assert_eq!(tools.get("missing").await.unwrap(), None);
    let state = tools.state();
    assert_eq!((state.entries, state.generation, state.changed), (3, 1, 3));
    assert_eq!(state.role, Role::Refresher);
    assert!(state.last_refresh.is_some() && state.next_attempt.is_some());
    let mut keys = tools.keys();
    keys.sort();
    assert_eq!(keys, ["a", "b", "c"]);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_writes_what_changed_and_removes_what_is_gone() {
    let fx = Fixture::new();
    let source = Source::with(&[("same", "s"), ("changes", "old"), ("goes", "g")]);
    let tools = dataset(&fx, &source).start().await.unwrap();
    let mut events = tools.events();
    let same_before = fx.l2.get("tools:same").await.unwrap();
    source.put("changes", "new");
    source.remove("goes");
    source.put("comes", "c");
    tokio::time::sleep(EVERY).await; // paused clock: one refresh
    let Ok(DatasetEvent::Refreshed(report)) = events.recv().await else {
        panic!("no refresh");
    };
    assert_eq!((report.changed, report.removed, report.entries), (2, 1, 3));
    assert_eq!(tools.get("changes").await.unwrap(), Some("new".into()));
    assert_eq!(tools.get("comes").await.unwrap(), Some("c".into()));
    assert_eq!(tools.get("goes").await.unwrap(), None);
    assert!(!fx.holds("tools:goes").await);
    let same_after = fx.l2.get("tools:same").await.unwrap();
    assert_eq!(
        same_before, same_after,
        "the unchanged entry was not rewritten"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_source_is_retried_with_backoff_while_the_last_good_data_is_served() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1")]);
    let tools = dataset(&fx, &source)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .start()
        .await
        .unwrap();
    let mut events = tools.events();
    source.set_down(true);
    let mut waits = Vec::new();
    for expected in 1..=5 {
        let DatasetEvent::RefreshFailed {
            consecutive_failures,
            retry_in,
            error,
        } = events.recv().await.unwrap()
        else {
            panic!("not a failure");
        };
        assert_eq!(consecutive_failures, expected);
        assert!(matches!(*error, DatasetError::Fetch(_)), "{error:?}");
        waits.push(retry_in);
        // The last good data is served meanwhile.
        assert_eq!(tools.get("a").await.unwrap(), Some("1".into()));
    }
    // Doubling from 1 s up to 8 s, each between half and all of it; at the third failure in a
    // row the holder lets the lease go and waits an interval, for another to try.
    for (n, (wait, full)) in waits.iter().zip([1, 2, 4, 8, 8]).enumerate() {
        let full = Duration::from_secs(full);
        if n == 2 {
            assert_eq!(*wait, EVERY, "{waits:?}");
        } else {
            assert!(*wait >= full / 2 && *wait <= full, "{waits:?}");
        }
    }
    assert_eq!(tools.state().consecutive_failures, 5);
    source.set_down(false);
    source.put("a", "2");
    loop {
        if let DatasetEvent::Refreshed(report) = events.recv().await.unwrap() {
            assert_eq!(report.changed, 1);
            break;
        }
    }
    assert_eq!(tools.state().consecutive_failures, 0);
    assert_eq!(tools.get("a").await.unwrap(), Some("2".into()));
}

#[tokio::test(start_paused = true)]
async fn a_start_retries_a_bounded_number_of_times() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1")]);
    source.set_down(true);
    let error = Dataset::builder(cache(&fx, None), source.fetch_all())
        .initial_attempts(3)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(error, DatasetError::Fetch(_)), "{error:?}");
    assert_eq!(source.reads(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_missing_key_is_fetched_once_under_a_hundred_concurrent_callers() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1")]);
    let fetch_single = {
        let source = source.clone();
        move |key: String| {
            let source = source.clone();
            async move {
                source.single_reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await; // paused clock: a query
                Ok::<_, std::io::Error>(Some(format!("{key} on demand")))
            }
        }
    };
    let tools = Arc::new(
        Dataset::builder(cache(&fx, None), source.fetch_all())
            .fetch_single(fetch_single)
            .start()
            .await
            .unwrap(),
    );
    let mut callers = Vec::new();
    for _ in 0..100 {
        let tools = Arc::clone(&tools);
        callers.push(tokio::spawn(async move { tools.get("new").await.unwrap() }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), Some("new on demand".into()));
    }
    assert_eq!(source.single_reads.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_the_refreshes_and_frees_the_lease() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1")]);
    let tools = dataset(&fx, &source).start().await.unwrap();
    tokio::time::sleep(EVERY * 2 + EVERY / 2).await; // paused clock: two refreshes
    assert_eq!(source.reads(), 3);
    assert!(fx.l2.get("tools!dataset:lease").await.unwrap().is_some());
    tools.shutdown().await;
    assert_eq!(fx.l2.get("tools!dataset:lease").await.unwrap(), None);
    tokio::time::sleep(EVERY * 10).await; // paused clock: nothing more runs
    assert_eq!(source.reads(), 3);
}

#[tokio::test(start_paused = true)]
async fn two_instances_refresh_once_per_interval_and_both_serve_the_result() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let source = Source::with(&[("a", "1")]);
    let first = Dataset::builder(cache(&fx, Some(&bus)), source.fetch_all())
        .refresh_every(EVERY)
        .start()
        .await
        .unwrap();
    tokio::time::sleep(EVERY / 3).await; // paused clock: the second starts out of phase
    let second = Dataset::builder(cache(&fx, Some(&bus)), source.fetch_all())
        .refresh_every(EVERY)
        .start()
        .await
        .unwrap();
    assert_eq!(second.state().role, Role::Follower);
    assert_eq!(second.get("a").await.unwrap(), Some("1".into()));
    assert_eq!(source.reads(), 1, "the second took the first's data");
    source.put("a", "2");
    tokio::time::sleep(EVERY * 5 + EVERY / 2).await; // paused clock: five intervals
    assert_eq!(source.reads(), 6, "one refresh per interval");
    for dataset in [&first, &second] {
        assert_eq!(dataset.get("a").await.unwrap(), Some("2".into()));
        assert_eq!(dataset.state().generation, 6);
    }
    assert_eq!(first.state().role, Role::Refresher);
    assert_eq!(second.state().role, Role::Follower);
    // The refresher stops: the other takes over within an interval.
    first.shutdown().await;
    tokio::time::sleep(EVERY * 2).await; // paused clock
    assert_eq!(second.state().role, Role::Refresher);
}

#[tokio::test(start_paused = true)]
async fn settings_out_of_range_are_refused() {
    let fx = Fixture::new();
    let source = Source::default();
    let refused = [
        Dataset::builder(cache(&fx, None), source.fetch_all())
            .refresh_every(EVERY)
            .entry_ttl(EVERY)
            .start()
            .await,
        Dataset::builder(cache(&fx, None), source.fetch_all())
            .initial_attempts(0)
            .start()
            .await,
        Dataset::builder(cache(&fx, None), source.fetch_all())
            .backoff(Duration::from_secs(2), Duration::from_secs(1))
            .start()
            .await,
        Dataset::builder(cache(&fx, None), source.fetch_all())
            .refresh_every(Duration::ZERO)
            .start()
            .await,
    ];
    for (i, refused) in refused.into_iter().enumerate() {
        let error = refused.unwrap_err();
        assert!(
            matches!(
                error,
                DatasetError::Cache(tierstack::CacheError::Configuration(_))
            ),
            "{i}: {error:?}"
        );
    }
    assert_eq!(source.reads(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_a_fetch_under_way() {
    let fx = Fixture::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let fetch_all = {
        let calls = Arc::clone(&calls);
        move || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if call > 0 {
                    tokio::time::sleep(Duration::from_secs(3600)).await; // paused clock: hangs
                }
                Ok::<_, std::io::Error>(vec![("a".to_string(), "1".to_string())])
            }
        }
    };
    let tools = Dataset::builder(cache(&fx, None), fetch_all)
        .refresh_every(EVERY)
        .fetch_timeout(EVERY)
        .start()
        .await
        .unwrap();
    tokio::time::sleep(EVERY + Duration::from_secs(1)).await; // paused clock: it hangs
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stopping = tokio::time::Instant::now();
    tools.shutdown().await;
    assert_eq!(stopping.elapsed(), Duration::ZERO, "not waited for");
}

#[tokio::test(start_paused = true)]
async fn without_an_l2_each_instance_refreshes_for_itself() {
    let source = Source::with(&[("a", "1")]);
    let cache: TieredCache<String> = TieredCache::builder("local").build().unwrap();
    let tools = Dataset::builder(cache, source.fetch_all())
        .refresh_every(EVERY)
        .start()
        .await
        .unwrap();
    source.put("a", "2");
    tokio::time::sleep(EVERY + EVERY / 2).await; // paused clock: one refresh
    assert_eq!(tools.get("a").await.unwrap(), Some("2".into()));
    assert_eq!(tools.state().role, Role::Refresher);
}

#[tokio::test(start_paused = true)]
async fn the_last_good_data_outlives_an_outage_of_half_its_ttl_but_not_its_ttl() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1")]);
    let tools = dataset(&fx, &source)
        .entry_ttl(EVERY * 4)
        .start()
        .await
        .unwrap();
    source.set_down(true);
    fx.clock.advance(EVERY * 3);
    tokio::time::sleep(EVERY * 3).await; // paused clock: failed attempts
    assert!(tools.state().consecutive_failures > 0);
    assert_eq!(tools.get("a").await.unwrap(), Some("1".into()));
    fx.clock.advance(EVERY * 2);
    assert_eq!(tools.get("a").await.unwrap(), None, "expired with its TTL");
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_entry_is_rewritten_once_half_its_ttl_has_passed() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1")]);
    let tools = dataset(&fx, &source)
        .entry_ttl(EVERY * 4)
        .start()
        .await
        .unwrap();
    let before = fx.l2.get("tools:a").await.unwrap();
    tokio::time::sleep(EVERY + EVERY / 2).await; // paused clock: a refresh, nothing old
    assert_eq!(fx.l2.get("tools:a").await.unwrap(), before);
    fx.clock.advance(EVERY * 3);
    tokio::time::sleep(EVERY).await; // paused clock: the next, past half the TTL
    assert_ne!(
        fx.l2.get("tools:a").await.unwrap(),
        before,
        "rewritten to live on"
    );
    assert_eq!(tools.state().changed, 0, "an aged entry is no change");
}

#[tokio::test(start_paused = true)]
async fn a_version_decides_what_changed() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "v1 first")]);
    let tools = dataset(&fx, &source)
        // The version is the text before the space.
        .version(|value: &String| u64::from(value.as_bytes()[1] - b'0'))
        .start()
        .await
        .unwrap();
    source.put("a", "v1 edited without a new version");
    tokio::time::sleep(EVERY + EVERY / 2).await; // paused clock: a refresh
    assert_eq!(tools.get("a").await.unwrap(), Some("v1 first".into()));
    source.put("a", "v2 second");
    tokio::time::sleep(EVERY).await; // paused clock: a refresh
    assert_eq!(tools.get("a").await.unwrap(), Some("v2 second".into()));
}

/// The L2 loses everything (a Redis restarted without its data, a flush): the next refresh
/// writes every entry again, though the index known here says each is in place and unchanged
/// (compared with it, they would stay missing for half their TTL).
#[tokio::test(start_paused = true)]
async fn a_refresh_after_the_l2_lost_everything_writes_every_entry_again() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1"), ("b", "2")]);
    let cache = fx.builder("tools").without_l1().build().unwrap();
    let tools = Dataset::builder(cache, source.fetch_all())
        .refresh_every(EVERY)
        .start()
        .await
        .unwrap();
    let mut events = tools.events();
    assert_eq!(tools.get("a").await.unwrap(), Some("1".into()));
    fx.l2.delete_prefix("tools").await.unwrap();
    assert_eq!(tools.get("a").await.unwrap(), None, "lost with the L2");
    tokio::time::sleep(EVERY).await; // paused clock: one refresh
    let Ok(DatasetEvent::Refreshed(report)) = events.recv().await else {
        panic!("no refresh");
    };
    assert_eq!(report.entries, 2);
    assert_eq!(tools.get("a").await.unwrap(), Some("1".into()));
    assert_eq!(tools.get("b").await.unwrap(), Some("2".into()));
    // The index is back too: the refresh after writes nothing unchanged (a rewrite would
    // stamp the entry with the moved clock's time).
    let before = fx.l2.get("tools:a").await.unwrap();
    fx.clock.advance(Duration::from_secs(1));
    tokio::time::sleep(EVERY).await; // paused clock: one refresh
    let Ok(DatasetEvent::Refreshed(_)) = events.recv().await else {
        panic!("no refresh");
    };
    assert_eq!(
        fx.l2.get("tools:a").await.unwrap(),
        before,
        "not rewritten again"
    );
}

/// An index the L2 refuses for good (grown too large for it) is not in the L2: the refresher
/// must not take its absence for a lost L2 and write every entry again at each attempt.
#[tokio::test(start_paused = true)]
async fn an_index_the_l2_refuses_does_not_make_every_refresh_a_full_rewrite() {
    let l2 = Arc::new(PickyStore::new());
    let source = Source::with(&[("a", "1"), ("b", "2")]);
    let cache = TieredCache::<String>::builder("tools")
        .without_l1()
        .l2(l2.clone())
        .build()
        .unwrap();
    let tools = Dataset::builder(cache, source.fetch_all())
        .refresh_every(EVERY)
        .start()
        .await
        .unwrap();
    let mut events = tools.events();
    // The dataset grows past what the L2 takes as one index, and the old one is gone.
    l2.fail_writes_of(Some("!dataset:index"), false);
    l2.delete("tools!dataset:index").await.unwrap();
    source.put("c", "3");
    tokio::time::sleep(EVERY).await; // paused clock: one refresh
    let Ok(DatasetEvent::RefreshFailed { .. }) = events.recv().await else {
        panic!("the index was stored");
    };
    let written = l2.writes_of("tools:");
    // paused clock: the retries of a whole interval, each failing to store the index.
    tokio::time::sleep(EVERY).await;
    let failed = tools.state().consecutive_failures;
    assert!(failed > 1, "no retry ran");
    assert_eq!(
        l2.writes_of("tools:"),
        written,
        "{failed} retries rewrote entries"
    );
    assert_eq!(tools.get("c").await.unwrap(), Some("3".into()));
}

#[tokio::test(start_paused = true)]
async fn an_l2_that_fails_a_refresh_gets_its_writes_at_the_next() {
    let fx = Fixture::new();
    let source = Source::with(&[("a", "1")]);
    let tools = dataset(&fx, &source).start().await.unwrap();
    let mut events = tools.events();
    source.put("a", "2");
    fx.faulty.set_failing(true);
    let DatasetEvent::RefreshFailed { error, .. } = events.recv().await.unwrap() else {
        panic!("not a failure");
    };
    assert!(matches!(*error, DatasetError::Cache(_)), "{error:?}");
    fx.faulty.set_failing(false);
    loop {
        if let DatasetEvent::Refreshed(report) = events.recv().await.unwrap() {
            assert_eq!(report.changed, 1);
            break;
        }
    }
    assert_eq!(tools.get("a").await.unwrap(), Some("2".into()));
}

#[tokio::test(start_paused = true)]
async fn refresh_now_refreshes_on_the_holder_and_tells_a_follower_who_does() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let source = Source::with(&[("a", "1")]);
    let first = Dataset::builder(cache(&fx, Some(&bus)), source.fetch_all())
        .start()
        .await
        .unwrap();
    let second = Dataset::builder(cache(&fx, Some(&bus)), source.fetch_all())
        .start()
        .await
        .unwrap();
    source.put("a", "2");
    let report = first.refresh_now().await.unwrap();
    assert_eq!((report.changed, report.generation), (1, 2));
    assert!(matches!(
        second.refresh_now().await,
        Err(DatasetError::NotRefresher)
    ));
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: the invalidation
    assert_eq!(second.get("a").await.unwrap(), Some("2".into()));
}
