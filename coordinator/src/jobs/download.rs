//! The coordinator's side of `AgentGateway/DownloadBackup`: streams one
//! backup to the agent running a restore of it: a page of the chunk list
//! (each chunk's content hash and size), then those chunks' packed bytes in
//! that order, then the next page, and so on, globals first. The agent
//! holds at most a page of the list at a time, whatever the backup's size. Agents hold no key: the coordinator
//! authenticates each stored chunk (its seal, with its name bound in)
//! before it sends the packed bytes, and the agent decompresses them and
//! checks them against the list. A chunk altered in the repository stops
//! the restore there, named by its position and id.
//!
//! Chunks of a format-1 manifest (no content hashes) are opened whole here,
//! checked against their keyed names, and sent with the hash computed
//! from them.
//!
//! A few chunks are read and authenticated ahead; the stream's queue is
//! short and flow-controlled, so a slow pg_restore slows the reads down.
//!
//! A download resumes: when its stream broke (the network, this
//! coordinator's restart) the agent asks again with the number of chunks it
//! already has (`from_chunk`), and the list and the chunks start after
//! them; each page says where it starts (`first_chunk`), which the agent
//! checks.

use std::sync::Arc;

use cairn_common::chunk::{ChunkError, ChunkId, open_sealed};
use cairn_common::crypto::SealError;
use cairn_common::error::incident_status;
use cairn_common::proto::{self, download_message};
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::catalog::{Catalog, JobRecord, JobState};
use crate::repository::manifest::{Manifest, ManifestChunk};
use crate::repository::{ObjectKey, Repository, RepositoryError};

/// Chunks read from the repository ahead of the agent.
const READ_AHEAD: usize = 4;
/// Messages queued for the agent.
pub const DOWNLOAD_QUEUE_LEN: usize = 2;
/// Chunks per page of the list (about 45 bytes each on the wire).
const LIST_PAGE: usize = 4096;

pub type ChunkSender = mpsc::Sender<Result<proto::DownloadMessage, Status>>;

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

/// `from_chunk` of a download request, checked against the backup's chunk
/// count (globals included).
pub fn check_from_chunk(manifest: &Manifest, from_chunk: u64) -> Result<usize, Status> {
    let count = usize::from(manifest.globals.is_some()) + manifest.chunks.len();
    usize::try_from(from_chunk)
        .ok()
        .filter(|from| *from <= count)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "from_chunk is {from_chunk}, but the backup has {count} chunks (globals \
                 included): resume at most at the end"
            ))
        })
}

/// Sends the backup's list and chunks, from chunk `from_chunk` on (see
/// [`check_from_chunk`]), to `sender` until done, the agent goes away, or a
/// chunk cannot be read or authenticated (then the error is the stream's
/// last item).
pub async fn stream_chunks(
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    job: JobRecord,
    manifest: Manifest,
    from_chunk: usize,
    sender: ChunkSender,
) {
    let mut chunks = manifest.chunks_in_order();
    let total = manifest.chunks.len();
    let from_chunk = from_chunk.min(chunks.len());
    // The chunks the agent already has were sent by an earlier stream of
    // this attempt: counted, so that the job's progress stays true.
    let (mut sent_bytes, mut sent_chunks) = chunks
        .drain(..from_chunk)
        .filter(|(position, _)| position.is_some())
        .fold((0u64, 0u64), |(bytes, count), (_, chunk)| {
            (bytes + chunk.plaintext_bytes, count + 1)
        });
    let reads = futures::stream::iter(listed_pages(chunks, from_chunk))
        .map(|item| {
            let repository = repository.clone();
            async move {
                match item {
                    Item::List(list) => Read::List(list),
                    Item::Chunk(position, chunk) => {
                        let data = read_chunk(&repository, position, total, &chunk).await;
                        Read::Chunk(position, chunk, data)
                    }
                }
            }
        })
        .buffered(READ_AHEAD);
    let mut reads = std::pin::pin!(reads);
    while let Some(read) = reads.next().await {
        let (body, position, chunk) = match read {
            Read::List(list) => (download_message::Body::List(list), None, None),
            Read::Chunk(position, chunk, Ok(data)) => {
                (download_message::Body::Chunk(data), position, Some(chunk))
            }
            Read::Chunk(_, _, Err(status)) => {
                let _ = sender.send(Err(status)).await;
                return;
            }
        };
        let message = proto::DownloadMessage { body: Some(body) };
        if sender.send(Ok(message)).await.is_err() {
            tracing::info!("the agent stopped reading the backup");
            return;
        }
        if let (Some(_), Some(chunk)) = (position, chunk) {
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
                    Ok(Some(current))
                        if current.status != JobState::Running
                            || current.attempt_id != job.attempt_id =>
                    {
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

/// What the download sends, in order, before the chunks are read.
enum Item {
    List(proto::ChunkList),
    Chunk(Option<usize>, ManifestChunk),
}

/// [`Item`], the chunk read (or why not).
enum Read {
    List(proto::ChunkList),
    Chunk(
        Option<usize>,
        ManifestChunk,
        Result<proto::ChunkData, Status>,
    ),
}

/// Each page of the list followed by its chunks, the first of which is
/// chunk `first_chunk` of the backup; one empty last page when there are
/// no chunks (left).
fn listed_pages(chunks: Vec<(Option<usize>, ManifestChunk)>, first_chunk: usize) -> Vec<Item> {
    let pages = chunks.len().div_ceil(LIST_PAGE).max(1);
    let mut items = Vec::with_capacity(chunks.len() + pages);
    let mut chunks = chunks.into_iter();
    for page in 0..pages {
        let entries: Vec<(Option<usize>, ManifestChunk)> =
            chunks.by_ref().take(LIST_PAGE).collect();
        items.push(Item::List(proto::ChunkList {
            chunks: entries
                .iter()
                .map(|(position, chunk)| proto::ListedChunk {
                    hash: chunk
                        .hash
                        .map(|hash| hash.as_bytes().to_vec())
                        .unwrap_or_default(),
                    plaintext_bytes: chunk.plaintext_bytes,
                    globals: position.is_none(),
                })
                .collect(),
            last: page + 1 == pages,
            first_chunk: (first_chunk + page * LIST_PAGE) as u64,
        }));
        items.extend(
            entries
                .into_iter()
                .map(|(position, chunk)| Item::Chunk(position, chunk)),
        );
    }
    items
}

/// Reads one chunk and authenticates it: its packed bytes for the agent,
/// or the status that ends the download.
async fn read_chunk(
    repository: &Repository,
    position: Option<usize>,
    total: usize,
    chunk: &ManifestChunk,
) -> Result<proto::ChunkData, Status> {
    let sealed = repository
        .store
        .get(&ObjectKey::chunk(&chunk.id))
        .await
        .map_err(|error| unreadable(position, total, chunk, &error))?;
    let keys = repository.keys().clone();
    let id = chunk.id;
    let listed = chunk.hash;
    let opened = tokio::task::spawn_blocking(move || {
        let unsealed = open_sealed(&keys, &id, &sealed)?;
        let opened_hash = match listed {
            // The name is the keyed hash of the listed hash: a manifest
            // whose list and names disagree is refused here.
            Some(hash) if ChunkId::for_content(&keys, &hash) == id && !unsealed.legacy => None,
            Some(_) => return Err(ChunkError::HashMismatch { id }),
            None => Some(unsealed.check(&keys, &id)?.1),
        };
        Ok((unsealed, opened_hash))
    })
    .await
    .map_err(|e| incident_status(Code::Internal, &format!("chunk open: {e}")))?;
    let (unsealed, opened_hash) = opened.map_err(|error| {
        Status::data_loss(format!(
            "{} {}",
            which(position, total, chunk),
            problem_of(&error)
        ))
    })?;
    Ok(proto::ChunkData {
        compression: unsealed.compression.to_proto(),
        payload: unsealed.payload,
        opened_hash: opened_hash
            .map(|hash| hash.as_bytes().to_vec())
            .unwrap_or_default(),
    })
}

/// "chunk 17 of 40 (id)" or "the globals chunk (id)": the stored name, so
/// an operator can find the object (agents name chunks by position only).
fn which(position: Option<usize>, total: usize, chunk: &ManifestChunk) -> String {
    match position {
        Some(index) => format!("chunk {} of {total} ({})", index + 1, chunk.id),
        None => format!("the globals chunk ({})", chunk.id),
    }
}

/// What is wrong with a stored chunk, to follow its name.
fn problem_of(error: &ChunkError) -> String {
    match error {
        ChunkError::Format { .. } => "has an unknown format".into(),
        ChunkError::Seal {
            source: SealError::Authentication,
            ..
        } => "failed authentication: it was altered, or sealed under another key or name".into(),
        ChunkError::Seal {
            source: SealError::Truncated,
            ..
        } => "failed authentication: it is too short to be a sealed chunk".into(),
        ChunkError::Decompress { reason, .. } => format!("cannot be decompressed: {reason}"),
        ChunkError::HashMismatch { .. } => {
            "does not hash to its name: its content is not what was backed up".into()
        }
    }
}

fn unreadable(
    position: Option<usize>,
    total: usize,
    chunk: &ManifestChunk,
    error: &RepositoryError,
) -> Status {
    let which = which(position, total, chunk);
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

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_common::chunk::ContentHash;

    fn chunk(n: usize) -> ManifestChunk {
        let hash = ContentHash::of(&n.to_le_bytes());
        ManifestChunk {
            id: ChunkId::from_bytes(hash.as_bytes()).unwrap(),
            hash: Some(hash),
            plaintext_bytes: n as u64,
            sealed_bytes: n as u64 + 30,
        }
    }

    /// (list page sizes and last flags, chunk positions) in send order.
    fn shape(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .map(|item| match item {
                Item::List(list) => format!("list {} {}", list.chunks.len(), list.last),
                Item::Chunk(None, _) => "globals".to_string(),
                Item::Chunk(Some(index), _) => format!("chunk {index}"),
            })
            .collect()
    }

    #[test]
    fn each_page_of_the_list_comes_before_its_chunks() {
        assert_eq!(shape(&listed_pages(Vec::new(), 0)), ["list 0 true"]);

        let mut chunks = vec![(None, chunk(0))];
        chunks.extend((0..LIST_PAGE).map(|i| (Some(i), chunk(i + 1))));
        let items = listed_pages(chunks, 0);
        let shape = shape(&items);
        assert_eq!(shape.len(), LIST_PAGE + 1 + 2);
        assert_eq!(shape[0], format!("list {LIST_PAGE} false"));
        assert_eq!(shape[1], "globals");
        assert_eq!(shape[LIST_PAGE], format!("chunk {}", LIST_PAGE - 2));
        assert_eq!(shape[LIST_PAGE + 1], "list 1 true");
        assert_eq!(shape[LIST_PAGE + 2], format!("chunk {}", LIST_PAGE - 1));
        let Item::List(first) = &items[0] else {
            panic!("a list first")
        };
        assert!(first.chunks[0].globals && !first.chunks[1].globals);
        assert_eq!(first.chunks[1].hash, chunk(1).hash.unwrap().as_bytes());
        let Item::List(second) = &items[LIST_PAGE + 1] else {
            panic!("a second page")
        };
        assert_eq!(
            (first.first_chunk, second.first_chunk),
            (0, LIST_PAGE as u64)
        );
    }

    #[test]
    fn a_resumed_download_lists_from_where_the_agent_is() {
        // The rest of a backup whose first 5 chunks the agent has.
        let rest: Vec<(Option<usize>, ManifestChunk)> =
            (4..7).map(|i| (Some(i), chunk(i + 1))).collect();
        let items = listed_pages(rest, 5);
        assert_eq!(
            shape(&items),
            ["list 3 true", "chunk 4", "chunk 5", "chunk 6"]
        );
        let Item::List(page) = &items[0] else {
            panic!("a list first")
        };
        assert_eq!(page.first_chunk, 5);
        assert!(page.chunks.iter().all(|entry| !entry.globals));
        // At the end: one empty last page, where the agent is.
        let Item::List(page) = &listed_pages(Vec::new(), 8)[0] else {
            panic!("a list")
        };
        assert_eq!(
            (page.chunks.len(), page.last, page.first_chunk),
            (0, true, 8)
        );
    }
}
