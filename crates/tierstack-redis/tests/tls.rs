//! `rediss://` against a real TLS-only redis-server, with a private CA generated for the test.
#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tierstack::TieredCache;
use tierstack_core::{CacheError, Store};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};
use tierstack_test_support::Launch;
use tierstack_test_support::redis::RedisServer;

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): apt-get install openssl"));
    assert!(status.success(), "openssl {args:?} failed");
}

/// A private CA and a server certificate for 127.0.0.1, in a folder of their own.
fn certificates() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tierstack-tls-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=tierstack test CA",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    dir
}

/// A TLS-only redis-server with a certificate of the test's private CA.
struct TlsRedis {
    server: RedisServer,
    dir: PathBuf,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = certificates();
        let server = RedisServer::start_tls(&Launch::for_tests(), &dir)
            .unwrap_or_else(|error| panic!("{error}"));
        Self { server, dir }
    }

    fn port(&self) -> u16 {
        self.server.port()
    }

    fn ca(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.crt")).unwrap()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.server.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_works_over_tls_with_a_private_ca() {
    let server = TlsRedis::start();
    let config = RedisConfig::from_url(&format!("rediss://127.0.0.1:{}/", server.port()))
        .unwrap()
        .tls_root_certificate(&server.ca());
    assert!(format!("{config:?}").contains("tls: true"));
    let store = Arc::new(RedisStore::connect(&config).await.unwrap());
    store
        .set("k", "over tls".into(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        store.get("k").await.unwrap().as_deref(),
        Some(&b"over tls"[..])
    );

    let build = async || {
        TieredCache::<String>::builder("tls")
            .l2(Arc::new(RedisStore::connect(&config).await.unwrap()))
            .backplane(Arc::new(RedisBackplane::connect(&config).await.unwrap()))
            .build()
            .unwrap()
    };
    let (a, b) = (build().await, build().await);
    a.set("x", "1".into()).await.unwrap();
    assert_eq!(b.get("x").await.unwrap(), Some("1".into()));
    a.set("x", "2".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get("x").await.unwrap().as_deref() != Some("2") {
        assert!(
            Instant::now() < deadline,
            "the invalidation did not arrive over TLS"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // poll loop
    }
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_connection_error() {
    let server = TlsRedis::start();
    // The built-in web PKI roots do not include the test's private CA.
    let config = RedisConfig::from_url(&format!("rediss://127.0.0.1:{}/", server.port()))
        .unwrap()
        .connect_timeout(Duration::from_millis(500));
    let err = RedisStore::connect(&config).await.unwrap_err();
    assert!(matches!(err, CacheError::Connection { .. }), "{err:?}");
    // And plain text to a TLS port does not hang either.
    let plain = RedisConfig::from_url(&format!("redis://127.0.0.1:{}/", server.port()))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500));
    let started = Instant::now();
    assert!(RedisStore::connect(&plain).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}
