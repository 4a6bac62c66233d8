//! The job engine: starts backup jobs on agents, follows them to their end,
//! and cancels them. A job is a row in the catalog; its live progress is
//! written there by the upload (see [`crate::jobs::upload`]).
//!
//! A backup job ends `succeeded` only if the agent reports it done *and*
//! the upload stored the manifest (the backup is complete in the catalog);
//! every other ending fails or cancels the job, and its backup is never
//! listed.

pub mod download;
pub mod restores;
pub mod upload;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::names::validate_label;
use cairn_common::proto::{self, command};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{AgentRecord, Catalog, JobRecord, JobStatus};
use crate::clock::now_ms;
use crate::config::BackupConfig;
use crate::error::{CoordinatorError, Result};
use crate::fleet::{CommandOutcome, Fleet};
use crate::repository::Repository;

/// How long a backup may run before the coordinator gives up on it.
const BACKUP_COMMAND_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
const CANCEL_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// PostgreSQL's identifier limit (NAMEDATALEN - 1).
const DATABASE_NAME_MAX_BYTES: usize = 63;

#[derive(Debug)]
pub struct Jobs {
    pub catalog: Arc<Catalog>,
    pub fleet: Arc<Fleet>,
    pub audit: AuditLog,
    pub repository: Arc<Repository>,
    pub config: BackupConfig,
    pub tasks: TaskTracker,
}

/// What `cairn backup run` asks for.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub agent: String,
    pub instance: String,
    pub database: Option<String>,
    pub all_databases: bool,
    pub tags: BTreeMap<String, String>,
}

/// How a job ended when the agent did not report it done: refused,
/// cancelled, failed, or unreachable.
pub(crate) fn ended_short(outcome: Result<CommandOutcome>) -> (JobStatus, String) {
    match outcome {
        Ok(CommandOutcome::Refused { reason, .. }) => (JobStatus::Failed, reason),
        Ok(CommandOutcome::Cancelled(detail)) => {
            (JobStatus::Cancelled, format!("cancelled: {detail}"))
        }
        Ok(CommandOutcome::Error(error)) => (JobStatus::Failed, error),
        Ok(CommandOutcome::Probe(_)) => {
            (JobStatus::Failed, "the agent answered with a probe".into())
        }
        Ok(CommandOutcome::JobDone(_)) => (JobStatus::Succeeded, String::new()),
        Err(error) => (JobStatus::Failed, error.to_string()),
    }
}

pub(crate) fn random_suffix() -> Result<String> {
    Ok(hex::encode(cairn_common::pki::random_bytes(4)?))
}

/// Checks a database name before it reaches pg_dump (as an argument, never
/// a shell) and the catalog.
pub(crate) fn check_database_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > DATABASE_NAME_MAX_BYTES || name.contains('\0') {
        return Err(CoordinatorError::InvalidArgument(format!(
            "--database {name:?}: a PostgreSQL database name has 1 to {DATABASE_NAME_MAX_BYTES} bytes and no NUL"
        )));
    }
    Ok(())
}

impl Jobs {
    /// Starts one backup job per database asked for; returns the jobs.
    pub async fn start_backup(
        &self,
        actor: &str,
        request: BackupRequest,
    ) -> Result<Vec<JobRecord>> {
        for (key, value) in &request.tags {
            validate_label(key, value)
                .map_err(|e| CoordinatorError::InvalidArgument(format!("--tag: {e}")))?;
        }
        let (agent, instance) = self
            .resolve_instance(actor, "backup.start", &request.agent, &request.instance)
            .await?;
        let databases = match (&request.database, request.all_databases) {
            (Some(database), false) => vec![database.clone()],
            (None, true) => self.databases_of(&agent, &instance).await?,
            _ => {
                return Err(CoordinatorError::InvalidArgument(
                    "give either --database DB or --all-databases".into(),
                ));
            }
        };
        for database in &databases {
            check_database_name(database)?;
        }
        let mut jobs = Vec::new();
        for database in databases {
            jobs.push(
                self.start_one(actor, &agent, &instance, &database, &request.tags)
                    .await?,
            );
        }
        Ok(jobs)
    }

    /// The agent (enrolled, not revoked) and its instance (the first one
    /// when `instance` is empty) a job will run on; a refusal is audited
    /// under `action`.
    pub(crate) async fn resolve_instance(
        &self,
        actor: &str,
        action: &'static str,
        agent_name: &str,
        instance: &str,
    ) -> Result<(AgentRecord, String)> {
        let agent = match self.catalog.get_agent(agent_name).await? {
            Some(agent) if agent.revoked_at.is_none() => agent,
            Some(_) => {
                return Err(self
                    .refuse(
                        actor,
                        action,
                        agent_name,
                        format!("agent \"{agent_name}\" is revoked"),
                    )
                    .await);
            }
            None => {
                return Err(self
                    .refuse(
                        actor,
                        action,
                        agent_name,
                        format!("no agent named \"{agent_name}\": see cairn agents list"),
                    )
                    .await);
            }
        };
        let instance = if instance.is_empty() {
            agent
                .instances
                .first()
                .cloned()
                .unwrap_or_else(|| "main".into())
        } else {
            instance.to_string()
        };
        if !agent.instances.contains(&instance) {
            return Err(self
                .refuse(
                    actor,
                    action,
                    &agent.name,
                    format!(
                        "agent \"{}\" has no instance \"{instance}\" (it has: {})",
                        agent.name,
                        agent.instances.join(", ")
                    ),
                )
                .await);
        }
        Ok((agent, instance))
    }

    pub(crate) async fn refuse(
        &self,
        actor: &str,
        action: &'static str,
        target: &str,
        message: String,
    ) -> CoordinatorError {
        self.audit
            .record(AuditEvent::new(
                actor,
                action,
                target,
                Outcome::Refused,
                message.clone(),
            ))
            .await;
        CoordinatorError::NotFound(message)
    }

    /// The instance's non-template databases, from its latest probe.
    async fn databases_of(&self, agent: &AgentRecord, instance: &str) -> Result<Vec<String>> {
        let probes = self.catalog.probes_of(&agent.name).await?;
        let latest = probes
            .iter()
            .find(|p| p.instance == instance && p.reachable)
            .ok_or_else(|| {
                CoordinatorError::Unavailable(format!(
                    "no successful probe of {}/{instance} yet: run cairn probe {} first",
                    agent.name, agent.name
                ))
            })?;
        Ok(latest.databases.iter().map(|d| d.name.clone()).collect())
    }

    async fn start_one(
        &self,
        actor: &str,
        agent: &AgentRecord,
        instance: &str,
        database: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<JobRecord> {
        let now = now_ms();
        let suffix = random_suffix()?;
        let job = JobRecord {
            id: format!("job-{now}-{suffix}"),
            kind: "backup".into(),
            agent_name: agent.name.clone(),
            instance: instance.to_string(),
            database: database.to_string(),
            status: JobStatus::Running.as_str().into(),
            error: String::new(),
            backup_id: format!("bk-{now}-{suffix}"),
            created_by: actor.to_string(),
            started_at: now,
            finished_at: None,
            bytes_read: 0,
            bytes_uploaded: 0,
            chunks: 0,
            target_database: String::new(),
            report: String::new(),
        };
        self.catalog.insert_backup_job(&job, tags).await?;
        self.audit
            .record(AuditEvent::new(
                actor,
                "backup.start",
                format!("{}/{}/{}", agent.name, instance, database),
                Outcome::Success,
                format!("job {}, backup {}", job.id, job.backup_id),
            ))
            .await;
        if !self.fleet.is_online(&agent.name) {
            let message = format!(
                "agent \"{}\" is offline: check that cairn-agent runs on its host",
                agent.name
            );
            self.end(&job, JobStatus::Failed, &message).await;
            return self.reload(&job.id).await;
        }
        let command = command::Kind::Backup(proto::BackupCommand {
            instance: instance.to_string(),
            database: database.to_string(),
            job_id: job.id.clone(),
            backup_id: job.backup_id.clone(),
            zstd_level: self.config.zstd_level,
            include_role_passwords: self.config.include_role_passwords,
        });
        let engine = self.clone_handle();
        let running = job.clone();
        let span =
            tracing::info_span!("job", job_id = %job.id, agent = %agent.name, database = %database);
        self.tasks.spawn(
            async move {
                let outcome = engine
                    .fleet
                    .send_command(&running.agent_name, command, BACKUP_COMMAND_TIMEOUT)
                    .await;
                engine.conclude(&running, outcome).await;
            }
            .instrument(span),
        );
        Ok(job)
    }

    pub(crate) fn clone_handle(&self) -> Arc<Jobs> {
        Arc::new(Jobs {
            catalog: self.catalog.clone(),
            fleet: self.fleet.clone(),
            audit: self.audit.clone(),
            repository: self.repository.clone(),
            config: self.config.clone(),
            tasks: self.tasks.clone(),
        })
    }

    pub(crate) async fn reload(&self, job_id: &str) -> Result<JobRecord> {
        self.catalog
            .get_job(job_id)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no job {job_id}")))
    }

    /// Decides how a job ended from the agent's answer and the catalog.
    async fn conclude(&self, job: &JobRecord, outcome: Result<CommandOutcome>) {
        let (status, message) = match outcome {
            Ok(CommandOutcome::JobDone(_)) => match self.catalog.get_backup(&job.backup_id).await {
                Ok(Some(backup)) if backup.status == "complete" => {
                    (JobStatus::Succeeded, String::new())
                }
                _ => (
                    JobStatus::Failed,
                    "the agent finished but the backup's manifest was not stored".to_string(),
                ),
            },
            other => ended_short(other),
        };
        self.end(job, status, &message).await;
    }

    /// Ends a running job and audits it; a job that something else ended
    /// already (an upload refused, a storage failure) keeps that outcome
    /// and its one audit row.
    pub(crate) async fn end(&self, job: &JobRecord, status: JobStatus, message: &str) {
        match self
            .catalog
            .finish_job(&job.id, status, message, now_ms())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    status = status.as_str(),
                    error = message,
                    "the job had ended already"
                );
                return;
            }
            Err(error) => tracing::error!(%error, "cannot record the end of the job"),
        }
        let outcome = match status {
            JobStatus::Succeeded => Outcome::Success,
            JobStatus::Cancelled => Outcome::Refused,
            _ => Outcome::Failed,
        };
        tracing::info!(status = status.as_str(), error = message, "job ended");
        self.audit
            .record(AuditEvent::new(
                "coordinator",
                match job.kind.as_str() {
                    "restore" => "restore.end",
                    "drill" => "drill.end",
                    _ => "backup.end",
                },
                job.id.clone(),
                outcome,
                format!("{}: {message}", status.as_str()),
            ))
            .await;
    }

    /// Asks the agent to stop a running job.
    pub async fn cancel(&self, actor: &str, job_id: &str) -> Result<JobRecord> {
        let job = self.reload(job_id).await?;
        if job.status != JobStatus::Running.as_str() {
            return Err(CoordinatorError::Conflict(format!(
                "job {job_id} is {}, not running",
                job.status
            )));
        }
        self.audit
            .record(AuditEvent::new(
                actor,
                "job.cancel",
                job_id,
                Outcome::Success,
                "",
            ))
            .await;
        let outcome = self
            .fleet
            .send_command(
                &job.agent_name,
                command::Kind::Cancel(proto::CancelCommand {
                    job_id: job_id.to_string(),
                }),
                CANCEL_COMMAND_TIMEOUT,
            )
            .await;
        if let Err(error) = outcome {
            // The agent is gone: the job cannot go on anyway.
            let message = format!("cancelled by {actor} (agent unreachable: {error})");
            self.end(&job, JobStatus::Cancelled, &message).await;
        }
        self.reload(job_id).await
    }
}
