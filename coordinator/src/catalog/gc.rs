//! What garbage collection keeps in the catalog: the lease that lets one
//! collection run at a time (across coordinators too), its scratch list of
//! chunks pinned by manifests the reference index does not cover, and the
//! two-phase life of an unreferenced chunk: condemned by one run, marked
//! `deleting` and removed by a later one, each step a conditional update
//! that re-checks, inside its transaction, that no backup, running upload
//! or pinned manifest needs the chunk.

use sqlx::{QueryBuilder, Row};

use super::Catalog;
use crate::error::Result;

/// The conditions under which no one needs a chunk row (`chunks` aliased
/// as itself): no complete backup references it, no running upload
/// recorded it, no manifest outside the index names it.
/// (A macro, so that each statement is one static string.)
macro_rules! unneeded {
    () => {
        "NOT EXISTS (SELECT 1 FROM backup_chunks b WHERE b.chunk_id = chunks.id)
         AND NOT EXISTS (SELECT 1 FROM gc_pins p WHERE p.chunk_id = chunks.id)
         AND NOT EXISTS (SELECT 1 FROM upload_chunks u JOIN jobs j ON j.attempt_id = u.attempt_id
                         WHERE u.chunk_id = chunks.id AND j.status = 'running')"
    };
}

/// Rows per statement of an `IN` list.
const BATCH: usize = 500;

/// A chunk row as garbage collection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcChunk {
    pub id: String,
    pub sealed_bytes: u64,
    /// The newer of when it was stored and when an upload last reused it.
    pub last_used_at: i64,
    pub condemned_at: Option<i64>,
    pub deleting_at: Option<i64>,
    /// A complete backup, a running upload or a pinned manifest needs it.
    pub needed: bool,
}

/// A claimed collection: who holds the lease, and when the run before it
/// started (0: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcClaim {
    pub previous_started_at: i64,
}

impl Catalog {
    /// Claims the collection lease for `holder` until `expires_at`: only if
    /// no one holds it (or its holder let it expire: died), and with
    /// `due_before`, only if the last run started before then (the daily
    /// run, claimed by one coordinator). `None` if not claimed.
    pub async fn claim_gc_lease(
        &self,
        holder: &str,
        now: i64,
        expires_at: i64,
        due_before: Option<i64>,
    ) -> Result<Option<GcClaim>> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let previous: i64 = sqlx::query_scalar("SELECT last_started_at FROM gc_lease WHERE id = 1")
            .fetch_one(&mut *transaction)
            .await?;
        let claimed = sqlx::query(
            "UPDATE gc_lease SET holder = ?1, expires_at = ?2, last_started_at = ?3
             WHERE id = 1 AND (holder = '' OR expires_at < ?3) AND last_started_at < ?4",
        )
        .bind(holder)
        .bind(expires_at)
        .bind(now)
        .bind(due_before.unwrap_or(i64::MAX))
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        if claimed == 0 {
            return Ok(None);
        }
        transaction.commit().await?;
        Ok(Some(GcClaim {
            previous_started_at: previous,
        }))
    }

    /// Who holds the lease now, if anyone (and until when).
    pub async fn gc_lease_holder(&self, now: i64) -> Result<Option<(String, i64)>> {
        let row: (String, i64) =
            sqlx::query_as("SELECT holder, expires_at FROM gc_lease WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        Ok((!row.0.is_empty() && row.1 >= now).then_some(row))
    }

    /// Extends `holder`'s lease; false if it lost it (expired and taken).
    pub async fn renew_gc_lease(&self, holder: &str, expires_at: i64) -> Result<bool> {
        Ok(
            sqlx::query("UPDATE gc_lease SET expires_at = ? WHERE id = 1 AND holder = ?")
                .bind(expires_at)
                .bind(holder)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }

    /// Gives the lease back; with `finished`, the run went to its end.
    pub async fn release_gc_lease(&self, holder: &str, now: i64, finished: bool) -> Result<()> {
        sqlx::query(
            "UPDATE gc_lease SET holder = '', expires_at = 0,
                 last_finished_at = CASE WHEN ?3 THEN ?2 ELSE last_finished_at END
             WHERE id = 1 AND holder = ?1",
        )
        .bind(holder)
        .bind(now)
        .bind(finished)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Frees a lease held by a previous process of this coordinator (its
    /// holder names `node/`): one process per home, so that one is dead.
    pub async fn release_gc_lease_of_node(&self, node: &str) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE gc_lease SET holder = '', expires_at = 0
             WHERE id = 1 AND substr(holder, 1, length(?1) + 1) = ?1 || '/'",
        )
        .bind(node)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Empties the pinned-chunk list (a run starts it afresh).
    pub async fn clear_gc_pins(&self) -> Result<()> {
        sqlx::query("DELETE FROM gc_pins")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Pins chunks a manifest names for the rest of the run.
    pub async fn add_gc_pins(&self, chunk_ids: &[String]) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for batch in chunk_ids.chunks(BATCH) {
            let mut query = QueryBuilder::new("INSERT INTO gc_pins (chunk_id) ");
            query.push_values(batch, |mut row, id| {
                row.push_bind(id);
            });
            query.push(" ON CONFLICT DO NOTHING");
            query.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Which of `backup_ids` are complete backups whose references are in
    /// the index (their manifests need no reading).
    pub async fn indexed_complete_backups(&self, backup_ids: &[String]) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for batch in backup_ids.chunks(BATCH) {
            let mut query = QueryBuilder::new(
                "SELECT id FROM backups WHERE status = 'complete' AND chunks_indexed = 1 AND id IN (",
            );
            let mut list = query.separated(", ");
            for id in batch {
                list.push_bind(id);
            }
            list.push_unseparated(")");
            found.extend(
                query
                    .build_query_scalar::<String>()
                    .fetch_all(&self.pool)
                    .await?,
            );
        }
        Ok(found)
    }

    /// When the oldest running backup attempt started: anything stored or
    /// reused since may belong to it.
    pub async fn oldest_running_backup(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(coalesce(attempt_started_at, started_at, created_at)) FROM jobs
             WHERE status = 'running' AND kind = 'backup'",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// The rows of `ids` (those that have one) as collection sees them.
    pub async fn gc_chunks(&self, ids: &[String]) -> Result<Vec<GcChunk>> {
        let mut chunks = Vec::new();
        for batch in ids.chunks(BATCH) {
            let mut query = QueryBuilder::new(concat!(
                "SELECT id, sealed_bytes, max(stored_at, coalesce(used_at, 0)) AS last_used_at,
                     condemned_at, deleting_at, NOT (",
                unneeded!(),
                ") AS needed FROM chunks WHERE id IN ("
            ));
            let mut list = query.separated(", ");
            for id in batch {
                list.push_bind(id);
            }
            list.push_unseparated(")");
            for row in query.build().fetch_all(&self.pool).await? {
                chunks.push(GcChunk {
                    id: row.try_get("id")?,
                    sealed_bytes: u64::try_from(row.try_get::<i64, _>("sealed_bytes")?)
                        .unwrap_or(0),
                    last_used_at: row.try_get("last_used_at")?,
                    condemned_at: row.try_get("condemned_at")?,
                    deleting_at: row.try_get("deleting_at")?,
                    needed: row.try_get("needed")?,
                });
            }
        }
        Ok(chunks)
    }

    /// Condemns a chunk: only if nothing needs it, it is not condemned or
    /// being deleted already, and it was neither stored nor reused since
    /// `cutoff`. Whether it was.
    pub async fn condemn_unneeded_chunk(&self, id: &str, now: i64, cutoff: i64) -> Result<bool> {
        Ok(sqlx::query(concat!(
            "UPDATE chunks SET condemned_at = ?1
             WHERE id = ?2 AND condemned_at IS NULL AND deleting_at IS NULL
               AND max(stored_at, coalesce(used_at, 0)) < ?3 AND ",
            unneeded!()
        ))
        .bind(now)
        .bind(id)
        .bind(cutoff)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Starts deleting a chunk condemned before `condemned_before` (by an
    /// earlier run) and still unneeded: its row is marked, so no upload
    /// reuses it from here on. Whether it was; the caller then deletes
    /// the object and [`Catalog::forget_deleted_chunk`].
    pub async fn begin_chunk_deletion(
        &self,
        id: &str,
        now: i64,
        condemned_before: i64,
    ) -> Result<bool> {
        Ok(sqlx::query(concat!(
            "UPDATE chunks SET deleting_at = ?1
             WHERE id = ?2 AND condemned_at IS NOT NULL AND condemned_at < ?3
               AND deleting_at IS NULL AND ",
            unneeded!()
        ))
        .bind(now)
        .bind(id)
        .bind(condemned_before)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Claims an object without a row (an orphan) for deletion: a row
    /// marked `deleting` is inserted unless an upload recorded the chunk
    /// first. Whether it was.
    pub async fn claim_orphan_chunk(&self, id: &str, now: i64) -> Result<bool> {
        Ok(sqlx::query(
            "INSERT INTO chunks (id, sealed_bytes, plaintext_bytes, stored_at, condemned_at, deleting_at)
             VALUES (?1, 0, 0, ?2, ?2, ?2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Removes the row of a chunk whose object is deleted.
    pub async fn forget_deleted_chunk(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM chunks WHERE id = ? AND deleting_at IS NOT NULL")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Chunks revived since `since` (a dedup hit or a new backup's
    /// reference cleared their condemnation): how many, and their sealed
    /// bytes.
    pub async fn chunks_revived_since(&self, since: i64) -> Result<(u64, u64)> {
        let (count, bytes): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), sum(sealed_bytes) FROM chunks WHERE revived_at >= ?")
                .bind(since)
                .fetch_one(&self.pool)
                .await?;
        Ok((
            u64::try_from(count).unwrap_or(0),
            u64::try_from(bytes.unwrap_or(0)).unwrap_or(0),
        ))
    }
}
