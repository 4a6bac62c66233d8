//! `cairn jobs list|show|watch|cancel`.

use cairn_common::proto;
use clap::Subcommand;

use super::client::explain;
use super::output::print_json;
use super::{Connection, backups, pages};

#[derive(Debug, Subcommand)]
pub(super) enum JobsCommand {
    /// The newest jobs.
    List {
        /// How many jobs (0: all of them).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        connection: Connection,
    },
    /// One job.
    Show {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Follow a job to its end; exit 1 unless it succeeds.
    Watch {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Cancel a running job: the agent stops pg_dump and nothing is listed (role: operator).
    Cancel {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

pub(super) async fn run(command: JobsCommand) -> anyhow::Result<i32> {
    match command {
        JobsCommand::List { limit, connection } => {
            let client = connection.admin().await?;
            let views: Vec<backups::JobView> =
                pages::collect((limit > 0).then_some(limit), |page_token, limit| {
                    let mut client = client.clone();
                    async move {
                        let page = client
                            .list_jobs(proto::ListJobsRequest { limit, page_token })
                            .await
                            .map_err(explain)?
                            .into_inner();
                        Ok((
                            page.jobs.into_iter().map(Into::into).collect(),
                            page.next_page_token,
                        ))
                    }
                })
                .await?;
            connection.show(&views, || {
                println!("{}", backups::jobs_table(&views));
            })?;
            Ok(0)
        }
        JobsCommand::Show { id, connection } => {
            let job: backups::JobView = connection
                .admin()
                .await?
                .get_job(proto::GetJobRequest { job_id: id })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            connection.show(&job, || {
                println!("{}", backups::jobs_table(std::slice::from_ref(&job)));
            })?;
            Ok(0)
        }
        JobsCommand::Watch { id, connection } => {
            let mut client = connection.admin().await?;
            let job = backups::watch(&mut client, &id, connection.json()).await?;
            if connection.json() {
                print_json(&job)?;
            }
            Ok(if job.status == "succeeded" { 0 } else { 1 })
        }
        JobsCommand::Cancel { id, connection } => {
            let job: backups::JobView = connection
                .admin()
                .await?
                .cancel_job(proto::CancelJobRequest { job_id: id })
                .await
                .map_err(explain)?
                .into_inner()
                .into();
            if connection.json() {
                print_json(&job)?;
            } else if job.status == "running" {
                // The agent stops the work itself (kills pg_dump or
                // pg_restore, drops a staging database); the job ends once
                // it has.
                println!(
                    "Cancel requested for job {id}: the agent is stopping it, and it will end as cancelled. Follow with: cairn jobs watch {id}",
                    id = job.id
                );
            } else {
                println!("Job {} is {}.", job.id, job.status);
            }
            Ok(0)
        }
    }
}
