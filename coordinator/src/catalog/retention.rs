//! Retention in the catalog: named policies, which schedule uses which,
//! protected backups, the backups of a database lineage, and the steps of
//! deleting a backup.
//!
//! A backup retention removes is first marked (`deleting_at`): from then on
//! it is neither listed nor restorable. Its manifest is deleted from the
//! repository next, and only then its row and chunk references go, so a
//! crash between the steps leaves a marked row whose deletion the next
//! apply (or start) finishes, never a listed backup without a manifest.

use sqlx::FromRow;

use super::Catalog;
use super::jobs::JobKind;
use crate::error::{CoordinatorError, Result};

/// A named policy as stored: `policy` is the JSON form of
/// `retention::Policy`.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct RetentionPolicyRecord {
    pub name: String,
    pub policy: String,
    pub created_by: String,
    pub created_at: i64,
}

/// One database lineage: the cluster's system identifier and the database,
/// or, for a backup without an identifier (made before agents reported
/// it), its agent, instance and database.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lineage {
    Cluster {
        system_identifier: String,
        database: String,
    },
    Host {
        agent: String,
        instance: String,
        database: String,
    },
}

impl Lineage {
    pub fn of(backup: &LineageBackup) -> Lineage {
        Lineage::of_parts(
            &backup.system_identifier,
            &backup.agent_name,
            &backup.instance,
            &backup.database,
        )
    }

    pub fn of_parts(
        system_identifier: &str,
        agent: &str,
        instance: &str,
        database: &str,
    ) -> Lineage {
        if system_identifier.is_empty() {
            Lineage::Host {
                agent: agent.to_string(),
                instance: instance.to_string(),
                database: database.to_string(),
            }
        } else {
            Lineage::Cluster {
                system_identifier: system_identifier.to_string(),
                database: database.to_string(),
            }
        }
    }

    pub fn system_identifier(&self) -> &str {
        match self {
            Lineage::Cluster {
                system_identifier, ..
            } => system_identifier,
            Lineage::Host { .. } => "",
        }
    }

    pub fn database(&self) -> &str {
        match self {
            Lineage::Cluster { database, .. } | Lineage::Host { database, .. } => database,
        }
    }
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lineage::Cluster {
                system_identifier,
                database,
            } => write!(f, "cluster {system_identifier} database {database}"),
            Lineage::Host {
                agent,
                instance,
                database,
            } => write!(f, "{agent}/{instance}/{database}"),
        }
    }
}

/// What retention needs of a complete backup.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct LineageBackup {
    pub id: String,
    pub agent_name: String,
    pub instance: String,
    pub database: String,
    pub system_identifier: String,
    pub finished_at: i64,
    pub protected: bool,
}

/// The listed backups as [`LineageBackup`]s, then the rest of a query.
macro_rules! listed_lineage_backups {
    ($rest:literal) => {
        concat!(
            "SELECT id, agent_name, instance, database, system_identifier,
                    COALESCE(finished_at, started_at) AS finished_at, protected
             FROM backups WHERE status = 'complete' AND deleting_at IS NULL",
            $rest
        )
    };
}

impl Catalog {
    /// Stores a new policy; a name in use is a conflict.
    pub async fn insert_retention_policy(&self, record: &RetentionPolicyRecord) -> Result<()> {
        let inserted = sqlx::query(
            "INSERT INTO retention_policies (name, policy, created_by, created_at)
             VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&record.name)
        .bind(&record.policy)
        .bind(&record.created_by)
        .bind(record.created_at)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(CoordinatorError::Conflict(format!(
                "a retention policy named {:?} exists: pick another name, or delete it first",
                record.name
            )));
        }
        Ok(())
    }

    pub async fn list_retention_policies(&self) -> Result<Vec<RetentionPolicyRecord>> {
        Ok(
            sqlx::query_as("SELECT * FROM retention_policies ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn get_retention_policy(&self, name: &str) -> Result<Option<RetentionPolicyRecord>> {
        Ok(
            sqlx::query_as("SELECT * FROM retention_policies WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The schedules that use a policy, by name.
    pub async fn schedules_using_policy(&self, policy: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM schedules WHERE retention_policy = ? ORDER BY name",
        )
        .bind(policy)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes a policy no schedule uses: one in use is a conflict naming
    /// the schedules. Whether it existed.
    pub async fn delete_retention_policy(&self, name: &str) -> Result<bool> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM schedules WHERE retention_policy = ? ORDER BY name",
        )
        .bind(name)
        .fetch_all(&mut *transaction)
        .await?;
        if !users.is_empty() {
            return Err(CoordinatorError::Conflict(format!(
                "retention policy {name:?} is used by schedule(s) {}: give them another with \
                 cairn schedule update NAME --retention POLICY (or --no-retention) first",
                users.join(", ")
            )));
        }
        let deleted = sqlx::query("DELETE FROM retention_policies WHERE name = ?")
            .bind(name)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        transaction.commit().await?;
        Ok(deleted > 0)
    }

    /// Gives a schedule a policy (which must exist, checked in the same
    /// transaction) or none. Whether the schedule exists.
    pub async fn set_schedule_retention(
        &self,
        schedule: &str,
        policy: Option<&str>,
    ) -> Result<bool> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(policy) = policy {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT name FROM retention_policies WHERE name = ?")
                    .bind(policy)
                    .fetch_optional(&mut *transaction)
                    .await?;
            if exists.is_none() {
                return Err(unknown_policy(policy));
            }
        }
        let updated = sqlx::query("UPDATE schedules SET retention_policy = ? WHERE name = ?")
            .bind(policy)
            .bind(schedule)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        transaction.commit().await?;
        Ok(updated > 0)
    }

    /// Schedules with a policy whose daily apply was last claimed at or
    /// before `due_before` (or never).
    pub async fn schedules_due_for_retention(
        &self,
        due_before: i64,
    ) -> Result<Vec<super::ScheduleRecord>> {
        Ok(sqlx::query_as(
            "SELECT * FROM schedules WHERE retention_policy IS NOT NULL
               AND (retention_applied_at IS NULL OR retention_applied_at <= ?) ORDER BY name",
        )
        .bind(due_before)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Claims a schedule's daily apply: true for exactly one caller per
    /// `interval_ms`, however many coordinators share the catalog (a
    /// conditional update on `retention_applied_at`).
    pub async fn claim_daily_retention(
        &self,
        schedule_id: &str,
        now: i64,
        interval_ms: i64,
    ) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE schedules SET retention_applied_at = ?1
             WHERE id = ?2 AND retention_policy IS NOT NULL
               AND (retention_applied_at IS NULL OR retention_applied_at <= ?1 - ?3)",
        )
        .bind(now)
        .bind(schedule_id)
        .bind(interval_ms)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Marks a complete backup protected (or not): retention keeps it.
    /// Whether a listed backup of that id exists.
    pub async fn set_backup_protected(&self, id: &str, protected: bool) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE backups SET protected = ? WHERE id = ? AND status = 'complete'
                AND deleting_at IS NULL",
        )
        .bind(protected)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// The lineages of the listed backups made by `agents` (all agents when
    /// `None`), of `databases` (all when `None`).
    pub async fn lineages_in_scope(
        &self,
        agents: Option<&[String]>,
        databases: Option<&[String]>,
    ) -> Result<Vec<Lineage>> {
        let mut query = sqlx::QueryBuilder::new(listed_lineage_backups!(""));
        if let Some(agents) = agents {
            if agents.is_empty() {
                return Ok(Vec::new());
            }
            query.push(" AND agent_name IN (");
            let mut list = query.separated(", ");
            for agent in agents {
                list.push_bind(agent);
            }
            list.push_unseparated(")");
        }
        if let Some(databases) = databases {
            if databases.is_empty() {
                return Ok(Vec::new());
            }
            query.push(" AND database IN (");
            let mut list = query.separated(", ");
            for database in databases {
                list.push_bind(database);
            }
            list.push_unseparated(")");
        }
        let rows: Vec<LineageBackup> = query.build_query_as().fetch_all(&self.pool).await?;
        let mut lineages: Vec<Lineage> = rows.iter().map(Lineage::of).collect();
        lineages.sort();
        lineages.dedup();
        Ok(lineages)
    }

    /// Every listed (complete, not being deleted) backup of a lineage,
    /// whichever agent made it.
    pub async fn lineage_backups(&self, lineage: &Lineage) -> Result<Vec<LineageBackup>> {
        let rows = match lineage {
            Lineage::Cluster {
                system_identifier,
                database,
            } => {
                sqlx::query_as(listed_lineage_backups!(
                    " AND system_identifier = ? AND database = ?"
                ))
                .bind(system_identifier)
                .bind(database)
                .fetch_all(&self.pool)
                .await?
            }
            Lineage::Host {
                agent,
                instance,
                database,
            } => sqlx::query_as(listed_lineage_backups!(
                " AND system_identifier = '' AND agent_name = ? AND instance = ? AND database = ?"
            ))
            .bind(agent)
            .bind(instance)
            .bind(database)
            .fetch_all(&self.pool)
            .await?,
        };
        Ok(rows)
    }

    /// The backups a queued or running job reads (restores and drills).
    pub async fn backups_in_use(&self) -> Result<Vec<String>> {
        let rows: Vec<(JobKind, String)> = sqlx::query_as(
            "SELECT kind, backup_id FROM jobs WHERE status IN ('queued', 'running')
               AND backup_id != ''",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut ids: Vec<String> = rows
            .into_iter()
            .filter(|(kind, _)| kind.reads_a_backup())
            .map(|(_, id)| id)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The first step of deleting a backup: marks it so it is no longer
    /// listed nor restorable. Only a listed backup that is not protected
    /// and not read by a queued or running restore or drill is marked (in
    /// this one statement, so a restore queued since the plan was made
    /// keeps it). Whether it was marked.
    pub async fn mark_backup_deleting(&self, id: &str, now: i64) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE backups SET deleting_at = ?
             WHERE id = ? AND status = 'complete' AND deleting_at IS NULL AND protected = 0
               AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.backup_id = backups.id
                                 AND jobs.kind IN ('restore', 'drill')
                                 AND jobs.status IN ('queued', 'running'))",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Backups marked for deletion whose deletion has not finished.
    pub async fn backups_being_deleted(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM backups WHERE deleting_at IS NOT NULL ORDER BY deleting_at, id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The last step of deleting a backup, once its manifest is gone: its
    /// row, chunk references and verifications. Only a marked backup.
    /// Whether it was there.
    pub async fn finish_backup_deletion(&self, id: &str) -> Result<bool> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let deleted = sqlx::query("DELETE FROM backups WHERE id = ? AND deleting_at IS NOT NULL")
            .bind(id)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        if deleted > 0 {
            sqlx::query("DELETE FROM backup_chunks WHERE backup_id = ?")
                .bind(id)
                .execute(&mut *transaction)
                .await?;
            sqlx::query("DELETE FROM verifications WHERE backup_id = ?")
                .bind(id)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(deleted > 0)
    }
}

/// The refusal of a policy name that does not exist.
pub fn unknown_policy(name: &str) -> CoordinatorError {
    CoordinatorError::NotFound(format!(
        "no retention policy named {name:?}: see cairn retention list, or create it with \
         cairn retention create {name} --keep-..."
    ))
}
