//! Catalog records as the Admin API sends them.

use cairn_common::proto;

use crate::catalog::{
    AttemptRecord, BackupRecord, JobRecord, JobState, ScheduleRecord, VerificationRecord,
};
use crate::jobs::restores::RestoreReport;
use crate::jobs::verify::VerifyReport;

pub fn job_to_wire(job: JobRecord) -> proto::Job {
    let status = match job.status {
        JobState::Queued => proto::JobStatus::Queued,
        JobState::Running => proto::JobStatus::Running,
        JobState::Succeeded => proto::JobStatus::Succeeded,
        JobState::Failed => proto::JobStatus::Failed,
        JobState::Cancelled => proto::JobStatus::Cancelled,
        JobState::Missed => proto::JobStatus::Missed,
    };
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    proto::Job {
        id: job.id,
        kind: job.kind.as_str().to_string(),
        agent_name: job.agent_name,
        instance: job.instance,
        database: job.database,
        status: status as i32,
        error: job.error,
        backup_id: job.backup_id,
        started_at_unix_ms: job.started_at.unwrap_or(0),
        finished_at_unix_ms: job.finished_at.unwrap_or(0),
        bytes_read: unsigned(job.bytes_read),
        bytes_uploaded: unsigned(job.bytes_uploaded),
        chunks: unsigned(job.chunks),
        created_by: job.created_by,
        target_database: job.target_database,
        restore: serde_json::from_str::<RestoreReport>(&job.report)
            .ok()
            .map(Into::into),
        created_at_unix_ms: job.created_at,
        attempt: u32::try_from(job.attempt).unwrap_or(0),
        max_attempts: u32::try_from(job.max_attempts).unwrap_or(1),
        wait_reason: job.wait_reason,
        deadline_unix_ms: job.deadline_at.unwrap_or(0),
        timeout_ms: job.timeout_ms.map_or(0, unsigned),
        not_before_unix_ms: job.not_before,
        attempts: Vec::new(),
        schedule_id: job.schedule_id.unwrap_or_default(),
        fire_at_unix_ms: job.fire_at.unwrap_or(0),
        target: job.target.unwrap_or_default(),
    }
}

pub fn attempt_to_wire(attempt: AttemptRecord) -> proto::JobAttempt {
    proto::JobAttempt {
        number: u32::try_from(attempt.number).unwrap_or(0),
        attempt_id: attempt.attempt_id,
        term: u64::try_from(attempt.term).unwrap_or(0),
        started_at_unix_ms: attempt.started_at,
        finished_at_unix_ms: attempt.finished_at.unwrap_or(0),
        outcome: attempt.outcome,
        reason: attempt.reason,
    }
}

pub fn backup_to_wire(
    backup: BackupRecord,
    verification: Option<VerificationRecord>,
) -> proto::Backup {
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    let lineage = crate::catalog::Lineage::of_parts(
        &backup.system_identifier,
        &backup.agent_name,
        &backup.instance,
        &backup.database,
    )
    .to_string();
    proto::Backup {
        lineage,
        system_identifier: backup.system_identifier.clone(),
        protected: backup.protected,
        tags: backup.tags().into_iter().collect(),
        id: backup.id,
        agent_name: backup.agent_name,
        instance: backup.instance,
        database: backup.database,
        server_version: backup.server_version,
        pg_dump_version: backup.pg_dump_version,
        started_at_unix_ms: backup.started_at,
        finished_at_unix_ms: backup.finished_at.unwrap_or(0),
        logical_bytes: unsigned(backup.logical_bytes),
        new_stored_bytes: unsigned(backup.new_stored_bytes),
        referenced_bytes: unsigned(backup.referenced_bytes),
        chunk_count: unsigned(backup.chunk_count),
        new_chunk_count: unsigned(backup.new_chunk_count),
        database_bytes: unsigned(backup.database_bytes),
        job_id: backup.job_id,
        damage: match backup.damaged_at {
            Some(_) if backup.damage.is_empty() => "damaged".to_string(),
            Some(_) => backup.damage,
            None => String::new(),
        },
        last_verification: verification.map(|v| proto::Verification {
            at_unix_ms: v.at,
            method: v.method,
            ok: v.ok,
            detail: v.detail,
            millis: unsigned(v.millis),
        }),
    }
}

pub fn verify_report_to_wire(report: VerifyReport) -> proto::VerifyBackupResponse {
    proto::VerifyBackupResponse {
        backup_id: report.backup_id,
        ok: report.ok,
        chunks_checked: report.chunks_checked,
        bytes_checked: report.bytes_checked,
        bad_chunks: report
            .bad_chunks
            .into_iter()
            .map(|bad| proto::BadChunk {
                position: bad.position,
                id: bad.id,
                error: bad.error,
            })
            .collect(),
        problems: report.problems,
        millis: report.millis,
        tables_checked: report.tables_checked,
    }
}

pub fn check_report_to_wire(
    report: crate::repository::check::CheckReport,
    millis: u64,
) -> proto::CheckRepositoryResponse {
    let problems = |list: Vec<(String, String)>| {
        list.into_iter()
            .map(|(id, reason)| proto::ChunkProblem { id, reason })
            .collect()
    };
    proto::CheckRepositoryResponse {
        ok: report.ok(),
        repository: report.repository,
        read_data: report.read_data,
        stored_chunks: report.stored_chunks,
        indexed_chunks: report.indexed_chunks,
        referenced_chunks: report.referenced_chunks,
        manifests_indexed: report.manifests_indexed,
        missing_count: report.missing.count,
        missing: problems(report.missing.first),
        corrupt_count: report.corrupt.count,
        corrupt: problems(report.corrupt.first),
        unreferenced_count: report.unreferenced.count,
        unreferenced: problems(report.unreferenced.first),
        unindexed_chunks: report.unindexed_chunks,
        damaged_backups: report
            .damaged_backups
            .into_iter()
            .map(|(backup_id, reason)| proto::DamagedBackup { backup_id, reason })
            .collect(),
        damaged_count: report.damaged_count,
        repaired_backups: report.repaired_backups,
        missing_manifest_count: report.missing_manifests.count,
        missing_manifests: problems(report.missing_manifests.first),
        unlisted_manifests: report.unlisted_manifests,
        bytes_read: report.bytes_read,
        millis,
    }
}

pub fn gc_report_to_wire(
    report: crate::repository::gc::GcReport,
    millis: u64,
) -> proto::CollectGarbageResponse {
    let tally = |tally: crate::repository::gc::Tally| {
        Some(proto::ChunkTally {
            chunks: tally.chunks,
            bytes: tally.bytes,
        })
    };
    proto::CollectGarbageResponse {
        repository: report.repository,
        dry_run: report.dry_run,
        grace_ms: report.grace_ms,
        cutoff_unix_ms: report.cutoff_ms,
        stored_chunks: report.stored_chunks,
        referenced_chunks: report.referenced_chunks,
        pinned_chunks: report.pinned_chunks,
        manifests_read: report.manifests_read,
        recent_chunks: report.recent_chunks,
        condemned: tally(report.condemned),
        freed: tally(report.freed),
        orphans_freed: tally(report.orphans_freed),
        revived: tally(report.revived),
        millis,
    }
}

pub fn key_slot_to_wire(listed: crate::repository::keys::ListedSlot) -> proto::KeySlot {
    proto::KeySlot {
        id: listed.slot.id,
        purpose: listed.slot.purpose.as_str().to_string(),
        created_at_unix_ms: listed.slot.created_at_ms,
        in_use: listed.in_use,
    }
}

pub fn schedule_to_wire(schedule: ScheduleRecord, next_fire_unix_ms: i64) -> proto::Schedule {
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    proto::Schedule {
        // A corrupt stored value shows empty here; firing the schedule
        // refuses it with the reason.
        selector: schedule
            .selector()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        databases: schedule.databases().unwrap_or_default(),
        id: schedule.id,
        name: schedule.name,
        kind: schedule.kind.as_str().to_string(),
        agent_name: schedule.agent_name.unwrap_or_default(),
        all_databases: schedule.all_databases,
        cron: schedule.cron,
        timezone: schedule.timezone,
        spread_ms: unsigned(schedule.spread_ms),
        on_overlap: schedule.on_overlap.as_str().to_string(),
        catch_up_ms: unsigned(schedule.catch_up_ms),
        retries: u32::try_from(schedule.retries).unwrap_or(0),
        timeout_ms: schedule.timeout_ms.map_or(0, unsigned),
        drill_agent: schedule.drill_agent.unwrap_or_default(),
        paused: schedule.paused,
        created_by: schedule.created_by,
        created_at_unix_ms: schedule.created_at,
        next_fire_unix_ms,
        retention_policy: schedule.retention_policy.unwrap_or_default(),
    }
}

/// What a retention apply did, as `ApplyRetention` answers.
pub fn retention_report_to_wire(
    report: crate::retention::apply::ApplyReport,
    dry_run: bool,
) -> proto::ApplyRetentionResponse {
    use crate::retention::apply::Deletion;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let lineages = report
        .lineages
        .into_iter()
        .map(|lineage| {
            let (kept, removed, deleted) = (lineage.kept(), lineage.removed(), lineage.deleted());
            let backups = lineage
                .plan
                .backups
                .iter()
                .map(|planned| {
                    let deletion = lineage.deletions.get(&planned.backup.id);
                    proto::RetainedBackup {
                        backup_id: planned.backup.id.clone(),
                        agent_name: planned.backup.agent_name.clone(),
                        instance: planned.backup.instance.clone(),
                        finished_at_unix_ms: planned.backup.finished_at,
                        fate: planned.fate.to_string(),
                        kept_by: planned.kept_by(),
                        deleted: deletion == Some(&Deletion::Deleted),
                        error: match deletion {
                            Some(Deletion::Failed(error)) => error.clone(),
                            _ => String::new(),
                        },
                    }
                })
                .collect();
            proto::RetentionLineage {
                lineage: lineage.plan.lineage.to_string(),
                system_identifier: lineage.plan.lineage.system_identifier().to_string(),
                database: lineage.plan.lineage.database().to_string(),
                backups,
                refused: lineage.plan.refused.clone().unwrap_or_default(),
                kept: count(kept),
                removed: count(removed),
                deleted: count(deleted),
            }
        })
        .collect();
    proto::ApplyRetentionResponse {
        lineages,
        dry_run,
        finished_deletions: report.finished_deletions,
    }
}
