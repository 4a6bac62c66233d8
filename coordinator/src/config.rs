//! The coordinator's configuration: `coordinator.toml`, written by
//! `cairn init` and read by `cairn serve`. Unknown keys are refused; every
//! error names the file and the key path; relative paths are resolved
//! against the file's directory; `validate()` checks what types cannot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cairn_common::Error as CommonError;
use cairn_common::config::{load_toml, resolve};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub catalog: CatalogConfig,
    pub repository: RepositoryConfig,
    pub keys: KeysConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC (mTLS) for agents and operators.
    pub grpc_listen: SocketAddr,
    /// Plain HTTP for `/healthz`, `/readyz` and `/metrics`.
    pub http_listen: SocketAddr,
    /// How long SIGTERM waits for in-flight work before exiting.
    #[serde(with = "humantime_serde", default = "default_shutdown_grace")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_certificate: PathBuf,
    /// The fleet CA's private key (mode 0600).
    pub ca_key: PathBuf,
    pub server_certificate: PathBuf,
    /// The server's private key (mode 0600).
    pub server_key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// The SQLite catalog file.
    pub sqlite_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepositoryKind {
    Local,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub kind: RepositoryKind,
    /// For `kind = "local"`: the directory that holds the repository.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// The master key file (mode 0600) that wraps the repository data key.
    pub master_key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// How often agents must heartbeat; three missed heartbeats show an
    /// agent offline.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Probes kept per instance.
    pub probe_history: u32,
    #[serde(with = "humantime_serde")]
    pub agent_certificate_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub operator_certificate_lifetime: Duration,
    /// The longest TTL `cairn token create` accepts.
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat_interval: Duration::from_secs(5),
            probe_history: 20,
            agent_certificate_lifetime: Duration::from_secs(365 * 24 * 3600),
            operator_certificate_lifetime: Duration::from_secs(90 * 24 * 3600),
            max_token_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);

impl CoordinatorConfig {
    /// Reads, resolves and validates the config file.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, CommonError> {
        let mut config: CoordinatorConfig = load_toml(path)?;
        config.resolve_paths(path);
        config.validate(path)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, file: &Path) {
        for path in [
            &mut self.tls.ca_certificate,
            &mut self.tls.ca_key,
            &mut self.tls.server_certificate,
            &mut self.tls.server_key,
            &mut self.catalog.sqlite_path,
            &mut self.repository.path,
            &mut self.keys.master_key_file,
        ] {
            *path = resolve(file, path);
        }
    }

    /// Cross-field and environment checks, each naming the key.
    pub fn validate(&self, file: &Path) -> Result<(), CommonError> {
        let fail = |key: &str, message: String| CommonError::Config {
            file: file.to_path_buf(),
            message: format!("key `{key}`: {message}"),
        };
        let fleet = &self.fleet;
        if fleet.heartbeat_interval < Duration::from_millis(100)
            || fleet.heartbeat_interval > Duration::from_secs(300)
        {
            return Err(fail(
                "fleet.heartbeat_interval",
                "must be between 100ms and 5m".into(),
            ));
        }
        if !(1..=1000).contains(&fleet.probe_history) {
            return Err(fail(
                "fleet.probe_history",
                "must be between 1 and 1000".into(),
            ));
        }
        for (key, lifetime) in [
            (
                "fleet.agent_certificate_lifetime",
                fleet.agent_certificate_lifetime,
            ),
            (
                "fleet.operator_certificate_lifetime",
                fleet.operator_certificate_lifetime,
            ),
        ] {
            if lifetime < Duration::from_secs(3600) {
                return Err(fail(key, "must be at least 1h".into()));
            }
        }
        if fleet.max_token_ttl < MIN_TOKEN_TTL {
            return Err(fail("fleet.max_token_ttl", "must be at least 1m".into()));
        }
        if self.server.shutdown_grace < Duration::from_secs(1)
            || self.server.shutdown_grace > Duration::from_secs(3600)
        {
            return Err(fail(
                "server.shutdown_grace",
                "must be between 1s and 1h".into(),
            ));
        }
        if self.server.grpc_listen == self.server.http_listen {
            return Err(fail(
                "server.http_listen",
                "must differ from server.grpc_listen".into(),
            ));
        }
        for (key, path) in [
            ("tls.ca_certificate", &self.tls.ca_certificate),
            ("tls.server_certificate", &self.tls.server_certificate),
        ] {
            if !path.is_file() {
                return Err(fail(key, format!("{} does not exist", path.display())));
            }
        }
        for (key, path) in [
            ("tls.ca_key", &self.tls.ca_key),
            ("tls.server_key", &self.tls.server_key),
            ("keys.master_key_file", &self.keys.master_key_file),
        ] {
            check_secret_file(path).map_err(|message| fail(key, message))?;
        }
        if !self.repository.path.is_dir() {
            return Err(fail(
                "repository.path",
                format!("{} is not a directory", self.repository.path.display()),
            ));
        }
        Ok(())
    }
}

impl CoordinatorConfig {
    /// Reads the master key file (64 hex digits).
    pub fn master_key(&self) -> Result<cairn_common::crypto::SecretKey, CommonError> {
        let text = std::fs::read_to_string(&self.keys.master_key_file).map_err(|e| {
            CommonError::io(
                format!(
                    "cannot read keys.master_key_file {}",
                    self.keys.master_key_file.display()
                ),
                e,
            )
        })?;
        cairn_common::crypto::SecretKey::from_hex(&text).map_err(|_| {
            CommonError::invalid(
                "keys.master_key_file",
                format!(
                    "{} must hold 64 hex digits",
                    self.keys.master_key_file.display()
                ),
            )
        })
    }
}

/// A secret file must exist and be readable by its owner only.
pub fn check_secret_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {mode:o}): run chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_common::config::parse_toml;

    const MINIMAL: &str = r#"
[server]
grpc_listen = "127.0.0.1:7443"
http_listen = "127.0.0.1:7080"
[tls]
ca_certificate = "ca/ca.pem"
ca_key = "ca/ca.key"
server_certificate = "tls/server.pem"
server_key = "tls/server.key"
[catalog]
sqlite_path = "catalog.sqlite"
[repository]
kind = "local"
path = "repository"
[keys]
master_key_file = "master.key"
"#;

    fn check(extra: &str, expected: &str) {
        let text = format!("{MINIMAL}{extra}");
        let file = Path::new("/x/coordinator.toml");
        let error = match parse_toml::<CoordinatorConfig>(&text, file) {
            Err(error) => error.to_string(),
            Ok(config) => config.validate(file).unwrap_err().to_string(),
        };
        assert!(error.contains(expected), "{error} lacks {expected}");
    }

    #[test]
    fn bad_keys_are_named() {
        check(
            "[fleet]\nheartbeat_interval = \"1s\"\nbogus = 1\n",
            "unknown field `bogus`",
        );
        check(
            "[fleet]\nheartbeat_interval = \"soon\"\n",
            "key `fleet.heartbeat_interval`",
        );
        check(
            "[fleet]\nheartbeat_interval = \"10m\"\nprobe_history = 5\nagent_certificate_lifetime = \"1y\"\noperator_certificate_lifetime = \"1y\"\nmax_token_ttl = \"1d\"\n",
            "key `fleet.heartbeat_interval`: must be between 100ms and 5m",
        );
        // The first file-level check names the missing file's key.
        check("", "key `tls.ca_certificate`");
    }
}
