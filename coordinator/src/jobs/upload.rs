//! The coordinator's side of `AgentGateway/UploadBackup`: receives a
//! backup's chunks in dump order, packed (compressed, not sealed: agents
//! hold no key) and named by their content hash; checks each one
//! (decompressed and re-hashed: a buggy or hostile agent cannot plant a
//! chunk under a hash that is not its content's), seals and stores the
//! missing ones under their keyed names, then writes the manifest and only
//! then marks the backup complete.
//!
//! Offers: a chunk the repository holds is reported as known only when it
//! is at least [`CHUNK_MIN_BYTES`] long, or when this upload received its
//! bytes already (whether or not it was stored before). Smaller chunks (a
//! dump's last, the globals) could hold guessable content, so their bytes
//! are asked for and checked (with the same answers whether or not the
//! repository holds them, a later copy held to the agent's own length),
//! and stored only if missing. What is left: skipping the
//! write of a small chunk already stored makes `finish` answer a few
//! milliseconds sooner, a timing difference an agent could only measure
//! against a whole upload's noise. An upload refused for what the agent
//! sent fails its job, so probing takes a new job each time, which only an
//! operator or a schedule starts.
//!
//! Checking and storing run off the receiving loop, up to
//! [`STORE_IN_FLIGHT`] chunks at once, so one chunk's fsync overlaps the
//! next one's check and the agent's next offer. When that many are in
//! flight the loop stops reading, and HTTP/2 flow control holds the agent.
//! A chunk enters the catalog (where offers find it) as soon as its object
//! is durable, by the task that stored it, so a coordinator killed
//! mid-upload loses no record of what is stored; the manifest is written
//! only once every chunk is.
//!
//! Garbage collection (`repository/gc`) runs beside uploads: the dedup
//! check revives a condemned chunk in the transaction that finds it and
//! does not find one being deleted, and a chunk stored while an older copy
//! of it is being deleted is put again once that deletion is over, so a
//! collection never deletes what an upload counts on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cairn_common::chunk::{
    CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, ChunkId, Compression, ContentHash, PackedChunk, seal_packed,
    sealed_len, unpack_chunk,
};
use cairn_common::error::internal_status;
use cairn_common::proto::{self, backup_upload, backup_upload_reply};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::{Status, Streaming};

use crate::catalog::{BackupStats, Catalog, JobRecord, RecordedChunk, StoredChunk};
use crate::clock::now_ms;
use crate::repository::manifest::{Manifest, ManifestChunk};
use crate::repository::{ObjectKey, Repository};

/// Most chunk ids one offer may carry.
pub const OFFER_MAX_CHUNKS: usize = 8;

/// Most chunks of one upload being checked and stored at once.
pub const STORE_IN_FLIGHT: usize = 4;
/// How long a chunk's store waits for garbage collection to finish
/// deleting an older copy of it (one object delete, normally
/// milliseconds; longer only if the collection died midway, until its
/// next run finishes the deletion).
const GC_DELETION_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
const GC_DELETION_POLL: std::time::Duration = std::time::Duration::from_millis(100);

pub type ReplySender = mpsc::Sender<Result<proto::BackupUploadReply, Status>>;

/// The jobs whose upload stream is open: one stream per job, so that two
/// streams cannot interleave their chunks into one backup or both write its
/// manifest.
#[derive(Debug, Clone, Default)]
pub struct UploadsInProgress {
    jobs: Arc<Mutex<HashSet<String>>>,
}

impl UploadsInProgress {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims job `job_id`'s upload until the claim is dropped; `None` if
    /// another stream holds it.
    pub fn claim(&self, job_id: &str) -> Option<UploadClaim> {
        self.lock().insert(job_id.to_string()).then(|| UploadClaim {
            uploads: self.clone(),
            job_id: job_id.to_string(),
        })
    }
}

/// A job's upload stream, held while it runs.
#[derive(Debug)]
pub struct UploadClaim {
    uploads: UploadsInProgress,
    job_id: String,
}

impl Drop for UploadClaim {
    fn drop(&mut self) {
        self.uploads.lock().remove(&self.job_id);
    }
}

/// One upload in progress.
pub struct Upload {
    pub catalog: Arc<Catalog>,
    pub repository: Arc<Repository>,
    pub job: JobRecord,
    pub tags: BTreeMap<String, String>,
    chunks: Vec<ManifestChunk>,
    /// The last offer's chunks still to come.
    expected: VecDeque<Expected>,
    /// The chunks whose bytes this upload received (checked, and stored
    /// if the repository lacked them): the object's size and the length
    /// the agent gave. Offered again, they are confirmed whether or not
    /// the repository held them before, so confirming says nothing the
    /// agent did not send itself.
    sent_here: HashMap<ChunkId, StoredChunk>,
    /// Chunks being checked and stored; each task answers the dump
    /// position it stored (none for the globals).
    in_flight: JoinSet<Result<Option<u64>, Status>>,
    /// Dump positions still on their way to storage.
    pending: BTreeSet<u64>,
    /// Per dump position: the sealed bytes this attempt stored new.
    new_bytes: Vec<u64>,
    /// Dump positions recorded in the catalog for a resume.
    persisted: u64,
    globals: Option<ManifestChunk>,
    stats: BackupStats,
}

/// An offered chunk, until its turn comes.
struct Expected {
    hash: ContentHash,
    id: ChunkId,
    /// The agent must send its bytes.
    must_send: bool,
    /// What the catalog holds under its name, told to the agent or not
    /// (a chunk already stored is checked, not written again).
    stored: Option<StoredChunk>,
    /// What the agent was told is there: a large stored chunk, or one
    /// this upload received. `None` for a copy of a hash asked for earlier
    /// in the batch: the first copy's record (the agent's own length)
    /// answers for it.
    confirmed: Option<StoredChunk>,
}

fn protocol(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

fn storage(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("repository: {error}"))
}

impl Upload {
    pub fn new(
        catalog: Arc<Catalog>,
        repository: Arc<Repository>,
        job: JobRecord,
        tags: BTreeMap<String, String>,
    ) -> Upload {
        Upload {
            catalog,
            repository,
            job,
            tags,
            chunks: Vec::new(),
            expected: VecDeque::new(),
            sent_here: HashMap::new(),
            in_flight: JoinSet::new(),
            pending: BTreeSet::new(),
            new_bytes: Vec::new(),
            persisted: 0,
            globals: None,
            stats: BackupStats::default(),
        }
    }

    /// Continues the attempt's upload from what it recorded; the position
    /// the agent sends from.
    pub async fn resume(&mut self) -> Result<u64, Status> {
        let recorded = self.catalog.upload_chunks(&self.job.attempt_id).await?;
        for entry in recorded {
            self.stats.logical_bytes += entry.chunk.plaintext_bytes;
            self.stats.referenced_bytes += entry.chunk.sealed_bytes;
            self.stats.chunk_count += 1;
            if entry.new_bytes > 0 {
                self.stats.new_stored_bytes += entry.new_bytes;
                self.stats.new_chunk_count += 1;
            }
            self.new_bytes.push(entry.new_bytes);
            self.chunks.push(entry.chunk);
        }
        self.persisted = self.chunks.len() as u64;
        Ok(self.persisted)
    }

    /// Starts the attempt's upload from the beginning.
    pub async fn start_fresh(&mut self) -> Result<(), Status> {
        self.catalog
            .forget_upload_chunks(&self.job.attempt_id)
            .await?;
        Ok(())
    }

    /// The dump positions before this one are durable.
    fn recorded_through(&self) -> u64 {
        self.pending
            .first()
            .copied()
            .unwrap_or(self.chunks.len() as u64)
    }

    /// Records the durable positions not yet in the catalog; the position
    /// a resume would continue from.
    async fn persist(&mut self) -> Result<u64, Status> {
        let through = self.recorded_through();
        if through > self.persisted {
            self.still_current().await?;
            let first = usize::try_from(self.persisted).unwrap_or(usize::MAX);
            let last = usize::try_from(through).unwrap_or(usize::MAX);
            let entries: Vec<RecordedChunk> = self.chunks[first..last]
                .iter()
                .zip(&self.new_bytes[first..last])
                .map(|(chunk, new_bytes)| RecordedChunk {
                    chunk: chunk.clone(),
                    new_bytes: *new_bytes,
                })
                .collect();
            self.catalog
                .record_upload_chunks(&self.job.attempt_id, self.persisted, &entries)
                .await?;
            self.persisted = through;
        }
        Ok(self.persisted)
    }

    /// Refuses to go on for an attempt that is no longer its job's current
    /// one (ended, or replaced by a retry while this stream lived).
    async fn still_current(&self) -> Result<(), Status> {
        match self.catalog.get_job(&self.job.id).await? {
            Some(job)
                if job.status == crate::catalog::JobState::Running
                    && job.attempt_id == self.job.attempt_id =>
            {
                Ok(())
            }
            _ => Err(Status::aborted(format!(
                "attempt {} of job {} is no longer running: the upload stops",
                self.job.attempt_id, self.job.id
            ))),
        }
    }

    /// Runs the upload to its end; an error fails the upload (the job
    /// engine then fails the job). Chunks stored before an error stay in
    /// the catalog, so a retry does not upload them again.
    pub async fn run(
        mut self,
        inbound: Streaming<proto::BackupUpload>,
        replies: ReplySender,
    ) -> Result<(), Status> {
        let result = self.receive(inbound, replies).await;
        match result {
            Ok(()) => Ok(()),
            Err(first) => {
                // Whatever was already on its way to storage is finished
                // (and so recorded). A chunk refused there explains an
                // upload the agent then ended or broke off (and so fails
                // the job); the coordinator's own refusal or storage error
                // stands.
                let ours = first.code() == tonic::Code::InvalidArgument
                    || (first.code() == tonic::Code::Unavailable
                        && first.message().starts_with("repository:"));
                match self.settle().await {
                    Err(refused) if !ours && refused.code() == tonic::Code::InvalidArgument => {
                        Err(refused)
                    }
                    _ => Err(first),
                }
            }
        }
    }

    async fn receive(
        &mut self,
        mut inbound: Streaming<proto::BackupUpload>,
        replies: ReplySender,
    ) -> Result<(), Status> {
        while let Some(message) = inbound.message().await? {
            match message.body {
                Some(backup_upload::Body::Offer(offer)) => {
                    let missing = if offer.hashes.is_empty() {
                        // A sync: everything sent so far, recorded.
                        if !self.expected.is_empty() {
                            return Err(protocol(
                                "offer before the previous offer's chunks were sent",
                            ));
                        }
                        self.settle().await?;
                        Vec::new()
                    } else {
                        self.reap(false).await?;
                        self.offer(offer).await?
                    };
                    let recorded_through = self.persist().await?;
                    reply(
                        &replies,
                        backup_upload_reply::Body::Missing(proto::ChunkMissing {
                            hashes: missing,
                            recorded_through,
                        }),
                    )
                    .await?;
                }
                Some(backup_upload::Body::Chunk(chunk)) => self.chunk(chunk).await?,
                Some(backup_upload::Body::Globals(globals)) => {
                    if self.globals.is_some() {
                        return Err(protocol("a second globals chunk"));
                    }
                    // Always sent whole: small, and guessable.
                    let hash = ContentHash::from_bytes(&globals.hash)?;
                    let id = ChunkId::for_content(self.repository.keys(), &hash);
                    let known = self.known(&[id]).await?.remove(&id);
                    let packed = PackedChunk {
                        hash,
                        plaintext_len: usize::try_from(globals.plaintext_bytes)
                            .unwrap_or(usize::MAX),
                        compression: Compression::from_proto(
                            globals.compression,
                            "globals.compression",
                        )?,
                        payload: globals.payload,
                    };
                    let (entry, _) = self.store(id, packed, known, None).await?;
                    self.stats.referenced_bytes += entry.sealed_bytes;
                    self.stats.chunk_count += 1;
                    self.globals = Some(entry);
                }
                Some(backup_upload::Body::Finish(finish)) => {
                    self.finish(finish).await?;
                    reply(
                        &replies,
                        backup_upload_reply::Body::Stored(proto::BackupStored {
                            backup_id: self.job.backup_id.clone(),
                        }),
                    )
                    .await?;
                    return Ok(());
                }
                Some(backup_upload::Body::Start(_)) | None => {
                    return Err(protocol("unexpected message in the middle of an upload"));
                }
            }
        }
        Err(Status::cancelled(
            "the agent ended the upload before `finish`",
        ))
    }

    /// What the catalog holds of `ids`, or this upload stored (perhaps not
    /// yet in the catalog).
    async fn known(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, StoredChunk>, Status> {
        let hex: Vec<String> = ids.iter().map(ChunkId::to_hex).collect();
        // Found chunks are revived and marked used in the same transaction,
        // so garbage collection deletes none of them from here on.
        let stored = self.catalog.stored_chunks(&hex, now_ms()).await?;
        Ok(ids
            .iter()
            .filter_map(|id| {
                let known = stored
                    .get(&id.to_hex())
                    .or_else(|| self.sent_here.get(id))?;
                Some((*id, *known))
            })
            .collect())
    }

    async fn offer(&mut self, offer: proto::ChunkOffer) -> Result<Vec<Vec<u8>>, Status> {
        if !self.expected.is_empty() {
            return Err(protocol(
                "offer before the previous offer's chunks were sent",
            ));
        }
        if offer.hashes.len() > OFFER_MAX_CHUNKS {
            return Err(protocol(format!(
                "offer.hashes: at most {OFFER_MAX_CHUNKS} hashes"
            )));
        }
        let keys = self.repository.keys();
        let offered = offer
            .hashes
            .iter()
            .map(|hash| {
                let hash = ContentHash::from_bytes(hash)?;
                Ok((hash, ChunkId::for_content(keys, &hash)))
            })
            .collect::<Result<Vec<_>, cairn_common::Error>>()?;
        let ids: Vec<ChunkId> = offered.iter().map(|(_, id)| *id).collect();
        let mut known = self.known(&ids).await?;
        let mut missing: Vec<Vec<u8>> = Vec::new();
        for (hash, id) in offered {
            let stored = known.remove(&id);
            // Sent by the agent earlier in this upload, or stored and
            // large enough to say so. A hash offered twice in one batch
            // is sent once.
            let confirmed = self
                .sent_here
                .get(&id)
                .copied()
                .or_else(|| stored.filter(|k| k.plaintext_bytes >= CHUNK_MIN_BYTES as u64));
            let already_asked = missing.iter().any(|m| m.as_slice() == hash.as_bytes());
            let must_send = confirmed.is_none() && !already_asked;
            if must_send {
                missing.push(hash.as_bytes().to_vec());
            }
            self.expected.push_back(Expected {
                hash,
                id,
                must_send,
                stored,
                confirmed,
            });
        }
        Ok(missing)
    }

    async fn chunk(&mut self, chunk: proto::UploadChunk) -> Result<(), Status> {
        let hash = ContentHash::from_bytes(&chunk.hash)?;
        let Some(expected) = self.expected.pop_front() else {
            return Err(protocol("chunk without an offer"));
        };
        if hash != expected.hash {
            return Err(protocol("chunks must come in the order they were offered"));
        }
        let id = expected.id;
        let position = self.chunks.len() as u64;
        let (entry, new_bytes) = if chunk.payload.is_empty() {
            if expected.must_send {
                return Err(protocol(format!("chunk {hash}: send its bytes")));
            }
            // Confirmed by the offer, or sent earlier in this upload (a
            // hash offered twice in one batch).
            let known = expected
                .confirmed
                .or_else(|| self.sent_here.get(&id).copied())
                .ok_or_else(|| protocol(format!("chunk {hash}: send its bytes")))?;
            if known.plaintext_bytes != chunk.plaintext_bytes {
                return Err(protocol(format!(
                    "chunk {hash}: plaintext_bytes {} but that hash's chunk holds {}",
                    chunk.plaintext_bytes, known.plaintext_bytes
                )));
            }
            (
                ManifestChunk {
                    id,
                    hash: Some(hash),
                    plaintext_bytes: known.plaintext_bytes,
                    sealed_bytes: known.sealed_bytes,
                },
                0,
            )
        } else {
            let packed = PackedChunk {
                hash,
                plaintext_len: usize::try_from(chunk.plaintext_bytes).unwrap_or(usize::MAX),
                compression: Compression::from_proto(chunk.compression, "chunk.compression")?,
                payload: chunk.payload,
            };
            let known = expected.stored.or_else(|| self.sent_here.get(&id).copied());
            self.store(id, packed, known, Some(position)).await?
        };
        self.stats.logical_bytes += entry.plaintext_bytes;
        self.stats.referenced_bytes += entry.sealed_bytes;
        self.stats.chunk_count += 1;
        self.chunks.push(entry);
        self.new_bytes.push(new_bytes);
        // Progress once per batch, not per chunk (each write is an
        // fsync); its chunk count is of chunks stored or already there, not
        // of those still on their way.
        if self.expected.is_empty() {
            self.reap(false).await?;
            let settled = self.stats.chunk_count - self.in_flight.len() as u64;
            self.catalog
                .update_job_progress(
                    &self.job.id,
                    self.stats.logical_bytes,
                    self.stats.new_stored_bytes,
                    settled,
                )
                .await?;
        }
        Ok(())
    }

    /// Starts checking a packed chunk against its hash, then sealing and
    /// storing it unless `known` says the repository holds it; waits first
    /// while [`STORE_IN_FLIGHT`] chunks are on their way. Its entry, and
    /// the sealed bytes stored new.
    async fn store(
        &mut self,
        id: ChunkId,
        packed: PackedChunk,
        known: Option<StoredChunk>,
        position: Option<u64>,
    ) -> Result<(ManifestChunk, u64), Status> {
        while self.in_flight.len() >= STORE_IN_FLIGHT {
            self.reap_one().await?;
        }
        let hash = packed.hash;
        let plaintext_bytes = packed.plaintext_len as u64;
        let stored = known.unwrap_or(StoredChunk {
            sealed_bytes: sealed_len(packed.payload.len()),
            plaintext_bytes,
        });
        let repository = self.repository.clone();
        let catalog = self.catalog.clone();
        let store = known.is_none();
        self.in_flight.spawn(async move {
            let keys = repository.clone();
            let sealed = tokio::task::spawn_blocking(move || {
                // The same answer whether or not the repository holds
                // the hash: the check is of the agent's own bytes.
                unpack_chunk(
                    &packed.hash,
                    plaintext_bytes,
                    packed.compression,
                    &packed.payload,
                    CHUNK_MAX_BYTES,
                )
                .map_err(|e| protocol(format!("chunk {hash}: {e}")))?;
                if let Some(known) = known {
                    // Content that hashes alike is the same size: only a
                    // damaged catalog row can disagree.
                    if known.plaintext_bytes != plaintext_bytes {
                        return Err(internal_status(&format!(
                            "chunk {id}: the catalog records {} plaintext bytes, its content \
                             has {plaintext_bytes}",
                            known.plaintext_bytes
                        )));
                    }
                    return Ok(None);
                }
                seal_packed(keys.keys(), &packed)
                    .map(Some)
                    .map_err(|e| internal_status(&format!("chunk seal: {e}")))
            })
            .await
            .map_err(|e| internal_status(&format!("chunk check: {e}")))??;
            let Some(sealed) = sealed else {
                return Ok(position);
            };
            let sealed_bytes = sealed.bytes.len() as u64;
            let sealed = Bytes::from(sealed.bytes);
            let deadline = tokio::time::Instant::now() + GC_DELETION_WAIT;
            loop {
                repository
                    .store
                    .put(&ObjectKey::chunk(&id), sealed.clone())
                    .await
                    .map_err(storage)?;
                if catalog
                    .insert_chunk(&id.to_hex(), sealed_bytes, plaintext_bytes, now_ms())
                    .await?
                {
                    break;
                }
                // Garbage collection is deleting an older copy and may
                // delete this one with it: once its deletion is over, the
                // chunk is put again.
                while catalog.chunk_being_deleted(&id.to_hex()).await? {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Status::unavailable(format!(
                            "repository: chunk {id} is being deleted by garbage collection \
                             for more than {}s: the upload stops (a retry stores it anew)",
                            GC_DELETION_WAIT.as_secs()
                        )));
                    }
                    tokio::time::sleep(GC_DELETION_POLL).await;
                }
            }
            Ok(position)
        });
        if let Some(position) = position {
            self.pending.insert(position);
        }
        if store {
            self.stats.new_stored_bytes += stored.sealed_bytes;
            self.stats.new_chunk_count += 1;
        }
        // The agent's own length: what a later copy of this hash is held to.
        self.sent_here.insert(
            id,
            StoredChunk {
                sealed_bytes: stored.sealed_bytes,
                plaintext_bytes,
            },
        );
        Ok((
            ManifestChunk {
                id,
                hash: Some(hash),
                plaintext_bytes,
                sealed_bytes: stored.sealed_bytes,
            },
            if store { stored.sealed_bytes } else { 0 },
        ))
    }

    /// Waits for the next chunk in flight to be stored (or fail).
    async fn reap_one(&mut self) -> Result<(), Status> {
        if let Some(joined) = self.in_flight.join_next().await {
            let position = joined.map_err(|e| internal_status(&format!("chunk store: {e}")))??;
            if let Some(position) = position {
                self.pending.remove(&position);
            }
        }
        Ok(())
    }

    /// Collects the chunks that were stored; with `wait`, all of them.
    /// The first failure is the upload's.
    async fn reap(&mut self, wait: bool) -> Result<(), Status> {
        let mut first_error = None;
        loop {
            let joined = if wait {
                self.in_flight.join_next().await
            } else {
                self.in_flight.try_join_next()
            };
            let Some(joined) = joined else { break };
            let result = joined
                .map_err(|error| internal_status(&format!("chunk store: {error}")))
                .and_then(|stored| stored);
            match result {
                Ok(Some(position)) => {
                    self.pending.remove(&position);
                }
                Ok(None) => {}
                Err(status) => {
                    first_error.get_or_insert(status);
                }
            }
        }
        match first_error {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }

    /// Waits for every chunk in flight.
    async fn settle(&mut self) -> Result<(), Status> {
        self.reap(true).await
    }

    async fn finish(&mut self, finish: proto::UploadFinish) -> Result<(), Status> {
        if !self.expected.is_empty() {
            return Err(protocol("finish before every offered chunk was sent"));
        }
        if finish.dump_bytes != self.stats.logical_bytes {
            return Err(protocol(format!(
                "finish.dump_bytes {} but the chunks hold {} bytes",
                finish.dump_bytes, self.stats.logical_bytes
            )));
        }
        cairn_common::model::check_system_identifier(
            "finish.system_identifier",
            &finish.system_identifier,
        )
        .map_err(|e| protocol(e.to_string()))?;
        let now = now_ms();
        let manifest = Manifest {
            format: Manifest::new_format(),
            backup_id: self.job.backup_id.clone(),
            job_id: self.job.id.clone(),
            agent: self.job.agent_name.clone(),
            instance: self.job.instance.clone(),
            database: self.job.database.clone(),
            server_version: finish.server_version.clone(),
            pg_dump_version: finish.pg_dump_version.clone(),
            started_at: self
                .job
                .attempt_started_at
                .or(self.job.started_at)
                .unwrap_or(now),
            finished_at: now,
            dump_millis: finish.dump_millis,
            dump_bytes: finish.dump_bytes,
            database_bytes: finish.database_bytes,
            row_estimates: finish.row_estimates.into_iter().collect(),
            tags: self.tags.clone(),
            chunks: std::mem::take(&mut self.chunks),
            globals: self.globals.clone(),
            table_rows: finish
                .rows_not_counted
                .is_empty()
                .then(|| finish.table_rows.iter().cloned().map(Into::into).collect()),
            rows_not_counted: finish.rows_not_counted.clone(),
            archive_version: finish.archive_version.clone(),
            system_identifier: finish.system_identifier.clone(),
        };
        // Chunks first (durable once settled), then the manifest, then the
        // catalog.
        self.settle().await?;
        self.still_current().await?;
        // A job that ended while its chunks came (cancelled, failed) gets
        // no manifest; `complete_backup` refuses it too, for one that ends
        // from here on.
        let still_running = self
            .catalog
            .get_backup(&self.job.backup_id)
            .await?
            .is_some_and(|backup| backup.status == "running");
        if !still_running {
            return Err(Status::failed_precondition(format!(
                "backup {} is no longer running: its job ended before the upload finished",
                self.job.backup_id
            )));
        }
        manifest.store(&self.repository).await.map_err(storage)?;
        self.stats.server_version = finish.server_version;
        self.stats.pg_dump_version = finish.pg_dump_version;
        self.stats.database_bytes = finish.database_bytes;
        self.stats.system_identifier = finish.system_identifier;
        self.catalog
            .complete_backup(
                &self.job.backup_id,
                &self.stats,
                &manifest.referenced_chunk_ids(),
                now,
            )
            .await?;
        Ok(())
    }
}

async fn reply(replies: &ReplySender, body: backup_upload_reply::Body) -> Result<(), Status> {
    replies
        .send(Ok(proto::BackupUploadReply { body: Some(body) }))
        .await
        .map_err(|_| Status::cancelled("the agent went away"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_upload_per_job_at_a_time() {
        let uploads = UploadsInProgress::default();
        let first = uploads.claim("j1").expect("the first stream");
        assert!(uploads.claim("j1").is_none(), "a second stream for j1");
        let other = uploads.claim("j2").expect("another job's stream");
        drop(first);
        assert!(uploads.claim("j1").is_some(), "free once the first ended");
        drop(other);
    }
}
