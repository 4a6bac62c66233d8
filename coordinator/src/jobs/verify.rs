//! `cairn backup verify`: checks a backup from the repository alone, trusting
//! nothing in it. Every chunk the manifest names is read, authenticated,
//! decrypted, decompressed and re-hashed against its id (and, in a
//! format-2 manifest, against the content hash listed); its sizes must match
//! the manifest's; the dump the chunks form must be a whole custom-format
//! archive whose recounted rows equal the manifest's counts. A bad chunk is
//! reported by position and id, and the check goes on to the end, so one run
//! lists every problem.
//!
//! Chunks are checked a few at a time on the blocking pool, in order for the
//! archive reader; memory stays bounded whatever the backup's size.

use std::time::Instant;

use cairn_common::archive::ArchiveScanner;
use cairn_common::chunk::open_chunk;
use futures::StreamExt;
use serde::Serialize;

use crate::catalog::{Catalog, VerificationRecord};
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::repository::manifest::{Manifest, ManifestChunk};
use crate::repository::{ObjectKey, Repository};

/// Chunks read and checked at once.
const CHECKS_IN_FLIGHT: usize = 4;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BadChunk {
    /// 1-based position in the dump, or "globals".
    pub position: String,
    pub id: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backup_id: String,
    pub ok: bool,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub tables_checked: u64,
    pub bad_chunks: Vec<BadChunk>,
    pub problems: Vec<String>,
    pub millis: u64,
}

/// Verifies `backup_id` and records the outcome on the backup.
pub async fn verify_backup(
    catalog: &Catalog,
    repository: &Repository,
    backup_id: &str,
) -> Result<VerifyReport> {
    match catalog.get_backup(backup_id).await? {
        Some(backup) if backup.is_listed() => {}
        _ => {
            return Err(CoordinatorError::NotFound(format!(
                "no complete backup {backup_id}: see cairn backups list"
            )));
        }
    }
    let started = Instant::now();
    let mut report = VerifyReport {
        backup_id: backup_id.to_string(),
        ok: false,
        chunks_checked: 0,
        bytes_checked: 0,
        tables_checked: 0,
        bad_chunks: Vec::new(),
        problems: Vec::new(),
        millis: 0,
    };
    match Manifest::load(repository, backup_id).await {
        Ok(manifest) => check_manifest(repository, &manifest, &mut report).await,
        Err(error) => report
            .problems
            .push(format!("the manifest cannot be used: {error}")),
    }
    report.millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report.ok = report.bad_chunks.is_empty() && report.problems.is_empty();
    let detail = if report.ok {
        format!(
            "{} chunks, {} bytes, {} tables' rows recounted",
            report.chunks_checked, report.bytes_checked, report.tables_checked
        )
    } else {
        let mut parts: Vec<String> = report
            .bad_chunks
            .iter()
            .map(|bad| format!("chunk {} ({}): {}", bad.position, bad.id, bad.error))
            .collect();
        parts.extend(report.problems.iter().cloned());
        parts.join("; ")
    };
    catalog
        .record_verification(&VerificationRecord {
            backup_id: backup_id.to_string(),
            at: now_ms(),
            method: "chunks".into(),
            ok: report.ok,
            detail,
            millis: i64::try_from(report.millis).unwrap_or(i64::MAX),
            job_id: String::new(),
        })
        .await?;
    Ok(report)
}

async fn check_manifest(repository: &Repository, manifest: &Manifest, report: &mut VerifyReport) {
    let declared: u64 = manifest.chunks.iter().map(|c| c.plaintext_bytes).sum();
    if declared != manifest.dump_bytes {
        report.problems.push(format!(
            "the manifest's chunks hold {declared} bytes but it records a dump of {}",
            manifest.dump_bytes
        ));
    }
    if manifest.chunks.is_empty() {
        report.problems.push("the manifest names no chunk".into());
    }
    if manifest.globals.is_none() {
        report
            .problems
            .push("the manifest has no globals chunk (roles cannot be recreated)".into());
    }
    let positions = manifest
        .chunks_in_order()
        .into_iter()
        .map(|(index, chunk)| {
            let position = index.map_or_else(|| "globals".to_string(), |i| (i + 1).to_string());
            (position, chunk)
        });
    let checks = futures::stream::iter(positions)
        .map(|(position, chunk)| {
            let repository = repository.clone();
            async move {
                let checked = check_chunk(&repository, &chunk).await;
                (position, chunk, checked)
            }
        })
        .buffered(CHECKS_IN_FLIGHT);
    let mut checks = std::pin::pin!(checks);
    // The archive is recounted from the good chunks in order; after a bad
    // one it cannot be, and saying so once is enough.
    let mut scanner = Some(ArchiveScanner::new());
    while let Some((position, chunk, checked)) = checks.next().await {
        report.chunks_checked += 1;
        match checked {
            Ok(plaintext) => {
                report.bytes_checked += plaintext.len() as u64;
                if position != "globals"
                    && let Some(reading) = scanner.as_mut()
                    && let Err(error) = reading.feed(&plaintext)
                {
                    report
                        .problems
                        .push(format!("the dump is not a readable archive: {error}"));
                    scanner = None;
                }
            }
            Err(error) => {
                if position != "globals" {
                    scanner = None;
                }
                report.bad_chunks.push(BadChunk {
                    position,
                    id: chunk.id.to_hex(),
                    error,
                });
            }
        }
    }
    let Some(scanner) = scanner else {
        return;
    };
    match (scanner.finish(), &manifest.table_rows) {
        (Err(error), _) => report
            .problems
            .push(format!("the dump is not a whole archive: {error}")),
        (Ok(summary), Some(expected)) => {
            if summary.tables != *expected {
                report.problems.push(format!(
                    "the rows recounted in the dump ({} tables) differ from the manifest's ({} tables)",
                    summary.tables.len(),
                    expected.len()
                ));
            } else {
                report.tables_checked = expected.len() as u64;
            }
        }
        (Ok(summary), None) => {
            report.tables_checked = summary.tables.len() as u64;
        }
    }
}

/// Reads one chunk and opens it; the plaintext, or why not.
async fn check_chunk(
    repository: &Repository,
    chunk: &ManifestChunk,
) -> std::result::Result<Vec<u8>, String> {
    let sealed = repository
        .store
        .get(&ObjectKey::chunk(&chunk.id))
        .await
        .map_err(|e| e.to_string())?;
    if sealed.len() as u64 != chunk.sealed_bytes {
        return Err(format!(
            "{} bytes in the repository, {} in the manifest",
            sealed.len(),
            chunk.sealed_bytes
        ));
    }
    let keys = repository.keys().clone();
    let id = chunk.id;
    let (plaintext, hash) = tokio::task::spawn_blocking(move || open_chunk(&keys, &id, &sealed))
        .await
        .map_err(|e| format!("check: {e}"))?
        .map_err(|e| e.to_string())?;
    if chunk.hash.is_some_and(|listed| listed != hash) {
        return Err("its content hash is not the one the manifest lists".into());
    }
    if plaintext.len() as u64 != chunk.plaintext_bytes {
        return Err(format!(
            "{} plaintext bytes, {} in the manifest",
            plaintext.len(),
            chunk.plaintext_bytes
        ));
    }
    Ok(plaintext)
}
