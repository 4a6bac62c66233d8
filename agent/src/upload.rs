//! The agent's side of `UploadBackup`, resumable.
//!
//! Chunks go up in batches: an offer of their hashes, the coordinator's
//! answer (which ones it needs, and up to which position the dump is
//! recorded), then each chunk, with its bytes if asked for. The chunks
//! sent and not yet recorded stay in a window here (at most
//! [`WINDOW_MAX`]; when it is full the upload asks for a sync, so memory
//! stays bounded and pg_dump waits on backpressure). When the stream breaks
//! (the network, a coordinator restart), the upload waits for the agent's
//! next session channel, resumes the attempt from the position the
//! coordinator recorded, and sends the window again from there; it gives
//! up after [`REATTACH_LIMIT`](crate::resume::REATTACH_LIMIT). A refusal
//! by the coordinator is final.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::chunk::PackedChunk;
use cairn_common::proto::{
    self, agent_gateway_client::AgentGatewayClient, backup_upload, backup_upload_reply,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::jobs::RunningJobs;
use crate::resume::{Link, StreamError};

/// Chunks offered at once (the coordinator accepts at most 8).
pub const OFFER_BATCH: usize = 8;
/// Chunks sent and not yet recorded that the agent keeps to send again.
pub const WINDOW_MAX: usize = 8;
struct Stream {
    outbound: mpsc::Sender<proto::BackupUpload>,
    replies: tonic::Streaming<proto::BackupUploadReply>,
}

/// One job attempt's upload.
pub struct Uploader {
    /// The way to the coordinator, a newer session's after a break.
    link: Link,
    start: proto::UploadStart,
    stream: Option<Stream>,
    /// Chunks sent (or about to be) and not yet recorded, with their
    /// positions in the dump.
    window: VecDeque<(u64, PackedChunk)>,
    next_position: u64,
    /// The backup was stored (a resume found it complete).
    stored: bool,
}

/// How long a closed upload stream waits for the coordinator's last word.
const CLOSE_REASON_WAIT: Duration = Duration::from_secs(5);

async fn send(stream: &mut Stream, body: backup_upload::Body) -> Result<(), StreamError> {
    if stream
        .outbound
        .send(proto::BackupUpload { body: Some(body) })
        .await
        .is_ok()
    {
        return Ok(());
    }
    // The coordinator stopped reading: its status says whether the attempt
    // is over (a storage failure, a refusal: stop pg_dump) or the stream
    // merely broke (resume). Without it a refused upload would wait to
    // resume while pg_dump runs on.
    let closed = "the upload stream to the coordinator closed";
    let last_word = tokio::time::timeout(CLOSE_REASON_WAIT, async {
        loop {
            match stream.replies.message().await {
                // A reply still queued before the close: read past it.
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await;
    match last_word {
        Ok(Some(status)) => Err(StreamError::of(
            &status,
            "the coordinator stopped the upload",
        )),
        _ => Err(StreamError::Broken(closed.into())),
    }
}

async fn next_reply(stream: &mut Stream) -> Result<backup_upload_reply::Body, StreamError> {
    match stream.replies.message().await {
        Ok(Some(proto::BackupUploadReply { body: Some(body) })) => Ok(body),
        Ok(_) => Err(StreamError::Broken(
            "the coordinator ended the upload".into(),
        )),
        Err(status) => Err(StreamError::of(
            &status,
            "the coordinator stopped the upload",
        )),
    }
}

impl Uploader {
    /// Opens the attempt's upload over `channel`.
    pub async fn open(
        jobs: &Arc<RunningJobs>,
        channel: Channel,
        start: proto::UploadStart,
        cancel: CancellationToken,
    ) -> Result<Uploader, StreamError> {
        let mut uploader = Uploader {
            link: Link::new(jobs, channel, cancel),
            start,
            stream: None,
            window: VecDeque::new(),
            next_position: 0,
            stored: false,
        };
        uploader.connect(false).await?;
        Ok(uploader)
    }

    /// Opens a stream; with `resume`, continues the attempt and drops the
    /// window's chunks the coordinator recorded.
    async fn connect(&mut self, resume: bool) -> Result<(), StreamError> {
        self.stream = None;
        let mut client = AgentGatewayClient::new(self.link.channel())
            .max_decoding_message_size(cairn_common::chunk::MAX_CHUNK_MESSAGE_BYTES)
            .max_encoding_message_size(cairn_common::chunk::MAX_CHUNK_MESSAGE_BYTES);
        let (outbound, receiver) = mpsc::channel(2);
        let stream_start = proto::UploadStart {
            resume,
            ..self.start.clone()
        };
        outbound
            .send(proto::BackupUpload {
                body: Some(backup_upload::Body::Start(stream_start)),
            })
            .await
            .map_err(|_| StreamError::Broken("the upload stream closed".into()))?;
        let replies = client
            .upload_backup(ReceiverStream::new(receiver))
            .await
            .map_err(|status| StreamError::of(&status, "the coordinator refused the upload"))?
            .into_inner();
        let mut stream = Stream { outbound, replies };
        if resume {
            match next_reply(&mut stream).await? {
                backup_upload_reply::Body::Resumed(resumed) => {
                    self.recorded(resumed.next_position)?;
                    tracing::info!(
                        next_position = resumed.next_position,
                        resend = self.window.len(),
                        "upload resumed"
                    );
                }
                backup_upload_reply::Body::Stored(_) => {
                    self.stored = true;
                    self.window.clear();
                }
                backup_upload_reply::Body::Missing(_) => {
                    return Err(StreamError::Refused(
                        "the coordinator answered a resume out of turn".into(),
                    ));
                }
            }
        }
        self.stream = Some(stream);
        Ok(())
    }

    /// The coordinator recorded the dump before `through`: those chunks
    /// need not be kept.
    fn recorded(&mut self, through: u64) -> Result<(), StreamError> {
        if through > self.next_position {
            return Err(StreamError::Refused(format!(
                "the coordinator says {through} chunks are recorded, but {} were sent",
                self.next_position
            )));
        }
        while self
            .window
            .front()
            .is_some_and(|(position, _)| *position < through)
        {
            self.window.pop_front();
        }
        if let Some((first, _)) = self.window.front()
            && *first > through
        {
            return Err(StreamError::Refused(format!(
                "cannot resume at chunk {through}: chunks from {through} to {first} were \
                 dropped as recorded"
            )));
        }
        Ok(())
    }

    /// Sends one batch of chunks already in the window (offer, answer,
    /// chunks).
    async fn send_batch(&mut self, from: usize, to: usize) -> Result<(), StreamError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(StreamError::Broken("no upload stream".into()));
        };
        let hashes: Vec<Vec<u8>> = self
            .window
            .range(from..to)
            .map(|(_, chunk)| chunk.hash.as_bytes().to_vec())
            .collect();
        send(
            &mut *stream,
            backup_upload::Body::Offer(proto::ChunkOffer { hashes }),
        )
        .await?;
        let (missing, recorded_through) = match next_reply(stream).await? {
            backup_upload_reply::Body::Missing(missing) => {
                (missing.hashes, missing.recorded_through)
            }
            _ => {
                return Err(StreamError::Refused(
                    "the coordinator answered an offer out of turn".into(),
                ));
            }
        };
        for (_, chunk) in self.window.range(from..to) {
            let send_bytes = missing
                .iter()
                .any(|hash| hash.as_slice() == chunk.hash.as_bytes());
            send(
                stream,
                backup_upload::Body::Chunk(proto::UploadChunk {
                    hash: chunk.hash.as_bytes().to_vec(),
                    plaintext_bytes: chunk.plaintext_len as u64,
                    compression: chunk.compression.to_proto(),
                    payload: if send_bytes {
                        chunk.payload.clone()
                    } else {
                        Vec::new()
                    },
                }),
            )
            .await?;
        }
        // Recorded through what was answered before these chunks: never
        // past them.
        self.recorded(recorded_through)?;
        Ok(())
    }

    /// Asks the coordinator to record everything sent; drops it from the
    /// window.
    async fn sync(&mut self) -> Result<(), StreamError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(StreamError::Broken("no upload stream".into()));
        };
        send(
            stream,
            backup_upload::Body::Offer(proto::ChunkOffer { hashes: Vec::new() }),
        )
        .await?;
        match next_reply(stream).await? {
            backup_upload_reply::Body::Missing(missing) => self.recorded(missing.recorded_through),
            _ => Err(StreamError::Refused(
                "the coordinator answered a sync out of turn".into(),
            )),
        }
    }

    /// Sends a batch of new chunks from the dump, resuming as often as the
    /// stream breaks.
    pub async fn push(&mut self, batch: Vec<PackedChunk>) -> Result<(), StreamError> {
        let from = self.window.len();
        for chunk in batch {
            self.window.push_back((self.next_position, chunk));
            self.next_position += 1;
        }
        let to = self.window.len();
        let sent = match self.send_batch(from, to).await {
            Ok(()) => Ok(()),
            Err(StreamError::Broken(reason)) => self.resume(&reason).await,
            Err(refused) => Err(refused),
        };
        sent?;
        if self.window.len() >= WINDOW_MAX {
            match self.sync().await {
                Ok(()) => {}
                Err(StreamError::Broken(reason)) => self.resume(&reason).await?,
                Err(refused) => return Err(refused),
            }
        }
        Ok(())
    }

    /// Resumes after a broken stream and sends the window again.
    async fn resume(&mut self, reason: &str) -> Result<(), StreamError> {
        let mut resuming = self.link.resuming("upload", reason);
        loop {
            resuming.next_try(&mut self.link).await?;
            let attempt = async {
                self.connect(true).await?;
                if self.stored {
                    return Ok(());
                }
                let mut from = 0;
                while from < self.window.len() {
                    let to = (from + OFFER_BATCH).min(self.window.len());
                    let before = self.window.len();
                    self.send_batch(from, to).await?;
                    // Recorded chunks left the window's front.
                    from = to - (before - self.window.len());
                }
                Ok::<(), StreamError>(())
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                // A coordinator that has not yet seen the old stream die
                // refuses a second one for the job: try again.
                Err(StreamError::Refused(reason)) if reason.contains("already has an upload") => {
                    resuming.try_again(reason);
                }
                Err(error) => resuming.failed(error)?,
            }
        }
    }

    /// Sends the globals and the finish; the backup is stored when this
    /// returns.
    pub async fn finish(
        &mut self,
        globals: proto::UploadGlobals,
        finish: proto::UploadFinish,
    ) -> Result<(), StreamError> {
        loop {
            if self.stored {
                return Ok(());
            }
            match self.finish_once(&globals, &finish).await {
                Ok(()) => return Ok(()),
                Err(StreamError::Broken(reason)) => self.resume(&reason).await?,
                Err(refused) => return Err(refused),
            }
        }
    }

    async fn finish_once(
        &mut self,
        globals: &proto::UploadGlobals,
        finish: &proto::UploadFinish,
    ) -> Result<(), StreamError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(StreamError::Broken("no upload stream".into()));
        };
        send(stream, backup_upload::Body::Globals(globals.clone())).await?;
        send(stream, backup_upload::Body::Finish(finish.clone())).await?;
        match next_reply(stream).await? {
            backup_upload_reply::Body::Stored(_) => {
                self.stored = true;
                Ok(())
            }
            _ => Err(StreamError::Refused(
                "the coordinator did not confirm the backup".into(),
            )),
        }
    }
}
