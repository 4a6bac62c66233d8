//! `cairn repository check`: the coordinator compares its catalog with the
//! repository; this prints what it found. `cairn repository gc`: the
//! coordinator collects garbage; this prints its report.

use cairn_common::proto::{self, admin_client::AdminClient};
use serde::Serialize;
use tonic::transport::Channel;

use super::client::explain;
use super::output::{bytes, print_json, spinner};

#[derive(Debug, Serialize)]
struct ProblemView {
    id: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct DamagedView {
    backup_id: String,
    reason: String,
}

/// The check's report as `--output json` prints it.
#[derive(Debug, Serialize)]
struct CheckView {
    repository: String,
    ok: bool,
    read_data: bool,
    stored_chunks: u64,
    indexed_chunks: u64,
    referenced_chunks: u64,
    manifests_indexed: u64,
    missing_count: u64,
    missing: Vec<ProblemView>,
    corrupt_count: u64,
    corrupt: Vec<ProblemView>,
    unreferenced_count: u64,
    unreferenced: Vec<ProblemView>,
    unindexed_chunks: u64,
    damaged_count: u64,
    damaged_backups: Vec<DamagedView>,
    repaired_backups: u64,
    missing_manifest_count: u64,
    missing_manifests: Vec<ProblemView>,
    unlisted_manifests: u64,
    bytes_read: u64,
    millis: u64,
}

fn problems(list: Vec<proto::ChunkProblem>) -> Vec<ProblemView> {
    list.into_iter()
        .map(|p| ProblemView {
            id: p.id,
            reason: p.reason,
        })
        .collect()
}

/// Prints one kind of problem: the count, then the names the report holds.
fn print_problems(kind: &str, count: u64, list: &[ProblemView]) {
    if count == 0 {
        return;
    }
    println!("{kind}: {count} chunk(s)");
    for problem in list {
        println!("  {kind} chunk {}: {}", problem.id, problem.reason);
    }
    if count > list.len() as u64 {
        println!("  ... and {} more", count - list.len() as u64);
    }
}

/// Runs the check; exit 1 if a chunk is missing or corrupt or a backup is
/// damaged.
pub async fn check(
    client: &mut AdminClient<Channel>,
    read_data: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let bar = spinner(json);
    bar.set_message(if read_data {
        "checking the repository, reading every chunk"
    } else {
        "checking the repository"
    });
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = client
        .check_repository(proto::CheckRepositoryRequest { read_data })
        .await
        .map_err(explain);
    bar.finish_and_clear();
    let report = report?.into_inner();
    let view = CheckView {
        repository: report.repository,
        ok: report.ok,
        read_data: report.read_data,
        stored_chunks: report.stored_chunks,
        indexed_chunks: report.indexed_chunks,
        referenced_chunks: report.referenced_chunks,
        manifests_indexed: report.manifests_indexed,
        missing_count: report.missing_count,
        missing: problems(report.missing),
        corrupt_count: report.corrupt_count,
        corrupt: problems(report.corrupt),
        unreferenced_count: report.unreferenced_count,
        unreferenced: problems(report.unreferenced),
        unindexed_chunks: report.unindexed_chunks,
        damaged_backups: report
            .damaged_backups
            .into_iter()
            .map(|d| DamagedView {
                backup_id: d.backup_id,
                reason: d.reason,
            })
            .collect(),
        damaged_count: report.damaged_count,
        repaired_backups: report.repaired_backups,
        missing_manifest_count: report.missing_manifest_count,
        missing_manifests: problems(report.missing_manifests),
        unlisted_manifests: report.unlisted_manifests,
        bytes_read: report.bytes_read,
        millis: report.millis,
    };
    if json {
        print_json(&view)?;
    } else {
        println!(
            "{}: {} chunk(s) stored, {} indexed, {} referenced by backups{}; checked in {:.1} s",
            view.repository,
            view.stored_chunks,
            view.indexed_chunks,
            view.referenced_chunks,
            if view.read_data {
                format!(", {} read and authenticated", bytes(view.bytes_read))
            } else {
                String::new()
            },
            view.millis as f64 / 1000.0
        );
        print_problems("missing", view.missing_count, &view.missing);
        print_problems("corrupt", view.corrupt_count, &view.corrupt);
        print_problems("unreferenced", view.unreferenced_count, &view.unreferenced);
        if view.unindexed_chunks > 0 {
            println!(
                "{} chunk(s) left the dedup index: the next backup that has them uploads them again",
                view.unindexed_chunks
            );
        }
        for missing in &view.missing_manifests {
            println!(
                "missing manifest of backup {}: {}",
                missing.id, missing.reason
            );
        }
        if view.missing_manifest_count > view.missing_manifests.len() as u64 {
            println!(
                "  ... and {} more",
                view.missing_manifest_count - view.missing_manifests.len() as u64
            );
        }
        for damaged in &view.damaged_backups {
            println!(
                "DAMAGED backup {}: {} (it cannot be restored)",
                damaged.backup_id, damaged.reason
            );
        }
        if view.damaged_count > view.damaged_backups.len() as u64 {
            println!(
                "  ... and {} more damaged backups (cairn backups list shows them)",
                view.damaged_count - view.damaged_backups.len() as u64
            );
        }
        if view.repaired_backups > 0 {
            println!(
                "{} backup(s) repaired: every chunk they need is back",
                view.repaired_backups
            );
        }
        println!(
            "{}",
            if view.ok {
                "ok: every backup's chunks are in the repository"
            } else {
                "NOT OK"
            }
        );
    }
    Ok(if view.ok { 0 } else { 1 })
}

/// Chunks and bytes, as `--output json` prints them.
#[derive(Debug, Serialize)]
struct TallyView {
    chunks: u64,
    bytes: u64,
}

impl From<Option<proto::ChunkTally>> for TallyView {
    fn from(tally: Option<proto::ChunkTally>) -> TallyView {
        let tally = tally.unwrap_or_default();
        TallyView {
            chunks: tally.chunks,
            bytes: tally.bytes,
        }
    }
}

/// A collection's report as `--output json` prints it.
#[derive(Debug, Serialize)]
struct GcView {
    repository: String,
    dry_run: bool,
    grace_ms: u64,
    cutoff_unix_ms: i64,
    stored_chunks: u64,
    referenced_chunks: u64,
    pinned_chunks: u64,
    manifests_read: u64,
    recent_chunks: u64,
    condemned: TallyView,
    freed: TallyView,
    orphans_freed: TallyView,
    revived: TallyView,
    millis: u64,
}

/// Runs a garbage collection and prints what it did (or would do).
pub async fn gc(
    client: &mut AdminClient<Channel>,
    dry_run: bool,
    grace: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Result<i32> {
    let bar = spinner(json);
    bar.set_message(if dry_run {
        "collecting garbage (dry run)"
    } else {
        "collecting garbage"
    });
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let grace_ms = grace.map(|g| u64::try_from(g.as_millis()).unwrap_or(u64::MAX));
    let report = client
        .collect_garbage(proto::CollectGarbageRequest {
            dry_run,
            grace_ms: grace_ms.unwrap_or(0),
            no_grace: grace_ms == Some(0),
        })
        .await
        .map_err(explain);
    bar.finish_and_clear();
    let report = report?.into_inner();
    let view = GcView {
        repository: report.repository,
        dry_run: report.dry_run,
        grace_ms: report.grace_ms,
        cutoff_unix_ms: report.cutoff_unix_ms,
        stored_chunks: report.stored_chunks,
        referenced_chunks: report.referenced_chunks,
        pinned_chunks: report.pinned_chunks,
        manifests_read: report.manifests_read,
        recent_chunks: report.recent_chunks,
        condemned: report.condemned.into(),
        freed: report.freed.into(),
        orphans_freed: report.orphans_freed.into(),
        revived: report.revived.into(),
        millis: report.millis,
    };
    if json {
        print_json(&view)?;
        return Ok(0);
    }
    let (would, condemn, free) = if view.dry_run {
        ("dry run, nothing changed: ", "would condemn", "would free")
    } else {
        ("", "condemned", "freed")
    };
    println!(
        "{}{}: {} chunk(s) stored, {} referenced by backups, {} pinned by uploads or manifests, \
         {} used within the grace ({}); done in {:.1} s",
        would,
        view.repository,
        view.stored_chunks,
        view.referenced_chunks,
        view.pinned_chunks,
        view.recent_chunks,
        cairn_common::config::display_duration(std::time::Duration::from_millis(view.grace_ms)),
        view.millis as f64 / 1000.0
    );
    println!(
        "{condemn}: {} chunk(s), {} (deleted by the next run unless a backup uses them again)",
        view.condemned.chunks,
        bytes(view.condemned.bytes)
    );
    println!(
        "{free}: {} chunk(s), {}; orphaned objects: {} chunk(s), {}",
        view.freed.chunks,
        bytes(view.freed.bytes),
        view.orphans_freed.chunks,
        bytes(view.orphans_freed.bytes)
    );
    println!(
        "revived since the previous run: {} chunk(s), {}",
        view.revived.chunks,
        bytes(view.revived.bytes)
    );
    Ok(0)
}
