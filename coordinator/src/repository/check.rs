//! `cairn repository check`: the catalog held against the repository.
//!
//! The dedup index (`chunks`) is trusted by every upload: a chunk listed
//! there is never uploaded again, so one lost object would silently break
//! every later backup that reuses it. The check walks three sorted lists
//! side by side, in constant memory whatever the repository's size:
//!
//! - the storage listing of `chunks/` (streamed page by page),
//! - the dedup index,
//! - the chunks complete backups reference (`backup_chunks`; backups
//!   completed before that index existed are indexed from their manifests
//!   first).
//!
//! A chunk indexed or referenced but absent from storage is **missing**: in
//! one transaction it leaves the dedup index (so the next backup that has
//! it uploads it again) and every backup referencing it is marked
//! **damaged** (never offered as restorable); a backup that completes after
//! that finds the chunk unindexed and fails rather than be listed whole. A
//! stored chunk no backup references is **unreferenced** (an upload in
//! progress, or a failed one: garbage collection's business). With
//! `--read-data` every stored chunk is read and authenticated; a **corrupt**
//! one is treated as missing. The manifests are held against the complete
//! backups the same way: a backup whose manifest is gone is damaged. A
//! storage error that says nothing about the object (a timeout, a refused
//! request) stops the check instead of condemning anything.
//!
//! A chunk that looks missing is looked up once more before anything
//! changes, so an upload that stored it after the listing passed is not
//! condemned. One check runs at a time; a full (`--read-data`) check clears
//! the damage marks of earlier checks that it did not confirm: those
//! backups are whole again (their chunks were uploaded again). The report
//! counts every damaged backup in the catalog, not only those this check
//! marked, so it is never "ok" while one is.

use std::sync::Arc;

use cairn_common::chunk::{ChunkId, open_chunk};
use serde::Serialize;

use crate::catalog::Catalog;
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::repository::manifest::Manifest;
use crate::repository::walk::{CatalogCursor, StoreCursor, storage};
use crate::repository::{Listing, ObjectKey, Repository, RepositoryError};

use crate::repository::walk::PAGE;
/// Chunks condemned in one transaction.
const CONDEMN_BATCH: usize = 100;
/// Names listed per kind of problem; the counts are always whole.
pub const NAMES_LISTED_MAX: usize = 100;

/// What a check found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckReport {
    /// Where the repository is.
    pub repository: String,
    /// Whether every stored chunk was read and authenticated.
    pub read_data: bool,
    /// Chunk objects in storage.
    pub stored_chunks: u64,
    /// Chunks in the dedup index before the check.
    pub indexed_chunks: u64,
    /// Distinct chunks that complete backups reference.
    pub referenced_chunks: u64,
    /// Backups whose references were indexed from their manifests now.
    pub manifests_indexed: u64,
    pub missing: Problems,
    pub corrupt: Problems,
    pub unreferenced: Problems,
    /// Chunks removed from the dedup index (missing or corrupt).
    pub unindexed_chunks: u64,
    /// Complete backups whose manifest is not in the repository.
    pub missing_manifests: Problems,
    /// Manifests no complete backup lists (an upload finishing, or a
    /// backup the catalog lost: `rebuild-catalog` lists them).
    pub unlisted_manifests: u64,
    /// Every damaged backup in the catalog (the first
    /// [`NAMES_LISTED_MAX`]), and why.
    pub damaged_backups: Vec<(String, String)>,
    pub damaged_count: u64,
    /// Backups whose damage marks a full check cleared.
    pub repaired_backups: u64,
    /// Bytes read with `--read-data`.
    pub bytes_read: u64,
}

/// One kind of problem: how many, and the first names (with a reason).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Problems {
    pub count: u64,
    pub first: Vec<(String, String)>,
}

impl Problems {
    fn add(&mut self, id: &str, reason: impl Into<String>) {
        self.count += 1;
        if self.first.len() < NAMES_LISTED_MAX {
            self.first.push((id.to_string(), reason.into()));
        }
    }
}

impl CheckReport {
    /// Whether every backup the catalog lists is restorable.
    pub fn ok(&self) -> bool {
        self.missing.count == 0
            && self.corrupt.count == 0
            && self.missing_manifests.count == 0
            && self.damaged_count == 0
    }
}

/// Whether a storage error says the object itself is absent or bad (its
/// backups are damaged) rather than that the storage could not answer (the
/// check stops: nothing is condemned on a timeout).
fn condemns(error: &RepositoryError) -> bool {
    matches!(
        error,
        RepositoryError::NotFound(_) | RepositoryError::Invalid(_) | RepositoryError::Keys(_)
    )
}

/// Indexes the references of complete backups that have none yet, from
/// their manifests; a manifest that is missing or does not open damages
/// its backup.
async fn index_unindexed_backups(
    catalog: &Catalog,
    repository: &Repository,
    report: &mut CheckReport,
    now: i64,
) -> Result<()> {
    let mut after = String::new();
    loop {
        let ids = catalog.backups_without_chunk_index(&after, PAGE).await?;
        let Some(last) = ids.last() else {
            return Ok(());
        };
        after.clone_from(last);
        for backup_id in ids {
            match Manifest::load(repository, &backup_id).await {
                Ok(manifest) => {
                    catalog
                        .index_backup_chunks(&backup_id, &manifest.referenced_chunk_ids())
                        .await?;
                    report.manifests_indexed += 1;
                }
                Err(error) if condemns(&error) => {
                    let reason = format!("its manifest cannot be read: {error}");
                    catalog
                        .mark_backup_damaged(&backup_id, &reason, now)
                        .await?;
                    report.missing_manifests.add(&backup_id, reason);
                }
                Err(error) => return Err(storage(error)),
            }
        }
    }
}

/// Holds the `manifests/` listing against the complete backups (both
/// sorted by backup id); a backup without its manifest is damaged.
async fn check_manifests(
    catalog: &Catalog,
    repository: &Repository,
    report: &mut CheckReport,
    now: i64,
) -> Result<()> {
    let mut listing = repository.store.list_streamed("manifests/");
    let mut listed = next_manifest(&mut listing).await?;
    let mut after = String::new();
    loop {
        let backups = catalog.complete_backups_after(&after, PAGE).await?;
        for backup_id in &backups {
            while listed.as_ref().is_some_and(|id| id < backup_id) {
                report.unlisted_manifests += 1;
                listed = next_manifest(&mut listing).await?;
            }
            if listed.as_ref() == Some(backup_id) {
                listed = next_manifest(&mut listing).await?;
                continue;
            }
            // Looked up once more: the listing may predate its upload.
            let key = Manifest::key(backup_id).map_err(storage)?;
            if !repository.store.exists(&key).await.map_err(storage)? {
                let reason = "its manifest is not in the repository".to_string();
                catalog.mark_backup_damaged(backup_id, &reason, now).await?;
                report.missing_manifests.add(backup_id, reason);
            }
        }
        match backups.last() {
            Some(last) if backups.len() == PAGE as usize => after.clone_from(last),
            _ => break,
        }
    }
    while listed.is_some() {
        report.unlisted_manifests += 1;
        listed = next_manifest(&mut listing).await?;
    }
    Ok(())
}

/// The next backup id the manifest listing names.
pub(crate) async fn next_manifest(listing: &mut Listing) -> Result<Option<String>> {
    while let Some(key) = listing.next().await.map_err(storage)? {
        if let Some(id) = key.as_str().strip_prefix("manifests/")
            && !id.contains('/')
        {
            return Ok(Some(id.to_string()));
        }
    }
    Ok(None)
}

/// What reading one stored chunk found.
enum ChunkRead {
    Good(u64),
    /// Gone since the listing.
    Missing(String),
    /// Does not authenticate, decompress or hash to its name.
    Corrupt(String),
}

/// Reads and authenticates one stored chunk. A storage error that is not
/// "no such object" stops the check.
async fn read_chunk(repository: &Repository, id: &str) -> Result<ChunkRead> {
    let chunk_id = ChunkId::from_hex(id).map_err(CoordinatorError::Common)?;
    let sealed = match repository.store.get(&ObjectKey::chunk(&chunk_id)).await {
        Ok(sealed) => sealed,
        Err(RepositoryError::NotFound(_)) => {
            return Ok(ChunkRead::Missing("not in the repository".to_string()));
        }
        Err(error) => return Err(storage(error)),
    };
    let size = sealed.len() as u64;
    let keys = repository.keys().clone();
    let opened = tokio::task::spawn_blocking(move || open_chunk(&keys, &chunk_id, &sealed))
        .await
        .map_err(|e| CoordinatorError::Internal(format!("chunk check: {e}")))?;
    Ok(match opened {
        Ok(_) => ChunkRead::Good(size),
        Err(error) => ChunkRead::Corrupt(error.to_string()),
    })
}

/// One check at a time: two would race on the damage marks.
static RUNNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a check; see the module documentation.
pub async fn check_repository(
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    read_data: bool,
) -> Result<CheckReport> {
    let Ok(_running) = RUNNING.try_lock() else {
        return Err(CoordinatorError::Conflict(
            "a repository check is in progress: wait for it to finish".to_string(),
        ));
    };
    let started = now_ms();
    let mut report = CheckReport {
        repository: repository.store.describe(),
        read_data,
        ..CheckReport::default()
    };
    index_unindexed_backups(&catalog, &repository, &mut report, started).await?;
    check_manifests(&catalog, &repository, &mut report, started).await?;

    let mut stored = StoreCursor::new(repository.store.list_streamed("chunks/")).await?;
    let mut indexed = CatalogCursor::new(&catalog, false).await?;
    let mut referenced = CatalogCursor::new(&catalog, true).await?;
    // Chunks to condemn, with why; condemned a batch at a time, each batch
    // in one transaction, so a check stopped halfway leaves no chunk
    // unindexed without its backups marked.
    let mut condemned: Vec<(String, String)> = Vec::new();

    while let Some(id) = [&stored.head, &indexed.head, &referenced.head]
        .into_iter()
        .flatten()
        .min()
        .cloned()
    {
        let in_store = stored.head.as_ref() == Some(&id);
        let in_index = indexed.head.as_ref() == Some(&id);
        let is_referenced = referenced.head.as_ref() == Some(&id);

        let found = if !in_store {
            // Looked up once more: the listing may predate an upload that
            // stored it since.
            let chunk_id = ChunkId::from_hex(&id).map_err(CoordinatorError::Common)?;
            if repository
                .store
                .exists(&ObjectKey::chunk(&chunk_id))
                .await
                .map_err(storage)?
            {
                ChunkRead::Good(0)
            } else {
                ChunkRead::Missing("not in the repository".to_string())
            }
        } else if read_data {
            read_chunk(&repository, &id).await?
        } else {
            ChunkRead::Good(0)
        };
        match found {
            ChunkRead::Good(size) => {
                report.bytes_read += size;
                if in_store && !is_referenced {
                    report
                        .unreferenced
                        .add(&id, "no complete backup references it");
                }
            }
            ChunkRead::Missing(reason) => {
                report.missing.add(&id, reason);
                condemned.push((id.clone(), format!("chunk {id} is missing")));
            }
            ChunkRead::Corrupt(reason) => {
                report.corrupt.add(&id, reason.clone());
                condemned.push((id.clone(), format!("chunk {id} is corrupt: {reason}")));
            }
        }
        if in_index && condemned.last().is_some_and(|(last, _)| *last == id) {
            report.unindexed_chunks += 1;
        }
        if condemned.len() >= CONDEMN_BATCH {
            catalog.condemn_chunks(&condemned, now_ms()).await?;
            condemned.clear();
        }
        if in_store {
            stored.advance().await?;
        }
        if in_index {
            indexed.advance().await?;
        }
        if is_referenced {
            referenced.advance().await?;
        }
    }
    catalog.condemn_chunks(&condemned, now_ms()).await?;
    report.stored_chunks = stored.count;
    report.indexed_chunks = indexed.count;
    report.referenced_chunks = referenced.count;

    if read_data {
        report.repaired_backups = catalog.clear_damage_before(started).await?;
    }
    let (damaged, damaged_count) = catalog.damaged_backups(NAMES_LISTED_MAX as u32).await?;
    report.damaged_backups = damaged;
    report.damaged_count = damaged_count;
    Ok(report)
}
