//! The live fleet: one control session per connected agent, kept in memory.
//! A session holds the sender half of the agent's command stream, the time
//! of its last heartbeat, and the commands waiting for an answer.
//!
//! Online means: a session exists and its last heartbeat is younger than
//! three heartbeat intervals.

pub mod authority;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_common::model::{InstanceProbe, Operation};
use cairn_common::proto;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::error::{CoordinatorError, Result};

/// How long a job's command may wait for room in its agent's queue.
const JOB_COMMAND_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Heartbeats an agent may miss before it is shown offline.
pub const MISSED_HEARTBEATS_OFFLINE: u32 = 3;

pub type CommandSender = mpsc::Sender<Result<proto::CoordinatorMessage, Status>>;

/// What a command came back with.
#[derive(Debug, Clone)]
pub enum CommandOutcome {
    Probe(Vec<InstanceProbe>),
    /// A job command finished on the agent; restores carry their report.
    JobDone(Option<proto::RestoreReport>),
    /// A job command stopped because a cancel reached it; what was stopped.
    Cancelled(String),
    Refused {
        operation: Option<Operation>,
        reason: String,
    },
    Error(String),
    /// A job stopped because its data stream broke: worth a retry.
    Interrupted(String),
}

struct Session {
    id: u64,
    sender: CommandSender,
    last_heartbeat: Instant,
    /// The same moment on the wall clock, for display (ms since the epoch).
    last_heartbeat_ms: i64,
    pending: HashMap<String, oneshot::Sender<CommandOutcome>>,
    cancel: CancellationToken,
}

#[derive(Debug)]
pub struct Fleet {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    heartbeat_interval: Duration,
    next_id: AtomicU64,
    shutdown: CancellationToken,
    /// This coordinator's term, on every command.
    term: u64,
}

/// Keeps `Session` out of the `Debug` output (it holds channels).
struct SessionHandle(Session);

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.0.id)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    pub fn new(heartbeat_interval: Duration, shutdown: CancellationToken, term: u64) -> Self {
        Fleet {
            sessions: Mutex::new(HashMap::new()),
            heartbeat_interval,
            next_id: AtomicU64::new(1),
            shutdown,
            term,
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new session for `agent`, ending any older one (an agent
    /// that reconnects replaces its stale stream). Returns the session id and
    /// a token cancelled when the session must end.
    pub fn attach(&self, agent: &str, sender: CommandSender) -> (u64, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.shutdown.child_token();
        let session = Session {
            id,
            sender,
            last_heartbeat: Instant::now(),
            last_heartbeat_ms: crate::clock::now_ms(),
            pending: HashMap::new(),
            cancel: cancel.clone(),
        };
        if let Some(old) = self
            .lock()
            .insert(agent.to_string(), SessionHandle(session))
        {
            old.0.cancel.cancel();
        }
        (id, cancel)
    }

    /// Removes the session if it is still the current one; whether the
    /// agent is now without a session (false: a newer one replaced it).
    pub fn detach(&self, agent: &str, id: u64) -> bool {
        let mut sessions = self.lock();
        match sessions.get(agent) {
            Some(session) if session.0.id == id => {
                sessions.remove(agent);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Whether the agent has a session (online or not yet timed out).
    pub fn has_session(&self, agent: &str) -> bool {
        self.lock().contains_key(agent)
    }

    pub fn heartbeat(&self, agent: &str, id: u64) {
        if let Some(session) = self.lock().get_mut(agent).filter(|s| s.0.id == id) {
            session.0.last_heartbeat = Instant::now();
            session.0.last_heartbeat_ms = crate::clock::now_ms();
        }
    }

    /// When the agent's live session last heard from it (ms since the epoch).
    pub fn last_heartbeat_ms(&self, agent: &str) -> Option<i64> {
        self.lock().get(agent).map(|s| s.0.last_heartbeat_ms)
    }

    /// The agents [`Fleet::is_online`] says are online now.
    pub fn online_agents(&self) -> Vec<String> {
        let limit = self.heartbeat_interval * MISSED_HEARTBEATS_OFFLINE;
        self.lock()
            .iter()
            .filter(|(_, s)| s.0.last_heartbeat.elapsed() < limit)
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn is_online(&self, agent: &str) -> bool {
        let limit = self.heartbeat_interval * MISSED_HEARTBEATS_OFFLINE;
        self.lock()
            .get(agent)
            .is_some_and(|s| s.0.last_heartbeat.elapsed() < limit)
    }

    /// Ends an agent's session now (revocation).
    pub fn disconnect(&self, agent: &str) {
        if let Some(session) = self.lock().remove(agent) {
            session.0.cancel.cancel();
        }
    }

    /// The live session of `agent` (its last heartbeat recent enough), or
    /// why there is none.
    fn live_session<'a>(
        &self,
        sessions: &'a mut HashMap<String, SessionHandle>,
        agent: &str,
    ) -> Result<&'a mut Session> {
        sessions
            .get_mut(agent)
            .filter(|s| {
                s.0.last_heartbeat.elapsed() < self.heartbeat_interval * MISSED_HEARTBEATS_OFFLINE
            })
            .map(|s| &mut s.0)
            .ok_or_else(|| {
                CoordinatorError::Unavailable(format!(
                    "agent {agent:?} is offline: check that cairn-agent runs on its host"
                ))
            })
    }

    /// A command message with a fresh id and this coordinator's term.
    fn command_message(
        &self,
        kind: proto::command::Kind,
        attempt_id: String,
    ) -> (String, proto::CoordinatorMessage) {
        let command_id = format!("cmd-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let message = proto::CoordinatorMessage {
            body: Some(proto::coordinator_message::Body::Command(proto::Command {
                command_id: command_id.clone(),
                kind: Some(kind),
                term: self.term,
                attempt_id,
            })),
        };
        (command_id, message)
    }

    /// Sends the command of a job's attempt without waiting: its result
    /// comes back by attempt id, on whichever session the agent has then
    /// (see [`Fleet::complete`]).
    pub async fn send_job_command(
        &self,
        agent: &str,
        attempt_id: &str,
        kind: proto::command::Kind,
    ) -> Result<()> {
        let stream = self.live_session(&mut self.lock(), agent)?.sender.clone();
        let (_, message) = self.command_message(kind, attempt_id.to_string());
        // Bounded: a session whose queue stays full is as good as gone.
        match tokio::time::timeout(JOB_COMMAND_SEND_TIMEOUT, stream.send(Ok(message))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CoordinatorError::Unavailable(format!(
                "agent {agent:?} disconnected"
            ))),
            Err(_) => Err(CoordinatorError::Unavailable(format!(
                "agent {agent:?} does not read its commands"
            ))),
        }
    }

    /// Sends a command (not a job's: probes, cancels) and waits for its
    /// result.
    pub async fn send_command(
        &self,
        agent: &str,
        kind: proto::command::Kind,
        timeout: Duration,
    ) -> Result<CommandOutcome> {
        let (command_id, message) = self.command_message(kind, String::new());
        let (sender, receiver) = oneshot::channel();
        let stream = {
            let mut sessions = self.lock();
            let session = self.live_session(&mut sessions, agent)?;
            session.pending.insert(command_id.clone(), sender);
            session.sender.clone()
        };
        let outcome = tokio::time::timeout(timeout, async {
            stream.send(Ok(message)).await.map_err(|_| {
                CoordinatorError::Unavailable(format!("agent {agent:?} disconnected"))
            })?;
            receiver
                .await
                .map_err(|_| CoordinatorError::Unavailable(format!("agent {agent:?} disconnected")))
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(_) => {
                if let Some(session) = self.lock().get_mut(agent) {
                    session.0.pending.remove(&command_id);
                }
                Err(CoordinatorError::Timeout(format!(
                    "agent {agent:?} did not answer within {}",
                    humantime::format_duration(timeout)
                )))
            }
        }
    }

    /// Delivers a command's result to whoever waits for it; the outcome
    /// back if nobody does (a job's result, which goes by attempt id).
    pub fn complete(
        &self,
        agent: &str,
        id: u64,
        command_id: &str,
        outcome: CommandOutcome,
    ) -> Option<CommandOutcome> {
        let waiter = self
            .lock()
            .get_mut(agent)
            .filter(|s| s.0.id == id)
            .and_then(|s| s.0.pending.remove(command_id));
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(outcome);
                None
            }
            None => Some(outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reconnect_replaces_and_cancels_the_old_session() {
        let fleet = Fleet::new(Duration::from_secs(5), CancellationToken::new(), 1);
        let (sender, _receiver) = mpsc::channel(1);
        let (first, first_cancel) = fleet.attach("db1", sender.clone());
        let (second, second_cancel) = fleet.attach("db1", sender);
        assert!(first_cancel.is_cancelled());
        assert!(!second_cancel.is_cancelled());
        fleet.detach("db1", first);
        assert!(
            fleet.is_online("db1"),
            "detaching a stale session keeps the new one"
        );
        fleet.detach("db1", second);
        assert!(!fleet.is_online("db1"));
    }

    #[tokio::test(start_paused = true)]
    async fn three_missed_heartbeats_mean_offline() {
        let fleet = Fleet::new(Duration::from_secs(1), CancellationToken::new(), 1);
        let (sender, _receiver) = mpsc::channel(1);
        let (id, _) = fleet.attach("db1", sender);
        tokio::time::advance(Duration::from_millis(2900)).await;
        assert!(fleet.is_online("db1"));
        fleet.heartbeat("db1", id);
        tokio::time::advance(Duration::from_millis(3100)).await;
        assert!(!fleet.is_online("db1"));
    }
}
