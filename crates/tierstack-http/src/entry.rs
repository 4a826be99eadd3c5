//! A response as the cache stores it, its `ETag`, and what it answers to a request (the response,
//! its headers alone for `HEAD`, or `304 Not Modified`).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AGE, ETAG, IF_NONE_MATCH};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stored response: status, headers (the `ETag` among them), body, and when it was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedResponse {
    status: u16,
    headers: Vec<StoredHeader>,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    stored_at_ms: u64,
}

/// One header of a stored response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredHeader {
    name: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
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

/// A strong `ETag` of `body`: the first 16 bytes of its SHA-256, in hex.
pub(crate) fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let mut tag = String::with_capacity(34);
    tag.push('"');
    for byte in &digest[..16] {
        let _ = write!(tag, "{byte:02x}");
    }
    tag.push('"');
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Whether `If-None-Match` in `request` names `etag` (or is `*`). Weak comparison, as RFC 9110
/// asks of `If-None-Match`: `W/"x"` matches `"x"`.
pub(crate) fn not_modified(request: &HeaderMap, etag: Option<&HeaderValue>) -> bool {
    let Some(etag) = etag.and_then(|etag| etag.to_str().ok()) else {
        return false;
    };
    let bare = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    request.get_all(IF_NONE_MATCH).iter().any(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',')
                .any(|candidate| candidate.trim() == "*" || bare(candidate) == bare(etag))
        })
    })
}

impl CachedResponse {
    /// A response to store, with `etag` among its headers (the handler's own, else one of
    /// its body) and the headers the layer removes (`hop`: its tag header) left out.
    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        skip: &HeaderName,
    ) -> Self {
        let mut stored: Vec<StoredHeader> = headers
            .iter()
            .filter(|(name, _)| *name != skip && *name != AGE && !hop_by_hop(name))
            .map(|(name, value)| StoredHeader {
                name: name.as_str().to_owned(),
                value: value.as_bytes().to_vec(),
            })
            .collect();
        if !headers.contains_key(ETAG) {
            stored.push(StoredHeader {
                name: ETAG.as_str().to_owned(),
                value: etag_of(body).as_bytes().to_vec(),
            });
        }
        Self {
            status: status.as_u16(),
            headers: stored,
            body: body.to_vec(),
            stored_at_ms: now_ms(),
        }
    }

    /// The stored headers, skipping any that no longer parse.
    pub(crate) fn headers(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.headers.len());
        for StoredHeader { name, value } in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// How long ago it was stored, in whole seconds (the `Age` header).
    fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.stored_at_ms))
    }

    /// What it answers to a request with `request` headers: `304 Not Modified` if the
    /// request's `If-None-Match` names its `ETag`, else itself (without the body, for `HEAD`).
    /// `Age` and `hit` (the layer's `x-cache` header) are added.
    pub(crate) fn answer(
        self,
        request: &HeaderMap,
        head: bool,
        hit: HeaderValue,
    ) -> Response<Bytes> {
        let mut headers = self.headers();
        headers.insert(AGE, HeaderValue::from(self.age().as_secs()));
        headers.insert(crate::X_CACHE, hit);
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let (status, body) = if not_modified(request, headers.get(ETAG)) {
            // A 304 carries the validators and caching headers, not the representation's.
            headers.remove(http::header::CONTENT_LENGTH);
            headers.remove(http::header::CONTENT_TYPE);
            (StatusCode::NOT_MODIFIED, Bytes::new())
        } else if head {
            (status, Bytes::new())
        } else {
            (status, Bytes::from(self.body))
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(if_none_match: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(if_none_match) {
            map.insert(IF_NONE_MATCH, value);
        }
        map
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
        assert!(!not_modified(&HeaderMap::new(), Some(&etag)));
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
        let stored = CachedResponse::new(StatusCode::OK, &headers, b"body", &skip);
        let hit = HeaderValue::from_static("HIT");
        let full = stored.clone().answer(&HeaderMap::new(), false, hit.clone());
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
        let head = stored.clone().answer(&HeaderMap::new(), true, hit.clone());
        assert!(head.body().is_empty() && head.status() == StatusCode::OK);
        let mut conditional = HeaderMap::new();
        conditional.insert(IF_NONE_MATCH, etag);
        let not_modified = stored.answer(&conditional, false, hit);
        assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
        assert!(not_modified.body().is_empty());
    }
}
