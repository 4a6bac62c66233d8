//! The coordinator's side of `AgentGateway/DownloadBackup`: streams one
//! backup's sealed chunks to the agent running a restore of it, globals
//! first, then the dump in order. The coordinator does not open the chunks:
//! the agent authenticates every one before using it, so a chunk altered
//! in the repository stops the restore there.
//!
//! A few chunks are read ahead from the repository; the stream's queue is
//! short and flow-controlled, so a slow pg_restore slows the reads down.

use std::sync::Arc;

use cairn_common::error::incident_status;
use cairn_common::proto;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::catalog::{Catalog, JobRecord};
use crate::manifest::{Manifest, ManifestChunk};
use crate::repository::{ObjectKey, Repository, RepositoryError};

/// Chunks read from the repository ahead of the agent.
const READ_AHEAD: usize = 4;
/// Chunks queued for the agent.
pub const DOWNLOAD_QUEUE_LEN: usize = 2;

pub type ChunkSender = mpsc::Sender<Result<proto::DownloadChunk, Status>>;

/// Loads the manifest of the job's backup, or says why the restore cannot
/// have it.
pub async fn manifest_of(repository: &Repository, job: &JobRecord) -> Result<Manifest, Status> {
    Manifest::load(repository, &job.backup_id)
        .await
        .map_err(|error| match error {
            RepositoryError::NotFound(_) => Status::data_loss(format!(
                "the manifest of backup {} is missing from the repository",
                job.backup_id
            )),
            RepositoryError::Invalid(message) => Status::data_loss(format!(
                "the manifest of backup {} does not authenticate: {message}",
                job.backup_id
            )),
            // The storage's own words (paths, the S3 service's) go to the
            // log; the agent gets an incident id.
            other => incident_status(Code::Unavailable, &format!("repository: {other}")),
        })
}

/// Sends the backup's chunks to `sender` until done, the agent goes away,
/// or a chunk cannot be read (then the error is the stream's last item).
pub async fn stream_chunks(
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    job: JobRecord,
    manifest: Manifest,
    sender: ChunkSender,
) {
    let chunks = manifest.chunks_in_order();
    let total = manifest.chunks.len();
    let reads = futures::stream::iter(chunks)
        .map(|(position, chunk)| {
            let repository = repository.clone();
            async move {
                let read = repository.store.get(&ObjectKey::chunk(&chunk.id)).await;
                (position, chunk, read)
            }
        })
        .buffered(READ_AHEAD);
    let mut reads = std::pin::pin!(reads);
    let mut sent_bytes = 0u64;
    let mut sent_chunks = 0u64;
    while let Some((position, chunk, read)) = reads.next().await {
        let sealed = match read {
            Ok(sealed) => sealed,
            Err(error) => {
                let _ = sender
                    .send(Err(unreadable(position, total, &chunk, &error)))
                    .await;
                return;
            }
        };
        let message = proto::DownloadChunk {
            id: chunk.id.as_bytes().to_vec(),
            plaintext_bytes: chunk.plaintext_bytes,
            sealed: sealed.to_vec(),
            globals: position.is_none(),
        };
        if sender.send(Ok(message)).await.is_err() {
            tracing::info!("the agent stopped reading the backup");
            return;
        }
        if position.is_some() {
            sent_bytes += chunk.plaintext_bytes;
            sent_chunks += 1;
            // Every 8 chunks: progress for people watching, and whether the
            // job still runs (a job cancelled while its agent was out of
            // reach must not go on restoring).
            if sent_chunks.is_multiple_of(8) || sent_chunks == total as u64 {
                if let Err(error) = catalog
                    .update_job_progress(&job.id, sent_bytes, 0, sent_chunks)
                    .await
                {
                    tracing::warn!(%error, "cannot record the restore's progress");
                }
                match catalog.get_job(&job.id).await {
                    Ok(Some(current)) if current.status != "running" => {
                        let _ = sender
                            .send(Err(Status::aborted(format!(
                                "job {} is {}: the download stops",
                                job.id, current.status
                            ))))
                            .await;
                        return;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "cannot read the job's status"),
                }
            }
        }
    }
}

fn unreadable(
    position: Option<usize>,
    total: usize,
    chunk: &ManifestChunk,
    error: &RepositoryError,
) -> Status {
    let which = match position {
        Some(index) => format!("chunk {} of {total} ({})", index + 1, chunk.id),
        None => format!("the globals chunk ({})", chunk.id),
    };
    match error {
        RepositoryError::NotFound(_) => {
            Status::data_loss(format!("{which} is missing from the repository"))
        }
        other => incident_status(
            Code::Unavailable,
            &format!("repository: cannot read {which}: {other}"),
        ),
    }
}
