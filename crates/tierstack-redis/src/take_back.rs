//! Taking back a write whose reply never came.
//!
//! A `SET` that times out may still be on its way: held by a partition, it reaches Redis when
//! the link heals, seconds later, over whatever was written since, and stays for its whole TTL.
//! Its caller was told it failed; the writes after it were told they succeeded. So a write
//! that gets no reply (its call times out, or its caller gives up on it) is followed, on the same
//! connection, by one compare-and-delete per `SET` it sent: the key is removed if it holds
//! exactly the value that write put there. Redis runs one connection's commands in order, so
//! whenever the write arrives, its take-back runs after it; if a later write got there first,
//! the take-back finds another value and leaves it.
//!
//! What is left: a read between the late write and its take-back (they arrive together and
//! run back to back, so only if they are split across reads); a connection replaced in
//! between, whose late bytes are no longer ordered with the take-back (it is sent on the
//! replaced one while it still exists). At most [`MAX_PENDING`] take-backs wait at once;
//! beyond that a write is not taken back (logged).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Arg, Cmd, Pipeline, RedisResult, Value};

/// Removes `KEYS[1]` if it holds exactly `ARGV[1]` (a key of another type is left alone).
const TAKE_BACK_SCRIPT: &str = "if redis.call('TYPE', KEYS[1]).ok == 'string'
     and redis.call('GET', KEYS[1]) == ARGV[1] then
       redis.call('UNLINK', KEYS[1]) return 1
     end
     return 0";

/// The most take-backs waiting for their reply at once, per connection.
pub(crate) const MAX_PENDING: usize = 1024;

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

/// A write on its way. Dropped armed, it sends the take-back of each `SET` it holds on
/// `connection`, on a task of its own.
pub(crate) struct TakeBack<'a, H: ConnectionLike + Send + 'static> {
    connection: Option<H>,
    sent: Sent<'a>,
    pending: &'a Arc<async_lock::Semaphore>,
}

impl<'a, H: ConnectionLike + Send + 'static> TakeBack<'a, H> {
    pub(crate) fn arm(
        connection: H,
        sent: Sent<'a>,
        pending: &'a Arc<async_lock::Semaphore>,
    ) -> Self {
        Self {
            connection: Some(connection),
            sent,
            pending,
        }
    }

    /// Keeps the write if Redis answered it (applied, or refused): only a write with no
    /// answer may still be on its way.
    pub(crate) fn disarm_if_answered<T>(mut self, result: &RedisResult<T>) {
        let unanswered = result.as_ref().is_err_and(|error| {
            error.is_io_error() || error.is_timeout() || error.is_connection_dropped()
        });
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
        let Some(permit) = self.pending.try_acquire_arc() else {
            tracing::warn!(
                pending = MAX_PENDING,
                "a Redis write that got no reply is not taken back: too many take-backs wait"
            );
            return;
        };
        runtime.spawn(async move {
            let reply = tokio::time::timeout(PATIENCE, undo.query_async::<Value>(&mut connection));
            let _ = reply.await;
            drop(permit);
        });
    }
}

/// The compare-and-deletes that take back each `SET key value …` of `sent`, if it holds any,
/// followed by a copy of each `PUBLISH` it sent: an instance that read the late value in
/// between hears of the key again.
fn take_backs(sent: Sent<'_>) -> Option<Pipeline> {
    let commands: Vec<&Cmd> = match sent {
        Sent::Command(command) => vec![command],
        Sent::Pipeline(pipeline) => pipeline.cmd_iter().collect(),
    };
    let mut undo = Pipeline::new();
    let mut sets = 0;
    for command in &commands {
        let mut args = command.args_iter();
        if let (Some(Arg::Simple(name)), Some(Arg::Simple(key)), Some(Arg::Simple(value))) =
            (args.next(), args.next(), args.next())
            && name.eq_ignore_ascii_case(b"SET")
        {
            undo.cmd("EVAL")
                .arg(TAKE_BACK_SCRIPT)
                .arg(1)
                .arg(key)
                .arg(value)
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
    fn each_set_is_taken_back_by_its_key_and_value_and_its_publishes_sent_again() {
        let mut sent = Pipeline::new();
        sent.cmd("SET").arg("k1").arg(b"v1").arg("PX").arg(1000);
        sent.cmd("PUBLISH").arg("channel").arg("k1");
        sent.cmd("set").arg("k2").arg(b"v2").arg("PX").arg(1000);
        let undo = take_backs(Sent::Pipeline(&sent)).unwrap();
        let script = TAKE_BACK_SCRIPT.as_bytes().to_vec();
        let eval = |key: &[u8], value: &[u8]| {
            vec![
                b"EVAL".to_vec(),
                script.clone(),
                b"1".to_vec(),
                key.to_vec(),
                value.to_vec(),
            ]
        };
        let publish = vec![b"PUBLISH".to_vec(), b"channel".to_vec(), b"k1".to_vec()];
        assert_eq!(
            args(&undo),
            vec![eval(b"k1", b"v1"), eval(b"k2", b"v2"), publish]
        );
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
