//! What a schedule covers, worked out when it fires: the agents it names
//! or whose labels match its selector (so an agent enrolled later with
//! those labels is covered from the next fire), each of their instances,
//! and the databases it names or, with `--all-databases`, those the
//! instance's latest successful probe listed (templates are never listed).

use std::collections::BTreeMap;

use crate::catalog::{AgentScope, Catalog, ScheduleRecord};
use crate::error::Result;

/// One database of one instance: what a scheduled job protects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub agent: String,
    pub instance: String,
    pub database: String,
}

impl Target {
    /// `agent/instance/database`: the key of the unique (schedule, target,
    /// fire) and of the spread slot.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.agent, self.instance, self.database)
    }
}

/// Whether an agent's labels carry every label of `selector`.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// The agents a schedule names or selects, not revoked, by name.
pub async fn agents_of(catalog: &Catalog, schedule: &ScheduleRecord) -> Result<Vec<AgentScope>> {
    Ok(match &schedule.agent_name {
        Some(name) => catalog.agent_scopes(Some(name)).await?,
        None => {
            let selector = schedule.selector()?;
            catalog
                .agent_scopes(None)
                .await?
                .into_iter()
                .filter(|agent| matches(&selector, &agent.labels))
                .collect()
        }
    })
}

/// The schedule's targets now, sorted, and why some agents or instances
/// are left out (no probe yet to list their databases).
pub async fn targets(
    catalog: &Catalog,
    schedule: &ScheduleRecord,
) -> Result<(Vec<Target>, Vec<String>)> {
    let mut targets = Vec::new();
    let mut problems = Vec::new();
    let named = schedule.databases()?;
    for agent in agents_of(catalog, schedule).await? {
        let probes = if schedule.all_databases {
            catalog.probes_of(&agent.name).await?
        } else {
            Vec::new()
        };
        for instance in &agent.instances {
            let databases: Vec<String> = if schedule.all_databases {
                match probes
                    .iter()
                    .find(|probe| &probe.instance == instance && probe.reachable)
                {
                    Some(probe) => probe.databases.iter().map(|d| d.name.clone()).collect(),
                    None => {
                        problems.push(format!(
                            "{}/{instance}: no successful probe yet, so its databases are not known",
                            agent.name
                        ));
                        continue;
                    }
                }
            } else {
                named.clone()
            };
            for database in databases {
                targets.push(Target {
                    agent: agent.name.clone(),
                    instance: instance.clone(),
                    database,
                });
            }
        }
    }
    targets.sort();
    targets.dedup();
    Ok((targets, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selector_matches_agents_carrying_all_its_labels() {
        let labels = BTreeMap::from([
            ("env".to_string(), "prod".to_string()),
            ("region".to_string(), "eu".to_string()),
        ]);
        let select = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(matches(&select(&[("env", "prod")]), &labels));
        assert!(matches(
            &select(&[("env", "prod"), ("region", "eu")]),
            &labels
        ));
        assert!(!matches(&select(&[("env", "staging")]), &labels));
        assert!(!matches(
            &select(&[("env", "prod"), ("tier", "db")]),
            &labels
        ));
    }
}
