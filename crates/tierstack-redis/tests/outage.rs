//! An L2 outage end to end over real Redis: the server is killed (SIGKILL) mid-run and started
//! again on the same port, empty. Meanwhile reads are served (L1, fail-safe, the loader) and,
//! once the breaker is open, without waiting for Redis; afterwards the breaker closes, the
//! writes kept during the outage are replayed, the other instance serves them, and a write
//! made on that instance after the outage is not overwritten by the replay. Also: a server that
//! accepts connections and never answers opens the breaker, which closes once it answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Partition, private_redis};
use tierstack::core::Store as _;
use tierstack::{CircuitBreaker, EntryOptions, FailSafe, TieredCache, WriteRecovery};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};

const L2_TIMEOUT: Duration = Duration::from_millis(300);
const OPEN_FOR: Duration = Duration::from_millis(500);

fn options() -> EntryOptions {
    EntryOptions::default()
        .with_ttl(Duration::from_secs(60))
        .with_fail_safe(FailSafe::new(Duration::from_secs(3600)))
        .with_write_recovery(true)
}

async fn instance(url: &str, retry: Duration) -> TieredCache<String> {
    let config = RedisConfig::from_url(url)
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(&config).await.unwrap();
    let backplane = RedisBackplane::connect(&config).await.unwrap();
    TieredCache::builder("outage")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .l2_timeout(L2_TIMEOUT)
        .l2_circuit_breaker(CircuitBreaker::new(3, OPEN_FOR))
        .write_recovery(WriteRecovery::new(1_000).with_retry_interval(retry))
        .default_options(options())
        .build()
        .unwrap()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll loop
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_is_served_through_and_its_kept_writes_are_replayed_after_restart() {
    let mut server = private_redis(&[]);
    // A replays every 3 s: B writes after the restart before A's first replay can.
    let a = instance(&server.url(), Duration::from_secs(3)).await;
    let b = instance(&server.url(), Duration::from_millis(200)).await;
    a.set("warm", "w".into()).await.unwrap();
    a.set("mine", "before".into()).await.unwrap();
    assert_eq!(b.get("mine").await.unwrap(), Some("before".into()));

    server.kill();
    // Reads go on: the loader for what no tier has, and fail-safe's copy in L1 when the origin
    // fails too (with its backplane down, A no longer serves L1 as fresh: nobody would tell it
    // of a change). Once the breaker is open, nobody waits for Redis but the one probe per open
    // period.
    let started = Instant::now();
    let mut slow_after_open = Vec::new();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(2) {
        n += 1;
        let opened = a.stats().l2_circuit_opens > 0;
        let call = Instant::now();
        let warm = a
            .get_or_load_with("warm", &options(), || async {
                Err::<String, _>(std::io::Error::other("the origin is down too"))
            })
            .await
            .unwrap();
        assert_eq!(warm.value, "w");
        let loaded = a
            .get_or_load_with(&format!("cold-{n}"), &options(), || async {
                Ok::<_, std::io::Error>("loaded".to_owned())
            })
            .await
            .unwrap();
        assert_eq!(loaded.value, "loaded");
        if opened && call.elapsed() > Duration::from_millis(100) {
            slow_after_open.push(call.elapsed());
        }
    }
    assert!(a.stats().l2_circuit_opens >= 1, "the breaker opened");
    // One probe per open period at most, each bounded by the L2 timeout.
    let periods = (2_000 / OPEN_FOR.as_millis()) as usize + 1;
    assert!(
        slow_after_open.len() <= periods && slow_after_open.iter().all(|t| *t < L2_TIMEOUT * 2),
        "{slow_after_open:?}"
    );
    // Writes during the outage are kept, and served here.
    a.set_with("mine", "during".into(), &options())
        .await
        .unwrap();
    a.set_with("theirs", "during".into(), &options())
        .await
        .unwrap();
    let mine = a
        .get_or_load_with("mine", &options(), || async {
            Err::<String, _>(std::io::Error::other("the origin is down too"))
        })
        .await
        .unwrap();
    assert_eq!(mine.value, "during");
    assert!(a.stats().writes_kept >= 2);

    server.restart();
    // B writes `theirs` after the outage, before A's replay.
    eventually("B writes to the restarted server", async || {
        b.set("theirs", "after".into()).await.is_ok()
    })
    .await;
    eventually("A replays its kept writes", async || {
        let stats = a.stats();
        stats.writes_replayed >= 1 && stats.writes_superseded >= 1
    })
    .await;
    // The breaker is closed: A writes again.
    a.set("x", "y".into()).await.unwrap();
    let raw = RedisStore::connect(&RedisConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    assert!(raw.exists("outage:mine").await.unwrap());
    for (name, cache) in [("A", &a), ("B", &b)] {
        eventually(&format!("{name} serves the replayed value"), async || {
            cache.get("mine").await.unwrap().as_deref() == Some("during")
        })
        .await;
        eventually(&format!("{name} serves the later write"), async || {
            cache.get("theirs").await.unwrap().as_deref() == Some("after")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_opens_the_breaker_until_it_answers() {
    let server = private_redis(&[]);
    let relay = Partition::start(server.port()).await;
    let config = RedisConfig::from_url(&relay.url())
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(200));
    let store = RedisStore::connect(&config).await.unwrap();
    let cache: TieredCache<String> = TieredCache::builder("silent")
        .l2(Arc::new(store))
        .l2_timeout(L2_TIMEOUT)
        .l2_circuit_breaker(CircuitBreaker::new(3, Duration::from_secs(5)))
        .build()
        .unwrap();
    cache.set("k", "v".into()).await.unwrap();
    cache.invalidate_local("k");
    // Connections are accepted and nothing comes back.
    relay.freeze();
    for key in ["a", "b", "c"] {
        assert_eq!(cache.get(key).await.unwrap(), None);
    }
    assert_eq!(cache.stats().l2_circuit_opens, 1);
    let call = Instant::now();
    assert_eq!(cache.get("k").await.unwrap(), None);
    assert!(
        call.elapsed() < Duration::from_millis(50),
        "skipped, not waited for"
    );
    relay.thaw();
    eventually("the breaker closes", async || {
        cache.get("k").await.unwrap().as_deref() == Some("v")
    })
    .await;
}
