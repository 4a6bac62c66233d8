//! The `cairn` command line: `init` and `serve` for the coordinator itself,
//! and the operator commands, which call the Admin API over mTLS.

mod agents;
mod audit;
mod backups;
mod client;
mod jobs;
mod keys;
mod operators;
mod output;
mod pages;
mod repository;
mod restores;
mod retention;
mod schedules;
mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use cairn_common::model::probes_from_wire;
use cairn_common::proto;
use cairn_coordinator::config::CoordinatorConfig;
use cairn_coordinator::server::home::{InitOptions, init};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use client::{connect, explain};
use output::{OutputFormat, print_json};

/// Cairn: fleet-wide PostgreSQL backups, restores and health, driven from
/// one coordinator.
#[derive(Debug, Parser)]
#[command(name = "cairn", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Connection {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        env = "CAIRN_COORDINATOR",
        default_value = "https://127.0.0.1:7443",
        global = true
    )]
    coordinator: String,
    /// Directory with your operator identity: ca.pem, cert.pem, key.pem
    /// (cairn init writes one to HOME/admin).
    #[arg(long, env = "CAIRN_IDENTITY", global = true)]
    identity: Option<PathBuf>,
    /// Output format of listings.
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: OutputFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a ready-to-run coordinator home (config, fleet CA, server
    /// certificate, master key, admin identity, SQLite catalog, local
    /// repository). Prints the fleet CA's expiry (ten years).
    Init {
        /// The home directory to create; must not exist or be empty.
        #[arg(long)]
        dir: PathBuf,
        /// gRPC listen address for agents and operators.
        #[arg(long, default_value = "127.0.0.1:7443")]
        grpc_listen: SocketAddr,
        /// HTTP listen address for /healthz, /readyz and /metrics.
        #[arg(long, default_value = "127.0.0.1:7080")]
        http_listen: SocketAddr,
        /// Extra DNS name or address for the server certificate (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
    },
    /// Run the coordinator (SIGTERM stops it cleanly).
    Serve {
        /// Path to coordinator.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// The fleet's agents.
    #[command(subcommand)]
    Agents(agents::AgentsCommand),
    /// Probe an agent's PostgreSQL instances now.
    Probe {
        /// Agent name.
        name: String,
        /// How long to wait for the answer (the coordinator allows at most 2m).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        connection: Connection,
    },
    /// The append-only audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Operator identities.
    #[command(subcommand)]
    Operators(operators::OperatorsCommand),
    /// Run a backup, or verify one (every chunk, or a restore drill).
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Complete backups.
    #[command(subcommand)]
    Backups(BackupsCommand),
    /// Jobs: backups, restores and drills, queued, running and finished.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Fleet schedules: backups (or drills) on a cron, by agent or label.
    #[command(subcommand)]
    Schedule(schedules::ScheduleCommand),
    /// Retention policies: which backups to keep, by restic's forget
    /// rules, per database lineage, with guards that never delete the
    /// newest backup. `create` stores one, `apply` applies it (schedules
    /// with --retention apply theirs after each backup and daily),
    /// `simulate` tries one offline on a list of times.
    #[command(subcommand)]
    Retention(retention::RetentionCommand),
    /// Every database the fleet's probes know, the schedules that cover
    /// it and its last complete backup; exit 1 if one is uncovered.
    Coverage {
        /// Only agents whose labels include these: key=value[,key=value].
        #[arg(long)]
        selector: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// The master key and the repository's key slots (recovery keys).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The repository itself.
    #[command(subcommand)]
    Repository(RepositoryCommand),
    /// Restore a backup onto an agent's instance (role: operator). It goes
    /// into a staging database that is renamed to the target only once
    /// pg_restore succeeded; a non-empty target is refused unless --replace.
    Restore {
        backup_id: String,
        /// The agent to restore onto (any enrolled host, not only the source).
        #[arg(long)]
        agent: String,
        /// The agent's instance (default: its first).
        #[arg(long, default_value = "")]
        instance: String,
        /// Target database (default: the backup's database name); never a
        /// template database, nor the one the agent connects through.
        #[arg(long)]
        database: Option<String>,
        /// Swap out an existing non-empty target: its sessions are
        /// terminated and it is renamed aside (kept, and reported).
        #[arg(long)]
        replace: bool,
        /// With --replace: drop the database set aside once the swap is done.
        #[arg(long, requires = "replace")]
        drop_previous: bool,
        /// Everything owned by the connecting role (for hosts whose roles differ).
        #[arg(long)]
        no_owner: bool,
        /// Do not create the roles the database needs from the backup's globals.
        #[arg(long)]
        no_roles: bool,
        /// Parallel pg_restore jobs; above 1 the dump is spooled to the
        /// agent's private spool_dir first (pg_restore -j needs a file).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        jobs: u32,
        /// Only this table, SCHEMA.TABLE (repeatable), into the existing
        /// target, with its constraints and the foreign keys from and to it.
        #[arg(long = "table", value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// Only this schema (repeatable), into the existing target.
        #[arg(long = "schema", value_name = "SCHEMA")]
        schemas: Vec<String>,
        #[command(flatten)]
        job: jobs::JobFlags,
        /// Follow the job with a progress display; exit 1 if it fails.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Replace the coordinator's master key with a new one: the repository
    /// keys get a slot under the new key and the old key's slot goes; old
    /// backups still restore, no chunk is rewritten, recovery slots stay
    /// (role: admin). One key operation runs at a time.
    Rotate {
        #[command(flatten)]
        connection: Connection,
    },
    /// The repository's key slots: one per key that opens it (role: viewer).
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Make a recovery key: generated here, written to FILE (mode 0600,
    /// never over an existing file), then given a slot in the repository
    /// (role: admin). Keep FILE off the coordinator host: with it, `cairn
    /// repository rebuild-catalog --master-key FILE` gets every backup back.
    Add {
        /// Where to write the new key; must not exist.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove a key slot: its key no longer opens the repository (role:
    /// admin). Refused for the coordinator's own key and the last slot.
    Remove {
        /// The slot id, as `cairn keys list` shows it.
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
enum RepositoryCommand {
    /// Create the repository that `[repository]` in coordinator.toml names
    /// (an S3 bucket and prefix, or a directory), with fresh keys wrapped
    /// by the master key. `cairn init` does this for its local default; run
    /// it once after pointing `[repository]` at S3, before `cairn serve`.
    Init {
        /// Path to coordinator.toml.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Compare the catalog with the repository (role: operator): name
    /// missing, unreferenced and (with --read-data) corrupt chunks, and
    /// missing manifests; missing and corrupt chunks leave the dedup index,
    /// so the next backup uploads them again, and the backups that need
    /// them are marked damaged. Exit 1 if anything is missing or corrupt or
    /// any backup is damaged.
    Check {
        /// Also read and authenticate every stored chunk (reads the whole
        /// repository); clears the damage of backups that are whole again.
        #[arg(long)]
        read_data: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete the chunks no backup needs (role: admin), in two phases: a
    /// chunk that no complete backup, manifest or running upload needs and
    /// that nothing stored or reused for longer than the grace is
    /// condemned; a later run deletes it if it is still unneeded (a backup
    /// that reuses it first revives it). Objects without a catalog row
    /// older than the grace (left by a crash) are deleted. The coordinator
    /// also runs one daily (`[gc]` in coordinator.toml); one runs at a time.
    Gc {
        /// Change nothing; say what a run would condemn and delete.
        #[arg(long)]
        dry_run: bool,
        /// A chunk stored or reused more recently is never condemned
        /// (default: the coordinator's gc.grace, 24h unless set); `0s`
        /// condemns whatever was stored before the run began.
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Rebuild the backup list of an empty catalog from the repository and
    /// one key alone. Runs offline: stop `cairn serve` first.
    RebuildCatalog {
        /// Path to coordinator.toml.
        #[arg(long)]
        config: PathBuf,
        /// Open the repository with this key file (a recovery key from
        /// `cairn keys add`, mode 0600) instead of keys.master_key_file.
        #[arg(long, value_name = "FILE")]
        master_key: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Back up one database (or every database) of an agent's instance (role: operator).
    Run {
        /// The agent whose instance to back up.
        #[arg(long)]
        agent: String,
        /// A database to back up (repeatable: each is its own job, queued
        /// so that the instance runs one at a time by default).
        #[arg(long = "database", value_name = "DB", conflicts_with = "all_databases")]
        databases: Vec<String>,
        /// One backup per database of the instance (templates excluded).
        #[arg(long)]
        all_databases: bool,
        /// The agent's instance (default: its first).
        #[arg(long, default_value = "")]
        instance: String,
        /// A tag key=value describing this backup, shown by list and show
        /// (repeatable, each key once), such as ticket=OPS-12. Tags describe
        /// a backup; `cairn-agent enroll --label` describes an agent.
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[command(flatten)]
        job: jobs::JobFlags,
        /// Follow the job with a progress display; exit 1 if it fails.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Prove a backup restorable (role: operator). Without --restore-on:
    /// the coordinator reads every chunk from the repository, authenticates,
    /// decrypts and re-hashes it, and recounts the dump's rows. With
    /// --restore-on AGENT: a restore drill into a scratch database there,
    /// every table's rows checked against the backup's counts, then dropped.
    /// The outcome shows in `cairn backups list`; exit 1 if it fails.
    Verify {
        backup_id: String,
        /// Run a restore drill on this agent.
        #[arg(long, value_name = "AGENT")]
        restore_on: Option<String>,
        /// The agent's instance for the drill (default: its first).
        #[arg(long, default_value = "", requires = "restore_on")]
        instance: String,
        /// The drill's job options (with --restore-on).
        #[command(flatten)]
        job: jobs::JobFlags,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
enum BackupsCommand {
    /// Complete backups, newest first (all of them, fetched page by page).
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        database: Option<String>,
        /// At most this many, the newest (0 or none: all of them).
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        connection: Connection,
    },
    /// One backup, with its lineage (the cluster's system identifier and
    /// the database) and whether it is protected.
    Show {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Keep a backup whatever retention policies say (role: operator;
    /// audited).
    Protect {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Let retention policies remove a protected backup again (role:
    /// operator; audited).
    Unprotect {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text)
        .map_err(|e| format!("{e}: use a duration such as 30m, 1h or 2d"))?;
    if ttl.is_zero() {
        return Err("must be longer than zero, for example 1h".into());
    }
    Ok(ttl)
}

impl Connection {
    async fn admin(
        &self,
    ) -> anyhow::Result<proto::admin_client::AdminClient<tonic::transport::Channel>> {
        let Some(identity) = &self.identity else {
            bail!(
                "no operator identity: pass --identity DIR or set CAIRN_IDENTITY (cairn init wrote HOME/admin)"
            );
        };
        connect(&self.coordinator, identity).await
    }

    fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }

    /// Prints what a call answered: `value` as JSON with `--output json`,
    /// otherwise what `human` prints (a table, a sentence).
    fn show<T: serde::Serialize>(&self, value: &T, human: impl FnOnce()) -> anyhow::Result<()> {
        if self.json() {
            print_json(value)
        } else {
            human();
            Ok(())
        }
    }
}

/// `cairn backups protect|unprotect ID`.
async fn set_protected(
    id: String,
    protected: bool,
    connection: &Connection,
) -> anyhow::Result<i32> {
    let backup = connection
        .admin()
        .await?
        .set_backup_protected(proto::SetBackupProtectedRequest {
            backup_id: id,
            protected,
        })
        .await
        .map_err(explain)?
        .into_inner();
    let view = backups::BackupView::from(backup);
    connection.show(&view, || {
        if view.protected {
            println!("Backup {} is protected: retention keeps it.", view.id);
        } else {
            println!(
                "Backup {} is no longer protected: retention policies may remove it.",
                view.id
            );
        }
    })?;
    Ok(0)
}

pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Init {
            dir,
            grpc_listen,
            http_listen,
            server_names,
        } => {
            let report = init(&InitOptions {
                dir,
                grpc_listen,
                http_listen,
                server_names,
            })
            .await?;
            let config = report.config_file.display();
            let admin = report.admin_identity.display();
            // The URL must use a name the server certificate carries.
            let host = report
                .server_names
                .first()
                .cloned()
                .unwrap_or_else(|| "127.0.0.1".into());
            let url = if host.contains(':') {
                format!("https://[{host}]:{}", grpc_listen.port())
            } else {
                format!("https://{host}:{}", grpc_listen.port())
            };
            if grpc_listen.ip().is_unspecified()
                && report
                    .server_names
                    .iter()
                    .all(|n| n == "localhost" || n == "127.0.0.1")
            {
                eprintln!(
                    "warning: --grpc-listen {grpc_listen} accepts remote agents, but the server certificate only names localhost and 127.0.0.1: add --server-name HOST for the name agents will dial (re-run init in a new --dir)"
                );
            }
            println!("Created a coordinator home.");
            println!("  config:          {config}");
            println!("  admin identity:  {admin}");
            println!("  fleet CA sha256: {}", report.ca_fingerprint);
            println!(
                "  fleet CA expires: {} (agents and operators need a new CA and re-enrollment by then)",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH
                        + Duration::from_secs(report.ca_not_after_unix.max(0) as u64)
                )
            );
            println!("  server names:    {}", report.server_names.join(", "));
            println!();
            println!("Next:");
            println!("  cairn serve --config {config}");
            println!("  export CAIRN_COORDINATOR={url} CAIRN_IDENTITY={admin}");
            println!("  cairn token create --agent db1 --ttl 1h");
            println!(
                "  cairn-agent enroll --coordinator {url} --token TOKEN --dir /var/lib/postgresql/cairn-agent --postgres 'host=/var/run/postgresql user=postgres'   # as user postgres"
            );
            Ok(0)
        }
        Command::Serve { config } => {
            let config = CoordinatorConfig::load(&config)?;
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                signal.cancel();
            });
            cairn_coordinator::server::serve(config, shutdown).await?;
            Ok(0)
        }
        Command::Token(command) => tokens::run(command).await,
        Command::Agents(command) => agents::run(command).await,
        Command::Audit(command) => audit::run(command).await,
        Command::Jobs(command) => jobs::run(command).await,
        Command::Schedule(command) => schedules::run(command).await,
        Command::Retention(command) => retention::run(command).await,
        Command::Coverage {
            selector,
            connection,
        } => schedules::coverage(selector, connection).await,
        Command::Operators(command) => operators::run(command).await,
        Command::Probe {
            name,
            timeout,
            connection,
        } => {
            let response = connection
                .admin()
                .await?
                .probe_agent(proto::ProbeAgentRequest {
                    agent_name: name,
                    timeout_ms: timeout.as_millis() as u64,
                })
                .await
                .map_err(explain)?
                .into_inner();
            let probes = probes_from_wire(response.result.map(|r| r.instances).unwrap_or_default());
            connection.show(&probes, || {
                println!("{}", output::probes_table(&probes));
            })?;
            Ok(if probes.iter().all(|p| p.reachable) {
                0
            } else {
                1
            })
        }
        Command::Backup(BackupCommand::Run {
            agent,
            databases,
            all_databases,
            instance,
            tags,
            job,
            wait,
            connection,
        }) => {
            // A bad tag is refused before anything is dialled.
            backups::parse_tags(&tags)?;
            let mut client = connection.admin().await?;
            backups::run_backup(
                &mut client,
                backups::RunBackup {
                    agent,
                    instance,
                    databases,
                    all_databases,
                    tags,
                    options: job.to_proto(),
                    wait,
                },
                connection.json(),
            )
            .await
        }
        Command::Backup(BackupCommand::Verify {
            backup_id,
            restore_on,
            instance,
            job,
            connection,
        }) => {
            let mut client = connection.admin().await?;
            match restore_on {
                Some(agent) => {
                    restores::verify_by_drill(
                        &mut client,
                        backup_id,
                        agent,
                        instance,
                        job.to_proto(),
                        connection.json(),
                    )
                    .await
                }
                None => restores::verify_chunks(&mut client, backup_id, connection.json()).await,
            }
        }
        Command::Restore {
            backup_id,
            agent,
            instance,
            database,
            replace,
            drop_previous,
            no_owner,
            no_roles,
            jobs,
            tables,
            schemas,
            job,
            wait,
            connection,
        } => {
            let mut client = connection.admin().await?;
            restores::run_restore(
                &mut client,
                restores::RunRestore {
                    backup_id,
                    agent,
                    instance,
                    database,
                    replace,
                    drop_previous,
                    no_owner,
                    no_roles,
                    jobs,
                    tables,
                    schemas,
                    options: job.to_proto(),
                    wait,
                },
                connection.json(),
            )
            .await
        }
        Command::Backups(BackupsCommand::List {
            agent,
            database,
            limit,
            connection,
        }) => {
            let client = connection.admin().await?;
            let agent_name = agent.unwrap_or_default();
            let database = database.unwrap_or_default();
            let limit = limit.filter(|limit| *limit > 0);
            let views: Vec<backups::BackupView> = pages::collect(limit, |page_token, limit| {
                let mut client = client.clone();
                let request = proto::ListBackupsRequest {
                    agent_name: agent_name.clone(),
                    database: database.clone(),
                    limit,
                    page_token,
                };
                async move {
                    let page = client
                        .list_backups(request)
                        .await
                        .map_err(explain)?
                        .into_inner();
                    Ok((
                        page.backups.into_iter().map(Into::into).collect(),
                        page.next_page_token,
                    ))
                }
            })
            .await?;
            if connection.json() {
                print_json(&views)?;
            } else if views.is_empty() {
                println!(
                    "No complete backups yet: cairn backup run --agent NAME --database DB --wait"
                );
            } else {
                println!("{}", backups::backups_table(&views));
            }
            Ok(0)
        }
        Command::Backups(BackupsCommand::Show { id, connection }) => {
            let backup = connection
                .admin()
                .await?
                .get_backup(proto::GetBackupRequest { backup_id: id })
                .await
                .map_err(explain)?
                .into_inner();
            let view = backups::BackupView::from(backup);
            connection.show(&view, || {
                println!("{}", backups::backup_detail(&view));
            })?;
            Ok(0)
        }
        Command::Backups(BackupsCommand::Protect { id, connection }) => {
            set_protected(id, true, &connection).await
        }
        Command::Backups(BackupsCommand::Unprotect { id, connection }) => {
            set_protected(id, false, &connection).await
        }
        Command::Keys(KeysCommand::Rotate { connection }) => {
            keys::rotate(&mut connection.admin().await?, connection.json()).await
        }
        Command::Keys(KeysCommand::List { connection }) => {
            keys::list(&mut connection.admin().await?, connection.json()).await
        }
        Command::Keys(KeysCommand::Add { out, connection }) => {
            keys::add(&mut connection.admin().await?, &out, connection.json()).await
        }
        Command::Keys(KeysCommand::Remove { id, connection }) => {
            keys::remove(&mut connection.admin().await?, id, connection.json()).await
        }
        Command::Repository(RepositoryCommand::Init { config, output }) => {
            let config = CoordinatorConfig::load(&config)?;
            let report = cairn_coordinator::repository::init::init_repository(&config).await?;
            if output == OutputFormat::Json {
                print_json(&report)?;
            } else {
                println!(
                    "Created repository {} in {} (keys wrapped by master key {}).",
                    report.id, report.repository, report.master_key_id
                );
            }
            Ok(0)
        }
        Command::Repository(RepositoryCommand::Check {
            read_data,
            connection,
        }) => {
            let mut client = connection.admin().await?;
            repository::check(&mut client, read_data, connection.json()).await
        }
        Command::Repository(RepositoryCommand::Gc {
            dry_run,
            grace,
            connection,
        }) => {
            let mut client = connection.admin().await?;
            repository::gc(&mut client, dry_run, grace, connection.json()).await
        }
        Command::Repository(RepositoryCommand::RebuildCatalog {
            config,
            master_key,
            output,
        }) => {
            let config = CoordinatorConfig::load(&config)?;
            let recovery_key = master_key.as_deref().map(keys::read_key_file).transpose()?;
            let report = cairn_coordinator::repository::rebuild::rebuild_catalog(
                &config,
                recovery_key.as_ref(),
            )
            .await?;
            if output == OutputFormat::Json {
                print_json(&report)?;
            } else {
                println!(
                    "Rebuilt the catalog: {} backup(s), {} chunk(s) from {}.",
                    report.backups, report.chunks, report.repository
                );
                for problem in &report.problems {
                    eprintln!("error: {problem}");
                }
                if report.missing_chunks > 0 {
                    eprintln!(
                        "error: {} chunk(s) named by manifests are not in the repository",
                        report.missing_chunks
                    );
                }
                for (backup_id, reason) in &report.damaged_backups {
                    eprintln!("error: backup {backup_id} is damaged: {reason}");
                }
            }
            Ok(
                if report.problems.is_empty() && report.damaged_backups.is_empty() {
                    0
                } else {
                    1
                },
            )
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

/// Whether the command is the long-running server (which logs at info).
pub fn is_server(cli: &Cli) -> bool {
    matches!(cli.command, Command::Serve { .. })
}
