//! The job engine: every job (backup, restore, drill) is a catalog row
//! that moves `queued → running → succeeded | failed | cancelled | missed`.
//! Starting a job only queues it; the engine's tick (see [`engine`])
//! dispatches queued jobs within the limits of `[jobs]`, retries
//! retryable failures with backoff, stops attempts past their timeout and
//! ends jobs not started by their deadline. Every change is audited.
//!
//! A backup job ends `succeeded` only if the agent reports it done *and*
//! the upload stored the manifest (the backup is complete in the catalog);
//! every other ending fails or cancels the job, and its backup is never
//! listed.

pub mod attach;
pub mod download;
pub mod engine;
pub mod restores;
pub mod upload;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::names::validate_label;
use cairn_common::proto::{self, command};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{AgentRecord, AttemptEnd, Catalog, JobKind, JobRecord, JobState};
use crate::clock::Clock;
use crate::config::{BackupConfig, JobsConfig};
use crate::error::{CoordinatorError, Result};
use crate::fleet::Fleet;
use crate::repository::Repository;

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
    pub limits: JobsConfig,
    pub tasks: TaskTracker,
    /// All engine time comes from here (paused in tests).
    pub clock: Clock,
    /// This coordinator's term: on every command it sends.
    pub term: i64,
    /// Wakes the engine's loop before its next tick (a job queued or
    /// ended).
    pub wake: Arc<Notify>,
    /// The targets of part-made schedule fires (see `schedules::fire`).
    pub fire_targets: crate::schedules::fire::FireTargetsCache,
    /// Where the engine's next tick goes on looking at queued jobs (see
    /// `Catalog::tick_jobs_from`).
    pub tick_cursor: std::sync::Mutex<Option<(i64, String)>>,
}

/// How a job is run, from `--retries`, `--timeout` and `--deadline`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    pub retries: u32,
    pub timeout: Option<Duration>,
    pub deadline: Option<Duration>,
}

/// Most retries a job may ask for.
pub const MAX_RETRIES: u32 = 20;
/// How long a job waits to start when no `--deadline` is given.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3600);

impl RunOptions {
    pub fn from_proto(options: Option<proto::JobOptions>) -> Result<RunOptions> {
        let options = options.unwrap_or_default();
        if options.retries > MAX_RETRIES {
            return Err(CoordinatorError::InvalidArgument(format!(
                "--retries {}: at most {MAX_RETRIES}",
                options.retries
            )));
        }
        let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Ok(RunOptions {
            retries: options.retries,
            timeout: millis(options.timeout_ms),
            deadline: millis(options.deadline_ms),
        })
    }

    /// Sets a new job's attempts, timeout and deadline.
    pub(crate) fn apply(&self, job: &mut JobRecord) {
        job.max_attempts = i64::from(self.retries) + 1;
        job.timeout_ms = self.timeout.map(duration_ms);
        job.deadline_at =
            Some(job.created_at + duration_ms(self.deadline.unwrap_or(DEFAULT_DEADLINE)));
    }
}

pub(crate) fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4)
}

/// What `cairn backup run` asks for.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub agent: String,
    pub instance: String,
    pub database: Option<String>,
    pub all_databases: bool,
    /// Further databases (`--database` repeated): each its own job.
    pub databases: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub options: RunOptions,
}

pub(crate) fn random_suffix() -> Result<String> {
    Ok(hex::encode(cairn_common::pki::random_bytes(8)?))
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
        let mut named: Vec<String> = request.database.iter().cloned().collect();
        for database in &request.databases {
            if !named.contains(database) {
                named.push(database.clone());
            }
        }
        let databases = match (named.is_empty(), request.all_databases) {
            (false, false) => named,
            (true, true) => self.databases_of(&agent, &instance).await?,
            _ => {
                return Err(CoordinatorError::InvalidArgument(
                    "give either --database DB (repeatable) or --all-databases".into(),
                ));
            }
        };
        for database in &databases {
            check_database_name(database)?;
        }
        let mut jobs = Vec::new();
        for database in databases {
            jobs.push(
                self.queue_backup(actor, &agent, &instance, &database, &request)
                    .await?,
            );
        }
        self.wake.notify_one();
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

    async fn queue_backup(
        &self,
        actor: &str,
        agent: &AgentRecord,
        instance: &str,
        database: &str,
        request: &BackupRequest,
    ) -> Result<JobRecord> {
        let now = self.clock.now_ms();
        let suffix = random_suffix()?;
        let mut job = JobRecord::queued(
            format!("job-{now}-{suffix}"),
            JobKind::Backup,
            &agent.name,
            instance,
            database,
            actor,
            now,
        );
        job.backup_id = format!("bk-{now}-{suffix}");
        request.options.apply(&mut job);
        self.catalog.insert_job(&job, Some(&request.tags)).await?;
        self.audit
            .record(AuditEvent::new(
                actor,
                "backup.start",
                format!("{}/{}/{}", agent.name, instance, database),
                Outcome::Success,
                format!("job {} queued, backup {}", job.id, job.backup_id),
            ))
            .await;
        Ok(job)
    }

    pub(crate) async fn reload(&self, job_id: &str) -> Result<JobRecord> {
        self.catalog
            .get_job(job_id)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no job {job_id}")))
    }

    /// Cancels a job: a queued one ends at once; a running one is asked to
    /// stop, and ends when its agent reports it stopped (or at once if the
    /// agent cannot be reached).
    pub async fn cancel(&self, actor: &str, job_id: &str) -> Result<JobRecord> {
        let job = self.reload(job_id).await?;
        if !job.status.is_active() {
            return Err(CoordinatorError::Conflict(format!(
                "job {job_id} is {}, not queued or running",
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
        if job.status == JobState::Queued {
            let message = format!("cancelled by {actor} before it started");
            if self
                .catalog
                .end_queued_job(job_id, JobState::Cancelled, &message, self.clock.now_ms())
                .await?
            {
                self.audit_end(&job, JobState::Cancelled, &message).await;
                return self.reload(job_id).await;
            }
        }
        // However its attempt now ends (short of success), the job ends
        // cancelled and is not retried.
        if !self.catalog.request_cancel(job_id).await? {
            // It moved on meanwhile: queued again for a retry (ends it
            // now), or ended.
            let message = format!("cancelled by {actor} before its next attempt");
            if self
                .catalog
                .end_queued_job(job_id, JobState::Cancelled, &message, self.clock.now_ms())
                .await?
            {
                self.audit_end(&job, JobState::Cancelled, &message).await;
            }
            return self.reload(job_id).await;
        }
        let job = self.reload(job_id).await?;
        let outcome = self
            .fleet
            .send_command(
                &job.agent_name,
                command::Kind::Cancel(proto::CancelCommand {
                    job_id: job_id.to_string(),
                    attempt_id: String::new(),
                }),
                CANCEL_COMMAND_TIMEOUT,
            )
            .await;
        if let Err(error) = outcome {
            // The agent is gone: the job cannot go on anyway.
            let message = format!("cancelled by {actor} (agent unreachable: {error})");
            self.end_attempt(&job, AttemptEnd::Final(JobState::Cancelled), &message)
                .await;
        }
        self.reload(job_id).await
    }
}
