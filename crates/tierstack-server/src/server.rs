//! The server: its state, its router, and serving it until shutdown.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use tierstack::core::Store;
use tierstack::{Backend, CacheError, TieredCache};

use crate::auth::{KeyRecord, Keys};
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::quota::{Quotas, in_flight_for};
use crate::tenant::RateLimits;
use crate::usage::Usage;
use crate::{api, openapi};

/// What every request shares.
pub(crate) struct AppState {
    pub(crate) config: ServerConfig,
    /// Every tenant's entries, each tenant under its own prefix.
    pub(crate) data: TieredCache<Bytes>,
    pub(crate) keys: Keys,
    pub(crate) rate: RateLimits,
    pub(crate) quotas: Quotas,
    pub(crate) usage: Usage,
    /// The L2, for `/readyz`.
    store: Arc<dyn Store>,
    /// What `/metrics` renders, if the process installed a Prometheus recorder.
    metrics: Option<PrometheusHandle>,
}

/// The cache service: build it with [`Server::new`], serve it with [`Server::serve`], or take
/// its [`router`](Server::router) into an app of your own.
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.state.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server on `backend` (`StoreConfig::Memory` for the embedded default: this process
    /// only). Entries are kept in an L1 in front of the backend only where a backplane keeps
    /// every instance's L1 right (Redis); on a backend without one (Firestore, the in-process
    /// store) every read goes to it, so that no instance answers a value another instance
    /// changed, and nothing is held twice in this process.
    ///
    /// # Errors
    ///
    /// A configuration the caches refuse.
    pub fn new(config: ServerConfig, backend: Backend) -> Result<Self, CacheError> {
        let largest_value = largest(&config, |limits| limits.max_value_bytes);
        let data = TieredCache::<Bytes>::builder("tierstack-server")
            // Room for the envelope around the largest value a tenant may write.
            .max_value_len(largest_value.saturating_add(1024))
            .max_key_len(config_max_key(&config));
        let keys =
            TieredCache::<KeyRecord>::builder("tierstack-server-keys").l1_ttl(config.key_recheck);
        let store = Arc::clone(&backend.store);
        let data = if backend.backplane.is_some() {
            backend.clone().apply(data)
        } else {
            backend.clone().apply(data).without_l1()
        };
        let (data, keys) = (data.build()?, backend.apply(keys).build()?);
        let keys = Keys::new(config.keys.clone(), config.admin, keys, config.key_recheck);
        let request_timeout = config.request_timeout;
        Ok(Self {
            state: Arc::new(AppState {
                config,
                data,
                keys,
                rate: RateLimits::default(),
                quotas: Quotas::local(in_flight_for(request_timeout)),
                usage: Usage::default(),
                store,
                metrics: None,
            }),
        })
    }

    /// Counts every tenant's rate in `store`, so that the limit holds across every instance
    /// that counts there (a sliding window on Redis's clock). While Redis fails, each instance
    /// counts on its own.
    ///
    /// # Panics
    ///
    /// If called after the server was cloned or its router taken.
    #[must_use]
    pub fn share_rate_limits(mut self, store: tierstack::redis::RedisStore) -> Self {
        let state = Arc::get_mut(&mut self.state)
            .unwrap_or_else(|| panic!("share_rate_limits before the server is shared"));
        state.rate = RateLimits::shared(store);
        self
    }

    /// Counts every tenant's entries and bytes against its quota in `store`, so that the
    /// quota holds across every instance that counts there. Without it, each instance counts
    /// the operations it made: right for one instance only (with several, a tenant may hold
    /// up to its quota on each, and more: a touch through another instance keeps an entry
    /// alive past the record of the instance that wrote it). While Redis fails, writes and
    /// touches are refused with 503: what cannot be counted is not made.
    ///
    /// # Errors
    ///
    /// The store's key prefix leaves no room for the ledger's keys.
    ///
    /// # Panics
    ///
    /// If called after the server was cloned or its router taken.
    pub fn share_quotas(
        mut self,
        store: &tierstack::redis::RedisStore,
    ) -> Result<Self, CacheError> {
        let ledger = tierstack::redis::QuotaLedger::new(store, "tierstack-server")?
            .in_flight_for(in_flight_for(self.state.config.request_timeout))?;
        let state = Arc::get_mut(&mut self.state)
            .unwrap_or_else(|| panic!("share_quotas before the server is shared"));
        state.quotas = Quotas::shared(ledger, in_flight_for(state.config.request_timeout));
        Ok(self)
    }

    /// Serves `/metrics` (to the admin credential) from `handle`: the recorder the process
    /// installed (`metrics_exporter_prometheus::PrometheusBuilder::install_recorder`), which
    /// then holds the cache's `tierstack_*` metrics and the server's own.
    ///
    /// # Panics
    ///
    /// If called after the server was cloned or its router taken.
    #[must_use]
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        let state = Arc::get_mut(&mut self.state)
            .unwrap_or_else(|| panic!("with_metrics before the server is shared"));
        state.metrics = Some(handle);
        self
    }

    /// The routes: `/v1/...`, `/metrics`, `/healthz`, `/readyz` and `/openapi.json`.
    pub fn router(&self) -> Router {
        let state = Arc::clone(&self.state);
        let v1 = Router::new()
            .route(
                "/v1/cache/{key}",
                get(api::get_value)
                    .put(api::put_value)
                    .delete(api::delete_value),
            )
            .route("/v1/cache/{key}/exists", get(api::exists))
            .route("/v1/cache/{key}/touch", post(api::touch))
            .route("/v1/cache/{key}/cas", post(api::compare_and_set))
            .route("/v1/cache", delete(api::delete_prefix))
            .route("/v1/bulk/get", post(api::bulk_get))
            .route("/v1/bulk/set", post(api::bulk_set))
            .route("/v1/admin/tenants/{tenant}/keys", post(api::create_key))
            .route("/v1/admin/keys/{id}", delete(api::revoke_key))
            .route(
                "/v1/admin/tenants/{tenant}/cache",
                delete(api::flush_tenant),
            )
            .route("/v1/admin/tenants/{tenant}/usage", get(api::usage))
            .route(
                "/v1/admin/tenants/{tenant}/entries/{key}",
                get(api::entry_meta),
            )
            .layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                within_timeout,
            ))
            .route("/metrics", get(render_metrics))
            .layer(middleware::from_fn(count_request));
        v1.route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(ready))
            .route("/openapi.json", get(|| async { Json(openapi::document()) }))
            .with_state(state)
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the requests in flight.
    ///
    /// # Errors
    ///
    /// The listener's error.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// The largest of `limit` over every tenant's limits.
fn largest(config: &ServerConfig, limit: impl Fn(&crate::tenant::Limits) -> usize) -> usize {
    std::iter::once(&config.default_limits)
        .chain(config.limits.values())
        .map(limit)
        .max()
        .unwrap_or_default()
}

/// The longest storage key: a tenant's key, escaped (at most three bytes per byte), after its
/// name (64 bytes at most) and `:`.
fn config_max_key(config: &ServerConfig) -> usize {
    largest(config, |limits| limits.max_key_bytes)
        .saturating_mul(3)
        .saturating_add(65)
}

/// Every `/v1` request ends within the configured timeout (504 past it).
async fn within_timeout(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(state.config.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout().into_response(),
    }
}

/// `GET /readyz`: 200 when the backend answers, 503 when it does not.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ping = tokio::time::timeout(state.config.request_timeout, state.store.ping()).await;
    match ping {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        _ => ApiError::unavailable("the backend does not answer").into_response(),
    }
}

/// Counts each request by route and status class, and times it:
/// `tierstack_server_requests_total{route, status}` and `tierstack_server_request_seconds{route}`.
async fn count_request(request: Request, next: Next) -> Response {
    // The documented route's own text: a label that costs no allocation per request.
    let route: &'static str = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|path| {
            openapi::ROUTES
                .iter()
                .find(|(_, route, ..)| *route == path.as_str())
                .map(|(_, route, ..)| *route)
        })
        .unwrap_or("unmatched");
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = match response.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("tierstack_server_requests_total", "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!("tierstack_server_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`: the Prometheus text format, to the admin credential.
async fn render_metrics(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    match state.keys.caller(&headers).await? {
        crate::auth::Caller::Admin => {}
        crate::auth::Caller::Tenant(_) => return Err(ApiError::forbidden()),
    }
    let Some(handle) = &state.metrics else {
        return Err(ApiError::not_found("metrics recorder: none was installed"));
    };
    let mut response = handle.render().into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}
