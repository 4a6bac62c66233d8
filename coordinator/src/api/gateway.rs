//! The AgentGateway gRPC service: enrollment and the agents' control
//! streams. Converts between the wire and domain types at this edge.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::error::incident_status;
use cairn_common::model::{InstanceProbe, Operation, probes_from_wire};
use cairn_common::names::{AgentName, InstanceName, validate_label};
use cairn_common::proto::{self, agent_message, coordinator_message};
use cairn_common::tls::RevokedSerials;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::api::auth::{Caller, caller, peer_of};
use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{Catalog, JobKind, JobState, Registration};
use crate::clock::now_ms;
use crate::fleet::authority::Authority;
use crate::fleet::{CommandOutcome, Fleet};
use crate::jobs::Jobs;
use crate::jobs::upload::{Upload, UploadsInProgress};
use crate::repository::Repository;

/// Commands and acknowledgements queued to one agent.
const CONTROL_QUEUE_LEN: usize = 32;
/// How long a new stream may take to send `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Gateway {
    pub authority: Arc<Authority>,
    pub catalog: Arc<Catalog>,
    pub fleet: Arc<Fleet>,
    pub audit: AuditLog,
    pub revoked: RevokedSerials,
    pub probe_history: u32,
    /// Control-stream loops, so that shutdown waits for them.
    pub tasks: TaskTracker,
    pub repository: Arc<Repository>,
    /// Open upload streams, one per job.
    pub uploads: UploadsInProgress,
    /// The job engine, which ends an attempt the upload saw fail.
    pub jobs: Arc<Jobs>,
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;
/// The most held attempts a registration may name.
const MAX_HELD_ATTEMPTS: usize = 1000;

type UploadStream = Pin<Box<dyn Stream<Item = Result<proto::BackupUploadReply, Status>> + Send>>;
type DownloadStream = Pin<Box<dyn Stream<Item = Result<proto::DownloadMessage, Status>> + Send>>;

/// Replies queued to an uploading agent.
const UPLOAD_REPLY_QUEUE_LEN: usize = 4;

#[tonic::async_trait]
impl proto::agent_gateway_server::AgentGateway for Gateway {
    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let peer = peer_of(&request);
        let body = request.into_inner();
        let issued = self
            .authority
            .enroll(&peer, &body.token, &body.agent_name, &body.csr_pem)
            .await?;
        Ok(Response::new(proto::EnrollResponse {
            certificate_pem: issued.pem,
            ca_pem: self.authority.ca_pem().to_string(),
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<proto::RenewCertificateRequest>,
    ) -> Result<Response<proto::RenewCertificateResponse>, Status> {
        let Caller::Agent {
            name: agent,
            serial,
            ..
        } = caller(&request)?
        else {
            return Err(Status::unauthenticated(
                "renewal needs the agent's current certificate: enroll first (cairn-agent enroll)",
            ));
        };
        let csr_pem = request.into_inner().csr_pem;
        let issued = self
            .authority
            .renew_agent(&agent, &serial, &csr_pem)
            .await?;
        tracing::info!(agent = %agent, old = %serial, new = %issued.serial, "renewed an agent certificate");
        Ok(Response::new(proto::RenewCertificateResponse {
            certificate_pem: issued.pem,
            serial: issued.serial,
            not_after_unix: issued.not_after_unix,
        }))
    }

    type ControlStream = ControlStream;
    type UploadBackupStream = UploadStream;
    type DownloadBackupStream = DownloadStream;

    async fn download_backup(
        &self,
        request: Request<proto::DownloadRequest>,
    ) -> Result<Response<DownloadStream>, Status> {
        let Caller::Agent { name: agent, .. } = caller(&request)? else {
            return Err(Status::unauthenticated(
                "downloads need an agent certificate",
            ));
        };
        let proto::DownloadRequest {
            job_id,
            from_chunk,
            attempt_id,
        } = request.into_inner();
        if from_chunk > 0 && attempt_id.is_empty() {
            return Err(Status::invalid_argument(
                "from_chunk is set but attempt_id is empty: a resumed download names the \
                 attempt it continues",
            ));
        }
        // Only the agent a running restore (or drill) job was sent to may
        // read its backup, and only while the job runs: a resumed download
        // only while its attempt is the job's current one (the engine may
        // have ended it, for a re-attach timeout, while the agent was away).
        let job = self
            .catalog
            .get_job(&job_id)
            .await?
            .filter(|job| {
                job.kind.reads_a_backup()
                    && job.agent_name == agent.as_str()
                    && job.status == JobState::Running
                    && (attempt_id.is_empty() || job.attempt_id == attempt_id)
            })
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "job {job_id} is not a running restore of agent \"{agent}\""
                ))
            })?;
        let manifest = crate::jobs::download::manifest_of(&self.repository, &job).await?;
        let from_chunk = crate::jobs::download::check_from_chunk(&manifest, from_chunk)?;
        if from_chunk > 0 {
            tracing::info!(job_id = %job.id, %agent, from_chunk, "download resumed");
        }
        let (sender, receiver) = mpsc::channel(crate::jobs::download::DOWNLOAD_QUEUE_LEN);
        let span = tracing::info_span!("download", job_id = %job.id, agent = %agent, backup = %job.backup_id);
        self.tasks.spawn(
            crate::jobs::download::stream_chunks(
                self.catalog.clone(),
                self.repository.clone(),
                job,
                manifest,
                from_chunk,
                sender,
            )
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn upload_backup(
        &self,
        request: Request<Streaming<proto::BackupUpload>>,
    ) -> Result<Response<UploadStream>, Status> {
        let Caller::Agent { name: agent, .. } = caller(&request)? else {
            return Err(Status::unauthenticated("uploads need an agent certificate"));
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no start message"))??;
        let Some(proto::BackupUpload {
            body: Some(proto::backup_upload::Body::Start(start)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first upload message must be `start`",
            ));
        };
        let job = self
            .catalog
            .get_job(&start.job_id)
            .await?
            .filter(|job| {
                job.kind == JobKind::Backup
                    && job.agent_name == agent.as_str()
                    && job.backup_id == start.backup_id
                    && job.status == JobState::Running
                    && (start.attempt_id.is_empty() || job.attempt_id == start.attempt_id)
            })
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "job {} is not a running backup of agent \"{agent}\"",
                    start.job_id
                ))
            })?;
        // One stream per job; claimed first, so that a resume sees the
        // backup as the previous stream left it.
        let claim = self.uploads.claim(&job.id).ok_or_else(|| {
            tracing::warn!(job_id = %job.id, %agent, "refused a second upload stream for one job");
            Status::failed_precondition(format!(
                "job {} already has an upload in progress: one upload stream per job",
                job.id
            ))
        })?;
        // Its backup must still be open: a backup that a finished upload
        // completed is never written again.
        let backup = self.catalog.get_backup(&job.backup_id).await?;
        if start.resume && backup.as_ref().is_some_and(|b| b.status == "complete") {
            // The upload finished and only its answer was lost with the
            // stream: say so again.
            let (replies, receiver) = mpsc::channel(1);
            let _ = replies
                .send(Ok(proto::BackupUploadReply {
                    body: Some(proto::backup_upload_reply::Body::Stored(
                        proto::BackupStored {
                            backup_id: job.backup_id.clone(),
                        },
                    )),
                }))
                .await;
            return Ok(Response::new(Box::pin(ReceiverStream::new(receiver))));
        }
        let backup = backup
            .filter(|backup| backup.status == "running")
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "backup {} of job {} is no longer running",
                    job.backup_id, job.id
                ))
            })?;
        let tags = backup.tags();
        let (replies, receiver) = mpsc::channel(UPLOAD_REPLY_QUEUE_LEN);
        let mut upload = Upload::new(
            self.catalog.clone(),
            self.repository.clone(),
            job.clone(),
            tags,
        );
        if start.resume {
            // The attempt's stream broke (the network, this coordinator's
            // restart): it goes on from what was recorded.
            let next_position = upload.resume().await?;
            tracing::info!(job_id = %job.id, %agent, next_position, "upload resumed");
            replies
                .send(Ok(proto::BackupUploadReply {
                    body: Some(proto::backup_upload_reply::Body::Resumed(
                        proto::UploadResumed { next_position },
                    )),
                }))
                .await
                .map_err(|_| Status::cancelled("the agent went away"))?;
        } else {
            upload.start_fresh().await?;
        }
        let jobs = self.jobs.clone();
        let span = tracing::info_span!("upload", job_id = %job.id, agent = %agent, database = %job.database);
        self.tasks.spawn(
            async move {
                let _claim = claim;
                if let Err(status) = upload.run(inbound, replies.clone()).await {
                    tracing::warn!(error = %status.message(), "upload failed");
                    // A storage failure is recorded here, with its own
                    // words: the agent may only see its stream reset (and
                    // the attempt is retried if the job allows). So is an
                    // upload refused for what the agent sent: a hostile
                    // agent would not report it, and could otherwise open
                    // the job's upload again and again. An upload the agent
                    // ended itself is its to explain (pg_dump's message).
                    let failed = match status.code() {
                        tonic::Code::Unavailable if status.message().starts_with("repository:") => {
                            Some((status.message().to_string(), true))
                        }
                        tonic::Code::InvalidArgument => Some((
                            format!("the coordinator refused the upload: {}", status.message()),
                            false,
                        )),
                        _ => None,
                    };
                    if let Some((message, retryable)) = failed {
                        jobs.fail_attempt(&job, &message, retryable).await;
                    }
                    // The agent gets an incident id, not the storage's
                    // own words (paths, the S3 service's); `aborted`, as
                    // the attempt is over (a retry is a new attempt), so
                    // it stops pg_dump instead of resuming.
                    let status = if status.code() == tonic::Code::Unavailable {
                        incident_status(tonic::Code::Aborted, &status.message())
                    } else {
                        status
                    };
                    let _ = replies.send(Err(status)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn control(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let Caller::Agent {
            name: agent,
            serial,
            not_after_unix,
        } = caller(&request)?
        else {
            return Err(Status::unauthenticated(
                "the control stream needs an agent certificate: enroll first (cairn-agent enroll)",
            ));
        };
        let peer = peer_of(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message"))??;
        let Some(proto::AgentMessage {
            body: Some(agent_message::Body::Register(register)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on the control stream must be `register`",
            ));
        };
        if register.agent_name != agent.as_str() {
            let message = format!(
                "register names agent {:?} but the certificate is for \"{agent}\"",
                register.agent_name
            );
            return Err(self
                .refuse_connect(&agent, Status::permission_denied(message))
                .await);
        }
        // Bounded: a host cannot make the coordinator chase a long list.
        let mut held: Vec<(String, String)> = register
            .held_attempts
            .iter()
            .take(MAX_HELD_ATTEMPTS)
            .map(|h| (h.job_id.clone(), h.attempt_id.clone()))
            .collect();
        held.sort();
        held.dedup();
        let registration = registration_from_wire(register, &peer)?;
        let switched = self
            .catalog
            .record_registration(
                agent.as_str(),
                &serial,
                not_after_unix * 1000,
                &registration,
                now_ms(),
            )
            .await?;
        let Some(revoked_by_switch) = switched else {
            let message = format!(
                "certificate {serial} is not agent \"{agent}\"'s current certificate: it was revoked or replaced"
            );
            return Err(self
                .refuse_connect(&agent, Status::unauthenticated(message))
                .await);
        };
        if !revoked_by_switch.is_empty() {
            self.authority
                .switched_certificate(&agent, &serial, &revoked_by_switch)
                .await;
        }
        let (sender, receiver) = mpsc::channel(CONTROL_QUEUE_LEN);
        let heartbeat_interval_ms = self.fleet.heartbeat_interval().as_millis() as u32;
        sender
            .send(Ok(proto::CoordinatorMessage {
                body: Some(coordinator_message::Body::Registered(proto::Registered {
                    heartbeat_interval_ms,
                })),
            }))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        let (session, cancel) = self.fleet.attach(agent.as_str(), sender);
        // After `attach`: a command sent before this went on an older
        // session, and one the agent does not hold is lost.
        let registered_at = now_ms();
        // A revocation that ran between the checks above and `attach` found
        // no session to close; close it here instead.
        if self.revoked.contains(&serial) {
            if self.fleet.detach(agent.as_str(), session) {
                self.jobs.agent_disconnected(agent.as_str()).await;
            }
            let message = format!("certificate {serial} of agent \"{agent}\" is revoked");
            return Err(self
                .refuse_connect(&agent, Status::unauthenticated(message))
                .await);
        }
        self.audit
            .record(AuditEvent::new(
                format!("agent:{agent}"),
                "agent.connect",
                agent.as_str(),
                Outcome::Success,
                format!(
                    "from {peer}, version {}, instances [{}], permits [{}]",
                    registration.version,
                    registration.instances.join(","),
                    registration
                        .permitted_operations
                        .iter()
                        .map(|o| o.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ))
            .await;
        // Its running jobs: re-attached if it still holds them, failed (and
        // retried where allowed) if it lost them.
        self.jobs
            .agent_registered(agent.as_str(), &held, registered_at)
            .await;

        let gateway = self.clone();
        let mut stream = StreamState {
            instances: registration.instances.iter().cloned().collect(),
            probe_refusal_audited: false,
        };
        let span = tracing::info_span!("control", agent = %agent, session);
        self.tasks.spawn(
            async move {
                loop {
                    let message = tokio::select! {
                        _ = cancel.cancelled() => break,
                        message = inbound.message() => message,
                    };
                    match message {
                        Ok(Some(message)) => {
                            gateway
                                .handle(agent.as_str(), session, &mut stream, message)
                                .await
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::info!(error = %status.message(), "control stream broke");
                            break;
                        }
                    }
                }
                if gateway.fleet.detach(agent.as_str(), session) {
                    // Its jobs go on without the stream: they wait for the
                    // agent to come back.
                    gateway.jobs.agent_disconnected(agent.as_str()).await;
                }
                if let Err(error) = gateway.catalog.touch_agent(agent.as_str(), now_ms()).await {
                    tracing::warn!(%error, "cannot record last-seen time");
                }
                tracing::info!("agent disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

impl Gateway {
    /// Audits a refused control stream and returns the status to send.
    async fn refuse_connect(&self, agent: &AgentName, status: Status) -> Status {
        self.audit
            .record(AuditEvent::new(
                format!("agent:{agent}"),
                "agent.connect",
                agent.as_str(),
                Outcome::Refused,
                status.message(),
            ))
            .await;
        status
    }

    async fn handle(
        &self,
        agent: &str,
        session: u64,
        stream: &mut StreamState,
        message: proto::AgentMessage,
    ) {
        self.fleet.heartbeat(agent, session);
        match message.body {
            Some(agent_message::Body::Heartbeat(_)) => {}
            Some(agent_message::Body::ProbeReport(result)) => {
                let probes = probes_from_wire(result.instances);
                if self.probes_are_registered(agent, stream, &probes).await {
                    self.store_probes(agent, &probes).await;
                }
            }
            Some(agent_message::Body::CommandResult(result)) => {
                let outcome = self.outcome_from_wire(agent, stream, &result).await;
                if result.attempt_id.is_empty() {
                    if self
                        .fleet
                        .complete(agent, session, &result.command_id, outcome)
                        .is_some()
                    {
                        tracing::debug!(
                            command_id = %result.command_id,
                            "result for an unknown or expired command"
                        );
                    }
                } else {
                    // A job's result goes by its attempt, never to a waiter
                    // (command ids start again with each coordinator).
                    self.jobs
                        .attempt_reported(agent, &result.attempt_id, outcome)
                        .await;
                }
            }
            Some(agent_message::Body::Register(_)) => {
                tracing::warn!("ignoring a second register on one stream");
            }
            None => tracing::warn!("empty agent message"),
        }
    }

    /// Whether every probe names an instance the agent registered on this
    /// stream. A report that names another is refused whole: an agent
    /// speaks only for its own instances, and the catalog, the CLI and the
    /// metrics would otherwise list instances nobody registered. The first
    /// refusal on a stream is audited, later ones only logged, so that a
    /// misbehaving agent cannot flood the audit log.
    async fn probes_are_registered(
        &self,
        agent: &str,
        stream: &mut StreamState,
        probes: &[InstanceProbe],
    ) -> bool {
        let unknown: BTreeSet<&str> = probes
            .iter()
            .map(|probe| probe.instance.as_str())
            .filter(|instance| !stream.instances.contains(*instance))
            .collect();
        if unknown.is_empty() {
            return true;
        }
        let detail = format!(
            "probe report refused: it names instances [{}] the agent did not register \
             (registered: [{}])",
            unknown.into_iter().collect::<Vec<_>>().join(","),
            stream
                .instances
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",")
        );
        tracing::warn!(%detail, "refused a probe report");
        if !stream.probe_refusal_audited {
            stream.probe_refusal_audited = true;
            self.audit
                .record(AuditEvent::new(
                    format!("agent:{agent}"),
                    "agent.probe-report",
                    agent,
                    Outcome::Refused,
                    detail,
                ))
                .await;
        }
        false
    }

    async fn store_probes(&self, agent: &str, probes: &[InstanceProbe]) {
        if let Err(error) = self
            .catalog
            .insert_probes(agent, probes, now_ms(), self.probe_history)
            .await
        {
            tracing::warn!(%error, "cannot store probes");
        }
    }

    async fn outcome_from_wire(
        &self,
        agent: &str,
        stream: &mut StreamState,
        result: &proto::CommandResult,
    ) -> CommandOutcome {
        match &result.outcome {
            Some(proto::command_result::Outcome::Probe(probe)) => {
                let probes = probes_from_wire(probe.instances.clone());
                if !self.probes_are_registered(agent, stream, &probes).await {
                    return CommandOutcome::Error(
                        "the agent's probe names instances it did not register".into(),
                    );
                }
                self.store_probes(agent, &probes).await;
                CommandOutcome::Probe(probes)
            }
            Some(proto::command_result::Outcome::Refused(refusal)) => {
                let operation = Operation::try_from(refusal.operation).ok();
                self.audit
                    .record(AuditEvent::new(
                        format!("agent:{agent}"),
                        "agent.refused-command",
                        agent,
                        Outcome::Refused,
                        refusal.reason.clone(),
                    ))
                    .await;
                CommandOutcome::Refused {
                    operation,
                    reason: refusal.reason.clone(),
                }
            }
            Some(proto::command_result::Outcome::Error(error)) => {
                CommandOutcome::Error(error.clone())
            }
            Some(proto::command_result::Outcome::JobDone(done)) => {
                CommandOutcome::JobDone(done.restore.clone())
            }
            Some(proto::command_result::Outcome::Cancelled(cancelled)) => {
                CommandOutcome::Cancelled(cancelled.detail.clone())
            }
            Some(proto::command_result::Outcome::Interrupted(reason)) => {
                CommandOutcome::Interrupted(reason.clone())
            }
            None => CommandOutcome::Error("the agent sent an empty command result".into()),
        }
    }
}

/// What the coordinator keeps about one open control stream.
#[derive(Debug)]
struct StreamState {
    /// The instances the agent registered on this stream: the only ones
    /// its probes may report on.
    instances: BTreeSet<String>,
    /// Whether a refused probe report was audited on this stream already.
    probe_refusal_audited: bool,
}

/// Most instances and labels one agent may register.
const REGISTER_ITEMS_MAX: usize = 64;
/// Longest hostname or version string kept.
const REGISTER_TEXT_MAX_CHARS: usize = 255;

/// Whether an agent of version `agent` speaks this coordinator's protocol:
/// the same major version, and before 1.0 the same minor too (0.x releases
/// may change the protocol, as 0.2 did when agents gave up the keys).
fn compatible_versions(agent: &str, coordinator: &str) -> bool {
    fn parts(version: &str) -> Option<(&str, &str)> {
        let mut numbers = version.split('.');
        Some((numbers.next()?, numbers.next()?))
    }
    match (parts(agent), parts(coordinator)) {
        (Some(("0", agent_minor)), Some(("0", minor))) => agent_minor == minor,
        (Some((agent_major, _)), Some((major, _))) => agent_major == major,
        _ => false,
    }
}

/// Checks everything an agent registers: it reaches the catalog, the audit
/// log, the CLI and metric labels.
fn registration_from_wire(register: proto::Register, peer: &str) -> Result<Registration, Status> {
    let invalid = |field: &str, reason: String| {
        Status::invalid_argument(format!("register.{field}: {reason}"))
    };
    if register.instances.is_empty() || register.instances.len() > REGISTER_ITEMS_MAX {
        return Err(invalid(
            "instances",
            format!("between 1 and {REGISTER_ITEMS_MAX} are allowed"),
        ));
    }
    for (index, instance) in register.instances.iter().enumerate() {
        InstanceName::new(instance.as_str())
            .map_err(|e| invalid(&format!("instances[{index}]"), e.to_string()))?;
    }
    if register.labels.len() > REGISTER_ITEMS_MAX {
        return Err(invalid(
            "labels",
            format!("at most {REGISTER_ITEMS_MAX} are allowed"),
        ));
    }
    for (key, value) in &register.labels {
        validate_label(key, value).map_err(|e| invalid("labels", e))?;
    }
    for (field, text) in [
        ("hostname", &register.hostname),
        ("version", &register.version),
    ] {
        if text.chars().count() > REGISTER_TEXT_MAX_CHARS || text.chars().any(char::is_control) {
            return Err(invalid(
                field,
                format!("at most {REGISTER_TEXT_MAX_CHARS} printable characters"),
            ));
        }
    }
    if !compatible_versions(&register.version, cairn_common::VERSION) {
        return Err(Status::failed_precondition(format!(
            "register.version: cairn-agent {:?} cannot work with this coordinator ({}): their \
             protocols differ; install cairn-agent {} on the host",
            register.version,
            cairn_common::VERSION,
            cairn_common::VERSION
        )));
    }
    let permitted_operations = register
        .permitted_operations
        .iter()
        .enumerate()
        .map(|(index, op)| {
            Operation::try_from(*op)
                .map_err(|e| invalid(&format!("permitted_operations[{index}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Registration {
        hostname: register.hostname,
        version: register.version,
        labels: register.labels.into_iter().collect::<BTreeMap<_, _>>(),
        instances: register.instances,
        permitted_operations,
        peer_address: peer.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register() -> proto::Register {
        proto::Register {
            agent_name: "db1".into(),
            version: cairn_common::VERSION.into(),
            hostname: "host".into(),
            labels: [("env".to_string(), "prod".to_string())]
                .into_iter()
                .collect(),
            instances: vec!["main".into()],
            permitted_operations: vec![proto::Operation::Backup as i32],
            probe_interval_seconds: 15,
            held_attempts: vec![],
        }
    }

    fn check(change: impl FnOnce(&mut proto::Register), expected_field: Option<&str>) {
        let mut message = register();
        change(&mut message);
        match (
            registration_from_wire(message, "127.0.0.2:1"),
            expected_field,
        ) {
            (Ok(_), None) => {}
            (Err(status), Some(field)) => assert!(
                status.message().contains(field),
                "{} does not name {field}",
                status.message()
            ),
            (result, expected) => panic!("expected an error naming {expected:?}, got {result:?}"),
        }
    }

    #[test]
    fn versions_match_on_major_and_before_one_on_minor() {
        for (agent, coordinator, compatible) in [
            ("0.2.0", "0.2.3", true),
            ("0.2.9-rc1", "0.2.0", true),
            ("0.1.0", "0.2.0", false),
            ("0.3.0", "0.2.0", false),
            ("1.4.0", "1.0.2", true),
            ("2.0.0", "1.9.0", false),
            ("", "0.2.0", false),
            ("garbage", "0.2.0", false),
        ] {
            assert_eq!(
                compatible_versions(agent, coordinator),
                compatible,
                "{agent} with {coordinator}"
            );
        }
    }

    #[test]
    fn registrations_are_checked_field_by_field() {
        check(|_| {}, None);
        check(|r| r.instances = vec![], Some("register.instances"));
        check(
            |r| r.instances = vec!["main".into(), "bad\"name".into()],
            Some("register.instances[1]"),
        );
        check(
            |r| r.instances = vec!["x".into(); 65],
            Some("register.instances"),
        );
        check(
            |r| {
                r.labels.insert("Bad Key".into(), "v".into());
            },
            Some("register.labels"),
        );
        check(|r| r.hostname = "a\nb".into(), Some("register.hostname"));
        check(|r| r.version = "v".repeat(300), Some("register.version"));
        check(|r| r.version = "0.1.0".into(), Some("register.version"));
        check(|r| r.version = String::new(), Some("register.version"));
        check(
            |r| r.permitted_operations = vec![1, 99],
            Some("register.permitted_operations[1]"),
        );
    }
}
