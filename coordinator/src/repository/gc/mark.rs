//! The mark phase's one reading of storage: the manifests the reference
//! index does not cover (a backup completing now, one completed before
//! the index existed, or one whose catalog row is gone) are read and
//! authenticated, and their chunks pinned in the catalog (`gc_pins`) for
//! the run. Everything else needed is already in the catalog: the index
//! of complete backups' references and the running uploads' chunks.

use std::collections::HashSet;

use super::{GcReport, Lease};
use crate::catalog::Catalog;
use crate::error::{CoordinatorError, Result};
use crate::repository::check::next_manifest;
use crate::repository::manifest::Manifest;
use crate::repository::walk::{PAGE, storage};
use crate::repository::{Repository, RepositoryError};

/// Pins the chunks of every listed manifest that is not a complete,
/// indexed backup's. A manifest that cannot be read stops the run: its
/// chunks are unknown, and deleting one could break a backup.
pub(super) async fn pin_unindexed_manifests(
    catalog: &Catalog,
    repository: &Repository,
    lease: &Lease<'_>,
    report: &mut GcReport,
) -> Result<()> {
    catalog.clear_gc_pins().await?;
    let mut listing = repository.store.list_streamed("manifests/");
    let mut page = Vec::new();
    loop {
        let listed = next_manifest(&mut listing).await?;
        if let Some(id) = listed.as_ref() {
            page.push(id.clone());
        }
        if page.len() >= PAGE as usize || (listed.is_none() && !page.is_empty()) {
            let indexed: HashSet<String> = catalog
                .indexed_complete_backups(&page)
                .await?
                .into_iter()
                .collect();
            for backup_id in page.drain(..).filter(|id| !indexed.contains(id)) {
                match Manifest::load(repository, &backup_id).await {
                    Ok(manifest) => {
                        catalog
                            .add_gc_pins(&manifest.referenced_chunk_ids())
                            .await?;
                        report.manifests_read += 1;
                    }
                    // Deleted since the listing (retention): it needs nothing.
                    Err(RepositoryError::NotFound(_)) => {}
                    Err(error @ (RepositoryError::Invalid(_) | RepositoryError::Keys(_))) => {
                        return Err(CoordinatorError::Conflict(format!(
                            "garbage collection stops: manifest {backup_id} cannot be read \
                             ({error}), so the chunks it names are unknown; run `cairn \
                             repository check` and remove or repair it"
                        )));
                    }
                    Err(error) => return Err(storage(error)),
                }
            }
            lease.renew().await?;
        }
        if listed.is_none() {
            return Ok(());
        }
    }
}
