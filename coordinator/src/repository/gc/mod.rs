//! `cairn repository gc`: deletes the chunks no backup needs, in two
//! phases, so that a collection running beside backups loses nothing.
//!
//! - **Mark** (`mark`): a chunk is needed if a complete backup references
//!   it (the catalog's reference index `backup_chunks`), if a manifest in
//!   the repository that the index does not cover names it (a backup
//!   completing, or not indexed yet: read and authenticated, its chunks
//!   pinned in the catalog's scratch table `gc_pins`), or if an upload
//!   still running recorded it (`upload_chunks` of running attempts).
//! - **Sweep** (`sweep`): the storage listing of `chunks/` is merged with
//!   the sorted references (constant memory); each unreferenced chunk is
//!   looked up a page at a time. One neither stored nor reused since the
//!   cutoff is **condemned** (`condemned_at`); one condemned by an earlier
//!   run and still unneeded is **deleted**: its row marked `deleting`
//!   first, then the object, then the row. An object without a row older
//!   than the cutoff (a crash between an upload's put and its catalog row)
//!   is an **orphan**, claimed with a `deleting` row and deleted alike.
//!
//! The cutoff is the older of `now − grace` and the start of the oldest
//! running backup attempt: whatever an upload stored or reused since it
//! began is left alone. Each step is a conditional update that checks
//! again, inside its transaction, that nothing needs the chunk, so the
//! walk's view going stale costs nothing. A dedup hit or a new backup's
//! reference clears `condemned_at` in the transaction that records it
//! (`Catalog::stored_chunks`, `Catalog::complete_backup`), so a revival
//! that wins the race keeps the chunk; one that loses finds the chunk
//! gone from the index and the agent sends it again. An upload storing a
//! chunk whose older copy is being deleted waits for the deletion, then
//! puts it again (`jobs/upload`).
//!
//! "A later run" is all the second phase asks: a chunk is deleted by the
//! first run that starts after the one that condemned it, so with the
//! daily run a chunk lives at least `grace` unused plus a day condemned.
//! One collection runs at a time (the `gc_lease` row, claimed
//! conditionally and renewed per page, so a dead holder's lease expires).
//! `--dry-run` writes no chunk row or object and says what would happen.

mod mark;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::repository::Repository;

/// How long a lease lasts unless renewed; a run renews it each page.
pub const LEASE: Duration = Duration::from_secs(300);
/// The default grace: a chunk unused for less is never condemned.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How a collection runs.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    pub grace: Duration,
    pub dry_run: bool,
}

/// Chunks and their sealed bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub chunks: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.chunks += 1;
        self.bytes += bytes;
    }
}

/// What a collection did (or, dry, would do).
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub repository: String,
    pub dry_run: bool,
    pub grace_ms: u64,
    /// Nothing stored or reused since then was condemned (ms since the
    /// epoch).
    pub cutoff_ms: i64,
    /// Chunk objects listed.
    pub stored_chunks: u64,
    /// Stored chunks a complete backup references.
    pub referenced_chunks: u64,
    /// Unreferenced chunks a running upload or an unindexed manifest needs.
    pub pinned_chunks: u64,
    /// Manifests read because the reference index does not cover them.
    pub manifests_read: u64,
    /// Unreferenced chunks used since the cutoff: left for a later run.
    pub recent_chunks: u64,
    /// Newly condemned: deleted by a later run unless used again.
    pub condemned: Tally,
    /// Deleted (condemned by an earlier run and still unneeded).
    pub freed: Tally,
    /// Objects without a catalog row, deleted.
    pub orphans_freed: Tally,
    /// Condemned chunks used again (a dedup hit or a new backup) since the
    /// previous run started.
    pub revived: Tally,
}

/// Runs a collection now (the CLI's); a [`CoordinatorError::Conflict`] if
/// one is running.
pub async fn collect_garbage(
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    options: GcOptions,
    holder: &str,
) -> Result<GcReport> {
    let now = now_ms();
    match run(catalog.clone(), repository, options, holder, None, now).await? {
        Some(report) => Ok(report),
        None => {
            let held = catalog
                .gc_lease_holder(now)
                .await?
                .map(|(holder, until)| format!(" (by {holder}, its lease runs to {until} ms)"))
                .unwrap_or_default();
            Err(CoordinatorError::Conflict(format!(
                "a garbage collection is running{held}: wait for it to finish"
            )))
        }
    }
}

/// Runs the daily collection if it is due (the last one started at least
/// `interval` ago) and no one runs one: `None` otherwise.
pub async fn collect_garbage_if_due(
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    options: GcOptions,
    holder: &str,
    interval: Duration,
) -> Result<Option<GcReport>> {
    let now = now_ms();
    let due_before = now.saturating_sub(millis(interval)) + 1;
    run(catalog, repository, options, holder, Some(due_before), now).await
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

async fn run(
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    options: GcOptions,
    holder: &str,
    due_before: Option<i64>,
    now: i64,
) -> Result<Option<GcReport>> {
    let Some(claim) = catalog
        .claim_gc_lease(holder, now, now + millis(LEASE), due_before)
        .await?
    else {
        return Ok(None);
    };
    let grace_ms = millis(options.grace);
    let oldest_upload = catalog.oldest_running_backup().await?;
    let cutoff_ms = oldest_upload.map_or(now - grace_ms, |started| {
        started.min(now.saturating_sub(grace_ms))
    });
    let mut report = GcReport {
        repository: repository.store.describe(),
        dry_run: options.dry_run,
        grace_ms: u64::try_from(grace_ms).unwrap_or(0),
        cutoff_ms,
        ..GcReport::default()
    };
    tracing::info!(
        dry_run = options.dry_run,
        grace_ms,
        cutoff_ms,
        repository = %report.repository,
        "garbage collection started"
    );
    let lease = Lease {
        catalog: &catalog,
        holder,
    };
    let swept = async {
        mark::pin_unindexed_manifests(&catalog, &repository, &lease, &mut report).await?;
        sweep::sweep(
            &catalog,
            &repository,
            &lease,
            sweep::Run {
                started_at: now,
                cutoff_ms,
                dry_run: options.dry_run,
            },
            &mut report,
        )
        .await?;
        if claim.previous_started_at > 0 {
            let (chunks, bytes) = catalog
                .chunks_revived_since(claim.previous_started_at)
                .await?;
            report.revived = Tally { chunks, bytes };
        }
        Ok::<_, CoordinatorError>(())
    }
    .await;
    let finished = swept.is_ok();
    // The pins are scratch: cleared so no stale pin outlives the run.
    let cleared = catalog.clear_gc_pins().await;
    catalog.release_gc_lease(holder, now_ms(), finished).await?;
    swept?;
    cleared?;
    tracing::info!(
        dry_run = options.dry_run,
        stored = report.stored_chunks,
        condemned = report.condemned.chunks,
        condemned_bytes = report.condemned.bytes,
        freed = report.freed.chunks,
        freed_bytes = report.freed.bytes,
        orphans_freed = report.orphans_freed.chunks,
        revived = report.revived.chunks,
        "garbage collection finished"
    );
    Ok(Some(report))
}

/// The claimed lease, renewed as the run goes.
struct Lease<'a> {
    catalog: &'a Catalog,
    holder: &'a str,
}

impl Lease<'_> {
    /// Extends the lease; stops the run if another holder took it (this
    /// one stalled past its expiry).
    async fn renew(&self) -> Result<()> {
        if self
            .catalog
            .renew_gc_lease(self.holder, now_ms() + millis(LEASE))
            .await?
        {
            Ok(())
        } else {
            Err(CoordinatorError::Conflict(format!(
                "garbage collection {} lost its lease (it stalled for more than {}s): it stops; \
                 the next run goes on",
                self.holder,
                LEASE.as_secs()
            )))
        }
    }
}

/// The audit record's detail: the counts of a run.
pub fn audit_detail(report: &GcReport) -> String {
    format!(
        "{}grace {} ms; {} stored chunks, {} referenced, {} pinned; condemned {} ({} bytes), \
         freed {} ({} bytes), orphans freed {} ({} bytes), revived {} ({} bytes)",
        if report.dry_run { "dry run: " } else { "" },
        report.grace_ms,
        report.stored_chunks,
        report.referenced_chunks,
        report.pinned_chunks,
        report.condemned.chunks,
        report.condemned.bytes,
        report.freed.chunks,
        report.freed.bytes,
        report.orphans_freed.chunks,
        report.orphans_freed.bytes,
        report.revived.chunks,
        report.revived.bytes,
    )
}

/// A holder name unique to this process and run: `node/random`, `node`
/// naming the coordinator (its home) so that a restarted coordinator can
/// take back a lease its previous process held.
pub fn holder_name(node: &str) -> String {
    let random = cairn_common::pki::random_bytes(8)
        .map(hex::encode)
        .unwrap_or_else(|_| format!("{}", std::process::id()));
    format!("{node}/{random}")
}

#[cfg(test)]
mod tests;
