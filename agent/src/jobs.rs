//! What every job (backup, restore, drill) shares: the registry of running
//! jobs that a cancel command reaches them through, how a job ends short of
//! done, and the repository keys a job command carries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cairn_common::crypto::{RepositoryKeys, SecretKey};
use tokio_util::sync::CancellationToken;

/// Running jobs by id, so that a cancel command can reach them.
#[derive(Debug, Default)]
pub struct RunningJobs {
    jobs: Mutex<HashMap<String, CancellationToken>>,
}

impl RunningJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a job; it stays registered while the guard lives.
    pub(crate) fn register(self: &Arc<Self>, job_id: &str) -> JobGuard {
        let token = CancellationToken::new();
        self.lock().insert(job_id.to_string(), token.clone());
        JobGuard {
            jobs: self.clone(),
            job_id: job_id.to_string(),
            token,
        }
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
}

impl From<String> for JobEnd {
    fn from(message: String) -> Self {
        JobEnd::Failed(message)
    }
}

/// The repository keys a job command carries (secrets: never logged).
pub(crate) fn repository_keys(
    data_key: &[u8],
    chunk_id_key: &[u8],
) -> Result<RepositoryKeys, String> {
    Ok(RepositoryKeys {
        data: SecretKey::from_bytes(data_key).map_err(|e| format!("data key: {e}"))?,
        chunk_id: SecretKey::from_bytes(chunk_id_key).map_err(|e| format!("chunk-id key: {e}"))?,
    })
}
