//! The cache key of a request: its path and query, then a hash of where it was addressed and
//! of the headers the cache varies on.

use http::header::{FORWARDED, HOST};
use http::{HeaderName, Request};
use sha2::{Digest, Sha256};

use crate::entry;

/// The request headers that say where a request was addressed (host, scheme, port, path
/// prefix): each is in the key, whether or not the cache varies on it. A handler that builds
/// links reads one of them, and which one is its own business.
pub(crate) const ADDRESSED_TO: [HeaderName; 8] = [
    HOST,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-original-host"),
];

/// The `Forwarded` parameters that say where a request was addressed. `for` and `by` name
/// the client and the proxy: in the key, they would give every client entries of its own.
const FORWARDED_ADDRESS: [&str; 2] = ["host", "proto"];

/// The key of `request`, varying on the headers of `vary_on` as well as where it was
/// addressed. Prefix invalidation works on the path, for every host.
///
/// One host's answer must never go to another's request: a request whose absolute-form URI
/// names one host and whose `Host` names another gets an entry of its own, and cannot poison
/// either's.
pub(crate) fn of<B>(request: &Request<B>, vary_on: &[HeaderName]) -> String {
    let uri = request.uri();
    let mut key = uri.path().to_owned();
    if let Some(query) = uri.query() {
        key.push('?');
        key.push_str(query);
    }
    let mut varying = Sha256::new();
    let mut any = false;
    let mut add = |name: &[u8], value: &[u8]| {
        any = true;
        // Lengths first: no name or value can run into the next.
        varying.update((name.len() as u64).to_le_bytes());
        varying.update(name);
        varying.update((value.len() as u64).to_le_bytes());
        varying.update(value);
    };
    if let Some(scheme) = uri.scheme() {
        add(b":scheme", scheme.as_str().as_bytes());
    }
    // An HTTP/2 request names its host in the URI's authority, an HTTP/1 request in `Host`:
    // the same host is the same key over both. A `Host` that names another host than the
    // authority is in the key as well.
    let authority = uri
        .authority()
        .map(|authority| authority.as_str().as_bytes());
    if let Some(authority) = authority {
        add(HOST.as_str().as_bytes(), authority);
    }
    // Read twice: as RFC 7239 says (quotes hold `,` and `;`), and as the common extractors
    // do (split at every `,` and `;`, quotes trimmed). A handler reads it one way or the
    // other, so each way's host and proto are in the key: `for="x;host=evil"` is no host to
    // the first and `evil` to the second.
    for value in request.headers().get_all(FORWARDED) {
        let value = value.as_bytes();
        let parsed = forwarded_pairs(value).map(|pair| (b"forwarded;" as &[u8], pair));
        let naive = naive_forwarded_pairs(value).map(|pair| (b"forwarded-naive;" as &[u8], pair));
        for (reading, (name, value)) in parsed.chain(naive) {
            if let Some(wanted) = FORWARDED_ADDRESS
                .iter()
                .find(|wanted| name.eq_ignore_ascii_case(wanted.as_bytes()))
            {
                // The parameter's name in lower case: `Host=` and `host=` say the same.
                add(&[reading, wanted.as_bytes()].concat(), value);
            }
        }
    }
    // A `vary_on` naming `forwarded` keeps all of it, `for` included, as asked.
    for name in ADDRESSED_TO.iter().chain(vary_on) {
        for value in request.headers().get_all(name) {
            if name == HOST && Some(value.as_bytes()) == authority {
                continue;
            }
            add(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if any {
        key.push('#');
        entry::push_hex(&mut key, &varying.finalize()[..16]);
    }
    key
}

/// The `name=value` pairs of a `Forwarded` header's value (RFC 7239), in order, over every
/// element: split at `,` and `;` outside quoted strings, names and values trimmed, a value's
/// quotes kept (two spellings of one host then get two entries, which is safe; one spelling
/// never gets another's).
fn forwarded_pairs(value: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = value;
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let mut quoted = false;
            let mut escaped = false;
            let end = rest
                .iter()
                .position(|&byte| {
                    if escaped {
                        escaped = false;
                    } else if quoted && byte == b'\\' {
                        escaped = true;
                    } else if byte == b'"' {
                        quoted = !quoted;
                    } else if !quoted && (byte == b',' || byte == b';') {
                        return true;
                    }
                    false
                })
                .unwrap_or(rest.len());
            let pair = &rest[..end];
            // Past the separator; at the end of the value (no separator), nothing is left.
            rest = rest.get(end + 1..).unwrap_or_default();
            if let Some(equals) = pair.iter().position(|&byte| byte == b'=') {
                return Some((pair[..equals].trim_ascii(), pair[equals + 1..].trim_ascii()));
            }
        }
        None
    })
}

/// The `name=value` pairs of a `Forwarded` value read as the common extractors read it:
/// split at every `,` and `;`, quotes around a value trimmed.
fn naive_forwarded_pairs(value: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    value
        .split(|&byte| byte == b',' || byte == b';')
        .filter_map(|pair| {
            let equals = pair.iter().position(|&byte| byte == b'=')?;
            let value = pair[equals + 1..].trim_ascii();
            let value = value.strip_prefix(b"\"").unwrap_or(value);
            let value = value.strip_suffix(b"\"").unwrap_or(value);
            Some((pair[..equals].trim_ascii(), value))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(headers: &[(&str, &str)]) -> String {
        let mut request = Request::get("/a?b=1");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        of(&request.body(()).unwrap(), &[])
    }

    #[test]
    fn forwarded_pairs_split_outside_quotes() {
        let pairs: Vec<_> =
            forwarded_pairs(br#"for="[2001:db8::1]:4711";host="a,b;c", proto=https;by=x"#)
                .map(|(n, v)| {
                    (
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect();
        assert_eq!(
            pairs,
            [
                ("for".into(), r#""[2001:db8::1]:4711""#.into()),
                ("host".into(), r#""a,b;c""#.into()),
                ("proto".into(), "https".into()),
                ("by".into(), "x".into()),
            ]
        );
        assert_eq!(forwarded_pairs(b"junk;;, =").count(), 1);
    }

    #[test]
    fn the_key_varies_on_where_a_request_was_addressed_not_on_who_sent_it() {
        let plain = key(&[]);
        assert_eq!(plain, "/a?b=1");
        let host = key(&[("forwarded", "host=a.example")]);
        assert_ne!(host, plain);
        assert_eq!(key(&[("forwarded", "for=1.2.3.4;host=a.example")]), host);
        assert_eq!(key(&[("forwarded", "for=5.6.7.8; Host=a.example")]), host);
        assert_eq!(key(&[("forwarded", "for=1.2.3.4")]), plain);
        assert_ne!(key(&[("forwarded", "host=b.example")]), host);
        assert_ne!(key(&[("forwarded", "proto=https")]), plain);
        // A host that only a reader blind to quotes sees is in the key too.
        for hidden in [
            r#"for="x;host=evil.example""#,
            r#"for="x;host=evil.example"#,
            r#"for="a\";host=evil;x=\"""#,
        ] {
            assert_ne!(key(&[("forwarded", hidden)]), plain, "{hidden}");
        }
        // A quoted client address (IPv6 is always quoted) keeps clients together.
        assert_eq!(
            key(&[("forwarded", r#"for="[2001:db8::1]:4711";host=a.example"#)]),
            host
        );
        for name in ADDRESSED_TO {
            assert_ne!(key(&[(name.as_str(), "x")]), plain, "{name}");
        }
        assert_eq!(key(&[("x-forwarded-for", "1.2.3.4")]), plain);
        assert_ne!(
            key(&[("x-forwarded-host", "a"), ("x-forwarded-port", "1")]),
            key(&[("x-forwarded-host", "a1")]),
        );
    }

    #[test]
    fn a_host_named_twice_alike_is_one_key() {
        let request = |uri: &str, host: Option<&str>| {
            let mut request = Request::get(uri);
            if let Some(host) = host {
                request = request.header(HOST, host);
            }
            of(&request.body(()).unwrap(), &[])
        };
        // HTTP/2: the authority, with or without `Host`.
        let http_2 = request("https://a.example/a", None);
        assert_eq!(request("https://a.example/a", Some("a.example")), http_2);
        assert_ne!(request("https://a.example/a", Some("b.example")), http_2);
        assert_ne!(
            request("http://a.example/a", None),
            http_2,
            "the scheme is in the key"
        );
        // HTTP/1 in absolute form is the same key as HTTP/2; in origin form (no scheme) it
        // is another.
        assert_ne!(request("/a", Some("a.example")), http_2);
    }
}
