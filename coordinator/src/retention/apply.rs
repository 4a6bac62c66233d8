//! `cairn retention apply` (and the automatic runs after scheduled
//! backups and once a day): a stored policy applied to the catalog's
//! backups, one database lineage at a time, with the guards on top of the
//! rules, then the deletions.
//!
//! The guards, each with its own keep reason: the newest complete backup
//! of a lineage is never deleted; nothing is deleted unless a newer
//! complete backup of the lineage exists; backups a queued or running
//! restore or drill reads are kept; protected backups are kept; a policy
//! whose rules would remove every backup of a lineage is refused for that
//! lineage (nothing deleted). [`plan_lineage`] is pure; [`apply`] reads the
//! catalog, deletes and audits.
//!
//! A deletion is three steps (see `catalog/retention`): mark the row, delete
//! the manifest, delete the row and its chunk references. Chunks stay for
//! the garbage collector.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::{Candidate, Fate, KeepReason, Policy, decide};
use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{Catalog, Lineage, LineageBackup};
use crate::error::{CoordinatorError, Result};
use crate::repository::manifest::Manifest;
use crate::repository::{Repository, RepositoryError};

/// A guard that keeps a backup whatever the rules say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// The newest complete backup of its lineage.
    Newest,
    /// No complete backup of its lineage is newer.
    NoNewerBackup,
    /// A queued or running restore or drill reads it.
    InUse,
    /// `cairn backups protect`.
    Protected,
    /// The rules would remove every backup of the lineage.
    RemovesEverything,
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Guard::Newest => "guard: newest complete backup",
            Guard::NoNewerBackup => "guard: no newer complete backup",
            Guard::InUse => "guard: read by a queued or running restore or drill",
            Guard::Protected => "guard: protected",
            Guard::RemovesEverything => "guard: the policy would remove every backup",
        })
    }
}

/// One backup of a lineage and what becomes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub backup: LineageBackup,
    pub time: DateTime<Utc>,
    /// After the guards.
    pub fate: Fate,
    /// The rules that keep it.
    pub rules: Vec<KeepReason>,
    /// The guards that keep it.
    pub guards: Vec<Guard>,
}

impl Planned {
    /// Every rule and guard that keeps it, as `--dry-run` prints them.
    pub fn kept_by(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(ToString::to_string)
            .chain(self.guards.iter().map(ToString::to_string))
            .collect()
    }
}

/// A lineage's backups, newest first, and whether the policy was refused
/// for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineagePlan {
    pub lineage: Lineage,
    pub backups: Vec<Planned>,
    pub refused: Option<String>,
}

/// Decides the fate of every backup of one lineage: `policy`'s rules in
/// `zone`, then the guards (`in_use`: the ids queued or running restores
/// and drills read).
pub fn plan_lineage(
    lineage: Lineage,
    policy: &Policy,
    backups: Vec<LineageBackup>,
    in_use: &HashSet<String>,
    zone: Tz,
    now: DateTime<Utc>,
) -> Result<LineagePlan> {
    let candidates: Vec<Candidate<String>> = backups
        .iter()
        .map(|backup| Candidate {
            id: backup.id.clone(),
            time: time_of(backup.finished_at),
        })
        .collect();
    let decisions = decide(policy, &candidates, zone, now)?;
    let mut by_id: std::collections::HashMap<String, LineageBackup> = backups
        .into_iter()
        .map(|backup| (backup.id.clone(), backup))
        .collect();
    let mut planned = Vec::with_capacity(decisions.len());
    for decision in decisions {
        let Some(backup) = by_id.remove(&decision.id) else {
            continue;
        };
        planned.push(Planned {
            backup,
            time: decision.time,
            fate: decision.fate,
            rules: decision.reasons,
            guards: Vec::new(),
        });
    }
    Ok(guard(lineage, planned, in_use))
}

/// The guards over the rules' decisions (`planned`, newest first, `fate`
/// as the rules decided).
pub fn guard(lineage: Lineage, mut planned: Vec<Planned>, in_use: &HashSet<String>) -> LineagePlan {
    let newest_time = planned.iter().map(|p| p.time).max();
    let removes_everything = !planned.is_empty() && planned.iter().all(|p| p.fate == Fate::Remove);
    for (position, backup) in planned.iter_mut().enumerate() {
        if position == 0 {
            backup.guards.push(Guard::Newest);
        }
        // Strictly newer: of two backups dated alike, neither is removed
        // for the other.
        if newest_time.is_none_or(|newest| newest <= backup.time) {
            backup.guards.push(Guard::NoNewerBackup);
        }
        if in_use.contains(&backup.backup.id) {
            backup.guards.push(Guard::InUse);
        }
        if backup.backup.protected {
            backup.guards.push(Guard::Protected);
        }
        if removes_everything {
            backup.guards.push(Guard::RemovesEverything);
        }
        if !backup.guards.is_empty() {
            backup.fate = Fate::Keep;
        }
    }
    let refused = removes_everything.then(|| {
        format!(
            "refused for {lineage}: the policy's rules would remove all {} of its backups; \
             nothing was deleted. Add a rule that keeps recent backups (such as --keep-last 1)",
            planned.len()
        )
    });
    LineagePlan {
        lineage,
        backups: planned,
        refused,
    }
}

fn time_of(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

/// Which lineages an apply looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Backups made by these agents; `None`: every agent.
    pub agents: Option<Vec<String>>,
    /// Backups of these databases; `None`: every database.
    pub databases: Option<Vec<String>>,
}

/// What an apply is asked to do.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub policy_name: String,
    pub policy: Policy,
    pub scope: Scope,
    pub dry_run: bool,
    pub zone: Tz,
    /// Who applies it, for the audit log.
    pub actor: String,
}

/// How one removed backup's deletion went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Deletion {
    Deleted,
    /// Not deleted, and why.
    Failed(String),
}

/// A lineage's plan and, on a real run, each removed backup's deletion.
#[derive(Debug, Clone)]
pub struct LineageReport {
    pub plan: LineagePlan,
    /// By backup id; empty on a dry run.
    pub deletions: std::collections::BTreeMap<String, Deletion>,
}

impl LineageReport {
    pub fn kept(&self) -> usize {
        self.plan
            .backups
            .iter()
            .filter(|b| b.fate == Fate::Keep)
            .count()
    }

    pub fn removed(&self) -> usize {
        self.plan.backups.len() - self.kept()
    }

    pub fn deleted(&self) -> usize {
        self.deletions
            .values()
            .filter(|d| **d == Deletion::Deleted)
            .count()
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    pub lineages: Vec<LineageReport>,
    /// Deletions an earlier run left unfinished, finished by this one.
    pub finished_deletions: Vec<String>,
}

/// Everything a deletion needs.
#[derive(Debug, Clone, Copy)]
pub struct Deleter<'a> {
    pub catalog: &'a Catalog,
    pub repository: &'a Repository,
    pub audit: &'a AuditLog,
}

impl Deleter<'_> {
    /// Applies a policy to every lineage in scope: plans, and unless a dry
    /// run, finishes earlier deletions and deletes what is removed. One
    /// audit row per lineage (counts) and one per deleted backup.
    pub async fn apply(&self, request: &ApplyRequest, now: DateTime<Utc>) -> Result<ApplyReport> {
        request.policy.validate()?;
        let mut report = ApplyReport::default();
        if !request.dry_run {
            report.finished_deletions = self.finish_pending().await?;
        }
        let lineages = self
            .catalog
            .lineages_in_scope(
                request.scope.agents.as_deref(),
                request.scope.databases.as_deref(),
            )
            .await?;
        for lineage in lineages {
            report
                .lineages
                .push(self.apply_to(request, lineage, now).await?);
        }
        Ok(report)
    }

    /// Applies a policy to one lineage.
    pub async fn apply_to(
        &self,
        request: &ApplyRequest,
        lineage: Lineage,
        now: DateTime<Utc>,
    ) -> Result<LineageReport> {
        let in_use: HashSet<String> = self.catalog.backups_in_use().await?.into_iter().collect();
        let backups = self.catalog.lineage_backups(&lineage).await?;
        let plan = plan_lineage(
            lineage,
            &request.policy,
            backups,
            &in_use,
            request.zone,
            now,
        )?;
        Ok(self.execute(request, plan, now).await)
    }

    /// Carries out a lineage's plan: audits a refusal and deletes nothing,
    /// or (unless a dry run) deletes what it removes.
    pub async fn execute(
        &self,
        request: &ApplyRequest,
        plan: LineagePlan,
        now: DateTime<Utc>,
    ) -> LineageReport {
        let mut report = LineageReport {
            plan,
            deletions: std::collections::BTreeMap::new(),
        };
        let target = format!("{} ({})", request.policy_name, report.plan.lineage);
        if let Some(refusal) = &report.plan.refused {
            tracing::warn!(policy = %request.policy_name, lineage = %report.plan.lineage, "retention refused");
            self.audit
                .record(AuditEvent::new(
                    request.actor.clone(),
                    "retention.apply",
                    target,
                    Outcome::Refused,
                    refusal.clone(),
                ))
                .await;
            return report;
        }
        if !request.dry_run {
            let removed: Vec<String> = report
                .plan
                .backups
                .iter()
                .filter(|b| b.fate == Fate::Remove)
                .map(|b| b.backup.id.clone())
                .collect();
            for id in removed {
                let deletion = self.delete(&id, now.timestamp_millis()).await;
                let (outcome, detail) = match &deletion {
                    Deletion::Deleted => (
                        Outcome::Success,
                        format!(
                            "removed by retention policy {} ({})",
                            request.policy_name, report.plan.lineage
                        ),
                    ),
                    Deletion::Failed(error) => (Outcome::Failed, error.clone()),
                };
                self.audit
                    .record(AuditEvent::new(
                        request.actor.clone(),
                        "backup.delete",
                        id.clone(),
                        outcome,
                        detail,
                    ))
                    .await;
                report.deletions.insert(id, deletion);
            }
        }
        let failed = report.deletions.len() - report.deleted();
        self.audit
            .record(AuditEvent::new(
                request.actor.clone(),
                "retention.apply",
                target,
                if failed == 0 {
                    Outcome::Success
                } else {
                    Outcome::Failed
                },
                format!(
                    "{}{} backups: {} kept, {} removed, {} deleted, {failed} not deleted",
                    if request.dry_run { "dry run; " } else { "" },
                    report.plan.backups.len(),
                    report.kept(),
                    report.removed(),
                    report.deleted()
                ),
            ))
            .await;
        report
    }

    /// Deletes one backup: mark, manifest, row. A backup that became
    /// protected or in use since the plan is not marked, so not deleted.
    async fn delete(&self, id: &str, now_ms: i64) -> Deletion {
        match self.catalog.mark_backup_deleting(id, now_ms).await {
            Ok(true) => {}
            Ok(false) => {
                return Deletion::Failed(format!(
                    "backup {id} was not deleted: since the plan it was protected, taken by a \
                     restore or drill, or deleted by another run"
                ));
            }
            Err(error) => return Deletion::Failed(format!("backup {id}: {error}")),
        }
        match self.finish(id).await {
            Ok(()) => Deletion::Deleted,
            Err(error) => Deletion::Failed(format!(
                "backup {id} is marked for deletion (no longer listed) but {error}; the next \
                 retention apply or coordinator start finishes it"
            )),
        }
    }

    /// The steps after the mark: the manifest (a missing one is already
    /// gone), then the row and its chunk references.
    async fn finish(&self, id: &str) -> Result<()> {
        let key = Manifest::key(id).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        match self.repository.store.delete(&key).await {
            Ok(()) | Err(RepositoryError::NotFound(_)) => {}
            Err(error) => {
                return Err(CoordinatorError::Unavailable(format!(
                    "its manifest could not be deleted: {error}"
                )));
            }
        }
        self.catalog.finish_backup_deletion(id).await?;
        Ok(())
    }

    /// Finishes the deletions an interrupted run left (marked rows).
    /// Returns the ids finished.
    pub async fn finish_pending(&self) -> Result<Vec<String>> {
        let mut finished = Vec::new();
        for id in self.catalog.backups_being_deleted().await? {
            self.finish(&id).await?;
            self.audit
                .record(AuditEvent::new(
                    "coordinator",
                    "backup.delete",
                    id.clone(),
                    Outcome::Success,
                    "finished a deletion an interrupted retention run left",
                ))
                .await;
            finished.push(id);
        }
        Ok(finished)
    }
}
