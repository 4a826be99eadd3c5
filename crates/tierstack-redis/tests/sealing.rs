//! Compressed and encrypted entries on a real Redis: instances share them, a `touch` (which
//! rewrites the expiry inside the bytes) keeps them readable, tampered or swapped bytes are
//! counted misses and deleted, and instances racing on one Redis never misread each other.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tierstack::core::envelope::Envelope;
use tierstack::core::{BincodeCodec, Store};
use tierstack::{Compression, Encryption, KeyRing, TieredCache};
use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};

mod common;

const KEY_1: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const KEY_2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

struct Service {
    config: RedisConfig,
    raw: RedisStore,
}

impl Service {
    async fn new(test: &str) -> Self {
        let (config, raw) = common::prefixed(test).await;
        Self { config, raw }
    }

    /// An instance without L1 (every read goes to Redis) sealing with `keys`.
    async fn instance(&self, keys: &str) -> TieredCache<String> {
        let store = RedisStore::connect(&self.config).await.unwrap();
        TieredCache::builder("svc")
            .l2(Arc::new(store))
            .without_l1()
            .compression(Compression::lz4())
            .encryption(Encryption::new(KeyRing::parse(keys).unwrap()))
            .build()
            .unwrap()
    }

    async fn stored(&self, key: &str) -> Option<Vec<u8>> {
        self.raw
            .get(&format!("svc:{key}"))
            .await
            .unwrap()
            .map(|bytes| bytes.to_vec())
    }
}

fn json_like(records: usize) -> String {
    (0..records)
        .map(|i| format!("{{\"id\":{i},\"email\":\"user{i}@example.com\",\"active\":true}}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test]
async fn instances_share_sealed_entries_and_a_touch_keeps_them_readable() {
    let service = Service::new("sealed-share").await;
    let a = service.instance(&format!("1:{KEY_1}")).await;
    let b = service.instance(&format!("1:{KEY_1}")).await;
    let value = json_like(1_000);
    a.set("profile", value.clone()).await.unwrap();
    let bytes = service.stored("profile").await.unwrap();
    let envelope = Envelope::parse::<BincodeCodec>(&bytes, usize::MAX).unwrap();
    assert!(envelope.is_encrypted() && envelope.uncompressed_len().is_some());
    assert!(
        bytes.len() * 3 < value.len(),
        "{} of {}",
        bytes.len(),
        value.len()
    );
    assert!(!bytes.windows(7).any(|w| w == b"example"));
    assert_eq!(b.get("profile").await.unwrap(), Some(value.clone()));
    // Redis's expire rewrites the expiry inside the bytes, which encryption leaves out of what
    // it authenticates: the entry still opens, with its new time to live.
    assert!(
        b.touch("profile", Duration::from_secs(3_600))
            .await
            .unwrap()
    );
    let touched = service.stored("profile").await.unwrap();
    assert_ne!(touched, bytes);
    assert_eq!(a.get("profile").await.unwrap(), Some(value));
    let ttl = service.raw.ttl("svc:profile").await.unwrap().unwrap();
    assert!(ttl > Duration::from_secs(3_000), "{ttl:?}");
    assert_eq!(a.stats().corrupt_entries + b.stats().corrupt_entries, 0);
}

#[tokio::test]
async fn swapped_and_tampered_bytes_are_counted_misses_and_deleted() {
    let service = Service::new("sealed-tamper").await;
    let cache = service.instance(&format!("1:{KEY_1}")).await;
    cache.set("alice", "alice's token".into()).await.unwrap();
    cache
        .set("mallory", "mallory's token".into())
        .await
        .unwrap();
    let mallory = service.stored("mallory").await.unwrap();
    service
        .raw
        .set("svc:alice", mallory.clone().into(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get("alice").await.unwrap(), None);
    assert_eq!(service.stored("alice").await, None, "deleted");
    let mut flipped = mallory;
    let at = flipped.len() - 3;
    flipped[at] ^= 0x80;
    service
        .raw
        .set("svc:mallory", flipped.into(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get("mallory").await.unwrap(), None);
    assert_eq!(cache.stats().corrupt_entries, 2);
}

#[tokio::test]
async fn rotation_across_instances_on_one_redis() {
    let service = Service::new("sealed-rotation").await;
    let old = service.instance(&format!("1:{KEY_1}")).await;
    old.set("k1", "one".into()).await.unwrap();
    let rotated = service.instance(&format!("2:{KEY_2},1:{KEY_1}")).await;
    rotated.set("k2", "two".into()).await.unwrap();
    assert_eq!(rotated.get("k1").await.unwrap().as_deref(), Some("one"));
    // An instance not yet given key 2 reads its entries as misses and deletes them: why step 1
    // adds the key everywhere before step 2 makes it current.
    assert_eq!(old.get("k2").await.unwrap(), None);
    assert_eq!(old.stats().corrupt_entries, 1);
    assert_eq!(service.stored("k2").await, None);
    rotated.set("k2", "two".into()).await.unwrap();
    let removed = service.instance(&format!("2:{KEY_2}")).await;
    assert_eq!(removed.get("k2").await.unwrap().as_deref(), Some("two"));
    assert_eq!(removed.get("k1").await.unwrap(), None);
}

/// Four instances with L1 and the backplane race writes, deletes and reads of a few keys:
/// every read is a value some instance wrote under that key, and nothing is ever undecodable.
#[tokio::test]
async fn racing_instances_never_misread_sealed_entries() {
    let service = Service::new("sealed-race").await;
    let mut instances = Vec::new();
    for _ in 0..4 {
        let store = RedisStore::connect(&service.config).await.unwrap();
        let backplane = RedisBackplane::connect(&service.config).await.unwrap();
        instances.push(
            TieredCache::<String>::builder("svc")
                .l2(Arc::new(store))
                .backplane(Arc::new(backplane))
                .compression(Compression::lz4().min_size(64))
                .encryption(Encryption::new(
                    KeyRing::parse(&format!("1:{KEY_1}")).unwrap(),
                ))
                .build()
                .unwrap(),
        );
    }
    let tasks = instances.iter().cloned().enumerate().map(|(n, cache)| {
        tokio::spawn(async move {
            for round in 0..150 {
                let key = format!("k{}", round % 5);
                match (round + n) % 3 {
                    0 => cache
                        .set(&key, format!("{key}:{}", json_like(n + 2)))
                        .await
                        .unwrap(),
                    1 => {
                        cache.delete(&key).await.unwrap();
                    }
                    _ => {
                        if let Some(value) = cache.get(&key).await.unwrap() {
                            assert!(value.starts_with(&format!("{key}:")), "{key} read {value}");
                        }
                    }
                }
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.unwrap();
    }
    for cache in &instances {
        assert_eq!(cache.stats().corrupt_entries, 0);
    }
}
