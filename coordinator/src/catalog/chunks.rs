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

    /// Takes chunks found missing or corrupt out of the dedup index (so the
    /// next backup that has one uploads it again) and marks every complete
    /// backup referencing one damaged, in one transaction: a backup that
    /// completes later finds the chunk unindexed and fails instead.
    /// Returns how many backups were newly marked.
    pub async fn condemn_chunks(&self, chunks: &[(String, String)], now: i64) -> Result<u64> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut marked = 0;
        for (chunk_id, reason) in chunks {
            sqlx::query("DELETE FROM chunks WHERE id = ?")
                .bind(chunk_id)
                .execute(&mut *transaction)
                .await?;
            marked += sqlx::query(
                "UPDATE backups SET damaged_at = ?1,
                     damage = CASE WHEN damaged_at IS NULL THEN ?2 ELSE damage END
                 WHERE status = 'complete'
                   AND id IN (SELECT backup_id FROM backup_chunks WHERE chunk_id = ?3)",
            )
            .bind(now)
            .bind(reason)
            .bind(chunk_id)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        }
        transaction.commit().await?;
        Ok(marked)
    }

    /// Up to `limit` listed backup ids after `after`, in order. A backup
    /// retention is deleting is left out: its manifest goes before its row.
    pub async fn complete_backups_after(&self, after: &str, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM backups WHERE status = 'complete' AND deleting_at IS NULL AND id > ?
             ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The damaged complete backups (the first `limit`, by id, with what
    /// is wrong) and how many there are.
    pub async fn damaged_backups(&self, limit: u32) -> Result<(Vec<(String, String)>, u64)> {
        let first = sqlx::query_as(
            "SELECT id, damage FROM backups WHERE status = 'complete' AND damaged_at IS NOT NULL
             ORDER BY id LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM backups WHERE status = 'complete' AND damaged_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((first, u64::try_from(count).unwrap_or(0)))
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
            "SELECT id FROM backups WHERE status = 'complete' AND chunks_indexed = 0
               AND deleting_at IS NULL AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records which chunks a complete backup references (reviving any
    /// that garbage collection condemned).
    pub async fn index_backup_chunks(&self, backup_id: &str, chunk_ids: &[String]) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_references(&mut transaction, backup_id, chunk_ids).await?;
        revive(&mut transaction, chunk_ids, crate::clock::now_ms()).await?;
        sqlx::query("UPDATE backups SET chunks_indexed = 1 WHERE id = ?")
            .bind(backup_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Marks a backup damaged (its manifest is missing or unreadable), with
    /// the reason.
    pub async fn mark_backup_damaged(&self, backup_id: &str, damage: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE backups SET damaged_at = ?,
                 damage = CASE WHEN damaged_at IS NULL THEN ? ELSE damage END
             WHERE id = ?",
        )
        .bind(now)
        .bind(damage)
        .bind(backup_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Clears the damage marks older than `before` (set by earlier checks
    /// and not confirmed by the one that started at `before`): those
    /// backups are whole again. Returns how many.
    pub async fn clear_damage_before(&self, before: i64) -> Result<u64> {
        Ok(
            sqlx::query("UPDATE backups SET damaged_at = NULL, damage = '' WHERE damaged_at < ?")
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

/// How many of `chunk_ids` the dedup index lacks, inside the caller's
/// transaction (in batches: a bounded `IN` list each).
pub(super) async fn count_unindexed(
    transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    chunk_ids: &[String],
) -> Result<u64> {
    let mut missing = 0;
    for batch in chunk_ids.chunks(INSERT_BATCH) {
        // A chunk garbage collection is deleting is as good as gone.
        let mut query =
            QueryBuilder::new("SELECT count(*) FROM chunks WHERE deleting_at IS NULL AND id IN (");
        let mut list = query.separated(", ");
        for id in batch {
            list.push_bind(id);
        }
        list.push_unseparated(")");
        let found: i64 = query
            .build_query_scalar()
            .fetch_one(&mut **transaction)
            .await?;
        missing += batch.len() as u64 - u64::try_from(found).unwrap_or(0);
    }
    Ok(missing)
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

/// Clears garbage collection's condemnation of `chunk_ids` (a backup
/// references them now), inside the caller's transaction, in batches.
pub(super) async fn revive(
    transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    chunk_ids: &[String],
    now: i64,
) -> Result<()> {
    for batch in chunk_ids.chunks(INSERT_BATCH) {
        let mut query = QueryBuilder::new("UPDATE chunks SET condemned_at = NULL, revived_at = ");
        query.push_bind(now);
        query.push(" WHERE condemned_at IS NOT NULL AND id IN (");
        let mut list = query.separated(", ");
        for id in batch {
            list.push_bind(id);
        }
        list.push_unseparated(")");
        query.build().execute(&mut **transaction).await?;
    }
    Ok(())
}
