//! Certificate renewal: the agent trades its certificate for a new one at
//! two thirds of its lifetime, over its authenticated connection
//! (`RenewCertificate`), with a new key generated here.
//!
//! The identity directory (`ca.pem`, `cert.pem`, `key.pem`) is replaced
//! whole (`cairn_common::config::replace_directory_files`: a staged copy
//! exchanged with it in one `renameat2(RENAME_EXCHANGE)`). A crash leaves
//! either the old pair or the new one, never a key of one and the
//! certificate of the other; [`clean_up`] removes what a crash left beside
//! it.
//!
//! The new certificate is used from the next connection (see
//! `control::session`): the coordinator keeps the old one valid until the
//! agent first connects with the new one, and then revokes it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_common::config::{clean_up_replacement, replace_directory_files};
use cairn_common::identity::{Identity, Principal, certificate_validity};
use cairn_common::pki::{generate_key_and_csr, renewal_due_unix};
use cairn_common::proto::{self, agent_gateway_client::AgentGatewayClient};
use cairn_common::tls::{IdentityPaths, parse_certificates};
use tonic::transport::Channel;

use crate::config::AgentConfig;
use crate::error::{AgentError, Result};

/// How long one renewal call may take.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of the wait between failed renewals: a fiftieth of the lifetime,
/// so that a one-minute certificate is retried every few seconds and a
/// year's every few hours at most.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// The certificate an agent holds on disk, and when it is due for renewal.
#[derive(Debug, Clone)]
pub struct HeldCertificate {
    pub serial: String,
    pub not_after: SystemTime,
    pub renew_at: SystemTime,
    /// The lifetime it was issued for.
    pub lifetime: Duration,
}

impl HeldCertificate {
    /// Reads the certificate in `paths`.
    pub fn read(paths: &IdentityPaths) -> Result<HeldCertificate> {
        let pem = std::fs::read(&paths.certificate).map_err(|e| {
            AgentError::io(format!("cannot read {}", paths.certificate.display()), e)
        })?;
        Self::from_pem(&pem)
    }

    fn from_pem(pem: &[u8]) -> Result<HeldCertificate> {
        let der = parse_certificates(pem, "the agent certificate")?;
        let first = der
            .first()
            .ok_or_else(|| AgentError::Invalid("the agent certificate file is empty".into()))?;
        let identity = Identity::from_certificate_der(first)?;
        let (not_before, not_after) = certificate_validity(first)?;
        let renew_at = renewal_due_unix(not_before, not_after);
        let at = |unix: i64| UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
        Ok(HeldCertificate {
            serial: identity.serial,
            not_after: at(not_after),
            renew_at: at(renew_at),
            lifetime: Duration::from_secs(((not_after - renew_at) * 3).max(0) as u64),
        })
    }

    /// How long to wait after a failed renewal before the next try.
    pub fn retry_delay(&self) -> Duration {
        (self.lifetime / 50).clamp(RETRY_MIN, RETRY_MAX)
    }

    /// Time left until `at` (zero once past).
    pub fn until(at: SystemTime) -> Duration {
        at.duration_since(SystemTime::now()).unwrap_or_default()
    }
}

/// Asks the coordinator for a new certificate over `channel` (which
/// presents the current one), checks it, and replaces the identity
/// directory with the new key and certificate. Returns the new certificate.
pub async fn renew(config: &AgentConfig, channel: Channel) -> Result<HeldCertificate> {
    // One renewal at a time in this process: a session that ends during a
    // renewal must not let the next one's renewal write the identity
    // directory at the same time.
    static RENEWING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _renewing = RENEWING.lock().await;
    let request = generate_key_and_csr(config.name.as_str())?;
    let mut call = tonic::Request::new(proto::RenewCertificateRequest {
        csr_pem: request.csr_pem.clone(),
    });
    call.set_timeout(RENEW_TIMEOUT);
    let response = AgentGatewayClient::new(channel)
        .renew_certificate(call)
        .await
        .map_err(|status| AgentError::RenewalRefused {
            code: status.code().to_string(),
            reason: status.message().to_string(),
        })?
        .into_inner();
    let der = parse_certificates(
        response.certificate_pem.as_bytes(),
        "certificate from the coordinator",
    )?;
    let identity = Identity::from_certificate_der(&der[0])?;
    if identity.principal != Principal::Agent(config.name.clone()) {
        return Err(AgentError::Protocol(format!(
            "the renewed certificate names {} instead of agent {}",
            identity.principal, config.name
        )));
    }
    if !cairn_common::pki::certificate_matches_key(&der[0], &request.key_pem)? {
        return Err(AgentError::Protocol(
            "the renewed certificate is not for the key this agent just generated".into(),
        ));
    }
    let held = HeldCertificate::from_pem(response.certificate_pem.as_bytes())?;
    replace_identity(
        &config.identity_dir,
        response.certificate_pem.as_bytes(),
        request.key_pem.as_bytes(),
    )?;
    Ok(held)
}

/// Removes what a crashed renewal left beside the identity directory
/// (which itself is always whole).
pub fn clean_up(identity_dir: &Path) -> Result<()> {
    if clean_up_replacement(identity_dir)? {
        tracing::info!(dir = %identity_dir.display(), "removed what an interrupted certificate renewal left");
    }
    Ok(())
}

/// Replaces the identity directory's key and certificate together (see
/// `cairn_common::config::replace_directory_files`).
pub fn replace_identity(identity_dir: &Path, certificate_pem: &[u8], key_pem: &[u8]) -> Result<()> {
    let paths = IdentityPaths::in_dir(identity_dir);
    let name = |path: &Path| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    replace_directory_files(
        identity_dir,
        &[
            (&name(&paths.certificate), certificate_pem, 0o644),
            (&name(&paths.key), key_pem, 0o600),
        ],
    )?;
    Ok(())
}
