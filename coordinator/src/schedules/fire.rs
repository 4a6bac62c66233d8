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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::targets::{Target, targets};
use super::timing::{CronSchedule, due_fires, spread_offset};
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{FireProgress, JobKind, JobRecord, JobState, OnOverlap, ScheduleRecord};
use crate::error::Result;
use crate::jobs::engine::slot_reason;
use crate::jobs::{DEFAULT_DEADLINE, Jobs, duration_ms, random_suffix};

/// Most jobs the schedules make in one tick. A fire over a larger fleet is
/// made over several ticks (the engine ticks again at once while one is
/// part-made), so that no tick holds the catalog for long: measured by
/// `cargo xtask bench --engine`.
pub const FIRE_BATCH: usize = 250;
/// The first batch of a fire, which also works out its targets, makes
/// this much less.
const FIRST_BATCH_SHARE: usize = 5;

/// What one evaluation of the schedules made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FireReport {
    pub queued: usize,
    pub missed: usize,
    /// A fire is part-made: the next tick goes on with it.
    pub unfinished: bool,
}

fn millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn duration_of(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// What a due fire makes for one target.
#[derive(Debug, Clone, Copy)]
enum Planned {
    /// A queued job (missed if skipped for an overlap); the next fire
    /// bounds how long it may wait.
    Run { next_fire: Option<i64> },
    /// A `missed` row: a newer fire caught up after a stop runs instead.
    Superseded,
    /// A `missed` row: older than `--catch-up`.
    TooOld,
}

/// One job of a due fire, in the order batches make them.
struct Row<'a> {
    fire_at: i64,
    key: &'a str,
    target: &'a Target,
    planned: Planned,
}

/// A fire's targets, worked out at its first batch, by key: the order its
/// batches make them in.
#[derive(Debug)]
struct FireTargets {
    /// The schedule's fire time of evaluation (`fire_cursor_now`).
    evaluated_at: i64,
    targets: Arc<Vec<(String, Target)>>,
}

/// The targets of each part-made fire, kept between its batches so that a
/// batch does not read the whole fleet again. A cache only: another
/// coordinator, or this one after a restart, works them out again.
#[derive(Debug, Default)]
pub struct FireTargetsCache(Mutex<HashMap<String, FireTargets>>);

impl FireTargetsCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, FireTargets>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Jobs {
    /// Evaluates every schedule up to `now`, making at most
    /// [`FIRE_BATCH`] jobs.
    pub async fn fire_schedules(&self, now: i64) -> Result<FireReport> {
        let mut report = FireReport::default();
        let mut budget = FIRE_BATCH;
        for schedule in self.catalog.list_schedules().await? {
            if schedule.paused {
                continue;
            }
            if budget == 0 {
                // Whatever is left is for the next tick.
                report.unfinished = true;
                break;
            }
            match self.fire_schedule(&schedule, now, budget).await {
                Ok((made, rows)) => {
                    budget = budget.saturating_sub(rows);
                    report.queued += made.queued;
                    report.missed += made.missed;
                    report.unfinished |= made.unfinished;
                }
                Err(error) => {
                    tracing::error!(schedule = %schedule.name, %error, "cannot fire the schedule");
                }
            }
        }
        if report.queued > 0 || report.unfinished {
            self.wake.notify_one();
        }
        Ok(report)
    }

    /// Makes up to `budget` jobs of the schedule's due fires; what it made
    /// and how many rows it wrote.
    async fn fire_schedule(
        &self,
        schedule: &ScheduleRecord,
        now: i64,
        budget: usize,
    ) -> Result<(FireReport, usize)> {
        let timing = CronSchedule::parse(&schedule.cron, &schedule.timezone)?;
        let cursor = schedule.fire_cursor();
        // A fire is planned as of its first evaluation, however many
        // batches (and ticks) it takes: a fire made slowly is not later
        // taken for one missed while the coordinator was down.
        let evaluated_at = cursor.map_or(now, |(at, _, _)| at);
        let due = due_fires(
            &timing,
            millis(schedule.evaluated_until),
            millis(evaluated_at),
            duration_of(schedule.catch_up_ms),
        );
        if due.run.is_empty()
            && due.missed.is_empty()
            && due.missed_beyond_cap == 0
            && cursor.is_none()
        {
            return Ok((FireReport::default(), 0));
        }
        let (targets, problems, read_now) = self.fire_targets(schedule, evaluated_at).await?;
        // A batch that read the fleet's agents makes fewer jobs, so that
        // the tick stays as short as the others.
        let budget = if read_now {
            budget.min(FIRE_BATCH / FIRST_BATCH_SHARE)
        } else {
            budget
        };
        // The newest fire first: the one that runs (the newest of those
        // caught up after a stop), then the `missed` rows of older ones,
        // each fire's targets by key.
        let (superseded, to_run) = due.run.split_at(due.run.len().saturating_sub(1));
        let mut fires: Vec<(i64, Planned)> = Vec::new();
        for fire in to_run {
            fires.push((
                fire.timestamp_millis(),
                Planned::Run {
                    next_fire: timing
                        .next_fires(*fire, 1)
                        .first()
                        .map(DateTime::timestamp_millis),
                },
            ));
        }
        fires.extend(
            superseded
                .iter()
                .rev()
                .map(|f| (f.timestamp_millis(), Planned::Superseded)),
        );
        fires.extend(
            due.missed
                .iter()
                .rev()
                .map(|f| (f.timestamp_millis(), Planned::TooOld)),
        );
        // Where the last batch stopped: the rows of newer fires, and of
        // this fire's targets up to its key, are made.
        let (first_fire, first_target) = match cursor {
            None => (0, 0),
            Some((_, fire_at, key)) => match fires.iter().position(|(at, _)| *at == fire_at) {
                Some(index) => (
                    index,
                    targets.partition_point(|(target_key, _)| target_key.as_str() <= key),
                ),
                // Not a fire of this plan (cannot be, as it is pinned):
                // start again; the unique key leaves out what exists.
                None => (0, 0),
            },
        };
        let mut batch: Vec<Row<'_>> = Vec::new();
        let mut more = false;
        'fires: for (index, (fire_at, planned)) in fires.iter().enumerate().skip(first_fire) {
            let from = if index == first_fire { first_target } else { 0 };
            for (key, target) in targets.iter().skip(from) {
                if batch.len() == budget.max(1) {
                    more = true;
                    break 'fires;
                }
                batch.push(Row {
                    fire_at: *fire_at,
                    key,
                    target,
                    planned: *planned,
                });
            }
        }
        let progress = match batch.last() {
            Some(last) if more => FireProgress::PartMade {
                evaluated_at,
                fire_at: last.fire_at,
                target: last.key.to_string(),
            },
            _ => FireProgress::Done {
                evaluated_until: evaluated_at,
            },
        };
        let made_before = if cursor.is_some() {
            first_fire * targets.len() + first_target
        } else {
            0
        };
        let batch_end = made_before + batch.len();
        let rows_total = fires.len() * targets.len();

        let active: HashSet<String> = if schedule.on_overlap == OnOverlap::Skip
            && batch
                .iter()
                .any(|row| matches!(row.planned, Planned::Run { .. }))
        {
            self.catalog
                .active_schedule_targets(&schedule.id)
                .await?
                .into_iter()
                .collect()
        } else {
            HashSet::new()
        };
        let newest = to_run
            .first()
            .map(|newest| newest.to_rfc3339())
            .unwrap_or_default();
        let mut jobs = Vec::with_capacity(batch.len());
        for row in &batch {
            let runs = matches!(row.planned, Planned::Run { .. });
            let mut job = self
                .scheduled_job(schedule, row.target, row.fire_at, now, runs)
                .await?;
            match row.planned {
                Planned::Run { next_fire } => {
                    let offset = duration_ms(spread_offset(
                        &schedule.id,
                        row.key,
                        duration_of(schedule.spread_ms),
                    ));
                    job.not_before = row.fire_at + offset;
                    if job.not_before > now {
                        job.wait_reason = slot_reason(job.not_before);
                    }
                    // A fire still waiting when the next one comes is
                    // missed: at most one fire per target waits.
                    job.deadline_at = Some(
                        next_fire.map_or(job.not_before + duration_ms(DEFAULT_DEADLINE), |next| {
                            next + offset
                        }),
                    );
                    if active.contains(row.key) {
                        job.status = JobState::Missed;
                        job.error = "skipped: the job of an earlier fire is still queued or \
                                     running (--on-overlap skip)"
                            .into();
                        job.finished_at = Some(now);
                    }
                }
                Planned::Superseded => {
                    job.status = JobState::Missed;
                    job.error = format!(
                        "caught up once: the coordinator was not running at the fire time, and \
                         the fires since run once, as the newest ({newest})"
                    );
                    job.finished_at = Some(now);
                }
                Planned::TooOld => {
                    job.status = JobState::Missed;
                    job.error = format!(
                        "not run: the coordinator was not running at the fire time, more than \
                         --catch-up ({}) ago",
                        humantime::format_duration(duration_of(schedule.catch_up_ms))
                    );
                    job.finished_at = Some(now);
                }
            }
            jobs.push(job);
        }
        let tags = [("schedule".to_string(), schedule.name.clone())].into();
        // The schedule moves in the same transaction: a crash before it
        // makes this batch again (the unique key leaves out what exists);
        // another evaluation that moved it first made these itself.
        let Some(inserted) = self
            .catalog
            .insert_fire_batch(schedule, &jobs, &tags, &progress)
            .await?
        else {
            return Ok((FireReport::default(), 0));
        };
        let unfinished = matches!(progress, FireProgress::PartMade { .. });
        if !unfinished {
            self.fire_targets.lock().remove(&schedule.id);
        }
        let report = FireReport {
            queued: inserted
                .iter()
                .filter(|j| j.status == JobState::Queued)
                .count(),
            missed: inserted
                .iter()
                .filter(|j| j.status == JobState::Missed)
                .count(),
            unfinished,
        };
        let beyond_cap = if unfinished || due.missed_beyond_cap == 0 {
            0
        } else {
            due.missed_beyond_cap
        };
        if !inserted.is_empty() || beyond_cap > 0 {
            let made_so_far = if unfinished || made_before > 0 {
                format!(" ({batch_end} of the {rows_total} made so far)")
            } else {
                String::new()
            };
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
                        "{} fire(s) over {} target(s): {} job(s) queued, {} missed{made_so_far}{}{}",
                        due.run.len() + due.missed.len(),
                        targets.len(),
                        report.queued,
                        report.missed,
                        if beyond_cap > 0 {
                            format!(", and {beyond_cap} older fire(s) not recorded one by one")
                        } else {
                            String::new()
                        },
                        if problems.is_empty() || made_before > 0 {
                            String::new()
                        } else {
                            format!("; left out: {}", problems.join("; "))
                        }
                    ),
                ))
                .await;
        }
        Ok((report, batch.len()))
    }

    /// The targets of the schedule's fire evaluated at `evaluated_at`, by
    /// key, and (when worked out now, at its first batch) why some are
    /// left out; whether they were worked out now.
    async fn fire_targets(
        &self,
        schedule: &ScheduleRecord,
        evaluated_at: i64,
    ) -> Result<(Arc<Vec<(String, Target)>>, Vec<String>, bool)> {
        if let Some(kept) = self.fire_targets.lock().get(&schedule.id)
            && kept.evaluated_at == evaluated_at
        {
            return Ok((kept.targets.clone(), Vec::new(), false));
        }
        let (found, problems) = targets(&self.catalog, schedule).await?;
        for problem in &problems {
            tracing::warn!(schedule = %schedule.name, %problem, "a target of the schedule is left out");
        }
        let mut keyed: Vec<(String, Target)> = found
            .into_iter()
            .map(|target| (target.key(), target))
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let keyed = Arc::new(keyed);
        self.fire_targets.lock().insert(
            schedule.id.clone(),
            FireTargets {
                evaluated_at,
                targets: keyed.clone(),
            },
        );
        Ok((keyed, problems, true))
    }

    /// The job one fire makes for one target (queued; the caller sets its
    /// start, deadline or end).
    pub(super) async fn scheduled_job(
        &self,
        schedule: &ScheduleRecord,
        target: &Target,
        fire_at: i64,
        now: i64,
        runs: bool,
    ) -> Result<JobRecord> {
        let suffix = random_suffix()?;
        let id = format!("job-{now}-{suffix}");
        let mut job = match &schedule.drill_agent {
            // A drill that will not run needs no backup looked up.
            Some(drill_agent) if !runs => JobRecord::queued(
                id,
                JobKind::Drill,
                drill_agent,
                &target.instance,
                &target.database,
                &format!("schedule:{}", schedule.name),
                now,
            ),
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
pub(crate) mod tests {
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
    pub(crate) async fn engine(dir: &std::path::Path, start: &str) -> Arc<Jobs> {
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
            fire_targets: Default::default(),
            tick_cursor: Default::default(),
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
    async fn a_fire_larger_than_a_batch_is_made_over_ticks_once() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = engine(dir.path(), "2026-06-01T02:59:00Z").await;
        let count = FIRE_BATCH + FIRE_BATCH / 2;
        let mut many = request("0 3 * * *", "UTC", Duration::ZERO);
        many.databases = (0..count).map(|i| format!("db{i:05}")).collect();
        jobs.create_schedule("admin", many).await.unwrap();
        jobs.clock.advance(Duration::from_secs(120));
        let now = jobs.clock.now_ms();
        let before = jobs.catalog.get_schedule("nightly").await.unwrap().unwrap();

        // The first batch, which works out the targets, makes fewer.
        let first = jobs.fire_schedules(now).await.unwrap();
        let first_batch = FIRE_BATCH / FIRST_BATCH_SHARE;
        assert_eq!((first.queued, first.unfinished), (first_batch, true));
        let part_made = jobs.catalog.get_schedule("nightly").await.unwrap().unwrap();
        assert_eq!(part_made.evaluated_until, before.evaluated_until);
        assert!(part_made.fire_cursor().is_some(), "{part_made:?}");
        // An evaluation that read the schedule before that batch (a second
        // coordinator) makes nothing: the batch moved the schedule.
        assert_eq!(
            jobs.fire_schedule(&before, now, FIRE_BATCH).await.unwrap(),
            (FireReport::default(), 0)
        );

        // The next batch comes two hours later (far past the minute a fire
        // may be late with no --catch-up): the fire is still the one
        // planned at its first batch, and its other targets run.
        jobs.clock.advance(Duration::from_secs(2 * 3600));
        let later = jobs.clock.now_ms();
        let (mut queued, mut missed, mut batches) = (0, 0, 0);
        loop {
            let batch = jobs.fire_schedules(later).await.unwrap();
            queued += batch.queued;
            missed += batch.missed;
            batches += 1;
            assert!(batch.queued <= FIRE_BATCH, "{batch:?}");
            if !batch.unfinished {
                break;
            }
        }
        assert_eq!((queued, missed), (count - first_batch, 0));
        assert_eq!(batches, (count - first_batch).div_ceil(FIRE_BATCH));
        let done = jobs.catalog.get_schedule("nightly").await.unwrap().unwrap();
        assert_eq!((done.evaluated_until, done.fire_cursor()), (now, None));
        assert_eq!(
            jobs.fire_schedules(later).await.unwrap(),
            FireReport::default()
        );

        let made = jobs.catalog.list_jobs(None, 10_000).await.unwrap();
        let targets: HashSet<String> = made.iter().filter_map(|j| j.target.clone()).collect();
        assert_eq!((made.len(), targets.len()), (count, count));
        assert!(
            made.iter()
                .all(|j| j.status == JobState::Queued
                    && j.fire_at == Some(at("2026-06-01T03:00:00Z")))
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
