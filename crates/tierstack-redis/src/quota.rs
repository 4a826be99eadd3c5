//! A quota ledger: how many entries and bytes each subject (a tenant, say) holds, counted in
//! Redis so that every instance of a service enforces one quota together.
//!
//! The ledger keeps, per subject, each entry's size and expiry. An entry leaves it when it is
//! released (deleted) or when its TTL has passed, so a subject's usage follows its live entries
//! without a scan of the keyspace. Every call is one script, so a reservation is atomic: two
//! instances cannot both admit the write that crosses the quota.
//!
//! A reservation never lowers what the ledger holds for an entry: it keeps the larger size and
//! the later expiry of the old record and the write's, since the write may fail (or its
//! condition not hold) and leave the old value in place. Once the write has landed,
//! [`settle`](QuotaLedger::settle) records it exactly, also when a delete released its record
//! while it was in flight: settle every write that lands.
//!
//! A removal that may not happen (a compare-and-set, a delete that can fail)
//! [`hold`](QuotaLedger::hold)s the entry's record rather than releasing it: the record keeps
//! counting, apart from any record a write of the entry makes meanwhile, until
//! [`finish`](QuotaLedger::finish) drops it or merges it back. Releasing first would free room
//! that a removal which then fails never gave up; releasing after would drop the record of a
//! write that landed in between.

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, cmd};
use tierstack_core::Result;
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, compose_key, validate_key};
use tierstack_core::store::validate_ttl;

use crate::connection::Connection;
use crate::store::RedisStore;
use crate::structures::{millis, structure_key};

/// At most this many expired entries are dropped from a subject's ledger per call: a call's
/// work stays bounded however many entries expired since the last one.
const PURGE_PER_CALL: u32 = 1_000;

/// Entries looked at per `HSCAN` round of a prefix release.
const SCAN_COUNT: u32 = 1_000;

/// The common start of every ledger script: the server's time, and the expired entries
/// dropped (at most `ARGV[1]`). KEYS: sizes (hash), expiries (sorted set), bytes (string).
const PURGE: &str = r"
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
    for _, member in ipairs(expired) do
      local size = redis.call('HGET', KEYS[1], member)
      if size then redis.call('DECRBY', KEYS[3], size) end
      redis.call('HDEL', KEYS[1], member)
      redis.call('ZREM', KEYS[2], member)
    end
    -- The total is the sum of the sizes: with no sizes (released, or expired in Redis with
    -- the hash), there is nothing to count.
    if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[3]) end
";

/// Admits a batch of writes if, all together, they keep the subject within its quota (or do
/// not raise what is already over it). An entry's record only grows: the larger size and the
/// later expiry of the old record and the write's. ARGV: purge limit, max entries, max bytes,
/// then (member, size, ttl ms) per write. Returns {0 admitted | 1 entries | 2 bytes, entries,
/// bytes, 1 if a record holds more than its write asked (to settle once written)}.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local entries = redis.call('HLEN', KEYS[1])
        local bytes = tonumber(redis.call('GET', KEYS[3]) or '0')
        local new_entries, new_bytes, longest, grown = entries, bytes, 0, 0
        local sizes, expiries = {{}}, {{}}
        for i = 4, #ARGV, 3 do
          local member, size, ttl = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
          local old = sizes[member]
          local old_expiry = expiries[member]
          if old == nil then
            old = tonumber(redis.call('HGET', KEYS[1], member) or '-1')
            old_expiry = tonumber(redis.call('ZSCORE', KEYS[2], member) or '0')
          end
          local kept = size
          if old < 0 then
            new_entries = new_entries + 1
            new_bytes = new_bytes + size
          else
            if old > size then kept = old; grown = 1 end
            new_bytes = new_bytes - old + kept
          end
          local expiry = now + ttl
          if old_expiry > expiry then expiry = old_expiry; grown = 1 end
          sizes[member], expiries[member] = kept, expiry
          if expiry - now > longest then longest = expiry - now end
        end
        if new_entries > tonumber(ARGV[2]) and new_entries > entries then
          return {{1, entries, bytes, 0}}
        end
        if new_bytes > tonumber(ARGV[3]) and new_bytes > bytes then
          return {{2, entries, bytes, 0}}
        end
        for member, size in pairs(sizes) do
          redis.call('HSET', KEYS[1], member, size)
          redis.call('ZADD', KEYS[2], expiries[member], member)
        end
        redis.call('INCRBY', KEYS[3], new_bytes - bytes)
        for _, key in ipairs(KEYS) do
          if redis.call('PTTL', key) < longest then redis.call('PEXPIRE', key, longest) end
        end
        return {{0, new_entries, new_bytes, grown}}"
    ))
});

/// Records writes that landed exactly: the size and expiry each asked for, whether or not
/// the ledger still held a record for them (a delete may have released one while the write
/// was in flight). ARGV: purge limit, then (member, size, ttl ms) per write.
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local longest = 0
        for i = 2, #ARGV, 3 do
          local member, size, ttl = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
          local old = tonumber(redis.call('HGET', KEYS[1], member) or '0')
          redis.call('HSET', KEYS[1], member, size)
          redis.call('INCRBY', KEYS[3], size - old)
          redis.call('ZADD', KEYS[2], now + ttl, member)
          if ttl > longest then longest = ttl end
        end
        for _, key in ipairs(KEYS) do
          if redis.call('PTTL', key) < longest then redis.call('PEXPIRE', key, longest) end
        end
        return 0"
    ))
});

/// Drops members from the ledger. ARGV: purge limit, then the members. Returns how many were
/// in it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local released = 0
        for i = 2, #ARGV do
          local size = redis.call('HGET', KEYS[1], ARGV[i])
          if size then
            redis.call('DECRBY', KEYS[3], size)
            redis.call('HDEL', KEYS[1], ARGV[i])
            redis.call('ZREM', KEYS[2], ARGV[i])
            released = released + 1
          end
        end
        return released"
    ))
});

/// Holds a member's record for a removal in flight: moves it to the member's held record
/// (the field `\xFF` + member, which no UTF-8 member can spell), where it still counts, unless
/// one is held already. ARGV: purge limit, member. Returns 1 if it held a record.
static HOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local member = ARGV[2]
        local held = '\255' .. member
        if redis.call('HEXISTS', KEYS[1], held) == 1 then return 0 end
        local size = redis.call('HGET', KEYS[1], member)
        if not size then return 0 end
        local expiry = redis.call('ZSCORE', KEYS[2], member)
        redis.call('HDEL', KEYS[1], member)
        redis.call('ZREM', KEYS[2], member)
        redis.call('HSET', KEYS[1], held, size)
        redis.call('ZADD', KEYS[2], expiry, held)
        return 1"
    ))
});

/// Ends a hold: drops the held record if the removal happened, else merges it back into the
/// member's record (one written meanwhile: the larger size and the later expiry). ARGV: purge
/// limit, member, 1 if removed. Returns 1 if a held record was there.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local member = ARGV[2]
        local held = '\255' .. member
        local size = redis.call('HGET', KEYS[1], held)
        if not size then return 0 end
        size = tonumber(size)
        local expiry = tonumber(redis.call('ZSCORE', KEYS[2], held))
        redis.call('HDEL', KEYS[1], held)
        redis.call('ZREM', KEYS[2], held)
        if ARGV[3] == '1' then
          redis.call('DECRBY', KEYS[3], size)
          return 1
        end
        local old = redis.call('HGET', KEYS[1], member)
        if old then
          old = tonumber(old)
          local old_expiry = tonumber(redis.call('ZSCORE', KEYS[2], member) or '0')
          redis.call('DECRBY', KEYS[3], math.min(old, size))
          if old > size then size = old end
          if old_expiry > expiry then expiry = old_expiry end
        end
        redis.call('HSET', KEYS[1], member, size)
        redis.call('ZADD', KEYS[2], expiry, member)
        return 1"
    ))
});

/// Gives a member (and its held record, if any) a new expiry. ARGV: purge limit, member, ttl
/// ms. Returns 1 if it was in the ledger.
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local ttl = tonumber(ARGV[3])
        -- A record held by a removal in flight follows the entry too, in case it comes back.
        local held = '\255' .. ARGV[2]
        if redis.call('HEXISTS', KEYS[1], held) == 1 then
          redis.call('ZADD', KEYS[2], now + ttl, held)
        end
        if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then return 0 end
        redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
        for _, key in ipairs(KEYS) do
          if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
        end
        return 1"
    ))
});

/// The subject's usage after the purge. ARGV: purge limit. Returns {entries, bytes}.
static USAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        return {{redis.call('HLEN', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}}"
    ))
});

/// How much a subject may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// The most live entries.
    pub max_entries: u64,
    /// The most bytes over its live entries.
    pub max_bytes: u64,
}

/// What a subject holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    /// Live entries.
    pub entries: u64,
    /// Bytes over the live entries.
    pub bytes: u64,
}

/// What [`QuotaLedger::reserve`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaDecision {
    /// Recorded; the usage with the writes.
    Admitted(QuotaUsage),
    /// Recorded, and a record holds more than its write asked (an old value's larger size or
    /// later expiry, kept in case the write does not land) until the writes are
    /// [`settle`](QuotaLedger::settle)d. The usage with the writes.
    AdmittedToSettle(QuotaUsage),
    /// Refused: the writes would pass the entry quota. The usage without them.
    TooManyEntries(QuotaUsage),
    /// Refused: the writes would pass the byte quota. The usage without them.
    TooManyBytes(QuotaUsage),
}

/// One write to reserve room for.
#[derive(Debug, Clone, Copy)]
pub struct QuotaWrite<'a> {
    /// The entry (its key, as the subject names it).
    pub member: &'a str,
    /// Its size in bytes.
    pub size: u64,
    /// Its time to live.
    pub ttl: Duration,
}

/// Entries and bytes per subject, counted in Redis by every instance together. See the
/// module's documentation.
///
/// A subject's ledger is three keys sharing a hash tag (one cluster slot):
/// `PREFIX @quota:NAME:{SUBJECT}:sizes`, `:expiries` and `:bytes`, which expire with the
/// subject's longest-lived entry.
#[derive(Clone)]
pub struct QuotaLedger {
    conn: Connection,
    prefix: String,
}

impl fmt::Debug for QuotaLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLedger")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl QuotaLedger {
    /// A ledger named `name` on `store`'s connection and key prefix.
    ///
    /// # Errors
    ///
    /// An invalid name.
    pub fn new(store: &RedisStore, name: &str) -> Result<Self> {
        validate_key(name, DEFAULT_MAX_STORE_KEY_LEN)?;
        Ok(Self {
            conn: store.connection().clone(),
            prefix: structure_key(store, "quota", &[name, ""]),
        })
    }

    /// The three keys of `subject`'s ledger.
    fn keys(&self, subject: &str) -> Result<[String; 3]> {
        validate_key(subject, DEFAULT_MAX_STORE_KEY_LEN)?;
        // No `:` (escaped) and no brace in the tag: the whole subject is the hash tag.
        let subject = compose_key(&[subject])
            .replace('{', "%7B")
            .replace('}', "%7D");
        let key = |suffix: &str| format!("{}{{{subject}}}:{suffix}", self.prefix);
        Ok([key("sizes"), key("expiries"), key("bytes")])
    }

    /// `script` on `subject`'s three keys, with the purge limit as its first argument.
    fn invocation(
        &self,
        script: &'static Script,
        subject: &str,
    ) -> Result<redis::ScriptInvocation<'static>> {
        let mut invocation = script.prepare_invoke();
        for key in self.keys(subject)? {
            invocation.key(key);
        }
        invocation.arg(PURGE_PER_CALL);
        Ok(invocation)
    }

    /// Records `writes` for `subject` if together they keep it within `limits` (a write that
    /// replaces an entry counts only its change in size). A batch that would pass a quota is
    /// refused whole, and a batch that lowers the usage is admitted even over a quota (one
    /// that was lowered, say).
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn reserve(
        &self,
        subject: &str,
        limits: QuotaLimits,
        writes: &[QuotaWrite<'_>],
    ) -> Result<QuotaDecision> {
        let mut invocation = self.invocation(&RESERVE, subject)?;
        // Lua reads numbers as doubles: a limit past 2^53 is as good as none.
        let cap = |limit: u64| limit.min(1 << 53);
        invocation
            .arg(cap(limits.max_entries))
            .arg(cap(limits.max_bytes));
        push_writes(&mut invocation, writes)?;
        let (verdict, entries, bytes, grown): (u8, u64, u64, u8) =
            self.conn.script("quota reserve", &invocation).await?;
        let usage = QuotaUsage { entries, bytes };
        Ok(match verdict {
            0 if grown == 1 => QuotaDecision::AdmittedToSettle(usage),
            0 => QuotaDecision::Admitted(usage),
            1 => QuotaDecision::TooManyEntries(usage),
            _ => QuotaDecision::TooManyBytes(usage),
        })
    }

    /// Records `writes` of `subject`, which landed, exactly as they asked: a record the
    /// reservation kept larger shrinks to the write, and one a delete released while the
    /// write was in flight comes back (if that delete landed after the write, the record
    /// counts an entry that is gone until its TTL: high, never low). No quota check: the
    /// writes were admitted by their reservation.
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn settle(&self, subject: &str, writes: &[QuotaWrite<'_>]) -> Result<()> {
        let mut invocation = self.invocation(&SETTLE, subject)?;
        push_writes(&mut invocation, writes)?;
        let _: u8 = self.conn.script("quota settle", &invocation).await?;
        Ok(())
    }

    /// Drops `members` of `subject` (deleted entries). Answers how many were in the ledger.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn release(&self, subject: &str, members: &[&str]) -> Result<u64> {
        let mut invocation = self.invocation(&RELEASE, subject)?;
        for member in members {
            invocation.arg(*member);
        }
        self.conn.script("quota release", &invocation).await
    }

    /// Holds `member`'s record for a removal that may not happen: it stays counted, apart
    /// from the member's record, until [`finish`](Self::finish) drops it (the removal
    /// happened) or merges it back (it did not), or until its expiry. A write of the member
    /// while the removal runs makes a record of its own, which the removal leaves alone. Answers
    /// whether it held a record: not if the member has none, or one is held already (by
    /// another removal, which finishes it). Only a hold that answered `true` is finished.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn hold(&self, subject: &str, member: &str) -> Result<bool> {
        let mut invocation = self.invocation(&HOLD, subject)?;
        invocation.arg(member);
        let held: u8 = self.conn.script("quota hold", &invocation).await?;
        Ok(held == 1)
    }

    /// Ends a [`hold`](Self::hold) of `member`: drops the held record if `removed`, else
    /// merges it back into the member's record with no quota check (it was counted all
    /// along), keeping the larger size and the later expiry of a record written meanwhile.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call (the held record then counts until its
    /// expiry).
    pub async fn finish(&self, subject: &str, member: &str, removed: bool) -> Result<()> {
        let mut invocation = self.invocation(&FINISH, subject)?;
        invocation.arg(member).arg(u8::from(removed));
        let _: u8 = self.conn.script("quota finish", &invocation).await?;
        Ok(())
    }

    /// Drops every member of `subject` that starts with `prefix`, a round of `HSCAN` at a
    /// time. Answers how many were in the ledger.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn release_prefix(&self, subject: &str, prefix: &str) -> Result<u64> {
        let [sizes, ..] = self.keys(subject)?;
        let pattern = format!("{}*", glob_escape(prefix));
        let mut cursor: u64 = 0;
        let mut released = 0;
        loop {
            let mut scan = cmd("HSCAN");
            scan.arg(&sizes)
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, pairs): (u64, Vec<Vec<u8>>) = self.conn.query("quota scan", &scan).await?;
            // HSCAN answers field, value, field, value... Held records (not UTF-8) stay: their
            // removals finish them.
            let members: Vec<&str> = pairs
                .iter()
                .step_by(2)
                .filter_map(|field| std::str::from_utf8(field).ok())
                .collect();
            if !members.is_empty() {
                released += self.release(subject, &members).await?;
            }
            if next == 0 {
                return Ok(released);
            }
            cursor = next;
        }
    }

    /// Gives `member` of `subject` a new TTL from now. Answers whether it was in the ledger.
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn touch(&self, subject: &str, member: &str, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        let mut invocation = self.invocation(&TOUCH, subject)?;
        invocation.arg(member).arg(millis(ttl));
        let touched: u8 = self.conn.script("quota touch", &invocation).await?;
        Ok(touched == 1)
    }

    /// What `subject` holds now.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn usage(&self, subject: &str) -> Result<QuotaUsage> {
        let invocation = self.invocation(&USAGE, subject)?;
        let (entries, bytes): (u64, u64) = self.conn.script("quota usage", &invocation).await?;
        Ok(QuotaUsage { entries, bytes })
    }

    /// Forgets everything `subject` holds (its entries were flushed).
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn clear(&self, subject: &str) -> Result<()> {
        let keys = self.keys(subject)?;
        let mut delete = cmd("DEL");
        for key in &keys {
            delete.arg(key);
        }
        let _: u64 = self.conn.query("quota clear", &delete).await?;
        Ok(())
    }
}

/// Appends each write's member, size and TTL in milliseconds to a script's arguments.
fn push_writes(
    invocation: &mut redis::ScriptInvocation<'_>,
    writes: &[QuotaWrite<'_>],
) -> Result<()> {
    for write in writes {
        validate_ttl(write.ttl)?;
        invocation
            .arg(write.member)
            .arg(write.size)
            .arg(millis(write.ttl));
    }
    Ok(())
}

/// `text` with the characters `MATCH` patterns read specially escaped.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for ch in text.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(ch);
    }
    escaped
}
