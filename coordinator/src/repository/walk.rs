//! Sorted walks shared by `repository check` and garbage collection: the
//! storage listing of `chunks/` and the catalog's chunk lists, each read a
//! page at a time in increasing id order, so that they can be merged side
//! by side in constant memory whatever the repository's size.

use cairn_common::chunk::ChunkId;

use crate::catalog::Catalog;
use crate::error::{CoordinatorError, Result};
use crate::repository::{Listing, ObjectKey, RepositoryError};

/// Rows read from the catalog at a time.
pub(crate) const PAGE: u32 = 1000;

/// A sorted list of chunk ids read page by page from the catalog.
pub(crate) struct CatalogCursor<'a> {
    catalog: &'a Catalog,
    referenced: bool,
    page: std::vec::IntoIter<String>,
    last: String,
    done: bool,
    pub(crate) head: Option<String>,
    pub(crate) count: u64,
}

impl<'a> CatalogCursor<'a> {
    pub(crate) async fn new(catalog: &'a Catalog, referenced: bool) -> Result<CatalogCursor<'a>> {
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

    pub(crate) async fn advance(&mut self) -> Result<()> {
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
pub(crate) struct StoreCursor {
    listing: Listing,
    pub(crate) head: Option<String>,
    pub(crate) count: u64,
}

impl StoreCursor {
    /// A cursor at the listing's first chunk.
    pub(crate) async fn new(listing: Listing) -> Result<StoreCursor> {
        let mut cursor = StoreCursor {
            listing,
            head: None,
            count: 0,
        };
        cursor.advance().await?;
        Ok(cursor)
    }

    pub(crate) async fn advance(&mut self) -> Result<()> {
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

pub(crate) fn chunk_id_of(key: &ObjectKey) -> Option<String> {
    let id = key.as_str().rsplit('/').next()?;
    let id = ChunkId::from_hex(id).ok()?;
    (ObjectKey::chunk(&id) == *key).then(|| id.to_hex())
}

pub(crate) fn storage(error: RepositoryError) -> CoordinatorError {
    CoordinatorError::Unavailable(format!("repository: {error}"))
}
