//! `cairn-agent run`: the control session with the coordinator.
//!
//! The agent dials out (a database host listens on nothing), opens one
//! bidirectional stream, registers, then heartbeats, reports periodic
//! probes and executes commands. When the coordinator goes away it
//! reconnects with capped exponential backoff and jitter, forever, until
//! SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use cairn_common::proto::{
    self, agent_gateway_client::AgentGatewayClient, agent_message, coordinator_message,
};
use cairn_common::tls;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::dispatch;
use crate::error::{AgentError, Result};

/// Messages queued to the coordinator; a full queue pushes back on probes
/// and command results, never on the stream itself.
const OUTBOUND_QUEUE_LEN: usize = 32;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const REGISTERED_TIMEOUT: Duration = Duration::from_secs(15);

enum SessionEnd {
    Shutdown,
    Closed,
}

/// Runs until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    let config = Arc::new(config);
    let identity = config.identity();
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| AgentError::io(format!("cannot read {}", path.display()), e))
    };
    let tls_config = tls::client_config(
        &read(&identity.ca)?,
        Some((&read(&identity.certificate)?, &read(&identity.key)?)),
    )?;
    let url = config.coordinator_url()?;
    let backoff_builder = ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_delay(config.reconnect_max_backoff)
        .with_jitter()
        .without_max_times();
    let mut backoff = backoff_builder.build();
    loop {
        let session = session(&config, &url, tls_config.clone(), &shutdown);
        match session.await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Closed) => {
                tracing::warn!("the coordinator closed the control stream; reconnecting");
                backoff = backoff_builder.build();
            }
            Err((error, registered)) => {
                if registered {
                    backoff = backoff_builder.build();
                }
                tracing::warn!(%error, "control session failed; reconnecting");
            }
        }
        let delay = backoff.next().unwrap_or(config.reconnect_max_backoff);
        tracing::info!(delay = %humantime::format_duration(delay), "waiting before reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn register_message(config: &AgentConfig) -> proto::AgentMessage {
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
        })),
    }
}

/// One connection's life. The error side says whether registration had
/// succeeded (which resets the backoff).
async fn session(
    config: &Arc<AgentConfig>,
    url: &tls::CoordinatorUrl,
    tls_config: Arc<rustls::ClientConfig>,
    shutdown: &CancellationToken,
) -> std::result::Result<SessionEnd, (AgentError, bool)> {
    let unreachable = |reason: String| AgentError::CoordinatorUnreachable {
        url: url.to_string(),
        reason,
    };
    let channel = tokio::select! {
        _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        channel = tls::connect(url, tls_config, config.source_address) => {
            channel.map_err(|e| (unreachable(e.to_string()), false))?
        }
    };
    let mut client = AgentGatewayClient::new(channel);
    let (outbound, outbound_receiver) = mpsc::channel(OUTBOUND_QUEUE_LEN);
    outbound
        .send(register_message(config))
        .await
        .map_err(|_| (AgentError::Protocol("outbound queue closed".into()), false))?;
    let mut inbound = client
        .control(ReceiverStream::new(outbound_receiver))
        .await
        .map_err(|status| (unreachable(describe(&status)), false))?
        .into_inner();
    let first = tokio::time::timeout(REGISTERED_TIMEOUT, inbound.message())
        .await
        .map_err(|_| (AgentError::Protocol("no answer to register".into()), false))?
        .map_err(|status| (unreachable(describe(&status)), false))?;
    let heartbeat_interval = match first.and_then(|m| m.body) {
        Some(coordinator_message::Body::Registered(registered)) => {
            Duration::from_millis(u64::from(registered.heartbeat_interval_ms).max(100))
        }
        _ => {
            return Err((
                AgentError::Protocol("the first message was not `registered`".into()),
                false,
            ));
        }
    };
    tracing::info!(
        coordinator = %url,
        heartbeat = %humantime::format_duration(heartbeat_interval),
        "registered with the coordinator"
    );

    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    let mut probe_timer = tokio::time::interval(config.probe_interval);
    probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    let session_cancel = shutdown.child_token();
    let _cancel_on_exit = session_cancel.clone().drop_guard();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            _ = heartbeat.tick() => {
                sequence += 1;
                let message = proto::AgentMessage {
                    body: Some(agent_message::Body::Heartbeat(proto::Heartbeat { sequence })),
                };
                if outbound.send(message).await.is_err() {
                    return Ok(SessionEnd::Closed);
                }
            }
            _ = probe_timer.tick() => {
                let config = config.clone();
                send_in_background(&session_cancel, &outbound, async move {
                    agent_message::Body::ProbeReport(dispatch::probe_instances(&config, &[]).await)
                });
            }
            message = inbound.message() => {
                match message {
                    Ok(Some(proto::CoordinatorMessage { body: Some(coordinator_message::Body::Command(command)) })) => {
                        let config = config.clone();
                        send_in_background(&session_cancel, &outbound, async move {
                            agent_message::Body::CommandResult(dispatch::execute(&config, command).await)
                        });
                    }
                    Ok(Some(other)) => tracing::warn!(?other, "ignoring an unexpected message"),
                    Ok(None) => return Ok(SessionEnd::Closed),
                    Err(status) => return Err((unreachable(describe(&status)), true)),
                }
            }
        }
    }
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
