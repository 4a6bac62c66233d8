//! `cairn restore` and `cairn backup verify`.

use cairn_common::proto::{self, admin_client::AdminClient};
use serde::Serialize;
use tonic::transport::Channel;

use super::backups::{JobView, watch};
use super::client::explain;
use super::output::{bytes, print_json};

pub struct RunRestore {
    pub backup_id: String,
    pub agent: String,
    pub instance: String,
    pub database: Option<String>,
    pub replace: bool,
    pub drop_previous: bool,
    pub no_owner: bool,
    pub no_roles: bool,
    pub jobs: u32,
    pub tables: Vec<String>,
    pub schemas: Vec<String>,
    pub options: proto::JobOptions,
    pub wait: bool,
}

pub async fn run_restore(
    client: &mut AdminClient<Channel>,
    request: RunRestore,
    json: bool,
) -> anyhow::Result<i32> {
    let job: JobView = client
        .start_restore(proto::StartRestoreRequest {
            backup_id: request.backup_id,
            agent_name: request.agent,
            instance: request.instance,
            database: request.database.unwrap_or_default(),
            replace: request.replace,
            drop_previous: request.drop_previous,
            no_owner: request.no_owner,
            no_roles: request.no_roles,
            jobs: request.jobs,
            tables: request.tables,
            schemas: request.schemas,
            options: Some(request.options),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .into();
    finish(client, job, request.wait, json).await
}

/// Prints a started job, or follows it with `wait`; exit 1 unless it
/// succeeds.
async fn finish(
    client: &mut AdminClient<Channel>,
    job: JobView,
    wait: bool,
    json: bool,
) -> anyhow::Result<i32> {
    if !wait && job.is_active() {
        if json {
            print_json(&job)?;
        } else {
            println!("{}", job.id);
            eprintln!("Follow with: cairn jobs watch {}", job.id);
        }
        return Ok(0);
    }
    let job = if job.is_active() {
        watch(client, &job.id, json).await?
    } else {
        if !json {
            eprintln!("error: job {} {}: {}", job.id, job.status, job.error);
        }
        job
    };
    if json {
        print_json(&job)?;
        // The error goes to stderr too, where scripts and people look.
        if job.status != "succeeded" {
            eprintln!("error: job {} {}: {}", job.id, job.status, job.error);
        }
    }
    Ok(if job.status == "succeeded" { 0 } else { 1 })
}

#[derive(Debug, Serialize)]
struct BadChunkView {
    position: String,
    id: String,
    error: String,
}

#[derive(Debug, Serialize)]
struct VerifyView {
    backup_id: String,
    ok: bool,
    chunks_checked: u64,
    bytes_checked: u64,
    tables_checked: u64,
    bad_chunks: Vec<BadChunkView>,
    problems: Vec<String>,
    millis: u64,
}

/// `cairn backup verify ID`: the coordinator checks every chunk.
pub async fn verify_chunks(
    client: &mut AdminClient<Channel>,
    backup_id: String,
    json: bool,
) -> anyhow::Result<i32> {
    let report = client
        .verify_backup(proto::VerifyBackupRequest { backup_id })
        .await
        .map_err(explain)?
        .into_inner();
    let view = VerifyView {
        backup_id: report.backup_id,
        ok: report.ok,
        chunks_checked: report.chunks_checked,
        bytes_checked: report.bytes_checked,
        tables_checked: report.tables_checked,
        bad_chunks: report
            .bad_chunks
            .into_iter()
            .map(|bad| BadChunkView {
                position: bad.position,
                id: bad.id,
                error: bad.error,
            })
            .collect(),
        problems: report.problems,
        millis: report.millis,
    };
    if json {
        print_json(&view)?;
    } else {
        println!(
            "backup {}: {} chunks, {} checked in {:.1} s; {} tables' rows recounted",
            view.backup_id,
            view.chunks_checked,
            bytes(view.bytes_checked),
            view.millis as f64 / 1000.0,
            view.tables_checked
        );
        for bad in &view.bad_chunks {
            println!("BAD chunk {} ({}): {}", bad.position, bad.id, bad.error);
        }
        for problem in &view.problems {
            println!("PROBLEM: {problem}");
        }
        println!(
            "{}",
            if view.ok {
                "verified: every chunk authenticates and matches its hash"
            } else {
                "NOT VERIFIED"
            }
        );
    }
    Ok(if view.ok { 0 } else { 1 })
}

/// `cairn backup verify ID --restore-on AGENT`: a restore drill, followed
/// to its end.
pub async fn verify_by_drill(
    client: &mut AdminClient<Channel>,
    backup_id: String,
    agent: String,
    instance: String,
    options: proto::JobOptions,
    json: bool,
) -> anyhow::Result<i32> {
    let job: JobView = client
        .start_restore_drill(proto::StartRestoreDrillRequest {
            backup_id,
            agent_name: agent,
            instance,
            options: Some(options),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .into();
    finish(client, job, true, json).await
}
