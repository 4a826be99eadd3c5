//! Typed helpers for the Redis data structures that services use beside a cache: session
//! hashes, capped lists, a sliding-window rate limiter and leases.
//!
//! Every multi-step operation is one script or one `MULTI`, so it is atomic, and every key of a
//! session carries the session id as a hash tag (`{id}`), so a session's keys share one cluster
//! slot and one script can reach them all.
//!
//! Their keys start with `@` after the store's prefix (`PREFIX @lease:NAME`). A cache key is
//! `NAMESPACE:KEY` and a namespace holds only `[A-Za-z0-9_.-]`, so no cache key, and no
//! `delete_prefix` of a cache, can reach a structure's keys. Every part a caller names (a
//! limiter and its subject, a session id, a list name) is escaped with
//! [`compose_key`](tierstack_core::key::compose_key), so parts that contain `:` never run into
//! each other: limiter `api` with subject `v1:alice` and limiter `api:v1` with subject `alice`
//! count apart.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::{Script, cmd, pipe};
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, compose_key, validate_key};
use tierstack_core::store::validate_ttl;
use tierstack_core::{CacheError, Result};

use crate::connection::Connection;
use crate::store::RedisStore;

/// The first character of every structure key (after the store's prefix): outside the namespace
/// alphabet, so that no cache key can spell a structure key.
const STRUCTURE_MARK: char = '@';

/// The Redis key of a structure: the store's prefix, `@`, then its kind and `parts`, each
/// escaped and joined by `:`.
pub(crate) fn structure_key(store: &RedisStore, kind: &str, parts: &[&str]) -> String {
    let mut all = Vec::with_capacity(parts.len() + 1);
    all.push(kind);
    all.extend_from_slice(parts);
    store.redis_key(&format!("{STRUCTURE_MARK}{}", compose_key(&all)))
}

pub(crate) fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// A random 128-bit token in hex, unique per call (random seed, process id, time, counter).
pub(crate) fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    let high = hasher.finish();
    hasher.write_u64(high);
    format!("{high:016x}{:016x}", hasher.finish())
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// Extends every key listed in a session's registry, and the registry itself.
static TOUCH_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local members = redis.call('SMEMBERS', KEYS[1])
          if #members == 0 then return 0 end
          local extended = 0
          for _, key in ipairs(members) do
            extended = extended + redis.call('PEXPIRE', key, ARGV[1])
          end
          redis.call('PEXPIRE', KEYS[1], ARGV[1])
          return extended",
    )
});

/// Unlinks every key listed in a session's registry, and the registry itself.
static DELETE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local members = redis.call('SMEMBERS', KEYS[1])
          local removed = 0
          for _, key in ipairs(members) do
            removed = removed + redis.call('UNLINK', key)
          end
          redis.call('UNLINK', KEYS[1])
          return removed",
    )
});

/// Sessions as Redis hashes: partial updates of fields, reads, a touch that extends
/// *every* key of the session (its hash and its lists), and a delete of all of them.
///
/// A session's keys are `PREFIX @session:{ID}:meta` (the hash), `PREFIX @session:{ID}:list:NAME`
/// (its lists) and `PREFIX @session:{ID}:keys` (the registry of the others), with `ID` and
/// `NAME` escaped.
#[derive(Clone)]
pub struct Sessions {
    conn: Connection,
    prefix: String,
    ttl: Duration,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// Sessions on `store`'s connection and key prefix, living `ttl` after each write or touch.
    pub fn new(store: &RedisStore, ttl: Duration) -> Result<Self> {
        validate_ttl(ttl)?;
        Ok(Self {
            conn: store.connection().clone(),
            prefix: structure_key(store, "session", &[""]),
            ttl,
        })
    }

    fn key(&self, id: &str, suffix: &str) -> Result<String> {
        validate_key(id, DEFAULT_MAX_STORE_KEY_LEN)?;
        // The escaped id holds no `:`, so the key reads back as exactly one id and suffix; and
        // no brace, so the hash tag is the whole id whatever it holds (an id of `}` would
        // otherwise end the tag early, and the session's keys would land in different slots).
        let id = compose_key(&[id]).replace('{', "%7B").replace('}', "%7D");
        Ok(format!("{}{{{id}}}:{suffix}", self.prefix))
    }

    /// Sets `fields` of session `id` (other fields stay), and restarts its time to live.
    pub async fn set_fields(&self, id: &str, fields: &[(&str, &[u8])]) -> Result<()> {
        if fields.is_empty() {
            return Ok(());
        }
        let (meta, registry) = (self.key(id, "meta")?, self.key(id, "keys")?);
        let ttl = millis(self.ttl);
        let mut hset = cmd("HSET");
        hset.arg(&meta);
        for (field, value) in fields {
            hset.arg(*field).arg(*value);
        }
        let mut atomic = pipe();
        atomic
            .atomic()
            .add_command(hset)
            .ignore()
            .cmd("SADD")
            .arg(&registry)
            .arg(&meta)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&meta)
            .arg(ttl)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&registry)
            .arg(ttl)
            .ignore();
        self.conn.pipeline::<()>("session set", &atomic).await
    }

    /// Every field of session `id`, or `None` if there is no such session.
    pub async fn get(&self, id: &str) -> Result<Option<HashMap<String, Bytes>>> {
        let meta = self.key(id, "meta")?;
        let fields: HashMap<String, Vec<u8>> = self
            .conn
            .query("session get", cmd("HGETALL").arg(&meta))
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            fields
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
        ))
    }

    /// One field of session `id`.
    pub async fn get_field(&self, id: &str, field: &str) -> Result<Option<Bytes>> {
        let meta = self.key(id, "meta")?;
        let value: Option<Vec<u8>> = self
            .conn
            .query("session get", cmd("HGET").arg(&meta).arg(field))
            .await?;
        Ok(value.map(Bytes::from))
    }

    /// Removes `fields` from session `id`; returns how many existed.
    pub async fn remove_fields(&self, id: &str, fields: &[&str]) -> Result<u64> {
        if fields.is_empty() {
            return Ok(0);
        }
        let meta = self.key(id, "meta")?;
        let mut hdel = cmd("HDEL");
        hdel.arg(&meta).arg(fields);
        self.conn.query("session set", &hdel).await
    }

    /// Restarts the time to live of every key of session `id`;
    /// returns how many keys were extended (0: no such session).
    pub async fn touch(&self, id: &str) -> Result<u64> {
        let registry = self.key(id, "keys")?;
        let mut invocation = TOUCH_SESSION.key(&registry);
        invocation.arg(millis(self.ttl));
        self.conn.script("session touch", &invocation).await
    }

    /// Deletes every key of session `id`; returns how many existed (besides the registry).
    pub async fn delete(&self, id: &str) -> Result<u64> {
        let registry = self.key(id, "keys")?;
        self.conn
            .script("session delete", &DELETE_SESSION.key(&registry))
            .await
    }

    /// The capped list `name` of session `id`, keeping the last `max_len` items; it lives and
    /// dies with the session.
    /// Fails like [`CappedList::new`] for a `max_len` of 0 or above [`CappedList::MAX_LEN`].
    pub fn list(&self, id: &str, name: &str, max_len: usize) -> Result<CappedList> {
        validate_cap(max_len)?;
        Ok(CappedList {
            conn: self.conn.clone(),
            key: self.key(id, &compose_key(&["list", name]))?,
            registry: Some(self.key(id, "keys")?),
            max_len,
            ttl: self.ttl,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Capped lists

/// Appends, trims to the last N and sets the TTL; registers the list with its session if any.
/// Checks its arguments before the first write, so that it never pushes and then fails.
static APPEND_CAPPED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local cap = tonumber(ARGV[2])
          local ttl = tonumber(ARGV[3])
          if not cap or cap < 1 or cap > 4294967295 or cap % 1 ~= 0 then
            return redis.error_reply('ERR capped list: the cap must be a whole number from 1 to 4294967295')
          end
          if not ttl or ttl < 1 or ttl % 1 ~= 0 then
            return redis.error_reply('ERR capped list: the ttl must be a whole number of milliseconds')
          end
          redis.call('RPUSH', KEYS[1], ARGV[1])
          redis.call('LTRIM', KEYS[1], -cap, -1)
          redis.call('PEXPIRE', KEYS[1], ARGV[3])
          if KEYS[2] then
            redis.call('SADD', KEYS[2], KEYS[1])
            if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[3]) then
              redis.call('PEXPIRE', KEYS[2], ARGV[3])
            end
          end
          return redis.call('LLEN', KEYS[1])",
    )
});

/// A list that keeps its last `max_len` items (a session's response chain): append with trim in
/// one atomic step, ranges, and the last item in O(1).
#[derive(Clone)]
pub struct CappedList {
    conn: Connection,
    key: String,
    registry: Option<String>,
    max_len: usize,
    ttl: Duration,
}

impl fmt::Debug for CappedList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CappedList")
            .field("max_len", &self.max_len)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Refuses a cap of 0 or one beyond the longest list Redis keeps.
fn validate_cap(max_len: usize) -> Result<()> {
    if max_len == 0 {
        return Err(CacheError::Configuration(
            "a capped list keeps at least one item".into(),
        ));
    }
    if max_len > CappedList::MAX_LEN {
        return Err(CacheError::Configuration(format!(
            "a capped list keeps at most {} items (the longest list Redis keeps), not {max_len}",
            CappedList::MAX_LEN
        )));
    }
    Ok(())
}

impl CappedList {
    /// The largest cap: Redis keeps at most 2^32 - 1 items in a list.
    pub const MAX_LEN: usize = 4_294_967_295;

    /// The capped list `name` on `store`, keeping the last `max_len` items for `ttl` after the
    /// last append.
    ///
    /// Fails with [`CacheError::Configuration`] for a `max_len` of 0 or above
    /// [`MAX_LEN`](Self::MAX_LEN), before anything is written.
    pub fn new(store: &RedisStore, name: &str, max_len: usize, ttl: Duration) -> Result<Self> {
        validate_key(name, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        validate_cap(max_len)?;
        Ok(Self {
            conn: store.connection().clone(),
            key: structure_key(store, "list", &[name]),
            registry: None,
            max_len,
            ttl,
        })
    }

    /// Appends `item`, dropping the oldest beyond the cap; returns the new length.
    pub async fn append(&self, item: &[u8]) -> Result<u64> {
        let mut invocation = APPEND_CAPPED.key(&self.key);
        if let Some(registry) = &self.registry {
            invocation.key(registry);
        }
        invocation.arg(item).arg(self.max_len).arg(millis(self.ttl));
        self.conn.script("list append", &invocation).await
    }

    /// Items `start..=stop` (negative counts from the end, as in `LRANGE`).
    pub async fn range(&self, start: i64, stop: i64) -> Result<Vec<Bytes>> {
        let items: Vec<Vec<u8>> = self
            .conn
            .query(
                "list range",
                cmd("LRANGE").arg(&self.key).arg(start).arg(stop),
            )
            .await?;
        Ok(items.into_iter().map(Bytes::from).collect())
    }

    /// Every item, oldest first.
    pub async fn all(&self) -> Result<Vec<Bytes>> {
        self.range(0, -1).await
    }

    /// The newest item.
    pub async fn last(&self) -> Result<Option<Bytes>> {
        let item: Option<Vec<u8>> = self
            .conn
            .query("list last", cmd("LINDEX").arg(&self.key).arg(-1))
            .await?;
        Ok(item.map(Bytes::from))
    }

    /// The number of items.
    pub async fn len(&self) -> Result<u64> {
        self.conn
            .query("list len", cmd("LLEN").arg(&self.key))
            .await
    }

    /// Whether the list has no items.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limiting

/// Sliding window on the server's clock: drop what left the window, count, admit if under the
/// limit. Returns {admitted, count, retry-after ms}.
static RATE_HIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local t = redis.call('TIME')
          local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
          local window = tonumber(ARGV[1])
          redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
          local count = redis.call('ZCARD', KEYS[1])
          if count < tonumber(ARGV[2]) then
            redis.call('ZADD', KEYS[1], now, ARGV[3])
            redis.call('PEXPIRE', KEYS[1], window)
            return {1, count + 1, 0}
          end
          local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
          return {0, count, tonumber(oldest[2]) + window - now}",
    )
});

/// Counts the requests in the window without recording one.
static RATE_COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local t = redis.call('TIME')
          local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
          return redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')",
    )
});

/// What [`RateLimiter::hit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request is within the limit (and was recorded).
    pub allowed: bool,
    /// Requests in the window, this one included if it was allowed.
    pub count: u64,
    /// When refused: how long until the oldest request leaves the window.
    pub retry_after: Option<Duration>,
}

/// A sliding-window rate limiter: at most `limit` requests per subject in any
/// `window`, decided atomically by one script on the server's clock (so instances with skewed
/// clocks agree).
#[derive(Clone)]
pub struct RateLimiter {
    conn: Connection,
    prefix: String,
    limit: u64,
    window: Duration,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("prefix", &self.prefix)
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter named `name` on `store`, admitting `limit` requests per subject per `window`.
    pub fn new(store: &RedisStore, name: &str, limit: u64, window: Duration) -> Result<Self> {
        validate_key(name, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(window)?;
        if limit == 0 {
            return Err(CacheError::Configuration(
                "a rate limit must admit at least one request".into(),
            ));
        }
        Ok(Self {
            conn: store.connection().clone(),
            prefix: structure_key(store, "ratelimit", &[name, ""]),
            limit,
            window,
        })
    }

    fn key(&self, subject: &str) -> Result<String> {
        validate_key(subject, DEFAULT_MAX_STORE_KEY_LEN)?;
        Ok(format!("{}{}", self.prefix, compose_key(&[subject])))
    }

    /// Records a request of `subject` if it is within the limit.
    pub async fn hit(&self, subject: &str) -> Result<RateDecision> {
        let key = self.key(subject)?;
        let mut invocation = RATE_HIT.key(&key);
        invocation
            .arg(millis(self.window))
            .arg(self.limit)
            .arg(unique_token());
        let (allowed, count, retry_ms): (u8, u64, i64) =
            self.conn.script("rate limit", &invocation).await?;
        Ok(RateDecision {
            allowed: allowed == 1,
            count,
            retry_after: (allowed == 0)
                .then(|| Duration::from_millis(retry_ms.max(0).unsigned_abs())),
        })
    }

    /// The requests of `subject` in the current window.
    pub async fn count(&self, subject: &str) -> Result<u64> {
        let key = self.key(subject)?;
        let mut invocation = RATE_COUNT.key(&key);
        invocation.arg(millis(self.window));
        self.conn.script("rate limit", &invocation).await
    }
}

// ---------------------------------------------------------------------------------------------
// Leases

/// Deletes the lease only if it still holds this token.
static RELEASE_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
          end
          return 0",
    )
});

/// Extends the lease only if it still holds this token.
static EXTEND_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('PEXPIRE', KEYS[1], ARGV[2])
          end
          return 0",
    )
});

/// A lease (a lock with an expiry) held under a random token: only its holder can release or
/// extend it, and it frees itself when its time runs out, so a crashed holder cannot block
/// others for ever.
pub struct Lease {
    conn: Connection,
    key: String,
    token: String,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Takes the lease `name` on `store` for `ttl` if nobody holds it.
    pub async fn acquire(store: &RedisStore, name: &str, ttl: Duration) -> Result<Option<Self>> {
        validate_key(name, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let key = structure_key(store, "lease", &[name]);
        let token = unique_token();
        let mut set = cmd("SET");
        set.arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let acquired: Option<String> = store.connection().query("lease", &set).await?;
        Ok(acquired.map(|_| Self {
            conn: store.connection().clone(),
            key,
            token,
        }))
    }

    /// Extends the lease to `ttl` from now; `false` if it was lost (expired, or taken by another).
    pub async fn extend(&self, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        let mut invocation = EXTEND_LEASE.key(&self.key);
        invocation.arg(&self.token).arg(millis(ttl));
        Ok(self.conn.script::<u64>("lease", &invocation).await? == 1)
    }

    /// Releases the lease; `false` if it had already been lost.
    pub async fn release(self) -> Result<bool> {
        let mut invocation = RELEASE_LEASE.key(&self.key);
        invocation.arg(&self.token);
        Ok(self.conn.script::<u64>("lease", &invocation).await? == 1)
    }
}
