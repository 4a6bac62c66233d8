//! The job engine's tick with a fleet-wide schedule, in process: how long
//! one `Jobs::tick` takes when one schedule covers `CAIRN_BENCH_ENGINE_TARGETS`
//! (10,000) targets. The target: under 50 ms.
//!
//! Set up as the schedule tests set up theirs (`schedules/fire.rs`): a
//! SQLite catalog in the bench directory (on disk, `synchronous = FULL` as
//! in production), a manual clock, and the agents `agent-00000` ... enrolled
//! and registered through the catalog's own functions (instance `main`,
//! label `env=prod`) but not connected, so every job waits. One schedule,
//! `--selector env=prod --database shop --spread 2h`, daily at 02:00 UTC.
//! Measured, each as the wall time of one `tick()`, the clock a second
//! further at each:
//!
//! - idle: ticks before the fire, with no active job and the schedule not
//!   due;
//! - fire: the ticks from the fire time on, which materialise one job per
//!   target in batches of `FIRE_BATCH` (and record why each waits);
//! - waiting for spread slots: the ticks after it;
//! - every slot reached: the ticks two hours later, when every job is due
//!   and waits for its offline agent instead (each reason is rewritten,
//!   `WAIT_REASON_BATCH` a tick);
//! - waiting for offline agents: the ticks after that, the worst steady
//!   case (every queued job is looked at in full).
//!
//! Steady phases report the median and the maximum of
//! `CAIRN_BENCH_ENGINE_TICKS` (20, at most 50) ticks; then the tick's two
//! catalog reads (`Catalog::tick_jobs`, `Jobs::fire_schedules`) are timed
//! on their own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cairn_common::crypto::SecretKey;
use cairn_coordinator::audit::log::AuditLog;
use cairn_coordinator::catalog::{Catalog, CertificateRecord, Registration};
use cairn_coordinator::clock::Clock;
use cairn_coordinator::config::{BackupConfig, JobsConfig};
use cairn_coordinator::fleet::Fleet;
use cairn_coordinator::jobs::Jobs;
use cairn_coordinator::jobs::engine::TickReport;
use cairn_coordinator::repository::{LocalStore, Repository, Store};
use cairn_coordinator::schedules::manage::ScheduleRequest;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Target, env_number};
use crate::interrupt::Interrupts;

/// The target for one tick.
pub const TARGET_MS: f64 = 50.0;

/// The schedule fires at 02:00 UTC; the clock starts a minute before.
const START: &str = "2026-06-01T01:59:00Z";
const CRON: &str = "0 2 * * *";
const SPREAD: Duration = Duration::from_secs(2 * 3600);
/// Agents enrolled per concurrent task (each enrollment is its own
/// transactions, as in production).
const ENROLL_TASKS: usize = 8;

/// What the engine case measured.
pub struct EngineReport {
    rows: Vec<Row>,
    /// `Catalog::tick_jobs` alone, with every job queued.
    reading: Vec<Duration>,
    /// `Jobs::fire_schedules` alone, nothing due.
    firing: Vec<Duration>,
}

/// Runs the case in `directory` (created here).
pub fn bench_engine(
    directory: &Path,
    interrupts: &Interrupts,
    quick: bool,
) -> anyhow::Result<EngineReport> {
    let targets: usize = env_number(
        "CAIRN_BENCH_ENGINE_TARGETS",
        if quick { 1_000 } else { 10_000 },
    )?;
    let ticks: usize = env_number("CAIRN_BENCH_ENGINE_TICKS", 20)?;
    // The idle ticks, a second apart, must end before the fire a minute on.
    ensure!(ticks <= 50, "CAIRN_BENCH_ENGINE_TICKS={ticks}: at most 50");
    println!(
        "\n==> Engine tick: one schedule over {targets} targets (agents enrolled, not connected)"
    );
    std::fs::create_dir_all(directory)
        .with_context(|| format!("create {}", directory.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start a tokio runtime")?;
    runtime.block_on(measure(directory, interrupts, targets, ticks))
}

async fn measure(
    directory: &Path,
    interrupts: &Interrupts,
    targets: usize,
    ticks: usize,
) -> anyhow::Result<EngineReport> {
    let started = Instant::now();
    let jobs = engine(directory, targets).await?;
    jobs.create_schedule(
        "bench",
        ScheduleRequest {
            name: "fleet".into(),
            selector: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            databases: vec!["shop".into()],
            cron: CRON.into(),
            timezone: "UTC".into(),
            spread: SPREAD,
            ..ScheduleRequest::default()
        },
    )
    .await?;
    let setup = started.elapsed();
    println!(
        "  set up in {:.1} s: {targets} agents enrolled and registered, the schedule created",
        setup.as_secs_f64()
    );
    interrupts.check()?;

    let mut rows = Vec::new();
    // Before the fire: nothing active, the schedule not due.
    let idle = ticks_of(&jobs, ticks, |report| *report == TickReport::default()).await?;
    rows.push(Row::of("idle: nothing active, not due", "idle tick", &idle));
    interrupts.check()?;

    // The fire, at 02:00:00: made in batches, a tick each, the engine
    // ticking again at once while one is part-made.
    let to_fire = Duration::from_secs(60)
        .saturating_sub(Duration::from_secs(u64::try_from(ticks).unwrap_or(60)));
    jobs.clock
        .advance(to_fire.saturating_sub(Duration::from_secs(1)));
    let mut made = 0;
    let fire = ticks_while(&jobs, targets, |report| {
        made += report.fired;
        report.firing
    })
    .await?;
    ensure!(
        made == targets,
        "the fire made {made} jobs over {} ticks, not {targets}",
        fire.len()
    );
    rows.push(Row::of(
        &format!("fire: {targets} jobs made in {} tick(s)", fire.len()),
        &format!("fire tick ({targets} jobs made in batches)"),
        &fire,
    ));
    interrupts.check()?;

    // The jobs wait for their slots within the spread (the first few
    // reach theirs: their agents are offline).
    let all_wait = |report: &TickReport| report.waiting == targets && report.started == 0;
    let slots = ticks_of(&jobs, ticks, all_wait).await?;
    rows.push(Row::of(
        &format!("waiting: {targets} jobs, for spread slots"),
        &format!("steady tick ({targets} wait for slots)"),
        &slots,
    ));
    interrupts.check()?;

    // Past the spread every job is due, and waits for its offline agent:
    // the ticks that rewrite every reason (a bounded number each), then
    // the steady ones.
    jobs.clock.advance(SPREAD);
    let mut rewritten = 0;
    let reached = ticks_while(&jobs, targets, |report| {
        rewritten += report.reasons_written;
        report.reasons_written > 0
    })
    .await?;
    // The few whose slots passed during the earlier phases say "offline"
    // already.
    ensure!(
        rewritten > targets / 2 && rewritten <= targets,
        "{rewritten} wait reasons rewritten once every slot passed, of {targets}"
    );
    rows.push(Row::of(
        &format!(
            "every slot reached: {targets} reasons rewritten in {} tick(s)",
            reached.len().saturating_sub(1)
        ),
        "tick rewriting wait reasons",
        &reached,
    ));
    let offline = ticks_of(&jobs, ticks, all_wait).await?;
    rows.push(Row::of(
        &format!("waiting: {targets} jobs, for offline agents"),
        &format!("steady tick ({targets} wait for agents)"),
        &offline,
    ));
    interrupts.check()?;

    // Where a steady tick goes: its two catalog reads on their own.
    let (mut reading, mut firing) = (Vec::new(), Vec::new());
    for _ in 0..ticks {
        let started = Instant::now();
        let read = jobs
            .catalog
            .tick_jobs(jobs.clock.now_ms(), &jobs.fleet.online_agents())
            .await?;
        reading.push(started.elapsed());
        ensure!(
            read.jobs.len() + read.still_waiting == targets,
            "{} active jobs",
            read.jobs.len() + read.still_waiting
        );
        let started = Instant::now();
        jobs.fire_schedules(jobs.clock.now_ms()).await?;
        firing.push(started.elapsed());
    }
    jobs.catalog.close().await;
    Ok(EngineReport {
        rows,
        reading,
        firing,
    })
}

/// `count` ticks one clock second apart, each checked by `expected`.
async fn ticks_of(
    jobs: &Arc<Jobs>,
    count: usize,
    expected: impl Fn(&TickReport) -> bool,
) -> anyhow::Result<Vec<Duration>> {
    let mut took = Vec::new();
    for _ in 0..count {
        jobs.clock.advance(Duration::from_secs(1));
        let started = Instant::now();
        let report = jobs.tick().await?;
        took.push(started.elapsed());
        ensure!(
            expected(&report),
            "a tick at {} did not do what the bench expects: {report:?}",
            jobs.clock.now_ms()
        );
    }
    Ok(took)
}

/// Ticks a clock second apart while `more` says the last one left work
/// (at most `limit` ticks); each tick's time.
async fn ticks_while(
    jobs: &Arc<Jobs>,
    limit: usize,
    mut more: impl FnMut(&TickReport) -> bool,
) -> anyhow::Result<Vec<Duration>> {
    let mut took = Vec::new();
    loop {
        ensure!(
            took.len() < limit,
            "the engine still had work after {limit} ticks"
        );
        jobs.clock.advance(Duration::from_secs(1));
        let started = Instant::now();
        let report = jobs.tick().await?;
        took.push(started.elapsed());
        if !more(&report) {
            return Ok(took);
        }
    }
}

/// An engine on a fresh catalog in `directory` with `agents` agents
/// enrolled and registered, none connected.
async fn engine(directory: &Path, agents: usize) -> anyhow::Result<Arc<Jobs>> {
    let catalog = Arc::new(Catalog::open_sqlite(&directory.join("catalog.sqlite")).await?);
    let repository = Arc::new(
        Repository::create(
            Store::Local(LocalStore::new(directory.join("repository"))),
            &SecretKey::generate()?,
        )
        .await?,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..ENROLL_TASKS {
        let catalog = catalog.clone();
        tasks.spawn(async move {
            for index in (task..agents).step_by(ENROLL_TASKS) {
                enroll(&catalog, index).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("an enrolling task panicked")??;
    }
    Ok(Arc::new(Jobs {
        audit: AuditLog::new(catalog.clone()),
        fleet: Arc::new(Fleet::new(
            Duration::from_secs(10),
            CancellationToken::new(),
            1,
        )),
        catalog,
        repository,
        config: BackupConfig::default(),
        limits: JobsConfig::default(),
        tasks: TaskTracker::new(),
        clock: Clock::manual(
            chrono::DateTime::parse_from_rfc3339(START)
                .context("the bench's start time")?
                .timestamp_millis(),
        ),
        term: 1,
        wake: Arc::new(Notify::new()),
        fire_targets: Default::default(),
        tick_cursor: Default::default(),
    }))
}

/// Enrolls and registers agent number `index` as an agent's first
/// connection would.
async fn enroll(catalog: &Catalog, index: usize) -> anyhow::Result<()> {
    let name = format!("agent-{index:05}");
    let serial = format!("{:032x}", index + 1);
    let certificate = CertificateRecord {
        serial: &serial,
        kind: "agent",
        name: &name,
        role: None,
        issued_at: 0,
        not_after: i64::MAX / 2,
    };
    catalog.enroll_agent(&name, &certificate, 0).await?;
    let registered = catalog
        .record_registration(
            &name,
            &serial,
            i64::MAX / 2,
            &Registration {
                hostname: format!("host-{index:05}"),
                version: cairn_common::VERSION.into(),
                labels: BTreeMap::from([("env".to_string(), "prod".to_string())]),
                instances: vec!["main".into()],
                permitted_operations: vec![],
                peer_address: "127.0.0.1:1".into(),
            },
            0,
        )
        .await?;
    ensure!(registered.is_some(), "agent {name} was not registered");
    Ok(())
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The median (the lower one of an even count) and the maximum.
fn median_max(samples: &[Duration]) -> (f64, f64) {
    let mut sorted: Vec<f64> = samples.iter().copied().map(millis).collect();
    sorted.sort_by(f64::total_cmp);
    let median = sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    (median, max)
}

/// Under the target: PASS, else OVER.
pub fn verdict(passed: Option<bool>) -> &'static str {
    match passed {
        Some(true) => "PASS",
        Some(false) => "OVER",
        None => "n/a",
    }
}

/// One measured row: what, the median (none for a single tick), the
/// maximum in ms.
struct Row {
    what: String,
    /// What the summary calls it.
    short: String,
    ticks: usize,
    median: f64,
    max: f64,
}

impl Row {
    fn of(what: &str, short: &str, samples: &[Duration]) -> Row {
        let (median, max) = median_max(samples);
        Row {
            what: what.to_string(),
            short: short.to_string(),
            ticks: samples.len(),
            median,
            max,
        }
    }
}

impl EngineReport {
    pub fn print(&self) {
        println!(
            "  {:<44} {:>5} {:>9} {:>9}  target",
            "wall time of one Jobs::tick", "ticks", "median", "max"
        );
        for row in &self.rows {
            println!(
                "  {:<44} {:>5} {:>6.1} ms {:>6.1} ms  < {TARGET_MS:.0} ms {}",
                row.what,
                row.ticks,
                row.median,
                row.max,
                verdict(Some(row.max < TARGET_MS))
            );
        }
        let (reading, _) = median_max(&self.reading);
        let (firing, _) = median_max(&self.firing);
        println!(
            "  of the last steady tick (medians): reading the jobs to look at {reading:.1} ms, \
             evaluating the schedules {firing:.1} ms, the rest the wait reasons"
        );
    }

    /// Each row's maximum against [`TARGET_MS`], for the summary.
    pub fn targets(&self) -> Vec<Target> {
        self.rows
            .iter()
            .map(|row| Target {
                what: format!("{} < {TARGET_MS:.0} ms", row.short),
                measured: format!("max {:.1} ms", row.max),
                passed: Some(row.max < TARGET_MS),
            })
            .collect()
    }
}
