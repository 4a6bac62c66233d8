//! Restore jobs and the verifications of backups.
//!
//! A restore job is a row in `jobs` (kind `restore` or `drill`) with no
//! backup row of its own: `backup_id` names the backup it restores, which
//! the job's outcome never touches. Verifications are appended, never
//! updated; listings show the newest per backup.

use std::collections::HashMap;

use sqlx::FromRow;

use super::Catalog;
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct VerificationRecord {
    pub backup_id: String,
    pub at: i64,
    /// `chunks` or `restore drill on AGENT`.
    pub method: String,
    pub ok: bool,
    pub detail: String,
    pub millis: i64,
    pub job_id: String,
}

impl Catalog {
    /// Records a new running job that has no backup row of its own (a
    /// restore or a drill).
    /// Keeps the agent's report (JSON) on a job.
    pub async fn set_job_report(&self, job_id: &str, report: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET report = ? WHERE id = ?")
            .bind(report)
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn record_verification(&self, verification: &VerificationRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO verifications (backup_id, at, method, ok, detail, millis, job_id)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&verification.backup_id)
        .bind(verification.at)
        .bind(&verification.method)
        .bind(verification.ok)
        .bind(&verification.detail)
        .bind(verification.millis)
        .bind(&verification.job_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest verification of each of `backup_ids` that has one.
    pub async fn latest_verifications(
        &self,
        backup_ids: &[String],
    ) -> Result<HashMap<String, VerificationRecord>> {
        if backup_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut query = sqlx::QueryBuilder::new(
            "SELECT v.backup_id, v.at, v.method, v.ok, v.detail, v.millis, v.job_id
             FROM verifications v
             WHERE v.id = (SELECT w.id FROM verifications w WHERE w.backup_id = v.backup_id
                           ORDER BY w.at DESC, w.id DESC LIMIT 1)
               AND v.backup_id IN (",
        );
        let mut list = query.separated(", ");
        for id in backup_ids {
            list.push_bind(id);
        }
        list.push_unseparated(")");
        let rows: Vec<VerificationRecord> = query.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|v| (v.backup_id.clone(), v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification(backup: &str, at: i64, ok: bool) -> VerificationRecord {
        VerificationRecord {
            backup_id: backup.into(),
            at,
            method: "chunks".into(),
            ok,
            detail: format!("at {at}"),
            millis: 5,
            job_id: String::new(),
        }
    }

    #[tokio::test]
    async fn the_newest_verification_per_backup() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open_sqlite(&dir.path().join("c.sqlite"))
            .await
            .unwrap();
        for v in [
            verification("b1", 1, true),
            verification("b1", 3, false),
            verification("b1", 2, true),
            verification("b2", 7, true),
        ] {
            catalog.record_verification(&v).await.unwrap();
        }
        let latest = catalog
            .latest_verifications(&["b1".into(), "b2".into(), "b3".into()])
            .await
            .unwrap();
        assert_eq!(latest.len(), 2);
        assert_eq!(latest["b1"], verification("b1", 3, false));
        assert_eq!(latest["b2"].at, 7);
    }
}
