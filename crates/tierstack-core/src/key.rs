//! Key validation, namespacing and escaping.
//!
//! A cache's keys live under its namespace: the L2 key is `namespace:key`. A namespace may only
//! hold `[A-Za-z0-9_.-]`, so it ends at the first `:` and no user key can spell another
//! namespace's key. Where one key is built from several user-supplied parts (a tenant and an id),
//! [`compose_key`] escapes each part so that `("a:b", "c")` and `("a", "b:c")` stay distinct.

use std::fmt;

use crate::error::{CacheError, KeyProblem, Result};

/// The default maximum key length of a store, in bytes. Stores that hash keys (Firestore) accept
/// long keys; the limit exists so that no caller can make a store hold megabyte keys.
pub const DEFAULT_MAX_STORE_KEY_LEN: usize = 64 * 1024;

/// Checks that `key` is non-empty and at most `max_len` bytes.
pub fn validate_key(key: &str, max_len: usize) -> Result<()> {
    if key.is_empty() {
        return Err(CacheError::InvalidKey {
            reason: KeyProblem::Empty,
        });
    }
    if key.len() > max_len {
        return Err(CacheError::InvalidKey {
            reason: KeyProblem::TooLong {
                len: key.len(),
                max: max_len,
            },
        });
    }
    Ok(())
}

/// A validated cache namespace: non-empty, at most 128 bytes of `[A-Za-z0-9_.-]`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace(Box<str>);

impl Namespace {
    /// The longest namespace accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates `name` as a namespace.
    pub fn new(name: &str) -> Result<Self> {
        validate_key(name, Self::MAX_LEN)?;
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(CacheError::InvalidKey {
                reason: KeyProblem::BadNamespaceChar,
            });
        }
        Ok(Self(name.into()))
    }

    /// The namespace as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The store key of `key` in this namespace: `namespace:key`.
    pub fn store_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.0.len() + 1 + key.len());
        out.push_str(&self.0);
        out.push(':');
        out.push_str(key);
        out
    }

    /// The user key of a store key of this namespace, or `None` for another namespace's key.
    pub fn user_key<'a>(&self, store_key: &'a str) -> Option<&'a str> {
        store_key
            .strip_prefix(&*self.0)
            .and_then(|rest| rest.strip_prefix(':'))
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Namespace").field(&&*self.0).finish()
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Joins user-supplied parts into one key, escaping `%` and `:` in each part (as `%25` and `%3A`)
/// so that parts can never run into each other.
///
/// Escaping preserves prefixes: the key of `["tenant-1", ""]` minus its empty tail is a prefix of
/// every key of tenant 1, so `delete_prefix(&compose_key(&["tenant-1", ""]))` removes exactly
/// that tenant's keys.
///
/// ```
/// use tierstack_core::key::compose_key;
/// assert_eq!(compose_key(&["user", "a:b"]), "user:a%3Ab");
/// assert_ne!(compose_key(&["a:b", "c"]), compose_key(&["a", "b:c"]));
/// ```
pub fn compose_key(parts: &[&str]) -> String {
    let mut out = String::new();
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            out.push(':');
        }
        push_key_part(&mut out, part, ":");
    }
    out
}

/// Appends `part` to `key`, escaping `%` and every character of `reserved` as `%` and the
/// hex of its UTF-8 bytes, so that a part can never pass for the separators around it: with
/// the first character of each separator of a key's template in `reserved`, and no `%` in the
/// template's own text (a `%` there could read as a part's escape), two different lists of
/// parts always give two different keys. [`compose_key`] calls it with `:` as the only
/// separator; `#[cached]` with every ASCII punctuation and whitespace character.
///
/// ```
/// use tierstack_core::key::push_key_part;
/// let mut key = String::from("search/");
/// push_key_part(&mut key, "shoes/red 100%", "/");
/// assert_eq!(key, "search/shoes%2Fred 100%25");
/// ```
pub fn push_key_part(key: &mut String, part: &str, reserved: &str) {
    for ch in part.chars() {
        if ch == '%' || reserved.contains(ch) {
            let mut utf8 = [0; 4];
            for byte in ch.encode_utf8(&mut utf8).bytes() {
                key.push('%');
                key.push(char::from(HEX[usize::from(byte >> 4)]));
                key.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        } else {
            key.push(ch);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A short, stable fingerprint of a key for logs and traces, which must never show raw keys
/// (they often hold user ids or emails). FNV-1a, 64 bits, in hex.
///
/// It hides a key from a reader of the logs, not from someone who guesses it: the hash is
/// unkeyed, so a key from a small space (a numeric id, a known email) is found again by
/// fingerprinting every candidate.
pub fn fingerprint(key: &str) -> KeyFingerprint {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    KeyFingerprint(hash)
}

/// The fingerprint of a key; prints as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(u64);

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_length_and_emptiness() {
        assert!(matches!(
            validate_key("", 10),
            Err(CacheError::InvalidKey {
                reason: KeyProblem::Empty
            })
        ));
        assert!(matches!(
            validate_key("abcdefghijk", 10),
            Err(CacheError::InvalidKey {
                reason: KeyProblem::TooLong { len: 11, max: 10 }
            })
        ));
        assert!(validate_key("ü", 2).is_ok());
    }

    #[test]
    fn namespaces_reject_separators() {
        assert!(Namespace::new("users.v2").is_ok());
        for bad in ["", "a:b", "a b", "a*", "ü"] {
            assert!(Namespace::new(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn store_keys_cannot_cross_namespaces() {
        let users = Namespace::new("users").unwrap_or_else(|e| panic!("{e}"));
        let admin = Namespace::new("users-admin").unwrap_or_else(|e| panic!("{e}"));
        let key = users.store_key("x:y");
        assert_eq!(key, "users:x:y");
        assert_eq!(users.user_key(&key), Some("x:y"));
        assert_eq!(admin.user_key(&key), None);
        assert_eq!(users.user_key(&admin.store_key("1")), None);
    }

    #[test]
    fn composed_keys_are_unambiguous_and_prefix_preserving() {
        assert_ne!(compose_key(&["a:b", "c"]), compose_key(&["a", "b:c"]));
        assert_ne!(compose_key(&["a%3Ab"]), compose_key(&["a:b"]));
        let tenant = compose_key(&["t1", ""]);
        assert!(compose_key(&["t1", "x:y"]).starts_with(&tenant));
        assert!(!compose_key(&["t10", "x"]).starts_with(&tenant));
    }

    #[test]
    fn fingerprints_are_stable_hex() {
        assert_eq!(fingerprint("a").to_string(), "af63dc4c8601ec8c");
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}
