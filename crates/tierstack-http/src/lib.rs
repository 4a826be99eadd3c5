//! HTTP response caching as a [tower](https://docs.rs/tower) layer on a
//! [tierstack](https://docs.rs/tierstack) `TieredCache`: the responses of `GET` routes are
//! kept in L1 and L2, shared by every instance of the service, and invalidated by route
//! prefix or tag on all of them.
//!
//! ```
//! use std::time::Duration;
//! use tierstack_http::{CachedResponse, HttpCacheLayer};
//! use tierstack::TieredCache;
//!
//! # fn main() -> Result<(), tierstack::CacheError> {
//! // Responses without a max-age live the cache's default TTL.
//! let cache: TieredCache<CachedResponse> = TieredCache::builder("http")
//!     .default_ttl(Duration::from_secs(30))
//!     .build()?;
//! let layer = HttpCacheLayer::new(cache).vary_on(["accept-language"]);
//! // Router::new().route("/products/{id}", get(product)).layer(layer.clone());
//! // later, when product 7 changes: layer.invalidate_path("/products/7").await?;
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # What is cached
//!
//! - `GET` requests, keyed by path, query, everything that says where the request was
//!   addressed (its URI's scheme and authority; `Host`, `X-Forwarded-Host`,
//!   `X-Forwarded-Proto`, `X-Forwarded-Port`, `X-Forwarded-Prefix`, `X-Forwarded-Scheme`,
//!   `X-Forwarded-Ssl`, `X-Original-Host`; the `host` and `proto` of `Forwarded`, not its
//!   `for` or `by`: a request whose hosts disagree gets an entry of its own, and every client
//!   shares one; an HTTP/2 request, whose URI names its scheme, and an HTTP/1 request, whose
//!   URI does not, get one entry each) and the values of the headers named in
//!   [`vary_on`](HttpCacheLayer::vary_on); `HEAD` is answered from a cached `GET` (and passes
//!   through on a miss). Other methods, requests with `Cache-Control: no-store`, requests with
//!   `Authorization` (unless [`cache_authorized`](HttpCacheLayer::cache_authorized)) and
//!   requests with a `Cookie` (unless
//!   [`cache_requests_with_cookies`](HttpCacheLayer::cache_requests_with_cookies), or `cookie`
//!   is in `vary_on`) pass through untouched. `Cache-Control: no-cache` (or `max-age=0`) on a request runs the
//!   handler and stores its fresh response (unless
//!   [`honor_request_no_cache`](HttpCacheLayer::honor_request_no_cache) is off).
//! - Responses with a cacheable status (2xx except 206, by default), no `Set-Cookie`, no
//!   `no-store`, `no-cache` or `private`, a `Vary` only on headers of `vary_on`, and a body of
//!   known size within [`max_body_bytes`](HttpCacheLayer::max_body_bytes) (1 MiB). A body of
//!   unknown size (a stream) passes through as it comes, not cached. They live `s-maxage`,
//!   else `max-age`, else the cache's default TTL.
//!
//! The key holds nothing else: a route whose answer depends on more (the signed-in user, a
//! header outside `vary_on`, a proxy header the key does not hold such as `X-Forwarded-Server`,
//! `X-Host`, `X-Forwarded-Uri`, `X-Original-URL` or `X-Rewrite-URL`) must name it in
//! `vary_on`, answer `Cache-Control: private`, or stay outside the layer.
//! With fail-safe in the cache's options, a stale copy answers when the handler fails (an
//! error, a 5xx), never in place of a response it gave that may not be stored: that response
//! goes to its own request, each request that waited for it runs the handler itself, and the
//! requests after it run the handler too until one answers what may be stored. The stale copy
//! stays for a later failure (a response that may not be stored does not invalidate a stored
//! one: RFC 9111, 4.4), except after a `no-cache` request, whose answer replaces or removes
//! it.
//!
//! # What a response gets
//!
//! An `ETag` (a hash of the body) when the handler set none; `Age` (by the cache's
//! [clock](tierstack::TieredCache::clock)); `x-cache: MISS` when this request's handler call
//! answered, `HIT` from the cache, and `STALE` for a copy past its freshness that fail-safe
//! kept (answering for a handler that failed, panicked or timed out, or left in place for the
//! throttle after one). Staleness is HTTP's: an age past the response's own freshness
//! lifetime (`s-maxage`, `max-age` or the default TTL), even where the cache's TTL jitter keeps
//! the copy a little longer; a copy that `expire_tag` turned into a fallback before that age
//! still reads `HIT`.
//! A request whose `If-None-Match` names the `ETag` gets `304 Not Modified` without running the
//! handler (one with `If-Match` or `If-Unmodified-Since` passes the cache by: the handler
//! judges it); [`revalidate_unstored`](HttpCacheLayer::revalidate_unstored) extends it to
//! responses the layer does not store. Concurrent misses of one key run the handler once; a
//! response that may not be stored goes only to its own request, and each other waiting
//! request runs the handler itself. A handler can tag a response with the `x-tierstack-tags`
//! header (a comma-separated list; [`tag_header`](HttpCacheLayer::tag_header) renames it),
//! which the layer removes:
//! [`invalidate_tag`](HttpCacheLayer::invalidate_tag) then drops every response carrying it,
//! on every instance.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, StatusCode};
use tierstack::TieredCache;
use tower_layer::Layer;

mod entry;
mod key;
mod policy;
mod service;

pub use entry::CachedResponse;
pub use service::HttpCacheService;

/// The body of the layer's responses: a cached body, or the handler's own.
pub type HttpCacheBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The error of [`HttpCacheBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header that says whether the cache answered (`HIT`), the handler did (`MISS`), or the
/// handler failed and fail-safe's stale copy answered (`STALE`).
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The default header a handler tags its response with.
pub const DEFAULT_TAG_HEADER: HeaderName = HeaderName::from_static("x-tierstack-tags");

/// A tower [`Layer`] that caches `GET` responses in a `TieredCache`; see the
/// [crate docs](crate). Cloning is cheap: clones share the cache and its settings, so one clone
/// can go in the router and another invalidate.
#[derive(Clone)]
pub struct HttpCacheLayer {
    shared: Arc<service::Shared>,
}

impl std::fmt::Debug for HttpCacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCacheLayer")
            .field("namespace", &self.shared.cache.namespace())
            .field("vary_on", &self.shared.rules.vary_on)
            .field("max_body", &self.shared.rules.max_body)
            .field("revalidate_unstored", &self.shared.revalidate_unstored)
            .finish_non_exhaustive()
    }
}

impl HttpCacheLayer {
    /// A layer storing responses in `cache`; responses without a `max-age` live its default
    /// TTL.
    pub fn new(cache: TieredCache<CachedResponse>) -> Self {
        let default_ttl = cache.default_options().ttl();
        Self {
            shared: Arc::new(service::Shared {
                cache,
                rules: policy::Rules {
                    cacheable_status: policy::success_except_partial,
                    vary_on: Vec::new(),
                    max_body: 1 << 20,
                    default_ttl,
                },
                tag_header: DEFAULT_TAG_HEADER,
                revalidate_unstored: false,
                requests: policy::RequestRules {
                    authorized: false,
                    with_cookies: false,
                    cookies_vary: false,
                    honor_no_cache: true,
                },
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut service::Shared)) -> Self {
        // Settings are set before the layer is shared; a clone made earlier keeps its own.
        let shared = Arc::make_mut(&mut self.shared);
        change(shared);
        self
    }

    /// The request headers responses may vary on (`Accept-Language`, `Accept-Encoding`...):
    /// their values are part of the key, and a response whose `Vary` names any other header
    /// is not stored. Invalid header names are skipped. A header that says where a request
    /// was addressed and is not among those the key always holds (a proxy's own, say) belongs
    /// here too.
    #[must_use]
    pub fn vary_on<I, N>(self, headers: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: AsRef<str>,
    {
        let names: Vec<HeaderName> = headers
            .into_iter()
            .filter_map(|name| HeaderName::from_bytes(name.as_ref().as_bytes()).ok())
            .collect();
        self.with(|shared| {
            shared.requests.cookies_vary = names.contains(&http::header::COOKIE);
            shared.rules.vary_on = names;
        })
    }

    /// The largest body stored (default 1 MiB); larger ones pass through.
    #[must_use]
    pub fn max_body_bytes(self, max: usize) -> Self {
        self.with(|shared| shared.rules.max_body = max)
    }

    /// Which statuses may be stored (default: 2xx except 206). Error statuses are stored only
    /// if this says so.
    #[must_use]
    pub fn cacheable_status(self, cacheable: fn(StatusCode) -> bool) -> Self {
        self.with(|shared| shared.rules.cacheable_status = cacheable)
    }

    /// Whether requests with an `Authorization` header meet the cache (default: no, they pass
    /// through). Turn it on only when every such response is the same for every caller.
    #[must_use]
    pub fn cache_authorized(self, cache: bool) -> Self {
        self.with(|shared| shared.requests.authorized = cache)
    }

    /// Whether requests with a `Cookie` header meet the cache (default: no, they pass
    /// through: a handler may answer from the session the cookie names). Turn it on for routes
    /// that answer the same whatever the cookies (an analytics cookie on a product page).
    /// Naming `cookie` in [`vary_on`](Self::vary_on) lets them in too, each cookie header
    /// keyed apart (one entry per session: rarely worth it).
    #[must_use]
    pub fn cache_requests_with_cookies(self, cache: bool) -> Self {
        self.with(|shared| shared.requests.with_cookies = cache)
    }

    /// Whether a request's `Cache-Control: no-cache` (or `max-age=0`) runs the handler and
    /// stores its fresh answer (default: yes, as RFC 9111 asks). A public service may turn it
    /// off: then any client can no longer make every request reach the handler.
    #[must_use]
    pub fn honor_request_no_cache(self, honor: bool) -> Self {
        self.with(|shared| shared.requests.honor_no_cache = honor)
    }

    /// Whether a `GET` or `HEAD` whose `If-None-Match` names the `ETag` of a `200` the layer
    /// does not store (`private`, `no-store`, a cookie, a request it passes by) gets
    /// `304 Not Modified` instead, once the handler ran (default: no, the handler's `200`).
    /// Turn it on only where a handler's `ETag` names the body it sends: one that personalises
    /// the body under an `ETag` of the resource's version would have a browser shared by two
    /// users keep showing the first user's page to the second.
    #[must_use]
    pub fn revalidate_unstored(self, revalidate: bool) -> Self {
        self.with(|shared| shared.revalidate_unstored = revalidate)
    }

    /// The response header a handler tags its response with (default `x-tierstack-tags`).
    #[must_use]
    pub fn tag_header(self, header: HeaderName) -> Self {
        self.with(|shared| shared.tag_header = header)
    }

    /// The cache the responses live in.
    pub fn cache(&self) -> &TieredCache<CachedResponse> {
        &self.shared.cache
    }

    /// Drops every stored response of `path` (any query, host or variant), on every
    /// instance; `/products/7` leaves `/products/70` alone, unlike
    /// [`invalidate_prefix`](Self::invalidate_prefix). Returns how many the L2 held.
    ///
    /// # Errors
    ///
    /// The cache's error (an empty path, an L2 failure).
    pub async fn invalidate_path(&self, path: &str) -> tierstack::Result<u64> {
        // A key is the path, then `?` and the query, then `#` and the hash of the host and
        // varying headers; a path holds neither `?` nor `#`.
        let cache = &self.shared.cache;
        let mut removed = u64::from(cache.delete(path).await?);
        for separator in ['?', '#'] {
            removed += cache.delete_prefix(&format!("{path}{separator}")).await?;
        }
        Ok(removed)
    }

    /// Drops every stored response whose path starts with `prefix` (`/products/7` also drops
    /// `/products/70`: end it with `/` for a subtree), on every instance.
    ///
    /// # Errors
    ///
    /// The cache's error (an empty prefix, an L2 failure).
    pub async fn invalidate_prefix(&self, prefix: &str) -> tierstack::Result<u64> {
        self.shared.cache.delete_prefix(prefix).await
    }

    /// Drops every stored response tagged `tag`, on every instance.
    ///
    /// # Errors
    ///
    /// As [`TieredCache::invalidate_tag`].
    pub async fn invalidate_tag(&self, tag: &str) -> tierstack::Result<()> {
        self.shared.cache.invalidate_tag(tag).await
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCacheService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpCacheService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The README's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
