//! A server on a loopback port, and a client that speaks to it as a tenant or the admin.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::time::Duration;

use tierstack::Backend;
use tierstack_server::{KeyHash, Limits, Server, ServerConfig, TenantName};
use tokio::sync::oneshot;

pub const SHOP_KEY: &str = "shop-key-0123456789";
pub const BLOG_KEY: &str = "blog-key-0123456789";
pub const ADMIN_KEY: &str = "admin-key-0123456789";

/// Two tenants (`shop`, `blog`), an admin credential, and `limits` for every tenant.
pub fn config(limits: Limits) -> ServerConfig {
    let mut config = ServerConfig::default();
    config
        .keys
        .insert(KeyHash::of(SHOP_KEY), TenantName::new("shop").unwrap());
    config
        .keys
        .insert(KeyHash::of(BLOG_KEY), TenantName::new("blog").unwrap());
    config.admin = Some(KeyHash::of(ADMIN_KEY));
    config.default_limits = limits;
    config
}

/// A running server: its base URL, and the sender that shuts it down.
pub struct Running {
    pub base: String,
    shutdown: Option<oneshot::Sender<()>>,
    pub stopped: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Starts the graceful shutdown; `stopped` completes once requests in flight are done.
    pub fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// What the shop tenant's quota counts, as the admin API answers it: entries and bytes.
pub async fn counted(base: &str) -> (u64, u64) {
    let usage = Client::new(base, Some(ADMIN_KEY))
        .json(reqwest::Method::GET, "/v1/admin/tenants/shop/usage")
        .await;
    let quota = &usage["quota"];
    (
        quota["entries"].as_u64().unwrap(),
        quota["bytes"].as_u64().unwrap(),
    )
}

/// The embedded default: the in-process store.
pub async fn memory() -> Backend {
    tierstack::StoreConfig::Memory {
        max_bytes: 64 << 20,
    }
    .connect()
    .await
    .unwrap()
}

pub async fn start(config: ServerConfig, backend: Backend) -> Running {
    start_with(config, backend, |server| async move { server }).await
}

/// As `start`, with `adapt` applied to the server before it serves.
pub async fn start_with<F, Fut>(config: ServerConfig, backend: Backend, adapt: F) -> Running
where
    F: FnOnce(Server) -> Fut,
    Fut: std::future::Future<Output = Server>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, signal) = oneshot::channel::<()>();
    let server = adapt(Server::new(config, backend).unwrap()).await;
    let stopped = tokio::spawn(server.serve(listener, async {
        let _ = signal.await;
    }));
    Running {
        base,
        shutdown: Some(shutdown),
        stopped,
    }
}

/// `router` (a server's, with a layer of the test's) served as `Server::serve` serves it.
pub async fn start_router(router: axum::Router) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, signal) = oneshot::channel::<()>();
    let stopped = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = signal.await;
            })
            .await
    });
    Running {
        base,
        shutdown: Some(shutdown),
        stopped,
    }
}

/// A client speaking with `key`.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub key: Option<String>,
}

impl Client {
    pub fn new(base: &str, key: Option<&str>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: base.to_owned(),
            key: key.map(str::to_owned),
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.header("authorization", format!("Bearer {key}")),
            None => request,
        }
    }

    pub async fn put(&self, key: &str, value: &str) -> reqwest::StatusCode {
        self.request(reqwest::Method::PUT, &format!("/v1/cache/{}", encode(key)))
            .body(value.to_owned())
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn get(&self, key: &str) -> (reqwest::StatusCode, String) {
        let response = self
            .request(reqwest::Method::GET, &format!("/v1/cache/{}", encode(key)))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// The JSON body of `method` on `path`.
    pub async fn json(&self, method: reqwest::Method, path: &str) -> serde_json::Value {
        let response = self.request(method, path).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// The `code` of an error response; a response without one fails the test.
    pub async fn code(response: reqwest::Response) -> String {
        let text = response.text().await.unwrap();
        let body: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not a JSON error ({e}): {text:?}"));
        body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {text}"))
            .to_owned()
    }
}

/// A key as a path segment: every byte outside `[A-Za-z0-9_.-~]` percent-encoded.
pub fn encode(key: &str) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
