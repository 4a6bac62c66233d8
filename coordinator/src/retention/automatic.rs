//! Retention without an operator: a schedule's policy applied to a
//! target's lineage after each of its successful backups, and once a day to
//! every target of every schedule with a policy; deletions an interrupted
//! run left are finished when the engine starts.
//!
//! The daily run of a schedule is claimed in the catalog by a conditional
//! update (`Catalog::claim_daily_retention`), so of several coordinators on
//! one catalog one runs it. A failure is logged and audited; it never
//! fails the backup job that triggered it.

use chrono::{DateTime, Utc};

use super::apply::{ApplyRequest, Deleter, Scope};
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{JobRecord, Lineage, ScheduleRecord, unknown_policy};
use crate::error::Result;
use crate::jobs::Jobs;
use crate::schedules::targets::agents_of;
use crate::schedules::timing::parse_timezone;

/// How often each schedule's policy is applied to all its targets.
pub const DAILY_RETENTION_INTERVAL_MS: i64 = 24 * 60 * 60 * 1000;

/// Who automatic runs are audited as.
const ACTOR: &str = "coordinator";

impl Jobs {
    fn deleter(&self) -> Deleter<'_> {
        Deleter {
            catalog: &self.catalog,
            repository: &self.repository,
            audit: &self.audit,
        }
    }

    /// The apply request of a schedule's policy; `None` without a policy.
    async fn schedule_request(
        &self,
        schedule: &ScheduleRecord,
        scope: Scope,
    ) -> Result<Option<ApplyRequest>> {
        let Some(name) = &schedule.retention_policy else {
            return Ok(None);
        };
        let record = self
            .catalog
            .get_retention_policy(name)
            .await?
            .ok_or_else(|| unknown_policy(name))?;
        Ok(Some(ApplyRequest {
            policy: super::Policy::from_stored(&record.name, &record.policy)?,
            policy_name: record.name,
            scope,
            dry_run: false,
            zone: parse_timezone(&schedule.timezone)?,
            actor: ACTOR.to_string(),
        }))
    }

    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.clock.now_ms()).unwrap_or_default()
    }

    /// After a scheduled backup succeeded: its schedule's policy on that
    /// backup's lineage only. Never fails the job: problems are logged and
    /// audited.
    pub(crate) async fn retention_after_backup(&self, job: &JobRecord) {
        if let Err(error) = self.try_retention_after_backup(job).await {
            self.retention_failed(job.schedule_id.as_deref().unwrap_or(""), &error)
                .await;
        }
    }

    async fn try_retention_after_backup(&self, job: &JobRecord) -> Result<()> {
        let Some(schedule_id) = &job.schedule_id else {
            return Ok(());
        };
        let Some(schedule) = self.catalog.get_schedule_by_id(schedule_id).await? else {
            return Ok(());
        };
        let Some(request) = self.schedule_request(&schedule, Scope::default()).await? else {
            return Ok(());
        };
        let Some(backup) = self.catalog.get_backup(&job.backup_id).await? else {
            return Ok(());
        };
        let lineage = Lineage::of_parts(
            &backup.system_identifier,
            &backup.agent_name,
            &backup.instance,
            &backup.database,
        );
        self.deleter()
            .apply_to(&request, lineage, self.now())
            .await?;
        Ok(())
    }

    /// Once a day per schedule with a policy (claimed in the catalog):
    /// the policy on every lineage its targets have backups of.
    pub(crate) async fn daily_retention(&self, now_ms: i64) -> Result<usize> {
        let due = self
            .catalog
            .schedules_due_for_retention(now_ms - DAILY_RETENTION_INTERVAL_MS)
            .await?;
        let mut ran = 0;
        for schedule in due {
            if !self
                .catalog
                .claim_daily_retention(&schedule.id, now_ms, DAILY_RETENTION_INTERVAL_MS)
                .await?
            {
                continue;
            }
            ran += 1;
            if let Err(error) = self.daily_retention_of(&schedule).await {
                self.retention_failed(&schedule.name, &error).await;
            }
        }
        Ok(ran)
    }

    async fn daily_retention_of(&self, schedule: &ScheduleRecord) -> Result<()> {
        let agents = agents_of(&self.catalog, schedule)
            .await?
            .into_iter()
            .map(|agent| agent.name)
            .collect();
        let scope = Scope {
            agents: Some(agents),
            databases: if schedule.all_databases {
                None
            } else {
                Some(schedule.databases()?)
            },
        };
        if let Some(request) = self.schedule_request(schedule, scope).await? {
            self.deleter().apply(&request, self.now()).await?;
        }
        Ok(())
    }

    /// Finishes deletions an interrupted run left: at the engine's start.
    pub(crate) async fn finish_pending_deletions(&self) {
        if let Err(error) = self.deleter().finish_pending().await {
            tracing::error!(%error, "cannot finish the deletions an interrupted retention run left");
        }
    }

    async fn retention_failed(&self, schedule: &str, error: &crate::CoordinatorError) {
        tracing::error!(schedule, %error, "automatic retention failed");
        self.audit
            .record(AuditEvent::new(
                ACTOR,
                "retention.apply",
                format!("schedule {schedule}"),
                Outcome::Failed,
                format!("automatic retention failed: {error}"),
            ))
            .await;
    }
}
