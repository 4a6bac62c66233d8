//! The Admin gRPC service that operators call. Every handler checks the
//! caller's role first (the interceptor already refused non-operators).

use std::sync::Arc;
use std::time::Duration;

use cairn_common::identity::Role;
use cairn_common::proto::{self, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::api::auth::require_role;
use crate::api::wire::{
    attempt_to_wire, backup_to_wire, job_to_wire, key_slot_to_wire, schedule_to_wire,
};
use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, ChainVerifier, Outcome};
use crate::catalog::ScheduleRecord;
use crate::catalog::{AgentRecord, Catalog, PageKey};
use crate::fleet::authority::Authority;
use crate::fleet::{CommandOutcome, Fleet};
use crate::jobs::restores::RestoreRequest;
use crate::jobs::{BackupRequest, Jobs, RunOptions};
use crate::schedules::manage::ScheduleRequest;
use crate::schedules::timing::CronSchedule;

/// The longest grace a collection takes.
const GC_GRACE_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_AUDIT_LIMIT: u32 = 100;
const DEFAULT_PAGE_LIMIT: u32 = 100;
const DEFAULT_JOBS_LIMIT: u32 = 50;
/// The most rows one page of a listing holds, whatever the caller asks:
/// a page always fits a message.
const PAGE_LIMIT_MAX: u32 = 1000;
/// Audit rows read at a time by `audit verify`.
const AUDIT_VERIFY_PAGE: u32 = 2000;

/// A page size: `requested`, or `default` for 0, at most [`PAGE_LIMIT_MAX`].
fn page_limit(requested: u32, default: u32) -> u32 {
    match requested {
        0 => default,
        n => n.min(PAGE_LIMIT_MAX),
    }
}

fn bad_page_token(token: &str) -> Status {
    Status::invalid_argument(format!(
        "invalid page_token {token:?}: pass the next_page_token of the page before, or none"
    ))
}

/// The position a `page_token` names; `None` for the first page.
fn page_key(token: &str) -> Result<Option<PageKey>, Status> {
    match token {
        "" => Ok(None),
        token => PageKey::parse(token)
            .map(Some)
            .ok_or_else(|| bad_page_token(token)),
    }
}

/// The token of the page after `rows`: empty when `rows` is not full (the
/// last page).
fn next_page_token<T>(rows: &[T], limit: u32, key: impl Fn(&T) -> PageKey) -> String {
    match rows.last() {
        Some(last) if rows.len() == limit as usize => key(last).token(),
        _ => String::new(),
    }
}

#[derive(Debug, Clone)]
pub struct AdminService {
    pub authority: Arc<Authority>,
    pub catalog: Arc<Catalog>,
    pub fleet: Arc<Fleet>,
    pub audit: AuditLog,
    pub jobs: Arc<Jobs>,
    pub repository: Arc<crate::repository::Repository>,
    pub keys: crate::repository::keys::MasterKeys,
    /// `[gc]`: the grace a collection uses unless the caller names one.
    pub gc: crate::config::GcConfig,
    /// This coordinator's name in the collection lease.
    pub gc_node: String,
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

    pub(crate) async fn agent_record(&self, name: &str) -> Result<AgentRecord, Status> {
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
            Ok(
                CommandOutcome::JobDone(_)
                | CommandOutcome::Cancelled(_)
                | CommandOutcome::Interrupted(_),
            ) => (Outcome::Failed, "unexpected answer".to_string()),
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
            CommandOutcome::JobDone(_)
            | CommandOutcome::Cancelled(_)
            | CommandOutcome::Interrupted(_) => {
                Err(Status::internal("the agent answered a probe as a job"))
            }
        }
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "audit.list").await?;
        let body = request.into_inner();
        let limit = page_limit(body.limit, DEFAULT_AUDIT_LIMIT);
        let before = match body.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<i64>().map_err(|_| bad_page_token(token))?),
        };
        let rows = self.catalog.audit_page(before, limit).await?;
        let next_page_token = match rows.last() {
            Some(last) if rows.len() == limit as usize => last.id.to_string(),
            _ => String::new(),
        };
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
            next_page_token,
        }))
    }

    async fn verify_audit_log(
        &self,
        request: Request<proto::VerifyAuditLogRequest>,
    ) -> Result<Response<proto::VerifyAuditLogResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "audit.verify").await?;
        // A page at a time: constant memory however long the log is.
        let mut chain = ChainVerifier::default();
        let report = loop {
            let rows = self
                .catalog
                .audit_after(chain.last_id(), AUDIT_VERIFY_PAGE)
                .await?;
            if let Some(bad) = chain.feed(&rows) {
                break bad;
            }
            if rows.len() < AUDIT_VERIFY_PAGE as usize {
                break chain.finish();
            }
        };
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

    async fn renew_operator_certificate(
        &self,
        request: Request<proto::RenewOperatorCertificateRequest>,
    ) -> Result<Response<proto::RenewOperatorCertificateResponse>, Status> {
        let identity = require_role(&request, Role::Viewer, &self.audit, "operator.renew").await?;
        let csr_pem = request.into_inner().csr_pem;
        let issued = self.authority.renew_operator(&identity, &csr_pem).await?;
        Ok(Response::new(proto::RenewOperatorCertificateResponse {
            certificate_pem: issued.pem,
            ca_pem: self.authority.ca_pem().to_string(),
            not_after_unix: issued.not_after_unix,
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

    async fn start_backup(
        &self,
        request: Request<proto::StartBackupRequest>,
    ) -> Result<Response<proto::StartBackupResponse>, Status> {
        let identity = require_role(&request, Role::Operator, &self.audit, "backup.start").await?;
        let body = request.into_inner();
        let jobs = self
            .jobs
            .start_backup(
                &identity.principal.to_string(),
                BackupRequest {
                    agent: body.agent_name,
                    instance: body.instance,
                    database: (!body.database.is_empty()).then_some(body.database),
                    all_databases: body.all_databases,
                    databases: body.databases,
                    tags: body.tags.into_iter().collect(),
                    options: RunOptions::from_proto(body.options)?,
                },
            )
            .await?;
        Ok(Response::new(proto::StartBackupResponse {
            jobs: jobs.into_iter().map(job_to_wire).collect(),
        }))
    }

    async fn list_backups(
        &self,
        request: Request<proto::ListBackupsRequest>,
    ) -> Result<Response<proto::ListBackupsResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "backups.list").await?;
        let body = request.into_inner();
        let limit = page_limit(body.limit, DEFAULT_PAGE_LIMIT);
        let after = page_key(&body.page_token)?;
        let backups = self
            .catalog
            .list_backups(
                (!body.agent_name.is_empty()).then_some(body.agent_name.as_str()),
                (!body.database.is_empty()).then_some(body.database.as_str()),
                after.as_ref(),
                limit,
            )
            .await?;
        let next_page_token = next_page_token(&backups, limit, |b| PageKey {
            started_at: b.started_at,
            id: b.id.clone(),
        });
        // At most one page of ids: a bounded IN list.
        let ids: Vec<String> = backups.iter().map(|b| b.id.clone()).collect();
        let mut verified = self.catalog.latest_verifications(&ids).await?;
        Ok(Response::new(proto::ListBackupsResponse {
            backups: backups
                .into_iter()
                .map(|backup| {
                    let verification = verified.remove(&backup.id);
                    backup_to_wire(backup, verification)
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn get_backup(
        &self,
        request: Request<proto::GetBackupRequest>,
    ) -> Result<Response<proto::Backup>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "backups.show").await?;
        let id = request.into_inner().backup_id;
        let backup = self
            .catalog
            .get_backup(&id)
            .await?
            .filter(crate::catalog::BackupRecord::is_listed)
            .ok_or_else(|| {
                Status::not_found(format!("no complete backup {id}: see cairn backups list"))
            })?;
        let mut verified = self
            .catalog
            .latest_verifications(std::slice::from_ref(&backup.id))
            .await?;
        let verification = verified.remove(&backup.id);
        Ok(Response::new(backup_to_wire(backup, verification)))
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "jobs.list").await?;
        let body = request.into_inner();
        let limit = page_limit(body.limit, DEFAULT_JOBS_LIMIT);
        let after = page_key(&body.page_token)?;
        let jobs = self.catalog.list_jobs(after.as_ref(), limit).await?;
        let next_page_token = next_page_token(&jobs, limit, |j| PageKey {
            started_at: j.created_at,
            id: j.id.clone(),
        });
        Ok(Response::new(proto::ListJobsResponse {
            jobs: jobs.into_iter().map(job_to_wire).collect(),
            next_page_token,
        }))
    }

    async fn get_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "jobs.show").await?;
        let id = request.into_inner().job_id;
        let job = self
            .catalog
            .get_job(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no job {id}: see cairn jobs list")))?;
        let attempts = self.catalog.job_attempts(&id).await?;
        let mut job = job_to_wire(job);
        job.attempts = attempts.into_iter().map(attempt_to_wire).collect();
        Ok(Response::new(job))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let identity = require_role(&request, Role::Operator, &self.audit, "job.cancel").await?;
        let id = request.into_inner().job_id;
        let job = self
            .jobs
            .cancel(&identity.principal.to_string(), &id)
            .await?;
        Ok(Response::new(job_to_wire(job)))
    }

    async fn start_restore(
        &self,
        request: Request<proto::StartRestoreRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let identity = require_role(&request, Role::Operator, &self.audit, "restore.start").await?;
        let body = request.into_inner();
        let job = self
            .jobs
            .start_restore(
                &identity.principal.to_string(),
                RestoreRequest {
                    backup_id: body.backup_id,
                    agent: body.agent_name,
                    instance: body.instance,
                    database: (!body.database.is_empty()).then_some(body.database),
                    replace: body.replace,
                    drop_previous: body.drop_previous,
                    no_owner: body.no_owner,
                    no_roles: body.no_roles,
                    jobs: body.jobs,
                    tables: body.tables,
                    schemas: body.schemas,
                    options: RunOptions::from_proto(body.options)?,
                },
            )
            .await?;
        Ok(Response::new(job_to_wire(job)))
    }

    async fn start_restore_drill(
        &self,
        request: Request<proto::StartRestoreDrillRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let identity = require_role(&request, Role::Operator, &self.audit, "drill.start").await?;
        let body = request.into_inner();
        let job = self
            .jobs
            .start_drill(
                &identity.principal.to_string(),
                &body.backup_id,
                &body.agent_name,
                &body.instance,
                RunOptions::from_proto(body.options)?,
            )
            .await?;
        Ok(Response::new(job_to_wire(job)))
    }

    async fn verify_backup(
        &self,
        request: Request<proto::VerifyBackupRequest>,
    ) -> Result<Response<proto::VerifyBackupResponse>, Status> {
        let identity = require_role(&request, Role::Operator, &self.audit, "backup.verify").await?;
        let backup_id = request.into_inner().backup_id;
        let report =
            crate::jobs::verify::verify_backup(&self.catalog, &self.repository, &backup_id).await?;
        self.audit
            .record(AuditEvent::new(
                identity.principal.to_string(),
                "backup.verify",
                backup_id.clone(),
                if report.ok {
                    Outcome::Success
                } else {
                    Outcome::Failed
                },
                format!(
                    "{} chunks, {} bytes checked, {} bad, {} other problems",
                    report.chunks_checked,
                    report.bytes_checked,
                    report.bad_chunks.len(),
                    report.problems.len()
                ),
            ))
            .await;
        Ok(Response::new(crate::api::wire::verify_report_to_wire(
            report,
        )))
    }

    async fn collect_garbage(
        &self,
        request: Request<proto::CollectGarbageRequest>,
    ) -> Result<Response<proto::CollectGarbageResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "repository.gc").await?;
        let request = request.into_inner();
        let grace = if request.no_grace {
            Duration::ZERO
        } else if request.grace_ms == 0 {
            self.gc.grace
        } else {
            Duration::from_millis(request.grace_ms)
        };
        if grace > GC_GRACE_MAX {
            return Err(Status::invalid_argument(
                "grace_ms: at most 365 days (31536000000 ms)",
            ));
        }
        let options = crate::repository::gc::GcOptions {
            grace,
            dry_run: request.dry_run,
        };
        let started = std::time::Instant::now();
        // Its own task: a caller that goes away does not cut the run (and
        // its deletions) halfway.
        let run = tokio::spawn({
            let catalog = self.catalog.clone();
            let repository = self.repository.clone();
            let holder = crate::repository::gc::holder_name(&self.gc_node);
            async move {
                crate::repository::gc::collect_garbage(catalog, repository, options, &holder).await
            }
        });
        let report = match run.await {
            Ok(Ok(report)) => report,
            Ok(Err(error)) => {
                self.audit
                    .record(AuditEvent::new(
                        identity.principal.to_string(),
                        "repository.gc",
                        self.repository.store.describe(),
                        Outcome::Failed,
                        format!("{}{error}", if options.dry_run { "dry run: " } else { "" }),
                    ))
                    .await;
                return Err(error.into());
            }
            Err(error) => {
                return Err(cairn_common::error::internal_status(&format!(
                    "the garbage collection stopped: {error}"
                )));
            }
        };
        self.audit
            .record(AuditEvent::new(
                identity.principal.to_string(),
                "repository.gc",
                report.repository.clone(),
                Outcome::Success,
                crate::repository::gc::audit_detail(&report),
            ))
            .await;
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(Response::new(crate::api::wire::gc_report_to_wire(
            report, millis,
        )))
    }

    async fn check_repository(
        &self,
        request: Request<proto::CheckRepositoryRequest>,
    ) -> Result<Response<proto::CheckRepositoryResponse>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "repository.check").await?;
        let read_data = request.into_inner().read_data;
        let started = std::time::Instant::now();
        // Its own task: a caller that goes away does not cut the check (and
        // its catalog updates) halfway.
        let check = tokio::spawn(crate::repository::check::check_repository(
            self.catalog.clone(),
            self.repository.clone(),
            read_data,
        ));
        let report = match check.await {
            Ok(result) => result?,
            Err(error) => {
                return Err(cairn_common::error::internal_status(&format!(
                    "the check stopped: {error}"
                )));
            }
        };
        self.audit
            .record(AuditEvent::new(
                identity.principal.to_string(),
                "repository.check",
                report.repository.clone(),
                if report.ok() {
                    Outcome::Success
                } else {
                    Outcome::Failed
                },
                format!(
                    "{}{} stored chunks: {} missing, {} corrupt, {} unreferenced; {} damaged backups, {} repaired",
                    if read_data { "read every chunk; " } else { "" },
                    report.stored_chunks,
                    report.missing.count,
                    report.corrupt.count,
                    report.unreferenced.count,
                    report.damaged_count,
                    report.repaired_backups
                ),
            ))
            .await;
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(Response::new(crate::api::wire::check_report_to_wire(
            report, millis,
        )))
    }

    async fn rotate_master_key(
        &self,
        request: Request<proto::RotateMasterKeyRequest>,
    ) -> Result<Response<proto::RotateMasterKeyResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "keys.rotate").await?;
        // Audited (success or failure) by `keys`, in the task that runs it.
        let rotation = self.keys.rotate(&identity.principal.to_string()).await?;
        Ok(Response::new(proto::RotateMasterKeyResponse {
            old_key_id: rotation.old_key_id,
            new_key_id: rotation.new_key_id,
            resolved: rotation.resolved.unwrap_or_default(),
        }))
    }

    async fn list_key_slots(
        &self,
        request: Request<proto::ListKeySlotsRequest>,
    ) -> Result<Response<proto::ListKeySlotsResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "keys.list").await?;
        let slots = self.keys.list().await?;
        Ok(Response::new(proto::ListKeySlotsResponse {
            slots: slots.into_iter().map(key_slot_to_wire).collect(),
        }))
    }

    async fn add_key_slot(
        &self,
        request: Request<proto::AddKeySlotRequest>,
    ) -> Result<Response<proto::AddKeySlotResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "keys.add").await?;
        let key = cairn_common::crypto::SecretKey::from_bytes(&request.into_inner().key)
            .map_err(|_| Status::invalid_argument("key: must be exactly 32 bytes"))?;
        let slot = self.keys.add(&identity.principal.to_string(), key).await?;
        Ok(Response::new(proto::AddKeySlotResponse {
            slot: Some(key_slot_to_wire(crate::repository::keys::ListedSlot {
                slot,
                in_use: false,
            })),
        }))
    }

    async fn remove_key_slot(
        &self,
        request: Request<proto::RemoveKeySlotRequest>,
    ) -> Result<Response<proto::RemoveKeySlotResponse>, Status> {
        let identity = require_role(&request, Role::Admin, &self.audit, "keys.remove").await?;
        let id = request.into_inner().id;
        self.keys
            .remove(&identity.principal.to_string(), &id)
            .await?;
        Ok(Response::new(proto::RemoveKeySlotResponse {}))
    }

    async fn create_schedule(
        &self,
        request: Request<proto::CreateScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "schedule.create").await?;
        let body = request
            .into_inner()
            .schedule
            .ok_or_else(|| Status::invalid_argument("schedule: missing"))?;
        let record = self
            .jobs
            .create_schedule(&identity.principal.to_string(), schedule_request(body))
            .await?;
        Ok(Response::new(self.schedule_summary(record)))
    }

    async fn list_schedules(
        &self,
        request: Request<proto::ListSchedulesRequest>,
    ) -> Result<Response<proto::ListSchedulesResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "schedule.list").await?;
        let schedules = self.catalog.list_schedules().await?;
        Ok(Response::new(proto::ListSchedulesResponse {
            schedules: schedules
                .into_iter()
                .map(|s| self.schedule_summary(s))
                .collect(),
        }))
    }

    async fn get_schedule(
        &self,
        request: Request<proto::GetScheduleRequest>,
    ) -> Result<Response<proto::ScheduleDetail>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "schedule.show").await?;
        let detail = self
            .jobs
            .schedule_detail(&request.into_inner().name)
            .await?;
        Ok(Response::new(proto::ScheduleDetail {
            next_fires_unix_ms: detail
                .next_fires
                .iter()
                .map(chrono::DateTime::timestamp_millis)
                .collect(),
            targets: detail
                .targets
                .into_iter()
                .map(|(target, offset)| proto::ScheduleTarget {
                    agent_name: target.agent,
                    instance: target.instance,
                    database: target.database,
                    slot_offset_ms: u64::try_from(offset.as_millis()).unwrap_or(u64::MAX),
                })
                .collect(),
            problems: detail.problems,
            schedule: Some(self.schedule_summary(detail.schedule)),
        }))
    }

    async fn set_schedule_paused(
        &self,
        request: Request<proto::SetSchedulePausedRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "schedule.pause").await?;
        let body = request.into_inner();
        let record = self
            .jobs
            .set_schedule_paused(&identity.principal.to_string(), &body.name, body.paused)
            .await?;
        Ok(Response::new(self.schedule_summary(record)))
    }

    async fn delete_schedule(
        &self,
        request: Request<proto::DeleteScheduleRequest>,
    ) -> Result<Response<proto::DeleteScheduleResponse>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "schedule.delete").await?;
        self.jobs
            .delete_schedule(&identity.principal.to_string(), &request.into_inner().name)
            .await?;
        Ok(Response::new(proto::DeleteScheduleResponse {}))
    }

    async fn run_schedule_now(
        &self,
        request: Request<proto::RunScheduleNowRequest>,
    ) -> Result<Response<proto::StartBackupResponse>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "schedule.run-now").await?;
        let jobs = self
            .jobs
            .run_schedule_now(&identity.principal.to_string(), &request.into_inner().name)
            .await?;
        Ok(Response::new(proto::StartBackupResponse {
            jobs: jobs.into_iter().map(job_to_wire).collect(),
        }))
    }

    async fn get_coverage(
        &self,
        request: Request<proto::GetCoverageRequest>,
    ) -> Result<Response<proto::GetCoverageResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "coverage").await?;
        let selector = request.into_inner().selector.into_iter().collect();
        let rows = self.jobs.coverage(&selector).await?;
        Ok(Response::new(proto::GetCoverageResponse {
            entries: rows
                .into_iter()
                .map(|row| proto::CoverageEntry {
                    agent_name: row.agent,
                    instance: row.instance,
                    database: row.database,
                    schedules: row.schedules,
                    last_backup_unix_ms: row
                        .last_backup
                        .as_ref()
                        .and_then(|b| b.finished_at)
                        .unwrap_or(0),
                    last_backup_id: row.last_backup.map(|b| b.id).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn create_retention_policy(
        &self,
        request: Request<proto::CreateRetentionPolicyRequest>,
    ) -> Result<Response<proto::RetentionPolicy>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "retention.create").await?;
        let policy = self
            .create_policy(&identity.principal.to_string(), request.into_inner())
            .await?;
        Ok(Response::new(policy))
    }

    async fn list_retention_policies(
        &self,
        request: Request<proto::ListRetentionPoliciesRequest>,
    ) -> Result<Response<proto::ListRetentionPoliciesResponse>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "retention.list").await?;
        let mut policies = Vec::new();
        for record in self.catalog.list_retention_policies().await? {
            policies.push(self.policy_to_wire(record).await?);
        }
        Ok(Response::new(proto::ListRetentionPoliciesResponse {
            policies,
        }))
    }

    async fn get_retention_policy(
        &self,
        request: Request<proto::GetRetentionPolicyRequest>,
    ) -> Result<Response<proto::RetentionPolicy>, Status> {
        require_role(&request, Role::Viewer, &self.audit, "retention.show").await?;
        let record = self.policy_named(&request.into_inner().name).await?;
        Ok(Response::new(self.policy_to_wire(record).await?))
    }

    async fn delete_retention_policy(
        &self,
        request: Request<proto::DeleteRetentionPolicyRequest>,
    ) -> Result<Response<proto::DeleteRetentionPolicyResponse>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "retention.delete").await?;
        self.delete_policy(&identity.principal.to_string(), &request.into_inner().name)
            .await?;
        Ok(Response::new(proto::DeleteRetentionPolicyResponse {}))
    }

    async fn set_schedule_retention(
        &self,
        request: Request<proto::SetScheduleRetentionRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "schedule.retention").await?;
        let schedule = self
            .set_schedule_policy(&identity.principal.to_string(), request.into_inner())
            .await?;
        Ok(Response::new(schedule))
    }

    async fn set_backup_protected(
        &self,
        request: Request<proto::SetBackupProtectedRequest>,
    ) -> Result<Response<proto::Backup>, Status> {
        let identity =
            require_role(&request, Role::Operator, &self.audit, "backup.protect").await?;
        let backup = self
            .set_protected(&identity.principal.to_string(), request.into_inner())
            .await?;
        Ok(Response::new(backup))
    }

    async fn apply_retention(
        &self,
        request: Request<proto::ApplyRetentionRequest>,
    ) -> Result<Response<proto::ApplyRetentionResponse>, Status> {
        // A dry run deletes nothing: whoever may list backups may see it.
        let role = if request.get_ref().dry_run {
            Role::Viewer
        } else {
            Role::Operator
        };
        let identity = require_role(&request, role, &self.audit, "retention.apply").await?;
        let report = self
            .apply(&identity.principal.to_string(), request.into_inner())
            .await?;
        Ok(Response::new(report))
    }
}

/// A `cairn schedule create` request as the engine takes it.
fn schedule_request(body: proto::Schedule) -> ScheduleRequest {
    let duration = |ms: u64| std::time::Duration::from_millis(ms);
    ScheduleRequest {
        name: body.name,
        agent: (!body.agent_name.is_empty()).then_some(body.agent_name),
        selector: body.selector.into_iter().collect(),
        databases: body.databases,
        all_databases: body.all_databases,
        cron: body.cron,
        timezone: body.timezone,
        spread: duration(body.spread_ms),
        on_overlap: body.on_overlap,
        catch_up: duration(body.catch_up_ms),
        retries: body.retries,
        timeout: (body.timeout_ms > 0).then(|| duration(body.timeout_ms)),
        kind: body.kind,
        drill_agent: (!body.drill_agent.is_empty()).then_some(body.drill_agent),
        retention: (!body.retention_policy.is_empty()).then_some(body.retention_policy),
    }
}

impl AdminService {
    /// A schedule as the API sends it, with its next fire.
    pub(crate) fn schedule_summary(&self, record: ScheduleRecord) -> proto::Schedule {
        let next = CronSchedule::parse(&record.cron, &record.timezone)
            .ok()
            .and_then(|timing| {
                let now = chrono::DateTime::from_timestamp_millis(self.jobs.clock.now_ms())?;
                timing.next_fires(now, 1).first().copied()
            })
            .filter(|_| !record.paused)
            .map_or(0, |at| at.timestamp_millis());
        schedule_to_wire(record, next)
    }
}
