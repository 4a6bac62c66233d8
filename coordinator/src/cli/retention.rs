//! `cairn retention simulate`: a retention policy tried offline on a list
//! of backup times, through the same rules (`retention::decide`) that
//! apply it to the catalog's backups.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_coordinator::retention::times::parse_times;
use cairn_coordinator::retention::{Candidate, Fate, Policy, decide};
use cairn_coordinator::schedules::timing::parse_timezone;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;
use serde::Serialize;

use super::output::{self, OutputFormat, print_json};

/// The rule flags of a policy. Their group, `keep_flags`, is what a
/// stored policy's `--policy NAME` will conflict with.
#[derive(Debug, clap::Args)]
#[group(id = "keep_flags", multiple = true)]
pub(super) struct PolicyFlags {
    /// Keep the N newest backups.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours that have backups.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days that have backups.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks that have
    /// backups.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months that have
    /// backups.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years that have backups.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep every backup less than D older than the newest backup (not
    /// than now), e.g. 7d or 36h (m is minutes, M months).
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    keep_within: Option<Duration>,
    /// Keep at least the N newest backups, whatever the rules say (a floor
    /// under the rules, not a rule itself).
    #[arg(long, value_name = "N")]
    min_keep: Option<u32>,
}

impl PolicyFlags {
    pub(super) fn policy(&self) -> Policy {
        Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self.keep_within,
            min_keep: self.min_keep,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum RetentionCommand {
    /// Try a policy on a list of backup times, offline (no coordinator,
    /// no config): prints each time, newest first, with its fate and every
    /// rule that keeps it, then how many are kept and removed. The rules
    /// are restic's: ORed; each --keep-hourly..yearly N keeps the newest
    /// backup of each of the last N periods that have backups (and the
    /// oldest backup while counts are left); --keep-within counts from the
    /// newest backup; a backup dated after --now is never removed.
    Simulate(Simulate),
}

#[derive(Debug, clap::Args)]
pub(super) struct Simulate {
    #[command(flatten)]
    policy: PolicyFlags,
    /// The backup times: one RFC 3339 time a line, such as
    /// 2026-03-04T03:00:00Z; blank lines and lines starting with # are
    /// skipped; - reads standard input.
    #[arg(long, value_name = "FILE")]
    times: PathBuf,
    /// Read hours, days, ISO weeks, months and years in this IANA time
    /// zone, e.g. Europe/Berlin.
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// The present, as RFC 3339: backups dated after it are never
    /// removed (default: the clock's now).
    #[arg(long, value_name = "TIME", value_parser = parse_now)]
    now: Option<DateTime<Utc>>,
    /// A table, or JSON: an array of {time, fate, rules}.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

fn parse_now(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|e| format!("{e}: use an RFC 3339 time such as 2026-03-04T03:00:00Z"))
}

/// One backup time and its fate, as `--output json` prints it.
#[derive(Debug, Serialize)]
struct FateView {
    time: DateTime<Utc>,
    fate: Fate,
    rules: Vec<String>,
}

pub(super) fn run(command: RetentionCommand) -> anyhow::Result<i32> {
    match command {
        RetentionCommand::Simulate(simulate) => run_simulate(simulate),
    }
}

fn run_simulate(simulate: Simulate) -> anyhow::Result<i32> {
    let policy = simulate.policy.policy();
    policy.validate()?;
    let zone = parse_timezone(&simulate.timezone)?;
    let (text, source) = if simulate.times.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("read the backup times from standard input")?;
        (text, "standard input".to_string())
    } else {
        let path = &simulate.times;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read --times {}", path.display()))?;
        (text, path.display().to_string())
    };
    let backups: Vec<Candidate<usize>> = parse_times(&text, &source)?
        .into_iter()
        .map(|line| Candidate {
            id: line.line,
            time: line.time,
        })
        .collect();
    let now = simulate.now.unwrap_or_else(Utc::now);
    let decisions = decide(&policy, &backups, zone, now)?;
    let views: Vec<FateView> = decisions
        .into_iter()
        .map(|decision| FateView {
            time: decision.time,
            fate: decision.fate,
            rules: decision.reasons.iter().map(ToString::to_string).collect(),
        })
        .collect();
    if simulate.output == OutputFormat::Json {
        print_json(&views)?;
        return Ok(0);
    }
    let local = zone != chrono_tz::UTC;
    let mut header = vec!["TIME (UTC)"];
    if local {
        header.push("IN THE ZONE");
    }
    header.extend(["FATE", "KEPT BY"]);
    let mut table = output::table(&header);
    for view in &views {
        let mut row = vec![view.time.to_rfc3339_opts(SecondsFormat::Secs, true)];
        if local {
            row.push(
                view.time
                    .with_timezone(&zone)
                    .format("%Y-%m-%d %H:%M:%S %Z")
                    .to_string(),
            );
        }
        row.push(view.fate.to_string());
        row.push(if view.rules.is_empty() {
            "-".to_string()
        } else {
            view.rules.join(", ")
        });
        table.add_row(row);
    }
    println!("{table}");
    let kept = views.iter().filter(|v| v.fate == Fate::Keep).count();
    println!(
        "kept {kept}, removed {} ({policy}; periods in {}; now {})",
        views.len() - kept,
        simulate.timezone,
        now.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    Ok(0)
}
