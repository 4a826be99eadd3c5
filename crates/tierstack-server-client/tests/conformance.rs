//! `ServerStore` passes the core `Store` conformance suite against a real `tierstack-server` on
//! a loopback socket (the embedded backend), and a `TieredCache` works with it as its L2.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tierstack_core::testkit::conformance::{Harness, TimeControl};
use tierstack_core::{CacheError, KeyProblem, Store};
use tierstack_server::{KeyHash, Limits, Server, ServerConfig, TenantName};
use tierstack_server_client::ServerStore;

const API_KEY: &str = "client-test-key-0123456789";

/// A server on a free loopback port, serving for as long as the test's runtime runs; its
/// base URL.
async fn server(limits: Limits) -> String {
    let mut config = ServerConfig::default();
    config
        .keys
        .insert(KeyHash::of(API_KEY), TenantName::new("app").unwrap());
    config.default_limits = limits;
    let backend = tierstack::StoreConfig::Memory {
        max_bytes: 64 << 20,
    }
    .connect()
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = Server::new(config, backend).unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));
    base
}

async fn harness() -> Harness {
    let base = server(Limits::default()).await;
    let store = ServerStore::new(&base, API_KEY).unwrap();
    Harness::new(Arc::new(store), TimeControl::Real)
}

tierstack_core::store_conformance_tests!(harness);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiered_cache_keeps_an_l1_in_front_of_the_server() {
    let base = server(Limits::default()).await;
    let store = Arc::new(ServerStore::new(&base, API_KEY).unwrap());
    let cache = tierstack::TieredCache::<String>::builder("profiles")
        .l2(store.clone())
        .build()
        .unwrap();
    let other = tierstack::TieredCache::<String>::builder("profiles")
        .l2(store)
        .without_l1()
        .build()
        .unwrap();
    cache.set("user:7", "ada".into()).await.unwrap();
    assert_eq!(other.get("user:7").await.unwrap().as_deref(), Some("ada"));
    let loaded = other
        .get_or_load("user:8", || async {
            Ok::<_, std::io::Error>("grace".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(loaded, "grace");
    assert_eq!(cache.get("user:8").await.unwrap().as_deref(), Some("grace"));
    assert!(other.delete("user:7").await.unwrap());
    assert_eq!(other.get("user:7").await.unwrap(), None);
    assert!(
        cache
            .set_if_absent("user:9", "new".into(), &cache.default_options())
            .await
            .unwrap()
    );
    assert!(
        !other
            .set_if_absent("user:9", "again".into(), &other.default_options())
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_refusals_are_errors_never_misses() {
    let base = server(Limits {
        max_value_bytes: 10,
        ..Limits::default()
    })
    .await;
    let store = ServerStore::new(&base, API_KEY).unwrap();
    let large = store
        .set(
            "k",
            bytes::Bytes::from(vec![0; 11]),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(
            &large,
            Err(CacheError::Backend {
                transient: false,
                ..
            })
        ),
        "{large:?}"
    );
    let wrong_key = ServerStore::new(&base, "not-a-key").unwrap();
    let refused = wrong_key.get("k").await;
    assert!(
        matches!(&refused, Err(CacheError::Authentication { .. })),
        "{refused:?}"
    );
    let debug = format!("{wrong_key:?} {refused:?}");
    assert!(!debug.contains("not-a-key"), "{debug}");
    let nobody = ServerStore::new("http://127.0.0.1:9", API_KEY).unwrap();
    assert!(matches!(
        nobody.get("k").await,
        Err(CacheError::Connection { .. })
    ));
    let dot_segment = |result: &tierstack_core::Result<_>| {
        matches!(
            result,
            Err(CacheError::InvalidKey {
                reason: KeyProblem::DotSegment
            })
        )
    };
    let write = |key| tierstack_core::store::StoreWrite {
        key,
        value: bytes::Bytes::from_static(b"v"),
        ttl: Duration::from_secs(60),
    };
    for dots in [".", ".."] {
        assert!(dot_segment(&store.get(dots).await.map(drop)));
        assert!(dot_segment(&store.get_many(&["ok", dots]).await.map(drop)));
        assert!(dot_segment(&store.set_many(&[write(dots)]).await));
    }
    // A refused key in a later request of a bulk write writes nothing before it.
    let chunked = ServerStore::new(&base, API_KEY).unwrap().max_bulk(1);
    assert!(dot_segment(
        &chunked.set_many(&[write("first"), write("..")]).await
    ));
    assert_eq!(chunked.get("first").await.unwrap(), None);
    // Dots within a key travel in a URL path as they are.
    let dots = write("...");
    store.set(dots.key, dots.value, dots.ttl).await.unwrap();
    assert_eq!(store.get("...").await.unwrap().as_deref(), Some(&b"v"[..]));
    for base in ["http://user:secret@127.0.0.1:1", "https://x", "http://"] {
        let refused = ServerStore::new(base, API_KEY).err().unwrap();
        assert!(!refused.to_string().contains("secret"), "{refused}");
    }
    let refused = ServerStore::new(&base, "key\r\nx-injected: 1")
        .err()
        .unwrap();
    assert!(
        matches!(refused, CacheError::Configuration(_)),
        "{refused:?}"
    );
}

/// An answer larger than the client's `max_value_len` is an error, read no further than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_over_the_clients_value_limit_are_errors() {
    let base = server(Limits::default()).await;
    let store = ServerStore::new(&base, API_KEY).unwrap();
    let value = bytes::Bytes::from(vec![7; 4_000]);
    store
        .set("big", value.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    store
        .set(
            "small",
            bytes::Bytes::from_static(b"ok"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let strict = ServerStore::new(&base, API_KEY)
        .unwrap()
        .max_value_len(1_000);
    let refused = strict.get("big").await;
    assert!(
        matches!(
            &refused,
            Err(CacheError::Backend {
                transient: false,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(
        strict.get("small").await.unwrap().as_deref(),
        Some(&b"ok"[..])
    );
    assert!(strict.get_many(&["small", "big"]).await.is_err());
    assert_eq!(store.get("big").await.unwrap(), Some(value));
}
