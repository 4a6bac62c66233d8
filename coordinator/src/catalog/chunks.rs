//! The chunk index and the backups' references to chunks.
//!
//! - `chunks`: the dedup index, one row per chunk the repository holds (as
//!   far as the catalog knows): an upload skips a chunk listed here.
//! - `backup_chunks`: which chunks each complete backup needs, written with
//!   the backup's completion (or indexed later from its manifest), so that
//!   a check can walk the references in chunk order beside the storage
//!   listing, with no list of every chunk in memory.
//!
//! Pages are read by keyset (`WHERE id > ? ORDER BY id LIMIT ?`), never with
//! an OFFSET or an unbounded `IN (...)` list.

use std::collections::HashSet;

use sqlx::QueryBuilder;

use super::Catalog;
use crate::error::Result;

/// Rows per statement when writing many references at once (SQLite allows
/// 32,766 bound parameters).
const INSERT_BATCH: usize = 500;

impl Catalog {
    /// Up to `limit` chunk ids of the dedup index after `after`, in order.
    pub async fn indexed_chunks_after(&self, after: &str, limit: u32) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM chunks WHERE id > ? ORDER BY id LIMIT ?")
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Up to `limit` distinct chunk ids that complete backups reference,
    /// after `after`, in order.
    pub async fn referenced_chunks_after(&self, after: &str, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT chunk_id FROM backup_chunks WHERE chunk_id > ? ORDER BY chunk_id LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The backups that reference `chunk_id`.
    pub async fn backups_referencing(&self, chunk_id: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT backup_id FROM backup_chunks WHERE chunk_id = ? ORDER BY backup_id",
        )
        .bind(chunk_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Removes chunks from the dedup index, so the next backup that needs
    /// one uploads it again.
    pub async fn unindex_chunks(&self, ids: &[String]) -> Result<()> {
        for batch in ids.chunks(INSERT_BATCH) {
            let mut query = QueryBuilder::new("DELETE FROM chunks WHERE id IN (");
            let mut list = query.separated(", ");
            for id in batch {
                list.push_bind(id);
            }
            list.push_unseparated(")");
            query.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Complete backups whose references are not indexed yet (completed
    /// before the index existed, or rebuilt): up to `limit` ids after
    /// `after`.
    pub async fn backups_without_chunk_index(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM backups WHERE status = 'complete' AND chunks_indexed = 0 AND id > ?
             ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records which chunks a complete backup references.
    pub async fn index_backup_chunks(&self, backup_id: &str, chunk_ids: &[String]) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_references(&mut transaction, backup_id, chunk_ids).await?;
        sqlx::query("UPDATE backups SET chunks_indexed = 1 WHERE id = ?")
            .bind(backup_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Marks a backup damaged (a chunk it needs is missing or corrupt, or
    /// its manifest is unreadable), with the reason.
    pub async fn mark_backup_damaged(&self, backup_id: &str, damage: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE backups SET damaged_at = ?, damage = ? WHERE id = ?")
            .bind(now)
            .bind(damage)
            .bind(backup_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Clears the damage of backups a check found whole again (their
    /// chunks were uploaded again by later backups), returning their ids.
    pub async fn clear_damage_except(
        &self,
        still_damaged: &HashSet<String>,
    ) -> Result<Vec<String>> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let damaged: Vec<String> =
            sqlx::query_scalar("SELECT id FROM backups WHERE damaged_at IS NOT NULL ORDER BY id")
                .fetch_all(&mut *transaction)
                .await?;
        let mut repaired = Vec::new();
        for id in damaged {
            if still_damaged.contains(&id) {
                continue;
            }
            sqlx::query("UPDATE backups SET damaged_at = NULL, damage = '' WHERE id = ?")
                .bind(&id)
                .execute(&mut *transaction)
                .await?;
            repaired.push(id);
        }
        transaction.commit().await?;
        Ok(repaired)
    }
}

/// Inserts `backup_id`'s references to `chunk_ids` (duplicates ignored), in
/// batches, inside the caller's transaction.
pub(super) async fn insert_references(
    transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    backup_id: &str,
    chunk_ids: &[String],
) -> Result<()> {
    for batch in chunk_ids.chunks(INSERT_BATCH) {
        let mut query = QueryBuilder::new("INSERT INTO backup_chunks (backup_id, chunk_id) ");
        query.push_values(batch, |mut row, chunk_id| {
            row.push_bind(backup_id).push_bind(chunk_id);
        });
        query.push(" ON CONFLICT DO NOTHING");
        query.build().execute(&mut **transaction).await?;
    }
    Ok(())
}
