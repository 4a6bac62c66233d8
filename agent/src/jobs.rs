//! What every job (backup, restore, drill) shares: the registry of running
//! jobs that a cancel command reaches them through, how a job ends short of
//! done.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Running jobs by id, so that a cancel command can reach them, and the
/// newest coordinator term seen, which outlives sessions.
#[derive(Debug, Default)]
pub struct RunningJobs {
    jobs: Mutex<HashMap<String, CancellationToken>>,
    newest_term: AtomicU64,
}

impl RunningJobs {
    /// Accepts a command of coordinator term `term` unless a newer term
    /// has been seen (a deposed coordinator's command); the newest seen on
    /// refusal.
    pub fn accept_term(&self, term: u64) -> Result<(), u64> {
        let newest = self.newest_term.fetch_max(term, Ordering::SeqCst);
        if term < newest { Err(newest) } else { Ok(()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a job; it stays registered while the guard lives. A
    /// second command for a job already running here is refused: two runs
    /// of one job would write one backup or one target twice, and the
    /// first to end would unregister the other (a cancel would then miss
    /// it).
    pub(crate) fn register(self: &Arc<Self>, job_id: &str) -> Result<JobGuard, JobEnd> {
        let token = CancellationToken::new();
        match self.lock().entry(job_id.to_string()) {
            Entry::Occupied(_) => {
                return Err(JobEnd::Failed(format!(
                    "job {job_id} is already running on this agent: a second command for it \
                     is refused"
                )));
            }
            Entry::Vacant(slot) => {
                slot.insert(token.clone());
            }
        }
        Ok(JobGuard {
            jobs: self.clone(),
            job_id: job_id.to_string(),
            token,
        })
    }

    /// Cancels a running job; false if there is none by that id.
    pub fn cancel(&self, job_id: &str) -> bool {
        match self.lock().get(job_id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// A registered job; dropping it unregisters the job.
pub(crate) struct JobGuard {
    jobs: Arc<RunningJobs>,
    job_id: String,
    /// Fired by a cancel command.
    pub(crate) token: CancellationToken,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.job_id);
    }
}

/// How a job ended short of done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// A cancel command stopped it; what was stopped.
    Cancelled(String),
    /// One line for the operator: the PostgreSQL tool's own message or the
    /// coordinator's.
    Failed(String),
    /// The job's data stream to the coordinator broke (network, a
    /// coordinator restart): another attempt may succeed.
    Interrupted(String),
}

impl From<String> for JobEnd {
    fn from(message: String) -> Self {
        JobEnd::Failed(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_of_an_older_term_are_refused() {
        let jobs = RunningJobs::default();
        assert_eq!(jobs.accept_term(3), Ok(()));
        assert_eq!(jobs.accept_term(3), Ok(()));
        assert_eq!(jobs.accept_term(2), Err(3));
        assert_eq!(jobs.accept_term(4), Ok(()));
        assert_eq!(jobs.accept_term(3), Err(4));
    }

    #[test]
    fn a_job_id_runs_once_at_a_time() {
        let jobs = Arc::new(RunningJobs::default());
        let first = jobs.register("j1").expect("the first command runs");
        let Err(JobEnd::Failed(refusal)) = jobs.register("j1") else {
            panic!("a second command for a running job must be refused");
        };
        assert!(
            refusal.contains("j1") && refusal.contains("already running"),
            "{refusal}"
        );
        // The refused one did not unregister the running one: a cancel
        // still reaches it.
        assert!(jobs.cancel("j1"));
        assert!(first.token.is_cancelled());
        let other = jobs.register("j2").expect("another job runs beside it");
        drop(first);
        assert!(!jobs.cancel("j1"));
        let again = jobs
            .register("j1")
            .expect("the id is free once the job ended");
        drop((other, again));
    }
}
