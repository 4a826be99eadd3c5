//! The backend chosen by environment gives a cache what it needs: for Redis, its store and the
//! backplane paired with it, so that every instance's L1 stays fresh.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tierstack::{StoreConfig, TieredCache};

use tierstack_test_support::redis::redis_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_by_environment_comes_with_its_backplane() {
    let prefix = format!("backend-env-{}:", std::process::id());
    let vars = [
        ("CACHE_BACKEND", "redis".to_owned()),
        ("REDIS_URL", redis_url()),
        ("REDIS_KEY_PREFIX", prefix),
    ];
    let var = |name: &str| {
        vars.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
    };
    let config = StoreConfig::from_vars(var).unwrap();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let backend = config.connect().await.unwrap();
        let backplane = backend.backplane.clone().expect("Redis has a backplane");
        assert!(backplane.publishes_store_writes(), "paired with its store");
        let cache: TieredCache<String> =
            backend.apply(TieredCache::builder("env")).build().unwrap();
        instances.push(cache);
    }
    instances[0].set("k", "v1".into()).await.unwrap();
    assert_eq!(instances[1].get("k").await.unwrap(), Some("v1".into()));
    instances[0].set("k", "v2".into()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while instances[1].get("k").await.unwrap() != Some("v2".into()) {
        assert!(tokio::time::Instant::now() < deadline, "never invalidated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A server that wants a password, configured by its parts as the services tierstack replaces
/// configure it (`REDIS_HOST`, `REDIS_PORT`, `REDIS_DB`, `REDIS_PASSWORD`): the password is
/// sent (a password that contains URL syntax needs no escaping), and a wrong one is an
/// authentication error that does not show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_by_host_and_password_reaches_a_server_that_wants_one() {
    use tierstack::CacheError;
    use tierstack_test_support::Launch;
    use tierstack_test_support::redis::RedisServer;
    let password = "p@ss:w/rd#1";
    let server = RedisServer::start(&Launch::for_tests(), &["--requirepass", password]).unwrap();
    let port = server.port().to_string();
    let connect = async |password: &str| {
        let vars = [
            ("CACHE_BACKEND", "redis"),
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PORT", port.as_str()),
            ("REDIS_DB", "3"),
            ("REDIS_PASSWORD", password),
        ];
        let var = |name: &str| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        };
        StoreConfig::from_vars(var).unwrap().connect().await
    };
    let backend = connect(password).await.unwrap();
    let cache: TieredCache<String> = backend.apply(TieredCache::builder("env")).build().unwrap();
    cache.set("k", "v".into()).await.unwrap();
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
    assert_eq!(
        server
            .cli(&[
                "-a",
                password,
                "--no-auth-warning",
                "-n",
                "3",
                "exists",
                "env:k"
            ])
            .trim(),
        "1",
        "written to database 3"
    );
    let wrong = connect("not-it").await.unwrap_err();
    assert!(
        matches!(wrong, CacheError::Authentication { .. }),
        "{wrong:?}"
    );
    assert!(
        !format!("{wrong} {wrong:?}").contains("not-it"),
        "{wrong:?}"
    );
}

#[tokio::test]
async fn memory_by_environment_has_no_backplane() {
    let config =
        StoreConfig::from_vars(|name| (name == "CACHE_BACKEND").then(|| "memory".to_owned()))
            .unwrap();
    let backend = config.connect().await.unwrap();
    assert!(backend.backplane.is_none());
    let cache: TieredCache<String> = backend.apply(TieredCache::builder("env")).build().unwrap();
    cache.set("k", "v".into()).await.unwrap();
    assert_eq!(cache.get("k").await.unwrap(), Some("v".into()));
}
