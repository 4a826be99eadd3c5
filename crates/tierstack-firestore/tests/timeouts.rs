//! A Firestore that accepts connections and never answers: each attempt ends at
//! `request_timeout`, a read is retried `max_retries` times, and every request ends within
//! `request_timeout` × (1 + `max_retries`) plus the client's pauses before its retries.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

use tierstack_core::{CacheError, Store, StoreWrite};
use tierstack_firestore::{FirestoreConfig, FirestoreStore};

const ATTEMPT: Duration = Duration::from_millis(400);
/// Room for scheduling on a busy machine; less than two attempts, so that a bound of three
/// attempts, whatever the retries, would show.
const SLACK: Duration = Duration::from_millis(500);

async fn store(endpoint: &str, max_retries: usize) -> FirestoreStore {
    let config = FirestoreConfig::new("black-hole")
        .emulator_host(endpoint)
        .collection("timeouts")
        .request_timeout(ATTEMPT)
        .max_retries(max_retries);
    FirestoreStore::connect(&config).await.unwrap()
}

async fn scenario(endpoint: &str) {
    // A read with three retries makes four attempts of 400 ms each, with pauses of up to
    // 1 s, 2 s and 4 s between them.
    let reads = store(endpoint, 3).await;
    let started = Instant::now();
    let err = reads.get("k").await.unwrap_err();
    let took = started.elapsed();
    let bound = ATTEMPT * 4 + Duration::from_secs(1 + 2 + 4);
    assert!(
        matches!(err, CacheError::Timeout { after, .. } if after == bound),
        "{err:?}"
    );
    assert!(
        took >= ATTEMPT * 4,
        "every attempt ran its full timeout before the read gave up: {took:?}"
    );
    assert!(took <= bound + SLACK, "{took:?}");

    // Without retries a request ends after one attempt, a write too (the client's batch
    // writer would retry it without limit on its own).
    let once = store(endpoint, 0).await;
    let started = Instant::now();
    let err = once.get("k").await.unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    assert!(
        started.elapsed() <= ATTEMPT + SLACK,
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let writes = [StoreWrite {
        key: "k",
        value: b"v".to_vec().into(),
        ttl: Duration::from_secs(60),
    }];
    let err = once.set_many(&writes).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() <= ATTEMPT + SLACK,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_server_that_never_answers_end_within_the_documented_bound() {
    // A loopback listener that accepts every connection, holds it open and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    tokio::time::timeout(
        Duration::from_secs(60),
        scenario(&format!("127.0.0.1:{port}")),
    )
    .await
    .expect("the scenario ran for a minute: some request is not bounded");
}
