//! The tierstack cache as an HTTP service for many client projects: a versioned REST API,
//! one or more API keys per tenant (stored hashed), each tenant's entries in a namespace of
//! its own, limits per tenant (key and value sizes, bulk sizes, a sliding-window rate), and
//! admin routes for keys, usage and flushing.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tierstack_server::{Server, ServerConfig};
//! let config = ServerConfig::from_env()?;
//! let backend = tierstack::StoreConfig::from_env()?.connect().await?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! Server::new(config, backend)?
//!     .serve(listener, async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Routes
//!
//! Every `/v1` request carries `Authorization: Bearer <key>`. Errors are JSON,
//! `{"error": {"code": "...", "message": "..."}}`, with a stable `code`.
//!
//! | route | answers |
//! |---|---|
//! | `PUT /v1/cache/{key}?ttl=SECONDS` (or `ttl_ms`, or header `x-ttl`: one of them) | 204; with `If-None-Match: *`, 412 where a value is; other preconditions are refused (400 `unsupported_precondition`) |
//! | `GET /v1/cache/{key}` | 200 with the bytes and `x-ttl-ms`; 404 |
//! | `DELETE /v1/cache/{key}` | 204; 404 |
//! | `GET`/`HEAD /v1/cache/{key}/exists` | 200 or 404, `{"exists": bool}` |
//! | `POST /v1/cache/{key}/touch?ttl=SECONDS` | 204; 404 |
//! | `POST /v1/cache/{key}/cas` `{"current", "new", "ttl_ms"?}` | 204 if swapped; 412 |
//! | `DELETE /v1/cache?prefix=P` | `{"deleted": n}`, the tenant's keys under `P`; 409 while another of the tenant's runs |
//! | `POST /v1/bulk/get` `{"keys": [...]}` | `{"values": [{"key", "value": base64 or null}]}` |
//! | `POST /v1/bulk/set` `{"entries": [{"key", "value": base64, "ttl"? or "ttl_ms"?}]}` | 204 |
//! | `POST /v1/admin/tenants/{tenant}/keys` | 201 `{"tenant", "id", "key"}`: the key, shown once |
//! | `DELETE /v1/admin/keys/{id}` | 204; every instance refuses the key within `key_recheck` |
//! | `DELETE /v1/admin/tenants/{tenant}/cache` | `{"deleted": n}` |
//! | `GET /v1/admin/tenants/{tenant}/usage` | this instance's counts and hit ratio |
//! | `GET /v1/admin/tenants/{tenant}/entries/{key}` | `{"size", "ttl_ms", "tier"}`, no value |
//! | `GET /metrics` | Prometheus text, to the admin credential ([`Server::with_metrics`]) |
//! | `GET /healthz`, `GET /readyz` | the process; the backend |
//! | `GET /openapi.json` | the `OpenAPI` 3.1 document of these routes |
//!
//! Keys in paths are percent-encoded (`a%2Fb` for `a/b`).
//!
//! # Configuration
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `TIERSTACK_LISTEN` | the address to listen on | `127.0.0.1:8080` |
//! | `TIERSTACK_API_KEYS` | `tenant=key` pairs, comma-separated (development) | |
//! | `TIERSTACK_ADMIN_KEY` | the admin credential | none: admin routes answer 403 |
//! | `TIERSTACK_SERVER_CONFIG` | a JSON file: `tenants` (`name`, `api_key_sha256`, `limits`), `limits`, `admin_key_sha256` | |
//! | `TIERSTACK_REQUEST_TIMEOUT_MS` | how long a request may run | 10000 |
//! | `TIERSTACK_KEY_RECHECK_MS` | how long a revoked key may still pass on another instance without a backplane | 5000 |
//!
//! and `CACHE_BACKEND` with the backend's variables (`tierstack::StoreConfig`).

mod api;
mod auth;
mod config;
mod error;
mod openapi;
mod quota;
mod server;
mod tenant;
mod usage;

pub use api::{TTL_HEADER, TTL_REQUEST_HEADER};
pub use auth::{KeyHash, generate_key};
pub use config::{ConfigError, ServerConfig, TenantConfig};
pub use error::ApiError;
pub use server::Server;
pub use tenant::{Limits, TenantName};
