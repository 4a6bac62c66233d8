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
//! A chunk indexed or referenced but absent from storage is **missing**: it
//! leaves the dedup index (so the next backup that has it uploads it
//! again) and every backup referencing it is marked **damaged** (never
//! offered as restorable). A stored chunk no backup references is
//! **unreferenced** (an upload in progress, or a failed one: garbage
//! collection's business). With `--read-data` every stored chunk is read
//! and authenticated; a **corrupt** one is treated as missing. A full
//! (`--read-data`) check that finds a damaged backup whole again, because
//! later backups uploaded its chunks again, clears its damage.
//!
//! A chunk that looks missing is looked up once more before anything
//! changes, so a backup completing during the check is not marked damaged.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use cairn_common::chunk::{ChunkId, open_chunk};
use serde::Serialize;

use crate::catalog::Catalog;
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::manifest::Manifest;
use crate::repository::{Listing, ObjectKey, Repository, RepositoryError};

/// Rows read from the catalog at a time.
const PAGE: u32 = 1000;
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
    /// Damaged backups and why.
    pub damaged_backups: BTreeMap<String, String>,
    /// Backups that were damaged and are whole again.
    pub repaired_backups: Vec<String>,
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
        self.missing.count == 0 && self.corrupt.count == 0 && self.damaged_backups.is_empty()
    }
}

/// A sorted list of chunk ids read page by page from the catalog.
struct CatalogCursor<'a> {
    catalog: &'a Catalog,
    referenced: bool,
    page: std::vec::IntoIter<String>,
    last: String,
    done: bool,
    head: Option<String>,
    count: u64,
}

impl<'a> CatalogCursor<'a> {
    async fn new(catalog: &'a Catalog, referenced: bool) -> Result<CatalogCursor<'a>> {
        let mut cursor = CatalogCursor {
            catalog,
            referenced,
            page: Vec::new().into_iter(),
            last: String::new(),
            done: false,
            head: None,
            count: 0,
        };
        cursor.advance().await?;
        Ok(cursor)
    }

    async fn advance(&mut self) -> Result<()> {
        loop {
            if let Some(id) = self.page.next() {
                self.last.clone_from(&id);
                self.count += 1;
                self.head = Some(id);
                return Ok(());
            }
            if self.done {
                self.head = None;
                return Ok(());
            }
            let page = if self.referenced {
                self.catalog
                    .referenced_chunks_after(&self.last, PAGE)
                    .await?
            } else {
                self.catalog.indexed_chunks_after(&self.last, PAGE).await?
            };
            self.done = page.len() < PAGE as usize;
            self.page = page.into_iter();
        }
    }
}

/// The storage listing of chunk objects, as chunk ids.
struct StoreCursor {
    listing: Listing,
    head: Option<String>,
    count: u64,
}

impl StoreCursor {
    async fn advance(&mut self) -> Result<()> {
        loop {
            let Some(key) = self.listing.next().await.map_err(storage)? else {
                self.head = None;
                return Ok(());
            };
            // chunks/ab/<64 hex>: anything else under chunks/ is not ours.
            if let Some(id) = chunk_id_of(&key) {
                self.count += 1;
                self.head = Some(id);
                return Ok(());
            }
        }
    }
}

fn chunk_id_of(key: &ObjectKey) -> Option<String> {
    let id = key.as_str().rsplit('/').next()?;
    let id = ChunkId::from_hex(id).ok()?;
    (ObjectKey::chunk(&id) == *key).then(|| id.to_hex())
}

fn storage(error: RepositoryError) -> CoordinatorError {
    CoordinatorError::Unavailable(format!("repository: {error}"))
}

/// Indexes the references of complete backups that have none yet, from
/// their manifests; a manifest that cannot be read damages its backup.
async fn index_unindexed_backups(
    catalog: &Catalog,
    repository: &Repository,
    report: &mut CheckReport,
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
                Err(error) => {
                    report
                        .damaged_backups
                        .insert(backup_id, format!("its manifest cannot be read: {error}"));
                }
            }
        }
    }
}

/// Reads and authenticates one stored chunk; its size, or why it is bad.
async fn read_chunk(repository: &Repository, id: &str) -> std::result::Result<u64, String> {
    let chunk_id = ChunkId::from_hex(id).map_err(|e| e.to_string())?;
    let sealed = repository
        .store
        .get(&ObjectKey::chunk(&chunk_id))
        .await
        .map_err(|e| e.to_string())?;
    let size = sealed.len() as u64;
    let keys = repository.keys().clone();
    tokio::task::spawn_blocking(move || open_chunk(&keys, &chunk_id, &sealed))
        .await
        .map_err(|e| format!("check: {e}"))?
        .map_err(|e| e.to_string())?;
    Ok(size)
}

/// Runs a check; see the module documentation.
pub async fn check_repository(
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    read_data: bool,
) -> Result<CheckReport> {
    let mut report = CheckReport {
        repository: repository.store.describe(),
        read_data,
        ..CheckReport::default()
    };
    index_unindexed_backups(&catalog, &repository, &mut report).await?;

    let mut stored = StoreCursor {
        listing: repository.store.list_streamed("chunks/"),
        head: None,
        count: 0,
    };
    stored.advance().await?;
    let mut indexed = CatalogCursor::new(&catalog, false).await?;
    let mut referenced = CatalogCursor::new(&catalog, true).await?;
    let mut to_unindex = Vec::new();

    while let Some(id) = [&stored.head, &indexed.head, &referenced.head]
        .into_iter()
        .flatten()
        .min()
        .cloned()
    {
        let in_store = stored.head.as_ref() == Some(&id);
        let in_index = indexed.head.as_ref() == Some(&id);
        let is_referenced = referenced.head.as_ref() == Some(&id);

        let mut bad: Option<(bool, String)> = None;
        if !in_store {
            // Looked up once more: the listing may predate an upload that
            // stored it since.
            let chunk_id = ChunkId::from_hex(&id).map_err(CoordinatorError::Common)?;
            if !repository
                .store
                .exists(&ObjectKey::chunk(&chunk_id))
                .await
                .map_err(storage)?
            {
                bad = Some((true, "not in the repository".to_string()));
            }
        } else if read_data {
            match read_chunk(&repository, &id).await {
                Ok(size) => report.bytes_read += size,
                Err(reason) => bad = Some((false, reason)),
            }
        }
        match bad {
            Some((missing, reason)) => {
                if missing {
                    report.missing.add(&id, reason.clone());
                } else {
                    report.corrupt.add(&id, reason.clone());
                }
                if in_index {
                    to_unindex.push(id.clone());
                }
                if is_referenced {
                    for backup_id in catalog.backups_referencing(&id).await? {
                        report
                            .damaged_backups
                            .entry(backup_id)
                            .or_insert_with(|| format!("chunk {id} is {}", describe(missing)));
                    }
                }
            }
            None if in_store && !is_referenced => {
                report
                    .unreferenced
                    .add(&id, "no complete backup references it");
            }
            None => {}
        }
        if to_unindex.len() >= PAGE as usize {
            report.unindexed_chunks += to_unindex.len() as u64;
            catalog.unindex_chunks(&to_unindex).await?;
            to_unindex.clear();
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
    report.unindexed_chunks += to_unindex.len() as u64;
    catalog.unindex_chunks(&to_unindex).await?;
    report.stored_chunks = stored.count;
    report.indexed_chunks = indexed.count;
    report.referenced_chunks = referenced.count;

    let now = now_ms();
    for (backup_id, damage) in &report.damaged_backups {
        catalog.mark_backup_damaged(backup_id, damage, now).await?;
    }
    if read_data {
        let still_damaged: HashSet<String> = report.damaged_backups.keys().cloned().collect();
        report.repaired_backups = catalog.clear_damage_except(&still_damaged).await?;
    }
    Ok(report)
}

fn describe(missing: bool) -> &'static str {
    if missing { "missing" } else { "corrupt" }
}
