//! The engine's loop: each tick reads the active jobs from the catalog
//! (leaving out waiting ones whose reason still holds, see
//! [`crate::catalog::Catalog::tick_jobs`]), ends those past their deadline
//! or timeout, and starts queued ones in order of creation while the
//! limits allow. An attempt's command runs in
//! a task that ends the attempt with the agent's answer; a retryable
//! failure queues the job again after a backoff.
//!
//! The catalog is the engine's whole state: every transition is a
//! conditional update (see [`crate::catalog::Catalog::start_attempt`]), so
//! a tick, a late agent report and a cancel cannot both end one attempt,
//! and the loop can run in any coordinator holding the term.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::proto::{self, command};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{AttemptEnd, JobKind, JobRecord, JobState, TickJobs, offline_reason};
use crate::error::{CoordinatorError, Result};
use crate::fleet::CommandOutcome;
use crate::jobs::restores::{RestoreReport, RestoreSpec};
use crate::jobs::{Jobs, random_suffix};

/// How often the engine looks at its jobs when nothing wakes it.
pub const TICK: Duration = Duration::from_secs(1);
/// Most wait reasons one tick rewrites (10,000 jobs whose spread slots
/// all pass at once would otherwise hold the catalog for a third of a
/// second).
pub const WAIT_REASON_BATCH: usize = 1000;
/// Most queued jobs one tick looks at (in full): the next tick goes on
/// after the last, so every queued job is looked at within a few ticks
/// however many wait, and no tick reads 10,000 rows.
const TICK_LOOK_AT: i64 = 1000;
/// The first retry waits this long; each further one twice as long.
const FIRST_RETRY_DELAY_MS: i64 = 5_000;
/// The longest wait between attempts.
const MAX_RETRY_DELAY_MS: i64 = 30 * 60 * 1000;
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// What one tick did, for tests and the bench.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Jobs queued by schedule fires.
    pub fired: usize,
    pub started: usize,
    pub waiting: usize,
    pub missed: usize,
    pub timed_out: usize,
    /// Attempts failed because their agent did not come back in time.
    pub lost: usize,
    /// Wait reasons rewritten (at most [`WAIT_REASON_BATCH`]).
    pub reasons_written: usize,
    /// A schedule's fire is part-made: the next tick goes on with it.
    pub firing: bool,
}

/// The running jobs counted against the limits.
#[derive(Debug, Default)]
struct Load {
    per_instance: HashMap<String, u32>,
    per_agent: HashMap<String, u32>,
    total: u32,
}

impl Load {
    fn add(&mut self, job: &JobRecord) {
        *self.per_instance.entry(job.instance_key()).or_default() += 1;
        *self.per_agent.entry(job.agent_name.clone()).or_default() += 1;
        self.total += 1;
    }
}

fn utc_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// Why a scheduled job waits before its start slot: what a fire records
/// with the job, so the engine has nothing to rewrite until the slot.
pub fn slot_reason(not_before: i64) -> String {
    format!(
        "starts at {}, its slot within the schedule's --spread",
        utc_time(not_before)
    )
}

/// The delay before attempt `next` (2, 3, ...) of a job.
fn retry_delay_ms(next: i64) -> i64 {
    let doublings = u32::try_from((next - 2).clamp(0, 20)).unwrap_or(20);
    FIRST_RETRY_DELAY_MS
        .saturating_mul(1_i64 << doublings)
        .min(MAX_RETRY_DELAY_MS)
}

/// Whether a failed attempt is worth another: the network, the storage, an
/// agent restart; never the database's or the tools' own refusal.
fn retryable(outcome: &Result<CommandOutcome>) -> bool {
    matches!(
        outcome,
        Ok(CommandOutcome::Interrupted(_)) | Err(CoordinatorError::Unavailable(_))
    )
}

impl Jobs {
    /// Runs the engine until `shutdown`: a tick every [`TICK`], or sooner
    /// when woken.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.finish_pending_deletions().await;
        loop {
            if let Err(error) = self.tick().await {
                tracing::error!(%error, "job engine tick failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// One pass over the active jobs.
    pub async fn tick(self: &Arc<Self>) -> Result<TickReport> {
        let now = self.clock.now_ms();
        // Fires first: a job due now starts in this same tick.
        let fired = self.fire_schedules(now).await?;
        self.start_daily_retention(now).await;
        let after = self
            .tick_cursor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let TickJobs {
            jobs: active,
            still_waiting,
            next,
        } = self
            .catalog
            .tick_jobs_from(
                now,
                &self.fleet.online_agents(),
                after.as_ref(),
                TICK_LOOK_AT,
            )
            .await?;
        *self.tick_cursor.lock().unwrap_or_else(|e| e.into_inner()) = next;
        let mut report = TickReport {
            fired: fired.queued,
            firing: fired.unfinished,
            waiting: still_waiting,
            ..TickReport::default()
        };
        let mut load = Load::default();
        let reattach_ms = crate::jobs::duration_ms(self.limits.reattach_timeout);
        for job in active.iter().filter(|j| j.status == JobState::Running) {
            if job
                .detached_at
                .is_some_and(|since| since + reattach_ms <= now)
            {
                report.lost += 1;
                let message = format!(
                    "its agent {} did not come back within jobs.reattach_timeout ({})",
                    job.agent_name,
                    humantime::format_duration(self.limits.reattach_timeout)
                );
                self.fail_attempt(job, &message, true).await;
                continue;
            }
            if let Some(timeout) = job.timeout_ms
                && job.attempt_started_at.is_some_and(|at| at + timeout <= now)
            {
                report.timed_out += 1;
                self.time_out(job, timeout).await;
                continue;
            }
            load.add(job);
        }
        let mut reasons = Vec::new();
        for job in active.iter().filter(|j| j.status == JobState::Queued) {
            // The deadline is to start by: a retry is bounded by its
            // attempts instead.
            if job.attempt == 0 && job.deadline_at.is_some_and(|deadline| deadline <= now) {
                report.missed += 1;
                self.miss(job, now).await?;
                continue;
            }
            match self.wait_reason(job, &load, now) {
                Some(reason) => {
                    report.waiting += 1;
                    if reason != job.wait_reason {
                        reasons.push((job.id.clone(), reason));
                    }
                }
                None => {
                    if self.dispatch(job, now).await? {
                        report.started += 1;
                        load.add(job);
                    }
                }
            }
        }
        // Reasons are for people reading `jobs list`: a tick writes a
        // bounded number, and the next tick the rest (they still differ).
        reasons.truncate(WAIT_REASON_BATCH);
        self.catalog.set_wait_reasons(&reasons).await?;
        report.reasons_written = reasons.len();
        Ok(report)
    }

    /// Why a queued job cannot start now, or `None` if it can.
    fn wait_reason(&self, job: &JobRecord, load: &Load, now: i64) -> Option<String> {
        if job.not_before > now {
            // An absolute time, so the reason (and its row) does not change
            // at every tick.
            let at = utc_time(job.not_before);
            return Some(if job.attempt > 0 {
                format!(
                    "attempt {} of {} starts at {at} (after: {})",
                    job.attempt + 1,
                    job.max_attempts,
                    job.error
                )
            } else if job.schedule_id.is_some() {
                slot_reason(job.not_before)
            } else {
                format!("starts at {at}")
            });
        }
        if !self.fleet.is_online(&job.agent_name) {
            return Some(offline_reason(&job.agent_name));
        }
        let limits = &self.limits;
        let on_instance = load
            .per_instance
            .get(&job.instance_key())
            .copied()
            .unwrap_or(0);
        if on_instance >= limits.max_per_instance {
            return Some(format!(
                "{on_instance} job(s) running on {} (jobs.max_per_instance = {})",
                job.instance_key(),
                limits.max_per_instance
            ));
        }
        let on_agent = load.per_agent.get(&job.agent_name).copied().unwrap_or(0);
        if on_agent >= limits.max_per_agent {
            return Some(format!(
                "{on_agent} job(s) running on agent {} (jobs.max_per_agent = {})",
                job.agent_name, limits.max_per_agent
            ));
        }
        if load.total >= limits.max_running {
            return Some(format!(
                "{} job(s) running on the coordinator (jobs.max_running = {})",
                load.total, limits.max_running
            ));
        }
        None
    }

    /// Starts the next attempt of a queued job; whether it started here.
    async fn dispatch(self: &Arc<Self>, job: &JobRecord, now: i64) -> Result<bool> {
        let attempt_id = format!("at-{}", random_suffix()?);
        let command = match self.command_for(job).await {
            Ok(command) => command,
            Err(error) => {
                // Nothing to run (the backup to restore went away): the job
                // cannot start, ever.
                let message = format!("cannot start: {error}");
                if self
                    .catalog
                    .end_queued_job(&job.id, JobState::Failed, &message, now)
                    .await?
                {
                    self.audit_end(job, JobState::Failed, &message).await;
                }
                return Ok(false);
            }
        };
        // The attempt's start is when its command leaves, not when this
        // tick began (an agent registering meanwhile compares with it).
        let now = self.clock.now_ms().max(now);
        if !self
            .catalog
            .start_attempt(&job.id, &attempt_id, self.term, now)
            .await?
        {
            return Ok(false);
        }
        let mut running = job.clone();
        running.status = JobState::Running;
        running.attempt += 1;
        running.attempt_id = attempt_id.clone();
        running.term = self.term;
        running.started_at = Some(running.started_at.unwrap_or(now));
        self.audit
            .record(AuditEvent::new(
                "coordinator",
                "job.attempt",
                job.id.clone(),
                Outcome::Success,
                format!(
                    "attempt {} of {} ({attempt_id}) started on {}",
                    running.attempt,
                    running.max_attempts,
                    running.instance_key()
                ),
            ))
            .await;
        // The result comes back by attempt id (see `attach`), on this
        // session or a later one: nothing waits for it here, and the send
        // runs apart so that one slow agent does not hold up the tick.
        let engine = self.clone();
        self.tasks.spawn(async move {
            if let Err(error) = engine
                .fleet
                .send_job_command(&running.agent_name, &running.attempt_id, command)
                .await
            {
                let message = format!("the command did not reach the agent: {error}");
                engine.fail_attempt(&running, &message, true).await;
            }
        });
        Ok(true)
    }

    /// The command for a job's next attempt, built from its row.
    async fn command_for(&self, job: &JobRecord) -> Result<command::Kind> {
        match job.kind {
            JobKind::Backup => Ok(command::Kind::Backup(proto::BackupCommand {
                instance: job.instance.clone(),
                database: job.database.clone(),
                job_id: job.id.clone(),
                backup_id: job.backup_id.clone(),
                zstd_level: self.config.zstd_level,
                include_role_passwords: self.config.include_role_passwords,
            })),
            JobKind::Restore | JobKind::Drill => {
                let spec: RestoreSpec = serde_json::from_str(&job.spec).map_err(|e| {
                    CoordinatorError::Internal(format!("job {} has a bad spec: {e}", job.id))
                })?;
                Ok(command::Kind::Restore(spec.command(job)))
            }
        }
    }

    /// Ends an attempt with its agent's answer.
    pub(crate) async fn conclude(&self, job: &JobRecord, outcome: Result<CommandOutcome>) {
        let (state, message) = match &outcome {
            Ok(CommandOutcome::JobDone(report)) => self.succeeded(job, report.clone()).await,
            Ok(CommandOutcome::Cancelled(detail)) => {
                (JobState::Cancelled, format!("cancelled: {detail}"))
            }
            Ok(CommandOutcome::Refused { reason, .. }) => (JobState::Failed, reason.clone()),
            Ok(CommandOutcome::Error(error) | CommandOutcome::Interrupted(error)) => {
                (JobState::Failed, error.clone())
            }
            Ok(CommandOutcome::Probe(_)) => (
                JobState::Failed,
                "the agent answered with a probe".to_string(),
            ),
            Err(error) => (JobState::Failed, error.to_string()),
        };
        let end =
            if state == JobState::Failed && retryable(&outcome) && job.attempt < job.max_attempts {
                AttemptEnd::Retry {
                    not_before: self.clock.now_ms() + retry_delay_ms(job.attempt + 1),
                }
            } else {
                AttemptEnd::Final(state)
            };
        // A drill's verdict is its detail whether it passed or not.
        let error = if state == JobState::Succeeded {
            ""
        } else {
            message.as_str()
        };
        let final_end = end == AttemptEnd::Final(state);
        let ended = self.end_attempt(job, end, error).await;
        // Only a drill that ran to a result says something of its backup
        // (not one cancelled, timed out or cut off).
        let ran = matches!(
            &outcome,
            Ok(CommandOutcome::JobDone(_) | CommandOutcome::Error(_))
        );
        if job.kind == JobKind::Drill && ended && final_end && ran {
            self.record_drill(job, state == JobState::Succeeded, &message)
                .await;
        }
        // The job is over and recorded: what retention does cannot change
        // its outcome.
        if job.kind == JobKind::Backup && ended && final_end && state == JobState::Succeeded {
            self.retention_after_backup(job).await;
        }
    }

    /// Starts the daily retention runs that are due, in a task of their
    /// own so deletions do not hold up the tick.
    async fn start_daily_retention(self: &Arc<Self>, now: i64) {
        let due_before = now - crate::retention::automatic::DAILY_RETENTION_INTERVAL_MS;
        match self.catalog.schedules_due_for_retention(due_before).await {
            Ok(due) if due.is_empty() => {}
            Ok(_) => {
                let jobs = Arc::clone(self);
                self.tasks.spawn(async move {
                    if let Err(error) = jobs.daily_retention(now).await {
                        tracing::error!(%error, "daily retention failed");
                    }
                });
            }
            Err(error) => tracing::error!(%error, "cannot read the schedules due for retention"),
        }
    }

    /// How a job the agent reported done ended: a backup only if its
    /// manifest was stored; a drill only if its rows match.
    async fn succeeded(
        &self,
        job: &JobRecord,
        report: Option<proto::RestoreReport>,
    ) -> (JobState, String) {
        match job.kind {
            JobKind::Backup => match self.catalog.get_backup(&job.backup_id).await {
                Ok(Some(backup)) if backup.status == "complete" => {
                    (JobState::Succeeded, String::new())
                }
                _ => (
                    JobState::Failed,
                    "the agent finished but the backup's manifest was not stored".to_string(),
                ),
            },
            JobKind::Restore | JobKind::Drill => {
                let report = RestoreReport::from(report.unwrap_or_default());
                match serde_json::to_string(&report) {
                    Ok(json) => {
                        if let Err(error) = self.catalog.set_job_report(&job.id, &json).await {
                            tracing::error!(%error, "cannot record the restore report");
                        }
                    }
                    Err(error) => tracing::error!(%error, "cannot encode the restore report"),
                }
                if job.kind == JobKind::Drill {
                    match self.check_drill(job, &report).await {
                        Ok(detail) => (JobState::Succeeded, detail),
                        Err(problem) => (JobState::Failed, problem),
                    }
                } else {
                    (JobState::Succeeded, String::new())
                }
            }
        }
    }

    /// Fails the job's current attempt for a reason found on the
    /// coordinator's side (a storage failure, a refused upload): retried if
    /// `retryable` and attempts remain.
    pub(crate) async fn fail_attempt(&self, job: &JobRecord, message: &str, retryable: bool) {
        let end = if retryable && job.attempt < job.max_attempts {
            AttemptEnd::Retry {
                not_before: self.clock.now_ms() + retry_delay_ms(job.attempt + 1),
            }
        } else {
            AttemptEnd::Final(JobState::Failed)
        };
        self.end_attempt(job, end, message).await;
    }

    /// Ends the job's current attempt and audits what happened; an attempt
    /// something else ended already (an upload refused, a timeout, a
    /// cancel) keeps that outcome and its one audit row.
    /// Whether this call ended it.
    pub(crate) async fn end_attempt(
        &self,
        job: &JobRecord,
        end: AttemptEnd,
        message: &str,
    ) -> bool {
        let now = self.clock.now_ms();
        let state = match self
            .catalog
            .end_attempt(&job.id, &job.attempt_id, &end, message, now)
            .await
        {
            Ok(Some(state)) => state,
            Ok(None) => {
                tracing::info!(?end, error = message, "the attempt had ended already");
                return false;
            }
            Err(error) => {
                tracing::error!(%error, "cannot record the end of the attempt");
                return false;
            }
        };
        match (end, state) {
            (_, JobState::Cancelled) => {
                let message = if message.starts_with("cancelled") {
                    message.to_string()
                } else {
                    format!("cancelled ({message})")
                };
                self.audit_end(job, JobState::Cancelled, &message).await;
            }
            (AttemptEnd::Final(_), state) => self.audit_end(job, state, message).await,
            (AttemptEnd::Retry { not_before }, _) => {
                tracing::warn!(
                    error = message,
                    attempt = job.attempt,
                    "attempt failed; retrying"
                );
                self.audit
                    .record(AuditEvent::new(
                        "coordinator",
                        "job.retry",
                        job.id.clone(),
                        Outcome::Failed,
                        format!(
                            "attempt {} of {} failed ({message}); the next starts in {}s",
                            job.attempt,
                            job.max_attempts,
                            (not_before - now).max(0) / 1000
                        ),
                    ))
                    .await;
            }
        }
        // The instance is free: the next queued job need not wait a tick.
        self.wake.notify_one();
        true
    }

    /// Audits a job's end under its kind's action.
    pub(crate) async fn audit_end(&self, job: &JobRecord, state: JobState, message: &str) {
        let outcome = match state {
            JobState::Succeeded => Outcome::Success,
            JobState::Cancelled => Outcome::Refused,
            _ => Outcome::Failed,
        };
        tracing::info!(job_id = %job.id, status = state.as_str(), error = message, "job ended");
        self.audit
            .record(AuditEvent::new(
                "coordinator",
                match job.kind {
                    JobKind::Backup => "backup.end",
                    JobKind::Restore => "restore.end",
                    JobKind::Drill => "drill.end",
                },
                job.id.clone(),
                outcome,
                format!("{}: {message}", state.as_str()),
            ))
            .await;
    }

    /// Ends a queued job that did not start by its deadline.
    async fn miss(&self, job: &JobRecord, now: i64) -> Result<()> {
        let why = if job.wait_reason.is_empty() {
            "waiting".to_string()
        } else {
            job.wait_reason.clone()
        };
        let message = format!("not started by its deadline ({why})");
        if self
            .catalog
            .end_queued_job(&job.id, JobState::Missed, &message, now)
            .await?
        {
            self.audit_end(job, JobState::Missed, &message).await;
        }
        Ok(())
    }

    /// Stops an attempt past its timeout: the agent is told to stop (and
    /// cleans up), and the job fails without a retry.
    async fn time_out(&self, job: &JobRecord, timeout_ms: i64) {
        let message = format!(
            "timed out after {} (--timeout); the agent was told to stop",
            humantime::format_duration(Duration::from_millis(
                u64::try_from(timeout_ms).unwrap_or(0)
            ))
        );
        self.end_attempt(job, AttemptEnd::Final(JobState::Failed), &message)
            .await;
        let fleet = self.fleet.clone();
        let agent = job.agent_name.clone();
        let job_id = job.id.clone();
        let attempt_id = job.attempt_id.clone();
        self.tasks.spawn(async move {
            let stop = command::Kind::Cancel(proto::CancelCommand { job_id, attempt_id });
            if let Err(error) = fleet.send_command(&agent, stop, CANCEL_TIMEOUT).await {
                tracing::warn!(%error, "cannot tell the agent to stop a timed-out job");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        assert_eq!(retry_delay_ms(2), 5_000);
        assert_eq!(retry_delay_ms(3), 10_000);
        assert_eq!(retry_delay_ms(4), 20_000);
        assert_eq!(retry_delay_ms(40), MAX_RETRY_DELAY_MS);
    }

    #[test]
    fn only_interruptions_and_lost_agents_are_retried() {
        assert!(retryable(&Ok(CommandOutcome::Interrupted("reset".into()))));
        assert!(retryable(&Err(CoordinatorError::Unavailable(
            "agent db1 disconnected".into()
        ))));
        assert!(!retryable(&Ok(CommandOutcome::Error(
            "pg_dump: error: database \"nope\" does not exist".into()
        ))));
        assert!(!retryable(&Ok(CommandOutcome::Refused {
            operation: None,
            reason: "not permitted".into()
        })));
        assert!(!retryable(&Err(CoordinatorError::Timeout("late".into()))));
    }
}
