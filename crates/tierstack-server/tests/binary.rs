//! The `tierstack-server` binary as a user starts it: with no configuration it makes a
//! development key, prints it once, serves with it, and SIGTERM (what `docker stop` sends)
//! stops it cleanly.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_starts_with_a_development_key_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tierstack-server"))
        .env("TIERSTACK_LISTEN", "127.0.0.1:0")
        .env_remove("CACHE_BACKEND")
        .env_remove("TIERSTACK_API_KEYS")
        .env_remove("TIERSTACK_SERVER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut key, mut address) = (None, None);
    while key.is_none() || address.is_none() {
        let line = lines.next().expect("the server's output ended").unwrap();
        if let Some(at) = line.find("dev_") {
            key = Some(line[at..].trim().to_owned());
        }
        if let Some(at) = line.find("address=") {
            address = Some(line[at + "address=".len()..].trim().to_owned());
        }
    }
    let (key, address) = (key.unwrap(), address.unwrap());
    let client = reqwest::Client::new();
    let url = format!("http://{address}/v1/cache/greeting?ttl=60");
    let put = client
        .put(&url)
        .header("authorization", format!("Bearer {key}"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), reqwest::StatusCode::NO_CONTENT);
    let got = client
        .get(format!("http://{address}/v1/cache/greeting"))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.text().await.unwrap(), "hello");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll loop
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|line| line.contains("shutting down")),
        "{rest:?}"
    );
    let logged: String = rest.concat();
    assert!(
        !logged.contains(&key),
        "the key is printed once, never logged"
    );
}
