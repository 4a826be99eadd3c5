//! Choosing the L2 by configuration: a service changes backend by changing its environment, not
//! its code.
//!
//! ```no_run
//! # async fn run() -> tierstack::core::Result<()> {
//! use tierstack::{StoreConfig, TieredCache};
//! let backend = StoreConfig::from_env()?.connect().await?;
//! let cache: TieredCache<String> = backend.apply(TieredCache::builder("users")).build()?;
//! # Ok(()) }
//! ```
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `CACHE_BACKEND` | `memory`, `redis` or `firestore` | `memory` |
//! | `CACHE_MEMORY_MAX_BYTES` | the `memory` backend's budget, at least 1 | 268435456 (256 MiB) |
//! | `REDIS_URL` | `redis://[user[:password]@]host[:port][/db]` (`rediss://` with TLS) | required for `redis` without a cluster |
//! | `REDIS_CLUSTER_URLS` | comma-separated node URLs: a Redis Cluster | |
//! | `REDIS_HOST` | instead of `REDIS_URL`: the server's host name or address | |
//! | `REDIS_PORT` | with `REDIS_HOST`: its port | 6379 |
//! | `REDIS_DB` | with `REDIS_HOST`: the database number | 0 |
//! | `REDIS_USERNAME` | with `REDIS_HOST`: an ACL user (needs `REDIS_PASSWORD`) | `default` |
//! | `REDIS_PASSWORD` | with `REDIS_HOST`: the password (never logged) | none |
//! | `REDIS_KEY_PREFIX` | prefix of every Redis key | empty |
//! | `REDIS_RESPONSE_TIMEOUT_MS` | per-request timeout, from 1 to 3600000 | 500 |
//! | `FIRESTORE_PROJECT_ID` | Google Cloud project | required for `firestore` |
//! | `FIRESTORE_DATABASE_ID` | database | `(default)` |
//! | `CACHE_COLLECTION_NAME` | collection of the entries | `tierstack_cache` |
//! | `FIRESTORE_KEY_PREFIX` | prefix of every key | empty |
//!
//! `redis` needs this crate's feature `redis`, `firestore` its feature `firestore`.

use std::fmt;
use std::sync::Arc;

use tierstack_core::{Backplane, CacheError, Codec, Result, Store};

use crate::TieredCacheBuilder;

/// What a cache needs from the configured backend: its store and, where the backend has one,
/// the backplane that keeps every instance's L1 fresh.
///
/// Redis comes with its backplane, paired with the store (one round trip per write). The memory
/// backend lives in one process and Firestore has no pub/sub: they come without one, so
/// several instances on Firestore keep L1 copies up to their `l1_ttl` after another instance's
/// write; set a short `l1_ttl`, or add a Redis backplane.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Backend {
    /// The L2.
    pub store: Arc<dyn Store>,
    /// The backplane, if the backend has one.
    pub backplane: Option<Arc<dyn Backplane>>,
}

impl Backend {
    /// Gives `builder` this backend's store and backplane.
    pub fn apply<V, C: Codec>(self, builder: TieredCacheBuilder<V, C>) -> TieredCacheBuilder<V, C>
    where
        V: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
    {
        let builder = builder.l2(self.store);
        match self.backplane {
            Some(backplane) => builder.backplane(backplane),
            None => builder,
        }
    }
}

/// Which L2 to use, and its settings.
#[derive(Clone)]
#[non_exhaustive]
pub enum StoreConfig {
    /// `MokaStore` in this process, bounded to `max_bytes`.
    Memory {
        /// The budget in bytes.
        max_bytes: u64,
    },
    /// Redis, standalone or cluster.
    #[cfg(feature = "redis")]
    Redis(tierstack_redis::RedisConfig),
    /// Google Cloud Firestore (or its emulator, through `FIRESTORE_EMULATOR_HOST`).
    #[cfg(feature = "firestore")]
    Firestore(tierstack_firestore::FirestoreConfig),
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory { max_bytes } => f
                .debug_struct("Memory")
                .field("max_bytes", max_bytes)
                .finish(),
            #[cfg(feature = "redis")]
            Self::Redis(config) => f.debug_tuple("Redis").field(config).finish(),
            #[cfg(feature = "firestore")]
            Self::Firestore(config) => f.debug_tuple("Firestore").field(config).finish(),
        }
    }
}

impl StoreConfig {
    /// The configuration in the process environment (see the module documentation).
    ///
    /// # Errors
    ///
    /// As [`from_vars`](Self::from_vars).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The configuration from `var`, which answers a variable's value (for tests, or for
    /// settings that come from a file).
    ///
    /// # Errors
    ///
    /// [`CacheError::Configuration`] naming the variable: an unknown backend, a missing
    /// required setting, a number that does not parse or is out of range, a backend whose
    /// feature this build leaves out.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let backend = var("CACHE_BACKEND").unwrap_or_else(|| "memory".into());
        match backend.trim().to_ascii_lowercase().as_str() {
            "memory" => {
                let max_bytes = match var("CACHE_MEMORY_MAX_BYTES") {
                    Some(text) => text.trim().parse().map_err(|_| {
                        CacheError::Configuration(format!(
                            "CACHE_MEMORY_MAX_BYTES is not a number: {text:?}"
                        ))
                    })?,
                    None => 256 * 1024 * 1024,
                };
                if max_bytes == 0 {
                    return Err(CacheError::Configuration(
                        "CACHE_MEMORY_MAX_BYTES must be at least 1".into(),
                    ));
                }
                Ok(Self::Memory { max_bytes })
            }
            "redis" => redis_from_vars(&var),
            "firestore" => firestore_from_vars(&var),
            other => Err(CacheError::Configuration(format!(
                "CACHE_BACKEND must be memory, redis or firestore, not {other:?}"
            ))),
        }
    }

    /// Connects to the configured backend: its store and, for Redis, the backplane paired with
    /// it (`RedisStore::connect_with_backplane`).
    ///
    /// # Errors
    ///
    /// The backend's connection errors (a server that does not answer, refused credentials).
    #[cfg_attr(
        not(any(feature = "redis", feature = "firestore")),
        expect(
            clippy::unused_async,
            reason = "async for the network backends, which these features leave out"
        )
    )]
    pub async fn connect(&self) -> Result<Backend> {
        match self {
            Self::Memory { max_bytes } => Ok(Backend {
                store: Arc::new(tierstack_moka::MokaStore::new(*max_bytes)),
                backplane: None,
            }),
            #[cfg(feature = "redis")]
            Self::Redis(config) => {
                let (store, backplane) =
                    tierstack_redis::RedisStore::connect_with_backplane(config).await?;
                Ok(Backend {
                    store: Arc::new(store),
                    backplane: Some(Arc::new(backplane)),
                })
            }
            #[cfg(feature = "firestore")]
            Self::Firestore(config) => Ok(Backend {
                store: Arc::new(tierstack_firestore::FirestoreStore::connect(config).await?),
                backplane: None,
            }),
        }
    }
}

#[cfg(feature = "redis")]
fn redis_from_vars(var: &impl Fn(&str) -> Option<String>) -> Result<StoreConfig> {
    use tierstack_redis::RedisConfig;
    let host = var("REDIS_HOST");
    let mut config = match (var("REDIS_CLUSTER_URLS"), var("REDIS_URL"), host) {
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(CacheError::Configuration(
                "set REDIS_HOST (with REDIS_PORT, REDIS_DB, REDIS_PASSWORD) or a URL \
                 (REDIS_URL, REDIS_CLUSTER_URLS), not both"
                    .into(),
            ));
        }
        (Some(urls), _, None) => {
            let urls: Vec<&str> = urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect();
            RedisConfig::cluster(&urls)?
        }
        (None, Some(url), None) => RedisConfig::from_url(&url)?,
        (None, None, Some(host)) => redis_from_parts(var, host.trim())?,
        (None, None, None) => {
            return Err(CacheError::Configuration(
                "CACHE_BACKEND=redis needs REDIS_URL, REDIS_HOST or REDIS_CLUSTER_URLS".into(),
            ));
        }
    };
    if let Some(prefix) = var("REDIS_KEY_PREFIX") {
        config = config.key_prefix(&prefix);
    }
    if let Some(ms) = var("REDIS_RESPONSE_TIMEOUT_MS") {
        let ms: u64 = ms.trim().parse().map_err(|_| {
            CacheError::Configuration(format!("REDIS_RESPONSE_TIMEOUT_MS is not a number: {ms:?}"))
        })?;
        config = config.response_timeout(std::time::Duration::from_millis(ms));
        config.validate().map_err(|_| {
            CacheError::Configuration(format!(
                "REDIS_RESPONSE_TIMEOUT_MS must be from 1 to 3600000, not {ms}"
            ))
        })?;
    }
    Ok(StoreConfig::Redis(config))
}

/// One server from `REDIS_HOST` and its companions (`REDIS_PORT`, `REDIS_DB`,
/// `REDIS_USERNAME`, `REDIS_PASSWORD`), as services that predate URLs configure it.
#[cfg(feature = "redis")]
fn redis_from_parts(
    var: &impl Fn(&str) -> Option<String>,
    host: &str,
) -> Result<tierstack_redis::RedisConfig> {
    /// The variable `name` as a `T`, if set.
    fn number<T: std::str::FromStr>(
        var: &impl Fn(&str) -> Option<String>,
        name: &str,
        what: &str,
    ) -> Result<Option<T>> {
        var(name)
            .map(|text| {
                text.trim().parse().map_err(|_| {
                    CacheError::Configuration(format!("{name} must be {what}, not {text:?}"))
                })
            })
            .transpose()
    }
    if host.is_empty() {
        return Err(CacheError::Configuration("REDIS_HOST is empty".into()));
    }
    let port = number(var, "REDIS_PORT", "a port number from 1 to 65535")?
        .map_or(6379, std::num::NonZeroU16::get);
    let db: u32 = number(var, "REDIS_DB", "a database number from 0")?.unwrap_or(0);
    let config = tierstack_redis::RedisConfig::from_parts(host, port, i64::from(db))?;
    match (var("REDIS_USERNAME"), var("REDIS_PASSWORD")) {
        (username, Some(password)) => Ok(config.credentials(username.as_deref(), &password)),
        (Some(_), None) => Err(CacheError::Configuration(
            "REDIS_USERNAME needs REDIS_PASSWORD".into(),
        )),
        (None, None) => Ok(config),
    }
}

#[cfg(not(feature = "redis"))]
fn redis_from_vars(_: &impl Fn(&str) -> Option<String>) -> Result<StoreConfig> {
    Err(CacheError::Configuration(
        "CACHE_BACKEND=redis needs tierstack's feature `redis`".into(),
    ))
}

#[cfg(feature = "firestore")]
fn firestore_from_vars(var: &impl Fn(&str) -> Option<String>) -> Result<StoreConfig> {
    use tierstack_firestore::FirestoreConfig;
    let project = var("FIRESTORE_PROJECT_ID").ok_or_else(|| {
        CacheError::Configuration("CACHE_BACKEND=firestore needs FIRESTORE_PROJECT_ID".into())
    })?;
    let mut config = FirestoreConfig::new(&project);
    if let Some(database) = var("FIRESTORE_DATABASE_ID") {
        config = config.database_id(&database);
    }
    if let Some(collection) = var("CACHE_COLLECTION_NAME") {
        config = config.collection(&collection);
    }
    if let Some(prefix) = var("FIRESTORE_KEY_PREFIX") {
        config = config.key_prefix(&prefix);
    }
    Ok(StoreConfig::Firestore(config))
}

#[cfg(not(feature = "firestore"))]
fn firestore_from_vars(_: &impl Fn(&str) -> Option<String>) -> Result<StoreConfig> {
    Err(CacheError::Configuration(
        "CACHE_BACKEND=firestore needs tierstack's feature `firestore`".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn memory_is_the_default() {
        let config = StoreConfig::from_vars(vars(&[])).unwrap();
        assert!(matches!(
            config,
            StoreConfig::Memory {
                max_bytes: 268_435_456
            }
        ));
        let config = StoreConfig::from_vars(vars(&[
            ("CACHE_BACKEND", "Memory"),
            ("CACHE_MEMORY_MAX_BYTES", "1024"),
        ]))
        .unwrap();
        assert!(matches!(config, StoreConfig::Memory { max_bytes: 1024 }));
    }

    #[test]
    fn bad_settings_are_clear_configuration_errors() {
        for bad in [
            vec![("CACHE_BACKEND", "memcached")],
            vec![("CACHE_MEMORY_MAX_BYTES", "lots")],
            vec![("CACHE_MEMORY_MAX_BYTES", "0")],
            vec![("CACHE_BACKEND", "redis")],
            vec![("CACHE_BACKEND", "firestore")],
            vec![
                ("CACHE_BACKEND", "redis"),
                ("REDIS_URL", "redis://h/"),
                ("REDIS_RESPONSE_TIMEOUT_MS", "x"),
            ],
        ] {
            let err = StoreConfig::from_vars(vars(&bad)).unwrap_err();
            assert!(
                matches!(err, CacheError::Configuration(_)),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_settings_are_read_and_the_password_stays_hidden() {
        let config = StoreConfig::from_vars(vars(&[
            ("CACHE_BACKEND", "redis"),
            ("REDIS_URL", "redis://svc:s3cret@10.0.0.1:6379/1"),
            ("REDIS_KEY_PREFIX", "app:"),
        ]))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(
            debug.contains("Redis") && debug.contains("10.0.0.1:6379") && debug.contains("app:"),
            "{debug}"
        );
        assert!(!debug.contains("s3cret"), "{debug}");
        let cluster = StoreConfig::from_vars(vars(&[
            ("CACHE_BACKEND", "redis"),
            (
                "REDIS_CLUSTER_URLS",
                "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
            ),
        ]))
        .unwrap();
        assert!(format!("{cluster:?}").contains("cluster: true"));
    }

    /// The variables of services that configure Redis by its parts (`REDIS_HOST`, ...).
    #[cfg(feature = "redis")]
    #[test]
    fn redis_by_host_port_db_and_password_keeps_the_password_hidden() {
        let config = StoreConfig::from_vars(vars(&[
            ("CACHE_BACKEND", "redis"),
            ("REDIS_HOST", "10.0.0.3"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "2"),
            ("REDIS_PASSWORD", "p@ss:w/rd#1"),
        ]))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("10.0.0.3:6380"), "{debug}");
        assert!(!debug.contains("p@ss"), "{debug}");
        let StoreConfig::Redis(redis) = &config else {
            panic!("{debug}")
        };
        assert_eq!(redis.endpoint(), "10.0.0.3:6380");
        let defaults = StoreConfig::from_vars(vars(&[
            ("CACHE_BACKEND", "redis"),
            ("REDIS_HOST", "cache.internal"),
        ]))
        .unwrap();
        assert!(format!("{defaults:?}").contains("cache.internal:6379"));
        for (bad, named) in [
            (vec![("REDIS_PORT", "0")], "REDIS_PORT"),
            (vec![("REDIS_PORT", "65536")], "REDIS_PORT"),
            (vec![("REDIS_DB", "-1")], "REDIS_DB"),
            (vec![("REDIS_DB", "one")], "REDIS_DB"),
            (vec![("REDIS_USERNAME", "svc")], "REDIS_PASSWORD"),
            (
                vec![("REDIS_URL", "redis://h/")],
                "or a URL (REDIS_URL, REDIS_CLUSTER_URLS), not both",
            ),
            (vec![("REDIS_HOST", " ")], "REDIS_HOST is empty"),
        ] {
            let mut settings = vec![("CACHE_BACKEND", "redis"), ("REDIS_HOST", "h")];
            settings.retain(|(name, _)| !bad.iter().any(|(b, _)| b == name));
            settings.extend(bad.iter().copied());
            let err = StoreConfig::from_vars(vars(&settings)).unwrap_err();
            assert!(
                matches!(&err, CacheError::Configuration(m) if m.contains(named)),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn a_zero_or_absurd_redis_timeout_is_refused_naming_the_variable() {
        for ms in ["0", "3600001"] {
            let err = StoreConfig::from_vars(vars(&[
                ("CACHE_BACKEND", "redis"),
                ("REDIS_URL", "redis://h/"),
                ("REDIS_RESPONSE_TIMEOUT_MS", ms),
            ]))
            .unwrap_err();
            assert!(
                matches!(&err, CacheError::Configuration(m) if m.contains("REDIS_RESPONSE_TIMEOUT_MS")),
                "{ms}: {err:?}"
            );
        }
    }

    #[cfg(feature = "firestore")]
    #[test]
    fn firestore_settings_are_read() {
        let config = StoreConfig::from_vars(vars(&[
            ("CACHE_BACKEND", "firestore"),
            ("FIRESTORE_PROJECT_ID", "phoenix"),
            ("CACHE_COLLECTION_NAME", "cache_sessions"),
        ]))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(
            debug.contains("phoenix") && debug.contains("cache_sessions"),
            "{debug}"
        );
    }
}
