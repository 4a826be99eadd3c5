//! The resilience policies over a real Redis: fail-safe across a restart of the cache (Redis
//! keeps the stale entry; for a batch too) and while Redis is down, a slow origin behind a soft
//! timeout, and four instances racing with every policy on.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::core::clock::{Clock, ManualClock, SystemClock};
use tierstack::core::envelope::Envelope;
use tierstack::core::{BincodeCodec, Store};
use tierstack::{EntryOptions, FailSafe, Source, TieredCache};
use tierstack_redis::{RedisConfig, RedisStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

mod common;

const TTL: Duration = Duration::from_secs(10);

fn options() -> EntryOptions {
    EntryOptions::default().with_ttl(TTL).with_fail_safe(
        FailSafe::new(Duration::from_secs(3600)).with_throttle(Duration::from_secs(30)),
    )
}

async fn instance(config: &RedisConfig, clock: &ManualClock) -> TieredCache<String> {
    let store = RedisStore::connect(config).await.unwrap();
    TieredCache::builder("svc")
        .l2(Arc::new(store))
        .clock(Arc::new(clock.clone()))
        .default_options(options())
        .l2_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

fn failing(
    calls: &Arc<AtomicUsize>,
) -> impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + Send + 'static {
    let calls = Arc::clone(calls);
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(std::io::Error::other("origin down")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_value_survives_a_restart_of_the_cache_in_redis() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("rs-restart"));
    let clock = ManualClock::starting_at(SystemClock.now());
    {
        let cache = instance(&config, &clock).await;
        let loaded = cache
            .get_or_load_with("k", &options(), || async {
                Ok::<_, std::io::Error>("v1".to_owned())
            })
            .await
            .unwrap();
        assert_eq!(loaded.source, Source::Loader);
        cache.wait_for_background_fills().await;
    }
    // Past the TTL on the caches' clock; Redis keeps the entry for the fail-safe maximum.
    clock.advance(TTL + Duration::from_secs(1));
    let raw = RedisStore::connect(&config).await.unwrap();
    let bytes = raw.get("svc:k").await.unwrap().expect("kept past its TTL");
    let envelope = Envelope::parse::<BincodeCodec>(&bytes, 1 << 20).unwrap();
    assert!(envelope.fresh_until < clock.now() && clock.now() < envelope.expires_at);
    let redis_ttl = raw.ttl("svc:k").await.unwrap().unwrap();
    assert!(redis_ttl > Duration::from_secs(3000), "{redis_ttl:?}");

    let restarted = instance(&config, &clock).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let stale = restarted
        .get_or_load_with("k", &options(), failing(&calls))
        .await
        .unwrap();
    assert_eq!(
        (stale.value.as_str(), stale.source, stale.stale),
        ("v1", Source::L2, true)
    );
    // Re-armed: the failing origin is not called again within the throttle window.
    for _ in 0..10 {
        assert!(
            restarted
                .get_or_load_with("k", &options(), failing(&calls))
                .await
                .unwrap()
                .stale
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_answers_the_stale_values_redis_kept_across_a_restart() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("rs-batch"));
    let clock = ManualClock::starting_at(SystemClock.now());
    let keys = ["a", "b", "c"];
    {
        let cache = instance(&config, &clock).await;
        let loaded = cache
            .get_or_load_many_with(&keys, &options(), |missing: Vec<String>| async move {
                Ok::<_, std::io::Error>(
                    missing
                        .into_iter()
                        .map(|key| {
                            let value = format!("{key}1");
                            (key, value)
                        })
                        .collect::<std::collections::HashMap<_, _>>(),
                )
            })
            .await
            .unwrap();
        assert_eq!(loaded.len(), 3);
    }
    clock.advance(TTL + Duration::from_secs(1));
    let restarted = instance(&config, &clock).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let failing_batch = |calls: &Arc<AtomicUsize>| {
        let calls = Arc::clone(calls);
        move |_: Vec<String>| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err::<std::collections::HashMap<String, String>, _>(
                std::io::Error::other("origin down"),
            ))
        }
    };
    for _ in 0..5 {
        let stale = restarted
            .get_or_load_many_with(&keys, &options(), failing_batch(&calls))
            .await
            .unwrap();
        let expected: Vec<_> = keys.iter().map(|key| Some(format!("{key}1"))).collect();
        assert_eq!(stale, expected);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "re-armed for the throttle");
    assert_eq!(restarted.stats().stale_served, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_and_the_origin_fails_l1_answers_stale() {
    let mut redis = common::private_redis(&[]);
    let config = RedisConfig::from_url(&redis.url())
        .unwrap()
        .key_prefix(&common::unique_prefix("rs-down"));
    let clock = ManualClock::starting_at(SystemClock.now());
    let cache = instance(&config, &clock).await;
    cache
        .get_or_load("k", || async { Ok::<_, std::io::Error>("v1".to_owned()) })
        .await
        .unwrap();
    cache.wait_for_background_fills().await;
    redis.kill();
    clock.advance(TTL);
    let calls = Arc::new(AtomicUsize::new(0));
    let stale = cache
        .get_or_load_with("k", &options(), failing(&calls))
        .await
        .unwrap();
    assert_eq!(
        (stale.value.as_str(), stale.source, stale.stale),
        ("v1", Source::L1, true)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(cache.stats().l2_errors >= 1, "the L2 read failed");
}

/// An origin on loopback that answers each request with `value` once the test releases it.
struct GatedOrigin {
    address: std::net::SocketAddr,
    release: Arc<Notify>,
}

impl GatedOrigin {
    async fn start(value: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let release = Arc::new(Notify::new());
        let gate = Arc::clone(&release);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let gate = Arc::clone(&gate);
                tokio::spawn(async move {
                    let mut request = [0u8; 1];
                    if socket.read_exact(&mut request).await.is_ok() {
                        gate.notified().await;
                        let _ = socket.write_all(value.as_bytes()).await;
                    }
                });
            }
        });
        Self { address, release }
    }

    /// A loader that asks the origin over TCP.
    fn loader(
        &self,
        done: &Arc<AtomicUsize>,
    ) -> impl FnOnce() -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>,
    > + Send
    + 'static {
        let (address, done) = (self.address, Arc::clone(done));
        move || {
            Box::pin(async move {
                let mut socket = TcpStream::connect(address).await?;
                socket.write_all(b"?").await?;
                let mut answer = String::new();
                socket.read_to_string(&mut answer).await?;
                done.fetch_add(1, Ordering::SeqCst);
                Ok(answer)
            })
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_origin_behind_a_soft_timeout_answers_stale_then_lands_in_redis() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("rs-soft"));
    let clock = ManualClock::starting_at(SystemClock.now());
    let cache = instance(&config, &clock).await;
    cache.set("k", "v1".into()).await.unwrap();
    clock.advance(TTL);
    let origin = GatedOrigin::start("v2").await;
    let done = Arc::new(AtomicUsize::new(0));
    let soft = options()
        .with_soft_timeout(Duration::from_millis(20))
        .with_hard_timeout(Duration::from_secs(30));
    // The origin holds its answer: the call answers the stale value at its soft timeout.
    let stale = cache
        .get_or_load_with("k", &soft, origin.loader(&done))
        .await
        .unwrap();
    assert_eq!((stale.value.as_str(), stale.stale), ("v1", true));
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "the origin has not answered"
    );
    // Released, the load finishes in the background and writes Redis and L1.
    origin.release.notify_one();
    let raw = RedisStore::connect(&config).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let landed = raw.get("svc:k").await.unwrap().is_some_and(|bytes| {
            Envelope::parse::<BincodeCodec>(&bytes, 1 << 20)
                .is_ok_and(|e| e.payload.ends_with(b"v2") && clock.now() < e.fresh_until)
        });
        if landed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "v2 never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // poll loop
    }
    let fresh = cache
        .get_or_load_with("k", &soft, failing(&Arc::default()))
        .await
        .unwrap();
    assert_eq!((fresh.value.as_str(), fresh.stale), ("v2", false));
}

/// The common deployment: the store and its backplane share one Redis. When that Redis dies,
/// the instance loses its subscription (deaf) and its L2 at once; with the origin down too,
/// fail-safe still answers from this instance's L1, and the throttle holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_and_the_origin_die_a_paired_instance_answers_stale_from_l1() {
    let mut redis = common::private_redis(&[]);
    let config = RedisConfig::from_url(&redis.url())
        .unwrap()
        .key_prefix(&common::unique_prefix("rs-paired"));
    let clock = ManualClock::starting_at(SystemClock.now());
    let (store, backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
    let cache: TieredCache<String> = TieredCache::builder("svc")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .clock(Arc::new(clock.clone()))
        .default_options(options())
        .l2_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    cache
        .get_or_load("k", || async { Ok::<_, std::io::Error>("v1".to_owned()) })
        .await
        .unwrap();
    cache.wait_for_background_fills().await;
    redis.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().resyncs == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost subscription was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll loop
    }
    clock.advance(TTL);
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..5 {
        let stale = cache
            .get_or_load_with("k", &options(), failing(&calls))
            .await
            .unwrap();
        assert_eq!(
            (stale.value.as_str(), stale.source, stale.stale),
            ("v1", Source::L1, true)
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one attempt per throttle window"
    );
}

/// Four paired instances on one Redis race sets, deletes and read-through calls with every
/// policy on (fail-safe, soft timeout, eager refresh) over ten keys, with an origin that fails a
/// third of its calls and is slow a quarter of the time. Once they stop, every instance answers
/// every key alike: plain reads (fresh values), and read-through calls while the origin is down
/// (the same stale value, or the same error).
/// Background loads finish and invalidations arrive: every instance reads what the others read,
/// within the delivery time (1 s, far above the sub-millisecond delivery measured).
async fn assert_converge(caches: &[TieredCache<String>], keys: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    for key in keys {
        loop {
            let reads = futures_util::future::join_all(caches.iter().map(|c| c.get(key))).await;
            let reads: Vec<_> = reads.into_iter().map(Result::unwrap).collect();
            if reads.windows(2).all(|w| w[0] == w[1]) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{key} diverges: {reads:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await; // poll loop
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_instances_with_every_policy_on_converge() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("rs-race"));
    let mut caches = Vec::new();
    for _ in 0..4 {
        let (store, backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
        caches.push(
            TieredCache::<String>::builder("race")
                .l2(Arc::new(store))
                .backplane(Arc::new(backplane))
                .l2_timeout(Duration::from_millis(500))
                .build()
                .unwrap(),
        );
    }
    let options = EntryOptions::default()
        .with_ttl(Duration::from_millis(1_500))
        .with_fail_safe(
            FailSafe::new(Duration::from_secs(60)).with_throttle(Duration::from_millis(100)),
        )
        .with_soft_timeout(Duration::from_millis(50))
        .with_eager_refresh(0.5);
    let version = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for (instance, cache) in caches.iter().enumerate() {
        for worker in 0..4 {
            let (cache, version) = (cache.clone(), Arc::clone(&version));
            workers.push(tokio::spawn(async move {
                let mut state = 0x9E37_79B9_u64 ^ (instance as u64 * 16 + worker + 1);
                for _ in 0..400 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let key = format!("k{}", state % 10);
                    match (state >> 8) % 10 {
                        0 => {
                            let v = version.fetch_add(1, Ordering::SeqCst);
                            let _ = cache.set(&key, format!("set{v}")).await;
                        }
                        1 => {
                            let _ = cache.delete(&key).await;
                        }
                        _ => {
                            let (fails, slow) = (
                                (state >> 16).is_multiple_of(3),
                                (state >> 20).is_multiple_of(4),
                            );
                            let version = Arc::clone(&version);
                            let load = move || async move {
                                if slow {
                                    tokio::time::sleep(Duration::from_millis(30)).await; // real time: a slow origin
                                }
                                if fails {
                                    return Err(std::io::Error::other("origin down"));
                                }
                                Ok(format!("load{}", version.fetch_add(1, Ordering::SeqCst)))
                            };
                            let _ = cache.get_or_load_with(&key, &options, load).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await; // real time: pacing
                }
            }));
        }
    }
    for worker in workers {
        worker.await.unwrap();
    }
    for cache in &caches {
        cache.wait_for_background_fills().await;
    }
    let keys: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
    assert_converge(&caches, &keys).await;
    // real time: every entry past its TTL, the origin down for good
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    for key in &keys {
        let down = || async { Err::<String, _>(std::io::Error::other("origin down")) };
        let answers = futures_util::future::join_all(
            caches
                .iter()
                .map(|c| c.get_or_load_with(key, &options, down)),
        )
        .await;
        let answers: Vec<_> = answers
            .into_iter()
            .map(|answer| answer.ok().map(|fetched| (fetched.value, fetched.stale)))
            .collect();
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "{key}: {answers:?}"
        );
    }
}
