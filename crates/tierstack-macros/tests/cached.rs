//! `#[cached]` end to end on real caches: loads once, single-flight, errors not cached,
//! invalidation, methods borrowing `self`, per-call TTL and options.
#![allow(clippy::unwrap_used)]

use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::{EntryOptions, LoadError, TieredCache};
use tierstack_macros::cached;

fn cache(namespace: &str) -> TieredCache<String> {
    TieredCache::builder(namespace).build().unwrap()
}

static PROFILES: LazyLock<TieredCache<String>> = LazyLock::new(|| cache("profiles"));
static PROFILE_LOADS: AtomicUsize = AtomicUsize::new(0);

/// The profile of a user.
#[cached(cache = PROFILES, key = "user:{id}")]
async fn profile(id: u64) -> Result<String, std::io::Error> {
    PROFILE_LOADS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("profile of {id}"))
}

static ACCOUNTS: LazyLock<TieredCache<String>> = LazyLock::new(|| cache("accounts"));
static ACCOUNT_LOADS: AtomicUsize = AtomicUsize::new(0);

#[cached(cache = ACCOUNTS, key = "account:{id}")]
async fn account(id: u64) -> Result<String, std::io::Error> {
    ACCOUNT_LOADS.fetch_add(1, Ordering::SeqCst);
    if id == 0 {
        return Err(std::io::Error::other("no account 0"));
    }
    Ok(format!("account {id}"))
}

#[tokio::test]
async fn a_call_loads_once_and_invalidation_loads_again() {
    assert_eq!(profile(7).await.unwrap(), "profile of 7");
    assert_eq!(profile(7).await.unwrap(), "profile of 7");
    assert_eq!(
        PROFILES.get("user:7").await.unwrap(),
        Some("profile of 7".into())
    );
    assert_eq!(PROFILE_LOADS.load(Ordering::SeqCst), 1);
    assert!(invalidate_profile(7).await.unwrap());
    assert!(!invalidate_profile(7).await.unwrap(), "nothing left");
    assert_eq!(profile(7).await.unwrap(), "profile of 7");
    assert_eq!(PROFILE_LOADS.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_error_reaches_the_caller_and_is_not_cached() {
    for _ in 0..2 {
        match account(0).await {
            Err(LoadError::Loader(error)) => assert_eq!(error.to_string(), "no account 0"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ACCOUNT_LOADS.load(Ordering::SeqCst), 2);
    assert_eq!(ACCOUNTS.get("account:0").await.unwrap(), None);
}

static SLOW: LazyLock<TieredCache<String>> = LazyLock::new(|| cache("slow"));
static SLOW_LOADS: AtomicUsize = AtomicUsize::new(0);

#[cached(cache = SLOW, key = "report:{day}")]
async fn report(day: u32) -> String {
    SLOW_LOADS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await; // paused clock
    format!("report of day {day}")
}

#[tokio::test(start_paused = true)]
async fn concurrent_calls_share_one_load() {
    let calls = (0..100).map(|_| report(3));
    let answers = futures_util::future::join_all(calls).await;
    assert!(
        answers
            .iter()
            .all(|answer| answer.as_deref().ok() == Some("report of day 3"))
    );
    assert_eq!(SLOW_LOADS.load(Ordering::SeqCst), 1);
}

static PRICES: LazyLock<TieredCache<u64>> = LazyLock::new(|| {
    TieredCache::builder("prices")
        .build()
        .expect("a valid configuration")
});

/// The example of `docs/getting-started.md`, section 13.
#[cached(cache = PRICES, key = "price:{sku}", ttl = "30s")]
async fn price(sku: &str) -> Result<u64, std::io::Error> {
    Ok(sku.len() as u64 * 100) // the pricing service, on a miss
}

#[tokio::test]
async fn the_getting_started_example_runs() {
    assert_eq!(price("abc").await.unwrap(), 300);
    assert!(invalidate_price("abc").await.unwrap());
    assert!(PRICES.get("price:abc").await.unwrap().is_none());
}

struct Directory {
    cache: TieredCache<String>,
    loads: AtomicUsize,
}

impl Directory {
    /// A method: the cache is the instance's, the body borrows `self` and a `&str`.
    #[cached(cache = self.cache, key = "search:{query:?}:{page}", ttl = "5m")]
    async fn search(&self, query: &str, page: u32) -> Result<String, std::io::Error> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(format!("{query} page {page}"))
    }

    #[cached(
        cache = self.cache,
        key = "slow:{id}",
        options = EntryOptions::default().with_hard_timeout(Duration::from_millis(100)),
        invalidate = forget_slow
    )]
    async fn slow(&self, id: u64) -> Result<String, std::io::Error> {
        tokio::time::sleep(Duration::from_secs(id)).await; // paused clock
        Ok(format!("slow {id}"))
    }
}

#[tokio::test(start_paused = true)]
async fn methods_borrow_self_and_take_a_ttl_and_options() {
    let directory = Directory {
        cache: cache("directory"),
        loads: AtomicUsize::new(0),
    };
    let query = String::from("ada");
    assert_eq!(directory.search(&query, 2).await.unwrap(), "ada page 2");
    assert_eq!(directory.search(&query, 2).await.unwrap(), "ada page 2");
    assert_eq!(directory.loads.load(Ordering::SeqCst), 1);
    let ttl = directory
        .cache
        .ttl("search:%22ada%22:2")
        .await
        .unwrap()
        .unwrap();
    assert!(
        ttl <= Duration::from_secs(300) && ttl > Duration::from_secs(290),
        "{ttl:?}"
    );
    assert!(directory.invalidate_search("ada", 2).await.unwrap());
    assert!(matches!(
        directory.slow(1).await,
        Err(LoadError::TimedOut { .. })
    ));
    assert_eq!(directory.slow(0).await.unwrap(), "slow 0");
    assert!(directory.forget_slow(0).await.unwrap());
}

#[cached(cache = PAIRS, key = "pair:{left}:{right}")]
async fn pair(left: &str, right: &str) -> String {
    format!("{left}|{right}")
}

/// A second function on the same cache, whose template starts as `pair`'s does.
#[cached(cache = PAIRS, key = "pair:{whole}")]
async fn whole(whole: &str) -> String {
    format!("whole {whole}")
}

static PAIRS: LazyLock<TieredCache<String>> = LazyLock::new(|| cache("pairs"));

#[tokio::test]
async fn arguments_that_hold_the_separator_never_share_a_key() {
    assert_eq!(pair("a:b", "c").await.unwrap(), "a:b|c");
    assert_eq!(
        pair("a", "b:c").await.unwrap(),
        "a|b:c",
        "not the entry of (a:b, c)"
    );
    assert_eq!(pair("100%", "x").await.unwrap(), "100%|x");
    assert_eq!(
        PAIRS.get("pair:a%3Ab:c").await.unwrap().as_deref(),
        Some("a:b|c"),
        "the key's own text is kept, the argument's separator escaped"
    );
    // `:` is escaped in every argument, not only between two: one argument cannot pass for
    // two of another template that starts alike.
    assert_eq!(pair("x", "y").await.unwrap(), "x|y");
    assert_eq!(
        whole("x:y").await.unwrap(),
        "whole x:y",
        "not the entry of (x, y)"
    );
    assert!(invalidate_pair("a", "b:c").await.unwrap());
    assert_eq!(PAIRS.get("pair:a:b%3Ac").await.unwrap(), None);
    assert_eq!(
        PAIRS.get("pair:a%3Ab:c").await.unwrap().as_deref(),
        Some("a:b|c")
    );
}

#[cached(cache = FILES, key = "v1/{name}.json")]
async fn file(name: &str) -> String {
    format!("file {name}")
}

/// Reads `v1/x-y.json` too, when its arguments are `x` and `y`.
#[cached(cache = FILES, key = "v1/{stem}-{variant}.json")]
async fn variant(stem: &str, variant: &str) -> String {
    format!("variant {stem} {variant}")
}

#[cached(cache = FILES, key = "user:{id}")]
async fn user(id: &str) -> String {
    format!("user {id}")
}

/// Reads `user:7.json` too, when its argument is `7`.
#[cached(cache = FILES, key = "user:{id}.json")]
async fn user_json(id: u32) -> String {
    format!("user json {id}")
}

static FILES: LazyLock<TieredCache<String>> = LazyLock::new(|| cache("files"));

#[tokio::test]
async fn an_argument_never_passes_for_another_templates_punctuation() {
    assert_eq!(variant("x", "y").await.unwrap(), "variant x y");
    assert_eq!(
        file("x-y").await.unwrap(),
        "file x-y",
        "not the entry of (x, y)"
    );
    assert_eq!(user_json(7).await.unwrap(), "user json 7");
    assert_eq!(
        user("7.json").await.unwrap(),
        "user 7.json",
        "not the entry of 7"
    );
    assert_eq!(
        FILES.get("v1/x%2Dy.json").await.unwrap().as_deref(),
        Some("file x-y"),
        "every ASCII punctuation character of an argument is escaped"
    );
    assert_eq!(
        FILES.get("user:7%2Ejson").await.unwrap().as_deref(),
        Some("user 7.json")
    );
    assert_eq!(
        FILES.get("user:7.json").await.unwrap().as_deref(),
        Some("user json 7")
    );
}
