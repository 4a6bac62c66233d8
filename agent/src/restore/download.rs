//! The backup's chunks as they come over `DownloadBackup`, each opened and
//! checked before anything reads it: [`open_chunk`] authenticates the seal
//! (with the chunk's id bound in), decompresses, and re-hashes the
//! plaintext against the id; then its length must be the one the manifest
//! recorded. A few chunks are opened at once on the blocking pool, and
//! handed over in stream order.

use std::pin::Pin;
use std::sync::Arc;

use cairn_common::archive::ArchiveScanner;
use cairn_common::chunk::{ChunkError, ChunkId, open_chunk};
use cairn_common::crypto::{RepositoryKeys, SealError};
use cairn_common::proto;
use futures::{Stream, StreamExt};

use super::RestoreError;

/// The opened chunks, in order.
pub(super) type Chunks<'a> =
    Pin<Box<dyn Stream<Item = Result<OpenedChunk, RestoreError>> + Send + 'a>>;

/// Chunks opened at once, ahead of `pg_restore` (each at most 8 MiB of
/// plaintext, so memory stays at a few tens of MiB).
pub(super) const OPEN_AHEAD: usize = 4;

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

/// "chunk 17 of 40 (id)" or "the globals chunk (id)", as the coordinator
/// names them too.
pub(super) fn describe_chunk(position: Position, total: u64, id: &str) -> String {
    match position {
        Position::Globals => format!("the globals chunk ({id})"),
        Position::Dump(index) if total > 0 => format!("chunk {} of {total} ({id})", index + 1),
        Position::Dump(index) => format!("chunk {} ({id})", index + 1),
    }
}

/// The chunks of `messages`, opened, in order. The first error ends what
/// the caller should read.
pub(super) fn opened_chunks(
    messages: impl Stream<Item = Result<proto::DownloadChunk, tonic::Status>>,
    keys: Arc<RepositoryKeys>,
    total: u64,
) -> impl Stream<Item = Result<OpenedChunk, RestoreError>> {
    let mut next_index = 0u64;
    messages
        .map(move |message| {
            let message = message.map_err(|status| RestoreError::coordinator(&status))?;
            let position = if message.globals {
                if next_index > 0 {
                    return Err(RestoreError::Download(
                        "the globals chunk came after the dump's chunks".into(),
                    ));
                }
                Position::Globals
            } else {
                next_index += 1;
                Position::Dump(next_index - 1)
            };
            Ok((position, message))
        })
        .map(move |item| {
            let keys = keys.clone();
            async move {
                let (position, message) = item?;
                open_one(keys, position, message, total).await
            }
        })
        .buffered(OPEN_AHEAD)
}

async fn open_one(
    keys: Arc<RepositoryKeys>,
    position: Position,
    message: proto::DownloadChunk,
    total: u64,
) -> Result<OpenedChunk, RestoreError> {
    let id = ChunkId::from_bytes(&message.id).map_err(|_| RestoreError::Chunk {
        which: describe_chunk(position, total, &hex_of(&message.id)),
        problem: format!("has a malformed id ({} bytes, not 32)", message.id.len()),
    })?;
    let which = || describe_chunk(position, total, &id.to_hex());
    let sealed = message.sealed;
    let opening = tokio::task::spawn_blocking(move || open_chunk(&keys, &id, &sealed));
    let plaintext = match opening.await {
        Ok(Ok(plaintext)) => plaintext,
        Ok(Err(error)) => {
            return Err(RestoreError::Chunk {
                which: which(),
                problem: problem_of(&error),
            });
        }
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // The runtime is shutting down.
        Err(_) => return Err(RestoreError::Cancelled),
    };
    if plaintext.len() as u64 != message.plaintext_bytes {
        return Err(RestoreError::Chunk {
            which: which(),
            problem: format!(
                "holds {} bytes, but the manifest records {}",
                plaintext.len(),
                message.plaintext_bytes
            ),
        });
    }
    Ok(OpenedChunk {
        position,
        plaintext,
    })
}

/// What is wrong with a chunk, to follow its name.
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

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    use cairn_common::chunk::seal_chunk;

    fn message(keys: &RepositoryKeys, data: &[u8], globals: bool) -> proto::DownloadChunk {
        let sealed = seal_chunk(keys, data, 1).unwrap();
        proto::DownloadChunk {
            id: sealed.id.as_bytes().to_vec(),
            plaintext_bytes: data.len() as u64,
            sealed: sealed.bytes,
            globals,
        }
    }

    async fn collect(
        messages: Vec<Result<proto::DownloadChunk, tonic::Status>>,
        keys: &RepositoryKeys,
    ) -> Vec<Result<OpenedChunk, RestoreError>> {
        opened_chunks(futures::stream::iter(messages), Arc::new(keys.clone()), 3)
            .collect()
            .await
    }

    #[tokio::test]
    async fn chunks_open_in_order() {
        let keys = RepositoryKeys::generate().unwrap();
        let messages = vec![
            Ok(message(&keys, b"CREATE ROLE a;", true)),
            Ok(message(&keys, &b"one ".repeat(100_000), false)),
            Ok(message(&keys, b"two", false)),
            Ok(message(&keys, b"three", false)),
        ];
        let opened = collect(messages, &keys).await;
        let opened: Vec<OpenedChunk> = opened.into_iter().map(Result::unwrap).collect();
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
        assert_eq!(opened[3].plaintext, b"three");
    }

    #[tokio::test]
    async fn a_bad_chunk_is_named_with_its_position_and_why() {
        let keys = RepositoryKeys::generate().unwrap();
        let good = message(&keys, b"fine", false);
        let mut altered = message(&keys, b"altered", false);
        let last = altered.sealed.len() - 1;
        altered.sealed[last] ^= 1;
        let id = hex_of(&altered.id);
        let opened = collect(vec![Ok(good.clone()), Ok(altered)], &keys).await;
        assert!(opened[0].is_ok());
        let error = opened[1].as_ref().unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "chunk 2 of 3 ({id}) failed authentication: it was altered, or sealed under \
                 another key or name"
            )
        );

        // Another chunk's bytes under this one's name.
        let mut swapped = message(&keys, b"one", false);
        swapped.sealed = message(&keys, b"two", false).sealed;
        let opened = collect(vec![Ok(swapped)], &keys).await;
        assert!(
            opened[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("failed authentication"),
            "{:?}",
            opened[0]
        );

        let mut short = good.clone();
        short.plaintext_bytes = 5;
        let opened = collect(vec![Ok(short)], &keys).await;
        let error = opened[0].as_ref().unwrap_err().to_string();
        assert!(
            error.ends_with("holds 4 bytes, but the manifest records 5"),
            "{error}"
        );

        let mut bad_id = good.clone();
        bad_id.id.truncate(3);
        let opened = collect(vec![Ok(bad_id)], &keys).await;
        let error = opened[0].as_ref().unwrap_err().to_string();
        assert!(error.contains("malformed id (3 bytes, not 32)"), "{error}");

        let stranger = RepositoryKeys::generate().unwrap();
        let opened = collect(vec![Ok(good.clone())], &stranger).await;
        assert!(opened[0].is_err());

        let opened = collect(
            vec![Ok(good.clone()), Ok(message(&keys, b"g", true))],
            &keys,
        )
        .await;
        let error = opened[1].as_ref().unwrap_err().to_string();
        assert!(error.contains("globals chunk came after"), "{error}");

        let opened = collect(
            vec![
                Ok(good),
                Err(tonic::Status::data_loss("chunk 2 of 3 (ab) is missing")),
            ],
            &keys,
        )
        .await;
        let error = opened[1].as_ref().unwrap_err().to_string();
        assert_eq!(
            error,
            "the coordinator stopped the download: chunk 2 of 3 (ab) is missing"
        );
    }
}
