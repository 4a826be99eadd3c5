//! Configuration of a Redis connection. Passwords never appear in `Debug` or `Display`.

use std::fmt;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use tierstack_core::{CacheError, Result};

/// How often a backplane checks its subscribed connection unless told otherwise.
const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest interval between two checks (a zero interval would ping without pause).
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);
/// The shortest connect or response timeout (zero would fail every call).
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest timeout or ping interval: a longer one is a slip of units, and would leave a
/// stalled server unnoticed for longer than any caller waits.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where and how to reach Redis: one server, or the seed nodes of a cluster.
///
/// ```
/// use std::time::Duration;
/// use tierstack_redis::RedisConfig;
///
/// let config = RedisConfig::from_url("redis://cache:s3cret@127.0.0.1:6379/2")?
///     .key_prefix("shop:")
///     .response_timeout(Duration::from_millis(250));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), tierstack_core::CacheError>(())
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    pub(crate) nodes: Vec<ConnectionInfo>,
    pub(crate) cluster: bool,
    pub(crate) key_prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) max_in_flight: usize,
    pub(crate) channel: String,
    /// Whether a standalone backplane listens on its publishing connection (RESP3).
    pub(crate) resp3_backplane: bool,
    /// How often a backplane pings its subscribed connection (`None`: never).
    pub(crate) backplane_ping_interval: Option<Duration>,
    /// A PEM root certificate to trust instead of the built-in roots (feature `tls`).
    pub(crate) root_certificate: Option<Vec<u8>>,
}

impl RedisConfig {
    /// One Redis server from a URL: `redis://[user[:password]@]host[:port][/db]`, or
    /// `rediss://` for TLS (with the crate feature `tls`).
    pub fn from_url(url: &str) -> Result<Self> {
        Ok(Self::with_nodes(vec![parse(url)?], false))
    }

    /// A Redis Cluster, from the URLs of some of its nodes (the rest are discovered).
    pub fn cluster<S: AsRef<str>>(urls: &[S]) -> Result<Self> {
        if urls.is_empty() {
            return Err(CacheError::Configuration(
                "a cluster needs at least one node URL".into(),
            ));
        }
        let nodes = urls
            .iter()
            .map(|url| parse(url.as_ref()))
            .collect::<Result<_>>()?;
        Ok(Self::with_nodes(nodes, true))
    }

    /// One Redis server from its parts.
    pub fn from_parts(host: &str, port: u16, db: i64) -> Result<Self> {
        let info = ConnectionAddr::Tcp(host.to_owned(), port)
            .into_connection_info()
            .map_err(|e| {
                CacheError::Configuration(format!("invalid Redis address ({:?})", e.kind()))
            })?;
        let redis = info.redis_settings().clone().set_db(db);
        let info = info
            .set_redis_settings(redis)
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        Ok(Self::with_nodes(vec![info], false))
    }

    fn with_nodes(nodes: Vec<ConnectionInfo>, cluster: bool) -> Self {
        Self {
            nodes,
            cluster,
            key_prefix: String::new(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_millis(500),
            max_in_flight: 1024,
            channel: "tierstack:invalidations".into(),
            resp3_backplane: true,
            backplane_ping_interval: Some(DEFAULT_PING_INTERVAL),
            root_certificate: None,
        }
    }

    /// Authenticates as an ACL user (or with the legacy `requirepass` password for `default`).
    #[must_use]
    pub fn credentials(mut self, username: Option<&str>, password: &str) -> Self {
        self.nodes = self
            .nodes
            .into_iter()
            .map(|info| {
                let mut redis = info.redis_settings().clone().set_password(password);
                if let Some(username) = username {
                    redis = redis.set_username(username);
                }
                info.set_redis_settings(redis)
            })
            .collect();
        self
    }

    /// A prefix put before every key this store writes (for example `"myapp:"`), so that several
    /// applications can share one Redis.
    #[must_use]
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.key_prefix);
        self
    }

    /// How long connecting may take (default 2 s; from 1 ms to 1 h, checked by
    /// [`validate`](Self::validate)).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one call (a command, a pipeline or a script) may take before it fails with a
    /// timeout (default 500 ms; from 1 ms to 1 h, checked by [`validate`](Self::validate)),
    /// counted from the call: the wait for a free in-flight slot and for a reconnect count too.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How many requests may be in flight at once (default 1024). Callers beyond it wait, within
    /// their response timeout, so a stalled server cannot make requests queue without bound.
    #[must_use]
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// The pub/sub channel of the invalidation backplane (default `tierstack:invalidations`;
    /// the key prefix is put before it).
    #[must_use]
    pub fn channel(mut self, channel: &str) -> Self {
        channel.clone_into(&mut self.channel);
        self
    }

    /// Whether a backplane on a standalone server listens on the connection it writes and
    /// publishes on (default `true`). That connection speaks RESP3 (Redis 6 or later), and the
    /// server sends an invalidation and the reply to the write that caused it on one socket.
    /// `false` listens on a dedicated RESP2 pub/sub connection instead, for servers or proxies
    /// without RESP3. A cluster backplane always uses a dedicated connection.
    #[must_use]
    pub fn resp3_backplane(mut self, on: bool) -> Self {
        self.resp3_backplane = on;
        self
    }

    /// How often a backplane checks, with a `PING`, that its subscribed connection still
    /// answers (default 5 s; `None`: never; from 10 ms to 1 h, checked by
    /// [`validate`](Self::validate)).
    ///
    /// A connection that gives no answer within the response timeout is treated as lost: the
    /// instance clears its L1 and the backplane subscribes on a new connection. Without the
    /// check, a network partition that closes nothing (no reset reaches either side) would leave
    /// the instance deaf to invalidations, serving what it holds in L1, until the operating
    /// system gave up on the socket, which can take hours. With it, such an instance serves
    /// nothing stale from L1 for longer than about this interval plus the response timeout.
    #[must_use]
    pub fn backplane_ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.backplane_ping_interval = interval;
        self
    }

    /// Checks the settings that the builder methods take as given: the connect and response
    /// timeouts (from 1 ms to 1 h) and the backplane ping interval (from 10 ms to 1 h). A zero
    /// timeout would fail every call, and an hour-long one is a slip of units. Fails with
    /// [`CacheError::Configuration`] naming the setting.
    ///
    /// [`RedisStore::connect`](crate::RedisStore::connect) and
    /// [`RedisBackplane::connect`](crate::RedisBackplane::connect) call it before connecting.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tierstack_redis::RedisConfig;
    ///
    /// let config = RedisConfig::from_url("redis://127.0.0.1:6379/")?;
    /// assert!(config.clone().validate().is_ok());
    /// let err = config.response_timeout(Duration::ZERO).validate().unwrap_err();
    /// assert!(err.to_string().contains("response_timeout"));
    /// # Ok::<(), tierstack_core::CacheError>(())
    /// ```
    pub fn validate(&self) -> Result<()> {
        within("connect_timeout", self.connect_timeout, MIN_TIMEOUT)?;
        within("response_timeout", self.response_timeout, MIN_TIMEOUT)?;
        if let Some(every) = self.backplane_ping_interval {
            within("backplane_ping_interval", every, MIN_PING_INTERVAL)?;
        }
        Ok(())
    }

    /// Trusts `pem` (a PEM root certificate, such as a private CA's) for `rediss://` connections,
    /// instead of the built-in web PKI roots.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls_root_certificate(mut self, pem: &[u8]) -> Self {
        self.root_certificate = Some(pem.to_vec());
        self
    }

    pub(crate) fn uses_tls(&self) -> bool {
        self.nodes
            .iter()
            .any(|info| matches!(info.addr(), ConnectionAddr::TcpTls { .. }))
    }

    /// `host:port` of the first node, for error messages (never with credentials).
    pub fn endpoint(&self) -> String {
        self.nodes
            .first()
            .map_or_else(|| "redis".to_owned(), endpoint_of)
    }

    pub(crate) fn channel_name(&self) -> String {
        format!("{}{}", self.key_prefix, self.channel)
    }
}

/// Refuses `value` of `setting` below `min` or above [`MAX_TIMEOUT`].
fn within(setting: &str, value: Duration, min: Duration) -> Result<()> {
    if value < min || value > MAX_TIMEOUT {
        return Err(CacheError::Configuration(format!(
            "RedisConfig::{setting} must be from {min:?} to {MAX_TIMEOUT:?}, not {value:?}"
        )));
    }
    Ok(())
}

pub(crate) fn endpoint_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
        other => other.to_string(),
    }
}

fn parse(url: &str) -> Result<ConnectionInfo> {
    if cfg!(not(feature = "tls")) && url.starts_with("rediss://") {
        return Err(CacheError::Configuration(
            "rediss:// (TLS) needs the `tls` feature of tierstack-redis".into(),
        ));
    }
    let info = url.into_connection_info().map_err(|e| {
        // The driver's message may quote the URL, password included: report the kind only.
        CacheError::Configuration(format!("invalid Redis URL ({:?})", e.kind()))
    })?;
    Ok(info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.nodes.iter().map(endpoint_of).collect();
        let first = self.nodes.first().map(ConnectionInfo::redis_settings);
        f.debug_struct("RedisConfig")
            .field("nodes", &nodes)
            .field("cluster", &self.cluster)
            .field("db", &first.map(redis::RedisConnectionInfo::db))
            .field("username", &first.and_then(|r| r.username()))
            .field(
                "password",
                &first.and_then(|r| r.password()).map(|_| "<redacted>"),
            )
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("channel", &self.channel)
            .field("resp3_backplane", &self.resp3_backplane)
            .field("backplane_ping_interval", &self.backplane_ping_interval)
            .field("tls", &self.uses_tls())
            .field(
                "root_certificate",
                &self.root_certificate.as_ref().map(|_| "<custom CA>"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_show_their_password() {
        let config = RedisConfig::from_url("redis://alice:hunter2@10.1.2.3:6380/4")
            .unwrap()
            .key_prefix("app:");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(
            debug.contains("10.1.2.3:6380")
                && debug.contains("alice")
                && debug.contains("<redacted>")
        );
        assert_eq!(config.endpoint(), "10.1.2.3:6380");
        assert_eq!(config.nodes[0].redis_settings().db(), 4);
        assert!(config.nodes[0].tcp_settings().nodelay());
        assert_eq!(config.backplane_ping_interval, Some(Duration::from_secs(5)));
        assert_eq!(config.channel_name(), "app:tierstack:invalidations");
    }

    #[test]
    fn a_bad_url_is_a_configuration_error_without_the_url() {
        let err = RedisConfig::from_url("http://bob:topsecret@host").unwrap_err();
        assert!(matches!(err, CacheError::Configuration(_)));
        assert!(!err.to_string().contains("topsecret"), "{err}");
        assert!(RedisConfig::cluster::<&str>(&[]).is_err());
    }

    #[test]
    fn the_ping_interval_can_be_turned_off_but_not_made_zero() {
        let config = RedisConfig::from_parts("127.0.0.1", 6379, 0).unwrap();
        let zero = config.clone().backplane_ping_interval(Some(Duration::ZERO));
        assert!(zero.validate().is_err());
        let shortest = config
            .clone()
            .backplane_ping_interval(Some(MIN_PING_INTERVAL));
        assert!(shortest.validate().is_ok());
        let off = config.backplane_ping_interval(None);
        assert_eq!(off.backplane_ping_interval, None);
        assert!(off.validate().is_ok());
        assert!(format!("{off:?}").contains("backplane_ping_interval: None"));
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let config = RedisConfig::from_parts("127.0.0.1", 6379, 0).unwrap();
        assert!(config.validate().is_ok(), "the defaults");
        let shortest = config
            .clone()
            .connect_timeout(MIN_TIMEOUT)
            .response_timeout(MIN_TIMEOUT);
        assert!(shortest.validate().is_ok());
        let longest = config
            .connect_timeout(MAX_TIMEOUT)
            .response_timeout(MAX_TIMEOUT)
            .backplane_ping_interval(Some(MAX_TIMEOUT));
        assert!(longest.validate().is_ok());
    }

    /// A configuration with a zero or absurd timeout is refused by `connect` before any
    /// connection is tried, with an error that names the setting.
    #[tokio::test]
    async fn zero_and_absurd_timeouts_are_refused_naming_the_setting() {
        // A port nothing listens on: whatever fails here must fail before connecting.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = RedisConfig::from_parts("127.0.0.1", port, 0).unwrap();
        let hour = Duration::from_secs(3600);
        let cases = [
            (
                base.clone().connect_timeout(Duration::ZERO),
                "connect_timeout",
            ),
            (base.clone().connect_timeout(hour * 24), "connect_timeout"),
            (
                base.clone().response_timeout(Duration::ZERO),
                "response_timeout",
            ),
            (
                base.clone()
                    .response_timeout(hour + Duration::from_millis(1)),
                "response_timeout",
            ),
            (
                base.clone().backplane_ping_interval(Some(Duration::ZERO)),
                "backplane_ping_interval",
            ),
            (
                base.clone().backplane_ping_interval(Some(hour * 2)),
                "backplane_ping_interval",
            ),
        ];
        for (config, setting) in cases {
            for err in [
                crate::RedisStore::connect(&config).await.unwrap_err(),
                crate::RedisBackplane::connect(&config).await.unwrap_err(),
            ] {
                assert!(
                    matches!(&err, CacheError::Configuration(message) if message.contains(setting)),
                    "{setting}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn credentials_apply_to_every_node() {
        let config = RedisConfig::cluster(&["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"])
            .unwrap()
            .credentials(Some("svc"), "pw");
        for node in &config.nodes {
            assert_eq!(node.redis_settings().username(), Some("svc"));
            assert_eq!(node.redis_settings().password(), Some("pw"));
        }
    }
}
