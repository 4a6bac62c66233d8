//! `cairn serve`: wires the catalog, the CA, the fleet and the two gRPC
//! services behind our mTLS listener, plus the HTTP endpoints, and shuts
//! down in order on SIGTERM: stop accepting, end agent sessions, wait for
//! in-flight calls up to `server.shutdown_grace`, close the catalog.

pub mod home;
pub mod http;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::chunk::MAX_CHUNK_MESSAGE_BYTES;
use cairn_common::pki::CertificateAuthority;
use cairn_common::proto::admin_server::AdminServer;
use cairn_common::proto::agent_gateway_server::AgentGatewayServer;
use cairn_common::tls::{self, IncomingLimits, RevokedSerials, ServerTlsMaterial};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::admin::AdminService;
use crate::api::auth::{admin_interceptor, agent_interceptor};
use crate::api::gateway::Gateway;
use crate::api::refusals::RefusalAudit;
use crate::api::unauthenticated;
use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::fleet::Fleet;
use crate::fleet::authority::Authority;
use crate::jobs::Jobs;
use crate::server::http::{HttpState, router};

const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const SERVER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Audits refused TLS handshakes (another CA, expired, revoked, garbage)
/// and connections closed by a limit, counted per client network.
fn handshake_refusal_auditor(refusals: RefusalAudit) -> tls::HandshakeRefusedCallback {
    Arc::new(move |peer: SocketAddr, reason: &str| {
        let kind = if reason.starts_with("too many") {
            "connection over a limit"
        } else {
            "TLS handshake refused"
        };
        refusals.refuse(
            &peer.to_string(),
            kind,
            AuditEvent::new(
                format!("peer@{peer}"),
                "tls.handshake",
                "coordinator",
                Outcome::Refused,
                format!("TLS handshake refused: {reason}"),
            ),
        );
    })
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| CoordinatorError::io(format!("cannot read {what} {}", path.display()), e))
}

/// Runs the coordinator until `shutdown` fires (the binary wires SIGTERM).
/// How often the coordinator logs the fleet CA's coming expiry (within
/// `http::CA_EXPIRY_WARNING`).
const CA_EXPIRY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How often revoked serials of expired certificates are forgotten.
const REVOKED_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long after its expiry a revoked certificate is still remembered.
const REVOKED_EXPIRY_MARGIN_MS: i64 = 24 * 3600 * 1000;

/// How often the coordinator asks whether the daily collection is due.
const GC_DUE_CHECK: Duration = Duration::from_secs(60);
/// The first ask comes this long after a start: a restarted fleet
/// reconnects and re-attaches its uploads first, and an operator's own
/// `repository gc` right after a start does not meet a daily run.
const GC_FIRST_CHECK: Duration = Duration::from_secs(600);

/// The coordinator's own collection, once per `gc.interval`: whichever
/// coordinator claims the lease with the last run old enough runs it.
async fn daily_gc(
    catalog: Arc<Catalog>,
    repository: Arc<crate::repository::Repository>,
    audit: AuditLog,
    config: crate::config::GcConfig,
    node: String,
    shutdown: CancellationToken,
) {
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + GC_FIRST_CHECK, GC_DUE_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let options = crate::repository::gc::GcOptions {
        grace: config.grace,
        dry_run: false,
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let holder = crate::repository::gc::holder_name(&node);
        let run = crate::repository::gc::collect_garbage_if_due(
            catalog.clone(),
            repository.clone(),
            options,
            &holder,
            config.interval,
        );
        let result = tokio::select! {
            // Cut short, the lease is left to expire (or to this
            // coordinator's next start); the next run goes on.
            _ = shutdown.cancelled() => return,
            result = run => result,
        };
        let (outcome, detail) = match result {
            Ok(None) => continue,
            Ok(Some(report)) => (
                Outcome::Success,
                crate::repository::gc::audit_detail(&report),
            ),
            Err(error) => {
                tracing::warn!(%error, "the daily garbage collection failed");
                (Outcome::Failed, error.to_string())
            }
        };
        audit
            .record(AuditEvent::new(
                "coordinator",
                "repository.gc",
                repository.store.describe(),
                outcome,
                detail,
            ))
            .await;
    }
}

pub async fn serve(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let catalog = Arc::new(Catalog::open_sqlite(&config.catalog.sqlite_path).await?);
    // The repository must open with the master key before anything is
    // served: a wrong key is a startup error, not a failed backup later.
    let repository = Arc::new(
        crate::repository::keys::open_repository(
            config.open_store()?,
            &config.keys.master_key_file,
            &catalog,
            "coordinator",
        )
        .await?,
    );
    // This start's term: on every command, so agents can refuse a deposed
    // coordinator's.
    let term = catalog.next_term().await?;
    tracing::info!(repository = repository.id(), store = %repository.store.describe(), "repository open");
    // Background work (control-stream loops, the refusal auditor) is
    // tracked so shutdown can wait for it before closing the catalog.
    let tasks = TaskTracker::new();
    let audit = AuditLog::new(catalog.clone());
    let refusals = RefusalAudit::start(
        audit.clone(),
        config.server.refusal_audit_window,
        &tasks,
        shutdown.clone(),
    );
    // Revoked certificates past their validity are refused for their dates:
    // they are left out, and forgotten hourly, so the set does not grow with
    // every renewal (a day's margin for clocks that disagree).
    let revoked = RevokedSerials::new(
        catalog
            .revoked_serials(crate::clock::now_ms() - REVOKED_EXPIRY_MARGIN_MS)
            .await?,
    );
    let prune_catalog = catalog.clone();
    let prune_revoked = revoked.clone();
    let prune_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut hourly = tokio::time::interval(REVOKED_PRUNE_INTERVAL);
        loop {
            tokio::select! {
                _ = prune_shutdown.cancelled() => return,
                _ = hourly.tick() => {}
            }
            let cutoff = crate::clock::now_ms() - REVOKED_EXPIRY_MARGIN_MS;
            match prune_catalog.expired_revoked_serials(cutoff).await {
                Ok(expired) => {
                    let forgotten = prune_revoked.forget_expired(expired);
                    if forgotten > 0 {
                        tracing::info!(
                            forgotten,
                            remaining = prune_revoked.len(),
                            "forgot the revoked serials of expired certificates"
                        );
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot read expired revoked certificates"),
            }
        }
    });

    let ca_pem = read(&config.tls.ca_certificate, "the CA certificate")?;
    let ca_key = read(&config.tls.ca_key, "the CA key")?;
    let ca = CertificateAuthority::load(
        &String::from_utf8_lossy(&ca_pem),
        &String::from_utf8_lossy(&ca_key),
    )?;
    let (_, ca_not_after_unix) = cairn_common::identity::certificate_validity(ca.ca_der())?;
    // At startup and then daily: a coordinator that runs for months must
    // still say so in its log.
    let ca_watch_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut daily = tokio::time::interval(CA_EXPIRY_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = ca_watch_shutdown.cancelled() => return,
                _ = daily.tick() => {}
            }
            if let Some(warning) = crate::server::http::ca_expiry_warning(
                ca_not_after_unix,
                crate::clock::now_ms() / 1000,
            ) {
                tracing::warn!("{warning}");
            }
        }
    });
    let material = ServerTlsMaterial {
        ca_pem,
        certificate_pem: read(&config.tls.server_certificate, "the server certificate")?,
        key_pem: read(&config.tls.server_key, "the server key")?,
    };
    let tls_config = tls::server_config(&material, revoked.clone())?;

    let fleet = Arc::new(Fleet::new(
        config.fleet.heartbeat_interval,
        shutdown.child_token(),
        u64::try_from(term).unwrap_or(0),
    ));
    let authority = Arc::new(Authority::new(
        ca,
        catalog.clone(),
        audit.clone(),
        refusals.clone(),
        revoked.clone(),
        fleet.clone(),
        config.fleet.clone(),
    ));

    let grpc_listener = TcpListener::bind(config.server.grpc_listen)
        .await
        .map_err(|e| {
            CoordinatorError::io(
                format!(
                    "cannot listen on server.grpc_listen {}",
                    config.server.grpc_listen
                ),
                e,
            )
        })?;
    let http_listener = TcpListener::bind(config.server.http_listen)
        .await
        .map_err(|e| {
            CoordinatorError::io(
                format!(
                    "cannot listen on server.http_listen {}",
                    config.server.http_listen
                ),
                e,
            )
        })?;

    let jobs = Arc::new(Jobs {
        catalog: catalog.clone(),
        fleet: fleet.clone(),
        audit: audit.clone(),
        repository: repository.clone(),
        config: config.backup.clone(),
        limits: config.jobs.clone(),
        tasks: tasks.clone(),
        clock: Clock::System,
        term,
        wake: Arc::new(Notify::new()),
        fire_targets: Default::default(),
        tick_cursor: Default::default(),
    });
    // Jobs left running go on: their agents re-attach them when they
    // reconnect, or they fail after jobs.reattach_timeout.
    let detached = jobs.detach_all().await?;
    if detached > 0 {
        tracing::info!(
            detached,
            "jobs left running wait for their agents to reconnect"
        );
    }
    tasks.spawn(jobs.clone().run(shutdown.child_token()));
    tracing::info!(term, "job engine started");
    let gateway = Gateway {
        authority: authority.clone(),
        catalog: catalog.clone(),
        fleet: fleet.clone(),
        audit: audit.clone(),
        revoked: revoked.clone(),
        probe_history: config.fleet.probe_history,
        tasks: tasks.clone(),
        repository: repository.clone(),
        uploads: Default::default(),
        jobs: jobs.clone(),
    };
    let keys = crate::repository::keys::MasterKeys::new(
        repository.clone(),
        config.keys.master_key_file.clone(),
        audit.clone(),
        tasks.clone(),
    );
    // This coordinator's name in the collection lease: a lease its
    // previous process held (killed during a collection) is free again.
    let gc_node = format!(
        "coordinator-{}",
        &blake3::hash(
            format!(
                "{}|{}",
                config.keys.master_key_file.display(),
                config.server.grpc_listen
            )
            .as_bytes()
        )
        .to_hex()[..12]
    );
    if catalog.release_gc_lease_of_node(&gc_node).await? {
        tracing::info!(
            node = gc_node,
            "released the garbage collection lease this coordinator held before it stopped"
        );
    }
    if config.gc.enabled {
        tasks.spawn(daily_gc(
            catalog.clone(),
            repository.clone(),
            audit.clone(),
            config.gc.clone(),
            gc_node.clone(),
            shutdown.child_token(),
        ));
    }
    let admin = AdminService {
        authority,
        catalog: catalog.clone(),
        fleet: fleet.clone(),
        audit: audit.clone(),
        jobs,
        repository: repository.clone(),
        keys,
        gc: config.gc.clone(),
        gc_node,
    };

    let incoming = tls::tls_incoming(
        grpc_listener,
        tls_config,
        shutdown.clone(),
        IncomingLimits {
            max_handshakes: config.server.max_tls_handshakes,
            max_anonymous_connections: config.server.max_anonymous_connections,
            handshakes_per_network: config.server.max_handshakes_per_network,
            anonymous_per_network: config.server.max_anonymous_per_network,
            ..IncomingLimits::default()
        },
        Some(handshake_refusal_auditor(refusals.clone())),
    );
    let grpc_shutdown = shutdown.clone();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(SERVER_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(SERVER_KEEPALIVE_TIMEOUT))
        .layer(tower::util::MapRequestLayer::new(
            unauthenticated::limit_body,
        ))
        .add_service(AdminServer::with_interceptor(
            admin,
            admin_interceptor(revoked.clone(), refusals.clone()),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AgentGatewayServer::new(gateway)
                .max_decoding_message_size(MAX_CHUNK_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_CHUNK_MESSAGE_BYTES),
            agent_interceptor(revoked, refusals),
        ))
        .serve_with_incoming_shutdown(incoming, async move { grpc_shutdown.cancelled().await });
    let mut grpc = tokio::spawn(grpc);

    let http_state = HttpState {
        catalog: catalog.clone(),
        fleet,
        repository: repository.clone(),
        ca_not_after_unix,
    };
    let http_shutdown = shutdown.clone();
    let mut http = tokio::spawn(async move {
        axum::serve(http_listener, router(http_state))
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
    });

    audit
        .record(AuditEvent::new(
            "coordinator",
            "coordinator.start",
            config.server.grpc_listen.to_string(),
            Outcome::Success,
            format!("version {}", cairn_common::VERSION),
        ))
        .await;
    tracing::info!(
        grpc = %config.server.grpc_listen,
        http = %config.server.http_listen,
        "coordinator ready"
    );

    // Either server ending on its own is a failure, not a reason to keep
    // running half a coordinator.
    let (mut grpc_done, mut http_done) = (false, false);
    let early_exit = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        result = &mut grpc => {
            grpc_done = true;
            Some(format!("the gRPC server stopped: {result:?}"))
        }
        result = &mut http => {
            http_done = true;
            Some(format!("the HTTP server stopped: {result:?}"))
        }
    };
    shutdown.cancel();
    tracing::info!("shutting down: no new connections, ending agent sessions");
    let grace = config.server.shutdown_grace;
    tasks.close();
    let finished = tokio::time::timeout(grace, async {
        if !grpc_done {
            let _ = (&mut grpc).await;
        }
        if !http_done {
            let _ = (&mut http).await;
        }
        tasks.wait().await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!(grace = %humantime::format_duration(grace), "in-flight work did not finish in time; abandoning it");
        grpc.abort();
        http.abort();
    }
    audit
        .record(AuditEvent::new(
            "coordinator",
            "coordinator.stop",
            config.server.grpc_listen.to_string(),
            Outcome::Success,
            "",
        ))
        .await;
    catalog.close().await;
    match early_exit {
        Some(reason) => Err(CoordinatorError::Unavailable(reason)),
        None => Ok(()),
    }
}
