//! `cairn-agent enroll`: trade a one-time token for a client certificate.
//!
//! Order matters so that a failure leaves nothing behind and wastes no
//! token: check the inputs and the local PostgreSQL first, prepare the
//! staging directory, then call the coordinator (trusting only the CA whose
//! hash the token pins), check what came back, and rename the staging
//! directory into place. The private key is generated here and never sent.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_common::config::{StagedDirectory, write_file_atomic};
use cairn_common::identity::{Identity, Principal};
use cairn_common::model::Operation;
use cairn_common::names::{AgentName, InstanceName};
use cairn_common::pki::{ca_fingerprint, generate_key_and_csr};
use cairn_common::proto::{self, agent_gateway_client::AgentGatewayClient};
use cairn_common::tls::{self, CoordinatorUrl, IdentityPaths, parse_certificates};
use cairn_common::token::EnrollmentToken;

use crate::config::{
    AgentConfig, DEFAULT_RECONNECT_MAX_BACKOFF, InstanceConfig, PROBE_INTERVAL_RANGE, Permissions,
};
use crate::error::{AgentError, Result};
use crate::postgres::{self, ConnectionString};

const POSTGRES_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct EnrollOptions {
    pub coordinator: String,
    /// The whole token. Secret.
    pub token: String,
    /// Defaults to the name the token was made for.
    pub name: Option<String>,
    pub dir: PathBuf,
    pub postgres: String,
    pub instance_name: String,
    pub labels: Vec<String>,
    pub allow: Vec<Operation>,
    pub source_address: Option<IpAddr>,
    pub probe_interval: Duration,
}

/// Leaves out the token and the connection string (which may hold a password).
impl std::fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("coordinator", &self.coordinator)
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("instance_name", &self.instance_name)
            .field("labels", &self.labels)
            .field("allow", &self.allow)
            .field("source_address", &self.source_address)
            .field("probe_interval", &self.probe_interval)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub name: AgentName,
    pub config_file: PathBuf,
    pub server_version: String,
}

pub async fn enroll(options: &EnrollOptions) -> Result<Enrolled> {
    let url = CoordinatorUrl::parse(&options.coordinator)?;
    let token = EnrollmentToken::parse(&options.token)?;
    let name = match &options.name {
        Some(name) => AgentName::new(name.as_str())?,
        None => token.agent.clone(),
    };
    let instance_name = InstanceName::new(options.instance_name.as_str())?;
    if !PROBE_INTERVAL_RANGE.contains(&options.probe_interval) {
        return Err(AgentError::Invalid(
            "--probe-interval must be between 1s and 1h, for example 15s".into(),
        ));
    }
    let labels = parse_labels(&options.labels)?;
    let connection = ConnectionString::parse(&options.postgres)?;
    let staged = StagedDirectory::new(&options.dir, "--dir")?;

    let config = AgentConfig {
        name: name.clone(),
        coordinator: url.to_string(),
        identity_dir: PathBuf::from("identity"),
        source_address: options.source_address,
        probe_interval: options.probe_interval,
        reconnect_max_backoff: DEFAULT_RECONNECT_MAX_BACKOFF,
        spool_dir: None,
        config_dir: PathBuf::new(),
        permissions: Permissions {
            allow: options.allow.iter().copied().collect(),
        },
        labels,
        instances: vec![InstanceConfig {
            name: instance_name,
            postgres: connection.clone(),
        }],
    };
    config.validate().map_err(AgentError::Invalid)?;

    let server_version = postgres::check_reachable(&connection, POSTGRES_CHECK_TIMEOUT)
        .await
        .map_err(|e| {
            AgentError::Invalid(format!(
                "{e}: check --postgres; enrollment needs the local instance reachable"
            ))
        })?;

    enroll_into(
        staged.path(),
        &url,
        &token,
        &name,
        &config,
        options.source_address,
    )
    .await?;
    let dir = staged.commit()?;
    Ok(Enrolled {
        name,
        config_file: dir.join("agent.toml"),
        server_version,
    })
}

async fn enroll_into(
    staging: &Path,
    url: &CoordinatorUrl,
    token: &EnrollmentToken,
    name: &AgentName,
    config: &AgentConfig,
    source_address: Option<IpAddr>,
) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(staging.join("identity"))
        .map_err(|e| AgentError::io(format!("cannot create {}", staging.display()), e))?;

    let request = generate_key_and_csr(name.as_str())?;
    let channel = tls::connect(
        url,
        tls::pinned_client_config(&token.ca_sha256)?,
        source_address,
    )
    .await
    .map_err(|e| AgentError::CoordinatorUnreachable {
        url: url.to_string(),
        reason: match e {
            cairn_common::Error::Connect { reason, .. } => reason,
            other => other.to_string(),
        },
    })?;
    let mut client = AgentGatewayClient::new(channel);
    let mut call = tonic::Request::new(proto::EnrollRequest {
        token: token.expose(),
        agent_name: name.to_string(),
        csr_pem: request.csr_pem.clone(),
    });
    call.set_timeout(ENROLL_TIMEOUT);
    let response = client
        .enroll(call)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument => {
                AgentError::EnrollmentRefused(status.message().to_string())
            }
            _ => AgentError::CoordinatorUnreachable {
                url: url.to_string(),
                reason: format!(
                    "{}: {}",
                    status.message(),
                    tls::describe_transport_error(&status)
                ),
            },
        })?
        .into_inner();

    // Trust, but verify: the CA must be the pinned one, and the certificate
    // must name us.
    let ca = parse_certificates(response.ca_pem.as_bytes(), "CA from the coordinator")?;
    if ca.first().map(|c| ca_fingerprint(c)) != Some(token.ca_sha256.clone()) {
        return Err(AgentError::Protocol(
            "the CA sent does not match the token's CA hash".into(),
        ));
    }
    let certificate = parse_certificates(
        response.certificate_pem.as_bytes(),
        "certificate from the coordinator",
    )?;
    let identity = Identity::from_certificate_der(&certificate[0])?;
    if identity.principal != Principal::Agent(name.clone()) {
        return Err(AgentError::Protocol(format!(
            "the certificate names {} instead of agent {name}",
            identity.principal
        )));
    }

    let paths = IdentityPaths::in_dir(&staging.join("identity"));
    write_file_atomic(&paths.ca, response.ca_pem.as_bytes(), 0o644)?;
    write_file_atomic(
        &paths.certificate,
        response.certificate_pem.as_bytes(),
        0o644,
    )?;
    write_file_atomic(&paths.key, request.key_pem.as_bytes(), 0o600)?;
    let text = toml::to_string(config)
        .map_err(|e| AgentError::Invalid(format!("cannot write agent.toml: {e}")))?;
    let header = "# Cairn agent configuration, written by `cairn-agent enroll`.\n# permissions.allow lists the operations this host accepts: backup, restore, replica, promote.\n\n";
    write_file_atomic(
        &staging.join("agent.toml"),
        format!("{header}{text}").as_bytes(),
        0o600,
    )?;
    Ok(())
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    cairn_common::names::parse_key_values("--label", "env=prod", labels)
        .map_err(AgentError::Invalid)
}
