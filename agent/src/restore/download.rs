//! The backup's chunks as they come over `DownloadBackup`: a page of the
//! chunk list (each chunk's content hash and plaintext size, globals
//! first), then those chunks' packed bytes in that order, then the next
//! page. Every chunk is checked before anything reads it: [`unpack_chunk`]
//! decompresses it into no more than the listed size and re-hashes it
//! against the hash listed before it came. The agent holds no key; the
//! coordinator authenticated each stored chunk before sending it. A few
//! chunks are unpacked at once on the blocking pool, and handed over in
//! stream order.
//!
//! Chunks are named by position only ("chunk 17 of 40"): their content
//! hashes are the agent's business, their stored names the coordinator's.
//!
//! The download resumes: when the stream breaks (the network, a
//! coordinator restart), [`Reopen`] asks for it again from the chunks
//! already received (`from_chunk`), and the list entries still waiting for
//! their bytes are dropped, to come again in the re-sent list, whose first
//! page must start exactly there (`first_chunk`): no chunk is skipped or
//! fed twice, and each is still checked against its entry. Meanwhile
//! `pg_restore` waits on backpressure.

use std::collections::VecDeque;
use std::pin::Pin;

use cairn_common::archive::ArchiveScanner;
use cairn_common::chunk::{CHUNK_MAX_BYTES, Compression, ContentHash, UnpackError, unpack_chunk};
use cairn_common::proto::{self, agent_gateway_client::AgentGatewayClient, download_message};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tonic::transport::Channel;

use super::RestoreError;
use crate::resume::{Link, Resuming, StreamError};

/// The opened chunks, in order.
pub(super) type Chunks<'a> =
    Pin<Box<dyn Stream<Item = Result<OpenedChunk, RestoreError>> + Send + 'a>>;

/// Chunks unpacked at once, ahead of `pg_restore` (each at most 8 MiB of
/// plaintext, so memory stays at a few tens of MiB).
pub(super) const OPEN_AHEAD: usize = 4;

/// Most listed chunks waiting for their bytes (the coordinator sends pages
/// of 4,096): about 40 bytes each, so a few MiB at most.
const LIST_MAX_PENDING: usize = 65_536;

/// Where a chunk is in the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Position {
    /// The `pg_dumpall --globals-only` chunk.
    Globals,
    /// The dump's chunk of this index (from 0).
    Dump(u64),
}

/// A chunk that opened and checked out.
#[derive(Debug)]
pub(super) struct OpenedChunk {
    pub position: Position,
    pub plaintext: Vec<u8>,
}

/// "chunk 17 of 40" or "the globals chunk".
pub(super) fn describe_chunk(position: Position, total: u64) -> String {
    match position {
        Position::Globals => "the globals chunk".to_string(),
        Position::Dump(index) if total > 0 => format!("chunk {} of {total}", index + 1),
        Position::Dump(index) => format!("chunk {}", index + 1),
    }
}

/// One chunk as listed, until its bytes come.
struct Listed {
    position: Position,
    /// `None` for a chunk of a format-1 backup: its bytes carry the hash.
    hash: Option<ContentHash>,
    plaintext_bytes: u64,
}

/// One `DownloadBackup` stream's messages.
pub(super) type Messages =
    Pin<Box<dyn Stream<Item = Result<proto::DownloadMessage, tonic::Status>> + Send>>;

/// How a broken download is asked for again.
pub(super) trait Reopen: Send {
    /// The download again from chunk `from_chunk` (the chunks already
    /// received, globals included), after it broke for `reason`; or why
    /// not (the coordinator refused, or stayed out of reach too long).
    fn reopen(
        &mut self,
        from_chunk: u64,
        reason: String,
    ) -> impl Future<Output = Result<Messages, RestoreError>> + Send;
}

/// Reads the list pages and pairs each chunk's bytes with its entry.
struct Listing<R> {
    messages: Messages,
    reopen: R,
    /// Entries listed whose bytes have not come yet.
    list: VecDeque<Listed>,
    list_done: bool,
    /// Entries listed so far, globals included (those received and those
    /// in `list`).
    listed: u64,
    /// The dump index of the next dump chunk listed.
    next_index: u64,
    /// The stream's first page is still to come.
    first_page: bool,
    finished: bool,
}

impl<R: Reopen> Listing<R> {
    fn add_page(&mut self, page: proto::ChunkList) -> Result<(), RestoreError> {
        if self.list_done {
            return Err(RestoreError::Download(
                "the chunk list came again after its last page".into(),
            ));
        }
        // A stream's first page starts where the agent is (a fresh
        // download at 0, a resumed one at `from_chunk`); a later one where
        // the previous ended. (A coordinator that predates
        // `first_chunk` sends 0 on every page: only a first page, and
        // only a resumed one, can tell it apart.)
        if page.first_chunk != self.listed && (self.first_page || page.first_chunk != 0) {
            return Err(RestoreError::Download(format!(
                "the chunk list went on at chunk {} where chunk {} was due; a coordinator \
                 that cannot resume downloads must be upgraded",
                page.first_chunk, self.listed
            )));
        }
        self.first_page = false;
        if self.list.len() + page.chunks.len() > LIST_MAX_PENDING {
            return Err(RestoreError::Download(format!(
                "the chunk list runs more than {LIST_MAX_PENDING} chunks ahead of their bytes"
            )));
        }
        for entry in page.chunks {
            let position = if entry.globals {
                if self.listed > 0 {
                    return Err(RestoreError::Download(
                        "the globals chunk came after the dump's chunks".into(),
                    ));
                }
                Position::Globals
            } else {
                self.next_index += 1;
                Position::Dump(self.next_index - 1)
            };
            let hash = if entry.hash.is_empty() {
                None
            } else {
                Some(ContentHash::from_bytes(&entry.hash).map_err(|_| {
                    RestoreError::Download(format!(
                        "the chunk list has a malformed hash ({} bytes, not 32)",
                        entry.hash.len()
                    ))
                })?)
            };
            self.listed += 1;
            self.list.push_back(Listed {
                position,
                hash,
                plaintext_bytes: entry.plaintext_bytes,
            });
        }
        self.list_done = page.last;
        Ok(())
    }

    /// The stream broke for `reason`: asks for the rest again, and forgets
    /// the entries whose bytes did not come (the new list names them
    /// again).
    async fn resume(&mut self, reason: String) -> Result<(), RestoreError> {
        let unsent_dump_chunks = self
            .list
            .iter()
            .filter(|listed| matches!(listed.position, Position::Dump(_)))
            .count() as u64;
        let received = self.listed - self.list.len() as u64;
        self.messages = self.reopen.reopen(received, reason).await?;
        self.list.clear();
        self.list_done = false;
        self.listed = received;
        self.next_index -= unsent_dump_chunks;
        self.first_page = true;
        Ok(())
    }

    /// The next chunk with its entry; `None` at the end.
    async fn next_chunk(&mut self) -> Option<Result<(Listed, proto::ChunkData), RestoreError>> {
        if self.finished {
            return None;
        }
        let result = loop {
            // A stream that ends before the list does, or breaks, is
            // resumed; one the coordinator ends with a refusal is not.
            let broken = match self.messages.next().await {
                None if self.list_done && self.list.is_empty() => {
                    self.finished = true;
                    return None;
                }
                None if !self.list_done => {
                    "the coordinator ended the download before the end of the chunk list".into()
                }
                None => format!(
                    "the coordinator ended the download with {} of {} listed chunks unsent",
                    self.list.len(),
                    self.listed
                ),
                Some(Err(status)) => match RestoreError::coordinator(&status) {
                    RestoreError::Interrupted(reason) => reason,
                    refused => break Err(refused),
                },
                Some(Ok(message)) => match self.take(message) {
                    Ok(Some(chunk)) => break Ok(chunk),
                    Ok(None) => continue,
                    Err(error) => break Err(error),
                },
            };
            if let Err(error) = self.resume(broken).await {
                break Err(error);
            }
        };
        if result.is_err() {
            self.finished = true;
        }
        Some(result)
    }

    /// Takes one message: a chunk with its entry, or `None` for a page of
    /// the list.
    fn take(
        &mut self,
        message: proto::DownloadMessage,
    ) -> Result<Option<(Listed, proto::ChunkData)>, RestoreError> {
        match message.body {
            Some(download_message::Body::List(page)) => self.add_page(page).map(|()| None),
            Some(download_message::Body::Chunk(data)) => match self.list.pop_front() {
                Some(listed) => Ok(Some((listed, data))),
                None if self.list_done => Err(RestoreError::Download(
                    "more chunks came than the list names".into(),
                )),
                None => Err(RestoreError::Download(
                    "a chunk came before its entry in the chunk list".into(),
                )),
            },
            None => Err(RestoreError::Download("an empty download message".into())),
        }
    }
}

/// Opens the job's download from chunk `from_chunk` over `channel`.
pub(super) async fn open(
    channel: Channel,
    job_id: String,
    attempt_id: String,
    from_chunk: u64,
) -> Result<Messages, tonic::Status> {
    let mut client = AgentGatewayClient::new(channel)
        .max_decoding_message_size(cairn_common::chunk::MAX_CHUNK_MESSAGE_BYTES)
        .max_encoding_message_size(cairn_common::chunk::MAX_CHUNK_MESSAGE_BYTES);
    let messages = client
        .download_backup(proto::DownloadRequest {
            job_id,
            from_chunk,
            attempt_id,
        })
        .await?
        .into_inner();
    Ok(Box::pin(messages))
}

/// Opens a download over a channel, from a chunk: [`open`] for the job's
/// attempt.
pub(super) type Opener =
    Box<dyn FnMut(Channel, u64) -> BoxFuture<'static, Result<Messages, tonic::Status>> + Send>;

/// Opens a job attempt's download, and again over the newest session's
/// channel as often as it breaks. A download that breaks again before a
/// chunk came goes on with the same tries, so one that never gets further
/// gives up after [`crate::resume::REATTACH_LIMIT`].
pub(super) struct Redownload {
    link: Link,
    open: Opener,
    /// Where the last resume started, and its tries.
    stalled: Option<(u64, Resuming)>,
}

impl Redownload {
    pub fn new(link: Link, open: Opener) -> Redownload {
        Redownload {
            link,
            open,
            stalled: None,
        }
    }

    /// The first stream, from chunk 0. Refused, the restore ends; broken
    /// (the coordinator restarting while the restore checked its target),
    /// it is opened again as a resumed one is.
    pub async fn first(&mut self) -> Result<Messages, RestoreError> {
        match (self.open)(self.link.channel(), 0).await {
            Ok(messages) => Ok(messages),
            Err(status) => match StreamError::of(&status, "the coordinator refused the download") {
                StreamError::Broken(reason) => self.reopen(0, reason).await,
                StreamError::Refused(_) => Err(RestoreError::coordinator(&status)),
            },
        }
    }
}

impl Reopen for Redownload {
    async fn reopen(&mut self, from_chunk: u64, reason: String) -> Result<Messages, RestoreError> {
        let mut resuming = match self.stalled.take() {
            Some((at, mut resuming)) if at == from_chunk => {
                resuming.try_again(reason);
                resuming
            }
            _ => self.link.resuming("download", &reason),
        };
        loop {
            resuming.next_try(&mut self.link).await?;
            match (self.open)(self.link.channel(), from_chunk).await {
                Ok(messages) => {
                    tracing::info!(from_chunk, "download resumed");
                    self.stalled = Some((from_chunk, resuming));
                    return Ok(messages);
                }
                Err(status) => resuming.failed(StreamError::of(
                    &status,
                    "the coordinator refused the download",
                ))?,
            }
        }
    }
}

/// The chunks of `messages` (then of the streams `reopen` gives after a
/// break), checked, in order. The first error ends what the caller should
/// read.
pub(super) fn opened_chunks(
    messages: Messages,
    reopen: impl Reopen,
    total: u64,
) -> impl Stream<Item = Result<OpenedChunk, RestoreError>> {
    let listing = Listing {
        messages,
        reopen,
        list: VecDeque::new(),
        list_done: false,
        listed: 0,
        next_index: 0,
        first_page: true,
        finished: false,
    };
    futures::stream::unfold(listing, |mut listing| async move {
        let item = listing.next_chunk().await?;
        Some((item, listing))
    })
    .map(move |item| async move {
        let (listed, data) = item?;
        open_one(listed, data, total).await
    })
    .buffered(OPEN_AHEAD)
}

async fn open_one(
    listed: Listed,
    data: proto::ChunkData,
    total: u64,
) -> Result<OpenedChunk, RestoreError> {
    let position = listed.position;
    let hash = match (listed.hash, data.opened_hash.is_empty()) {
        (Some(hash), true) => hash,
        (None, false) => {
            ContentHash::from_bytes(&data.opened_hash).map_err(|_| RestoreError::Chunk {
                which: describe_chunk(position, total),
                problem: format!(
                    "comes with a malformed hash ({} bytes, not 32)",
                    data.opened_hash.len()
                ),
            })?
        }
        (Some(_), false) | (None, true) => {
            return Err(RestoreError::Chunk {
                which: describe_chunk(position, total),
                problem: "must have exactly one hash, in the list or with its bytes".into(),
            });
        }
    };
    let which = || describe_chunk(position, total);
    let compression =
        Compression::from_proto(data.compression, "chunk.compression").map_err(|e| {
            RestoreError::Chunk {
                which: which(),
                problem: e.to_string(),
            }
        })?;
    let plaintext_bytes = listed.plaintext_bytes;
    let payload = data.payload;
    let unpacking = tokio::task::spawn_blocking(move || {
        unpack_chunk(
            &hash,
            plaintext_bytes,
            compression,
            &payload,
            CHUNK_MAX_BYTES,
        )
    });
    let plaintext = match unpacking.await {
        Ok(Ok(plaintext)) => plaintext,
        Ok(Err(error)) => {
            return Err(RestoreError::Chunk {
                which: which(),
                problem: problem_of(&error, plaintext_bytes),
            });
        }
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // The runtime is shutting down.
        Err(_) => return Err(RestoreError::Cancelled),
    };
    Ok(OpenedChunk {
        position,
        plaintext,
    })
}

/// What is wrong with a chunk, to follow its name.
fn problem_of(error: &UnpackError, listed_bytes: u64) -> String {
    match error {
        UnpackError::TooLarge { limit, .. } => {
            format!("is listed as {listed_bytes} bytes, above the largest chunk ({limit} bytes)")
        }
        UnpackError::Decompress(reason) => format!("cannot be decompressed: {reason}"),
        UnpackError::Length { actual, .. } => {
            format!("holds {actual} bytes, but the manifest records {listed_bytes}")
        }
        UnpackError::HashMismatch => {
            "does not hash to its listed hash: its content is not what was backed up".into()
        }
    }
}

/// The download up to the end of the archive's table of contents.
pub(super) struct Beginning {
    pub globals: Option<Vec<u8>>,
    /// The dump's chunks read so far, all fed to the scanner.
    pub prefix: Vec<Vec<u8>>,
    /// `Err`: the archive cannot be read (the restore may go on without).
    pub scanner: Result<ArchiveScanner, String>,
}

pub(super) async fn read_beginning(chunks: &mut Chunks<'_>) -> Result<Beginning, RestoreError> {
    let mut beginning = Beginning {
        globals: None,
        prefix: Vec::new(),
        scanner: Ok(ArchiveScanner::new()),
    };
    loop {
        match &beginning.scanner {
            Ok(scanner) if scanner.head().is_some() => return Ok(beginning),
            Err(_) => return Ok(beginning),
            Ok(_) => {}
        }
        let Some(chunk) = chunks.next().await else {
            let bytes: usize = beginning.prefix.iter().map(Vec::len).sum();
            return Err(RestoreError::Download(format!(
                "the backup's dump ended after {bytes} bytes, before the end of its table of \
                 contents"
            )));
        };
        let OpenedChunk {
            position,
            plaintext,
        } = chunk?;
        match position {
            Position::Globals if beginning.globals.is_none() => beginning.globals = Some(plaintext),
            Position::Globals => {
                return Err(RestoreError::Download(
                    "the backup has two globals chunks".into(),
                ));
            }
            Position::Dump(_) => {
                if let Ok(scanner) = &mut beginning.scanner
                    && let Err(error) = scanner.feed(&plaintext)
                {
                    beginning.scanner = Err(error.to_string());
                }
                beginning.prefix.push(plaintext);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_common::chunk::pack_chunk;

    fn listed(data: &[u8], globals: bool) -> proto::ListedChunk {
        proto::ListedChunk {
            hash: ContentHash::of(data).as_bytes().to_vec(),
            plaintext_bytes: data.len() as u64,
            globals,
        }
    }

    fn list(
        entries: Vec<proto::ListedChunk>,
        last: bool,
    ) -> Result<proto::DownloadMessage, tonic::Status> {
        list_from(entries, 0, last)
    }

    /// A page whose first entry is chunk `first_chunk` of the backup.
    fn list_from(
        entries: Vec<proto::ListedChunk>,
        first_chunk: u64,
        last: bool,
    ) -> Result<proto::DownloadMessage, tonic::Status> {
        Ok(proto::DownloadMessage {
            body: Some(download_message::Body::List(proto::ChunkList {
                chunks: entries,
                last,
                first_chunk,
            })),
        })
    }

    /// The streams a resumed download gets, in turn, and the `from_chunk`
    /// each was asked from. Once they run out, the break is final.
    #[derive(Default)]
    struct Streams {
        left: VecDeque<Vec<Result<proto::DownloadMessage, tonic::Status>>>,
        asked: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    }

    impl Reopen for Streams {
        async fn reopen(
            &mut self,
            from_chunk: u64,
            reason: String,
        ) -> Result<Messages, RestoreError> {
            self.asked.lock().unwrap().push(from_chunk);
            match self.left.pop_front() {
                Some(messages) => Ok(Box::pin(futures::stream::iter(messages))),
                None => Err(RestoreError::Interrupted(reason)),
            }
        }
    }

    /// What a download of `streams` (the first, then those resumes get)
    /// opens, and the `from_chunk` of each resume.
    async fn collect_resumed(
        mut streams: Vec<Vec<Result<proto::DownloadMessage, tonic::Status>>>,
    ) -> (Vec<Result<OpenedChunk, RestoreError>>, Vec<u64>) {
        let first = streams.remove(0);
        let reopen = Streams {
            left: streams.into(),
            ..Streams::default()
        };
        let asked = reopen.asked.clone();
        let opened = opened_chunks(Box::pin(futures::stream::iter(first)), reopen, 4)
            .collect()
            .await;
        let asked = asked.lock().unwrap().clone();
        (opened, asked)
    }

    fn data(bytes: &[u8]) -> proto::ChunkData {
        let packed = pack_chunk(bytes, 1).unwrap();
        proto::ChunkData {
            compression: packed.compression.to_proto(),
            payload: packed.payload,
            opened_hash: Vec::new(),
        }
    }

    fn chunk(data: proto::ChunkData) -> Result<proto::DownloadMessage, tonic::Status> {
        Ok(proto::DownloadMessage {
            body: Some(download_message::Body::Chunk(data)),
        })
    }

    /// What a download of `messages` opens (3 chunks in the backup), not
    /// resumed.
    async fn collect(
        messages: Vec<Result<proto::DownloadMessage, tonic::Status>>,
    ) -> Vec<Result<OpenedChunk, RestoreError>> {
        opened_chunks(
            Box::pin(futures::stream::iter(messages)),
            Streams::default(),
            3,
        )
        .collect()
        .await
    }

    fn error_of(opened: &[Result<OpenedChunk, RestoreError>]) -> String {
        opened
            .iter()
            .find_map(|item| item.as_ref().err())
            .map(ToString::to_string)
            .unwrap_or_else(|| "no error".into())
    }

    #[tokio::test]
    async fn chunks_open_in_order_after_a_list_in_pages() {
        let big = b"one ".repeat(100_000);
        let messages = vec![
            list(
                vec![listed(b"CREATE ROLE a;", true), listed(&big, false)],
                false,
            ),
            list(vec![listed(b"two", false), listed(b"three", false)], true),
            chunk(data(b"CREATE ROLE a;")),
            chunk(data(&big)),
            chunk(data(b"two")),
            chunk(data(b"three")),
        ];
        let opened: Vec<OpenedChunk> = collect(messages)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            opened.iter().map(|c| c.position).collect::<Vec<_>>(),
            [
                Position::Globals,
                Position::Dump(0),
                Position::Dump(1),
                Position::Dump(2)
            ]
        );
        assert_eq!(opened[0].plaintext, b"CREATE ROLE a;");
        assert_eq!(opened[1].plaintext, big);
        assert_eq!(opened[3].plaintext, b"three");
    }

    #[tokio::test]
    async fn a_chunk_of_a_format_one_backup_carries_its_hash() {
        let mut entry = listed(b"old", false);
        entry.hash.clear();
        let mut old = data(b"old");
        old.opened_hash = ContentHash::of(b"old").as_bytes().to_vec();
        let opened = collect(vec![list(vec![entry.clone()], true), chunk(old)]).await;
        assert_eq!(opened[0].as_ref().unwrap().plaintext, b"old");

        // Without a hash anywhere, nothing is trusted.
        let opened = collect(vec![list(vec![entry], true), chunk(data(b"old"))]).await;
        assert!(
            error_of(&opened).contains("exactly one hash"),
            "{}",
            error_of(&opened)
        );
    }

    #[tokio::test]
    async fn a_bad_chunk_is_named_with_its_position_and_why() {
        // Other bytes than the list says.
        let opened = collect(vec![
            list(vec![listed(b"zero", false), listed(b"fine", false)], true),
            chunk(data(b"zero")),
            chunk(data(b"fake")),
        ])
        .await;
        assert!(opened[0].is_ok());
        assert_eq!(
            error_of(&opened),
            "chunk 2 of 3 does not hash to its listed hash: its content is not what was backed up"
        );

        let mut altered = data(&b"fine".repeat(1000));
        let last = altered.payload.len() - 1;
        altered.payload[last] ^= 1;
        let opened = collect(vec![
            list(vec![listed(&b"fine".repeat(1000), false)], true),
            chunk(altered),
        ])
        .await;
        assert!(
            error_of(&opened).starts_with("chunk 1 of 3 cannot be decompressed"),
            "{}",
            error_of(&opened)
        );

        let mut short = listed(b"fine", false);
        short.plaintext_bytes = 5;
        let opened = collect(vec![list(vec![short], true), chunk(data(b"fine"))]).await;
        assert!(
            error_of(&opened).ends_with("holds 4 bytes, but the manifest records 5"),
            "{}",
            error_of(&opened)
        );

        let mut bad_hash = listed(b"fine", false);
        bad_hash.hash.truncate(3);
        let opened = collect(vec![list(vec![bad_hash], true)]).await;
        assert!(
            error_of(&opened).contains("malformed hash (3 bytes, not 32)"),
            "{}",
            error_of(&opened)
        );

        let opened = collect(vec![list(
            vec![listed(b"fine", false), listed(b"g", true)],
            true,
        )])
        .await;
        assert!(
            error_of(&opened).contains("globals chunk came after"),
            "{}",
            error_of(&opened)
        );

        let opened = collect(vec![
            list(vec![listed(b"fine", false), listed(b"more", false)], true),
            chunk(data(b"fine")),
            Err(tonic::Status::data_loss("chunk 2 of 3 (ab) is missing")),
        ])
        .await;
        assert!(opened[0].is_ok());
        assert_eq!(
            error_of(&opened),
            "the coordinator stopped the download: chunk 2 of 3 (ab) is missing"
        );
    }

    #[tokio::test]
    async fn the_stream_must_follow_its_list() {
        let cases: Vec<(Vec<Result<proto::DownloadMessage, tonic::Status>>, &str)> = vec![
            (
                vec![
                    list(vec![listed(b"a", false)], false),
                    chunk(data(b"a")),
                    chunk(data(b"b")),
                ],
                "a chunk came before its entry in the chunk list",
            ),
            (
                vec![
                    list(vec![listed(b"a", false)], true),
                    chunk(data(b"a")),
                    chunk(data(b"b")),
                ],
                "more chunks came than the list names",
            ),
            (
                vec![
                    list(vec![listed(b"a", false), listed(b"b", false)], true),
                    chunk(data(b"a")),
                ],
                "with 1 of 2 listed chunks unsent",
            ),
            (vec![], "before the end of the chunk list"),
            (
                vec![list(vec![], true), list(vec![], true)],
                "came again after its last page",
            ),
        ];
        for (messages, expected) in cases {
            let opened = collect(messages).await;
            assert!(
                error_of(&opened).contains(expected),
                "{expected}: {}",
                error_of(&opened)
            );
        }
        // An empty backup (no chunks at all) ends cleanly.
        assert!(collect(vec![list(vec![], true)]).await.is_empty());
    }

    fn positions_and_bytes(
        opened: Vec<Result<OpenedChunk, RestoreError>>,
    ) -> Vec<(Position, Vec<u8>)> {
        opened
            .into_iter()
            .map(|chunk| {
                let chunk = chunk.unwrap();
                (chunk.position, chunk.plaintext)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_broken_download_resumes_after_the_chunks_received() {
        let reset = || Err(tonic::Status::unavailable("connection reset"));
        let all = [
            (Position::Globals, b"CREATE ROLE a;".to_vec()),
            (Position::Dump(0), b"zero".to_vec()),
            (Position::Dump(1), b"one".to_vec()),
            (Position::Dump(2), b"two".to_vec()),
        ];
        // Broken with one dump chunk listed and unsent, then again with
        // a whole page unsent, then once by a clean end before the list's:
        // each resume starts after the chunks received, and every chunk
        // comes once, in order, checked against the list.
        let (opened, asked) = collect_resumed(vec![
            vec![
                list_from(
                    vec![
                        listed(b"CREATE ROLE a;", true),
                        listed(b"zero", false),
                        listed(b"one", false),
                    ],
                    0,
                    false,
                ),
                chunk(data(b"CREATE ROLE a;")),
                chunk(data(b"zero")),
                reset(),
            ],
            vec![list_from(vec![listed(b"one", false)], 2, false), reset()],
            vec![list_from(vec![listed(b"one", false)], 2, false)],
            vec![
                list_from(vec![listed(b"one", false)], 2, false),
                chunk(data(b"one")),
                list_from(vec![listed(b"two", false)], 3, true),
                chunk(data(b"two")),
            ],
        ])
        .await;
        assert_eq!(positions_and_bytes(opened), all);
        assert_eq!(asked, [2, 2, 2]);

        // Broken before anything came: from the start, globals again.
        let (opened, asked) = collect_resumed(vec![
            vec![reset()],
            vec![
                list_from(
                    vec![listed(b"CREATE ROLE a;", true), listed(b"zero", false)],
                    0,
                    false,
                ),
                chunk(data(b"CREATE ROLE a;")),
                chunk(data(b"zero")),
                list_from(vec![listed(b"one", false), listed(b"two", false)], 2, true),
                chunk(data(b"one")),
                chunk(data(b"two")),
            ],
        ])
        .await;
        assert_eq!(positions_and_bytes(opened), all);
        assert_eq!(asked, [0]);
    }

    #[tokio::test]
    async fn a_resumed_download_must_go_on_exactly_where_it_broke() {
        let first = || {
            vec![
                list_from(
                    vec![listed(b"zero", false), listed(b"one", false)],
                    0,
                    false,
                ),
                chunk(data(b"zero")),
                Err(tonic::Status::unknown("h2 protocol error")),
            ]
        };
        let cases: Vec<(Vec<Result<proto::DownloadMessage, tonic::Status>>, &str)> = vec![
            // A coordinator that ignores `from_chunk` sends it all again.
            (
                vec![
                    list(vec![listed(b"zero", false), listed(b"one", false)], true),
                    chunk(data(b"zero")),
                ],
                "the chunk list went on at chunk 0 where chunk 1 was due",
            ),
            // Skips a chunk.
            (
                vec![list_from(vec![listed(b"two", false)], 2, true)],
                "went on at chunk 2 where chunk 1 was due",
            ),
            // The globals again, after the dump's chunks.
            (
                vec![list_from(vec![listed(b"g", true)], 1, true)],
                "the globals chunk came after the dump's chunks",
            ),
            // Other bytes than listed: still checked.
            (
                vec![
                    list_from(vec![listed(b"one", false)], 1, true),
                    chunk(data(b"eno")),
                ],
                "chunk 2 of 4 does not hash to its listed hash",
            ),
        ];
        for (resumed, expected) in cases {
            let (opened, asked) = collect_resumed(vec![first(), resumed]).await;
            assert_eq!(opened[0].as_ref().unwrap().plaintext, b"zero");
            assert!(
                error_of(&opened).contains(expected),
                "{expected}: {}",
                error_of(&opened)
            );
            assert!(
                matches!(
                    opened.last(),
                    Some(Err(RestoreError::Download(_) | RestoreError::Chunk { .. }))
                ),
                "final: {expected}"
            );
            assert_eq!(asked, [1]);
        }

        // A refusal is final, not resumed; a break that cannot be resumed
        // is an interruption (the job may retry).
        let (opened, asked) = collect_resumed(vec![vec![
            list(vec![listed(b"zero", false)], true),
            Err(tonic::Status::aborted(
                "job j is cancelled: the download stops",
            )),
        ]])
        .await;
        assert!(asked.is_empty());
        assert!(matches!(
            opened.last(),
            Some(Err(RestoreError::Download(_)))
        ));
        let (opened, asked) = collect_resumed(vec![first()]).await;
        assert_eq!(asked, [1]);
        assert!(matches!(
            opened.last(),
            Some(Err(RestoreError::Interrupted(_)))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_download_that_keeps_breaking_before_a_chunk_comes_gives_up_in_time() {
        use crate::jobs::RunningJobs;
        use crate::resume::{REATTACH_LIMIT, RESUME_RETRY};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};

        let jobs = RunningJobs::default();
        let lazy = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let link = Link::new(&jobs, lazy, tokio_util::sync::CancellationToken::new());
        // Every resumed stream opens, lists the rest, and breaks at once.
        let opens = Arc::new(AtomicU64::new(0));
        let counted = opens.clone();
        let redownload = Redownload::new(
            link,
            Box::new(move |_, from_chunk| {
                let opened = counted.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(opened < 1000, "the download resumes without end");
                Box::pin(async move {
                    let messages: Messages = Box::pin(futures::stream::iter(vec![
                        list_from(vec![listed(b"one", false)], from_chunk, true),
                        Err(tonic::Status::unavailable("connection reset")),
                    ]));
                    Ok(messages)
                })
            }),
        );
        let first: Messages = Box::pin(futures::stream::iter(vec![
            list(vec![listed(b"zero", false), listed(b"one", false)], true),
            chunk(data(b"zero")),
            Err(tonic::Status::unavailable("connection reset")),
        ]));
        let started = tokio::time::Instant::now();
        let opened: Vec<_> = opened_chunks(first, redownload, 2).collect().await;
        assert_eq!(opened[0].as_ref().unwrap().plaintext, b"zero");
        assert!(
            matches!(opened.last(), Some(Err(RestoreError::Interrupted(_)))),
            "{}",
            error_of(&opened)
        );
        assert_eq!(
            error_of(&opened),
            "the download could not resume within 11m: the coordinator stopped the download: \
             connection reset"
        );
        assert!(started.elapsed() >= REATTACH_LIMIT);
        assert_eq!(
            opens.load(Ordering::SeqCst),
            REATTACH_LIMIT.as_secs() / RESUME_RETRY.as_secs()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_download_that_cannot_open_waits_for_the_coordinator_unless_refused() {
        use crate::jobs::RunningJobs;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};

        let jobs = RunningJobs::default();
        let lazy = || tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        // The coordinator is restarting: the first two opens fail as a
        // reset connection does, the third opens.
        let opens = Arc::new(AtomicU64::new(0));
        let counted = opens.clone();
        let mut redownload = Redownload::new(
            Link::new(&jobs, lazy(), tokio_util::sync::CancellationToken::new()),
            Box::new(move |_, from_chunk| {
                let opened = counted.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    assert_eq!(from_chunk, 0);
                    if opened < 3 {
                        return Err(tonic::Status::unavailable("connection refused"));
                    }
                    let messages: Messages = Box::pin(futures::stream::iter(Vec::new()));
                    Ok(messages)
                })
            }),
        );
        assert!(redownload.first().await.is_ok());
        assert_eq!(opens.load(Ordering::SeqCst), 3);

        // A refusal (the attempt is no longer the job's) is final at once.
        let refused = Arc::new(AtomicU64::new(0));
        let counted = refused.clone();
        let mut redownload = Redownload::new(
            Link::new(&jobs, lazy(), tokio_util::sync::CancellationToken::new()),
            Box::new(move |_, _| {
                counted.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { Err(tonic::Status::permission_denied("not running")) })
            }),
        );
        assert!(redownload.first().await.is_err());
        assert_eq!(refused.load(Ordering::SeqCst), 1);
    }
}
