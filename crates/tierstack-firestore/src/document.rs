//! The layout of a cache entry in Firestore, and its document id.

use std::time::{Duration, SystemTime};

use firestore::FirestoreTimestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tierstack_core::clock::Timestamp;

/// One cache entry as written: one document per key.
///
/// `expires_at` is a native Firestore timestamp: the field to name in a TTL policy. Firestore's
/// TTL deletion runs up to a day late, so every read compares it with the clock itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CacheDocument {
    /// The full (prefixed) key, compared on read: a document whose key differs is a miss.
    pub(crate) key: String,
    /// The stored bytes (a Firestore bytes value, not an array of integers).
    #[serde(with = "serde_bytes")]
    pub(crate) value: Vec<u8>,
    pub(crate) created_at: SystemTime,
    pub(crate) expires_at: SystemTime,
    pub(crate) last_accessed: SystemTime,
}

impl CacheDocument {
    /// The document of `key` holding `value`, written at `now` and living `ttl`.
    pub(crate) fn new(key: &str, value: &[u8], now: Timestamp, ttl: Duration) -> Self {
        let written = now.to_system_time();
        Self {
            key: key.to_owned(),
            value: value.to_vec(),
            created_at: written,
            expires_at: now.saturating_add(ttl).to_system_time(),
            last_accessed: written,
        }
    }
}

/// One cache entry as read, with Firestore's own update time (for conditional writes).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct StoredDocument {
    pub(crate) key: String,
    #[serde(with = "serde_bytes")]
    pub(crate) value: Vec<u8>,
    pub(crate) expires_at: SystemTime,
    #[serde(default, alias = "_firestore_updated")]
    pub(crate) update_time: Option<FirestoreTimestamp>,
}

/// One cache entry as a plain read needs it: no update time, one field less to decode on the
/// hottest path.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ValueDocument {
    pub(crate) key: String,
    #[serde(with = "serde_bytes")]
    pub(crate) value: Vec<u8>,
    pub(crate) expires_at: SystemTime,
}

/// A document as read: the stored key (compared with the key asked for) and the expiry.
pub(crate) trait ReadDocument: for<'de> Deserialize<'de> + Send + Sync + 'static {
    fn key(&self) -> &str;
    fn expires_at(&self) -> SystemTime;
}

impl ReadDocument for StoredDocument {
    fn key(&self) -> &str {
        &self.key
    }

    fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

impl ReadDocument for ValueDocument {
    fn key(&self) -> &str {
        &self.key
    }

    fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

/// The fields `expire` rewrites.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ExpiryFields {
    pub(crate) expires_at: SystemTime,
    pub(crate) last_accessed: SystemTime,
}

/// The document id of a key: the hex SHA-256 of the full key. Firestore forbids `/`, `.`, `..`,
/// `__x__` and ids over 1,500 bytes; a hash has none of these, and sequential keys do not
/// hot-spot one range of the index.
pub(crate) fn document_id(key: &str) -> String {
    // Every read computes one: a table beats `write!("{:02x}")`, which cost more than the hash.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(key.as_bytes());
    let mut id = String::with_capacity(2 * digest.len());
    for byte in digest {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

/// The smallest string greater than every string that starts with `prefix` (by code point,
/// which is Firestore's UTF-8 byte order), or `None` when there is no such string.
pub(crate) fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = u32::from(last) + 1;
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(next) = char::from_u32(next) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex_characters_and_distinct() {
        let id = document_id("../__reserved__/.");
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(document_id("a"), document_id("b"));
        assert_eq!(document_id(&"k".repeat(10_000)).len(), 64);
        // Ids are where existing data lives: the scheme must never change (SHA-256 of "abc").
        assert_eq!(
            document_id("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn prefix_successors_bound_exactly_the_prefixed_keys() {
        assert_eq!(prefix_successor("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_successor("\u{10FFFF}"), None);
        let end = prefix_successor("user:").unwrap();
        for inside in ["user:", "user:1", "user:\u{10FFFF}x"] {
            assert!(inside >= "user:" && inside < end.as_str(), "{inside:?}");
        }
        for outside in ["user;", "users", "user"] {
            assert!(
                !(outside >= "user:" && outside < end.as_str()),
                "{outside:?}"
            );
        }
    }
}
