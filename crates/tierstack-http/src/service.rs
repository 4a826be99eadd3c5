//! The layer's service: which requests meet the cache, the read-through call around the
//! handler, and the handler's own response where nothing is shared.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::ETAG;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tierstack::core::clock::Timestamp;
use tierstack::{LoadError, Loaded, TieredCache};
use tower_service::Service;

use crate::entry::{self, CachedResponse};
use crate::key;
use crate::policy::{self, Lookup, Rules};
use crate::{BoxError, HttpCacheBody};

/// What the layer shares between its services.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) cache: TieredCache<CachedResponse>,
    pub(crate) rules: Rules,
    pub(crate) tag_header: HeaderName,
    pub(crate) requests: policy::RequestRules,
    /// Whether a `200` the layer does not store answers a conditional request with a 304.
    pub(crate) revalidate_unstored: bool,
}

/// The [`Service`] of an [`HttpCacheLayer`](crate::HttpCacheLayer) around `S`.
pub struct HttpCacheService<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

impl<S: Clone> Clone for HttpCacheService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for HttpCacheService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCacheService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Why a flight's handler call left nothing to share: its caller has its own response.
#[derive(Debug, Clone, Copy)]
enum Unshared {
    /// The response may not be stored: only its own caller gets it, even where fail-safe
    /// has a stale copy (the handler answered; a cookie or `no-store` is not a failure).
    NotStored,
    /// The handler failed (an error, a 5xx, a body that failed): its caller gets its own
    /// response unless fail-safe answers a stale copy.
    Failed,
}

/// A response that may be stored, for how long, with its tags.
struct ToStore {
    response: CachedResponse,
    ttl: std::time::Duration,
    tags: Vec<String>,
}

/// What a read-through call keeps beside the flight: the request, until a handler call takes
/// it, and the leader's own response when it is not shared.
struct Slot<B, E> {
    request: Option<Request<B>>,
    own: Option<Result<Response<HttpCacheBody>, E>>,
    /// Why `own` was not shared, if it was not.
    unshared: Option<Unshared>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn boxed<B>(response: Response<B>) -> Response<HttpCacheBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(|body| body.map_err(Into::into).boxed_unsync())
}

fn full(response: Response<Bytes>) -> Response<HttpCacheBody> {
    response.map(|bytes| {
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    })
}

fn status_only(status: StatusCode) -> Response<HttpCacheBody> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = status;
    full(response)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpCacheService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<HttpCacheBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready serves this call; its clone waits for the next.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { shared.serve(ready, request).await })
    }
}

impl Shared {
    /// The time by the cache's clock.
    fn now(&self) -> Timestamp {
        self.cache.clock().now()
    }

    fn key<B>(&self, request: &Request<B>) -> String {
        key::of(request, &self.rules.vary_on)
    }

    /// The handler's own response, as it goes to its request: without the tag header, which is
    /// for the layer, and, with [`revalidate_unstored`](crate::HttpCacheLayer::revalidate_unstored),
    /// `304 Not Modified` instead of a `200` whose `ETag` the request's `conditional` (its
    /// `If-None-Match`, for a `GET` or `HEAD`) names, as for a stored one.
    fn own<B>(
        &self,
        mut response: Response<B>,
        conditional: &[HeaderValue],
    ) -> Response<HttpCacheBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        response.headers_mut().remove(&self.tag_header);
        if self.revalidate_unstored
            && response.status() == StatusCode::OK
            && entry::not_modified(conditional, response.headers().get(ETAG))
        {
            // The body is dropped unread.
            let (mut parts, _body) = response.into_parts();
            parts.status = StatusCode::NOT_MODIFIED;
            parts.headers = entry::headers_of_304(&parts.headers);
            return full(Response::from_parts(parts, Bytes::new()));
        }
        boxed(response)
    }

    async fn serve<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut inner: S,
        request: Request<ReqBody>,
    ) -> Result<Response<HttpCacheBody>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
        S::Future: Send,
        S::Error: Send + 'static,
        ReqBody: Send,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        match self.requests.lookup(request.method(), request.headers()) {
            Lookup::Bypass => {
                // `If-None-Match` asks a `GET` or `HEAD` for a 304; of other methods, a 412
                // that only the handler can decide on.
                let conditional = if matches!(*request.method(), Method::GET | Method::HEAD) {
                    entry::if_none_match(request.headers())
                } else {
                    Vec::new()
                };
                inner.call(request).await.map(|r| self.own(r, &conditional))
            }
            Lookup::Head => {
                let key = self.key(&request);
                let conditional = entry::if_none_match(request.headers());
                if let Ok(Some(stored)) = self.cache.get(&key).await {
                    let hit = HeaderValue::from_static("HIT");
                    return Ok(full(stored.answer(&conditional, true, (hit, self.now()))));
                }
                inner.call(request).await.map(|r| self.own(r, &conditional))
            }
            Lookup::ReadThrough => self.read_through(inner, request).await,
            Lookup::Refresh => self.refresh(inner, request).await,
        }
    }

    /// Answers from the cache, or runs the handler once for every request of the key that
    /// waits meanwhile (single-flight) and stores what may be stored. A response that may not
    /// be stored (or a failure) goes to its own request only: each waiter then runs the
    /// handler itself, since a response with a cookie, say, is not theirs.
    async fn read_through<S, ReqBody, ResBody>(
        &self,
        mut inner: S,
        request: Request<ReqBody>,
    ) -> Result<Response<HttpCacheBody>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
        S::Future: Send,
        S::Error: Send + 'static,
        ReqBody: Send,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let key = self.key(&request);
        let conditional = entry::if_none_match(request.headers());
        let slot = Mutex::new(Slot {
            request: Some(request),
            own: None,
            unshared: None,
        });
        let options = self.cache.default_options();
        let loaded = {
            let (inner, slot) = (&mut inner, &slot);
            self.cache
                .get_or_load_inline(&key, &options, || async move {
                    let Some(request) = lock(slot).request.take() else {
                        return Err(Unshared::Failed);
                    };
                    match self.load(inner, request, slot).await {
                        Ok(to_store) => Ok(Loaded::new(to_store.response)
                            .with_ttl(to_store.ttl)
                            .with_tags(to_store.tags)),
                        // Not a failure: the handler answered, for its own request alone. The
                        // waiters hear so (and run the handler themselves), fail-safe keeps
                        // out of it, and nothing is cached.
                        Err(Unshared::NotStored) => {
                            lock(slot).unshared = Some(Unshared::NotStored);
                            Ok(Loaded::new(CachedResponse::unshared()).uncached())
                        }
                        Err(Unshared::Failed) => {
                            lock(slot).unshared = Some(Unshared::Failed);
                            Err(Unshared::Failed)
                        }
                    }
                })
                .await
        };
        let (ran, own, unshared) = {
            let mut slot = lock(&slot);
            (slot.request.is_none(), slot.own.take(), slot.unshared)
        };
        match (loaded, own) {
            // The handler answered for this request alone.
            // A stale copy fail-safe keeps stays: a response that may not be stored does not
            // invalidate a stored one (RFC 9111, 4.4: only unsafe methods do), and removing
            // it would cost an L2 write per such answer and could remove a fresh copy another
            // instance stored meanwhile.
            (_, Some(own)) if matches!(unshared, Some(Unshared::NotStored)) => own,
            (Ok(stored), _) if !stored.is_unshared() => {
                // Where this request's handler call failed, the answer is fail-safe's copy.
                let label = match (ran, unshared) {
                    (true, Some(Unshared::Failed)) => "STALE",
                    (true, _) => "MISS",
                    (false, _) => "HIT",
                };
                let label = HeaderValue::from_static(label);
                Ok(full(stored.answer(
                    &conditional,
                    false,
                    (label, self.now()),
                )))
            }
            (_, Some(own)) => own,
            (answer, None) => {
                let request = lock(&slot).request.take();
                // Nothing shared (the leader's response was its own, or it failed, or a cache
                // error): this request runs the handler.
                if let Some(request) = request {
                    return inner.call(request).await.map(|r| self.own(r, &conditional));
                }
                // The handler panicked on this request.
                if let Err(LoadError::Panicked) = answer {
                    tracing::warn!("the handler panicked under the HTTP cache");
                }
                Ok(status_only(StatusCode::INTERNAL_SERVER_ERROR))
            }
        }
    }

    /// A request for a fresh copy (`no-cache`): the handler runs, and what it answers replaces
    /// what is stored (no flight: the request asked not to share an answer).
    async fn refresh<S, ReqBody, ResBody>(
        &self,
        mut inner: S,
        request: Request<ReqBody>,
    ) -> Result<Response<HttpCacheBody>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
        S::Future: Send,
        S::Error: Send + 'static,
        ReqBody: Send,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let key = self.key(&request);
        let conditional = entry::if_none_match(request.headers());
        let slot = Mutex::new(Slot {
            request: None,
            own: None,
            unshared: None,
        });
        match self.load(&mut inner, request, &slot).await {
            Ok(to_store) => {
                let options = self.cache.default_options().with_ttl(to_store.ttl);
                let stored = self
                    .cache
                    .set_with_tags(&key, to_store.response.clone(), &to_store.tags, &options)
                    .await;
                if let Err(error) = stored {
                    tracing::debug!(error = %error, "refreshed response not cached");
                }
                let miss = HeaderValue::from_static("MISS");
                Ok(full(to_store.response.answer(
                    &conditional,
                    false,
                    (miss, self.now()),
                )))
            }
            Err(why) => {
                if matches!(why, Unshared::NotStored) {
                    self.forget_outdated(&key).await;
                }
                lock(&slot)
                    .own
                    .take()
                    .unwrap_or_else(|| Ok(status_only(StatusCode::INTERNAL_SERVER_ERROR)))
            }
        }
    }

    /// Removes the copy stored under `key` after the handler answered what may not be stored:
    /// neither may the old copy answer the requests after it.
    async fn forget_outdated(&self, key: &str) {
        if let Err(error) = self.cache.delete(key).await {
            tracing::debug!(error = %error, "outdated response not removed");
        }
    }

    /// A handler call: what to store, or its own response kept in `slot`.
    async fn load<S, ReqBody, ResBody>(
        &self,
        inner: &mut S,
        request: Request<ReqBody>,
        slot: &Mutex<Slot<ReqBody, S::Error>>,
    ) -> Result<ToStore, Unshared>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
        S::Future: Send,
        S::Error: Send + 'static,
        ReqBody: Send,
        ResBody: Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let conditional = entry::if_none_match(request.headers());
        let response = match inner.call(request).await {
            Ok(response) => response,
            Err(error) => {
                lock(slot).own = Some(Err(error));
                return Err(Unshared::Failed);
            }
        };
        let (parts, body) = response.into_parts();
        let ttl = match self
            .rules
            .ttl(parts.status, &parts.headers, body.size_hint().upper())
        {
            Ok(ttl) => ttl,
            Err(reason) => {
                tracing::debug!(reason = reason.describe(), "response not cached");
                // A server error is the origin failing: fail-safe may answer a stale copy.
                let why = if parts.status.is_server_error() {
                    Unshared::Failed
                } else {
                    Unshared::NotStored
                };
                let own = self.own(Response::from_parts(parts, body), &conditional);
                lock(slot).own = Some(Ok(own));
                return Err(why);
            }
        };
        // The size hint said the body fits; a body that lies about it fails here, with at
        // most `max_body` bytes read.
        let limited = http_body_util::Limited::new(body, self.rules.max_body);
        let Ok(collected) = limited.collect().await else {
            lock(slot).own = Some(Ok(status_only(StatusCode::BAD_GATEWAY)));
            return Err(Unshared::Failed);
        };
        let tags: Vec<String> = parts
            .headers
            .get_all(&self.tag_header)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|list| list.split(','))
            .map(str::trim)
            .filter(|tag| !tag.is_empty())
            .map(str::to_owned)
            .collect();
        let stored = CachedResponse::new(
            parts.status,
            &parts.headers,
            collected.to_bytes(),
            &self.tag_header,
            (self.now(), ttl),
        );
        Ok(ToStore {
            response: stored,
            ttl,
            tags,
        })
    }
}
