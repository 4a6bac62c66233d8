//! The coordinator's configuration: `coordinator.toml`, written by
//! `cairn init` and read by `cairn serve`. Unknown keys are refused; every
//! error names the file and the key path; relative paths are resolved
//! against the file's directory; `validate()` checks what types cannot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cairn_common::Error as CommonError;
use cairn_common::config::{display_duration, load_toml, resolve};

use crate::repository::{
    LocalStore, S3Credentials, S3Settings, S3Store, Store, normalize_s3_prefix,
};

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
    #[serde(default)]
    pub backup: BackupConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    #[serde(default)]
    pub gc: GcConfig,
}

/// `[gc]`: the coordinator's own garbage collection of chunks no backup
/// needs (`cairn repository gc` runs one by hand).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Whether the coordinator collects by itself, once per `interval`.
    pub enabled: bool,
    /// A chunk stored or reused more recently is never condemned.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How often the coordinator collects (one coordinator claims each run).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: true,
            grace: crate::repository::gc::DEFAULT_GRACE,
            interval: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[jobs]`: how many jobs run at once, and how long a running job whose
/// agent went away is kept for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs (backups and restores) running at once on one PostgreSQL
    /// instance.
    pub max_per_instance: u32,
    /// Jobs running at once on one agent.
    pub max_per_agent: u32,
    /// Jobs running at once on the whole coordinator.
    pub max_running: u32,
    /// How long a running job whose agent disconnected (or that was running
    /// when the coordinator stopped) waits for the agent before it fails.
    #[serde(with = "humantime_serde")]
    pub reattach_timeout: Duration,
}

/// The longest `jobs.reattach_timeout`: under the agents' own limit on
/// waiting for a coordinator (11 minutes).
const MAX_REATTACH_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            max_per_instance: 1,
            max_per_agent: 4,
            max_running: 64,
            reattach_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// zstd level for chunks (0 stores them uncompressed). Level 1 keeps
    /// up with a PostgreSQL backend serving COPY; level 3 halves the rate.
    pub zstd_level: i32,
    /// Whether the globals dump keeps role passwords (hashes).
    pub include_role_passwords: bool,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            zstd_level: 1,
            include_role_passwords: false,
        }
    }
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
    /// TLS handshakes in progress at once; further connections wait.
    #[serde(default = "default_max_tls_handshakes")]
    pub max_tls_handshakes: usize,
    /// Connections without a client certificate (enrollment) open at once;
    /// one more is closed after its handshake.
    #[serde(default = "default_max_anonymous_connections")]
    pub max_anonymous_connections: usize,
    /// TLS handshakes in progress from one client network (an IPv4
    /// address, an IPv6 /64); more are closed and retry.
    #[serde(default = "default_max_handshakes_per_network")]
    pub max_handshakes_per_network: usize,
    /// Connections without a client certificate from one client network.
    #[serde(default = "default_max_anonymous_per_network")]
    pub max_anonymous_per_network: usize,
    /// Refusals (handshakes, calls, enrollments) are audited once per peer
    /// address and reason in each such window, the rest counted into one
    /// summary row when it closes.
    #[serde(with = "humantime_serde", default = "default_refusal_audit_window")]
    pub refusal_audit_window: Duration,
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
    S3,
}

/// `[repository]`: `kind = "local"` takes `path`; `kind = "s3"` takes
/// `bucket` and the optional S3 keys below (their defaults are in the
/// accessors and in [`S3Settings::new`]). Keys of the other kind are refused
/// by `validate()`, so the S3 keys are options here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub kind: RepositoryKind,
    /// For `kind = "local"`: the directory that holds the repository
    /// (empty when not given).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    /// For `kind = "s3"`: the bucket (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Key prefix inside the bucket; default "" (the bucket's root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Default "us-east-1".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `http(s)://host[:port]` of an S3-compatible store (MinIO, on-premise);
    /// default: AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Static credentials: the access key id here and the secret in a 0600
    /// file, never inline. Without them, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// A PEM file of the CAs that sign the endpoint's TLS certificate; when
    /// set, only these are trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
    /// Requests in flight at once, 1..=64; default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Bounds each request with its retries; default 60s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub request_timeout: Option<Duration>,
}

fn path_is_empty(path: &Path) -> bool {
    path.as_os_str().is_empty()
}

pub const DEFAULT_S3_REGION: &str = "us-east-1";
pub const DEFAULT_S3_MAX_CONCURRENT_REQUESTS: u32 = 8;
pub const DEFAULT_S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl RepositoryConfig {
    /// The S3 keys that are set, by name, for refusing them on a local
    /// repository.
    fn s3_keys_set(&self) -> Vec<&'static str> {
        [
            ("bucket", self.bucket.is_some()),
            ("prefix", self.prefix.is_some()),
            ("region", self.region.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("path_style", self.path_style.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            (
                "secret_access_key_file",
                self.secret_access_key_file.is_some(),
            ),
            ("ca_bundle", self.ca_bundle.is_some()),
            (
                "max_concurrent_requests",
                self.max_concurrent_requests.is_some(),
            ),
            ("request_timeout", self.request_timeout.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    fn resolve_paths(&mut self, file: &Path) {
        if !path_is_empty(&self.path) {
            self.path = resolve(file, &self.path);
        }
        for path in [&mut self.secret_access_key_file, &mut self.ca_bundle]
            .into_iter()
            .flatten()
        {
            *path = resolve(file, path);
        }
    }

    /// The checks that need no file system: which keys go with which kind,
    /// and their values. Returns the key and the message.
    fn check_shape(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: String| Err((format!("repository.{key}"), message));
        match self.kind {
            RepositoryKind::Local => {
                if let Some(key) = self.s3_keys_set().first() {
                    return fail(key, "only for kind = \"s3\", not \"local\"".into());
                }
                if path_is_empty(&self.path) {
                    return fail("path", "required for kind = \"local\"".into());
                }
            }
            RepositoryKind::S3 => {
                if !path_is_empty(&self.path) {
                    return fail(
                        "path",
                        "only for kind = \"local\"; an S3 repository takes bucket and prefix"
                            .into(),
                    );
                }
                let Some(bucket) = &self.bucket else {
                    return fail("bucket", "required for kind = \"s3\"".into());
                };
                check_bucket_name(bucket).map_err(|m| ("repository.bucket".to_string(), m))?;
                if let Some(prefix) = &self.prefix {
                    normalize_s3_prefix(prefix)
                        .map_err(|e| ("repository.prefix".to_string(), e.to_string()))?;
                }
                if let Some(region) = &self.region {
                    let valid = !region.is_empty()
                        && region.len() <= 64
                        && region
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
                    if !valid {
                        return fail(
                            "region",
                            format!("{region:?} is not a region name (like us-east-1)"),
                        );
                    }
                }
                if let Some(endpoint) = &self.endpoint {
                    check_endpoint(endpoint).map_err(|m| ("repository.endpoint".to_string(), m))?;
                }
                match (&self.access_key_id, &self.secret_access_key_file) {
                    (Some(id), Some(_)) if id.trim().is_empty() => {
                        return fail("access_key_id", "must not be empty".into());
                    }
                    (Some(_), None) => {
                        return fail(
                            "secret_access_key_file",
                            "required with repository.access_key_id (the secret lives in a 0600 file, never in this file)"
                                .into(),
                        );
                    }
                    (None, Some(_)) => {
                        return fail(
                            "access_key_id",
                            "required with repository.secret_access_key_file".into(),
                        );
                    }
                    _ => {}
                }
                if let Some(requests) = self.max_concurrent_requests
                    && !(1..=64).contains(&requests)
                {
                    return fail("max_concurrent_requests", "must be between 1 and 64".into());
                }
                if let Some(timeout) = self.request_timeout
                    && (timeout < Duration::from_secs(1) || timeout > Duration::from_secs(3600))
                {
                    return fail("request_timeout", "must be between 1s and 1h".into());
                }
            }
        }
        Ok(())
    }

    /// The checks on files: the local directory, the secret file's mode,
    /// the CA bundle.
    fn check_files(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: String| Err((format!("repository.{key}"), message));
        match self.kind {
            RepositoryKind::Local => {
                if !self.path.is_dir() {
                    return fail(
                        "path",
                        format!("{} is not a directory", self.path.display()),
                    );
                }
            }
            RepositoryKind::S3 => {
                if let Some(path) = &self.secret_access_key_file {
                    check_secret_file(path)
                        .map_err(|m| ("repository.secret_access_key_file".to_string(), m))?;
                }
                if let Some(path) = &self.ca_bundle
                    && !path.is_file()
                {
                    return fail("ca_bundle", format!("{} does not exist", path.display()));
                }
            }
        }
        Ok(())
    }

    /// The S3 settings, defaults filled in, the secret read from its file
    /// (or the credentials from the environment).
    pub fn s3_settings(&self) -> Result<S3Settings, CommonError> {
        let Some(bucket) = &self.bucket else {
            return Err(CommonError::invalid(
                "repository.bucket",
                "required for kind = \"s3\"",
            ));
        };
        let credentials = match (&self.access_key_id, &self.secret_access_key_file) {
            (Some(id), Some(file)) => {
                let secret = std::fs::read_to_string(file).map_err(|e| {
                    CommonError::io(
                        format!(
                            "cannot read repository.secret_access_key_file {}",
                            file.display()
                        ),
                        e,
                    )
                })?;
                let secret = secret.trim();
                if secret.is_empty() {
                    return Err(CommonError::invalid(
                        "repository.secret_access_key_file",
                        format!("{} is empty", file.display()),
                    ));
                }
                S3Credentials::new(id.trim(), secret, None)
            }
            _ => S3Credentials::from_env()
                .map_err(|e| CommonError::invalid("repository.access_key_id", e.to_string()))?,
        };
        let mut settings = S3Settings::new(bucket.clone(), credentials);
        settings.prefix = self.prefix.clone().unwrap_or_default();
        settings.region = self
            .region
            .clone()
            .unwrap_or_else(|| DEFAULT_S3_REGION.to_string());
        settings.endpoint = self.endpoint.clone();
        settings.path_style = self.path_style.unwrap_or(false);
        settings.ca_bundle = self.ca_bundle.clone();
        settings.max_concurrent_requests =
            self.max_concurrent_requests
                .unwrap_or(DEFAULT_S3_MAX_CONCURRENT_REQUESTS) as usize;
        settings.request_timeout = self.request_timeout.unwrap_or(DEFAULT_S3_REQUEST_TIMEOUT);
        Ok(settings)
    }

    /// The store this section describes. Sends no request.
    pub fn open_store(&self) -> Result<Store, CommonError> {
        match self.kind {
            RepositoryKind::Local => Ok(Store::Local(LocalStore::new(self.path.clone()))),
            RepositoryKind::S3 => S3Store::new(self.s3_settings()?)
                .map(Store::S3)
                .map_err(|e| CommonError::invalid("repository", e.to_string())),
        }
    }
}

/// S3's bucket naming rules: 3 to 63 characters of `[a-z0-9.-]`, starting
/// and ending with a letter or digit.
fn check_bucket_name(bucket: &str) -> Result<(), String> {
    let bytes = bucket.as_bytes();
    let valid = (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-".contains(b))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && !bucket.contains("..");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{bucket:?} is not a bucket name: 3 to 63 characters of a-z, 0-9, `.` and `-`, starting and ending with a letter or digit"
        ))
    }
}

/// An endpoint is an `http://` or `https://` URL with a host and nothing
/// after it but an optional `/`.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{endpoint:?} is not an endpoint URL like https://s3.example.com or http://127.0.0.1:9000"
        )
    };
    let uri: axum::http::Uri = endpoint.parse().map_err(|_| bad())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
    if scheme_ok && host_ok && path_ok {
        Ok(())
    } else {
        Err(bad())
    }
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

const GC_GRACE_MIN: Duration = Duration::from_secs(3600);
const GC_GRACE_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_max_tls_handshakes() -> usize {
    cairn_common::tls::IncomingLimits::default().max_handshakes
}

fn default_max_anonymous_connections() -> usize {
    cairn_common::tls::IncomingLimits::default().max_anonymous_connections
}

fn default_max_handshakes_per_network() -> usize {
    cairn_common::tls::IncomingLimits::default().handshakes_per_network
}

fn default_max_anonymous_per_network() -> usize {
    cairn_common::tls::IncomingLimits::default().anonymous_per_network
}

fn default_refusal_audit_window() -> Duration {
    Duration::from_secs(60)
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
/// Agents renew at two thirds of their certificate's lifetime, so even a
/// one-minute certificate leaves them 20 seconds to reconnect with the new
/// one. Short lifetimes are good practice (a stolen key is good for less
/// time) and make renewal visible.
pub const MIN_AGENT_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(60);
/// Below this an agent lifetime is allowed but warned about at startup:
/// every agent then renews several times a day, and a coordinator outage
/// longer than a third of the lifetime leaves agents with expired
/// certificates.
pub const AGENT_CERTIFICATE_LIFETIME_WARNING: Duration = Duration::from_secs(24 * 3600);

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
            &mut self.keys.master_key_file,
        ] {
            *path = resolve(file, path);
        }
        self.repository.resolve_paths(file);
    }

    /// Settings that are valid but worth a line in the log at startup.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.fleet.agent_certificate_lifetime < AGENT_CERTIFICATE_LIFETIME_WARNING {
            warnings.push(format!(
                "fleet.agent_certificate_lifetime is {}, under a day: agents renew every {}, and one whose renewals fail for a third of that goes offline when its certificate expires",
                display_duration(self.fleet.agent_certificate_lifetime),
                display_duration(self.fleet.agent_certificate_lifetime * 2 / 3)
            ));
        }
        warnings
    }

    /// Cross-field and environment checks, each naming the key.
    pub fn validate(&self, file: &Path) -> Result<(), CommonError> {
        let fail = |key: &str, message: String| CommonError::Config {
            file: file.to_path_buf(),
            message: format!("key `{key}`: {message}"),
        };
        for (key, value) in [
            ("jobs.max_per_instance", self.jobs.max_per_instance),
            ("jobs.max_per_agent", self.jobs.max_per_agent),
            ("jobs.max_running", self.jobs.max_running),
        ] {
            if !(1..=10_000).contains(&value) {
                return Err(fail(key, "must be between 1 and 10000".into()));
            }
        }
        // A grace shorter than an hour lets a slow upload's chunk be
        // condemned between its store and its first reuse by another
        // backup; the CLI's `--grace` may go lower for one run.
        if self.gc.grace < GC_GRACE_MIN || self.gc.grace > GC_GRACE_MAX {
            return Err(fail(
                "gc.grace",
                "must be between 1h and 365d (24h is the default)".into(),
            ));
        }
        if self.gc.interval < Duration::from_secs(60) || self.gc.interval > GC_GRACE_MAX {
            return Err(fail(
                "gc.interval",
                "must be between 1m and 365d (24h is the default)".into(),
            ));
        }
        // Agents keep a broken job's stream waiting for the coordinator for
        // 11 minutes (cairn-agent's REATTACH_LIMIT): a longer wait here
        // would keep jobs whose agents have already given up on them.
        if self.jobs.reattach_timeout < Duration::from_secs(1)
            || self.jobs.reattach_timeout > MAX_REATTACH_TIMEOUT
        {
            return Err(fail(
                "jobs.reattach_timeout",
                "must be between 1s and 10m (the default), as agents wait 11 minutes at most \
                 for the coordinator to come back before they give a job up"
                    .into(),
            ));
        }
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
        if fleet.agent_certificate_lifetime < MIN_AGENT_CERTIFICATE_LIFETIME {
            return Err(fail(
                "fleet.agent_certificate_lifetime",
                "must be at least 1m (agents renew at two thirds of it)".into(),
            ));
        }
        if fleet.operator_certificate_lifetime < Duration::from_secs(3600) {
            return Err(fail(
                "fleet.operator_certificate_lifetime",
                "must be at least 1h".into(),
            ));
        }
        if fleet.max_token_ttl < MIN_TOKEN_TTL {
            return Err(fail("fleet.max_token_ttl", "must be at least 1m".into()));
        }
        if !(0..=19).contains(&self.backup.zstd_level) {
            return Err(fail(
                "backup.zstd_level",
                "must be between 0 (off) and 19".into(),
            ));
        }
        if self.server.shutdown_grace < Duration::from_secs(1)
            || self.server.shutdown_grace > Duration::from_secs(3600)
        {
            return Err(fail(
                "server.shutdown_grace",
                "must be between 1s and 1h".into(),
            ));
        }
        for (key, value) in [
            ("server.max_tls_handshakes", self.server.max_tls_handshakes),
            (
                "server.max_anonymous_connections",
                self.server.max_anonymous_connections,
            ),
            (
                "server.max_handshakes_per_network",
                self.server.max_handshakes_per_network,
            ),
            (
                "server.max_anonymous_per_network",
                self.server.max_anonymous_per_network,
            ),
        ] {
            if !(1..=100_000).contains(&value) {
                return Err(fail(key, "must be between 1 and 100000".into()));
            }
        }
        if self.server.refusal_audit_window < Duration::from_secs(1)
            || self.server.refusal_audit_window > Duration::from_secs(3600)
        {
            return Err(fail(
                "server.refusal_audit_window",
                "must be between 1s and 1h".into(),
            ));
        }
        if self.server.grpc_listen == self.server.http_listen {
            return Err(fail(
                "server.http_listen",
                "must differ from server.grpc_listen".into(),
            ));
        }
        self.repository
            .check_shape()
            .map_err(|(key, message)| fail(&key, message))?;
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
        self.repository
            .check_files()
            .map_err(|(key, message)| fail(&key, message))?;
        Ok(())
    }
}

impl CoordinatorConfig {
    /// The repository's store, local or S3, as `[repository]` says.
    pub fn open_store(&self) -> Result<Store, CommonError> {
        self.repository.open_store()
    }

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
        // No longer than agents wait for a coordinator to come back.
        check(
            "[jobs]\nreattach_timeout = \"11m\"\n",
            "key `jobs.reattach_timeout`: must be between 1s and 10m",
        );
    }

    #[test]
    fn gc_settings_are_checked_at_startup() {
        check(
            "[gc]\ngrace = \"10m\"\n",
            "key `gc.grace`: must be between 1h and 365d",
        );
        check("[gc]\ngrace = \"tomorrow\"\n", "key `gc.grace`");
        check(
            "[gc]\ninterval = \"1s\"\n",
            "key `gc.interval`: must be between 1m and 365d",
        );
        check("[gc]\nkeep = 1\n", "unknown field `keep`");
        let config: CoordinatorConfig =
            parse_toml(MINIMAL, Path::new("/x/coordinator.toml")).unwrap();
        assert!(config.gc.enabled);
        assert_eq!(config.gc.grace, Duration::from_secs(24 * 3600));
    }

    /// Agent certificates may be as short as a minute (warned about under a
    /// day); operator certificates stay at an hour or more.
    #[test]
    fn agent_certificate_lifetimes_go_down_to_a_minute() {
        check(
            "[fleet]\nagent_certificate_lifetime = \"59s\"\n",
            "key `fleet.agent_certificate_lifetime`: must be at least 1m",
        );
        check(
            "[fleet]\noperator_certificate_lifetime = \"59m\"\n",
            "key `fleet.operator_certificate_lifetime`: must be at least 1h",
        );
        let file = Path::new("/x/coordinator.toml");
        let config = parse_toml::<CoordinatorConfig>(
            &format!("{MINIMAL}[fleet]\nagent_certificate_lifetime = \"1m\"\n"),
            file,
        )
        .unwrap();
        // It gets past the fleet checks, as far as the files.
        let error = config.validate(file).unwrap_err().to_string();
        assert!(error.contains("key `tls.ca_certificate`"), "{error}");
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("under a day"), "{warnings:?}");
        let defaults = parse_toml::<CoordinatorConfig>(MINIMAL, file).unwrap();
        assert!(defaults.warnings().is_empty());
    }

    #[test]
    fn repository_keys_are_named() {
        let s3 = |extra: &str| {
            MINIMAL.replace(
                "kind = \"local\"\npath = \"repository\"\n",
                &format!("kind = \"s3\"\n{extra}"),
            )
        };
        let check_repository = |text: String, expected: &str| {
            let file = Path::new("/x/coordinator.toml");
            let error = match parse_toml::<CoordinatorConfig>(&text, file) {
                Err(error) => error.to_string(),
                Ok(config) => config.validate(file).unwrap_err().to_string(),
            };
            assert!(error.contains(expected), "{error} lacks {expected}");
        };
        check_repository(
            MINIMAL.replace(
                "path = \"repository\"\n",
                "path = \"repository\"\nregion = \"eu-west-1\"\n",
            ),
            "key `repository.region`: only for kind = \"s3\"",
        );
        check_repository(s3(""), "key `repository.bucket`: required");
        check_repository(
            s3("bucket = \"b-1\"\nsecret_access_key = \"x\"\n"),
            "unknown field `secret_access_key`",
        );
        check_repository(
            s3("bucket = \"b-1\"\nmax_concurrent_requests = 100\n"),
            "key `repository.max_concurrent_requests`",
        );
        check_repository(
            s3("bucket = \"b-1\"\nrequest_timeout = \"1 fortnight\"\n"),
            "key `repository.request_timeout`",
        );
        check_repository(
            s3("bucket = \"b-1\"\nendpoint = \"s3.example.com\"\n"),
            "key `repository.endpoint`",
        );
        // A valid S3 section gets as far as the file checks.
        check_repository(
            s3("bucket = \"b-1\"\nendpoint = \"https://s3.example.com:9000\"\npath_style = true\n"),
            "key `tls.ca_certificate`",
        );
    }
}
