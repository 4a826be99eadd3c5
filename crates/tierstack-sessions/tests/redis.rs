//! The session store's promises over real Redis: a save that ran beside a logout does not
//! bring the session back (the compare-and-set of `set_if_present` on the server); without a
//! backplane every instance reads the server, so a logout is seen at once; and a server that
//! dies is an error, never a missing session (which would sign its user out).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration as StdDuration;

use tierstack_redis::{RedisBackplane, RedisConfig, RedisStore};
use tierstack_sessions::{TieredSessionStore, cache_builder};
use tierstack_test_support::Launch;
use tierstack_test_support::redis::RedisServer;
use time::{Duration, OffsetDateTime};
use tower_sessions::SessionStore;
use tower_sessions::session::{Id, Record};

fn record() -> Record {
    let mut data = std::collections::HashMap::new();
    data.insert("user".to_owned(), serde_json::json!("ada"));
    Record {
        id: Id::default(),
        data,
        expiry_date: OffsetDateTime::now_utc() + Duration::hours(1),
    }
}

fn config(url: &str) -> RedisConfig {
    RedisConfig::from_url(url)
        .unwrap()
        .connect_timeout(StdDuration::from_millis(300))
        .response_timeout(StdDuration::from_millis(300))
}

/// An instance's store: with the server's backplane, or without one (L1 bypassed).
async fn instance(url: &str, backplane: bool) -> TieredSessionStore {
    let config = config(url);
    let mut builder = cache_builder("sessions")
        .l2(Arc::new(RedisStore::connect(&config).await.unwrap()))
        .l2_timeout(StdDuration::from_millis(500));
    if backplane {
        builder = builder.backplane(Arc::new(RedisBackplane::connect(&config).await.unwrap()));
    }
    TieredSessionStore::new(builder.build().unwrap())
}

fn server() -> RedisServer {
    RedisServer::start(&Launch::for_tests(), &[]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_beside_a_logout_keeps_the_session_ended_with_or_without_a_backplane() {
    let server = server();
    for backplane in [true, false] {
        let (a, b) = (
            instance(&server.url(), backplane).await,
            instance(&server.url(), backplane).await,
        );
        let mut session = record();
        a.create(&mut session).await.unwrap();
        // A request on `b` loaded the session and is still running when the user logs out
        // on `a`; its save comes after.
        let mut loaded = b.load(&session.id).await.unwrap().unwrap();
        a.delete(&session.id).await.unwrap();
        loaded.data.insert("visits".into(), serde_json::json!(9));
        b.save(&loaded).await.unwrap();
        let fresh = instance(&server.url(), false).await;
        assert_eq!(
            fresh.cache().get(&session.id.to_string()).await.unwrap(),
            None,
            "backplane {backplane}: nothing written under the ended id"
        );
        assert_eq!(a.load(&session.id).await.unwrap(), None);
        // A live session's save lands, and the other instance reads it.
        let mut live = record();
        a.create(&mut live).await.unwrap();
        assert_eq!(b.load(&live.id).await.unwrap(), Some(live.clone()));
        live.data.insert("visits".into(), serde_json::json!(1));
        b.save(&live).await.unwrap();
        if !backplane {
            // No L1 to outlive the save or a logout: both are seen at once.
            assert_eq!(a.load(&live.id).await.unwrap(), Some(live.clone()));
            b.delete(&live.id).await.unwrap();
            assert_eq!(a.load(&live.id).await.unwrap(), None);
            assert_eq!(a.cache().stats().l1_hits, 0, "L1 never answered");
        }
    }
}

/// A session of `user` (`None`: not signed in yet).
fn session_of(user: Option<&str>) -> Record {
    let mut session = record();
    session.data.clear();
    if let Some(user) = user {
        session
            .data
            .insert("user".to_owned(), serde_json::json!(user));
    }
    session
}

async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + StdDuration::from_secs(5);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "not within 5 s");
        // poll loop: the backplane delivers in its own time.
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
}

/// Log out everywhere: every session of one user, created on either instance, reads as ended
/// on both (with a backplane, within its delivery; on the instance that ended them and on one
/// that starts afterwards, at once either way). Other users' and anonymous sessions stay; a
/// request that loaded one of the ended sessions and saves afterwards brings nothing back; a
/// session created afterwards is current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_users_sessions_ends_each_of_them_on_every_instance() {
    let server = server();
    for backplane in [true, false] {
        let tagged = async || {
            instance(&server.url(), backplane)
                .await
                .with_user_field("user")
        };
        // `c` reads ada's session before the logout and nothing of her after it but her new
        // session: what it knows of her tag is behind that session's stamp.
        let (a, b, c) = (tagged().await, tagged().await, tagged().await);
        let (mut ada_a, mut ada_b) = (session_of(Some("ada")), session_of(Some("ada")));
        let (mut grace, mut anonymous) = (session_of(Some("grace")), session_of(None));
        a.create(&mut ada_a).await.unwrap();
        b.create(&mut ada_b).await.unwrap();
        a.create(&mut grace).await.unwrap();
        b.create(&mut anonymous).await.unwrap();
        let mut loaded = b.load(&ada_a.id).await.unwrap().unwrap();
        assert_eq!(c.load(&ada_b.id).await.unwrap(), Some(ada_b.clone()));

        b.end_user_sessions("ada").await.unwrap();
        let fresh = tagged().await;
        for store in [&b, &fresh] {
            assert_eq!(store.load(&ada_a.id).await.unwrap(), None);
            assert_eq!(store.load(&ada_b.id).await.unwrap(), None);
        }
        if backplane {
            eventually(async || {
                a.load(&ada_a.id).await.unwrap().is_none()
                    && a.load(&ada_b.id).await.unwrap().is_none()
            })
            .await;
        }
        for store in [&a, &b, &fresh] {
            assert_eq!(store.load(&grace.id).await.unwrap(), Some(grace.clone()));
            assert_eq!(
                store.load(&anonymous.id).await.unwrap(),
                Some(anonymous.clone())
            );
        }
        // The request that loaded ada's session before the logout saves after it.
        loaded.data.insert("visits".into(), serde_json::json!(2));
        b.save(&loaded).await.unwrap();
        assert_eq!(
            tagged().await.load(&ada_a.id).await.unwrap(),
            None,
            "backplane {backplane}: the save brought the session back"
        );
        // Signed in again: current everywhere, at once without a backplane too (a session is
        // read from the server then), on `c` as well.
        let mut again = session_of(Some("ada"));
        a.create(&mut again).await.unwrap();
        if backplane {
            eventually(async || b.load(&again.id).await.unwrap() == Some(again.clone())).await;
        }
        for (name, store) in [("a", &a), ("b", &b), ("c", &c)] {
            assert_eq!(
                store.load(&again.id).await.unwrap(),
                Some(again.clone()),
                "backplane {backplane}: {name} takes the new session for ended"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_an_error_not_a_signed_out_user() {
    let mut server = server();
    let store = instance(&server.url(), false).await;
    let mut session = record();
    store.create(&mut session).await.unwrap();
    server.kill();
    assert!(
        store.load(&session.id).await.is_err(),
        "a failed read is no missing session"
    );
    assert!(store.save(&session).await.is_err());
    server.restart();
    // Restarted empty (no persistence): the session is gone now, and says so.
    let deadline = std::time::Instant::now() + StdDuration::from_secs(15);
    loop {
        match store.load(&session.id).await {
            Ok(found) => {
                assert_eq!(found, None);
                break;
            }
            Err(_) => assert!(
                std::time::Instant::now() < deadline,
                "the store never read the restarted server"
            ),
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await; // poll loop
    }
}
