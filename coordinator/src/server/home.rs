//! `cairn init`: a ready-to-run coordinator home.
//!
//! Everything is written into a hidden sibling directory first and renamed
//! into place at the end, so a failure leaves nothing that looks like a home.
//!
//! ```text
//! DIR/coordinator.toml      embedded defaults, paths relative to DIR
//! DIR/ca/ca.pem, ca.key     the fleet CA (key 0600)
//! DIR/tls/server.pem, .key  the coordinator's server certificate (key 0600)
//! DIR/master.key            wraps the repository data key (0600)
//! DIR/catalog.sqlite        the catalog
//! DIR/repository/           the local repository
//! DIR/admin/                the first admin identity: ca.pem, cert.pem, key.pem
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cairn_common::config::{StagedDirectory, write_file_atomic};
use cairn_common::identity::{Principal, Role};
use cairn_common::names::OperatorName;
use cairn_common::pki::{CertificateAuthority, generate_key_and_csr};

use cairn_common::crypto::SecretKey;

use crate::audit::{AuditEvent, Outcome};
use crate::catalog::Catalog;
use crate::config::FleetConfig;
use crate::error::{CoordinatorError, Result};
use crate::fleet::authority::record_operator_certificate;
use crate::repository::{LocalStore, Repository, Store};

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Extra DNS names or addresses for the server certificate.
    pub server_names: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct InitReport {
    pub config_file: PathBuf,
    pub admin_identity: PathBuf,
    pub ca_fingerprint: String,
    /// When the fleet CA expires, Unix seconds: every identity it signs
    /// dies with it.
    pub ca_not_after_unix: i64,
    pub server_names: Vec<String>,
}

pub async fn init(options: &InitOptions) -> Result<InitReport> {
    if options.grpc_listen == options.http_listen {
        return Err(CoordinatorError::InvalidArgument(
            "--grpc-listen and --http-listen must differ".into(),
        ));
    }
    let staged = StagedDirectory::new(&options.dir, "--dir")?;
    let mut report = write_home(staged.path(), options).await?;
    let home = staged.commit()?;
    let absolute = std::fs::canonicalize(&home).unwrap_or(home);
    report.config_file = absolute.join("coordinator.toml");
    report.admin_identity = absolute.join("admin");
    Ok(report)
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| CoordinatorError::io(format!("cannot create {}", path.display()), e))
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    write_file_atomic(path, contents, mode).map_err(CoordinatorError::from)
}

async fn write_home(home: &Path, options: &InitOptions) -> Result<InitReport> {
    for sub in ["ca", "tls", "admin", "repository"] {
        mkdir(&home.join(sub), 0o700)?;
    }

    let (ca, ca_key_pem) = CertificateAuthority::generate("cairn fleet CA")?;
    write(&home.join("ca/ca.pem"), ca.ca_pem().as_bytes(), 0o644)?;
    write(&home.join("ca/ca.key"), ca_key_pem.as_bytes(), 0o600)?;

    let server_names = server_names(options);
    let (server, server_key) = ca.issue_server(&server_names)?;
    write(&home.join("tls/server.pem"), server.pem.as_bytes(), 0o644)?;
    write(&home.join("tls/server.key"), server_key.as_bytes(), 0o600)?;

    let master_key = SecretKey::generate()?;
    write(
        &home.join("master.key"),
        format!("{}\n", master_key.expose_hex()).as_bytes(),
        0o600,
    )?;
    let repository = Repository::create(
        Store::Local(LocalStore::new(home.join("repository"))),
        &master_key,
    )
    .await
    .map_err(|e| CoordinatorError::Unavailable(format!("cannot create the repository: {e}")))?;

    let fleet = FleetConfig::default();
    let principal = Principal::Operator {
        name: OperatorName::new("admin")?,
        role: Role::Admin,
    };
    let request = generate_key_and_csr("admin")?;
    let admin = ca.issue_client_from_csr(
        &principal,
        &request.csr_pem,
        fleet.operator_certificate_lifetime,
    )?;
    write(&home.join("admin/ca.pem"), ca.ca_pem().as_bytes(), 0o644)?;
    write(&home.join("admin/cert.pem"), admin.pem.as_bytes(), 0o644)?;
    write(
        &home.join("admin/key.pem"),
        request.key_pem.as_bytes(),
        0o600,
    )?;

    let catalog = Catalog::open_sqlite(&home.join("catalog.sqlite")).await?;
    record_operator_certificate(&catalog, &principal, &admin).await?;
    catalog
        .append_audit(&AuditEvent::new(
            "cairn init",
            "coordinator.init",
            "coordinator",
            Outcome::Success,
            format!(
                "fleet CA sha256 {}, admin certificate serial {}, repository {}, master key {}",
                cairn_common::pki::ca_fingerprint(ca.ca_der()),
                admin.serial,
                repository.id(),
                master_key.key_id()
            ),
        ))
        .await?;
    catalog.close().await;

    let config = config_text(options, &fleet);
    write(&home.join("coordinator.toml"), config.as_bytes(), 0o600)?;
    Ok(InitReport {
        config_file: home.join("coordinator.toml"),
        admin_identity: home.join("admin"),
        ca_fingerprint: cairn_common::pki::ca_fingerprint(ca.ca_der()),
        ca_not_after_unix: cairn_common::identity::certificate_validity(ca.ca_der())?.1,
        server_names,
    })
}

fn server_names(options: &InitOptions) -> Vec<String> {
    let mut names = Vec::new();
    let ip = options.grpc_listen.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    names.extend(options.server_names.iter().cloned());
    for default in ["localhost", "127.0.0.1"] {
        names.push(default.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

fn config_text(options: &InitOptions, fleet: &FleetConfig) -> String {
    let jobs = crate::config::JobsConfig::default();
    let gc = crate::config::GcConfig::default();
    let duration = cairn_common::config::display_duration;
    format!(
        r#"# Cairn coordinator configuration, written by `cairn init`.
# Relative paths are resolved against this file's directory.

[server]
# gRPC with mutual TLS, for agents and operators.
grpc_listen = "{grpc}"
# Plain HTTP: /healthz, /readyz, /metrics.
http_listen = "{http}"
shutdown_grace = "30s"
# What clients without a certificate can make the coordinator do: TLS
# handshakes at once, connections without a client certificate (enrollment)
# at once, the same from one client network (an IPv4 address, an IPv6 /64),
# and the window in which refusals from one network are audited once and
# then counted into one summary row.
max_tls_handshakes = 64
max_anonymous_connections = 32
max_handshakes_per_network = 16
max_anonymous_per_network = 4
refusal_audit_window = "60s"

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

[fleet]
heartbeat_interval = "{heartbeat}"
probe_history = {history}
# Agents renew their certificates by themselves at two thirds of this (at
# least 1m; under a day is warned about). Operators renew with
# `cairn operators renew` (at least 1h).
agent_certificate_lifetime = "{agent_lifetime}"
operator_certificate_lifetime = "{operator_lifetime}"
max_token_ttl = "{max_ttl}"

[jobs]
# Jobs (backups, restores) running at once on one PostgreSQL instance, on
# one agent, and on this coordinator; the others queue.
max_per_instance = {per_instance}
max_per_agent = {per_agent}
max_running = {running}
# How long a running job whose agent went away waits for it (1s to 10m).
reattach_timeout = "{reattach}"

[gc]
# Garbage collection of chunks no backup needs, once per interval (one
# coordinator runs it): a chunk unused for longer than the grace is
# condemned, and deleted by a later run unless a backup uses it again.
enabled = {gc_enabled}
grace = "{gc_grace}"
interval = "{gc_interval}"
"#,
        grpc = options.grpc_listen,
        http = options.http_listen,
        heartbeat = duration(fleet.heartbeat_interval),
        history = fleet.probe_history,
        agent_lifetime = duration(fleet.agent_certificate_lifetime),
        operator_lifetime = duration(fleet.operator_certificate_lifetime),
        max_ttl = duration(fleet.max_token_ttl),
        per_instance = jobs.max_per_instance,
        per_agent = jobs.max_per_agent,
        running = jobs.max_running,
        reattach = duration(jobs.reattach_timeout),
        gc_enabled = gc.enabled,
        gc_grace = duration(gc.grace),
        gc_interval = duration(gc.interval),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CoordinatorConfig;

    fn options(dir: PathBuf) -> InitOptions {
        InitOptions {
            dir,
            grpc_listen: "127.0.0.1:7443".parse().unwrap(),
            http_listen: "127.0.0.1:7080".parse().unwrap(),
            server_names: vec!["coord.example".into()],
        }
    }

    #[tokio::test]
    async fn init_makes_a_valid_home_and_refuses_to_overwrite() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("home");
        let report = init(&options(dir.clone())).await.unwrap();
        let config = CoordinatorConfig::load(&report.config_file).unwrap();
        assert_eq!(
            config.fleet.heartbeat_interval,
            std::time::Duration::from_secs(5)
        );
        assert!(report.server_names.contains(&"coord.example".to_string()));
        for secret in ["ca/ca.key", "tls/server.key", "master.key", "admin/key.pem"] {
            assert!(
                crate::config::check_secret_file(&dir.join(secret)).is_ok(),
                "{secret}"
            );
        }
        let again = init(&options(dir.clone())).await.unwrap_err().to_string();
        assert!(
            again.contains("already exists") && again.contains("--dir"),
            "{again}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(temp.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no staging directory is left behind");
    }
}
