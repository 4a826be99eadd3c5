//! The key ring that encrypts and decrypts sealed envelopes.
//!
//! A ring holds one *current* key, which encrypts every write, and any number of older keys that
//! still decrypt, each under a numeric id that the envelope records. Rotation is therefore done
//! without a flush: add the new key, make it current, and remove the old one once the entries it
//! wrote have expired (`docs/operations.md`, "Rotating encryption keys").
//!
//! Key bytes are zeroized when they are dropped, and no `Debug`, `Display` or error of this
//! module shows them: the ring prints its ids only.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::xaes::XaesKey;

use crate::error::{CacheError, Result};

/// The length of a key in bytes (XAES-256-GCM takes 256-bit keys).
pub const KEY_LEN: usize = super::xaes::KEY_LEN;

/// The most keys a ring holds: rotation needs two or three, and every key costs a lookup only
/// when an entry names it.
pub const MAX_KEYS: usize = 32;

/// One 256-bit encryption key. Its bytes are zeroized on drop and never printed.
#[derive(Clone)]
pub struct EncryptionKey(Zeroizing<[u8; KEY_LEN]>);

impl EncryptionKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A key from 64 hexadecimal digits (as `openssl rand -hex 32` prints them). The error
    /// says what is wrong without repeating the input.
    pub fn from_hex(hex: &str) -> Result<Self> {
        parse_hex(hex).map_err(CacheError::Configuration)
    }
}

/// The key in `hex`, or what is wrong with it (never the input itself).
fn parse_hex(hex: &str) -> std::result::Result<EncryptionKey, String> {
    let hex = hex.trim().as_bytes();
    if hex.len() != KEY_LEN * 2 {
        return Err(format!(
            "an encryption key must be {} hexadecimal digits, not {}",
            KEY_LEN * 2,
            hex.len()
        ));
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
        let (Some(high), Some(low)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
            return Err(
                "an encryption key holds a character that is not a hexadecimal digit".into(),
            );
        };
        *byte = high << 4 | low;
    }
    Ok(EncryptionKey(bytes))
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The keys of a cache's encryption: the current one encrypts, all of them decrypt.
///
/// Cloning shares the keys. `Debug` shows the ids, never the keys.
#[derive(Clone)]
pub struct KeyRing {
    current: u32,
    /// Every key with its id, the current one first. Each zeroizes its key material when dropped.
    keys: Arc<[(u32, Arc<XaesKey>)]>,
}

impl KeyRing {
    /// A ring whose current key is `key` under `id`.
    pub fn new(id: u32, key: &EncryptionKey) -> Self {
        Self {
            current: id,
            keys: Arc::from([(id, cipher(key))]),
        }
    }

    /// This ring with `key` under `id` as an older key: it decrypts what it wrote, and encrypts
    /// nothing. Fails if `id` is taken or the ring is full ([`MAX_KEYS`]).
    pub fn with_old_key(self, id: u32, key: &EncryptionKey) -> Result<Self> {
        if self.keys.iter().any(|(taken, _)| *taken == id) {
            return Err(CacheError::Configuration(format!(
                "encryption key id {id} appears twice in the key ring"
            )));
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(CacheError::Configuration(format!(
                "a key ring holds at most {MAX_KEYS} keys"
            )));
        }
        let mut keys = self.keys.to_vec();
        keys.push((id, cipher(key)));
        Ok(Self {
            current: self.current,
            keys: Arc::from(keys),
        })
    }

    /// Parses a ring from text: entries `ID:HEX` (a decimal id, a colon and 64 hexadecimal
    /// digits), separated by commas, spaces or new lines; a `#` starts a comment that runs to
    /// the end of its line. The first entry is the current key, the others only decrypt.
    ///
    /// Errors name the entry by its position and never repeat key material.
    pub fn parse(text: &str) -> Result<Self> {
        let entries = text
            .lines()
            .map(|line| {
                line.split_once('#')
                    .map_or(line, |(entries, _comment)| entries)
            })
            .flat_map(|line| line.split(|c: char| c == ',' || c.is_whitespace()))
            .filter(|entry| !entry.is_empty());
        let mut ring: Option<Self> = None;
        for (position, entry) in entries.enumerate() {
            let number = position + 1;
            let Some((id, hex)) = entry.split_once(':') else {
                return Err(CacheError::Configuration(format!(
                    "key ring entry {number} is not of the form ID:HEX"
                )));
            };
            let id: u32 = id.parse().map_err(|_| {
                CacheError::Configuration(format!(
                    "key ring entry {number}: the id is not a number from 0 to {}",
                    u32::MAX
                ))
            })?;
            let key = parse_hex(hex).map_err(|problem| {
                CacheError::Configuration(format!("key ring entry {number} (id {id}): {problem}"))
            })?;
            ring = Some(match ring {
                None => Self::new(id, &key),
                Some(ring) => ring.with_old_key(id, &key)?,
            });
        }
        ring.ok_or_else(|| CacheError::Configuration("the key ring holds no key".into()))
    }

    /// [`parse`](Self::parse)s the ring in the environment variable `name`.
    pub fn from_env(name: &str) -> Result<Self> {
        let text = Zeroizing::new(std::env::var(name).map_err(|_| {
            CacheError::Configuration(format!(
                "the environment variable {name} holding the key ring is not set or not UTF-8"
            ))
        })?);
        Self::parse(&text)
    }

    /// [`parse`](Self::parse)s the ring in the file at `path` (for example a mounted secret).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|err| {
            CacheError::Configuration(format!(
                "cannot read the key ring file {}: {}",
                path.display(),
                err.kind()
            ))
        })?);
        Self::parse(&text)
    }

    /// The id of the key that encrypts.
    pub fn current_id(&self) -> u32 {
        self.current
    }

    /// The ids of every key, the current one first.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }

    /// The cipher of the current key.
    pub(crate) fn current(&self) -> &XaesKey {
        &self.keys[0].1
    }

    /// The cipher of the key `id`, if the ring holds it.
    pub(crate) fn get(&self, id: u32) -> Option<&XaesKey> {
        self.keys
            .iter()
            .find_map(|(held, cipher)| (*held == id).then_some(&**cipher))
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current)
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn cipher(key: &EncryptionKey) -> Arc<XaesKey> {
    Arc::new(XaesKey::new(&key.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const HEX_2: &str = "F0F1F2F3F4F5F6F7F8F9FAFBFCFDFEFFE0E1E2E3E4E5E6E7E8E9EAEBECEDEEEF";

    #[test]
    fn the_first_entry_is_current_and_every_key_is_held() {
        let ring = KeyRing::parse(&format!("# rotated\n2:{HEX_2}  # current\n1:{HEX_1}\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ring.current_id(), 2);
        assert_eq!(ring.ids().collect::<Vec<_>>(), [2, 1]);
        assert!(ring.get(1).is_some() && ring.get(2).is_some() && ring.get(3).is_none());
        let inline =
            KeyRing::parse(&format!("7:{HEX_1}, 3:{HEX_2}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inline.ids().collect::<Vec<_>>(), [7, 3]);
    }

    #[test]
    fn bad_rings_are_refused_without_repeating_key_material() {
        let secretish = "deadbeef".repeat(7);
        for (text, expected) in [
            (String::new(), "holds no key"),
            ("# only a comment".to_owned(), "holds no key"),
            (format!("1:{HEX_1},1:{HEX_2}"), "appears twice"),
            (format!("x:{HEX_1}"), "entry 1: the id is not a number"),
            (format!("1:{HEX_1} 2:{secretish}"), "entry 2 (id 2)"),
            (format!("1:{}zz", &HEX_1[..62]), "not a hexadecimal digit"),
            (HEX_1.to_owned(), "not of the form ID:HEX"),
        ] {
            let err = KeyRing::parse(&text).map(|_| ()).expect_err(&text);
            let shown = format!("{err} {err:?}");
            assert!(shown.contains(expected), "{shown}");
            assert!(
                !shown.contains(&secretish) && !shown.contains(HEX_1),
                "{shown}"
            );
        }
        let full = (0..=MAX_KEYS)
            .map(|id| format!("{id}:{HEX_1}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(KeyRing::parse(&full).is_err());
    }

    #[test]
    fn debug_shows_ids_and_never_keys() {
        let key = EncryptionKey::from_hex(HEX_2).unwrap_or_else(|e| panic!("{e}"));
        let ring = KeyRing::new(4, &key);
        let shown = format!("{ring:?} {key:?}");
        assert_eq!(
            shown,
            "KeyRing { current: 4, ids: [4], .. } EncryptionKey(<redacted>)"
        );
    }

    #[test]
    fn a_missing_file_or_variable_is_a_configuration_error() {
        assert!(matches!(
            KeyRing::from_file("/nonexistent/tierstack/keys"),
            Err(CacheError::Configuration(_))
        ));
        assert!(matches!(
            KeyRing::from_env("TIERSTACK_TEST_UNSET_KEY_RING_VARIABLE"),
            Err(CacheError::Configuration(_))
        ));
    }
}
