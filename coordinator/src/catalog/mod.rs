//! The catalog: the only code that speaks SQL.
//!
//! What we store and why:
//! - `agents`: every enrolled agent, its current certificate serial, what it
//!   last said at registration, and when it was last seen, so that the fleet
//!   can be listed while agents are offline and across restarts.
//! - `certificates`: every certificate the fleet CA issued, so that
//!   revocation is by serial and survives restarts.
//! - `enrollment_tokens`: one-time tokens, with only a hash of the secret.
//! - `probes`: a short history of health probes per instance.
//! - `audit_log`: the append-only, hash-chained record of security-relevant
//!   events (see [`crate::audit`]).
//! - `jobs`, `job_attempts`, `coordinator_term` (see [`jobs`]): what was
//!   asked, each attempt at it, and the term every command carries.
//! - `backups`, `chunks` (see [`backups`]): what is complete, and which
//!   chunks the repository holds.
//! - `backup_chunks` (see [`chunks`]): which chunks each complete backup
//!   references, for `cairn repository check` and garbage collection.
//!
//! SQLite (WAL mode) is the default; migrations are embedded.

mod backups;
mod chunks;
mod gc;
mod jobs;
mod restores;
mod retention;
mod schedules;
mod uploads;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cairn_common::model::{InstanceProbe, Operation};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::Mutex;

use crate::audit::{AuditEvent, AuditRow, GENESIS_HASH, HashInput, row_hash};
use crate::error::{CoordinatorError, Result};

pub use backups::{BackupRecord, BackupStats, PageKey, StoredChunk};
pub use gc::{GcChunk, GcClaim};
pub use jobs::{
    AttemptEnd, AttemptRecord, JobKind, JobRecord, JobState, RETRY_REASON_PREFIX, TickJobs,
    offline_reason,
};
pub use restores::VerificationRecord;
pub use retention::{Lineage, LineageBackup, RetentionPolicyRecord, unknown_policy};
pub use schedules::{FireProgress, OnOverlap, ScheduleKind, ScheduleRecord};
pub use uploads::RecordedChunk;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug)]
pub struct Catalog {
    pub(crate) pool: SqlitePool,
    /// Serialises audit appends so that each reads the true chain head.
    audit_append: Mutex<()>,
}

/// What a schedule needs of an agent: its name, labels and instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentScope {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub instances: Vec<String>,
}

/// An agent as the catalog knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    pub name: String,
    pub enrolled_at: i64,
    pub certificate_serial: String,
    pub certificate_not_after: i64,
    pub revoked_at: Option<i64>,
    pub hostname: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub instances: Vec<String>,
    pub permitted_operations: Vec<Operation>,
    pub peer_address: String,
    pub last_seen_at: Option<i64>,
}

/// What an agent says when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub hostname: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub instances: Vec<String>,
    pub permitted_operations: Vec<Operation>,
    pub peer_address: String,
}

/// A stored enrollment token (the secret only as a hash).
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: String,
    pub agent_name: String,
    pub secret_sha256: String,
    pub created_by: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    WrongAgent { bound_to: String },
    Expired { expired_at: i64 },
    AlreadyUsed { used_at: i64 },
}

/// A certificate to remember.
#[derive(Debug, Clone)]
pub struct CertificateRecord<'a> {
    pub serial: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub role: Option<&'a str>,
    pub issued_at: i64,
    pub not_after: i64,
}

impl Catalog {
    /// Opens (creating if needed) the SQLite catalog and runs migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Catalog> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Catalog {
            pool,
            audit_append: Mutex::new(()),
        })
    }

    /// Checks that the catalog answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- enrollment tokens ----

    pub async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, agent_name, secret_sha256, created_by, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(&token.agent_name)
        .bind(&token.secret_sha256)
        .bind(&token.created_by)
        .bind(token.created_at)
        .bind(token.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a token used if it is valid for `agent_name` at `now`. The check
    /// and the update happen in one statement, so a token cannot be used
    /// twice even by racing enrollments.
    /// Checks an enrollment token without spending it, so that nothing
    /// else about the request (is the name enrolled? is the CSR good?) is
    /// answered to a caller without a valid token.
    pub async fn check_token(
        &self,
        id: &str,
        agent_name: &str,
        secret_sha256: &str,
        now: i64,
    ) -> Result<std::result::Result<(), TokenRefusal>> {
        let row = sqlx::query(
            "SELECT agent_name, secret_sha256, expires_at, used_at FROM enrollment_tokens WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let stored_secret: String = row.try_get("secret_sha256")?;
        if !constant_time_eq(stored_secret.as_bytes(), secret_sha256.as_bytes()) {
            return Ok(Err(TokenRefusal::Unknown));
        }
        let bound_to: String = row.try_get("agent_name")?;
        if bound_to != agent_name {
            return Ok(Err(TokenRefusal::WrongAgent { bound_to }));
        }
        if let Some(used_at) = row.try_get::<Option<i64>, _>("used_at")? {
            return Ok(Err(TokenRefusal::AlreadyUsed { used_at }));
        }
        let expires_at: i64 = row.try_get("expires_at")?;
        if expires_at <= now {
            return Ok(Err(TokenRefusal::Expired {
                expired_at: expires_at,
            }));
        }
        Ok(Ok(()))
    }

    /// Checks and spends an enrollment token; of two concurrent callers
    /// only one spends it.
    pub async fn consume_token(
        &self,
        id: &str,
        agent_name: &str,
        secret_sha256: &str,
        now: i64,
    ) -> Result<std::result::Result<(), TokenRefusal>> {
        if let Err(refusal) = self.check_token(id, agent_name, secret_sha256, now).await? {
            return Ok(Err(refusal));
        }
        let updated = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL AND expires_at > ?",
        )
        .bind(now)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() != 1 {
            return Ok(Err(TokenRefusal::AlreadyUsed { used_at: now }));
        }
        Ok(Ok(()))
    }

    // ---- agents and certificates ----

    pub async fn get_agent(&self, name: &str) -> Result<Option<AgentRecord>> {
        let row = sqlx::query("SELECT * FROM agents WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| agent_from_row(&row)).transpose()
    }

    /// Each agent not revoked (or only `name`): its name, labels and
    /// instances, by name. What a schedule's targets need, read without
    /// the rest of each row, as a fleet-wide fire reads every agent.
    pub async fn agent_scopes(&self, name: Option<&str>) -> Result<Vec<AgentScope>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT name, labels, instances FROM agents
             WHERE revoked_at IS NULL AND (?1 IS NULL OR name = ?1)
             ORDER BY name",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, labels, instances)| AgentScope {
                name,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                instances: serde_json::from_str(&instances).unwrap_or_default(),
            })
            .collect())
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query("SELECT * FROM agents ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Records a (re-)enrolled agent and its new certificate in one
    /// transaction. Refuses if the name is enrolled and not revoked.
    pub async fn enroll_agent(
        &self,
        name: &str,
        certificate: &CertificateRecord<'_>,
        now: i64,
    ) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let existing: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM agents WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *transaction)
                .await?;
        if let Some(None) = existing {
            return Err(CoordinatorError::Conflict(format!(
                "agent {name:?} is already enrolled: revoke it first (cairn agents revoke {name})"
            )));
        }
        insert_certificate(&mut transaction, certificate).await?;
        // Any other token for this name is spent too: one enrollment per token
        // made, never a second agent from a copy.
        sqlx::query(
            "UPDATE enrollment_tokens SET used_at = ? WHERE agent_name = ? AND used_at IS NULL",
        )
        .bind(now)
        .bind(name)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "INSERT INTO agents (name, enrolled_at, certificate_serial, certificate_not_after)
             VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET
                enrolled_at = excluded.enrolled_at,
                certificate_serial = excluded.certificate_serial,
                certificate_not_after = excluded.certificate_not_after,
                revoked_at = NULL, hostname = '', version = '', labels = '{}',
                instances = '[]', permitted_operations = '[]', peer_address = '',
                last_seen_at = NULL",
        )
        .bind(name)
        .bind(now)
        .bind(certificate.serial)
        .bind(certificate.not_after)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn insert_certificate(&self, certificate: &CertificateRecord<'_>) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_certificate(&mut transaction, certificate).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Records a certificate renewed from `from_serial`, only if that one
    /// is still an unrevoked certificate of the same holder, in one
    /// transaction: a revocation committed while the renewal was signed
    /// wins. `false` when it was refused.
    pub async fn insert_renewed_certificate(
        &self,
        from_serial: &str,
        certificate: &CertificateRecord<'_>,
    ) -> Result<bool> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM certificates
             WHERE serial = ? AND kind = ? AND name = ? AND revoked_at IS NULL",
        )
        .bind(from_serial)
        .bind(certificate.kind)
        .bind(certificate.name)
        .fetch_optional(&mut *transaction)
        .await?;
        if current.is_none() {
            return Ok(false);
        }
        insert_certificate(&mut transaction, certificate).await?;
        transaction.commit().await?;
        Ok(true)
    }

    /// Records what a connecting agent says, if `serial` is the agent's
    /// current certificate or a renewed one (an unrevoked certificate of
    /// this agent issued after the current one). The first connection with
    /// a renewed certificate makes it current and revokes every other
    /// certificate of the agent, all in one transaction. Returns `None` when
    /// the certificate is neither (revoked, replaced, or the agent revoked),
    /// else the serials this switch revoked (usually none).
    pub async fn record_registration(
        &self,
        name: &str,
        serial: &str,
        not_after: i64,
        registration: &Registration,
        now: i64,
    ) -> Result<Option<Vec<String>>> {
        let labels = serde_json::to_string(&registration.labels).unwrap_or_default();
        let instances = serde_json::to_string(&registration.instances).unwrap_or_default();
        let operations =
            serde_json::to_string(&registration.permitted_operations).unwrap_or_default();
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<String> = sqlx::query_scalar(
            "SELECT certificate_serial FROM agents WHERE name = ? AND revoked_at IS NULL",
        )
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(current) = current else {
            return Ok(None);
        };
        let mut revoked = Vec::new();
        if current != serial {
            let renewed: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM certificates AS renewed
                 WHERE renewed.serial = ? AND renewed.kind = 'agent' AND renewed.name = ?
                   AND renewed.revoked_at IS NULL
                   AND renewed.issued_at >= COALESCE(
                       (SELECT issued_at FROM certificates WHERE serial = ?), 0)",
            )
            .bind(serial)
            .bind(name)
            .bind(&current)
            .fetch_optional(&mut *transaction)
            .await?;
            if renewed.is_none() {
                return Ok(None);
            }
            revoked = sqlx::query_scalar(
                "UPDATE certificates SET revoked_at = ?
                 WHERE kind = 'agent' AND name = ? AND serial != ? AND revoked_at IS NULL
                 RETURNING serial",
            )
            .bind(now)
            .bind(name)
            .bind(serial)
            .fetch_all(&mut *transaction)
            .await?;
            sqlx::query(
                "UPDATE agents SET certificate_serial = ?, certificate_not_after = ? WHERE name = ?",
            )
            .bind(serial)
            .bind(not_after)
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        }
        sqlx::query(
            "UPDATE agents SET hostname = ?, version = ?, labels = ?, instances = ?,
                permitted_operations = ?, peer_address = ?, last_seen_at = ?
             WHERE name = ?",
        )
        .bind(&registration.hostname)
        .bind(&registration.version)
        .bind(labels)
        .bind(instances)
        .bind(operations)
        .bind(&registration.peer_address)
        .bind(now)
        .bind(name)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Some(revoked))
    }

    /// Records a renewed certificate of agent `name`, if the agent is not
    /// revoked and `caller_serial` (the certificate the request came with)
    /// is one of its unrevoked certificates. The agent's current serial
    /// does not move here: it moves when the agent first connects with the
    /// new certificate ([`Catalog::record_registration`]).
    pub async fn record_renewal(
        &self,
        name: &str,
        caller_serial: &str,
        certificate: &CertificateRecord<'_>,
    ) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let revoked_at: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM agents WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *transaction)
                .await?;
        match revoked_at {
            None => {
                return Err(CoordinatorError::NotFound(format!(
                    "no agent named {name:?}: enroll it (cairn token create --agent {name})"
                )));
            }
            Some(Some(_)) => {
                return Err(CoordinatorError::PermissionDenied(format!(
                    "agent {name:?} is revoked: it must be re-enrolled, not renewed"
                )));
            }
            Some(None) => {}
        }
        let valid: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM certificates
             WHERE serial = ? AND kind = 'agent' AND name = ? AND revoked_at IS NULL",
        )
        .bind(caller_serial)
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?;
        if valid.is_none() {
            return Err(CoordinatorError::PermissionDenied(format!(
                "certificate {caller_serial} is not an unrevoked certificate of agent {name:?}"
            )));
        }
        insert_certificate(&mut transaction, certificate).await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn touch_agent(&self, name: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE agents SET last_seen_at = ? WHERE name = ?")
            .bind(now)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Revokes the agent and every certificate issued to it. Returns the
    /// revoked serials.
    pub async fn revoke_agent(&self, name: &str, now: i64) -> Result<Vec<String>> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let updated =
            sqlx::query("UPDATE agents SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL")
                .bind(now)
                .bind(name)
                .execute(&mut *transaction)
                .await?;
        if updated.rows_affected() == 0 {
            let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM agents WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *transaction)
                .await?;
            return Err(match exists {
                Some(_) => CoordinatorError::Conflict(format!("agent {name:?} is already revoked")),
                None => CoordinatorError::NotFound(format!("no agent named {name:?}")),
            });
        }
        // Outstanding tokens for this name die with the revocation: coming
        // back needs a token made after it.
        sqlx::query(
            "UPDATE enrollment_tokens SET used_at = ? WHERE agent_name = ? AND used_at IS NULL",
        )
        .bind(now)
        .bind(name)
        .execute(&mut *transaction)
        .await?;
        let serials = revoke_certificates(&mut transaction, "agent", name, now).await?;
        transaction.commit().await?;
        Ok(serials)
    }

    /// Revokes every unrevoked certificate of an operator; returns their
    /// serials (empty if there were none). Refuses (Conflict) to revoke the
    /// last admin: the last operator name holding an admin certificate that
    /// is neither revoked nor expired, since nobody could then manage
    /// identities without the CA key (see the README's break-glass).
    pub async fn revoke_operator(&self, name: &str, now: i64) -> Result<Vec<String>> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let admins: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT name FROM certificates
             WHERE kind = 'operator' AND role = 'admin' AND revoked_at IS NULL AND not_after > ?",
        )
        .bind(now)
        .fetch_all(&mut *transaction)
        .await?;
        if !admins.is_empty() && admins.iter().all(|admin| admin == name) {
            return Err(CoordinatorError::Conflict(format!(
                "operator \"{name}\" is the last admin: revoking it would leave nobody able to issue or revoke identities. Issue another admin first (cairn operators issue --role admin), then revoke {name}"
            )));
        }
        let serials = revoke_certificates(&mut transaction, "operator", name, now).await?;
        transaction.commit().await?;
        Ok(serials)
    }

    /// Serials of revoked certificates still valid at `cutoff` (ms since
    /// the epoch; a past certificate is refused for its dates anyway).
    pub async fn revoked_serials(&self, cutoff: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after >= ?",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Serials of revoked certificates that expired before `cutoff`.
    pub async fn expired_revoked_serials(&self, cutoff: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after < ?",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- probes ----

    /// Stores probes and trims each instance's history to `keep` rows.
    pub async fn insert_probes(
        &self,
        agent_name: &str,
        probes: &[InstanceProbe],
        received_at: i64,
        keep: u32,
    ) -> Result<()> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for probe in probes {
            let result = serde_json::to_string(probe)
                .map_err(|e| CoordinatorError::Internal(format!("probe not serialisable: {e}")))?;
            sqlx::query(
                "INSERT INTO probes (agent_name, instance, probed_at, received_at, result) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(agent_name)
            .bind(&probe.instance)
            .bind(probe.probed_at.timestamp_millis())
            .bind(received_at)
            .bind(result)
            .execute(&mut *transaction)
            .await?;
            sqlx::query(
                "DELETE FROM probes WHERE agent_name = ? AND instance = ? AND id NOT IN
                   (SELECT id FROM probes WHERE agent_name = ? AND instance = ? ORDER BY id DESC LIMIT ?)",
            )
            .bind(agent_name)
            .bind(&probe.instance)
            .bind(agent_name)
            .bind(&probe.instance)
            .bind(keep)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// An agent's stored probes, newest first.
    pub async fn probes_of(&self, agent_name: &str) -> Result<Vec<InstanceProbe>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT result FROM probes WHERE agent_name = ? ORDER BY id DESC")
                .bind(agent_name)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .filter_map(|text| serde_json::from_str(text).ok())
            .collect())
    }

    /// The newest probe of every instance of every agent: (agent, probe).
    pub async fn latest_probes(&self) -> Result<Vec<(String, InstanceProbe)>> {
        let rows = sqlx::query(
            "SELECT p.agent_name, p.result FROM probes p
             JOIN (SELECT max(id) AS id FROM probes GROUP BY agent_name, instance) latest
               ON latest.id = p.id
             ORDER BY p.agent_name, p.instance",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut probes = Vec::with_capacity(rows.len());
        for row in rows {
            let agent: String = row.try_get("agent_name")?;
            let text: String = row.try_get("result")?;
            if let Ok(probe) = serde_json::from_str(&text) {
                probes.push((agent, probe));
            }
        }
        Ok(probes)
    }

    // ---- audit ----

    /// Appends one event to the hash chain, stamped with the time at which
    /// it takes the chain's head (so times never go backwards along ids).
    pub async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRow> {
        let _guard = self.audit_append.lock().await;
        let now = crate::clock::now_ms();
        // IMMEDIATE: take the write lock before reading the chain head, so
        // no other writer can slip in between (a deferred transaction would
        // fail with SQLITE_BUSY on upgrade instead of waiting).
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let head: Option<(i64, String)> =
            sqlx::query_as("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1")
                .fetch_optional(&mut *transaction)
                .await?;
        let (id, prev_hash) = match head {
            Some((id, hash)) => (id + 1, hash),
            None => (1, GENESIS_HASH.to_string()),
        };
        let hash = row_hash(&HashInput {
            prev_hash: &prev_hash,
            id,
            at: now,
            actor: &event.actor,
            action: event.action,
            target: &event.target,
            outcome: event.outcome.as_str(),
            detail: &event.detail,
        });
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, action, target, outcome, detail, prev_hash, hash)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(now)
        .bind(&event.actor)
        .bind(event.action)
        .bind(&event.target)
        .bind(event.outcome.as_str())
        .bind(&event.detail)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(AuditRow {
            id,
            at: now,
            actor: event.actor.clone(),
            action: event.action.to_string(),
            target: event.target.clone(),
            outcome: event.outcome.as_str().to_string(),
            detail: event.detail.clone(),
            prev_hash,
            hash,
        })
    }

    /// Up to `limit` rows older than `before_id` (all: `None`), newest
    /// first: one page of `audit list`.
    pub async fn audit_page(&self, before_id: Option<i64>, limit: u32) -> Result<Vec<AuditRow>> {
        Ok(sqlx::query_as(
            "SELECT id, at, actor, action, target, outcome, detail, prev_hash, hash
             FROM audit_log WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2",
        )
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Up to `limit` rows after `after_id`, oldest first: one page of the
    /// chain for verification.
    pub async fn audit_after(&self, after_id: i64, limit: u32) -> Result<Vec<AuditRow>> {
        Ok(sqlx::query_as(
            "SELECT id, at, actor, action, target, outcome, detail, prev_hash, hash
                 FROM audit_log WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every row, oldest first (tests).
    #[cfg(test)]
    pub async fn all_audit(&self) -> Result<Vec<AuditRow>> {
        self.audit_after(0, u32::MAX).await
    }
}

/// Revokes the unrevoked certificates of one holder; returns their serials.
async fn revoke_certificates(
    transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    kind: &str,
    name: &str,
    now: i64,
) -> Result<Vec<String>> {
    let serials: Vec<String> = sqlx::query_scalar(
        "SELECT serial FROM certificates WHERE kind = ? AND name = ? AND revoked_at IS NULL",
    )
    .bind(kind)
    .bind(name)
    .fetch_all(&mut **transaction)
    .await?;
    sqlx::query(
        "UPDATE certificates SET revoked_at = ? WHERE kind = ? AND name = ? AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(kind)
    .bind(name)
    .execute(&mut **transaction)
    .await?;
    Ok(serials)
}

async fn insert_certificate(
    transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    certificate: &CertificateRecord<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO certificates (serial, kind, name, role, issued_at, not_after) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(certificate.serial)
    .bind(certificate.kind)
    .bind(certificate.name)
    .bind(certificate.role)
    .bind(certificate.issued_at)
    .bind(certificate.not_after)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

fn agent_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<AgentRecord> {
    let json_column = |name: &str| -> Result<String> { Ok(row.try_get::<String, _>(name)?) };
    let operations: Vec<String> =
        serde_json::from_str(&json_column("permitted_operations")?).unwrap_or_default();
    Ok(AgentRecord {
        name: row.try_get("name")?,
        enrolled_at: row.try_get("enrolled_at")?,
        certificate_serial: row.try_get("certificate_serial")?,
        certificate_not_after: row.try_get("certificate_not_after")?,
        revoked_at: row.try_get("revoked_at")?,
        hostname: row.try_get("hostname")?,
        version: row.try_get("version")?,
        labels: serde_json::from_str(&json_column("labels")?).unwrap_or_default(),
        instances: serde_json::from_str(&json_column("instances")?).unwrap_or_default(),
        permitted_operations: operations
            .iter()
            .filter_map(|op| serde_json::from_value(serde_json::Value::String(op.clone())).ok())
            .collect(),
        peer_address: row.try_get("peer_address")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Outcome, verify};

    async fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open_sqlite(&dir.path().join("catalog.sqlite"))
            .await
            .unwrap();
        (dir, catalog)
    }

    #[tokio::test]
    async fn a_tick_leaves_out_only_waiting_jobs_whose_reason_still_holds() {
        let (_dir, catalog) = catalog().await;
        let now = 1_000_000;
        let queued = |id: &str, agent: &str, not_before: i64, reason: &str| {
            let mut job =
                JobRecord::queued(id.into(), JobKind::Backup, agent, "main", "shop", "t", 0);
            job.not_before = not_before;
            job.deadline_at = Some(now + 3_600_000);
            (job, reason.to_string())
        };
        let jobs = [
            // Left out: not due, the engine's reason written.
            queued("slot", "db1", now + 1, "starts at 1970-01-01 00:16:40 UTC"),
            // Left out: due, its agent offline and still not online.
            queued("offline", "db2", now, &offline_reason("db2")),
            // Looked at: not due but never given a reason, or only a
            // retry's; due with an agent now online; due and waiting for
            // something else; past its deadline.
            queued("new", "db1", now + 1, ""),
            queued(
                "retried",
                "db1",
                now + 1,
                &format!("{RETRY_REASON_PREFIX}reset"),
            ),
            queued("back", "db3", now, &offline_reason("db3")),
            queued("busy", "db1", now, "1 job(s) running on db1/main"),
            {
                let (mut job, reason) = queued("late", "db2", now + 1, "starts at later");
                job.deadline_at = Some(now);
                (job, reason)
            },
        ];
        for (job, reason) in &jobs {
            catalog.insert_job(job, None).await.unwrap();
            catalog
                .set_wait_reasons(&[(job.id.clone(), reason.clone())])
                .await
                .unwrap();
        }
        let tick = catalog.tick_jobs(now, &["db3".to_string()]).await.unwrap();
        let mut looked_at: Vec<&str> = tick.jobs.iter().map(|job| job.id.as_str()).collect();
        looked_at.sort_unstable();
        assert_eq!(looked_at, ["back", "busy", "late", "new", "retried"]);
        assert_eq!(tick.still_waiting, 2);
        // With db2 online, its job is looked at too.
        let tick = catalog
            .tick_jobs(now, &["db2".to_string(), "db3".to_string()])
            .await
            .unwrap();
        assert_eq!(tick.jobs.len(), 6);
        assert_eq!(tick.still_waiting, 1);
    }

    #[tokio::test]
    async fn ticks_with_a_limit_go_round_every_queued_job() {
        let (_dir, catalog) = catalog().await;
        for (index, id) in ["j1", "j2", "j3", "j4", "j5"].iter().enumerate() {
            let created = i64::try_from(index).unwrap();
            let job = JobRecord::queued(
                (*id).into(),
                JobKind::Backup,
                "db1",
                "main",
                "shop",
                "t",
                created,
            );
            catalog.insert_job(&job, None).await.unwrap();
        }
        let online = ["db1".to_string()];
        let mut after = None;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let tick = catalog
                .tick_jobs_from(0, &online, after.as_ref(), 2)
                .await
                .unwrap();
            assert_eq!(tick.jobs.len() + tick.still_waiting, 5);
            seen.push(
                tick.jobs
                    .iter()
                    .map(|job| job.id.clone())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            after = tick.next;
        }
        // Oldest first, then on from where the last tick stopped, round
        // to the oldest again.
        assert_eq!(seen, ["j1,j2", "j3,j4", "j5,j1"]);
        assert_eq!(after, Some((0, "j1".to_string())));
        // Without a limit, every one, and nothing to go on from.
        let all = catalog.tick_jobs(0, &online).await.unwrap();
        assert_eq!((all.jobs.len(), all.next), (5, None));
    }

    #[tokio::test]
    async fn a_revocation_committed_during_a_renewal_wins() {
        let (_dir, catalog) = catalog().await;
        let certificate = |serial| CertificateRecord {
            serial,
            kind: "operator",
            name: "bob",
            role: Some("viewer"),
            issued_at: 1,
            not_after: 10_000,
        };
        catalog
            .insert_certificate(&certificate("s1"))
            .await
            .unwrap();
        assert!(
            catalog
                .insert_renewed_certificate("s1", &certificate("s2"))
                .await
                .unwrap()
        );
        catalog.revoke_operator("bob", 5).await.unwrap();
        assert!(
            !catalog
                .insert_renewed_certificate("s2", &certificate("s3"))
                .await
                .unwrap(),
            "a revoked certificate renewed"
        );
        assert!(
            !catalog
                .insert_renewed_certificate("nope", &certificate("s4"))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn tokens_are_single_use_bound_and_expire() {
        let (_dir, catalog) = catalog().await;
        let token = TokenRecord {
            id: "t1".into(),
            agent_name: "db1".into(),
            secret_sha256: "s".into(),
            created_by: "admin".into(),
            created_at: 0,
            expires_at: 1000,
        };
        catalog.insert_token(&token).await.unwrap();
        let check = |id: &'static str, agent: &'static str, secret: &'static str, now: i64| {
            let catalog = &catalog;
            async move { catalog.consume_token(id, agent, secret, now).await.unwrap() }
        };
        assert_eq!(
            check("t1", "db1", "wrong", 10).await,
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            check("nope", "db1", "s", 10).await,
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            check("t1", "db2", "s", 10).await,
            Err(TokenRefusal::WrongAgent {
                bound_to: "db1".into()
            })
        );
        assert_eq!(
            check("t1", "db1", "s", 1000).await,
            Err(TokenRefusal::Expired { expired_at: 1000 })
        );
        assert_eq!(check("t1", "db1", "s", 10).await, Ok(()));
        assert_eq!(
            check("t1", "db1", "s", 11).await,
            Err(TokenRefusal::AlreadyUsed { used_at: 10 })
        );
    }

    #[tokio::test]
    async fn audit_chain_verifies_and_is_append_only() {
        let (_dir, catalog) = catalog().await;
        for i in 0..3 {
            catalog
                .append_audit(&AuditEvent::new(
                    "admin",
                    "test",
                    format!("t{i}"),
                    Outcome::Success,
                    "",
                ))
                .await
                .unwrap();
        }
        let rows = catalog.all_audit().await.unwrap();
        assert_eq!(rows.len(), 3);
        assert!(verify(&rows).ok);
        let update = sqlx::query("UPDATE audit_log SET detail = 'x' WHERE id = 2")
            .execute(&catalog.pool)
            .await;
        assert!(update.is_err(), "the trigger must refuse updates");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_wait_instead_of_failing() {
        let (_dir, catalog) = catalog().await;
        let catalog = std::sync::Arc::new(catalog);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let catalog = catalog.clone();
            tasks.spawn(async move {
                let probe = InstanceProbe::unreachable("main", chrono::Utc::now(), "down".into());
                catalog.insert_probes("db1", &[probe], i, 5).await?;
                catalog
                    .insert_token(&TokenRecord {
                        id: format!("t{i}"),
                        agent_name: "db1".into(),
                        secret_sha256: "s".into(),
                        created_by: "admin".into(),
                        created_at: i,
                        expires_at: i + 1,
                    })
                    .await?;
                catalog
                    .append_audit(&AuditEvent::new(
                        "admin",
                        "test",
                        format!("t{i}"),
                        Outcome::Success,
                        "",
                    ))
                    .await?;
                catalog.touch_agent("db1", i).await
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.unwrap().unwrap();
        }
        let rows = catalog.all_audit().await.unwrap();
        assert_eq!(rows.len(), 40);
        assert!(verify(&rows).ok);
    }

    #[tokio::test]
    async fn enrolling_or_revoking_spends_the_names_other_tokens() {
        let (_dir, catalog) = catalog().await;
        let token = |id: &str| TokenRecord {
            id: id.into(),
            agent_name: "db1".into(),
            secret_sha256: "s".into(),
            created_by: "admin".into(),
            created_at: 0,
            expires_at: i64::MAX,
        };
        catalog.insert_token(&token("copy")).await.unwrap();
        let certificate = CertificateRecord {
            serial: "01",
            kind: "agent",
            name: "db1",
            role: None,
            issued_at: 0,
            not_after: 10,
        };
        catalog.enroll_agent("db1", &certificate, 5).await.unwrap();
        let spent = catalog.consume_token("copy", "db1", "s", 6).await.unwrap();
        assert_eq!(spent, Err(TokenRefusal::AlreadyUsed { used_at: 5 }));

        catalog
            .insert_token(&token("made-before-revoke"))
            .await
            .unwrap();
        catalog.revoke_agent("db1", 7).await.unwrap();
        let spent = catalog
            .consume_token("made-before-revoke", "db1", "s", 8)
            .await
            .unwrap();
        assert_eq!(spent, Err(TokenRefusal::AlreadyUsed { used_at: 7 }));
    }

    #[tokio::test]
    async fn enrollment_needs_revocation_first() {
        let (_dir, catalog) = catalog().await;
        let certificate = |serial| CertificateRecord {
            serial,
            kind: "agent",
            name: "db1",
            role: None,
            issued_at: 0,
            not_after: 10,
        };
        catalog
            .enroll_agent("db1", &certificate("01"), 0)
            .await
            .unwrap();
        let again = catalog.enroll_agent("db1", &certificate("02"), 1).await;
        assert!(matches!(again, Err(CoordinatorError::Conflict(_))));
        assert_eq!(catalog.revoke_agent("db1", 2).await.unwrap(), vec!["01"]);
        catalog
            .enroll_agent("db1", &certificate("03"), 3)
            .await
            .unwrap();
        let agent = catalog.get_agent("db1").await.unwrap().unwrap();
        assert_eq!(agent.certificate_serial, "03");
        assert_eq!(agent.revoked_at, None);
        assert_eq!(catalog.revoked_serials(0).await.unwrap(), vec!["01"]);
        // Past its validity, a revoked certificate need not be remembered.
        assert!(catalog.revoked_serials(11).await.unwrap().is_empty());
        assert_eq!(
            catalog.expired_revoked_serials(11).await.unwrap(),
            vec!["01"]
        );
        assert!(
            catalog
                .expired_revoked_serials(10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A renewal records the new certificate without moving the agent to
    /// it; the first registration with it does, revoking the others; a
    /// replaced or revoked certificate can neither renew nor register, and
    /// a revoked agent cannot renew.
    #[tokio::test]
    async fn renewed_certificates_become_current_at_the_first_connection() {
        let (_dir, catalog) = catalog().await;
        let certificate = |serial, issued_at| CertificateRecord {
            serial,
            kind: "agent",
            name: "db1",
            role: None,
            issued_at,
            not_after: issued_at + 60_000,
        };
        let registration = Registration {
            hostname: "host".into(),
            version: "0.1.0".into(),
            labels: BTreeMap::new(),
            instances: vec!["main".into()],
            permitted_operations: vec![],
            peer_address: "127.0.0.2:1".into(),
        };
        catalog
            .enroll_agent("db1", &certificate("01", 0), 0)
            .await
            .unwrap();
        catalog
            .record_renewal("db1", "01", &certificate("02", 40_000))
            .await
            .unwrap();
        // Still on the first until it connects with the second.
        let agent = catalog.get_agent("db1").await.unwrap().unwrap();
        assert_eq!(agent.certificate_serial, "01");
        let switched = catalog
            .record_registration("db1", "01", 60_000, &registration, 41_000)
            .await
            .unwrap();
        assert_eq!(switched, Some(vec![]));
        let switched = catalog
            .record_registration("db1", "02", 100_000, &registration, 42_000)
            .await
            .unwrap();
        assert_eq!(switched, Some(vec!["01".to_string()]));
        let agent = catalog.get_agent("db1").await.unwrap().unwrap();
        assert_eq!(
            (
                agent.certificate_serial.as_str(),
                agent.certificate_not_after
            ),
            ("02", 100_000)
        );
        assert_eq!(catalog.revoked_serials(0).await.unwrap(), vec!["01"]);
        // The replaced certificate is done for.
        let old = catalog
            .record_registration("db1", "01", 60_000, &registration, 43_000)
            .await
            .unwrap();
        assert_eq!(old, None);
        let renewal = catalog
            .record_renewal("db1", "01", &certificate("03", 43_000))
            .await;
        assert!(
            matches!(renewal, Err(CoordinatorError::PermissionDenied(_))),
            "{renewal:?}"
        );
        // Another agent's serial renews nothing of db1's.
        let renewal = catalog
            .record_renewal("db2", "02", &certificate("04", 43_000))
            .await;
        assert!(
            matches!(renewal, Err(CoordinatorError::NotFound(_))),
            "{renewal:?}"
        );
        catalog.revoke_agent("db1", 44_000).await.unwrap();
        let renewal = catalog
            .record_renewal("db1", "02", &certificate("05", 45_000))
            .await;
        assert!(
            matches!(renewal, Err(CoordinatorError::PermissionDenied(ref m)) if m.contains("revoked")),
            "{renewal:?}"
        );
    }
}
