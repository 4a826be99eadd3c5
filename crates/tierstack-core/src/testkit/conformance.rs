//! The one conformance suite of [`Store`] behaviour that every backend runs.
//!
//! A backend crate calls [`store_conformance_tests!`](crate::store_conformance_tests) in an
//! integration test with an async factory that returns a fresh [`Harness`]; the macro generates one
//! `#[tokio::test]` per case below, so a failure names the behaviour that broke.
//!
//! Cases write only under [`Harness::key`], a prefix unique to the harness, so they can share one
//! real server.

#![expect(
    clippy::missing_panics_doc,
    reason = "every case panics when the store misbehaves: that is how a test fails"
)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::ManualClock;
use crate::error::{CacheError, Result};
use crate::store::{Store, StoreWrite, StoredEntry};

/// How a case makes time pass.
#[derive(Debug, Clone)]
pub enum TimeControl {
    /// The store runs on this clock: advance it.
    Manual(ManualClock),
    /// The store runs on real time (a server's own expiry): sleep.
    Real,
}

/// A store under test and how to move its time.
#[derive(Debug, Clone)]
pub struct Harness {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// How time passes for it.
    pub time: TimeControl,
    prefix: String,
}

impl Harness {
    /// A harness over `store`; `time` says how to let its entries expire.
    pub fn new(store: Arc<dyn Store>, time: TimeControl) -> Self {
        Self {
            store,
            time,
            prefix: format!("conformance-{:016x}:", fastrand::u64(..)),
        }
    }

    /// A key unique to this harness.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Lets `duration` pass for the store.
    pub async fn pass(&self, duration: Duration) {
        match &self.time {
            TimeControl::Manual(clock) => clock.advance(duration),
            TimeControl::Real => tokio::time::sleep(duration).await,
        }
    }
}

/// Generates one `#[tokio::test]` per conformance case, each over a fresh harness from `$factory`
/// (the name of an async fn in the calling module that returns a [`Harness`]).
///
/// ```text
/// async fn harness() -> Harness { /* connect, wrap */ }
/// tierstack_core::store_conformance_tests!(harness);
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:ident) => {
        $crate::store_conformance_tests!(@cases $factory;
            get_of_a_missing_key_is_none,
            set_then_get_round_trips_values,
            empty_and_large_values_round_trip,
            unicode_keys_round_trip,
            set_replaces_value_and_ttl,
            entries_expire,
            get_many_returns_partial_hits_in_order,
            set_many_then_get_many,
            get_with_ttl_reports_value_and_remaining_time,
            set_if_absent_only_writes_once,
            set_if_absent_has_one_winner_among_concurrent_callers,
            set_if_absent_succeeds_after_expiry,
            replace_returns_what_it_replaced,
            compare_and_set_writes_only_over_the_bytes_it_was_given,
            compare_and_set_has_one_winner_among_concurrent_callers,
            compare_and_set_can_remove_and_ignores_expired_entries,
            delete_reports_whether_an_entry_existed,
            delete_many_counts_removed_entries,
            exists_tracks_presence,
            expire_extends_and_shortens,
            expire_of_an_envelope_shows_in_get_with_ttl,
            expire_leaves_a_tombstone_alone,
            ttl_reports_remaining_time,
            delete_prefix_takes_glob_characters_literally,
            delete_prefix_handles_unicode,
            sweep_expired_leaves_live_entries,
            invalid_keys_are_refused,
            invalid_ttls_are_refused_and_nothing_is_written,
            ping_answers,
        );
    };
    (@cases $factory:ident; $($case:ident),* $(,)?) => {
        mod store_conformance {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let harness = super::$factory().await;
                    $crate::testkit::conformance::$case(&harness).await;
                }
            )*
        }
    };
}

fn ok<T>(result: Result<T>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what} failed: {e} ({e:?})"))
}

const LONG: Duration = Duration::from_mins(1);
/// A TTL short enough to wait out on a real server, long enough not to expire between calls.
const SHORT: Duration = Duration::from_millis(400);
const PAST_SHORT: Duration = Duration::from_secs(1);

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A missing key reads as `Ok(None)`.
pub async fn get_of_a_missing_key_is_none(h: &Harness) {
    assert_eq!(ok(h.store.get(&h.key("missing")).await, "get"), None);
}

/// A value read back is the value written, byte for byte.
pub async fn set_then_get_round_trips_values(h: &Harness) {
    let key = h.key("a");
    let all_bytes: Vec<u8> = (0..=255).collect();
    ok(
        h.store
            .set(&key, Bytes::from(all_bytes.clone()), LONG)
            .await,
        "set",
    );
    assert_eq!(
        ok(h.store.get(&key).await, "get").as_deref(),
        Some(&all_bytes[..])
    );
}

/// Empty values and values of 256 KiB round-trip.
pub async fn empty_and_large_values_round_trip(h: &Harness) {
    let empty = h.key("empty");
    ok(h.store.set(&empty, Bytes::new(), LONG).await, "set empty");
    assert_eq!(
        ok(h.store.get(&empty).await, "get empty"),
        Some(Bytes::new())
    );
    let large = h.key("large");
    let value: Vec<u8> = (0..256 * 1024u32)
        .map(|i| u8::try_from(i % 251).unwrap_or_default())
        .collect();
    ok(
        h.store.set(&large, Bytes::from(value.clone()), LONG).await,
        "set large",
    );
    assert_eq!(
        ok(h.store.get(&large).await, "get large").as_deref(),
        Some(&value[..])
    );
}

/// Keys with unicode, spaces, separators and glob characters are distinct and round-trip.
pub async fn unicode_keys_round_trip(h: &Harness) {
    let names = [
        "ü/ñ/日本",
        "a b",
        "a:b",
        "a*b",
        "a?b",
        "[a]",
        "a\\b",
        ".",
        "..",
    ];
    for (i, name) in names.iter().enumerate() {
        ok(
            h.store.set(&h.key(name), bytes(&i.to_string()), LONG).await,
            "set",
        );
    }
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            ok(h.store.get(&h.key(name)).await, "get"),
            Some(bytes(&i.to_string())),
            "key {name:?}"
        );
    }
}

/// A second set replaces the value and the time to live.
pub async fn set_replaces_value_and_ttl(h: &Harness) {
    let key = h.key("replace");
    ok(h.store.set(&key, bytes("old"), LONG).await, "set");
    ok(h.store.set(&key, bytes("new"), SHORT).await, "set again");
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(bytes("new")));
    h.pass(PAST_SHORT).await;
    assert_eq!(ok(h.store.get(&key).await, "get after ttl"), None);
}

/// An entry is gone once its time to live has passed, for every read operation.
pub async fn entries_expire(h: &Harness) {
    let key = h.key("expiring");
    let keep = h.key("kept");
    ok(h.store.set(&key, bytes("v"), SHORT).await, "set");
    ok(h.store.set(&keep, bytes("k"), LONG).await, "set");
    assert!(ok(h.store.exists(&key).await, "exists before"));
    h.pass(PAST_SHORT).await;
    assert_eq!(ok(h.store.get(&key).await, "get"), None);
    assert!(!ok(h.store.exists(&key).await, "exists"));
    assert_eq!(ok(h.store.ttl(&key).await, "ttl"), None);
    assert_eq!(
        ok(
            h.store.get_many(&[key.as_str(), keep.as_str()]).await,
            "get_many"
        ),
        vec![None, Some(bytes("k"))]
    );
    assert!(
        !ok(h.store.expire(&key, LONG).await, "expire"),
        "expired entries cannot be revived"
    );
    assert!(
        !ok(h.store.delete(&key).await, "delete"),
        "an expired entry does not count as deleted"
    );
}

/// `get_many` answers in the order asked, with `None` for misses and repeats allowed.
pub async fn get_many_returns_partial_hits_in_order(h: &Harness) {
    let (a, b, c) = (h.key("a"), h.key("b"), h.key("c"));
    ok(h.store.set(&a, bytes("1"), LONG).await, "set");
    ok(h.store.set(&c, bytes("3"), LONG).await, "set");
    let got = ok(
        h.store
            .get_many(&[c.as_str(), b.as_str(), a.as_str(), c.as_str()])
            .await,
        "get_many",
    );
    assert_eq!(
        got,
        vec![Some(bytes("3")), None, Some(bytes("1")), Some(bytes("3"))]
    );
    assert!(ok(h.store.get_many(&[]).await, "empty get_many").is_empty());
}

/// `set_many` writes every entry with its own time to live.
pub async fn set_many_then_get_many(h: &Harness) {
    let keys: Vec<String> = (0..50).map(|i| h.key(&format!("bulk-{i}"))).collect();
    let writes: Vec<StoreWrite<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| StoreWrite {
            key,
            value: bytes(&i.to_string()),
            ttl: if i == 0 { SHORT } else { LONG },
        })
        .collect();
    ok(h.store.set_many(&writes).await, "set_many");
    ok(h.store.set_many(&[]).await, "empty set_many");
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = ok(h.store.get_many(&refs).await, "get_many");
    for (i, value) in got.iter().enumerate() {
        assert_eq!(value.as_ref(), Some(&bytes(&i.to_string())));
    }
    h.pass(PAST_SHORT).await;
    assert_eq!(ok(h.store.get(&keys[0]).await, "get"), None);
    assert_eq!(ok(h.store.get(&keys[1]).await, "get"), Some(bytes("1")));
}

/// `get_with_ttl` and `get_many_with_ttl` answer the bytes with the remaining time, follow
/// `expire`, and miss on absent or expired entries.
pub async fn get_with_ttl_reports_value_and_remaining_time(h: &Harness) {
    let (a, b, gone) = (h.key("wt-a"), h.key("wt-b"), h.key("wt-gone"));
    ok(h.store.set(&a, bytes("1"), LONG).await, "set");
    ok(h.store.set(&b, bytes("2"), SHORT).await, "set");
    ok(h.store.set(&gone, bytes("3"), SHORT).await, "set");
    assert!(ok(h.store.expire(&b, LONG * 2).await, "expire"));
    h.pass(PAST_SHORT).await;
    let check = |entry: Option<StoredEntry>, value: &str, max: Duration| {
        let entry = entry.unwrap_or_else(|| panic!("{value:?} missing"));
        assert_eq!(entry.value, bytes(value));
        assert!(
            entry.ttl <= max && entry.ttl > max.saturating_sub(Duration::from_secs(10)),
            "ttl {:?}",
            entry.ttl
        );
    };
    check(
        ok(h.store.get_with_ttl(&a).await, "get_with_ttl"),
        "1",
        LONG,
    );
    assert_eq!(
        ok(h.store.get_with_ttl(&gone).await, "get_with_ttl expired"),
        None
    );
    let many = ok(
        h.store
            .get_many_with_ttl(&[b.as_str(), gone.as_str(), a.as_str()])
            .await,
        "get_many_with_ttl",
    );
    let mut many = many.into_iter();
    check(many.next().flatten(), "2", LONG * 2);
    assert_eq!(many.next(), Some(None));
    check(many.next().flatten(), "1", LONG);
}

/// `set_if_absent` writes only when no live entry exists.
pub async fn set_if_absent_only_writes_once(h: &Harness) {
    let key = h.key("once");
    assert!(ok(
        h.store.set_if_absent(&key, bytes("first"), LONG).await,
        "first"
    ));
    assert!(!ok(
        h.store.set_if_absent(&key, bytes("second"), LONG).await,
        "second"
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(bytes("first")));
}

/// Of 16 concurrent `set_if_absent` calls on one key, exactly one wins, and its value stays.
pub async fn set_if_absent_has_one_winner_among_concurrent_callers(h: &Harness) {
    let key = h.key("race");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = Arc::clone(&h.store);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            (
                i,
                store.set_if_absent(&key, bytes(&i.to_string()), LONG).await,
            )
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (i, won) = task.await.unwrap_or_else(|e| panic!("task failed: {e}"));
        if ok(won, "set_if_absent") {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        ok(h.store.get(&key).await, "get"),
        Some(bytes(&winners[0].to_string()))
    );
}

/// An expired entry does not block `set_if_absent`.
pub async fn set_if_absent_succeeds_after_expiry(h: &Harness) {
    let key = h.key("lease");
    assert!(ok(
        h.store.set_if_absent(&key, bytes("a"), SHORT).await,
        "first"
    ));
    h.pass(PAST_SHORT).await;
    assert!(ok(
        h.store.set_if_absent(&key, bytes("b"), LONG).await,
        "after expiry"
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(bytes("b")));
}

/// `replace` writes like `set` and returns the live bytes it replaced, none for an absent or
/// expired entry.
pub async fn replace_returns_what_it_replaced(h: &Harness) {
    let key = h.key("replace");
    assert_eq!(
        ok(h.store.replace(&key, bytes("a"), SHORT).await, "first"),
        None
    );
    assert_eq!(
        ok(h.store.replace(&key, bytes("b"), SHORT).await, "second"),
        Some(bytes("a"))
    );
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(bytes("b")));
    h.pass(PAST_SHORT).await;
    assert_eq!(
        ok(
            h.store.replace(&key, bytes("c"), LONG).await,
            "after expiry"
        ),
        None
    );
    let ttl = ok(h.store.ttl(&key).await, "ttl").expect("the key has an entry");
    assert!(ttl > SHORT, "the new TTL stands: {ttl:?}");
    assert!(matches!(
        h.store.replace(&key, bytes("d"), Duration::ZERO).await,
        Err(CacheError::InvalidTtl { .. })
    ));
    assert!(matches!(
        h.store.replace("", bytes("d"), LONG).await,
        Err(CacheError::InvalidKey { .. })
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(bytes("c")));
}

/// `compare_and_set` writes only over exactly the bytes given: not over other bytes, not over
/// an absent key, and the new value comes with its own TTL.
pub async fn compare_and_set_writes_only_over_the_bytes_it_was_given(h: &Harness) {
    let key = h.key("cas");
    let new = |s: &str| Some((bytes(s), LONG));
    assert!(!ok(
        h.store.compare_and_set(&key, b"x", new("a")).await,
        "absent"
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), None, "nothing written");
    ok(h.store.set(&key, bytes("seen"), SHORT).await, "set");
    assert!(!ok(
        h.store.compare_and_set(&key, b"other", new("a")).await,
        "other bytes"
    ));
    assert!(!ok(
        h.store.compare_and_set(&key, b"see", new("a")).await,
        "a prefix of the bytes"
    ));
    assert!(ok(
        h.store.compare_and_set(&key, b"seen", new("won")).await,
        "same bytes"
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(bytes("won")));
    let ttl = ok(h.store.ttl(&key).await, "ttl").expect("the key has an entry");
    assert!(ttl > SHORT, "the new value's TTL stands: {ttl:?}");
    assert!(!ok(
        h.store.compare_and_set(&key, b"seen", new("again")).await,
        "the old bytes are gone"
    ));
    ok(h.store.set(&key, Bytes::new(), LONG).await, "set empty");
    assert!(ok(
        h.store.compare_and_set(&key, b"", new("over empty")).await,
        "empty bytes"
    ));
    assert!(matches!(
        h.store
            .compare_and_set(&key, b"over empty", Some((bytes("v"), Duration::ZERO)))
            .await,
        Err(CacheError::InvalidTtl { .. })
    ));
    assert!(matches!(
        h.store.compare_and_set("", b"v", None).await,
        Err(CacheError::InvalidKey { .. })
    ));
    assert_eq!(
        ok(h.store.get(&key).await, "get"),
        Some(bytes("over empty"))
    );
}

/// Of 16 concurrent `compare_and_set` calls over the same bytes, exactly one wins.
pub async fn compare_and_set_has_one_winner_among_concurrent_callers(h: &Harness) {
    let key = h.key("cas-race");
    ok(h.store.set(&key, bytes("seen"), LONG).await, "set");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = Arc::clone(&h.store);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let new = Some((bytes(&i.to_string()), LONG));
            (i, store.compare_and_set(&key, b"seen", new).await)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (i, won) = task.await.unwrap_or_else(|e| panic!("task failed: {e}"));
        if ok(won, "compare_and_set") {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        ok(h.store.get(&key).await, "get"),
        Some(bytes(&winners[0].to_string()))
    );
}

/// `compare_and_set` with no new value removes the entry, only over the same bytes; an expired
/// entry is no entry.
pub async fn compare_and_set_can_remove_and_ignores_expired_entries(h: &Harness) {
    let key = h.key("cas-remove");
    ok(h.store.set(&key, bytes("seen"), LONG).await, "set");
    assert!(!ok(
        h.store.compare_and_set(&key, b"other", None).await,
        "other bytes"
    ));
    assert!(ok(
        h.store.compare_and_set(&key, b"seen", None).await,
        "remove"
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), None);
    ok(h.store.set(&key, bytes("old"), SHORT).await, "set short");
    h.pass(PAST_SHORT).await;
    assert!(!ok(
        h.store
            .compare_and_set(&key, b"old", Some((bytes("new"), LONG)))
            .await,
        "over an expired entry"
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), None);
}

/// `expire` of a tombstone answers `false` and leaves it as it was: a delete's marker is no
/// entry, and must not outlive its own time to live.
pub async fn expire_leaves_a_tombstone_alone(h: &Harness) {
    use crate::clock::Timestamp;
    let key = h.key("tombstone");
    let tombstone = crate::envelope::encode_tombstone::<crate::codec::BincodeCodec>(
        Timestamp::EPOCH,
        Timestamp::from_millis(1),
        crate::envelope::tombstone_nonce(),
    );
    ok(h.store.set(&key, tombstone.clone(), SHORT).await, "set");
    assert!(!ok(h.store.expire(&key, LONG).await, "expire"));
    let ttl = ok(h.store.ttl(&key).await, "ttl").expect("the key has an entry");
    assert!(ttl <= SHORT, "not extended: {ttl:?}");
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(tombstone));
}

/// `delete` removes and says whether a live entry existed.
pub async fn delete_reports_whether_an_entry_existed(h: &Harness) {
    let key = h.key("del");
    ok(h.store.set(&key, bytes("v"), LONG).await, "set");
    assert!(ok(h.store.delete(&key).await, "delete"));
    assert!(!ok(h.store.delete(&key).await, "delete again"));
    assert_eq!(ok(h.store.get(&key).await, "get"), None);
}

/// `delete_many` removes every key given and counts only those that existed.
pub async fn delete_many_counts_removed_entries(h: &Harness) {
    let keys: Vec<String> = (0..5).map(|i| h.key(&format!("dm-{i}"))).collect();
    for key in &keys[..3] {
        ok(h.store.set(key, bytes("v"), LONG).await, "set");
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(ok(h.store.delete_many(&refs).await, "delete_many"), 3);
    assert!(
        ok(h.store.get_many(&refs).await, "get_many")
            .iter()
            .all(Option::is_none)
    );
    assert_eq!(ok(h.store.delete_many(&[]).await, "empty delete_many"), 0);
}

/// `exists` follows set and delete.
pub async fn exists_tracks_presence(h: &Harness) {
    let key = h.key("ex");
    assert!(!ok(h.store.exists(&key).await, "exists"));
    ok(h.store.set(&key, bytes(""), LONG).await, "set");
    assert!(
        ok(h.store.exists(&key).await, "exists after set"),
        "an empty value exists"
    );
    ok(h.store.delete(&key).await, "delete");
    assert!(!ok(h.store.exists(&key).await, "exists after delete"));
}

/// `expire` extends and shortens a live entry's time to live, and reports a missing one.
pub async fn expire_extends_and_shortens(h: &Harness) {
    let key = h.key("touch");
    ok(h.store.set(&key, bytes("v"), SHORT).await, "set");
    assert!(ok(h.store.expire(&key, LONG).await, "extend"));
    h.pass(PAST_SHORT).await;
    assert_eq!(
        ok(h.store.get(&key).await, "get after extend"),
        Some(bytes("v"))
    );
    assert!(ok(h.store.expire(&key, SHORT).await, "shorten"));
    h.pass(PAST_SHORT).await;
    assert_eq!(ok(h.store.get(&key).await, "get after shorten"), None);
    assert!(!ok(
        h.store.expire(&h.key("nothing"), LONG).await,
        "expire missing"
    ));
}

/// An entry written as an envelope (as a cache writes it) and then extended or shortened by
/// `expire` reports its new remaining time through `get_with_ttl`, whatever the expiry written
/// in its bytes said (a store may read the time from there, if it keeps it up to date).
pub async fn expire_of_an_envelope_shows_in_get_with_ttl(h: &Harness) {
    let key = h.key("enveloped");
    let now = crate::clock::Clock::now(&crate::clock::SystemClock);
    let written = crate::envelope::encode(
        &crate::codec::BincodeCodec::default(),
        Some("v"),
        now,
        now.saturating_add(LONG),
        1 << 20,
    );
    ok(h.store.set(&key, ok(written, "encode"), LONG).await, "set");
    let window = Duration::from_secs(5);
    for ttl in [Duration::from_secs(20), LONG * 3] {
        assert!(ok(h.store.expire(&key, ttl).await, "expire"));
        let entry = ok(h.store.get_with_ttl(&key).await, "get_with_ttl")
            .unwrap_or_else(|| panic!("the entry lives after expire({ttl:?})"));
        assert!(
            entry.ttl <= ttl && entry.ttl + window > ttl,
            "expire({ttl:?}) then get_with_ttl reports {:?}",
            entry.ttl
        );
        let value =
            crate::envelope::Envelope::parse::<crate::codec::BincodeCodec>(&entry.value, 1 << 20);
        assert!(value.is_ok(), "the bytes are still an envelope: {value:?}");
    }
}

/// `ttl` reports the remaining time of a live entry and `None` for a missing one.
pub async fn ttl_reports_remaining_time(h: &Harness) {
    let key = h.key("ttl");
    ok(h.store.set(&key, bytes("v"), LONG).await, "set");
    let ttl = ok(h.store.ttl(&key).await, "ttl").unwrap_or_else(|| panic!("no ttl for a live key"));
    assert!(
        ttl <= LONG && ttl > LONG.saturating_sub(Duration::from_secs(10)),
        "ttl {ttl:?}"
    );
    assert_eq!(ok(h.store.ttl(&h.key("none")).await, "ttl missing"), None);
}

/// `delete_prefix` takes `* ? [ ] \` literally and removes exactly the keys with that prefix.
pub async fn delete_prefix_takes_glob_characters_literally(h: &Harness) {
    let doomed = ["p*[a]?\\:1", "p*[a]?\\:2", "p*[a]?\\"];
    let spared = [
        "p*[b]?\\:1",
        "pX[a]?\\:1",
        "p*[a]X\\:1",
        "p*a?\\:1",
        "p",
        "q*[a]?\\:1",
    ];
    for name in doomed.iter().chain(&spared) {
        ok(h.store.set(&h.key(name), bytes(name), LONG).await, "set");
    }
    let removed = ok(
        h.store.delete_prefix(&h.key("p*[a]?\\")).await,
        "delete_prefix",
    );
    assert_eq!(removed, doomed.len() as u64);
    for name in doomed {
        assert_eq!(
            ok(h.store.get(&h.key(name)).await, "get"),
            None,
            "{name:?} survived"
        );
    }
    for name in spared {
        assert_eq!(
            ok(h.store.get(&h.key(name)).await, "get"),
            Some(bytes(name)),
            "{name:?} was removed"
        );
    }
}

/// `delete_prefix` with a unicode prefix removes only keys with those exact characters.
pub async fn delete_prefix_handles_unicode(h: &Harness) {
    for name in ["ü:1", "ü:2", "u:1", "üx", "日本:1"] {
        ok(h.store.set(&h.key(name), bytes(name), LONG).await, "set");
    }
    assert_eq!(
        ok(h.store.delete_prefix(&h.key("ü:")).await, "delete_prefix"),
        2
    );
    for name in ["u:1", "üx", "日本:1"] {
        assert!(ok(h.store.exists(&h.key(name)).await, "exists"), "{name:?}");
    }
    assert_eq!(
        ok(h.store.delete_prefix(&h.key("nothing-here")).await, "none"),
        0
    );
}

/// `sweep_expired` never removes a live entry, and expired entries stay invisible.
pub async fn sweep_expired_leaves_live_entries(h: &Harness) {
    let (gone, kept) = (h.key("sweep-gone"), h.key("sweep-kept"));
    ok(h.store.set(&gone, bytes("g"), SHORT).await, "set");
    ok(h.store.set(&kept, bytes("k"), LONG).await, "set");
    h.pass(PAST_SHORT).await;
    ok(h.store.sweep_expired().await, "sweep_expired");
    assert_eq!(ok(h.store.get(&gone).await, "get"), None);
    assert_eq!(ok(h.store.get(&kept).await, "get"), Some(bytes("k")));
}

/// Empty keys and an empty prefix are refused with `InvalidKey`.
pub async fn invalid_keys_are_refused(h: &Harness) {
    let invalid = |r: Result<()>| matches!(r, Err(CacheError::InvalidKey { .. }));
    assert!(invalid(h.store.get("").await.map(drop)));
    assert!(invalid(h.store.set("", bytes("v"), LONG).await));
    assert!(invalid(
        h.store.set_if_absent("", bytes("v"), LONG).await.map(drop)
    ));
    assert!(invalid(h.store.delete("").await.map(drop)));
    assert!(invalid(h.store.expire("", LONG).await.map(drop)));
    assert!(invalid(h.store.ttl("").await.map(drop)));
    assert!(invalid(h.store.delete_prefix("").await.map(drop)));
    let huge = "k".repeat(crate::key::DEFAULT_MAX_STORE_KEY_LEN + 1);
    assert!(invalid(h.store.set(&huge, bytes("v"), LONG).await));
}

/// Zero and absurd TTLs are refused with `InvalidTtl`, and nothing is written.
pub async fn invalid_ttls_are_refused_and_nothing_is_written(h: &Harness) {
    let key = h.key("bad-ttl");
    let invalid = |r: Result<()>| matches!(r, Err(CacheError::InvalidTtl { .. }));
    assert!(invalid(h.store.set(&key, bytes("v"), Duration::ZERO).await));
    assert!(invalid(h.store.set(&key, bytes("v"), Duration::MAX).await));
    assert!(invalid(
        h.store
            .set_if_absent(&key, bytes("v"), Duration::ZERO)
            .await
            .map(drop)
    ));
    let write = StoreWrite {
        key: &key,
        value: bytes("v"),
        ttl: Duration::ZERO,
    };
    assert!(invalid(h.store.set_many(&[write]).await));
    assert_eq!(ok(h.store.get(&key).await, "get"), None);
    ok(h.store.set(&key, bytes("v"), LONG).await, "set");
    assert!(invalid(
        h.store.expire(&key, Duration::ZERO).await.map(drop)
    ));
    assert_eq!(ok(h.store.get(&key).await, "get"), Some(bytes("v")));
}

/// `ping` succeeds on a healthy backend.
pub async fn ping_answers(h: &Harness) {
    ok(h.store.ping().await, "ping");
}
