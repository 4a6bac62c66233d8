//! Jobs and their attempts: the rows the job engine (see [`crate::jobs`])
//! moves from `queued` through `running` to an end.
//!
//! Every transition is one conditional `UPDATE` (on the state, and for a
//! running job on its attempt id), so that two callers racing to start,
//! end or retry a job — an agent's report and a timeout, or later two
//! coordinators — cannot both win: the loser's update matches no row.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use super::Catalog;
use super::backups::i64_of;
use crate::error::Result;

/// A job's state. `queued` and `running` are active; the others are ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, Serialize, Deserialize)]
#[sqlx(type_name = "TEXT", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Never started: its agent stayed offline (or busy) past its deadline,
    /// or a schedule's fire came too late to catch up.
    Missed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Missed => "missed",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, Serialize, Deserialize)]
#[sqlx(type_name = "TEXT", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Backup,
    Restore,
    Drill,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Drill => "drill",
        }
    }

    /// Restores and drills read a backup; backups write one.
    pub fn reads_a_backup(self) -> bool {
        matches!(self, JobKind::Restore | JobKind::Drill)
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub agent_name: String,
    pub instance: String,
    pub database: String,
    pub status: JobState,
    pub error: String,
    pub backup_id: String,
    pub created_by: String,
    pub created_at: i64,
    /// When the first attempt started.
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub bytes_read: i64,
    pub bytes_uploaded: i64,
    pub chunks: i64,
    /// Restores: the database restored into.
    pub target_database: String,
    /// Restores: the agent's report (JSON), once done.
    pub report: String,
    /// JSON: what the kind needs at dispatch (see [`crate::jobs::spec`]).
    pub spec: String,
    /// The current or last attempt's number (0: none yet) and id.
    pub attempt: i64,
    pub attempt_id: String,
    pub attempt_started_at: Option<i64>,
    /// Running, but its agent's stream ended (or the coordinator
    /// restarted) at this time: waiting for the agent to come back.
    pub detached_at: Option<i64>,
    /// An operator cancelled it while it ran.
    pub cancel_requested: bool,
    pub max_attempts: i64,
    pub timeout_ms: Option<i64>,
    pub deadline_at: Option<i64>,
    pub not_before: i64,
    pub wait_reason: String,
    pub term: i64,
    pub schedule_id: Option<String>,
    pub fire_at: Option<i64>,
    /// A scheduled job: the `agent/instance/database` it protects.
    pub target: Option<String>,
}

impl JobRecord {
    /// A new queued job with the engine's defaults (one attempt, no
    /// timeout, no deadline, due now).
    pub fn queued(
        id: String,
        kind: JobKind,
        agent_name: &str,
        instance: &str,
        database: &str,
        created_by: &str,
        now: i64,
    ) -> JobRecord {
        JobRecord {
            id,
            kind,
            agent_name: agent_name.to_string(),
            instance: instance.to_string(),
            database: database.to_string(),
            status: JobState::Queued,
            error: String::new(),
            backup_id: String::new(),
            created_by: created_by.to_string(),
            created_at: now,
            started_at: None,
            finished_at: None,
            bytes_read: 0,
            bytes_uploaded: 0,
            chunks: 0,
            target_database: String::new(),
            report: String::new(),
            spec: "{}".into(),
            attempt: 0,
            attempt_id: String::new(),
            attempt_started_at: None,
            detached_at: None,
            cancel_requested: false,
            max_attempts: 1,
            timeout_ms: None,
            deadline_at: None,
            not_before: now,
            wait_reason: String::new(),
            term: 0,
            schedule_id: None,
            fire_at: None,
            target: None,
        }
    }

    /// `agent/instance`, the unit the per-instance limit counts.
    pub fn instance_key(&self) -> String {
        format!("{}/{}", self.agent_name, self.instance)
    }
}

/// One attempt of a job, as `jobs show` lists them.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct AttemptRecord {
    pub job_id: String,
    pub number: i64,
    pub attempt_id: String,
    pub term: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: String,
    pub reason: String,
}

/// The wait reason a failed attempt leaves until the engine writes its own
/// (when the next attempt starts).
pub const RETRY_REASON_PREFIX: &str = "retry after: ";

/// The engine's wait reason for a due job whose agent is offline: one text
/// for the engine to write and for [`Catalog::tick_jobs`] to recognise.
pub fn offline_reason(agent: &str) -> String {
    format!("{}{agent}{}", OFFLINE_REASON.0, OFFLINE_REASON.1)
}

/// What [`offline_reason`] puts before and after the agent's name.
const OFFLINE_REASON: (&str, &str) = ("agent ", " is offline");

/// What one engine tick looks at: see [`Catalog::tick_jobs`].
#[derive(Debug, Default)]
pub struct TickJobs {
    /// The running jobs and the queued ones that may start, end or need a
    /// new wait reason, oldest first.
    pub jobs: Vec<JobRecord>,
    /// The queued jobs left out: waiting, their reasons still true (or
    /// beyond the limit of one tick).
    pub still_waiting: usize,
    /// Where the next tick goes on, when a limit left jobs out.
    pub next: Option<(i64, String)>,
}

/// How an attempt ended, for [`Catalog::end_attempt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The job ends in this state.
    Final(JobState),
    /// The attempt failed and the job is queued again, not before this time.
    Retry { not_before: i64 },
}

/// The job's row, as every kind of job starts (a scheduled fire's missed
/// ones end at once).
async fn insert_job_row(executor: impl sqlx::SqliteExecutor<'_>, job: &JobRecord) -> Result<()> {
    if insert_job_row_or_ignore(executor, job).await? {
        Ok(())
    } else {
        Err(crate::error::CoordinatorError::Conflict(format!(
            "job {} exists already",
            job.id
        )))
    }
}

/// Inserts the job's row; false, and nothing written, if a job of the same
/// schedule, target and fire time exists (a fire evaluated twice).
pub(super) async fn insert_job_row_or_ignore(
    executor: impl sqlx::SqliteExecutor<'_>,
    job: &JobRecord,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, kind, agent_name, instance, database, status, error, backup_id,
                           created_by, created_at, finished_at, target_database, spec,
                           max_attempts, timeout_ms, deadline_at, not_before, schedule_id,
                           fire_at, target, wait_reason)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (schedule_id, target, fire_at) WHERE schedule_id IS NOT NULL DO NOTHING",
    )
    .bind(&job.id)
    .bind(job.kind)
    .bind(&job.agent_name)
    .bind(&job.instance)
    .bind(&job.database)
    .bind(job.status)
    .bind(&job.error)
    .bind(&job.backup_id)
    .bind(&job.created_by)
    .bind(job.created_at)
    .bind(job.finished_at)
    .bind(&job.target_database)
    .bind(&job.spec)
    .bind(job.max_attempts)
    .bind(job.timeout_ms)
    .bind(job.deadline_at)
    .bind(job.not_before)
    .bind(&job.schedule_id)
    .bind(job.fire_at)
    .bind(&job.target)
    .bind(&job.wait_reason)
    .execute(executor)
    .await?
    .rows_affected();
    Ok(inserted > 0)
}

/// A backup job's backup row: `running`, so never listed until its
/// manifest is durable.
pub(super) async fn insert_backup_row(
    executor: impl sqlx::SqliteExecutor<'_>,
    job: &JobRecord,
    tags: &BTreeMap<String, String>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO backups (id, job_id, agent_name, instance, database, status, started_at, tags)
         VALUES (?, ?, ?, ?, ?, 'running', ?, ?)",
    )
    .bind(&job.backup_id)
    .bind(&job.id)
    .bind(&job.agent_name)
    .bind(&job.instance)
    .bind(&job.database)
    .bind(job.created_at)
    .bind(serde_json::to_string(tags).unwrap_or_else(|_| "{}".into()))
    .execute(executor)
    .await?;
    Ok(())
}

/// Marks the unfinished backup of an ended job with the job's outcome, so
/// it is never listed.
async fn end_backup_of(
    executor: impl sqlx::SqliteExecutor<'_>,
    job_id: &str,
    state: JobState,
    error: &str,
    now: i64,
) -> Result<()> {
    let backup_status = match state {
        JobState::Cancelled => "cancelled",
        _ => "failed",
    };
    sqlx::query(
        "UPDATE backups SET status = ?, error = ?, finished_at = ? WHERE job_id = ? AND status = 'running'",
    )
    .bind(backup_status)
    .bind(if error.is_empty() {
        "the job ended before the backup was complete"
    } else {
        error
    })
    .bind(now)
    .bind(job_id)
    .execute(executor)
    .await?;
    Ok(())
}

impl Catalog {
    /// Records a new job; a backup job's (unlisted) backup row with it.
    pub async fn insert_job(
        &self,
        job: &JobRecord,
        tags: Option<&BTreeMap<String, String>>,
    ) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_job_row(&mut *transaction, job).await?;
        if job.kind == JobKind::Backup && !job.backup_id.is_empty() {
            insert_backup_row(&mut *transaction, job, &tags.cloned().unwrap_or_default()).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Every queued or running job, oldest first: what the engine's tick
    /// looks at.
    pub async fn active_jobs(&self) -> Result<Vec<JobRecord>> {
        Ok(sqlx::query_as(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The active jobs the engine's tick at `now` must look at, oldest
    /// first: every running job, and every queued one except those whose
    /// wait reason cannot have changed since the engine wrote it (reading
    /// 10,000 waiting rows at every tick would take longer than the tick
    /// may): a job not yet due (`not_before` is later; its reason names
    /// that time, and only a retry, which resets the reason, moves it), or
    /// a due job waiting for its agent, which is still not in `online`.
    /// A job past its deadline is always looked at. The rest are counted.
    pub async fn tick_jobs(&self, now: i64, online: &[String]) -> Result<TickJobs> {
        self.tick_jobs_from(now, online, None, i64::MAX).await
    }

    /// [`Catalog::tick_jobs`], looking at no more than `limit` queued jobs:
    /// those after `after` (created at, id) first, then from the oldest,
    /// so that successive ticks go round every queued job. `next` says
    /// where the next tick goes on, if the limit cut this one short.
    pub async fn tick_jobs_from(
        &self,
        now: i64,
        online: &[String],
        after: Option<&(i64, String)>,
        limit: i64,
    ) -> Result<TickJobs> {
        let online = serde_json::to_string(online).unwrap_or_else(|_| "[]".into());
        // The queued jobs whose wait reason may have changed, in order,
        // from a point; `?6`/`?7`: after (created_at, id), `?8`: up to
        // and including it instead, `?9`: how many.
        const QUEUED: &str = "SELECT * FROM jobs
             WHERE status = 'queued'
               AND NOT ((deadline_at IS NULL OR deadline_at > ?1)
                        AND ((not_before > ?1 AND wait_reason != ''
                              AND substr(wait_reason, 1, length(?2)) != ?2)
                             OR (not_before <= ?1 AND wait_reason = ?3 || agent_name || ?4
                                 AND agent_name NOT IN (SELECT value FROM json_each(?5)))))
               AND (CASE WHEN ?8 THEN (created_at, id) <= (?6, ?7)
                         ELSE (created_at, id) > (?6, ?7) END)
             ORDER BY created_at, id
             LIMIT ?9";
        // One read transaction: the count and the rows see the same jobs.
        let mut transaction = self.pool.begin().await?;
        let mut jobs: Vec<JobRecord> =
            sqlx::query_as("SELECT * FROM jobs WHERE status = 'running' ORDER BY created_at, id")
                .fetch_all(&mut *transaction)
                .await?;
        let (from_at, from_id) = after
            .map(|(at, id)| (*at, id.as_str()))
            .unwrap_or((i64::MIN, ""));
        let mut looked_at = 0;
        for wrapped in [false, true] {
            if wrapped && (after.is_none() || looked_at >= limit) {
                break;
            }
            let queued: Vec<JobRecord> = sqlx::query_as(QUEUED)
                .bind(now)
                .bind(RETRY_REASON_PREFIX)
                .bind(OFFLINE_REASON.0)
                .bind(OFFLINE_REASON.1)
                .bind(&online)
                .bind(from_at)
                .bind(from_id)
                .bind(wrapped)
                .bind(limit - looked_at)
                .fetch_all(&mut *transaction)
                .await?;
            looked_at += i64::try_from(queued.len()).unwrap_or(i64::MAX);
            jobs.extend(queued);
        }
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'queued'")
            .fetch_one(&mut *transaction)
            .await?;
        transaction.commit().await?;
        let next = if looked_at >= limit {
            jobs.last().map(|job| (job.created_at, job.id.clone()))
        } else {
            None
        };
        Ok(TickJobs {
            still_waiting: usize::try_from(queued - looked_at).unwrap_or(0),
            jobs,
            next,
        })
    }

    /// Starts an attempt of a queued job; whether this call started it.
    pub async fn start_attempt(
        &self,
        job_id: &str,
        attempt_id: &str,
        term: i64,
        now: i64,
    ) -> Result<bool> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let number: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, attempt_id = ?1, term = ?2,
                             started_at = COALESCE(started_at, ?3), attempt_started_at = ?3,
                             wait_reason = '', detached_at = NULL
             WHERE id = ?4 AND status = 'queued' AND cancel_requested = 0
             RETURNING attempt",
        )
        .bind(attempt_id)
        .bind(term)
        .bind(now)
        .bind(job_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(number) = number else {
            return Ok(false);
        };
        sqlx::query(
            "INSERT INTO job_attempts (job_id, number, attempt_id, term, started_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(job_id)
        .bind(number)
        .bind(attempt_id)
        .bind(term)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        // The backup's time is when its dump started, not when it queued.
        sqlx::query("UPDATE backups SET started_at = ? WHERE job_id = ? AND status = 'running'")
            .bind(now)
            .bind(job_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(true)
    }

    /// Ends the running attempt `attempt_id` of a job: the job ends, or is
    /// queued again for a retry. The job's state after, if this call ended
    /// the attempt (`None`: it had ended already, or is not the job's
    /// current one); a cancel requested meanwhile makes it `cancelled`.
    pub async fn end_attempt(
        &self,
        job_id: &str,
        attempt_id: &str,
        end: &AttemptEnd,
        reason: &str,
        now: i64,
    ) -> Result<Option<JobState>> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // A cancel requested while the attempt ran wins over a failure or a
        // retry (not over a success: the backup exists).
        let final_update = |state: JobState, reason: String| {
            sqlx::query(
                "UPDATE jobs SET status = CASE WHEN cancel_requested = 1 AND ?1 <> 'succeeded'
                                               THEN 'cancelled' ELSE ?1 END,
                                 error = ?2, finished_at = ?3, detached_at = NULL
                 WHERE id = ?4 AND status = 'running' AND attempt_id = ?5",
            )
            .bind(state)
            .bind(reason)
            .bind(now)
            .bind(job_id.to_string())
            .bind(attempt_id.to_string())
        };
        let ended = match end {
            AttemptEnd::Final(state) => final_update(*state, reason.to_string())
                .execute(&mut *transaction)
                .await?
                .rows_affected(),
            AttemptEnd::Retry { not_before } => {
                let retried = sqlx::query(
                    "UPDATE jobs SET status = 'queued', error = ?, not_before = ?, wait_reason = ?,
                                     detached_at = NULL
                     WHERE id = ? AND status = 'running' AND attempt_id = ? AND cancel_requested = 0",
                )
                .bind(reason)
                .bind(not_before)
                .bind(format!("{RETRY_REASON_PREFIX}{reason}"))
                .bind(job_id)
                .bind(attempt_id)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
                if retried > 0 {
                    retried
                } else {
                    final_update(JobState::Cancelled, format!("cancelled ({reason})"))
                        .execute(&mut *transaction)
                        .await?
                        .rows_affected()
                }
            }
        } > 0;
        if !ended {
            return Ok(None);
        }
        let state: Option<JobState> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(job_id)
            .fetch_optional(&mut *transaction)
            .await?;
        let outcome = match (end, state) {
            (_, Some(JobState::Cancelled)) => "cancelled",
            (AttemptEnd::Final(state), _) => state.as_str(),
            (AttemptEnd::Retry { .. }, _) => "failed",
        };
        sqlx::query(
            "UPDATE job_attempts SET finished_at = ?, outcome = ?, reason = ?
             WHERE attempt_id = ? AND finished_at IS NULL",
        )
        .bind(now)
        .bind(outcome)
        .bind(reason)
        .bind(attempt_id)
        .execute(&mut *transaction)
        .await?;
        if let Some(state) = state
            && !state.is_active()
            && state != JobState::Succeeded
        {
            end_backup_of(&mut *transaction, job_id, state, reason, now).await?;
        }
        // A next attempt uploads from the start (what is stored is reused).
        sqlx::query("DELETE FROM upload_chunks WHERE attempt_id = ?")
            .bind(attempt_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(state)
    }

    /// Ends a job that is not running an attempt (cancelled or missed while
    /// queued); whether this call ended it.
    pub async fn end_queued_job(
        &self,
        job_id: &str,
        state: JobState,
        error: &str,
        now: i64,
    ) -> Result<bool> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let ended = sqlx::query(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ?, wait_reason = ''
             WHERE id = ? AND status = 'queued'",
        )
        .bind(state)
        .bind(error)
        .bind(now)
        .bind(job_id)
        .execute(&mut *transaction)
        .await?
        .rows_affected()
            > 0;
        if ended {
            end_backup_of(&mut *transaction, job_id, state, error, now).await?;
        }
        transaction.commit().await?;
        Ok(ended)
    }

    /// Why queued jobs still wait, in one transaction (a fleet-wide fire
    /// queues thousands at once).
    pub async fn set_wait_reasons(&self, reasons: &[(String, String)]) -> Result<()> {
        if reasons.is_empty() {
            return Ok(());
        }
        // One statement, not one per job (each a round trip to SQLite's
        // thread).
        let pairs = serde_json::to_string(reasons).map_err(|e| {
            crate::error::CoordinatorError::Internal(format!("cannot encode wait reasons: {e}"))
        })?;
        sqlx::query(
            "UPDATE jobs SET wait_reason = r.value ->> 1
             FROM json_each(?) AS r
             WHERE jobs.id = r.value ->> 0 AND jobs.status = 'queued'",
        )
        .bind(pairs)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records an operator's cancel of a running job; whether it runs.
    pub async fn request_cancel(&self, job_id: &str) -> Result<bool> {
        Ok(
            sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'")
                .bind(job_id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }

    /// Marks the running jobs of `agent` (all agents: `None`) as waiting
    /// for their agent since `now`; the number marked.
    pub async fn detach_running_jobs(&self, agent: Option<&str>, now: i64) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE jobs SET detached_at = ?1
             WHERE status = 'running' AND detached_at IS NULL AND (?2 IS NULL OR agent_name = ?2)",
        )
        .bind(now)
        .bind(agent)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Undoes a detach made at `at` for `agent` (a newer session came up
    /// meanwhile).
    pub async fn undetach_jobs(&self, agent: &str, at: i64) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE jobs SET detached_at = NULL
             WHERE agent_name = ? AND status = 'running' AND detached_at = ?",
        )
        .bind(agent)
        .bind(at)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The agent holds the job's attempt again; whether it was running.
    pub async fn reattach_job(&self, job_id: &str, attempt_id: &str) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE jobs SET detached_at = NULL
             WHERE id = ? AND attempt_id = ? AND status = 'running'",
        )
        .bind(job_id)
        .bind(attempt_id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// The running jobs of one agent.
    pub async fn running_jobs_of(&self, agent: &str) -> Result<Vec<JobRecord>> {
        Ok(sqlx::query_as(
            "SELECT * FROM jobs WHERE status = 'running' AND agent_name = ? ORDER BY created_at",
        )
        .bind(agent)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The job an attempt id belongs to (its current or an earlier one).
    pub async fn job_of_attempt(&self, attempt_id: &str) -> Result<Option<JobRecord>> {
        Ok(sqlx::query_as(
            "SELECT j.* FROM jobs j JOIN job_attempts a ON a.job_id = j.id
             WHERE a.attempt_id = ?",
        )
        .bind(attempt_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The next coordinator term: taken once at each start.
    pub async fn next_term(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "UPDATE coordinator_term SET term = term + 1 WHERE id = 1 RETURNING term",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn update_job_progress(
        &self,
        job_id: &str,
        bytes_read: u64,
        bytes_uploaded: u64,
        chunks: u64,
    ) -> Result<()> {
        sqlx::query("UPDATE jobs SET bytes_read = ?, bytes_uploaded = ?, chunks = ? WHERE id = ?")
            .bind(i64_of(bytes_read))
            .bind(i64_of(bytes_uploaded))
            .bind(i64_of(chunks))
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        Ok(sqlx::query_as("SELECT * FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The attempts of a job, first first.
    pub async fn job_attempts(&self, job_id: &str) -> Result<Vec<AttemptRecord>> {
        Ok(
            sqlx::query_as("SELECT * FROM job_attempts WHERE job_id = ? ORDER BY number")
                .bind(job_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Up to `limit` jobs, newest first, after the page `after` ended on.
    pub async fn list_jobs(
        &self,
        after: Option<&super::PageKey>,
        limit: u32,
    ) -> Result<Vec<JobRecord>> {
        Ok(sqlx::query_as(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR (created_at, id) < (?1, ?2))
             ORDER BY created_at DESC, id DESC LIMIT ?3",
        )
        .bind(after.map(|key| key.started_at))
        .bind(after.map(|key| key.id.as_str()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
