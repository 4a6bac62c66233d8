//! Restore and restore-drill jobs: checked here, sent to the agent, which
//! restores through a staging database (see `agent/src/restore.rs`) and
//! reads the backup over `DownloadBackup` (see [`crate::jobs::download`]).
//!
//! A drill restores into a scratch database the agent drops afterwards; it
//! passes only if pg_restore succeeded and every table's row count equals
//! the count recorded in the manifest at backup time. Its outcome is kept
//! as a verification of the backup.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_common::archive::TableRows;
use cairn_common::names::{parse_qualified_table, parse_schema_name};
use cairn_common::proto::{self, command};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{BackupRecord, JobRecord, JobStatus, VerificationRecord};
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::fleet::CommandOutcome;
use crate::jobs::{Jobs, check_database_name, ended_short, random_suffix};
use crate::repository::manifest::Manifest;

/// How long a restore may run before the coordinator gives up on it.
const RESTORE_COMMAND_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most `--jobs` for pg_restore.
pub const MAX_RESTORE_JOBS: u32 = 64;

/// What `cairn restore` asks for.
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub backup_id: String,
    pub agent: String,
    pub instance: String,
    /// `None`: the backup's own database name.
    pub database: Option<String>,
    pub replace: bool,
    pub drop_previous: bool,
    pub no_owner: bool,
    pub no_roles: bool,
    pub jobs: u32,
    pub tables: Vec<String>,
    pub schemas: Vec<String>,
}

/// The agent's report of a finished restore, as the catalog keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    pub database: String,
    pub previous: String,
    pub previous_dropped: bool,
    pub terminated_sessions: Vec<String>,
    pub roles_created: Vec<String>,
    pub table_rows: Vec<TableRows>,
    pub bytes_restored: u64,
    pub spooled: bool,
    /// The agent's own warnings, one a line.
    pub warnings: String,
    pub restore_millis: u64,
    /// What pg_restore printed although it succeeded (absent from reports
    /// kept before it was its own field).
    #[serde(default)]
    pub pg_restore_messages: String,
}

impl From<proto::RestoreReport> for RestoreReport {
    fn from(report: proto::RestoreReport) -> Self {
        RestoreReport {
            database: report.database,
            previous: report.previous,
            previous_dropped: report.previous_dropped,
            terminated_sessions: report.terminated_sessions,
            roles_created: report.roles_created,
            table_rows: report.table_rows.into_iter().map(Into::into).collect(),
            bytes_restored: report.bytes_restored,
            spooled: report.spooled,
            warnings: report.warnings,
            restore_millis: report.restore_millis,
            pg_restore_messages: report.pg_restore_messages,
        }
    }
}

impl From<RestoreReport> for proto::RestoreReport {
    fn from(report: RestoreReport) -> Self {
        proto::RestoreReport {
            database: report.database,
            previous: report.previous,
            previous_dropped: report.previous_dropped,
            terminated_sessions: report.terminated_sessions,
            roles_created: report.roles_created,
            table_rows: report.table_rows.into_iter().map(Into::into).collect(),
            bytes_restored: report.bytes_restored,
            spooled: report.spooled,
            warnings: report.warnings,
            restore_millis: report.restore_millis,
            pg_restore_messages: report.pg_restore_messages,
        }
    }
}

fn invalid(message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument(message.into())
}

impl Jobs {
    /// A complete backup and its manifest, or a clear error.
    async fn complete_backup(&self, backup_id: &str) -> Result<(BackupRecord, Manifest)> {
        let backup = match self.catalog.get_backup(backup_id).await? {
            Some(backup) if backup.status == "complete" => backup,
            _ => {
                return Err(CoordinatorError::NotFound(format!(
                    "no complete backup {backup_id}: see cairn backups list"
                )));
            }
        };
        if backup.damaged_at.is_some() {
            return Err(CoordinatorError::Conflict(format!(
                "backup {backup_id} is damaged ({}): it cannot be restored; restore a newer \
                 backup of the database. If a later backup uploads the same content again, \
                 `cairn repository check --read-data` clears the mark",
                backup.damage
            )));
        }
        let manifest = Manifest::load(&self.repository, backup_id)
            .await
            .map_err(|e| {
                CoordinatorError::Unavailable(format!(
                    "the manifest of backup {backup_id} cannot be read: {e}"
                ))
            })?;
        Ok((backup, manifest))
    }

    /// Starts a restore job and returns it.
    pub async fn start_restore(&self, actor: &str, request: RestoreRequest) -> Result<JobRecord> {
        if request.drop_previous && !request.replace {
            return Err(invalid(
                "--drop-previous needs --replace (it drops the database --replace set aside)",
            ));
        }
        if request.jobs > MAX_RESTORE_JOBS {
            return Err(invalid(format!(
                "--jobs {}: at most {MAX_RESTORE_JOBS}",
                request.jobs
            )));
        }
        for table in &request.tables {
            parse_qualified_table(table).map_err(|e| invalid(format!("--table: {e}")))?;
        }
        for schema in &request.schemas {
            parse_schema_name(schema).map_err(|e| invalid(format!("--schema: {e}")))?;
        }
        let (backup, manifest) = self.complete_backup(&request.backup_id).await?;
        let target = request
            .database
            .clone()
            .unwrap_or_else(|| backup.database.clone());
        check_database_name(&target)?;
        let (agent, instance) = self
            .resolve_instance(actor, "restore.start", &request.agent, &request.instance)
            .await?;
        let job = self
            .new_restore_job(actor, "restore", &agent.name, &instance, &backup, &target)
            .await?;
        let command = command::Kind::Restore(proto::RestoreCommand {
            replace: request.replace,
            drop_previous: request.drop_previous,
            no_owner: request.no_owner,
            no_roles: request.no_roles,
            jobs: request.jobs,
            tables: request.tables.clone(),
            schemas: request.schemas.clone(),
            ..self.restore_command(&job, &manifest)
        });
        self.run_restore(job, command).await
    }

    /// Starts a restore drill of a backup on an agent and returns the job.
    pub async fn start_drill(
        &self,
        actor: &str,
        backup_id: &str,
        agent_name: &str,
        instance: &str,
    ) -> Result<JobRecord> {
        let (backup, manifest) = self.complete_backup(backup_id).await?;
        let (agent, instance) = self
            .resolve_instance(actor, "drill.start", agent_name, instance)
            .await?;
        let scratch = format!("cairn_drill_{}", random_suffix()?);
        let job = self
            .new_restore_job(actor, "drill", &agent.name, &instance, &backup, &scratch)
            .await?;
        let command = command::Kind::Restore(proto::RestoreCommand {
            drill: true,
            ..self.restore_command(&job, &manifest)
        });
        self.run_restore(job, command).await
    }

    /// The command for a restore job, with what the manifest measured
    /// (never a key: the chunks come opened over `DownloadBackup`); the
    /// options are the caller's to add.
    fn restore_command(&self, job: &JobRecord, manifest: &Manifest) -> proto::RestoreCommand {
        proto::RestoreCommand {
            instance: job.instance.clone(),
            database: job.target_database.clone(),
            job_id: job.id.clone(),
            backup_id: job.backup_id.clone(),
            source_database: job.database.clone(),
            dump_bytes: manifest.dump_bytes,
            database_bytes: manifest.database_bytes,
            chunk_count: manifest.chunks.len() as u64,
            ..proto::RestoreCommand::default()
        }
    }

    async fn new_restore_job(
        &self,
        actor: &str,
        kind: &'static str,
        agent: &str,
        instance: &str,
        backup: &BackupRecord,
        target: &str,
    ) -> Result<JobRecord> {
        let now = now_ms();
        let job = JobRecord {
            id: format!("job-{now}-{}", random_suffix()?),
            kind: kind.into(),
            agent_name: agent.to_string(),
            instance: instance.to_string(),
            database: backup.database.clone(),
            status: JobStatus::Running.as_str().into(),
            error: String::new(),
            backup_id: backup.id.clone(),
            created_by: actor.to_string(),
            started_at: now,
            finished_at: None,
            bytes_read: 0,
            bytes_uploaded: 0,
            chunks: 0,
            target_database: target.to_string(),
            report: String::new(),
        };
        self.catalog.insert_restore_job(&job).await?;
        self.audit
            .record(AuditEvent::new(
                actor,
                if kind == "drill" {
                    "drill.start"
                } else {
                    "restore.start"
                },
                format!("{agent}/{instance}/{target}"),
                Outcome::Success,
                format!(
                    "job {}, backup {} of {}",
                    job.id, backup.id, backup.database
                ),
            ))
            .await;
        Ok(job)
    }

    async fn run_restore(&self, job: JobRecord, command: command::Kind) -> Result<JobRecord> {
        if !self.fleet.is_online(&job.agent_name) {
            let message = format!(
                "agent \"{}\" is offline: check that cairn-agent runs on its host",
                job.agent_name
            );
            self.end(&job, JobStatus::Failed, &message).await;
            if job.kind == "drill" {
                self.record_drill(&job, false, &message).await;
            }
            return self.reload(&job.id).await;
        }
        let engine = self.clone_handle();
        let running = job.clone();
        let span = tracing::info_span!("job", job_id = %job.id, agent = %job.agent_name, target = %job.target_database);
        self.tasks.spawn(
            async move {
                let outcome = engine
                    .fleet
                    .send_command(&running.agent_name, command, RESTORE_COMMAND_TIMEOUT)
                    .await;
                engine.conclude_restore(&running, outcome).await;
            }
            .instrument(span),
        );
        Ok(job)
    }

    async fn conclude_restore(&self, job: &JobRecord, outcome: Result<CommandOutcome>) {
        let (status, message) = match outcome {
            Ok(CommandOutcome::JobDone(report)) => {
                let report = RestoreReport::from(report.unwrap_or_default());
                match serde_json::to_string(&report) {
                    Ok(json) => {
                        if let Err(error) = self.catalog.set_job_report(&job.id, &json).await {
                            tracing::error!(%error, "cannot record the restore report");
                        }
                    }
                    Err(error) => tracing::error!(%error, "cannot encode the restore report"),
                }
                if job.kind == "drill" {
                    match self.check_drill(job, &report).await {
                        Ok(detail) => (JobStatus::Succeeded, detail),
                        Err(problem) => (JobStatus::Failed, problem),
                    }
                } else {
                    (JobStatus::Succeeded, String::new())
                }
            }
            other => ended_short(other),
        };
        // A drill's verdict is its detail whether it passed or not.
        let error = if status == JobStatus::Succeeded {
            ""
        } else {
            message.as_str()
        };
        self.end(job, status, error).await;
        if job.kind == "drill" {
            self.record_drill(job, status == JobStatus::Succeeded, &message)
                .await;
        }
    }

    /// Compares the drill's counts with the manifest's: every table the
    /// backup counted must be there with the same rows.
    async fn check_drill(
        &self,
        job: &JobRecord,
        report: &RestoreReport,
    ) -> std::result::Result<String, String> {
        let manifest = Manifest::load(&self.repository, &job.backup_id)
            .await
            .map_err(|e| format!("cannot read the manifest to compare: {e}"))?;
        let Some(expected) = manifest.table_rows else {
            return Err(format!(
                "the backup recorded no exact row counts ({}); the restore itself succeeded",
                manifest.rows_not_counted
            ));
        };
        let restored: BTreeMap<(&str, &str), u64> = report
            .table_rows
            .iter()
            .map(|t| ((t.schema.as_str(), t.table.as_str()), t.rows))
            .collect();
        let mut problems = Vec::new();
        let mut rows = 0u64;
        for table in &expected {
            rows += table.rows;
            match restored.get(&(table.schema.as_str(), table.table.as_str())) {
                Some(count) if *count == table.rows => {}
                Some(count) => problems.push(format!(
                    "{}.{}: {count} rows restored, {} at backup time",
                    table.schema, table.table, table.rows
                )),
                None => problems.push(format!(
                    "{}.{}: missing after the restore ({} rows at backup time)",
                    table.schema, table.table, table.rows
                )),
            }
        }
        if problems.is_empty() {
            Ok(format!(
                "{} tables, {rows} rows, as at backup time; pg_restore reported no error",
                expected.len()
            ))
        } else {
            Err(format!(
                "row counts differ from the backup's: {}",
                problems.join("; ")
            ))
        }
    }

    async fn record_drill(&self, job: &JobRecord, ok: bool, detail: &str) {
        let now = now_ms();
        let verification = VerificationRecord {
            backup_id: job.backup_id.clone(),
            at: now,
            method: format!("restore drill on {}", job.agent_name),
            ok,
            detail: detail.to_string(),
            millis: now - job.started_at,
            job_id: job.id.clone(),
        };
        if let Err(error) = self.catalog.record_verification(&verification).await {
            tracing::error!(%error, "cannot record the drill's outcome");
        }
    }
}
