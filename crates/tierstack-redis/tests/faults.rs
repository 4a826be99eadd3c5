//! Faults and bad input against real Redis servers: unreachable, killed and restarted, stalled,
//! silent, wrong credentials, missing ACL rights, foreign bytes, oversized values.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Partition, RedisServer, private_redis};
use tierstack::TieredCache;
use tierstack_core::clock::{Clock, SystemClock, Timestamp};
use tierstack_core::envelope::{self, Envelope};
use tierstack_core::{BincodeCodec, CacheError, Store};
use tierstack_redis::{RedisConfig, RedisStore};

fn loader(
    calls: &Arc<AtomicUsize>,
    value: &str,
) -> impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + Send + 'static {
    let (calls, value) = (calls.clone(), value.to_owned());
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(value))
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unreachable_server_fails_within_the_connect_timeout_naming_the_host_not_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = RedisConfig::from_url(&format!("redis://app:sup3rsecret@127.0.0.1:{port}/"))
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = RedisStore::connect(&config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, CacheError::Connection { .. }), "{err:?}");
    assert!(err.is_transient());
    let shown = format!("{err} / {err:?}");
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert!(!shown.contains("sup3rsecret"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_degrades_to_l1_and_loader_and_is_used_again_after_restart() {
    let mut server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300));
    let store = Arc::new(RedisStore::connect(&config).await.unwrap());
    let cache: TieredCache<String> = TieredCache::builder("kill")
        .l2(store.clone())
        .build()
        .unwrap();
    cache.set("warm", "in-l1".into()).await.unwrap();

    server.kill();
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..20 {
        assert_eq!(
            cache.get("warm").await.unwrap(),
            Some("in-l1".into()),
            "L1 keeps serving"
        );
        assert_eq!(
            cache
                .get_or_load("cold", loader(&calls, "loaded"))
                .await
                .unwrap(),
            "loaded"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the loaded value is kept in L1 meanwhile"
    );
    assert!(
        cache.stats().l2_errors >= 1,
        "errors are counted, not returned to readers"
    );

    server.restart();
    // The same cache and store, no rebuild: Redis serves again once the connection is back.
    eventually("writes reach the restarted server", async || {
        cache.set("after", "v".into()).await.is_ok()
    })
    .await;
    cache.invalidate_local("after");
    let l2_hits = cache.stats().l2_hits;
    assert_eq!(cache.get("after").await.unwrap(), Some("v".into()));
    assert_eq!(cache.stats().l2_hits, l2_hits + 1);
    assert!(store.get("kill:after").await.unwrap().is_some());
}

/// The first call after a killed server is back reaches it. While it was down, each call found
/// the connection lost and started a reconnect, which the server refused; the last refusal is
/// not what the next call gets once the server answers again (a circuit breaker's probe would
/// fail with it, and keep the L2 away for one more open time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_a_restart_reaches_the_server() {
    first_call_after_a_restart(false).await;
}

/// The same for a store paired with its backplane (one RESP3 socket for both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_of_a_paired_store_after_a_restart_reaches_the_server() {
    first_call_after_a_restart(true).await;
}

async fn first_call_after_a_restart(paired: bool) {
    let mut server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300));
    let (store, _backplane) = if paired {
        let (store, backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
        (store, Some(backplane))
    } else {
        (RedisStore::connect(&config).await.unwrap(), None)
    };
    let value = bytes::Bytes::from_static(b"before the restart");
    store
        .set("k", value, Duration::from_secs(60))
        .await
        .unwrap();

    server.kill();
    for _ in 0..3 {
        let error = store.get("k").await.unwrap_err();
        // Refused (or found lost), not timed out.
        assert!(
            error.is_transient() && !matches!(error, CacheError::Timeout { .. }),
            "{error:?}"
        );
    }
    // real time: longer than a reconnect's two attempts (at most 50 ms apart), so that the
    // manager holds the last one's refusal when the server is back, as after any outage that
    // outlasts a reconnect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    assert_eq!(
        store.get("k").await.unwrap(),
        None,
        "the first call reaches the restarted (empty) server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_fails_requests_within_the_response_timeout_and_queues_nothing() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .response_timeout(Duration::from_millis(200))
        .max_in_flight(4);
    let store = Arc::new(RedisStore::connect(&config).await.unwrap());
    server.cli(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let started = Instant::now();
    let requests: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.get(&format!("k{i}")).await })
        })
        .collect();
    for request in requests {
        let err = request.await.unwrap().unwrap_err();
        assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    }
    // 50 requests, 4 in flight at a time: all failed within one response timeout each, not
    // after the 3 s pause.
    assert!(
        started.elapsed() < Duration::from_millis(2_000),
        "took {:?}",
        started.elapsed()
    );
    // Seen from the server once the pause is over: only the requests that held one of the 4
    // slots were sent (a waiter whose deadline passed while it waited gives up instead of
    // sending late), not all 50. (The CLI call waits for the pause to end.)
    server.cli(&["CLIENT", "UNPAUSE"]);
    // One more GET on the store's connection: its answer comes after the server ran whatever
    // reached it on that connection during the pause.
    store.get("probe").await.unwrap();
    let stats = server.cli(&["INFO", "commandstats"]);
    let sent: u64 = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap());
    assert!(sent <= 8 + 1, "{} of 50 GETs reached the server", sent - 1);
}

/// The response timeout of the stall tests.
const STALL_BOUND: Duration = Duration::from_millis(200);

/// A private server, and a configuration and store for it with `response_timeout`.
async fn store_timing_out_after(
    response_timeout: Duration,
) -> (RedisServer, RedisConfig, RedisStore) {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .response_timeout(response_timeout);
    let store = RedisStore::connect(&config).await.unwrap();
    (server, config, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_fails_reads_within_its_response_timeout_whatever_the_cache_timeout() {
    // The store bounds its calls itself: under a cache whose own timeout is far longer, the
    // store's bound holds on its own, for reads and for the loader's write-back.
    let (server, _, store) = store_timing_out_after(STALL_BOUND).await;
    let cache: TieredCache<String> = TieredCache::builder("paused")
        .l2(Arc::new(store))
        .l2_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    server.cli(&["CLIENT", "PAUSE", "5000", "ALL"]);
    let started = Instant::now();
    let calls = Arc::new(AtomicUsize::new(0));
    assert_eq!(
        cache.get_or_load("k", loader(&calls, "v")).await.unwrap(),
        "v"
    );
    assert_eq!(cache.get("other").await.unwrap(), None);
    // The write-back runs in the background: wait for it, it is bounded too.
    cache.wait_for_background_fills().await;
    // A read, a write-back and a read: three response timeouts, not the 5 s pause.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(cache.stats().l2_errors >= 3, "{:?}", cache.stats());
}

#[tokio::test]
async fn a_wrong_password_is_an_authentication_error_that_hides_the_password() {
    let server = private_redis(&["--requirepass", "right-one"]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .credentials(None, "wr0ng-guess");
    let err = RedisStore::connect(&config).await.unwrap_err();
    assert!(matches!(err, CacheError::Authentication { .. }), "{err:?}");
    assert!(!err.is_transient());
    let shown = format!("{err} / {err:?}");
    assert!(
        !shown.contains("wr0ng-guess") && !shown.contains("right-one"),
        "{shown}"
    );
    let ok = RedisConfig::from_url(&server.url())
        .unwrap()
        .credentials(None, "right-one");
    RedisStore::connect(&ok)
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
}

#[tokio::test]
async fn an_acl_user_without_rights_gets_an_authentication_error() {
    let server = private_redis(&[]);
    server.cli(&[
        "ACL", "SETUSER", "reader", "on", ">pw", "~*", "-@all", "+ping", "+hello", "+client",
        "+get",
    ]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .credentials(Some("reader"), "pw");
    let store = RedisStore::connect(&config).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), None, "GET is allowed");
    let err = store
        .set("k", "v".into(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Authentication { .. }), "{err:?}");
    assert!(!format!("{err:?}").contains(">pw"));
}

#[tokio::test]
async fn foreign_bytes_under_a_cache_key_are_a_counted_miss_and_deleted() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    let store = Arc::new(RedisStore::connect(&config).await.unwrap());
    let cache: TieredCache<String> = TieredCache::builder("ns")
        .l2(store.clone())
        .build()
        .unwrap();
    server.cli(&[
        "SET",
        "ns:planted",
        "\u{1}\u{2}garbage from another client",
        "EX",
        "60",
    ]);
    server.cli(&["SET", "ns:truncated", "TS\u{1}\u{1}", "EX", "60"]);
    for key in ["planted", "truncated"] {
        assert_eq!(cache.get(key).await.unwrap(), None);
        assert!(
            !store.exists(&format!("ns:{key}")).await.unwrap(),
            "{key} deleted"
        );
    }
    assert_eq!(cache.stats().corrupt_entries, 2);
}

/// A list, hash, set or sorted set under a cache key (another client's data) is repaired like
/// garbage bytes: a counted miss, deleted, and replaced by the next load. It used to make every
/// read an L2 error and every fill lose its `SET NX`, so each read called the loader, forever.
#[tokio::test]
async fn foreign_data_types_under_a_cache_key_are_replaced_by_the_next_load() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    for (type_name, plant) in [
        ("list", vec!["RPUSH", "ns:k-list", "a"]),
        ("hash", vec!["HSET", "ns:k-hash", "f", "v"]),
        ("set", vec!["SADD", "ns:k-set", "m"]),
        ("zset", vec!["ZADD", "ns:k-zset", "1", "m"]),
    ] {
        for l1 in [true, false] {
            server.cli(&plant);
            let key = format!("k-{type_name}");
            let builder = TieredCache::<String>::builder("ns")
                .l2(Arc::new(RedisStore::connect(&config).await.unwrap()))
                .l2_fill(tierstack::L2Fill::Inline);
            let cache = if l1 { builder } else { builder.without_l1() }
                .build()
                .unwrap();
            let calls = Arc::new(AtomicUsize::new(0));
            for _ in 0..3 {
                assert_eq!(
                    cache.get_or_load(&key, loader(&calls, "v")).await.unwrap(),
                    "v"
                );
            }
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{type_name}, L1 {l1}");
            assert_eq!(cache.stats().corrupt_entries, 1, "{type_name}, L1 {l1}");
            assert_eq!(cache.stats().l2_errors, 0, "{type_name}, L1 {l1}");
            assert_eq!(server.cli(&["TYPE", &format!("ns:{key}")]).trim(), "string");
            server.cli(&["DEL", &format!("ns:{key}")]);
        }
    }
}

#[tokio::test]
async fn oversized_values_are_refused_before_anything_is_written() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    let store = Arc::new(
        RedisStore::connect(&config)
            .await
            .unwrap()
            .max_value_len(4096),
    );
    let err = store
        .set("raw", vec![0u8; 5000].into(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::ValueTooLarge {
                size: 5000,
                max: 4096
            }
        ),
        "{err:?}"
    );
    assert!(!store.exists("raw").await.unwrap());

    let cache: TieredCache<String> = TieredCache::builder("big")
        .l2(store.clone())
        .max_value_len(1024)
        .build()
        .unwrap();
    let err = cache.set("k", "x".repeat(2048)).await.unwrap_err();
    assert!(
        matches!(err, CacheError::ValueTooLarge { max: 1024, .. }),
        "{err:?}"
    );
    assert!(!store.exists("big:k").await.unwrap());
    assert_eq!(cache.get("k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_fails_a_write_within_its_response_timeout_whatever_the_cache_timeout() {
    // A paired store announces its write in the write's pipeline, bounded by the store's
    // response timeout: under a cache whose own timeout is far longer, that bound holds.
    let (server, config, _) = store_timing_out_after(STALL_BOUND).await;
    let (store, backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
    let store = Arc::new(store);
    let cache = TieredCache::<String>::builder("paused")
        .l2(store)
        .backplane(Arc::new(backplane))
        .l2_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    server.cli(&["CLIENT", "PAUSE", "5000", "ALL"]);
    let started = Instant::now();
    let err = cache.set("k", "v".into()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
}

/// A private server, a relay in front of it that can silence its connections, and a store
/// through the relay (connect timeout 500 ms, response timeout `STALL_BOUND`) holding
/// `"silent"`.
async fn store_behind_relay() -> (RedisServer, Partition, RedisStore) {
    let server = private_redis(&[]);
    let relay = Partition::start(server.port()).await;
    let config = RedisConfig::from_url(&relay.url())
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(STALL_BOUND);
    let store = RedisStore::connect(&config).await.unwrap();
    store
        .set("silent", "v".into(), Duration::from_secs(60))
        .await
        .unwrap();
    (server, relay, store)
}

/// A socket that goes silent without an error (a NAT or a firewall that forgot it) times every
/// call out until the kernel gives up on it, a quarter of an hour later. Three calls in a row
/// without an answer replace it; the calls after that go on a new socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_is_replaced() {
    let (_server, relay, store) = store_behind_relay().await;
    assert_eq!(relay.accepted(), 1);
    relay.forget_open_connections();
    let err = store.get("silent").await.unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    let mut timeouts = 1;
    eventually("an answer on a new socket", async || {
        match store.get("silent").await {
            Ok(value) => {
                assert_eq!(value.as_deref(), Some(&b"v"[..]));
                true
            }
            Err(CacheError::Timeout { .. }) => {
                timeouts += 1;
                false
            }
            Err(other) => panic!("{other:?}"),
        }
    })
    .await;
    assert!(timeouts >= 3, "replaced after {timeouts} timeouts");
    assert_eq!(relay.accepted(), 2, "one new socket");
}

/// Calls sent on the silent socket before it was replaced time out afterwards: they must not
/// count against its successor, or every replacement would bring on the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_time_out_on_a_replaced_socket_leave_its_successor_alone() {
    let (_server, relay, store) = store_behind_relay().await;
    let store = Arc::new(store);
    relay.forget_open_connections();
    // Four callers keep four calls in flight, so that some are still waiting on the old socket
    // when the new one takes over.
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while store.get("silent").await.is_err() {
                    assert!(Instant::now() < deadline, "no answer within 10 s");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    // real time: every call sent on the old socket times out (the response timeout under test).
    tokio::time::sleep(STALL_BOUND * 3).await;
    assert_eq!(
        store.get("silent").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(relay.accepted(), 2, "one new socket, not more");
}

/// While no new connection can be opened (here every one is closed at once), the replacement is
/// tried again after later timeouts, but at most once per connect limit (connect timeout plus
/// response timeout): a server that is down is not dialled, and logged, on every timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replacement_holds_the_next_attempt_back() {
    let (_server, relay, store) = store_behind_relay().await;
    relay.forget_open_connections();
    relay.refuse_new_connections(true);
    // 2.1 s of calls, each timing out after 200 ms: about ten timeouts, so about eight tries
    // without the hold-back; with it, one try per 700 ms, at most three. redis-rs dials twice
    // per try (the store sets one retry): without the hold-back the relay saw 16 and 17
    // connections, with it 5 in two runs and at most 4 in two others.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2_100) {
        let err = store.get("down").await.unwrap_err();
        assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    }
    let tries = relay.accepted() - 1;
    assert!((1..=6).contains(&tries), "{tries} connection attempts");
    // Once connections open again, the next try succeeds.
    relay.refuse_new_connections(false);
    eventually("an answer on a new socket", async || {
        store.get("down").await.is_ok()
    })
    .await;
}

/// Two caches on one server, each with a store and a backplane, paired or connected apart; the
/// store's response timeout is short so that a paused server times writes out.
async fn two_writers(server: &RedisServer, paired: bool) -> [TieredCache<String>; 2] {
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .response_timeout(Duration::from_millis(200));
    let mut caches = Vec::new();
    for _ in 0..2 {
        let (store, backplane) = if paired {
            RedisStore::connect_with_backplane(&config).await.unwrap()
        } else {
            (
                RedisStore::connect(&config).await.unwrap(),
                tierstack_redis::RedisBackplane::connect(&config)
                    .await
                    .unwrap(),
            )
        };
        caches.push(
            TieredCache::builder("late")
                .l2(Arc::new(store))
                .backplane(Arc::new(backplane))
                .l2_timeout(Duration::from_millis(300))
                .build()
                .unwrap(),
        );
    }
    caches.try_into().unwrap()
}

/// A write that times out may still land (the server had it queued); the store takes it back
/// right after (see `a_write_that_timed_out_behind_a_partition_does_not_land_over_a_later_one`).
/// The writer must not leave the others serving the old value: with a paired store the
/// announcement lands with the write (and again with its take-back); otherwise the writer
/// invalidates on failure, and again one timeout later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_write_that_lands_later_leaves_no_instance_serving_the_old_value() {
    for paired in [true, false] {
        let server = private_redis(&[]);
        let [a, b] = two_writers(&server, paired).await;
        a.set("k", "old".into()).await.unwrap();
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some("old"));
        // Writes (and publishes) wait at the server for 600 ms, then run.
        server.cli(&["CLIENT", "PAUSE", "600", "WRITE"]);
        let err = a.set("k", "new".into()).await.unwrap_err();
        assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
        // Taken back to a tombstone.
        let raw = RedisStore::connect(&RedisConfig::from_url(&server.url()).unwrap())
            .await
            .unwrap();
        eventually(
            &format!("paired {paired}: landed and taken back"),
            async || {
                raw.get("late:k")
                    .await
                    .unwrap()
                    .is_some_and(|bytes| envelope::is_tombstone(&bytes))
            },
        )
        .await;
        for (name, cache) in [("the writer", &a), ("the other", &b)] {
            eventually(
                &format!("paired {paired}: {name} serves no old value"),
                async || cache.get("k").await.unwrap().is_none(),
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_opens_the_circuit_breaker_and_it_closes_after_the_pause() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .response_timeout(Duration::from_millis(200));
    let store = Arc::new(RedisStore::connect(&config).await.unwrap());
    let cache: TieredCache<String> = TieredCache::builder("breaker")
        .l2(store)
        .l2_timeout(Duration::from_millis(300))
        // Open for longer than the checks below take, however loaded the machine.
        .l2_circuit_breaker(tierstack::CircuitBreaker::new(2, Duration::from_secs(5)))
        .build()
        .unwrap();
    cache.set("k", "v".into()).await.unwrap();
    // Paused for longer than a few timeouts: two reads time out and the breaker opens.
    server.cli(&["CLIENT", "PAUSE", "3000", "ALL"]);
    for key in ["a", "b"] {
        assert_eq!(cache.get(key).await.unwrap(), None);
    }
    assert_eq!(cache.stats().l2_circuit_opens, 1);
    let errors = cache.stats().l2_errors;
    assert!(matches!(
        cache.set("w", "x".into()).await,
        Err(CacheError::CircuitOpen { .. })
    ));
    assert_eq!(cache.stats().l2_errors, errors, "refused, not sent");
    // After the pause a probe finds the server again and the breaker closes.
    server.cli(&["CLIENT", "UNPAUSE"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.set("w", "x".into()).await.is_err() {
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll loop
    }
    cache.invalidate_local("k");
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
}

/// A `SET` held by a partition past its timeout reaches Redis once the link heals, after the
/// writes that came since: the store takes it back (a script sent after it on the same
/// connection makes it expire within a second), so Redis does not keep the older value for its
/// whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_timed_out_behind_a_partition_does_not_land_over_a_later_one() {
    let (server, relay, store) = store_behind_relay().await;
    let direct = RedisStore::connect(&RedisConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    relay.freeze();
    let err = store
        .set("silent", "late".into(), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    direct
        .set("silent", "later".into(), Duration::from_secs(60))
        .await
        .unwrap();
    relay.thaw();
    // Answered on the same connection, so after the late write and its take-back.
    eventually("the healed link answers", async || {
        store.exists("x").await.is_ok()
    })
    .await;
    assert!(
        lingers_at_most_a_second(&server, "silent"),
        "the late write stays for its TTL"
    );
    // It lingers rather than goes: a load's fill that was queued behind it (a value read
    // before the write) is still refused, as it would be without the take-back.
    assert!(
        !direct
            .set_if_absent("silent", "loaded before".into(), Duration::from_secs(60))
            .await
            .unwrap()
    );
    // The take-back touches only what the late write put: a write after it keeps its TTL.
    direct
        .set("silent", "latest".into(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!lingers_at_most_a_second(&server, "silent"));
}

/// The same for a cache entry (an envelope): the take-back leaves, for the rest of the late
/// value's TTL or a minute, a tombstone stamped with the time of the take-back, so that a write kept for a
/// replay before then stands down rather than compare itself with the late value (which hid the
/// later write it landed over) or with an empty key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cache_entry_is_taken_back_to_a_tombstone_of_the_take_backs_time() {
    let (server, relay, store) = store_behind_relay().await;
    let direct = RedisStore::connect(&RedisConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let entry = |value: &str| {
        let now = SystemClock.now();
        envelope::encode(
            &BincodeCodec::default(),
            Some(value),
            now,
            now.saturating_add(Duration::from_secs(60)),
            usize::MAX,
        )
        .unwrap()
    };
    relay.freeze();
    // One with a TTL past the tombstone's longest (a minute), one within it.
    let late = entry("late");
    for (key, ttl) in [("silent", 600), ("shorter", 30)] {
        let err = store
            .set(key, late.clone(), Duration::from_secs(ttl))
            .await
            .unwrap_err();
        assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
        direct
            .set(key, entry("later"), Duration::from_secs(ttl))
            .await
            .unwrap();
    }
    let before = server_time(&server);
    relay.thaw();
    for key in ["silent", "shorter"] {
        eventually("taken back to a tombstone", async || {
            let held = direct.get(key).await.unwrap().unwrap();
            envelope::is_tombstone(&held)
        })
        .await;
    }
    let after = server_time(&server);
    for (key, left) in [("silent", 50_000..=60_000), ("shorter", 20_000..=30_000)] {
        let held = direct.get(key).await.unwrap().unwrap();
        let tombstone = Envelope::parse::<BincodeCodec>(&held, usize::MAX).unwrap();
        assert!(tombstone.tombstone);
        assert!(
            (before..=after).contains(&tombstone.written_at),
            "stamped with the take-back's time: {:?}, between {before:?} and {after:?}",
            tombstone.written_at
        );
        assert_eq!(Some(tombstone.expires_at), Envelope::expires_at_of(&late));
        // For the rest of the entry's TTL, at most a minute (a delete's tombstone's).
        let pttl: i64 = server.cli(&["PTTL", key]).trim().parse().unwrap();
        assert!(left.contains(&pttl), "{key}: {pttl} ms left");
    }
    assert!(
        !direct
            .set_if_absent("silent", entry("loaded before"), Duration::from_secs(60))
            .await
            .unwrap()
    );
}

/// A delete's tombstone (`replace`, `SET … GET`) that lands late over a later write is taken
/// back the same way: to a tombstone of the take-back's time. Left in place, its older stamp
/// would pass, to the replay of a write kept by a cache with write recovery, for the key's last
/// write, and a kept write older than the one it hid would be replayed over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delete_is_taken_back_to_a_tombstone_of_the_take_backs_time() {
    let (server, relay, store) = store_behind_relay().await;
    let direct = RedisStore::connect(&RedisConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    // Stamped well before the take-back, whatever the clocks' resolution.
    let deleted_at = Timestamp::from_millis(SystemClock.now().as_millis() - 10_000);
    // A tombstone TTL past the minute a value's take-back is held to: it keeps it.
    let expires_at = deleted_at.saturating_add(Duration::from_secs(120));
    let late = envelope::encode_tombstone::<BincodeCodec>(deleted_at, expires_at, 7);
    let later = envelope::encode(
        &BincodeCodec::default(),
        Some("later"),
        SystemClock.now(),
        SystemClock.now().saturating_add(Duration::from_secs(600)),
        usize::MAX,
    )
    .unwrap();
    relay.freeze();
    let err = store
        .replace("deleted", late.clone(), Duration::from_secs(120))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    direct
        .set("deleted", later, Duration::from_secs(600))
        .await
        .unwrap();
    let before = server_time(&server);
    relay.thaw();
    eventually("the late tombstone taken back", async || {
        let held = direct.get("deleted").await.unwrap().unwrap();
        envelope::is_tombstone(&held) && held != late
    })
    .await;
    let after = server_time(&server);
    let held = direct.get("deleted").await.unwrap().unwrap();
    let tombstone = Envelope::parse::<BincodeCodec>(&held, usize::MAX).unwrap();
    assert!(
        (before..=after).contains(&tombstone.written_at),
        "stamped with the take-back's time: {:?}, between {before:?} and {after:?}",
        tombstone.written_at
    );
    assert_eq!(tombstone.expires_at, expires_at);
    let pttl: i64 = server.cli(&["PTTL", "deleted"]).trim().parse().unwrap();
    assert!((100_000..=120_000).contains(&pttl), "{pttl} ms left");
}

/// The server's clock (`TIME`), to the millisecond.
fn server_time(server: &RedisServer) -> Timestamp {
    let reply = server.cli(&["TIME"]);
    let mut fields = reply.split_whitespace().map(|f| f.parse::<u64>().unwrap());
    let (seconds, micros) = (fields.next().unwrap(), fields.next().unwrap());
    Timestamp::from_millis(seconds * 1000 + micros / 1000)
}

/// Whether `key` is absent or expires within a second (a taken-back write lingers that long).
fn lingers_at_most_a_second(server: &RedisServer, key: &str) -> bool {
    let pttl: i64 = server.cli(&["PTTL", key]).trim().parse().unwrap();
    pttl == -2 || (0..=1000).contains(&pttl)
}

/// The same when the cache gives up on the write first (its L2 timeout is shorter than the
/// store's): the store's call is dropped unanswered, and the write is still taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_cache_gave_up_on_does_not_land_over_a_later_one() {
    let (server, relay, store) = store_behind_relay().await;
    let cache: TieredCache<String> = TieredCache::builder("late")
        .l2(Arc::new(store))
        .l2_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let other: TieredCache<String> = TieredCache::builder("late")
        .l2(Arc::new(
            RedisStore::connect(&RedisConfig::from_url(&server.url()).unwrap())
                .await
                .unwrap(),
        ))
        .without_l1()
        .build()
        .unwrap();
    relay.freeze();
    let err = cache.set("k", "late".into()).await.unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    other.set("k", "later".into()).await.unwrap();
    relay.thaw();
    // The take-back was queued by a task when the call was dropped, during the partition:
    // behind the late write on its connection, and before this read.
    let strict = cache.default_options().with_l2_errors_returned(true);
    eventually("the healed link answers", async || {
        cache.get_with("x", &strict).await.is_ok()
    })
    .await;
    // A cache entry is taken back to a tombstone: it reads as a miss, at once.
    assert_eq!(
        other.get("k").await.unwrap(),
        None,
        "the late write stays for its TTL"
    );
}
