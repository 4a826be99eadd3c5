//! Per-call options and the resilience policies: fail-safe, the hard timeout, adaptive options
//! and provenance. TTLs run on a manual clock; timeouts on Tokio's paused clock.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Calls, Fixture, loader};
use tierstack::core::Store;
use tierstack::core::clock::{Clock, ManualClock, Timestamp};
use tierstack::core::envelope::Envelope;
use tierstack::{
    BincodeCodec, CacheEvent, EntryOptions, FailSafe, Fetched, LoadError, Loaded, Skips, Source,
    StaleReason, TieredCache,
};
use tokio::sync::Notify;

const TTL: Duration = Duration::from_secs(10);
const MAX_STALE: Duration = Duration::from_secs(3600);
const THROTTLE: Duration = Duration::from_secs(30);

fn fail_safe() -> EntryOptions {
    EntryOptions::default()
        .with_ttl(TTL)
        .with_fail_safe(FailSafe::new(MAX_STALE).with_throttle(THROTTLE))
}

fn failing(
    calls: &Calls,
) -> impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + Send + 'static {
    let calls = calls.clone();
    move || {
        calls.hit();
        std::future::ready(Err(std::io::Error::other("origin down")))
    }
}

async fn fetch(
    cache: &TieredCache<String>,
    options: &EntryOptions,
    load: impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + Send + 'static,
) -> Result<Fetched<String>, LoadError<std::io::Error>> {
    cache.get_or_load_with("k", options, load).await
}

#[tokio::test]
async fn fail_safe_serves_the_stale_value_when_the_loader_fails() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = fail_safe();
    let first = fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    assert_eq!((first.source, first.stale), (Source::Loader, false));
    fx.clock.advance(TTL + Duration::from_secs(1));
    let stale = fetch(&cache, &options, failing(&calls)).await.unwrap();
    assert_eq!(stale.value, "v1");
    assert_eq!((stale.source, stale.stale), (Source::L1, true));
    assert_eq!(calls.count(), 2, "the origin was tried once");
    let stats = cache.stats();
    assert_eq!((stats.stale_served, stats.load_errors), (1, 1));
    // A plain read serves fresh values only: not the stale value, nor its re-armed copy.
    assert_eq!(cache.get("k").await.unwrap(), None);
    let other = fx.cache();
    assert_eq!(other.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn without_fail_safe_nothing_is_kept_past_the_ttl() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = EntryOptions::default().with_ttl(TTL);
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    cache.wait_for_background_fills().await;
    fx.clock.advance(TTL);
    assert!(fx.l2.get("test:k").await.unwrap().is_none());
    let error = fetch(&cache, &options, failing(&calls)).await.unwrap_err();
    assert!(error.loader_error().is_some(), "{error}");
    // The same stale entry, read by a call without fail-safe, is no fallback either.
    let fx = Fixture::new();
    let cache = fx.cache();
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    assert!(fetch(&cache, &options, failing(&calls)).await.is_err());
}

#[tokio::test]
async fn a_failing_origin_is_tried_once_per_throttle_window() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = fail_safe();
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    fx.clock.advance(TTL);
    for _ in 0..100 {
        let fetched = fetch(&cache, &options, failing(&calls)).await.unwrap();
        assert!(fetched.stale && fetched.value == "v1");
        fx.clock.advance(Duration::from_millis(100));
    }
    // 10 s of reads inside one 30 s window: one attempt.
    assert_eq!(calls.count(), 2);
    fx.clock.advance(THROTTLE);
    assert!(
        fetch(&cache, &options, failing(&calls))
            .await
            .unwrap()
            .stale
    );
    assert_eq!(calls.count(), 3, "the next window tries again");
    // The origin is back: the next attempt after the window stores a fresh value.
    fx.clock.advance(THROTTLE);
    let fresh = fetch(&cache, &options, loader(&calls, "v2")).await.unwrap();
    assert_eq!((fresh.value.as_str(), fresh.stale), ("v2", false));
    let hit = fetch(&cache, &options, failing(&calls)).await.unwrap();
    assert_eq!(
        (hit.value.as_str(), hit.source, hit.stale),
        ("v2", Source::L1, false)
    );
}

#[tokio::test]
async fn the_stale_value_survives_a_restart_through_l2() {
    let fx = Fixture::new();
    let calls = Calls::default();
    let options = fail_safe();
    {
        let cache = fx.cache();
        fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
        cache.wait_for_background_fills().await;
    }
    fx.clock.advance(TTL + Duration::from_secs(60));
    let restarted = fx.cache();
    let stale = fetch(&restarted, &options, failing(&calls)).await.unwrap();
    assert_eq!(
        (stale.value.as_str(), stale.source, stale.stale),
        ("v1", Source::L2, true)
    );
    // Stored as fresh for its TTL and kept, stale, for the fail-safe maximum.
    let bytes = fx.l2.get("test:k").await.unwrap().unwrap();
    let envelope = Envelope::parse::<BincodeCodec>(&bytes, 1 << 20).unwrap();
    assert_eq!(
        envelope.expires_at.as_millis() - envelope.fresh_until.as_millis(),
        u64::try_from(MAX_STALE.as_millis()).unwrap()
    );
}

#[tokio::test]
async fn without_l1_the_throttle_is_kept_in_l2() {
    let fx = Fixture::new();
    let cache = fx.builder("test").without_l1().build().unwrap();
    let calls = Calls::default();
    let options = fail_safe();
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    fx.clock.advance(TTL);
    for _ in 0..5 {
        let stale = fetch(&cache, &options, failing(&calls)).await.unwrap();
        assert_eq!((stale.source, stale.stale), (Source::L2, true));
    }
    assert_eq!(calls.count(), 2, "re-armed in L2: one attempt per window");
    // Another instance sees the re-armed entry as stale too, not as fresh.
    let other = fx.builder("test").without_l1().build().unwrap();
    let seen = fetch(&other, &options, failing(&calls)).await.unwrap();
    assert!(seen.stale);
    fx.clock.advance(THROTTLE);
    fetch(&cache, &options, failing(&calls)).await.unwrap();
    assert_eq!(calls.count(), 3);
}

#[tokio::test]
async fn a_delete_removes_the_fallback_too() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = fail_safe();
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    fx.clock.advance(TTL);
    assert!(cache.delete("k").await.unwrap());
    assert!(fetch(&cache, &options, failing(&calls)).await.is_err());
}

/// A loader that answers `value` after `delay` (on Tokio's clock), counting its calls and
/// its completions.
fn slow(
    calls: &Calls,
    done: &Calls,
    delay: Duration,
    value: &str,
) -> impl FnOnce() -> BoxFuture<'static, Result<String, std::io::Error>> + Send + 'static {
    let (calls, done, value) = (calls.clone(), done.clone(), value.to_owned());
    move || {
        calls.hit();
        Box::pin(async move {
            tokio::time::sleep(delay).await; // paused clock
            done.hit();
            Ok(value)
        })
    }
}

/// Lets the other tasks run (on Tokio's paused clock no time passes) until `happened`, for at
/// most 1,000 turns.
async fn until(happened: impl Fn() -> bool) {
    for _ in 0..1_000 {
        if happened() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("did not happen in 1,000 turns of the scheduler");
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

#[tokio::test(start_paused = true)]
async fn the_hard_timeout_answers_a_timeout_and_cancels_without_background_completion() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let (calls, done) = (Calls::default(), Calls::default());
    let limit = Duration::from_millis(200);
    let options = fail_safe()
        .with_hard_timeout(limit)
        .with_background_completion(false);
    let started = tokio::time::Instant::now();
    let error = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_secs(5), "late"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, LoadError::TimedOut { after } if after == limit),
        "{error}"
    );
    assert_eq!(started.elapsed(), limit);
    tokio::time::sleep(Duration::from_secs(10)).await; // paused clock
    assert_eq!(
        (calls.count(), done.count()),
        (1, 0),
        "the load was cancelled"
    );
    assert_eq!(cache.get("k").await.unwrap(), None);
    // The inline `get_or_load` cancels its loader at the default hard timeout too.
    let inline = fx.builder("test").default_options(options).build().unwrap();
    let error = inline
        .get_or_load("k", slow(&calls, &done, Duration::from_secs(5), "late"))
        .await
        .unwrap_err();
    assert!(matches!(error, LoadError::TimedOut { .. }), "{error}");
}

#[tokio::test(start_paused = true)]
async fn past_the_hard_timeout_the_load_completes_in_the_background() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let (calls, done) = (Calls::default(), Calls::default());
    let limit = Duration::from_millis(200);
    let options = fail_safe().with_hard_timeout(limit);
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    fx.clock.advance(TTL);
    let started = tokio::time::Instant::now();
    let stale = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_secs(5), "v2"),
        )
        .await
        .unwrap();
    assert_eq!((stale.value.as_str(), stale.stale), ("v1", true));
    assert_eq!(started.elapsed(), limit);
    // A caller arriving meanwhile joins the running load instead of starting another.
    let joined = fetch(&cache, &options, failing(&calls)).await.unwrap();
    assert!(joined.stale);
    tokio::time::sleep(Duration::from_secs(5)).await; // paused clock
    assert_eq!((calls.count(), done.count()), (2, 1));
    let fresh = fetch(&cache, &options, failing(&calls)).await.unwrap();
    assert_eq!((fresh.value.as_str(), fresh.stale), ("v2", false));
    cache.wait_for_background_fills().await;
    let other = fx.cache();
    assert_eq!(other.get("k").await.unwrap(), Some("v2".into()));
}

#[tokio::test(start_paused = true)]
async fn the_soft_timeout_answers_stale_and_the_late_value_lands_in_both_tiers() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let (calls, done) = (Calls::default(), Calls::default());
    let soft = Duration::from_millis(20);
    let options = fail_safe()
        .with_soft_timeout(soft)
        .with_hard_timeout(Duration::from_secs(2));
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    cache.wait_for_background_fills().await;
    fx.clock.advance(TTL);
    let started = tokio::time::Instant::now();
    let stale = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_millis(500), "v2"),
        )
        .await
        .unwrap();
    assert_eq!((stale.value.as_str(), stale.stale), ("v1", true));
    assert_eq!(started.elapsed(), soft);
    assert_eq!(cache.stats().soft_timeouts, 1);
    // An instance with nothing in L1 gets the stale value found in L2 at its soft timeout too.
    let other = fx.cache();
    let from_l2 = other
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_millis(500), "v3"),
        )
        .await
        .unwrap();
    assert_eq!(
        (from_l2.value.as_str(), from_l2.source, from_l2.stale),
        ("v1", Source::L2, true)
    );
    tokio::time::sleep(Duration::from_secs(1)).await; // paused clock
    assert_eq!(done.count(), 2);
    assert_eq!(cache.get("k").await.unwrap(), Some("v2".into()));
    cache.wait_for_background_fills().await;
    let third = fx.cache();
    assert!(
        third
            .get("k")
            .await
            .unwrap()
            .is_some_and(|v| v == "v2" || v == "v3")
    );
    // Without a stale value, the soft timeout does not apply: the call waits for the load.
    let started = tokio::time::Instant::now();
    let waited = cache
        .get_or_load_with(
            "new",
            &options,
            slow(&calls, &done, Duration::from_millis(500), "n"),
        )
        .await
        .unwrap();
    assert_eq!(
        (waited.value.as_str(), waited.source),
        ("n", Source::Loader)
    );
    assert_eq!(started.elapsed(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn a_stale_value_found_after_the_soft_timeout_answers_when_found() {
    let fx = Fixture::new();
    let (calls, done) = (Calls::default(), Calls::default());
    let soft = Duration::from_millis(20);
    let options = fail_safe().with_soft_timeout(soft);
    fetch(&fx.cache(), &options, loader(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    // A new instance (nothing in L1) whose L2 answers only after the soft timeout.
    let cache = fx
        .builder("test")
        .l2_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let l2_delay = Duration::from_millis(100);
    fx.faulty.set_delay(l2_delay);
    let started = tokio::time::Instant::now();
    let stale = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_millis(500), "v2"),
        )
        .await
        .unwrap();
    assert_eq!(
        (stale.value.as_str(), stale.source, stale.stale),
        ("v1", Source::L2, true)
    );
    assert_eq!(started.elapsed(), l2_delay, "answered when L2 answered");
    assert_eq!(cache.stats().soft_timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn eager_refresh_reloads_once_in_the_background_and_nobody_waits() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let (calls, done) = (Calls::default(), Calls::default());
    let options = EntryOptions::default()
        .with_ttl(TTL)
        .with_eager_refresh(0.8);
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    // Before the threshold: plain hits.
    fx.clock.advance(Duration::from_secs(7));
    let hit = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_millis(50), "v2"),
        )
        .await
        .unwrap();
    assert_eq!((hit.value.as_str(), hit.source), ("v1", Source::L1));
    assert_eq!(calls.count(), 1);
    // Past 80 % of the TTL: 1,000 concurrent hits answer at once and start one reload.
    fx.clock.advance(Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    let hits: Vec<_> = (0..1_000)
        .map(|_| {
            let cache = cache.clone();
            let load = slow(&calls, &done, Duration::from_millis(50), "v2");
            tokio::spawn(async move { cache.get_or_load_with("k", &options, load).await })
        })
        .collect();
    for hit in hits {
        let hit = hit.await.unwrap().unwrap();
        assert_eq!((hit.value.as_str(), hit.source), ("v1", Source::L1));
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "no caller waited");
    assert_eq!(calls.count(), 2, "one reload");
    tokio::time::sleep(Duration::from_millis(50)).await; // paused clock
    until(|| done.count() == 1).await;
    let refreshed = fetch(&cache, &options, failing(&calls)).await.unwrap();
    assert_eq!(
        (refreshed.value.as_str(), refreshed.source),
        ("v2", Source::L1)
    );
    assert_eq!(cache.stats().eager_refreshes, 1);
    // The reloaded value is fresh for a whole TTL from its reload.
    fx.clock.advance(Duration::from_secs(7));
    assert_eq!(cache.get("k").await.unwrap(), Some("v2".into()));
}

#[tokio::test(start_paused = true)]
async fn an_eager_refresh_takes_a_value_another_instance_refreshed_already() {
    let fx = Fixture::new();
    let (calls, done) = (Calls::default(), Calls::default());
    let options = EntryOptions::default()
        .with_ttl(TTL)
        .with_eager_refresh(0.5);
    let a = fx.cache();
    let b = fx.cache();
    fetch(&a, &options, loader(&calls, "v1")).await.unwrap();
    a.wait_for_background_fills().await;
    fetch(&b, &options, loader(&calls, "never")).await.unwrap();
    fx.clock.advance(Duration::from_secs(6));
    // A refreshes from the origin and writes L2.
    fetch(&a, &options, loader(&calls, "v2")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await; // paused clock
    a.wait_for_background_fills().await;
    assert_eq!(calls.count(), 2);
    // B's refresh finds A's value in L2, younger than the threshold: no origin call.
    b.get_or_load_with(
        "k",
        &options,
        slow(&calls, &done, Duration::from_millis(1), "v3"),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await; // paused clock
    assert_eq!(calls.count(), 2);
    assert_eq!(b.get("k").await.unwrap(), Some("v2".into()));
}

#[tokio::test]
async fn a_loader_can_choose_its_ttl_or_not_to_be_cached() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let options = EntryOptions::default().with_ttl(TTL);
    let token = cache
        .get_or_load_with("token", &options, || async {
            Ok::<_, std::io::Error>(Loaded::new("t".to_owned()).with_ttl(Duration::from_secs(90)))
        })
        .await
        .unwrap();
    assert_eq!(
        (token.source, token.ttl),
        (Source::Loader, Some(Duration::from_secs(90)))
    );
    cache.wait_for_background_fills().await;
    assert_eq!(
        fx.l2.ttl("test:token").await.unwrap(),
        Some(Duration::from_secs(90))
    );
    let calls = Calls::default();
    for _ in 0..2 {
        let calls = calls.clone();
        let partial = cache
            .get_or_load_with("partial", &options, move || {
                calls.hit();
                async { Ok::<_, std::io::Error>(Loaded::new("p".to_owned()).uncached()) }
            })
            .await
            .unwrap();
        assert_eq!((partial.value.as_str(), partial.ttl), ("p", None));
    }
    assert_eq!(calls.count(), 2, "an uncached answer is loaded again");
    cache.wait_for_background_fills().await;
    assert!(fx.l2.get("test:partial").await.unwrap().is_none());
    // A TTL out of range is served, not cached.
    let zero = cache
        .get_or_load_with("zero", &options, || async {
            Ok::<_, std::io::Error>(Loaded::new("z".to_owned()).with_ttl(Duration::ZERO))
        })
        .await
        .unwrap();
    assert_eq!((zero.value.as_str(), zero.ttl), ("z", None));
    assert_eq!(cache.get("zero").await.unwrap(), None);
}

#[tokio::test]
async fn provenance_names_the_tier_that_answered() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = cache.default_options().with_ttl(TTL);
    let loaded = fetch(&cache, &options, loader(&calls, "v")).await.unwrap();
    cache.wait_for_background_fills().await;
    fx.clock.advance(Duration::from_secs(4));
    let from_l1 = fetch(&cache, &options, loader(&calls, "x")).await.unwrap();
    let from_l2 = fetch(&fx.cache(), &options, loader(&calls, "x"))
        .await
        .unwrap();
    let sources = [loaded.source, from_l1.source, from_l2.source];
    assert_eq!(sources, [Source::Loader, Source::L1, Source::L2]);
    assert!(!(loaded.stale || from_l1.stale || from_l2.stale));
    // The remaining TTL (10 s less the 4 s that passed), from each tier's own entry.
    let remaining = Some(Duration::from_secs(6));
    assert_eq!(
        [loaded.ttl, from_l1.ttl, from_l2.ttl],
        [Some(TTL), remaining, remaining]
    );
    assert_eq!(calls.count(), 1);
}

#[tokio::test]
async fn a_stale_answer_has_no_remaining_ttl() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    let stale = fetch(&cache, &fail_safe(), failing(&calls)).await.unwrap();
    assert_eq!((stale.stale, stale.ttl), (true, None));
    // The re-armed copy answers the next call, stale too.
    let again = fetch(&cache, &fail_safe(), failing(&calls)).await.unwrap();
    assert_eq!(
        (again.source, again.stale, again.ttl),
        (Source::L1, true, None)
    );
    assert_eq!(calls.count(), 2);
}

#[tokio::test]
async fn options_out_of_range_are_refused() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    for options in [
        EntryOptions::default().with_ttl(Duration::ZERO),
        EntryOptions::default().with_jitter(2.0),
        EntryOptions::default().with_hard_timeout(Duration::ZERO),
        EntryOptions::default().with_fail_safe(FailSafe::new(Duration::ZERO)),
        EntryOptions::default().with_soft_timeout(Duration::ZERO),
        EntryOptions::default().with_eager_refresh(1.0),
        EntryOptions::default().with_eager_refresh(0.0),
    ] {
        let error = fetch(&cache, &options, loader(&calls, "v"))
            .await
            .unwrap_err();
        assert!(matches!(error, LoadError::Cache(_)), "{error}");
    }
    assert_eq!(calls.count(), 0);
    assert!(
        fx.builder("test")
            .default_options(EntryOptions::default().with_jitter(-1.0))
            .build()
            .is_err()
    );
}

#[tokio::test]
async fn the_builder_defaults_apply_to_plain_calls() {
    let fx = Fixture::new();
    let cache = fx
        .builder("test")
        .default_options(fail_safe())
        .build()
        .unwrap();
    let calls = Calls::default();
    cache.get_or_load("k", loader(&calls, "v1")).await.unwrap();
    fx.clock.advance(TTL);
    // get_or_load answers the value only: a stale one after a failure too.
    assert_eq!(cache.get_or_load("k", failing(&calls)).await.unwrap(), "v1");
    assert_eq!(cache.stats().stale_served, 1);
    // `set` writes fail-safe entries with the defaults too.
    cache.set("s", "w".into()).await.unwrap();
    fx.clock.advance(TTL);
    let stale = cache
        .get_or_load_with("s", &cache.default_options(), failing(&calls))
        .await
        .unwrap();
    assert_eq!((stale.value.as_str(), stale.stale), ("w", true));
}

#[tokio::test(start_paused = true)]
async fn events_tell_what_happened() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let mut events = cache.events();
    let calls = Calls::default();
    let options = fail_safe()
        .with_soft_timeout(Duration::from_millis(20))
        .with_eager_refresh(0.5);
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    tokio::task::yield_now().await;
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    cache.wait_for_background_fills().await;
    fx.cache().get("k").await.unwrap();
    fx.clock.advance(Duration::from_secs(6));
    fetch(&cache, &options, failing(&calls)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await; // paused clock
    // Not refreshed early again after a failure.
    let still = fetch(&cache, &options, failing(&calls)).await.unwrap();
    assert_eq!((still.source, still.stale), (Source::L1, false));
    fx.clock.advance(TTL);
    fetch(&cache, &options, failing(&calls)).await.unwrap();
    let (done, slow_done) = (Calls::default(), Calls::default());
    cache
        .get_or_load_with(
            "slow",
            &options,
            slow(&done, &slow_done, Duration::from_secs(1), "s"),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(event) = events.try_recv() {
        seen.push(event);
    }
    let key = |k: &str| -> std::sync::Arc<str> { k.into() };
    let expected = [
        CacheEvent::Miss { key: key("k") },
        CacheEvent::BackgroundLoad {
            key: key("k"),
            ok: true,
        },
        CacheEvent::Hit {
            key: key("k"),
            tier: Source::L1,
        },
        // Past half the TTL: a hit, and a refresh whose loader fails (the value stays).
        CacheEvent::Hit {
            key: key("k"),
            tier: Source::L1,
        },
        CacheEvent::EagerRefresh { key: key("k") },
        CacheEvent::Miss { key: key("k") },
        CacheEvent::BackgroundLoad {
            key: key("k"),
            ok: false,
        },
        CacheEvent::Hit {
            key: key("k"),
            tier: Source::L1,
        },
        // Past the TTL: the loader fails, fail-safe answers.
        CacheEvent::Miss { key: key("k") },
        CacheEvent::StaleServed {
            key: key("k"),
            reason: StaleReason::LoaderFailed,
        },
        CacheEvent::BackgroundLoad {
            key: key("k"),
            ok: false,
        },
        CacheEvent::Miss { key: key("slow") },
        CacheEvent::BackgroundLoad {
            key: key("slow"),
            ok: true,
        },
    ];
    assert_eq!(seen, expected);
    // The other instance's L2 hit went to its own subscribers, not to these.
    drop(events);
    fetch(&cache, &options, failing(&calls)).await.unwrap();
}

#[tokio::test]
async fn options_can_skip_a_tier_on_read_or_write() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let skip = |skips: Skips| EntryOptions::default().with_ttl(TTL).with_skips(skips);
    // No L2 write: the value stays in this instance.
    let local = skip(Skips {
        l2_write: true,
        ..Skips::default()
    });
    fetch(&cache, &local, loader(&calls, "mine")).await.unwrap();
    cache.wait_for_background_fills().await;
    assert!(!fx.holds("test:k").await);
    assert_eq!(cache.get("k").await.unwrap(), Some("mine".into()));
    // No L1 read: L2's newer value answers although L1 holds one.
    cache.set("n", "old".into()).await.unwrap();
    let raw = fx.cache();
    raw.set_with(
        "n",
        "new".into(),
        &skip(Skips {
            backplane: true,
            ..Skips::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(cache.get("n").await.unwrap(), Some("old".into()));
    let from_l2 = cache
        .get_or_load_with(
            "n",
            &skip(Skips {
                l1_read: true,
                ..Skips::default()
            }),
            failing(&calls),
        )
        .await
        .unwrap();
    assert_eq!(
        (from_l2.value.as_str(), from_l2.source),
        ("new", Source::L2)
    );
    // No L1 write: the next read goes to L2 again.
    let no_l1 = skip(Skips {
        l1_write: true,
        ..Skips::default()
    });
    let fresh = fx.cache();
    let loaded = fresh
        .get_or_load_with("x", &no_l1, loader(&calls, "x"))
        .await
        .unwrap();
    assert_eq!(loaded.source, Source::Loader);
    fresh.wait_for_background_fills().await;
    let again = fresh
        .get_or_load_with("x", &no_l1, failing(&calls))
        .await
        .unwrap();
    assert_eq!(again.source, Source::L2);
    // No L2 read: the loader answers although L2 holds a value, which it does not replace.
    let no_l2_read = skip(Skips {
        l2_read: true,
        ..Skips::default()
    });
    let loaded = fx
        .cache()
        .get_or_load_with("x", &no_l2_read, loader(&calls, "y"))
        .await
        .unwrap();
    assert_eq!(
        (loaded.value.as_str(), loaded.source),
        ("y", Source::Loader)
    );
    assert_eq!(fx.cache().get("x").await.unwrap(), Some("x".into()));
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_touches_take_options_too() {
    let fx = Fixture::new();
    let bus = tierstack::core::testkit::MemoryBus::new();
    let instance = || on_bus(&fx, &bus);
    let (a, b) = (instance(), instance());
    let skip = |skips: Skips| EntryOptions::default().with_ttl(TTL).with_skips(skips);
    let keys = ["k", "local", "p:1", "p:2", "t"];
    for key in keys {
        a.set(key, "v".into()).await.unwrap();
    }
    assert_eq!(heard(&b, 5).await, 5);
    for key in keys {
        assert_eq!(b.get(key).await.unwrap(), Some("v".into()));
    }
    // Skipping the backplane: L2 is changed, the other instance is not told...
    let quiet = skip(Skips {
        backplane: true,
        ..Skips::default()
    });
    assert!(a.delete_with("k", &quiet).await.unwrap());
    assert!(!fx.holds("test:k").await);
    // ...which a plain delete after it shows: the one invalidation B hears is that one's.
    assert!(a.delete("t").await.unwrap());
    assert_eq!(heard(&b, 6).await, 6);
    assert_eq!(
        b.get("k").await.unwrap(),
        Some("v".into()),
        "B was not told"
    );
    // Skipping L2 writes: this instance's L1 copy only.
    let local = skip(Skips {
        l2_write: true,
        ..Skips::default()
    });
    assert!(a.delete_with("local", &local).await.unwrap());
    assert!(fx.holds("test:local").await);
    assert_eq!(a.get("local").await.unwrap(), Some("v".into()));
    assert_eq!(a.delete_prefix_with("p:", &local).await.unwrap(), 0);
    assert!(fx.holds("test:p:1").await && fx.holds("test:p:2").await);
    let l1_reads = a.stats().l1_hits;
    assert_eq!(a.get("p:1").await.unwrap(), Some("v".into()));
    assert_eq!(a.stats().l1_hits, l1_reads, "read again from L2");
    // A local touch extends L1's copy only: past L2's TTL, only this instance still has it.
    let longer = local.with_ttl(Duration::from_mins(2));
    assert!(a.touch_with("local", &longer).await.unwrap());
    assert!(!a.touch_with("never", &longer).await.unwrap());
    fx.clock.advance(Duration::from_secs(61));
    assert!(!fx.holds("test:local").await);
    assert_eq!(a.get("local").await.unwrap(), Some("v".into()));
    assert_eq!(instance().get("local").await.unwrap(), None);
    // And with options out of range, nothing is touched.
    assert!(
        a.touch_with("local", &EntryOptions::default().with_ttl(Duration::ZERO))
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn a_written_value_is_refreshed_early_cycle_after_cycle() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let (calls, done) = (Calls::default(), Calls::default());
    let options = EntryOptions::default()
        .with_ttl(TTL)
        .with_eager_refresh(0.5);
    cache.set_with("k", "v1".into(), &options).await.unwrap();
    fx.clock.advance(Duration::from_secs(6));
    let hit = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_millis(50), "v2"),
        )
        .await
        .unwrap();
    assert_eq!(hit.source, Source::L1);
    until(|| calls.count() == 1).await;
    tokio::time::sleep(Duration::from_millis(60)).await; // paused clock
    assert_eq!(done.count(), 1);
    fx.clock.advance(Duration::from_secs(5));
    let hit = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_millis(50), "v3"),
        )
        .await
        .unwrap();
    assert_eq!((hit.value.as_str(), hit.source), ("v2", Source::L1));
    fx.clock.advance(Duration::from_millis(200));
    let hit = cache
        .get_or_load_with(
            "k",
            &options,
            slow(&calls, &done, Duration::from_millis(50), "v3"),
        )
        .await
        .unwrap();
    assert_eq!((hit.value.as_str(), hit.source), ("v2", Source::L1));
    until(|| calls.count() == 2).await;
}

#[tokio::test(start_paused = true)]
async fn a_caller_with_fail_safe_gets_stale_from_a_flight_without_it() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let (calls, done) = (Calls::default(), Calls::default());
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    let plain = EntryOptions::default().with_ttl(TTL);
    let failing_slowly = {
        let calls = calls.clone();
        move || async move {
            calls.hit();
            tokio::time::sleep(Duration::from_millis(50)).await; // paused clock
            Err::<String, _>(std::io::Error::other("origin down"))
        }
    };
    let without = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_load_with("k", &plain, failing_slowly).await })
    };
    // The flight without fail-safe is running.
    until(|| calls.count() == 2).await;
    // Joins the running flight (one origin call), and answers its stale value when it fails.
    let with = cache
        .get_or_load_with("k", &fail_safe(), slow(&calls, &done, Duration::ZERO, "x"))
        .await
        .unwrap();
    assert_eq!((with.value.as_str(), with.stale), ("v1", true));
    assert!(without.await.unwrap().is_err(), "no fail-safe: the error");
    assert_eq!(calls.count(), 2, "one load for both");
}

#[tokio::test]
async fn a_delete_on_another_instance_takes_the_stale_copy_with_it() {
    let fx = Fixture::new();
    let (a, b) = (fx.cache(), fx.cache());
    let calls = Calls::default();
    fetch(&a, &fail_safe(), loader(&calls, "v1")).await.unwrap();
    a.wait_for_background_fills().await;
    // No backplane: A's L1 keeps its copy, but L2 holds B's tombstone.
    assert!(b.delete("k").await.unwrap());
    fx.clock.advance(TTL);
    let error = fetch(&a, &fail_safe(), failing(&calls)).await.unwrap_err();
    assert!(error.loader_error().is_some(), "{error}");
}

#[tokio::test(start_paused = true)]
async fn an_eager_refresh_that_caches_nothing_is_not_repeated() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = EntryOptions::default()
        .with_ttl(TTL)
        .with_eager_refresh(0.5);
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    fx.clock.advance(Duration::from_secs(6));
    for _ in 0..10 {
        let calls = calls.clone();
        let hit = cache
            .get_or_load_with("k", &options, move || {
                calls.hit();
                async { Ok::<_, std::io::Error>(Loaded::new("mine".to_owned()).uncached()) }
            })
            .await
            .unwrap();
        assert_eq!(hit.value, "v1");
        tokio::task::yield_now().await;
    }
    assert_eq!(calls.count(), 2, "one refresh, which cached nothing");
}

#[tokio::test]
async fn touch_does_not_make_a_stale_value_fresh() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    cache.wait_for_background_fills().await;
    fx.clock.advance(TTL);
    assert!(cache.touch("k", Duration::from_secs(600)).await.unwrap());
    let stale = fetch(&cache, &fail_safe(), failing(&calls)).await.unwrap();
    assert_eq!((stale.value.as_str(), stale.stale), ("v1", true));
}

/// A cache with a backplane that loaded `k` = `v1` with fail-safe.
async fn loaded_v1_with_a_backplane() -> (
    Fixture,
    tierstack::core::testkit::MemoryBus,
    TieredCache<String>,
    Calls,
) {
    let fx = Fixture::new();
    let bus = tierstack::core::testkit::MemoryBus::new();
    let cache = fx
        .builder("test")
        .backplane(std::sync::Arc::new(bus.backplane()))
        .l2_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let calls = Calls::default();
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    cache.wait_for_background_fills().await;
    (fx, bus, cache, calls)
}

/// Loses every subscription of `bus` and waits until `cache` has heard of it.
async fn lose_and_hear(bus: &tierstack::core::testkit::MemoryBus, cache: &TieredCache<String>) {
    bus.lose_all();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache.stats().resyncs == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "never heard of the loss"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
}

/// A cache with a backplane that loaded `k` = `v1` with fail-safe, then lost its subscription
/// (the Redis of both L2 and the backplane went away), and has heard of the loss.
async fn deaf_after_loading_v1() -> (
    Fixture,
    tierstack::core::testkit::MemoryBus,
    TieredCache<String>,
    Calls,
) {
    let (fx, bus, cache, calls) = loaded_v1_with_a_backplane().await;
    lose_and_hear(&bus, &cache).await;
    (fx, bus, cache, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_instance_still_falls_back_on_its_stale_copy_when_l2_and_the_origin_fail() {
    let (fx, _bus, cache, calls) = deaf_after_loading_v1().await;
    fx.faulty.set_failing(true);
    // Deaf, L1 serves nothing as fresh...
    assert_eq!(cache.get("k").await.unwrap(), None);
    fx.clock.advance(TTL);
    // ...but fail-safe falls back on it, and the throttle holds while deaf.
    for _ in 0..5 {
        let stale = fetch(&cache, &fail_safe(), failing(&calls)).await.unwrap();
        assert_eq!(
            (stale.value.as_str(), stale.source, stale.stale),
            ("v1", Source::L1, true)
        );
    }
    assert_eq!(calls.count(), 2, "one attempt in the throttle window");
}

/// The loss is heard while a load is in flight (the Redis of L2 and of the backplane dies under
/// it): the stale copy that the failed load re-arms stays, and answers the next failed load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_heard_during_a_failing_load_keeps_the_stale_copy_it_rearms() {
    let (fx, bus, cache, calls) = loaded_v1_with_a_backplane().await;
    fx.clock.advance(TTL);
    fx.faulty.set_failing(true);
    let hearing = cache.clone();
    let lose_then_fail = || async move {
        lose_and_hear(&bus, &hearing).await;
        Err::<String, _>(std::io::Error::other("origin down"))
    };
    let first = cache
        .get_or_load_with("k", &fail_safe(), lose_then_fail)
        .await
        .unwrap();
    assert_eq!((first.value.as_str(), first.stale), ("v1", true));
    // Within the throttle, the re-armed copy answers without a call; after it, the origin is
    // tried again and, failing, the copy answers once more.
    for advance in [Duration::ZERO, THROTTLE] {
        fx.clock.advance(advance);
        let stale = fetch(&cache, &fail_safe(), failing(&calls)).await.unwrap();
        assert_eq!((stale.value.as_str(), stale.stale), ("v1", true));
    }
    assert_eq!(
        calls.count(),
        2,
        "the first load, then one attempt after the throttle"
    );
}

#[tokio::test]
async fn the_optional_read_through_takes_options_too() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = fail_safe().with_negative_ttl(Duration::from_secs(5));
    let absent = |calls: &Calls| {
        let calls = calls.clone();
        move || {
            calls.hit();
            std::future::ready(Ok::<Option<String>, std::io::Error>(None))
        }
    };
    for _ in 0..3 {
        let none = cache
            .get_or_load_optional_with("gone", &options, absent(&calls))
            .await
            .unwrap();
        assert_eq!(none, None);
    }
    assert_eq!(calls.count(), 1, "the negative answer is cached");
    let present = {
        let calls = calls.clone();
        move || {
            calls.hit();
            std::future::ready(Ok::<_, std::io::Error>(Some("v1".to_owned())))
        }
    };
    let found = cache
        .get_or_load_optional_with("k", &options, present)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((found.value.as_str(), found.source), ("v1", Source::Loader));
    fx.clock.advance(TTL);
    let failing_optional = {
        let calls = calls.clone();
        move || {
            calls.hit();
            std::future::ready(Err::<Option<String>, _>(std::io::Error::other("down")))
        }
    };
    let stale = cache
        .get_or_load_optional_with("k", &options, failing_optional)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stale.value.as_str(), stale.stale), ("v1", true));
}

#[tokio::test(start_paused = true)]
async fn the_batch_read_through_takes_options_too() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let keys = ["a", "b"];
    let batch = |value: &'static str| {
        move |missing: Vec<String>| async move {
            Ok::<_, std::io::Error>(
                missing
                    .into_iter()
                    .map(|key| (key, value.to_owned()))
                    .collect::<std::collections::HashMap<_, _>>(),
            )
        }
    };
    let options = EntryOptions::default().with_ttl(Duration::from_secs(42));
    let values = cache
        .get_or_load_many_with(&keys, &options, batch("v"))
        .await
        .unwrap();
    assert_eq!(values, vec![Some("v".to_owned()), Some("v".to_owned())]);
    assert_eq!(
        fx.l2.ttl("test:a").await.unwrap(),
        Some(Duration::from_secs(42))
    );
    // Skipping L2 writes keeps the batch in this instance.
    let local = EntryOptions::default().with_skips(Skips {
        l2_write: true,
        ..Skips::default()
    });
    cache
        .get_or_load_many_with(&["c"], &local, batch("c"))
        .await
        .unwrap();
    assert!(!fx.holds("test:c").await);
    // The hard timeout cancels the batch loader.
    let limit = Duration::from_millis(100);
    let hanging = |_: Vec<String>| async {
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(std::collections::HashMap::<String, String>::new())
    };
    let error = cache
        .get_or_load_many_with(&["d"], &options.with_hard_timeout(limit), hanging)
        .await
        .unwrap_err();
    assert!(
        matches!(error, LoadError::TimedOut { after } if after == limit),
        "{error}"
    );
}

/// A batch loader answering `value` for every key, counting its calls.
fn batch_of(
    calls: &Calls,
    value: &'static str,
) -> impl FnOnce(Vec<String>) -> std::future::Ready<Result<HashMap<String, String>, std::io::Error>>
{
    let calls = calls.clone();
    move |missing| {
        calls.hit();
        std::future::ready(Ok(missing
            .into_iter()
            .map(|key| (key, value.to_owned()))
            .collect()))
    }
}

fn failing_batch(
    calls: &Calls,
) -> impl FnOnce(Vec<String>) -> std::future::Ready<Result<HashMap<String, String>, std::io::Error>>
{
    let calls = calls.clone();
    move |_| {
        calls.hit();
        std::future::ready(Err(std::io::Error::other("origin down")))
    }
}

#[tokio::test]
async fn a_failed_batch_answers_stale_values_with_fail_safe() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let options = fail_safe();
    let some = |v: &str| Some(v.to_owned());
    cache
        .get_or_load_many_with(&["a", "b"], &options, batch_of(&calls, "v1"))
        .await
        .unwrap();
    cache.wait_for_background_fills().await;
    fx.clock.advance(TTL);
    // `a` stale in L1 and L2; `b` stale in L2 only (another instance's view).
    cache.invalidate_local("b");
    let stale = cache
        .get_or_load_many_with(&["a", "b", "a"], &options, failing_batch(&calls))
        .await
        .unwrap();
    assert_eq!(stale, vec![some("v1"), some("v1"), some("v1")]);
    assert_eq!((calls.count(), cache.stats().stale_served), (2, 2));
    // Re-armed for the throttle: the next batch answers without calling the origin...
    let again = cache
        .get_or_load_many_with(&["a", "b"], &options, failing_batch(&calls))
        .await
        .unwrap();
    assert_eq!(again, vec![some("v1"), some("v1")]);
    assert_eq!(calls.count(), 2);
    // ...but plain reads and calls without fail-safe do not take a stale value.
    assert_eq!(cache.get_many(&["a", "b"]).await.unwrap(), vec![None, None]);
    let plain = EntryOptions::default().with_ttl(TTL);
    assert!(
        cache
            .get_or_load_many_with(&["a"], &plain, failing_batch(&calls))
            .await
            .is_err()
    );
    // A key with no stale value: the batch's error stands.
    let error = cache
        .get_or_load_many_with(&["a", "new"], &options, failing_batch(&calls))
        .await
        .unwrap_err();
    assert!(error.loader_error().is_some(), "{error}");
}

#[tokio::test]
async fn a_batch_falls_back_on_no_copy_that_another_instance_deleted() {
    let fx = Fixture::new();
    let (a, b) = (fx.cache(), fx.cache());
    let calls = Calls::default();
    a.get_or_load_many_with(&["k"], &fail_safe(), batch_of(&calls, "v1"))
        .await
        .unwrap();
    // No backplane: A's L1 keeps its copy, but L2 holds B's tombstone.
    assert!(b.delete("k").await.unwrap());
    fx.clock.advance(TTL);
    let error = a
        .get_or_load_many_with(&["k"], &fail_safe(), failing_batch(&calls))
        .await
        .unwrap_err();
    assert!(error.loader_error().is_some(), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_keeps_no_fallback_in_l1_past_an_invalidation_during_its_read() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    cache
        .get_or_load_many_with(&["k"], &fail_safe(), batch_of(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    // The batch's L2 read takes 100 ms; this instance's copy is evicted meanwhile.
    fx.faulty.set_delay(Duration::from_millis(100));
    let batch = {
        let (cache, calls) = (cache.clone(), calls.clone());
        tokio::spawn(async move {
            cache
                .get_or_load_many_with(&["k"], &fail_safe(), failing_batch(&calls))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await; // paused clock
    cache.invalidate_local("k");
    let stale = batch.await.unwrap().unwrap();
    assert_eq!(stale, vec![Some("v1".to_owned())]);
    assert_eq!(calls.count(), 2);
    // The stale value was not re-armed in L1 over the eviction: the next call tries the
    // origin again (and falls back on L2's copy).
    fx.faulty.set_delay(Duration::ZERO);
    cache
        .get_or_load_many_with(&["k"], &fail_safe(), failing_batch(&calls))
        .await
        .unwrap();
    assert_eq!(calls.count(), 3);
}

#[tokio::test]
async fn a_call_without_fail_safe_does_not_take_a_re_armed_stale_value() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    assert!(
        fetch(&cache, &fail_safe(), failing(&calls))
            .await
            .unwrap()
            .stale
    );
    // Re-armed in L1 for the throttle; a call without fail-safe loads all the same.
    let plain = EntryOptions::default().with_ttl(TTL);
    let fresh = fetch(&cache, &plain, loader(&calls, "v2")).await.unwrap();
    assert_eq!(
        (fresh.value.as_str(), fresh.source, fresh.stale),
        ("v2", Source::Loader, false)
    );
    assert_eq!(calls.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn callers_without_fail_safe_do_not_take_the_stale_answer_of_a_shared_flight() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let (calls, done) = (Calls::default(), Calls::default());
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    let failing_slowly = {
        let calls = calls.clone();
        move || async move {
            calls.hit();
            tokio::time::sleep(Duration::from_millis(50)).await; // paused clock
            Err::<String, _>(std::io::Error::other("origin down"))
        }
    };
    let with = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load_with("k", &fail_safe(), failing_slowly)
                .await
        })
    };
    until(|| calls.count() == 2).await;
    // Two callers without fail-safe join the failing flight: one inline, one in a task.
    let inline = {
        let cache = cache.clone();
        let load = slow(&calls, &done, Duration::from_millis(10), "v2");
        tokio::spawn(async move { cache.get_or_load("k", load).await })
    };
    let plain = EntryOptions::default().with_ttl(TTL);
    let spawned = {
        let cache = cache.clone();
        let load = slow(&calls, &done, Duration::from_millis(10), "v3");
        tokio::spawn(async move { cache.get_or_load_with("k", &plain, load).await })
    };
    let with = with.await.unwrap().unwrap();
    assert_eq!((with.value.as_str(), with.stale), ("v1", true));
    let inline = inline.await.unwrap().unwrap();
    let spawned = spawned.await.unwrap().unwrap();
    assert!(inline == "v2" || inline == "v3", "{inline}");
    assert!(!spawned.stale && spawned.value != "v1", "{spawned:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_skips_the_backplane_still_tells_the_others_when_its_outcome_is_unknown() {
    let fx = Fixture::new();
    let bus = tierstack::core::testkit::MemoryBus::new();
    let (a, b) = (on_bus(&fx, &bus), on_bus(&fx, &bus));
    let quiet = EntryOptions::default().with_skips(Skips {
        backplane: true,
        ..Skips::default()
    });
    fx.faulty.set_failing(true);
    assert!(a.delete_with("k", &quiet).await.is_err());
    heard(&b, 1).await;
}

/// An instance of the fixture's cache whose backplane is on `bus`.
fn on_bus(fx: &Fixture, bus: &tierstack::core::testkit::MemoryBus) -> TieredCache<String> {
    fx.builder("test")
        .backplane(std::sync::Arc::new(bus.backplane()))
        .build()
        .unwrap()
}

/// Waits (up to 5 s) until `cache` has received `count` invalidations; how many it has.
async fn heard(cache: &TieredCache<String>, count: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache.stats().invalidations_received < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{count} invalidations never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
    cache.stats().invalidations_received
}

#[tokio::test]
async fn a_batch_can_skip_reading_a_tier() {
    let fx = Fixture::new();
    let cache = fx.cache();
    let calls = Calls::default();
    let some = |v: &str| Some(v.to_owned());
    cache.set("a", "old".into()).await.unwrap();
    // Another instance writes L2 without telling this one.
    let quiet = EntryOptions::default().with_skips(Skips {
        backplane: true,
        ..Skips::default()
    });
    fx.cache()
        .set_with("a", "new".into(), &quiet)
        .await
        .unwrap();
    let skip = |skips: Skips| EntryOptions::default().with_ttl(TTL).with_skips(skips);
    let no_l1 = skip(Skips {
        l1_read: true,
        ..Skips::default()
    });
    let read = cache
        .get_or_load_many_with(&["a"], &no_l1, failing_batch(&calls))
        .await
        .unwrap();
    assert_eq!(read, vec![some("new")]);
    let no_l2 = skip(Skips {
        l1_read: true,
        l2_read: true,
        ..Skips::default()
    });
    let loaded = cache
        .get_or_load_many_with(&["a"], &no_l2, batch_of(&calls, "loaded"))
        .await
        .unwrap();
    assert_eq!(loaded, vec![some("loaded")]);
    assert_eq!(
        calls.count(),
        1,
        "the failing batch was never called; this one was"
    );
}

#[tokio::test]
async fn a_batch_read_does_not_serve_a_value_re_armed_stale_in_l2() {
    let fx = Fixture::new();
    let cache = fx.builder("test").without_l1().build().unwrap();
    let calls = Calls::default();
    fetch(&cache, &fail_safe(), loader(&calls, "v1"))
        .await
        .unwrap();
    fx.clock.advance(TTL);
    assert!(
        fetch(&cache, &fail_safe(), failing(&calls))
            .await
            .unwrap()
            .stale
    );
    // Re-armed in L2, the value answers read-through calls with fail-safe only.
    assert_eq!(cache.get_many(&["k"]).await.unwrap(), vec![None]);
    assert_eq!(cache.get("k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_deaf_leaves_no_older_copy_to_fall_back_on() {
    let (fx, _bus, cache, calls) = deaf_after_loading_v1().await;
    cache
        .set_with("k", "v2".into(), &fail_safe())
        .await
        .unwrap();
    fx.faulty.set_failing(true);
    fx.clock.advance(TTL);
    // L2 and the origin fail: nothing older than the instance's own write may answer.
    let answer = fetch(&cache, &fail_safe(), failing(&calls)).await;
    assert!(
        answer.as_ref().map_or(true, |f| f.value != "v1"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_plain_read_may_return_an_l2_failure_instead_of_a_miss() {
    let fx = Fixture::new();
    let cache = fx.cache();
    cache.set("cached", "v".into()).await.unwrap();
    fx.faulty.set_failing(true);
    let strict = cache.default_options().with_l2_errors_returned(true);
    assert!(cache.get_with("k", &strict).await.is_err());
    assert_eq!(
        cache.get_with("k", &cache.default_options()).await.unwrap(),
        None,
        "by default a failure reads as a miss"
    );
    assert_eq!(
        cache.get_with("cached", &strict).await.unwrap().as_deref(),
        Some("v"),
        "L1 answers without asking the L2"
    );
}

/// A manual clock whose next reading, once armed, stops the thread that reads it until the
/// test lets it go: a task preempted at a chosen point. It calls itself the system clock so
/// that L1 reads do not read it (its time moves by hand, far from any real deadline).
#[derive(Debug)]
struct PausingClock {
    time: ManualClock,
    armed: AtomicBool,
    reached: Notify,
    resume: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Clock for PausingClock {
    fn now(&self) -> Timestamp {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            let _ = self.resume.lock().unwrap().recv();
        }
        self.time.now()
    }

    fn is_system_clock(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_between_a_hit_and_its_eager_refresh_is_not_undone() {
    let fx = Fixture::new();
    let (resume, paused) = std::sync::mpsc::channel();
    let clock = Arc::new(PausingClock {
        time: fx.clock.clone(),
        armed: AtomicBool::new(false),
        reached: Notify::new(),
        resume: Mutex::new(paused),
    });
    let cache = Arc::new(fx.builder("test").clock(clock.clone()).build().unwrap());
    let calls = Calls::default();
    let options = EntryOptions::default()
        .with_ttl(TTL)
        .with_eager_refresh(0.5);
    fetch(&cache, &options, loader(&calls, "v1")).await.unwrap();
    fx.clock.advance(Duration::from_secs(6));

    // The hit reads v1 from L1, due for a refresh, and stops at its clock reading; the key is
    // deleted meanwhile.
    clock.armed.store(true, Ordering::SeqCst);
    let hit = tokio::spawn({
        let (cache, options, calls) = (cache.clone(), options, calls.clone());
        async move { fetch(&cache, &options, failing(&calls)).await }
    });
    clock.reached.notified().await;
    assert!(cache.delete("k").await.unwrap());
    resume.send(()).unwrap();
    assert_eq!(
        hit.await.unwrap().unwrap().value,
        "v1",
        "read before the delete"
    );

    let after = fetch(&cache, &options, loader(&calls, "v2")).await.unwrap();
    assert_eq!(
        (after.value.as_str(), after.source),
        ("v2", Source::Loader),
        "the hit's refresh put the deleted value back in L1"
    );
}
