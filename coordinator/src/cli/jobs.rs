//! `cairn jobs list|show|watch|cancel`.

use std::time::Duration;

use cairn_common::proto;
use clap::Subcommand;

use super::client::explain;
use super::output::print_json;
use super::{Connection, backups, pages};

/// How a job runs: `--retries`, `--timeout`, `--deadline` (backups,
/// restores and drills alike).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct JobFlags {
    /// Further attempts after a retryable failure (network, storage, an
    /// agent restart; never pg_dump's or pg_restore's own refusal), 5s
    /// apart at first and doubling.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub retries: u32,
    /// Stop an attempt that runs longer, e.g. 6h: the agent stops pg_dump
    /// or pg_restore and cleans up, and the job fails.
    #[arg(long, value_parser = positive_duration)]
    pub timeout: Option<Duration>,
    /// End the job `missed` if it has not started within this long (its
    /// agent offline, or its instance busy), e.g. 30m [default: 1h].
    #[arg(long, value_parser = positive_duration)]
    pub deadline: Option<Duration>,
}

impl JobFlags {
    pub fn to_proto(&self) -> proto::JobOptions {
        let millis =
            |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        proto::JobOptions {
            retries: self.retries,
            timeout_ms: millis(self.timeout),
            deadline_ms: millis(self.deadline),
        }
    }
}

/// A duration such as 90s, 30m or 6h, above zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e}: give a duration such as 90s, 30m or 6h"))?;
    if duration.is_zero() {
        return Err("must be above zero (leave the flag out for none)".into());
    }
    Ok(duration)
}

#[derive(Debug, Subcommand)]
pub(super) enum JobsCommand {
    /// The newest jobs, queued ones with why they wait.
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
    /// Cancel a queued or running job: a queued one never starts; a running
    /// one's agent stops pg_dump or pg_restore, and nothing is listed (role: operator).
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
                if !job.attempts.is_empty() {
                    println!("{}", backups::attempts_table(&job.attempts));
                }
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
            } else if job.is_active() {
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
