//! `http_cached_get`: requests per second through `HttpCacheLayer` on a cache hit, against the
//! same route without the layer answering a precomputed body (the HTTP floor): two axum
//! servers on loopback, one HTTP client with keep-alive, 16 tasks.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use tierstack::TieredCache;
use tierstack_http::HttpCacheLayer;

use crate::harness::{Record, Sizes, Workload, head_to_head, records, shuffled};

const TASKS: usize = 16;
/// Distinct URLs, each a cache hit after the warm-up.
const URLS: usize = 100;

/// A `GET` of one of `urls`, with an `Authorization` header if there is one; a failure
/// status stops the run.
struct Get {
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    authorization: Option<String>,
}

impl Workload for Get {
    async fn op(&self, i: usize) {
        let mut request = self.client.get(&self.urls[i % self.urls.len()]);
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("http benchmark request failed: {e}"));
        assert!(
            response.status().is_success(),
            "http benchmark: {}",
            response.status()
        );
        black_box(
            response
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("http benchmark body failed: {e}")),
        );
    }
}

/// Serves `router` on a loopback port; answers its base URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("address: {e}"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

pub(crate) async fn http_cached_get(sizes: &Sizes) -> Vec<Record> {
    // A 1 KiB JSON-ish body, computed once: the floor's handler only clones it.
    let body = Bytes::from(format!("{{\"items\":\"{}\"}}", "x".repeat(1_000)));
    let route = move || {
        let body = body.clone();
        async move { ([("content-type", "application/json")], body) }
    };
    let floor = Router::new().route("/items/{id}", get(route.clone()));
    let cache = TieredCache::builder("bench-http")
        .default_ttl(Duration::from_secs(3600))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let cached = Router::new()
        .route("/items/{id}", get(route))
        .layer(HttpCacheLayer::new(cache));
    let (floor, cached) = (serve(floor).await, serve(cached).await);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(TASKS)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let urls = |base: &str| -> Arc<Vec<String>> {
        Arc::new((0..URLS).map(|i| format!("{base}/items/{i}")).collect())
    };
    let (floor, cached) = (
        Arc::new(Get {
            client: client.clone(),
            urls: urls(&floor),
            authorization: None,
        }),
        Arc::new(Get {
            client,
            urls: urls(&cached),
            authorization: None,
        }),
    );
    // Every URL stored before the rounds.
    for i in 0..URLS {
        cached.op(i).await;
    }
    let order = shuffled(URLS);
    let ops = (sizes.redis_ops / TASKS).max(1);
    let rounds = head_to_head(&cached, &floor, &order, sizes.rounds, TASKS, ops).await;
    records(
        "http_cached_get/16task",
        &["HttpCacheLayer hit", "handler without the layer"],
        1,
        &rounds,
    )
}

/// Concurrent client tasks of `server_get`, each with its own keep-alive connection.
const SERVER_TASKS: usize = 64;
/// The API key both sides are called with.
const SERVER_KEY: &str = "bench-key-0123456789abcdef";

/// `server_get`: cache hits through `tierstack-server` on the embedded default (its key
/// checked, its tenant's namespace, its limits), against an axum handler answering the same
/// bytes from a `HashMap` (the HTTP floor); 64 keep-alive connections.
pub(crate) async fn server_get(sizes: &Sizes) -> Vec<Record> {
    use std::collections::HashMap;
    let value = Bytes::from(vec![b'x'; 1_000]);
    let map: Arc<HashMap<String, Bytes>> = Arc::new(
        (0..URLS)
            .map(|i| (format!("item-{i}"), value.clone()))
            .collect(),
    );
    let floor = Router::new().route(
        "/v1/cache/{key}",
        get(
            move |axum::extract::Path(key): axum::extract::Path<String>| {
                let map = Arc::clone(&map);
                async move {
                    map.get(&key)
                        .cloned()
                        .ok_or(axum::http::StatusCode::NOT_FOUND)
                }
            },
        ),
    );
    let mut config = tierstack_server::ServerConfig::default();
    config.keys.insert(
        tierstack_server::KeyHash::of(SERVER_KEY),
        tierstack_server::TenantName::new("bench").unwrap_or_else(|e| panic!("{e}")),
    );
    // No rate limit: the benchmark measures the service, not its refusals.
    config.default_limits.rate_limit = 0;
    let backend = tierstack::StoreConfig::Memory {
        max_bytes: 64 << 20,
    }
    .connect()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let service = tierstack_server::Server::new(config, backend).unwrap_or_else(|e| panic!("{e}"));
    let (floor, served) = (serve(floor).await, serve(service.router()).await);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(SERVER_TASKS)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..URLS {
        let put = client
            .put(format!("{served}/v1/cache/item-{i}"))
            .header("authorization", format!("Bearer {SERVER_KEY}"))
            .body(value.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            put.status().is_success(),
            "server benchmark PUT: {}",
            put.status()
        );
    }
    let urls = |base: &str| -> Arc<Vec<String>> {
        Arc::new(
            (0..URLS)
                .map(|i| format!("{base}/v1/cache/item-{i}"))
                .collect(),
        )
    };
    let (floor, served) = (
        Arc::new(Get {
            client: client.clone(),
            urls: urls(&floor),
            authorization: Some(format!("Bearer {SERVER_KEY}")),
        }),
        Arc::new(Get {
            client,
            urls: urls(&served),
            authorization: Some(format!("Bearer {SERVER_KEY}")),
        }),
    );
    let order = shuffled(URLS);
    let ops = (sizes.redis_ops / SERVER_TASKS).max(1);
    let rounds = head_to_head(&served, &floor, &order, sizes.rounds, SERVER_TASKS, ops).await;
    records(
        "server_get/64conn",
        &["tierstack-server hit", "axum + HashMap"],
        1,
        &rounds,
    )
}
