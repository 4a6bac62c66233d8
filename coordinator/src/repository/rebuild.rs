//! `cairn repository rebuild-catalog`: the repository is self-describing,
//! so with only the store and any key that has a slot there (the master
//! key, or a recovery key from `cairn keys add`) an empty catalog gets back
//! every backup whose manifest opens. A manifest that does not authenticate
//! is reported and skipped, never trusted. Then the same pass as
//! `cairn repository check` runs: a chunk a manifest names that the
//! repository lacks stays out of the dedup index (the next backup uploads
//! it again) and the backups that need it are marked damaged.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use cairn_common::crypto::SecretKey;
use serde::Serialize;

use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{BackupStats, Catalog};
use crate::clock::now_ms;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::repository::manifest::Manifest;

#[derive(Debug, Serialize)]
pub struct RebuildReport {
    pub repository: String,
    pub backups: u64,
    pub chunks: u64,
    /// Manifests that could not be read or authenticated.
    pub problems: Vec<String>,
    /// Chunks manifests name that the repository lacks.
    pub missing_chunks: u64,
    /// Backups that need a missing chunk, and why.
    pub damaged_backups: BTreeMap<String, String>,
}

const ACTOR: &str = "cairn repository rebuild-catalog";

/// Rebuilds the catalog of `config` from its repository, opened with the
/// master key file of `config`, or with `recovery_key` (any key with a slot
/// there, such as one `cairn keys add` wrote) when given.
pub async fn rebuild_catalog(
    config: &CoordinatorConfig,
    recovery_key: Option<&SecretKey>,
) -> Result<RebuildReport> {
    // Offline only: refused while `cairn serve` (or another rebuild) runs
    // on this home.
    crate::repository::keys::lock_key_file(&config.keys.master_key_file)?;
    let catalog = Catalog::open_sqlite(&config.catalog.sqlite_path).await?;
    if catalog.count_backups().await? > 0 {
        return Err(CoordinatorError::Conflict(format!(
            "the catalog {} already holds backups: rebuild only into an empty catalog (move it aside first)",
            config.catalog.sqlite_path.display()
        )));
    }
    let repository = match recovery_key {
        // Any slot's key opens the repository; the home's own key file
        // and the repository's slots are left as they are.
        Some(key) => crate::repository::Repository::open(config.open_store()?, key)
            .await
            .map_err(|e| CoordinatorError::Unavailable(format!("repository: {e}")))?,
        None => {
            crate::repository::keys::open_repository(
                config.open_store()?,
                &config.keys.master_key_file,
                &catalog,
                ACTOR,
            )
            .await?
        }
    };
    let storage = |e: crate::repository::RepositoryError| {
        CoordinatorError::Unavailable(format!("repository: {e}"))
    };
    let mut manifests = Vec::new();
    let mut problems = Vec::new();
    for key in repository.store.list("manifests/").await.map_err(storage)? {
        let Some(backup_id) = key.as_str().strip_prefix("manifests/") else {
            continue;
        };
        match Manifest::load(&repository, backup_id).await {
            Ok(manifest) => manifests.push(manifest),
            Err(error) => problems.push(format!("{key}: {error}")),
        }
    }
    manifests.sort_by_key(|m| (m.started_at, m.backup_id.clone()));
    let mut seen = HashSet::new();
    let now = now_ms();
    for manifest in &manifests {
        let mut stats = BackupStats {
            server_version: manifest.server_version.clone(),
            pg_dump_version: manifest.pg_dump_version.clone(),
            logical_bytes: manifest.dump_bytes,
            database_bytes: manifest.database_bytes,
            ..BackupStats::default()
        };
        for chunk in manifest.chunks.iter().chain(manifest.globals.iter()) {
            stats.referenced_bytes += chunk.sealed_bytes;
            stats.chunk_count += 1;
            if seen.insert(chunk.id) {
                stats.new_stored_bytes += chunk.sealed_bytes;
                stats.new_chunk_count += 1;
                catalog
                    .insert_chunk(
                        &chunk.id.to_hex(),
                        chunk.sealed_bytes,
                        chunk.plaintext_bytes,
                        now,
                    )
                    .await?;
            }
        }
        catalog.insert_rebuilt_backup(manifest, &stats).await?;
        catalog
            .index_backup_chunks(&manifest.backup_id, &manifest.referenced_chunk_ids())
            .await?;
    }
    let catalog = Arc::new(catalog);
    let check =
        crate::repository::check::check_repository(catalog.clone(), Arc::new(repository), false)
            .await?;
    let report = RebuildReport {
        repository: check.repository,
        backups: manifests.len() as u64,
        chunks: (seen.len() as u64).saturating_sub(check.unindexed_chunks),
        problems,
        missing_chunks: check.missing.count,
        damaged_backups: check.damaged_backups.into_iter().collect(),
    };
    catalog
        .append_audit(&AuditEvent::new(
            ACTOR,
            "catalog.rebuild",
            report.repository.clone(),
            if report.problems.is_empty() && report.damaged_backups.is_empty() {
                Outcome::Success
            } else {
                Outcome::Failed
            },
            format!(
                "{} backups, {} chunks, {} unreadable manifests, {} missing chunks, {} damaged backups",
                report.backups,
                report.chunks,
                report.problems.len(),
                report.missing_chunks,
                report.damaged_backups.len()
            ),
        ))
        .await?;
    catalog.close().await;
    Ok(report)
}
