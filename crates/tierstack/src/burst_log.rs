//! Logs a recurring failure once per burst instead of once per call: an L2 outage under load
//! would otherwise write thousands of identical lines a second.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long after a logged failure further ones are only counted.
const QUIET_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub(crate) struct BurstLog {
    state: Mutex<Option<(Instant, u64)>>,
}

impl BurstLog {
    /// Returns `Some(suppressed)` when this failure should be logged, with the number of failures
    /// swallowed since the last logged one; `None` while the quiet period lasts.
    pub(crate) fn should_log(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match &mut *state {
            Some((last, suppressed)) if now.duration_since(*last) < QUIET_PERIOD => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let swallowed = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(swallowed)
            }
            None => {
                *state = Some((now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_failure_then_counts() {
        let log = BurstLog::default();
        assert_eq!(log.should_log(), Some(0));
        assert_eq!(log.should_log(), None);
        assert_eq!(log.should_log(), None);
    }
}
