//! API keys: kept as SHA-256 hashes only, looked up by hash, compared in constant time, each
//! mapped to its tenant. Keys come from the configuration (fixed) or from the admin API (kept
//! in the cache's L2, so that every instance sees a new key and a revocation).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tierstack::{EntryOptions, Skips, TieredCache};

use crate::error::ApiError;
use crate::tenant::TenantName;

/// The SHA-256 of an API key: what the server keeps instead of the key. Its `Debug` shows a
/// short fingerprint only.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// The hash of `key`.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// A hash written as 64 hex digits (as in a configuration file).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks(2)) {
            let digit = |c: u8| char::from(c).to_digit(16);
            *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
        }
        Some(Self(bytes))
    }

    /// The 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Equal, in time that does not depend on where the two differ.
    pub fn constant_time_eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

/// A key created through the admin API, as the L2 keeps it (under its hash, and under its id
/// for revocation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeyRecord {
    pub(crate) tenant: String,
    pub(crate) id: String,
    pub(crate) hash: String,
}

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    Tenant(TenantName),
    Admin,
}

/// Every key the server accepts.
pub(crate) struct Keys {
    fixed: HashMap<KeyHash, TenantName>,
    admin: Option<KeyHash>,
    /// Keys created through the admin API; read past L1 at least every `recheck`.
    created: TieredCache<KeyRecord>,
    /// How an unknown key is remembered: in this instance's L1 only (an attacker's random
    /// keys write nothing to the L2), for as long as a created key takes to be seen.
    unknown: EntryOptions,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("fixed", &self.fixed.len())
            .field("admin", &self.admin.is_some())
            .finish_non_exhaustive()
    }
}

/// `bytes` in lowercase hex.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// `bytes` random bytes from the operating system, in hex; an API key's secret part.
fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut random = vec![0u8; bytes];
    getrandom::fill(&mut random)
        .map_err(|_| ApiError::unavailable("the system's random source failed"))?;
    Ok(hex(&random))
}

/// A new API key: `prefix` and 32 random bytes from the operating system, in hex.
///
/// # Errors
///
/// The system's random source failed.
pub fn generate_key(prefix: &str) -> Result<String, ApiError> {
    Ok(format!("{prefix}{}", random_hex(32)?))
}

impl Keys {
    pub(crate) fn new(
        fixed: HashMap<KeyHash, TenantName>,
        admin: Option<KeyHash>,
        created: TieredCache<KeyRecord>,
        recheck: Duration,
    ) -> Self {
        let options = created.default_options();
        let mut skips: Skips = options.skips();
        skips.l2_write = true;
        let unknown = options.with_negative_ttl(recheck).with_skips(skips);
        Self {
            fixed,
            admin,
            created,
            unknown,
        }
    }

    /// The caller of a request with `headers`, or 401.
    pub(crate) async fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty() && key.len() <= 512)
            .ok_or_else(ApiError::unauthorized)?;
        let hash = KeyHash::of(key);
        if self
            .admin
            .is_some_and(|admin| admin.constant_time_eq(&hash))
        {
            return Ok(Caller::Admin);
        }
        if let Some(tenant) = self.fixed.get(&hash) {
            return Ok(Caller::Tenant(tenant.clone()));
        }
        // A created key: found by its hash, which the stored record must name exactly.
        let found = self
            .created
            .get_or_load_optional_with(
                &format!("hash:{}", hash.to_hex()),
                &self.unknown,
                || async { Ok::<_, std::convert::Infallible>(None) },
            )
            .await
            .map_err(|_| ApiError::unavailable("the key registry is not reachable"))?;
        let record = found.map(|fetched| fetched.value);
        match record {
            Some(record)
                if KeyHash::from_hex(&record.hash).is_some_and(|h| h.constant_time_eq(&hash)) =>
            {
                TenantName::new(&record.tenant)
                    .map(Caller::Tenant)
                    .map_err(|_| ApiError::unauthorized())
            }
            _ => Err(ApiError::unauthorized()),
        }
    }

    /// A new key for `tenant`: its id and the key itself (shown once, never kept).
    pub(crate) async fn create(&self, tenant: &TenantName) -> Result<(String, String), ApiError> {
        let key = generate_key("tsk_")?;
        let id = random_hex(8)?;
        let hash = KeyHash::of(&key).to_hex();
        let record = KeyRecord {
            tenant: tenant.as_str().to_owned(),
            id: id.clone(),
            hash: hash.clone(),
        };
        let options = self
            .created
            .default_options()
            .with_ttl(tierstack::core::store::MAX_TTL);
        self.created
            .set_with(&format!("id:{id}"), record.clone(), &options)
            .await?;
        self.created
            .set_with(&format!("hash:{hash}"), record, &options)
            .await?;
        Ok((id, key))
    }

    /// Revokes the created key `id`: every instance refuses it within the recheck interval
    /// (at once with a backplane). `false` if there is no such key.
    pub(crate) async fn revoke(&self, id: &str) -> Result<bool, ApiError> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::not_found("key"));
        }
        let Some(record) = self.created.get(&format!("id:{id}")).await? else {
            return Ok(false);
        };
        self.created
            .delete(&format!("hash:{}", record.hash))
            .await?;
        self.created.delete(&format!("id:{id}")).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_read_back_from_hex_and_never_show_the_key() {
        let hash = KeyHash::of("secret-key");
        assert_eq!(KeyHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(KeyHash::from_hex("xyz"), None);
        assert_eq!(KeyHash::from_hex(&"g".repeat(64)), None);
        assert!(hash.constant_time_eq(&KeyHash::of("secret-key")));
        assert!(!hash.constant_time_eq(&KeyHash::of("secret-kez")));
        let shown = format!("{hash:?}");
        assert!(!shown.contains("secret") && shown.len() < 24, "{shown}");
    }

    #[test]
    fn new_keys_differ() {
        assert_ne!(random_hex(32).ok(), random_hex(32).ok());
        assert_eq!(random_hex(8).map(|id| id.len()), Ok(16));
    }
}
