//! `cairn coverage`: every database the fleet's probes know (each
//! instance's latest successful probe), the backup schedules that cover it
//! now, and its newest complete backup, so the uncovered and the stale
//! stand out.

use std::collections::{BTreeMap, HashMap};

use super::targets::{matches, targets};
use crate::catalog::{BackupRecord, ScheduleKind};
use crate::error::Result;
use crate::jobs::Jobs;

/// One database and what protects it.
#[derive(Debug, Clone)]
pub struct CoverageRow {
    pub agent: String,
    pub instance: String,
    pub database: String,
    /// Backup schedules, not paused, whose targets include it.
    pub schedules: Vec<String>,
    pub last_backup: Option<BackupRecord>,
}

impl Jobs {
    /// The coverage of every database of the agents whose labels match
    /// `selector` (all agents when it is empty), sorted.
    pub async fn coverage(&self, selector: &BTreeMap<String, String>) -> Result<Vec<CoverageRow>> {
        let mut covering: HashMap<String, Vec<String>> = HashMap::new();
        for schedule in self.catalog.list_schedules().await? {
            if schedule.paused || schedule.kind != ScheduleKind::Backup {
                continue;
            }
            let (found, _) = targets(&self.catalog, &schedule).await?;
            for target in found {
                covering
                    .entry(target.key())
                    .or_default()
                    .push(schedule.name.clone());
            }
        }
        let mut rows = Vec::new();
        for agent in self.catalog.list_agents().await? {
            if agent.revoked_at.is_some() || !matches(selector, &agent.labels) {
                continue;
            }
            let probes = self.catalog.probes_of(&agent.name).await?;
            for instance in &agent.instances {
                let Some(probe) = probes
                    .iter()
                    .find(|probe| &probe.instance == instance && probe.reachable)
                else {
                    continue;
                };
                for database in &probe.databases {
                    let key = format!("{}/{instance}/{}", agent.name, database.name);
                    let backups = self
                        .catalog
                        .list_backups(Some(&agent.name), Some(&database.name), None, 20)
                        .await?;
                    rows.push(CoverageRow {
                        agent: agent.name.clone(),
                        instance: instance.clone(),
                        database: database.name.clone(),
                        schedules: covering.remove(&key).unwrap_or_default(),
                        last_backup: backups.into_iter().find(|b| &b.instance == instance),
                    });
                }
            }
        }
        rows.sort_by(|a, b| {
            (&a.agent, &a.instance, &a.database).cmp(&(&b.agent, &b.instance, &b.database))
        });
        Ok(rows)
    }
}
