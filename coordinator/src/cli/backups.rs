//! `cairn backup run`, `cairn backups list|show`, `cairn jobs list|show|watch|cancel`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail};
use cairn_common::model::time_from_unix_ms;
use cairn_common::names::parse_key_values;
use cairn_common::proto::{self, admin_client::AdminClient};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tonic::transport::Channel;

use super::client::explain;
use super::output::{self, bytes, print_json};
use cairn_coordinator::jobs::restores::RestoreReport;

const WATCH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub kind: String,
    pub agent: String,
    pub instance: String,
    pub database: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub backup_id: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub bytes_read: u64,
    pub bytes_uploaded: u64,
    pub chunks: u64,
    pub created_by: String,
    /// Restores and drills: the database restored into.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target_database: String,
    /// Restores and drills: what the agent reported once done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreReport>,
    pub created_at: Option<DateTime<Utc>>,
    /// The current (or last) attempt, from 1; 0 before the first.
    pub attempt: u32,
    pub max_attempts: u32,
    /// A queued job: why it waits.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub waiting_for: String,
    pub deadline: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// `jobs show`: every attempt.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptView>,
    /// A scheduled job: its schedule's id, fire time and target.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub schedule_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fire_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target: String,
}

#[derive(Debug, Serialize)]
pub struct AttemptView {
    pub number: u32,
    pub attempt_id: String,
    pub term: u64,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl JobView {
    /// Queued or running: not ended yet.
    pub fn is_active(&self) -> bool {
        matches!(self.status, "queued" | "running")
    }
}

fn status_name(status: i32) -> &'static str {
    match proto::JobStatus::try_from(status) {
        Ok(proto::JobStatus::Running) => "running",
        Ok(proto::JobStatus::Succeeded) => "succeeded",
        Ok(proto::JobStatus::Failed) => "failed",
        Ok(proto::JobStatus::Cancelled) => "cancelled",
        Ok(proto::JobStatus::Queued) => "queued",
        Ok(proto::JobStatus::Missed) => "missed",
        _ => "unknown",
    }
}

impl From<proto::Job> for JobView {
    fn from(j: proto::Job) -> Self {
        JobView {
            status: status_name(j.status),
            started_at: time_from_unix_ms(j.started_at_unix_ms),
            finished_at: time_from_unix_ms(j.finished_at_unix_ms),
            id: j.id,
            kind: j.kind,
            agent: j.agent_name,
            instance: j.instance,
            database: j.database,
            error: j.error,
            backup_id: j.backup_id,
            bytes_read: j.bytes_read,
            bytes_uploaded: j.bytes_uploaded,
            chunks: j.chunks,
            created_by: j.created_by,
            target_database: j.target_database,
            restore: j.restore.map(Into::into),
            created_at: time_from_unix_ms(j.created_at_unix_ms),
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            waiting_for: j.wait_reason,
            deadline: time_from_unix_ms(j.deadline_unix_ms),
            timeout_seconds: (j.timeout_ms > 0).then_some(j.timeout_ms / 1000),
            schedule_id: j.schedule_id,
            fire_at: time_from_unix_ms(j.fire_at_unix_ms),
            target: j.target,
            attempts: j
                .attempts
                .into_iter()
                .map(|a| AttemptView {
                    number: a.number,
                    attempt_id: a.attempt_id,
                    term: a.term,
                    started_at: time_from_unix_ms(a.started_at_unix_ms),
                    finished_at: time_from_unix_ms(a.finished_at_unix_ms),
                    outcome: a.outcome,
                    reason: a.reason,
                })
                .collect(),
        }
    }
}

/// The latest verification of a backup.
#[derive(Debug, Serialize)]
pub struct VerificationView {
    pub at: Option<DateTime<Utc>>,
    /// `chunks` or `restore drill on AGENT`.
    pub method: String,
    pub ok: bool,
    pub detail: String,
    pub millis: u64,
}

impl From<proto::Verification> for VerificationView {
    fn from(v: proto::Verification) -> Self {
        VerificationView {
            at: time_from_unix_ms(v.at_unix_ms),
            method: v.method,
            ok: v.ok,
            detail: v.detail,
            millis: v.millis,
        }
    }
}

impl VerificationView {
    /// "ok 3m ago (chunks)", for tables.
    pub fn summary(verification: Option<&VerificationView>) -> String {
        match verification {
            None => "never".into(),
            Some(v) => format!(
                "{} {} ({})",
                if v.ok { "ok" } else { "FAILED" },
                output::ago(v.at),
                v.method
            ),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BackupView {
    pub id: String,
    pub agent: String,
    pub instance: String,
    pub database: String,
    pub server_version: String,
    pub pg_dump_version: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub logical_bytes: u64,
    pub new_stored_bytes: u64,
    pub referenced_bytes: u64,
    pub chunk_count: u64,
    pub new_chunk_count: u64,
    /// Logical bytes over referenced (stored, compressed) bytes: what
    /// compression saved. None for an empty dump.
    pub compression_ratio: Option<f64>,
    /// Referenced bytes over new stored bytes: what reusing chunks other
    /// backups had already stored saved (1.0 for a first backup). None when
    /// nothing new was stored at all.
    pub dedup_ratio: Option<f64>,
    pub database_bytes: u64,
    pub tags: BTreeMap<String, String>,
    pub job_id: String,
    pub status: &'static str,
    /// The newest verification (`cairn backup verify`), if any.
    pub last_verification: Option<VerificationView>,
    /// What `cairn repository check` found missing or corrupt; a damaged
    /// backup cannot be restored (`status` is then "damaged").
    pub damage: Option<String>,
    /// The cluster's system identifier; empty for backups made before
    /// agents reported it.
    pub system_identifier: String,
    /// What retention groups it by: "cluster SYSID database DB", or
    /// "AGENT/INSTANCE/DB" without a system identifier.
    pub lineage: String,
    /// Retention never removes it (`cairn backups protect`).
    pub protected: bool,
}

impl From<proto::Backup> for BackupView {
    fn from(b: proto::Backup) -> Self {
        BackupView {
            compression_ratio: ratio(b.logical_bytes, b.referenced_bytes),
            dedup_ratio: ratio(b.referenced_bytes, b.new_stored_bytes),
            started_at: time_from_unix_ms(b.started_at_unix_ms),
            finished_at: time_from_unix_ms(b.finished_at_unix_ms),
            tags: b.tags.into_iter().collect(),
            id: b.id,
            agent: b.agent_name,
            instance: b.instance,
            database: b.database,
            server_version: b.server_version,
            pg_dump_version: b.pg_dump_version,
            logical_bytes: b.logical_bytes,
            new_stored_bytes: b.new_stored_bytes,
            referenced_bytes: b.referenced_bytes,
            chunk_count: b.chunk_count,
            new_chunk_count: b.new_chunk_count,
            database_bytes: b.database_bytes,
            job_id: b.job_id,
            status: if b.damage.is_empty() {
                "complete"
            } else {
                "damaged"
            },
            damage: (!b.damage.is_empty()).then_some(b.damage),
            last_verification: b.last_verification.map(Into::into),
            system_identifier: b.system_identifier,
            lineage: b.lineage,
            protected: b.protected,
        }
    }
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (numerator > 0 && denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// "4.2x", or `none` when there is no ratio.
fn show_ratio(ratio: Option<f64>, none: &str) -> String {
    ratio.map_or_else(|| none.to_string(), |r| format!("{r:.1}x"))
}

pub fn parse_tags(tags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    parse_key_values("--tag", "ticket=OPS-12", tags).map_err(|e| anyhow!(e))
}

pub struct RunBackup {
    pub agent: String,
    pub instance: String,
    pub databases: Vec<String>,
    pub all_databases: bool,
    pub tags: Vec<String>,
    pub options: proto::JobOptions,
    pub wait: bool,
}

pub async fn run_backup(
    client: &mut AdminClient<Channel>,
    request: RunBackup,
    json: bool,
) -> anyhow::Result<i32> {
    if request.databases.is_empty() != request.all_databases {
        bail!("give either --database DB (repeatable) or --all-databases");
    }
    let tags = parse_tags(&request.tags)?;
    let response = client
        .start_backup(proto::StartBackupRequest {
            agent_name: request.agent,
            instance: request.instance,
            database: String::new(),
            databases: request.databases,
            all_databases: request.all_databases,
            tags: tags.into_iter().collect(),
            options: Some(request.options),
        })
        .await
        .map_err(explain)?
        .into_inner();
    if !request.wait {
        let jobs: Vec<JobView> = response.jobs.into_iter().map(Into::into).collect();
        if json {
            print_json(&jobs)?;
        } else {
            for job in &jobs {
                println!("{}", job.id);
            }
            for job in &jobs {
                eprintln!("Follow with: cairn jobs watch {}", job.id);
            }
        }
        return Ok(if jobs.iter().any(|j| j.status == "failed") {
            1
        } else {
            0
        });
    }
    let mut code = 0;
    let mut finished = Vec::new();
    for job in response.jobs {
        let job = watch(client, &job.id, json).await?;
        if job.status != "succeeded" {
            code = 1;
        }
        finished.push(job);
    }
    if json {
        print_json(&finished)?;
    }
    Ok(code)
}

/// Follows a job to its end with a progress bar (on a terminal), then
/// prints its summary.
pub async fn watch(
    client: &mut AdminClient<Channel>,
    job_id: &str,
    json: bool,
) -> anyhow::Result<JobView> {
    let bar = output::spinner(json);
    let started = std::time::Instant::now();
    let job = loop {
        let job: JobView = client
            .get_job(proto::GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(explain)?
            .into_inner()
            .into();
        let seconds = started.elapsed().as_secs_f64().max(0.001);
        let rate = bytes((job.bytes_read as f64 / seconds) as u64);
        bar.set_message(if job.status == "queued" {
            format!("{} queued: {}", job.id, job.waiting_for)
        } else if job.kind == "backup" {
            format!(
                "{} {}/{}: read {} from pg_dump, uploaded {} ({rate}/s), {} chunks",
                job.id,
                job.agent,
                job.database,
                bytes(job.bytes_read),
                bytes(job.bytes_uploaded),
                job.chunks
            )
        } else {
            format!(
                "{} {} of {} into {}/{}: sent {} to pg_restore ({rate}/s), {} chunks",
                job.id,
                job.kind,
                job.backup_id,
                job.agent,
                job.target_database,
                bytes(job.bytes_read),
                job.chunks
            )
        });
        bar.tick();
        if !job.is_active() {
            break job;
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    };
    bar.finish_and_clear();
    if !json {
        match job.status {
            "succeeded" if job.kind != "backup" => print_restore_summary(&job),
            "succeeded" => {
                let backup = client
                    .get_backup(proto::GetBackupRequest {
                        backup_id: job.backup_id.clone(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                let view = BackupView::from(backup);
                println!(
                    "backup {} of {}/{}: {} dumped, {} stored after compression ({}), {} of it new ({} chunks, {} new; dedup {})",
                    view.id,
                    view.agent,
                    view.database,
                    bytes(view.logical_bytes),
                    bytes(view.referenced_bytes),
                    show_ratio(view.compression_ratio, "-"),
                    bytes(view.new_stored_bytes),
                    view.chunk_count,
                    view.new_chunk_count,
                    show_ratio(view.dedup_ratio, "all reused")
                );
            }
            status => eprintln!("error: job {} {status}: {}", job.id, job.error),
        }
    }
    Ok(job)
}

/// What a finished restore or drill did, for people.
fn print_restore_summary(job: &JobView) {
    let Some(report) = &job.restore else {
        println!("{} {} succeeded", job.kind, job.id);
        return;
    };
    if job.kind == "drill" {
        println!(
            "restore drill of backup {} on {}: {} tables restored and counted in {:.1} s, then dropped",
            job.backup_id,
            job.agent,
            report.table_rows.len(),
            report.restore_millis as f64 / 1000.0
        );
        return;
    }
    println!(
        "restored backup {} into {}/{}/{}: {} fed to pg_restore in {:.1} s{}",
        job.backup_id,
        job.agent,
        job.instance,
        report.database,
        bytes(report.bytes_restored),
        report.restore_millis as f64 / 1000.0,
        if report.spooled {
            " (spooled to the agent's disk for a parallel restore)"
        } else {
            ""
        }
    );
    if !report.roles_created.is_empty() {
        println!(
            "roles created from the backup's globals: {}",
            report.roles_created.join(", ")
        );
    }
    if !report.terminated_sessions.is_empty() {
        println!(
            "terminated sessions on the previous database: {}",
            report.terminated_sessions.join(", ")
        );
    }
    if !report.previous.is_empty() {
        if report.previous_dropped {
            println!("the previous database was dropped");
        } else {
            println!(
                "the previous database is kept as {} (drop it when you no longer need it)",
                sql_identifier(&report.previous)
            );
        }
    }
    // Cairn's own warnings and pg_restore's output apart: an operator must
    // know who is speaking.
    for warning in report.warnings.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("warning: {warning}");
    }
    if !report.pg_restore_messages.trim().is_empty() {
        eprintln!("pg_restore said: {}", report.pg_restore_messages.trim_end());
    }
}

/// A database name as SQL spells it (`"we'ird ""db"""`), ready to paste
/// into `DROP DATABASE`.
fn sql_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The BACKUP column of a job: a backup job's id names a listed backup only
/// once the job succeeded (a failed or cancelled one never completes, and
/// `backups show` would not find it).
fn job_backup(job: &JobView) -> String {
    match job.status {
        _ if job.kind != "backup" => job.backup_id.clone(),
        "succeeded" => job.backup_id.clone(),
        "running" | "queued" => "(in progress)".into(),
        _ => "(not completed)".into(),
    }
}

pub fn jobs_table(jobs: &[JobView]) -> comfy_table::Table {
    let mut table = output::table(&[
        "JOB",
        "KIND",
        "AGENT",
        "DATABASE",
        "STATUS",
        "STARTED",
        "READ",
        "BACKUP",
        "ERROR / WAITING FOR",
    ]);
    for j in jobs {
        table.add_row(vec![
            j.id.clone(),
            j.kind.clone(),
            j.agent.clone(),
            if j.target_database.is_empty() {
                j.database.clone()
            } else {
                format!("{} -> {}", j.database, j.target_database)
            },
            if j.max_attempts > 1 && j.attempt > 0 {
                format!("{} ({}/{})", j.status, j.attempt, j.max_attempts)
            } else {
                j.status.to_string()
            },
            output::ago(j.started_at.or(j.created_at)),
            bytes(j.bytes_read),
            job_backup(j),
            if j.status == "queued" {
                j.waiting_for.clone()
            } else {
                j.error.clone()
            },
        ]);
    }
    table
}

/// A job's attempts, for `jobs show`.
pub fn attempts_table(attempts: &[AttemptView]) -> comfy_table::Table {
    let mut table = output::table(&[
        "ATTEMPT", "ID", "TERM", "STARTED", "ENDED", "OUTCOME", "REASON",
    ]);
    for a in attempts {
        table.add_row(vec![
            a.number.to_string(),
            a.attempt_id.clone(),
            a.term.to_string(),
            output::ago(a.started_at),
            output::ago(a.finished_at),
            a.outcome.clone(),
            a.reason.clone(),
        ]);
    }
    table
}

pub fn backups_table(backups: &[BackupView]) -> comfy_table::Table {
    let mut table = output::table(&[
        "BACKUP",
        "AGENT",
        "DATABASE",
        "FINISHED",
        "DUMP SIZE",
        "COMPRESSION",
        "NEW STORED",
        "DEDUP",
        "CHUNKS",
        "VERIFIED",
        "PROTECTED",
        "TAGS",
    ]);
    for b in backups {
        table.add_row(vec![
            b.id.clone(),
            b.agent.clone(),
            b.database.clone(),
            output::ago(b.finished_at),
            bytes(b.logical_bytes),
            show_ratio(b.compression_ratio, "-"),
            bytes(b.new_stored_bytes),
            show_ratio(b.dedup_ratio, "all reused"),
            b.chunk_count.to_string(),
            match &b.damage {
                Some(_) => "DAMAGED".to_string(),
                None => VerificationView::summary(b.last_verification.as_ref()),
            },
            if b.protected { "yes" } else { "-" }.to_string(),
            b.tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    table
}

/// `cairn backups show`: one backup, for people.
pub fn backup_detail(backup: &BackupView) -> String {
    let tags = backup
        .tags
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>();
    let lines = [
        ("backup", backup.id.clone()),
        (
            "status",
            match &backup.damage {
                Some(damage) => format!("DAMAGED: {damage} (it cannot be restored)"),
                None => backup.status.to_string(),
            },
        ),
        ("agent", backup.agent.clone()),
        ("instance", backup.instance.clone()),
        ("database", backup.database.clone()),
        ("lineage", backup.lineage.clone()),
        (
            "protected",
            if backup.protected {
                "yes (retention keeps it; cairn backups unprotect ID lifts it)".to_string()
            } else {
                "no".to_string()
            },
        ),
        (
            "versions",
            format!(
                "server {}, pg_dump {}",
                backup.server_version, backup.pg_dump_version
            ),
        ),
        ("started", output::time(backup.started_at)),
        ("finished", output::time(backup.finished_at)),
        ("database size", bytes(backup.database_bytes)),
        ("dump size", bytes(backup.logical_bytes)),
        (
            "stored",
            format!(
                "{} (compression {})",
                bytes(backup.referenced_bytes),
                show_ratio(backup.compression_ratio, "-")
            ),
        ),
        (
            "new stored",
            format!(
                "{} (dedup {})",
                bytes(backup.new_stored_bytes),
                show_ratio(backup.dedup_ratio, "all reused")
            ),
        ),
        (
            "chunks",
            format!("{} ({} new)", backup.chunk_count, backup.new_chunk_count),
        ),
        (
            "tags",
            if tags.is_empty() {
                "-".into()
            } else {
                tags.join(",")
            },
        ),
        ("job", backup.job_id.clone()),
        (
            "verified",
            VerificationView::summary(backup.last_verification.as_ref()),
        ),
    ];
    lines
        .iter()
        .map(|(k, v)| format!("{k:>13}: {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}
