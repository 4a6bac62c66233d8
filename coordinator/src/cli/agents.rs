//! `cairn agents list|show|revoke`.

use anyhow::Context;
use cairn_common::model::{InstanceProbe, probes_from_wire};
use cairn_common::proto;
use clap::Subcommand;

use super::Connection;
use super::client::explain;
use super::output::AgentView;
use super::output::{self, print_json};

#[derive(Debug, Subcommand)]
pub(super) enum AgentsCommand {
    /// List enrolled agents with their status.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One agent, with its latest probes.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Revoke an agent's certificate; it is refused from its next call on (role: admin).
    Revoke {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
}

pub(super) async fn run(command: AgentsCommand) -> anyhow::Result<i32> {
    match command {
        AgentsCommand::List { connection } => {
            let response = connection
                .admin()
                .await?
                .list_agents(proto::ListAgentsRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            let agents: Vec<AgentView> = response.agents.into_iter().map(Into::into).collect();
            if connection.json() {
                print_json(&agents)?;
            } else if agents.is_empty() {
                println!("No agents enrolled yet: cairn token create --agent NAME");
            } else {
                println!("{}", output::agents_table(&agents));
            }
            Ok(0)
        }
        AgentsCommand::Show { name, connection } => {
            let response = connection
                .admin()
                .await?
                .get_agent(proto::GetAgentRequest { agent_name: name })
                .await
                .map_err(explain)?
                .into_inner();
            let agent: AgentView = response
                .agent
                .context("the coordinator sent no agent")?
                .into();
            let probes = probes_from_wire(response.probes);
            connection.show(&serde_json::json!({ "agent": agent, "probes": probes }), || {
                println!("{}", output::agent_detail(&agent));
                let mut seen = std::collections::HashSet::new();
                let latest: Vec<InstanceProbe> = probes
                    .iter()
                    .filter(|p| seen.insert(p.instance.clone()))
                    .cloned()
                    .collect();
                if latest.is_empty() {
                    println!("\nNo probes yet.");
                } else {
                    println!(
                        "\nLatest probe per instance (history: {} probes in all; --output json lists them):",
                        probes.len()
                    );
                    println!("{}", output::probes_table(&latest));
                }
            })?;
            Ok(0)
        }
        AgentsCommand::Revoke { name, connection } => {
            let response = connection
                .admin()
                .await?
                .revoke_agent(proto::RevokeAgentRequest {
                    agent_name: name.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            let revoked_at = cairn_common::model::time_from_unix_ms(response.revoked_at_unix_ms);
            connection.show(&serde_json::json!({ "agent": name, "revoked_at": revoked_at }), || {
                println!(
                    "Revoked agent {name}: its certificate is refused from now on. To enroll it again: cairn token create --agent {name}"
                );
            })?;
            Ok(0)
        }
    }
}
