//! The work of a dataset: the start, the periodic attempts (refresh or follow), one refresh,
//! and the refresh lease.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::{CacheError, Codec, Result as CacheResult, Store};
use tokio::sync::{broadcast, watch};

use super::index::{Index, Stamp, fingerprint};
use super::state::{DatasetEvent, DatasetState, Metrics, RefreshReport, Role, Status};
use super::{DatasetError, FetchAll, FetchSingle, Settings, VersionOf};
use crate::TieredCache;
use crate::options::EntryOptions;
use crate::stats::L2Op;

/// How often a starting follower looks for the refresher's index.
const START_POLL: Duration = Duration::from_millis(50);
/// After this many failed attempts in a row, the holder lets the lease go: perhaps only it
/// cannot reach the source.
const LET_GO_AFTER: u32 = 3;

/// What the dataset's task and handle share.
pub(super) struct Shared<V, C> {
    pub(super) cache: TieredCache<V, C>,
    fetch_all: FetchAll<V>,
    pub(super) fetch_single: Option<FetchSingle<V>>,
    version: Option<VersionOf<V>>,
    settings: Settings,
    /// The options of reads and on-demand fills, and of the entries a refresh writes.
    pub(super) on_demand: EntryOptions,
    entries: EntryOptions,
    /// This instance's refresh-lease token: random, so that only its holder renews or releases.
    token: Bytes,
    /// The last index known here: applied by this instance, or read from the L2.
    index: Mutex<Arc<Index>>,
    /// The bytes of the index this instance last stored: read back unchanged, they need no
    /// decoding (a large dataset's index is the bulk of a refresh's own work).
    stored: Mutex<Option<Bytes>>,
    /// Whether the L2 refused this instance's last index for good (too large for it): its
    /// absence from the L2 then says nothing of the entries.
    index_refused: AtomicBool,
    status: Mutex<Status>,
    /// One refresh at a time on this instance (the periodic one, `refresh_now`).
    refreshing: tokio::sync::Mutex<()>,
    pub(super) events: broadcast::Sender<DatasetEvent>,
    metrics: Metrics,
}

/// What an attempt did.
enum Attempted {
    Refreshed(RefreshReport),
    Followed(u64),
}

impl<V, C> Shared<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) fn new(
        cache: TieredCache<V, C>,
        fetch_all: FetchAll<V>,
        fetch_single: Option<FetchSingle<V>>,
        version: Option<VersionOf<V>>,
        settings: Settings,
    ) -> Self {
        let on_demand = settings.on_demand(cache.default_options());
        let entries = settings.entries(cache.default_options());
        let metrics = Metrics::new(cache.namespace());
        Self {
            cache,
            fetch_all,
            fetch_single,
            version,
            settings,
            on_demand,
            entries,
            token: Bytes::copy_from_slice(&fastrand::u128(..).to_le_bytes()),
            index: Mutex::default(),
            stored: Mutex::default(),
            index_refused: AtomicBool::new(false),
            status: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
            events: broadcast::channel(64).0,
            metrics,
        }
    }

    fn lease_key(&self) -> String {
        format!("{}!dataset:lease", self.cache.namespace())
    }

    fn index_key(&self) -> String {
        format!("{}!dataset:index", self.cache.namespace())
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn known_index(&self) -> Arc<Index> {
        Arc::clone(&self.index.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes `index` as the one known here, unless a later one is known already.
    fn know(&self, index: Arc<Index>) {
        let mut known = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        if index.generation >= known.generation {
            *known = index;
        }
    }

    pub(super) fn state(&self) -> DatasetState {
        DatasetState::of(&self.status(), &self.known_index())
    }

    pub(super) fn keys(&self) -> Vec<String> {
        self.known_index().entries.keys().cloned().collect()
    }

    /// The first load: up to `initial_attempts` attempts, with the backoff between them.
    pub(super) async fn start(&self) -> Result<(), DatasetError> {
        let mut failures = 0;
        loop {
            let attempt = match self.refresh_and_report().await {
                Err(DatasetError::NotRefresher) => self.wait_for_refresher().await,
                other => other.map(|_| ()),
            };
            match attempt {
                Ok(()) => {
                    // The task's first attempt comes an interval from now.
                    self.status().next_attempt =
                        SystemTime::now().checked_add(self.settings.interval);
                    return Ok(());
                }
                Err(error) => {
                    failures += 1;
                    if failures >= self.settings.initial_attempts {
                        // The instances that start next need not wait for this one's lease.
                        self.release_lease().await;
                        return Err(error);
                    }
                    tokio::time::sleep(self.backoff(failures)).await;
                }
            }
        }
    }

    /// At start, while another instance holds the lease: its index, once it is in the L2.
    async fn wait_for_refresher(&self) -> Result<(), DatasetError> {
        let give_up = tokio::time::Instant::now() + self.settings.fetch_timeout();
        loop {
            if self.follow().await? > 0 {
                self.status().role = Role::Follower;
                return Ok(());
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(DatasetError::NotReady);
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// The periodic attempts, until `stop` says so.
    pub(super) async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut next = tokio::time::Instant::now() + self.settings.interval;
        loop {
            let wait = next.saturating_duration_since(tokio::time::Instant::now());
            self.status().next_attempt = SystemTime::now().checked_add(wait);
            if unless_stopped(&mut stop, tokio::time::sleep_until(next))
                .await
                .is_none()
            {
                return;
            }
            // Counted from each attempt's start, so that the lease's holder renews it every
            // interval however long its refreshes take.
            let began = tokio::time::Instant::now();
            // Not cancelled as a whole: a shutdown stops `fetch_all` only, and lets the writes
            // of a refresh that has fetched run to their end (an entry half-written and never
            // announced would leave other instances with their old copies).
            next = began + self.attempt(&mut stop).await;
            if *stop.borrow() {
                return;
            }
        }
    }

    /// One periodic attempt; the wait until the next.
    async fn attempt(&self, stop: &mut watch::Receiver<bool>) -> Duration {
        let known = self.known_index().generation;
        let attempted = match self.refresh(Some(stop)).await {
            Err(DatasetError::NotRefresher) => self.follow().await.map(Attempted::Followed),
            other => other.map(Attempted::Refreshed),
        };
        match attempted {
            Ok(Attempted::Refreshed(report)) => {
                self.succeeded(Role::Refresher);
                self.metrics.refreshed(&report);
                let _ = self.events.send(DatasetEvent::Refreshed(report));
                self.settings.interval
            }
            Ok(Attempted::Followed(generation)) => {
                if generation > known {
                    // Someone refreshed: the source answers again.
                    self.succeeded(Role::Follower);
                    self.metrics.followed(self.known_index().entries.len());
                } else {
                    // Failures counted here stand while the holder fails too, so that the
                    // backoff goes on growing when the lease changes hands.
                    self.status().role = Role::Follower;
                }
                let _ = self.events.send(DatasetEvent::Followed { generation });
                self.settings.interval
            }
            Err(DatasetError::ShutDown) => Duration::ZERO,
            Err(error) => self.failed(error).await,
        }
    }

    fn succeeded(&self, role: Role) {
        let mut status = self.status();
        status.role = role;
        status.consecutive_failures = 0;
    }

    /// Counts a failed attempt, and tells of it; the wait until the next.
    async fn failed(&self, error: DatasetError) -> Duration {
        let failures = self.count_failure(&error);
        let mut retry_in = self.backoff(failures);
        if failures.is_multiple_of(LET_GO_AFTER) && self.cache.store().is_some() {
            // Perhaps only this instance cannot reach the source: the lease is let go, and
            // this instance waits an interval, so that another may take it at its attempt.
            self.release_lease().await;
            retry_in = retry_in.max(self.settings.interval);
        }
        let _ = self.events.send(DatasetEvent::RefreshFailed {
            error: Arc::new(error),
            consecutive_failures: failures,
            retry_in,
        });
        retry_in
    }

    /// Counts a failed attempt (in the state, the metrics and the log); how many in a row.
    fn count_failure(&self, error: &DatasetError) -> u32 {
        let failures = {
            let mut status = self.status();
            status.consecutive_failures = status.consecutive_failures.saturating_add(1);
            status.consecutive_failures
        };
        self.metrics.failed(failures);
        // The error names no value; a fetch error's own text stays in its source.
        tracing::warn!(cache = %self.cache.namespace(), error = %error, consecutive_failures = failures, "dataset refresh failed; the last good data is served");
        failures
    }

    /// The wait after `failures` failed attempts in a row: doubling from the backoff's start
    /// up to its end, then between half and all of it at random.
    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        let full = self
            .settings
            .backoff_from()
            .saturating_mul(1 << doublings)
            .min(self.settings.backoff_to());
        full.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// A refresh on this instance, reported as the periodic ones are.
    pub(super) async fn refresh_and_report(&self) -> Result<RefreshReport, DatasetError> {
        match self.refresh(None).await {
            Ok(report) => {
                self.succeeded(Role::Refresher);
                self.metrics.refreshed(&report);
                let _ = self.events.send(DatasetEvent::Refreshed(report.clone()));
                Ok(report)
            }
            // Not a failure: the holder refreshes.
            Err(DatasetError::NotRefresher) => Err(DatasetError::NotRefresher),
            Err(error) => {
                self.count_failure(&error);
                Err(error)
            }
        }
    }

    /// Takes the refresh lease for this interval, or renews it if this instance holds it;
    /// `false` if another instance does. Without an L2 every instance refreshes.
    async fn take_lease(&self) -> CacheResult<bool> {
        let Some(store) = self.cache.store() else {
            return Ok(true);
        };
        // Longer than the interval, so that its holder renews it at its next attempt (one
        // runs every interval, sooner after a failure) before anyone else can take it; an
        // instance that dies loses it within one and a half intervals.
        let ttl = self.settings.interval.mul_f64(1.5);
        let key = self.lease_key();
        let taken = self
            .cache
            .store_call(
                L2Op::Set,
                store.set_if_absent(&key, self.token.clone(), ttl),
            )
            .await?;
        if taken {
            return Ok(true);
        }
        let renewal = store.compare_and_set(&key, &self.token, Some((self.token.clone(), ttl)));
        self.cache.store_call(L2Op::Set, renewal).await
    }

    /// Releases the refresh lease if this instance holds it.
    pub(super) async fn release_lease(&self) {
        if let Some(store) = self.cache.store() {
            let key = self.lease_key();
            // A failure leaves it to expire within an interval.
            let _ = self
                .cache
                .store_call(L2Op::Delete, store.compare_and_set(&key, &self.token, None))
                .await;
        }
    }

    /// Reads the index the refresher stored; its generation (0: none yet).
    async fn follow(&self) -> Result<u64, DatasetError> {
        let Some(store) = self.cache.store() else {
            return Ok(self.known_index().generation);
        };
        let key = self.index_key();
        let stored = self.cache.store_call(L2Op::Get, store.get(&key)).await?;
        if let Some(index) = stored
            .as_deref()
            .and_then(|bytes| Index::decode(self.cache.sealing(), &key, bytes))
        {
            self.know(Arc::new(index));
        }
        Ok(self.known_index().generation)
    }

    /// The index a refresh starts from: the L2's (another instance may have refreshed last),
    /// else the one known here; and the bytes read, which the new index must replace.
    async fn current_index(
        &self,
        store: Option<&Arc<dyn Store>>,
    ) -> CacheResult<(Arc<Index>, Option<Bytes>)> {
        let mut read = None;
        if let Some(store) = store {
            let key = self.index_key();
            read = self.cache.store_call(L2Op::Get, store.get(&key)).await?;
            let ours = {
                let stored = self.stored.lock().unwrap_or_else(PoisonError::into_inner);
                stored.is_some() && *stored == read
            };
            if !ours
                && let Some(index) = read
                    .as_deref()
                    .and_then(|bytes| Index::decode(self.cache.sealing(), &key, bytes))
            {
                self.know(Arc::new(index));
            }
        }
        Ok((self.known_index(), read))
    }

    /// Stores `next` over exactly the index the refresh read (`read`): a refresh that ran
    /// beside this one and stored first wins, and this one fails (it is tried again).
    async fn store_index(
        &self,
        store: &Arc<dyn Store>,
        next: &Index,
        read: Option<Bytes>,
    ) -> Result<(), DatasetError> {
        let lives = self.settings.entry_ttl();
        let key = self.index_key();
        let bytes = next.encode(self.cache.sealing(), &key, self.cache.clock().now(), lives)?;
        let stored = if let Some(read) = read {
            let replace = store.compare_and_set(&key, &read, Some((bytes.clone(), lives)));
            self.cache.store_call(L2Op::Set, replace).await?
        } else {
            let create = store.set_if_absent(&key, bytes.clone(), lives);
            self.cache.store_call(L2Op::Set, create).await?
        };
        if stored {
            *self.stored.lock().unwrap_or_else(PoisonError::into_inner) = Some(bytes);
            Ok(())
        } else {
            Err(DatasetError::Conflict)
        }
    }

    /// One refresh, if this instance holds the refresh lease (else `NotRefresher`):
    /// `fetch_all`, the lease renewed, then the writes of what changed and the removals of what
    /// is gone, then the new index.
    async fn refresh(
        &self,
        stop: Option<&mut watch::Receiver<bool>>,
    ) -> Result<RefreshReport, DatasetError> {
        let _one_at_a_time = self.refreshing.lock().await;
        if !self.take_lease().await? {
            return Err(DatasetError::NotRefresher);
        }
        let started = tokio::time::Instant::now();
        let store = self.cache.store().cloned();
        let (previous, read) = self.current_index(store.as_ref()).await?;
        // An L2 that holds no index (a server restarted without its data, a flush, an
        // eviction) has likely lost the entries too: compared with the index known here, they
        // would look unchanged and stay missing for half their TTL. Every entry is written
        // again; what the known index lists beyond the fetch is still removed. Not when the
        // L2 refused the last index for good (too large): every refresh would write it all.
        let rewrite_all = store.is_some()
            && read.is_none()
            && previous.generation > 0
            && !self.index_refused.load(Ordering::SeqCst);
        let limit = self.settings.fetch_timeout();
        let fetch = tokio::time::timeout(limit, (self.fetch_all)());
        let fetched = match stop {
            Some(stop) => unless_stopped(stop, fetch)
                .await
                .ok_or(DatasetError::ShutDown)?,
            None => fetch.await,
        };
        let fetched = fetched
            .map_err(|_| DatasetError::FetchTimedOut(limit))?
            .map_err(DatasetError::Fetch)?;
        // Renewed before anything is written: if it lapsed during the fetch and another
        // instance took it, that one refreshes, not this one.
        if !self.take_lease().await? {
            return Err(DatasetError::NotRefresher);
        }
        let now = self.cache.clock().now().as_millis();
        let mut plan = self.plan(&previous, fetched, now, rewrite_all);
        self.apply(&previous, &mut plan, now).await;
        let mut next = plan.next;
        let took = started.elapsed();
        next.took = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        next.refreshed_at = self.cache.clock().now().as_millis();
        let next = Arc::new(next);
        // Known here before it is stored: a store that refuses it (too large, down) must not
        // make the next refresh start again from the old one.
        self.know(Arc::clone(&next));
        // Stored even when some writes failed: what did land is known, and the rest is
        // written again next time.
        if let Some(store) = &store {
            let stored = self.store_index(store, &next, read).await;
            // A transient failure says nothing of whether the L2 takes this index.
            match &stored {
                Err(DatasetError::Cache(error)) if error.is_transient() => {}
                Err(DatasetError::Cache(_)) => self.index_refused.store(true, Ordering::SeqCst),
                _ => self.index_refused.store(false, Ordering::SeqCst),
            }
            stored?;
        }
        if let Some(first) = plan.first_error {
            return Err(DatasetError::Apply {
                failed: plan.failed,
                first,
            });
        }
        Ok(RefreshReport {
            generation: next.generation,
            entries: next.entries.len(),
            changed: next.changed,
            removed: next.removed,
            took,
        })
    }

    /// What a refresh must write and remove, comparing `fetched` with `previous` at `now`:
    /// a value whose fingerprint differs (or a new key) is written, and so is an unchanged one
    /// written more than half its TTL ago (or any, with `rewrite_all`); a key `fetched` lacks
    /// is removed.
    fn plan(
        &self,
        previous: &Index,
        fetched: Vec<(String, V)>,
        now: u64,
        rewrite_all: bool,
    ) -> Plan<V> {
        // A key that appears twice keeps its last value.
        let fetched: HashMap<String, V> = fetched.into_iter().collect();
        let half_life =
            u64::try_from((self.settings.entry_ttl() / 2).as_millis()).unwrap_or(u64::MAX);
        let mut plan = Plan {
            next: Index {
                generation: previous.generation.saturating_add(1),
                entries: HashMap::with_capacity(fetched.len()),
                ..Index::default()
            },
            rewrite_all,
            writes: Vec::new(),
            removals: previous
                .entries
                .keys()
                .filter(|key| !fetched.contains_key(*key))
                .cloned()
                .collect(),
            failed: 0,
            first_error: None,
        };
        for (key, value) in fetched {
            let fingerprint = match &self.version {
                Some(version) => u128::from(version(&value)),
                None => match fingerprint(&value) {
                    Ok(fingerprint) => fingerprint,
                    Err(error) => {
                        plan.keep(previous, key, error);
                        continue;
                    }
                },
            };
            match previous.entries.get(&key) {
                Some(stamp)
                    if !rewrite_all
                        && stamp.fingerprint == fingerprint
                        && now.saturating_sub(stamp.written_at) < half_life =>
                {
                    plan.next.entries.insert(key, *stamp);
                }
                known => {
                    let changed = known.is_none_or(|stamp| stamp.fingerprint != fingerprint);
                    plan.writes.push((key, value, fingerprint, changed));
                }
            }
        }
        plan
    }

    /// Makes the plan's writes and removals, a few at a time, recording in its index what
    /// landed; what failed stays as `previous` had it, for the next refresh to do again.
    async fn apply(&self, previous: &Index, plan: &mut Plan<V>, now: u64) {
        let written: Vec<_> = stream::iter(std::mem::take(&mut plan.writes))
            .map(|(key, value, fingerprint, changed)| async move {
                let result = self.cache.set_with(&key, value, &self.entries).await;
                (key, fingerprint, changed, result)
            })
            .buffer_unordered(self.settings.write_concurrency)
            .collect()
            .await;
        for (key, fingerprint, changed, result) in written {
            match result {
                Ok(()) => {
                    plan.next.changed += u64::from(changed);
                    let stamp = Stamp {
                        fingerprint,
                        written_at: now,
                    };
                    plan.next.entries.insert(key, stamp);
                }
                Err(error) => plan.keep(previous, key, error),
            }
        }
        let removed: Vec<_> = stream::iter(std::mem::take(&mut plan.removals))
            .map(|key| async move {
                let result = self.cache.delete(&key).await;
                (key, result)
            })
            .buffer_unordered(self.settings.write_concurrency)
            .collect()
            .await;
        for (key, result) in removed {
            match result {
                Ok(_) => plan.next.removed += 1,
                Err(error) => plan.keep(previous, key, error),
            }
        }
    }
}

/// What a refresh does to the cache, and the index it builds meanwhile.
struct Plan<V> {
    next: Index,
    /// Whether every entry is written again: one that fails is then kept as if written long
    /// ago, so that the next refresh writes it again too.
    rewrite_all: bool,
    /// Key, value, fingerprint, and whether it changed (or is new) rather than only aged.
    writes: Vec<(String, V, u128, bool)>,
    removals: Vec<String>,
    failed: usize,
    first_error: Option<CacheError>,
}

impl<V> Plan<V> {
    fn failure(&mut self, error: CacheError) {
        self.failed += 1;
        self.first_error.get_or_insert(error);
    }

    /// A write or removal of `key` failed: the key stays in the index as it was (a new key
    /// with a stamp that matches no value: the write may have landed all the same), so that
    /// the next refresh writes or removes it again.
    fn keep(&mut self, previous: &Index, key: String, error: CacheError) {
        let stamp = previous.entries.get(&key).copied().unwrap_or(Stamp {
            fingerprint: 0,
            written_at: 0,
        });
        // In a full rewrite, aged out: written again next time, not counted as changed.
        let stamp = if self.rewrite_all {
            Stamp {
                written_at: 0,
                ..stamp
            }
        } else {
            stamp
        };
        self.next.entries.insert(key, stamp);
        self.failure(error);
    }
}

/// `work`, unless `stop` turns true (or its sender is gone) first: then `None`, and `work` is
/// dropped where it stands.
async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    work: impl Future<Output = T>,
) -> Option<T> {
    let stopped = stop.wait_for(|stop| *stop);
    let (work, stopped) = (std::pin::pin!(work), std::pin::pin!(stopped));
    match futures_util::future::select(work, stopped).await {
        futures_util::future::Either::Left((done, _)) => Some(done),
        futures_util::future::Either::Right(_) => None,
    }
}
