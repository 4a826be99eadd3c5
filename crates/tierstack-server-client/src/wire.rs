//! The API's encodings: keys in paths, JSON bodies, and the server's answers as results.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use tierstack_core::CacheError;

/// The largest error body read from the server: its errors are a short JSON object.
const MAX_ERROR_BODY: usize = 4096;

/// `key` as one path segment (or query value): every byte outside `[A-Za-z0-9_.~-]`
/// percent-encoded, `/` included.
pub(crate) fn encode_segment(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    out
}

pub(crate) fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// `request` with `body` as its JSON.
pub(crate) fn json(request: RequestBuilder, body: &serde_json::Value) -> RequestBuilder {
    request
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
}

/// A request that got no answer: the server could not be reached, or did not answer in time.
pub(crate) fn transport_error(
    operation: &'static str,
    base: &str,
    error: reqwest::Error,
) -> CacheError {
    if error.is_timeout() {
        return CacheError::Timeout {
            operation,
            after: Duration::ZERO,
        };
    }
    let endpoint = base.trim_start_matches("http://").to_owned();
    // Without the URL: it holds the key, which may be personal data.
    CacheError::Connection {
        endpoint,
        source: Box::new(error.without_url()),
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// The server's refusal as an error: its status, `code` and message.
pub(crate) async fn error_of(operation: &'static str, response: Response) -> CacheError {
    let status = response.status();
    // Host and port, as a transport error names them (base URLs hold no credentials).
    let endpoint = response.url().authority().to_owned();
    let body = read_capped(response).await;
    let detail = serde_json::from_slice::<ErrorBody>(&body).map_or_else(
        |_| format!("HTTP {status}"),
        |body| format!("HTTP {status} {}: {}", body.error.code, body.error.message),
    );
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CacheError::Authentication {
            endpoint,
            source: detail.into(),
        },
        StatusCode::GATEWAY_TIMEOUT => CacheError::Timeout {
            operation,
            after: Duration::ZERO,
        },
        _ => CacheError::Backend {
            operation,
            // The server or its backend failing, or the tenant's rate: later may succeed.
            // A request the server refuses as it is (a size, a quota) will not.
            transient: status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE
                || status == StatusCode::TOO_MANY_REQUESTS,
            source: detail.into(),
        },
    }
}

/// `response`'s body, or an error once it passes `cap` bytes: a server (or whatever answers
/// in its place) cannot make the client allocate without bound.
pub(crate) async fn read_body(
    operation: &'static str,
    base: &str,
    mut response: Response,
    cap: usize,
) -> Result<Bytes, CacheError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| transport_error(operation, base, error))?
    {
        if body.len() + chunk.len() > cap {
            return Err(malformed(
                operation,
                format!("an answer of more than {cap} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// At most [`MAX_ERROR_BODY`] bytes of `response`'s body.
async fn read_capped(mut response: Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    body
}

fn malformed(operation: &'static str, what: impl Into<String>) -> CacheError {
    CacheError::Backend {
        operation,
        transient: false,
        source: what.into().into(),
    }
}

#[derive(Deserialize)]
struct BulkValues {
    values: Vec<BulkValue>,
}

#[derive(Deserialize)]
struct BulkValue {
    value: Option<String>,
}

/// The values of a bulk read of `expected` keys, in order.
pub(crate) async fn bulk_values(
    base: &str,
    response: Response,
    expected: usize,
    max_value_len: usize,
) -> Result<Vec<Option<Bytes>>, CacheError> {
    // Each value in base64 (4 bytes per 3) and its JSON around it.
    let cap = expected.saturating_mul(max_value_len.saturating_mul(4) / 3 + 64);
    let body = read_body("get_many", base, response, cap.saturating_add(64)).await?;
    let values: BulkValues = serde_json::from_slice(&body)
        .map_err(|error| malformed("get_many", format!("not a bulk answer: {error}")))?;
    if values.values.len() != expected {
        return Err(malformed("get_many", "a bulk answer of another length"));
    }
    values
        .values
        .into_iter()
        .map(|found| {
            found
                .value
                .map(|text| {
                    BASE64
                        .decode(text.as_bytes())
                        .map(Bytes::from)
                        .map_err(|_| malformed("get_many", "a value not in base64"))
                })
                .transpose()
        })
        .collect()
}

#[derive(Deserialize)]
struct Deleted {
    deleted: u64,
}

/// The count of a prefix delete's answer.
pub(crate) async fn deleted_count(base: &str, response: Response) -> Result<u64, CacheError> {
    let body = read_body("delete_prefix", base, response, MAX_ERROR_BODY).await?;
    serde_json::from_slice::<Deleted>(&body)
        .map(|deleted| deleted.deleted)
        .map_err(|error| malformed("delete_prefix", format!("not a count: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_path_segment() {
        assert_eq!(encode_segment("user:7/a b"), "user%3A7%2Fa%20b");
        assert_eq!(encode_segment("ü"), "%C3%BC");
        assert_eq!(encode_segment("a-b_c.d~e"), "a-b_c.d~e");
    }
}
