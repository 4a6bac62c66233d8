//! `cairn-agent run`: the control session with the coordinator.
//!
//! The agent dials out (a database host listens on nothing), opens one
//! bidirectional stream, registers, then heartbeats, reports periodic
//! probes and executes commands. When the coordinator goes away it
//! reconnects with capped exponential backoff and jitter, forever, until
//! SIGTERM. When the coordinator refuses its certificate as revoked, it
//! says so loudly and backs off much longer (up to
//! [`REVOKED_MAX_BACKOFF`]): only a new enrollment helps, and a fleet of
//! revoked agents should not hammer the coordinator.
//!
//! Each session reads the identity directory afresh, and renews the
//! certificate when two thirds of its lifetime have passed (`renew`),
//! retrying until it succeeds. A renewed certificate is used from the next
//! connection: jobs started after the renewal call the coordinator on a new
//! connection that presents it, and the session ends and reconnects with it
//! as soon as no command is running. A job that runs on is never cut off
//! for this: its calls (the control stream, its upload or download stream)
//! were opened under the old certificate, and the coordinator checks a
//! certificate's expiry when a call starts, not on each message, so they
//! finish even after the old certificate expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use backon::{BackoffBuilder, ExponentialBuilder};
use cairn_common::proto::{
    self, agent_gateway_client::AgentGatewayClient, agent_message, coordinator_message,
};
use cairn_common::tls;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::config::AgentConfig;
use crate::dispatch;
use crate::error::{AgentError, Result};
use crate::jobs::RunningJobs;
use crate::renew::{self, HeldCertificate};

/// Messages queued to the coordinator; a full queue pushes back on probes
/// and command results, never on the stream itself.
const OUTBOUND_QUEUE_LEN: usize = 32;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Connecting, opening the stream and registering must finish within this.
const SESSION_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the reconnection backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// The longest wait between attempts once the coordinator has said this
/// agent is revoked (instead of `reconnect_max_backoff`).
pub const REVOKED_MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How often a session holding a renewed certificate checks whether its
/// commands have all finished, so that it can reconnect with the new one.
const SWITCH_CHECK_INTERVAL: Duration = Duration::from_millis(500);

enum SessionEnd {
    Shutdown,
    Closed,
    /// The certificate was renewed and no command was running: reconnect
    /// at once with the new one.
    Renewed,
}

/// Runs until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    let config = Arc::new(config);
    renew::clean_up(&config.identity_dir)?;
    // Fail at startup, not in the reconnection loop, on a missing identity.
    config.identity().client_config()?;
    let url = config.coordinator_url()?;
    // The newest coordinator term, kept beside agent.toml.
    let jobs = Arc::new(RunningJobs::with_term_file(
        config.config_dir.join(TERM_FILE_NAME),
    )?);
    // Job tasks, so that a shutdown waits for them to clean up (kill
    // pg_dump or pg_restore, drop a staging database) before the process
    // exits.
    let tasks = TaskTracker::new();
    let outcome = sessions(&config, &url, &shutdown, &jobs, &tasks).await;
    // Jobs outlive sessions, not the process: each stops (pg_dump or
    // pg_restore killed, a staging database dropped) before it exits.
    jobs.cancel_all();
    tasks.close();
    if !tasks.is_empty() {
        tracing::info!(jobs = tasks.len(), "waiting for running jobs to stop");
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "running jobs did not stop within {}; exiting anyway",
                humantime::format_duration(SHUTDOWN_GRACE)
            );
        }
    }
    outcome
}

/// The file beside `agent.toml` that keeps the newest coordinator term.
pub const TERM_FILE_NAME: &str = "coordinator-term";

/// How long a shutdown waits for running jobs to clean up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Sessions, one after another, until shutdown.
async fn sessions(
    config: &Arc<AgentConfig>,
    url: &tls::CoordinatorUrl,
    shutdown: &CancellationToken,
    jobs: &Arc<RunningJobs>,
    tasks: &TaskTracker,
) -> Result<()> {
    let backoff_builder = backoff_up_to(config.reconnect_max_backoff);
    let revoked_backoff_builder = backoff_up_to(REVOKED_MAX_BACKOFF);
    let mut backoff = backoff_builder.build();
    // Its own sequence: the first refusals still come quickly (a
    // revocation can be a mistake that an admin undoes by re-enrolling),
    // then the waits grow far beyond the normal ones.
    let mut revoked_backoff = revoked_backoff_builder.build();
    // Once refused as revoked, the agent stays in the slow lane until it
    // registers again: a refused certificate shows up only sometimes as the
    // revocation alert, otherwise as a closed connection.
    let mut revoked = false;
    loop {
        let mut registered_at = None;
        let result = session(config, url, shutdown, &mut registered_at, jobs, tasks).await;
        // Only a session that stayed up resets the backoff: two hosts that
        // share an identity, or a coordinator that accepts and then drops
        // us, must not make the agent reconnect in a tight loop.
        if registered_at.is_some_and(|at: Instant| at.elapsed() >= STABLE_SESSION) {
            backoff = backoff_builder.build();
            revoked_backoff = revoked_backoff_builder.build();
        }
        if registered_at.is_some() {
            revoked = false;
        }
        match result {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Renewed) => {
                tracing::info!("reconnecting with the renewed certificate");
                continue;
            }
            Ok(SessionEnd::Closed) => {
                tracing::warn!("the coordinator closed the control stream; reconnecting");
            }
            Err(error @ AgentError::Revoked { .. }) => {
                revoked = true;
                tracing::error!(%error, "control session failed: this agent is revoked and must be re-enrolled; retrying rarely");
            }
            Err(error) => tracing::warn!(%error, "control session failed; reconnecting"),
        }
        let delay = if revoked {
            revoked_backoff.next().unwrap_or(REVOKED_MAX_BACKOFF)
        } else {
            backoff.next().unwrap_or(config.reconnect_max_backoff)
        };
        tracing::info!(delay = %humantime::format_duration(delay), "waiting before reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Capped exponential backoff with jitter whose waits stay within `longest`:
/// backon's jitter adds up to 100% on top of the delay, so the delay itself
/// is capped at half of it.
fn backoff_up_to(longest: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_delay(longest / 2)
        .with_jitter()
        .without_max_times()
}

/// The error for a failed call on the way to (or during) a session: a
/// revocation when the coordinator said so, else unreachable.
fn refused(url: &tls::CoordinatorUrl, status: &tonic::Status) -> AgentError {
    let reason = describe(status);
    if is_revocation(status) {
        AgentError::Revoked {
            url: url.to_string(),
            reason,
        }
    } else {
        AgentError::CoordinatorUnreachable {
            url: url.to_string(),
            reason,
        }
    }
}

/// Whether the coordinator refused us as revoked: its TLS alert
/// `certificate_revoked` at the handshake (new connections), or its
/// per-call refusal on a connection that was already open.
fn is_revocation(status: &tonic::Status) -> bool {
    if status.code() == tonic::Code::Unauthenticated && status.message().contains("is revoked") {
        return true;
    }
    if tls::received_alert(status) == Some(rustls::AlertDescription::CertificateRevoked) {
        return true;
    }
    // Some layers (h2) pass the alert on as text only.
    tls::describe_transport_error(status).contains("fatal alert: CertificateRevoked")
}

fn register_message(config: &AgentConfig, jobs: &RunningJobs) -> proto::AgentMessage {
    proto::AgentMessage {
        body: Some(agent_message::Body::Register(proto::Register {
            agent_name: config.name.to_string(),
            version: cairn_common::VERSION.to_string(),
            hostname: rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
            labels: config.labels.clone().into_iter().collect(),
            instances: config
                .instances
                .iter()
                .map(|i| i.name.to_string())
                .collect(),
            permitted_operations: config
                .permissions
                .allow
                .iter()
                .map(|op| proto::Operation::from(*op) as i32)
                .collect(),
            probe_interval_seconds: config.probe_interval.as_secs() as u32,
            held_attempts: jobs.held(),
        })),
    }
}

/// Connects, opens the control stream and registers; bounded in time.
async fn open_session(
    config: &AgentConfig,
    url: &tls::CoordinatorUrl,
    tls_config: Arc<rustls::ClientConfig>,
    jobs: &RunningJobs,
) -> Result<(
    Channel,
    Streaming<proto::CoordinatorMessage>,
    mpsc::Sender<proto::AgentMessage>,
    Duration,
)> {
    let unreachable = |reason: String| AgentError::CoordinatorUnreachable {
        url: url.to_string(),
        reason,
    };
    let channel = tls::connect(url, tls_config, config.source_address)
        .await
        .map_err(|e| match e {
            cairn_common::Error::Refused {
                reason,
                revoked: true,
                ..
            } => AgentError::Revoked {
                url: url.to_string(),
                reason,
            },
            other => unreachable(other.to_string()),
        })?;
    let mut client = AgentGatewayClient::new(channel.clone());
    let (outbound, outbound_receiver) = mpsc::channel(OUTBOUND_QUEUE_LEN);
    outbound
        .send(register_message(config, jobs))
        .await
        .map_err(|_| AgentError::Protocol("outbound queue closed".into()))?;
    let mut inbound = client
        .control(ReceiverStream::new(outbound_receiver))
        .await
        .map_err(|status| refused(url, &status))?
        .into_inner();
    let first = inbound
        .message()
        .await
        .map_err(|status| refused(url, &status))?;
    match first.and_then(|m| m.body) {
        Some(coordinator_message::Body::Registered(registered)) => Ok((
            channel,
            inbound,
            outbound,
            Duration::from_millis(u64::from(registered.heartbeat_interval_ms).max(100)),
        )),
        _ => Err(AgentError::Protocol(
            "the first message was not `registered`".into(),
        )),
    }
}

/// One connection's life. Sets `registered_at` once the coordinator has
/// accepted the registration.
async fn session(
    config: &Arc<AgentConfig>,
    url: &tls::CoordinatorUrl,
    shutdown: &CancellationToken,
    registered_at: &mut Option<Instant>,
    jobs: &Arc<RunningJobs>,
    tasks: &TaskTracker,
) -> Result<SessionEnd> {
    let unreachable = |reason: String| AgentError::CoordinatorUnreachable {
        url: url.to_string(),
        reason,
    };
    // Read afresh: a renewal replaced them.
    let tls_config = config.identity().client_config()?;
    let held = HeldCertificate::read(&config.identity())?;
    if HeldCertificate::until(held.not_after).is_zero() {
        // Renewal needs a valid certificate: only a new enrollment helps.
        tracing::error!(
            serial = %held.serial,
            expired_at = %humantime::format_rfc3339_seconds(held.not_after),
            "this agent's certificate has expired (its renewals failed until then): the coordinator will refuse it; re-enroll this host (cairn token create --agent NAME, then cairn-agent enroll into a new --dir)"
        );
    }
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        opened = tokio::time::timeout(SESSION_SETUP_TIMEOUT, open_session(config, url, tls_config, jobs)) => opened,
    };
    let (channel, mut inbound, outbound, heartbeat_interval) = opened.map_err(|_| {
        unreachable(format!(
            "no registration within {}",
            humantime::format_duration(SESSION_SETUP_TIMEOUT)
        ))
    })??;
    *registered_at = Some(Instant::now());
    // Jobs whose streams broke while there was no session go on over it.
    jobs.set_channel(channel.clone());
    tracing::info!(
        coordinator = %url,
        heartbeat = %humantime::format_duration(heartbeat_interval),
        certificate = %held.serial,
        "registered with the coordinator"
    );

    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    let mut probe_timer = tokio::time::interval(config.probe_interval);
    probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    let mut context = dispatch::Context {
        config: config.clone(),
        channel,
        jobs: jobs.clone(),
    };
    let probe_running = Arc::new(AtomicBool::new(false));
    let session_cancel = shutdown.child_token();
    let _cancel_on_exit = session_cancel.clone().drop_guard();
    // Commands spawned and not finished: the session ends for a renewed
    // certificate only at zero. Counted before the spawn, so a job that has
    // not yet registered itself is counted too.
    let commands_running = Arc::new(AtomicUsize::new(0));
    let mut renew_at = held.renew_at;
    let mut held_not_after = held.not_after;
    let mut retry_delay = held.retry_delay();
    let (renewal_sender, mut renewal_results) = mpsc::channel(1);
    let mut renewal_running = false;
    // The renewed certificate, once there is one: from then on this
    // session only waits for its commands to finish.
    let mut renewed: Option<HeldCertificate> = None;
    let mut switch_check = tokio::time::interval(SWITCH_CHECK_INTERVAL);
    // Results of jobs that ended while no session was up go first.
    if !send_results(jobs, &outbound).await {
        return Ok(SessionEnd::Closed);
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            () = jobs.result_posted() => {
                if !send_results(jobs, &outbound).await {
                    return Ok(SessionEnd::Closed);
                }
            }
            _ = tokio::time::sleep(HeldCertificate::until(renew_at)), if !renewal_running => {
                renewal_running = true;
                let config = config.clone();
                let channel = context.channel.clone();
                let url = url.clone();
                let sender = renewal_sender.clone();
                tokio::spawn(async move {
                    let result = renew_and_connect(&config, &url, channel).await;
                    let _ = sender.send(result).await;
                });
            }
            Some(result) = renewal_results.recv() => {
                renewal_running = false;
                match result {
                    Ok((certificate, channel)) => {
                        tracing::info!(
                            serial = %certificate.serial,
                            valid_until = %humantime::format_rfc3339_seconds(certificate.not_after),
                            "certificate renewed; using it from the next connection"
                        );
                        if let Some(channel) = channel {
                            context.channel = channel;
                        }
                        renew_at = certificate.renew_at;
                        held_not_after = certificate.not_after;
                        retry_delay = certificate.retry_delay();
                        renewed = Some(certificate);
                    }
                    Err(error) => {
                        renew_at = std::time::SystemTime::now() + retry_delay;
                        tracing::warn!(
                            %error,
                            retry_in = %humantime::format_duration(retry_delay),
                            expires_in = %humantime::format_duration(HeldCertificate::until(held_not_after)),
                            "certificate renewal failed; retrying"
                        );
                    }
                }
            }
            _ = switch_check.tick(), if renewed.is_some() => {
                if commands_running.load(Ordering::Acquire) == 0 {
                    return Ok(SessionEnd::Renewed);
                }
            }
            _ = heartbeat.tick() => {
                sequence += 1;
                let message = proto::AgentMessage {
                    body: Some(agent_message::Body::Heartbeat(proto::Heartbeat { sequence })),
                };
                // Never block the loop on a full queue: a missed heartbeat is
                // what the coordinator's offline detection is for.
                match outbound.try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => tracing::warn!("outbound queue full; skipped a heartbeat"),
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(SessionEnd::Closed),
                }
            }
            _ = probe_timer.tick() => {
                // One periodic probe at a time: a stuck server gets no pile
                // of probe connections.
                if probe_running.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let config = config.clone();
                let running = probe_running.clone();
                send_in_background(&session_cancel, &outbound, async move {
                    let result = dispatch::probe_instances(&config, &[]).await;
                    running.store(false, Ordering::Release);
                    agent_message::Body::ProbeReport(result)
                });
            }
            message = inbound.message() => {
                match message {
                    Ok(Some(proto::CoordinatorMessage { body: Some(coordinator_message::Body::Command(command)) })) => {
                        run_command_in_background(tasks, &session_cancel, &outbound, context.clone(), command, &commands_running);
                    }
                    Ok(Some(_)) => tracing::warn!("ignoring an unexpected message on the control stream"),
                    Ok(None) => return Ok(SessionEnd::Closed),
                    Err(status) => return Err(refused(url, &status)),
                }
            }
        }
    }
}

/// Sends the job results waiting in the outbox; false if the session
/// closed (what was not sent goes back, for the next session).
async fn send_results(jobs: &RunningJobs, outbound: &mpsc::Sender<proto::AgentMessage>) -> bool {
    let mut waiting = jobs.take_results().into_iter();
    while let Some(posted) = waiting.next() {
        let message = proto::AgentMessage {
            body: Some(agent_message::Body::CommandResult(posted.result.clone())),
        };
        if outbound.send(message).await.is_err() {
            let mut unsent = vec![posted];
            unsent.extend(waiting);
            jobs.put_back(unsent);
            return false;
        }
    }
    true
}

/// Runs `work` off the session loop (a slow probe never delays a
/// heartbeat) and sends its message, unless the session ends first.
fn send_in_background(
    cancel: &CancellationToken,
    outbound: &mpsc::Sender<proto::AgentMessage>,
    work: impl std::future::Future<Output = agent_message::Body> + Send + 'static,
) {
    let cancel = cancel.clone();
    let outbound = outbound.clone();
    tokio::spawn(async move {
        let body = tokio::select! {
            _ = cancel.cancelled() => return,
            body = work => body,
        };
        let _ = outbound
            .send(proto::AgentMessage { body: Some(body) })
            .await;
    });
}

/// Runs a command off the session loop and sends its result. A job
/// (backup, restore) outlives the session: it goes on when the stream ends
/// (its upload resumes over the next session's channel), and its result
/// goes through the outbox to whichever session is up when it ends. Other
/// commands end with their session.
fn run_command_in_background(
    tasks: &TaskTracker,
    cancel: &CancellationToken,
    outbound: &mpsc::Sender<proto::AgentMessage>,
    context: dispatch::Context,
    command: proto::Command,
    running: &Arc<AtomicUsize>,
) {
    let cancel = cancel.clone();
    running.fetch_add(1, Ordering::AcqRel);
    let running = CountedCommand(running.clone());
    let outbound = outbound.clone();
    let job_id = match &command.kind {
        Some(proto::command::Kind::Backup(backup)) => Some(backup.job_id.clone()),
        Some(proto::command::Kind::Restore(restore)) => Some(restore.job_id.clone()),
        _ => None,
    };
    tasks.spawn(async move {
        let _running = running;
        let jobs = context.jobs.clone();
        if let Some(job_id) = job_id {
            let result = dispatch::execute(&context, command).await;
            jobs.post_result(&job_id, result);
            return;
        }
        let result = tokio::select! {
            result = dispatch::execute(&context, command) => result,
            _ = cancel.cancelled() => return,
        };
        let _ = outbound
            .send(proto::AgentMessage {
                body: Some(agent_message::Body::CommandResult(result)),
            })
            .await;
    });
}

/// One running command in a session's count; dropped when it ends however
/// it ends.
struct CountedCommand(Arc<AtomicUsize>);

impl Drop for CountedCommand {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Renews over `channel` (the current certificate's connection), then
/// opens a connection that presents the new certificate, for the calls of
/// jobs started from now on; `None` if that connection cannot be made yet
/// (the next session makes it).
async fn renew_and_connect(
    config: &AgentConfig,
    url: &tls::CoordinatorUrl,
    channel: Channel,
) -> Result<(HeldCertificate, Option<Channel>)> {
    let certificate = renew::renew(config, channel).await?;
    let channel = match config.identity().client_config() {
        Ok(tls_config) => match tls::connect(url, tls_config, config.source_address).await {
            Ok(channel) => Some(channel),
            Err(error) => {
                tracing::warn!(%error, "cannot connect with the renewed certificate yet");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot read the renewed identity");
            None
        }
    };
    Ok((certificate, channel))
}

fn describe(status: &tonic::Status) -> String {
    let cause = tls::describe_transport_error(status);
    let detail = if cause == status.message() || cause.is_empty() {
        format!("{}: {}", status.code(), status.message())
    } else {
        format!("{}: {} ({cause})", status.code(), status.message())
    };
    match status.code() {
        // A refused client certificate often shows up as a cancelled call
        // (TLS 1.3 reports it after the handshake, racing the close).
        tonic::Code::Cancelled | tonic::Code::Unknown => format!(
            "{detail}; if this persists, the coordinator may be refusing this agent's certificate (revoked or expired): check `cairn agents list` and `cairn audit list` on the coordinator"
        ),
        _ => detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once revoked, the waits grow well past the normal longest wait but
    /// never beyond [`REVOKED_MAX_BACKOFF`]; the normal ones stay capped.
    #[test]
    fn a_revoked_agent_backs_off_up_to_an_hour() {
        let normal_longest = crate::config::DEFAULT_RECONNECT_MAX_BACKOFF;
        let normal: Vec<Duration> = backoff_up_to(normal_longest).build().take(40).collect();
        let revoked: Vec<Duration> = backoff_up_to(REVOKED_MAX_BACKOFF)
            .build()
            .take(40)
            .collect();
        assert!(normal.iter().all(|d| *d <= normal_longest), "{normal:?}");
        assert!(
            revoked.iter().all(|d| *d <= REVOKED_MAX_BACKOFF),
            "{revoked:?}"
        );
        assert!(
            revoked[35..].iter().all(|d| *d >= REVOKED_MAX_BACKOFF / 2),
            "the revoked waits reach half an hour and more: {revoked:?}"
        );
        assert!(
            revoked[0] < Duration::from_secs(1),
            "the first retry is quick"
        );
    }

    #[test]
    fn the_coordinators_per_call_refusal_reads_as_a_revocation() {
        let refusal = tonic::Status::unauthenticated("certificate 0a of agent \"db1\" is revoked");
        assert!(is_revocation(&refusal));
        let alert =
            tonic::Status::unknown("transport error: received fatal alert: CertificateRevoked");
        assert!(is_revocation(&alert));
        assert!(!is_revocation(&tonic::Status::unavailable(
            "connection refused"
        )));
    }
}
