//! The envelope's sealing: what compression and encryption cost per value and what they save
//! in stored bytes, and what encryption costs a read served by Redis.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use tierstack::{Compression, Encryption, EncryptionKey, KeyRing, TieredCache};
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope::{self, Envelope, Lifetime, Sealing};
use tierstack_core::{BincodeCodec, Codec};
use tierstack_redis::RedisStore;

use crate::harness::{
    Record, Sizes, TieredGet, Workload, head_to_head, interleave, records, run_round, shuffled,
};
use crate::redis_scenarios::{config, fail};

const MAX: usize = 1 << 20;
const STORE_KEY: &str = "bench:profile";

/// A JSON document of user records, at least `bytes` long (a record more): the kind of value
/// caches hold.
pub(crate) fn json_like(bytes: usize, seed: usize) -> String {
    let names = [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ];
    let mut out = String::from("[");
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ seed as u64;
    let mut id = 0;
    while out.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let name = names[(state % 8) as usize];
        let _ = write!(
            out,
            "{{\"id\":{id},\"name\":\"{name}\",\"email\":\"{name}{}@example.com\",\"score\":{},\"active\":{},\"created_at\":\"2026-11-{:02}T{:02}:{:02}:00Z\"}},",
            state % 10_000,
            (state >> 20) % 100_000,
            state & 1 == 0,
            state % 28 + 1,
            (state >> 8) % 24,
            (state >> 16) % 60
        );
        id += 1;
    }
    out.pop();
    out.push(']');
    out
}

fn key_ring() -> KeyRing {
    KeyRing::new(1, &EncryptionKey::from_bytes([0x5a; 32]))
}

fn sealings() -> [(&'static str, Sealing); 4] {
    let compression = Compression::lz4();
    let encryption = Encryption::new(key_ring());
    [
        ("plain", Sealing::none()),
        ("compressed", Sealing::none().compression(compression)),
        ("encrypted", Sealing::none().encryption(encryption.clone())),
        (
            "compressed+encrypted",
            Sealing::none()
                .compression(compression)
                .encryption(encryption),
        ),
    ]
}

/// Encodes one value into a sealed envelope, then parses, opens and decodes it.
struct Codecs {
    sealing: Sealing,
    values: Arc<Vec<String>>,
}

impl Codecs {
    fn encode(&self, value: &String) -> bytes::Bytes {
        let now = Timestamp::from_millis(1_000);
        envelope::encode_sealed(
            &BincodeCodec::default(),
            Some(value),
            Lifetime::plain(now, now.saturating_add(Duration::from_secs(60))),
            None,
            &self.sealing,
            STORE_KEY,
            MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Workload for Codecs {
    async fn op(&self, i: usize) {
        let value = &self.values[i % self.values.len()];
        let bytes = self.encode(value);
        let parsed = Envelope::parse::<BincodeCodec>(&bytes, MAX).unwrap_or_else(|e| panic!("{e}"));
        let payload = self
            .sealing
            .open(&parsed, STORE_KEY, MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        let back: String = BincodeCodec::default()
            .decode(&payload)
            .unwrap_or_else(|e| panic!("{e}"));
        black_box(back);
    }
}

/// `envelope_codec/1KB` and `/64KB`: encode and decode of a JSON-like value, plain (the
/// baseline), compressed, encrypted and both; each record carries the envelope's stored bytes.
pub(crate) async fn envelope_codec(sizes: &Sizes) -> Vec<Record> {
    let mut out = Vec::new();
    for (label, bytes, ops) in [
        ("1KB", 1024, sizes.ops_per_task / 20),
        ("64KB", 64 * 1024, sizes.ops_per_task / 1_000),
    ] {
        // A few distinct values, so that no branch predictor or cache learns one.
        let values: Arc<Vec<String>> =
            Arc::new((0..16).map(|seed| json_like(bytes, seed)).collect());
        let systems: Vec<(&str, Arc<Codecs>)> = sealings()
            .into_iter()
            .map(|(name, sealing)| {
                (
                    name,
                    Arc::new(Codecs {
                        sealing,
                        values: values.clone(),
                    }),
                )
            })
            .collect();
        let order = shuffled(values.len());
        let rounds = interleave(systems.len(), sizes.rounds, |k| {
            let workload = systems[k].1.clone();
            let order = order.clone();
            async move { run_round(&workload, &order, 1, ops.max(16)).await }
        })
        .await;
        let names: Vec<&str> = systems.iter().map(|(name, _)| *name).collect();
        let mut measured = records(&format!("envelope_codec/{label}"), &names, 0, &rounds);
        for (record, (name, codecs)) in measured.iter_mut().zip(&systems) {
            let stored = codecs.encode(&values[0]);
            let parsed =
                Envelope::parse::<BincodeCodec>(&stored, MAX).unwrap_or_else(|e| panic!("{e}"));
            // A compressing system that did not compress would measure nothing.
            assert_eq!(
                parsed.uncompressed_len().is_some(),
                name.starts_with("compressed"),
                "envelope_codec/{label}: {name}"
            );
            record.stored_bytes = Some(stored.len() as u64);
        }
        out.extend(measured);
    }
    out
}

/// `l2_hit_redis_encrypted/64task`: `TieredCache::get` served by Redis (L1 off) of 1 KB JSON-like
/// values, encrypted against plaintext, on the same key stream.
pub(crate) async fn l2_hit_redis_encrypted(sizes: &Sizes) -> Vec<Record> {
    let keys: Arc<Vec<String>> = Arc::new((0..sizes.keys).map(|i| format!("key-{i:06}")).collect());
    let mut caches = Vec::new();
    for (prefix, encrypted) in [("bench-plain:", false), ("bench-encrypted:", true)] {
        let store = RedisStore::connect(&config(prefix))
            .await
            .unwrap_or_else(|e| fail(e));
        let mut builder = TieredCache::builder("bench")
            .without_l1()
            .l2(Arc::new(store))
            .default_ttl(Duration::from_hours(1))
            .l2_timeout(Duration::from_secs(60));
        if encrypted {
            builder = builder.encryption(Encryption::new(key_ring()));
        }
        let cache = builder.build().unwrap_or_else(|e| fail(e));
        for (i, key) in keys.iter().enumerate() {
            cache
                .set(key, json_like(1024, i))
                .await
                .unwrap_or_else(|e| fail(e));
        }
        caches.push(Arc::new(TieredGet {
            cache,
            keys: keys.clone(),
        }));
    }
    let order = shuffled(sizes.keys);
    let ops = sizes.redis_ops / 64;
    let rounds = head_to_head(&caches[1], &caches[0], &order, sizes.rounds, 64, ops).await;
    records(
        "l2_hit_redis_encrypted/64task",
        &["tierstack encrypted", "tierstack"],
        1,
        &rounds,
    )
}
