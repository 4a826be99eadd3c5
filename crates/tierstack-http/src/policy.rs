//! What may be cached, and for how long: the `Cache-Control` of requests and responses, `Vary`,
//! cookies, authorization, status codes and body sizes.

use std::time::Duration;

use http::header::{
    AUTHORIZATION, CACHE_CONTROL, COOKIE, IF_MATCH, IF_UNMODIFIED_SINCE, SET_COOKIE, VARY,
};
use http::{HeaderMap, HeaderName, Method, StatusCode};

/// The directives of a `Cache-Control` header this cache acts on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Directives {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
}

impl Directives {
    /// The directives of every `Cache-Control` header in `headers`; unknown ones are ignored,
    /// and a directive whose value does not parse is taken at its strictest (`max-age=x`
    /// as 0).
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut found = Self::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                // Not text: nothing in it can be trusted to allow caching.
                found.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, argument) = match directive.split_once('=') {
                    Some((name, argument)) => {
                        (name.trim(), Some(argument.trim().trim_matches('"')))
                    }
                    None => (directive.trim(), None),
                };
                let seconds = || argument.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => found.no_store = true,
                    "no-cache" => found.no_cache = true,
                    "private" => found.private = true,
                    "max-age" => found.max_age = Some(seconds()),
                    "s-maxage" => found.s_maxage = Some(seconds()),
                    _ => {}
                }
            }
        }
        found
    }
}

/// How a request meets the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Not through the cache at all: another method, `no-store`, credentials or cookies.
    Bypass,
    /// Read the cache, and on a miss run the handler and store what it answers.
    ReadThrough,
    /// `no-cache` or `max-age=0`: run the handler and store what it answers, without
    /// answering from the cache.
    Refresh,
    /// A `HEAD`: answered from a cached `GET` on a hit, else by the handler, not stored.
    Head,
}

/// What the layer's settings say of requests.
#[derive(Debug, Clone, Copy)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent settings, each named for the requests it lets in"
)]
pub(crate) struct RequestRules {
    /// Requests with `Authorization` meet the cache.
    pub(crate) authorized: bool,
    /// Requests with `Cookie` meet the cache.
    pub(crate) with_cookies: bool,
    /// The key holds the `Cookie` header (it is in `vary_on`): requests with one meet the
    /// cache, each cookie apart.
    pub(crate) cookies_vary: bool,
    /// A request's `no-cache` (or `max-age=0`) runs the handler instead of answering from the
    /// cache.
    pub(crate) honor_no_cache: bool,
}

/// Whether a request has preconditions that come before `If-None-Match` (RFC 9110, 13.2.2):
/// `If-Match` or `If-Unmodified-Since`.
pub(crate) fn has_earlier_preconditions(headers: &HeaderMap) -> bool {
    headers.contains_key(IF_MATCH) || headers.contains_key(IF_UNMODIFIED_SINCE)
}

impl RequestRules {
    pub(crate) fn lookup(self, method: &Method, headers: &HeaderMap) -> Lookup {
        let directives = Directives::of(headers);
        let credentials = (headers.contains_key(AUTHORIZATION) && !self.authorized)
            || (headers.contains_key(COOKIE) && !self.with_cookies && !self.cookies_vary);
        // Only the handler can judge those preconditions (a `412`).
        if directives.no_store || credentials || has_earlier_preconditions(headers) {
            return Lookup::Bypass;
        }
        let refresh = self.honor_no_cache && (directives.no_cache || directives.max_age == Some(0));
        match *method {
            Method::GET if refresh => Lookup::Refresh,
            Method::GET => Lookup::ReadThrough,
            Method::HEAD => Lookup::Head,
            _ => Lookup::Bypass,
        }
    }
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    Status,
    Directive,
    Cookie,
    Vary,
    TooLarge,
}

impl NotStored {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Status => "status not cacheable",
            Self::Directive => "no-store, no-cache, private or a zero max-age",
            Self::Cookie => "sets a cookie",
            Self::Vary => "varies on a header the key does not hold",
            Self::TooLarge => "body over the size limit or of unknown size",
        }
    }
}

/// What the layer's settings say of responses.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub(crate) cacheable_status: fn(StatusCode) -> bool,
    pub(crate) vary_on: Vec<HeaderName>,
    pub(crate) max_body: usize,
    pub(crate) default_ttl: Duration,
}

/// The default statuses: successes, except partial content.
pub(crate) fn success_except_partial(status: StatusCode) -> bool {
    status.is_success() && status != StatusCode::PARTIAL_CONTENT
}

impl Rules {
    /// How long a response with `status` and `headers`, whose body is at most `body_upper`
    /// bytes (`None`: unknown), may be stored; or why not.
    pub(crate) fn ttl(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body_upper: Option<u64>,
    ) -> Result<Duration, NotStored> {
        if !(self.cacheable_status)(status) {
            return Err(NotStored::Status);
        }
        if headers.contains_key(SET_COOKIE) {
            return Err(NotStored::Cookie);
        }
        let directives = Directives::of(headers);
        if directives.no_store || directives.no_cache || directives.private {
            return Err(NotStored::Directive);
        }
        for value in headers.get_all(VARY) {
            let Ok(value) = value.to_str() else {
                return Err(NotStored::Vary);
            };
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let known = self
                    .vary_on
                    .iter()
                    .any(|header| header.as_str().eq_ignore_ascii_case(name));
                if name == "*" || !known {
                    return Err(NotStored::Vary);
                }
            }
        }
        let fits = body_upper
            .and_then(|upper| usize::try_from(upper).ok())
            .is_some_and(|upper| upper <= self.max_body);
        if !fits {
            return Err(NotStored::TooLarge);
        }
        match directives.s_maxage.or(directives.max_age) {
            Some(0) => Err(NotStored::Directive),
            Some(seconds) => Ok(Duration::from_secs(seconds)),
            None => Ok(self.default_ttl),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn rules() -> Rules {
        Rules {
            cacheable_status: success_except_partial,
            vary_on: vec![http::header::ACCEPT_LANGUAGE],
            max_body: 100,
            default_ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn requests() {
        let rules = RequestRules {
            authorized: false,
            with_cookies: false,
            cookies_vary: false,
            honor_no_cache: true,
        };
        let get = Method::GET;
        assert_eq!(rules.lookup(&get, &headers(&[])), Lookup::ReadThrough);
        assert_eq!(rules.lookup(&Method::POST, &headers(&[])), Lookup::Bypass);
        assert_eq!(rules.lookup(&Method::HEAD, &headers(&[])), Lookup::Head);
        let no_store = headers(&[("cache-control", "no-store")]);
        assert_eq!(rules.lookup(&get, &no_store), Lookup::Bypass);
        for refresh in ["no-cache", "max-age=0", "Max-Age=0, foo"] {
            let request = headers(&[("cache-control", refresh)]);
            assert_eq!(rules.lookup(&get, &request), Lookup::Refresh, "{refresh}");
            let ignoring = RequestRules {
                honor_no_cache: false,
                ..rules
            };
            assert_eq!(
                ignoring.lookup(&get, &request),
                Lookup::ReadThrough,
                "{refresh}"
            );
        }
        let authorized = headers(&[("authorization", "Bearer x")]);
        assert_eq!(rules.lookup(&get, &authorized), Lookup::Bypass);
        let allowed = RequestRules {
            authorized: true,
            ..rules
        };
        assert_eq!(allowed.lookup(&get, &authorized), Lookup::ReadThrough);
        let cookie = headers(&[("cookie", "session=1")]);
        assert_eq!(rules.lookup(&get, &cookie), Lookup::Bypass);
        assert_eq!(rules.lookup(&Method::HEAD, &cookie), Lookup::Bypass);
        let allowed = RequestRules {
            with_cookies: true,
            ..rules
        };
        assert_eq!(allowed.lookup(&get, &cookie), Lookup::ReadThrough);
        let keyed = RequestRules {
            cookies_vary: true,
            ..rules
        };
        assert_eq!(keyed.lookup(&get, &cookie), Lookup::ReadThrough);
    }

    #[test]
    fn responses() {
        let rules = rules();
        let ok = StatusCode::OK;
        let ttl = |pairs: &[(&'static str, &'static str)], status, body| {
            rules.ttl(status, &headers(pairs), body)
        };
        assert_eq!(ttl(&[], ok, Some(10)), Ok(Duration::from_secs(60)));
        assert_eq!(
            ttl(&[("cache-control", "public, max-age=30")], ok, Some(10)),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=30, s-maxage=5")], ok, Some(10)),
            Ok(Duration::from_secs(5)),
            "a shared cache takes s-maxage"
        );
        for refused in [
            "no-store",
            "no-cache",
            "private",
            "max-age=0",
            "max-age=soon",
        ] {
            assert_eq!(
                ttl(&[("cache-control", refused)], ok, Some(10)),
                Err(NotStored::Directive),
                "{refused}"
            );
        }
        assert_eq!(
            ttl(&[("set-cookie", "a=b")], ok, Some(10)),
            Err(NotStored::Cookie)
        );
        assert_eq!(
            ttl(&[], StatusCode::INTERNAL_SERVER_ERROR, Some(1)),
            Err(NotStored::Status)
        );
        assert_eq!(
            ttl(&[], StatusCode::PARTIAL_CONTENT, Some(1)),
            Err(NotStored::Status)
        );
        assert_eq!(ttl(&[], ok, Some(101)), Err(NotStored::TooLarge));
        assert_eq!(ttl(&[], ok, None), Err(NotStored::TooLarge));
        assert!(ttl(&[("vary", "Accept-Language")], ok, Some(1)).is_ok());
        assert_eq!(
            ttl(&[("vary", "cookie")], ok, Some(1)),
            Err(NotStored::Vary)
        );
        assert_eq!(ttl(&[("vary", "*")], ok, Some(1)), Err(NotStored::Vary));
    }
}
