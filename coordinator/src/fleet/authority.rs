//! The fleet CA at work: enrollment tokens, agent enrollment (CSR in,
//! certificate out), operator certificates, and revocation. Each action is
//! audited before its result is returned. Also the offline issue of an
//! operator identity (the break-glass path), with the CA on disk.

use std::sync::Arc;
use std::time::Duration;

use cairn_common::config::display_duration;
use cairn_common::identity::{Identity, Principal, Role};
use cairn_common::names::{AgentName, OperatorName};
use cairn_common::pki::{CertificateAuthority, IssuedCertificate, ca_fingerprint};
use cairn_common::tls::RevokedSerials;
use cairn_common::token::EnrollmentToken;

use crate::api::refusals::RefusalAudit;
use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{Catalog, CertificateRecord, TokenRecord, TokenRefusal};
use crate::clock::now_ms;
use crate::config::{CoordinatorConfig, FleetConfig, MIN_TOKEN_TTL};
use crate::error::{CoordinatorError, Result};
use crate::fleet::Fleet;

#[derive(Debug)]
pub struct Authority {
    ca: CertificateAuthority,
    catalog: Arc<Catalog>,
    audit: AuditLog,
    refusals: RefusalAudit,
    revoked: RevokedSerials,
    fleet: Arc<Fleet>,
    config: FleetConfig,
}

/// A token just made; `token` is the secret, shown once.
#[derive(Debug)]
pub struct CreatedToken {
    pub token: EnrollmentToken,
    pub expires_at_ms: i64,
}

impl Authority {
    pub fn new(
        ca: CertificateAuthority,
        catalog: Arc<Catalog>,
        audit: AuditLog,
        refusals: RefusalAudit,
        revoked: RevokedSerials,
        fleet: Arc<Fleet>,
        config: FleetConfig,
    ) -> Self {
        Authority {
            ca,
            catalog,
            audit,
            refusals,
            revoked,
            fleet,
            config,
        }
    }

    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }

    pub async fn create_token(
        &self,
        actor: &str,
        agent: &str,
        ttl: Duration,
    ) -> Result<CreatedToken> {
        let agent = AgentName::new(agent)?;
        if ttl < MIN_TOKEN_TTL || ttl > self.config.max_token_ttl {
            return Err(CoordinatorError::InvalidArgument(format!(
                "invalid --ttl {}: must be between {} and {} (fleet.max_token_ttl)",
                display_duration(ttl),
                display_duration(MIN_TOKEN_TTL),
                display_duration(self.config.max_token_ttl)
            )));
        }
        if let Some(existing) = self.catalog.get_agent(agent.as_str()).await?
            && existing.revoked_at.is_none()
        {
            let message = format!(
                "agent \"{agent}\" is already enrolled: revoke it first (cairn agents revoke {agent})"
            );
            self.audit
                .record(AuditEvent::new(
                    actor,
                    "token.create",
                    agent.as_str(),
                    Outcome::Refused,
                    message.clone(),
                ))
                .await;
            return Err(CoordinatorError::Conflict(message));
        }
        let token = EnrollmentToken::generate(agent.clone(), ca_fingerprint(self.ca.ca_der()))?;
        let now = now_ms();
        let expires_at_ms = now + ttl.as_millis() as i64;
        self.catalog
            .insert_token(&TokenRecord {
                id: token.id.clone(),
                agent_name: agent.to_string(),
                secret_sha256: token.secret_sha256(),
                created_by: actor.to_string(),
                created_at: now,
                expires_at: expires_at_ms,
            })
            .await?;
        self.audit
            .record_strict(AuditEvent::new(
                actor,
                "token.create",
                agent.as_str(),
                Outcome::Success,
                format!("token id {}, ttl {}", token.id, display_duration(ttl)),
            ))
            .await?;
        Ok(CreatedToken {
            token,
            expires_at_ms,
        })
    }

    /// Checks the token, signs the CSR, records the agent. The token is
    /// checked before anything else is said about the request, so a caller
    /// without a valid token learns nothing (not even whether a name is
    /// enrolled). Refusals are counted per client network (`RefusalAudit`).
    pub async fn enroll(
        &self,
        peer: &str,
        token_text: &str,
        agent_name: &str,
        csr_pem: &str,
    ) -> Result<IssuedCertificate> {
        let actor = format!("anonymous@{peer}");
        let refuse = |kind: &'static str, reason: String, target: String| {
            self.refusals.refuse(
                peer,
                kind,
                AuditEvent::new(
                    actor.clone(),
                    "agent.enroll",
                    target,
                    Outcome::Refused,
                    reason.clone(),
                ),
            );
            reason
        };
        let token = match EnrollmentToken::parse(token_text) {
            Ok(token) => token,
            Err(error) => {
                let reason = refuse(
                    "invalid token",
                    error.to_string(),
                    "(unparsable token)".to_string(),
                );
                return Err(CoordinatorError::Unauthenticated(reason));
            }
        };
        let requested = if agent_name.is_empty() {
            token.agent.clone()
        } else {
            match AgentName::new(agent_name) {
                Ok(name) => name,
                Err(error) => {
                    let reason = refuse(
                        "invalid agent name",
                        error.to_string(),
                        "(invalid name)".to_string(),
                    );
                    return Err(CoordinatorError::InvalidArgument(reason));
                }
            }
        };
        let now = now_ms();
        let token_refusal = |refusal: TokenRefusal| -> (&'static str, String) {
            match refusal {
                TokenRefusal::Unknown => (
                    "invalid token",
                    "the token is not valid: create a new one with cairn token create".to_string(),
                ),
                TokenRefusal::WrongAgent { bound_to } => (
                    "token for another agent",
                    format!("the token was made for agent \"{bound_to}\", not \"{requested}\""),
                ),
                TokenRefusal::Expired { expired_at } => (
                    "expired token",
                    format!(
                        "the token expired {} ago: create a new one with cairn token create --agent {requested}",
                        humantime::format_duration(Duration::from_secs(
                            ((now - expired_at) / 1000).max(0) as u64
                        ))
                    ),
                ),
                TokenRefusal::AlreadyUsed { .. } => (
                    "used token",
                    "the token was already used or revoked: tokens are single-use, create a new one"
                        .to_string(),
                ),
            }
        };
        let secret_sha256 = token.secret_sha256();
        if let Err(refusal) = self
            .catalog
            .check_token(&token.id, requested.as_str(), &secret_sha256, now)
            .await?
        {
            let (kind, reason) = token_refusal(refusal);
            let target = if kind == "invalid token" {
                "(invalid token)".to_string()
            } else {
                requested.to_string()
            };
            let reason = refuse(kind, reason, target);
            return Err(CoordinatorError::Unauthenticated(reason));
        }
        // The token is good. Everything else that can be refused without
        // spending it is checked next: an enrolled name, and the CSR
        // (signing is pure computation; the certificate is discarded
        // unless all succeeds).
        if let Some(existing) = self.catalog.get_agent(requested.as_str()).await?
            && existing.revoked_at.is_none()
        {
            let reason = refuse(
                "already enrolled",
                format!(
                    "agent \"{requested}\" is already enrolled: revoke it first (cairn agents revoke {requested})"
                ),
                requested.to_string(),
            );
            return Err(CoordinatorError::Conflict(reason));
        }
        let principal = Principal::Agent(requested.clone());
        let issued = match self.ca.issue_client_from_csr(
            &principal,
            csr_pem,
            self.config.agent_certificate_lifetime,
        ) {
            Ok(issued) => issued,
            Err(error) => {
                let reason = refuse("invalid CSR", error.to_string(), requested.to_string());
                return Err(CoordinatorError::InvalidArgument(reason));
            }
        };
        // Spent atomically: of two callers racing with one token, one wins.
        if let Err(refusal) = self
            .catalog
            .consume_token(&token.id, requested.as_str(), &secret_sha256, now)
            .await?
        {
            let (kind, reason) = token_refusal(refusal);
            let reason = refuse(kind, reason, requested.to_string());
            return Err(CoordinatorError::Unauthenticated(reason));
        }
        let record = CertificateRecord {
            serial: &issued.serial,
            kind: "agent",
            name: requested.as_str(),
            role: None,
            issued_at: now,
            not_after: issued.not_after_unix * 1000,
        };
        if let Err(error) = self
            .catalog
            .enroll_agent(requested.as_str(), &record, now)
            .await
        {
            refuse(
                "enrollment failed",
                error.to_string(),
                requested.to_string(),
            );
            return Err(error);
        }
        self.audit
            .record_strict(AuditEvent::new(
                format!("anonymous@{peer}"),
                "agent.enroll",
                requested.as_str(),
                Outcome::Success,
                format!(
                    "token id {}, certificate serial {}",
                    token.id, issued.serial
                ),
            ))
            .await?;
        Ok(issued)
    }

    pub async fn issue_operator(
        &self,
        actor: &str,
        name: &str,
        role: Role,
        csr_pem: &str,
    ) -> Result<IssuedCertificate> {
        let name = OperatorName::new(name)?;
        let principal = Principal::Operator { name, role };
        let issued = self.ca.issue_client_from_csr(
            &principal,
            csr_pem,
            self.config.operator_certificate_lifetime,
        )?;
        record_operator_certificate(&self.catalog, &principal, &issued).await?;
        self.audit
            .record_strict(AuditEvent::new(
                actor,
                "operator.issue",
                principal.to_string(),
                Outcome::Success,
                format!("certificate serial {}", issued.serial),
            ))
            .await?;
        Ok(issued)
    }

    /// Signs a new certificate for the calling operator's own identity (name
    /// and role from the certificate it called with) and records it; the
    /// old one stays valid until it expires. Audited either way.
    pub async fn renew_operator(
        &self,
        caller: &Identity,
        csr_pem: &str,
    ) -> Result<IssuedCertificate> {
        let principal = caller.principal.clone();
        let renewed = async {
            if !matches!(principal, Principal::Operator { .. }) {
                return Err(CoordinatorError::PermissionDenied(
                    "only operators renew operator certificates".into(),
                ));
            }
            let issued = self
                .ca
                .issue_client_from_csr(
                    &principal,
                    csr_pem,
                    self.config.operator_certificate_lifetime,
                )
                .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
            let Principal::Operator { name, role } = &principal else {
                return Err(CoordinatorError::InvalidArgument("not an operator".into()));
            };
            let recorded = self
                .catalog
                .insert_renewed_certificate(
                    &caller.serial,
                    &CertificateRecord {
                        serial: &issued.serial,
                        kind: "operator",
                        name: name.as_str(),
                        role: Some(role.as_str()),
                        issued_at: now_ms(),
                        not_after: issued.not_after_unix * 1000,
                    },
                )
                .await?;
            if !recorded {
                return Err(CoordinatorError::PermissionDenied(format!(
                    "certificate {} of {principal} is revoked or unknown: it cannot be renewed",
                    caller.serial
                )));
            }
            Ok(issued)
        }
        .await;
        match renewed {
            Ok(issued) => {
                self.audit
                    .record_strict(AuditEvent::new(
                        principal.to_string(),
                        "operator.renew",
                        principal.to_string(),
                        Outcome::Success,
                        format!(
                            "certificate serial {} renewed as {}",
                            caller.serial, issued.serial
                        ),
                    ))
                    .await?;
                Ok(issued)
            }
            Err(error) => {
                self.audit
                    .record(AuditEvent::new(
                        principal.to_string(),
                        "operator.renew",
                        principal.to_string(),
                        Outcome::Refused,
                        error.to_string(),
                    ))
                    .await;
                Err(error)
            }
        }
    }

    /// Revokes an agent: its certificates are refused from the next call on,
    /// and its control stream is closed now.
    pub async fn revoke_agent(&self, actor: &str, agent: &str) -> Result<i64> {
        let agent = AgentName::new(agent)?;
        let now = now_ms();
        let serials = match self.catalog.revoke_agent(agent.as_str(), now).await {
            Ok(serials) => serials,
            Err(error) => {
                self.audit
                    .record(AuditEvent::new(
                        actor,
                        "agent.revoke",
                        agent.as_str(),
                        Outcome::Failed,
                        error.to_string(),
                    ))
                    .await;
                return Err(error);
            }
        };
        for serial in &serials {
            self.revoked.insert(serial.clone());
        }
        self.fleet.disconnect(agent.as_str());
        self.audit
            .record_strict(AuditEvent::new(
                actor,
                "agent.revoke",
                agent.as_str(),
                Outcome::Success,
                format!("revoked serials {}", serials.join(",")),
            ))
            .await?;
        Ok(now)
    }
}

impl Authority {
    /// Renews agent `agent`'s certificate: signs the CSR's public key for
    /// the caller's own name (from the certificate the call came with,
    /// never from the request), records the new certificate, and audits
    /// the renewal or its refusal. The old certificate stays valid until the
    /// agent connects with the new one (see `Catalog::record_registration`).
    pub async fn renew_agent(
        &self,
        agent: &AgentName,
        caller_serial: &str,
        csr_pem: &str,
    ) -> Result<IssuedCertificate> {
        let actor = format!("agent:{agent}");
        let refused = |error: CoordinatorError| async {
            let outcome = match error {
                CoordinatorError::PermissionDenied(_)
                | CoordinatorError::NotFound(_)
                | CoordinatorError::InvalidArgument(_) => Outcome::Refused,
                _ => Outcome::Failed,
            };
            self.audit
                .record(AuditEvent::new(
                    actor.clone(),
                    "agent.renew",
                    agent.as_str(),
                    outcome,
                    error.to_string(),
                ))
                .await;
            error
        };
        let principal = Principal::Agent(agent.clone());
        let issued = match self.ca.issue_client_from_csr(
            &principal,
            csr_pem,
            self.config.agent_certificate_lifetime,
        ) {
            Ok(issued) => issued,
            Err(error) => {
                return Err(refused(CoordinatorError::InvalidArgument(error.to_string())).await);
            }
        };
        let record = CertificateRecord {
            serial: &issued.serial,
            kind: "agent",
            name: agent.as_str(),
            role: None,
            issued_at: now_ms(),
            not_after: issued.not_after_unix * 1000,
        };
        if let Err(error) = self
            .catalog
            .record_renewal(agent.as_str(), caller_serial, &record)
            .await
        {
            return Err(refused(error).await);
        }
        self.audit
            .record_strict(AuditEvent::new(
                actor,
                "agent.renew",
                agent.as_str(),
                Outcome::Success,
                format!(
                    "certificate serial {} renewed as {}, valid until {}",
                    caller_serial,
                    issued.serial,
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH
                            + Duration::from_secs(issued.not_after_unix.max(0) as u64)
                    )
                ),
            ))
            .await?;
        Ok(issued)
    }

    /// Called when an agent's first connection with a renewed certificate
    /// revoked its other serials: they are refused from now on (the
    /// connection that carries this agent's running jobs, if any, was
    /// opened before and keeps going; see ARCHITECTURE.md).
    pub async fn switched_certificate(&self, agent: &AgentName, serial: &str, revoked: &[String]) {
        for old in revoked {
            self.revoked.insert(old.clone());
        }
        self.audit
            .record(AuditEvent::new(
                format!("agent:{agent}"),
                "agent.certificate-switch",
                agent.as_str(),
                Outcome::Success,
                format!(
                    "now using certificate serial {serial}; revoked serials {}",
                    revoked.join(",")
                ),
            ))
            .await;
    }
}

impl Authority {
    /// Revokes an operator's certificates; they are refused from the next
    /// call on.
    pub async fn revoke_operator(&self, actor: &str, name: &str) -> Result<Vec<String>> {
        let name = OperatorName::new(name)?;
        let serials = match self.catalog.revoke_operator(name.as_str(), now_ms()).await {
            Ok(serials) => serials,
            Err(error) => {
                self.audit
                    .record(AuditEvent::new(
                        actor,
                        "operator.revoke",
                        format!("operator:{name}"),
                        if matches!(error, CoordinatorError::Conflict(_)) {
                            Outcome::Refused
                        } else {
                            Outcome::Failed
                        },
                        error.to_string(),
                    ))
                    .await;
                return Err(error);
            }
        };
        if serials.is_empty() {
            return Err(CoordinatorError::NotFound(format!(
                "operator \"{name}\" has no unrevoked certificate"
            )));
        }
        for serial in &serials {
            self.revoked.insert(serial.clone());
        }
        self.audit
            .record_strict(AuditEvent::new(
                actor,
                "operator.revoke",
                format!("operator:{name}"),
                Outcome::Success,
                format!("revoked serials {}", serials.join(",")),
            ))
            .await?;
        Ok(serials)
    }
}

/// An operator identity signed without a running coordinator.
#[derive(Debug)]
pub struct OfflineIssued {
    pub certificate: IssuedCertificate,
    pub ca_pem: String,
}

/// `cairn operators issue --offline --config coordinator.toml`: the
/// break-glass path for when no admin identity is left (lost, expired).
/// Whoever can read the CA key on the coordinator host may do this anyway;
/// doing it here makes it audited. It signs with the fleet CA on disk
/// (`tls.ca_key`), then records the certificate and an `operator.issue`
/// audit row directly in the catalog, and only then returns the
/// certificate: no audit row, no identity. SQLite lets this run next to
/// `cairn serve` (a catalog busy with a write is waited for), and the
/// server needs no restart, since it checks certificates against the CA and
/// the revoked serials only.
pub async fn issue_operator_offline(
    config: &CoordinatorConfig,
    name: &str,
    role: Role,
    csr_pem: &str,
) -> Result<OfflineIssued> {
    let name = OperatorName::new(name)?;
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read_to_string(path)
            .map_err(|e| CoordinatorError::io(format!("cannot read {what} {}", path.display()), e))
    };
    let ca = CertificateAuthority::load(
        &read(
            &config.tls.ca_certificate,
            "the CA certificate (tls.ca_certificate)",
        )?,
        &read(&config.tls.ca_key, "the CA key (tls.ca_key)")?,
    )?;
    let principal = Principal::Operator { name, role };
    let certificate = ca.issue_client_from_csr(
        &principal,
        csr_pem,
        config.fleet.operator_certificate_lifetime,
    )?;
    // Opening would create a missing catalog: an identity recorded in a
    // new, empty one would be audited nowhere anyone looks.
    if !config.catalog.sqlite_path.is_file() {
        return Err(CoordinatorError::InvalidArgument(format!(
            "catalog.sqlite_path {} does not exist: --config must be the coordinator's own coordinator.toml",
            config.catalog.sqlite_path.display()
        )));
    }
    let catalog = Catalog::open_sqlite(&config.catalog.sqlite_path).await?;
    let recorded = async {
        record_operator_certificate(&catalog, &principal, &certificate).await?;
        catalog
            .append_audit(&AuditEvent::new(
                "offline (cairn operators issue --offline)",
                "operator.issue",
                principal.to_string(),
                Outcome::Success,
                format!(
                    "certificate serial {}, signed with the CA key {} on the coordinator host",
                    certificate.serial,
                    config.tls.ca_key.display()
                ),
            ))
            .await
    }
    .await;
    catalog.close().await;
    recorded?;
    Ok(OfflineIssued {
        certificate,
        ca_pem: ca.ca_pem().to_string(),
    })
}

/// Remembers an operator certificate so that it can be revoked by serial.
pub async fn record_operator_certificate(
    catalog: &Catalog,
    principal: &Principal,
    issued: &IssuedCertificate,
) -> Result<()> {
    let Principal::Operator { name, role } = principal else {
        return Err(CoordinatorError::InvalidArgument("not an operator".into()));
    };
    catalog
        .insert_certificate(&CertificateRecord {
            serial: &issued.serial,
            kind: "operator",
            name: name.as_str(),
            role: Some(role.as_str()),
            issued_at: now_ms(),
            not_after: issued.not_after_unix * 1000,
        })
        .await
}
