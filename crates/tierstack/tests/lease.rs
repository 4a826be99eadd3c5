//! Cluster-wide single-flight: instances that share an L2 (and a backplane) load a missed key
//! once between them, whoever holds the lease fails, is cancelled or stalls.
//!
//! Time runs on Tokio's paused clock (the loaders' delays, the waiters' polls); the store's
//! entries, the lease included, expire on the fixture's manual clock.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Calls, Fixture};
use tierstack::core::Store as _;
use tierstack::core::testkit::MemoryBus;
use tierstack::{EntryOptions, FailSafe, LoadError, LoadLease, Source, TieredCache};
use tokio::sync::oneshot;

const LEASE: Duration = Duration::from_secs(10);
const ORIGIN: Duration = Duration::from_millis(20);

fn leased() -> EntryOptions {
    EntryOptions::default()
        .with_ttl(Duration::from_secs(60))
        .with_load_lease(LoadLease::new(LEASE))
}

/// `count` instances over the fixture's L2, on `bus` if any.
fn instances(fx: &Fixture, bus: Option<&MemoryBus>, count: usize) -> Vec<TieredCache<String>> {
    (0..count)
        .map(|_| {
            let builder = fx.builder("test");
            match bus {
                Some(bus) => builder.backplane(Arc::new(bus.backplane())),
                None => builder,
            }
            .build()
            .unwrap()
        })
        .collect()
}

/// `callers` tasks per instance asking for `key` at once, each with a loader that counts its
/// call and answers after `ORIGIN`; their answers.
async fn stampede(
    caches: &[TieredCache<String>],
    callers: usize,
    key: &'static str,
    options: EntryOptions,
    calls: &Calls,
) -> Vec<Result<String, LoadError<std::io::Error>>> {
    let mut tasks = Vec::new();
    for cache in caches {
        for _ in 0..callers {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load_with(key, &options, move || async move {
                        let n = calls.hit();
                        tokio::time::sleep(ORIGIN).await; // paused clock
                        Ok::<_, std::io::Error>(format!("v{n}"))
                    })
                    .await
                    .map(|fetched| fetched.value)
            }));
        }
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test(start_paused = true)]
async fn four_instances_load_a_cold_key_once() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let caches = instances(&fx, Some(&bus), 4);
    let calls = Calls::default();
    let answers = stampede(&caches, 250, "hot", leased(), &calls).await;
    assert_eq!(calls.count(), 1);
    assert_eq!(answers.len(), 1_000);
    assert!(answers.iter().all(|a| a.as_ref().unwrap() == "v1"));
    let taken: u64 = caches.iter().map(|c| c.stats().leased_loads).sum();
    let waited: u64 = caches.iter().map(|c| c.stats().lease_waits).sum();
    assert_eq!((taken, waited), (1, 3));
    // The lease is gone, and every instance serves the value from its own L1 now.
    assert!(!fx.l2.exists("test!lease:hot").await.unwrap());
    for cache in &caches {
        let fetched = cache
            .get_or_load_with("hot", &leased(), || async {
                Ok::<_, std::io::Error>("again".to_owned())
            })
            .await
            .unwrap();
        assert_eq!((fetched.value.as_str(), fetched.source), ("v1", Source::L1));
    }
}

#[tokio::test(start_paused = true)]
async fn without_the_lease_each_instance_loads() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let caches = instances(&fx, Some(&bus), 4);
    let calls = Calls::default();
    let plain = leased().without_load_lease();
    stampede(&caches, 250, "hot", plain, &calls).await;
    assert_eq!(
        calls.count(),
        4,
        "one load per instance: what the lease saves"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_backplane_the_waiters_poll() {
    let fx = Fixture::new();
    let caches = instances(&fx, None, 4);
    let calls = Calls::default();
    let started = tokio::time::Instant::now();
    let answers = stampede(&caches, 50, "hot", leased(), &calls).await;
    assert_eq!(calls.count(), 1);
    assert!(answers.iter().all(|a| a.as_ref().unwrap() == "v1"));
    // The holder's 20 ms load, then at most one 50 ms poll.
    assert!(started.elapsed() <= ORIGIN + Duration::from_millis(50));
}

/// Starts a load of `key` on `holder` whose loader waits until told; returns once it holds
/// the lease, with the sender that lets the loader answer and the task of the call.
async fn stalled_holder(
    fx: &Fixture,
    holder: &TieredCache<String>,
    key: &'static str,
    options: EntryOptions,
) -> (
    oneshot::Sender<String>,
    tokio::task::JoinHandle<Result<String, LoadError<std::io::Error>>>,
) {
    let (answer, answered) = oneshot::channel::<String>();
    let cache = holder.clone();
    let task = tokio::spawn(async move {
        cache
            .get_or_load_with(key, &options, move || async move {
                Ok::<_, std::io::Error>(answered.await.unwrap_or_default())
            })
            .await
            .map(|fetched| fetched.value)
    });
    until_leased(fx, key).await;
    (answer, task)
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_stalls_past_its_lease_loses_it_and_cannot_overwrite_the_newer_value() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let caches = instances(&fx, Some(&bus), 2);
    let (holder, waiter) = (&caches[0], &caches[1]);
    let (answer, stalled) = stalled_holder(&fx, holder, "k", leased()).await;
    let calls = Calls::default();
    let waiting = {
        let (cache, calls) = (waiter.clone(), calls.clone());
        tokio::spawn(async move {
            cache
                .get_or_load_with("k", &leased(), move || async move {
                    calls.hit();
                    Ok::<_, std::io::Error>("new".to_owned())
                })
                .await
        })
    };
    // The waiter waits while the lease lives...
    tokio::time::sleep(Duration::from_secs(1)).await; // paused clock
    assert_eq!(calls.count(), 0);
    // ...and takes it over once it has run out.
    fx.clock.advance(LEASE);
    let fetched = tokio::time::timeout(Duration::from_secs(1), waiting) // paused clock
        .await
        .expect("the waiter took the lease over")
        .unwrap()
        .unwrap();
    assert_eq!(
        (fetched.value.as_str(), fetched.source),
        ("new", Source::Loader)
    );
    assert_eq!(calls.count(), 1);
    // The stalled holder answers its own callers, but its late write loses to the newer value.
    answer.send("old".to_owned()).unwrap();
    assert_eq!(stalled.await.unwrap().unwrap(), "old");
    for cache in instances(&fx, None, 1) {
        assert_eq!(cache.get("k").await.unwrap(), Some("new".into()));
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_holder_releases_its_lease_and_a_waiter_takes_it_at_its_next_poll() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let caches = instances(&fx, Some(&bus), 2);
    // An inline load (`get_or_load`, under the cache's default options): cancelling the call
    // cancels its flight.
    let holder = fx
        .builder("test")
        .backplane(Arc::new(bus.backplane()))
        .default_options(leased())
        .build()
        .unwrap();
    let cancelled = tokio::spawn(async move {
        holder
            .get_or_load("k", || async {
                std::future::pending::<()>().await;
                Ok::<_, std::io::Error>("never".to_owned())
            })
            .await
    });
    until_leased(&fx, "k").await;
    let calls = Calls::default();
    let started = tokio::time::Instant::now();
    let waiting = {
        let (cache, calls) = (caches[1].clone(), calls.clone());
        tokio::spawn(async move {
            cache
                .get_or_load_with("k", &leased(), move || async move {
                    calls.hit();
                    Ok::<_, std::io::Error>("taken over".to_owned())
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await; // paused clock
    assert_eq!(calls.count(), 0, "the lease still lives");
    cancelled.abort();
    let fetched = tokio::time::timeout(LEASE, waiting) // paused clock
        .await
        .expect("taken over before the lease's TTL")
        .unwrap()
        .unwrap();
    assert_eq!(fetched.value, "taken over");
    assert_eq!(calls.count(), 1);
    // Released with the cancelled flight, not at the lease's TTL (10 s): the waiter's next poll
    // (at most 400 ms apart after its backoff) takes it.
    assert!(started.elapsed() <= Duration::from_millis(200 + 400));
}

async fn until_leased(fx: &Fixture, key: &str) {
    let lease = format!("test!lease:{key}");
    for _ in 0..1_000 {
        if fx.l2.exists(&lease).await.unwrap() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("nobody took the lease");
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_loader_panics_lets_one_waiter_load() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let caches = instances(&fx, Some(&bus), 4);
    let calls = Calls::default();
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..25 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load_with("k", &leased(), move || async move {
                        let n = calls.hit();
                        tokio::time::sleep(ORIGIN).await; // paused clock
                        assert!(n > 1, "the first load panics");
                        Ok::<_, std::io::Error>(format!("v{n}"))
                    })
                    .await
            }));
        }
    }
    let mut panicked = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(fetched) => assert_eq!(fetched.value, "v2"),
            Err(LoadError::Panicked) => panicked += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    // The holder's own callers share its panic; one other instance loads for the rest.
    assert_eq!(calls.count(), 2);
    assert_eq!(panicked, 25);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_keeps_its_deadlines() {
    let fx = Fixture::new();
    let bus = MemoryBus::new();
    let caches = instances(&fx, Some(&bus), 2);
    // A stale value in L2 (fail-safe keeps it past its TTL).
    let fail_safe = leased()
        .with_ttl(Duration::from_secs(1))
        .with_fail_safe(FailSafe::new(Duration::from_secs(3600)));
    caches[0]
        .set_with("k", "stale".into(), &fail_safe)
        .await
        .unwrap();
    fx.clock.advance(Duration::from_secs(2));
    for cache in &caches {
        cache.invalidate_local("k");
    }
    let (answer, stalled) = stalled_holder(&fx, &caches[0], "k", fail_safe).await;
    // Without fail-safe: a timeout at the hard deadline.
    let hurried = leased().with_hard_timeout(Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    let timed_out = caches[1]
        .get_or_load_with("k", &hurried, || async {
            Ok::<_, std::io::Error>("unused".to_owned())
        })
        .await;
    assert!(
        matches!(timed_out, Err(LoadError::TimedOut { .. })),
        "{timed_out:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    // With fail-safe and a soft timeout: the stale value, at the soft timeout.
    let soft = fail_safe.with_soft_timeout(Duration::from_millis(100));
    let started = tokio::time::Instant::now();
    let fetched = caches[1]
        .get_or_load_with("k", &soft, || async {
            Ok::<_, std::io::Error>("unused".to_owned())
        })
        .await
        .unwrap();
    assert_eq!((fetched.value.as_str(), fetched.stale), ("stale", true));
    assert!(started.elapsed() <= Duration::from_millis(100));
    answer.send("fresh".to_owned()).unwrap();
    assert_eq!(stalled.await.unwrap().unwrap(), "fresh");
}

#[tokio::test(start_paused = true)]
async fn an_l2_that_cannot_lease_leaves_each_instance_to_load() {
    let fx = Fixture::new();
    let caches = instances(&fx, None, 2);
    fx.faulty.set_failing(true);
    let calls = Calls::default();
    let answers = stampede(&caches, 10, "k", leased(), &calls).await;
    assert!(answers.iter().all(Result::is_ok));
    assert_eq!(calls.count(), 2);
    let unavailable: u64 = caches.iter().map(|c| c.stats().leases_unavailable).sum();
    assert_eq!(unavailable, 2);
}

#[test]
fn a_lease_out_of_range_is_refused() {
    let options = EntryOptions::default().with_load_lease(
        LoadLease::new(Duration::from_secs(1)).with_poll_interval(Duration::from_secs(5)),
    );
    let fx = Fixture::new();
    let error = fx
        .builder("test")
        .default_options(options)
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("load_lease"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_holder_without_background_completion_answers_while_its_value_is_being_written() {
    let fx = Fixture::new();
    let faulty = tierstack::core::testkit::FaultyStore::new(fx.l2.clone());
    let cache: TieredCache<String> = fx
        .builder("test")
        .l2(Arc::new(faulty.clone()))
        .l2_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let hard = Duration::from_millis(100);
    // The caller's flight itself stops at the hard timeout (with background completion, the
    // caller stops waiting for it instead, and the flight writes on).
    let options = leased()
        .with_hard_timeout(hard)
        .with_background_completion(false);
    // The lease is taken (a conditional write), then every write freezes: the value's too.
    let started = tokio::time::Instant::now();
    let holding = faulty.clone();
    let loading = cache.get_or_load_with("k", &options, move || async move {
        holding.hold_writes(true);
        Ok::<_, std::io::Error>("v".to_string())
    });
    let fetched = loading.await.unwrap();
    assert_eq!(fetched.value, "v");
    assert_eq!(fetched.ttl, None, "not known yet");
    assert!(
        started.elapsed() < hard,
        "answered in {:?}",
        started.elapsed()
    );
    assert_eq!(faulty.held_writes(), 1, "the value's write goes on");
    faulty.hold_writes(false);
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: it lands
    assert!(fx.holds("test:k").await);
    assert_eq!(fx.l2.get("test!lease:k").await.unwrap(), None, "released");
}

/// The fixture's store, but a lease request (a `set_if_absent` of a lease key) answers only
/// after `LATE`, once it has landed: a request that times out yet takes the lease.
#[derive(Debug)]
struct LateLeases(Arc<tierstack::core::testkit::MemoryStore>);

const LATE: Duration = Duration::from_secs(5);

#[async_trait::async_trait]
impl tierstack::core::Store for LateLeases {
    async fn get(&self, key: &str) -> tierstack::core::Result<Option<bytes::Bytes>> {
        self.0.get(key).await
    }
    async fn set(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> tierstack::core::Result<()> {
        self.0.set(key, value, ttl).await
    }
    async fn set_if_absent(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> tierstack::core::Result<bool> {
        let taken = self.0.set_if_absent(key, value, ttl).await;
        if key.contains("!lease:") {
            tokio::time::sleep(LATE).await; // paused clock: the answer is late
        }
        taken
    }
    async fn replace(
        &self,
        key: &str,
        value: bytes::Bytes,
        ttl: Duration,
    ) -> tierstack::core::Result<Option<bytes::Bytes>> {
        self.0.replace(key, value, ttl).await
    }
    async fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        new: Option<(bytes::Bytes, Duration)>,
    ) -> tierstack::core::Result<bool> {
        self.0.compare_and_set(key, expected, new).await
    }
    async fn delete(&self, key: &str) -> tierstack::core::Result<bool> {
        self.0.delete(key).await
    }
    async fn expire(&self, key: &str, ttl: Duration) -> tierstack::core::Result<bool> {
        self.0.expire(key, ttl).await
    }
    async fn ttl(&self, key: &str) -> tierstack::core::Result<Option<Duration>> {
        self.0.ttl(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> tierstack::core::Result<u64> {
        self.0.delete_prefix(prefix).await
    }
    async fn ping(&self) -> tierstack::core::Result<()> {
        self.0.ping().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_request_that_times_out_but_lands_is_released() {
    let fx = Fixture::new();
    let cache: TieredCache<String> = fx
        .builder("test")
        .l2(Arc::new(LateLeases(fx.l2.clone())))
        .l2_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let fetched = cache
        .get_or_load_with("k", &leased(), || async {
            Ok::<_, std::io::Error>("v".to_string())
        })
        .await
        .unwrap();
    assert_eq!(fetched.value, "v");
    assert_eq!(cache.stats().leases_unavailable, 1, "loaded without it");
    tokio::time::sleep(Duration::from_millis(10)).await; // paused clock: the release runs
    assert_eq!(
        fx.l2.get("test!lease:k").await.unwrap(),
        None,
        "nobody waits for the lease's TTL"
    );
}
