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

struct Get {
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
}

impl Workload for Get {
    async fn op(&self, i: usize) {
        let response = self
            .client
            .get(&self.urls[i % self.urls.len()])
            .send()
            .await
            .unwrap_or_else(|e| panic!("http benchmark request failed: {e}"));
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
        }),
        Arc::new(Get {
            client,
            urls: urls(&cached),
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
