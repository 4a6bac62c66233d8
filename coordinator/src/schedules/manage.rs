//! `cairn schedule create|list|show|pause|resume|delete|run-now`: each
//! request checked field by field (the error names the flag and the fix)
//! and audited.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_common::names::{ScheduleName, validate_label};
use chrono::{DateTime, TimeZone, Utc};

use super::targets::{Target, targets};
use super::timing::{CronSchedule, spread_offset};
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{JobRecord, JobState, OnOverlap, ScheduleKind, ScheduleRecord};
use crate::error::{CoordinatorError, Result};
use crate::jobs::{
    DEFAULT_DEADLINE, Jobs, MAX_RETRIES, check_database_name, duration_ms, random_suffix,
};

/// The longest `--spread` (a day: a daily schedule spread wider would
/// overlap itself).
pub const MAX_SPREAD: Duration = Duration::from_secs(24 * 3600);
/// The longest `--catch-up`.
pub const MAX_CATCH_UP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many next fires `schedule show` lists.
pub const SHOWN_FIRES: usize = 5;

/// What `cairn schedule create` asks for.
#[derive(Debug, Clone, Default)]
pub struct ScheduleRequest {
    pub name: String,
    pub agent: Option<String>,
    pub selector: BTreeMap<String, String>,
    pub databases: Vec<String>,
    pub all_databases: bool,
    pub cron: String,
    pub timezone: String,
    pub spread: Duration,
    pub on_overlap: String,
    pub catch_up: Duration,
    pub retries: u32,
    pub timeout: Option<Duration>,
    /// `backup` (default) or `drill`.
    pub kind: String,
    pub drill_agent: Option<String>,
    /// The retention policy (a name `cairn retention create` made).
    pub retention: Option<String>,
}

/// A schedule with what `show` adds: its next fires and current targets.
#[derive(Debug, Clone)]
pub struct ScheduleDetail {
    pub schedule: ScheduleRecord,
    pub next_fires: Vec<DateTime<Utc>>,
    /// Each target with its start offset within `--spread`.
    pub targets: Vec<(Target, Duration)>,
    pub problems: Vec<String>,
}

fn invalid(message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument(message.into())
}

impl ScheduleRequest {
    /// Checks every field; the stored record (not yet evaluated) if all
    /// hold.
    fn into_record(self, actor: &str, now: i64) -> Result<ScheduleRecord> {
        let name = ScheduleName::new(self.name.clone())
            .map_err(|e| invalid(format!("schedule NAME: {e}")))?;
        match (&self.agent, self.selector.is_empty()) {
            (Some(_), false) | (None, true) => {
                return Err(invalid(
                    "give either --agent NAME or --selector key=value[,key=value]",
                ));
            }
            _ => {}
        }
        for (key, value) in &self.selector {
            validate_label(key, value).map_err(|e| invalid(format!("--selector: {e}")))?;
        }
        if self.databases.is_empty() != self.all_databases {
            return Err(invalid(
                "give either --database DB (repeatable) or --all-databases",
            ));
        }
        for database in &self.databases {
            check_database_name(database)?;
        }
        let timezone = if self.timezone.is_empty() {
            "UTC".to_string()
        } else {
            self.timezone.clone()
        };
        let timing = CronSchedule::parse(&self.cron, &timezone)?;
        let interval =
            timing.interval_hint(Utc.timestamp_millis_opt(now).single().unwrap_or_default());
        if !self.spread.is_zero() && self.spread >= interval {
            return Err(invalid(format!(
                "--spread {} is not shorter than the time between the schedule's fires ({}): \
                 each target's start would fall after the next fire; spread less, or fire less \
                 often",
                humantime::format_duration(self.spread),
                humantime::format_duration(interval)
            )));
        }
        if self.spread > MAX_SPREAD {
            return Err(invalid(format!(
                "--spread {}: at most 24h",
                humantime::format_duration(self.spread)
            )));
        }
        if self.catch_up > MAX_CATCH_UP {
            return Err(invalid(format!(
                "--catch-up {}: at most 7d",
                humantime::format_duration(self.catch_up)
            )));
        }
        if self.retries > MAX_RETRIES {
            return Err(invalid(format!(
                "--retries {}: at most {MAX_RETRIES}",
                self.retries
            )));
        }
        let on_overlap = match self.on_overlap.as_str() {
            "" | "skip" => OnOverlap::Skip,
            "queue" => OnOverlap::Queue,
            other => {
                return Err(invalid(format!(
                    "--on-overlap {other:?}: use skip (a fire whose previous job still runs is \
                     recorded missed) or queue (it waits its turn)"
                )));
            }
        };
        let kind = match (self.kind.as_str(), &self.drill_agent) {
            ("" | "backup", None) => ScheduleKind::Backup,
            ("drill", Some(_)) if !self.selector.is_empty() => {
                return Err(invalid(
                    "--kind drill takes --agent, not --selector: a drill runs a backup's SQL on \
                     the drill agent, so whose backups are drilled is named, not chosen by labels \
                     the agents report themselves",
                ));
            }
            ("drill", Some(_)) => ScheduleKind::Drill,
            ("drill", None) => return Err(invalid("--kind drill needs --drill-agent NAME")),
            ("" | "backup", Some(_)) => {
                return Err(invalid("--drill-agent goes with --kind drill"));
            }
            (other, _) => {
                return Err(invalid(format!("--kind {other:?}: use backup or drill")));
            }
        };
        Ok(ScheduleRecord {
            id: format!("sch-{now}-{}", random_suffix()?),
            name: name.to_string(),
            kind,
            agent_name: self.agent,
            selector: serde_json::to_string(&self.selector)
                .map_err(|e| CoordinatorError::Internal(format!("cannot encode: {e}")))?,
            databases: serde_json::to_string(&self.databases)
                .map_err(|e| CoordinatorError::Internal(format!("cannot encode: {e}")))?,
            all_databases: self.all_databases,
            cron: self.cron,
            timezone,
            spread_ms: duration_ms(self.spread),
            on_overlap,
            catch_up_ms: duration_ms(self.catch_up),
            retries: i64::from(self.retries),
            timeout_ms: self.timeout.map(duration_ms),
            drill_agent: self.drill_agent,
            paused: false,
            created_by: actor.to_string(),
            created_at: now,
            // Fires from now on; none before the schedule existed.
            evaluated_until: now,
            fire_cursor_at: None,
            fire_cursor_target: None,
            fire_cursor_now: None,
            retention_policy: self.retention,
            retention_applied_at: None,
        })
    }
}

impl Jobs {
    pub async fn create_schedule(
        &self,
        actor: &str,
        request: ScheduleRequest,
    ) -> Result<ScheduleRecord> {
        let now = self.clock.now_ms();
        let record = request.into_record(actor, now)?;
        for (flag, agent) in [
            ("--agent", &record.agent_name),
            ("--drill-agent", &record.drill_agent),
        ] {
            if let Some(agent) = agent {
                match self.catalog.get_agent(agent).await? {
                    Some(found) if found.revoked_at.is_none() => {}
                    Some(_) => {
                        return Err(invalid(format!("{flag} {agent}: the agent is revoked")));
                    }
                    None => {
                        return Err(invalid(format!(
                            "{flag} {agent}: no such agent; see cairn agents list"
                        )));
                    }
                }
            }
        }
        if let Some(policy) = &record.retention_policy
            && self.catalog.get_retention_policy(policy).await?.is_none()
        {
            return Err(crate::catalog::unknown_policy(policy));
        }
        self.catalog.insert_schedule(&record).await?;
        self.audit
            .record(AuditEvent::new(
                actor,
                "schedule.create",
                record.name.clone(),
                Outcome::Success,
                format!(
                    "{} of {} {}, cron {:?} in {}",
                    record.kind,
                    record
                        .agent_name
                        .clone()
                        .unwrap_or_else(|| format!("selector {}", record.selector)),
                    if record.all_databases {
                        "(all databases)".to_string()
                    } else {
                        record.databases.clone()
                    },
                    record.cron,
                    record.timezone
                ),
            ))
            .await;
        Ok(record)
    }

    pub async fn schedule(&self, name: &str) -> Result<ScheduleRecord> {
        self.catalog.get_schedule(name).await?.ok_or_else(|| {
            CoordinatorError::NotFound(format!(
                "no schedule named {name:?}: see cairn schedule list"
            ))
        })
    }

    /// The schedule, its next fires and its targets with their slots.
    pub async fn schedule_detail(&self, name: &str) -> Result<ScheduleDetail> {
        let schedule = self.schedule(name).await?;
        let timing = CronSchedule::parse(&schedule.cron, &schedule.timezone)?;
        let now = Utc
            .timestamp_millis_opt(self.clock.now_ms())
            .single()
            .unwrap_or_default();
        let next_fires = timing.next_fires(now, SHOWN_FIRES);
        let (found, problems) = targets(&self.catalog, &schedule).await?;
        let spread = Duration::from_millis(u64::try_from(schedule.spread_ms).unwrap_or(0));
        let targets = found
            .into_iter()
            .map(|target| {
                let offset = spread_offset(&schedule.id, &target.key(), spread);
                (target, offset)
            })
            .collect();
        Ok(ScheduleDetail {
            schedule,
            next_fires,
            targets,
            problems,
        })
    }

    pub async fn set_schedule_paused(
        &self,
        actor: &str,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleRecord> {
        if !self
            .catalog
            .set_schedule_paused(name, paused, self.clock.now_ms())
            .await?
        {
            return Err(CoordinatorError::NotFound(format!(
                "no schedule named {name:?}: see cairn schedule list"
            )));
        }
        self.audit
            .record(AuditEvent::new(
                actor,
                if paused {
                    "schedule.pause"
                } else {
                    "schedule.resume"
                },
                name,
                Outcome::Success,
                if paused {
                    "no fire makes jobs until it is resumed"
                } else {
                    "fires from now on (none of those while paused)"
                },
            ))
            .await;
        self.schedule(name).await
    }

    pub async fn delete_schedule(&self, actor: &str, name: &str) -> Result<()> {
        if !self.catalog.delete_schedule(name).await? {
            return Err(CoordinatorError::NotFound(format!(
                "no schedule named {name:?}: see cairn schedule list"
            )));
        }
        self.audit
            .record(AuditEvent::new(
                actor,
                "schedule.delete",
                name,
                Outcome::Success,
                "its jobs stay; queued ones still run",
            ))
            .await;
        Ok(())
    }

    /// One fire now, outside the cron: one job per current target, no
    /// spread.
    pub async fn run_schedule_now(&self, actor: &str, name: &str) -> Result<Vec<JobRecord>> {
        let schedule = self.schedule(name).await?;
        let now = self.clock.now_ms();
        let (found, problems) = targets(&self.catalog, &schedule).await?;
        if found.is_empty() {
            return Err(CoordinatorError::Conflict(format!(
                "schedule {name:?} covers no database now{}",
                if problems.is_empty() {
                    String::new()
                } else {
                    format!(": {}", problems.join("; "))
                }
            )));
        }
        let mut jobs = Vec::new();
        for target in &found {
            let mut job = self
                .scheduled_job(&schedule, target, now, now, true)
                .await?;
            job.not_before = now;
            job.deadline_at = Some(now + duration_ms(DEFAULT_DEADLINE));
            jobs.push(job);
        }
        let tags = [("schedule".to_string(), schedule.name.clone())].into();
        let inserted = self.catalog.insert_fire_jobs(&jobs, &tags).await?;
        self.audit
            .record(AuditEvent::new(
                actor,
                "schedule.run-now",
                name,
                Outcome::Success,
                format!(
                    "{} job(s) queued ({} missed: no backup to drill)",
                    inserted
                        .iter()
                        .filter(|j| j.status == JobState::Queued)
                        .count(),
                    inserted
                        .iter()
                        .filter(|j| j.status == JobState::Missed)
                        .count(),
                ),
            ))
            .await;
        self.wake.notify_one();
        Ok(inserted)
    }
}
