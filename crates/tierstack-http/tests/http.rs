//! The layer in front of a real axum server on a socket, driven by a real HTTP client.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tierstack::TieredCache;
use tierstack::core::testkit::{MemoryBus, MemoryStore};
use tierstack_http::{CachedResponse, HttpCacheLayer};

/// How many times each handler ran, and how many requests reached the server (outside the
/// layer).
#[derive(Default)]
struct Calls(AtomicUsize, AtomicUsize);

impl Calls {
    fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    /// Waits until `n` requests have reached the server; fails past ten seconds.
    async fn arrived(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.1.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} requests never arrived"
            );
            tokio::time::sleep(Duration::from_millis(1)).await; // poll loop
        }
    }
}

fn app(calls: &Arc<Calls>) -> Router {
    let c = Arc::clone(calls);
    let plain = move || {
        let c = Arc::clone(&c);
        async move { format!("call {}", c.next()) }
    };
    let c = Arc::clone(calls);
    let no_store = move || {
        let c = Arc::clone(&c);
        async move {
            (
                [(header::CACHE_CONTROL, "no-store")],
                format!("call {}", c.next()),
            )
        }
    };
    let c = Arc::clone(calls);
    let language = move |headers: HeaderMap| {
        let c = Arc::clone(&c);
        async move {
            c.next();
            let language = headers
                .get(header::ACCEPT_LANGUAGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("en")
                .to_owned();
            let greeting = if language.starts_with("fr") {
                "bonjour"
            } else {
                "hello"
            };
            ([(header::VARY, "Accept-Language")], greeting)
        }
    };
    let c = Arc::clone(calls);
    let cookie = move || {
        let c = Arc::clone(&c);
        async move { ([(header::SET_COOKIE, format!("id={}", c.next()))], "yours") }
    };
    let c = Arc::clone(calls);
    let failing = move || {
        let c = Arc::clone(&c);
        async move {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failure {}", c.next()),
            )
        }
    };
    let c = Arc::clone(calls);
    let stream = move || {
        let c = Arc::clone(&c);
        async move {
            c.next();
            let chunks = futures_chunks();
            Response::new(Body::from_stream(chunks))
        }
    };
    let c = Arc::clone(calls);
    let big = move || {
        let c = Arc::clone(&c);
        async move { format!("{}{}", c.next(), "x".repeat(2_000)) }
    };
    let c = Arc::clone(calls);
    let slow = move || {
        let c = Arc::clone(&c);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await; // real time: a slow handler
            format!("call {}", c.next())
        }
    };
    let c = Arc::clone(calls);
    let product = move |Path(id): Path<u32>| {
        let c = Arc::clone(&c);
        async move {
            let tags = format!("product:{id}, catalogue");
            (
                [("x-tierstack-tags", tags)],
                format!("product {id} call {}", c.next()),
            )
                .into_response()
        }
    };
    Router::new()
        .route("/plain", get(plain).post(|| async { "posted" }))
        .route("/no-store", get(no_store))
        .route("/language", get(language))
        .route("/cookie", get(cookie))
        .route("/failing", get(failing))
        .route("/stream", get(stream))
        .route("/big", get(big))
        .route("/slow", get(slow))
        .route("/products/{id}", get(product))
        .merge(per_request_routes(calls))
        .merge(private_routes(calls))
}

/// A route whose responses may not be stored (`private`), with an `ETag`.
fn private_routes(calls: &Arc<Calls>) -> Router {
    let c = Arc::clone(calls);
    let private = move || {
        let c = Arc::clone(&c);
        async move {
            c.next();
            let headers = [
                (header::CACHE_CONTROL, "private"),
                (header::ETAG, "\"v1\""),
                (header::CONTENT_LANGUAGE, "en"),
            ];
            (headers, "mine")
        }
    };
    let private_post = || async { ([(header::ETAG, "\"v1\"")], "posted") };
    Router::new().route("/private", get(private).post(private_post))
}

/// Routes whose answer depends on the request: its host, its cookie, its `x-answer`.
fn per_request_routes(calls: &Arc<Calls>) -> Router {
    let c = Arc::clone(calls);
    let host = move |headers: HeaderMap| {
        let c = Arc::clone(&c);
        async move {
            c.next();
            // Behind a proxy, the host the client asked for.
            let host = headers
                .get("x-forwarded-host")
                .or_else(|| headers.get(header::HOST))
                .cloned();
            format!("links to {}", host.unwrap().to_str().unwrap())
        }
    };
    let c = Arc::clone(calls);
    let whoami = move |headers: HeaderMap| {
        let c = Arc::clone(&c);
        async move {
            c.next();
            // A handler that answers from the cookie but forgot `private`.
            let cookie = headers.get(header::COOKIE).cloned();
            format!(
                "account of {}",
                cookie.map_or("nobody".into(), |c| c.to_str().unwrap().to_owned())
            )
        }
    };
    let c = Arc::clone(calls);
    let flaky = move |headers: HeaderMap| {
        let c = Arc::clone(&c);
        async move {
            let call = c.next();
            // Held until as many requests as it names reached the server, and a little
            // more: those that meet this call in the layer have joined its flight by then.
            if let Some(n) = headers.get("x-hold-for") {
                c.arrived(n.to_str().unwrap().parse().unwrap()).await;
                tokio::time::sleep(Duration::from_millis(50)).await; // real time: a margin
            }
            // The request picks the answer (a header the key does not hold, as an origin's
            // state would be).
            match headers.get("x-answer").map(|v| v.to_str().unwrap()) {
                Some("fail") => (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
                Some("panic") => panic!("the handler panicked, as asked"),
                Some("cookie") => (
                    [(header::SET_COOKIE, "consent=1")],
                    format!("cookie {call}"),
                )
                    .into_response(),
                _ => format!("fresh {call}").into_response(),
            }
        }
    };
    Router::new()
        .route("/host", get(host))
        .route("/whoami", get(whoami))
        .route("/flaky", get(flaky))
}

fn futures_chunks() -> impl futures_util::Stream<Item = Result<&'static str, std::io::Error>> + Send
{
    futures_util::stream::iter(["streamed ", "in ", "parts"].map(Ok))
}

/// The cache a server instance keeps responses in.
fn cache(l2: &Arc<MemoryStore>, bus: &MemoryBus) -> TieredCache<CachedResponse> {
    TieredCache::builder("http")
        .l2(l2.clone())
        .backplane(Arc::new(bus.backplane()))
        .default_ttl(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Serves `app` behind `layer` on a loopback port; answers the base URL.
async fn serve(layer: HttpCacheLayer, calls: &Arc<Calls>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let arrivals = Arc::clone(calls);
    let router = app(calls).layer(layer).layer(axum::middleware::map_request(
        move |request: axum::extract::Request| {
            arrivals.1.fetch_add(1, Ordering::SeqCst);
            std::future::ready(request)
        },
    ));
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

async fn single(layer: HttpCacheLayer) -> (String, Arc<Calls>, reqwest::Client) {
    let calls = Arc::new(Calls::default());
    let base = serve(layer, &calls).await;
    (base, calls, reqwest::Client::new())
}

fn layer() -> HttpCacheLayer {
    HttpCacheLayer::new(cache(&Arc::new(MemoryStore::new()), &MemoryBus::new()))
        .vary_on(["accept-language"])
        .max_body_bytes(1_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_not_stored_answers_conditional_requests_when_asked_to() {
    let (base, _, client) = single(layer()).await;
    let url = format!("{base}/private");
    let by_default = client
        .get(&url)
        .header(header::IF_NONE_MATCH, "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(by_default.status(), StatusCode::OK, "the handler's answer");
    let (base, calls, client) = single(layer().revalidate_unstored(true)).await;
    let url = format!("{base}/private");
    let conditional = |tag: &'static str| client.get(&url).header(header::IF_NONE_MATCH, tag);
    let matching = conditional("\"v1\"").send().await.unwrap();
    assert_eq!(matching.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(matching.headers()[header::ETAG], "\"v1\"");
    assert_eq!(matching.headers()[header::CACHE_CONTROL], "private");
    for about_the_body in [header::CONTENT_TYPE, header::CONTENT_LANGUAGE] {
        assert!(!matching.headers().contains_key(about_the_body));
    }
    assert!(matching.text().await.unwrap().is_empty());
    // `If-Match` comes before `If-None-Match`: the handler's to judge.
    let with_if_match = conditional("\"v1\"")
        .header(header::IF_MATCH, "\"v0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(with_if_match.status(), StatusCode::OK);
    let other = conditional("\"v0\", \"v2\"").send().await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(other.text().await.unwrap(), "mine");
    // Weak comparison; a HEAD too; a request the layer passes by (credentials) too.
    let weak = client
        .head(&url)
        .header(header::IF_NONE_MATCH, "W/\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(weak.status(), StatusCode::NOT_MODIFIED);
    let bypassed = conditional("\"v1\"")
        .header(header::AUTHORIZATION, "Bearer t")
        .send()
        .await
        .unwrap();
    assert_eq!(bypassed.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(
        calls.count(),
        5,
        "the handler answered each: nothing was stored"
    );
    // Not for another method: `If-None-Match` there is the handler's to judge.
    let posted = client
        .post(&url)
        .header(header::IF_NONE_MATCH, "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::OK);
    assert_eq!(posted.text().await.unwrap(), "posted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_route_runs_its_handler_once_and_answers_conditional_requests() {
    let (base, calls, client) = single(layer()).await;
    let first = client.get(format!("{base}/plain")).send().await.unwrap();
    assert_eq!(first.headers()["x-cache"], "MISS");
    let etag = first.headers()[header::ETAG].clone();
    assert_eq!(first.text().await.unwrap(), "call 1");
    let second = client.get(format!("{base}/plain")).send().await.unwrap();
    assert_eq!(second.headers()["x-cache"], "HIT");
    assert!(second.headers().contains_key(header::AGE));
    assert_eq!(second.headers()[header::ETAG], etag);
    assert_eq!(second.text().await.unwrap(), "call 1");
    let conditional = client
        .get(format!("{base}/plain"))
        .header(header::IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(conditional.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(conditional.headers()[header::ETAG], etag);
    assert!(conditional.text().await.unwrap().is_empty());
    // A precondition before `If-None-Match` passes the cache by: the handler judges it.
    let with_if_match = client
        .get(format!("{base}/plain"))
        .header(header::IF_NONE_MATCH, etag.clone())
        .header(header::IF_MATCH, "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(with_if_match.text().await.unwrap(), "call 2");
    let head = client.head(format!("{base}/plain")).send().await.unwrap();
    assert_eq!(
        (head.status(), head.headers()["x-cache"].clone()),
        (StatusCode::OK, "HIT".parse().unwrap())
    );
    assert_eq!(
        calls.count(),
        2,
        "one handler call for all of them but If-Match's"
    );
    // Methods other than GET pass through; a request asking for a fresh copy gets one.
    let posted = client.post(format!("{base}/plain")).send().await.unwrap();
    assert_eq!(posted.text().await.unwrap(), "posted");
    let fresh = client
        .get(format!("{base}/plain"))
        .header(header::CACHE_CONTROL, "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.text().await.unwrap(), "call 3");
    let after = client.get(format!("{base}/plain")).send().await.unwrap();
    assert_eq!(
        after.text().await.unwrap(),
        "call 3",
        "the fresh copy was stored"
    );
    let authorized = client
        .get(format!("{base}/plain"))
        .header(header::AUTHORIZATION, "Bearer secret")
        .send()
        .await
        .unwrap();
    assert_eq!(
        authorized.text().await.unwrap(),
        "call 4",
        "credentials pass through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_may_not_be_stored_is_not() {
    let (base, calls, client) = single(layer()).await;
    for (path, first, second) in [
        ("/no-store", "call 1", "call 2"),
        ("/failing", "failure 3", "failure 4"),
    ] {
        let one = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(one.text().await.unwrap(), first, "{path}");
        let two = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(two.text().await.unwrap(), second, "{path}");
    }
    let cookies: Vec<String> = get_each(&client, &format!("{base}/cookie"), 2)
        .await
        .into_iter()
        .map(|(headers, _)| headers[header::SET_COOKIE].to_str().unwrap().to_owned())
        .collect();
    assert_ne!(
        cookies[0], cookies[1],
        "each response with a cookie is its own caller's"
    );
    for _ in 0..2 {
        let streamed = client.get(format!("{base}/stream")).send().await.unwrap();
        assert_eq!(streamed.text().await.unwrap(), "streamed in parts");
    }
    let big: Vec<String> = get_each(&client, &format!("{base}/big"), 2)
        .await
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    assert!(big.iter().all(|body| body.len() > 2_000));
    assert_eq!(calls.count(), 10, "every one of them ran its handler");
}

/// `count` GETs of `url`, one after the other: the headers and body of each.
async fn get_each(
    client: &reqwest::Client,
    url: &str,
    count: usize,
) -> Vec<(reqwest::header::HeaderMap, String)> {
    let mut answers = Vec::new();
    for _ in 0..count {
        let response = client.get(url).send().await.unwrap();
        let headers = response.headers().clone();
        answers.push((headers, response.text().await.unwrap()));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_varying_on_the_language_keeps_one_variant_per_language() {
    let (base, calls, client) = single(layer()).await;
    for (language, greeting) in [
        ("fr", "bonjour"),
        ("en", "hello"),
        ("fr", "bonjour"),
        ("en", "hello"),
    ] {
        let answer = client
            .get(format!("{base}/language"))
            .header(header::ACCEPT_LANGUAGE, language)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.text().await.unwrap(), greeting);
    }
    assert_eq!(calls.count(), 2, "one handler call per variant");
    // A layer that does not vary on the language stores neither.
    let (base, calls, client) = single(HttpCacheLayer::new(cache(
        &Arc::new(MemoryStore::new()),
        &MemoryBus::new(),
    )))
    .await;
    for _ in 0..2 {
        client.get(format!("{base}/language")).send().await.unwrap();
    }
    assert_eq!(calls.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_url_run_the_handler_once() {
    let (base, calls, client) = single(layer()).await;
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{base}/slow"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), "call 1");
    }
    assert_eq!(calls.count(), 1);
}

/// A server instance's cache over the run's Redis (its own connections and backplane).
async fn redis_cache(prefix: &str) -> TieredCache<CachedResponse> {
    let config =
        tierstack_redis::RedisConfig::from_url(&tierstack_test_support::redis::redis_url())
            .unwrap()
            .key_prefix(prefix);
    let (store, backplane) = tierstack_redis::RedisStore::connect_with_backplane(&config)
        .await
        .unwrap();
    TieredCache::builder("http")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .default_ttl(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_by_prefix_and_tag_reaches_another_instance_through_redis() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("t-http-{nanos}:");
    let calls = Arc::new(Calls::default());
    let first = HttpCacheLayer::new(redis_cache(&prefix).await);
    let second = HttpCacheLayer::new(redis_cache(&prefix).await);
    let a = serve(first.clone(), &calls).await;
    let b = serve(second, &calls).await;
    let client = reqwest::Client::new();
    // Both instances behind one public host, as behind a load balancer.
    let get = async |url: String| {
        let request = client.get(url).header(header::HOST, "shop.example");
        request.send().await.unwrap().text().await.unwrap()
    };
    assert_eq!(get(format!("{a}/products/7")).await, "product 7 call 1");
    first.cache().wait_for_background_fills().await;
    assert_eq!(
        get(format!("{b}/products/7")).await,
        "product 7 call 1",
        "from the L2"
    );
    assert_eq!(get(format!("{b}/products/8")).await, "product 8 call 2");
    first.invalidate_prefix("/products/7").await.unwrap();
    eventually(async || get(format!("{b}/products/7")).await == "product 7 call 3").await;
    assert_eq!(
        get(format!("{b}/products/8")).await,
        "product 8 call 2",
        "another prefix"
    );
    // The tag header is the layer's: no client sees it, on a miss or a hit.
    for _ in 0..2 {
        let response = client.get(format!("{a}/products/9")).send().await.unwrap();
        assert!(!response.headers().contains_key("x-tierstack-tags"));
    }
    first.invalidate_tag("catalogue").await.unwrap();
    eventually(async || get(format!("{b}/products/8")).await == "product 8 call 5").await;
}

async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached within two seconds"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_has_its_own_entries() {
    let (base, calls, client) = single(layer()).await;
    for (host, expected) in [
        ("a.example", "links to a.example"),
        ("b.example", "links to b.example"),
        ("a.example", "links to a.example"),
        ("b.example", "links to b.example"),
    ] {
        let answer = client
            .get(format!("{base}/host"))
            .header(header::HOST, host)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.text().await.unwrap(), expected);
    }
    assert_eq!(calls.count(), 2, "one handler call per host");
}

/// A request whose hosts disagree (an absolute-form URI naming one host and `Host` another, or
/// a `X-Forwarded-Host` the proxy did not set) gets an entry of its own: what its handler
/// built from the host it read never answers another host's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_hosts_disagree_cannot_poison_another_hosts_entry() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (base, calls, client) = single(layer()).await;
    let address = base.trim_start_matches("http://");
    let mut raw = tokio::net::TcpStream::connect(address).await.unwrap();
    raw.write_all(
        b"GET http://victim.example/host HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.ends_with("links to evil.example"), "{answer}");
    let forwarded = client
        .get(format!("{base}/host"))
        .header(header::HOST, "victim.example")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.text().await.unwrap(), "links to evil.example");
    for _ in 0..2 {
        let plain = client
            .get(format!("{base}/host"))
            .header(header::HOST, "victim.example")
            .send()
            .await
            .unwrap();
        assert_eq!(plain.text().await.unwrap(), "links to victim.example");
    }
    assert_eq!(calls.count(), 3, "three keys, the last one cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_cookies_pass_through_unless_allowed() {
    let (base, calls, client) = single(layer()).await;
    let whoami = async |cookie: &str| {
        let request = client.get(format!("{base}/whoami"));
        let request = request.header(header::COOKIE, cookie);
        request.send().await.unwrap().text().await.unwrap()
    };
    assert_eq!(whoami("user=alice").await, "account of user=alice");
    assert_eq!(
        whoami("user=bob").await,
        "account of user=bob",
        "not alice's page"
    );
    let anonymous = client.get(format!("{base}/whoami")).send().await.unwrap();
    assert_eq!(anonymous.text().await.unwrap(), "account of nobody");
    assert_eq!(calls.count(), 3);
    // Allowed: the route says its answer does not depend on cookies.
    let (base, calls, client) = single(layer().cache_requests_with_cookies(true)).await;
    for cookie in ["analytics=1", "analytics=2"] {
        let request = client
            .get(format!("{base}/plain"))
            .header(header::COOKIE, cookie);
        assert_eq!(
            request.send().await.unwrap().text().await.unwrap(),
            "call 1"
        );
    }
    assert_eq!(calls.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_the_length_of_the_cached_body() {
    let (base, _calls, client) = single(layer()).await;
    let body = client.get(format!("{base}/plain")).send().await.unwrap();
    assert_eq!(body.text().await.unwrap(), "call 1");
    let head = client.head(format!("{base}/plain")).send().await.unwrap();
    assert_eq!(head.headers()["x-cache"], "HIT");
    assert_eq!(head.headers()[header::CONTENT_LENGTH], "6");
    assert!(head.text().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_no_cache_can_be_ignored() {
    let (base, calls, client) = single(layer().honor_request_no_cache(false)).await;
    for _ in 0..3 {
        let request = client
            .get(format!("{base}/plain"))
            .header(header::CACHE_CONTROL, "no-cache");
        assert_eq!(
            request.send().await.unwrap().text().await.unwrap(),
            "call 1"
        );
    }
    assert_eq!(calls.count(), 1);
}

/// A cache on a hand-moved clock whose responses live 10 s, then stay 10 minutes as fail-safe's
/// fallback, the origin left alone for `throttle` after a failure.
fn fail_safe_cache(
    throttle: Duration,
) -> (
    tierstack::core::clock::ManualClock,
    TieredCache<CachedResponse>,
) {
    let clock = tierstack::core::clock::ManualClock::new();
    let options = tierstack::EntryOptions::default()
        .with_ttl(Duration::from_secs(10))
        .with_fail_safe(tierstack::FailSafe::new(Duration::from_secs(600)).with_throttle(throttle));
    let cache = TieredCache::builder("http")
        .l2(Arc::new(MemoryStore::new()))
        .clock(Arc::new(clock.clone()))
        .default_options(options)
        .build()
        .unwrap();
    (clock, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_safe_stale_copy_stands_in_for_a_failure_not_for_an_answer() {
    let (clock, cache) = fail_safe_cache(Duration::from_secs(1));
    let (base, calls, client) = single(HttpCacheLayer::new(cache)).await;
    let get = async |answer: &str| {
        let request = client
            .get(format!("{base}/flaky"))
            .header("x-answer", answer);
        let response = request.send().await.unwrap();
        let label = response.headers()["x-cache"].to_str().unwrap().to_owned();
        (response.status(), response.text().await.unwrap(), label)
    };
    let answer = |text: &str, label: &str| (StatusCode::OK, text.to_owned(), label.to_owned());
    assert_eq!(get("fresh").await, answer("fresh 1", "MISS"));
    clock.advance(Duration::from_secs(11));
    // The origin fails: the stale copy answers, and says so.
    assert_eq!(get("fail").await, answer("fresh 1", "STALE"));
    assert_eq!(calls.count(), 2, "the handler was asked");
    clock.advance(Duration::from_secs(2));
    // The origin answers, with something that may not be stored: that answer goes out...
    // (the handler's own response, which the cache did not answer: no `x-cache`)...
    let get_cookie = async || {
        let request = client
            .get(format!("{base}/flaky"))
            .header("x-answer", "cookie");
        let response = request.send().await.unwrap();
        let label = response.headers().get("x-cache").cloned();
        (response.status(), label, response.text().await.unwrap())
    };
    let cookie = |text: &str| (StatusCode::OK, None, text.to_owned());
    assert_eq!(get_cookie().await, cookie("cookie 3"));
    // ...and the stale copy does not answer the next request in its place (no throttle
    // window re-armed by a "failure" that was an answer).
    assert_eq!(get_cookie().await, cookie("cookie 4"));
    assert_eq!(calls.count(), 4);
}

/// What a request of `/flaky` got: status, body and `x-cache` label (`-` for none).
async fn flaky(client: &reqwest::Client, base: &str, answer: &str) -> (StatusCode, String, String) {
    let request = client
        .get(format!("{base}/flaky"))
        .header("x-answer", answer);
    let response = request.send().await.unwrap();
    let label = response
        .headers()
        .get("x-cache")
        .map_or("-", |v| v.to_str().unwrap())
        .to_owned();
    (response.status(), response.text().await.unwrap(), label)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_a_stale_copy_says_stale() {
    let (clock, cache) = fail_safe_cache(Duration::from_secs(30));
    let (base, calls, client) = single(HttpCacheLayer::new(cache)).await;
    let stale = (StatusCode::OK, "fresh 1".to_owned(), "STALE".to_owned());
    assert_eq!(flaky(&client, &base, "fresh").await.2, "MISS");
    clock.advance(Duration::from_secs(11));
    // A handler that panics: fail-safe's copy answers, labelled as what it is.
    assert_eq!(flaky(&client, &base, "panic").await, stale);
    // Within the throttle the origin is left alone: the re-armed copy is still stale.
    assert_eq!(flaky(&client, &base, "fresh").await, stale);
    assert_eq!(calls.count(), 2);
    clock.advance(Duration::from_secs(31));
    assert_eq!(
        flaky(&client, &base, "fresh").await,
        (StatusCode::OK, "fresh 3".to_owned(), "MISS".to_owned())
    );
    assert_eq!(flaky(&client, &base, "fresh").await.2, "HIT");
}

/// An answer that may not be stored leaves fail-safe its copy (as an HTTP cache keeps a stored
/// response when a GET's response may not be stored): a later failure gets it, as STALE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_may_not_be_stored_leaves_fail_safe_its_copy() {
    let (clock, cache) = fail_safe_cache(Duration::from_secs(1));
    let (base, calls, client) = single(HttpCacheLayer::new(cache)).await;
    assert_eq!(flaky(&client, &base, "fresh").await.1, "fresh 1");
    clock.advance(Duration::from_secs(11));
    assert_eq!(flaky(&client, &base, "cookie").await.1, "cookie 2");
    assert_eq!(
        flaky(&client, &base, "fail").await,
        (StatusCode::OK, "fresh 1".to_owned(), "STALE".to_owned())
    );
    assert_eq!(calls.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_an_answer_that_may_not_be_stored_run_the_handler_themselves() {
    let (clock, cache) = fail_safe_cache(Duration::from_secs(30));
    let (base, calls, client) = single(HttpCacheLayer::new(cache)).await;
    let get = |answer: &'static str, hold_for: &'static str| {
        let request = client
            .get(format!("{base}/flaky"))
            .header("x-answer", answer)
            .header("x-hold-for", hold_for);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(get("fresh", "1").await, "fresh 1");
    clock.advance(Duration::from_secs(11));
    // Three requests meet while the handler, held until all of them arrived, answers the
    // first with a cookie: none of them gets the stale copy; each gets an answer of its own.
    let answers = futures_util::future::join_all((0..3).map(|_| get("cookie", "4"))).await;
    let mut calls_seen: Vec<&str> = answers.iter().map(String::as_str).collect();
    calls_seen.sort_unstable();
    assert_eq!(calls_seen, ["cookie 2", "cookie 3", "cookie 4"]);
    assert_eq!(calls.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_may_not_be_stored_removes_the_stored_copy() {
    let (base, calls, client) = single(layer()).await;
    let get = async |answer: &str, no_cache: bool| {
        let mut request = client
            .get(format!("{base}/flaky"))
            .header("x-answer", answer);
        if no_cache {
            request = request.header(header::CACHE_CONTROL, "no-cache");
        }
        request.send().await.unwrap().text().await.unwrap()
    };
    assert_eq!(get("fresh", false).await, "fresh 1");
    assert_eq!(get("fresh", false).await, "fresh 1", "stored");
    assert_eq!(get("cookie", true).await, "cookie 2");
    assert_eq!(get("fresh", false).await, "fresh 3", "the old copy went");
    assert_eq!(calls.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_invalidated_alone_and_with_every_query() {
    let layer = layer();
    let (base, calls, client) = single(layer.clone()).await;
    let get = async |path: &str| {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        response.text().await.unwrap()
    };
    assert_eq!(get("/products/7").await, "product 7 call 1");
    assert_eq!(get("/products/7?color=red").await, "product 7 call 2");
    assert_eq!(get("/products/70").await, "product 70 call 3");
    // A prefix delete counts as a change of every key whose L2 write is still on its way (it
    // cannot tell which it would remove): that fill would be dropped, and the handler asked
    // again. Here the writes land first.
    layer.cache().wait_for_background_fills().await;
    assert_eq!(layer.invalidate_path("/products/7").await.unwrap(), 2);
    assert_eq!(get("/products/7").await, "product 7 call 4");
    assert_eq!(get("/products/7?color=red").await, "product 7 call 5");
    assert_eq!(
        get("/products/70").await,
        "product 70 call 3",
        "another path"
    );
    assert_eq!(calls.count(), 5);
}
