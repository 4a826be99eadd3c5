//! The server's life: health while its Redis is down, a graceful shutdown with a request in
//! flight, and secrets (API keys, the admin credential, Redis's password) kept out of its logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::{ADMIN_KEY, Client, SHOP_KEY, config, counted, memory, start, start_router};
use reqwest::{Method, StatusCode};
use tierstack::StoreConfig;
use tierstack_server::{Limits, Server};
use tierstack_test_support::Launch;
use tierstack_test_support::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REDIS_PASSWORD: &str = "sentinel-redis-password-7f3a";
const SENTINEL_KEY: &str = "sentinel-api-key-91c2";

/// Everything the process logs, for the secrets test to search.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

async fn redis_backend(server: &RedisServer, password: Option<&str>) -> tierstack::Backend {
    let url = match password {
        Some(password) => format!("redis://:{password}@127.0.0.1:{}/", server.port()),
        None => server.url(),
    };
    let config = tierstack::redis::RedisConfig::from_url(&url).unwrap();
    StoreConfig::Redis(config).connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stays_up_while_redis_is_down_and_readiness_says_so() {
    let mut redis = RedisServer::start(&Launch::for_tests(), &[]).unwrap();
    let server = start(config(Limits::default()), redis_backend(&redis, None).await).await;
    let anonymous = Client::new(&server.base, None);
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(shop.put("k", "v").await, StatusCode::NO_CONTENT);
    let status = async |path: &str| {
        anonymous
            .request(Method::GET, path)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(status("/readyz").await, StatusCode::OK);
    redis.kill();
    assert_eq!(status("/healthz").await, StatusCode::OK);
    assert_eq!(status("/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
    // A write cannot land: a clear error, not a hang.
    let refused = shop
        .request(Method::PUT, "/v1/cache/k")
        .body("v2")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(Client::code(refused).await, "unavailable");
    // Nor can a read: an error, never a miss a client would take for a missing entry.
    let unread = shop
        .request(Method::GET, "/v1/cache/k")
        .send()
        .await
        .unwrap();
    assert_eq!(unread.status(), StatusCode::SERVICE_UNAVAILABLE);
    let bulk = shop
        .request(Method::POST, "/v1/bulk/get")
        .json(&serde_json::json!({"keys": ["k"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bulk.status(), StatusCode::SERVICE_UNAVAILABLE);
    let exists = shop
        .request(Method::GET, "/v1/cache/k/exists")
        .send()
        .await
        .unwrap();
    assert_eq!(exists.status(), StatusCode::SERVICE_UNAVAILABLE);
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status("/readyz").await != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll loop
    }
}

/// The remaining time of `key` in milliseconds, as a GET answers it.
async fn ttl_ms(client: &Client, key: &str) -> u64 {
    let got = client
        .request(Method::GET, &format!("/v1/cache/{key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK, "{key}");
    got.headers()["x-ttl-ms"].to_str().unwrap().parse().unwrap()
}

/// Quotas counted on a Redis of their own: while it cannot be reached, what the ledger cannot
/// count is not made (writes and touches answer 503 and change nothing); reads and deletes go
/// on, and what they removed stays counted (too much, never too little).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_unreachable_quota_ledger_cannot_count_is_not_made() {
    let mut ledger = RedisServer::start(&Launch::for_tests(), &[]).unwrap();
    let ledger_config = tierstack::redis::RedisConfig::from_url(&ledger.url()).unwrap();
    let server = common::start_with(
        config(Limits::default()),
        memory().await,
        |server| async move {
            let store = tierstack::redis::RedisStore::connect(&ledger_config)
                .await
                .unwrap();
            server.share_quotas(&store).unwrap()
        },
    )
    .await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    let put = |key: &'static str, value: &'static str, ttl: u64| {
        shop.request(Method::PUT, &format!("/v1/cache/{key}?ttl={ttl}"))
            .body(value)
            .send()
    };
    let refused = async |response: reqwest::Response| {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Client::code(response).await, "unavailable");
    };
    for key in ["k", "gone", "gone-too"] {
        assert_eq!(
            put(key, "v", 60).await.unwrap().status(),
            StatusCode::NO_CONTENT
        );
    }
    // An entry's bytes are its key's and its value's.
    assert_eq!(counted(&server.base).await, (3, 16));

    // The ledger's Redis up, keeping what it counted, but refusing this server (a password).
    ledger.cli(&["CONFIG", "SET", "requirepass", "ledger-password"]);
    let auth = ["-a", "ledger-password", "--no-auth-warning"];
    ledger.cli(&[&auth[..], &["CLIENT", "KILL", "TYPE", "normal"]].concat());
    refused(put("new", "v", 60).await.unwrap()).await;
    refused(put("k", "v2", 6_000).await.unwrap()).await;
    refused(
        shop.request(Method::POST, "/v1/cache/k/touch?ttl=6000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(shop.get("k").await, (StatusCode::OK, "v".to_owned()));
    let ttl = ttl_ms(&shop, "k").await;
    assert!(ttl <= 60_000, "neither rewritten nor touched: {ttl}");
    assert_eq!(shop.get("new").await.0, StatusCode::NOT_FOUND);
    let deleted = shop
        .request(Method::DELETE, "/v1/cache/gone")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(shop.get("gone").await.0, StatusCode::NOT_FOUND);
    ledger.cli(&[&auth[..], &["CONFIG", "SET", "requirepass", ""]].concat());
    // Reachable again, the ledger still counts the deleted entry, until its TTL.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let usage = Client::new(&server.base, Some(ADMIN_KEY))
            .request(Method::GET, "/v1/admin/tenants/shop/usage")
            .send()
            .await
            .unwrap();
        if usage.status() == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ledger not back");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll loop
    }
    assert_eq!(counted(&server.base).await, (3, 16));

    // The ledger's Redis gone.
    ledger.kill();
    refused(put("new", "v", 60).await.unwrap()).await;
    let by_prefix = shop.json(Method::DELETE, "/v1/cache?prefix=gone-").await;
    assert_eq!(by_prefix["deleted"], 1, "{by_prefix}");
    let deleted = shop
        .request(Method::DELETE, "/v1/cache/k")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    // Back empty (it keeps nothing on disk), the ledger counts again; exactly here, since
    // every entry was deleted while it was away (a ledger that loses what it counted while
    // entries stay counts them low: see docs/server.md).
    ledger.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while put("new", "v", 60).await.unwrap().status() != StatusCode::NO_CONTENT {
        assert!(tokio::time::Instant::now() < deadline, "writes not back");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll loop
    }
    assert_eq!(shop.get("new").await, (StatusCode::OK, "v".to_owned()));
    assert_eq!(counted(&server.base).await, (1, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_finishes_the_request_in_flight() {
    // Told when the request reaches the routes, its headers read.
    let arrived = Arc::new(tokio::sync::Notify::new());
    let told = Arc::clone(&arrived);
    let router = Server::new(config(Limits::default()), memory().await)
        .unwrap()
        .router()
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                told.notify_one();
                next.run(request)
            },
        ));
    let mut server = start_router(router).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    // A PUT whose body is half sent when the shutdown starts.
    let head = format!(
        "PUT /v1/cache/slow HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {SHOP_KEY}\r\n\
         Content-Length: 10\r\nConnection: close\r\n\r\nhello"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    arrived.notified().await;
    server.shut_down();
    tokio::time::sleep(Duration::from_millis(100)).await; // real time: the shutdown begins
    assert!(
        !server.stopped.is_finished(),
        "waits for the request in flight"
    );
    stream.write_all(b"world").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    tokio::time::timeout(Duration::from_secs(5), &mut server.stopped)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(&address).await.is_err(),
        "no new connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Global: the server logs from the runtime's worker threads. Only this test sets it.
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let mut redis =
        RedisServer::start(&Launch::for_tests(), &["--requirepass", REDIS_PASSWORD]).unwrap();
    let mut config = config(Limits::default());
    config.keys.insert(
        tierstack_server::KeyHash::of(SENTINEL_KEY),
        tierstack_server::TenantName::new("sentinel").unwrap(),
    );
    // As the binary runs on Redis: quotas and rate limits counted there too.
    let url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/", redis.port());
    let backend = redis_backend(&redis, Some(REDIS_PASSWORD)).await;
    let server = common::start_with(config, backend, |server| async move {
        let counting = tierstack::redis::RedisConfig::from_url(&url).unwrap();
        let counting = tierstack::redis::RedisStore::connect(&counting)
            .await
            .unwrap();
        server
            .share_quotas(&counting)
            .unwrap()
            .share_rate_limits(counting)
    })
    .await;
    let tenant = Client::new(&server.base, Some(SENTINEL_KEY));
    assert_eq!(tenant.put("k", "value").await, StatusCode::NO_CONTENT);
    let wrong = Client::new(&server.base, Some(&format!("{SENTINEL_KEY}-wrong")));
    assert_eq!(wrong.get("k").await.0, StatusCode::UNAUTHORIZED);
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let created = admin
        .json(Method::POST, "/v1/admin/tenants/sentinel/keys")
        .await;
    let created_key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    admin
        .request(Method::DELETE, &format!("/v1/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    // Failures are logged too: Redis goes away under a request.
    redis.kill();
    let failed = tenant
        .request(Method::PUT, "/v1/cache/k")
        .body("v")
        .send()
        .await
        .unwrap();
    let body = failed.text().await.unwrap();
    for secret in [REDIS_PASSWORD, SENTINEL_KEY, ADMIN_KEY] {
        assert!(
            !body.contains(secret),
            "an error body holds a secret: {body}"
        );
    }
    let _ = std::io::stdout().flush();
    let logs = captured.text();
    assert!(
        logs.contains("API key created"),
        "the logs were captured: {logs}"
    );
    assert!(
        logs.contains("the quota ledger is unavailable"),
        "the ledger's failure was logged: {logs}"
    );
    for secret in [
        REDIS_PASSWORD,
        SENTINEL_KEY,
        ADMIN_KEY,
        created_key.as_str(),
    ] {
        assert!(!logs.contains(secret), "the logs hold a secret");
    }
}
