//! The routes of `/v1`: a tenant's entries (one at a time, in bulk, by prefix) and the admin
//! routes (keys, a tenant's usage, an entry's metadata, flushing a tenant).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tierstack::{EntryOptions, Fetched, Source};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::quota::{QuotaReport, Room};
use crate::server::AppState;
use crate::tenant::{Limits, TenantName};

/// The header of a value's remaining time to live, in milliseconds.
pub const TTL_HEADER: &str = "x-ttl-ms";
/// The header a write may give its TTL in, in seconds (the `ttl` query parameter wins).
pub const TTL_REQUEST_HEADER: &str = "x-ttl";

type Shared = State<Arc<AppState>>;

/// `Path`, with its rejection (a segment that is not UTF-8 once decoded, say) as a JSON error.
pub(crate) struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(path)| Self(path))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}

/// `Query`, with its rejection (an unknown or malformed parameter) as a JSON error.
pub(crate) struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(query)| Self(query))
            .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))
    }
}

/// One entry of the calling tenant: who asks, its limits, and the entry's storage key.
struct Entry {
    tenant: TenantName,
    limits: Limits,
    storage_key: String,
}

/// The calling tenant's entry `key`, checked against its limits.
async fn entry(state: &AppState, headers: &HeaderMap, key: &str) -> Result<Entry, ApiError> {
    let (tenant, limits) = tenant(state, headers).await?;
    limits.check_key(key)?;
    let storage_key = tenant.storage_key(key);
    Ok(Entry {
        tenant,
        limits,
        storage_key,
    })
}

/// The tenant a request is for, and its limits; counts the request against its rate.
async fn tenant(state: &AppState, headers: &HeaderMap) -> Result<(TenantName, Limits), ApiError> {
    match state.keys.caller(headers).await? {
        Caller::Tenant(tenant) => {
            let limits = *state.config.limits_of(&tenant);
            if let Err(refused) = state.rate.check(&tenant, &limits).await {
                state.usage.of(&tenant).rate_limited();
                return Err(refused);
            }
            Ok((tenant, limits))
        }
        // The admin credential has no namespace of its own.
        Caller::Admin => Err(ApiError::forbidden_for_admin()),
    }
}

/// Checks the admin credential.
async fn admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match state.keys.caller(headers).await? {
        Caller::Admin => Ok(()),
        Caller::Tenant(_) => Err(ApiError::forbidden()),
    }
}

/// A request body of at most `limit` bytes: refused from its `Content-Length` before a byte
/// is read, and otherwise never read past the limit.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let too_large =
        || ApiError::too_large("body_too_large", format!("a body is at most {limit} bytes"));
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TtlQuery {
    ttl: Option<String>,
    ttl_ms: Option<String>,
}

/// The TTL a write asks for: the `ttl_ms` query parameter in milliseconds, or `ttl`, or the
/// `x-ttl` header, in seconds; more than one of them is refused (which one wins would be a
/// guess).
fn asked_ttl(query: &TtlQuery, headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let given = usize::from(query.ttl_ms.is_some())
        + usize::from(query.ttl.is_some())
        + headers.get_all(TTL_REQUEST_HEADER).iter().count();
    if given > 1 {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            "give one TTL: the ttl or ttl_ms parameter, or the x-ttl header",
        ));
    }
    let invalid = || {
        ApiError::bad_request(
            "invalid_ttl",
            "a ttl is a whole number of seconds (or of milliseconds, ttl_ms) above zero",
        )
    };
    let parse = |text: &str| text.trim().parse::<u64>().map_err(|_| invalid());
    if let Some(millis) = &query.ttl_ms {
        return parse(millis).map(|millis| Some(Duration::from_millis(millis)));
    }
    let text = match &query.ttl {
        Some(ttl) => Some(ttl.as_str()),
        None => headers
            .get(TTL_REQUEST_HEADER)
            .map(|v| v.to_str().unwrap_or("not text")),
    };
    text.map(|text| parse(text).map(Duration::from_secs))
        .transpose()
}

/// A TTL given in a JSON body: `ttl_ms`, or `ttl` in seconds; not both.
fn body_ttl(ttl_ms: Option<u64>, ttl: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match (ttl_ms, ttl) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "invalid_ttl",
            "give one TTL: ttl or ttl_ms",
        )),
        (Some(millis), None) => Ok(Some(Duration::from_millis(millis))),
        (None, secs) => Ok(secs.map(Duration::from_secs)),
    }
}

/// Whether a `PUT` asks to create the key only (one `If-None-Match: *`); every other
/// precondition is refused, as [`refuse_preconditions`] does.
fn create_only(headers: &HeaderMap) -> Result<bool, ApiError> {
    let mut asked = headers.get_all(header::IF_NONE_MATCH).iter();
    match (asked.next(), asked.next()) {
        (Some(value), None) if value.as_bytes().trim_ascii() == b"*" => {
            refuse_preconditions_but(headers, Some(&header::IF_NONE_MATCH))?;
            Ok(true)
        }
        _ => refuse_preconditions(headers).map(|()| false),
    }
}

/// Refuses a write that carries a precondition (`If-Match`, `If-None-Match`,
/// `If-Unmodified-Since`): entries carry no entity tags or dates, and ignoring a condition
/// would write or delete what its sender meant to guard. (`PUT` honours `If-None-Match: *`;
/// compare-and-set is `POST /v1/cache/{key}/cas`.)
fn refuse_preconditions(headers: &HeaderMap) -> Result<(), ApiError> {
    refuse_preconditions_but(headers, None)
}

fn refuse_preconditions_but(
    headers: &HeaderMap,
    allowed: Option<&header::HeaderName>,
) -> Result<(), ApiError> {
    let conditions = [
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_UNMODIFIED_SINCE,
    ];
    let refused = conditions
        .iter()
        .filter(|name| allowed != Some(*name))
        .any(|name| headers.contains_key(name));
    if refused {
        return Err(ApiError::bad_request(
            "unsupported_precondition",
            "only If-None-Match: * on PUT is supported (compare-and-set is POST \
             /v1/cache/{key}/cas)",
        ));
    }
    Ok(())
}

fn ttl_header(ttl: Option<Duration>) -> Option<(&'static str, HeaderValue)> {
    let millis = u64::try_from(ttl?.as_millis()).unwrap_or(u64::MAX);
    Some((TTL_HEADER, HeaderValue::from(millis)))
}

/// The value of `storage_key` with where it came from and its remaining TTL, or `None`. A
/// plain read: an entry is a tenant's value, never an origin's to load. A backend that fails
/// is an error (503), never a miss: a client must not take it for a missing entry.
async fn fetch(state: &AppState, storage_key: &str) -> Result<Option<Fetched<Bytes>>, ApiError> {
    let options = state.data.default_options().with_l2_errors_returned(true);
    Ok(state.data.get_fetched(storage_key, &options).await?)
}

/// `GET /v1/cache/{key}`: the value's bytes, with its remaining TTL in `x-ttl-ms`.
pub(crate) async fn get_value(
    State(state): Shared,
    ApiPath(key): ApiPath<String>,
    // The request, not a `HeaderMap`: that extractor copies every header, on the hot path.
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let entry = entry(&state, request.headers(), &key).await?;
    let found = fetch(&state, &entry.storage_key).await?;
    let usage = state.usage.of(&entry.tenant);
    let Some(found) = found else {
        usage.read(false);
        return Err(ApiError::not_found("entry"));
    };
    usage.read(true);
    let mut response = found.value.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some((name, value)) = ttl_header(found.ttl) {
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

/// `PUT /v1/cache/{key}?ttl=SECONDS`: stores the body's bytes as sent; with
/// `If-None-Match: *`, only if the key holds no value (412 if it does).
pub(crate) async fn put_value(
    State(state): Shared,
    ApiPath(key): ApiPath<String>,
    ApiQuery(query): ApiQuery<TtlQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let entry = entry(&state, &headers, &key).await?;
    let ttl = entry.limits.ttl(asked_ttl(&query, &headers)?)?;
    let create_only = create_only(&headers)?;
    let value = read_body(&headers, body, entry.limits.max_value_bytes).await?;
    let options = state.data.default_options().with_ttl(ttl);
    let len = value.len();
    let room = [Room {
        key: &key,
        value_bytes: len,
        ttl,
    }];
    let reserved = state
        .quotas
        .reserve(&entry.tenant, &entry.limits, &room)
        .await?;
    let written = if create_only {
        state
            .data
            .set_if_absent(&entry.storage_key, value, &options)
            .await
    } else {
        state
            .data
            .set_with(&entry.storage_key, value, &options)
            .await
            .map(|()| true)
    };
    // A write that failed may have landed: it is not settled, and its reservation (no
    // smaller than the old value's record) stays.
    let landed = written?;
    state
        .quotas
        .settle(&entry.tenant, &room, reserved, landed)
        .await;
    if !landed {
        return Err(ApiError::precondition_failed());
    }
    state.usage.of(&entry.tenant).wrote(len);
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/cache/{key}`: 204, or 404 if there was none.
pub(crate) async fn delete_value(
    State(state): Shared,
    ApiPath(key): ApiPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let entry = entry(&state, &headers, &key).await?;
    refuse_preconditions(&headers)?;
    // The record counts until the delete has happened (one that fails frees no room), and
    // stays if another operation on the key overlapped the delete.
    let begun = state
        .quotas
        .begin_removal(&entry.tenant, &entry.limits, &[&key])
        .await;
    let deleted = state.data.delete(&entry.storage_key).await?;
    state.quotas.end_removal(&entry.tenant, begun, true).await;
    state.usage.of(&entry.tenant).deleted();
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("entry"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompareAndSet {
    /// The bytes the key must hold, in base64.
    current: String,
    /// The bytes to write in their place, in base64; `null` removes the key.
    new: Option<String>,
    /// The new value's TTL in milliseconds (else `ttl`, in seconds; else the default).
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    ttl: Option<u64>,
}

fn base64_field(name: &str, text: &str) -> Result<Bytes, ApiError> {
    BASE64
        .decode(text.as_bytes())
        .map(Bytes::from)
        .map_err(|_| ApiError::bad_request("invalid_body", format!("{name} is not base64")))
}

/// `POST /v1/cache/{key}/cas` with `{"current", "new", "ttl_ms"?}`: writes `new` (or removes
/// the key, for `null`) only if the key holds exactly `current`; 204 if it did, 412 if not.
pub(crate) async fn compare_and_set(
    State(state): Shared,
    ApiPath(key): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let entry = entry(&state, &headers, &key).await?;
    refuse_preconditions(&headers)?;
    // Room for two values in base64, and the rest of the JSON.
    let limit = entry
        .limits
        .max_value_bytes
        .saturating_mul(3)
        .saturating_add(1024);
    let bytes = read_body(&headers, body, limit).await?;
    let request: CompareAndSet = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    let current = base64_field("current", &request.current)?;
    let new = match &request.new {
        Some(text) => Some(base64_field("new", text)?),
        None => None,
    };
    let ttl = entry.limits.ttl(body_ttl(request.ttl_ms, request.ttl)?)?;
    let options = state.data.default_options().with_ttl(ttl);
    let swapped = match new {
        Some(new) => swap_in(&state, &entry, &key, &current, new, ttl, &options).await?,
        None => remove_if_current(&state, &entry, &key, &current, &options).await?,
    };
    if swapped {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::precondition_failed())
    }
}

/// Writes `new` over `key` if it holds `current`, within the tenant's quota.
async fn swap_in(
    state: &AppState,
    entry: &Entry,
    key: &str,
    current: &Bytes,
    new: Bytes,
    ttl: Duration,
    options: &EntryOptions,
) -> Result<bool, ApiError> {
    entry.limits.check_value(new.len())?;
    let room = Room {
        key,
        value_bytes: new.len(),
        ttl,
    };
    let rooms = std::slice::from_ref(&room);
    let reserved = state
        .quotas
        .reserve(&entry.tenant, &entry.limits, rooms)
        .await?;
    let swapped = state
        .data
        .compare_and_set(&entry.storage_key, current, Some(new), options)
        .await?;
    state
        .quotas
        .settle(&entry.tenant, rooms, reserved, swapped)
        .await;
    Ok(swapped)
}

/// Removes `key` if it holds `current`. Its quota record counts until the removal has
/// happened, and stays if another operation on the key overlapped it.
async fn remove_if_current(
    state: &AppState,
    entry: &Entry,
    key: &str,
    current: &Bytes,
    options: &EntryOptions,
) -> Result<bool, ApiError> {
    let begun = state
        .quotas
        .begin_removal(&entry.tenant, &entry.limits, &[key])
        .await;
    // A removal that failed may have happened: it does not end, and the record counts.
    let removed = state
        .data
        .compare_and_set(&entry.storage_key, current, None, options)
        .await?;
    state
        .quotas
        .end_removal(&entry.tenant, begun, removed)
        .await;
    Ok(removed)
}

#[derive(Serialize)]
pub(crate) struct Exists {
    exists: bool,
}

/// `GET` or `HEAD /v1/cache/{key}/exists`: 200 if it does, 404 if not.
pub(crate) async fn exists(
    State(state): Shared,
    ApiPath(key): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &headers, &key).await?;
    // As `GET`: a backend that fails is an error, never a "no".
    let exists = fetch(&state, &entry.storage_key).await?.is_some();
    let status = if exists {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    Ok((status, Json(Exists { exists })).into_response())
}

/// `POST /v1/cache/{key}/touch?ttl=SECONDS`: gives the entry a new TTL from now.
pub(crate) async fn touch(
    State(state): Shared,
    ApiPath(key): ApiPath<String>,
    ApiQuery(query): ApiQuery<TtlQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let entry = entry(&state, &headers, &key).await?;
    refuse_preconditions(&headers)?;
    let ttl = entry.limits.ttl(asked_ttl(&query, &headers)?)?;
    // The record's expiry is the later of the old and the new until the touch is known to
    // have landed: a touch that fails or is dropped never leaves the entry counted short.
    let begun = state
        .quotas
        .begin_touch(&entry.tenant, &entry.limits, &key, ttl)
        .await?;
    let touched = state.data.touch(&entry.storage_key, ttl).await?;
    state
        .quotas
        .end_touch(&entry.tenant, begun, ttl, touched)
        .await;
    if touched {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("entry"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrefixQuery {
    prefix: String,
}

#[derive(Serialize)]
pub(crate) struct Deleted {
    deleted: u64,
}

/// `DELETE /v1/cache?prefix=P`: deletes the tenant's entries whose key starts with `P`.
pub(crate) async fn delete_prefix(
    State(state): Shared,
    ApiQuery(query): ApiQuery<PrefixQuery>,
    headers: HeaderMap,
) -> Result<Json<Deleted>, ApiError> {
    let entry = entry(&state, &headers, &query.prefix).await?;
    refuse_preconditions(&headers)?;
    // As for one key's delete: a prefix delete that fails (or is dropped) frees no room.
    let begun = state
        .quotas
        .begin_removal_of_prefix(&entry.tenant, &entry.limits, &query.prefix)
        .await?;
    let deleted = state.data.delete_prefix(&entry.storage_key).await?;
    state.quotas.end_removal(&entry.tenant, begun, true).await;
    state.usage.of(&entry.tenant).deleted();
    Ok(Json(Deleted { deleted }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkGet {
    keys: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct BulkValue {
    key: String,
    /// The bytes in base64, or `null` for a miss.
    value: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct BulkValues {
    values: Vec<BulkValue>,
}

/// The body of a bulk request, as JSON of `T`.
async fn bulk_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limits: &Limits,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, limits.max_bulk_body_bytes).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request("invalid_bulk", e.to_string()))
}

/// `POST /v1/bulk/get` with `{"keys": [...]}`: `{"values": [{"key", "value"}]}`, each value in
/// base64 or `null`, in the order asked.
pub(crate) async fn bulk_get(
    State(state): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BulkValues>, ApiError> {
    let (tenant, limits) = tenant(&state, &headers).await?;
    let request: BulkGet = bulk_body(&headers, body, &limits).await?;
    limits.check_bulk(request.keys.len())?;
    for key in &request.keys {
        limits.check_key(key)?;
    }
    let storage: Vec<String> = request.keys.iter().map(|k| tenant.storage_key(k)).collect();
    // As `GET`: a backend that fails is an error, never misses.
    let options = state.data.default_options().with_l2_errors_returned(true);
    let found = state.data.get_many_with(&storage, &options).await?;
    let usage = state.usage.of(&tenant);
    let values = request
        .keys
        .into_iter()
        .zip(found)
        .map(|(key, value)| {
            usage.read(value.is_some());
            BulkValue {
                key,
                value: value.map(|bytes| BASE64.encode(bytes)),
            }
        })
        .collect();
    Ok(Json(BulkValues { values }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkSet {
    entries: Vec<BulkEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkEntry {
    key: String,
    /// The bytes in base64.
    value: String,
    /// Seconds; the default TTL if absent.
    #[serde(default)]
    ttl: Option<u64>,
    /// Milliseconds, instead of `ttl`.
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// `POST /v1/bulk/set` with `{"entries": [{"key", "value" (base64), "ttl"?}]}`. Every entry is
/// checked before any is written.
pub(crate) async fn bulk_set(
    State(state): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let (tenant, limits) = tenant(&state, &headers).await?;
    refuse_preconditions(&headers)?;
    let request: BulkSet = bulk_body(&headers, body, &limits).await?;
    limits.check_bulk(request.entries.len())?;
    let mut writes = Vec::with_capacity(request.entries.len());
    for entry in request.entries {
        limits.check_key(&entry.key)?;
        let ttl = limits.ttl(body_ttl(entry.ttl_ms, entry.ttl)?)?;
        let value = BASE64.decode(entry.value.as_bytes()).map_err(|_| {
            ApiError::bad_request(
                "invalid_bulk",
                format!("the value of {:?} is not base64", entry.key),
            )
        })?;
        limits.check_value(value.len())?;
        writes.push((entry.key, Bytes::from(value), ttl));
    }
    let rooms: Vec<Room<'_>> = writes
        .iter()
        .map(|(key, value, ttl)| Room {
            key,
            value_bytes: value.len(),
            ttl: *ttl,
        })
        .collect();
    let reserved = state.quotas.reserve(&tenant, &limits, &rooms).await?;
    let usage = state.usage.of(&tenant);
    for (key, value, ttl) in &writes {
        let options: EntryOptions = state.data.default_options().with_ttl(*ttl);
        // A failure is not settled (some writes landed, the rest may have): the reservations
        // stay, no smaller than what may be stored.
        state
            .data
            .set_with(&tenant.storage_key(key), value.clone(), &options)
            .await?;
        usage.wrote(value.len());
    }
    state.quotas.settle(&tenant, &rooms, reserved, true).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
pub(crate) struct CreatedKey {
    tenant: String,
    id: String,
    /// The key itself: shown once, kept nowhere.
    key: String,
}

fn tenant_path(name: &str) -> Result<TenantName, ApiError> {
    TenantName::new(name).map_err(|e| ApiError::bad_request("invalid_tenant", e))
}

/// `POST /v1/admin/tenants/{tenant}/keys`: a new API key for the tenant.
pub(crate) async fn create_key(
    State(state): Shared,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    admin(&state, &headers).await?;
    let tenant = tenant_path(&name)?;
    let (id, key) = state.keys.create(&tenant).await?;
    tracing::info!(
        tenant = tenant.as_str(),
        key_id = id.as_str(),
        "API key created"
    );
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            tenant: tenant.as_str().to_owned(),
            id,
            key,
        }),
    ))
}

/// `DELETE /v1/admin/keys/{id}`: revokes a created key on every instance.
pub(crate) async fn revoke_key(
    State(state): Shared,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    admin(&state, &headers).await?;
    if state.keys.revoke(&id).await? {
        tracing::info!(key_id = id.as_str(), "API key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("key"))
    }
}

/// `DELETE /v1/admin/tenants/{tenant}/cache`: every entry of the tenant.
pub(crate) async fn flush_tenant(
    State(state): Shared,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<Deleted>, ApiError> {
    admin(&state, &headers).await?;
    let tenant = tenant_path(&name)?;
    state.quotas.clear(&tenant).await;
    let deleted = state.data.delete_prefix(&tenant.storage_key("")).await?;
    tracing::info!(tenant = tenant.as_str(), deleted, "tenant flushed");
    Ok(Json(Deleted { deleted }))
}

#[derive(Serialize)]
pub(crate) struct UsageAnswer {
    /// This instance's counts.
    #[serde(flatten)]
    counts: crate::usage::Snapshot,
    /// What the tenant holds against its quota (every instance's, where they share it).
    quota: QuotaReport,
}

/// `GET /v1/admin/tenants/{tenant}/usage`: this instance's counts for the tenant, and what
/// it holds against its quota.
pub(crate) async fn usage(
    State(state): Shared,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&state, &headers).await?;
    let tenant = tenant_path(&name)?;
    let limits = state.config.limits_of(&tenant);
    let quota = state.quotas.report(&tenant, limits).await?;
    let counts = state.usage.of(&tenant).snapshot();
    Ok(Json(UsageAnswer { counts, quota }).into_response())
}

#[derive(Serialize)]
pub(crate) struct EntryMeta {
    size: usize,
    ttl_ms: Option<u64>,
    tier: &'static str,
}

/// `GET /v1/admin/tenants/{tenant}/entries/{key}`: an entry's size, remaining TTL and the
/// tier that holds it, without its value.
pub(crate) async fn entry_meta(
    State(state): Shared,
    ApiPath((name, key)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<EntryMeta>, ApiError> {
    admin(&state, &headers).await?;
    let tenant = tenant_path(&name)?;
    let found = fetch(&state, &tenant.storage_key(&key))
        .await?
        .ok_or_else(|| ApiError::not_found("entry"))?;
    let tier = match found.source {
        Source::L1 => "l1",
        Source::L2 => "l2",
        _ => "loader",
    };
    Ok(Json(EntryMeta {
        size: found.value.len(),
        ttl_ms: found
            .ttl
            .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        tier,
    }))
}
