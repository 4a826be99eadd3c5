//! `FirestoreStore`: the byte [`Store`] on Google Cloud Firestore.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use firestore::errors::FirestoreError;
use firestore::{FirestoreDb, FirestoreDbOptions, FirestoreWritePrecondition, path, paths};
use futures_util::StreamExt;
use tierstack_core::clock::{SharedClock, Timestamp, system_clock};
use tierstack_core::key::{DEFAULT_MAX_STORE_KEY_LEN, validate_key};
use tierstack_core::store::{Store, StoreWrite, StoredEntry, validate_prefix, validate_ttl};
use tierstack_core::{CacheError, Result};

use firestore::gcloud_sdk::google_cloud_auth::credentials::Credentials;

use crate::document::{
    CacheDocument, ExpiryFields, ReadDocument, StoredDocument, ValueDocument, document_id,
    prefix_successor,
};
use crate::emulator::EmulatorCredentials;

/// Firestore's limit on one document, in bytes.
pub const MAX_DOCUMENT_LEN: usize = 1_048_576;
/// Room kept in a document for the field names, the timestamps and the key's index entry.
const DOCUMENT_OVERHEAD: usize = 512;
/// The most writes Firestore takes in one batch.
const BATCH: usize = 500;
/// The shortest request timeout (zero would fail every request).
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest request timeout: a longer one is a slip of units.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most retries: the client's pause before retry `n` is up to 2^(n-1) s, so more retries
/// would let one request wait for hours.
const MAX_RETRIES: usize = 10;

/// Where a `FirestoreStore` keeps its entries.
///
/// With an [`emulator_host`](Self::emulator_host), or else with `FIRESTORE_EMULATOR_HOST` set,
/// the store talks to that emulator without credentials; otherwise it uses the usual Google
/// credentials (`GOOGLE_APPLICATION_CREDENTIALS`, the metadata server, gcloud's application
/// default credentials).
#[derive(Clone)]
pub struct FirestoreConfig {
    project_id: String,
    database_id: String,
    collection: String,
    key_prefix: String,
    request_timeout: Duration,
    max_retries: usize,
    emulator_host: Option<String>,
}

impl fmt::Debug for FirestoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirestoreConfig")
            .field("project_id", &self.project_id)
            .field("database_id", &self.database_id)
            .field("collection", &self.collection)
            .field("key_prefix", &self.key_prefix)
            .field("request_timeout", &self.request_timeout)
            .field("emulator_host", &self.emulator_host)
            .finish_non_exhaustive()
    }
}

/// The default collection of cache entries.
pub const DEFAULT_COLLECTION: &str = "tierstack_cache";

impl FirestoreConfig {
    /// Entries of project `project_id`, default database, collection
    /// [`DEFAULT_COLLECTION`], request attempts limited to 5 s, reads retried twice.
    pub fn new(project_id: &str) -> Self {
        Self {
            project_id: project_id.to_owned(),
            database_id: firestore::FIREBASE_DEFAULT_DATABASE_ID.to_owned(),
            collection: DEFAULT_COLLECTION.to_owned(),
            key_prefix: String::new(),
            request_timeout: Duration::from_secs(5),
            max_retries: 2,
            emulator_host: None,
        }
    }

    /// Talks to the Firestore emulator at `host` (`127.0.0.1:8080`, as `FIRESTORE_EMULATOR_HOST`
    /// would name it) without credentials, whatever the environment says: for tests that start
    /// an emulator of their own.
    #[must_use]
    pub fn emulator_host(mut self, host: &str) -> Self {
        self.emulator_host = Some(host.to_owned());
        self
    }

    /// A named database instead of `(default)`.
    #[must_use]
    pub fn database_id(mut self, database_id: &str) -> Self {
        database_id.clone_into(&mut self.database_id);
        self
    }

    /// The collection of the entries.
    #[must_use]
    pub fn collection(mut self, collection: &str) -> Self {
        collection.clone_into(&mut self.collection);
        self
    }

    /// A prefix put before every key, so that applications can share a collection.
    #[must_use]
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.key_prefix);
        self
    }

    /// How long one attempt of a request may take (default 5 s, from 1 ms to 1 h; Firestore's
    /// client sets none).
    ///
    /// A read whose attempt fails with a transient error (this timeout included) is sent again,
    /// up to [`max_retries`](Self::max_retries) times, after a random pause of the client's: up
    /// to 1 s before the first retry, 2 s before the second, doubling. So every request the
    /// store sends ends within `request_timeout` × (1 + `max_retries`) plus those pauses (with
    /// the defaults, 5 s × 3 + 3 s = 18 s), and the store enforces that bound on each request,
    /// writes included (the client retries a failed batch write by itself, without a limit of
    /// its own). A store operation may send more than one request (`set_if_absent`, `delete`,
    /// `delete_prefix`); bound whole operations with the composer's L2 timeout.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How often a read that failed with a transient error is sent again (default 2, at most
    /// 10); see [`request_timeout`](Self::request_timeout) for the bound this sets.
    #[must_use]
    pub fn max_retries(mut self, retries: usize) -> Self {
        self.max_retries = retries;
        self
    }

    /// Checks the request timeout (from 1 ms to 1 h), the retries (at most 10) and the
    /// emulator host (`host:port`), failing with [`CacheError::Configuration`] naming the
    /// setting. [`FirestoreStore::connect`] calls
    /// it before connecting.
    pub fn validate(&self) -> Result<()> {
        if self.request_timeout < MIN_REQUEST_TIMEOUT || self.request_timeout > MAX_REQUEST_TIMEOUT
        {
            return Err(CacheError::Configuration(format!(
                "FirestoreConfig::request_timeout must be from {MIN_REQUEST_TIMEOUT:?} to \
                 {MAX_REQUEST_TIMEOUT:?}, not {:?}",
                self.request_timeout
            )));
        }
        if let Some(host) = &self.emulator_host
            && (host.is_empty() || host.contains('/'))
        {
            return Err(CacheError::Configuration(format!(
                "FirestoreConfig::emulator_host must be host:port, without a scheme or path, \
                 not {host:?}"
            )));
        }
        if self.max_retries > MAX_RETRIES {
            return Err(CacheError::Configuration(format!(
                "FirestoreConfig::max_retries must be at most {MAX_RETRIES}, not {}",
                self.max_retries
            )));
        }
        Ok(())
    }

    /// The longest one request may take: every attempt at the request timeout, plus the
    /// client's longest pause before each retry (2^n s before retry n + 1).
    fn request_limit(&self) -> Duration {
        let attempts = u32::try_from(self.max_retries)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let pauses = (0..self.max_retries).fold(Duration::ZERO, |total, retry| {
            let pause = 1u64
                .checked_shl(u32::try_from(retry).unwrap_or(u32::MAX))
                .unwrap_or(u64::MAX);
            total.saturating_add(Duration::from_secs(pause))
        });
        self.request_timeout
            .saturating_mul(attempts)
            .saturating_add(pauses)
    }
}

/// An expired entry handed to a [`FirestoreStore::sweep_expired_with`] callback before it is
/// deleted.
#[derive(Debug, Clone)]
pub struct ExpiredEntry {
    /// The key, without the store's prefix.
    pub key: String,
    /// The stored bytes.
    pub value: Bytes,
    /// When it expired.
    pub expires_at: SystemTime,
}

/// A [`Store`] on Firestore: one document per key in one collection.
///
/// The document id is the hex SHA-256 of the key (Firestore forbids `/`, `.`, `..`, `__x__` and
/// long ids); the key itself is stored in the field `key` and compared on every read, so a
/// forged or colliding document is a miss. `expires_at` is a timestamp field to name in a
/// Firestore TTL policy; since that deletion runs up to a day late, every read checks it too.
#[derive(Clone)]
pub struct FirestoreStore {
    db: FirestoreDb,
    collection: Arc<str>,
    prefix: Arc<str>,
    endpoint: Arc<str>,
    /// The bound of one request, retries included (see [`FirestoreConfig::request_timeout`]).
    limit: Duration,
    clock: SharedClock,
}

impl fmt::Debug for FirestoreStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirestoreStore")
            .field("endpoint", &&*self.endpoint)
            .field("collection", &&*self.collection)
            .field("prefix", &&*self.prefix)
            .finish_non_exhaustive()
    }
}

impl FirestoreStore {
    /// Connects to Firestore, or to the emulator named by
    /// [`FirestoreConfig::emulator_host`] or else by `FIRESTORE_EMULATOR_HOST`. A configuration
    /// that [`FirestoreConfig::validate`] refuses fails before connecting.
    pub async fn connect(config: &FirestoreConfig) -> Result<Self> {
        Self::connect_with_clock(config, system_clock()).await
    }

    /// As [`connect`](Self::connect), deciding expiry by `clock` (tests move time by hand).
    pub async fn connect_with_clock(config: &FirestoreConfig, clock: SharedClock) -> Result<Self> {
        config.validate()?;
        if config.collection.is_empty() || config.collection.contains('/') {
            return Err(CacheError::Configuration(format!(
                "invalid Firestore collection {:?}",
                config.collection
            )));
        }
        let emulator = config
            .emulator_host
            .clone()
            .or_else(|| std::env::var("FIRESTORE_EMULATOR_HOST").ok());
        let endpoint: Arc<str> = emulator
            .as_ref()
            .map_or_else(
                || "firestore.googleapis.com".to_owned(),
                |host| format!("emulator {host}"),
            )
            .into();
        let options = FirestoreDbOptions::new(config.project_id.clone())
            .with_database_id(config.database_id.clone())
            .with_max_retries(config.max_retries)
            .with_request_timeout(config.request_timeout);
        let connecting = async {
            match &config.emulator_host {
                Some(host) => {
                    let options = options.with_firebase_api_url(format!("http://{host}"));
                    let credentials = Credentials::from(EmulatorCredentials::new());
                    FirestoreDb::with_options_auth(options, credentials).await
                }
                None => FirestoreDb::with_options(options).await,
            }
        };
        let db = match tokio::time::timeout(config.request_timeout, connecting).await {
            Ok(Ok(db)) => db,
            Ok(Err(error)) => {
                return Err(map_error(
                    "connect",
                    &endpoint,
                    config.request_timeout,
                    error,
                ));
            }
            Err(_) => {
                return Err(CacheError::Connection {
                    endpoint: endpoint.to_string(),
                    source: format!("no connection within {:?}", config.request_timeout).into(),
                });
            }
        };
        Ok(Self {
            db,
            collection: config.collection.as_str().into(),
            prefix: config.key_prefix.as_str().into(),
            endpoint,
            limit: config.request_limit(),
            clock,
        })
    }

    /// The id of the document that holds `key` in this store's collection: the hex SHA-256 of
    /// the prefixed key. For operators finding an entry in the console, and for tools that read
    /// the documents directly.
    pub fn document_id(&self, key: &str) -> Result<String> {
        Ok(document_id(&self.full_key(key)?))
    }

    /// The collection this store writes to.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    fn full_key(&self, key: &str) -> Result<String> {
        validate_key(key, DEFAULT_MAX_STORE_KEY_LEN)?;
        let mut full = String::with_capacity(self.prefix.len() + key.len());
        full.push_str(&self.prefix);
        full.push_str(key);
        Ok(full)
    }

    fn check_size(key: &str, value: &Bytes) -> Result<()> {
        let max = MAX_DOCUMENT_LEN.saturating_sub(DOCUMENT_OVERHEAD + 2 * key.len());
        if value.len() > max {
            return Err(CacheError::ValueTooLarge {
                size: value.len(),
                max,
            });
        }
        Ok(())
    }

    fn now(&self) -> (Timestamp, SystemTime) {
        let now = self.clock.now();
        (now, now.to_system_time())
    }

    /// Runs one Firestore request within the store's bound of a request, retries included
    /// (the client's own timeout applies to each attempt), handing back the request's own
    /// error.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = std::result::Result<T, FirestoreError>>,
    ) -> Result<std::result::Result<T, FirestoreError>> {
        tokio::time::timeout(self.limit, call)
            .await
            .map_err(|_| CacheError::Timeout {
                operation,
                after: self.limit,
            })
    }

    /// Runs one Firestore request like [`bounded`](Self::bounded), mapping its error.
    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = std::result::Result<T, FirestoreError>>,
    ) -> Result<T> {
        self.bounded(operation, call)
            .await?
            .map_err(|error| map_error(operation, &self.endpoint, self.limit, error))
    }

    /// The document with id `id`, whatever it holds.
    async fn fetch<D: ReadDocument>(&self, id: &str) -> Result<Option<D>> {
        self.call(
            "get",
            self.db
                .fluent()
                .select()
                .by_id_in(&self.collection)
                .obj()
                .one(id),
        )
        .await
    }

    /// The live document of `full_key`: its key matches and it has not expired.
    async fn read<D: ReadDocument>(&self, full_key: &str) -> Result<Option<D>> {
        let document: Option<D> = self.fetch(&document_id(full_key)).await?;
        let (_, now) = self.now();
        Ok(document.filter(|d| d.key() == full_key && d.expires_at() > now))
    }

    /// The documents of many keys in one batch read, live ones only, by full key.
    async fn read_many(&self, full_keys: &[String]) -> Result<HashMap<String, StoredDocument>> {
        let mut ids: Vec<String> = full_keys.iter().map(|k| document_id(k)).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut found = HashMap::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(found);
        }
        let stream = self
            .call(
                "get",
                self.db
                    .fluent()
                    .select()
                    .by_id_in(&self.collection)
                    .obj::<StoredDocument>()
                    .batch(ids),
            )
            .await?;
        let documents: Vec<(String, Option<StoredDocument>)> = stream.collect().await;
        let (_, now) = self.now();
        for document in documents.into_iter().filter_map(|(_, d)| d) {
            if document.expires_at > now {
                found.insert(document.key.clone(), document);
            }
        }
        Ok(found)
    }

    /// Creates document `id`; the inner error is the driver's (a conflict: it exists).
    async fn create(
        &self,
        id: &str,
        document: &CacheDocument,
    ) -> Result<std::result::Result<(), FirestoreError>> {
        let create = self
            .db
            .fluent()
            .insert()
            .into(&self.collection)
            .document_id(id)
            .object(document)
            .execute::<()>();
        self.bounded("set", create).await
    }

    /// Writes document `id` on `precondition`; the inner error is the driver's (a failed
    /// precondition: it changed).
    async fn update_if(
        &self,
        id: &str,
        document: &CacheDocument,
        precondition: FirestoreWritePrecondition,
    ) -> Result<std::result::Result<(), FirestoreError>> {
        let update = self
            .db
            .fluent()
            .update()
            .in_col(&self.collection)
            .precondition(precondition)
            .document_id(id)
            .object(document)
            .execute::<()>();
        self.bounded("set", update).await
    }

    async fn write(&self, full_key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let (now, _) = self.now();
        let document = CacheDocument::new(full_key, value, now, ttl);
        let id = document_id(full_key);
        self.call(
            "set",
            self.db
                .fluent()
                .update()
                .in_col(&self.collection)
                .document_id(&id)
                .object(&document)
                .execute::<()>(),
        )
        .await
    }

    /// Deletes documents by id in batches of 500.
    async fn delete_ids(&self, ids: Vec<String>) -> Result<()> {
        for chunk in ids.chunks(BATCH) {
            let writer = self
                .call("delete", self.db.create_simple_batch_writer())
                .await?;
            let mut batch = writer.new_batch();
            for id in chunk {
                self.db
                    .fluent()
                    .delete()
                    .from(&self.collection)
                    .document_id(id)
                    .add_to_batch(&mut batch)
                    .map_err(|e| map_error("delete", &self.endpoint, self.limit, e))?;
            }
            let response = self.call("delete", batch.write()).await?;
            check_statuses("delete", &response.statuses)?;
        }
        Ok(())
    }

    /// Deletes expired entries like [`Store::sweep_expired`], handing each to `on_expired` first
    /// (for persistent handles: delete the remote resource the entry points at). An entry whose
    /// callback fails is kept, so the next sweep tries again. Returns how many entries were
    /// deleted.
    pub async fn sweep_expired_with<F, Fut>(&self, on_expired: F) -> Result<u64>
    where
        F: Fn(ExpiredEntry) -> Fut + Send + Sync,
        Fut: Future<Output = std::result::Result<(), tierstack_core::BoxError>> + Send,
    {
        let mut deleted = 0;
        let mut failed: Vec<String> = Vec::new();
        loop {
            let (_, now) = self.now();
            let limit = u32::try_from(BATCH + failed.len()).unwrap_or(u32::MAX);
            let documents: Vec<StoredDocument> = self
                .call(
                    "sweep",
                    self.db
                        .fluent()
                        .select()
                        .from(&*self.collection)
                        .filter(|q| {
                            q.for_all([q.field(path!(StoredDocument::expires_at)).less_than(now)])
                        })
                        .limit(limit)
                        .obj()
                        .query(),
                )
                .await?;
            let fetched = documents.len();
            let mut doomed = Vec::new();
            for document in documents {
                let id = document_id(&document.key);
                if failed.contains(&id) {
                    continue;
                }
                let Some(key) = document.key.strip_prefix(&*self.prefix) else {
                    continue; // another application's entry in a shared collection
                };
                let entry = ExpiredEntry {
                    key: key.to_owned(),
                    value: Bytes::from(document.value),
                    expires_at: document.expires_at,
                };
                match on_expired(entry).await {
                    Ok(()) => doomed.push(id),
                    Err(error) => {
                        tracing::warn!(error = %error, "sweep callback failed; the entry is kept for the next sweep");
                        failed.push(id);
                    }
                }
            }
            deleted += doomed.len() as u64;
            let progress = !doomed.is_empty();
            self.delete_ids(doomed).await?;
            if fetched < usize::try_from(limit).unwrap_or(usize::MAX) || !progress {
                return Ok(deleted);
            }
        }
    }
}

fn check_statuses(
    operation: &'static str,
    statuses: &[firestore::gcloud_sdk::google::rpc::Status],
) -> Result<()> {
    match statuses.iter().find(|s| s.code != 0) {
        Some(status) => Err(CacheError::backend(
            operation,
            true,
            format!(
                "batch write failed with code {}: {}",
                status.code, status.message
            ),
        )),
        None => Ok(()),
    }
}

/// One of the two conditional writes of `set_if_absent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConditionalWrite {
    /// The create, which fails if the document exists.
    Create,
    /// The replacement of an expired or foreign document, on condition that it is unchanged.
    Replace,
}

/// The code the firestore crate gives a failed precondition (gRPC `FAILED_PRECONDITION`): the
/// document changed, or was deleted, since the update time the write names.
const FAILED_PRECONDITION: &str = "FailedPrecondition";

/// How many read-then-conditional-write rounds `replace` tries before it writes unconditionally.
const REPLACE_ATTEMPTS: usize = 4;

fn is_failed_precondition(error: &FirestoreError) -> bool {
    matches!(error, FirestoreError::DatabaseError(e) if e.public.code == FAILED_PRECONDITION)
}

/// Whether `error`, from a conditional write of `set_if_absent`, means that another caller
/// wrote first: the document exists (the create's `ALREADY_EXISTS`, which the firestore crate
/// turns into a `DataConflictError`), or it changed since it was read (the replacement's failed
/// precondition). Anything else (a permission, an unavailable server, a bad request) is an
/// error of this call, not a lost race.
fn lost_to_another_writer(write: ConditionalWrite, error: &FirestoreError) -> bool {
    match write {
        ConditionalWrite::Create => matches!(error, FirestoreError::DataConflictError(_)),
        ConditionalWrite::Replace => is_failed_precondition(error),
    }
}

/// Whether `error`, from `expire`'s update, means that there is no entry to extend: the
/// document is gone (`NOT_FOUND`), or it was deleted or rewritten since it was read (a failed
/// precondition; a rewrite's own time to live stands). Anything else is an error.
fn no_entry_to_extend(error: &FirestoreError) -> bool {
    matches!(error, FirestoreError::DataNotFoundError(_)) || is_failed_precondition(error)
}

/// Maps a Firestore error into the cache's error, naming the endpoint (never credentials).
pub(crate) fn map_error(
    operation: &'static str,
    endpoint: &str,
    limit: Duration,
    error: FirestoreError,
) -> CacheError {
    match &error {
        FirestoreError::DatabaseError(e) => {
            let code = e.public.code.to_ascii_lowercase();
            if code.contains("unauthenticated") || code.contains("permission") {
                CacheError::Authentication {
                    endpoint: endpoint.to_owned(),
                    source: Box::new(error),
                }
            } else if code.contains("deadline") {
                CacheError::Timeout {
                    operation,
                    after: limit,
                }
            } else if code.contains("unavailable") {
                CacheError::Connection {
                    endpoint: endpoint.to_owned(),
                    source: Box::new(error),
                }
            } else {
                let transient = e.retry_possible;
                CacheError::backend(operation, transient, error)
            }
        }
        FirestoreError::NetworkError(_) | FirestoreError::SystemError(_) => {
            CacheError::Connection {
                endpoint: endpoint.to_owned(),
                source: Box::new(error),
            }
        }
        FirestoreError::SerializeError(_) | FirestoreError::DeserializeError(_) => {
            CacheError::serialization(error)
        }
        FirestoreError::InvalidParametersError(_) => CacheError::backend(operation, false, error),
        _ => CacheError::backend(operation, true, error),
    }
}

#[async_trait]
impl Store for FirestoreStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let full = self.full_key(key)?;
        let document: Option<ValueDocument> = self.read(&full).await?;
        Ok(document.map(|d| Bytes::from(d.value)))
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        let full = self.full_key(key)?;
        let (_, now) = self.now();
        let document: Option<ValueDocument> = self.read(&full).await?;
        Ok(document.map(|d| StoredEntry {
            ttl: d.expires_at.duration_since(now).unwrap_or_default(),
            value: Bytes::from(d.value),
        }))
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let entries = self.get_many_with_ttl(keys).await?;
        Ok(entries.into_iter().map(|e| e.map(|e| e.value)).collect())
    }

    async fn get_many_with_ttl(&self, keys: &[&str]) -> Result<Vec<Option<StoredEntry>>> {
        let full: Vec<String> = keys
            .iter()
            .map(|k| self.full_key(k))
            .collect::<Result<_>>()?;
        let found = self.read_many(&full).await?;
        let (_, now) = self.now();
        Ok(full
            .iter()
            .map(|key| {
                found.get(key).map(|d| StoredEntry {
                    ttl: d.expires_at.duration_since(now).unwrap_or_default(),
                    value: Bytes::from(d.value.clone()),
                })
            })
            .collect())
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        let full = self.full_key(key)?;
        validate_ttl(ttl)?;
        Self::check_size(&full, &value)?;
        self.write(&full, &value, ttl).await
    }

    async fn set_many(&self, writes: &[StoreWrite<'_>]) -> Result<()> {
        let mut prepared = Vec::with_capacity(writes.len());
        for write in writes {
            let full = self.full_key(write.key)?;
            validate_ttl(write.ttl)?;
            Self::check_size(&full, &write.value)?;
            prepared.push((full, write));
        }
        let (now, _) = self.now();
        for chunk in prepared.chunks(BATCH) {
            let batch_writer = self
                .call("set", self.db.create_simple_batch_writer())
                .await?;
            let mut batch = batch_writer.new_batch();
            for (full, write) in chunk {
                let document = CacheDocument::new(full, &write.value, now, write.ttl);
                self.db
                    .fluent()
                    .update()
                    .in_col(&self.collection)
                    .document_id(document_id(full))
                    .object(&document)
                    .add_to_batch(&mut batch)
                    .map_err(|e| map_error("set", &self.endpoint, self.limit, e))?;
            }
            let response = self.call("set", batch.write()).await?;
            check_statuses("set", &response.statuses)?;
        }
        Ok(())
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        let full = self.full_key(key)?;
        validate_ttl(ttl)?;
        Self::check_size(&full, &value)?;
        let (now, now_time) = self.now();
        let document = CacheDocument::new(&full, &value, now, ttl);
        let id = document_id(&full);
        // A create succeeds for exactly one of concurrent callers.
        let created = self
            .db
            .fluent()
            .insert()
            .into(&self.collection)
            .document_id(&id)
            .object(&document)
            .execute::<()>();
        match self.bounded("set", created).await? {
            Ok(()) => return Ok(true),
            Err(error) if lost_to_another_writer(ConditionalWrite::Create, &error) => {}
            Err(error) => return Err(map_error("set", &self.endpoint, self.limit, error)),
        }
        // A document exists. It only blocks us if it is live and ours; an expired one (TTL
        // deletion runs late) or a foreign one is replaced, on condition that nobody changed it
        // since we read it, so that again exactly one caller wins.
        let existing: Option<StoredDocument> = self.fetch(&id).await?;
        let Some(existing) = existing else {
            return Ok(false); // deleted meanwhile: a concurrent caller is about to win
        };
        if existing.key == full && existing.expires_at > now_time {
            return Ok(false);
        }
        let Some(update_time) = existing.update_time else {
            return Ok(false);
        };
        let replaced = self
            .db
            .fluent()
            .update()
            .in_col(&self.collection)
            .precondition(FirestoreWritePrecondition::UpdateTime(update_time.0))
            .document_id(&id)
            .object(&document)
            .execute::<()>();
        match self.bounded("set", replaced).await? {
            Ok(()) => Ok(true),
            Err(error) if lost_to_another_writer(ConditionalWrite::Replace, &error) => Ok(false),
            Err(error) => Err(map_error("set", &self.endpoint, self.limit, error)),
        }
    }

    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        let full = self.full_key(key)?;
        validate_ttl(ttl)?;
        Self::check_size(&full, &value)?;
        let id = document_id(&full);
        // Read, then write on condition that nothing changed since: what was read is what the
        // write replaced. A writer that keeps winning in between costs a few more rounds; past
        // them the write goes through unconditionally and reports what it last read.
        let mut replaced = None;
        for _ in 0..REPLACE_ATTEMPTS {
            let existing: Option<StoredDocument> = self.fetch(&id).await?;
            let (now, now_time) = self.now();
            let document = CacheDocument::new(&full, &value, now, ttl);
            let (written, condition) = if let Some(existing) = &existing {
                let Some(update_time) = &existing.update_time else {
                    break;
                };
                let precondition = FirestoreWritePrecondition::UpdateTime(update_time.0);
                let written = self.update_if(&id, &document, precondition).await?;
                (written, ConditionalWrite::Replace)
            } else {
                (self.create(&id, &document).await?, ConditionalWrite::Create)
            };
            replaced = existing
                .filter(|d| d.key == full && d.expires_at > now_time)
                .map(|d| Bytes::from(d.value));
            match written {
                Ok(()) => return Ok(replaced),
                Err(error) if lost_to_another_writer(condition, &error) => {}
                Err(error) => return Err(map_error("set", &self.endpoint, self.limit, error)),
            }
        }
        self.write(&full, &value, ttl).await?;
        Ok(replaced)
    }

    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        let full = self.full_key(key)?;
        if let Some((value, ttl)) = &new {
            validate_ttl(*ttl)?;
            Self::check_size(&full, value)?;
        }
        let id = document_id(&full);
        let existing: Option<StoredDocument> = self.fetch(&id).await?;
        let (now, now_time) = self.now();
        let Some(existing) = existing
            .filter(|d| d.key == full && d.expires_at > now_time && d.value.as_slice() == current)
        else {
            return Ok(false);
        };
        let Some(update_time) = existing.update_time else {
            return Ok(false);
        };
        let precondition = FirestoreWritePrecondition::UpdateTime(update_time.0);
        // On condition that the document is still the one read: of concurrent callers, the
        // first write wins and the others' preconditions fail.
        let written = if let Some((value, ttl)) = new {
            let document = CacheDocument::new(&full, &value, now, ttl);
            self.update_if(&id, &document, precondition).await?
        } else {
            let delete = self
                .db
                .fluent()
                .delete()
                .from(&self.collection)
                .document_id(&id)
                .precondition(precondition)
                .execute();
            self.bounded("delete", delete).await?
        };
        match written {
            Ok(()) => Ok(true),
            Err(error) if no_entry_to_extend(&error) => Ok(false),
            Err(error) => Err(map_error("set", &self.endpoint, self.limit, error)),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let full = self.full_key(key)?;
        let live = self.read::<ValueDocument>(&full).await?.is_some();
        let id = document_id(&full);
        self.call(
            "delete",
            self.db
                .fluent()
                .delete()
                .from(&self.collection)
                .document_id(&id)
                .execute(),
        )
        .await?;
        Ok(live)
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let full: Vec<String> = keys
            .iter()
            .map(|k| self.full_key(k))
            .collect::<Result<_>>()?;
        let live = self.read_many(&full).await?;
        let mut ids: Vec<String> = full.iter().map(|k| document_id(k)).collect();
        ids.sort_unstable();
        ids.dedup();
        self.delete_ids(ids).await?;
        Ok(live.len() as u64)
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        let full = self.full_key(key)?;
        validate_ttl(ttl)?;
        let Some(document) = self.read::<StoredDocument>(&full).await? else {
            return Ok(false);
        };
        if tierstack_core::envelope::is_tombstone(&document.value) {
            return Ok(false);
        }
        let (now, now_time) = self.now();
        let fields = ExpiryFields {
            expires_at: now.saturating_add(ttl).to_system_time(),
            last_accessed: now_time,
        };
        let mut update = self
            .db
            .fluent()
            .update()
            .fields(paths!(ExpiryFields::{expires_at, last_accessed}))
            .in_col(&self.collection);
        if let Some(update_time) = document.update_time {
            update = update.precondition(FirestoreWritePrecondition::UpdateTime(update_time.0));
        }
        let id = document_id(&full);
        let updated = update.document_id(&id).object(&fields).execute::<()>();
        match self.bounded("expire", updated).await? {
            Ok(()) => Ok(true),
            Err(error) if no_entry_to_extend(&error) => Ok(false),
            Err(error) => Err(map_error("expire", &self.endpoint, self.limit, error)),
        }
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        Ok(self.get_with_ttl(key).await?.map(|e| e.ttl))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        validate_prefix(prefix)?;
        let start = self.full_key(prefix)?;
        let end = prefix_successor(&start);
        let mut removed = 0;
        loop {
            let (_, now) = self.now();
            let documents: Vec<StoredDocument> = self
                .call(
                    "delete_prefix",
                    self.db
                        .fluent()
                        .select()
                        .from(&*self.collection)
                        .filter(|q| {
                            q.for_all([
                                q.field(path!(StoredDocument::key))
                                    .greater_than_or_equal(start.as_str()),
                                end.as_deref().and_then(|end| {
                                    q.field(path!(StoredDocument::key)).less_than(end)
                                }),
                            ])
                        })
                        .limit(u32::try_from(BATCH).unwrap_or(u32::MAX))
                        .obj()
                        .query(),
                )
                .await?;
            let fetched = documents.len();
            let mut ids = Vec::with_capacity(fetched);
            for document in &documents {
                // The index keeps the first 1,500 bytes of a string: check the whole key.
                if document.key.starts_with(&start) {
                    removed += u64::from(document.expires_at > now);
                    ids.push(document_id(&document.key));
                }
            }
            let progress = !ids.is_empty();
            self.delete_ids(ids).await?;
            if fetched < BATCH || !progress {
                return Ok(removed);
            }
        }
    }

    async fn sweep_expired(&self) -> Result<u64> {
        self.sweep_expired_with(|_| async { Ok(()) }).await
    }

    async fn ping(&self) -> Result<()> {
        self.call("ping", self.db.ping()).await
    }
}

#[cfg(test)]
mod tests {
    use firestore::gcloud_sdk::tonic::{Code, Status};

    use super::*;

    fn status(code: Code) -> FirestoreError {
        FirestoreError::from(Status::new(code, "from the test"))
    }

    /// Only "the document exists" (a create) and "it changed since it was read" (a
    /// replacement) mean that another caller won; anything else is an error of this call.
    #[test]
    fn only_a_conflict_means_another_writer_won() {
        use ConditionalWrite::{Create, Replace};
        let lost = [
            (Create, Code::AlreadyExists),
            (Replace, Code::FailedPrecondition),
        ];
        for (write, code) in lost {
            assert!(
                lost_to_another_writer(write, &status(code)),
                "{write:?} {code:?}"
            );
        }
        let failed = [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::InvalidArgument,
            Code::Internal,
            Code::NotFound,
        ];
        for write in [Create, Replace] {
            for code in failed {
                assert!(
                    !lost_to_another_writer(write, &status(code)),
                    "{write:?} {code:?} is an error, not a lost race"
                );
            }
        }
        assert!(!lost_to_another_writer(
            Create,
            &status(Code::FailedPrecondition)
        ));
        assert!(!lost_to_another_writer(
            Replace,
            &status(Code::AlreadyExists)
        ));
    }

    #[test]
    fn a_request_is_bounded_by_its_attempts_and_the_pauses_between_them() {
        let config = FirestoreConfig::new("p");
        assert_eq!(config.request_limit(), Duration::from_secs(5 * 3 + 1 + 2));
        let once = config.clone().max_retries(0);
        assert_eq!(once.request_limit(), Duration::from_secs(5));
        let most = config
            .request_timeout(MAX_REQUEST_TIMEOUT)
            .max_retries(MAX_RETRIES);
        assert!(most.validate().is_ok());
        assert_eq!(
            most.request_limit(),
            MAX_REQUEST_TIMEOUT * 11 + Duration::from_secs(1023)
        );
    }

    #[tokio::test]
    async fn zero_or_absurd_settings_are_refused_before_connecting() {
        let config = FirestoreConfig::new("p");
        for (bad, setting) in [
            (
                config.clone().request_timeout(Duration::ZERO),
                "request_timeout",
            ),
            (
                config.clone().request_timeout(MAX_REQUEST_TIMEOUT * 2),
                "request_timeout",
            ),
            (config.clone().max_retries(MAX_RETRIES + 1), "max_retries"),
            (config.clone().max_retries(usize::MAX), "max_retries"),
            (
                config.clone().emulator_host("http://127.0.0.1:8080"),
                "emulator_host",
            ),
            (config.clone().emulator_host(""), "emulator_host"),
        ] {
            let err = FirestoreStore::connect(&bad).await.unwrap_err();
            assert!(
                matches!(&err, CacheError::Configuration(m) if m.contains(setting)),
                "{setting}: {err:?}"
            );
        }
    }

    /// `expire` finds no entry when the document is gone, or changed since it was read (the
    /// new entry's time to live stands); any other failure is an error.
    #[test]
    fn only_a_missing_or_changed_document_means_no_entry_to_extend() {
        for code in [Code::NotFound, Code::FailedPrecondition] {
            assert!(no_entry_to_extend(&status(code)), "{code:?}");
        }
        for code in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::InvalidArgument,
            Code::Internal,
            Code::AlreadyExists,
            Code::OutOfRange,
        ] {
            assert!(!no_entry_to_extend(&status(code)), "{code:?} is an error");
        }
    }
}
