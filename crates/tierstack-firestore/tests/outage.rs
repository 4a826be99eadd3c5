//! The Firestore emulator stopped mid-run: errors within the timeout, a cache that keeps serving
//! from L1 and the loader, and recovery when the emulator is back.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tierstack::TieredCache;
use tierstack_core::Store;
use tierstack_firestore::{FirestoreConfig, FirestoreStore};

/// A Firestore emulator of the test's own, in its own process group (its Java child outlives
/// the gcloud wrapper otherwise).
struct Emulator {
    child: Option<Child>,
}

impl Emulator {
    fn start(port: u16) -> Self {
        let child = Command::new("gcloud")
            .args(["emulators", "firestore", "start"])
            .arg(format!("--host-port=127.0.0.1:{port}"))
            .env("CLOUDSDK_CORE_DISABLE_PROMPTS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the Firestore emulator ({e}): install the Google Cloud CLI and its Firestore emulator"));
        // Owned before waiting: if the wait fails, dropping it stops the emulator.
        let emulator = Self { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let request = format!(
                    "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                );
                let mut reply = String::new();
                // The emulator may keep the connection open: the read then ends in a timeout
                // with the reply already read.
                if stream.write_all(request.as_bytes()).is_ok() {
                    let _ = stream.read_to_string(&mut reply);
                    if reply.starts_with("HTTP/1.1 200") {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the emulator did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        emulator
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The scenario, run in a child process whose `FIRESTORE_EMULATOR_HOST` names the private
/// emulator (setting it in this process would need `unsafe`).
async fn scenario(port: u16, restart: impl FnOnce() + Send) {
    let config = FirestoreConfig::new("outage-test")
        .collection("outage")
        .request_timeout(Duration::from_millis(500))
        .max_retries(0);
    let store = Arc::new(FirestoreStore::connect(&config).await.unwrap());
    let cache: TieredCache<String> = TieredCache::builder("outage")
        .l2(store.clone())
        .l2_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    // A freshly started emulator answers its first requests slowly (a cold JVM).
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(error) = cache.set("warm", "in-l1".into()).await {
        assert!(
            Instant::now() < deadline,
            "the emulator never answered: {error:?}"
        );
    }

    // The parent stops the emulator when told through stdout, and starts it again on request.
    println!("STOP {port}");
    wait_for_line("STOPPED");
    let started = Instant::now();
    let err = store.get("anything").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed within the timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(
        cache.get("warm").await.unwrap(),
        Some("in-l1".into()),
        "L1 keeps serving"
    );
    let loaded = cache
        .get_or_load("cold", || async {
            Ok::<_, std::io::Error>("loaded".to_string())
        })
        .await;
    assert_eq!(
        loaded.unwrap(),
        "loaded",
        "the loader serves while L2 is down"
    );
    assert!(cache.stats().l2_errors >= 1);

    restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    while cache.set("after", "v".into()).await.is_err() {
        assert!(Instant::now() < deadline, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cache.invalidate_local("after");
    let l2_hits = cache.stats().l2_hits;
    assert_eq!(cache.get("after").await.unwrap(), Some("v".into()));
    assert_eq!(
        cache.stats().l2_hits,
        l2_hits + 1,
        "served by Firestore again, same store, no rebuild"
    );
}

fn wait_for_line(expected: &str) {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), expected);
}

fn main() {
    if let Ok(port) = std::env::var("TIERSTACK_OUTAGE_PORT") {
        let port: u16 = port.parse().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(scenario(port, || {
            println!("RESTART");
            wait_for_line("RESTARTED");
        }));
        println!("SCENARIO OK");
        return;
    }
    // The parent: a private emulator, and the scenario in a child that talks to it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut emulator = Emulator::start(port);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("FIRESTORE_EMULATOR_HOST", format!("127.0.0.1:{port}"))
        .env("TIERSTACK_OUTAGE_PORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let from_child = BufReader::new(child.stdout.take().unwrap());
    let mut passed = false;
    let mut restarted = None;
    for line in from_child.lines() {
        let line = line.unwrap();
        match line.trim() {
            stop if stop.starts_with("STOP ") => {
                emulator.stop();
                writeln!(to_child, "STOPPED").unwrap();
            }
            "RESTART" => {
                restarted = Some(Emulator::start(port));
                writeln!(to_child, "RESTARTED").unwrap();
            }
            "SCENARIO OK" => passed = true,
            other => println!("{other}"),
        }
    }
    let status = child.wait().unwrap();
    drop(restarted);
    let ok = passed && status.success();
    println!(
        "test a_stopped_emulator_degrades_the_cache_and_it_recovers ... {}",
        if ok { "ok" } else { "FAILED" }
    );
    println!("outage: {} passed, {} failed", u8::from(ok), u8::from(!ok));
    assert!(ok, "the outage scenario failed (exit {status})");
}
