//! What the CLI prints: a human table by default, JSON with `--output json`.
//! JSON views are built here from the wire types; they never carry a secret
//! other than the enrollment token that `token create` exists to print.

use std::collections::BTreeMap;

use cairn_common::model::{InstanceProbe, Operation, time_from_unix_ms};
use cairn_common::proto;
use chrono::{DateTime, Utc};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A spinner with the elapsed time for long calls, hidden for JSON output
/// (which must stay parseable).
pub fn spinner(json: bool) -> indicatif::ProgressBar {
    if json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar
}

pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(header.iter().map(|h| h.to_string()));
    table
}

pub fn time(value: Option<DateTime<Utc>>) -> String {
    value
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn ago(value: Option<DateTime<Utc>>) -> String {
    match value {
        None => "never".into(),
        Some(t) => {
            let seconds = (Utc::now() - t).num_seconds().max(0) as u64;
            format!(
                "{} ago",
                humantime::format_duration(std::time::Duration::from_secs(seconds))
            )
        }
    }
}

/// A certificate's expiry, with how far off it is ("in 8months 2days",
/// "expired 3m ago"): agents renew at two thirds of the lifetime, so an
/// expiry that keeps getting closer means renewals fail.
pub fn expires(value: Option<DateTime<Utc>>) -> String {
    let Some(t) = value else {
        return "-".into();
    };
    let seconds = (t - Utc::now()).num_seconds();
    let span =
        |s: i64| humantime::format_duration(std::time::Duration::from_secs(s.unsigned_abs()));
    if seconds >= 0 {
        format!("{} (in {})", time(value), span(seconds))
    } else {
        format!("{} (expired {} ago)", time(value), span(seconds))
    }
}

pub fn bytes(value: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut size = value as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit < UNITS.len() - 1 {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value} B")
    } else {
        format!("{size:.1} {}", UNITS[unit])
    }
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    pub name: String,
    pub status: &'static str,
    pub hostname: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub instances: Vec<String>,
    pub permitted_operations: Vec<Operation>,
    pub peer_address: String,
    pub enrolled_at: Option<DateTime<Utc>>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub certificate_serial: String,
    pub certificate_not_after: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<proto::AgentSummary> for AgentView {
    fn from(a: proto::AgentSummary) -> Self {
        AgentView {
            status: match proto::AgentStatus::try_from(a.status) {
                Ok(proto::AgentStatus::Online) => "online",
                Ok(proto::AgentStatus::Offline) => "offline",
                Ok(proto::AgentStatus::Revoked) => "revoked",
                _ => "unknown",
            },
            permitted_operations: a
                .permitted_operations
                .iter()
                .filter_map(|op| Operation::try_from(*op).ok())
                .collect(),
            labels: a.labels.into_iter().collect(),
            enrolled_at: time_from_unix_ms(a.enrolled_at_unix_ms),
            last_seen_at: time_from_unix_ms(a.last_seen_at_unix_ms),
            certificate_not_after: time_from_unix_ms(a.certificate_not_after_unix_ms),
            revoked_at: time_from_unix_ms(a.revoked_at_unix_ms),
            name: a.name,
            hostname: a.hostname,
            version: a.version,
            instances: a.instances,
            peer_address: a.peer_address,
            certificate_serial: a.certificate_serial,
        }
    }
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn agents_table(agents: &[AgentView]) -> Table {
    let mut table = table(&[
        "NAME",
        "STATUS",
        "HOST",
        "ADDRESS",
        "VERSION",
        "INSTANCES",
        "PERMITS",
        "LAST SEEN",
        "CERT EXPIRES",
    ]);
    for a in agents {
        table.add_row(vec![
            a.name.clone(),
            a.status.to_string(),
            a.hostname.clone(),
            a.peer_address.clone(),
            a.version.clone(),
            join(&a.instances),
            join(&a.permitted_operations),
            ago(a.last_seen_at),
            expires(a.certificate_not_after),
        ]);
    }
    table
}

pub fn agent_detail(agent: &AgentView) -> String {
    let labels = agent
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>();
    let lines = [
        ("name", agent.name.clone()),
        ("status", agent.status.to_string()),
        ("host", agent.hostname.clone()),
        ("address", agent.peer_address.clone()),
        ("version", agent.version.clone()),
        ("labels", join(&labels)),
        ("instances", join(&agent.instances)),
        ("permits", join(&agent.permitted_operations)),
        ("enrolled", time(agent.enrolled_at)),
        ("last seen", ago(agent.last_seen_at)),
        (
            "certificate",
            format!(
                "serial {}, valid until {}",
                agent.certificate_serial,
                time(agent.certificate_not_after)
            ),
        ),
        ("revoked", time(agent.revoked_at)),
    ];
    lines
        .iter()
        .map(|(k, v)| format!("{k:>12}: {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn probes_table(probes: &[InstanceProbe]) -> Table {
    let mut table = table(&[
        "INSTANCE",
        "PROBED",
        "UP",
        "RTT",
        "VERSION",
        "UPTIME",
        "ROLE",
        "LAG",
        "CONNS",
        "DISK FREE",
        "ARCHIVER FAILS",
        "DATABASES",
    ]);
    for p in probes {
        if !p.reachable {
            table.add_row(vec![
                p.instance.clone(),
                ago(Some(p.probed_at)),
                "no".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                p.error.clone().unwrap_or_default(),
            ]);
            continue;
        }
        let lag = match (&p.receiver, p.standbys.is_empty()) {
            (Some(r), _) => format!(
                "{} / {}",
                bytes(r.replay_lag_bytes),
                r.replay_lag_seconds
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_else(|| "-".into())
            ),
            (None, false) => p
                .standbys
                .iter()
                .map(|s| {
                    format!(
                        "{}: {} / {}",
                        s.application_name,
                        bytes(s.replay_lag_bytes),
                        s.replay_lag_seconds
                            .map(|t| format!("{t:.1}s"))
                            .unwrap_or_else(|| "-".into())
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            (None, true) => "-".into(),
        };
        let databases = p
            .databases
            .iter()
            .map(|d| format!("{} ({})", d.name, bytes(d.size_bytes)))
            .collect::<Vec<_>>()
            .join(", ");
        table.add_row(vec![
            p.instance.clone(),
            ago(Some(p.probed_at)),
            "yes".into(),
            format!("{:.2} ms", p.select1_rtt_micros as f64 / 1000.0),
            p.server_version.clone(),
            humantime::format_duration(std::time::Duration::from_secs(p.uptime_seconds))
                .to_string(),
            format!("{:?}", p.role).to_lowercase(),
            lag,
            format!("{}/{}", p.connections, p.max_connections),
            p.data_directory_disk
                .as_ref()
                .map(|d| format!("{} of {}", bytes(d.available_bytes), bytes(d.total_bytes)))
                .unwrap_or_else(|| "-".into()),
            p.archiver
                .as_ref()
                .map(|a| a.failed_count.to_string())
                .unwrap_or_else(|| "-".into()),
            databases,
        ]);
    }
    table
}

#[derive(Debug, Serialize)]
pub struct AuditView {
    pub id: i64,
    pub at: Option<DateTime<Utc>>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    pub hash: String,
}

impl From<proto::AuditEvent> for AuditView {
    fn from(e: proto::AuditEvent) -> Self {
        AuditView {
            id: e.id,
            at: time_from_unix_ms(e.at_unix_ms),
            actor: e.actor,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
            detail: e.detail,
            hash: e.hash,
        }
    }
}

pub fn audit_table(events: &[AuditView]) -> Table {
    let mut table = table(&[
        "ID", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL",
    ]);
    for e in events {
        table.add_row(vec![
            e.id.to_string(),
            time(e.at),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            e.outcome.clone(),
            e.detail.clone(),
        ]);
    }
    table
}
