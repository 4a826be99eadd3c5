//! A client of [`tierstack-server`](https://docs.rs/tierstack-server) that is a tierstack
//! [`Store`]: an application puts a `TieredCache` L1 in front of the shared cache service, as
//! it would in front of Redis.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tierstack_server_client::ServerStore;
//!
//! let store = ServerStore::new("http://cache.internal:8080", "the tenant's API key")?;
//! // let cache = tierstack::TieredCache::<String>::builder("profiles")
//! //     .l2(Arc::new(store))
//! //     .build()?;
//! # let _ = Arc::new(store);
//! # Ok(()) }
//! ```
//!
//! Every call is one request, except:
//! - [`replace`](Store::replace), which reads the value and swaps it by compare-and-set
//!   (looking again while other writers come between, at most 64 times);
//! - [`expire`](Store::expire), which reads the value first: a delete's tombstone (see
//!   `tierstack_core::envelope`) is no entry to extend (one written between the read and the
//!   touch is extended, and `expire` answers `true`; it still reads as no entry);
//! - bulk reads and writes, sent [`max_bulk`](ServerStore::max_bulk) keys a request (every
//!   key is checked before the first request).
//!
//! The server keeps the tenant's entries apart from every other tenant's, and answers within
//! its own limits (key and value sizes, TTLs, rate, quota): a refusal is an error here, never
//! a miss. Keys `.` and `..` cannot be sent in a URL path (URLs resolve them away) and are
//! refused as invalid keys ([`KeyProblem::DotSegment`]) by every call, bulk calls included.
//! Transport: plain HTTP (a sidecar, a private network); put TLS in front where the network is
//! not private.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tierstack_core::key::validate_key;
use tierstack_core::store::{StoreWrite, StoredEntry, validate_prefix, validate_ttl};
use tierstack_core::{CacheError, KeyProblem, Result, Store};

mod wire;

/// How many times [`replace`](Store::replace) reads and swaps again when other writers come
/// between its read and its swap.
const REPLACE_ATTEMPTS: usize = 64;

/// The header of a value's remaining TTL in the server's answers.
const TTL_HEADER: &str = "x-ttl-ms";

/// A [`Store`] on a `tierstack-server`, as one tenant (its API key).
#[derive(Clone)]
pub struct ServerStore {
    http: reqwest::Client,
    base: String,
    /// `Bearer <key>`, marked sensitive (kept out of the client's own debug output).
    authorization: reqwest::header::HeaderValue,
    max_key_len: usize,
    max_value_len: usize,
    max_bulk: usize,
}

impl fmt::Debug for ServerStore {
    // The API key is a secret: never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerStore")
            .field("base", &self.base)
            .field("max_key_len", &self.max_key_len)
            .field("max_value_len", &self.max_value_len)
            .field("max_bulk", &self.max_bulk)
            .finish_non_exhaustive()
    }
}

impl ServerStore {
    /// A store on the server at `base` (`http://host:port`), as the tenant of `api_key`, with
    /// a 10 s timeout per request.
    ///
    /// # Errors
    ///
    /// [`CacheError::Configuration`] for a base URL that is not `http://...`.
    pub fn new(base: &str, api_key: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| CacheError::Configuration(format!("HTTP client: {error}")))?;
        Self::with_client(http, base, api_key)
    }

    /// As [`new`](Self::new), with an HTTP client of your own (its timeouts, its pool).
    ///
    /// # Errors
    ///
    /// [`CacheError::Configuration`] for a base URL that is not `http://host[:port]` (user
    /// names and passwords belong in the API key, not the URL), or an API key that cannot be
    /// a header.
    pub fn with_client(http: reqwest::Client, base: &str, api_key: &str) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        let valid = base
            .strip_prefix("http://")
            .is_some_and(|host| !host.is_empty() && !host.contains(['@', '/', '?', '#']));
        if !valid {
            return Err(CacheError::Configuration(
                "the server's base URL is http://host:port".into(),
            ));
        }
        // The key is never in the message: it is a secret.
        let mut authorization =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {api_key}")).map_err(|_| {
                CacheError::Configuration("the API key holds characters a header cannot".into())
            })?;
        authorization.set_sensitive(true);
        Ok(Self {
            http,
            base,
            authorization,
            max_key_len: 256,
            max_value_len: 1 << 20,
            max_bulk: 100,
        })
    }

    /// The largest value read from the server (1 MiB by default, as the server's default
    /// limit): a longer answer is an error, and is not read past this size.
    #[must_use]
    pub fn max_value_len(mut self, max: usize) -> Self {
        self.max_value_len = max;
        self
    }

    /// The longest key the server takes for this tenant (256 by default, as the server's
    /// default limit): longer keys are refused here, with `InvalidKey`.
    #[must_use]
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.max_key_len = max;
        self
    }

    /// How many keys a bulk request carries (100 by default, as the server's default limit).
    #[must_use]
    pub fn max_bulk(mut self, max: usize) -> Self {
        self.max_bulk = max.max(1);
        self
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
    }

    /// The path of `key`'s entry (and `rest`, such as `/touch`).
    fn entry_path(&self, key: &str, rest: &str) -> Result<String> {
        self.check_key(key)?;
        Ok(format!("/v1/cache/{}{rest}", wire::encode_segment(key)))
    }

    /// Refuses what no path of this client can carry: the core's key rules, and `.` and `..`,
    /// which URLs resolve away (refused in bulk calls too, so that every key a bulk call
    /// writes can be read on its own).
    fn check_key(&self, key: &str) -> Result<()> {
        validate_key(key, self.max_key_len)?;
        if key == "." || key == ".." {
            return Err(CacheError::InvalidKey {
                reason: KeyProblem::DotSegment,
            });
        }
        Ok(())
    }

    async fn send(&self, operation: &'static str, request: RequestBuilder) -> Result<Response> {
        request
            .send()
            .await
            .map_err(|error| wire::transport_error(operation, &self.base, error))
    }

    /// `true` for 204, `false` for `refused` (404 or 412), else the server's error.
    async fn flag(
        &self,
        operation: &'static str,
        request: RequestBuilder,
        refused: StatusCode,
    ) -> Result<bool> {
        let response = self.send(operation, request).await?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            status if status == refused => Ok(false),
            _ => Err(wire::error_of(operation, response).await),
        }
    }

    async fn get_entry(&self, key: &str, method: Method) -> Result<Option<(Bytes, Duration)>> {
        let path = self.entry_path(key, "")?;
        let response = self.send("get", self.request(method, &path)).await?;
        match response.status() {
            StatusCode::OK => {
                let ttl = response
                    .headers()
                    .get(TTL_HEADER)
                    .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
                    .map_or(Duration::ZERO, Duration::from_millis);
                let value =
                    wire::read_body("get", &self.base, response, self.max_value_len).await?;
                Ok(Some((value, ttl)))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(wire::error_of("get", response).await),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(&Bytes, Duration)>,
    ) -> Result<bool> {
        let path = self.entry_path(key, "/cas")?;
        if let Some((_, ttl)) = new {
            validate_ttl(ttl)?;
        }
        let body = serde_json::json!({
            "current": BASE64.encode(current),
            "new": new.map(|(value, _)| BASE64.encode(value)),
            "ttl_ms": new.map(|(_, ttl)| wire::millis(ttl)),
        });
        let request = wire::json(self.request(Method::POST, &path), &body);
        self.flag("compare_and_set", request, StatusCode::PRECONDITION_FAILED)
            .await
    }
}

#[async_trait]
impl Store for ServerStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self
            .get_entry(key, Method::GET)
            .await?
            .map(|(value, _)| value))
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        for key in keys {
            self.check_key(key)?;
        }
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.max_bulk) {
            let body = serde_json::json!({ "keys": chunk });
            let request = wire::json(self.request(Method::POST, "/v1/bulk/get"), &body);
            let response = self.send("get_many", request).await?;
            if response.status() != StatusCode::OK {
                return Err(wire::error_of("get_many", response).await);
            }
            found.extend(
                wire::bulk_values(&self.base, response, chunk.len(), self.max_value_len).await?,
            );
        }
        Ok(found)
    }

    async fn get_with_ttl(&self, key: &str) -> Result<Option<StoredEntry>> {
        Ok(self
            .get_entry(key, Method::GET)
            .await?
            .map(|(value, ttl)| StoredEntry { value, ttl }))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()> {
        validate_ttl(ttl)?;
        let path = format!("{}?ttl_ms={}", self.entry_path(key, "")?, wire::millis(ttl));
        let request = self.request(Method::PUT, &path).body(value);
        let response = self.send("set", request).await?;
        if response.status() == StatusCode::NO_CONTENT {
            Ok(())
        } else {
            Err(wire::error_of("set", response).await)
        }
    }

    async fn set_many(&self, writes: &[StoreWrite<'_>]) -> Result<()> {
        // Every write is checked before the first request: a refused one writes nothing.
        for write in writes {
            self.check_key(write.key)?;
            validate_ttl(write.ttl)?;
        }
        for chunk in writes.chunks(self.max_bulk) {
            let mut entries = Vec::with_capacity(chunk.len());
            for write in chunk {
                entries.push(serde_json::json!({
                    "key": write.key,
                    "value": BASE64.encode(&write.value),
                    "ttl_ms": wire::millis(write.ttl),
                }));
            }
            let body = serde_json::json!({ "entries": entries });
            let request = wire::json(self.request(Method::POST, "/v1/bulk/set"), &body);
            let response = self.send("set_many", request).await?;
            if response.status() != StatusCode::NO_CONTENT {
                return Err(wire::error_of("set_many", response).await);
            }
        }
        Ok(())
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        let path = format!("{}?ttl_ms={}", self.entry_path(key, "")?, wire::millis(ttl));
        let request = self
            .request(Method::PUT, &path)
            .header(reqwest::header::IF_NONE_MATCH, "*")
            .body(value);
        self.flag("set_if_absent", request, StatusCode::PRECONDITION_FAILED)
            .await
    }

    async fn replace(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Option<Bytes>> {
        validate_ttl(ttl)?;
        for _ in 0..REPLACE_ATTEMPTS {
            match self.get(key).await? {
                None => {
                    if self.set_if_absent(key, value.clone(), ttl).await? {
                        return Ok(None);
                    }
                }
                Some(current) => {
                    if self
                        .compare_and_swap(key, &current, Some((&value, ttl)))
                        .await?
                    {
                        return Ok(Some(current));
                    }
                }
            }
        }
        Err(CacheError::Backend {
            operation: "replace",
            transient: true,
            source: format!(
                "other writers changed the key between each of {REPLACE_ATTEMPTS} reads and swaps"
            )
            .into(),
        })
    }

    async fn compare_and_set(
        &self,
        key: &str,
        current: &[u8],
        new: Option<(Bytes, Duration)>,
    ) -> Result<bool> {
        let new = new.as_ref().map(|(value, ttl)| (value, *ttl));
        self.compare_and_swap(key, current, new).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let path = self.entry_path(key, "")?;
        let request = self.request(Method::DELETE, &path);
        self.flag("delete", request, StatusCode::NOT_FOUND).await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.entry_path(key, "/exists")?;
        let request = self.request(Method::GET, &path);
        self.flag("exists", request, StatusCode::NOT_FOUND).await
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        validate_ttl(ttl)?;
        match self.get(key).await? {
            None => return Ok(false),
            // A delete's tombstone is no entry: left as it is.
            Some(value) if tierstack_core::envelope::is_tombstone(&value) => return Ok(false),
            Some(_) => {}
        }
        // A delete's tombstone written between the read and the touch is extended: it still
        // reads as no entry, and a later write replaces it. Writing the read bytes back by
        // compare-and-set instead would cost two uploads of the value and pass the server's
        // quota reservation as a write.
        let path = format!(
            "{}?ttl_ms={}",
            self.entry_path(key, "/touch")?,
            wire::millis(ttl)
        );
        let request = self.request(Method::POST, &path);
        self.flag("expire", request, StatusCode::NOT_FOUND).await
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        // HEAD: the headers of a GET, without the value.
        Ok(self.get_entry(key, Method::HEAD).await?.map(|(_, ttl)| ttl))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        validate_prefix(prefix)?;
        let path = format!("/v1/cache?prefix={}", wire::encode_segment(prefix));
        let response = self
            .send("delete_prefix", self.request(Method::DELETE, &path))
            .await?;
        if response.status() != StatusCode::OK {
            return Err(wire::error_of("delete_prefix", response).await);
        }
        wire::deleted_count(&self.base, response).await
    }

    async fn ping(&self) -> Result<()> {
        let response = self
            .send("ping", self.request(Method::GET, "/readyz"))
            .await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(wire::error_of("ping", response).await)
        }
    }
}
