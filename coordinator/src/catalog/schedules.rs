//! Schedules, and the job rows their fires become.
//!
//! A fire is materialised with `INSERT ... ON CONFLICT DO NOTHING` on the
//! unique index `jobs_one_per_fire` (schedule, target, fire time): however
//! often it is evaluated, a fire makes one job per target.

use std::collections::BTreeMap;

use sqlx::FromRow;

use super::Catalog;
use super::jobs::{JobKind, JobRecord, JobState};
use crate::error::Result;

/// What a schedule's fires run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "TEXT", rename_all = "lowercase")]
pub enum ScheduleKind {
    Backup,
    Drill,
}

/// What a fire does for a target whose job of an earlier fire is still
/// queued or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "TEXT", rename_all = "lowercase")]
pub enum OnOverlap {
    /// Recorded `missed`.
    Skip,
    /// Queued behind it.
    Queue,
}

impl ScheduleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Backup => "backup",
            ScheduleKind::Drill => "drill",
        }
    }
}

impl OnOverlap {
    pub fn as_str(self) -> &'static str {
        match self {
            OnOverlap::Skip => "skip",
            OnOverlap::Queue => "queue",
        }
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ScheduleRecord {
    pub id: String,
    pub name: String,
    pub kind: ScheduleKind,
    pub agent_name: Option<String>,
    /// JSON object of labels every target agent must carry.
    pub selector: String,
    /// JSON array of database names.
    pub databases: String,
    pub all_databases: bool,
    pub cron: String,
    pub timezone: String,
    pub spread_ms: i64,
    pub on_overlap: OnOverlap,
    pub catch_up_ms: i64,
    pub retries: i64,
    pub timeout_ms: Option<i64>,
    pub drill_agent: Option<String>,
    pub paused: bool,
    pub created_by: String,
    pub created_at: i64,
    pub evaluated_until: i64,
    /// While a fire is part-made: the (fire time, target) of the last job
    /// made (see [`FireProgress`]).
    pub fire_cursor_at: Option<i64>,
    pub fire_cursor_target: Option<String>,
    /// When the part-made fire was first evaluated.
    pub fire_cursor_now: Option<i64>,
    /// The retention policy applied after each successful backup and once
    /// a day (a name in `retention_policies`); `None`: backups accumulate.
    pub retention_policy: Option<String>,
    /// When the daily apply was last claimed.
    pub retention_applied_at: Option<i64>,
}

/// Where a batch of a schedule's fire leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireProgress {
    /// More of the fires due at `evaluated_at` remain after this (fire
    /// time, target).
    PartMade {
        evaluated_at: i64,
        fire_at: i64,
        target: String,
    },
    /// Every due fire is made: the mark moves to this time.
    Done { evaluated_until: i64 },
}

impl ScheduleRecord {
    /// Of a part-made fire: when it was first evaluated, and the (fire
    /// time, target) of the last job made.
    pub fn fire_cursor(&self) -> Option<(i64, i64, &str)> {
        Some((
            self.fire_cursor_now?,
            self.fire_cursor_at?,
            self.fire_cursor_target.as_deref()?,
        ))
    }

    /// The labels a target agent must carry. A stored selector that does
    /// not parse is an error, never `{}` (which would select every agent).
    pub fn selector(&self) -> Result<BTreeMap<String, String>> {
        serde_json::from_str(&self.selector).map_err(|e| self.corrupt("selector", &e))
    }

    pub fn databases(&self) -> Result<Vec<String>> {
        serde_json::from_str(&self.databases).map_err(|e| self.corrupt("databases", &e))
    }

    fn corrupt(&self, column: &str, error: &serde_json::Error) -> crate::error::CoordinatorError {
        crate::error::CoordinatorError::Internal(format!(
            "schedule {:?}: its stored {column} is not valid JSON ({error}); delete the \
             schedule and create it again",
            self.name
        ))
    }
}

impl Catalog {
    /// Stores a new schedule; a taken name is a conflict.
    pub async fn insert_schedule(&self, schedule: &ScheduleRecord) -> Result<()> {
        let inserted = sqlx::query(
            "INSERT INTO schedules (id, name, kind, agent_name, selector, databases, all_databases,
                                    cron, timezone, spread_ms, on_overlap, catch_up_ms, retries,
                                    timeout_ms, drill_agent, paused, created_by, created_at,
                                    evaluated_until, retention_policy)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&schedule.id)
        .bind(&schedule.name)
        .bind(schedule.kind)
        .bind(&schedule.agent_name)
        .bind(&schedule.selector)
        .bind(&schedule.databases)
        .bind(schedule.all_databases)
        .bind(&schedule.cron)
        .bind(&schedule.timezone)
        .bind(schedule.spread_ms)
        .bind(schedule.on_overlap)
        .bind(schedule.catch_up_ms)
        .bind(schedule.retries)
        .bind(schedule.timeout_ms)
        .bind(&schedule.drill_agent)
        .bind(schedule.paused)
        .bind(&schedule.created_by)
        .bind(schedule.created_at)
        .bind(schedule.evaluated_until)
        .bind(&schedule.retention_policy)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(crate::error::CoordinatorError::Conflict(format!(
                "a schedule named {:?} exists: pick another name, or delete it first",
                schedule.name
            )));
        }
        Ok(())
    }

    pub async fn list_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        Ok(sqlx::query_as("SELECT * FROM schedules ORDER BY name")
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn get_schedule(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        Ok(sqlx::query_as("SELECT * FROM schedules WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn get_schedule_by_id(&self, id: &str) -> Result<Option<ScheduleRecord>> {
        Ok(sqlx::query_as("SELECT * FROM schedules WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Pauses or resumes; a resumed schedule counts its fires from `now`
    /// (the fires while paused are not caught up). Whether it exists.
    pub async fn set_schedule_paused(&self, name: &str, paused: bool, now: i64) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE schedules SET paused = ?1,
                    evaluated_until = CASE WHEN ?1 = 0 AND paused = 1 THEN ?2 ELSE evaluated_until END
             WHERE name = ?3",
        )
        .bind(paused)
        .bind(now)
        .bind(name)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Deletes a schedule; its jobs stay (queued ones still run). Whether
    /// it existed.
    pub async fn delete_schedule(&self, name: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM schedules WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    #[cfg(test)]
    /// Moves a schedule's evaluation mark from `from` to `to`; false if
    /// another evaluation moved it first (then this one's fires are
    /// another's to make).
    pub async fn advance_schedule(&self, id: &str, from: i64, to: i64) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE schedules SET evaluated_until = ? WHERE id = ? AND evaluated_until = ?",
        )
        .bind(to)
        .bind(id)
        .bind(from)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Records a batch of a schedule's fire jobs, one per (target, fire);
    /// a job whose (schedule, target, fire time) exists already is left
    /// out. In the same transaction the schedule moves to `progress`, if
    /// its mark is still `evaluated_until` and its cursor still `cursor`:
    /// otherwise another evaluation made these jobs first, nothing is
    /// written and `None` comes back. The jobs inserted.
    pub async fn insert_fire_batch(
        &self,
        schedule: &ScheduleRecord,
        jobs: &[JobRecord],
        tags: &BTreeMap<String, String>,
        progress: &FireProgress,
    ) -> Result<Option<Vec<JobRecord>>> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (mark, cursor_now, cursor_at, cursor_target) = match progress {
            FireProgress::PartMade {
                evaluated_at,
                fire_at,
                target,
            } => (
                schedule.evaluated_until,
                Some(*evaluated_at),
                Some(*fire_at),
                Some(target.as_str()),
            ),
            FireProgress::Done { evaluated_until } => (*evaluated_until, None, None, None),
        };
        let moved = sqlx::query(
            "UPDATE schedules SET evaluated_until = ?, fire_cursor_now = ?, fire_cursor_at = ?,
                                  fire_cursor_target = ?
             WHERE id = ? AND evaluated_until = ? AND fire_cursor_now IS ?
               AND fire_cursor_at IS ? AND fire_cursor_target IS ?",
        )
        .bind(mark)
        .bind(cursor_now)
        .bind(cursor_at)
        .bind(cursor_target)
        .bind(&schedule.id)
        .bind(schedule.evaluated_until)
        .bind(schedule.fire_cursor_now)
        .bind(schedule.fire_cursor_at)
        .bind(&schedule.fire_cursor_target)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        if moved == 0 {
            transaction.rollback().await?;
            return Ok(None);
        }
        let inserted = insert_jobs(&mut transaction, jobs, tags).await?;
        transaction.commit().await?;
        Ok(Some(inserted))
    }

    /// Records the jobs of a fire outside the cron (`run-now`), as
    /// [`Catalog::insert_fire_batch`] does but leaving the schedule as it
    /// is. The jobs inserted.
    pub async fn insert_fire_jobs(
        &self,
        jobs: &[JobRecord],
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<JobRecord>> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let inserted = insert_jobs(&mut transaction, jobs, tags).await?;
        transaction.commit().await?;
        Ok(inserted)
    }

    /// The active (queued or running) jobs of a schedule, by target key
    /// `agent/instance/database`.
    pub async fn active_schedule_targets(&self, schedule_id: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT target FROM jobs
             WHERE schedule_id = ? AND status IN ('queued', 'running') AND target IS NOT NULL",
        )
        .bind(schedule_id)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Inserts each job not made already (and the backup row of a queued
/// backup); the jobs inserted. One statement for all the jobs and one for
/// their backups, whatever their number: a statement per row costs a
/// round trip to SQLite's thread each, which a fleet's fire cannot afford.
async fn insert_jobs(
    transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    jobs: &[JobRecord],
    tags: &BTreeMap<String, String>,
) -> Result<Vec<JobRecord>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<serde_json::Value> = jobs
        .iter()
        .map(|job| {
            serde_json::json!({
                "id": job.id, "kind": job.kind.as_str(), "agent_name": job.agent_name,
                "instance": job.instance, "database": job.database,
                "status": job.status.as_str(), "error": job.error, "backup_id": job.backup_id,
                "created_by": job.created_by, "created_at": job.created_at,
                "finished_at": job.finished_at, "target_database": job.target_database,
                "spec": job.spec, "max_attempts": job.max_attempts, "timeout_ms": job.timeout_ms,
                "deadline_at": job.deadline_at, "not_before": job.not_before,
                "schedule_id": job.schedule_id, "fire_at": job.fire_at, "target": job.target,
                "wait_reason": job.wait_reason,
            })
        })
        .collect();
    // `WHERE true` tells SQLite's parser the ON CONFLICT is the insert's.
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO jobs (id, kind, agent_name, instance, database, status, error, backup_id,
                           created_by, created_at, finished_at, target_database, spec,
                           max_attempts, timeout_ms, deadline_at, not_before, schedule_id,
                           fire_at, target, wait_reason)
         SELECT j ->> 'id', j ->> 'kind', j ->> 'agent_name', j ->> 'instance',
                j ->> 'database', j ->> 'status', j ->> 'error', j ->> 'backup_id',
                j ->> 'created_by', j ->> 'created_at', j ->> 'finished_at',
                j ->> 'target_database', j ->> 'spec', j ->> 'max_attempts',
                j ->> 'timeout_ms', j ->> 'deadline_at', j ->> 'not_before',
                j ->> 'schedule_id', j ->> 'fire_at', j ->> 'target', j ->> 'wait_reason'
         FROM (SELECT value AS j FROM json_each(?)) WHERE true
         ON CONFLICT (schedule_id, target, fire_at) WHERE schedule_id IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(serde_json::Value::Array(rows).to_string())
    .fetch_all(&mut **transaction)
    .await?;
    let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();
    let made: Vec<JobRecord> = jobs
        .iter()
        .filter(|job| inserted.contains(&job.id))
        .cloned()
        .collect();
    let backups: Vec<serde_json::Value> = made
        .iter()
        .filter(|job| job.kind == JobKind::Backup && job.status == JobState::Queued)
        .map(|job| {
            serde_json::json!([
                job.backup_id,
                job.id,
                job.agent_name,
                job.instance,
                job.database,
                job.created_at
            ])
        })
        .collect();
    if !backups.is_empty() {
        sqlx::query(
            "INSERT INTO backups (id, job_id, agent_name, instance, database, status,
                                  started_at, tags)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4,
                    'running', value ->> 5, ?
             FROM json_each(?)",
        )
        .bind(serde_json::to_string(tags).unwrap_or_else(|_| "{}".into()))
        .bind(serde_json::Value::Array(backups).to_string())
        .execute(&mut **transaction)
        .await?;
    }
    Ok(made)
}
