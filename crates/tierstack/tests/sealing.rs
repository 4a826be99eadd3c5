//! Compression and encryption of L2 entries through the cache: round trips between instances,
//! rotation, tampered, swapped and planted bytes read as counted misses and are deleted, and no
//! key reaches `Debug`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Calls, Fixture, loader};
use tierstack::core::Store as _;
use tierstack::core::envelope::Envelope;
use tierstack::{BincodeCodec, Compression, Encryption, EncryptionKey, KeyRing, TieredCache};

const KEY_1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const KEY_2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn ring(text: &str) -> KeyRing {
    KeyRing::parse(text).unwrap()
}

fn encrypted(fx: &Fixture, namespace: &str, keys: &str) -> TieredCache<String> {
    fx.builder(namespace)
        .without_l1()
        .encryption(Encryption::new(ring(keys)))
        .build()
        .unwrap()
}

/// An instance moving to encryption: it writes encrypted entries and still reads plaintext.
fn migrating(fx: &Fixture) -> TieredCache<String> {
    fx.builder("users")
        .without_l1()
        .encryption(Encryption::new(ring(&format!("1:{KEY_1}"))).accept_plaintext(true))
        .build()
        .unwrap()
}

fn json_like(records: usize) -> String {
    (0..records)
        .map(|i| format!("{{\"id\":{i},\"name\":\"user {i}\",\"active\":true}}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn stored(fx: &Fixture, store_key: &str) -> Vec<u8> {
    fx.l2.get(store_key).await.unwrap().unwrap().to_vec()
}

#[tokio::test]
async fn instances_sharing_a_ring_read_each_others_entries_and_l2_holds_no_plaintext() {
    let fx = Fixture::new();
    let writer = encrypted(&fx, "users", &format!("1:{KEY_1}"));
    let reader = encrypted(&fx, "users", &format!("1:{KEY_1}"));
    writer.set("42", "alice@example.com".into()).await.unwrap();
    assert_eq!(
        reader.get("42").await.unwrap().as_deref(),
        Some("alice@example.com")
    );
    let bytes = stored(&fx, "users:42").await;
    assert!(
        !bytes.windows(5).any(|w| w == b"alice"),
        "the value is not in L2 in clear"
    );
    let envelope = Envelope::parse::<BincodeCodec>(&bytes, 1 << 20).unwrap();
    assert_eq!(envelope.key_id(), Some(1));
    // A loaded value and a cached "not found" are encrypted too.
    let calls = Calls::default();
    let loaded = writer
        .get_or_load("7", loader(&calls, "bob"))
        .await
        .unwrap();
    assert_eq!(loaded, "bob");
    assert!(
        Envelope::parse::<BincodeCodec>(&stored(&fx, "users:7").await, 1 << 20)
            .unwrap()
            .is_encrypted()
    );
    assert_eq!(reader.get("7").await.unwrap().as_deref(), Some("bob"));
    assert_eq!(reader.stats().corrupt_entries, 0);
}

#[tokio::test]
async fn rotation_without_a_flush() {
    let fx = Fixture::new();
    let old = encrypted(&fx, "users", &format!("1:{KEY_1}"));
    old.set("a", "written with key 1".into()).await.unwrap();
    // Step 1 on every instance: key 2 added, decrypting only. Step 2: key 2 current.
    let added = encrypted(&fx, "users", &format!("1:{KEY_1} 2:{KEY_2}"));
    assert_eq!(
        added.get("a").await.unwrap().as_deref(),
        Some("written with key 1")
    );
    let rotated = encrypted(&fx, "users", &format!("2:{KEY_2} 1:{KEY_1}"));
    rotated.set("b", "written with key 2".into()).await.unwrap();
    let key_of = |bytes: Vec<u8>| {
        Envelope::parse::<BincodeCodec>(&bytes, 1 << 20)
            .unwrap()
            .key_id()
    };
    assert_eq!(key_of(stored(&fx, "users:b").await), Some(2));
    for cache in [&added, &rotated] {
        assert_eq!(
            cache.get("a").await.unwrap().as_deref(),
            Some("written with key 1")
        );
        assert_eq!(
            cache.get("b").await.unwrap().as_deref(),
            Some("written with key 2")
        );
    }
    // Step 3: key 1 removed. Its entries read as counted misses, and a read-through load
    // replaces them with key 2.
    let removed = encrypted(&fx, "users", &format!("2:{KEY_2}"));
    assert_eq!(
        removed.get("b").await.unwrap().as_deref(),
        Some("written with key 2")
    );
    let calls = Calls::default();
    let reloaded = removed
        .get_or_load("a", loader(&calls, "reloaded"))
        .await
        .unwrap();
    assert_eq!((reloaded.as_str(), calls.count()), ("reloaded", 1));
    assert_eq!(removed.stats().corrupt_entries, 1);
    assert_eq!(key_of(stored(&fx, "users:a").await), Some(2));
}

#[tokio::test]
async fn tampered_swapped_and_planted_entries_are_counted_misses_and_deleted() {
    let fx = Fixture::new();
    let cache = encrypted(&fx, "users", &format!("1:{KEY_1}"));
    cache.set("alice", "alice's profile".into()).await.unwrap();
    cache
        .set("mallory", "mallory's profile".into())
        .await
        .unwrap();
    let alice = stored(&fx, "users:alice").await;
    // Mallory copies her own ciphertext over Alice's key: it does not decrypt there.
    fx.l2.put_raw(
        "users:alice",
        stored(&fx, "users:mallory").await,
        Duration::from_secs(60),
    );
    assert_eq!(cache.get("alice").await.unwrap(), None);
    assert!(fx.l2.get("users:alice").await.unwrap().is_none(), "deleted");
    // The same ciphertext under another namespace and under another tenant's key.
    let other = encrypted(&fx, "admins", &format!("1:{KEY_1}"));
    fx.l2
        .put_raw("admins:alice", alice.clone(), Duration::from_secs(60));
    assert_eq!(other.get("alice").await.unwrap(), None);
    fx.l2.put_raw(
        "users:tenant-b:alice",
        alice.clone(),
        Duration::from_secs(60),
    );
    assert_eq!(cache.get("tenant-b:alice").await.unwrap(), None);
    // A flipped bit in the ciphertext, and a plaintext entry planted by someone without the key.
    let mut flipped = alice.clone();
    let last = flipped.len() - 20;
    flipped[last] ^= 1;
    fx.l2
        .put_raw("users:alice", flipped, Duration::from_secs(60));
    assert_eq!(cache.get("alice").await.unwrap(), None);
    let plain = fx.builder("users").without_l1().build().unwrap();
    plain.set("planted", "admin=true".into()).await.unwrap();
    assert_eq!(cache.get("planted").await.unwrap(), None);
    assert!(fx.l2.get("users:planted").await.unwrap().is_none());
    assert_eq!(cache.stats().corrupt_entries, 4);
    assert_eq!(other.stats().corrupt_entries, 1);
    // While migrating, plaintext entries still read.
    plain
        .set("legacy", "written before encryption".into())
        .await
        .unwrap();
    let migrating = migrating(&fx);
    assert_eq!(
        migrating.get("legacy").await.unwrap().as_deref(),
        Some("written before encryption")
    );
    // A cache without the ring reads encrypted entries as misses.
    cache.set("secret", "s".into()).await.unwrap();
    assert_eq!(plain.get("secret").await.unwrap(), None);
}

#[tokio::test]
async fn compressed_entries_are_smaller_and_read_by_any_instance() {
    let fx = Fixture::new();
    let compressing = fx
        .builder("docs")
        .without_l1()
        .compression(Compression::lz4())
        .build()
        .unwrap();
    let plain = fx.builder("docs").without_l1().build().unwrap();
    let value = json_like(1_500);
    compressing.set("big", value.clone()).await.unwrap();
    plain.set("big-plain", value.clone()).await.unwrap();
    let (small, large) = (
        stored(&fx, "docs:big").await.len(),
        stored(&fx, "docs:big-plain").await.len(),
    );
    assert!(small * 3 < large, "{small} vs {large}");
    assert_eq!(plain.get("big").await.unwrap(), Some(value.clone()));
    assert_eq!(compressing.get("big-plain").await.unwrap(), Some(value));
    // Compression does not raise the value limit: every reader can hold what it decompresses.
    let capped = fx
        .builder("docs")
        .compression(Compression::lz4())
        .max_value_len(4_096)
        .build()
        .unwrap();
    assert!(matches!(
        capped.set("too-big", json_like(500)).await,
        Err(tierstack::CacheError::ValueTooLarge { .. })
    ));
    // A reader with a smaller limit reads a larger compressed entry as a counted miss.
    assert_eq!(capped.get("big").await.unwrap(), None);
    assert_eq!(capped.stats().corrupt_entries, 1);
}

#[tokio::test]
async fn keys_never_appear_in_debug_output() {
    let fx = Fixture::new();
    let key = EncryptionKey::from_hex(KEY_2).unwrap();
    let ring = KeyRing::new(9, &key);
    let encryption = Encryption::new(ring.clone());
    let shown = format!("{key:?} {ring:?} {encryption:?}");
    let cache = fx.builder("users").encryption(encryption).build().unwrap();
    let shown = format!("{shown} {cache:?}");
    assert!(!shown.contains(&KEY_2[..16]), "{shown}");
    assert!(!shown.contains("34, 34, 34"), "{shown}");
    assert!(
        shown.contains("KeyRing { current: 9, ids: [9], .. }"),
        "{shown}"
    );
}

/// Fail-safe re-arms a stale value in L2 by writing it again, sealed: never a plaintext value
/// that `accept_plaintext` let through (anyone with L2 access may have planted it, and sealing
/// would make it authentic); an encrypted one, yes.
#[tokio::test]
async fn fail_safe_never_seals_a_plaintext_value_it_serves() {
    use tierstack::{EntryOptions, FailSafe};
    let ttl = Duration::from_secs(10);
    let options = EntryOptions::default().with_ttl(ttl).with_fail_safe(
        FailSafe::new(Duration::from_secs(3_600)).with_throttle(Duration::from_secs(30)),
    );
    let failing = || std::future::ready(Err::<String, _>(std::io::Error::other("origin down")));
    let fx = Fixture::new();
    let plain = fx.builder("users").without_l1().build().unwrap();
    plain
        .get_or_load_with("legacy", &options, || {
            std::future::ready(Ok::<_, std::io::Error>("planted".to_owned()))
        })
        .await
        .unwrap();
    let migrating = migrating(&fx);
    migrating
        .get_or_load_with("sealed", &options, || {
            std::future::ready(Ok::<_, std::io::Error>("sealed".to_owned()))
        })
        .await
        .unwrap();
    fx.clock.advance(ttl);
    let before = (
        stored(&fx, "users:legacy").await,
        stored(&fx, "users:sealed").await,
    );
    for key in ["legacy", "sealed"] {
        let stale = migrating
            .get_or_load_with(key, &options, failing)
            .await
            .unwrap();
        assert!(stale.stale, "{key}");
    }
    let legacy = stored(&fx, "users:legacy").await;
    assert_eq!(legacy, before.0, "the plaintext entry is left as it was");
    assert!(
        !Envelope::parse::<BincodeCodec>(&legacy, 1 << 20)
            .unwrap()
            .is_encrypted()
    );
    let sealed = stored(&fx, "users:sealed").await;
    assert_ne!(sealed, before.1, "the encrypted entry is re-armed");
    let rearmed = Envelope::parse::<BincodeCodec>(&sealed, 1 << 20).unwrap();
    assert!(rearmed.is_encrypted() && rearmed.stale);
}

/// An entry under a key this instance lacks is a counted miss and is deleted, as tampered bytes
/// are: an entry that stayed would make every read of the key a miss for good.
#[tokio::test]
async fn entries_of_a_key_this_instance_lacks_are_deleted() {
    let fx = Fixture::new();
    let rotated = encrypted(&fx, "users", &format!("2:{KEY_2} 1:{KEY_1}"));
    let behind = encrypted(&fx, "users", &format!("1:{KEY_1}"));
    let plain = fx.builder("users").without_l1().build().unwrap();
    rotated.set("k", "v".into()).await.unwrap();
    assert_eq!(behind.get("k").await.unwrap(), None);
    assert!(fx.l2.get("users:k").await.unwrap().is_none(), "deleted");
    rotated.set("k", "v".into()).await.unwrap();
    assert_eq!(plain.get("k").await.unwrap(), None);
    assert!(fx.l2.get("users:k").await.unwrap().is_none(), "deleted");
    assert_eq!(
        behind.stats().corrupt_entries + plain.stats().corrupt_entries,
        2
    );
    // A load on the instance that lacks the key writes an entry of its own.
    let calls = Calls::default();
    assert_eq!(
        behind.get_or_load("k", loader(&calls, "v1")).await.unwrap(),
        "v1"
    );
    assert_eq!(rotated.get("k").await.unwrap().as_deref(), Some("v1"));
}

/// Bad sealed bytes in L2, through the cache: a truncated encrypted entry, a compressed entry
/// whose claimed length was rewritten to 4 GiB (a bomb) and one whose block was cut, each a
/// counted miss that is deleted; and a value too large to write leaves the old one in place.
#[tokio::test]
async fn truncated_and_bomb_entries_are_counted_misses_and_nothing_is_lost() {
    let fx = Fixture::new();
    let cache = fx
        .builder("docs")
        .without_l1()
        .compression(Compression::lz4())
        .encryption(Encryption::new(ring(&format!("1:{KEY_1}"))))
        .max_value_len(64 * 1024)
        .build()
        .unwrap();
    let compressing = fx
        .builder("docs")
        .without_l1()
        .compression(Compression::lz4())
        .max_value_len(64 * 1024)
        .build()
        .unwrap();
    cache.set("sealed", json_like(200)).await.unwrap();
    compressing.set("packed", json_like(200)).await.unwrap();
    let sealed = stored(&fx, "docs:sealed").await;
    let packed = stored(&fx, "docs:packed").await;
    let parsed = Envelope::parse::<BincodeCodec>(&packed, 1 << 20).unwrap();
    // The compression field's length sits just before the payload.
    let claim_at = packed.len() - parsed.payload.len() - 4;
    let mut bomb = packed.clone();
    bomb[claim_at..claim_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut cut_block = packed.clone();
    cut_block.truncate(packed.len() - 10);
    let payload_len = u32::try_from(parsed.payload.len() - 10).unwrap();
    cut_block[21..25].copy_from_slice(&payload_len.to_le_bytes());
    let cases = [
        ("truncated", &cache, sealed[..sealed.len() - 1].to_vec()),
        ("bomb", &compressing, bomb),
        ("cut-block", &compressing, cut_block),
    ];
    for (i, (name, reader, bytes)) in cases.into_iter().enumerate() {
        fx.l2
            .put_raw(&format!("docs:{name}"), bytes, Duration::from_secs(60));
        assert_eq!(reader.get(name).await.unwrap(), None, "{name}");
        let counted = cache.stats().corrupt_entries + compressing.stats().corrupt_entries;
        assert_eq!(counted, i as u64 + 1, "{name} counted");
        assert!(
            fx.l2.get(&format!("docs:{name}")).await.unwrap().is_none(),
            "{name} deleted"
        );
    }
    // Too large before compression: refused, and the value written before stays.
    assert!(matches!(
        cache.set("sealed", json_like(5_000)).await,
        Err(tierstack::CacheError::ValueTooLarge { .. })
    ));
    assert_eq!(cache.get("sealed").await.unwrap(), Some(json_like(200)));
}
