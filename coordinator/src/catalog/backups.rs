//! Jobs, backups and stored chunks.
//!
//! A backup row exists from the moment its job starts, but only a row with
//! status `complete` is ever listed, and it becomes complete only after the
//! manifest is durable in the repository. The `chunks` table mirrors which
//! chunks the repository holds, so that an agent uploads only what is
//! missing and a retried backup resumes; the repository stays the source of
//! truth (see `cairn repository rebuild-catalog`).

use std::collections::{BTreeMap, HashMap};

use sqlx::FromRow;

use super::Catalog;
use crate::error::{CoordinatorError, Result};
use crate::repository::manifest::Manifest;

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct BackupRecord {
    pub id: String,
    pub job_id: String,
    pub agent_name: String,
    pub instance: String,
    pub database: String,
    pub status: String,
    pub server_version: String,
    pub pg_dump_version: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub logical_bytes: i64,
    pub new_stored_bytes: i64,
    pub referenced_bytes: i64,
    pub chunk_count: i64,
    pub new_chunk_count: i64,
    pub database_bytes: i64,
    /// JSON object of tags.
    pub tags: String,
    pub error: String,
    /// When `cairn repository check` found a chunk it needs missing or
    /// corrupt; a damaged backup is never offered as restorable.
    pub damaged_at: Option<i64>,
    /// What the check found.
    pub damage: String,
    /// The cluster's system identifier (with `database`, the backup's
    /// lineage); empty for backups made before agents reported it.
    pub system_identifier: String,
    /// `cairn backups protect`: retention never removes it.
    pub protected: bool,
    /// When retention began deleting it: no longer listed nor restorable.
    pub deleting_at: Option<i64>,
}

impl BackupRecord {
    pub fn tags(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.tags).unwrap_or_default()
    }

    /// Complete and not being deleted by retention: what is listed, shown
    /// and may be restored or verified.
    pub fn is_listed(&self) -> bool {
        self.status == "complete" && self.deleting_at.is_none()
    }
}

/// Where a page of jobs or backups (newest first) ended: the next page
/// starts after it. Keyset paging: stable while rows are added, no OFFSET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageKey {
    pub started_at: i64,
    pub id: String,
}

impl PageKey {
    /// The opaque token the Admin API hands out: `STARTED_AT:ID`.
    pub fn token(&self) -> String {
        format!("{}:{}", self.started_at, self.id)
    }

    /// Reads a token [`PageKey::token`] made.
    pub fn parse(token: &str) -> Option<PageKey> {
        let (started_at, id) = token.split_once(':')?;
        (!id.is_empty() && id.len() <= 200).then_some(())?;
        Some(PageKey {
            started_at: started_at.parse().ok()?,
            id: id.to_string(),
        })
    }
}

/// What the dedup index knows of a stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    pub sealed_bytes: u64,
    pub plaintext_bytes: u64,
}

/// What a finished upload measured.
#[derive(Debug, Clone, Default)]
pub struct BackupStats {
    pub server_version: String,
    pub pg_dump_version: String,
    pub logical_bytes: u64,
    pub new_stored_bytes: u64,
    pub referenced_bytes: u64,
    pub chunk_count: u64,
    pub new_chunk_count: u64,
    pub database_bytes: u64,
    /// The cluster's system identifier the agent reported; empty if none.
    pub system_identifier: String,
}

pub(super) fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Catalog {
    /// Marks a backup complete, with the chunks it references: call only
    /// once its manifest is durable. Only a running backup completes: one
    /// whose job already ended (cancelled, failed, or completed by an
    /// earlier upload) is a [`CoordinatorError::Conflict`] and nothing is
    /// written, so that no upload answers `Stored` for a backup that is not
    /// listed.
    pub async fn complete_backup(
        &self,
        backup_id: &str,
        stats: &BackupStats,
        chunk_ids: &[String],
        now: i64,
    ) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let completed = sqlx::query(
            "UPDATE backups SET status = 'complete', server_version = ?, pg_dump_version = ?, finished_at = ?,
                logical_bytes = ?, new_stored_bytes = ?, referenced_bytes = ?, chunk_count = ?,
                new_chunk_count = ?, database_bytes = ?, system_identifier = ?, chunks_indexed = 1
             WHERE id = ? AND status = 'running'",
        )
        .bind(&stats.server_version)
        .bind(&stats.pg_dump_version)
        .bind(now)
        .bind(i64_of(stats.logical_bytes))
        .bind(i64_of(stats.new_stored_bytes))
        .bind(i64_of(stats.referenced_bytes))
        .bind(i64_of(stats.chunk_count))
        .bind(i64_of(stats.new_chunk_count))
        .bind(i64_of(stats.database_bytes))
        .bind(&stats.system_identifier)
        .bind(backup_id)
        .execute(&mut *transaction)
        .await?;
        if completed.rows_affected() == 0 {
            // The transaction rolls back when dropped: no references either.
            return Err(CoordinatorError::Conflict(format!(
                "backup {backup_id} is no longer running (its job ended, or another upload \
                 completed it): it was not marked complete"
            )));
        }
        // Every chunk it reuses must still be indexed: a repository check
        // that found one missing took it out of the index and marked the
        // backups referencing it damaged, in one transaction; a backup
        // completing after that must not be listed as whole.
        let unindexed = super::chunks::count_unindexed(&mut transaction, chunk_ids).await?;
        if unindexed > 0 {
            return Err(CoordinatorError::Conflict(format!(
                "backup {backup_id}: {unindexed} chunk(s) it reuses were found missing or corrupt \
                 by a repository check while it ran: it was not marked complete; run it again \
                 (the next run uploads them)"
            )));
        }
        super::chunks::insert_references(&mut transaction, backup_id, chunk_ids).await?;
        // A chunk garbage collection condemned is needed again.
        super::chunks::revive(&mut transaction, chunk_ids, now).await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn count_backups(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM backups")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Lists a backup found in the repository (`rebuild-catalog`).
    pub async fn insert_rebuilt_backup(
        &self,
        manifest: &Manifest,
        stats: &BackupStats,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO backups (id, job_id, agent_name, instance, database, status, server_version,
                pg_dump_version, started_at, finished_at, logical_bytes, new_stored_bytes,
                referenced_bytes, chunk_count, new_chunk_count, database_bytes, tags,
                system_identifier)
             VALUES (?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&manifest.backup_id)
        .bind(&manifest.job_id)
        .bind(&manifest.agent)
        .bind(&manifest.instance)
        .bind(&manifest.database)
        .bind(&stats.server_version)
        .bind(&stats.pg_dump_version)
        .bind(manifest.started_at)
        .bind(manifest.finished_at)
        .bind(i64_of(stats.logical_bytes))
        .bind(i64_of(stats.new_stored_bytes))
        .bind(i64_of(stats.referenced_bytes))
        .bind(i64_of(stats.chunk_count))
        .bind(i64_of(stats.new_chunk_count))
        .bind(i64_of(stats.database_bytes))
        .bind(serde_json::to_string(&manifest.tags).unwrap_or_else(|_| "{}".into()))
        .bind(&manifest.system_identifier)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_backup(&self, id: &str) -> Result<Option<BackupRecord>> {
        Ok(sqlx::query_as("SELECT * FROM backups WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Up to `limit` listed backups (complete, not being deleted), newest first, optionally of one
    /// agent and database, after the page `after` ended on.
    pub async fn list_backups(
        &self,
        agent_name: Option<&str>,
        database: Option<&str>,
        after: Option<&PageKey>,
        limit: u32,
    ) -> Result<Vec<BackupRecord>> {
        Ok(sqlx::query_as(
            "SELECT * FROM backups WHERE status = 'complete' AND deleting_at IS NULL
               AND (?1 IS NULL OR agent_name = ?1) AND (?2 IS NULL OR database = ?2)
               AND (?3 IS NULL OR (started_at, id) < (?3, ?4))
             ORDER BY started_at DESC, id DESC LIMIT ?5",
        )
        .bind(agent_name)
        .bind(database)
        .bind(after.map(|key| key.started_at))
        .bind(after.map(|key| key.id.as_str()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Which of `ids` (hex) the repository holds, with their sizes: the
    /// dedup check. In the same transaction every chunk found is marked
    /// used now, and one garbage collection condemned is revived (its
    /// `condemned_at` cleared), so a collection can delete it only if no
    /// upload found it first. A chunk being deleted is not found: the
    /// agent sends it again.
    pub async fn stored_chunks(
        &self,
        ids: &[String],
        now: i64,
    ) -> Result<HashMap<String, StoredChunk>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut query = sqlx::QueryBuilder::new("UPDATE chunks SET used_at = ");
        query.push_bind(now);
        query.push(", revived_at = CASE WHEN condemned_at IS NULL THEN revived_at ELSE ");
        query.push_bind(now);
        query.push(" END, condemned_at = NULL WHERE deleting_at IS NULL AND id IN (");
        let mut list = query.separated(", ");
        for id in ids {
            list.push_bind(id);
        }
        list.push_unseparated(") RETURNING id, sealed_bytes, plaintext_bytes");
        let rows: Vec<(String, i64, i64)> =
            query.build_query_as().fetch_all(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(id, sealed, plaintext)| {
                let chunk = StoredChunk {
                    sealed_bytes: u64::try_from(sealed).unwrap_or(0),
                    plaintext_bytes: u64::try_from(plaintext).unwrap_or(0),
                };
                (id, chunk)
            })
            .collect())
    }

    /// Records a chunk the repository now holds. Returns false, and
    /// records nothing, while garbage collection is deleting an older copy
    /// of it (its row says `deleting_at`): that deletion may remove the
    /// object just put, so the caller waits for it to end
    /// ([`Catalog::chunk_being_deleted`]) and puts the chunk again.
    pub async fn insert_chunk(
        &self,
        id: &str,
        sealed_bytes: u64,
        plaintext_bytes: u64,
        now: i64,
    ) -> Result<bool> {
        let written = sqlx::query(
            "INSERT INTO chunks (id, sealed_bytes, plaintext_bytes, stored_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET used_at = ?4,
                 revived_at = CASE WHEN condemned_at IS NULL THEN revived_at ELSE ?4 END,
                 condemned_at = NULL
             WHERE deleting_at IS NULL",
        )
        .bind(id)
        .bind(i64_of(sealed_bytes))
        .bind(i64_of(plaintext_bytes))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(written.rows_affected() > 0)
    }

    /// Whether garbage collection is deleting this chunk (its row marked,
    /// the object perhaps not yet gone).
    pub async fn chunk_being_deleted(&self, id: &str) -> Result<bool> {
        let deleting: Option<Option<i64>> =
            sqlx::query_scalar("SELECT deleting_at FROM chunks WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(deleting.flatten().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{AttemptEnd, JobKind, JobRecord, JobState};

    async fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open_sqlite(&dir.path().join("c.sqlite"))
            .await
            .unwrap();
        (dir, catalog)
    }

    fn job(id: &str, backup: &str) -> JobRecord {
        let mut job = JobRecord::queued(
            id.into(),
            JobKind::Backup,
            "db1",
            "main",
            "shop",
            "admin",
            1,
        );
        job.backup_id = backup.into();
        job
    }

    /// Runs one attempt of a queued job and ends the job with `state`.
    async fn finish(catalog: &Catalog, id: &str, state: JobState, error: &str, now: i64) {
        let attempt = format!("{id}-1");
        assert!(catalog.start_attempt(id, &attempt, 1, now).await.unwrap());
        assert_eq!(
            catalog
                .end_attempt(id, &attempt, &AttemptEnd::Final(state), error, now)
                .await
                .unwrap(),
            Some(state)
        );
    }

    #[tokio::test]
    async fn a_condemned_chunk_damages_its_backups_and_fails_those_completing_later() {
        let (_dir, catalog) = catalog().await;
        let tags = BTreeMap::new();
        for (job_id, backup_id) in [("j1", "b1"), ("j2", "b2")] {
            catalog
                .insert_job(&job(job_id, backup_id), Some(&tags))
                .await
                .unwrap();
        }
        for chunk in ["c1", "c2"] {
            catalog.insert_chunk(chunk, 10, 10, 1).await.unwrap();
        }
        let both = ["c1".to_string(), "c2".to_string()];
        catalog
            .complete_backup("b1", &BackupStats::default(), &both, 2)
            .await
            .unwrap();
        // A check finds c2 missing while b2 (which reuses it) still uploads.
        let marked = catalog
            .condemn_chunks(&[("c2".to_string(), "chunk c2 is missing".to_string())], 3)
            .await
            .unwrap();
        assert_eq!(marked, 1);
        let b1 = catalog.get_backup("b1").await.unwrap().unwrap();
        assert_eq!(b1.damaged_at, Some(3));
        assert_eq!(b1.damage, "chunk c2 is missing");
        let refused = catalog
            .complete_backup("b2", &BackupStats::default(), &both, 4)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, CoordinatorError::Conflict(m) if m.contains("repository check")),
            "{refused}"
        );
        assert_eq!(
            catalog.get_backup("b2").await.unwrap().unwrap().status,
            "running"
        );
        let (damaged, count) = catalog.damaged_backups(10).await.unwrap();
        assert_eq!((damaged.len(), count), (1, 1));
        // A later full check that does not confirm the mark clears it.
        assert_eq!(catalog.clear_damage_before(3).await.unwrap(), 0);
        assert_eq!(catalog.clear_damage_before(4).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn only_complete_backups_are_listed() {
        let (_dir, catalog) = catalog().await;
        let tags = BTreeMap::from([("ticket".to_string(), "OPS-1".to_string())]);
        catalog
            .insert_job(&job("j1", "b1"), Some(&tags))
            .await
            .unwrap();
        catalog
            .insert_job(&job("j2", "b2"), Some(&tags))
            .await
            .unwrap();
        assert!(
            catalog
                .list_backups(None, None, None, 100)
                .await
                .unwrap()
                .is_empty()
        );

        catalog.insert_chunk("c1", 10, 10, 4).await.unwrap();
        catalog
            .complete_backup("b1", &BackupStats::default(), &["c1".to_string()], 5)
            .await
            .unwrap();
        finish(&catalog, "j1", JobState::Succeeded, "", 6).await;
        finish(&catalog, "j2", JobState::Cancelled, "cancelled by admin", 6).await;
        let listed = catalog
            .list_backups(Some("db1"), Some("shop"), None, 100)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, "b1");
        assert_eq!(listed[0].tags(), tags);
        assert_eq!(
            catalog.get_backup("b2").await.unwrap().unwrap().status,
            "cancelled"
        );
        assert!(
            catalog
                .list_backups(Some("db2"), None, None, 100)
                .await
                .unwrap()
                .is_empty()
        );

        // Only a running backup completes: not twice, not after its job
        // ended.
        for backup in ["b1", "b2"] {
            let refused = catalog
                .complete_backup(backup, &BackupStats::default(), &["c2".to_string()], 7)
                .await
                .expect_err("an ended backup cannot complete");
            assert!(
                matches!(refused, CoordinatorError::Conflict(_)),
                "{refused:?}"
            );
        }
        assert_eq!(
            catalog.get_backup("b2").await.unwrap().unwrap().status,
            "cancelled"
        );
        assert_eq!(
            catalog.get_backup("b1").await.unwrap().unwrap().finished_at,
            Some(5)
        );
        assert!(
            catalog
                .complete_backup("no-such-backup", &BackupStats::default(), &[], 7)
                .await
                .is_err()
        );

        // A finished job is not finished again; a queued one that misses
        // its deadline ends, and its backup with it.
        catalog
            .insert_job(&job("j3", "b3"), Some(&tags))
            .await
            .unwrap();
        assert!(
            catalog
                .end_attempt(
                    "j1",
                    "j1-1",
                    &AttemptEnd::Final(JobState::Failed),
                    "late",
                    9
                )
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            catalog
                .end_queued_job("j3", JobState::Missed, "the agent stayed offline", 9)
                .await
                .unwrap()
        );
        assert_eq!(
            catalog.get_job("j1").await.unwrap().unwrap().status,
            JobState::Succeeded
        );
        assert_eq!(
            catalog.get_job("j3").await.unwrap().unwrap().status,
            JobState::Missed
        );
        assert_eq!(
            catalog.get_backup("b3").await.unwrap().unwrap().status,
            "failed"
        );
    }

    #[tokio::test]
    async fn stored_chunks() {
        let (_dir, catalog) = catalog().await;
        catalog.insert_chunk("aa", 10, 20, 1).await.unwrap();
        catalog.insert_chunk("aa", 10, 20, 2).await.unwrap();
        catalog.insert_chunk("bb", 30, 40, 3).await.unwrap();
        let stored = catalog
            .stored_chunks(&["aa".into(), "bb".into(), "cc".into()], 4)
            .await
            .unwrap();
        assert_eq!(stored.len(), 2, "{stored:?}");
        assert_eq!(
            stored.get("bb"),
            Some(&StoredChunk {
                sealed_bytes: 30,
                plaintext_bytes: 40
            })
        );
        let stored = catalog
            .stored_chunks(&["aa".into(), "bb".into()], 5)
            .await
            .unwrap();
        let sealed: HashMap<String, u64> = stored
            .into_iter()
            .map(|(id, chunk)| (id, chunk.sealed_bytes))
            .collect();
        assert_eq!(
            sealed,
            HashMap::from([("aa".to_string(), 10), ("bb".to_string(), 30)])
        );
        assert!(catalog.stored_chunks(&[], 6).await.unwrap().is_empty());
    }
}
