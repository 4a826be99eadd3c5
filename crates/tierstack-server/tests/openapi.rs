//! `/openapi.json` names the routes that exist, and every route that exists is in it.
#![allow(clippy::unwrap_used)]

mod common;

use common::{ADMIN_KEY, Client, SHOP_KEY, config, memory, start};
use reqwest::{Method, StatusCode};
use tierstack_server::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers_and_unknown_ones_do_not() {
    let server = start(config(Limits::default()), memory().await).await;
    let anonymous = Client::new(&server.base, None);
    let document = anonymous.json(Method::GET, "/openapi.json").await;
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, methods) in paths {
        for (method, operation) in methods.as_object().unwrap() {
            operations += 1;
            let admin = operation["x-admin"].as_bool().unwrap_or(false);
            let client = Client::new(&server.base, Some(if admin { ADMIN_KEY } else { SHOP_KEY }));
            let concrete = path
                .replace("{key}", "k")
                .replace("{tenant}", "shop")
                .replace("{id}", "0123abcd");
            let concrete = if concrete == "/v1/cache" {
                "/v1/cache?prefix=p".to_owned()
            } else {
                concrete
            };
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut request = client.request(method.clone(), &concrete);
            if concrete.starts_with("/v1/bulk/") {
                request = request.json(&serde_json::json!({"keys": ["k"], "entries": []}));
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            // The router's own 404 and 405 have no body: a route's own errors are JSON.
            let routed = !matches!(
                status,
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
            ) || body.contains("\"code\"");
            assert!(routed, "{method} {path}: {status} {body:?}");
        }
    }
    assert_eq!(operations, 18, "the document's operations");
    // Routes that do not exist get the router's empty 404 or 405.
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    for (method, path) in [
        (Method::GET, "/v2/cache/k"),
        (Method::PATCH, "/v1/cache/k"),
        (Method::GET, "/v1/bulk/get"),
    ] {
        let response = shop.request(method.clone(), path).send().await.unwrap();
        assert!(
            matches!(
                response.status(),
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
            ),
            "{method} {path}"
        );
        let documented = paths
            .get(path)
            .and_then(|methods| methods.get(method.as_str().to_lowercase()))
            .is_some();
        assert!(!documented, "{method} {path}");
    }
}
