//! Executes a restore command: a backup's chunks from the coordinator
//! (`DownloadBackup`; the coordinator authenticated and decrypted each),
//! each decompressed and re-hashed against the chunk list before any of
//! its bytes reach `pg_restore` ([`download`], [`feed`]). A download that
//! breaks (the network, a coordinator restart) resumes from the chunks
//! received while `pg_restore` waits ([`crate::resume`]).
//!
//! Three kinds of job:
//!
//! - **Full restore** (no `--table`/`--schema`): into a staging database
//!   `cairn_restore_<8 hex>`, renamed into place only once `pg_restore`
//!   succeeded. The target is never half-restored: until the swap nothing
//!   has touched it, and the swap is one transaction (the old database
//!   renamed aside to `<target>_previous_<UTC time>`, the staging database
//!   renamed to the target).
//! - **Partial restore** (`--table schema.table`, `--schema name`): the
//!   selected entries ([`selection`]) straight into the existing target, in
//!   one transaction (`pg_restore --single-transaction`).
//! - **Drill**: a full restore into a scratch database `cairn_drill_<8
//!   hex>`, never swapped; every table's rows are counted, then it is
//!   dropped, whatever happened.
//!
//! The safety rules, each refused with a message that names the database
//! and the fix:
//!
//! 1. Never onto a standby (`pg_is_in_recovery()`), nor onto a template
//!    database (`template0`, `template1`, any with `datistemplate`: every
//!    `CREATE DATABASE` would copy the backup), nor (a full restore) onto
//!    the database the agent connects through (it cannot be renamed
//!    aside while in use).
//! 2. Free space in the data directory for 1.2 times the larger of the
//!    database's size at backup and its dump; with `--jobs` above 1, room
//!    for the dump in `spool_dir` too, else the restore streams with one
//!    job (and says so in its warnings). A `spool_dir` other users could
//!    enter or replace is refused ([`crate::spool`]).
//! 3. A full restore does not replace a database that holds relations
//!    unless `--replace`; an existing empty one (nothing but what `CREATE
//!    DATABASE` makes) is swapped out and kept aside, after checking it is
//!    still empty; only `--drop-previous` drops what was set aside.
//! 4. The roles the archive needs (owners, unless `--no-owner`, and the
//!    roles its privileges name) that the target lacks are created from the
//!    backup's globals, unless `--no-roles`; never with SUPERUSER,
//!    REPLICATION, BYPASSRLS or CREATEROLE, nor as members of a superuser
//!    or a `pg_*` role, not even for a moment: the globals' statements are
//!    filtered before they run (`roles`).
//! 5. Whatever fails, or a cancel: `pg_restore` is killed, the staging (or
//!    scratch) database is dropped, the spool file removed, and the target
//!    left as it was.
//! 6. With `--replace`, the target's sessions are terminated (and named in
//!    the report) just before the swap; without it (an empty target), the
//!    swap waits up to 30 s for them to leave.
//! 7. A partial restore refuses to overwrite a table that holds rows
//!    unless `--replace`, and names a table or schema the backup lacks. It
//!    keeps the foreign keys from and to its tables (those of other tables
//!    are dropped and added again in its transaction), and refuses a
//!    target whose tables have keys to them that the backup lacks. A
//!    statement of it that waits 30 s for a lock on the live target is
//!    cancelled (pg_restore sets `lock_timeout = 0` itself), and its single
//!    transaction rolls back.
//!
//! Once `pg_restore` has succeeded the swap is not cancellable: a cancel
//! then would leave the target renamed aside with nothing in its place.

mod checks;
mod download;
mod feed;
mod request;
mod roles;
mod selection;
mod sql;
mod staging;

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::archive::{ArchiveHead, ArchiveSummary};
use cairn_common::proto;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::AgentConfig;
use crate::jobs::{JobEnd, RunningJobs};
use crate::postgres::target::{DatabaseContents, Instance};
use crate::postgres::{PgRestoreOptions, PgTools, PostgresError};
use crate::resume::{Link, StreamError};
use download::Chunks;
use feed::{Archive, Run};
use request::{Mode, Request};

/// PostgreSQL's longest identifier, in bytes.
const IDENTIFIER_MAX_BYTES: usize = 63;
/// How long a swap without `--replace` waits for the sessions on an empty
/// target to end.
const SESSIONS_WAIT: Duration = Duration::from_secs(30);
/// How often a swap with `--replace` terminates the target's sessions and
/// tries again when new ones arrived in between.
const SWAP_ATTEMPTS: u32 = 5;
const SWAP_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How long the disk checks may take (a hung network filesystem).
const STAT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many names a message lists before "...".
const NAMES_SHOWN: usize = 10;

/// What to tell an operator whose host lacks `pg_restore`.
const INSTALL_HINT: &str = "install the PostgreSQL client programs, of the server's major \
    version or newer (Debian/Ubuntu: apt-get install postgresql-client-<major>)";

/// Why a restore stopped. No variant carries a key or a connection string.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A safety rule refused it; the message says which and the fix.
    #[error("{0}")]
    Refused(String),
    /// A chunk did not open or check out.
    #[error("{which} {problem}")]
    Chunk { which: String, problem: String },
    /// The download stream went wrong (ended short, out of order, refused).
    #[error("{0}")]
    Download(String),
    /// The download's connection broke (the network, a coordinator
    /// restart) and did not come back within the resume's limit: another
    /// attempt may succeed.
    #[error("{0}")]
    Interrupted(String),
    /// `pg_restore` ran and failed; its own message.
    #[error("pg_restore failed ({status}): {message}")]
    PgRestore { status: ExitStatus, message: String },
    /// Causes are in the message only (see `cairn_common::error`).
    #[error("cannot run {}: {cause}; {INSTALL_HINT}", program.display())]
    Spawn { program: PathBuf, cause: io::Error },
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },
    /// A cancel command stopped it.
    #[error("the restore was cancelled")]
    Cancelled,
}

impl RestoreError {
    /// The coordinator ended the download with this status.
    /// A break is `Interrupted` (the download resumes), a refusal final.
    fn coordinator(status: &tonic::Status) -> RestoreError {
        StreamError::of(status, "the coordinator stopped the download").into()
    }
}

/// A download that broke and could not resume is interrupted (another
/// attempt may succeed); one the coordinator refused is over.
impl From<StreamError> for RestoreError {
    fn from(error: StreamError) -> Self {
        match error {
            StreamError::Broken(message) => RestoreError::Interrupted(message),
            StreamError::Refused(message) => RestoreError::Download(message),
        }
    }
}

/// What the job has done so far, for the report and for the clean-up.
#[derive(Debug, Default)]
struct State {
    report: proto::RestoreReport,
    /// The agent's own warnings (skipped checks, roles...), reported apart
    /// from pg_restore's words.
    warnings: Vec<String>,
    /// What `pg_restore` printed although it succeeded.
    pg_restore_messages: String,
    /// The staging or scratch database, while it may exist under its own
    /// name: dropped at the end unless swapped into place.
    staging: Option<String>,
}

impl State {
    fn warn(&mut self, warning: String) {
        tracing::warn!(%warning, "restore");
        self.warnings.push(warning);
    }
}

/// How long a partial restore's statements wait for a lock on the live
/// target before the restore fails (and rolls back).
const PARTIAL_RESTORE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a partial restore looks for its statements waiting on locks.
const LOCK_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs one restore (or drill) to its end and reports what it did.
pub async fn run(
    config: &AgentConfig,
    channel: Channel,
    jobs: &Arc<RunningJobs>,
    attempt_id: &str,
    command: proto::RestoreCommand,
) -> Result<proto::RestoreReport, JobEnd> {
    let guard = jobs.register(&command.job_id, attempt_id)?;
    let started = Instant::now();
    let request = Request::new(config, command)?;
    tracing::info!(
        mode = ?request.mode,
        target = %request.target,
        staging = %request.staging,
        jobs = request.jobs,
        "restore started"
    );
    let instance = Instance::connect(&request.connection, &[&request.target, &request.staging])
        .await
        .map_err(|error| JobEnd::Failed(error.to_string()))?;
    let mut state = State::default();
    // Said, not dropped: another agent of this instance may be restoring
    // into one of them right now.
    match instance.leftover_staging_databases(&request.staging).await {
        Ok(leftovers) if !leftovers.is_empty() => state.warn(format!(
            "staging databases of earlier restores that did not finish are still here: {}; \
             drop them once no restore runs on this instance",
            leftovers.join(", ")
        )),
        Ok(_) => {}
        Err(error) => tracing::debug!(%error, "cannot look for leftover staging databases"),
    }
    let (job_id, attempt) = (request.job_id.clone(), attempt_id.to_string());
    let download = download::Redownload::new(
        Link::new(jobs, channel, guard.token.clone()),
        Box::new(move |channel, from_chunk| {
            Box::pin(download::open(
                channel,
                job_id.clone(),
                attempt.clone(),
                from_chunk,
            ))
        }),
    );
    let outcome = execute(&request, &instance, &mut state, download, &guard.token).await;
    let left_behind = staging::clean_up(&request, &instance, &mut state).await;
    let and_left_behind = left_behind
        .as_ref()
        .map(|problem| format!("; {problem}"))
        .unwrap_or_default();
    match outcome {
        Ok(()) => {
            let mut report = state.report;
            report.restore_millis =
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let mut warnings = state.warnings;
            warnings.extend(left_behind);
            report.warnings = warnings.join("\n");
            report.pg_restore_messages = state.pg_restore_messages;
            tracing::info!(
                database = %report.database,
                bytes = report.bytes_restored,
                millis = report.restore_millis,
                "restore finished"
            );
            Ok(report)
        }
        Err(RestoreError::Cancelled) => {
            let detail = match request.mode {
                Mode::Full => format!(
                    "the restore was stopped before anything was renamed: database {:?} is \
                     untouched and no staging database is left{and_left_behind}",
                    request.target
                ),
                Mode::Partial => format!(
                    "the restore was stopped: nothing was committed to database {:?}{and_left_behind}",
                    request.target
                ),
                Mode::Drill => {
                    format!("the drill was stopped; no scratch database is left{and_left_behind}")
                }
            };
            tracing::info!(%detail, "restore cancelled");
            Err(JobEnd::Cancelled(detail))
        }
        Err(error) => {
            let mut message = error.to_string();
            if matches!(
                error,
                RestoreError::Chunk { .. }
                    | RestoreError::Download(_)
                    | RestoreError::Interrupted(_)
            ) {
                message.push_str(&format!("; {}", request.untouched()));
            }
            message.push_str(&and_left_behind);
            tracing::warn!(error = %message, "restore failed");
            if matches!(error, RestoreError::Interrupted(_)) {
                Err(JobEnd::Interrupted(message))
            } else {
                Err(JobEnd::Failed(message))
            }
        }
    }
}

/// The job's work; its clean-up is [`staging::clean_up`]'s.
async fn execute(
    request: &Request,
    instance: &Instance,
    state: &mut State,
    download: download::Redownload,
    cancel: &CancellationToken,
) -> Result<(), RestoreError> {
    let restored = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(RestoreError::Cancelled),
        restored = check_and_restore(request, instance, state, download) => restored?,
    };
    match request.mode {
        // Not cancellable: see the module documentation.
        Mode::Full => staging::swap_into_place(request, instance, state, &restored).await,
        Mode::Drill => tokio::select! {
            biased;
            () = cancel.cancelled() => Err(RestoreError::Cancelled),
            counted = staging::count_rows(request, state, &restored) => counted,
        },
        Mode::Partial => {
            state.report.database = request.target.clone();
            Ok(())
        }
    }
}

/// What `pg_restore` left, for the swap or the drill's count.
#[derive(Debug)]
struct Restored {
    head: Option<ArchiveHead>,
    summary: Result<ArchiveSummary, String>,
    /// The target as it was before (full restores).
    target: Option<DatabaseContents>,
}

/// The checks, the download up to the archive's table of contents, the
/// roles, the staging database and `pg_restore`.
async fn check_and_restore(
    request: &Request,
    instance: &Instance,
    state: &mut State,
    mut download: download::Redownload,
) -> Result<Restored, RestoreError> {
    if instance.in_recovery().await? {
        return Err(RestoreError::Refused(format!(
            "instance {} is a standby (in recovery); restore onto its primary",
            request.instance
        )));
    }
    let target = checks::check_target(request, instance).await?;
    let spool = checks::check_space(request, instance, state).await?;

    let messages = download.first().await?;
    let mut chunks: Chunks<'_> = Box::pin(download::opened_chunks(
        messages,
        download,
        request.chunk_count,
    ));
    let beginning = download::read_beginning(&mut chunks).await?;
    let head = match &beginning.scanner {
        Ok(scanner) => scanner.head().cloned(),
        Err(_) => None,
    };
    if let Err(error) = &beginning.scanner {
        if request.mode == Mode::Partial {
            return Err(RestoreError::Refused(format!(
                "cannot read the backup's table of contents ({error}), which a partial restore \
                 needs; restore the whole backup under another name instead"
            )));
        }
        state.warn(format!(
            "cannot read the backup's table of contents ({error}): no roles were created and \
             no rows counted"
        ));
    }

    // A partial restore's list of entries, while pg_restore runs.
    let mut list_file = None;
    let mut options = PgRestoreOptions {
        no_owner: request.no_owner,
        ..Default::default()
    };
    let database = match (request.mode, &head) {
        (Mode::Partial, Some(head)) => {
            let selection = checks::select_entries(request, head).await?;
            let list = feed::write_list_file(request, &selection.list_file(head)).await?;
            options.list = Some(list.path().to_path_buf());
            options.single_transaction = true;
            // Everything selected is dropped first: the tables the checks
            // let through are empty, or --replace was given.
            options.clean = true;
            // Named, so the lock watcher below finds its session.
            options.application_name = Some(request.staging.clone());
            list_file = Some(list);
            request.target.clone()
        }
        (Mode::Partial, None) => {
            return Err(RestoreError::Refused(
                "the backup's table of contents could not be read".into(),
            ));
        }
        (Mode::Full | Mode::Drill, _) => request.staging.clone(),
    };
    if let Some(head) = &head {
        roles::create_roles(request, instance, state, beginning.globals.as_deref(), head).await?;
    }
    if request.mode != Mode::Partial {
        staging::create_staging(request, instance, state, head.as_ref()).await?;
    }

    let tools = PgTools::locate(None).await;
    let archive = Archive {
        prefix: beginning.prefix,
        rest: chunks,
        scanner: beginning.scanner,
        expected_chunks: request.chunk_count,
        expected_bytes: request.dump_bytes,
    };
    let mut run = Run {
        tools: &tools,
        connection: &request.connection,
        database: &database,
        options,
        read_everything: request.mode != Mode::Partial,
    };
    let restored = if spool {
        run.options.jobs = request.jobs;
        let file_name = format!("{}.dump", request.file_stem);
        state.report.spooled = true;
        feed::spooled(run, archive, &request.spool_dir, &file_name).await?
    } else if request.mode == Mode::Partial {
        // Into a live database, pg_restore sets lock_timeout = 0: a DROP
        // queued behind a long transaction would stall every query on that
        // table. A statement that waits longer than the limit is cancelled;
        // pg_restore stops and its single transaction rolls back.
        let timed_out = std::sync::atomic::AtomicBool::new(false);
        let watching = watch_locks(instance, &request.staging, &timed_out);
        tokio::select! {
            restored = feed::streamed(run, archive) => match restored {
                Err(_) if timed_out.load(std::sync::atomic::Ordering::Acquire) => {
                    return Err(RestoreError::Refused(format!(
                        "a statement of the restore waited more than {}s for a lock in database \
                         {:?} (a transaction there holds it); it was cancelled and nothing was \
                         committed: try again once that transaction ends",
                        PARTIAL_RESTORE_LOCK_TIMEOUT.as_secs(),
                        request.target
                    )));
                }
                other => other?,
            },
            () = watching => unreachable_watch()?,
        }
    } else {
        feed::streamed(run, archive).await?
    };
    drop(list_file);
    state.report.bytes_restored = restored.bytes_restored;
    if !restored.stderr.is_empty() {
        tracing::warn!(stderr = %restored.stderr, "pg_restore succeeded with messages");
        state.pg_restore_messages = restored.stderr;
    }
    tracing::info!(bytes = restored.bytes_restored, database = %database, "pg_restore finished");
    Ok(Restored {
        head,
        summary: restored.summary,
        target,
    })
}

/// Cancels the statement of a session named `application_name` once it has
/// waited longer than [`PARTIAL_RESTORE_LOCK_TIMEOUT`] for a lock, and
/// notes it in `timed_out`. Runs until dropped.
async fn watch_locks(
    instance: &Instance,
    application_name: &str,
    timed_out: &std::sync::atomic::AtomicBool,
) {
    loop {
        tokio::time::sleep(LOCK_WATCH_INTERVAL).await;
        match instance
            .lock_waiters(application_name, PARTIAL_RESTORE_LOCK_TIMEOUT)
            .await
        {
            Ok(pids) => {
                for pid in pids {
                    tracing::warn!(
                        pid,
                        "a restore statement waited too long for a lock: cancelling it"
                    );
                    timed_out.store(true, std::sync::atomic::Ordering::Release);
                    if let Err(error) = instance.cancel_backend(pid).await {
                        tracing::warn!(%error, pid, "cannot cancel the waiting statement");
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot look for waiting restore statements"),
        }
    }
}

/// [`watch_locks`] never returns.
fn unreachable_watch() -> Result<feed::Restored, RestoreError> {
    Err(RestoreError::Refused(
        "the lock watcher stopped before pg_restore".into(),
    ))
}

/// Like `1.5 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `a, b, c` or `a, b, ... (25 in all)`.
fn list_names(names: &[String]) -> String {
    if names.len() <= NAMES_SHOWN {
        return names.join(", ");
    }
    format!(
        "{}, ... ({} in all)",
        names[..NAMES_SHOWN].join(", "),
        names.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_lists_read_well() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        let names: Vec<String> = (1..=12).map(|i| format!("t{i}")).collect();
        assert_eq!(list_names(&names[..2]), "t1, t2");
        assert_eq!(
            list_names(&names),
            "t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, ... (12 in all)"
        );
    }
}
