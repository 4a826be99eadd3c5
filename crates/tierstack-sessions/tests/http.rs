//! The example app end to end, over real HTTP with a cookie-keeping client: two instances
//! behind one Redis share a session and see its logout; expiry; a tampered or unknown cookie
//! gets a fresh anonymous session; concurrent requests of one session.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tierstack_redis::{RedisConfig, RedisStore};
use tierstack_sessions::{TieredSessionStore, cache_builder};

#[path = "../examples/sessions_app.rs"]
mod app;

/// One instance of the app: its own cache (L1, connections, backplane) over the run's Redis,
/// under `prefix`; answers the app's base URL.
async fn instance(prefix: &str, idle: time::Duration) -> String {
    let config = RedisConfig::from_url(&tierstack_test_support::redis::redis_url())
        .unwrap()
        .key_prefix(prefix);
    let (store, backplane) = RedisStore::connect_with_backplane(&config).await.unwrap();
    let cache = cache_builder("sessions")
        .l2(Arc::new(store))
        .backplane(Arc::new(backplane))
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = app::router(TieredSessionStore::new(cache), idle);
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}")
}

fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-sessions-{test}-{nanos}:")
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn text(request: reqwest::RequestBuilder) -> String {
    let response = request.send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_session_and_a_logout_on_one_ends_it_on_both() {
    let prefix = prefix("share");
    let hour = time::Duration::hours(1);
    let (a, b) = (instance(&prefix, hour).await, instance(&prefix, hour).await);
    // One browser: cookies are per host, not per port, so it shows both instances its cookie,
    // as a load balancer in front of them would.
    let browser = browser();
    assert_eq!(
        text(browser.get(format!("{a}/counter"))).await,
        "anonymous: 1"
    );
    assert_eq!(
        text(browser.post(format!("{a}/login?user=ada"))).await,
        "signed in as ada"
    );
    assert_eq!(text(browser.get(format!("{a}/counter"))).await, "ada: 2");
    // `b` never held the session: it reads what `a` wrote. (Back on `a`, its L1 copy would
    // be current only once `b`'s invalidation arrived, within the backplane's delivery time:
    // a logout below waits for that, a counter cannot without counting.)
    assert_eq!(text(browser.get(format!("{b}/counter"))).await, "ada: 3");
    assert_eq!(text(browser.get(format!("{b}/counter"))).await, "ada: 4");
    assert_eq!(
        text(browser.post(format!("{b}/logout"))).await,
        "signed out"
    );
    // The browser dropped its cookie at the logout: a new anonymous session on either.
    assert_eq!(
        text(browser.get(format!("{a}/counter"))).await,
        "anonymous: 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_out_cookie_replayed_on_another_instance_is_refused() {
    let prefix = prefix("replay");
    let hour = time::Duration::hours(1);
    let (a, b) = (instance(&prefix, hour).await, instance(&prefix, hour).await);
    let plain = reqwest::Client::builder().build().unwrap();
    // Sign in and keep the cookie by hand, as an attacker who copied it would.
    let login = plain
        .post(format!("{a}/login?user=ada"))
        .send()
        .await
        .unwrap();
    let cookie = login
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .unwrap()
        .to_owned();
    let with_cookie = |url: String| plain.get(url).header(reqwest::header::COOKIE, &cookie);
    // `b` never held the session: it reads what `a` wrote, and keeps it in its L1.
    assert_eq!(text(with_cookie(format!("{b}/counter"))).await, "ada: 1");
    assert_eq!(text(with_cookie(format!("{b}/counter"))).await, "ada: 2");
    let logout = plain
        .post(format!("{a}/logout"))
        .header(reqwest::header::COOKIE, &cookie);
    assert_eq!(text(logout).await, "signed out");
    // `b` held the session in L1; the logout's invalidation reaches it within the delivery
    // time, after which the copied cookie opens nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let answer = text(with_cookie(format!("{b}/counter"))).await;
        if answer == "anonymous: 1" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b still serves it: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
    // A tampered cookie, and a well-formed one naming no session: a fresh anonymous session.
    for forged in ["id=not-a-session-id", "id=AAAAAAAAAAAAAAAAAAAAAA"] {
        let request = plain
            .get(format!("{b}/counter"))
            .header(reqwest::header::COOKIE, forged);
        assert_eq!(text(request).await, "anonymous: 1", "{forged}");
    }
}

/// A user signed in from two browsers, on two instances, ends both sessions from one of them:
/// the other browser is signed out on either instance, another user's session stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_everywhere_ends_a_users_sessions_in_every_browser() {
    let prefix = prefix("everywhere");
    let hour = time::Duration::hours(1);
    let (a, b) = (instance(&prefix, hour).await, instance(&prefix, hour).await);
    let (laptop, phone, other) = (browser(), browser(), browser());
    for (browser, base, user) in [
        (&laptop, &a, "ada"),
        (&phone, &b, "ada"),
        (&other, &b, "grace"),
    ] {
        assert_eq!(
            text(browser.post(format!("{base}/login?user={user}"))).await,
            format!("signed in as {user}")
        );
    }
    // Each instance reads (and keeps in L1) the sessions the other started.
    assert_eq!(text(phone.get(format!("{a}/counter"))).await, "ada: 1");
    assert_eq!(text(laptop.get(format!("{b}/counter"))).await, "ada: 1");
    assert_eq!(
        text(laptop.post(format!("{a}/logout-everywhere"))).await,
        "signed ada out everywhere"
    );
    // At once on `a`, which ended them; on `b`, which started the phone's session and keeps it
    // in L1, within the backplane's delivery time.
    assert_eq!(
        text(laptop.get(format!("{a}/counter"))).await,
        "anonymous: 1"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let answer = text(phone.get(format!("{b}/counter"))).await;
        if answer == "anonymous: 1" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b still serves the phone's session: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
    assert_eq!(text(other.get(format!("{a}/counter"))).await, "grace: 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_expires() {
    let prefix = prefix("expiry");
    let a = instance(&prefix, time::Duration::seconds(1)).await;
    let browser = browser();
    assert_eq!(
        text(browser.post(format!("{a}/login?user=ada"))).await,
        "signed in as ada"
    );
    assert_eq!(text(browser.get(format!("{a}/counter"))).await, "ada: 1");
    tokio::time::sleep(Duration::from_millis(1_500)).await; // real time: past the idle expiry
    assert_eq!(
        text(browser.get(format!("{a}/counter"))).await,
        "anonymous: 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_of_one_session_keep_a_whole_record() {
    let prefix = prefix("concurrent");
    let hour = time::Duration::hours(1);
    let (a, b) = (instance(&prefix, hour).await, instance(&prefix, hour).await);
    let browser = browser();
    assert_eq!(
        text(browser.post(format!("{a}/login?user=ada"))).await,
        "signed in as ada"
    );
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let (browser, base) = (
                browser.clone(),
                if i % 2 == 0 { a.clone() } else { b.clone() },
            );
            tokio::spawn(async move { text(browser.get(format!("{base}/counter"))).await })
        })
        .collect();
    for request in requests {
        assert!(request.await.unwrap().starts_with("ada: "));
    }
    // The last save wins: some increments of requests that overlapped are lost, none is
    // torn, and what was saved last is what both instances serve next.
    let next = text(browser.get(format!("{a}/counter"))).await;
    let count: u64 = next.trim_start_matches("ada: ").parse().unwrap();
    assert!((2..=21).contains(&count), "{next}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let seen = text(browser.get(format!("{b}/counter"))).await;
        let seen: u64 = seen.trim_start_matches("ada: ").parse().unwrap();
        if seen > count {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b did not see {count}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // poll loop
    }
}
