//! Sessions, capped lists, the rate limiter and leases on a real server and a real cluster.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use tierstack_core::{CacheError, Store};
use tierstack_redis::{CappedList, Lease, RateLimiter, RedisConfig, RedisStore, Sessions};

async fn stores(test: &str) -> Vec<RedisStore> {
    let cluster = RedisConfig::cluster(&common::cluster_urls())
        .unwrap()
        .key_prefix(&common::unique_prefix(test));
    vec![
        common::standalone(test).await,
        RedisStore::connect(&cluster).await.unwrap(),
    ]
}

#[tokio::test]
async fn sessions_update_partially_touch_every_key_and_delete_everything() {
    for store in stores("sessions").await {
        let sessions = Sessions::new(&store, Duration::from_secs(2)).unwrap();
        sessions
            .set_fields("abc", &[("user", b"u-1"), ("ready", b"0")])
            .await
            .unwrap();
        sessions
            .set_fields("abc", &[("ready", b"1")])
            .await
            .unwrap();
        let fields = sessions.get("abc").await.unwrap().unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!(
            &fields["user"][..],
            b"u-1",
            "a partial update keeps the other fields"
        );
        assert_eq!(
            sessions.get_field("abc", "ready").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        let chain = sessions.list("abc", "chain", 20).unwrap();
        chain.append(b"resp-1").await.unwrap();

        // Touching extends the hash *and* the list beyond their original 2 s.
        // real time: the session's TTL runs on the server's clock.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_eq!(sessions.touch("abc").await.unwrap(), 2);
        // real time: past the first TTL.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert!(
            sessions.get("abc").await.unwrap().is_some(),
            "the hash outlived its first TTL"
        );
        assert_eq!(chain.len().await.unwrap(), 1, "so did the list");

        assert_eq!(
            sessions
                .remove_fields("abc", &["ready", "nope"])
                .await
                .unwrap(),
            1
        );
        assert_eq!(sessions.delete("abc").await.unwrap(), 2);
        assert_eq!(sessions.get("abc").await.unwrap(), None);
        assert!(chain.is_empty().await.unwrap());
        assert_eq!(
            sessions.touch("abc").await.unwrap(),
            0,
            "touching a missing session"
        );
        assert!(sessions.get("").await.is_err(), "an empty id is refused");
    }
}

#[tokio::test]
async fn capped_lists_keep_the_last_n() {
    for store in stores("lists").await {
        let list = CappedList::new(&store, "chain", 20, Duration::from_secs(60)).unwrap();
        for i in 0..25 {
            list.append(format!("resp-{i:03}").as_bytes())
                .await
                .unwrap();
        }
        let all = list.all().await.unwrap();
        assert_eq!(all.len(), 20);
        assert_eq!(&all[0][..], b"resp-005");
        assert_eq!(
            list.last().await.unwrap().as_deref(),
            Some(&b"resp-024"[..])
        );
        assert_eq!(list.range(-2, -1).await.unwrap().len(), 2);
        assert!(CappedList::new(&store, "zero", 0, Duration::from_secs(1)).is_err());
    }
}

#[tokio::test]
async fn the_rate_limiter_admits_the_limit_per_sliding_window() {
    for store in stores("ratelimit").await {
        let limiter = RateLimiter::new(&store, "api", 5, Duration::from_millis(800)).unwrap();
        for i in 1..=5 {
            let decision = limiter.hit("client-1").await.unwrap();
            assert!(decision.allowed && decision.count == i, "{decision:?}");
        }
        let refused = limiter.hit("client-1").await.unwrap();
        assert!(!refused.allowed && refused.count == 5, "{refused:?}");
        let retry = refused.retry_after.unwrap();
        assert!(retry <= Duration::from_millis(800), "{retry:?}");
        assert_eq!(limiter.count("client-1").await.unwrap(), 5);
        assert!(
            limiter.hit("client-2").await.unwrap().allowed,
            "subjects are independent"
        );
        // real time: the window slides on the server's clock, when `retry_after` says.
        tokio::time::sleep(retry + Duration::from_millis(50)).await;
        assert!(
            limiter.hit("client-1").await.unwrap().allowed,
            "the window slid"
        );
    }
}

#[tokio::test]
async fn concurrent_hits_never_exceed_the_limit() {
    let store = common::standalone("ratelimit-race").await;
    let limiter = RateLimiter::new(&store, "burst", 10, Duration::from_secs(30)).unwrap();
    let hits: Vec<_> = (0..50)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.hit("one").await.unwrap().allowed })
        })
        .collect();
    let mut allowed = 0;
    for hit in hits {
        allowed += usize::from(hit.await.unwrap());
    }
    assert_eq!(allowed, 10);
}

#[tokio::test]
async fn only_the_holder_releases_or_extends_a_lease() {
    for store in stores("lease").await {
        let lease = Lease::acquire(&store, "job", Duration::from_millis(500))
            .await
            .unwrap()
            .unwrap();
        assert!(
            Lease::acquire(&store, "job", Duration::from_secs(5))
                .await
                .unwrap()
                .is_none()
        );
        assert!(lease.extend(Duration::from_millis(500)).await.unwrap());
        // real time: the extended 500 ms run out on the server's clock.
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Expired: another holder takes it, and the first can neither extend nor release it.
        let second = Lease::acquire(&store, "job", Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(!lease.extend(Duration::from_secs(5)).await.unwrap());
        assert!(!lease.release().await.unwrap());
        assert!(
            Lease::acquire(&store, "job", Duration::from_secs(5))
                .await
                .unwrap()
                .is_none(),
            "the second holder keeps it"
        );
        assert!(second.release().await.unwrap());
        assert!(
            Lease::acquire(&store, "job", Duration::from_secs(1))
                .await
                .unwrap()
                .is_some()
        );
    }
}

/// A cache namespace may be `lease`, `ratelimit`, `session` or a capped list's name: its keys
/// and prefixes must still never reach a structure's keys.
#[tokio::test]
async fn cache_keys_and_prefixes_never_reach_structure_keys() {
    for store in stores("keyspace").await {
        let limiter = RateLimiter::new(&store, "api", 2, Duration::from_secs(60)).unwrap();
        assert!(limiter.hit("alice").await.unwrap().allowed);
        assert!(limiter.hit("alice").await.unwrap().allowed);
        store.delete_prefix("ratelimit:").await.unwrap();
        assert_eq!(
            limiter.count("alice").await.unwrap(),
            2,
            "a cache's delete_prefix wiped the limiter's window"
        );
        assert!(!limiter.hit("alice").await.unwrap().allowed);

        let lease = Lease::acquire(&store, "jobs", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.get("lease:jobs").await.unwrap(), None);
        assert!(!store.delete("lease:jobs").await.unwrap());
        store.delete_prefix("lease:").await.unwrap();
        assert!(
            Lease::acquire(&store, "jobs", Duration::from_secs(60))
                .await
                .unwrap()
                .is_none(),
            "the lease is still held"
        );
        assert!(lease.release().await.unwrap());

        let sessions = Sessions::new(&store, Duration::from_secs(60)).unwrap();
        sessions
            .set_fields("abc", &[("user", b"u-1")])
            .await
            .unwrap();
        store.delete_prefix("session:").await.unwrap();
        assert!(sessions.get("abc").await.unwrap().is_some());

        let list = CappedList::new(&store, "users:1", 5, Duration::from_secs(60)).unwrap();
        list.append(b"item").await.unwrap();
        store
            .set(
                "users:1",
                b"cached".to_vec().into(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(list.all().await.unwrap(), vec![&b"item"[..]]);
        store.delete_prefix("users:").await.unwrap();
        assert_eq!(list.len().await.unwrap(), 1);
    }
}

/// Every part of a structure key is escaped, so parts that contain `:` (or `}`) can never run
/// into each other.
#[tokio::test]
async fn structure_keys_keep_their_parts_apart() {
    for store in stores("parts").await {
        let api = RateLimiter::new(&store, "api", 1, Duration::from_secs(60)).unwrap();
        let api_v1 = RateLimiter::new(&store, "api:v1", 1, Duration::from_secs(60)).unwrap();
        assert!(api.hit("v1:alice").await.unwrap().allowed);
        assert!(
            api_v1.hit("alice").await.unwrap().allowed,
            "limiter api:v1 / alice shares a window with limiter api / v1:alice"
        );
        assert_eq!(api.count("v1:alice").await.unwrap(), 1);
        assert_eq!(api_v1.count("alice").await.unwrap(), 1);

        // Session `a}:list:b`'s hash against session `a`'s list `b}:meta`.
        let sessions = Sessions::new(&store, Duration::from_secs(60)).unwrap();
        sessions
            .set_fields("a}:list:b", &[("user", b"u-1")])
            .await
            .unwrap();
        let list = sessions.list("a", "b}:meta", 5).unwrap();
        assert_eq!(list.append(b"item").await.unwrap(), 1);
        assert_eq!(
            sessions
                .get_field("a}:list:b", "user")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"u-1"[..])
        );
        assert_eq!(sessions.delete("a").await.unwrap(), 1);
        assert!(sessions.get("a}:list:b").await.unwrap().is_some());
    }
}

/// A cap Redis cannot trim to is refused before anything is written; it used to push the item,
/// fail on the trim and leave the list without a time to live.
#[tokio::test]
async fn a_cap_redis_cannot_trim_to_is_refused_up_front() {
    let store = common::standalone("huge-cap").await;
    let sessions = Sessions::new(&store, Duration::from_secs(60)).unwrap();
    for cap in [usize::MAX, (1 << 63) + 1, 1 << 32] {
        match CappedList::new(&store, "huge", cap, Duration::from_secs(60)) {
            Err(error) => assert!(matches!(error, CacheError::Configuration(_)), "{error:?}"),
            Ok(list) => {
                let appended = list.append(b"item").await;
                let left = list.len().await.unwrap();
                panic!(
                    "a cap of {cap} was accepted: append gave {appended:?}, {left} item(s) left"
                );
            }
        }
        let refused = sessions.list("abc", "huge", cap).unwrap_err();
        assert!(
            matches!(refused, CacheError::Configuration(_)),
            "{refused:?}"
        );
    }
    assert_eq!(
        store.delete_prefix("@").await.unwrap(),
        0,
        "nothing was written"
    );
    let largest =
        CappedList::new(&store, "largest", (1 << 32) - 1, Duration::from_secs(60)).unwrap();
    assert_eq!(largest.append(b"item").await.unwrap(), 1);
}

/// Session ids with hash-tag braces of their own: every key of one session must still share a
/// slot on a cluster (a script on several keys of different slots fails with CROSSSLOT), and
/// two ids must never share keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_with_braces_keep_their_keys_together() {
    for store in stores("session-braces").await {
        let sessions = Sessions::new(&store, Duration::from_secs(60)).unwrap();
        let ids = ["}", "{", "{}", "}x{", "a}b{c", "{tag}", "x{y}z"];
        for id in ids {
            sessions
                .set_fields(id, &[("who", id.as_bytes())])
                .await
                .unwrap();
            let chain = sessions.list(id, "chain", 5).unwrap();
            chain.append(id.as_bytes()).await.unwrap();
            assert_eq!(sessions.touch(id).await.unwrap(), 2, "{id:?}");
        }
        for id in ids {
            assert_eq!(
                sessions.get_field(id, "who").await.unwrap().as_deref(),
                Some(id.as_bytes()),
                "{id:?} kept its own fields"
            );
            assert_eq!(sessions.delete(id).await.unwrap(), 2, "{id:?}");
        }
    }
}

const QUOTA: tierstack_redis::QuotaLimits = tierstack_redis::QuotaLimits {
    max_entries: 3,
    max_bytes: 100,
};

fn write(member: &str, size: u64, ttl: Duration) -> tierstack_redis::QuotaWrite<'_> {
    tierstack_redis::QuotaWrite { member, size, ttl }
}

/// One write, alone: reserved, then settled.
async fn write_alone(
    ledger: &tierstack_redis::QuotaLedger,
    subject: &str,
    writes: &[tierstack_redis::QuotaWrite<'_>],
) -> tierstack_redis::QuotaDecision {
    let ticket = tierstack_redis::QuotaTicket::new();
    let decision = ledger
        .reserve(subject, QUOTA, writes, &ticket)
        .await
        .unwrap();
    ledger.settle(subject, writes, &ticket, true).await.unwrap();
    decision
}

/// One removal, alone, that happened.
async fn remove_alone(ledger: &tierstack_redis::QuotaLedger, subject: &str, members: &[&str]) {
    let ticket = tierstack_redis::QuotaTicket::new();
    ledger
        .begin_removal(subject, members, &ticket)
        .await
        .unwrap();
    ledger
        .end_removal(subject, members, &ticket, true)
        .await
        .unwrap();
}

/// One touch that touched, begun and ended (alone, unless another operation is in flight).
async fn touch_alone(
    ledger: &tierstack_redis::QuotaLedger,
    subject: &str,
    member: &str,
    ttl: Duration,
) {
    let ticket = tierstack_redis::QuotaTicket::new();
    ledger
        .begin_touch(subject, member, ttl, &ticket)
        .await
        .unwrap();
    ledger
        .end_touch(subject, member, ttl, &ticket, true)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_quota_ledger_counts_live_entries_and_bytes_per_subject() {
    use tierstack_redis::{QuotaDecision, QuotaLedger, QuotaTicket, QuotaUsage};
    let minute = Duration::from_secs(60);
    let usage = |entries, bytes| QuotaUsage { entries, bytes };
    for store in stores("quota").await {
        let ledger = QuotaLedger::new(&store, "server").unwrap();
        assert_eq!(
            write_alone(
                &ledger,
                "t{1}:a",
                &[write("a", 40, minute), write("b", 40, minute)]
            )
            .await,
            QuotaDecision::Admitted(usage(2, 80))
        );
        // A reservation keeps the larger of the old and new record (the write may not land);
        // once landed, alone, the settle records it exactly.
        let ticket = QuotaTicket::new();
        let smaller = [write("a", 20, minute)];
        assert_eq!(
            ledger
                .reserve("t{1}:a", QUOTA, &smaller, &ticket)
                .await
                .unwrap(),
            QuotaDecision::Admitted(usage(2, 80))
        );
        ledger
            .settle("t{1}:a", &smaller, &ticket, true)
            .await
            .unwrap();
        assert_eq!(ledger.usage("t{1}:a").await.unwrap(), usage(2, 60));
        // A write that did not land leaves the old record alone.
        let ticket = QuotaTicket::new();
        let failed = [write("b", 1, Duration::from_millis(1))];
        ledger
            .reserve("t{1}:a", QUOTA, &failed, &ticket)
            .await
            .unwrap();
        ledger
            .settle("t{1}:a", &failed, &ticket, false)
            .await
            .unwrap();
        assert_eq!(ledger.usage("t{1}:a").await.unwrap(), usage(2, 60));
        let ticket = QuotaTicket::new();
        assert_eq!(
            ledger
                .reserve("t{1}:a", QUOTA, &[write("c", 41, minute)], &ticket)
                .await
                .unwrap(),
            QuotaDecision::TooManyBytes(usage(2, 60)),
            "a refused write records nothing"
        );
        assert_eq!(
            ledger
                .reserve(
                    "t{1}:a",
                    QUOTA,
                    &[write("c", 1, minute), write("d", 1, minute)],
                    &ticket
                )
                .await
                .unwrap(),
            QuotaDecision::TooManyEntries(usage(2, 60)),
            "a batch is refused whole"
        );
        assert_eq!(
            write_alone(&ledger, "other", &[write("c", 100, minute)]).await,
            QuotaDecision::Admitted(usage(1, 100)),
            "subjects count apart"
        );
        remove_alone(&ledger, "t{1}:a", &["a", "zz"]).await;
        assert_eq!(ledger.usage("t{1}:a").await.unwrap(), usage(1, 40));
        // Entries leave at their TTL, also after a touch moved it.
        write_alone(
            &ledger,
            "t{1}:a",
            &[write("short", 10, Duration::from_millis(300))],
        )
        .await;
        touch_alone(&ledger, "t{1}:a", "b", Duration::from_millis(300)).await;
        // real time: expiry goes by the server's clock.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(ledger.usage("t{1}:a").await.unwrap(), usage(0, 0));
    }
}

/// A prefix removal begins on the members under the prefix only; a flush forgets all; the
/// ledger's keys expire with its last record.
#[tokio::test]
async fn prefix_removals_flushes_and_the_ledgers_own_expiry() {
    use tierstack_redis::{QuotaLedger, QuotaTicket, QuotaUsage};
    let minute = Duration::from_secs(60);
    let usage = |entries, bytes| QuotaUsage { entries, bytes };
    for store in stores("quota-prefix").await {
        let ledger = QuotaLedger::new(&store, "server").unwrap();
        // Prefix removals match the prefix literally (`*` is no wildcard here).
        write_alone(
            &ledger,
            "p",
            &[
                write("x*1", 1, minute),
                write("x*2", 1, minute),
                write("xy", 1, minute),
            ],
        )
        .await;
        let ticket = QuotaTicket::new();
        let mut begun = ledger
            .begin_removal_of_prefix("p", "x*", &ticket)
            .await
            .unwrap()
            .unwrap();
        begun.sort();
        assert_eq!(begun, ["x*1", "x*2"]);
        let other = QuotaTicket::new();
        assert_eq!(
            ledger
                .begin_removal_of_prefix("p", "x", &other)
                .await
                .unwrap(),
            None,
            "one prefix removal at a time"
        );
        ledger
            .end_removal_of_prefix("p", &begun, &ticket, true)
            .await
            .unwrap();
        assert_eq!(ledger.usage("p").await.unwrap(), usage(1, 1));
        let begun = ledger
            .begin_removal_of_prefix("p", "x", &other)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(begun, ["xy"]);
        ledger
            .end_removal_of_prefix("p", &begun, &other, false)
            .await
            .unwrap();
        assert_eq!(ledger.usage("p").await.unwrap(), usage(1, 1));
        // A claim that is never released lapses after `in_flight_for`.
        let short = ledger
            .clone()
            .in_flight_for(Duration::from_millis(100))
            .unwrap();
        let dropped = QuotaTicket::new();
        let begun = short.begin_removal_of_prefix("p", "x", &dropped).await;
        assert_eq!(begun.unwrap().unwrap(), ["xy"]);
        let next = QuotaTicket::new();
        assert_eq!(
            ledger
                .begin_removal_of_prefix("p", "x", &next)
                .await
                .unwrap(),
            None
        );
        // real time: past the dropped removal's claim.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let begun = ledger.begin_removal_of_prefix("p", "x", &next).await;
        let begun = begun.unwrap().unwrap();
        ledger
            .end_removal_of_prefix("p", &begun, &next, false)
            .await
            .unwrap();
        ledger.clear("p").await.unwrap();
        assert_eq!(ledger.usage("p").await.unwrap(), usage(0, 0));
        // The total never outlives the sizes it sums: a long-lived entry removed, then a short
        // one that expires, leaves nothing counted.
        write_alone(
            &ledger,
            "drift",
            &[write("long", 100, Duration::from_secs(3600))],
        )
        .await;
        remove_alone(&ledger, "drift", &["long"]).await;
        write_alone(
            &ledger,
            "drift",
            &[write("short", 50, Duration::from_millis(300))],
        )
        .await;
        // real time: past the short entry's expiry, on the server's clock.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(ledger.usage("drift").await.unwrap(), usage(0, 0));
    }
}

/// Operations on one entry that overlap never leave it counted low: the record keeps the
/// larger size and the later expiry, and a removal keeps it.
#[tokio::test]
async fn overlapping_operations_never_count_low() {
    use tierstack_redis::{QuotaDecision, QuotaLedger, QuotaTicket, QuotaUsage};
    let minute = Duration::from_secs(60);
    let usage = |entries, bytes| QuotaUsage { entries, bytes };
    for store in stores("quota-overlap").await {
        let ledger = QuotaLedger::new(&store, "server").unwrap();
        write_alone(&ledger, "t", &[write("a", 40, minute)]).await;
        // A removal in flight frees no room.
        let removal = QuotaTicket::new();
        ledger.begin_removal("t", &["a"], &removal).await.unwrap();
        assert_eq!(
            ledger
                .reserve("t", QUOTA, &[write("b", 61, minute)], &QuotaTicket::new())
                .await
                .unwrap(),
            QuotaDecision::TooManyBytes(usage(1, 40)),
        );
        // A write overlapping it: the removal keeps the record, the write keeps the larger.
        let (w, small) = (QuotaTicket::new(), [write("a", 5, minute)]);
        ledger.reserve("t", QUOTA, &small, &w).await.unwrap();
        ledger
            .end_removal("t", &["a"], &removal, true)
            .await
            .unwrap();
        ledger.settle("t", &small, &w, true).await.unwrap();
        assert_eq!(ledger.usage("t").await.unwrap(), usage(1, 40));
        // Alone again, exact.
        write_alone(&ledger, "t", &small).await;
        assert_eq!(ledger.usage("t").await.unwrap(), usage(1, 5));
        // A removal whose ticket expired before it ended keeps the record: what overlapped
        // it is not known (here, a write that began and settled meanwhile).
        let short = ledger
            .clone()
            .in_flight_for(Duration::from_millis(100))
            .unwrap();
        let removal = QuotaTicket::new();
        short.begin_removal("t", &["d"], &removal).await.unwrap();
        write_alone(&ledger, "t", &[write("d", 3, minute)]).await;
        // real time: past the removal's deadline.
        tokio::time::sleep(Duration::from_millis(200)).await;
        short
            .end_removal("t", &["d"], &removal, true)
            .await
            .unwrap();
        assert_eq!(ledger.usage("t").await.unwrap(), usage(2, 8));
        remove_alone(&ledger, "t", &["d"]).await;
        assert_eq!(ledger.usage("t").await.unwrap(), usage(1, 5));
        // Two writes overlapping: the larger is kept, whichever settles last.
        let (one, two) = (QuotaTicket::new(), QuotaTicket::new());
        let (big, small) = ([write("c", 50, minute)], [write("c", 1, minute)]);
        ledger.reserve("t", QUOTA, &big, &one).await.unwrap();
        ledger.reserve("t", QUOTA, &small, &two).await.unwrap();
        ledger.settle("t", &big, &one, true).await.unwrap();
        ledger.settle("t", &small, &two, true).await.unwrap();
        assert_eq!(ledger.usage("t").await.unwrap(), usage(2, 55));
        // A batch naming a key twice: its writes land in an unknown order.
        let twice = [write("c", 1, minute), write("c", 2, minute)];
        write_alone(&ledger, "t", &twice).await;
        assert_eq!(ledger.usage("t").await.unwrap(), usage(2, 55));
        write_alone(&ledger, "t", &small).await;
        assert_eq!(ledger.usage("t").await.unwrap(), usage(2, 6));
        // A touch alone sets the expiry it asked, earlier or later.
        touch_alone(&ledger, "t", "c", Duration::from_millis(200)).await;
        // real time: past the touched 200 ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ledger.usage("t").await.unwrap(), usage(1, 5));
        let brief = Duration::from_millis(200);
        // A touch overlapping a brief write of a new key keeps the touch's expiry.
        let (w, e) = (QuotaTicket::new(), [write("e", 1, brief)]);
        ledger.reserve("t", QUOTA, &e, &w).await.unwrap();
        touch_alone(&ledger, "t", "e", minute).await;
        ledger.settle("t", &e, &w, true).await.unwrap();
        // A touch begun before a key had any record, and never ended (dropped), keeps the
        // record a write makes meanwhile.
        ledger
            .begin_touch("t", "n", minute, &QuotaTicket::new())
            .await
            .unwrap();
        write_alone(&ledger, "t", &[write("n", 1, brief)]).await;
        // A touch that never ends leaves the later expiry, past a shorter touch's end.
        ledger
            .begin_touch("t", "a", minute, &QuotaTicket::new())
            .await
            .unwrap();
        touch_alone(&ledger, "t", "a", brief).await;
        // real time: past the brief writes' and the shorter touch's 200 ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ledger.usage("t").await.unwrap(), usage(3, 7));
        // Once a dropped touch's ticket lapses, it raises nothing: a write alone is exact.
        let short = ledger
            .clone()
            .in_flight_for(Duration::from_millis(100))
            .unwrap();
        short
            .begin_touch("u", "z", minute, &QuotaTicket::new())
            .await
            .unwrap();
        // real time: past the touch's in-flight time.
        tokio::time::sleep(Duration::from_millis(200)).await;
        write_alone(&ledger, "u", &[write("z", 1, brief)]).await;
        // real time: past the write's 200 ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ledger.usage("u").await.unwrap(), usage(0, 0));
    }
}

#[tokio::test]
async fn concurrent_reservations_never_pass_the_quota() {
    let store = common::standalone("quota-race").await;
    let ledger = tierstack_redis::QuotaLedger::new(&store, "race").unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let member = format!("k{i}");
                let writes = [write(&member, 10, Duration::from_secs(60))];
                let ticket = tierstack_redis::QuotaTicket::new();
                let decision = ledger
                    .reserve("one", QUOTA, &writes, &ticket)
                    .await
                    .unwrap();
                matches!(decision, tierstack_redis::QuotaDecision::Admitted(_))
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap());
    }
    assert_eq!(admitted, 3);
    assert_eq!(ledger.usage("one").await.unwrap().entries, 3);
}

/// The ledger's keys outlive every record they hold: a longer record lengthens their life, a
/// shorter one never shortens it.
#[tokio::test]
async fn the_ledgers_keys_outlive_their_records() {
    use std::collections::BTreeMap;
    use tokio::time::Instant;
    let server = common::private_redis(&[]);
    let store = RedisStore::connect(&RedisConfig::from_url(&server.url()).unwrap())
        .await
        .unwrap();
    let ledger = tierstack_redis::QuotaLedger::new(&store, "server").unwrap();
    // The remaining time in ms of each key on the (private) server, by the part of its name
    // after the subject: exactly the ledger's sizes, expiries and total once writes ended.
    let pttls = || -> BTreeMap<String, i64> {
        let found: BTreeMap<_, _> = server
            .cli(&["--scan"])
            .lines()
            .map(|key| {
                let pttl = server.cli(&["PTTL", key]).trim().parse().unwrap();
                let part = key.rsplit(':').next().unwrap().to_owned();
                (part, pttl)
            })
            .collect();
        let parts: Vec<_> = found.keys().map(String::as_str).collect();
        assert_eq!(parts, ["bytes", "expiries", "sizes"], "{found:?}");
        found
    };
    // Every key lives at least `at_least` minus the time since `since`, and at most `at_most`.
    let check = |since: Instant, at_least: Duration, at_most: Duration| {
        let found = pttls();
        let lower = at_least.saturating_sub(since.elapsed()).as_millis();
        for (part, pttl) in found {
            let pttl = u128::try_from(pttl).unwrap_or_else(|_| panic!("{part}: {pttl}"));
            assert!(
                pttl >= lower && pttl <= at_most.as_millis(),
                "{part}: {pttl}"
            );
        }
    };
    let hour = Duration::from_secs(3600);
    let started = Instant::now();
    write_alone(&ledger, "s", &[write("a", 10, hour)]).await;
    check(started, hour, hour);
    let started = Instant::now();
    write_alone(&ledger, "s", &[write("b", 10, 2 * hour)]).await;
    check(started, 2 * hour, 2 * hour);
    write_alone(&ledger, "s", &[write("c", 10, Duration::from_secs(1))]).await;
    check(started, 2 * hour, 2 * hour);
    assert_eq!(ledger.usage("s").await.unwrap().entries, 3);
}
