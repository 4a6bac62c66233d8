//! `cairn token create`: one-time enrollment tokens.

use std::time::Duration;

use cairn_common::proto;
use clap::Subcommand;

use super::Connection;
use super::client::explain;
use super::parse_ttl;

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Make a one-time enrollment token for one agent name (role: admin).
    Create {
        /// The agent name the token may enroll: [a-z0-9][a-z0-9-]{0,62}.
        #[arg(long)]
        agent: String,
        /// How long the token stays valid (1m to fleet.max_token_ttl).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        #[command(flatten)]
        connection: Connection,
    },
}

pub(super) async fn run(command: TokenCommand) -> anyhow::Result<i32> {
    match command {
        TokenCommand::Create {
            agent,
            ttl,
            connection,
        } => {
            let agent = cairn_common::names::AgentName::new(agent)?.to_string();
            let response = connection
                .admin()
                .await?
                .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
                    agent_name: agent.clone(),
                    ttl_seconds: ttl.as_secs(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            let expires_at = cairn_common::model::time_from_unix_ms(response.expires_at_unix_ms);
            connection.show(&serde_json::json!({
                    "agent": agent,
                    "token": response.token,
                    "expires_at": expires_at,
                }), || {
                println!("{}", response.token);
                eprintln!(
                    "One-time token for agent {agent}, valid until {}. On the database host run:\n  cairn-agent enroll --coordinator {} --token <TOKEN> --dir DIR --postgres CONNSTRING",
                    expires_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    connection.coordinator
                );
            })?;
            Ok(0)
        }
    }
}
