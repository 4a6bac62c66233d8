//! The sweep: the storage listing of `chunks/` merged with the sorted
//! references of complete backups, the unreferenced chunks looked up a
//! page at a time, each condemned, deleted or left as its row says (see
//! the module documentation of `gc`).

use std::collections::HashMap;

use cairn_common::chunk::ChunkId;

use super::{GcReport, Lease};
use crate::catalog::{Catalog, GcChunk};
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::repository::walk::{CatalogCursor, PAGE, StoreCursor, storage};
use crate::repository::{ObjectKey, Repository};

/// Listed chunks between two progress lines in the log.
const PROGRESS_EVERY: u64 = 100_000;

/// What one run sweeps by.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    /// When the run started: a chunk condemned before was condemned by an
    /// earlier run.
    pub started_at: i64,
    pub cutoff_ms: i64,
    pub dry_run: bool,
}

pub(super) async fn sweep(
    catalog: &Catalog,
    repository: &Repository,
    lease: &Lease<'_>,
    run: Run,
    report: &mut GcReport,
) -> Result<()> {
    let mut stored = StoreCursor::new(repository.store.list_streamed("chunks/")).await?;
    let mut referenced = CatalogCursor::new(catalog, true).await?;
    let mut unreferenced: Vec<String> = Vec::new();
    while let Some(id) = stored.head.clone() {
        while referenced.head.as_ref().is_some_and(|head| *head < id) {
            referenced.advance().await?;
        }
        if referenced.head.as_ref() == Some(&id) {
            report.referenced_chunks += 1;
        } else {
            unreferenced.push(id);
        }
        if unreferenced.len() >= PAGE as usize {
            sweep_page(catalog, repository, run, &unreferenced, report).await?;
            unreferenced.clear();
            lease.renew().await?;
        }
        stored.advance().await?;
        if stored.count % PROGRESS_EVERY == 0 {
            tracing::info!(
                listed = stored.count,
                condemned = report.condemned.chunks,
                freed = report.freed.chunks,
                "garbage collection in progress"
            );
        }
    }
    sweep_page(catalog, repository, run, &unreferenced, report).await?;
    report.stored_chunks = stored.count;
    Ok(())
}

/// Decides the fate of a page of unreferenced stored chunks.
async fn sweep_page(
    catalog: &Catalog,
    repository: &Repository,
    run: Run,
    ids: &[String],
    report: &mut GcReport,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let rows: HashMap<String, GcChunk> = catalog
        .gc_chunks(ids)
        .await?
        .into_iter()
        .map(|row| (row.id.clone(), row))
        .collect();
    for id in ids {
        let key = ObjectKey::chunk(&ChunkId::from_hex(id).map_err(CoordinatorError::Common)?);
        let Some(row) = rows.get(id) else {
            sweep_orphan(catalog, repository, run, id, &key, report).await?;
            continue;
        };
        if row.deleting_at.is_some() {
            // A deletion an earlier run began and did not finish.
            if !run.dry_run {
                delete(catalog, repository, id, &key).await?;
            }
            report.freed.add(row.sealed_bytes);
        } else if row.needed {
            report.pinned_chunks += 1;
        } else if let Some(condemned_at) = row.condemned_at {
            if condemned_at >= run.started_at {
                continue;
            }
            if run.dry_run {
                report.freed.add(row.sealed_bytes);
            } else if catalog
                .begin_chunk_deletion(id, now_ms(), run.started_at)
                .await?
            {
                delete(catalog, repository, id, &key).await?;
                report.freed.add(row.sealed_bytes);
            }
        } else if row.last_used_at >= run.cutoff_ms {
            report.recent_chunks += 1;
        } else if run.dry_run
            || catalog
                .condemn_unneeded_chunk(id, now_ms(), run.cutoff_ms)
                .await?
        {
            report.condemned.add(row.sealed_bytes);
        }
    }
    Ok(())
}

/// An object without a catalog row: deleted if it was written before the
/// cutoff (an upload writing it now has no row yet either).
async fn sweep_orphan(
    catalog: &Catalog,
    repository: &Repository,
    run: Run,
    id: &str,
    key: &ObjectKey,
    report: &mut GcReport,
) -> Result<()> {
    let Some(stat) = repository.store.stat(key).await.map_err(storage)? else {
        return Ok(());
    };
    if stat.modified_ms >= run.cutoff_ms {
        report.recent_chunks += 1;
        return Ok(());
    }
    if run.dry_run {
        report.orphans_freed.add(stat.bytes);
    } else if catalog.claim_orphan_chunk(id, now_ms()).await? {
        delete(catalog, repository, id, key).await?;
        report.orphans_freed.add(stat.bytes);
    }
    Ok(())
}

/// Deletes a chunk whose row is marked `deleting`: the object, then the
/// row. A storage failure stops the run with the row still marked; the
/// next run finishes the deletion.
async fn delete(
    catalog: &Catalog,
    repository: &Repository,
    id: &str,
    key: &ObjectKey,
) -> Result<()> {
    repository.store.delete(key).await.map_err(storage)?;
    catalog.forget_deleted_chunk(id).await
}
