//! Turning a schedule's fires into jobs, at each engine tick.
//!
//! For each schedule not paused, the fires since it was last evaluated
//! (see [`timing::due_fires`]) are expanded over the targets it covers at
//! that moment (see [`targets`]): one job per (target, fire), inserted
//! with the unique key (schedule, target, fire time), so evaluating the
//! same fire twice (a restart at the fire time, or later a second
//! coordinator) makes nothing twice. Only then does the schedule's mark
//! move on. A target starts at the fire time plus its stable spread slot;
//! fires too old to catch up, or skipped because the previous one is still
//! active, are recorded `missed` with the reason.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::targets::{Target, targets};
use super::timing::{CronSchedule, due_fires, spread_offset};
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{JobKind, JobRecord, JobState, ScheduleRecord};
use crate::error::Result;
use crate::jobs::{DEFAULT_DEADLINE, Jobs, duration_ms, random_suffix};

/// What one evaluation of the schedules made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FireReport {
    pub queued: usize,
    pub missed: usize,
}

fn millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn duration_of(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Jobs {
    /// Evaluates every schedule up to `now`.
    pub async fn fire_schedules(&self, now: i64) -> Result<FireReport> {
        let mut report = FireReport::default();
        for schedule in self.catalog.list_schedules().await? {
            if schedule.paused {
                continue;
            }
            match self.fire_schedule(&schedule, now).await {
                Ok(made) => {
                    report.queued += made.queued;
                    report.missed += made.missed;
                }
                Err(error) => {
                    tracing::error!(schedule = %schedule.name, %error, "cannot fire the schedule");
                }
            }
        }
        Ok(report)
    }

    async fn fire_schedule(&self, schedule: &ScheduleRecord, now: i64) -> Result<FireReport> {
        let timing = CronSchedule::parse(&schedule.cron, &schedule.timezone)?;
        let due = due_fires(
            &timing,
            millis(schedule.evaluated_until),
            millis(now),
            duration_of(schedule.catch_up_ms),
        );
        if due.run.is_empty() && due.missed.is_empty() && due.missed_beyond_cap == 0 {
            return Ok(FireReport::default());
        }
        let (targets, problems) = targets(&self.catalog, schedule).await?;
        for problem in &problems {
            tracing::warn!(schedule = %schedule.name, %problem, "a target of the schedule is left out");
        }
        let mut jobs = Vec::new();
        // Fires caught up after a stop run once: as the newest of them.
        let (superseded, to_run) = due.run.split_at(due.run.len().saturating_sub(1));
        for fire in to_run {
            let active: HashSet<String> = if schedule.on_overlap == "skip" {
                self.catalog
                    .active_schedule_targets(&schedule.id)
                    .await?
                    .into_iter()
                    .collect()
            } else {
                HashSet::new()
            };
            let next_fire = timing
                .next_fires(*fire, 1)
                .first()
                .map(DateTime::timestamp_millis);
            for target in &targets {
                let mut job = self
                    .scheduled_job(schedule, target, fire.timestamp_millis(), now)
                    .await?;
                let offset = duration_ms(spread_offset(
                    &schedule.id,
                    &target.key(),
                    duration_of(schedule.spread_ms),
                ));
                job.not_before = fire.timestamp_millis() + offset;
                // A fire still waiting when the next one comes is missed:
                // at most one fire per target waits.
                job.deadline_at = Some(
                    next_fire.map_or(job.not_before + duration_ms(DEFAULT_DEADLINE), |next| {
                        next + offset
                    }),
                );
                if active.contains(&target.key()) {
                    job.status = JobState::Missed;
                    job.error = "skipped: the job of an earlier fire is still queued or running \
                                 (--on-overlap skip)"
                        .into();
                    job.finished_at = Some(now);
                }
                jobs.push(job);
            }
        }
        for fire in superseded {
            for target in &targets {
                let mut job = self
                    .scheduled_job(schedule, target, fire.timestamp_millis(), now)
                    .await?;
                job.status = JobState::Missed;
                job.error = format!(
                    "caught up once: the coordinator was not running at the fire time, and \
                     the fires since run once, as the newest ({})",
                    to_run
                        .first()
                        .map(|newest| newest.to_rfc3339())
                        .unwrap_or_default()
                );
                job.finished_at = Some(now);
                jobs.push(job);
            }
        }
        for fire in &due.missed {
            for target in &targets {
                let mut job = self
                    .scheduled_job(schedule, target, fire.timestamp_millis(), now)
                    .await?;
                job.status = JobState::Missed;
                job.error = format!(
                    "not run: the coordinator was not running at the fire time, more than \
                     --catch-up ({}) ago",
                    humantime::format_duration(duration_of(schedule.catch_up_ms))
                );
                job.finished_at = Some(now);
                jobs.push(job);
            }
        }
        let tags = [("schedule".to_string(), schedule.name.clone())].into();
        let inserted = self.catalog.insert_fire_jobs(&jobs, &tags).await?;
        let report = FireReport {
            queued: inserted
                .iter()
                .filter(|j| j.status == JobState::Queued)
                .count(),
            missed: inserted
                .iter()
                .filter(|j| j.status == JobState::Missed)
                .count(),
        };
        if !inserted.is_empty() || due.missed_beyond_cap > 0 {
            self.audit
                .record(AuditEvent::new(
                    "coordinator",
                    "schedule.fire",
                    schedule.name.clone(),
                    if report.missed == 0 {
                        Outcome::Success
                    } else {
                        Outcome::Failed
                    },
                    format!(
                        "{} fire(s) over {} target(s): {} job(s) queued, {} missed{}{}",
                        due.run.len() + due.missed.len(),
                        targets.len(),
                        report.queued,
                        report.missed,
                        if due.missed_beyond_cap > 0 {
                            format!(
                                ", and {} older fire(s) not recorded one by one",
                                due.missed_beyond_cap
                            )
                        } else {
                            String::new()
                        },
                        if problems.is_empty() {
                            String::new()
                        } else {
                            format!("; left out: {}", problems.join("; "))
                        }
                    ),
                ))
                .await;
        }
        // Only now: a crash before this re-evaluates the same fires, which
        // the unique key makes harmless.
        self.catalog
            .advance_schedule(&schedule.id, schedule.evaluated_until, now)
            .await?;
        if report.queued > 0 {
            self.wake.notify_one();
        }
        Ok(report)
    }

    /// The job one fire makes for one target (queued; the caller sets its
    /// start, deadline or end).
    pub(super) async fn scheduled_job(
        &self,
        schedule: &ScheduleRecord,
        target: &Target,
        fire_at: i64,
        now: i64,
    ) -> Result<JobRecord> {
        let suffix = random_suffix()?;
        let id = format!("job-{now}-{suffix}");
        let mut job = match &schedule.drill_agent {
            None => {
                let mut job = JobRecord::queued(
                    id,
                    JobKind::Backup,
                    &target.agent,
                    &target.instance,
                    &target.database,
                    &format!("schedule:{}", schedule.name),
                    now,
                );
                job.backup_id = format!("bk-{now}-{suffix}");
                job
            }
            Some(drill_agent) => {
                self.drill_job(id, schedule, target, drill_agent, now)
                    .await?
            }
        };
        job.schedule_id = Some(schedule.id.clone());
        job.target = Some(target.key());
        job.fire_at = Some(fire_at);
        job.max_attempts = schedule.retries + 1;
        job.timeout_ms = schedule.timeout_ms;
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use cairn_common::crypto::SecretKey;
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::audit::log::AuditLog;
    use crate::catalog::{Catalog, CertificateRecord, Registration};
    use crate::clock::Clock;
    use crate::fleet::Fleet;
    use crate::repository::{LocalStore, Repository, Store};
    use crate::schedules::manage::ScheduleRequest;

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    /// An engine on a fresh catalog whose (manual) clock starts at
    /// `start`, with agent db1 (instance main,
    /// label env=prod) enrolled but not connected.
    async fn engine(dir: &std::path::Path, start: &str) -> Arc<Jobs> {
        let catalog = Arc::new(Catalog::open_sqlite(&dir.join("c.sqlite")).await.unwrap());
        let repository = Arc::new(
            Repository::create(
                Store::Local(LocalStore::new(dir.join("repository"))),
                &SecretKey::generate().unwrap(),
            )
            .await
            .unwrap(),
        );
        let certificate = CertificateRecord {
            serial: "01",
            kind: "agent",
            name: "db1",
            role: None,
            issued_at: 0,
            not_after: i64::MAX / 2,
        };
        catalog.enroll_agent("db1", &certificate, 0).await.unwrap();
        catalog
            .record_registration(
                "db1",
                "01",
                i64::MAX / 2,
                &Registration {
                    hostname: "host".into(),
                    version: cairn_common::VERSION.into(),
                    labels: BTreeMap::from([("env".to_string(), "prod".to_string())]),
                    instances: vec!["main".into()],
                    permitted_operations: vec![],
                    peer_address: "127.0.0.1:1".into(),
                },
                0,
            )
            .await
            .unwrap();
        Arc::new(Jobs {
            audit: AuditLog::new(catalog.clone()),
            fleet: Arc::new(Fleet::new(
                Duration::from_secs(1),
                CancellationToken::new(),
                1,
            )),
            catalog,
            repository,
            config: crate::config::BackupConfig::default(),
            limits: crate::config::JobsConfig::default(),
            tasks: TaskTracker::new(),
            clock: Clock::manual(at(start)),
            term: 1,
            wake: Arc::new(Notify::new()),
        })
    }

    fn request(cron: &str, timezone: &str, catch_up: Duration) -> ScheduleRequest {
        ScheduleRequest {
            name: "nightly".into(),
            selector: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            databases: vec!["shop".into()],
            cron: cron.into(),
            timezone: timezone.into(),
            catch_up,
            ..ScheduleRequest::default()
        }
    }

    /// Every job the schedule made: (fire time, status), by fire time.
    async fn fires(jobs: &Jobs) -> Vec<(i64, JobState)> {
        let mut made: Vec<(i64, JobState)> = jobs
            .catalog
            .list_jobs(None, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|job| (job.fire_at.unwrap(), job.status))
            .collect();
        made.sort_by_key(|(fire, _)| *fire);
        made
    }

    /// A schedule `30 2 * * *` in Europe/Berlin made at `start`, ticked
    /// every minute for the eight hours after.
    async fn nightly_at_half_past_two_in_berlin(dir: &std::path::Path, start: &str) -> Arc<Jobs> {
        let jobs = engine(dir, start).await;
        jobs.create_schedule(
            "admin",
            request("30 2 * * *", "Europe/Berlin", Duration::ZERO),
        )
        .await
        .unwrap();
        run_for(
            &jobs,
            Duration::from_secs(8 * 3600),
            Duration::from_secs(60),
        )
        .await;
        jobs
    }

    /// Ticks every `step` for `span` of the manual clock.
    async fn run_for(jobs: &Jobs, span: Duration, step: Duration) {
        let mut elapsed = Duration::ZERO;
        while elapsed < span {
            jobs.clock.advance(step);
            elapsed += step;
            jobs.fire_schedules(jobs.clock.now_ms()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_fire_in_the_skipped_hour_runs_once_at_the_jump() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = nightly_at_half_past_two_in_berlin(dir.path(), "2026-03-28T22:00:00Z").await;
        // 02:30 does not exist on 2026-03-29 in Berlin: it fires at 03:00
        // CEST, 01:00 UTC, once.
        assert_eq!(
            fires(&jobs).await,
            vec![(at("2026-03-29T01:00:00Z"), JobState::Queued)]
        );
    }

    #[tokio::test]
    async fn a_fire_in_the_repeated_hour_runs_once() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = nightly_at_half_past_two_in_berlin(dir.path(), "2026-10-24T22:00:00Z").await;
        // 02:30 happens twice on 2026-10-25 in Berlin: the first, CEST.
        assert_eq!(
            fires(&jobs).await,
            vec![(at("2026-10-25T00:30:00Z"), JobState::Queued)]
        );
    }

    #[tokio::test]
    async fn fires_missed_while_down_run_within_the_catch_up_and_the_rest_are_recorded_missed() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = engine(dir.path(), "2026-06-01T00:10:00Z").await;
        jobs.create_schedule(
            "admin",
            request("0 * * * *", "UTC", Duration::from_secs(90 * 60)),
        )
        .await
        .unwrap();
        // The coordinator is down for five hours, then ticks once.
        jobs.clock.advance(Duration::from_secs(5 * 3600));
        jobs.fire_schedules(jobs.clock.now_ms()).await.unwrap();
        assert_eq!(
            fires(&jobs).await,
            vec![
                (at("2026-06-01T01:00:00Z"), JobState::Missed),
                (at("2026-06-01T02:00:00Z"), JobState::Missed),
                (at("2026-06-01T03:00:00Z"), JobState::Missed),
                (at("2026-06-01T04:00:00Z"), JobState::Missed),
                (at("2026-06-01T05:00:00Z"), JobState::Queued),
            ]
        );
        // Beyond the catch-up window: said so; within it, superseded by the
        // newest fire, which runs once.
        let made = jobs.catalog.list_jobs(None, 10).await.unwrap();
        for job in &made {
            let fire = job.fire_at.unwrap();
            let expected = if fire < at("2026-06-01T03:40:00Z") {
                "--catch-up"
            } else if fire < at("2026-06-01T05:00:00Z") {
                "caught up once"
            } else {
                ""
            };
            assert!(job.error.contains(expected), "{job:?}");
        }
    }

    #[tokio::test]
    async fn a_fire_evaluated_twice_makes_one_job_per_target() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = engine(dir.path(), "2026-06-01T02:59:00Z").await;
        let schedule = jobs
            .create_schedule("admin", request("0 3 * * *", "UTC", Duration::ZERO))
            .await
            .unwrap();
        jobs.clock.advance(Duration::from_secs(120));
        let now = jobs.clock.now_ms();
        assert_eq!(jobs.fire_schedules(now).await.unwrap().queued, 1);
        // A coordinator that stopped after inserting the fire's jobs but
        // before moving the mark evaluates the same fire again.
        assert!(
            jobs.catalog
                .advance_schedule(&schedule.id, now, schedule.evaluated_until)
                .await
                .unwrap()
        );
        assert_eq!(jobs.fire_schedules(now).await.unwrap().queued, 0);
        assert_eq!(
            fires(&jobs).await,
            vec![(at("2026-06-01T03:00:00Z"), JobState::Queued)]
        );
    }

    #[tokio::test]
    async fn a_spread_as_long_as_the_interval_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = engine(dir.path(), "2026-06-01T00:00:00Z").await;
        let mut hourly = request("0 * * * *", "UTC", Duration::ZERO);
        hourly.spread = Duration::from_secs(2 * 3600);
        let refused = jobs.create_schedule("admin", hourly).await.unwrap_err();
        assert!(
            refused.to_string().contains("--spread 2h") && refused.to_string().contains("1h"),
            "{refused}"
        );
        let mut daily = request("0 3 * * *", "UTC", Duration::ZERO);
        daily.spread = Duration::from_secs(2 * 3600);
        jobs.create_schedule("admin", daily).await.unwrap();
    }
}
