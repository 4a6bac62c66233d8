//! `cairn schedule create|update|list|show|pause|resume|delete|run-now`
//! and `cairn coverage`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::anyhow;
use cairn_common::names::parse_key_values;
use cairn_common::proto;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde::Serialize;

use super::backups::JobView;
use super::client::explain;
use super::output;
use super::{Connection, backups};

#[derive(Debug, clap::Args)]
pub(super) struct CreateSchedule {
    /// The schedule's name: a-z, 0-9 and '-'.
    name: String,
    /// One agent...
    #[arg(
        long,
        conflicts_with = "selector",
        required_unless_present = "selector"
    )]
    agent: Option<String>,
    /// ...or every agent whose labels include these, now and enrolled
    /// later: key=value[,key=value].
    #[arg(long)]
    selector: Option<String>,
    /// A database (repeatable)...
    #[arg(
        long = "database",
        value_name = "DB",
        conflicts_with = "all_databases",
        required_unless_present = "all_databases"
    )]
    databases: Vec<String>,
    /// ...or every database of each instance, from its latest probe at
    /// the fire time (templates excluded).
    #[arg(long)]
    all_databases: bool,
    /// Five fields: minute hour day-of-month month day-of-week, e.g.
    /// "0 3 * * *". At a DST change, as in ISC cron: with a fixed minute
    /// and hour (neither starts with *), a time in the skipped hour runs
    /// at the jump and one in the repeated hour once; otherwise ("0 * * *
    /// *", "*/15 * * * *") the real clock: no fire in the skipped hour,
    /// both passes of the repeated one.
    #[arg(long)]
    cron: String,
    /// An IANA time zone for --cron, e.g. Europe/Berlin.
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// Spread the targets' starts over this window after each fire,
    /// each at a stable slot, e.g. 2h (at most 24h).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    spread: Duration,
    /// A fire whose target's previous job is still queued or running:
    /// `skip` records it missed, `queue` lets it wait its turn.
    #[arg(long, default_value = "skip", value_parser = ["skip", "queue"])]
    on_overlap: String,
    /// Fires missed while the coordinator was down run once at its
    /// start if they are this recent (older ones are recorded missed).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    catch_up: Duration,
    /// Retries of each job after a retryable failure.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    retries: u32,
    /// Stop a job that runs longer, e.g. 6h.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// What each fire does: back up, or drill the newest backup of
    /// each target on --drill-agent.
    #[arg(long, default_value = "backup", value_parser = ["backup", "drill"])]
    kind: String,
    /// With --kind drill: the agent that restores and checks.
    #[arg(long)]
    drill_agent: Option<String>,
    /// A retention policy (cairn retention create) applied to each
    /// target's backups after each successful backup of this schedule and
    /// once a day; without it, backups accumulate.
    #[arg(long, value_name = "POLICY")]
    retention: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
pub(super) enum ScheduleCommand {
    /// Back up (or drill) a fleet on a cron schedule (role: operator). Each
    /// fire makes one job per agent, instance and database it covers at that
    /// moment, once; each target starts at a stable slot within --spread.
    Create(Box<CreateSchedule>),
    /// Change a schedule: today its retention policy (role: operator).
    Update {
        name: String,
        /// Apply this retention policy after each successful backup of the
        /// schedule and once a day...
        #[arg(
            long,
            value_name = "POLICY",
            conflicts_with = "no_retention",
            required_unless_present = "no_retention"
        )]
        retention: Option<String>,
        /// ...or none: the schedule's backups accumulate.
        #[arg(long)]
        no_retention: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Every schedule, with its next fire.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// A schedule, its next five fires (UTC and its zone) and each current
    /// target with its start slot.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Stop a schedule from firing (role: operator).
    Pause {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Fire again from now on; fires while paused are not caught up
    /// (role: operator).
    Resume {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a schedule; its jobs stay (role: operator).
    Delete {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Fire once now, outside the cron, without spread (role: operator).
    RunNow {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
}

/// `--selector env=prod,region=eu`.
pub(super) fn parse_selector(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let items: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect();
    if items.is_empty() {
        return Err(anyhow!(
            "--selector {text:?}: give key=value[,key=value], for example env=prod"
        ));
    }
    parse_key_values("--selector", "env=prod", &items).map_err(|e| anyhow!(e))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Serialize)]
pub struct ScheduleView {
    pub name: String,
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub agent: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub databases: Vec<String>,
    pub all_databases: bool,
    pub cron: String,
    pub timezone: String,
    pub spread_seconds: u64,
    pub on_overlap: String,
    pub catch_up_seconds: u64,
    pub retries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub drill_agent: String,
    pub paused: bool,
    pub next_fire: Option<DateTime<Utc>>,
    pub created_by: String,
    /// The retention policy's name; none: backups accumulate.
    pub retention: Option<String>,
}

impl From<proto::Schedule> for ScheduleView {
    fn from(s: proto::Schedule) -> Self {
        ScheduleView {
            name: s.name,
            kind: s.kind,
            agent: s.agent_name,
            selector: s.selector.into_iter().collect(),
            databases: s.databases,
            all_databases: s.all_databases,
            cron: s.cron,
            timezone: s.timezone,
            spread_seconds: s.spread_ms / 1000,
            on_overlap: s.on_overlap,
            catch_up_seconds: s.catch_up_ms / 1000,
            retries: s.retries,
            timeout_seconds: (s.timeout_ms > 0).then_some(s.timeout_ms / 1000),
            drill_agent: s.drill_agent,
            paused: s.paused,
            next_fire: DateTime::from_timestamp_millis(s.next_fire_unix_ms)
                .filter(|_| s.next_fire_unix_ms > 0),
            created_by: s.created_by,
            retention: (!s.retention_policy.is_empty()).then_some(s.retention_policy),
        }
    }
}

impl ScheduleView {
    fn covers(&self) -> String {
        if self.agent.is_empty() {
            let labels: Vec<String> = self
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("agents with {}", labels.join(","))
        } else {
            format!("agent {}", self.agent)
        }
    }

    fn databases_text(&self) -> String {
        if self.all_databases {
            "all".into()
        } else {
            self.databases.join(", ")
        }
    }
}

fn schedules_table(schedules: &[ScheduleView]) -> comfy_table::Table {
    let mut table = output::table(&[
        "SCHEDULE",
        "KIND",
        "COVERS",
        "DATABASES",
        "CRON",
        "TIME ZONE",
        "SPREAD",
        "NEXT FIRE",
        "RETENTION",
        "PAUSED",
    ]);
    for s in schedules {
        table.add_row(vec![
            s.name.clone(),
            s.kind.clone(),
            s.covers(),
            s.databases_text(),
            s.cron.clone(),
            s.timezone.clone(),
            humantime::format_duration(Duration::from_secs(s.spread_seconds)).to_string(),
            s.next_fire.map_or_else(
                || "-".into(),
                |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
            ),
            s.retention.clone().unwrap_or_else(|| "-".into()),
            if s.paused { "yes" } else { "no" }.into(),
        ]);
    }
    table
}

#[derive(Debug, Serialize)]
struct FireView {
    utc: DateTime<Utc>,
    local: String,
}

#[derive(Debug, Serialize)]
struct TargetView {
    agent: String,
    instance: String,
    database: String,
    slot_offset_seconds: u64,
}

#[derive(Debug, Serialize)]
struct ScheduleDetailView {
    #[serde(flatten)]
    schedule: ScheduleView,
    next_fires: Vec<FireView>,
    targets: Vec<TargetView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    left_out: Vec<String>,
}

/// A fire time in the schedule's zone, for `show`.
fn local_time(at: DateTime<Utc>, timezone: &str) -> String {
    match timezone.parse::<chrono_tz::Tz>() {
        Ok(zone) => at
            .with_timezone(&zone)
            .format("%Y-%m-%d %H:%M %Z")
            .to_string(),
        Err(_) => at.format("%Y-%m-%d %H:%M UTC").to_string(),
    }
}

fn print_detail(detail: &ScheduleDetailView) {
    let s = &detail.schedule;
    println!(
        "schedule {}: {} of {} ({} databases), cron {:?} in {}, spread {}, on overlap {}, catch-up {}, retries {}, retention {}{}",
        s.name,
        s.kind,
        s.covers(),
        s.databases_text(),
        s.cron,
        s.timezone,
        humantime::format_duration(Duration::from_secs(s.spread_seconds)),
        s.on_overlap,
        humantime::format_duration(Duration::from_secs(s.catch_up_seconds)),
        s.retries,
        s.retention
            .as_deref()
            .unwrap_or("none (backups accumulate)"),
        if s.paused { " — PAUSED" } else { "" }
    );
    let mut fires = output::table(&["NEXT FIRE (UTC)", "IN ITS ZONE"]);
    for fire in &detail.next_fires {
        fires.add_row(vec![
            fire.utc.format("%Y-%m-%d %H:%M UTC").to_string(),
            fire.local.clone(),
        ]);
    }
    println!("{fires}");
    let mut targets = output::table(&["AGENT", "INSTANCE", "DATABASE", "STARTS AFTER THE FIRE"]);
    for t in &detail.targets {
        targets.add_row(vec![
            t.agent.clone(),
            t.instance.clone(),
            t.database.clone(),
            humantime::format_duration(Duration::from_secs(t.slot_offset_seconds)).to_string(),
        ]);
    }
    println!("{targets}");
    for problem in &detail.left_out {
        println!("left out: {problem}");
    }
}

pub(super) async fn run(command: ScheduleCommand) -> anyhow::Result<i32> {
    match command {
        ScheduleCommand::Create(create) => {
            let CreateSchedule {
                name,
                agent,
                selector,
                databases,
                all_databases,
                cron,
                timezone,
                spread,
                on_overlap,
                catch_up,
                retries,
                timeout,
                kind,
                drill_agent,
                retention,
                connection,
            } = *create;
            let selector = selector
                .as_deref()
                .map(parse_selector)
                .transpose()?
                .unwrap_or_default();
            let created: ScheduleView = connection
                .admin()
                .await?
                .create_schedule(proto::CreateScheduleRequest {
                    schedule: Some(proto::Schedule {
                        name,
                        kind,
                        agent_name: agent.unwrap_or_default(),
                        selector: selector.into_iter().collect(),
                        databases,
                        all_databases,
                        cron,
                        timezone,
                        spread_ms: millis(spread),
                        on_overlap,
                        catch_up_ms: millis(catch_up),
                        retries,
                        timeout_ms: timeout.map_or(0, millis),
                        drill_agent: drill_agent.unwrap_or_default(),
                        retention_policy: retention.unwrap_or_default(),
                        ..proto::Schedule::default()
                    }),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            connection.show(&created, || {
                println!("{}", schedules_table(std::slice::from_ref(&created)));
                println!(
                    "See its fires and targets with: cairn schedule show {}",
                    created.name
                );
            })?;
            Ok(0)
        }
        ScheduleCommand::List { connection } => {
            let schedules: Vec<ScheduleView> = connection
                .admin()
                .await?
                .list_schedules(proto::ListSchedulesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .schedules
                .into_iter()
                .map(Into::into)
                .collect();
            connection.show(&schedules, || {
                println!("{}", schedules_table(&schedules));
            })?;
            Ok(0)
        }
        ScheduleCommand::Show { name, connection } => {
            let detail = connection
                .admin()
                .await?
                .get_schedule(proto::GetScheduleRequest { name })
                .await
                .map_err(explain)?
                .into_inner();
            let schedule: ScheduleView = detail.schedule.unwrap_or_default().into();
            let view = ScheduleDetailView {
                next_fires: detail
                    .next_fires_unix_ms
                    .iter()
                    .filter_map(|ms| DateTime::from_timestamp_millis(*ms))
                    .map(|utc| FireView {
                        utc,
                        local: local_time(utc, &schedule.timezone),
                    })
                    .collect(),
                targets: detail
                    .targets
                    .into_iter()
                    .map(|t| TargetView {
                        agent: t.agent_name,
                        instance: t.instance,
                        database: t.database,
                        slot_offset_seconds: t.slot_offset_ms / 1000,
                    })
                    .collect(),
                left_out: detail.problems,
                schedule,
            };
            connection.show(&view, || print_detail(&view))?;
            Ok(0)
        }
        ScheduleCommand::Update {
            name,
            retention,
            no_retention: _,
            connection,
        } => {
            let updated: ScheduleView = connection
                .admin()
                .await?
                .set_schedule_retention(proto::SetScheduleRetentionRequest {
                    schedule: name,
                    policy: retention.unwrap_or_default(),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            connection.show(&updated, || {
                println!("{}", schedules_table(std::slice::from_ref(&updated)));
            })?;
            Ok(0)
        }
        ScheduleCommand::Pause { name, connection } => set_paused(name, true, connection).await,
        ScheduleCommand::Resume { name, connection } => set_paused(name, false, connection).await,
        ScheduleCommand::Delete { name, connection } => {
            connection
                .admin()
                .await?
                .delete_schedule(proto::DeleteScheduleRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            if !connection.json() {
                println!("Schedule {name} deleted; its jobs stay.");
            }
            Ok(0)
        }
        ScheduleCommand::RunNow { name, connection } => {
            let jobs: Vec<JobView> = connection
                .admin()
                .await?
                .run_schedule_now(proto::RunScheduleNowRequest { name })
                .await
                .map_err(explain)?
                .into_inner()
                .jobs
                .into_iter()
                .map(Into::into)
                .collect();
            connection.show(&jobs, || {
                println!("{}", backups::jobs_table(&jobs));
            })?;
            Ok(0)
        }
    }
}

async fn set_paused(name: String, paused: bool, connection: Connection) -> anyhow::Result<i32> {
    let schedule: ScheduleView = connection
        .admin()
        .await?
        .set_schedule_paused(proto::SetSchedulePausedRequest { name, paused })
        .await
        .map_err(explain)?
        .into_inner()
        .into();
    connection.show(&schedule, || {
        println!("{}", schedules_table(std::slice::from_ref(&schedule)));
    })?;
    Ok(0)
}

#[derive(Debug, Serialize)]
pub struct CoverageView {
    pub agent: String,
    pub instance: String,
    pub database: String,
    pub schedules: Vec<String>,
    pub covered: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_backup_id: String,
    pub last_backup_at: Option<DateTime<Utc>>,
    /// Seconds since the last complete backup.
    pub last_backup_age_seconds: Option<i64>,
}

/// `cairn coverage`: exit 1 if a database is not covered.
pub(super) async fn coverage(
    selector: Option<String>,
    connection: Connection,
) -> anyhow::Result<i32> {
    let selector = selector
        .as_deref()
        .map(parse_selector)
        .transpose()?
        .unwrap_or_default();
    let now = Utc::now();
    let rows: Vec<CoverageView> = connection
        .admin()
        .await?
        .get_coverage(proto::GetCoverageRequest {
            selector: selector.into_iter().collect(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .entries
        .into_iter()
        .map(|e| {
            let at = DateTime::from_timestamp_millis(e.last_backup_unix_ms)
                .filter(|_| e.last_backup_unix_ms > 0);
            CoverageView {
                covered: !e.schedules.is_empty(),
                agent: e.agent_name,
                instance: e.instance,
                database: e.database,
                schedules: e.schedules,
                last_backup_id: e.last_backup_id,
                last_backup_age_seconds: at.map(|t| (now - t).num_seconds()),
                last_backup_at: at,
            }
        })
        .collect();
    connection.show(&rows, || {
        let mut table = output::table(&[
            "AGENT",
            "INSTANCE",
            "DATABASE",
            "SCHEDULES",
            "LAST BACKUP",
            "AGE",
        ]);
        for r in &rows {
            table.add_row(vec![
                r.agent.clone(),
                r.instance.clone(),
                r.database.clone(),
                if r.covered {
                    r.schedules.join(", ")
                } else {
                    "UNCOVERED".into()
                },
                if r.last_backup_id.is_empty() {
                    "never".into()
                } else {
                    r.last_backup_id.clone()
                },
                output::ago(r.last_backup_at),
            ]);
        }
        println!("{table}");
        let uncovered = rows.iter().filter(|r| !r.covered).count();
        if uncovered > 0 {
            println!("{uncovered} database(s) covered by no schedule");
        }
    })?;
    Ok(if rows.iter().all(|r| r.covered) { 0 } else { 1 })
}
