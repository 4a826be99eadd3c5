//! A quota ledger: how many entries and bytes each subject (a tenant, say) holds, counted in
//! Redis so that every instance of a service enforces one quota together.
//!
//! The ledger keeps, per subject, each entry's size and expiry. An entry leaves it when a
//! removal of it has happened or when its TTL has passed, so a subject's usage follows its live
//! entries without a scan of the keyspace. Every call is one script, so a reservation is
//! atomic: two instances cannot both admit the write that crosses the quota.
//!
//! The protocol, for a caller that writes and removes entries elsewhere (a cache):
//!
//! - A write [`reserve`](QuotaLedger::reserve)s room before it is made, and is
//!   [`settle`](QuotaLedger::settle)d once its outcome is known. A reservation never lowers an
//!   entry's record (the write may fail and leave the old value), and marks the write in
//!   flight until it settles or, if its caller never settles (dropped), for
//!   [`in_flight_for`](QuotaLedger::in_flight_for). A settle records the write exactly, unless
//!   another write or a touch of the entry overlapped it: the order in which
//!   overlapping writes landed is not known, so the record keeps the larger size and the later
//!   expiry.
//! - A removal [`hold`](QuotaLedger::hold)s the records it may remove, and
//!   [`finish`](QuotaLedger::finish)es them once its outcome is known. A held record keeps
//!   counting, apart from the record of a write that lands meanwhile; a removal that happened
//!   drops it, unless a write of the entry is in flight (it may land after the removal), and
//!   one that did not merges it back.
//!
//! So the count can run high (an entry removed after an overlapping write, a caller dropped
//! mid-removal: until the entry's TTL) but not low, whatever the order in which calls from
//! several instances interleave, as long as every write reserves first, lands within
//! [`in_flight_for`](QuotaLedger::in_flight_for) of its reservation, and every removal holds,
//! and Redis does not evict the ledger's keys (run it with `maxmemory-policy noeviction`, or
//! on a Redis whose evictions spare these keys).

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

/// At most this many expired records (and as many expired in-flight marks) are dropped from a
/// subject's ledger per call: a call's work stays bounded however many expired since the last.
const PURGE_PER_CALL: u32 = 1_000;

/// Entries looked at per `HSCAN` round of a prefix hold.
const SCAN_COUNT: u32 = 1_000;

/// How long a write stays in flight if its caller never settles it, by default.
const DEFAULT_IN_FLIGHT: Duration = Duration::from_secs(30);

/// The common start of every ledger script: the server's time, and the expired records and
/// in-flight marks dropped (at most `ARGV[1]` of each). KEYS: sizes (hash: member, or `\xFF`
/// and member for a held record, to size), expiries (sorted set of the same), bytes (string),
/// writes (hash: member to the count of writes in flight, `\xFF` and member to 1 if they
/// overlapped), writes' deadlines (sorted set of members). No UTF-8 member starts with the
/// byte `\xFF`.
const PURGE: &str = r"
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local limit = tonumber(ARGV[1])
    local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
    for _, member in ipairs(expired) do
      local size = redis.call('HGET', KEYS[1], member)
      if size then redis.call('DECRBY', KEYS[3], size) end
      redis.call('HDEL', KEYS[1], member)
      redis.call('ZREM', KEYS[2], member)
    end
    local abandoned = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit)
    for _, member in ipairs(abandoned) do
      redis.call('HDEL', KEYS[4], member, '\255' .. member)
      redis.call('ZREM', KEYS[5], member)
    end
    -- The total is the sum of the sizes: with no sizes (released, or expired in Redis with
    -- the hash), there is nothing to count.
    if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[3]) end
    local function keep_keys(ms)
      for _, key in ipairs(KEYS) do
        if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
      end
    end
    local function in_flight(member)
      return tonumber(redis.call('HGET', KEYS[4], member) or '0') > 0
    end
";

/// Admits a batch of writes if, all together, they keep the subject within its quota (or do
/// not raise what is already over it), and marks each in flight. An entry's record only
/// grows: the larger size and the later expiry of the old record and the write's. ARGV: purge
/// limit, max entries, max bytes, in-flight ms, then (member, size, ttl ms) per write. Returns
/// {0 admitted | 1 entries | 2 bytes, entries, bytes}.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local entries = redis.call('HLEN', KEYS[1])
        local bytes = tonumber(redis.call('GET', KEYS[3]) or '0')
        local new_entries, new_bytes, longest = entries, bytes, tonumber(ARGV[4])
        local sizes, expiries = {{}}, {{}}
        for i = 5, #ARGV, 3 do
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
            if old > size then kept = old end
            new_bytes = new_bytes - old + kept
          end
          local expiry = now + ttl
          if old_expiry > expiry then expiry = old_expiry end
          sizes[member], expiries[member] = kept, expiry
          if expiry - now > longest then longest = expiry - now end
        end
        if new_entries > tonumber(ARGV[2]) and new_entries > entries then
          return {{1, entries, bytes}}
        end
        if new_bytes > tonumber(ARGV[3]) and new_bytes > bytes then
          return {{2, entries, bytes}}
        end
        for member, size in pairs(sizes) do
          redis.call('HSET', KEYS[1], member, size)
          redis.call('ZADD', KEYS[2], expiries[member], member)
        end
        redis.call('INCRBY', KEYS[3], new_bytes - bytes)
        local deadline = now + tonumber(ARGV[4])
        for i = 5, #ARGV, 3 do
          local member = ARGV[i]
          -- Overlapping writes (a batch naming a key twice, too) land in an unknown order.
          if redis.call('HINCRBY', KEYS[4], member, 1) > 1 then
            redis.call('HSET', KEYS[4], '\255' .. member, 1)
          end
          redis.call('ZADD', KEYS[5], deadline, member)
        end
        keep_keys(longest)
        return {{0, new_entries, new_bytes}}"
    ))
});

/// Ends writes: each is no longer in flight, and one that landed is recorded as it asked,
/// unless another write or a touch overlapped it (then the record keeps the larger
/// size and the later expiry), and whether or not a removal dropped its record meanwhile.
/// ARGV: purge limit, 1 if the writes landed, then (member, size, ttl ms) per write.
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local landed = ARGV[2] == '1'
        local longest = 0
        for i = 3, #ARGV, 3 do
          local member, size, ttl = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
          local overlapped = redis.call('HEXISTS', KEYS[4], '\255' .. member) == 1
          if redis.call('HINCRBY', KEYS[4], member, -1) <= 0 then
            redis.call('HDEL', KEYS[4], member, '\255' .. member)
            redis.call('ZREM', KEYS[5], member)
          end
          if landed then
            local expiry = now + ttl
            local old = redis.call('HGET', KEYS[1], member)
            if old and overlapped then
              local old_expiry = tonumber(redis.call('ZSCORE', KEYS[2], member) or '0')
              if tonumber(old) > size then size = tonumber(old) end
              if old_expiry > expiry then expiry = old_expiry end
            end
            redis.call('HSET', KEYS[1], member, size)
            redis.call('INCRBY', KEYS[3], size - tonumber(old or '0'))
            redis.call('ZADD', KEYS[2], expiry, member)
            if expiry - now > longest then longest = expiry - now end
          end
        end
        keep_keys(longest)
        return 0"
    ))
});

/// Holds members' records for a removal: moves each to its held record (`\xFF` and member),
/// where it still counts, unless one is held already. ARGV: purge limit, then the members.
/// Returns, per member, 1 if it held a record.
static HOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local held_now = {{}}
        for i = 2, #ARGV do
          local member = ARGV[i]
          local held = '\255' .. member
          local size = redis.call('HGET', KEYS[1], member)
          if size and redis.call('HEXISTS', KEYS[1], held) == 0 then
            local expiry = redis.call('ZSCORE', KEYS[2], member)
            redis.call('HDEL', KEYS[1], member)
            redis.call('ZREM', KEYS[2], member)
            redis.call('HSET', KEYS[1], held, size)
            redis.call('ZADD', KEYS[2], expiry, held)
            held_now[#held_now + 1] = 1
          else
            held_now[#held_now + 1] = 0
          end
        end
        return held_now"
    ))
});

/// Ends holds: a held record whose removal happened is dropped, unless a write of the member
/// is in flight (it may land after the removal); otherwise it merges back into the member's
/// record (one written meanwhile: the larger size and the later expiry). ARGV: purge limit,
/// 1 if removed, then the members.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local removed = ARGV[2] == '1'
        local longest = 0
        for i = 3, #ARGV do
          local member = ARGV[i]
          local held = '\255' .. member
          local size = redis.call('HGET', KEYS[1], held)
          if size then
            size = tonumber(size)
            local expiry = tonumber(redis.call('ZSCORE', KEYS[2], held) or '0')
            redis.call('HDEL', KEYS[1], held)
            redis.call('ZREM', KEYS[2], held)
            if removed and not in_flight(member) then
              redis.call('DECRBY', KEYS[3], size)
            else
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
              if expiry - now > longest then longest = expiry - now end
            end
          end
        end
        keep_keys(longest)
        return 0"
    ))
});

/// Gives a member's record and its held record (if any) a new expiry; a write in flight then
/// counts as overlapped. ARGV: purge limit, member, ttl ms. Returns 1 if it had a record.
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PURGE}
        local member, ttl = ARGV[2], tonumber(ARGV[3])
        if in_flight(member) then redis.call('HSET', KEYS[4], '\255' .. member, 1) end
        local touched = 0
        for _, record in ipairs({{'\255' .. member, member}}) do
          if redis.call('HEXISTS', KEYS[1], record) == 1 then
            redis.call('ZADD', KEYS[2], now + ttl, record)
            touched = 1
          end
        end
        if touched == 1 then keep_keys(ttl) end
        return redis.call('HEXISTS', KEYS[1], member)"
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
    /// Recorded; the usage with the writes. [`settle`](QuotaLedger::settle) them once their
    /// outcome is known.
    Admitted(QuotaUsage),
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
/// module's documentation for the protocol its callers follow.
///
/// A subject's ledger is five keys sharing a hash tag (one cluster slot):
/// `PREFIX @quota:NAME:{SUBJECT}:sizes`, `:expiries`, `:bytes`, `:writes` and `:deadlines`,
/// which expire with the subject's longest-lived record.
#[derive(Clone)]
pub struct QuotaLedger {
    conn: Connection,
    prefix: String,
    in_flight: Duration,
}

impl fmt::Debug for QuotaLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLedger")
            .field("prefix", &self.prefix)
            .field("in_flight", &self.in_flight)
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
            in_flight: DEFAULT_IN_FLIGHT,
        })
    }

    /// How long a reserved write counts as in flight if it is never settled (its caller was
    /// dropped, say): at least as long as a write may take to land (30 s by default). While a
    /// write is in flight, a removal of its entry keeps the entry's record.
    ///
    /// # Errors
    ///
    /// A duration out of the TTL range.
    pub fn in_flight_for(self, duration: Duration) -> Result<Self> {
        validate_ttl(duration)?;
        Ok(Self {
            in_flight: duration,
            ..self
        })
    }

    /// The five keys of `subject`'s ledger.
    fn keys(&self, subject: &str) -> Result<[String; 5]> {
        validate_key(subject, DEFAULT_MAX_STORE_KEY_LEN)?;
        // No `:` (escaped) and no brace in the tag: the whole subject is the hash tag.
        let subject = compose_key(&[subject])
            .replace('{', "%7B")
            .replace('}', "%7D");
        let key = |suffix: &str| format!("{}{{{subject}}}:{suffix}", self.prefix);
        Ok([
            key("sizes"),
            key("expiries"),
            key("bytes"),
            key("writes"),
            key("deadlines"),
        ])
    }

    /// `script` on `subject`'s keys, with the purge limit as its first argument.
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
    /// replaces an entry counts only its change in size), and marks them in flight. A batch
    /// that would pass a quota is refused whole (nothing recorded), and a batch that lowers
    /// the usage is admitted even over a quota (one that was lowered, say). A record never
    /// shrinks here: the write may not land. Once their outcome is known,
    /// [`settle`](Self::settle) the writes.
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
            .arg(cap(limits.max_bytes))
            .arg(millis(self.in_flight));
        push_writes(&mut invocation, writes)?;
        let (verdict, entries, bytes): (u8, u64, u64) =
            self.conn.script("quota reserve", &invocation).await?;
        let usage = QuotaUsage { entries, bytes };
        Ok(match verdict {
            0 => QuotaDecision::Admitted(usage),
            1 => QuotaDecision::TooManyEntries(usage),
            _ => QuotaDecision::TooManyBytes(usage),
        })
    }

    /// Ends reserved `writes` of `subject` once their outcome is known: `landed` (each wrote
    /// its value) or not (a condition did not hold: the old value stays). Writes that landed
    /// are recorded as they asked, even if a removal dropped their record meanwhile, unless
    /// another write or a touch of the entry overlapped them: then the record keeps
    /// the larger size and the later expiry (which of them landed last is not known). A write
    /// whose outcome is not known (it failed, and may have landed) is not settled: it stays in
    /// flight for [`in_flight_for`](Self::in_flight_for), and its reservation until its TTL.
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn settle(
        &self,
        subject: &str,
        writes: &[QuotaWrite<'_>],
        landed: bool,
    ) -> Result<()> {
        let mut invocation = self.invocation(&SETTLE, subject)?;
        invocation.arg(u8::from(landed));
        push_writes(&mut invocation, writes)?;
        let _: u8 = self.conn.script("quota settle", &invocation).await?;
        Ok(())
    }

    /// Holds the records of `members` of `subject` for a removal that may not happen: they
    /// keep counting, apart from the record of a write that lands meanwhile, until
    /// [`finish`](Self::finish) drops or merges them back, or until their expiry. Answers, per
    /// member, whether it held a record: not if the member has none, or one is held already
    /// (by another removal, which finishes it). Finish only the members held.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn hold(&self, subject: &str, members: &[&str]) -> Result<Vec<bool>> {
        let mut invocation = self.invocation(&HOLD, subject)?;
        for member in members {
            invocation.arg(*member);
        }
        let held: Vec<u8> = self.conn.script("quota hold", &invocation).await?;
        Ok(held.into_iter().map(|held| held == 1).collect())
    }

    /// [`hold`](Self::hold)s every member of `subject` that starts with `prefix`, a round of
    /// `HSCAN` at a time, and answers those it held.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call (members held before it stay held until
    /// their expiry: counted).
    pub async fn hold_prefix(&self, subject: &str, prefix: &str) -> Result<Vec<String>> {
        let [sizes, ..] = self.keys(subject)?;
        let pattern = format!("{}*", glob_escape(prefix));
        let mut cursor: u64 = 0;
        let mut held = Vec::new();
        loop {
            let mut scan = cmd("HSCAN");
            scan.arg(&sizes)
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, pairs): (u64, Vec<Vec<u8>>) = self.conn.query("quota scan", &scan).await?;
            // HSCAN answers field, value, field, value... Held records (not UTF-8) are
            // another removal's.
            let members: Vec<&str> = pairs
                .iter()
                .step_by(2)
                .filter_map(|field| std::str::from_utf8(field).ok())
                .collect();
            if !members.is_empty() {
                let outcome = self.hold(subject, &members).await?;
                held.extend(
                    members
                        .iter()
                        .zip(outcome)
                        .filter(|(_, held)| *held)
                        .map(|(member, _)| (*member).to_owned()),
                );
            }
            if next == 0 {
                return Ok(held);
            }
            cursor = next;
        }
    }

    /// Ends the holds of `members` of `subject` once the removal's outcome is known:
    /// `removed` drops each held record, unless a write of the member is in flight (it may
    /// land after the removal: the record stays until the write settles); a removal that did
    /// not happen (or whose outcome is not known) merges each back, with no quota check (it
    /// counted all along), keeping the larger size and the later expiry of a record written
    /// meanwhile.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call (the held records then count until their
    /// expiry).
    pub async fn finish<S: AsRef<str>>(
        &self,
        subject: &str,
        members: &[S],
        removed: bool,
    ) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let mut invocation = self.invocation(&FINISH, subject)?;
        invocation.arg(u8::from(removed));
        for member in members {
            invocation.arg(member.as_ref());
        }
        let _: u8 = self.conn.script("quota finish", &invocation).await?;
        Ok(())
    }

    /// Gives `member` of `subject` (and its held record, if any) a new TTL from now. Answers
    /// whether it had a record.
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
