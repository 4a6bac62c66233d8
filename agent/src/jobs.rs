//! What every job (backup, restore, drill) shares: the registry of running
//! jobs that a cancel command reaches them through, how a job ends short of
//! done, and what lets jobs outlive a control session: the attempts held
//! (named at each registration), the results waiting for a session (the
//! outbox), and the current channel to the coordinator, which a job's
//! broken upload or download waits for to resume (see [`crate::resume`]).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cairn_common::proto;

use crate::error::AgentError;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A running job: its attempt, and the token a cancel fires.
#[derive(Debug)]
struct Running {
    attempt_id: String,
    token: CancellationToken,
}

/// A job's result waiting to be sent, with the job it is of.
#[derive(Debug, Clone)]
pub struct Posted {
    pub job_id: String,
    pub result: proto::CommandResult,
}

/// The current channel to the coordinator, numbered: a broken upload or
/// download waits for a newer one.
pub type CurrentChannel = (u64, Option<Channel>);

/// Running jobs by id, so that a cancel command can reach them, and the
/// newest coordinator term seen, which outlives sessions.
#[derive(Debug)]
pub struct RunningJobs {
    jobs: Mutex<HashMap<String, Running>>,
    newest_term: AtomicU64,
    /// Where the newest term is kept across restarts (none in tests).
    term_file: Option<PathBuf>,
    /// Held while the term file is written.
    term_writes: Mutex<()>,
    /// Job results not yet sent (no session, or not yet its turn).
    outbox: Mutex<VecDeque<Posted>>,
    outbox_ready: Notify,
    channel: watch::Sender<CurrentChannel>,
}

impl Default for RunningJobs {
    fn default() -> Self {
        RunningJobs {
            jobs: Mutex::default(),
            newest_term: AtomicU64::new(0),
            term_file: None,
            term_writes: Mutex::default(),
            outbox: Mutex::default(),
            outbox_ready: Notify::new(),
            channel: watch::Sender::new((0, None)),
        }
    }
}

impl RunningJobs {
    /// A registry that keeps the newest coordinator term in `term_file`
    /// (read now), so a restarted agent still refuses a deposed
    /// coordinator's commands.
    pub fn with_term_file(term_file: PathBuf) -> Result<RunningJobs, AgentError> {
        // A file that cannot be read as a number refuses the start: taking
        // it for 0 would let a deposed coordinator command this agent.
        let refuse = |problem: String| {
            AgentError::Invalid(format!(
                "the coordinator term file {} {problem}: write the coordinator's current term \
                 into it (its log says `job engine started term=N` at each start), or remove \
                 the file to accept the next coordinator's term as new",
                term_file.display()
            ))
        };
        let newest = match std::fs::read_to_string(&term_file) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| refuse(format!("holds {:?}, not a number", text.trim())))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => return Err(refuse(format!("cannot be read ({error})"))),
        };
        Ok(RunningJobs {
            newest_term: AtomicU64::new(newest),
            term_file: Some(term_file),
            ..RunningJobs::default()
        })
    }

    /// The attempts this agent runs or holds a result of, for registration.
    pub fn held(&self) -> Vec<proto::HeldAttempt> {
        let mut held: Vec<proto::HeldAttempt> = self
            .lock()
            .iter()
            .filter(|(_, running)| !running.attempt_id.is_empty())
            .map(|(job_id, running)| proto::HeldAttempt {
                job_id: job_id.clone(),
                attempt_id: running.attempt_id.clone(),
            })
            .collect();
        for posted in self.lock_outbox().iter() {
            if !posted.result.attempt_id.is_empty() {
                held.push(proto::HeldAttempt {
                    job_id: posted.job_id.clone(),
                    attempt_id: posted.result.attempt_id.clone(),
                });
            }
        }
        held
    }

    fn lock_outbox(&self) -> std::sync::MutexGuard<'_, VecDeque<Posted>> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job's result for the current or next session.
    pub fn post_result(&self, job_id: &str, result: proto::CommandResult) {
        self.lock_outbox().push_back(Posted {
            job_id: job_id.to_string(),
            result,
        });
        self.outbox_ready.notify_one();
    }

    /// The results waiting, oldest first (put back what cannot be sent).
    pub fn take_results(&self) -> Vec<Posted> {
        self.lock_outbox().drain(..).collect()
    }

    /// Puts unsent results back, ahead of newer ones.
    pub fn put_back(&self, results: Vec<Posted>) {
        let mut outbox = self.lock_outbox();
        for result in results.into_iter().rev() {
            outbox.push_front(result);
        }
    }

    /// Fires when a result is posted.
    pub async fn result_posted(&self) {
        self.outbox_ready.notified().await;
    }

    /// A new session's channel, for jobs whose streams broke.
    pub fn set_channel(&self, channel: Channel) {
        self.channel.send_modify(|(generation, current)| {
            *generation += 1;
            *current = Some(channel);
        });
    }

    /// The current channel and its successors.
    pub fn channels(&self) -> watch::Receiver<CurrentChannel> {
        self.channel.subscribe()
    }

    /// Accepts a command of coordinator term `term` unless a newer term
    /// has been seen (a deposed coordinator's command); the newest seen on
    /// refusal.
    pub fn accept_term(&self, term: u64) -> Result<(), u64> {
        let newest = self.newest_term.fetch_max(term, Ordering::SeqCst);
        if term < newest {
            return Err(newest);
        }
        if term > newest
            && let Some(file) = &self.term_file
        {
            // One writer at a time, and it writes the newest term then, so
            // two new terms at once never leave the older one on disk;
            // written aside, synced, then renamed.
            let _writing = self.term_writes.lock().unwrap_or_else(|e| e.into_inner());
            let current = self.newest_term.load(Ordering::SeqCst);
            if let Err(error) = cairn_common::config::write_file_atomic(
                file,
                format!("{current}\n").as_bytes(),
                0o600,
            ) {
                tracing::warn!(file = %file.display(), %error, "cannot keep the coordinator term");
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a job; it stays registered while the guard lives. A
    /// second command for a job already running here is refused: two runs
    /// of one job would write one backup or one target twice, and the
    /// first to end would unregister the other (a cancel would then miss
    /// it).
    pub(crate) fn register(
        self: &Arc<Self>,
        job_id: &str,
        attempt_id: &str,
    ) -> Result<JobGuard, JobEnd> {
        let token = CancellationToken::new();
        match self.lock().entry(job_id.to_string()) {
            Entry::Occupied(_) => {
                // Retryable: an earlier attempt still winding down here
                // will be gone by the next one.
                return Err(JobEnd::Interrupted(format!(
                    "job {job_id} is already running on this agent: a second command for it \
                     is refused"
                )));
            }
            Entry::Vacant(slot) => {
                slot.insert(Running {
                    attempt_id: attempt_id.to_string(),
                    token: token.clone(),
                });
            }
        }
        Ok(JobGuard {
            jobs: self.clone(),
            job_id: job_id.to_string(),
            token,
        })
    }

    /// Cancels every running job (the agent is stopping).
    pub fn cancel_all(&self) {
        for running in self.lock().values() {
            running.token.cancel();
        }
    }

    /// Cancels a running job; false if there is none by that id.
    pub fn cancel(&self, job_id: &str) -> bool {
        self.cancel_attempt(job_id, "")
    }

    /// Cancels a running job if it runs `attempt_id` (any attempt when
    /// empty): a stop meant for an old attempt leaves a newer one alone.
    pub fn cancel_attempt(&self, job_id: &str, attempt_id: &str) -> bool {
        match self
            .lock()
            .get(job_id)
            .filter(|running| attempt_id.is_empty() || running.attempt_id == attempt_id)
        {
            Some(running) => {
                running.token.cancel();
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
    fn the_newest_term_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator-term");
        let before = RunningJobs::with_term_file(file.clone()).unwrap();
        assert_eq!(before.accept_term(7), Ok(()));
        let after = RunningJobs::with_term_file(file).unwrap();
        assert_eq!(after.accept_term(6), Err(7));
        assert_eq!(after.accept_term(7), Ok(()));
    }

    #[test]
    fn a_term_file_that_is_not_a_number_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator-term");
        std::fs::write(&file, "").unwrap();
        let Err(refused) = RunningJobs::with_term_file(file.clone()) else {
            panic!("an empty term file must refuse the start, not accept any coordinator");
        };
        let message = refused.to_string();
        assert!(
            message.contains(&file.display().to_string()) && message.contains("not a number"),
            "{message}"
        );
    }

    #[test]
    fn terms_accepted_at_once_leave_the_newest_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator-term");
        let jobs = Arc::new(RunningJobs::with_term_file(file.clone()).unwrap());
        let threads: Vec<_> = (1..=64u64)
            .map(|term| {
                let jobs = jobs.clone();
                std::thread::spawn(move || {
                    let _ = jobs.accept_term(term);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "64");
    }

    #[test]
    fn a_job_id_runs_once_at_a_time() {
        let jobs = Arc::new(RunningJobs::default());
        let first = jobs.register("j1", "a1").expect("the first command runs");
        let Err(JobEnd::Interrupted(refusal)) = jobs.register("j1", "a1") else {
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
        let other = jobs
            .register("j2", "a2")
            .expect("another job runs beside it");
        drop(first);
        assert!(!jobs.cancel("j1"));
        let again = jobs
            .register("j1", "a3")
            .expect("the id is free once the job ended");
        drop((other, again));
    }
}
