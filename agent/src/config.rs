//! The agent's configuration, `agent.toml`, written by `cairn-agent enroll`
//! and read by `cairn-agent run`. Unknown keys are refused and errors name
//! the key path. Connection strings may hold passwords: they are never
//! logged (see [`crate::postgres::ConnectionString`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_common::config::{load_toml, resolve};
use cairn_common::model::Operation;
use cairn_common::names::{AgentName, InstanceName, validate_label};
use cairn_common::tls::{CoordinatorUrl, IdentityPaths};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};
use crate::postgres::ConnectionString;

pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(15);
/// The probe intervals a config may ask for.
pub const PROBE_INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
pub const DEFAULT_RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Where a parallel restore spools its dump unless `spool_dir` says
/// otherwise: this directory in the agent's own directory (where
/// `agent.toml` is), which is the agent's alone and writable under the
/// systemd unit's sandbox. Never a shared place such as `/var/tmp`, where
/// another user could make the directory first (see [`crate::spool`]).
pub const DEFAULT_SPOOL_DIR_NAME: &str = "spool";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name; must match its certificate.
    pub name: AgentName,
    /// `https://HOST:PORT` of the coordinator.
    pub coordinator: String,
    /// Directory with `ca.pem`, `cert.pem`, `key.pem`; relative to this file.
    pub identity_dir: PathBuf,
    /// Local address to dial from (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<IpAddr>,
    /// How often to probe each instance.
    #[serde(with = "humantime_serde", default = "default_probe_interval")]
    pub probe_interval: Duration,
    /// The longest wait between reconnection attempts (exponential, with jitter).
    #[serde(with = "humantime_serde", default = "default_reconnect_max_backoff")]
    pub reconnect_max_backoff: Duration,
    /// Where a parallel restore (`--jobs` above 1) writes the dump for
    /// `pg_restore` to read, and a partial restore its list (0600, removed
    /// at the end); relative to this file. Default: `spool` next to this
    /// file ([`DEFAULT_SPOOL_DIR_NAME`]). Must be private to the agent
    /// (created 0700 when missing; see [`crate::spool`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_dir: Option<PathBuf>,
    /// The directory this file was loaded from (the agent's own
    /// directory); empty when not loaded from a file.
    #[serde(skip)]
    pub config_dir: PathBuf,
    #[serde(default)]
    pub permissions: Permissions,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub instances: Vec<InstanceConfig>,
}

/// Which operations this host allows. Anything not listed is refused, even
/// when the coordinator asks: a compromised coordinator is not root on every
/// database. Probes are always allowed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permissions {
    #[serde(default)]
    pub allow: BTreeSet<Operation>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    pub name: InstanceName,
    /// libpq URL or key=value connection string for the local instance.
    pub postgres: ConnectionString,
}

impl Serialize for ConnectionString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

fn default_probe_interval() -> Duration {
    DEFAULT_PROBE_INTERVAL
}

fn default_reconnect_max_backoff() -> Duration {
    DEFAULT_RECONNECT_MAX_BACKOFF
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let mut config: AgentConfig = load_toml(path)?;
        config.identity_dir = resolve(path, &config.identity_dir);
        config.config_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(spool_dir) = &config.spool_dir {
            config.spool_dir = Some(resolve(path, spool_dir));
        }
        config.validate().map_err(|message| {
            AgentError::Common(cairn_common::Error::Config {
                file: path.to_path_buf(),
                message,
            })
        })?;
        Ok(config)
    }

    pub fn identity(&self) -> IdentityPaths {
        IdentityPaths::in_dir(&self.identity_dir)
    }

    pub fn coordinator_url(&self) -> Result<CoordinatorUrl> {
        Ok(CoordinatorUrl::parse(&self.coordinator)?)
    }

    /// Where parallel restores spool their dump.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| self.config_dir.join(DEFAULT_SPOOL_DIR_NAME))
    }

    pub fn permits(&self, operation: Operation) -> bool {
        self.permissions.allow.contains(&operation)
    }

    /// Checks what types cannot; the message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        CoordinatorUrl::parse(&self.coordinator).map_err(|e| format!("key `coordinator`: {e}"))?;
        if self.instances.is_empty() {
            return Err("key `instances`: at least one [[instances]] entry is needed".into());
        }
        let mut names = BTreeSet::new();
        for (index, instance) in self.instances.iter().enumerate() {
            if !names.insert(instance.name.as_str()) {
                return Err(format!(
                    "key `instances[{index}].name`: {:?} is used twice",
                    instance.name.as_str()
                ));
            }
        }
        if !PROBE_INTERVAL_RANGE.contains(&self.probe_interval) {
            return Err("key `probe_interval`: must be between 1s and 1h".into());
        }
        if self.reconnect_max_backoff < Duration::from_millis(100)
            || self.reconnect_max_backoff > Duration::from_secs(600)
        {
            return Err("key `reconnect_max_backoff`: must be between 100ms and 10m".into());
        }
        for (key, value) in &self.labels {
            validate_label(key, value).map_err(|e| format!("key `labels.{key}`: {e}"))?;
        }
        if let Some(spool_dir) = &self.spool_dir {
            if spool_dir.as_os_str().is_empty() {
                return Err(
                    "key `spool_dir`: must not be empty (leave it out for the default)".into(),
                );
            }
            if spool_dir.exists() && !spool_dir.is_dir() {
                return Err(format!(
                    "key `spool_dir`: {} exists and is not a directory",
                    spool_dir.display()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_common::config::parse_toml;

    const BASE: &str = r#"
name = "db1"
coordinator = "https://127.0.0.1:7443"
identity_dir = "identity"
"#;

    const INSTANCE: &str = "[[instances]]\nname = \"main\"\npostgres = \"host=/tmp port=5432 user=postgres password=hunter2\"\n";

    fn check(text: &str, expected: &str) {
        let error = match parse_toml::<AgentConfig>(text, Path::new("agent.toml")) {
            Err(e) => e.to_string(),
            Ok(config) => config.validate().unwrap_err(),
        };
        assert!(error.contains(expected), "{error} lacks {expected}");
        assert!(!error.contains("hunter2"), "a password leaked into {error}");
    }

    #[test]
    fn bad_config_names_the_key() {
        check(
            &format!("{BASE}bogus = 1\n{INSTANCE}"),
            "unknown field `bogus`",
        );
        check(
            &format!("{BASE}[permissions]\nallow = [\"drop\"]\n{INSTANCE}"),
            "permissions.allow",
        );
        check(
            &format!("{BASE}probe_interval = \"0s\"\n{INSTANCE}"),
            "key `probe_interval`",
        );
        check(BASE, "missing field `instances`");
        check(
            &format!("{BASE}[labels]\n\"Bad Key\" = \"x\"\n{INSTANCE}"),
            "key `labels.Bad Key`",
        );
        check(
            &format!("{BASE}{INSTANCE}{INSTANCE}"),
            "key `instances[1].name`",
        );
        check(&BASE.replace("db1", "DB1").to_string(), "agent name");
        check(
            &format!("{BASE}spool_dir = \"\"\n{INSTANCE}"),
            "key `spool_dir`",
        );
        check(
            &format!("{BASE}spool_dir = \"/dev/null\"\n{INSTANCE}"),
            "key `spool_dir`: /dev/null exists and is not a directory",
        );
    }

    #[test]
    fn the_spool_dir_defaults_and_resolves_next_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("{BASE}{INSTANCE}")).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        assert_eq!(config.spool_dir(), dir.path().join(DEFAULT_SPOOL_DIR_NAME));
        assert!(!toml::to_string(&config).unwrap().contains("spool_dir"));
        std::fs::write(&path, format!("{BASE}spool_dir = \"spool\"\n{INSTANCE}")).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        assert_eq!(config.spool_dir(), dir.path().join("spool"));
    }

    #[test]
    fn a_good_config_round_trips_and_permits_only_what_it_lists() {
        let text = format!("{BASE}[permissions]\nallow = [\"backup\"]\n{INSTANCE}");
        let config: AgentConfig = parse_toml(&text, Path::new("agent.toml")).unwrap();
        config.validate().unwrap();
        assert!(config.permits(Operation::Backup));
        assert!(!config.permits(Operation::Restore));
        let written = toml::to_string(&config).unwrap();
        let again: AgentConfig = parse_toml(&written, Path::new("agent.toml")).unwrap();
        assert_eq!(again.instances[0].postgres, config.instances[0].postgres);
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
