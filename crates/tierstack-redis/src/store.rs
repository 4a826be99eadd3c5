//! `RedisStore`: the byte [`Store`] on standalone Redis or Redis Cluster.

use std::fmt;
use std::io::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Cmd, FromRedisValue, Pipeline, RedisWrite, ToRedisArgs, Value, cmd, pipe};
use tierstack_core::backplane::{BackplaneHub, Invalidation};
use tierstack_core::clock::{Clock, SystemClock};
use tierstack_core::envelope::{self, Envelope};
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, validate_key};
use tierstack_core::store::{
    MAX_TTL, Store, StoreWrite, StoredEntry, validate_prefix, validate_ttl,
};
use tierstack_core::{CacheError, Result};

use crate::backplane::RedisBackplane;
use crate::config::RedisConfig;
use crate::connection::{Connection, Sent, by_slot};
use crate::errors::{is_out_of_memory, is_wrong_type};

/// `expire` of one key: its TTL and, if its bytes are an envelope, the expiry written in them,
/// in one atomic step (so that `get_with_ttl` can read the remaining time from the bytes). Keys
/// of other types, and strings that are no envelope, get a plain `PEXPIRE`; a tombstone is left
/// as it is (0: no entry).
static EXPIRE_SCRIPT: LazyLock<String> = LazyLock::new(|| {
    let magic = String::from_utf8_lossy(&envelope::MAGIC).into_owned();
    format!(
        "local kind = redis.call('TYPE', KEYS[1]).ok
         if kind == 'none' then return 0 end
         if kind == 'string' then
           local value = redis.call('GET', KEYS[1])
           if #value >= {header} and string.sub(value, 1, 2) == '{magic}' then
             if math.floor(string.byte(value, 5) / 2) % 2 == 1 then return 0 end
             redis.call('SET', KEYS[1],
               string.sub(value, 1, {before}) .. ARGV[2] .. string.sub(value, {after}),
               'PX', ARGV[1])
             return 1
           end
         end
         return redis.call('PEXPIRE', KEYS[1], ARGV[1])",
        header = envelope::HEADER_LEN,
        before = envelope::EXPIRES_AT.start,
        after = envelope::EXPIRES_AT.end + 1,
    )
});

/// `compare_and_set` of one key: writes `ARGV[2]` for `ARGV[3]` ms (or, without them, removes
/// the key) only if the key's bytes are `ARGV[1]`. A key of another type reads as empty bytes,
/// as in `get`.
const COMPARE_AND_SET_SCRIPT: &str = "local kind = redis.call('TYPE', KEYS[1]).ok
     if kind == 'none' then return 0 end
     local value = ''
     if kind == 'string' then value = redis.call('GET', KEYS[1]) end
     if value ~= ARGV[1] then return 0 end
     if #ARGV == 1 then redis.call('UNLINK', KEYS[1])
     else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
     return 1";

/// What becomes of a write that gets no reply and reaches Redis later.
#[derive(Clone, Copy)]
enum Late {
    /// It lands: a removal or an expiry landing late over a newer write costs that write a
    /// reload at most.
    Lands,
    /// It is taken back (see `take_back`): a value landing late over a newer one would be
    /// served for its whole TTL, and a delete's tombstone landing late over one would pass
    /// for the key's last write (older than the one it hid) to the replay of a write kept by
    /// a cache with write recovery, which would then write an older value over it.
    TakenBack,
}

/// How many keys one SCAN step asks for, and one UNLINK removes, during `delete_prefix`.
const SCAN_BATCH: usize = 1_000;

/// A [`Store`] on Redis: standalone or cluster, one connection that reconnects by itself,
/// bounded and timed requests, bulk operations in one round trip (one pipeline per slot in a
/// cluster, sent together), and `delete_prefix` by SCAN with escaped patterns, never KEYS.
///
/// Entries expire by Redis's own TTL (`PX`), so [`sweep_expired`](Store::sweep_expired) has
/// nothing to do.
///
/// A store connected with its backplane ([`connect_with_backplane`](Self::connect_with_backplane))
/// announces its own key writes: each `set`, `set_many`, `replace`, `delete`, `delete_many` and
/// `expire` sends the invalidation of its keys right after the write, in the same pipeline.
/// (`compare_and_set` is not announced: it only replaces what its caller read, which no instance
/// serves as a value.)
///
/// Needs Redis 6.2 or later (`SET … GET`).
#[derive(Clone)]
pub struct RedisStore {
    conn: Connection,
    prefix: Arc<str>,
    max_value_len: usize,
    /// Set when the store announces its writes on its backplane's channel.
    announcer: Option<Arc<Announcer>>,
}

/// What a store needs to announce its writes: the backplane's hub (its origin id, so that the
/// writer does not evict its own L1) and channel.
struct Announcer {
    hub: BackplaneHub,
    channel: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("endpoint", &self.conn.endpoint())
            .field("cluster", &self.conn.is_cluster())
            .field("prefix", &&*self.prefix)
            .finish_non_exhaustive()
    }
}

/// The largest value a `RedisStore` writes by default: 64 MiB (Redis itself allows 512 MiB).
pub const DEFAULT_MAX_VALUE_LEN: usize = 64 * 1024 * 1024;

impl RedisStore {
    /// Connects to Redis, failing with [`CacheError::Connection`] (naming the host, never the
    /// password) within the connect timeout when it is unreachable, or with
    /// [`CacheError::Authentication`] when it refuses the credentials. A configuration that
    /// [`RedisConfig::validate`] refuses fails before any connection is tried.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        config.validate()?;
        let conn = Connection::connect(config).await?;
        let store = Self {
            conn,
            prefix: config.key_prefix.as_str().into(),
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            announcer: None,
        };
        // Checks the credentials' rights now rather than on the first cache miss.
        store.ping().await?;
        Ok(store)
    }

    /// Connects a store and the backplane that carries its invalidations, paired: on a
    /// standalone server the store announces each of its key writes on the backplane's channel
    /// in the write's own pipeline (`SET` then `PUBLISH`: one round trip, and subscribers hear
    /// of a write only after it happened, whether or not the writer waited for the reply), and
    /// the backplane tells the composer so
    /// ([`Backplane::publishes_store_writes`](tierstack_core::Backplane::publishes_store_writes)).
    ///
    /// The announcement travels with the store, so a decorator around it (a
    /// `MigratingStore`, fault injection, a user's own) keeps every write announced. On a
    /// cluster, where a write and a publish may go to different nodes, the two are returned
    /// unpaired: the composer publishes after each write.
    ///
    /// Writes are announced for keys of the form `namespace:key` (the keys of a
    /// `TieredCache`); other keys are written without an announcement.
    pub async fn connect_with_backplane(config: &RedisConfig) -> Result<(Self, RedisBackplane)> {
        let mut store = Self::connect(config).await?;
        let mut backplane = RedisBackplane::connect(config).await?;
        if !store.conn.is_cluster() {
            store.announcer = Some(Arc::new(Announcer {
                hub: backplane.hub().clone(),
                channel: config.channel_name(),
            }));
            backplane.mark_store_publishes();
        }
        Ok((store, backplane))
    }
    /// Refuses values over `max` bytes with [`CacheError::ValueTooLarge`] before sending them.
    #[must_use]
    pub fn max_value_len(mut self, max: usize) -> Self {
        self.max_value_len = max;
        self
    }

    /// The Redis key of `key`: the configured prefix, then the key.
    pub fn redis_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len());
        out.push_str(&self.prefix);
        out.push_str(key);
        out
    }

    /// The command `name key`, with buffers sized for `more_args` further arguments of
    /// `more_bytes` bytes in all, so that building it allocates once and never regrows (the key
    /// goes straight into the buffer, prefix and all: no `String` per request).
    fn key_command(
        &self,
        name: &str,
        key: &str,
        more_args: usize,
        more_bytes: usize,
    ) -> Result<Cmd> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let bytes = name.len() + self.prefix.len() + key.len() + more_bytes;
        let mut command = Cmd::with_capacity(2 + more_args, bytes);
        command.arg(name).arg(PrefixedKey {
            prefix: &self.prefix,
            key,
        });
        Ok(command)
    }

    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    fn checked_key(&self, key: &str) -> Result<String> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        Ok(self.redis_key(key))
    }

    fn check_value(&self, value: &Bytes) -> Result<()> {
        if value.len() > self.max_value_len {
            return Err(CacheError::ValueTooLarge {
                size: value.len(),
                max: self.max_value_len,
            });
        }
        Ok(())
    }

    /// GET and PTTL of every key, one pipeline per slot group, all groups at once.
    async fn read_with_ttl(&self, keys: &[String]) -> Result<Vec<Option<StoredEntry>>> {
        let groups = by_slot(self.conn.is_cluster(), keys.iter().map(String::as_str));
        let requests = groups.iter().map(|group| {
            let mut pipeline = pipe();
            for &index in group {
                pipeline.get(&keys[index]).pttl(&keys[index]);
            }
            pipeline.ignore_errors();
            async move {
                let values: Vec<Value> = self.conn.pipeline("get", &pipeline).await?;
                Ok::<_, CacheError>((group, values))
            }
        });
        let mut out = vec![None; keys.len()];
        for result in futures_util::future::join_all(requests).await {
            let (group, values) = result?;
            if values.len() != group.len() * 2 {
                return Err(CacheError::backend("get", true, "short pipeline reply"));
            }
            for (&index, pair) in group.iter().zip(values.chunks_exact(2)) {
                out[index] = self.entry_of(&pair[0], &pair[1])?;
            }
        }
        Ok(out)
    }

    /// The entry of a `GET` and `PTTL` pair of replies (from a pipeline that keeps each
    /// command's refusal). A key of another type (a list, a hash: foreign data under a cache
    /// key) reads as an empty value, which is no envelope: the composer counts it as corrupt and
    /// deletes it, and the next load replaces it.
    fn entry_of(&self, value: &Value, pttl: &Value) -> Result<Option<StoredEntry>> {
        match (value, pttl) {
            (Value::ServerError(refusal), _) if refusal.code() == "WRONGTYPE" => {
                Ok(Some(StoredEntry {
                    value: Bytes::new(),
                    ttl: MAX_TTL,
                }))
            }
            (Value::ServerError(refusal), _) | (_, Value::ServerError(refusal)) => {
                Err(self.conn.refused("get", refusal.clone()))
            }
            _ => entry_from_replies(value, pttl),
        }
    }

    /// The invalidation messages announcing a write of `keys`, one per namespace, or none
    /// when this store does not announce its writes. Keys that are not `namespace:key` are not
    /// announced.
    fn announcements<'k>(&self, keys: impl IntoIterator<Item = &'k str>) -> Vec<Vec<u8>> {
        let Some(announcer) = &self.announcer else {
            return Vec::new();
        };
        let mut by_namespace: Vec<(&str, Vec<String>)> = Vec::new();
        for key in keys {
            let Some((namespace, user_key)) = key.split_once(':') else {
                continue;
            };
            if namespace.is_empty() {
                continue;
            }
            match by_namespace.iter_mut().find(|(ns, _)| *ns == namespace) {
                Some((_, keys)) => keys.push(user_key.to_owned()),
                None => by_namespace.push((namespace, vec![user_key.to_owned()])),
            }
        }
        by_namespace
            .into_iter()
            .filter_map(|(namespace, keys)| {
                // Keys too many for one message (over the backplane's size cap) are announced as
                // the whole namespace: coarser, but nobody keeps a stale copy.
                announcer
                    .hub
                    .encode(namespace, &Invalidation::Keys(keys))
                    .or_else(|_| announcer.hub.encode(namespace, &Invalidation::All))
                    .ok()
            })
            .collect()
    }

    /// Sends `write` and, when this store announces its writes, the `PUBLISH` of each of
    /// `announcements` after it in one pipeline: one round trip, and the server runs them in
    /// that order, so subscribers hear of the write only after it happened. No `MULTI`: an
    /// eviction announced for a write that the server refused is harmless.
    ///
    /// The write's refusal is the call's error; a refused publish (the write stands) is an
    /// error too, naming `publish`, because other instances keep their copy. With
    /// `Late::TakenBack`, a `SET` that gets no reply is taken back (see `take_back`).
    async fn write_announced<T: FromRedisValue>(
        &self,
        operation: &'static str,
        write: Cmd,
        announcements: Vec<Vec<u8>>,
        late: Late,
    ) -> Result<T> {
        let Some(announcer) = self
            .announcer
            .as_ref()
            .filter(|_| !announcements.is_empty())
        else {
            return match late {
                Late::TakenBack => self.conn.write(operation, Sent::Command(&write)).await,
                Late::Lands => self.conn.query(operation, &write).await,
            };
        };
        let mut pipeline = Pipeline::with_capacity(1 + announcements.len());
        // Each command's own reply, a refusal included: the write and the publish fail apart.
        pipeline.add_command(write).ignore_errors();
        for message in announcements {
            let mut publish =
                Cmd::with_capacity(3, "PUBLISH".len() + announcer.channel.len() + message.len());
            publish.arg("PUBLISH").arg(&announcer.channel).arg(message);
            pipeline.add_command(publish);
        }
        let replies: Vec<Value> = match late {
            Late::TakenBack => {
                self.conn
                    .write(operation, Sent::Pipeline(&pipeline))
                    .await?
            }
            Late::Lands => self.conn.pipeline(operation, &pipeline).await?,
        };
        let mut replies = replies.into_iter();
        let written = replies
            .next()
            .ok_or_else(|| CacheError::backend(operation, true, "short pipeline reply"))?;
        if let Value::ServerError(refusal) = written {
            return Err(self.conn.refused(operation, refusal));
        }
        for published in replies {
            if let Value::ServerError(refusal) = published {
                return Err(self.conn.refused("publish", refusal));
            }
        }
        redis::from_redis_value_ref(&written)
            .map_err(|e| CacheError::backend(operation, false, redis::RedisError::from(e)))
    }

    /// UNLINKs `keys` (bytes: SCAN may find keys that are not UTF-8), one call per slot group.
    async fn unlink(&self, keys: &[Vec<u8>]) -> Result<u64> {
        let groups = by_slot(self.conn.is_cluster(), keys.iter().map(Vec::as_slice));
        let requests = groups.iter().map(|group| {
            let mut command = cmd("UNLINK");
            for &index in group {
                command.arg(&keys[index]);
            }
            async move { self.conn.query::<u64>("delete", &command).await }
        });
        let mut removed = 0;
        for result in futures_util::future::join_all(requests).await {
            removed += result?;
        }
        Ok(removed)
    }

    /// SCANs one node (or the standalone server) for `pattern`, unlinking as it goes.
    async fn scan_and_unlink(&self, node: Option<&(String, u16)>, pattern: &str) -> Result<u64> {
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let mut scan: Cmd = cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_BATCH);
            let (next, keys): (u64, Vec<Vec<u8>>) = match node {
                Some(node) => self.conn.query_node("delete_prefix", node, &scan).await?,
                None => self.conn.query("delete_prefix", &scan).await?,
            };
            if !keys.is_empty() {
                removed += self.unlink(&keys).await?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

/// Escapes the glob characters of SCAN MATCH, so that a prefix is matched literally.
pub(crate) fn glob_escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len() + 8);
    for ch in literal.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// A GET reply and a PTTL reply as an entry: PTTL -2 is a missing key, -1 a key without expiry
/// (not written by tierstack; reported with the longest TTL).
fn entry_from_replies(value: &Value, pttl: &Value) -> Result<Option<StoredEntry>> {
    let value: Option<Vec<u8>> = redis::from_redis_value_ref(value)
        .map_err(|e| CacheError::backend("get", false, redis::RedisError::from(e)))?;
    let pttl: i64 = redis::from_redis_value_ref(pttl)
        .map_err(|e| CacheError::backend("get", false, redis::RedisError::from(e)))?;
    let Some(value) = value else { return Ok(None) };
    let ttl = match pttl {
        -1 => MAX_TTL,
        ms if ms > 0 => Duration::from_millis(ms.unsigned_abs()),
        _ => return Ok(None),
    };
    Ok(Some(StoredEntry {
        value: Bytes::from(value),
        ttl,
    }))
}

/// Room for `PX` and a TTL in milliseconds (at most 20 digits).
const MILLIS_ARGS_LEN: usize = 2 + 20;

/// A Redis key as its two parts, the store's prefix and the caller's key.
struct PrefixedKey<'a> {
    prefix: &'a str,
    key: &'a str,
}

impl ToRedisArgs for PrefixedKey<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's own buffer cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.key.as_bytes());
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let command = self.key_command("GET", key, 0, 0)?;
        match self.conn.query::<Option<Vec<u8>>>("get", &command).await {
            Ok(value) => Ok(value.map(Bytes::from)),
            Err(error) if is_wrong_type(&error) => Ok(Some(Bytes::new())),
            Err(error) => Err(error),
        }
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let keys: Vec<String> = keys
            .iter()
            .map(|k| self.checked_key(k))
            .collect::<Result<_>>()?;
        let groups = by_slot(self.conn.is_cluster(), keys.iter().map(String::as_str));
        let requests = groups.iter().map(|group| {
            let mut mget = cmd("MGET");
            for &index in group {
                mget.arg(&keys[index]);
            }
            async move {
                let values: Vec<Option<Vec<u8>>> = self.conn.query("get", &mget).await?;
                Ok::<_, CacheError>((group, values))
            }
        });
        let mut out = vec![None; keys.len()];
        for result in futures_util::future::join_all(requests).await {
            let (group, values) = result?;
            if values.len() != group.len() {
                return Err(CacheError::backend("get", true, "short MGET reply"));
            }
            for (&index, value) in group.iter().zip(values) {
                out[index] = value.map(Bytes::from);
            }
        }
        Ok(out)
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        // The hot read of a cache with an L1: one `GET`. An envelope carries its expiry, which
        // `expire` keeps up to date, so the remaining time needs no `PTTL` (a second command
        // for the server on every read).
        let Some(value) = self.get(key).await? else {
            return Ok(None);
        };
        if let Some(expires_at) = Envelope::expires_at_of(&value) {
            let ttl = SystemClock.now().until(expires_at);
            return Ok(Some(StoredEntry { value, ttl }));
        }
        // Other bytes (not written by a cache, or another type's placeholder): ask the server.
        Ok(self.ttl(key).await?.map(|ttl| StoredEntry { value, ttl }))
    }

    async fn get_many_with_ttl(&self, keys: &[&str]) -> Result<Vec<Option<StoredEntry>>> {
        let keys: Vec<String> = keys
            .iter()
            .map(|k| self.checked_key(k))
            .collect::<Result<_>>()?;
        self.read_with_ttl(&keys).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        validate_ttl(ttl)?;
        self.check_value(&value)?;
        let mut command = self.key_command("SET", key, 3, value.len() + MILLIS_ARGS_LEN)?;
        command.arg(value.as_ref()).arg("PX").arg(millis(ttl));
        let announcements = self.announcements([key]);
        self.write_announced::<()>("set", command, announcements, Late::TakenBack)
            .await
    }

    async fn set_many(&self, writes: &[StoreWrite<'_>]) -> Result<()> {
        // Everything is checked before anything is sent.
        let mut keys = Vec::with_capacity(writes.len());
        for write in writes {
            keys.push(self.checked_key(write.key)?);
            validate_ttl(write.ttl)?;
            self.check_value(&write.value)?;
        }
        let groups = by_slot(self.conn.is_cluster(), keys.iter().map(String::as_str));
        let requests = groups.iter().map(|group| {
            let mut pipeline = pipe();
            for &index in group {
                let write = &writes[index];
                pipeline
                    .cmd("SET")
                    .arg(&keys[index])
                    .arg(write.value.as_ref())
                    .arg("PX")
                    .arg(millis(write.ttl))
                    .ignore();
            }
            // Only a standalone store announces, so this is the one group: the publishes
            // follow every write of the pipeline.
            let announcements = self.announcements(group.iter().map(|&index| writes[index].key));
            if let Some(announcer) = &self.announcer {
                for message in announcements {
                    pipeline
                        .cmd("PUBLISH")
                        .arg(&announcer.channel)
                        .arg(message)
                        .ignore();
                }
            }
            async move {
                self.conn
                    .write::<()>("set", Sent::Pipeline(&pipeline))
                    .await
            }
        });
        for result in futures_util::future::join_all(requests).await {
            result?;
        }
        Ok(())
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        self.check_value(&value)?;
        let mut command = self.key_command("SET", key, 4, value.len() + 2 + MILLIS_ARGS_LEN)?;
        command
            .arg(value.as_ref())
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let reply: Option<String> = self.conn.query("set", &command).await?;
        Ok(reply.is_some())
    }

    /// `SET … GET`, taken back if it gets no reply (a delete's tombstone must not land late
    /// either, see `Late`). A key of another type is replaced by a plain `SET`; on a server
    /// out of memory (`noeviction`), which refuses every write, the key is removed instead: a
    /// delete still frees what it can, without its tombstone.
    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        validate_ttl(ttl)?;
        self.check_value(&value)?;
        let mut command = self.key_command("SET", key, 4, value.len() + 3 + MILLIS_ARGS_LEN)?;
        command
            .arg(value.as_ref())
            .arg("PX")
            .arg(millis(ttl))
            .arg("GET");
        let announcements = self.announcements([key]);
        match self
            .write_announced::<Option<Vec<u8>>>(
                "set",
                command,
                announcements.clone(),
                Late::TakenBack,
            )
            .await
        {
            Ok(old) => Ok(old.map(Bytes::from)),
            // `SET … GET` refuses a key of another type and writes nothing; a plain `SET`
            // replaces it. Like `get`, the foreign value reads as empty bytes.
            Err(error) if is_wrong_type(&error) => {
                let mut command = self.key_command("SET", key, 3, value.len() + MILLIS_ARGS_LEN)?;
                command.arg(value.as_ref()).arg("PX").arg(millis(ttl));
                self.write_announced::<()>("set", command, announcements, Late::TakenBack)
                    .await?;
                Ok(Some(Bytes::new()))
            }
            // A full server (`noeviction`) refuses the write but still removes: the key goes,
            // which frees memory. What it held reads as empty bytes (an entry).
            Err(error) if is_out_of_memory(&error) => {
                let command = self.key_command("UNLINK", key, 0, 0)?;
                let removed: u64 = self
                    .write_announced("delete", command, announcements, Late::Lands)
                    .await?;
                Ok((removed > 0).then(Bytes::new))
            }
            Err(error) => Err(error),
        }
    }

    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        if let Some((value, ttl)) = &new {
            validate_ttl(*ttl)?;
            self.check_value(value)?;
        }
        let new_len = new.as_ref().map_or(0, |(value, _)| value.len());
        let mut command = Cmd::with_capacity(
            7,
            COMPARE_AND_SET_SCRIPT.len()
                + self.prefix.len()
                + key.len()
                + current.len()
                + new_len
                + MILLIS_ARGS_LEN
                + 16,
        );
        command
            .arg("EVAL")
            .arg(COMPARE_AND_SET_SCRIPT)
            .arg(1)
            .arg(PrefixedKey {
                prefix: &self.prefix,
                key,
            })
            .arg(current);
        if let Some((value, ttl)) = &new {
            command.arg(value.as_ref()).arg(millis(*ttl));
        }
        // Not announced: it only replaces what its caller read, which no instance serves (a
        // tombstone, undecodable bytes) or serves as "not found" (a negative entry).
        let written: u64 = self.conn.query("compare_and_set", &command).await?;
        Ok(written > 0)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let command = self.key_command("UNLINK", key, 0, 0)?;
        let announcements = self.announcements([key]);
        let removed: u64 = self
            .write_announced("delete", command, announcements, Late::Lands)
            .await?;
        Ok(removed > 0)
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let redis_keys: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| self.checked_key(k).map(String::into_bytes))
            .collect::<Result<_>>()?;
        if self.announcer.is_some() && !keys.is_empty() {
            // Standalone: one UNLINK, announced.
            let mut command = cmd("UNLINK");
            for key in &redis_keys {
                command.arg(key);
            }
            let announcements = self.announcements(keys.iter().copied());
            return self
                .write_announced("delete", command, announcements, Late::Lands)
                .await;
        }
        self.unlink(&redis_keys).await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let command = self.key_command("EXISTS", key, 0, 0)?;
        let count: u64 = self.conn.query("exists", &command).await?;
        Ok(count > 0)
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        validate_ttl(ttl)?;
        let expires_at = SystemClock.now().saturating_add(ttl).as_millis();
        let mut command = Cmd::with_capacity(
            6,
            EXPIRE_SCRIPT.len() + self.prefix.len() + key.len() + MILLIS_ARGS_LEN + 16,
        );
        command
            .arg("EVAL")
            .arg(EXPIRE_SCRIPT.as_str())
            .arg(1)
            .arg(PrefixedKey {
                prefix: &self.prefix,
                key,
            })
            .arg(millis(ttl))
            .arg(&expires_at.to_le_bytes()[..]);
        let announcements = self.announcements([key]);
        let updated: u64 = self
            .write_announced("expire", command, announcements, Late::Lands)
            .await?;
        Ok(updated > 0)
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        let command = self.key_command("PTTL", key, 0, 0)?;
        let pttl: i64 = self.conn.query("ttl", &command).await?;
        Ok(match pttl {
            -1 => Some(MAX_TTL),
            ms if ms > 0 => Some(Duration::from_millis(ms.unsigned_abs())),
            _ => None,
        })
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        validate_prefix(prefix)?;
        validate_key(prefix, DEFAULT_MAX_STORE_KEY_LEN)?;
        let pattern = format!("{}*", glob_escape(&self.redis_key(prefix)));
        if !self.conn.is_cluster() {
            return self.scan_and_unlink(None, &pattern).await;
        }
        let primaries = self.conn.primaries().await?;
        let scans = primaries
            .iter()
            .map(|node| self.scan_and_unlink(Some(node), &pattern));
        let mut removed = 0;
        for result in futures_util::future::join_all(scans).await {
            removed += result?;
        }
        Ok(removed)
    }

    async fn ping(&self) -> Result<()> {
        let reply: String = self.conn.query("ping", &cmd("PING")).await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(CacheError::backend(
                "ping",
                true,
                format!("unexpected PING reply {reply:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?c[d]e\\f"), "a\\*b\\?c\\[d\\]e\\\\f");
        assert_eq!(glob_escape("ü:日本"), "ü:日本");
    }

    #[test]
    fn pttl_replies_map_to_entries() {
        let value = Value::BulkString(b"v".to_vec());
        assert_eq!(
            entry_from_replies(&Value::Nil, &Value::Int(-2)).unwrap(),
            None
        );
        assert_eq!(
            entry_from_replies(&value, &Value::Int(-2)).unwrap(),
            None,
            "expired between GET and PTTL"
        );
        assert_eq!(
            entry_from_replies(&value, &Value::Int(1500))
                .unwrap()
                .unwrap()
                .ttl,
            Duration::from_millis(1500)
        );
        assert_eq!(
            entry_from_replies(&value, &Value::Int(-1))
                .unwrap()
                .unwrap()
                .ttl,
            MAX_TTL
        );
    }
}
