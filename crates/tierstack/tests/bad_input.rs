//! Bad input gets a clear error and loses nothing; bad L2 bytes are a counted miss.

mod common;

use std::time::Duration;

use common::{Calls, Fixture, loader};
use tierstack::core::Store;
use tierstack::core::clock::Clock;
use tierstack::core::envelope;
use tierstack::core::{BincodeCodec, KeyProblem};
use tierstack::{CacheError, JsonCodec, LoadError};

#[tokio::test]
async fn empty_and_oversized_keys_are_refused_everywhere() {
    let fx = Fixture::new();
    let cache = fx.builder("test").max_key_len(16).build().unwrap();
    let long = "k".repeat(17);
    for key in ["", long.as_str()] {
        let is_invalid = |e: &CacheError| matches!(e, CacheError::InvalidKey { .. });
        assert!(is_invalid(&cache.get(key).await.unwrap_err()));
        assert!(is_invalid(&cache.set(key, "v".into()).await.unwrap_err()));
        assert!(matches!(
            cache.get_or_load(key, loader(&Calls::default(), "v")).await,
            Err(LoadError::Cache(CacheError::InvalidKey { .. }))
        ));
        assert!(is_invalid(&cache.delete(key).await.unwrap_err()));
        assert!(is_invalid(&cache.exists(key).await.unwrap_err()));
        assert!(is_invalid(
            &cache.touch(key, Duration::from_secs(1)).await.unwrap_err()
        ));
        assert!(is_invalid(&cache.get_many(&["ok", key]).await.unwrap_err()));
    }
    let err = cache.get("").await.unwrap_err();
    assert!(matches!(
        err,
        CacheError::InvalidKey {
            reason: KeyProblem::Empty
        }
    ));
    assert_eq!(err.to_string(), "invalid key: key is empty");
    assert!(fx.l2.is_empty());
}

#[tokio::test]
async fn zero_and_absurd_ttls_are_refused_and_nothing_is_written() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("k", "old".into()).await.unwrap();
    for ttl in [
        Duration::ZERO,
        Duration::from_micros(10),
        Duration::MAX,
        Duration::from_secs(400 * 365 * 86_400),
    ] {
        let err = cache
            .set_with_ttl("k", "new".into(), ttl)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CacheError::InvalidTtl { .. }),
            "{ttl:?}: {err:?}"
        );
        assert!(matches!(
            cache.touch("k", ttl).await,
            Err(CacheError::InvalidTtl { .. })
        ));
    }
    assert_eq!(cache.get("k").await.unwrap(), Some("old".into()));
    cache.invalidate_local_all();
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some("old".into()),
        "L2 kept the old value"
    );
}

#[tokio::test]
async fn an_oversized_value_is_refused_before_either_tier_is_written() {
    let fx = Fixture::new();
    let cache = fx.builder("test").max_value_len(1024).build().unwrap();
    cache.set("k", "small".into()).await.unwrap();
    let err = cache.set("k", "x".repeat(2000)).await.unwrap_err();
    assert!(
        matches!(err, CacheError::ValueTooLarge { max: 1024, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("exceeds the maximum of 1024 bytes")
    );
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some("small".into()),
        "L1 unchanged"
    );
    cache.invalidate_local_all();
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some("small".into()),
        "L2 unchanged"
    );
    // A loaded value that is too large is served but cached nowhere.
    let calls = Calls::default();
    let big = "y".repeat(2000);
    assert_eq!(
        cache
            .get_or_load("big", loader(&calls, &big))
            .await
            .unwrap(),
        big
    );
    assert_eq!(
        cache
            .get_or_load("big", loader(&calls, &big))
            .await
            .unwrap(),
        big
    );
    assert_eq!(calls.count(), 2);
    assert!(fx.l2.get("test:big").await.unwrap().is_none());
}

#[tokio::test]
async fn corrupt_l2_entries_are_counted_misses_and_deleted() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let now = fx.clock.now();
    let later = now.saturating_add(Duration::from_secs(60));
    let valid =
        envelope::encode(&BincodeCodec::default(), Some("fine"), now, later, 1 << 20).unwrap();
    let mut unknown_version = valid.to_vec();
    unknown_version[2] = 99;
    let other_codec = envelope::encode(&JsonCodec, Some("json"), now, later, 1 << 20).unwrap();
    let mut lying_length = valid.to_vec();
    lying_length[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut bad_payload = valid[..envelope::HEADER_LEN].to_vec();
    bad_payload[21..25].copy_from_slice(&9u32.to_le_bytes());
    bad_payload.extend_from_slice(&[253, 0, 0, 0, 0, 0, 1, 0, 0]); // a 2^40-byte length prefix
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"\x00\xffnot an envelope at all, really".to_vec(),
        ),
        ("empty", Vec::new()),
        ("truncated", valid[..valid.len() - 2].to_vec()),
        ("header-only", valid[..10].to_vec()),
        ("unknown-version", unknown_version),
        ("other-codec", other_codec.to_vec()),
        ("lying-length", lying_length),
        ("hostile-payload", bad_payload),
    ];
    for (i, (name, bytes)) in cases.iter().enumerate() {
        fx.l2.put_raw(
            &format!("test:{name}"),
            bytes.clone(),
            Duration::from_secs(60),
        );
        assert_eq!(cache.get(name).await.unwrap(), None, "{name}");
        assert_eq!(
            cache.stats().corrupt_entries,
            i as u64 + 1,
            "{name} counted"
        );
        assert!(
            fx.l2.get(&format!("test:{name}")).await.unwrap().is_none(),
            "{name} deleted"
        );
    }
    // A corrupt entry under a read-through key is replaced by the loader's value.
    fx.l2
        .put_raw("test:rt", b"junk".to_vec(), Duration::from_secs(60));
    let calls = Calls::default();
    assert_eq!(
        cache
            .get_or_load("rt", loader(&calls, "fresh"))
            .await
            .unwrap(),
        "fresh"
    );
    cache.wait_for_background_fills().await;
    cache.invalidate_local_all();
    assert_eq!(cache.get("rt").await.unwrap(), Some("fresh".into()));
    // Bulk reads treat corrupt entries the same way.
    fx.l2
        .put_raw("test:bulk", b"junk".to_vec(), Duration::from_secs(60));
    assert_eq!(
        cache.get_many(&["bulk", "rt"]).await.unwrap(),
        vec![None, Some("fresh".into())]
    );
}

#[tokio::test]
async fn secrets_and_values_stay_out_of_debug_output() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache
        .set("user:alice@example.com", "s3cret-value".into())
        .await
        .unwrap();
    let debug = format!("{cache:?}");
    assert!(
        !debug.contains("s3cret-value") && !debug.contains("alice"),
        "{debug}"
    );
}
