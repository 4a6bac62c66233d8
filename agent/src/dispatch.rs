//! Executing the coordinator's commands, behind this host's own permission
//! gate: an operation the agent's config does not allow is refused whatever
//! the coordinator says, and the refusal is reported (the coordinator
//! audits it).

use std::time::Duration;

use cairn_common::model::Operation;
use cairn_common::proto::{self, command, command_result};
use tracing::Instrument;

use crate::backup;
use crate::config::AgentConfig;
use crate::jobs::{JobEnd, RunningJobs};
use crate::postgres;
use crate::restore;

/// What commands run with: the config, the channel to the coordinator (for
/// a job's own data stream) and the running jobs (for cancellation).
#[derive(Debug, Clone)]
pub struct Context {
    pub config: std::sync::Arc<AgentConfig>,
    pub channel: tonic::transport::Channel,
    pub jobs: std::sync::Arc<RunningJobs>,
}

/// How long one instance's probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The operation a command needs, if any (probes need none).
fn required_operation(kind: &command::Kind) -> Option<Operation> {
    match kind {
        command::Kind::Probe(_) | command::Kind::Cancel(_) => None,
        command::Kind::Backup(_) => Some(Operation::Backup),
        command::Kind::Restore(_) => Some(Operation::Restore),
        command::Kind::Replica(_) => Some(Operation::Replica),
        command::Kind::Promote(_) => Some(Operation::Promote),
    }
}

/// Runs one command and returns its result message.
pub async fn execute(context: &Context, command: proto::Command) -> proto::CommandResult {
    let config = context.config.as_ref();
    let span = tracing::info_span!(
        "command",
        command_id = %command.command_id,
        term = command.term,
        attempt_id = %command.attempt_id
    );
    let command_id = command.command_id.clone();
    let attempt_id = command.attempt_id.clone();
    let outcome = async {
        let Some(kind) = command.kind else {
            return command_result::Outcome::Error("the command has no kind".into());
        };
        if let Err(newest) = context.jobs.accept_term(command.term) {
            tracing::warn!(term = command.term, newest, "refused a command of an older coordinator term");
            return command_result::Outcome::Error(format!(
                "refused: the command carries coordinator term {}, older than term {newest} \
                 this agent has seen (a coordinator that was replaced sent it)",
                command.term
            ));
        }
        if let Some(operation) = required_operation(&kind)
            && !config.permits(operation)
        {
            let reason = format!(
                "agent {} does not permit {operation}: its config allows [{}] (permissions.allow in agent.toml)",
                config.name,
                config
                    .permissions
                    .allow
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            tracing::warn!(%operation, "refused a command this host does not permit");
            return command_result::Outcome::Refused(proto::Refusal {
                operation: proto::Operation::from(operation) as i32,
                reason,
            });
        }
        match kind {
            command::Kind::Probe(probe) => {
                command_result::Outcome::Probe(probe_instances(config, &probe.instances).await)
            }
            command::Kind::Backup(backup_command) => {
                let job_id = backup_command.job_id.clone();
                let span = tracing::info_span!("job", job_id = %job_id, database = %backup_command.database);
                match backup::run(config, context.channel.clone(), &context.jobs, &attempt_id, backup_command)
                    .instrument(span)
                    .await
                {
                    Ok(()) => command_result::Outcome::JobDone(proto::JobDone {
                        job_id,
                        restore: None,
                    }),
                    Err(end) => job_end(job_id, end),
                }
            }
            command::Kind::Restore(restore_command) => {
                let job_id = restore_command.job_id.clone();
                let span = tracing::info_span!(
                    "job",
                    job_id = %job_id,
                    database = %restore_command.database,
                    drill = restore_command.drill
                );
                match restore::run(config, context.channel.clone(), &context.jobs, &attempt_id, restore_command)
                    .instrument(span)
                    .await
                {
                    Ok(report) => command_result::Outcome::JobDone(proto::JobDone {
                        job_id,
                        restore: Some(report),
                    }),
                    Err(end) => job_end(job_id, end),
                }
            }
            command::Kind::Cancel(cancel) => {
                if context.jobs.cancel_attempt(&cancel.job_id, &cancel.attempt_id) {
                    command_result::Outcome::JobDone(proto::JobDone {
                        job_id: cancel.job_id,
                        restore: None,
                    })
                } else {
                    command_result::Outcome::Error(format!("no running job {}", cancel.job_id))
                }
            }
            other => command_result::Outcome::Error(format!(
                "{} is permitted here but not supported by cairn-agent {}",
                required_operation(&other).map(|o| o.as_str()).unwrap_or("this command"),
                cairn_common::VERSION
            )),
        }
    }
    .instrument(span)
    .await;
    proto::CommandResult {
        command_id,
        attempt_id,
        outcome: Some(outcome),
    }
}

/// A job's end short of done, as its command's outcome.
fn job_end(job_id: String, end: JobEnd) -> command_result::Outcome {
    match end {
        JobEnd::Cancelled(detail) => {
            command_result::Outcome::Cancelled(proto::JobCancelled { job_id, detail })
        }
        JobEnd::Failed(error) => command_result::Outcome::Error(error),
        JobEnd::Interrupted(error) => command_result::Outcome::Interrupted(error),
    }
}

/// Probes the named instances (all when `names` is empty), concurrently,
/// in config order.
pub async fn probe_instances(config: &AgentConfig, names: &[String]) -> proto::ProbeResult {
    let mut tasks = tokio::task::JoinSet::new();
    let selected = config
        .instances
        .iter()
        .filter(|i| names.is_empty() || names.iter().any(|n| n == i.name.as_str()));
    for (index, instance) in selected.enumerate() {
        let name = instance.name.to_string();
        let connection = instance.postgres.clone();
        tasks.spawn(async move {
            (
                index,
                postgres::probe(&name, &connection, PROBE_TIMEOUT).await,
            )
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(error) => tracing::error!(%error, "a probe task failed"),
        }
    }
    results.sort_by_key(|(index, _)| *index);
    proto::ProbeResult {
        instances: results.into_iter().map(|(_, probe)| probe.into()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_common::config::parse_toml;
    use std::path::Path;

    fn config(allow: &str) -> AgentConfig {
        parse_toml(
            &format!(
                "name = \"db1\"\ncoordinator = \"https://127.0.0.1:1\"\nidentity_dir = \"i\"\n[permissions]\nallow = [{allow}]\n[[instances]]\nname = \"main\"\npostgres = \"host=127.0.0.1 port=1 user=postgres\"\n"
            ),
            Path::new("agent.toml"),
        )
        .unwrap()
    }

    fn command(kind: command::Kind) -> proto::Command {
        proto::Command {
            command_id: "c1".into(),
            kind: Some(kind),
            term: 1,
            attempt_id: String::new(),
        }
    }

    fn context(allow: &str) -> Context {
        Context {
            config: std::sync::Arc::new(config(allow)),
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            jobs: Default::default(),
        }
    }

    async fn check(allow: &str, kind: command::Kind, expect_refused: bool) {
        let result = execute(&context(allow), command(kind.clone())).await;
        assert_eq!(result.command_id, "c1");
        let refused = matches!(result.outcome, Some(command_result::Outcome::Refused(_)));
        assert_eq!(
            refused, expect_refused,
            "allow=[{allow}] kind={kind:?}: {result:?}"
        );
    }

    #[tokio::test]
    async fn operations_outside_the_config_are_refused() {
        let restore = command::Kind::Restore(proto::RestoreCommand::default());
        let promote = command::Kind::Promote(proto::PromoteCommand::default());
        let backup = command::Kind::Backup(proto::BackupCommand::default());
        let replica = command::Kind::Replica(proto::ReplicaCommand::default());
        check("\"backup\"", restore.clone(), true).await;
        check("\"backup\"", promote.clone(), true).await;
        check("\"backup\"", replica.clone(), true).await;
        check("\"backup\"", backup.clone(), false).await;
        check("", backup, true).await;
        check("\"restore\", \"promote\"", restore, false).await;
        check("\"restore\", \"promote\"", promote, false).await;
    }

    #[tokio::test]
    async fn a_command_for_a_job_already_running_here_is_refused() {
        let context = context("\"backup\", \"restore\"");
        let running = context.jobs.register("j1", "a1").unwrap();
        for kind in [
            command::Kind::Backup(proto::BackupCommand {
                job_id: "j1".into(),
                ..Default::default()
            }),
            command::Kind::Restore(proto::RestoreCommand {
                job_id: "j1".into(),
                ..Default::default()
            }),
        ] {
            let result = execute(&context, command(kind)).await;
            // Refused as retryable: the attempt still here winds down.
            let Some(command_result::Outcome::Interrupted(error)) = &result.outcome else {
                panic!("expected a refusal: {result:?}");
            };
            assert!(error.contains("job j1 is already running"), "{error}");
        }
        // The running job is still the one a cancel reaches.
        assert!(context.jobs.cancel("j1"));
        assert!(running.token.is_cancelled());
    }

    #[tokio::test]
    async fn probes_are_always_allowed() {
        let result = execute(
            &context(""),
            command(command::Kind::Probe(proto::ProbeCommand::default())),
        )
        .await;
        let Some(command_result::Outcome::Probe(probe)) = result.outcome else {
            panic!("expected a probe result: {result:?}");
        };
        assert_eq!(probe.instances.len(), 1);
        assert!(!probe.instances[0].reachable, "nothing listens on port 1");
    }
}
