//! The API's errors: an HTTP status and a JSON body with a stable `code`, a message for people,
//! and never a secret or a stored value.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tierstack::CacheError;

/// An error the API answers with: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Its stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// 401: no API key, or one that is not (or no longer) valid.
    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
        )
    }

    /// 403: a tenant's key on an admin route.
    pub(crate) fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route needs the admin credential",
        )
    }

    /// 403: the admin credential on a tenant's route (it has no namespace of its own).
    pub(crate) fn forbidden_for_admin() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin credential has no entries of its own: use a tenant's key",
        )
    }

    /// 400 with `code` for a request the API cannot take.
    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404: no such entry (or tenant, key id).
    pub(crate) fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    /// 413: a body, value or batch over its limit.
    pub(crate) fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    /// 412: a conditional write whose condition did not hold.
    pub(crate) fn precondition_failed() -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            "the key does not hold what the write asked for",
        )
    }

    /// 409: the request conflicts with one still running.
    pub(crate) fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 507: the write would take the tenant past its quota of entries or bytes.
    pub(crate) fn over_quota(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", message)
    }

    /// 429: the tenant's rate limit; retry after `retry_after`.
    pub(crate) fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "the tenant's request rate is over its limit",
            )
        }
    }

    /// 503: the backend failed or timed out.
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 504: the request ran past the server's timeout.
    pub(crate) fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request ran past the server's timeout",
        )
    }
}

impl From<CacheError> for ApiError {
    /// A cache error as the API says it: bad input is the caller's (400, 413), the rest the
    /// backend's (503). The message is the error's own, which holds no value and no secret.
    fn from(error: CacheError) -> Self {
        match &error {
            CacheError::InvalidKey { .. } => Self::bad_request("invalid_key", error.to_string()),
            CacheError::InvalidTtl { .. } => Self::bad_request("invalid_ttl", error.to_string()),
            CacheError::ValueTooLarge { .. } => {
                Self::too_large("value_too_large", error.to_string())
            }
            _ => Self::unavailable(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}
