//! Restore and restore-drill jobs: checked here, sent to the agent, which
//! restores through a staging database (see `agent/src/restore.rs`) and
//! reads the backup over `DownloadBackup` (see [`crate::jobs::download`]).
//!
//! A drill restores into a scratch database the agent drops afterwards; it
//! passes only if pg_restore succeeded and every table's row count equals
//! the count recorded in the manifest at backup time. Its outcome is kept
//! as a verification of the backup.

use std::collections::BTreeMap;

use cairn_common::archive::TableRows;
use cairn_common::names::{parse_qualified_table, parse_schema_name};
use cairn_common::proto;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{
    BackupRecord, JobKind, JobRecord, JobState, ScheduleRecord, VerificationRecord,
};
use crate::error::{CoordinatorError, Result};
use crate::jobs::{Jobs, RunOptions, check_database_name, random_suffix};
use crate::repository::manifest::Manifest;
use crate::schedules::targets::Target;

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
    pub options: RunOptions,
}

/// What a queued restore or drill needs to build its command when it
/// starts (kept as the job's `spec`): the options asked for and what the
/// manifest measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub replace: bool,
    pub drop_previous: bool,
    pub no_owner: bool,
    pub no_roles: bool,
    pub jobs: u32,
    pub tables: Vec<String>,
    pub schemas: Vec<String>,
    pub dump_bytes: u64,
    pub database_bytes: u64,
    pub chunk_count: u64,
}

impl RestoreSpec {
    /// The agent's command for the job (never a key: the chunks come
    /// opened over `DownloadBackup`).
    pub fn command(&self, job: &JobRecord) -> proto::RestoreCommand {
        proto::RestoreCommand {
            instance: job.instance.clone(),
            database: job.target_database.clone(),
            job_id: job.id.clone(),
            backup_id: job.backup_id.clone(),
            source_database: job.database.clone(),
            dump_bytes: self.dump_bytes,
            database_bytes: self.database_bytes,
            chunk_count: self.chunk_count,
            replace: self.replace,
            drop_previous: self.drop_previous,
            no_owner: self.no_owner,
            no_roles: self.no_roles,
            jobs: self.jobs,
            tables: self.tables.clone(),
            schemas: self.schemas.clone(),
            drill: job.kind == JobKind::Drill,
        }
    }

    fn measured(manifest: &Manifest) -> RestoreSpec {
        RestoreSpec {
            dump_bytes: manifest.dump_bytes,
            database_bytes: manifest.database_bytes,
            chunk_count: manifest.chunks.len() as u64,
            ..RestoreSpec::default()
        }
    }
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
            Some(backup) if backup.is_listed() => backup,
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
        let spec = RestoreSpec {
            replace: request.replace,
            drop_previous: request.drop_previous,
            no_owner: request.no_owner,
            no_roles: request.no_roles,
            jobs: request.jobs,
            tables: request.tables.clone(),
            schemas: request.schemas.clone(),
            ..RestoreSpec::measured(&manifest)
        };
        self.queue_restore(
            actor,
            (JobKind::Restore, request.options),
            (&agent.name, &instance),
            &backup,
            &target,
            &spec,
        )
        .await
    }

    /// Starts a restore drill of a backup on an agent and returns the job.
    pub async fn start_drill(
        &self,
        actor: &str,
        backup_id: &str,
        agent_name: &str,
        instance: &str,
        options: RunOptions,
    ) -> Result<JobRecord> {
        let (backup, manifest) = self.complete_backup(backup_id).await?;
        let (agent, instance) = self
            .resolve_instance(actor, "drill.start", agent_name, instance)
            .await?;
        let scratch = format!("cairn_drill_{}", random_suffix()?);
        self.queue_restore(
            actor,
            (JobKind::Drill, options),
            (&agent.name, &instance),
            &backup,
            &scratch,
            &RestoreSpec::measured(&manifest),
        )
        .await
    }

    /// Queues a restore or drill job and wakes the engine.
    async fn queue_restore(
        &self,
        actor: &str,
        (kind, options): (JobKind, RunOptions),
        (agent, instance): (&str, &str),
        backup: &BackupRecord,
        target: &str,
        spec: &RestoreSpec,
    ) -> Result<JobRecord> {
        let now = self.clock.now_ms();
        let mut job = JobRecord::queued(
            format!("job-{now}-{}", random_suffix()?),
            kind,
            agent,
            instance,
            &backup.database,
            actor,
            now,
        );
        job.backup_id = backup.id.clone();
        job.target_database = target.to_string();
        job.spec = serde_json::to_string(spec)
            .map_err(|e| CoordinatorError::Internal(format!("cannot encode the job: {e}")))?;
        options.apply(&mut job);
        self.catalog.insert_job(&job, None).await?;
        self.audit
            .record(AuditEvent::new(
                actor,
                if kind == JobKind::Drill {
                    "drill.start"
                } else {
                    "restore.start"
                },
                format!("{agent}/{instance}/{target}"),
                Outcome::Success,
                format!(
                    "job {} queued, backup {} of {}",
                    job.id, backup.id, backup.database
                ),
            ))
            .await;
        self.wake.notify_one();
        Ok(job)
    }

    /// The drill a schedule's fire makes for one target: its newest
    /// complete, undamaged backup restored into a scratch database on
    /// `drill_agent` and checked; a target with no such backup gets a job
    /// recorded `missed` with the reason.
    pub(crate) async fn drill_job(
        &self,
        id: String,
        schedule: &ScheduleRecord,
        target: &Target,
        drill_agent: &str,
        now: i64,
    ) -> Result<JobRecord> {
        let instance = self
            .catalog
            .get_agent(drill_agent)
            .await?
            .and_then(|agent| agent.instances.first().cloned())
            .unwrap_or_else(|| "main".into());
        let latest = self
            .catalog
            .list_backups(Some(&target.agent), Some(&target.database), None, 20)
            .await?
            .into_iter()
            .find(|backup| backup.instance == target.instance && backup.damaged_at.is_none());
        let mut job = JobRecord::queued(
            id,
            JobKind::Drill,
            drill_agent,
            &instance,
            &target.database,
            &format!("schedule:{}", schedule.name),
            now,
        );
        job.target_database = format!("cairn_drill_{}", random_suffix()?);
        let manifest = match &latest {
            Some(backup) => Manifest::load(&self.repository, &backup.id).await.ok(),
            None => None,
        };
        match (latest, manifest) {
            (Some(backup), Some(manifest)) => {
                job.backup_id = backup.id;
                job.spec =
                    serde_json::to_string(&RestoreSpec::measured(&manifest)).map_err(|e| {
                        CoordinatorError::Internal(format!("cannot encode the job: {e}"))
                    })?;
            }
            (found, _) => {
                job.status = JobState::Missed;
                job.error = match found {
                    None => format!("no complete backup of {} to drill", target.key()),
                    Some(backup) => format!("the manifest of backup {} cannot be read", backup.id),
                };
                job.finished_at = Some(now);
            }
        }
        Ok(job)
    }

    /// Compares the drill's counts with the manifest's: every table the
    /// backup counted must be there with the same rows.
    pub(crate) async fn check_drill(
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

    pub(crate) async fn record_drill(&self, job: &JobRecord, ok: bool, detail: &str) {
        let now = self.clock.now_ms();
        let verification = VerificationRecord {
            backup_id: job.backup_id.clone(),
            at: now,
            method: format!("restore drill on {}", job.agent_name),
            ok,
            detail: detail.to_string(),
            millis: now - job.started_at.unwrap_or(now),
            job_id: job.id.clone(),
        };
        if let Err(error) = self.catalog.record_verification(&verification).await {
            tracing::error!(%error, "cannot record the drill's outcome");
        }
    }
}
