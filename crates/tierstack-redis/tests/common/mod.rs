//! Test support: the servers of the run (started by `cargo xtask ci`, or by this test process
//! itself), private servers a test can kill, and a relay that can cut the network.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::missing_panics_doc
)]

use std::sync::Arc;

use tierstack_redis::{RedisConfig, RedisStore};

pub use tierstack_test_support::redis::{RedisServer, cluster_urls, redis_url};

/// A redis-server of the test's own, on a free port, stopped when dropped.
pub fn private_redis(extra: &[&str]) -> RedisServer {
    RedisServer::start(&tierstack_test_support::Launch::for_tests(), extra)
        .unwrap_or_else(|error| panic!("{error}"))
}

/// A key prefix unique to one test, so tests sharing a server never see each other's keys.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{test}-{nanos}:")
}

/// The configuration of the run's Redis under a key prefix of `test`'s own, and a store on it
/// to look at what Redis holds.
pub async fn prefixed(test: &str) -> (RedisConfig, RedisStore) {
    let config = RedisConfig::from_url(&redis_url())
        .unwrap()
        .key_prefix(&unique_prefix(test));
    let raw = RedisStore::connect(&config).await.unwrap();
    (config, raw)
}

pub async fn standalone(test: &str) -> RedisStore {
    let config = RedisConfig::from_url(&redis_url())
        .unwrap()
        .key_prefix(&unique_prefix(test));
    RedisStore::connect(&config).await.unwrap()
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
