//! `/metrics` in the Prometheus text format, to the admin credential only: the server's
//! request counts and the cache's own metrics.
#![allow(clippy::unwrap_used)]

mod common;

use common::{ADMIN_KEY, Client, SHOP_KEY, config, memory, start_with};
use reqwest::{Method, StatusCode};
use tierstack_server::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_cache_reads() {
    // The process's recorder: only this test (its own binary) installs one.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let server = start_with(
        config(Limits::default()),
        memory().await,
        |server| async move { server.with_metrics(handle) },
    )
    .await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(shop.put("k", "v").await, StatusCode::NO_CONTENT);
    assert_eq!(shop.get("k").await.0, StatusCode::OK);
    assert_eq!(shop.get("missing").await.0, StatusCode::NOT_FOUND);
    let refused = shop.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let anonymous = Client::new(&server.base, None);
    let refused = anonymous
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let text = admin
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        r#"tierstack_server_requests_total{route="/v1/cache/{key}",status="2xx"} 2"#,
        r#"tierstack_server_requests_total{route="/v1/cache/{key}",status="4xx"} 1"#,
        r#"tierstack_server_requests_total{route="/metrics",status="4xx"} 2"#,
        "tierstack_server_request_seconds",
        r#"tierstack_hits_total{cache="tierstack-server",tier="l2"} 1"#,
    ] {
        assert!(text.contains(expected), "{expected} not in:\n{text}");
    }
    assert!(!text.contains(SHOP_KEY) && !text.contains(ADMIN_KEY));
}
