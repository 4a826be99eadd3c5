//! What a dataset reports: its state for operators, its events, and its metrics.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use super::DatasetError;
use super::index::Index;
use crate::events::EventsError;

/// What this instance did at its last attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Nothing attempted yet.
    Starting,
    /// It refreshed the dataset (it held the refresh lease, or has no L2 to share one on).
    Refresher,
    /// Another instance held the refresh lease: this one took the result from the L2.
    Follower,
}

/// The state of a dataset, for operators; see [`Dataset::state`](super::Dataset::state).
///
/// The figures of the last refresh are the refresher's, wherever it ran: a follower reads them
/// from the index the refresher stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatasetState {
    /// What this instance did at its last attempt.
    pub role: Role,
    /// When the last successful refresh ended (by the refresher's clock).
    pub last_refresh: Option<SystemTime>,
    /// How long it took, `fetch_all` and the writes.
    pub last_refresh_took: Option<Duration>,
    /// How many refreshes have succeeded, across the instances.
    pub generation: u64,
    /// How many entries the dataset holds.
    pub entries: usize,
    /// How many entries the last refresh wrote because they changed or were new.
    pub changed: u64,
    /// How many entries it removed because `fetch_all` no longer had them.
    pub removed: u64,
    /// How many attempts in a row failed on this instance (0 after a success).
    pub consecutive_failures: u32,
    /// When this instance tries next.
    pub next_attempt: Option<SystemTime>,
}

/// What one refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefreshReport {
    /// The refresh's number, across the instances.
    pub generation: u64,
    /// How many entries the dataset holds now.
    pub entries: usize,
    /// How many it wrote because they changed or were new.
    pub changed: u64,
    /// How many it removed.
    pub removed: u64,
    /// How long it took.
    pub took: Duration,
}

/// Something a dataset did; see [`Dataset::events`](super::Dataset::events).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DatasetEvent {
    /// This instance refreshed the dataset.
    Refreshed(RefreshReport),
    /// Another instance refreshed it (this one read its index).
    Followed {
        /// The refresh's number.
        generation: u64,
    },
    /// An attempt failed: the last good data is served meanwhile.
    RefreshFailed {
        /// Why.
        error: Arc<DatasetError>,
        /// How many attempts in a row have failed.
        consecutive_failures: u32,
        /// When the next attempt comes.
        retry_in: Duration,
    },
}

/// A subscription to a dataset's events.
#[derive(Debug)]
pub struct DatasetEvents(pub(super) broadcast::Receiver<DatasetEvent>);

impl DatasetEvents {
    /// The next event.
    ///
    /// # Errors
    ///
    /// [`EventsError::Lagged`] if events were dropped because this listener fell behind,
    /// [`EventsError::Closed`] once the dataset is gone.
    pub async fn recv(&mut self) -> Result<DatasetEvent, EventsError> {
        self.0.recv().await.map_err(|error| match error {
            broadcast::error::RecvError::Lagged(dropped) => EventsError::Lagged(dropped),
            broadcast::error::RecvError::Closed => EventsError::Closed,
        })
    }
}

/// This instance's side of the state.
#[derive(Debug, Clone)]
pub(super) struct Status {
    pub(super) role: Role,
    pub(super) consecutive_failures: u32,
    pub(super) next_attempt: Option<SystemTime>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            role: Role::Starting,
            consecutive_failures: 0,
            next_attempt: None,
        }
    }
}

impl DatasetState {
    pub(super) fn of(status: &Status, index: &Index) -> Self {
        let refreshed = index.generation > 0;
        Self {
            role: status.role,
            last_refresh: refreshed
                .then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(index.refreshed_at)),
            last_refresh_took: refreshed.then(|| Duration::from_millis(index.took)),
            generation: index.generation,
            entries: index.entries.len(),
            changed: index.changed,
            removed: index.removed,
            consecutive_failures: status.consecutive_failures,
            next_attempt: status.next_attempt,
        }
    }
}

/// The dataset's metrics, labelled with its cache's namespace.
#[derive(Debug)]
pub(super) struct Metrics {
    refreshed: metrics::Counter,
    followed: metrics::Counter,
    failed: metrics::Counter,
    changed: metrics::Counter,
    removed: metrics::Counter,
    duration: metrics::Histogram,
    entries: metrics::Gauge,
    failures: metrics::Gauge,
}

impl Metrics {
    pub(super) fn new(cache: &str) -> Self {
        let cache = cache.to_owned();
        let refreshes = |outcome: &'static str| metrics::counter!("tierstack_dataset_refreshes_total", "cache" => cache.clone(), "outcome" => outcome);
        let changes = |change: &'static str| metrics::counter!("tierstack_dataset_changes_total", "cache" => cache.clone(), "change" => change);
        Self {
            refreshed: refreshes("refreshed"),
            followed: refreshes("followed"),
            failed: refreshes("failed"),
            changed: changes("changed"),
            removed: changes("removed"),
            duration: metrics::histogram!("tierstack_dataset_refresh_duration_seconds", "cache" => cache.clone()),
            entries: metrics::gauge!("tierstack_dataset_entries", "cache" => cache.clone()),
            failures: metrics::gauge!("tierstack_dataset_consecutive_failures", "cache" => cache),
        }
    }

    pub(super) fn refreshed(&self, report: &RefreshReport) {
        self.refreshed.increment(1);
        self.changed.increment(report.changed);
        self.removed.increment(report.removed);
        self.duration.record(report.took.as_secs_f64());
        self.entries.set(gauge(report.entries));
        self.failures.set(0.0);
    }

    pub(super) fn followed(&self, entries: usize) {
        self.followed.increment(1);
        self.entries.set(gauge(entries));
        self.failures.set(0.0);
    }

    pub(super) fn failed(&self, consecutive: u32) {
        self.failed.increment(1);
        self.failures.set(f64::from(consecutive));
    }
}

/// A count as a gauge's value (exact up to 2^32, far past any dataset).
fn gauge(count: usize) -> f64 {
    f64::from(u32::try_from(count).unwrap_or(u32::MAX))
}
