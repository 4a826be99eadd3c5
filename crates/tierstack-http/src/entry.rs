//! A response as the cache stores it, its `ETag`, and what it answers to a request (the response,
//! its headers alone for `HEAD`, or `304 Not Modified`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    AGE, CACHE_CONTROL, CONNECTION, CONTENT_LOCATION, DATE, ETAG, EXPIRES, IF_NONE_MATCH,
    LAST_MODIFIED, SET_COOKIE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tierstack::core::clock::Timestamp;

/// A stored response: status, headers (the `ETag` among them), body, when it was stored and
/// for how long it is fresh.
/// Cloning is cheap (shared): an L1 hit clones it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedResponse(Arc<Kept>);

#[derive(Debug, PartialEq, Eq)]
struct Kept {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored_at_ms: u64,
    /// How long after `stored_at_ms` it is fresh (its TTL): an answer older than that is a
    /// stale copy fail-safe kept, and says so.
    fresh_for_ms: u64,
    /// Not a response: what a flight answers its waiters when the handler's response may not
    /// be stored (it is its own request's alone). Never stored, never encoded.
    unshared: bool,
}

/// How a stored response is encoded in the L2.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    status: u16,
    headers: Vec<StoredHeader>,
    #[serde(with = "serde_bytes", borrow)]
    body: std::borrow::Cow<'a, [u8]>,
    stored_at_ms: u64,
    fresh_for_ms: u64,
}

/// One header of a stored response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredHeader {
    name: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

impl Serialize for CachedResponse {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let headers = self
            .0
            .headers
            .iter()
            .filter(|(name, _)| storable(name))
            .map(|(name, value)| StoredHeader {
                name: name.as_str().to_owned(),
                value: value.as_bytes().to_vec(),
            })
            .collect();
        Wire {
            status: self.0.status.as_u16(),
            headers,
            body: std::borrow::Cow::Borrowed(&self.0.body),
            stored_at_ms: self.0.stored_at_ms,
            fresh_for_ms: self.0.fresh_for_ms,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CachedResponse {
    /// Headers that no longer parse are skipped; a status out of range reads as 200.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let mut headers = HeaderMap::with_capacity(wire.headers.len());
        for StoredHeader { name, value } in wire.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(&value),
            ) && storable(&name)
            {
                // The storing rules again: an entry another writer put in the L2 answers
                // every client, so it never replays a cookie or a connection's headers.
                headers.append(name, value);
            }
        }
        Ok(Self(Arc::new(Kept {
            status: StatusCode::from_u16(wire.status).unwrap_or(StatusCode::OK),
            headers: with_answer_slots(headers),
            body: Bytes::from(wire.body.into_owned()),
            stored_at_ms: wire.stored_at_ms,
            fresh_for_ms: wire.fresh_for_ms,
            unshared: false,
        })))
    }
}

/// Headers that belong to one connection, not to the response (RFC 9110, 7.6.1): not stored.
fn hop_by_hop(name: &HeaderName) -> bool {
    use http::header::{
        CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
        UPGRADE,
    };
    [
        CONNECTION,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

/// Whether a response header may be stored and replayed to other clients (`Age` and
/// `x-cache` are the layer's, set on each answer).
fn storable(name: &HeaderName) -> bool {
    name != SET_COOKIE && name != AGE && name != crate::X_CACHE && !hop_by_hop(name)
}

/// Gives `headers` the entries each answer sets (`Age`, `x-cache`), so that an answer's copy
/// replaces their values in place instead of growing the map.
fn with_answer_slots(mut headers: HeaderMap) -> HeaderMap {
    headers.insert(AGE, HeaderValue::from_static("0"));
    headers.insert(crate::X_CACHE, HeaderValue::from_static("MISS"));
    headers
}

/// Appends the lowercase hex of `bytes` to `out`.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
}

/// The headers a response's `Connection` header names: they belong to the connection too.
fn named_by_connection(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect()
}

/// A strong `ETag` of `body`: the first 16 bytes of its SHA-256, in hex.
pub(crate) fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let mut tag = String::with_capacity(34);
    tag.push('"');
    push_hex(&mut tag, &digest[..16]);
    tag.push('"');
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// Whether the `If-None-Match` values name `etag` (or are `*`). Weak comparison, as RFC 9110
/// asks of `If-None-Match`: `W/"x"` matches `"x"`.
pub(crate) fn not_modified(if_none_match: &[HeaderValue], etag: Option<&HeaderValue>) -> bool {
    let Some(etag) = etag.and_then(|etag| etag.to_str().ok()) else {
        return false;
    };
    let bare = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    if_none_match.iter().any(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',')
                .any(|candidate| candidate.trim() == "*" || bare(candidate) == bare(etag))
        })
    })
}

impl CachedResponse {
    /// A response to store, stored at `now` and fresh for `ttl`, with an `ETag` among its
    /// headers (the handler's own, else one of its body), without the layer's tag header
    /// (`skip`), `Age`, or hop-by-hop headers.
    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        skip: &HeaderName,
        (now, ttl): (Timestamp, Duration),
    ) -> Self {
        let connection = named_by_connection(headers);
        let mut stored = HeaderMap::with_capacity(headers.len() + 3);
        for (name, value) in headers {
            let per_connection = connection.iter().any(|named| named == name.as_str());
            if name != skip && storable(name) && !per_connection {
                stored.append(name.clone(), value.clone());
            }
        }
        if !stored.contains_key(ETAG) {
            stored.insert(ETAG, etag_of(&body));
        }
        Self(Arc::new(Kept {
            status,
            headers: with_answer_slots(stored),
            body,
            stored_at_ms: now.as_millis(),
            fresh_for_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            unshared: false,
        }))
    }

    /// What a flight answers its waiters when the handler's response may not be stored: no
    /// response, but word that each must run the handler itself.
    pub(crate) fn unshared() -> Self {
        Self(Arc::new(Kept {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            stored_at_ms: 0,
            fresh_for_ms: 0,
            unshared: true,
        }))
    }

    /// Whether this is the [`unshared`](Self::unshared) word rather than a response.
    pub(crate) fn is_unshared(&self) -> bool {
        self.0.unshared
    }

    /// How long before `now` it was stored (the `Age` header, in whole seconds).
    fn age(&self, now: Timestamp) -> Duration {
        Timestamp::from_millis(self.0.stored_at_ms).until(now)
    }

    /// What it answers at `now` to a request whose `If-None-Match` is `if_none_match`: `304
    /// Not Modified` if that names its `ETag`, else itself (without the body, for `HEAD`).
    /// `Age` and `label` (the layer's `x-cache` header) are added; a copy past its freshness
    /// (which fail-safe kept, answering for a failed handler or re-armed for the throttle
    /// after one) is labelled `STALE` whatever `label` says.
    pub(crate) fn answer(
        &self,
        if_none_match: &[HeaderValue],
        head: bool,
        (label, now): (HeaderValue, Timestamp),
    ) -> Response<Bytes> {
        let mut headers = self.0.headers.clone();
        let age = self.age(now);
        headers.insert(AGE, HeaderValue::from(age.as_secs()));
        let label = if age > Duration::from_millis(self.0.fresh_for_ms) {
            HeaderValue::from_static("STALE")
        } else {
            label
        };
        headers.insert(crate::X_CACHE, label);
        // A 304 stands only for a success (RFC 9110, 13.2.1): a stored 404 answers as itself.
        let (status, body) =
            if self.0.status.is_success() && not_modified(if_none_match, headers.get(ETAG)) {
                headers = headers_of_304(&headers);
                (StatusCode::NOT_MODIFIED, Bytes::new())
            } else if head {
                // The length of the body a GET would get, not of the empty one sent.
                headers.insert(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from(self.0.body.len()),
                );
                (self.0.status, Bytes::new())
            } else {
                (self.0.status, self.0.body.clone())
            };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}

/// The `If-None-Match` values of a request's headers (usually none: nothing is copied then);
/// none where the request has an `If-Match` or `If-Unmodified-Since`, which come first (RFC
/// 9110, 13.2.2) and which only the handler can judge.
pub(crate) fn if_none_match(request: &HeaderMap) -> Vec<HeaderValue> {
    if crate::policy::has_earlier_preconditions(request) {
        return Vec::new();
    }
    request.get_all(IF_NONE_MATCH).iter().cloned().collect()
}

/// The headers a `304 Not Modified` carries of those of the response it stands for: the
/// validators, the caching headers and those RFC 9110 (15.4.5) names, `Set-Cookie`, and the
/// layer's own; none that describe the body not sent (its length, type, encoding or range).
pub(crate) fn headers_of_304(headers: &HeaderMap) -> HeaderMap {
    const KEPT: [HeaderName; 10] = [
        ETAG,
        CACHE_CONTROL,
        EXPIRES,
        VARY,
        CONTENT_LOCATION,
        DATE,
        LAST_MODIFIED,
        SET_COOKIE,
        AGE,
        crate::X_CACHE,
    ];
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if KEPT.contains(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(if_none_match: &str) -> Vec<HeaderValue> {
        HeaderValue::from_str(if_none_match).into_iter().collect()
    }

    #[test]
    fn etags_name_the_body_and_conditional_requests_compare_weakly() {
        let etag = etag_of(b"hello");
        assert_eq!(etag, etag_of(b"hello"));
        assert_ne!(etag, etag_of(b"hello!"));
        let tag = etag.to_str().unwrap_or_default().to_owned();
        assert!(not_modified(&request(&tag), Some(&etag)));
        assert!(not_modified(&request(&format!("W/{tag}")), Some(&etag)));
        assert!(not_modified(
            &request(&format!("\"other\", {tag}")),
            Some(&etag)
        ));
        assert!(not_modified(&request("*"), Some(&etag)));
        assert!(!not_modified(&request("\"other\""), Some(&etag)));
        assert!(!not_modified(&[], Some(&etag)));
    }

    const MINUTE: Duration = Duration::from_secs(60);
    const NOW: Timestamp = Timestamp::from_millis(1_000_000_000);

    impl Kept {
        fn clone_of(stored: &CachedResponse) -> Self {
            Self {
                status: stored.0.status,
                headers: stored.0.headers.clone(),
                body: stored.0.body.clone(),
                stored_at_ms: stored.0.stored_at_ms,
                fresh_for_ms: stored.0.fresh_for_ms,
                unshared: stored.0.unshared,
            }
        }
    }

    #[test]
    fn per_connection_headers_and_cookies_are_never_stored_or_replayed() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("close, X-Hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let skip = HeaderName::from_static("x-tags");
        let stored =
            CachedResponse::new(StatusCode::OK, &headers, Bytes::new(), &skip, (NOW, MINUTE));
        let answer = stored.answer(&[], false, (HeaderValue::from_static("HIT"), NOW));
        assert!(answer.headers().get("x-hop").is_none());
        assert!(answer.headers().get(CONNECTION).is_none());
        assert!(answer.headers().get("x-kept").is_some());
        // Written to the L2 by another writer with a cookie in it: dropped when read.
        let wire = Wire {
            status: 200,
            headers: vec![
                StoredHeader {
                    name: "set-cookie".into(),
                    value: b"session=victim".to_vec(),
                },
                StoredHeader {
                    name: "x-kept".into(),
                    value: b"1".to_vec(),
                },
            ],
            body: std::borrow::Cow::Borrowed(b"".as_slice()),
            stored_at_ms: 0,
            fresh_for_ms: 0,
        };
        let bytes = serde_json::to_vec(&wire).unwrap_or_default();
        let read: CachedResponse =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| stored.clone());
        assert!(read.0.headers.get(SET_COOKIE).is_none());
        assert!(read.0.headers.get("x-kept").is_some());
    }

    #[test]
    fn a_stored_response_answers_304_head_or_itself() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        headers.insert("x-tags", HeaderValue::from_static("a"));
        let skip = HeaderName::from_static("x-tags");
        let stored = CachedResponse::new(
            StatusCode::OK,
            &headers,
            Bytes::from("body"),
            &skip,
            (NOW, MINUTE),
        );
        let wire = serde_json::to_vec(&stored).unwrap_or_default();
        assert_eq!(
            serde_json::from_slice::<CachedResponse>(&wire).ok(),
            Some(stored.clone())
        );
        let hit = HeaderValue::from_static("HIT");
        let full = stored.answer(&[], false, (hit.clone(), NOW));
        assert_eq!(
            (full.status(), full.body().as_ref()),
            (StatusCode::OK, b"body".as_ref())
        );
        assert!(
            full.headers().get("x-tags").is_none(),
            "the tag header is not stored"
        );
        assert_eq!(full.headers().get(AGE), Some(&HeaderValue::from(0)));
        let etag = full
            .headers()
            .get(ETAG)
            .cloned()
            .unwrap_or_else(|| etag_of(b""));
        let head = stored.answer(&[], true, (hit.clone(), NOW));
        assert!(head.body().is_empty() && head.status() == StatusCode::OK);
        assert_eq!(
            head.headers().get(http::header::CONTENT_LENGTH),
            Some(&HeaderValue::from(4)),
            "HEAD says how long the GET's body is"
        );
        let not_modified = stored.answer(std::slice::from_ref(&etag), false, (hit.clone(), NOW));
        assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
        assert!(not_modified.body().is_empty());
        let kept = not_modified.headers();
        assert_eq!(kept.get(ETAG), Some(&etag));
        assert!(kept.contains_key(AGE) && kept.contains_key(crate::X_CACHE));
        assert!(!kept.contains_key(http::header::CONTENT_TYPE));
        // Only a success stands for a 304.
        let missing = CachedResponse::new(
            StatusCode::NOT_FOUND,
            &headers,
            Bytes::from("none"),
            &skip,
            (NOW, MINUTE),
        );
        let star = HeaderValue::from_static("*");
        let answer = missing.answer(&[star], false, (hit, NOW));
        assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_copy_past_its_freshness_is_labelled_stale_whatever_the_caller_says() {
        let skip = HeaderName::from_static("x-tags");
        let fresh = CachedResponse::new(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::new(),
            &skip,
            (NOW, MINUTE),
        );
        let hit = HeaderValue::from_static("HIT");
        let label = |stored: &CachedResponse| {
            stored.answer(&[], false, (hit.clone(), NOW)).headers()[crate::X_CACHE].clone()
        };
        assert_eq!(label(&fresh), "HIT");
        let mut kept = Kept::clone_of(&fresh);
        kept.stored_at_ms -= 2 * 60_000;
        let stale = CachedResponse(Arc::new(kept));
        assert_eq!(label(&stale), "STALE");
        assert_eq!(
            stale.answer(&[], false, (hit.clone(), NOW)).headers()[AGE],
            "120"
        );
    }
}
