//! `cairn retention create|list|show|delete|apply|simulate`. `simulate`
//! tries a policy offline on a list of backup times, through the same
//! rules (`retention::decide`) that `apply` runs on the catalog's backups
//! (with `--policy NAME` it reads a stored policy from the coordinator);
//! `apply` asks the coordinator to apply a stored policy, guards and all.

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

use cairn_common::proto;

use super::Connection;
use super::client::explain;
use super::output::{self, print_json};
use super::schedules::parse_selector;

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
    /// Store a named policy (role: operator; audited). Give at least one
    /// rule; the rules are ORed. Schedules use it with
    /// `cairn schedule create|update --retention NAME`; `apply` applies it
    /// to backups made by hand.
    Create {
        /// The policy's name: a-z, 0-9 and '-'.
        name: String,
        #[command(flatten)]
        policy: PolicyFlags,
        #[command(flatten)]
        connection: Connection,
    },
    /// Every stored policy and the schedules that use it.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One stored policy and the schedules that use it.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a policy no schedule uses (role: operator; audited).
    Delete {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Apply a stored policy to backups (role: operator; --dry-run: viewer).
    /// Backups are grouped by database lineage: the cluster's system
    /// identifier and the database, whichever agent made them (backups
    /// without an identifier: by agent, instance and database); every
    /// lineage with a backup in scope is considered whole. On top of the
    /// rules, guards keep: the newest complete backup of a lineage; every
    /// backup no complete backup is newer than; backups a queued or
    /// running restore or drill reads; protected backups
    /// (`cairn backups protect`). A policy whose rules would remove every
    /// backup of a lineage is refused for it (nothing deleted, exit 1).
    /// Prints every backup with its fate and the rules and guards that
    /// keep it, and what was deleted. Chunks stay until garbage collection.
    Apply(Box<Apply>),
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
pub(super) struct Apply {
    /// The stored policy to apply.
    #[arg(long, value_name = "NAME")]
    policy: String,
    /// Backups made by one agent...
    #[arg(long, conflicts_with = "selector")]
    agent: Option<String>,
    /// ...or by agents whose labels include these: key=value[,key=value]
    /// (neither: every agent).
    #[arg(long)]
    selector: Option<String>,
    /// Only this database's backups.
    #[arg(long, value_name = "DB")]
    database: Option<String>,
    /// Show what would happen; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Read hours, days, ISO weeks, months and years in this IANA time
    /// zone, e.g. Europe/Berlin.
    #[arg(long, default_value = "UTC")]
    timezone: String,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, clap::Args)]
pub(super) struct Simulate {
    #[command(flatten)]
    policy: PolicyFlags,
    /// Use a stored policy instead of --keep-... flags: this reads it from
    /// the coordinator (so it needs --coordinator and --identity, role
    /// viewer); the simulation itself stays local.
    #[arg(long = "policy", value_name = "NAME", conflicts_with = "keep_flags")]
    policy_name: Option<String>,
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
    /// The coordinator, for --policy only; --output json prints an array
    /// of {time, fate, rules}.
    #[command(flatten)]
    connection: Connection,
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

/// A stored policy, as `list`, `show` and `create` print it.
#[derive(Debug, Serialize)]
struct PolicyView {
    name: String,
    policy: serde_json::Value,
    summary: String,
    schedules: Vec<String>,
    created_by: String,
    created_at: Option<DateTime<Utc>>,
}

impl From<proto::RetentionPolicy> for PolicyView {
    fn from(p: proto::RetentionPolicy) -> Self {
        PolicyView {
            policy: serde_json::from_str(&p.policy_json).unwrap_or(serde_json::Value::Null),
            name: p.name,
            summary: p.summary,
            schedules: p.schedules,
            created_by: p.created_by,
            created_at: DateTime::from_timestamp_millis(p.created_at_unix_ms),
        }
    }
}

fn policies_table(policies: &[PolicyView]) -> comfy_table::Table {
    let mut table = output::table(&["POLICY", "RULES", "SCHEDULES", "CREATED BY", "CREATED"]);
    for p in policies {
        table.add_row(vec![
            p.name.clone(),
            p.summary.clone(),
            if p.schedules.is_empty() {
                "-".into()
            } else {
                p.schedules.join(", ")
            },
            p.created_by.clone(),
            output::time(p.created_at),
        ]);
    }
    table
}

/// One backup of an apply, as `--output json` prints it.
#[derive(Debug, Serialize)]
struct RetainedView {
    id: String,
    agent: String,
    instance: String,
    finished_at: Option<DateTime<Utc>>,
    fate: String,
    kept_by: Vec<String>,
    deleted: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

#[derive(Debug, Serialize)]
struct LineageView {
    lineage: String,
    system_identifier: String,
    database: String,
    kept: u32,
    removed: u32,
    deleted: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    refused: String,
    backups: Vec<RetainedView>,
}

#[derive(Debug, Serialize)]
struct ApplyView {
    dry_run: bool,
    lineages: Vec<LineageView>,
    finished_deletions: Vec<String>,
}

impl From<proto::ApplyRetentionResponse> for ApplyView {
    fn from(r: proto::ApplyRetentionResponse) -> Self {
        ApplyView {
            dry_run: r.dry_run,
            finished_deletions: r.finished_deletions,
            lineages: r
                .lineages
                .into_iter()
                .map(|l| LineageView {
                    lineage: l.lineage,
                    system_identifier: l.system_identifier,
                    database: l.database,
                    kept: l.kept,
                    removed: l.removed,
                    deleted: l.deleted,
                    refused: l.refused,
                    backups: l
                        .backups
                        .into_iter()
                        .map(|b| RetainedView {
                            id: b.backup_id,
                            agent: b.agent_name,
                            instance: b.instance,
                            finished_at: DateTime::from_timestamp_millis(b.finished_at_unix_ms),
                            fate: b.fate,
                            kept_by: b.kept_by,
                            deleted: b.deleted,
                            error: b.error,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn print_apply(view: &ApplyView) {
    for id in &view.finished_deletions {
        println!("finished the interrupted deletion of backup {id}");
    }
    if view.lineages.is_empty() {
        println!("No complete backups in scope.");
    }
    for lineage in &view.lineages {
        println!(
            "{}: {} kept, {} {}{}",
            lineage.lineage,
            lineage.kept,
            lineage.removed,
            if view.dry_run {
                "would be removed (dry run)".to_string()
            } else {
                format!("removed, {} deleted", lineage.deleted)
            },
            if lineage.refused.is_empty() {
                String::new()
            } else {
                format!(" — REFUSED: {}", lineage.refused)
            }
        );
        let mut table = output::table(&["BACKUP", "AGENT", "FINISHED (UTC)", "FATE", "KEPT BY"]);
        for b in &lineage.backups {
            let fate = match (b.fate.as_str(), b.deleted, b.error.is_empty()) {
                ("remove", true, _) => "deleted".to_string(),
                ("remove", false, false) => format!("remove (not deleted: {})", b.error),
                (fate, _, _) => fate.to_string(),
            };
            table.add_row(vec![
                b.id.clone(),
                b.agent.clone(),
                b.finished_at.map_or_else(
                    || "-".into(),
                    |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
                ),
                fate,
                if b.kept_by.is_empty() {
                    "-".into()
                } else {
                    b.kept_by.join(", ")
                },
            ]);
        }
        println!("{table}");
    }
}

pub(super) async fn run(command: RetentionCommand) -> anyhow::Result<i32> {
    match command {
        RetentionCommand::Simulate(simulate) => run_simulate(simulate).await,
        RetentionCommand::Create {
            name,
            policy,
            connection,
        } => {
            let policy = policy.policy();
            policy.validate()?;
            let created: PolicyView = connection
                .admin()
                .await?
                .create_retention_policy(proto::CreateRetentionPolicyRequest {
                    name,
                    policy_json: serde_json::to_string(&policy)?,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            connection.show(&created, || {
                println!("{}", policies_table(std::slice::from_ref(&created)));
                println!(
                    "Try it with: cairn retention apply --policy {} --dry-run",
                    created.name
                );
            })?;
            Ok(0)
        }
        RetentionCommand::List { connection } => {
            let policies: Vec<PolicyView> = connection
                .admin()
                .await?
                .list_retention_policies(proto::ListRetentionPoliciesRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .policies
                .into_iter()
                .map(Into::into)
                .collect();
            connection.show(&policies, || {
                if policies.is_empty() {
                    println!(
                        "No retention policies: cairn retention create NAME --keep-daily 7 ..."
                    );
                } else {
                    println!("{}", policies_table(&policies));
                }
            })?;
            Ok(0)
        }
        RetentionCommand::Show { name, connection } => {
            let policy: PolicyView = connection
                .admin()
                .await?
                .get_retention_policy(proto::GetRetentionPolicyRequest { name })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            connection.show(&policy, || {
                println!("{}", policies_table(std::slice::from_ref(&policy)));
            })?;
            Ok(0)
        }
        RetentionCommand::Delete { name, connection } => {
            connection
                .admin()
                .await?
                .delete_retention_policy(proto::DeleteRetentionPolicyRequest { name: name.clone() })
                .await
                .map_err(explain)?;
            if !connection.json() {
                println!("Retention policy {name} deleted.");
            }
            Ok(0)
        }
        RetentionCommand::Apply(apply) => {
            let Apply {
                policy,
                agent,
                selector,
                database,
                dry_run,
                timezone,
                connection,
            } = *apply;
            let selector = selector
                .as_deref()
                .map(parse_selector)
                .transpose()?
                .unwrap_or_default();
            let view: ApplyView = connection
                .admin()
                .await?
                .apply_retention(proto::ApplyRetentionRequest {
                    policy,
                    agent_name: agent.unwrap_or_default(),
                    selector: selector.into_iter().collect(),
                    database: database.unwrap_or_default(),
                    dry_run,
                    timezone,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            connection.show(&view, || print_apply(&view))?;
            let trouble = view
                .lineages
                .iter()
                .any(|l| !l.refused.is_empty() || l.backups.iter().any(|b| !b.error.is_empty()));
            Ok(i32::from(trouble))
        }
    }
}

async fn run_simulate(simulate: Simulate) -> anyhow::Result<i32> {
    let policy = match &simulate.policy_name {
        None => simulate.policy.policy(),
        Some(name) => {
            let stored = simulate
                .connection
                .admin()
                .await?
                .get_retention_policy(proto::GetRetentionPolicyRequest { name: name.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            serde_json::from_str::<Policy>(&stored.policy_json).with_context(|| {
                format!("read retention policy {name} as the coordinator sent it")
            })?
        }
    };
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
    if simulate.connection.json() {
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
