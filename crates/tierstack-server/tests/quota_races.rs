//! Removals (compare-and-set, delete, prefix delete), writes and touches of the same key
//! racing, ordered step by step, on both quota ledgers (this instance's, and the one shared in
//! Redis): whatever the order, and whatever fails or is dropped, the value that stays is
//! counted.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::{Client, SHOP_KEY, config, counted, memory};
use reqwest::{Method, StatusCode};
use tierstack::StoreConfig;
use tierstack::core::{CacheError, Result, Store};
use tierstack::redis::{RedisConfig, RedisStore};
use tierstack_server::Limits;
use tokio::sync::Notify;

/// Where a [`HeldRemoval`] stops a compare-and-set removal.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// Before the store sees it: it will find the value written meanwhile, and not remove.
    BeforeSwap,
    /// After the store removed: a write lands between the removal and its answer.
    AfterSwap,
    /// Not held: it fails, as a store that is down (and so do deletes).
    Fail,
    /// Not the removal: the first plain write, before the store sees it.
    Write,
    /// The first plain write, as a command sent that lands later: it waits for `go` in a task
    /// of its own, which the caller's timeout does not stop.
    WriteLandingLate,
    /// The first touch, after the store has touched: its answer never comes back.
    TouchAnswerLost,
    /// The first prefix delete, before the store sees it.
    PrefixDelete,
}

/// A store that stops its first compare-and-set (the removal's: it writes a tombstone; the
/// test's plain writes take no compare-and-set), or its first plain write, where told, signals
/// `reached`, and goes on once it gets `go`.
#[derive(Debug)]
struct HeldRemoval {
    inner: Arc<dyn Store>,
    hold: Hold,
    armed: AtomicBool,
    reached: Notify,
    go: Notify,
    /// What lets a write landing late land.
    late: Arc<Notify>,
    /// Told once the write landing late has landed.
    landed: Arc<Notify>,
}

impl HeldRemoval {
    /// Waits until a call has stopped here (failing the test after ten seconds).
    async fn stopped(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.reached.notified())
            .await
            .expect("the held call never came");
    }

    /// Stops the first call that comes here; the others pass.
    async fn stop_here(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.go.notified().await;
        }
    }
}

#[async_trait]
impl Store for HeldRemoval {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.inner.get(key).await
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        match self.hold {
            Hold::Write => self.stop_here().await,
            Hold::WriteLandingLate if self.armed.swap(false, Ordering::SeqCst) => {
                self.reached.notify_one();
                let (inner, gate, landed, key) = (
                    Arc::clone(&self.inner),
                    Arc::clone(&self.late),
                    Arc::clone(&self.landed),
                    key.to_owned(),
                );
                let landing = tokio::spawn(async move {
                    gate.notified().await;
                    let written = inner.set(&key, value, ttl).await;
                    landed.notify_one();
                    written
                });
                return landing.await.unwrap();
            }
            _ => {}
        }
        self.inner.set(key, value, ttl).await
    }
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        self.inner.set_if_absent(key, value, ttl).await
    }
    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        // A delete's tombstone.
        if matches!(self.hold, Hold::Fail) {
            return Err(CacheError::backend("replace", true, "the store is down"));
        }
        self.inner.replace(key, value, ttl).await
    }
    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        match self.hold {
            Hold::BeforeSwap => {
                self.stop_here().await;
                self.inner.compare_and_set(key, current, new).await
            }
            Hold::AfterSwap => {
                let removed = self.inner.compare_and_set(key, current, new).await;
                self.stop_here().await;
                removed
            }
            Hold::Fail => Err(CacheError::backend(
                "compare_and_set",
                true,
                "the store is down",
            )),
            Hold::Write | Hold::WriteLandingLate | Hold::TouchAnswerLost | Hold::PrefixDelete => {
                self.inner.compare_and_set(key, current, new).await
            }
        }
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        if matches!(self.hold, Hold::Fail) {
            return Err(CacheError::backend("delete", true, "the store is down"));
        }
        self.inner.delete(key).await
    }
    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        let touched = self.inner.expire(key, ttl).await;
        if matches!(self.hold, Hold::TouchAnswerLost) {
            self.stop_here().await;
        }
        touched
    }
    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        self.inner.ttl(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        if matches!(self.hold, Hold::Fail) {
            return Err(CacheError::backend(
                "delete_prefix",
                true,
                "the store is down",
            ));
        }
        if matches!(self.hold, Hold::PrefixDelete) {
            self.stop_here().await;
        }
        self.inner.delete_prefix(prefix).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

/// Which quota ledger the server counts in.
#[derive(Debug, Clone, Copy)]
enum Ledger {
    Local,
    Redis,
}

fn limits() -> Limits {
    Limits {
        max_entries: 10,
        max_bytes: 1_000,
        ..Limits::default()
    }
}

/// A server counting in `ledger`, its backend's store wrapped to hold its removal at `stop`.
async fn server(ledger: Ledger, stop: Hold) -> (common::Running, Arc<HeldRemoval>) {
    server_timing_out(ledger, stop, Duration::from_secs(10)).await
}

/// As `server`, with requests ending after `request_timeout`.
async fn server_timing_out(
    ledger: Ledger,
    stop: Hold,
    request_timeout: Duration,
) -> (common::Running, Arc<HeldRemoval>) {
    let redis = match ledger {
        Ledger::Local => None,
        Ledger::Redis => Some(
            RedisConfig::from_url(&tierstack_test_support::redis::redis_url())
                .unwrap()
                .key_prefix(&unique_prefix()),
        ),
    };
    let mut backend = match &redis {
        None => memory().await,
        Some(redis) => StoreConfig::Redis(redis.clone()).connect().await.unwrap(),
    };
    let held = Arc::new(HeldRemoval {
        inner: Arc::clone(&backend.store),
        hold: stop,
        armed: AtomicBool::new(true),
        reached: Notify::new(),
        go: Notify::new(),
        late: Arc::new(Notify::new()),
        landed: Arc::new(Notify::new()),
    });
    backend.store = held.clone();
    let mut config = config(limits());
    config.request_timeout = request_timeout;
    let running = common::start_with(config, backend, |server| async move {
        match redis {
            None => server,
            Some(redis) => server
                .share_quotas(&RedisStore::connect(&redis).await.unwrap())
                .unwrap(),
        }
    })
    .await;
    (running, held)
}

fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-server-quota-race-{nanos}:")
}

/// Starts a removal of `key` if it holds `current`, and answers its status once done.
fn remove_if_current(base: &str, key: &str, current: &str) -> tokio::task::JoinHandle<StatusCode> {
    use base64::Engine as _;
    let shop = Client::new(base, Some(SHOP_KEY));
    let path = format!("/v1/cache/{key}/cas");
    let current = base64::engine::general_purpose::STANDARD.encode(current);
    tokio::spawn(async move {
        shop.request(Method::POST, &path)
            .json(&serde_json::json!({"current": current, "new": null}))
            .send()
            .await
            .unwrap()
            .status()
    })
}

/// A write of the key landing while a compare-and-set removal runs, after the removal reached
/// the data (it removed) or before (it finds the new value, and does not): the value that stays
/// is counted either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_while_a_removal_runs_stays_counted() {
    let orders = [
        (Hold::AfterSwap, StatusCode::NO_CONTENT),
        (Hold::BeforeSwap, StatusCode::PRECONDITION_FAILED),
    ];
    for ledger in [Ledger::Local, Ledger::Redis] {
        for (hold, answer) in orders {
            let (server, held) = server(ledger, hold).await;
            let shop = Client::new(&server.base, Some(SHOP_KEY));
            assert_eq!(shop.put("k", "old value").await, StatusCode::NO_CONTENT);
            let removal = remove_if_current(&server.base, "k", "old value");
            held.stopped().await;
            assert_eq!(shop.put("k", "new").await, StatusCode::NO_CONTENT);
            held.go.notify_one();
            assert_eq!(removal.await.unwrap(), answer, "{ledger:?} {hold:?}");
            let got = shop
                .request(Method::GET, "/v1/cache/k")
                .send()
                .await
                .unwrap();
            assert_eq!(got.bytes().await.unwrap().as_ref(), b"new", "{ledger:?}");
            // Overlapping, the two keep the larger record (which reached the data last is not
            // known to the ledger) until a write alone records the key exactly.
            assert_eq!(counted(&server.base).await, (1, 10), "{ledger:?} {hold:?}");
            assert_eq!(shop.put("k", "newer").await, StatusCode::NO_CONTENT);
            assert_eq!(counted(&server.base).await, (1, 6), "{ledger:?} {hold:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_that_fail_leave_the_value_counted() {
    for ledger in [Ledger::Local, Ledger::Redis] {
        let (server, _held) = server(ledger, Hold::Fail).await;
        let shop = Client::new(&server.base, Some(SHOP_KEY));
        assert_eq!(shop.put("k", "old value").await, StatusCode::NO_CONTENT);
        let removal = remove_if_current(&server.base, "k", "old value");
        assert_eq!(
            removal.await.unwrap(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{ledger:?}"
        );
        assert_eq!(counted(&server.base).await, (1, 10), "{ledger:?}");
        for path in ["/v1/cache/k", "/v1/cache?prefix=k"] {
            let removed = shop.request(Method::DELETE, path).send().await.unwrap();
            assert_eq!(removed.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert_eq!(counted(&server.base).await, (1, 10), "{ledger:?} {path}");
        }
    }
}

/// A removal frees no room until it has happened: its record still counts while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_in_flight_frees_no_room() {
    for ledger in [Ledger::Local, Ledger::Redis] {
        let (server, held) = server(ledger, Hold::BeforeSwap).await;
        let shop = Client::new(&server.base, Some(SHOP_KEY));
        let big = "x".repeat(990);
        assert_eq!(shop.put("k", &big).await, StatusCode::NO_CONTENT);
        let removal = remove_if_current(&server.base, "k", &big);
        held.stopped().await;
        assert_eq!(
            shop.put("other", &big).await,
            StatusCode::INSUFFICIENT_STORAGE,
            "{ledger:?}"
        );
        held.go.notify_one();
        assert_eq!(removal.await.unwrap(), StatusCode::NO_CONTENT, "{ledger:?}");
        assert_eq!(counted(&server.base).await, (0, 0), "{ledger:?}");
        assert_eq!(shop.put("other", &big).await, StatusCode::NO_CONTENT);
    }
}

/// A write reserved before a removal of its key and landing after it is counted once it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reserved_before_a_removal_and_landing_after_it_is_counted() {
    for ledger in [Ledger::Local, Ledger::Redis] {
        for removal in ["cas", "delete"] {
            let (server, held) = server(ledger, Hold::Write).await;
            let shop = Client::new(&server.base, Some(SHOP_KEY));
            let writer = Client::new(&server.base, Some(SHOP_KEY));
            // The first plain write stops before the store: the old value's is written with
            // If-None-Match (a conditional write, not held), so that the stopped one is the
            // new value's.
            let create = shop
                .request(Method::PUT, "/v1/cache/k")
                .header("if-none-match", "*")
                .body("old value")
                .send()
                .await
                .unwrap();
            assert_eq!(create.status(), StatusCode::NO_CONTENT);
            let write = tokio::spawn(async move { writer.put("k", "a larger new value").await });
            held.stopped().await;
            // The write has reserved; the removal runs whole before it lands.
            let removed = match removal {
                "cas" => remove_if_current(&server.base, "k", "old value")
                    .await
                    .unwrap(),
                _ => shop
                    .request(Method::DELETE, "/v1/cache/k")
                    .send()
                    .await
                    .unwrap()
                    .status(),
            };
            assert_eq!(removed, StatusCode::NO_CONTENT, "{ledger:?} {removal}");
            held.go.notify_one();
            assert_eq!(write.await.unwrap(), StatusCode::NO_CONTENT);
            assert_eq!(counted(&server.base).await, (1, 19), "{ledger:?} {removal}");
        }
    }
}

/// A write whose request timed out, and whose command lands after a delete of its key, stays
/// counted: the delete keeps the record while the write is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_after_its_request_was_dropped_stays_counted() {
    for ledger in [Ledger::Local, Ledger::Redis] {
        let (server, held) =
            server_timing_out(ledger, Hold::WriteLandingLate, Duration::from_secs(2)).await;
        let shop = Client::new(&server.base, Some(SHOP_KEY));
        let create = tokio::spawn(
            shop.request(Method::PUT, "/v1/cache/k")
                .body("a larger new value")
                .send(),
        );
        held.stopped().await;
        // The write's request ends (the cache's L2 timeout, 503, or the request's, 504) with
        // its command not landed yet: its outcome is not known.
        let status = create.await.unwrap().unwrap().status();
        assert!(
            matches!(
                status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
            ),
            "{ledger:?}: {status}"
        );
        let deleted = shop
            .request(Method::DELETE, "/v1/cache/k")
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), StatusCode::NOT_FOUND, "{ledger:?}");
        held.late.notify_one();
        // The command lands; the ledger still counts it.
        tokio::time::timeout(Duration::from_secs(10), held.landed.notified())
            .await
            .expect("the late write never landed");
        let stored = shop
            .request(Method::GET, "/v1/cache/k")
            .send()
            .await
            .unwrap();
        assert_eq!(stored.status(), StatusCode::OK, "{ledger:?}");
        assert_eq!(
            stored.bytes().await.unwrap().as_ref(),
            b"a larger new value"
        );
        assert_eq!(counted(&server.base).await, (1, 19), "{ledger:?}");
    }
}

/// A touch that reached the data but whose request was dropped (timed out) leaves the entry
/// counted for the touched TTL, not the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_whose_request_was_dropped_keeps_the_entry_counted() {
    for ledger in [Ledger::Local, Ledger::Redis] {
        let (server, held) =
            server_timing_out(ledger, Hold::TouchAnswerLost, Duration::from_secs(1)).await;
        let shop = Client::new(&server.base, Some(SHOP_KEY));
        let put = shop
            .request(Method::PUT, "/v1/cache/k?ttl_ms=1000")
            .body("value")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::NO_CONTENT);
        let written = std::time::Instant::now();
        let touch = shop
            .request(Method::POST, "/v1/cache/k/touch?ttl=60")
            .send()
            .await
            .unwrap();
        // Its answer lost: the cache's L2 timeout (503) or the request's (504).
        assert!(
            matches!(
                touch.status(),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
            ),
            "{ledger:?}: {}",
            touch.status()
        );
        // real time: past the old record's expiry (the 1 s TTL, which the touch must reach the
        // data within, and the ledger's slack of twice the 1 s request timeout).
        tokio::time::sleep(Duration::from_millis(3_500).saturating_sub(written.elapsed())).await;
        let got = shop
            .request(Method::GET, "/v1/cache/k")
            .send()
            .await
            .unwrap();
        assert_eq!(
            got.status(),
            StatusCode::OK,
            "{ledger:?}: the touch reached the data"
        );
        assert_eq!(counted(&server.base).await, (1, 6), "{ledger:?}");
        drop(held);
    }
}

/// A tenant runs one prefix delete at a time: the quota's operations a prefix delete begins
/// stay within one per entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_runs_one_prefix_delete_at_a_time() {
    for ledger in [Ledger::Local, Ledger::Redis] {
        let (server, held) = server(ledger, Hold::PrefixDelete).await;
        let shop = Client::new(&server.base, Some(SHOP_KEY));
        assert_eq!(shop.put("p/1", "value").await, StatusCode::NO_CONTENT);
        let first = tokio::spawn(shop.request(Method::DELETE, "/v1/cache?prefix=p/").send());
        held.stopped().await;
        let second = shop
            .request(Method::DELETE, "/v1/cache?prefix=q/")
            .send()
            .await
            .unwrap();
        assert_eq!(second.status(), StatusCode::CONFLICT, "{ledger:?}");
        assert_eq!(Client::code(second).await, "prefix_delete_running");
        held.go.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(counted(&server.base).await, (0, 0), "{ledger:?}");
        let third = shop
            .request(Method::DELETE, "/v1/cache?prefix=q/")
            .send()
            .await
            .unwrap();
        assert_eq!(
            third.status(),
            StatusCode::OK,
            "{ledger:?}: the claim was released"
        );
    }
}
