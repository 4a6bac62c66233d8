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

use std::collections::VecDeque;
use std::pin::Pin;

use cairn_common::archive::ArchiveScanner;
use cairn_common::chunk::{CHUNK_MAX_BYTES, Compression, ContentHash, UnpackError, unpack_chunk};
use cairn_common::proto::{self, download_message};
use futures::{Stream, StreamExt};

use super::RestoreError;

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

type Messages = Pin<Box<dyn Stream<Item = Result<proto::DownloadMessage, tonic::Status>> + Send>>;

/// Reads the list pages and pairs each chunk's bytes with its entry.
struct Listing {
    messages: Messages,
    list: VecDeque<Listed>,
    list_done: bool,
    listed: u64,
    next_index: u64,
    finished: bool,
}

impl Listing {
    fn add_page(&mut self, page: proto::ChunkList) -> Result<(), RestoreError> {
        if self.list_done {
            return Err(RestoreError::Download(
                "the chunk list came again after its last page".into(),
            ));
        }
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

    /// The next chunk with its entry; `None` at the end.
    async fn next_chunk(&mut self) -> Option<Result<(Listed, proto::ChunkData), RestoreError>> {
        if self.finished {
            return None;
        }
        let result = loop {
            let message = match self.messages.next().await {
                None if self.list_done && self.list.is_empty() => {
                    self.finished = true;
                    return None;
                }
                None if !self.list_done => {
                    break Err(RestoreError::Download(
                        "the coordinator ended the download before the end of the chunk list"
                            .into(),
                    ));
                }
                None => {
                    break Err(RestoreError::Download(format!(
                        "the coordinator ended the download with {} of {} listed chunks unsent",
                        self.list.len(),
                        self.listed
                    )));
                }
                Some(Err(status)) => break Err(RestoreError::coordinator(&status)),
                Some(Ok(message)) => message,
            };
            match message.body {
                Some(download_message::Body::List(page)) => {
                    if let Err(error) = self.add_page(page) {
                        break Err(error);
                    }
                }
                Some(download_message::Body::Chunk(data)) => match self.list.pop_front() {
                    Some(listed) => break Ok((listed, data)),
                    None if self.list_done => {
                        break Err(RestoreError::Download(
                            "more chunks came than the list names".into(),
                        ));
                    }
                    None => {
                        break Err(RestoreError::Download(
                            "a chunk came before its entry in the chunk list".into(),
                        ));
                    }
                },
                None => break Err(RestoreError::Download("an empty download message".into())),
            }
        };
        if result.is_err() {
            self.finished = true;
        }
        Some(result)
    }
}

/// The chunks of `messages`, checked, in order. The first error ends what
/// the caller should read.
pub(super) fn opened_chunks(
    messages: impl Stream<Item = Result<proto::DownloadMessage, tonic::Status>> + Send + 'static,
    total: u64,
) -> impl Stream<Item = Result<OpenedChunk, RestoreError>> {
    let listing = Listing {
        messages: Box::pin(messages),
        list: VecDeque::new(),
        list_done: false,
        listed: 0,
        next_index: 0,
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
        Ok(proto::DownloadMessage {
            body: Some(download_message::Body::List(proto::ChunkList {
                chunks: entries,
                last,
            })),
        })
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

    async fn collect(
        messages: Vec<Result<proto::DownloadMessage, tonic::Status>>,
    ) -> Vec<Result<OpenedChunk, RestoreError>> {
        opened_chunks(futures::stream::iter(messages), 3)
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
}
