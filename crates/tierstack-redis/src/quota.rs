//! A quota ledger: how many entries and bytes each subject (a tenant, say) holds, counted in
//! Redis so that every instance of a service enforces one quota together.
//!
//! The ledger keeps, per subject, each entry's size and expiry. An entry leaves it when a
//! removal of it has happened or when its TTL has passed, so a subject's usage follows its live
//! entries without a scan of the keyspace. Every call is one script, so a reservation is
//! atomic: two instances cannot both admit the write that crosses the quota.
//!
//! The protocol, for a caller that writes, touches and removes entries elsewhere (a cache):
//! every operation on an entry begins here before it is made, under a [`QuotaTicket`] of its
//! own, and ends here once its outcome is known. A write begins with
//! [`reserve`](QuotaLedger::reserve) (checked against the quota) and ends with
//! [`settle`](QuotaLedger::settle); a touch with [`begin_touch`](QuotaLedger::begin_touch) and
//! [`end_touch`](QuotaLedger::end_touch); a removal with
//! [`begin_removal`](QuotaLedger::begin_removal) and [`end_removal`](QuotaLedger::end_removal).
//! While it runs, an operation only ever raises what the entry counts for (a reservation keeps
//! the larger size and the later expiry, a touch the later expiry, a removal nothing). At its
//! end it is recorded exactly (the written size and expiry, the touched expiry, the entry
//! gone) only if it ran alone: if another operation on the entry was in flight at any point
//! while it ran, the order in which they reached the data is not known, so the record keeps
//! the larger size and the later expiry, and a removal leaves it until its TTL. An operation
//! whose outcome is not known (it failed, or its caller was dropped) never ends: it stays in
//! flight for [`in_flight_for`](QuotaLedger::in_flight_for). A touch in flight also raises the
//! expiry of a record made while it runs (it may reach the data after the write). A subject
//! runs one prefix removal at a time, so that the operations it begins stay within one per
//! entry.
//!
//! So the count can run high (until the entry's TTL) but not low, whatever the order in which
//! calls from several instances interleave, as long as every operation reaches the data within
//! `in_flight_for` of its beginning and Redis does not evict the ledger's keys (run it with
//! `maxmemory-policy noeviction`, or where evictions spare these keys).

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, cmd};
use tierstack_core::Result;
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, compose_key, validate_key};
use tierstack_core::store::validate_ttl;

use crate::connection::Connection;
use crate::store::RedisStore;
use crate::structures::{millis, structure_key, unique_token};

/// At most this many expired records (and as many expired tickets) are dropped from a
/// subject's ledger per call: a call's work stays bounded however many expired since the last.
const PURGE_PER_CALL: u32 = 1_000;

/// Entries looked at per `HSCAN` round of a prefix removal, and members per script.
const CHUNK: usize = 1_000;

/// How long an operation stays in flight if it never ends, by default.
const DEFAULT_IN_FLIGHT: Duration = Duration::from_secs(30);

/// The common start of every ledger script: the server's time, and the expired records and
/// tickets dropped (at most `ARGV[1]` of each), and the helpers of the operations. KEYS: sizes
/// (hash: member to size), expiries (sorted set: member to expiry), bytes (string), marks
/// (hash: member to the count of its operations in flight, `\xFF` and member to 1 once two
/// overlapped, `\xFE` and member to the latest expiry a touch in flight gave it, and `\xFD` to
/// the ticket and deadline of the prefix removal in flight), tickets (sorted set: ticket,
/// `\xFF` and member, to the operation's deadline).
/// No UTF-8 member starts with the byte `\xFF`; a ticket is 32 hex digits. `ARGV[2]` is the
/// operation's ticket, where it has one.
const PRELUDE: &str = r"
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local limit = tonumber(ARGV[1])
    local function drop_mark(member)
      if redis.call('HINCRBY', KEYS[4], member, -1) <= 0 then
        redis.call('HDEL', KEYS[4], member, '\255' .. member, '\254' .. member)
      end
    end
    -- The latest expiry a touch in flight gave `member` (0 if none): a record made while it
    -- runs lives at least as long, in case the touch reaches the data after the write.
    local function touched_until(member)
      return tonumber(redis.call('HGET', KEYS[4], '\254' .. member) or '0')
    end
    local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
    for _, member in ipairs(expired) do
      local size = redis.call('HGET', KEYS[1], member)
      if size then redis.call('DECRBY', KEYS[3], size) end
      redis.call('HDEL', KEYS[1], member)
      redis.call('ZREM', KEYS[2], member)
    end
    local abandoned = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit)
    for _, token in ipairs(abandoned) do
      redis.call('ZREM', KEYS[5], token)
      drop_mark(string.sub(token, 34))
    end
    -- The total is the sum of the sizes: with no sizes (released, or expired in Redis with
    -- the hash), there is nothing to count.
    if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[3]) end
    local function keep_keys(ms)
      for _, key in ipairs(KEYS) do
        if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
      end
    end
    -- Marks `member`'s operation under this ticket in flight until `deadline`.
    local function begin_op(member, deadline)
      local token = ARGV[2] .. '\255' .. member
      if redis.call('ZSCORE', KEYS[5], token) then
        -- The same entry twice in one batch: its writes land in an unknown order.
        redis.call('HSET', KEYS[4], '\255' .. member, 1)
        return
      end
      redis.call('ZADD', KEYS[5], deadline, token)
      if redis.call('HINCRBY', KEYS[4], member, 1) > 1 then
        redis.call('HSET', KEYS[4], '\255' .. member, 1)
      end
    end
    -- Ends `member`'s operation under this ticket: whether it ran alone (not if its ticket
    -- expired meanwhile: what overlapped it is not known).
    local function end_op(member)
      local token = ARGV[2] .. '\255' .. member
      if redis.call('ZREM', KEYS[5], token) == 0 then return false end
      local alone = redis.call('HEXISTS', KEYS[4], '\255' .. member) == 0
      drop_mark(member)
      return alone
    end
    -- Records `member` at `size` and `expiry`, or at the larger of those and its record.
    local function record(member, size, expiry, exactly)
      local old = redis.call('HGET', KEYS[1], member)
      if old and not exactly then
        local old_expiry = tonumber(redis.call('ZSCORE', KEYS[2], member) or '0')
        if tonumber(old) > size then size = tonumber(old) end
        if old_expiry > expiry then expiry = old_expiry end
      end
      if not exactly then expiry = math.max(expiry, touched_until(member)) end
      redis.call('HSET', KEYS[1], member, size)
      redis.call('INCRBY', KEYS[3], size - tonumber(old or '0'))
      redis.call('ZADD', KEYS[2], expiry, member)
      return expiry
    end
";

/// Begins a batch of writes if, all together, they keep the subject within its quota (or do
/// not raise what is already over it). An entry's record only grows: the larger size and the
/// later expiry of the old record and the write's. ARGV: purge limit, ticket, in-flight ms,
/// max entries, max bytes, then (member, size, ttl ms) per write. Returns {0 admitted |
/// 1 entries | 2 bytes, entries, bytes}.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        local entries = redis.call('HLEN', KEYS[1])
        local bytes = tonumber(redis.call('GET', KEYS[3]) or '0')
        local new_entries, new_bytes, longest = entries, bytes, tonumber(ARGV[3])
        local sizes, expiries = {{}}, {{}}
        for i = 6, #ARGV, 3 do
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
          local expiry = math.max(now + ttl, touched_until(member))
          if old_expiry > expiry then expiry = old_expiry end
          sizes[member], expiries[member] = kept, expiry
          if expiry - now > longest then longest = expiry - now end
        end
        if new_entries > tonumber(ARGV[4]) and new_entries > entries then
          return {{1, entries, bytes}}
        end
        if new_bytes > tonumber(ARGV[5]) and new_bytes > bytes then
          return {{2, entries, bytes}}
        end
        for member, size in pairs(sizes) do
          redis.call('HSET', KEYS[1], member, size)
          redis.call('ZADD', KEYS[2], expiries[member], member)
        end
        redis.call('INCRBY', KEYS[3], new_bytes - bytes)
        for i = 6, #ARGV, 3 do begin_op(ARGV[i], now + tonumber(ARGV[3])) end
        keep_keys(longest)
        return {{0, new_entries, new_bytes}}"
    ))
});

/// Ends a batch of writes: each that landed is recorded as it asked if it ran alone, else at
/// the larger record. ARGV: purge limit, ticket, 1 if landed, then (member, size, ttl ms) per
/// write.
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        local landed = ARGV[3] == '1'
        local longest = 0
        for i = 4, #ARGV, 3 do
          local member, size, ttl = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
          local alone = end_op(member)
          if landed then
            local expiry = record(member, size, now + ttl, alone)
            if expiry - now > longest then longest = expiry - now end
          end
        end
        if longest > 0 then keep_keys(longest) end
        return 0"
    ))
});

/// Begins a removal of members: their records stay as they are. ARGV: purge limit, ticket,
/// in-flight ms, then the members.
static BEGIN_REMOVAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        for i = 4, #ARGV do begin_op(ARGV[i], now + tonumber(ARGV[3])) end
        keep_keys(tonumber(ARGV[3]))
        return 0"
    ))
});

/// Ends a removal of members: the record of each that ran alone goes if the removal happened.
/// ARGV: purge limit, ticket, 1 if removed, then the members.
static END_REMOVAL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        local removed = ARGV[3] == '1'
        for i = 4, #ARGV do
          local member = ARGV[i]
          if end_op(member) and removed then
            local size = redis.call('HGET', KEYS[1], member)
            if size then
              redis.call('DECRBY', KEYS[3], size)
              redis.call('HDEL', KEYS[1], member)
              redis.call('ZREM', KEYS[2], member)
            end
          end
        end
        return 0"
    ))
});

/// Begins a touch: the record's expiry becomes the later of its own and the touch's, and so
/// does that of a record made while the touch runs. ARGV: purge limit, ticket, in-flight ms,
/// member, ttl ms.
static BEGIN_TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        local member, ttl = ARGV[4], tonumber(ARGV[5])
        begin_op(member, now + tonumber(ARGV[3]))
        if touched_until(member) < now + ttl then
          redis.call('HSET', KEYS[4], '\254' .. member, now + ttl)
        end
        local expiry = tonumber(redis.call('ZSCORE', KEYS[2], member) or '0')
        if redis.call('HEXISTS', KEYS[1], member) == 1 and expiry < now + ttl then
          redis.call('ZADD', KEYS[2], now + ttl, member)
        end
        keep_keys(math.max(ttl, tonumber(ARGV[3])))
        return 0"
    ))
});

/// Ends a touch that touched the entry: its record's expiry is the touch's if it ran alone,
/// else the later of its own and the touch's. ARGV: purge limit, ticket, 1 if touched,
/// member, ttl ms.
static END_TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        local member, ttl = ARGV[4], tonumber(ARGV[5])
        local alone = end_op(member)
        local expiry = redis.call('ZSCORE', KEYS[2], member)
        if ARGV[3] == '1' and redis.call('HEXISTS', KEYS[1], member) == 1 then
          if alone or tonumber(expiry or '0') < now + ttl then
            redis.call('ZADD', KEYS[2], now + ttl, member)
          end
          keep_keys(ttl)
        end
        return 0"
    ))
});

/// Claims the subject's one prefix removal in flight, for the in-flight time: at most one at a
/// time, so that the tickets a prefix removal begins stay within one per entry. ARGV: purge
/// limit, ticket, in-flight ms. Returns 1 if claimed.
static CLAIM_PREFIX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        local claim = redis.call('HGET', KEYS[4], '\253')
        if claim and tonumber(string.sub(claim, 33)) > now then return 0 end
        redis.call('HSET', KEYS[4], '\253', ARGV[2] .. (now + tonumber(ARGV[3])))
        keep_keys(tonumber(ARGV[3]))
        return 1"
    ))
});

/// Gives up the claim of the prefix removal under this ticket. ARGV: purge limit, ticket.
static RELEASE_PREFIX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        local claim = redis.call('HGET', KEYS[4], '\253')
        if claim and string.sub(claim, 1, 32) == ARGV[2] then
          redis.call('HDEL', KEYS[4], '\253')
        end
        return 0"
    ))
});

/// The subject's usage after the purge. ARGV: purge limit. Returns {entries, bytes}.
static USAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PRELUDE}
        return {{redis.call('HLEN', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}}"
    ))
});

/// One operation's name in the ledger, from its beginning to its end: each begins under a
/// ticket of its own.
#[derive(Clone, PartialEq, Eq)]
pub struct QuotaTicket(String);

impl QuotaTicket {
    /// A fresh ticket, unique to the call.
    #[must_use]
    pub fn new() -> Self {
        Self(unique_token())
    }
}

impl Default for QuotaTicket {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for QuotaTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("QuotaTicket").field(&self.0).finish()
    }
}

impl AsRef<str> for QuotaTicket {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

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
    /// Recorded and begun; the usage with the writes. [`settle`](QuotaLedger::settle) them
    /// once their outcome is known.
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
/// `PREFIX @quota:NAME:{SUBJECT}:sizes`, `:expiries`, `:bytes`, `:marks` and `:tickets`, which
/// expire with the subject's longest-lived record or operation.
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

    /// How long an operation counts as in flight if it never ends (its caller was dropped,
    /// or it failed): at least as long as an operation may take to reach the data (30 s by
    /// default). An operation overlapping one in flight is not recorded exactly.
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
            key("marks"),
            key("tickets"),
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

    /// Begins `writes` of `subject` under `ticket` if together they keep it within `limits`
    /// (a write that replaces an entry counts only its change in size). A batch that would
    /// pass a quota is refused whole (nothing recorded, nothing begun), and a batch that
    /// lowers the usage is admitted even over a quota (one that was lowered, say). A record
    /// never shrinks here: the write may not land. Once their outcome is known,
    /// [`settle`](Self::settle) the writes under the same ticket.
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn reserve(
        &self,
        subject: &str,
        limits: QuotaLimits,
        writes: &[QuotaWrite<'_>],
        ticket: &QuotaTicket,
    ) -> Result<QuotaDecision> {
        let mut invocation = self.invocation(&RESERVE, subject)?;
        // Lua reads numbers as doubles: a limit past 2^53 is as good as none.
        let cap = |limit: u64| limit.min(1 << 53);
        invocation
            .arg(ticket.as_ref())
            .arg(millis(self.in_flight))
            .arg(cap(limits.max_entries))
            .arg(cap(limits.max_bytes));
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
    /// its value) or not (a condition did not hold: the old value stays). A write that landed
    /// is recorded as it asked (even if a removal dropped its record meanwhile) if it ran
    /// alone, else at the larger size and later expiry of its record and its own. A write
    /// whose outcome is not known (it failed, and may have landed) is not settled.
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn settle(
        &self,
        subject: &str,
        writes: &[QuotaWrite<'_>],
        ticket: &QuotaTicket,
        landed: bool,
    ) -> Result<()> {
        let mut invocation = self.invocation(&SETTLE, subject)?;
        invocation.arg(ticket.as_ref()).arg(u8::from(landed));
        push_writes(&mut invocation, writes)?;
        let _: u8 = self.conn.script("quota settle", &invocation).await?;
        Ok(())
    }

    /// Begins a removal of `members` of `subject` under `ticket`: their records keep
    /// counting until [`end_removal`](Self::end_removal).
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn begin_removal<S: AsRef<str>>(
        &self,
        subject: &str,
        members: &[S],
        ticket: &QuotaTicket,
    ) -> Result<()> {
        let in_flight = millis(self.in_flight);
        self.per_member_chunk(
            &BEGIN_REMOVAL,
            "quota begin removal",
            subject,
            ticket,
            in_flight,
            members,
        )
        .await
    }

    /// Begins a removal of every member of `subject` that starts with `prefix`, a round of
    /// `HSCAN` at a time, and answers them, to end the removal with
    /// [`end_removal_of_prefix`](Self::end_removal_of_prefix). A subject has at most one prefix
    /// removal in flight (so that the operations it begins stay within one per entry):
    /// `None` while another one is (until it ends, or for `in_flight_for` if it never does).
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn begin_removal_of_prefix(
        &self,
        subject: &str,
        prefix: &str,
        ticket: &QuotaTicket,
    ) -> Result<Option<Vec<String>>> {
        let mut claim = self.invocation(&CLAIM_PREFIX, subject)?;
        claim.arg(ticket.as_ref()).arg(millis(self.in_flight));
        let claimed: u8 = self.conn.script("quota claim prefix", &claim).await?;
        if claimed == 0 {
            return Ok(None);
        }
        match self.begin_members_of_prefix(subject, prefix, ticket).await {
            Ok(members) => Ok(Some(members)),
            Err(error) => {
                // Best effort: the claim lapses after `in_flight_for` anyway.
                let _ = self.release_prefix(subject, ticket).await;
                Err(error)
            }
        }
    }

    /// Begins a removal of every member under `prefix`, a round of `HSCAN` at a time.
    async fn begin_members_of_prefix(
        &self,
        subject: &str,
        prefix: &str,
        ticket: &QuotaTicket,
    ) -> Result<Vec<String>> {
        let [sizes, ..] = self.keys(subject)?;
        let pattern = format!("{}*", glob_escape(prefix));
        let mut cursor: u64 = 0;
        let mut members = Vec::new();
        loop {
            let mut scan = cmd("HSCAN");
            scan.arg(&sizes)
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(CHUNK);
            let (next, pairs): (u64, Vec<String>) = self.conn.query("quota scan", &scan).await?;
            // HSCAN answers field, value, field, value...
            let found: Vec<String> = pairs.into_iter().step_by(2).collect();
            self.begin_removal(subject, &found, ticket).await?;
            members.extend(found);
            if next == 0 {
                return Ok(members);
            }
            cursor = next;
        }
    }

    /// Ends a removal begun with [`begin_removal_of_prefix`](Self::begin_removal_of_prefix),
    /// as [`end_removal`](Self::end_removal), and lets the next prefix removal begin.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call.
    pub async fn end_removal_of_prefix(
        &self,
        subject: &str,
        members: &[String],
        ticket: &QuotaTicket,
        removed: bool,
    ) -> Result<()> {
        self.end_removal(subject, members, ticket, removed).await?;
        self.release_prefix(subject, ticket).await
    }

    /// Gives up the prefix removal claim held under `ticket`.
    async fn release_prefix(&self, subject: &str, ticket: &QuotaTicket) -> Result<()> {
        let mut release = self.invocation(&RELEASE_PREFIX, subject)?;
        release.arg(ticket.as_ref());
        let _: u8 = self.conn.script("quota release prefix", &release).await?;
        Ok(())
    }

    /// Ends the removal of `members` of `subject` under `ticket` once its outcome is known:
    /// the record of each member it removed goes if the removal ran alone; otherwise (an
    /// overlapping write may have landed after it) it stays until its TTL. A removal that did
    /// not happen leaves the records as they are. One whose outcome is not known (it failed,
    /// and may have removed) is not ended.
    ///
    /// # Errors
    ///
    /// An invalid subject or a failed Redis call (the records then count until their TTL).
    pub async fn end_removal<S: AsRef<str>>(
        &self,
        subject: &str,
        members: &[S],
        ticket: &QuotaTicket,
        removed: bool,
    ) -> Result<()> {
        let removed = u64::from(removed);
        self.per_member_chunk(
            &END_REMOVAL,
            "quota end removal",
            subject,
            ticket,
            removed,
            members,
        )
        .await
    }

    /// Runs `script` on `members` of `subject` under `ticket`, [`CHUNK`] members a call (a
    /// script's arguments are all in Redis's memory at once): each call's arguments are the
    /// ticket, `argument`, then its members.
    async fn per_member_chunk<S: AsRef<str>>(
        &self,
        script: &'static Script,
        operation: &'static str,
        subject: &str,
        ticket: &QuotaTicket,
        argument: u64,
        members: &[S],
    ) -> Result<()> {
        for chunk in members.chunks(CHUNK) {
            let mut invocation = self.invocation(script, subject)?;
            invocation.arg(ticket.as_ref()).arg(argument);
            for member in chunk {
                invocation.arg(member.as_ref());
            }
            let _: u8 = self.conn.script(operation, &invocation).await?;
        }
        Ok(())
    }

    /// Begins a touch of `member` of `subject` under `ticket` that gives it `ttl` from now:
    /// its record's expiry becomes the later of its own and the touch's, until
    /// [`end_touch`](Self::end_touch).
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn begin_touch(
        &self,
        subject: &str,
        member: &str,
        ttl: Duration,
        ticket: &QuotaTicket,
    ) -> Result<()> {
        validate_ttl(ttl)?;
        let mut invocation = self.invocation(&BEGIN_TOUCH, subject)?;
        invocation
            .arg(ticket.as_ref())
            .arg(millis(self.in_flight))
            .arg(member)
            .arg(millis(ttl));
        let _: u8 = self.conn.script("quota begin touch", &invocation).await?;
        Ok(())
    }

    /// Ends a touch begun with [`begin_touch`](Self::begin_touch) (the same `ttl`): if it
    /// `touched` the entry and ran alone, the record's expiry is the touch's (earlier, maybe).
    ///
    /// # Errors
    ///
    /// An invalid subject, a TTL out of range, or a failed Redis call.
    pub async fn end_touch(
        &self,
        subject: &str,
        member: &str,
        ttl: Duration,
        ticket: &QuotaTicket,
        touched: bool,
    ) -> Result<()> {
        validate_ttl(ttl)?;
        let mut invocation = self.invocation(&END_TOUCH, subject)?;
        invocation
            .arg(ticket.as_ref())
            .arg(u8::from(touched))
            .arg(member)
            .arg(millis(ttl));
        let _: u8 = self.conn.script("quota end touch", &invocation).await?;
        Ok(())
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

    /// Forgets everything `subject` holds (its entries were flushed), operations in flight
    /// included.
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
