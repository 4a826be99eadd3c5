//! The API over real HTTP against the server on a loopback socket: every route's success and
//! failure paths, keys and tenants, limits.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{ADMIN_KEY, BLOG_KEY, Client, SHOP_KEY, config, encode, memory, start};
use reqwest::{Method, StatusCode};
use tierstack_server::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_is_written_read_checked_touched_and_deleted() {
    let server = start(config(Limits::default()), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    let put = shop
        .request(Method::PUT, "/v1/cache/greeting?ttl=60")
        .body(vec![0u8, 159, 146, 150, 255])
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let got = shop
        .request(Method::GET, "/v1/cache/greeting")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    let ttl: u64 = got.headers()["x-ttl-ms"].to_str().unwrap().parse().unwrap();
    assert!(ttl > 55_000 && ttl <= 60_000, "{ttl}");
    assert_eq!(
        got.bytes().await.unwrap().as_ref(),
        [0u8, 159, 146, 150, 255],
        "bytes as sent"
    );
    // The header sets the TTL when the query does not.
    let put = shop
        .request(Method::PUT, "/v1/cache/short")
        .header("x-ttl", "5")
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let got = shop
        .request(Method::GET, "/v1/cache/short")
        .send()
        .await
        .unwrap();
    let ttl: u64 = got.headers()["x-ttl-ms"].to_str().unwrap().parse().unwrap();
    assert!(ttl <= 5_000, "{ttl}");
    for (method, path, status) in [
        (Method::GET, "/v1/cache/greeting/exists", StatusCode::OK),
        (Method::HEAD, "/v1/cache/greeting/exists", StatusCode::OK),
        (
            Method::GET,
            "/v1/cache/nothing/exists",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::HEAD,
            "/v1/cache/nothing/exists",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v1/cache/short/touch?ttl=600",
            StatusCode::NO_CONTENT,
        ),
        (
            Method::POST,
            "/v1/cache/nothing/touch?ttl=600",
            StatusCode::NOT_FOUND,
        ),
        (Method::DELETE, "/v1/cache/greeting", StatusCode::NO_CONTENT),
        (Method::DELETE, "/v1/cache/greeting", StatusCode::NOT_FOUND),
        (Method::GET, "/v1/cache/greeting", StatusCode::NOT_FOUND),
    ] {
        let response = shop.request(method.clone(), path).send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
    }
    let got = shop
        .request(Method::GET, "/v1/cache/short")
        .send()
        .await
        .unwrap();
    let ttl: u64 = got.headers()["x-ttl-ms"].to_str().unwrap().parse().unwrap();
    assert!(ttl > 500_000, "touched: {ttl}");
    let missing = shop
        .request(Method::GET, "/v1/cache/greeting")
        .send()
        .await
        .unwrap();
    assert_eq!(Client::code(missing).await, "not_found");
    // Health needs no key.
    let anonymous = Client::new(&server.base, None);
    for path in ["/healthz", "/readyz"] {
        let response = anonymous.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_key_are_refused() {
    let server = start(config(Limits::default()), memory().await).await;
    let cases = [
        (
            None,
            "/v1/cache/k",
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Some("wrong"),
            "/v1/cache/k",
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Some(ADMIN_KEY),
            "/v1/cache/k",
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            Some(SHOP_KEY),
            "/v1/admin/tenants/shop/usage",
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            None,
            "/v1/admin/tenants/shop/usage",
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
    ];
    for (key, path, status, code) in cases {
        let client = Client::new(&server.base, key);
        let response = client.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), status, "{key:?} {path}");
        assert_eq!(Client::code(response).await, code, "{key:?} {path}");
    }
    let raw = reqwest::Client::new()
        .get(format!("{}/v1/cache/k", server.base))
        .header("authorization", format!("Basic {SHOP_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::UNAUTHORIZED, "only Bearer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_created_by_the_admin_work_until_revoked() {
    let server = start(config(Limits::default()), memory().await).await;
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let created = admin
        .request(Method::POST, "/v1/admin/tenants/shop/keys")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: serde_json::Value = created.json().await.unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    );
    let new = Client::new(&server.base, Some(&key));
    assert_eq!(
        new.put("k", "from the new key").await,
        StatusCode::NO_CONTENT
    );
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(shop.get("k").await.1, "from the new key", "the same tenant");
    let revoked = admin
        .request(Method::DELETE, &format!("/v1/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_eq!(new.get("k").await.0, StatusCode::UNAUTHORIZED);
    let again = admin
        .request(Method::DELETE, &format!("/v1/admin/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let bad_tenant = admin
        .request(Method::POST, "/v1/admin/tenants/Not%20Valid/keys")
        .send()
        .await
        .unwrap();
    assert_eq!(Client::code(bad_tenant).await, "invalid_tenant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_entries_however_keys_are_crafted() {
    let server = start(config(Limits::default()), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    let blog = Client::new(&server.base, Some(BLOG_KEY));
    let crafted = [
        "k",
        "../blog/k",
        "blog:k",
        ":k",
        "%3Ak",
        "k%",
        "shop/../blog/k",
        "blog%3Ak",
        "\u{0}k",
        "ключ",
        "k\u{202e}",
        "shop:blog:k",
    ];
    for key in crafted {
        assert_eq!(
            shop.put(key, &format!("shop {key}")).await,
            StatusCode::NO_CONTENT,
            "{key:?}"
        );
        assert_eq!(
            blog.put(key, &format!("blog {key}")).await,
            StatusCode::NO_CONTENT,
            "{key:?}"
        );
    }
    for key in crafted {
        assert_eq!(shop.get(key).await.1, format!("shop {key}"), "{key:?}");
        assert_eq!(blog.get(key).await.1, format!("blog {key}"), "{key:?}");
    }
    // A prefix delete stays in the tenant.
    let deleted = shop
        .request(Method::DELETE, &format!("/v1/cache?prefix={}", encode("b")))
        .send()
        .await
        .unwrap();
    let deleted: serde_json::Value = deleted.json().await.unwrap();
    assert_eq!(deleted["deleted"], 2, "shop's blog:k and blog%3Ak");
    assert_eq!(blog.get("blog%3Ak").await.0, StatusCode::OK);
    assert_eq!(shop.get("blog%3Ak").await.0, StatusCode::NOT_FOUND);
    // The admin flushes one tenant.
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let flushed = admin
        .request(Method::DELETE, "/v1/admin/tenants/shop/cache")
        .send()
        .await
        .unwrap();
    assert_eq!(flushed.status(), StatusCode::OK);
    for key in crafted {
        assert_eq!(shop.get(key).await.0, StatusCode::NOT_FOUND, "{key:?}");
        assert_eq!(blog.get(key).await.1, format!("blog {key}"), "{key:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_reads_and_writes() {
    let server = start(
        config(Limits {
            max_bulk: 3,
            ..Limits::default()
        }),
        memory().await,
    )
    .await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    let set = serde_json::json!({"entries": [
        {"key": "a", "value": "AAE=", "ttl": 60},
        {"key": "b", "value": "aGVsbG8="},
    ]});
    let written = shop
        .request(Method::POST, "/v1/bulk/set")
        .json(&set)
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), StatusCode::NO_CONTENT);
    let read = shop
        .request(Method::POST, "/v1/bulk/get")
        .json(&serde_json::json!({"keys": ["b", "missing", "a"]}))
        .send()
        .await
        .unwrap();
    let read: serde_json::Value = read.json().await.unwrap();
    assert_eq!(
        read,
        serde_json::json!({"values": [
            {"key": "b", "value": "aGVsbG8="},
            {"key": "missing", "value": null},
            {"key": "a", "value": "AAE="},
        ]})
    );
    assert_eq!(shop.get("b").await.1, "hello");
    let refused = [
        (
            serde_json::json!({"keys": ["a", "b", "c", "d"]}),
            "/v1/bulk/get",
            "bulk_too_large",
        ),
        (
            serde_json::json!({"keys": []}),
            "/v1/bulk/get",
            "invalid_bulk",
        ),
        (
            serde_json::json!({"nokeys": 1}),
            "/v1/bulk/get",
            "invalid_bulk",
        ),
        (
            serde_json::json!({"entries": [{"key": "x", "value": "not base64!"}]}),
            "/v1/bulk/set",
            "invalid_bulk",
        ),
        (
            serde_json::json!({"entries": [{"key": "x", "value": "AA==", "ttl": 0}]}),
            "/v1/bulk/set",
            "invalid_ttl",
        ),
        (
            serde_json::json!({"entries": [{"key": "x", "value": "AA==", "ttl": 5, "ttl_ms": 5000}]}),
            "/v1/bulk/set",
            "invalid_ttl",
        ),
    ];
    for (body, path, code) in refused {
        let response = shop
            .request(Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(Client::code(response).await, code, "{body}");
    }
    assert_eq!(
        shop.get("x").await.0,
        StatusCode::NOT_FOUND,
        "nothing of a refused batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error() {
    let limits = Limits {
        max_value_bytes: 1_000,
        max_key_bytes: 10,
        ..Limits::default()
    };
    let server = start(config(limits), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(shop.put("k", "kept").await, StatusCode::NO_CONTENT);
    let cases = [
        (
            "/v1/cache/k?ttl=0",
            "v".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
        ),
        (
            "/v1/cache/k?ttl=soon",
            "v".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
        ),
        (
            "/v1/cache/k?ttl=99999999999",
            "v".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
        ),
        (
            "/v1/cache/k?color=red",
            "v".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "/v1/cache/%FF",
            "v".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "/v1/cache/elevenbytes",
            "v".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
        (
            "/v1/cache/k",
            "v".repeat(1_001),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "/v1/cache/k?ttl=5&ttl_ms=5000",
            "v".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_ttl",
        ),
    ];
    for (path, body, status, code) in cases {
        let response = shop
            .request(Method::PUT, path)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(Client::code(response).await, code, "{path}");
    }
    assert_eq!(
        shop.get("k").await,
        (StatusCode::OK, "kept".to_owned()),
        "no refused write touched the value"
    );
    assert_eq!(
        shop.put("k", &"v".repeat(1_000)).await,
        StatusCode::NO_CONTENT,
        "at the limit"
    );
}

/// Two TTLs at once, and preconditions the server cannot honour: refused, not guessed at or
/// ignored, on every route that writes or deletes; the value stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconditions_and_two_ttls_are_refused() {
    let server = start(config(Limits::default()), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(shop.put("k", "kept").await, StatusCode::NO_CONTENT);
    let refused = [
        ("x-ttl", "5", "/v1/cache/k?ttl=5", "invalid_ttl"),
        (
            "if-match",
            "\"abc\"",
            "/v1/cache/k",
            "unsupported_precondition",
        ),
        (
            "if-none-match",
            "\"abc\"",
            "/v1/cache/k",
            "unsupported_precondition",
        ),
    ];
    for (name, value, path, code) in refused {
        let response = shop
            .request(Method::PUT, path)
            .header(name, value)
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(Client::code(response).await, code, "{name}");
    }
    // The same on every route that writes or deletes, and a header given twice.
    let guarded = [
        (Method::DELETE, "/v1/cache/k", ""),
        (Method::POST, "/v1/cache/k/touch?ttl=5", ""),
        (Method::DELETE, "/v1/cache?prefix=k", ""),
        (
            Method::POST,
            "/v1/cache/k/cas",
            r#"{"current": "a2VwdA==", "new": "eA=="}"#,
        ),
        (
            Method::POST,
            "/v1/bulk/set",
            r#"{"entries": [{"key": "k", "value": "eA=="}]}"#,
        ),
    ];
    for (method, path, body) in guarded {
        for (name, value) in [
            ("if-match", "*"),
            ("if-unmodified-since", "Sat, 05 Dec 2026 00:00:00 GMT"),
        ] {
            let response = shop
                .request(method.clone(), path)
                .header(name, value)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "{method} {path} {name}"
            );
            assert_eq!(
                Client::code(response).await,
                "unsupported_precondition",
                "{path}"
            );
        }
    }
    let twice = [
        ("x-ttl", "5", "x-ttl", "6", "invalid_ttl"),
        (
            "if-none-match",
            "*",
            "if-none-match",
            "\"e\"",
            "unsupported_precondition",
        ),
    ];
    for (first, first_value, second, second_value, code) in twice {
        let response = shop
            .request(Method::PUT, "/v1/cache/k")
            .header(first, first_value)
            .header(second, second_value)
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{first} twice");
        assert_eq!(Client::code(response).await, code, "{first} twice");
    }
    assert_eq!(shop.get("k").await, (StatusCode::OK, "kept".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_is_told_when_to_retry_and_recovers() {
    let limits = Limits {
        rate_limit: 5,
        rate_window_secs: 1,
        ..Limits::default()
    };
    let server = start(config(limits), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    for _ in 0..5 {
        assert_eq!(shop.get("k").await.0, StatusCode::NOT_FOUND);
    }
    let limited = shop
        .request(Method::GET, "/v1/cache/k")
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1).contains(&retry), "{retry}");
    assert_eq!(Client::code(limited).await, "rate_limited");
    let blog = Client::new(&server.base, Some(BLOG_KEY));
    assert_eq!(
        blog.get("k").await.0,
        StatusCode::NOT_FOUND,
        "another tenant's rate"
    );
    // Two windows later, nothing counts.
    tokio::time::sleep(Duration::from_millis(2_100)).await; // real time: the rate window
    assert_eq!(shop.get("k").await.0, StatusCode::NOT_FOUND);
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let usage = admin
        .json(Method::GET, "/v1/admin/tenants/shop/usage")
        .await;
    assert_eq!(usage["reads"], 6);
    assert_eq!(usage["rate_limited"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_reads_an_entrys_metadata_without_its_value() {
    let server = start(config(Limits::default()), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(shop.put("k", "secret value").await, StatusCode::NO_CONTENT);
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let meta = admin
        .request(Method::GET, "/v1/admin/tenants/shop/entries/k")
        .send()
        .await
        .unwrap();
    let text = meta.text().await.unwrap();
    assert!(!text.contains("secret value"), "{text}");
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(meta["size"], 12);
    assert_eq!(
        meta["tier"], "l2",
        "the in-process store, with no L1 in front"
    );
    assert!(meta["ttl_ms"].as_u64().unwrap() > 3_500_000);
    let missing = admin
        .request(Method::GET, "/v1/admin/tenants/blog/entries/k")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_is_refused_without_reading_it_all() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = Limits {
        max_value_bytes: 1_000,
        ..Limits::default()
    };
    let server = start(config(limits), memory().await).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    // No Content-Length: chunks of 600 bytes, the second one over the limit.
    let head = format!(
        "PUT /v1/cache/k HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {SHOP_KEY}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("258\r\n{}\r\n", "v".repeat(600));
    for _ in 0..2 {
        stream.write_all(chunk.as_bytes()).await.unwrap();
    }
    // The answer comes without the rest of the body (which never comes).
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered before the body ended")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(
        shop.get("k").await.0,
        StatusCode::NOT_FOUND,
        "nothing stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_quota_gets_507_until_it_frees_room() {
    let limits = Limits {
        max_entries: 3,
        max_bytes: 40,
        ..Limits::default()
    };
    let server = start(config(limits), memory().await).await;
    let (shop, blog) = (
        Client::new(&server.base, Some(SHOP_KEY)),
        Client::new(&server.base, Some(BLOG_KEY)),
    );
    // Each entry counts its key and its value: "a" + 9 bytes = 10.
    for key in ["a", "b", "c"] {
        assert_eq!(shop.put(key, "123456789").await, StatusCode::NO_CONTENT);
    }
    let over = shop
        .request(Method::PUT, "/v1/cache/d")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(Client::code(over).await, "quota_exceeded");
    assert_eq!(
        shop.get("d").await.0,
        StatusCode::NOT_FOUND,
        "nothing written"
    );
    // Replacing an entry counts its change in size: within the bytes, then past them.
    assert_eq!(shop.put("a", "1").await, StatusCode::NO_CONTENT);
    assert_eq!(
        shop.put("b", &"x".repeat(30)).await,
        StatusCode::INSUFFICIENT_STORAGE
    );
    assert_eq!(blog.put("d", "other tenant").await, StatusCode::NO_CONTENT);
    // A bulk write that would pass the quota is refused whole.
    let bulk = serde_json::json!({"entries": [{"key": "e", "value": "eA=="}]});
    let refused = shop
        .request(Method::POST, "/v1/bulk/set")
        .json(&bulk)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::INSUFFICIENT_STORAGE);
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let usage = admin
        .json(Method::GET, "/v1/admin/tenants/shop/usage")
        .await;
    assert_eq!(
        usage["quota"],
        serde_json::json!({"entries": 3, "bytes": 22, "max_entries": 3, "max_bytes": 40})
    );
    // A delete, a prefix delete and a flush give room back.
    assert_eq!(
        shop.request(Method::DELETE, "/v1/cache/c")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(shop.put("d", "x").await, StatusCode::NO_CONTENT);
    let deleted = shop
        .request(Method::DELETE, "/v1/cache?prefix=b")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    assert_eq!(
        bulk_set_status(&shop, &bulk).await,
        StatusCode::NO_CONTENT,
        "room freed by the prefix delete"
    );
    let flushed = admin
        .request(Method::DELETE, "/v1/admin/tenants/shop/cache")
        .send()
        .await
        .unwrap();
    assert_eq!(flushed.status(), StatusCode::OK);
    let usage = admin
        .json(Method::GET, "/v1/admin/tenants/shop/usage")
        .await;
    assert_eq!(usage["quota"]["entries"], 0);
    assert_eq!(usage["quota"]["bytes"], 0);
}

async fn bulk_set_status(client: &Client, bulk: &serde_json::Value) -> StatusCode {
    let response = client
        .request(Method::POST, "/v1/bulk/set")
        .json(bulk)
        .send()
        .await
        .unwrap();
    response.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_create_once_and_swap_only_what_was_read() {
    let server = start(config(Limits::default()), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    let create = async |value: &str| {
        let response = shop
            .request(Method::PUT, "/v1/cache/k?ttl_ms=60000")
            .header("if-none-match", "*")
            .body(value.to_owned())
            .send()
            .await
            .unwrap();
        response.status()
    };
    assert_eq!(create("first").await, StatusCode::NO_CONTENT);
    assert_eq!(create("second").await, StatusCode::PRECONDITION_FAILED);
    assert_eq!(shop.get("k").await.1, "first");
    let cas = async |current: &str, new: Option<&str>| {
        let b64 = |text: &str| base64_of(text.as_bytes());
        let body = serde_json::json!({
            "current": b64(current),
            "new": new.map(b64),
            "ttl_ms": 1500,
        });
        let response = shop
            .request(Method::POST, "/v1/cache/k/cas")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        if status != StatusCode::NO_CONTENT {
            assert_eq!(Client::code(response).await, "precondition_failed");
        }
        status
    };
    assert_eq!(
        cas("other", Some("x")).await,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(cas("first", Some("swapped")).await, StatusCode::NO_CONTENT);
    let swapped = shop
        .request(Method::GET, "/v1/cache/k")
        .send()
        .await
        .unwrap();
    let ttl: u64 = swapped.headers()["x-ttl-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        ttl <= 1500 && ttl > 1000,
        "the swap's own TTL in milliseconds: {ttl}"
    );
    assert_eq!(swapped.text().await.unwrap(), "swapped");
    assert_eq!(cas("swapped", None).await, StatusCode::NO_CONTENT);
    assert_eq!(shop.get("k").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        cas("swapped", Some("back")).await,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        create("again").await,
        StatusCode::NO_CONTENT,
        "the key is free again"
    );
    let bad = shop
        .request(Method::POST, "/v1/cache/k/cas")
        .json(&serde_json::json!({"current": "not base64!", "new": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(Client::code(bad).await, "invalid_body");
    let zero = shop
        .request(Method::PUT, "/v1/cache/k?ttl_ms=0")
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(Client::code(zero).await, "invalid_ttl");
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A write that does not land (a condition that does not hold) cannot shrink what the quota
/// counts for the value that stays: a tenant cannot hide a large value behind a failed small one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_conditional_write_leaves_the_stored_value_counted() {
    let limits = Limits {
        max_bytes: 40,
        ..Limits::default()
    };
    let server = start(config(limits), memory().await).await;
    let shop = Client::new(&server.base, Some(SHOP_KEY));
    assert_eq!(shop.put("a", &"x".repeat(30)).await, StatusCode::NO_CONTENT);
    let sneaky = shop
        .request(Method::PUT, "/v1/cache/a?ttl_ms=1")
        .header("if-none-match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(sneaky.status(), StatusCode::PRECONDITION_FAILED);
    let cas = shop
        .request(Method::POST, "/v1/cache/a/cas")
        .json(&serde_json::json!({"current": "d3Jvbmc=", "new": "", "ttl_ms": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(cas.status(), StatusCode::PRECONDITION_FAILED);
    tokio::time::sleep(Duration::from_millis(20)).await; // real time: past the 1 ms asked
    let admin = Client::new(&server.base, Some(ADMIN_KEY));
    let usage = admin
        .json(Method::GET, "/v1/admin/tenants/shop/usage")
        .await;
    assert_eq!(usage["quota"]["bytes"], 31, "{usage}");
    assert_eq!(
        shop.put("b", &"y".repeat(10)).await,
        StatusCode::INSUFFICIENT_STORAGE
    );
    // A smaller value that lands is counted as it is.
    assert_eq!(shop.put("a", "small").await, StatusCode::NO_CONTENT);
    let usage = admin
        .json(Method::GET, "/v1/admin/tenants/shop/usage")
        .await;
    assert_eq!(usage["quota"]["bytes"], 6, "{usage}");
}
