//! Taking back a write whose reply never came.
//!
//! A `SET` that times out may still be on its way: held by a partition, or queued at a stalled
//! server, it reaches Redis seconds later, over whatever was written since, and would stay for its
//! whole TTL. Its caller was told it failed; the writes after it were told they succeeded. A
//! delete's tombstone landing late is no better: its older write time passes for the key's last
//! write, and a cache with write recovery replays a kept write older than the one it hid over it.
//! So a write that gets no reply (its call times out, or its caller gives up on it) is followed, on
//! the same connection, by one script per `SET` it sent: if the key holds exactly that value
//! (compared by SHA-1, so the value is not sent twice), it is replaced: a cache entry (an envelope)
//! by a tombstone stamped with the server's time, for the rest of the entry's TTL (a value's at
//! most [`TOMBSTONE_FOR`]); other bytes expire [`LINGER`] later. Redis runs one connection's
//! commands in order, so whenever the write arrives, its take-back runs after it; a later write
//! that got there first is left alone. The key is not emptied at once: a load's `SET NX` queued
//! behind it (a value read before the write) still finds it there and is refused, as it would be
//! without the take-back. And a tombstone rather than a lingering value or an empty key: the late
//! value may have landed over a later write (sent on another connection, of another instance), and
//! a replay of a write kept by a cache with write recovery compares write times with what the key
//! holds; the tombstone, newer than anything written before the take-back, makes it stand down.
//!
//! Best effort, and what is left:
//! - a read of a late value that is no cache entry before it expires (its remaining life is at
//!   most [`LINGER`], and the write's `PUBLISH`es are sent again after the take-back);
//! - the server's clock against the caches': a tombstone stamped earlier than a write it
//!   replaced (a server clock behind theirs) does not make an older kept write stand down;
//! - a connection replaced in between: standalone, the take-back goes on the write's
//!   connection while it exists; in a cluster, redis-rs's cluster client routes it to whichever
//!   connection serves the slot then, so a late write and its take-back may not be ordered;
//! - a write never sent (its caller gave up before it left) whose take-back finds the same bytes
//!   written since by another call (the cache's entries carry their write time, so two differ
//!   unless written in the same millisecond, or by a replay of the same kept write);
//! - at most [`MAX_PENDING`] take-backs wait at once per connection; beyond that a write is
//!   not taken back (logged once per burst);
//! - removals and expiries (`UNLINK`, `expire`) are not taken back: landing late over a later
//!   write, they empty the key (at once, or when a shortened TTL runs out), and the replay of an
//!   older kept write may then fill it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Arg, Cmd, Pipeline, RedisResult, Value};
use tierstack_core::envelope;

/// Makes `KEYS[1]` expire in `ARGV[2]` milliseconds if it holds a value whose SHA-1 is
/// `ARGV[1]` (a key of another type is left alone).
const TAKE_BACK_SCRIPT: &str = "if redis.call('TYPE', KEYS[1]).ok == 'string'
     and redis.sha1hex(redis.call('GET', KEYS[1])) == ARGV[1] then
       redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
     end
     return 0";

/// The take-back of a cache entry (an envelope): if `KEYS[1]` holds a value whose SHA-1 is
/// `ARGV[1]`, replaces it with the tombstone `ARGV[2]` stamped with the server's time as its write
/// time, for the value's remaining TTL or `ARGV[3]` ms if that is shorter. A replay of a write kept
/// before then (by a cache with write recovery) then finds a newer delete and stands down, where a
/// lingering value would pass for what the key holds (it may hide a later write that it landed
/// over), and an empty key for one that nothing newer was written to. It asks for its effects to be
/// replicated (`TIME` before a write): the default since Redis 5, and a no-op since 7, but a 6.2
/// server may be configured to replicate whole scripts, which it would refuse.
static TOMBSTONE_SCRIPT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "if redis.replicate_commands then redis.replicate_commands() end
         if redis.call('TYPE', KEYS[1]).ok == 'string'
           and redis.sha1hex(redis.call('GET', KEYS[1])) == ARGV[1] then
           local now = redis.call('TIME')
           local millis = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
           local ttl = redis.call('PTTL', KEYS[1])
           if ttl == 0 then return 0 end
           if ttl < 0 or ttl > tonumber(ARGV[3]) then ttl = tonumber(ARGV[3]) end
           redis.call('SET', KEYS[1], string.sub(ARGV[2], 1, {before})
             .. struct.pack('<I8', millis) .. string.sub(ARGV[2], {after}), 'PX', ttl)
           return 1
         end
         return 0",
        before = envelope::WRITTEN_AT.start,
        after = envelope::WRITTEN_AT.end + 1,
    )
});

/// How long a taken-back value stays before it expires.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// The most take-backs waiting for their reply at once, per connection.
pub(crate) const MAX_PENDING: usize = 1024;

/// The longest a take-back's tombstone stays in place of a value: as long as a delete's, by
/// default (in place of a late delete's tombstone, it keeps that one's TTL). Long enough
/// for the replays of writes kept during the outage (they run once the server answers again);
/// short enough not to hide, for the whole TTL of a fail-safe entry, the stale copies that
/// readers keep as fallbacks (a tombstone reads as a delete).
const TOMBSTONE_FOR: Duration = Duration::from_secs(60);

/// How long a take-back keeps its connection open waiting for its reply. Its bytes are on
/// their way well before; keeping the connection open keeps them ordered behind the write
/// even if the store has moved to another connection meanwhile.
const PATIENCE: Duration = Duration::from_secs(30);

/// What a write sent: one command or a pipeline.
#[derive(Clone, Copy)]
pub(crate) enum Sent<'a> {
    Command(&'a Cmd),
    Pipeline(&'a Pipeline),
}

/// The bound on a connection's pending take-backs, and whether the last one was turned away
/// (so that a burst is logged once).
pub(crate) struct Pending {
    permits: Arc<async_lock::Semaphore>,
    refusing: AtomicBool,
    /// Whether the last take-back that got an answer was refused, so that a burst of refusals
    /// (a missing ACL right, say) is logged once.
    refused: Arc<AtomicBool>,
}

impl Pending {
    pub(crate) fn new() -> Self {
        Self {
            permits: Arc::new(async_lock::Semaphore::new(MAX_PENDING)),
            refusing: AtomicBool::new(false),
            refused: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// A write on its way. Dropped armed, it sends the take-back of each `SET` it holds on
/// `connection`, on a task of its own.
pub(crate) struct TakeBack<'a, H: ConnectionLike + Send + 'static> {
    connection: Option<H>,
    sent: Sent<'a>,
    pending: &'a Pending,
    /// A cluster connection: its driver retries a request on other connections, so the last
    /// attempt's answer says nothing of the first.
    cluster: bool,
}

impl<'a, H: ConnectionLike + Send + 'static> TakeBack<'a, H> {
    pub(crate) fn arm(connection: H, sent: Sent<'a>, pending: &'a Pending, cluster: bool) -> Self {
        Self {
            connection: Some(connection),
            sent,
            pending,
            cluster,
        }
    }

    /// Keeps the write if Redis answered it (applied, or refused) or if it never left (the
    /// connection was refused): only a write with no answer may still be on its way.
    pub(crate) fn disarm_if_answered<T>(mut self, result: &RedisResult<T>) {
        let unanswered = match result {
            Ok(_) => false,
            Err(error) if error.is_connection_refusal() => false,
            Err(_) if self.cluster => true,
            Err(error) => {
                error.is_io_error() || error.is_timeout() || error.is_connection_dropped()
            }
        };
        if !unanswered {
            self.connection = None;
        }
    }
}

impl<H: ConnectionLike + Send + 'static> Drop for TakeBack<'_, H> {
    fn drop(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let Some(undo) = take_backs(self.sent) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(permit) = self.pending.permits.try_acquire_arc() else {
            if !self.pending.refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    pending = MAX_PENDING,
                    "Redis writes that got no reply are not taken back: too many take-backs \
                     wait (logged once until one is taken back again)"
                );
            }
            return;
        };
        self.pending.refusing.store(false, Ordering::Relaxed);
        let refused = Arc::clone(&self.pending.refused);
        runtime.spawn(async move {
            let reply = tokio::time::timeout(PATIENCE, undo.query_async::<Value>(&mut connection));
            // A refusal (a missing ACL right, say) is no fault of the connection's: said once
            // per burst, or late writes would stay for their TTL unnoticed.
            match reply.await {
                Ok(Err(error)) if !error.is_io_error() && !error.is_timeout() => {
                    if !refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %error,
                            "Redis refused the take-back of a write that got no reply, or the \
                             publishes sent again with it (logged once until one is accepted)"
                        );
                    }
                }
                Ok(Ok(_)) => refused.store(false, Ordering::Relaxed),
                Ok(Err(_)) | Err(_) => {}
            }
            drop(permit);
        });
    }
}

/// The take-backs of each `SET key value …` of `sent`, if it holds any, followed by a copy of
/// each `PUBLISH` it sent: an instance that read the late value in between hears of the key
/// again.
fn take_backs(sent: Sent<'_>) -> Option<Pipeline> {
    let commands: Vec<&Cmd> = match sent {
        Sent::Command(command) => vec![command],
        Sent::Pipeline(pipeline) => pipeline.cmd_iter().collect(),
    };
    let linger = u64::try_from(LINGER.as_millis()).unwrap_or(u64::MAX);
    let tombstone_for = u64::try_from(TOMBSTONE_FOR.as_millis()).unwrap_or(u64::MAX);
    let mut undo = Pipeline::new();
    let mut sets = 0;
    for command in &commands {
        let mut args = command.args_iter();
        if let (Some(Arg::Simple(name)), Some(Arg::Simple(key)), Some(Arg::Simple(value))) =
            (args.next(), args.next(), args.next())
            && name.eq_ignore_ascii_case(b"SET")
        {
            let digest = sha1_smol::Sha1::from(value).digest().to_string();
            // A cache entry becomes a tombstone; other bytes linger, then expire.
            let tombstone = envelope::tombstone_in_place_of(value);
            let script = match tombstone {
                Some(_) => TOMBSTONE_SCRIPT.as_str(),
                None => TAKE_BACK_SCRIPT,
            };
            // A late delete's tombstone keeps the rest of its own life (its `PX`, a cache's
            // `tombstone_ttl`, which may be longer than the minute).
            let longest = if envelope::is_tombstone(value) {
                expiry_millis(args).unwrap_or(tombstone_for)
            } else {
                tombstone_for
            };
            let call = undo.cmd("EVAL").arg(script).arg(1).arg(key).arg(digest);
            match &tombstone {
                Some(tombstone) => call.arg(tombstone.as_ref()).arg(longest),
                None => call.arg(linger),
            }
            .ignore();
            sets += 1;
        }
    }
    if sets == 0 {
        return None;
    }
    for command in commands {
        if let Some(Arg::Simple(name)) = command.args_iter().next()
            && name.eq_ignore_ascii_case(b"PUBLISH")
        {
            undo.add_command(command.clone()).ignore();
        }
    }
    Some(undo)
}

/// The `PX` of a `SET`'s options (`args`, past its value), in milliseconds.
fn expiry_millis<'a>(mut args: impl Iterator<Item = Arg<&'a [u8]>>) -> Option<u64> {
    while let Some(arg) = args.next() {
        if let Arg::Simple(option) = arg
            && option.eq_ignore_ascii_case(b"PX")
        {
            let Arg::Simple(millis) = args.next()? else {
                return None;
            };
            return std::str::from_utf8(millis).ok()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pipeline: &Pipeline) -> Vec<Vec<Vec<u8>>> {
        pipeline
            .cmd_iter()
            .map(|command| {
                command
                    .args_iter()
                    .map(|arg| match arg {
                        Arg::Simple(bytes) => bytes.to_vec(),
                        _ => b"(not a simple argument)".to_vec(),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn each_set_is_taken_back_by_its_key_and_digest_and_its_publishes_sent_again() {
        let mut sent = Pipeline::new();
        sent.cmd("SET").arg("k1").arg(b"v1").arg("PX").arg(1000);
        sent.cmd("PUBLISH").arg("channel").arg("k1");
        sent.cmd("set").arg("k2").arg(b"v2").arg("PX").arg(1000);
        let undo = take_backs(Sent::Pipeline(&sent)).unwrap();
        let script = TAKE_BACK_SCRIPT.as_bytes().to_vec();
        let eval = |key: &[u8], digest: &str| {
            vec![
                b"EVAL".to_vec(),
                script.clone(),
                b"1".to_vec(),
                key.to_vec(),
                digest.as_bytes().to_vec(),
                b"1000".to_vec(),
            ]
        };
        let publish = vec![b"PUBLISH".to_vec(), b"channel".to_vec(), b"k1".to_vec()];
        // SHA-1 of "v1" and "v2", as Redis's `sha1hex` spells them.
        assert_eq!(
            args(&undo),
            vec![
                eval(b"k1", "5a6df720540c20d95d530d3fd6885511223d5d20"),
                eval(b"k2", "a1047eab1035d58682a53557e0b2a75edbfd15fd"),
                publish
            ]
        );
    }

    #[test]
    fn a_cache_entry_is_taken_back_to_a_tombstone_of_its_codec_and_expiry() {
        use tierstack_core::BincodeCodec;
        use tierstack_core::clock::Timestamp;
        let value = envelope::encode(
            &BincodeCodec::default(),
            Some("v"),
            Timestamp::from_millis(1_000),
            Timestamp::from_millis(61_000),
            usize::MAX,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut sent = Cmd::new();
        sent.arg("SET")
            .arg("k")
            .arg(value.as_ref())
            .arg("PX")
            .arg(60_000);
        let undo = args(&take_backs(Sent::Command(&sent)).unwrap_or_else(|| panic!("a SET")));
        assert_eq!(undo.len(), 1);
        let [eval, script, keys, key, digest, tombstone, longest] = undo[0].as_slice() else {
            panic!("seven arguments: {undo:?}");
        };
        assert_eq!(longest, b"60000");
        assert_eq!(
            (eval.as_slice(), keys.as_slice(), key.as_slice()),
            (b"EVAL".as_slice(), b"1".as_slice(), b"k".as_slice())
        );
        assert_eq!(script, TOMBSTONE_SCRIPT.as_bytes());
        assert_eq!(
            digest,
            sha1_smol::Sha1::from(&value)
                .digest()
                .to_string()
                .as_bytes()
        );
        let parsed = envelope::Envelope::parse::<BincodeCodec>(tombstone, usize::MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.tombstone);
        assert_eq!(parsed.expires_at, Timestamp::from_millis(61_000));
    }

    /// The longest life (the script's last argument) of a take-back's tombstone: a minute for a
    /// value's, whatever its TTL; a late delete's tombstone keeps its own `PX`.
    #[test]
    fn a_late_tombstone_keeps_its_own_life_and_a_value_is_capped_at_a_minute() {
        use tierstack_core::BincodeCodec;
        use tierstack_core::clock::Timestamp;
        let (written, expires) = (
            Timestamp::from_millis(1_000),
            Timestamp::from_millis(601_000),
        );
        let value = envelope::encode(&BincodeCodec::default(), Some("v"), written, expires, 1024)
            .unwrap_or_else(|e| panic!("{e}"));
        let tombstone = envelope::encode_tombstone::<BincodeCodec>(written, expires, 7);
        for (bytes, options, longest) in [
            (&value, ["PX", "600000"], b"60000".as_slice()),
            (&tombstone, ["PX", "120000"], b"120000".as_slice()),
        ] {
            let mut sent = Cmd::new();
            sent.arg("SET").arg("k").arg(bytes.as_ref()).arg(&options);
            let mut replace = sent.clone();
            replace.arg("GET");
            for sent in [sent, replace] {
                let undo =
                    args(&take_backs(Sent::Command(&sent)).unwrap_or_else(|| panic!("a SET")));
                assert_eq!(
                    undo[0].last().map(Vec::as_slice),
                    Some(longest),
                    "{options:?}"
                );
            }
        }
    }

    #[test]
    fn a_write_without_a_set_has_nothing_to_take_back() {
        let mut unlink = Cmd::new();
        unlink.arg("UNLINK").arg("k");
        assert!(take_backs(Sent::Command(&unlink)).is_none());
        let mut announced = Pipeline::new();
        announced.cmd("UNLINK").arg("k");
        announced.cmd("PUBLISH").arg("channel").arg("k");
        assert!(take_backs(Sent::Pipeline(&announced)).is_none());
    }
}
