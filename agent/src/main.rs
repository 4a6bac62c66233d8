//! The `cairn-agent` binary: parses arguments, sets up logging, runs.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_agent::config::AgentConfig;
use cairn_agent::enroll::{EnrollOptions, enroll};
use cairn_agent::spool::SpoolLock;
use cairn_common::model::Operation;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Cairn agent: runs on a database host, dials out to the coordinator and
/// executes what its own config permits.
// No Debug: the parsed arguments hold the token and the connection string.
#[derive(Parser)]
#[command(name = "cairn-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at startup
enum Command {
    /// Enroll this host with a one-time token; writes DIR/agent.toml and DIR/identity/.
    Enroll {
        /// The coordinator's gRPC address, https://HOST:PORT.
        #[arg(long)]
        coordinator: String,
        /// The token printed by `cairn token create` (or set CAIRN_ENROLL_TOKEN,
        /// which keeps it out of the process list).
        #[arg(long, env = "CAIRN_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// The directory for the agent's config and identity: a new one is
        /// created, an existing one must be empty (it may be made beforehand,
        /// owned by this user, in a parent only root can write).
        #[arg(long)]
        dir: PathBuf,
        /// libpq URL or key=value connection string of the local instance
        /// (or set CAIRN_POSTGRES, which keeps a password out of the process list).
        #[arg(long, env = "CAIRN_POSTGRES", hide_env_values = true)]
        postgres: String,
        /// The agent name; defaults to the name the token was made for.
        #[arg(long)]
        name: Option<String>,
        /// The name of this instance within the agent.
        #[arg(long, default_value = "main")]
        instance_name: String,
        /// A label key=value describing this host (repeatable, each key
        /// once), such as env=prod: labels describe an agent and are what
        /// selectors match; `cairn backup run --tag` describes one backup.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// An operation this host permits: backup, restore, replica, promote
        /// (repeatable; default: backup only).
        #[arg(long = "allow", value_parser = parse_operation)]
        allow: Vec<Operation>,
        /// Local address to dial from.
        #[arg(long)]
        source_address: Option<IpAddr>,
        /// How often to probe the instance.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        probe_interval: Duration,
    },
    /// Run the agent (SIGTERM stops it). It renews its certificate by itself
    /// at two thirds of the certificate's lifetime, replacing the key and
    /// certificate in identity/ together, and reconnects with the new one
    /// once no job runs.
    Run {
        /// Path to agent.toml.
        #[arg(long)]
        config: PathBuf,
    },
}

fn parse_operation(text: &str) -> Result<Operation, String> {
    Operation::ALL
        .into_iter()
        .find(|op| op.as_str() == text)
        .ok_or_else(|| {
            format!("{text:?} is not an operation: use backup, restore, replica or promote")
        })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } => "info",
        Command::Enroll { .. } => "warn",
    };
    let filter =
        EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only on a terminal: a log file or journal gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            coordinator,
            token,
            dir,
            postgres,
            name,
            instance_name,
            labels,
            allow,
            source_address,
            probe_interval,
        } => {
            let allow = if allow.is_empty() {
                vec![Operation::Backup]
            } else {
                allow
            };
            let enrolled = enroll(&EnrollOptions {
                coordinator,
                token,
                name,
                dir,
                postgres,
                instance_name,
                labels,
                allow,
                source_address,
                probe_interval,
            })
            .await?;
            println!(
                "Enrolled agent {} (PostgreSQL {}). Start it with:\n  cairn-agent run --config {}",
                enrolled.name,
                enrolled.server_version,
                enrolled.config_file.display()
            );
            Ok(())
        }
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            // Held until the agent stops: no other agent uses this spool
            // directory meanwhile, so what is left in it now is ours.
            let _spool = SpoolLock::acquire(&config.spool_dir())
                .map_err(|message| anyhow::anyhow!("{message}"))
                .context("key `spool_dir` of agent.toml")?;
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                if let (Ok(mut terminate), Ok(mut interrupt)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                    tracing::info!("stopping");
                    stop.cancel();
                }
            });
            tracing::info!(agent = %config.name, instances = config.instances.len(), "cairn-agent starting");
            cairn_agent::control::run(config, shutdown)
                .await
                .context("the agent stopped")?;
            Ok(())
        }
    }
}
