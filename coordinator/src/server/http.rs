//! Plain HTTP for machines: `/healthz` (the process runs), `/readyz` (the
//! catalog answers and the repository's descriptor reads back) and `/metrics`
//! (Prometheus text: agents online/offline, probe status per instance,
//! replication lag, disk free).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use cairn_common::model::ReplicationRole;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::catalog::Catalog;
use crate::clock::now_ms;
use crate::fleet::Fleet;
use crate::repository::Repository;

#[derive(Debug, Clone)]
pub struct HttpState {
    pub catalog: Arc<Catalog>,
    pub fleet: Arc<Fleet>,
    /// The open repository, whose descriptor `/readyz` reads.
    pub repository: Arc<Repository>,
    /// When the fleet CA's certificate expires (Unix seconds): shown in
    /// `/metrics`, warned about in `/readyz` within [`CA_EXPIRY_WARNING`].
    pub ca_not_after_unix: i64,
}

/// How long before the fleet CA expires `/readyz` and the log start
/// warning: every identity it signed dies with it, and replacing it means
/// re-enrolling the fleet.
pub const CA_EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// A warning when the fleet CA expires within [`CA_EXPIRY_WARNING`] of
/// `now_unix`.
pub fn ca_expiry_warning(ca_not_after_unix: i64, now_unix: i64) -> Option<String> {
    let left = ca_not_after_unix - now_unix;
    if left > CA_EXPIRY_WARNING.as_secs() as i64 {
        return None;
    }
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(ca_not_after_unix.max(0) as u64),
    );
    Some(if left <= 0 {
        format!("the fleet CA expired at {when}: no certificate it signed is valid")
    } else {
        format!(
            "the fleet CA expires at {when} (in {} days): every agent and operator certificate dies with it",
            left / 86400
        )
    })
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if let Err(error) = state.catalog.ping().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("catalog: {error}\n"),
        );
    }
    if let Err(error) = check_repository(&state.repository).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "repository {} not readable: {error}\n",
                state.repository.store.describe()
            ),
        );
    }
    // Not a reason to take the coordinator out of service, but the
    // detail an operator (or a check that reads the body) sees.
    match ca_expiry_warning(state.ca_not_after_unix, now_ms() / 1000) {
        Some(warning) => (StatusCode::OK, format!("ready\nwarning: {warning}\n")),
        None => (StatusCode::OK, "ready\n".to_string()),
    }
}

/// How long `/readyz` waits for the repository before answering 503.
const READYZ_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the repository's descriptor (`cairn-repository.json`) back.
/// Nothing is written: a probe object per process would collide between
/// coordinators sharing a bucket and fail on a write-once one, and a load
/// balancer's probes would churn the bucket.
async fn check_repository(repository: &Repository) -> Result<(), String> {
    tokio::time::timeout(READYZ_STORE_TIMEOUT, repository.check_readable())
        .await
        .map_err(|_| format!("no answer within {}s", READYZ_STORE_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    agent: String,
    instance: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StandbyLabels {
    agent: String,
    instance: String,
    standby: String,
    client_address: String,
}

/// Label values from PostgreSQL (a standby's `application_name` is set by
/// whoever connects) are not validated names: keep them from breaking the
/// exposition format, which prometheus-client writes without escaping.
fn label_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .take(128)
        .collect()
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    match render_metrics(&state).await {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{error}\n"),
        ),
    }
}

async fn render_metrics(state: &HttpState) -> Result<String, crate::error::CoordinatorError> {
    let agents = state.catalog.list_agents().await?;
    let probes = state.catalog.latest_probes().await?;
    let mut registry = Registry::with_prefix("cairn");

    let by_status = Family::<StatusLabels, Gauge>::default();
    let agent_up = Family::<AgentLabels, Gauge>::default();
    for status in ["online", "offline", "revoked"] {
        by_status
            .get_or_create(&StatusLabels {
                status: status.into(),
            })
            .set(0);
    }
    for agent in &agents {
        let online = agent.revoked_at.is_none() && state.fleet.is_online(&agent.name);
        let status = match (agent.revoked_at.is_some(), online) {
            (true, _) => "revoked",
            (false, true) => "online",
            (false, false) => "offline",
        };
        by_status
            .get_or_create(&StatusLabels {
                status: status.into(),
            })
            .inc();
        agent_up
            .get_or_create(&AgentLabels {
                agent: agent.name.clone(),
            })
            .set(i64::from(online));
    }
    registry.register("agents", "Enrolled agents by status", by_status);
    let certificate_expiry = Family::<AgentLabels, Gauge>::default();
    for agent in agents.iter().filter(|a| a.revoked_at.is_none()) {
        certificate_expiry
            .get_or_create(&AgentLabels {
                agent: agent.name.clone(),
            })
            .set(agent.certificate_not_after / 1000);
    }
    registry.register(
        "agent_certificate_expiry_seconds",
        "When the agent's current certificate expires, Unix seconds (agents renew at two thirds of its lifetime)",
        certificate_expiry,
    );
    if let Some(soonest) = agents
        .iter()
        .filter(|a| a.revoked_at.is_none())
        .map(|a| a.certificate_not_after)
        .min()
    {
        let gauge = Gauge::<i64>::default();
        gauge.set(soonest / 1000);
        registry.register(
            "agent_certificate_soonest_expiry_seconds",
            "The soonest expiry among the fleet's current agent certificates, Unix seconds",
            gauge,
        );
    }
    let ca_expiry = Gauge::<i64>::default();
    ca_expiry.set(state.ca_not_after_unix);
    registry.register(
        "ca_certificate_expiry_seconds",
        "When the fleet CA's certificate expires, Unix seconds",
        ca_expiry,
    );
    registry.register(
        "agent_up",
        "1 if the agent is connected and heartbeating",
        agent_up,
    );

    let reachable = Family::<InstanceLabels, Gauge>::default();
    let probe_age = Family::<InstanceLabels, FloatGauge>::default();
    let in_recovery = Family::<InstanceLabels, Gauge>::default();
    let receiver_lag_bytes = Family::<InstanceLabels, Gauge>::default();
    let receiver_lag_seconds = Family::<InstanceLabels, FloatGauge>::default();
    let standby_lag_bytes = Family::<StandbyLabels, Gauge>::default();
    let standby_lag_seconds = Family::<StandbyLabels, FloatGauge>::default();
    let disk_available = Family::<InstanceLabels, Gauge>::default();
    let disk_total = Family::<InstanceLabels, Gauge>::default();
    let connections = Family::<InstanceLabels, Gauge>::default();
    let max_connections = Family::<InstanceLabels, Gauge>::default();
    let archiver_failed = Family::<InstanceLabels, Gauge>::default();
    let now = now_ms();
    for (agent, probe) in &probes {
        let labels = InstanceLabels {
            agent: agent.clone(),
            instance: probe.instance.clone(),
        };
        reachable
            .get_or_create(&labels)
            .set(i64::from(probe.reachable));
        probe_age
            .get_or_create(&labels)
            .set((now - probe.probed_at.timestamp_millis()) as f64 / 1000.0);
        if !probe.reachable {
            continue;
        }
        in_recovery
            .get_or_create(&labels)
            .set(i64::from(probe.in_recovery));
        if let (ReplicationRole::Standby, Some(receiver)) = (probe.role, &probe.receiver) {
            receiver_lag_bytes
                .get_or_create(&labels)
                .set(saturating_i64(receiver.replay_lag_bytes));
            if let Some(seconds) = receiver.replay_lag_seconds {
                receiver_lag_seconds.get_or_create(&labels).set(seconds);
            }
        }
        for standby in &probe.standbys {
            let labels = StandbyLabels {
                agent: agent.clone(),
                instance: probe.instance.clone(),
                standby: label_text(&standby.application_name),
                client_address: label_text(&standby.client_address),
            };
            standby_lag_bytes
                .get_or_create(&labels)
                .set(saturating_i64(standby.replay_lag_bytes));
            if let Some(seconds) = standby.replay_lag_seconds {
                standby_lag_seconds.get_or_create(&labels).set(seconds);
            }
        }
        if let Some(disk) = &probe.data_directory_disk {
            disk_available
                .get_or_create(&labels)
                .set(saturating_i64(disk.available_bytes));
            disk_total
                .get_or_create(&labels)
                .set(saturating_i64(disk.total_bytes));
        }
        connections
            .get_or_create(&labels)
            .set(i64::from(probe.connections));
        max_connections
            .get_or_create(&labels)
            .set(i64::from(probe.max_connections));
        if let Some(archiver) = &probe.archiver {
            archiver_failed
                .get_or_create(&labels)
                .set(saturating_i64(archiver.failed_count));
        }
    }
    registry.register(
        "instance_reachable",
        "1 if the latest probe reached the instance",
        reachable,
    );
    registry.register(
        "instance_probe_age_seconds",
        "Age of the latest probe",
        probe_age,
    );
    registry.register(
        "instance_in_recovery",
        "1 if the instance is a standby",
        in_recovery,
    );
    registry.register(
        "instance_replication_lag_bytes",
        "Standby's own view: WAL received but not yet replayed",
        receiver_lag_bytes,
    );
    registry.register(
        "instance_replication_lag_seconds",
        "Standby's own view: time since the last replayed transaction",
        receiver_lag_seconds,
    );
    registry.register(
        "standby_replay_lag_bytes",
        "Primary's view of each standby: WAL not yet replayed there",
        standby_lag_bytes,
    );
    registry.register(
        "standby_replay_lag_seconds",
        "Primary's view of each standby: replay_lag",
        standby_lag_seconds,
    );
    registry.register(
        "instance_disk_available_bytes",
        "Free space of the data directory's filesystem",
        disk_available,
    );
    registry.register(
        "instance_disk_total_bytes",
        "Size of the data directory's filesystem",
        disk_total,
    );
    registry.register("instance_connections", "Client connections", connections);
    registry.register(
        "instance_max_connections",
        "max_connections",
        max_connections,
    );
    registry.register(
        "instance_archiver_failed_count",
        "pg_stat_archiver.failed_count",
        archiver_failed,
    );
    let mut text = String::new();
    encode(&mut text, &registry)
        .map_err(|e| crate::error::CoordinatorError::Internal(format!("metrics encoding: {e}")))?;
    Ok(text)
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod ca_expiry_tests {
    use super::*;

    #[test]
    fn the_ca_is_warned_about_within_90_days() {
        let day = 86_400;
        assert_eq!(ca_expiry_warning(1_000 + 91 * day, 1_000), None);
        let soon = ca_expiry_warning(1_000 + 89 * day, 1_000).unwrap();
        assert!(
            soon.contains("expires") && soon.contains("in 89 days"),
            "{soon}"
        );
        let past = ca_expiry_warning(1_000, 2_000).unwrap();
        assert!(past.contains("expired"), "{past}");
    }
}
