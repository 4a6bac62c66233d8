//! The Admin gRPC service that operators call. Every handler checks the
//! caller's role first (the interceptor already refused non-operators).

use std::sync::Arc;
use std::time::Duration;

use cairn_common::identity::Role;
use cairn_common::proto::{self, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::audit::{AuditEvent, Outcome, verify};
use crate::audit_log::AuditLog;
use crate::auth::require_role;
use crate::authority::Authority;
use crate::catalog::{AgentRecord, Catalog};
use crate::fleet::{CommandOutcome, Fleet};

const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_AUDIT_LIMIT: u32 = 100;

#[derive(Debug, Clone)]
pub struct AdminService {
    pub authority: Arc<Authority>,
    pub catalog: Arc<Catalog>,
    pub fleet: Arc<Fleet>,
    pub audit: AuditLog,
}

impl AdminService {
    fn summary(&self, agent: &AgentRecord) -> proto::AgentSummary {
        let status = if agent.revoked_at.is_some() {
            proto::AgentStatus::Revoked
        } else if self.fleet.is_online(&agent.name) {
            proto::AgentStatus::Online
        } else {
            proto::AgentStatus::Offline
        };
        proto::AgentSummary {
            name: agent.name.clone(),
            status: status as i32,
            hostname: agent.hostname.clone(),
            version: agent.version.clone(),
            labels: agent.labels.clone().into_iter().collect(),
            instances: agent.instances.clone(),
            permitted_operations: agent
                .permitted_operations
                .iter()
                .map(|op| proto::Operation::from(*op) as i32)
                .collect(),
            peer_address: agent.peer_address.clone(),
            enrolled_at_unix_ms: agent.enrolled_at,
            last_seen_at_unix_ms: agent
                .last_seen_at
                .max(self.fleet.last_heartbeat_ms(&agent.name))
                .unwrap_or(0),
            certificate_serial: agent.certificate_serial.clone(),
            certificate_not_after_unix_ms: agent.certificate_not_after,
            revoked_at_unix_ms: agent.revoked_at.unwrap_or(0),
        }
    }

    async fn agent_record(&self, name: &str) -> Result<AgentRecord, Status> {
        self.catalog.get_agent(name).await?.ok_or_else(|| {
            Status::not_found(format!("no agent named {name:?}: see cairn agents list"))
        })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_enrollment_token(
        &self,
        request: Request<proto::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<proto::CreateEnrollmentTokenResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "token.create").await?;
        let body = request.into_inner();
        let created = self
            .authority
            .create_token(
                &identity.principal.to_string(),
                &body.agent_name,
                Duration::from_secs(body.ttl_seconds),
            )
            .await?;
        Ok(Response::new(proto::CreateEnrollmentTokenResponse {
            token: created.token.expose(),
            expires_at_unix_ms: created.expires_at_ms,
        }))
    }

    async fn list_agents(
        &self,
        request: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "agents.list").await?;
        let agents = self.catalog.list_agents().await?;
        Ok(Response::new(proto::ListAgentsResponse {
            agents: agents.iter().map(|a| self.summary(a)).collect(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<proto::GetAgentRequest>,
    ) -> Result<Response<proto::GetAgentResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "agents.show").await?;
        let name = request.into_inner().agent_name;
        let agent = self.agent_record(&name).await?;
        let probes = self.catalog.probes_of(&name).await?;
        Ok(Response::new(proto::GetAgentResponse {
            agent: Some(self.summary(&agent)),
            probes: probes.into_iter().map(Into::into).collect(),
        }))
    }

    async fn revoke_agent(
        &self,
        request: Request<proto::RevokeAgentRequest>,
    ) -> Result<Response<proto::RevokeAgentResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "agent.revoke").await?;
        let name = request.into_inner().agent_name;
        let revoked_at = self
            .authority
            .revoke_agent(&identity.principal.to_string(), &name)
            .await?;
        Ok(Response::new(proto::RevokeAgentResponse {
            revoked_at_unix_ms: revoked_at,
        }))
    }

    async fn probe_agent(
        &self,
        request: Request<proto::ProbeAgentRequest>,
    ) -> Result<Response<proto::ProbeAgentResponse>, Status> {
        let identity = require_role(&request, Role::Operator, &self.audit, "agent.probe").await?;
        let body = request.into_inner();
        let agent = self.agent_record(&body.agent_name).await?;
        if agent.revoked_at.is_some() {
            return Err(Status::failed_precondition(format!(
                "agent {:?} is revoked",
                agent.name
            )));
        }
        let timeout = match body.timeout_ms {
            0 => DEFAULT_PROBE_TIMEOUT,
            ms => Duration::from_millis(ms).min(MAX_PROBE_TIMEOUT),
        };
        let outcome = self
            .fleet
            .send_command(
                &agent.name,
                proto::command::Kind::Probe(proto::ProbeCommand { instances: vec![] }),
                timeout,
            )
            .await;
        let (audit_outcome, detail) = match &outcome {
            Ok(CommandOutcome::Probe(probes)) => {
                (Outcome::Success, format!("{} instance(s)", probes.len()))
            }
            Ok(CommandOutcome::Refused { reason, .. }) => (Outcome::Refused, reason.clone()),
            Ok(CommandOutcome::Error(error)) => (Outcome::Failed, error.clone()),
            Err(error) => (Outcome::Failed, error.to_string()),
        };
        self.audit
            .record(AuditEvent::new(
                identity.principal.to_string(),
                "agent.probe",
                agent.name.as_str(),
                audit_outcome,
                detail,
            ))
            .await;
        match outcome? {
            CommandOutcome::Probe(probes) => Ok(Response::new(proto::ProbeAgentResponse {
                result: Some(proto::ProbeResult {
                    instances: probes.into_iter().map(Into::into).collect(),
                }),
            })),
            CommandOutcome::Refused { reason, .. } => Err(Status::permission_denied(reason)),
            CommandOutcome::Error(error) => Err(Status::internal(error)),
        }
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "audit.list").await?;
        let limit = match request.into_inner().limit {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n.min(10_000),
        };
        let rows = self.catalog.recent_audit(limit).await?;
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: rows
                .into_iter()
                .map(|row| proto::AuditEvent {
                    id: row.id,
                    at_unix_ms: row.at,
                    actor: row.actor,
                    action: row.action,
                    target: row.target,
                    outcome: row.outcome,
                    detail: row.detail,
                    hash: row.hash,
                })
                .collect(),
        }))
    }

    async fn verify_audit_log(
        &self,
        request: Request<proto::VerifyAuditLogRequest>,
    ) -> Result<Response<proto::VerifyAuditLogResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "audit.verify").await?;
        let rows = self.catalog.all_audit().await?;
        let report = verify(&rows);
        Ok(Response::new(proto::VerifyAuditLogResponse {
            ok: report.ok,
            rows_checked: report.rows_checked,
            first_bad_row: report.first_bad_row.unwrap_or(0),
            problem: report.problem.unwrap_or_default(),
        }))
    }

    async fn issue_operator_certificate(
        &self,
        request: Request<proto::IssueOperatorCertificateRequest>,
    ) -> Result<Response<proto::IssueOperatorCertificateResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "operator.issue").await?;
        let body = request.into_inner();
        let role = cairn_common::model::role_from_wire(body.role)?;
        let issued = self
            .authority
            .issue_operator(
                &identity.principal.to_string(),
                &body.name,
                role,
                &body.csr_pem,
            )
            .await?;
        Ok(Response::new(proto::IssueOperatorCertificateResponse {
            certificate_pem: issued.pem,
            ca_pem: self.authority.ca_pem().to_string(),
        }))
    }

    async fn revoke_operator(
        &self,
        request: Request<proto::RevokeOperatorRequest>,
    ) -> Result<Response<proto::RevokeOperatorResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "operator.revoke").await?;
        let name = request.into_inner().name;
        let revoked_serials = self
            .authority
            .revoke_operator(&identity.principal.to_string(), &name)
            .await?;
        Ok(Response::new(proto::RevokeOperatorResponse {
            revoked_serials,
        }))
    }
}
