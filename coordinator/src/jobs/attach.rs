//! Jobs outlive connections. When an agent's stream ends, its running jobs
//! are `detached`: the agent keeps running them (pg_dump or pg_restore
//! waits on backpressure, and the upload or download resumes on its own
//! stream, see `jobs/upload` and `jobs/download`) and reconnects, to this
//! coordinator or a restarted one, naming the attempts it holds. Those re-attach; the ones it no longer
//! holds (it restarted) fail and are retried where their jobs allow; the
//! ones it holds that no longer run here are stopped. A job whose agent
//! does not come back within `jobs.reattach_timeout` fails (see the
//! engine's tick). Results come back by attempt id, whatever the session.

use cairn_common::proto::{self, command};

use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{JobRecord, JobState};
use crate::error::Result;
use crate::fleet::CommandOutcome;
use crate::jobs::Jobs;

const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Jobs {
    /// At start: every job the previous coordinator left running waits for
    /// its agent.
    pub async fn detach_all(&self) -> Result<u64> {
        self.catalog
            .detach_running_jobs(None, self.clock.now_ms())
            .await
    }

    /// An agent's stream ended: its running jobs wait for it.
    pub async fn agent_disconnected(&self, agent: &str) {
        let at = self.clock.now_ms();
        match self.catalog.detach_running_jobs(Some(agent), at).await {
            Ok(0) => {}
            // A newer session came up while this one ended: its
            // registration decides about the jobs, not this stale end.
            Ok(_) if self.fleet.has_session(agent) => {
                if let Err(error) = self.catalog.undetach_jobs(agent, at).await {
                    tracing::error!(agent, %error, "cannot undo a stale detach");
                }
            }
            Ok(count) => tracing::info!(
                agent,
                count,
                "the agent's jobs wait for it to come back (jobs.reattach_timeout)"
            ),
            Err(error) => tracing::error!(agent, %error, "cannot mark the agent's jobs detached"),
        }
    }

    /// An agent registered at `registered_at` holding `held` (job id,
    /// attempt id): re-attach what it holds, fail what it lost, stop what
    /// no longer runs here.
    pub async fn agent_registered(
        &self,
        agent: &str,
        held: &[(String, String)],
        registered_at: i64,
    ) {
        let running = match self.catalog.running_jobs_of(agent).await {
            Ok(running) => running,
            Err(error) => {
                tracing::error!(agent, %error, "cannot read the agent's running jobs");
                return;
            }
        };
        let holds = |job: &JobRecord| {
            held.iter()
                .any(|(job_id, attempt_id)| *job_id == job.id && *attempt_id == job.attempt_id)
        };
        for job in &running {
            if holds(job) {
                if job.detached_at.is_some() {
                    self.reattach(job).await;
                }
            } else if job.attempt_started_at.unwrap_or(0) < registered_at {
                // Sent before this session began, and not held: the agent
                // restarted (or never got the command), or its result was
                // lost with a stream — a backup whose manifest was stored
                // is done whatever became of its answer.
                if self.backup_complete(job).await {
                    self.conclude(job, Ok(CommandOutcome::JobDone(None))).await;
                    continue;
                }
                let message = format!(
                    "the agent no longer runs attempt {} ({}): it restarted",
                    job.attempt, job.attempt_id
                );
                self.fail_attempt(job, &message, true).await;
            }
        }
        for (job_id, attempt_id) in held {
            let current = running
                .iter()
                .any(|job| job.id == *job_id && job.attempt_id == *attempt_id);
            if !current {
                self.stop_stray(agent, job_id, attempt_id);
            }
        }
    }

    async fn backup_complete(&self, job: &JobRecord) -> bool {
        job.kind == crate::catalog::JobKind::Backup
            && matches!(
                self.catalog.get_backup(&job.backup_id).await,
                Ok(Some(backup)) if backup.status == "complete"
            )
    }

    async fn reattach(&self, job: &JobRecord) {
        match self.catalog.reattach_job(&job.id, &job.attempt_id).await {
            Ok(true) => {
                tracing::info!(job_id = %job.id, attempt_id = %job.attempt_id, "job re-attached");
                self.audit
                    .record(AuditEvent::new(
                        "coordinator",
                        "job.reattach",
                        job.id.clone(),
                        Outcome::Success,
                        format!(
                            "attempt {} ({}) goes on: its agent {} is back",
                            job.attempt, job.attempt_id, job.agent_name
                        ),
                    ))
                    .await;
            }
            Ok(false) => {}
            Err(error) => tracing::error!(job_id = %job.id, %error, "cannot re-attach the job"),
        }
    }

    /// Tells an agent to stop an attempt that no longer runs here (its job
    /// ended, was cancelled, or moved on to another attempt).
    fn stop_stray(&self, agent: &str, job_id: &str, attempt_id: &str) {
        tracing::info!(
            agent,
            job_id,
            attempt_id,
            "the agent holds an attempt that no longer runs; stopping it"
        );
        let fleet = self.fleet.clone();
        let agent = agent.to_string();
        let job_id = job_id.to_string();
        let attempt_id = attempt_id.to_string();
        self.tasks.spawn(async move {
            let stop = command::Kind::Cancel(proto::CancelCommand { job_id, attempt_id });
            if let Err(error) = fleet.send_command(&agent, stop, STOP_TIMEOUT).await {
                tracing::warn!(%error, "cannot stop the stray attempt");
            }
        });
    }

    /// A job command's result, by its attempt: the job ends (or retries)
    /// if that attempt is still its current one.
    pub async fn attempt_reported(&self, agent: &str, attempt_id: &str, outcome: CommandOutcome) {
        let job = match self.catalog.job_of_attempt(attempt_id).await {
            Ok(Some(job)) if job.agent_name == agent => job,
            Ok(_) => {
                tracing::warn!(
                    agent,
                    attempt_id,
                    "a result for an attempt this agent never ran"
                );
                return;
            }
            Err(error) => {
                tracing::error!(agent, attempt_id, %error, "cannot read the attempt's job");
                return;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.id, attempt_id);
        let _entered = span.enter();
        if job.status != JobState::Running || job.attempt_id != attempt_id {
            tracing::info!(status = %job.status, "the attempt had ended already");
            return;
        }
        drop(_entered);
        self.conclude(&job, Ok(outcome)).await;
    }
}
