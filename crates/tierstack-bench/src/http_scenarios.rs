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

use crate::harness::{Record, Sizes, Workload, head_to_head, records, run_round, shuffled};

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

/// How long a server's graceful stop may take before its task is aborted.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// A server on a loopback port. [`stop`](Self::stop) ends it and, gracefully, its connections,
/// so that nothing of a scenario runs on into the next one.
struct Served {
    url: String,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Stops the server: it closes its idle keep-alive connections and waits for the others,
    /// for at most `STOP_WITHIN`. Past that the server is aborted, which ends its accept loop
    /// only: axum runs each connection as a task of its own.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        let mut task = self.task;
        match tokio::time::timeout(STOP_WITHIN, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("a benchmark server's task failed: {error}"),
            Err(_) => {
                eprintln!("a benchmark server did not stop within {STOP_WITHIN:?}: aborted");
                task.abort();
            }
        }
    }
}

/// Serves `router` on a loopback port.
async fn serve(router: Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("address: {e}"));
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(stopped)
            .await
        {
            eprintln!("a benchmark server failed: {error}");
        }
    });
    Served {
        url: format!("http://{address}"),
        shutdown,
        task,
    }
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
    let servers = [serve(floor).await, serve(cached).await];
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
            urls: urls(&servers[0].url),
            authorization: None,
        }),
        Arc::new(Get {
            client,
            urls: urls(&servers[1].url),
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
    stop_all(servers).await;
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
    let service = bench_server().await;
    let servers = [serve(floor).await, serve(service.router()).await];
    let (floor, served) = (servers[0].url.as_str(), servers[1].url.as_str());
    let client = server_client();
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
    let (floor, served) = (
        Arc::new(Get {
            client: client.clone(),
            urls: urls(floor),
            authorization: Some(format!("Bearer {SERVER_KEY}")),
        }),
        Arc::new(Get {
            client,
            urls: urls(served),
            authorization: Some(format!("Bearer {SERVER_KEY}")),
        }),
    );
    let order = shuffled(URLS);
    let ops = (sizes.redis_ops / SERVER_TASKS).max(1);
    let rounds = head_to_head(&served, &floor, &order, sizes.rounds, SERVER_TASKS, ops).await;
    stop_all(servers).await;
    let mut found = records(
        "server_get/64conn",
        &["tierstack-server hit", "axum + HashMap"],
        1,
        &rounds,
    );
    let floor_rate = found.get(1).map_or(f64::NAN, |floor| floor.ops_per_sec);
    found.extend(redis_benchmark_context(floor_rate, sizes));
    found
}

/// `tierstack-server` on the embedded default with one tenant (`SERVER_KEY`) and no rate
/// limit: the benchmark measures the service, not its refusals.
async fn bench_server() -> tierstack_server::Server {
    let mut config = tierstack_server::ServerConfig::default();
    config.keys.insert(
        tierstack_server::KeyHash::of(SERVER_KEY),
        tierstack_server::TenantName::new("bench").unwrap_or_else(|e| panic!("{e}")),
    );
    config.default_limits.rate_limit = 0;
    let backend = tierstack::StoreConfig::Memory {
        max_bytes: 64 << 20,
    }
    .connect()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    tierstack_server::Server::new(config, backend).unwrap_or_else(|e| panic!("{e}"))
}

/// Stops `servers`, one after the other.
async fn stop_all<const N: usize>(servers: [Served; N]) {
    for server in servers {
        server.stop().await;
    }
}

/// The client of the server scenarios: a keep-alive connection per task.
fn server_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(SERVER_TASKS)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The URLs of the server scenarios' keys under `base`.
fn urls(base: &str) -> Arc<Vec<String>> {
    Arc::new(
        (0..URLS)
            .map(|i| format!("{base}/v1/cache/item-{i}"))
            .collect(),
    )
}

/// A `PUT` of `value` to one of `urls` as the benchmark's tenant; anything but a success
/// stops the run.
struct Put {
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    authorization: String,
    value: Bytes,
}

impl Workload for Put {
    async fn op(&self, i: usize) {
        let response = self
            .client
            .put(&self.urls[i % self.urls.len()])
            .header("authorization", &self.authorization)
            .body(self.value.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("server benchmark PUT failed: {e}"));
        assert!(
            response.status().is_success(),
            "server benchmark PUT: {}",
            response.status()
        );
    }
}

/// `server_put`: writes of 1,000-byte values through `tierstack-server` on the embedded default,
/// its quotas counted in process and then on Redis (`REDIS_URL`, shared by instances: two
/// more round trips a write), against an axum handler that stores the body in a `HashMap`
/// (the HTTP floor); 64 keep-alive connections.
pub(crate) async fn server_put(sizes: &Sizes) -> Vec<Record> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    let map: Arc<Mutex<HashMap<String, Bytes>>> = Arc::default();
    let floor = Router::new().route(
        "/v1/cache/{key}",
        axum::routing::put(
            move |axum::extract::Path(key): axum::extract::Path<String>, body: Bytes| {
                let map = Arc::clone(&map);
                async move {
                    map.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(key, body);
                    axum::http::StatusCode::NO_CONTENT
                }
            },
        ),
    );
    // A slow ledger call must not end the run: a 503 stops it.
    let redis =
        crate::redis_scenarios::config("server-put:").response_timeout(Duration::from_secs(10));
    let store = tierstack::redis::RedisStore::connect(&redis)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let shared = bench_server()
        .await
        .share_quotas(&store)
        .unwrap_or_else(|e| panic!("{e}"));
    let servers = [
        serve(bench_server().await.router()).await,
        serve(shared.router()).await,
        serve(floor).await,
    ];
    let client = server_client();
    let value = Bytes::from(vec![b'x'; 1_000]);
    let put = |base: &str| {
        Arc::new(Put {
            client: client.clone(),
            urls: urls(base),
            authorization: format!("Bearer {SERVER_KEY}"),
            value: value.clone(),
        })
    };
    let systems = servers.each_ref().map(|server| put(&server.url));
    let order = shuffled(URLS);
    let ops = (sizes.redis_ops / SERVER_TASKS).max(1);
    let rounds = crate::harness::interleave(systems.len(), sizes.rounds, |system| {
        let (systems, order) = (&systems, &order);
        async move { run_round(&systems[system], order, SERVER_TASKS, ops).await }
    })
    .await;
    stop_all(servers).await;
    records(
        "server_put/64conn",
        &[
            "tierstack-server, local quotas",
            "tierstack-server, quotas on Redis",
            "axum + HashMap",
        ],
        2,
        &rounds,
    )
}

/// For context, Redis itself at the same concurrency: `redis-benchmark` GETs of a 1,000-byte
/// value from 64 connections against the benchmark's Redis (`REDIS_URL`), as a row whose ratio
/// is the HTTP floor's rate over Redis's (not interleaved: one run after the rounds). Left out,
/// with a line saying why, where `redis-benchmark` or `REDIS_URL` is missing.
fn redis_benchmark_context(floor_rate: f64, sizes: &Sizes) -> Option<Record> {
    let url = std::env::var("REDIS_URL").ok()?;
    let (host, port) = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit_once(':')?;
    let requests = (sizes.redis_ops.max(SERVER_TASKS) * 4).to_string();
    let tasks = SERVER_TASKS.to_string();
    let args = [
        "-h", host, "-p", port, "-c", &tasks, "-n", &requests, "-t", "set,get", "-d", "1000",
        "--csv",
    ];
    let output = match std::process::Command::new("redis-benchmark")
        .args(args)
        .output()
    {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            eprintln!(
                "server_get: redis-benchmark failed ({}): no context row",
                output.status
            );
            return None;
        }
        Err(error) => {
            eprintln!("server_get: redis-benchmark not run ({error}): no context row");
            return None;
        }
    };
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
    // "p99_latency_ms","max_latency_ms"
    let text = String::from_utf8_lossy(&output.stdout);
    let row: Vec<f64> = text
        .lines()
        .find(|line| line.starts_with("\"GET\""))?
        .split(',')
        .skip(1)
        .map(|field| field.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    let (rate, median_ms, tail_ms) = (*row.first()?, *row.get(3)?, *row.get(5)?);
    let nanos = |ms: f64| {
        Duration::try_from_secs_f64(ms / 1e3)
            .ok()
            .and_then(|latency| u64::try_from(latency.as_nanos()).ok())
    };
    let (Some(p50_ns), Some(p99_ns)) = (nanos(median_ms), nanos(tail_ms)) else {
        eprintln!(
            "server_get: redis-benchmark's latencies did not read as numbers: no context row"
        );
        return None;
    };
    let ratio = floor_rate / rate;
    Some(Record {
        scenario: "server_get/64conn".into(),
        system: "redis-benchmark GET (context, not interleaved)".into(),
        baseline: "axum + HashMap".into(),
        ratio,
        ratio_min: ratio,
        ratio_max: ratio,
        ops_per_sec: rate,
        p50_ns,
        p99_ns,
        loader_calls: None,
        l2_commands: None,
        errors: None,
        recovery_ms: None,
        stored_bytes: None,
    })
}
