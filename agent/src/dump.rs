//! The agent side of a backup's data path: `pg_dump` of one database, cut
//! into content-defined chunks, each named by its content hash, compressed
//! and handed over in order. The agent holds no repository key: the
//! coordinator checks, seals and stores what it receives.
//!
//! ```text
//! pg_dump --format=custom ──stdout pipe──► FastCDC ──► pack_chunk ×N ──► mpsc ──► caller
//!   (child process)                        (8 MiB buffer)  (blocking pool,   (bounded)
//!                                                           order kept)
//! ```
//!
//! Memory stays bounded whatever the size of the database: the chunker
//! holds one buffer of [`CHUNK_MAX_BYTES`], at most a few chunks are being
//! packed at once (their results are kept in stream order), and the channel
//! to the caller is bounded. When the caller is slow, sending waits, so the
//! chunker stops reading, the pipe fills and `pg_dump` blocks on its write:
//! the backpressure reaches the database session.
//!
//! Chunks are named by their content, so two dumps of an unchanged
//! database share every chunk but the first: the archive's header carries
//! the time of the dump.
//!
//! A dump is complete only when [`dump`] returns `Ok`. Chunks sent before an
//! error are whole and valid, and may be kept (they are content-addressed),
//! but they are not a dump.
//!
//! How `pg_dump` and `pg_dumpall` are found and connected (the password
//! never on their command line) is [`crate::postgres`]'s business.

use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::process::ExitStatus;
use std::task::{Context, Poll};
use std::time::Duration;

use cairn_common::archive::{ArchiveScanner, ArchiveSummary};
use cairn_common::chunk::{
    CHUNK_AVG_BYTES, CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, PackedChunk, pack_chunk,
};
use fastcdc::v2020::AsyncStreamCDC;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::postgres::{self, ConnectionString, PgTools, PostgresError};

/// How much of a tool's stderr is kept: the end, where its error is.
pub const STDERR_TAIL_BYTES: usize = 64 * 1024;

/// At most this many chunks are packed at once (fewer on smaller hosts).
pub const MAX_PACKING_IN_FLIGHT: usize = 4;

/// What to tell an operator whose host lacks the client programs.
const INSTALL_HINT: &str = "install the PostgreSQL client programs, of the server's major \
    version or newer (Debian/Ubuntu: apt-get install postgresql-client-<major>), or give the \
    directory that holds them (pg_bindir)";

/// One database to dump.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// The instance, as configured; its own database (if any) is replaced by
    /// `database`.
    pub connection: ConnectionString,
    /// Any name PostgreSQL accepts (spaces, quotes, non-ASCII...).
    pub database: String,
    /// zstd level for [`pack_chunk`]; 0 sends chunks uncompressed.
    pub zstd_level: i32,
    /// Where `pg_dump` is; found otherwise (see [`PgTools::locate`]).
    pub pg_bindir: Option<PathBuf>,
}

/// Where a dump is; published on a `watch` channel as it goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpProgress {
    /// Bytes of `pg_dump`'s output read so far.
    pub bytes_read: u64,
    /// Chunks handed to the caller so far.
    pub chunks: u64,
}

/// A finished dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpOutcome {
    /// Size of the archive `pg_dump` wrote (the sum of the chunks' plaintext).
    pub dump_bytes: u64,
    pub chunk_count: u64,
    /// The first line of `pg_dump --version`, such as
    /// `pg_dump (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)`.
    pub pg_dump_version: String,
    pub duration: Duration,
    /// Exact rows of every table, counted in the archive as it went by, or
    /// why they could not be (an archive this agent cannot read). Never
    /// fails the dump.
    pub rows: Result<ArchiveSummary, String>,
}

/// Why a dump failed. No variant carries the connection string.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The program could not be started (missing, not executable...).
    /// Causes are in the message only (see `cairn_common::error`).
    #[error("cannot run {}: {cause}; {INSTALL_HINT}", program.display())]
    Spawn { program: PathBuf, cause: io::Error },
    /// The program ran and failed; `stderr` is its own message (trimmed, the
    /// last [`STDERR_TAIL_BYTES`] at most).
    #[error("{program} failed ({status}): {}", or_no_message(stderr))]
    PgDump {
        /// `pg_dump` or `pg_dumpall`.
        program: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    /// The cancellation token fired; `pg_dump` was killed and reaped.
    #[error("the dump was cancelled")]
    Cancelled,
    /// The receiver of the chunks was dropped; `pg_dump` was killed and
    /// reaped.
    #[error("the receiver of the dump's chunks went away, so the dump was stopped")]
    ReceiverClosed,
    #[error("invalid database name: {0}")]
    InvalidDatabase(&'static str),
    #[error(transparent)]
    Connection(#[from] PostgresError),
    #[error("{context}: {cause}")]
    Io {
        context: &'static str,
        cause: io::Error,
    },
    #[error("cannot compress a chunk: {0}")]
    Pack(cairn_common::Error),
}

fn or_no_message(stderr: &str) -> &str {
    if stderr.is_empty() {
        "no message"
    } else {
        stderr
    }
}

/// Dumps `request.database` and sends its chunks, packed, in stream order on
/// `chunks`; `progress` is updated as the dump goes. The channel's capacity
/// bounds how many packed chunks wait for the caller; when it is full,
/// `pg_dump` is paused (see the module documentation).
///
/// On `cancel`, or when the receiver of `chunks` is dropped, `pg_dump` is
/// killed and reaped before this returns. Dropping the future kills it too.
pub async fn dump(
    request: &DumpRequest,
    chunks: mpsc::Sender<PackedChunk>,
    progress: watch::Sender<DumpProgress>,
    cancel: CancellationToken,
) -> Result<DumpOutcome, DumpError> {
    let span = tracing::info_span!("dump", database = ?request.database);
    run_dump(request, &chunks, &progress, &cancel)
        .instrument(span)
        .await
}

async fn run_dump(
    request: &DumpRequest,
    chunks: &mpsc::Sender<PackedChunk>,
    progress: &watch::Sender<DumpProgress>,
    cancel: &CancellationToken,
) -> Result<DumpOutcome, DumpError> {
    let started = Instant::now();
    check_database_name(&request.database)?;
    let tools = PgTools::locate(request.pg_bindir.as_deref()).await;
    let pg_dump_version = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(DumpError::Cancelled),
        version = tool_version(&tools, "pg_dump") => version?,
    };
    let mut command = postgres::pg_dump_command(&tools, &request.connection, &request.database)?;
    let mut child = command.spawn().map_err(|source| DumpError::Spawn {
        program: tools.program("pg_dump"),
        cause: source,
    })?;
    tracing::info!(pid = child.id(), version = %pg_dump_version, "pg_dump started");
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        stop(&mut child).await;
        return Err(DumpError::Io {
            context: "pg_dump's output",
            cause: io::Error::other("stdout or stderr is not piped"),
        });
    };
    // Read on its own task, so that a chatty pg_dump can never block on a
    // full stderr pipe, whatever the rest is doing.
    let stderr_tail = tokio::spawn(read_tail(stderr, STDERR_TAIL_BYTES));

    let result = {
        let work = async {
            let totals = pump(stdout, request, chunks, progress).await?;
            let status = child.wait().await.map_err(|source| DumpError::Io {
                context: "waiting for pg_dump",
                cause: source,
            })?;
            Ok::<_, DumpError>((totals, status))
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(DumpError::Cancelled),
            () = chunks.closed() => Err(DumpError::ReceiverClosed),
            result = work => result,
        }
    };

    match result {
        Ok((totals, status)) => {
            let stderr = stderr_tail.await.unwrap_or_default();
            if !status.success() {
                tracing::debug!(%status, stderr = %stderr, "pg_dump failed");
                return Err(DumpError::PgDump {
                    program: "pg_dump",
                    status,
                    stderr,
                });
            }
            if !stderr.is_empty() {
                tracing::warn!(stderr = %stderr, "pg_dump succeeded with messages");
            }
            let outcome = DumpOutcome {
                dump_bytes: totals.bytes,
                chunk_count: totals.chunks,
                pg_dump_version,
                duration: started.elapsed(),
                rows: totals.rows,
            };
            tracing::info!(
                bytes = outcome.dump_bytes,
                chunks = outcome.chunk_count,
                duration = ?outcome.duration,
                "pg_dump finished"
            );
            Ok(outcome)
        }
        Err(error) => {
            stop(&mut child).await;
            stderr_tail.abort();
            tracing::info!(%error, "pg_dump stopped");
            Err(error)
        }
    }
}

/// Dumps the cluster-wide objects (roles, memberships, tablespaces) with
/// `pg_dumpall --globals-only`; role passwords (their hashes) only when
/// `include_role_passwords`. Returns the SQL script. Dropping the future
/// kills `pg_dumpall`.
pub async fn dump_globals(
    connection: &ConnectionString,
    include_role_passwords: bool,
    pg_bindir: Option<&Path>,
) -> Result<Vec<u8>, DumpError> {
    let span = tracing::info_span!("dump_globals", include_role_passwords);
    async {
        let tools = PgTools::locate(pg_bindir).await;
        let mut command =
            postgres::pg_dumpall_globals_command(&tools, connection, include_role_passwords)?;
        let output = command.output().await.map_err(|source| DumpError::Spawn {
            program: tools.program("pg_dumpall"),
            cause: source,
        })?;
        if !output.status.success() {
            let stderr = tail_text(&output.stderr, STDERR_TAIL_BYTES);
            tracing::debug!(status = %output.status, stderr = %stderr, "pg_dumpall failed");
            return Err(DumpError::PgDump {
                program: "pg_dumpall",
                status: output.status,
                stderr,
            });
        }
        tracing::info!(bytes = output.stdout.len(), "pg_dumpall finished");
        Ok(output.stdout)
    }
    .instrument(span)
    .await
}

/// PostgreSQL refuses an empty database name, and no command line can hold
/// a NUL; anything else is passed quoted.
fn check_database_name(database: &str) -> Result<(), DumpError> {
    if database.is_empty() {
        return Err(DumpError::InvalidDatabase("it is empty"));
    }
    if database.contains('\0') {
        return Err(DumpError::InvalidDatabase("it contains a NUL character"));
    }
    Ok(())
}

/// The first line of `<program> --version`.
async fn tool_version(tools: &PgTools, program: &'static str) -> Result<String, DumpError> {
    let output = postgres::tool_version_command(tools, program)
        .output()
        .await
        .map_err(|source| DumpError::Spawn {
            program: tools.program(program),
            cause: source,
        })?;
    if !output.status.success() {
        return Err(DumpError::PgDump {
            program,
            status: output.status,
            stderr: tail_text(&output.stderr, STDERR_TAIL_BYTES),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout.lines().next().unwrap_or_default().trim().to_string())
}

/// Kills the child if it still runs, and reaps it.
async fn stop(child: &mut Child) {
    if let Err(error) = child.start_kill() {
        // It already exited: nothing to kill, only to reap.
        tracing::debug!(%error, "killing pg_dump");
    }
    if let Err(error) = child.wait().await {
        tracing::warn!(%error, "waiting for the killed pg_dump");
    }
}

#[derive(Debug)]
struct Totals {
    bytes: u64,
    chunks: u64,
    rows: Result<ArchiveSummary, String>,
}

/// How many chunks are packed at once.
fn packing_in_flight() -> usize {
    std::thread::available_parallelism()
        .map_or(2, NonZeroUsize::get)
        .clamp(2, MAX_PACKING_IN_FLIGHT)
}

/// Reads `source` to its end: cuts it, packs the chunks on the blocking
/// pool (a few at once) and sends them in order. While a send waits, nothing
/// is read.
async fn pump(
    source: impl AsyncRead + Unpin,
    request: &DumpRequest,
    chunks: &mpsc::Sender<PackedChunk>,
    progress: &watch::Sender<DumpProgress>,
) -> Result<Totals, DumpError> {
    let zstd_level = request.zstd_level;
    let reader = CountingReader {
        inner: source,
        read: 0,
        progress,
    };
    let mut chunker =
        AsyncStreamCDC::new(reader, CHUNK_MIN_BYTES, CHUNK_AVG_BYTES, CHUNK_MAX_BYTES);
    let packed = chunker
        .as_stream()
        .map(|cut| async move {
            let chunk = cut.map_err(chunker_error)?;
            let packing = tokio::task::spawn_blocking(move || {
                pack_chunk(&chunk.data, zstd_level).map(|packed| (packed, chunk.data))
            });
            match packing.await {
                Ok(packed) => packed.map_err(DumpError::Pack),
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                // The runtime is shutting down.
                Err(_) => Err(DumpError::Cancelled),
            }
        })
        .buffered(packing_in_flight());
    let mut packed = pin!(packed);
    let mut bytes = 0;
    let mut count = 0;
    // Counting the rows of the archive as it goes by: in order, on this
    // task (a newline count, far cheaper than packing).
    let mut scanner = Ok(ArchiveScanner::new());
    while let Some(chunk) = packed.next().await {
        let (chunk, plaintext) = chunk?;
        if let Ok(reading) = &mut scanner
            && let Err(error) = reading.feed(&plaintext)
        {
            tracing::warn!(%error, "cannot count the rows of this dump");
            scanner = Err(error.to_string());
        }
        drop(plaintext);
        bytes += chunk.plaintext_len as u64;
        count += 1;
        chunks
            .send(chunk)
            .await
            .map_err(|_| DumpError::ReceiverClosed)?;
        progress.send_modify(|p| p.chunks = count);
    }
    let rows = scanner.and_then(|reading| reading.finish().map_err(|e| e.to_string()));
    Ok(Totals {
        bytes,
        chunks: count,
        rows,
    })
}

fn chunker_error(error: fastcdc::v2020::Error) -> DumpError {
    let source = match error {
        fastcdc::v2020::Error::IoError(error) => error,
        other => io::Error::other(other.to_string()),
    };
    DumpError::Io {
        context: "reading pg_dump's output",
        cause: source,
    }
}

/// Counts what is read through it into [`DumpProgress::bytes_read`].
struct CountingReader<'a, R> {
    inner: R,
    read: u64,
    progress: &'a watch::Sender<DumpProgress>,
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let added = buf.filled().len().saturating_sub(before);
        if added > 0 {
            this.read += added as u64;
            let read = this.read;
            this.progress.send_modify(|p| p.bytes_read = read);
        }
        poll
    }
}

/// Reads `source` to its end, keeping the last `limit` bytes, as text.
pub(crate) async fn read_tail(mut source: impl AsyncRead + Unpin, limit: usize) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut dropped = false;
    let mut buffer = vec![0u8; 8 * 1024];
    loop {
        match source.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(&buffer[..n]);
                if kept.len() > 2 * limit {
                    kept.drain(..kept.len() - limit);
                    dropped = true;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::debug!(%error, "reading pg_dump's stderr");
                break;
            }
        }
    }
    let text = tail_text(&kept, limit);
    if dropped && !text.starts_with('…') {
        format!("…{text}")
    } else {
        text
    }
}

/// The last `limit` bytes of `bytes` as text, trimmed; `…` first when cut.
fn tail_text(bytes: &[u8], limit: usize) -> String {
    let start = bytes.len().saturating_sub(limit);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let text = text.trim();
    if start > 0 {
        format!("…{text}")
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stderr_keeps_its_end() {
        let text = format!("{}the end\n", "x".repeat(200_000));
        let tail = read_tail(text.as_bytes(), 1000).await;
        assert!(tail.starts_with('…'), "{}", &tail[..10]);
        assert!(tail.ends_with("the end"));
        assert!(tail.len() <= 1000 + '…'.len_utf8());
        assert_eq!(read_tail(&b"  short \n"[..], 1000).await, "short");
    }

    #[test]
    fn database_names_are_checked() {
        assert!(check_database_name("it's a \"db\" ü").is_ok());
        assert!(matches!(
            check_database_name(""),
            Err(DumpError::InvalidDatabase(_))
        ));
        assert!(matches!(
            check_database_name("a\0b"),
            Err(DumpError::InvalidDatabase(_))
        ));
    }

    #[tokio::test]
    async fn a_missing_pg_dump_says_how_to_fix_it() {
        let request = DumpRequest {
            connection: ConnectionString::parse("host=/tmp user=postgres").unwrap(),
            database: "db".into(),
            zstd_level: 1,
            pg_bindir: Some(PathBuf::from("/nonexistent/bin")),
        };
        let (tx, _rx) = mpsc::channel(1);
        let (progress, _) = watch::channel(DumpProgress::default());
        let error = dump(&request, tx, progress, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(error, DumpError::Spawn { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("/nonexistent/bin/pg_dump"), "{message}");
        assert!(message.contains("postgresql-client"), "{message}");
    }

    #[tokio::test]
    async fn chunks_come_out_in_order_and_reassemble() {
        // Deterministic pseudo-random hex text (compressible, as dumps
        // are): several chunks' worth.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut data = Vec::new();
        while data.len() < 8 * 1024 * 1024 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(format!("{state:016x}\n").as_bytes());
        }
        let request = DumpRequest {
            connection: ConnectionString::parse("host=/tmp user=postgres").unwrap(),
            database: "db".into(),
            zstd_level: 1,
            pg_bindir: None,
        };
        let (tx, mut rx) = mpsc::channel(1);
        let (progress, progress_rx) = watch::channel(DumpProgress::default());
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(chunk) = rx.recv().await {
                got.push(chunk);
            }
            got
        });
        let totals = pump(&data[..], &request, &tx, &progress).await.unwrap();
        drop(tx);
        let got = receiver.await.unwrap();
        assert!(got.len() >= 2, "{}", got.len());
        assert_eq!(totals.chunks, got.len() as u64);
        assert_eq!(totals.bytes, data.len() as u64);
        let count = got.len() as u64;
        let mut whole = Vec::new();
        for chunk in got {
            let PackedChunk {
                hash,
                plaintext_len,
                compression,
                payload,
            } = chunk;
            whole.extend(
                cairn_common::chunk::unpack_chunk(
                    &hash,
                    plaintext_len as u64,
                    compression,
                    &payload,
                    CHUNK_MAX_BYTES,
                )
                .unwrap(),
            );
        }
        assert!(whole == data);
        assert_eq!(
            *progress_rx.borrow(),
            DumpProgress {
                bytes_read: data.len() as u64,
                chunks: count
            }
        );
    }
}
