//! Executes a backup command: `pg_dump` through the chunker ([`crate::dump`])
//! and up to the coordinator on the job's own `UploadBackup` stream.
//!
//! The agent holds no repository key: chunks go up compressed and named by
//! their content hash; the coordinator checks, seals and stores them.
//! The upload offers at most one batch of chunks at a time and sends bytes
//! only for the chunks the coordinator asks for, so a second backup of a mostly
//! unchanged database moves little, and a retried one resumes. With one
//! batch in flight, a slow coordinator or repository slows `pg_dump` down
//! instead of filling memory.

use std::sync::Arc;
use std::time::Duration;

use cairn_common::chunk::{CHUNK_MAX_BYTES, PackedChunk, pack_chunk};
use cairn_common::proto;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::config::AgentConfig;
use crate::dump::{self, DumpError, DumpProgress, DumpRequest};
use crate::jobs::{JobEnd, RunningJobs};
use crate::postgres;
use crate::resume::StreamError;
use crate::upload::{OFFER_BATCH, Uploader};

const FACTS_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one backup to its end.
pub async fn run(
    config: &AgentConfig,
    channel: Channel,
    jobs: &Arc<RunningJobs>,
    attempt_id: &str,
    command: proto::BackupCommand,
) -> Result<(), JobEnd> {
    let guard = jobs.register(&command.job_id, attempt_id)?;
    let instance = config
        .instances
        .iter()
        .find(|i| i.name.as_str() == command.instance)
        .ok_or_else(|| format!("this agent has no instance {:?}", command.instance))?;
    let connection = instance.postgres.clone();

    let mut uploader = Uploader::open(
        jobs,
        channel,
        proto::UploadStart {
            job_id: command.job_id.clone(),
            backup_id: command.backup_id.clone(),
            attempt_id: attempt_id.to_string(),
            resume: false,
        },
        guard.token.clone(),
    )
    .await?;

    // The dump starts at once; the database's facts and the instance's
    // globals are gathered beside it (they are sent after its chunks).
    // Stopping the dump for a failure here is not a cancellation:
    // `dump_token` is a child of the job's token.
    let dump_token = guard.token.child_token();
    let prelude = async {
        let gathered = async {
            let facts = postgres::database_facts(&connection, &command.database, FACTS_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            let globals = dump::dump_globals(&connection, command.include_role_passwords, None)
                .await
                .map_err(|e| e.to_string())?;
            // One chunk, as large as any chunk may be.
            if globals.len() > CHUNK_MAX_BYTES {
                return Err(format!(
                    "pg_dumpall --globals-only wrote {} bytes, more than the {} MiB a backup's \
                     roles and tablespaces may take; back up with fewer roles or report this",
                    globals.len(),
                    CHUNK_MAX_BYTES / (1024 * 1024)
                ));
            }
            let level = command.zstd_level;
            let packed_globals = tokio::task::spawn_blocking(move || pack_chunk(&globals, level))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((facts, packed_globals))
        }
        .await;
        if gathered.is_err() {
            dump_token.cancel();
        }
        gathered
    };

    let request = DumpRequest {
        connection: connection.clone(),
        database: command.database.clone(),
        zstd_level: command.zstd_level,
        pg_bindir: None,
    };
    let (chunk_sender, mut chunk_receiver) = mpsc::channel::<PackedChunk>(OFFER_BATCH);
    let (progress, _) = watch::channel(DumpProgress::default());
    let dumping = dump::dump(&request, chunk_sender, progress, dump_token.clone());
    let upload_batches = async {
        while let Some(first) = chunk_receiver.recv().await {
            let mut batch = vec![first];
            while batch.len() < OFFER_BATCH {
                match chunk_receiver.try_recv() {
                    Ok(chunk) => batch.push(chunk),
                    Err(_) => break,
                }
            }
            uploader.push(batch).await?;
        }
        Ok::<(), StreamError>(())
    };
    // A failed upload must stop pg_dump too: its chunks would wait forever
    // on a channel nobody reads.
    let uploading = async {
        let result = upload_batches.await;
        if result.is_err() {
            dump_token.cancel();
        }
        result
    };
    let (dumped, uploaded, gathered) = tokio::join!(dumping, uploading, prelude);
    // The upload's error explains a dump that stopped because the upload
    // went away; then pg_dump's own message; then the facts' or globals'.
    let (outcome, (facts, globals)) = match (dumped, uploaded, gathered) {
        // The upload stream broke: worth another attempt (a refusal by the
        // coordinator ends the attempt on its side first).
        (_, Err(upload_error), _) => return Err(upload_error.into()),
        (Err(DumpError::Cancelled), Ok(()), _) if guard.token.is_cancelled() => {
            return Err(JobEnd::Cancelled("pg_dump was stopped".into()));
        }
        (Err(error), Ok(()), _) if !matches!(error, DumpError::Cancelled) => {
            return Err(JobEnd::Failed(error.to_string()));
        }
        (_, Ok(()), Err(prelude_error)) => return Err(JobEnd::Failed(prelude_error)),
        (Ok(outcome), Ok(()), Ok(gathered)) => (outcome, gathered),
        (Err(error), Ok(()), Ok(_)) => return Err(JobEnd::Failed(error.to_string())),
    };

    uploader
        .finish(
            proto::UploadGlobals {
                hash: globals.hash.as_bytes().to_vec(),
                plaintext_bytes: globals.plaintext_len as u64,
                compression: globals.compression.to_proto(),
                payload: globals.payload,
            },
            proto::UploadFinish {
                dump_bytes: outcome.dump_bytes,
                pg_dump_version: outcome.pg_dump_version,
                server_version: facts.server_version,
                system_identifier: facts.system_identifier,
                database_bytes: facts.size_bytes,
                row_estimates: facts.row_estimates.into_iter().collect(),
                dump_millis: outcome.duration.as_millis() as u64,
                table_rows: outcome
                    .rows
                    .as_ref()
                    .map(|summary| summary.tables.iter().cloned().map(Into::into).collect())
                    .unwrap_or_default(),
                rows_not_counted: outcome.rows.as_ref().err().cloned().unwrap_or_default(),
                archive_version: outcome
                    .rows
                    .as_ref()
                    .map(|summary| summary.archive_version.clone())
                    .unwrap_or_default(),
            },
        )
        .await?;
    Ok(())
}
