//! The server's configuration: from the environment, and from an optional JSON file that
//! lists tenants with their keys' hashes and limits.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::KeyHash;
use crate::tenant::{Limits, TenantName};

/// A tenant as the configuration file names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's name (its namespace).
    pub name: TenantName,
    /// The SHA-256 (64 hex digits) of each API key of the tenant: the file holds no key.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// Its limits, if not the server's defaults.
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// The configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    tenants: Vec<TenantConfig>,
    #[serde(default)]
    limits: Option<Limits>,
    #[serde(default)]
    admin_key_sha256: Option<String>,
}

/// Everything the server needs besides its backend (which `tierstack::StoreConfig` reads).
#[derive(Clone)]
pub struct ServerConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Tenants' fixed keys: hash → tenant.
    pub keys: HashMap<KeyHash, TenantName>,
    /// The admin credential's hash, if any (without one, the admin routes answer 403).
    pub admin: Option<KeyHash>,
    /// The limits of tenants the configuration does not name otherwise.
    pub default_limits: Limits,
    /// Limits by tenant.
    pub limits: HashMap<TenantName, Limits>,
    /// How long a request may run.
    pub request_timeout: Duration,
    /// How long an instance may keep accepting a revoked key (without a backplane) or
    /// refusing a new one.
    pub key_recheck: Duration,
}

impl fmt::Debug for ServerConfig {
    /// Counts, never keys or hashes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("keys", &self.keys.len())
            .field("admin", &self.admin.is_some())
            .field("default_limits", &self.default_limits)
            .field("tenants_with_limits", &self.limits.len())
            .field("request_timeout", &self.request_timeout)
            .field("key_recheck", &self.key_recheck)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            keys: HashMap::new(),
            admin: None,
            default_limits: Limits::default(),
            limits: HashMap::new(),
            request_timeout: Duration::from_secs(10),
            key_recheck: Duration::from_secs(5),
        }
    }
}

/// A configuration that cannot be used, and why (never with a secret in it).
#[derive(Debug, thiserror::Error)]
#[error("server configuration: {0}")]
pub struct ConfigError(String);

impl ServerConfig {
    /// From the environment (see the crate docs for the variables), and the file that
    /// `TIERSTACK_SERVER_CONFIG` names, if any.
    ///
    /// # Errors
    ///
    /// A variable or the file that does not parse, or a limit out of range.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), with the variables from `var`.
    ///
    /// # Errors
    ///
    /// As [`from_env`](Self::from_env).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(listen) = var("TIERSTACK_LISTEN") {
            config.listen = listen
                .parse()
                .map_err(|_| ConfigError(format!("TIERSTACK_LISTEN: not an address: {listen}")))?;
        }
        if let Some(path) = var("TIERSTACK_SERVER_CONFIG") {
            config.apply_file(Path::new(&path))?;
        }
        if let Some(keys) = var("TIERSTACK_API_KEYS") {
            // tenant=key pairs, comma-separated: for development and small setups.
            for pair in keys.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (tenant, key) = pair.split_once('=').ok_or_else(|| {
                    ConfigError("TIERSTACK_API_KEYS: expected tenant=key pairs".into())
                })?;
                let tenant = TenantName::new(tenant.trim())
                    .map_err(|e| ConfigError(format!("TIERSTACK_API_KEYS: {e}")))?;
                config.keys.insert(KeyHash::of(key.trim()), tenant);
            }
        }
        if let Some(admin) = var("TIERSTACK_ADMIN_KEY").filter(|key| !key.trim().is_empty()) {
            config.admin = Some(KeyHash::of(admin.trim()));
        }
        for (name, target) in [
            ("TIERSTACK_REQUEST_TIMEOUT_MS", &mut config.request_timeout),
            ("TIERSTACK_KEY_RECHECK_MS", &mut config.key_recheck),
        ] {
            if let Some(value) = var(name) {
                let millis: u64 = value
                    .parse()
                    .ok()
                    .filter(|ms| (1..=3_600_000).contains(ms))
                    .ok_or_else(|| ConfigError(format!("{name}: from 1 to 3600000")))?;
                *target = Duration::from_millis(millis);
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!("TIERSTACK_SERVER_CONFIG: {}: {e}", path.display()))
        })?;
        let file: FileConfig = serde_json::from_str(&text)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        if let Some(limits) = file.limits {
            self.default_limits = limits;
        }
        if let Some(admin) = file.admin_key_sha256 {
            self.admin =
                Some(KeyHash::from_hex(&admin).ok_or_else(|| {
                    ConfigError("admin_key_sha256: expected 64 hex digits".into())
                })?);
        }
        for tenant in file.tenants {
            for hash in &tenant.api_key_sha256 {
                let hash = KeyHash::from_hex(hash).ok_or_else(|| {
                    ConfigError(format!(
                        "tenant {}: api_key_sha256 holds 64 hex digits",
                        tenant.name.as_str()
                    ))
                })?;
                self.keys.insert(hash, tenant.name.clone());
            }
            if let Some(limits) = tenant.limits {
                self.limits.insert(tenant.name, limits);
            }
        }
        Ok(())
    }

    /// Checks every limit.
    ///
    /// # Errors
    ///
    /// The first limit out of range, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.default_limits
            .validate()
            .map_err(|e| ConfigError(format!("limits: {e}")))?;
        for (tenant, limits) in &self.limits {
            limits
                .validate()
                .map_err(|e| ConfigError(format!("tenant {}: {e}", tenant.as_str())))?;
        }
        Ok(())
    }

    /// The limits of `tenant`.
    pub fn limits_of(&self, tenant: &TenantName) -> &Limits {
        self.limits.get(tenant).unwrap_or(&self.default_limits)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn from_variables_and_a_file() {
        let dir =
            std::env::temp_dir().join(format!("tierstack-server-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.json");
        let hash = KeyHash::of("file-key").to_hex();
        std::fs::write(
            &file,
            format!(
                r#"{{"tenants": [{{"name": "shop", "api_key_sha256": ["{hash}"],
                    "limits": {{"max_bulk": 5}}}}], "limits": {{"rate_limit": 7}}}}"#
            ),
        )
        .unwrap();
        let vars: HashMap<&str, String> = [
            ("TIERSTACK_LISTEN", "127.0.0.1:9000".to_owned()),
            ("TIERSTACK_SERVER_CONFIG", file.display().to_string()),
            ("TIERSTACK_API_KEYS", "blog=dev-key".to_owned()),
            ("TIERSTACK_ADMIN_KEY", "admin-secret".to_owned()),
        ]
        .into_iter()
        .collect();
        let config = ServerConfig::from_vars(|name| vars.get(name).cloned()).unwrap();
        let shop = TenantName::new("shop").unwrap();
        assert_eq!(config.keys.get(&KeyHash::of("file-key")), Some(&shop));
        assert_eq!(
            config.keys.get(&KeyHash::of("dev-key")),
            Some(&TenantName::new("blog").unwrap())
        );
        assert_eq!(config.limits_of(&shop).max_bulk, 5);
        assert_eq!(config.default_limits.rate_limit, 7);
        assert_eq!(config.admin, Some(KeyHash::of("admin-secret")));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("admin-secret") && !shown.contains("dev-key"),
            "{shown}"
        );
        let bad = |name: &'static str, value: &'static str| {
            ServerConfig::from_vars(|n| (n == name).then(|| value.to_owned())).unwrap_err()
        };
        assert!(
            bad("TIERSTACK_LISTEN", "nowhere")
                .to_string()
                .contains("TIERSTACK_LISTEN")
        );
        assert!(
            bad("TIERSTACK_API_KEYS", "Bad=key")
                .to_string()
                .contains("tenant name")
        );
        assert!(
            !bad("TIERSTACK_API_KEYS", "no-separator-secret")
                .to_string()
                .contains("secret"),
            "the key is not repeated"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
