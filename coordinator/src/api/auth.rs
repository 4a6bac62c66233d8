//! Who is calling, and may they? The per-call half of mutual TLS (the
//! handshake half is `cairn_common::tls`): turns the peer certificate into a
//! [`Caller`], refuses revoked or expired certificates on every call (a
//! revocation bites without waiting for a reconnect), refuses agents on the
//! Admin service and operators on the AgentGateway, and checks roles.

use cairn_common::identity::{Identity, Principal, Role};
use cairn_common::names::AgentName;
use cairn_common::tls::RevokedSerials;
use tonic::{Request, Status};

use crate::api::refusals::RefusalAudit;
use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};

/// The authenticated caller, stored in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No client certificate: only enrollment accepts this.
    Anonymous {
        peer: String,
    },
    /// An agent, with the serial and expiry (Unix seconds) of the
    /// certificate it presented.
    Agent {
        name: AgentName,
        serial: String,
        not_after_unix: i64,
    },
    Operator(Identity),
}

/// The caller's address, for audit rows and logs.
pub fn peer_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Why a certificate was refused: a fixed phrase (the key refusals are
/// counted under) and what to tell the caller.
struct Refusal {
    kind: &'static str,
    message: String,
}

/// Reads and checks the peer certificate, if any.
fn identify<T>(
    request: &Request<T>,
    revoked: &RevokedSerials,
) -> Result<Option<Identity>, Refusal> {
    let Some(certificates) = request.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certificates.first() else {
        return Ok(None);
    };
    let identity = Identity::from_certificate_der(leaf).map_err(|e| Refusal {
        kind: "unreadable certificate",
        message: e.to_string(),
    })?;
    if revoked.contains(&identity.serial) {
        return Err(Refusal {
            kind: "revoked certificate",
            message: format!(
                "certificate {} of {} is revoked",
                identity.serial, identity.principal
            ),
        });
    }
    if identity.not_after_unix < crate::clock::now_ms() / 1000 {
        return Err(Refusal {
            kind: "expired certificate",
            message: format!("certificate of {} has expired", identity.principal),
        });
    }
    Ok(Some(identity))
}

/// Counts a refused call (per client network, `RefusalAudit`) and hands the
/// status back for the caller to return.
fn refused(
    refusals: &RefusalAudit,
    peer: &str,
    action: &'static str,
    target: &'static str,
    status: Status,
    kind: &'static str,
    actor: String,
) -> Status {
    refusals.refuse(
        peer,
        kind,
        AuditEvent::new(
            actor,
            action,
            target,
            Outcome::Refused,
            status.message().to_string(),
        ),
    );
    status
}

/// The interceptor for the Admin service: operators only. Refusals are
/// counted per client network (`RefusalAudit`), never one row per call.
pub fn admin_interceptor(
    revoked: RevokedSerials,
    refusals: RefusalAudit,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let peer = peer_of(&request);
        let refuse = |status: Status, kind: &'static str, actor: String| {
            Err(refused(
                &refusals,
                &peer,
                "admin.call",
                "admin",
                status,
                kind,
                actor,
            ))
        };
        match identify(&request, &revoked) {
            Err(refusal) => refuse(
                Status::unauthenticated(refusal.message),
                refusal.kind,
                format!("peer@{peer}"),
            ),
            Ok(None) => refuse(
                Status::unauthenticated(
                    "a client certificate is required: pass --identity DIR (or set CAIRN_IDENTITY)",
                ),
                "no client certificate",
                format!("anonymous@{peer}"),
            ),
            Ok(Some(identity)) => match identity.principal {
                Principal::Operator { .. } => {
                    request.extensions_mut().insert(Caller::Operator(identity));
                    Ok(request)
                }
                Principal::Agent(name) => refuse(
                    Status::permission_denied("agent identities cannot call the Admin API"),
                    "agent identity on the Admin API",
                    format!("agent:{name}"),
                ),
            },
        }
    }
}

/// The interceptor for the AgentGateway: agents, or anonymous callers
/// (which only `Enroll` accepts).
pub fn agent_interceptor(
    revoked: RevokedSerials,
    refusals: RefusalAudit,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let peer = peer_of(&request);
        let refuse = |status: Status, kind: &'static str, actor: String| {
            Err(refused(
                &refusals,
                &peer,
                "agent.call",
                "agent-gateway",
                status,
                kind,
                actor,
            ))
        };
        let caller = match identify(&request, &revoked) {
            Err(refusal) => {
                return refuse(
                    Status::unauthenticated(refusal.message),
                    refusal.kind,
                    format!("peer@{peer}"),
                );
            }
            Ok(None) => Caller::Anonymous { peer: peer.clone() },
            Ok(Some(identity)) => match identity.principal {
                Principal::Agent(name) => Caller::Agent {
                    name,
                    serial: identity.serial,
                    not_after_unix: identity.not_after_unix,
                },
                principal @ Principal::Operator { .. } => {
                    return refuse(
                        Status::permission_denied(
                            "operator identities cannot call the AgentGateway API",
                        ),
                        "operator identity on the AgentGateway API",
                        principal.to_string(),
                    );
                }
            },
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller an interceptor stored.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// Requires an operator with at least `role`; returns its identity.
pub async fn require_role<T>(
    request: &Request<T>,
    role: Role,
    audit: &AuditLog,
    action: &'static str,
) -> Result<Identity, Status> {
    match caller(request)? {
        Caller::Operator(identity) => {
            let Principal::Operator { role: held, .. } = &identity.principal else {
                return Err(Status::permission_denied("not an operator"));
            };
            if *held < role {
                let message = format!(
                    "{} has role {held}; {action} needs role {role} or higher",
                    identity.principal
                );
                audit
                    .record(AuditEvent::new(
                        identity.principal.to_string(),
                        action,
                        "",
                        Outcome::Refused,
                        message.clone(),
                    ))
                    .await;
                return Err(Status::permission_denied(message));
            }
            Ok(identity)
        }
        _ => Err(Status::permission_denied("operators only")),
    }
}
