//! `pg_restore` fed the opened chunks, in order: streamed into its stdin
//! (one job), or spooled to a file first for `--jobs` above 1 (a parallel
//! restore must seek in its archive).
//!
//! ```text
//! DownloadBackup ──► unpack_chunk ×4 ──► scanner (rows, TOC) ──► pg_restore stdin
//!                    (blocking pool,                        └─► or spool file (0600)
//!                     order kept)                                then pg_restore --jobs N FILE
//! ```
//!
//! Writing waits for `pg_restore` to read, so a slow restore slows the
//! download (and the coordinator's repository reads) instead of filling
//! memory. A chunk that fails to open stops the restore before any of its
//! bytes are written. `pg_restore`'s stderr is read on its own task (the
//! end of it is kept): its message is the error when it fails.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use cairn_common::archive::{ArchiveScanner, ArchiveSummary};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tracing::Instrument;

use super::RestoreError;
use super::download::{Chunks, OpenedChunk};
use super::request::Request;
use crate::dump::{STDERR_TAIL_BYTES, read_tail};
use crate::postgres::{self, ConnectionString, PgRestoreOptions, PgTools};
use crate::spool;

/// Writes to `pg_restore` go in slices of this size (the bytes it took
/// before closing its input early are counted).
const WRITE_SLICE_BYTES: usize = 256 * 1024;

/// How long an error message taken from `pg_restore`'s stderr may be.
const MESSAGE_MAX_BYTES: usize = 2000;

/// The dump read so far, and how to read the rest.
pub(super) struct Archive<'a> {
    /// Dump chunks read (and fed to the scanner) before `pg_restore`
    /// started: the table of contents had to be read first.
    pub prefix: Vec<Vec<u8>>,
    pub rest: Chunks<'a>,
    /// Counts the rows as the dump goes by; `Err` once it could not.
    pub scanner: Result<ArchiveScanner, String>,
    /// How many chunks and bytes the backup's manifest records (0: not
    /// known, not checked).
    pub expected_chunks: u64,
    pub expected_bytes: u64,
}

/// What a run of `pg_restore` did.
#[derive(Debug)]
pub(super) struct Restored {
    /// Bytes written to `pg_restore` (or the spool file).
    pub bytes_restored: u64,
    /// What `pg_restore` printed although it succeeded.
    pub stderr: String,
    /// The rows of every table in the archive, or why not counted.
    pub summary: Result<ArchiveSummary, String>,
}

/// Where `pg_restore` runs, and how.
pub(super) struct Run<'a> {
    pub tools: &'a PgTools,
    pub connection: &'a ConnectionString,
    pub database: &'a str,
    pub options: PgRestoreOptions,
    /// Whether every chunk must be read and checked even when `pg_restore`
    /// stops reading early (it does when a partial restore has what it
    /// needs): a full restore checks the whole backup before it is swapped
    /// into place.
    pub read_everything: bool,
}

/// A file removed when dropped, whatever happened.
#[derive(Debug)]
pub(super) struct TempFile(PathBuf);

impl TempFile {
    /// Creates `name` in `dir`, 0600, failing if it exists; `dir` must be
    /// private to the agent (created 0700 if missing): [`spool`]. In there
    /// no other user can replace the file before `pg_restore` reopens it.
    pub async fn create(dir: &Path, name: &str) -> io::Result<(TempFile, tokio::fs::File)> {
        spool::ensure_private(dir)
            .map_err(|message| io::Error::new(io::ErrorKind::PermissionDenied, message))?;
        let path = dir.join(name);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await?;
        Ok((TempFile(path), file))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.0.display(), %error, "cannot remove a restore's file");
            }
        }
    }
}

/// Streams the archive into `pg_restore`'s stdin.
pub(super) async fn streamed(
    run: Run<'_>,
    mut archive: Archive<'_>,
) -> Result<Restored, RestoreError> {
    let mut options = run.options.clone();
    options.archive = None;
    options.jobs = 1;
    let mut child = spawn(run.tools, run.connection, run.database, &options)?;
    let (Some(stdin), Some(stderr)) = (child.stdin.take(), child.stderr.take()) else {
        stop(&mut child).await;
        return Err(RestoreError::Io {
            context: "pg_restore's input".into(),
            cause: io::Error::other("stdin or stderr is not piped"),
        });
    };
    let stderr_tail = tokio::spawn(read_tail(stderr, STDERR_TAIL_BYTES).in_current_span());
    let mut sink = Sink::Pipe(stdin);
    let pumped = pump(&mut archive, &mut sink).await;
    // End of input (or the pipe is gone already).
    drop(sink);
    let mut pumped = match pumped {
        Ok(pumped) => pumped,
        Err(error) => {
            stop(&mut child).await;
            stderr_tail.abort();
            return Err(error);
        }
    };
    let status = child.wait().await.map_err(|source| RestoreError::Io {
        context: "waiting for pg_restore".into(),
        cause: source,
    })?;
    let stderr = stderr_tail.await.unwrap_or_default();
    check_exit(status, &stderr)?;
    if pumped.closed_early {
        tracing::info!(
            bytes = pumped.bytes_written,
            "pg_restore finished before the end of the archive"
        );
        if run.read_everything {
            drain(&mut archive, &mut pumped).await?;
        }
    }
    Ok(Restored {
        bytes_restored: pumped.bytes_written,
        stderr,
        summary: finish(archive.scanner),
    })
}

/// Writes the archive to a spool file in `spool_dir`, then runs
/// `pg_restore --jobs N` on it. The file is removed before this returns.
pub(super) async fn spooled(
    run: Run<'_>,
    mut archive: Archive<'_>,
    spool_dir: &Path,
    file_name: &str,
) -> Result<Restored, RestoreError> {
    let (spool, file) = TempFile::create(spool_dir, file_name)
        .await
        .map_err(|source| RestoreError::Io {
            context: format!("cannot create the spool file in {}", spool_dir.display()),
            cause: source,
        })?;
    tracing::info!(path = %spool.path().display(), "spooling the dump for a parallel restore");
    let mut sink = Sink::File(file);
    let pumped = pump(&mut archive, &mut sink).await?;
    if let Sink::File(mut file) = sink {
        file.flush().await.map_err(|source| RestoreError::Io {
            context: format!("writing {}", spool.path().display()),
            cause: source,
        })?;
    }
    // pg_dump wrote into a pipe, so its table of contents has no data
    // offsets; the spooled copy gets them, as pg_dump writes them into a
    // file, so that each parallel worker seeks to its table's data.
    if let Ok(scanner) = &archive.scanner
        && let Some((offset_size, offsets)) = scanner.data_offsets()
    {
        let path = spool.path().to_path_buf();
        let written =
            tokio::task::spawn_blocking(move || write_data_offsets(&path, offset_size, &offsets))
                .await
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|result| result);
        if let Err(error) = written {
            // Correct without them, only slower.
            tracing::warn!(%error, "cannot write the data offsets into the spooled archive");
        }
    }
    let mut options = run.options.clone();
    options.archive = Some(spool.path().to_path_buf());
    let mut child = spawn(run.tools, run.connection, run.database, &options)?;
    let Some(stderr) = child.stderr.take() else {
        stop(&mut child).await;
        return Err(RestoreError::Io {
            context: "pg_restore's output".into(),
            cause: io::Error::other("stderr is not piped"),
        });
    };
    let stderr = read_tail(stderr, STDERR_TAIL_BYTES).await;
    let status = child.wait().await.map_err(|source| RestoreError::Io {
        context: "waiting for pg_restore".into(),
        cause: source,
    })?;
    drop(spool);
    check_exit(status, &stderr)?;
    Ok(Restored {
        bytes_restored: pumped.bytes_written,
        stderr,
        summary: finish(archive.scanner),
    })
}

/// `K_OFFSET_POS_SET` of `pg_backup_archiver.h`: the offset that follows
/// is where the entry's data block begins.
const OFFSET_POS_SET: u8 = 2;

/// Fills in each entry's data offset (flag byte, then `offset_size` bytes,
/// least significant first) in an archive file.
fn write_data_offsets(path: &Path, offset_size: usize, offsets: &[(u64, u64)]) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    for (field, block) in offsets {
        let mut bytes = vec![OFFSET_POS_SET];
        let value = block.to_le_bytes();
        bytes.extend((0..offset_size).map(|i| value.get(i).copied().unwrap_or(0)));
        file.seek(SeekFrom::Start(*field))?;
        file.write_all(&bytes)?;
    }
    file.flush()
}

fn spawn(
    tools: &PgTools,
    connection: &ConnectionString,
    database: &str,
    options: &PgRestoreOptions,
) -> Result<Child, RestoreError> {
    let mut command = postgres::pg_restore_command(tools, connection, database, options)?;
    let child = command.spawn().map_err(|source| RestoreError::Spawn {
        program: tools.program("pg_restore"),
        cause: source,
    })?;
    tracing::info!(
        pid = child.id(),
        jobs = options.jobs.max(1),
        "pg_restore started"
    );
    Ok(child)
}

fn check_exit(status: ExitStatus, stderr: &str) -> Result<(), RestoreError> {
    if status.success() {
        return Ok(());
    }
    tracing::debug!(%status, stderr, "pg_restore failed");
    Err(RestoreError::PgRestore {
        status,
        message: one_line(stderr),
    })
}

/// `pg_restore`'s stderr on one line, from its first error (with
/// `--exit-on-error`, the one that stopped it).
pub(super) fn one_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    if lines.is_empty() {
        return "no message".into();
    }
    let first_error = lines
        .iter()
        .position(|line| line.contains("error:"))
        .unwrap_or(0);
    let text = lines[first_error..].join(" ");
    if text.len() <= MESSAGE_MAX_BYTES {
        return text;
    }
    let mut end = MESSAGE_MAX_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Kills the child if it still runs, and reaps it.
async fn stop(child: &mut Child) {
    if let Err(error) = child.start_kill() {
        tracing::debug!(%error, "killing pg_restore");
    }
    if let Err(error) = child.wait().await {
        tracing::warn!(%error, "waiting for the killed pg_restore");
    }
}

fn finish(scanner: Result<ArchiveScanner, String>) -> Result<ArchiveSummary, String> {
    scanner.and_then(|scanner| scanner.finish().map_err(|error| error.to_string()))
}

enum Sink {
    Pipe(ChildStdin),
    File(tokio::fs::File),
}

struct Pumped {
    bytes_written: u64,
    /// `pg_restore` closed its input before the end of the archive.
    closed_early: bool,
    /// Dump chunks, and their bytes, read so far (prefix included).
    chunks_read: u64,
    bytes_read: u64,
}

/// Writes the prefix, then every further chunk, to `sink`, feeding the
/// scanner. Stops early, without an error, when `pg_restore` closes its
/// input; then the caller learns from its exit status why.
async fn pump(archive: &mut Archive<'_>, sink: &mut Sink) -> Result<Pumped, RestoreError> {
    let mut pumped = Pumped {
        bytes_written: 0,
        closed_early: false,
        chunks_read: archive.prefix.len() as u64,
        bytes_read: archive.prefix.iter().map(|c| c.len() as u64).sum(),
    };
    for piece in std::mem::take(&mut archive.prefix) {
        if !write(sink, &piece, &mut pumped.bytes_written).await? {
            pumped.closed_early = true;
            return Ok(pumped);
        }
    }
    while let Some(chunk) = archive.rest.next().await {
        let chunk = chunk?;
        pumped.chunks_read += 1;
        pumped.bytes_read += chunk.plaintext.len() as u64;
        scan(&mut archive.scanner, &chunk);
        if !write(sink, &chunk.plaintext, &mut pumped.bytes_written).await? {
            pumped.closed_early = true;
            return Ok(pumped);
        }
    }
    check_complete(archive, &pumped)?;
    Ok(pumped)
}

/// Reads and checks the rest of the archive, which `pg_restore` did not
/// want, and then that it was all there.
async fn drain(archive: &mut Archive<'_>, pumped: &mut Pumped) -> Result<(), RestoreError> {
    while let Some(chunk) = archive.rest.next().await {
        let chunk = chunk?;
        pumped.chunks_read += 1;
        pumped.bytes_read += chunk.plaintext.len() as u64;
        scan(&mut archive.scanner, &chunk);
    }
    check_complete(archive, pumped)
}

fn scan(scanner: &mut Result<ArchiveScanner, String>, chunk: &OpenedChunk) {
    if let Ok(reading) = scanner
        && let Err(error) = reading.feed(&chunk.plaintext)
    {
        tracing::warn!(%error, "cannot count the rows of this dump");
        *scanner = Err(error.to_string());
    }
}

/// The whole dump came: as many chunks and bytes as the manifest records.
fn check_complete(archive: &Archive<'_>, pumped: &Pumped) -> Result<(), RestoreError> {
    let (chunks, bytes) = (pumped.chunks_read, pumped.bytes_read);
    if archive.expected_chunks > 0 && chunks != archive.expected_chunks {
        return Err(RestoreError::Download(format!(
            "the download ended after {chunks} of {} chunks",
            archive.expected_chunks
        )));
    }
    if archive.expected_bytes > 0 && bytes != archive.expected_bytes {
        return Err(RestoreError::Download(format!(
            "the dump's chunks hold {bytes} bytes, but the backup records {}",
            archive.expected_bytes
        )));
    }
    Ok(())
}

/// Writes all of `bytes`, a slice at a time so that what a closed pipe
/// took is counted; false when `pg_restore` closed its input.
async fn write(sink: &mut Sink, bytes: &[u8], written: &mut u64) -> Result<bool, RestoreError> {
    for slice in bytes.chunks(WRITE_SLICE_BYTES) {
        let result = match sink {
            Sink::Pipe(stdin) => stdin.write_all(slice).await,
            Sink::File(file) => file.write_all(slice).await,
        };
        match result {
            Ok(()) => *written += slice.len() as u64,
            Err(error)
                if error.kind() == io::ErrorKind::BrokenPipe && matches!(sink, Sink::Pipe(_)) =>
            {
                return Ok(false);
            }
            Err(source) => {
                return Err(RestoreError::Io {
                    context: match sink {
                        Sink::Pipe(_) => "writing to pg_restore".into(),
                        Sink::File(_) => "writing the spool file".into(),
                    },
                    cause: source,
                });
            }
        }
    }
    Ok(true)
}

/// Writes a partial restore's `--use-list` file in the spool directory.
pub(super) async fn write_list_file(
    request: &Request,
    list: &str,
) -> Result<TempFile, RestoreError> {
    let name = format!("{}.list", request.file_stem);
    let io_error = |source| RestoreError::Io {
        context: format!(
            "cannot write pg_restore's list of entries in {} (spool_dir)",
            request.spool_dir.display()
        ),
        cause: source,
    };
    let (file, mut writer) = TempFile::create(&request.spool_dir, &name)
        .await
        .map_err(io_error)?;
    writer.write_all(list.as_bytes()).await.map_err(io_error)?;
    writer.flush().await.map_err(io_error)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_restore_errors_read_on_one_line_from_the_first_error() {
        let stderr = "pg_restore: warning: something harmless\n\
                      pg_restore: error: could not execute query: ERROR:  relation \"t\" already exists\n\
                      Command was: CREATE TABLE public.t (\n    id integer\n);\n\n";
        assert_eq!(
            one_line(stderr),
            "pg_restore: error: could not execute query: ERROR:  relation \"t\" already exists \
             Command was: CREATE TABLE public.t ( id integer );"
        );
        assert_eq!(one_line("  \n"), "no message");
        assert_eq!(one_line("just this\n"), "just this");
        let long = format!("pg_restore: error: {}", "ü".repeat(3000));
        let line = one_line(&long);
        assert!(line.ends_with('…'));
        assert!(line.len() <= MESSAGE_MAX_BYTES + '…'.len_utf8());
    }

    #[tokio::test]
    async fn temp_files_are_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (temp, mut file) = TempFile::create(&spool_dir, "x.dump").await.unwrap();
        file.write_all(b"data").await.unwrap();
        let mode = std::fs::metadata(temp.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&spool_dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(
            TempFile::create(&spool_dir, "x.dump").await.is_err(),
            "never reused"
        );
        let path = temp.path().to_path_buf();
        drop(temp);
        assert!(!path.exists());
    }
}
