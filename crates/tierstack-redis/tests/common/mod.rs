//! Test support: the servers `cargo xtask ci` starts, and private servers a test can kill.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::missing_panics_doc
)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tierstack_redis::{RedisConfig, RedisStore};

const HINT: &str = "start the test servers with `cargo xtask services up all` and source \
    target/services.env, or run everything with `cargo xtask ci` (needs redis-server: \
    apt-get install redis-server)";

/// The standalone server of this test run (`REDIS_URL`). Missing: a failure, never a skip.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| panic!("REDIS_URL is not set: {HINT}"))
}

/// The cluster of this test run (`TIERSTACK_REDIS_CLUSTER_URLS`, comma-separated).
pub fn cluster_urls() -> Vec<String> {
    let urls = std::env::var("TIERSTACK_REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| panic!("TIERSTACK_REDIS_CLUSTER_URLS is not set: {HINT}"));
    urls.split(',').map(str::to_owned).collect()
}

/// A key prefix unique to one test, so tests sharing a server never see each other's keys.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{test}-{nanos}:")
}

pub async fn standalone(test: &str) -> RedisStore {
    let config = RedisConfig::from_url(&redis_url())
        .unwrap()
        .key_prefix(&unique_prefix(test));
    RedisStore::connect(&config).await.unwrap()
}

/// A redis-server of the test's own, on a free port, killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl PrivateRedis {
    pub fn start(extra: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            port,
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): apt-get install redis-server")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Runs a command on the server through redis-cli.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): apt-get install redis-tools"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay to a local port that can go silent: while frozen it passes no byte either way
/// and closes nothing, as a network partition that sends no reset looks to both ends. New
/// connections are accepted meanwhile and held. It can also forget the connections open so far,
/// as a NAT or a firewall that lost their state does: they stay silent for good, and new ones
/// pass. Stops relaying when dropped.
pub struct Partition {
    pub port: u16,
    links: tokio::sync::watch::Sender<Links>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    relay: tokio::task::JoinHandle<()>,
}

/// What passes: nothing while frozen, and never a connection numbered below `forgotten_below`.
/// While `refusing`, a new connection is closed as soon as it is accepted.
#[derive(Clone, Copy, Default)]
struct Links {
    frozen: bool,
    forgotten_below: u64,
    refusing: bool,
}

impl Links {
    fn pass(self, connection: u64) -> bool {
        !self.frozen && connection >= self.forgotten_below
    }
}

impl Partition {
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let links = tokio::sync::watch::Sender::new(Links::default());
        let passing = links.subscribe();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let relay = tokio::spawn(async move {
            // Dropped with the accept loop: aborts every connection's relay.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let number = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                connections.spawn(relay(client, target, number, passing.clone()));
            }
        });
        Self {
            port,
            links,
            accepted,
            relay,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn freeze(&self) {
        self.links.send_modify(|links| links.frozen = true);
    }

    pub fn thaw(&self) {
        self.links.send_modify(|links| links.frozen = false);
    }

    /// Silences every connection accepted so far, for good.
    pub fn forget_open_connections(&self) {
        let accepted = self.accepted();
        self.links
            .send_modify(|links| links.forgotten_below = accepted);
    }

    /// Closes every new connection at once (as a server that is down), or stops doing so.
    pub fn refuse_new_connections(&self, refusing: bool) {
        self.links.send_modify(|links| links.refusing = refusing);
    }

    /// How many connections the relay has accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

async fn relay(
    client: tokio::net::TcpStream,
    target: u16,
    number: u64,
    mut links: tokio::sync::watch::Receiver<Links>,
) {
    if links.borrow().refusing || links.wait_for(|links| links.pass(number)).await.is_err() {
        return;
    }
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (client_reads, client_writes) = client.into_split();
    let (server_reads, server_writes) = server.into_split();
    tokio::join!(
        pass(client_reads, server_writes, number, links.clone()),
        pass(server_reads, client_writes, number, links),
    );
}

/// Passes bytes one way, holding each read while the connection may not pass. One buffer at most is
/// held: the sender's socket buffers fill up behind it, as they would behind a partition.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    mut links: tokio::sync::watch::Receiver<Links>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if links.wait_for(|links| links.pass(number)).await.is_err()
            || to.write_all(&buffer[..read]).await.is_err()
        {
            break;
        }
    }
    let _ = to.shutdown().await;
}
