//! Cross-instance freshness over Redis pub/sub.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Partition, RedisServer, private_redis};
use tierstack::TieredCache;
use tierstack_core::Store as _;
use tierstack_core::backplane::{Backplane as _, BackplaneEvent};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `writer` sets `key` to `value`, and `reader` serves it within 10 s.
async fn write_and_see(
    what: &str,
    writer: &TieredCache<String>,
    reader: &TieredCache<String>,
    key: &str,
    value: &str,
) {
    writer.set(key, value.to_owned()).await.unwrap();
    eventually(what, async || {
        reader.get(key).await.unwrap().as_deref() == Some(value)
    })
    .await;
}

/// `count` instances of one service: each its own connections, store, backplane and L1.
async fn instances(config: &RedisConfig, count: usize) -> Vec<TieredCache<String>> {
    caches(config, count, false).await
}

/// Caches on stores paired with their backplanes (`RedisStore::connect_with_backplane`).
async fn paired_instances(config: &RedisConfig, count: usize) -> Vec<TieredCache<String>> {
    caches(config, count, true).await
}

async fn caches(config: &RedisConfig, count: usize, paired: bool) -> Vec<TieredCache<String>> {
    let mut caches = Vec::new();
    for _ in 0..count {
        let (store, backplane) = if paired {
            RedisStore::connect_with_backplane(config).await.unwrap()
        } else {
            (
                RedisStore::connect(config).await.unwrap(),
                RedisBackplane::connect(config).await.unwrap(),
            )
        };
        caches.push(
            TieredCache::builder("svc")
                .l2(Arc::new(store))
                .backplane(Arc::new(backplane))
                .build()
                .unwrap(),
        );
    }
    caches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_never_serve_the_old_value_after_delivery() {
    three_instances_stay_fresh(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_dedicated_subscriptions_never_serve_the_old_value() {
    three_instances_stay_fresh(false).await;
}

async fn three_instances_stay_fresh(resp3: bool) {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("bp3"))
        .resp3_backplane(resp3);
    let caches = instances(&config, 3).await;
    caches[0].set("k", "v1".into()).await.unwrap();
    for cache in &caches {
        assert_eq!(cache.get("k").await.unwrap(), Some("v1".into()));
    }
    for (round, writer) in [1usize, 2, 0, 1].into_iter().enumerate() {
        let value = format!("v{}", round + 2);
        caches[writer].set("k", value.clone()).await.unwrap();
        for cache in &caches {
            eventually("new value served", async || {
                cache.get("k").await.unwrap().as_deref() == Some(&value)
            })
            .await;
            // Once delivered, the old value never comes back.
            for _ in 0..20 {
                assert_eq!(
                    cache.get("k").await.unwrap().as_deref(),
                    Some(value.as_str())
                );
            }
        }
    }
    let received: Vec<u64> = caches
        .iter()
        .map(|c| c.stats().invalidations_received)
        .collect();
    // Five writes: 1 by instance 0 at the start, then by 1, 2, 0, 1. Each instance hears the
    // others' writes and never its own.
    assert_eq!(received, vec![3, 3, 4], "{received:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_prefix_deletes_reach_every_instance() {
    let config = RedisConfig::from_url(&common::redis_url())
        .unwrap()
        .key_prefix(&common::unique_prefix("bpdel"));
    let caches = instances(&config, 3).await;
    for key in ["user:1", "user:2", "order:1"] {
        caches[0].set(key, key.into()).await.unwrap();
    }
    for cache in &caches {
        assert!(cache.get("user:1").await.unwrap().is_some());
        assert!(cache.get("order:1").await.unwrap().is_some());
    }
    caches[1].delete_prefix("user:").await.unwrap();
    caches[2].delete("order:1").await.unwrap();
    for cache in &caches {
        eventually("deletes applied", async || {
            cache.get("user:1").await.unwrap().is_none()
                && cache.get("user:2").await.unwrap().is_none()
                && cache.get("order:1").await.unwrap().is_none()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_resyncs_and_resubscribes_by_itself() {
    a_killed_subscription_comes_back(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dedicated_subscription_resyncs_and_resubscribes_by_itself() {
    a_killed_subscription_comes_back(false).await;
}

async fn a_killed_subscription_comes_back(resp3: bool) {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .resp3_backplane(resp3);
    let caches = instances(&config, 2).await;
    caches[0].set("k", "v1".into()).await.unwrap();
    eventually("first invalidation", async || {
        caches[1].stats().invalidations_received == 1
    })
    .await;
    assert_eq!(caches[1].get("k").await.unwrap(), Some("v1".into()));

    let killed = server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "2", "both subscriptions killed");
    eventually("resync after the lost subscription", async || {
        caches[1].stats().resyncs >= 2
    })
    .await;
    // The resync cleared L1: the next read goes to Redis.
    let l2_hits = caches[1].stats().l2_hits;
    assert_eq!(caches[1].get("k").await.unwrap(), Some("v1".into()));
    assert_eq!(caches[1].stats().l2_hits, l2_hits + 1);

    // Resubscribed: invalidations flow again.
    eventually("resubscribed", async || {
        server
            .cli(&["PUBSUB", "NUMSUB", "tierstack:invalidations"])
            .contains("\n2")
    })
    .await;
    caches[0].set("k", "v2".into()).await.unwrap();
    eventually("invalidation after resubscription", async || {
        caches[1].get("k").await.unwrap().as_deref() == Some("v2")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_found_by_its_ping_and_replaced() {
    a_silent_subscription_is_replaced(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_dedicated_subscription_is_found_by_its_ping_and_replaced() {
    a_silent_subscription_is_replaced(false).await;
}

/// Instance B listens through a link that goes silent without closing anything. It must stop
/// serving what its L1 holds once a ping goes unanswered, and hear invalidations again once
/// the link is back.
async fn a_silent_subscription_is_replaced(resp3: bool) {
    let server = private_redis(&[]);
    let partition = Partition::start(server.port()).await;
    let direct = RedisConfig::from_url(&server.url())
        .unwrap()
        .resp3_backplane(resp3);
    let through_partition = RedisConfig::from_url(&partition.url())
        .unwrap()
        .resp3_backplane(resp3)
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .backplane_ping_interval(Some(Duration::from_millis(200)));
    let a = instances(&direct, 1).await.remove(0);
    let b = TieredCache::<String>::builder("svc")
        .l2(Arc::new(RedisStore::connect(&direct).await.unwrap()))
        .backplane(Arc::new(
            RedisBackplane::connect(&through_partition).await.unwrap(),
        ))
        .build()
        .unwrap();
    write_and_see("before the partition", &a, &b, "k", "v1").await;
    write_and_see("B holds v2 in L1", &a, &b, "k", "v2").await;
    let resyncs = b.stats().resyncs;

    partition.freeze();
    // B does not hear this write; only noticing the silence clears v2 from its L1.
    write_and_see("silence noticed", &a, &b, "k", "v3").await;
    assert!(b.stats().resyncs > resyncs, "the loss resynced B");

    partition.thaw();
    eventually("resubscribed (a second resync)", async || {
        b.stats().resyncs >= resyncs + 2
    })
    .await;
    let received = b.stats().invalidations_received;
    write_and_see("heard again after the partition", &a, &b, "k", "v4").await;
    eventually(
        "the invalidation came over the new subscription",
        async || b.stats().invalidations_received > received,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backplane_resubscribes_after_a_server_restart() {
    let mut server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    let caches = instances(&config, 2).await;
    caches[0].set("k", "v1".into()).await.unwrap();
    assert_eq!(caches[1].get("k").await.unwrap(), Some("v1".into()));
    let resyncs = caches[1].stats().resyncs;

    server.kill();
    eventually("resync on the lost connection", async || {
        caches[1].stats().resyncs > resyncs
    })
    .await;
    // real time: down for longer than the driver's own reconnect attempts last.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart();

    // Nobody writes or reads in between: the backplane comes back by itself.
    eventually("resubscribed after the restart", async || {
        server
            .cli(&["PUBSUB", "NUMSUB", "tierstack:invalidations"])
            .contains("\n2")
    })
    .await;
    eventually("writes accepted again", async || {
        caches[0].set("k", "v2".into()).await.is_ok()
    })
    .await;
    // B's store reconnects on its first call after the outage (that call reads as a miss).
    eventually("B reads Redis again", async || {
        caches[1].get("k").await.unwrap().as_deref() == Some("v2")
    })
    .await;
    write_and_see(
        "invalidation after the restart",
        &caches[0],
        &caches[1],
        "k",
        "v3",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_another_database_keeps_its_writes_there() {
    let server = private_redis(&[]);
    let store_config = RedisConfig::from_url(&format!("{}2", server.url())).unwrap();
    // No pings: the backplane's connection's last command must stay `subscribe`.
    let backplane_config = RedisConfig::from_url(&server.url())
        .unwrap()
        .backplane_ping_interval(None);
    let cache = TieredCache::<String>::builder("svc")
        .l2(Arc::new(RedisStore::connect(&store_config).await.unwrap()))
        .backplane(Arc::new(
            RedisBackplane::connect(&backplane_config).await.unwrap(),
        ))
        .build()
        .unwrap();
    cache.set("k", "v".into()).await.unwrap();
    // It went over the store's connection: the backplane's reaches database 0.
    assert_eq!(server.cli(&["-n", "2", "DBSIZE"]).trim(), "1");
    assert_eq!(server.cli(&["-n", "0", "DBSIZE"]).trim(), "0");
    assert_eq!(
        last_commands(&server),
        vec![
            ("0".to_owned(), "publish".to_owned()),
            ("2".to_owned(), "set".to_owned())
        ],
        "the store's connection wrote; the backplane's published"
    );
}

/// The database and the last command of each connection but the one asking, sorted.
fn last_commands(server: &RedisServer) -> Vec<(String, String)> {
    let list = server.cli(&["CLIENT", "LIST"]);
    let field = |line: &str, name: &str| {
        line.split(' ')
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in CLIENT LIST line {line:?}"))
            .to_owned()
    };
    let mut found: Vec<(String, String)> = list
        .lines()
        .map(|line| (field(line, "db"), field(line, "cmd")))
        .filter(|(_, cmd)| cmd != "client|list")
        .collect();
    found.sort();
    found
}

/// Calls of `command` since the server started, from INFO commandstats.
fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paired_store_writes_and_announces_in_one_pipeline() {
    let server = private_redis(&[]);
    // No pings: each connection's last command must be the one the test looks for.
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .backplane_ping_interval(None);
    let caches = paired_instances(&config, 2).await;
    let (transactions, publishes, sets) = (
        calls(&server, "exec"),
        calls(&server, "publish"),
        calls(&server, "set"),
    );
    caches[0].set("k", "v".into()).await.unwrap();
    assert_eq!(calls(&server, "set"), sets + 1, "one write");
    assert_eq!(calls(&server, "publish"), publishes + 1, "one publish");
    assert_eq!(calls(&server, "exec"), transactions, "no transaction");
    // The writer's store connection sent SET then PUBLISH in one pipeline: its last command is
    // the publish, and no connection ended on the SET alone.
    let commands: Vec<String> = last_commands(&server)
        .into_iter()
        .map(|(_, cmd)| cmd)
        .collect();
    assert_eq!(
        commands.iter().filter(|cmd| *cmd == "publish").count(),
        1,
        "{commands:?}"
    );
    assert!(!commands.iter().any(|cmd| cmd == "set"), "{commands:?}");
    eventually("delivered", async || {
        caches[1].stats().invalidations_received == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decorated_paired_store_keeps_announcing_its_writes() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    let caches = paired_instances(&config, 2).await;
    let (store, backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
    let faulty = Arc::new(tierstack_core::testkit::FaultyStore::new(Arc::new(store)));
    let wrapped = TieredCache::<String>::builder("svc")
        .l2(faulty)
        .backplane(Arc::new(backplane))
        .build()
        .unwrap();
    let (store, backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
    let migrating = TieredCache::<String>::builder("svc")
        .l2(Arc::new(tierstack::migrate::MigratingStore::new(
            Arc::new(store),
            Arc::new(tierstack_core::testkit::MemoryStore::new()),
        )))
        .backplane(Arc::new(backplane))
        .build()
        .unwrap();
    for (name, writer) in [("fault injection", &wrapped), ("migration", &migrating)] {
        caches[1].set("k", "old".into()).await.unwrap();
        assert_eq!(caches[1].get("k").await.unwrap().as_deref(), Some("old"));
        let publishes = calls(&server, "publish");
        writer.set("k", name.to_owned()).await.unwrap();
        assert_eq!(
            calls(&server, "publish"),
            publishes + 1,
            "{name}: announced once, by the store"
        );
        eventually(name, async || {
            caches[1].get("k").await.unwrap().as_deref() == Some(name)
        })
        .await;
        writer.delete("k").await.unwrap();
        eventually(name, async || caches[1].get("k").await.unwrap().is_none()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_changes_nothing_any_instance_serves() {
    let server = private_redis(&["--maxmemory-policy", "noeviction"]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    let caches = instances(&config, 2).await;
    caches[0].set("k", "v1".into()).await.unwrap();
    assert_eq!(caches[1].get("k").await.unwrap().as_deref(), Some("v1"));
    // A full Redis with the default noeviction policy refuses writes.
    server.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let err = caches[0].set("k", "v2".into()).await.unwrap_err();
    assert!(err.to_string().contains("set"), "{err}");
    assert!(!err.is_transient(), "OOM is not fixed by retrying: {err:?}");
    assert_eq!(
        caches[0].stats().publish_errors,
        0,
        "the publish went through"
    );
    for cache in &caches {
        assert_eq!(
            cache.get("k").await.unwrap().as_deref(),
            Some("v1"),
            "every instance serves what Redis holds"
        );
    }
    // A delete still works: it removes the key (there is no room for its tombstone).
    assert!(caches[0].delete("k").await.unwrap());
    for cache in &caches {
        eventually("deleted everywhere", async || {
            cache.get("k").await.unwrap().is_none()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_keeps_the_write_and_is_counted() {
    let server = private_redis(&[]);
    server.cli(&[
        "ACL", "SETUSER", "writer", "on", ">pw", "~*", "&*", "+@all", "-publish",
    ]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .credentials(Some("writer"), "pw");
    let caches = instances(&config, 1).await;
    caches[0].set("k", "v".into()).await.unwrap();
    assert_eq!(caches[0].stats().publish_errors, 1);
    assert_eq!(calls(&server, "set"), 1, "the write stands");
    assert_eq!(caches[0].get("k").await.unwrap().as_deref(), Some("v"));
}

/// The ACL that docs/backends/redis.md recommends for the cache and its backplane, the
/// take-back of a write that timed out included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_is_enough_for_the_cache_and_its_backplane() {
    let server = private_redis(&[]);
    server.cli(&[
        "ACL",
        "SETUSER",
        "shop-cache",
        "on",
        ">pw",
        "~shop:*",
        "&shop:tierstack:invalidations",
        "-@all",
        "+get",
        "+set",
        "+unlink",
        "+exists",
        "+pexpire",
        "+pttl",
        "+type",
        "+eval",
        "+time",
        "+scan",
        "+ping",
        "+publish",
        "+subscribe",
        "+hello",
        "+client",
        "+cluster|nodes",
    ]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .credentials(Some("shop-cache"), "pw")
        .key_prefix("shop:");
    let caches = instances(&config, 2).await;
    caches[0].set("k", "v1".into()).await.unwrap();
    assert_eq!(caches[1].get("k").await.unwrap().as_deref(), Some("v1"));
    write_and_see("the set's invalidation", &caches[0], &caches[1], "k", "v2").await;
    assert!(caches[0].exists("k").await.unwrap());
    assert!(
        caches[0]
            .touch("k", std::time::Duration::from_secs(60))
            .await
            .unwrap()
    );
    caches[0].delete("k").await.unwrap();
    caches[0].set("p:1", "x".into()).await.unwrap();
    assert_eq!(caches[0].delete_prefix("p:").await.unwrap(), 1);
    eventually("the deletes' invalidations", async || {
        caches[1].get("k").await.unwrap().is_none() && caches[1].get("p:1").await.unwrap().is_none()
    })
    .await;
    for cache in &caches {
        let stats = cache.stats();
        assert_eq!((stats.l2_errors, stats.publish_errors), (0, 0), "{stats:?}");
    }
    // A write that times out is taken back to a tombstone (its script reads the server's
    // clock and the entry's TTL).
    let impatient =
        RedisStore::connect(&config.clone().response_timeout(Duration::from_millis(200)))
            .await
            .unwrap();
    let cache: TieredCache<String> = TieredCache::builder("acl")
        .l2(Arc::new(impatient))
        .without_l1()
        .build()
        .unwrap();
    server.cli(&["CLIENT", "PAUSE", "600", "WRITE"]);
    assert!(cache.set("late", "v".into()).await.is_err());
    let raw = RedisStore::connect(&config).await.unwrap();
    eventually("taken back to a tombstone", async || {
        raw.get("acl:late")
            .await
            .unwrap()
            .is_some_and(|bytes| tierstack_core::envelope::is_tombstone(&bytes))
    })
    .await;
    assert!(
        server.cli(&["ACL", "LOG"]).trim().is_empty(),
        "nothing was denied: {}",
        server.cli(&["ACL", "LOG"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_through_the_store_while_the_backplane_cannot_resubscribe() {
    let server = private_redis(&[]);
    server.cli(&["ACL", "SETUSER", "svc", "on", ">pw", "~*", "&*", "+@all"]);
    let config = RedisConfig::from_url(&server.url())
        .unwrap()
        .credentials(Some("svc"), "pw")
        .response_timeout(Duration::from_millis(300));
    let caches = instances(&config, 2).await;
    caches[0].set("k", "v1".into()).await.unwrap();
    assert_eq!(caches[1].get("k").await.unwrap().as_deref(), Some("v1"));

    // Both backplanes lose their socket and cannot subscribe a new one.
    server.cli(&["ACL", "SETUSER", "svc", "-subscribe"]);
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    eventually("both resynced", async || {
        caches.iter().all(|cache| cache.stats().resyncs >= 1)
    })
    .await;
    caches[0].set("k", "v2".into()).await.unwrap();
    assert_eq!(
        caches[1].get("k").await.unwrap().as_deref(),
        Some("v2"),
        "the write reached Redis (the resync emptied the reader's L1)"
    );

    server.cli(&["ACL", "SETUSER", "svc", "+subscribe"]);
    let resyncs = caches[1].stats().resyncs;
    eventually("resubscribed", async || caches[1].stats().resyncs > resyncs).await;
    write_and_see("fresh again", &caches[0], &caches[1], "k", "v3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_backplane_closes_its_connection() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    let subscribed = || {
        server
            .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
            .lines()
            .count()
    };
    let backplane = RedisBackplane::connect(&config).await.unwrap();
    assert_eq!(subscribed(), 1);
    // Once across a reconnect, whose handler outlives the first socket.
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    eventually("reconnected", async || subscribed() == 1).await;
    drop(backplane);
    eventually("closed", async || subscribed() == 0).await;
}

/// A bulk write whose keys do not fit in one backplane message (1 MiB) is announced as the
/// whole namespace: it used to be announced not at all, and other instances kept their copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_write_too_large_for_one_message_is_still_announced() {
    let server = private_redis(&[]);
    let config = RedisConfig::from_url(&server.url()).unwrap();
    let caches = paired_instances(&config, 1).await;
    let (store, _backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
    caches[0].set("k", "old".into()).await.unwrap();
    assert_eq!(caches[0].get("k").await.unwrap().as_deref(), Some("old"));
    let long = "x".repeat(2_000);
    let mut keys: Vec<String> = (0..600).map(|i| format!("svc:{long}-{i}")).collect();
    keys.push("svc:k".to_owned());
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    tierstack_core::Store::delete_many(&store, &refs)
        .await
        .unwrap();
    eventually("the namespace is invalidated", async || {
        caches[0].get("k").await.unwrap().is_none()
    })
    .await;
}

/// A subscription lost to a server restart is reported as `Lost` (a cache then keeps nothing new
/// in L1) and, once back, as `Resync`: on the publishing connection (RESP3) and on a dedicated
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_is_reported_lost_then_resynced() {
    for resp3 in [true, false] {
        let mut server = private_redis(&[]);
        let config = RedisConfig::from_url(&server.url())
            .unwrap()
            .resp3_backplane(resp3);
        let backplane = RedisBackplane::connect(&config).await.unwrap();
        let mut events = backplane.subscribe();
        server.kill();
        let limit = Duration::from_secs(15);
        let first = tokio::time::timeout(limit, events.recv())
            .await
            .expect("an event after the kill");
        assert_eq!(first, Some(BackplaneEvent::Lost), "resp3 {resp3}");
        server.restart();
        // Whatever else comes first (a queue overflow's resync), a resync follows the restart.
        loop {
            let event = tokio::time::timeout(limit, events.recv())
                .await
                .expect("resubscribed after the restart");
            if event == Some(BackplaneEvent::Resync) {
                break;
            }
        }
    }
}

/// An instance whose own subscription is down and cannot come back (its user lost the right
/// to subscribe) still tells the others of its deletes: the publish goes out on a plain
/// connection. (The delete used to answer `Ok(true)` while the others kept the value.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_instance_still_reaches_the_others() {
    let server = private_redis(&[]);
    let mut configs = Vec::new();
    for user in ["deaf", "hearing"] {
        server.cli(&["ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all"]);
        configs.push(
            RedisConfig::from_url(&server.url())
                .unwrap()
                .credentials(Some(user), "pw")
                .response_timeout(Duration::from_millis(300)),
        );
    }
    let deaf = instances(&configs[0], 1).await.remove(0);
    let hearing = instances(&configs[1], 1).await.remove(0);
    for (i, key) in ["k", "p:k", "t"].into_iter().enumerate() {
        deaf.set(key, format!("v{i}")).await.unwrap();
        assert!(hearing.get(key).await.unwrap().is_some(), "{key} in L1");
    }
    server.cli(&["ACL", "SETUSER", "deaf", "-subscribe"]);
    server.cli(&["CLIENT", "KILL", "USER", "deaf"]);
    eventually("the deaf instance knows", async || {
        deaf.stats().resyncs >= 1
    })
    .await;
    // Its store lost its socket too: the first call after the kill fails, then it reconnects.
    eventually("the store is back", async || {
        deaf.set("warm", "up".into()).await.is_ok()
    })
    .await;
    assert!(deaf.delete("k").await.unwrap());
    eventually("the delete reached the other", async || {
        hearing.get("k").await.unwrap().is_none()
    })
    .await;
    deaf.delete_prefix("p:").await.unwrap();
    eventually("the prefix delete reached the other", async || {
        hearing.get("p:k").await.unwrap().is_none()
    })
    .await;
    assert!(deaf.touch("t", Duration::from_secs(1)).await.unwrap());
    eventually("the touch reached the other", async || {
        hearing.stats().invalidations_received >= 3
    })
    .await;
}
