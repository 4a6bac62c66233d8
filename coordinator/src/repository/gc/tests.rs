//! Garbage collection on a real SQLite catalog and a real local store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_common::chunk::ChunkId;
use cairn_common::crypto::SecretKey;

use super::*;
use crate::catalog::{AttemptEnd, BackupStats, JobKind, JobRecord, JobState, RecordedChunk};
use crate::repository::manifest::ManifestChunk;
use crate::repository::{LocalStore, ObjectKey, Store};

struct Fixture {
    _dir: tempfile::TempDir,
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open_sqlite(&dir.path().join("catalog.sqlite"))
        .await
        .unwrap();
    let store = Store::Local(LocalStore::new(dir.path().join("repository")));
    let repository = Repository::create(store, &SecretKey::generate().unwrap())
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        catalog: Arc::new(catalog),
        repository: Arc::new(repository),
    }
}

/// A chunk id made of one repeated hex digit.
fn id(digit: char) -> String {
    std::iter::repeat_n(digit, 64).collect()
}

fn key(id: &str) -> ObjectKey {
    ObjectKey::chunk(&ChunkId::from_hex(id).unwrap())
}

impl Fixture {
    /// Stores a chunk object and its row, stored long ago.
    async fn stored(&self, id: &str) {
        self.object(id).await;
        assert!(self.catalog.insert_chunk(id, 100, 200, 1).await.unwrap());
    }

    /// Stores a chunk object only (no row: an orphan).
    async fn object(&self, id: &str) {
        self.repository
            .store
            .put(&key(id), Bytes::from(vec![7u8; 100]))
            .await
            .unwrap();
    }

    async fn exists(&self, id: &str) -> bool {
        self.repository.store.exists(&key(id)).await.unwrap()
    }

    async fn gc(&self, grace: Duration, dry_run: bool) -> GcReport {
        collect_garbage(
            self.catalog.clone(),
            self.repository.clone(),
            GcOptions { grace, dry_run },
            "test/holder",
        )
        .await
        .unwrap()
    }

    /// A backup job with a running attempt started at `at`.
    async fn running_backup(&self, job_id: &str, at: i64) -> String {
        let mut job = JobRecord::queued(
            job_id.into(),
            JobKind::Backup,
            "db1",
            "main",
            "shop",
            "admin",
            1,
        );
        job.backup_id = format!("b-{job_id}");
        self.catalog
            .insert_job(&job, Some(&BTreeMap::new()))
            .await
            .unwrap();
        let attempt = format!("{job_id}-1");
        assert!(
            self.catalog
                .start_attempt(job_id, &attempt, 1, at)
                .await
                .unwrap()
        );
        attempt
    }

    /// Completes the backup of a running job, referencing `chunks`, and
    /// ends the job.
    async fn complete(&self, job_id: &str, chunks: &[String]) {
        self.catalog
            .complete_backup(&format!("b-{job_id}"), &BackupStats::default(), chunks, 2)
            .await
            .unwrap();
        self.catalog
            .end_attempt(
                job_id,
                &format!("{job_id}-1"),
                &AttemptEnd::Final(JobState::Succeeded),
                "",
                2,
            )
            .await
            .unwrap();
    }
}

const NO_GRACE: Duration = Duration::ZERO;

#[tokio::test]
async fn an_unreferenced_chunk_is_condemned_then_deleted_by_the_next_run() {
    let f = fixture().await;
    let (garbage, kept) = (id('a'), id('b'));
    f.stored(&garbage).await;
    f.stored(&kept).await;
    f.running_backup("j1", 1).await;
    f.complete("j1", std::slice::from_ref(&kept)).await;

    let first = f.gc(NO_GRACE, false).await;
    assert_eq!(first.stored_chunks, 2);
    assert_eq!(first.referenced_chunks, 1);
    assert_eq!(
        first.condemned,
        Tally {
            chunks: 1,
            bytes: 100
        }
    );
    assert_eq!(first.freed, Tally::default());
    assert!(f.exists(&garbage).await, "the first run only condemns");

    let second = f.gc(NO_GRACE, false).await;
    assert_eq!(
        second.freed,
        Tally {
            chunks: 1,
            bytes: 100
        }
    );
    assert!(!f.exists(&garbage).await);
    assert!(f.exists(&kept).await);
    assert!(
        f.catalog
            .stored_chunks(&[garbage], 5)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(f.catalog.stored_chunks(&[kept], 5).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_dedup_hit_revives_a_condemned_chunk_and_it_is_not_deleted() {
    let f = fixture().await;
    let chunk = id('c');
    f.stored(&chunk).await;
    assert_eq!(f.gc(NO_GRACE, false).await.condemned.chunks, 1);

    // An upload's offer finds it: revived in the dedup check's transaction.
    let found = f
        .catalog
        .stored_chunks(std::slice::from_ref(&chunk), crate::clock::now_ms())
        .await
        .unwrap();
    assert_eq!(found.len(), 1);

    let second = f.gc(Duration::from_secs(3600), false).await;
    assert_eq!(second.freed, Tally::default());
    assert_eq!(
        second.revived,
        Tally {
            chunks: 1,
            bytes: 100
        }
    );
    assert_eq!(second.recent_chunks, 1, "used just now: inside the grace");
    assert!(f.exists(&chunk).await);
}

#[tokio::test]
async fn a_new_backup_referencing_a_condemned_chunk_revives_it() {
    let f = fixture().await;
    let chunk = id('d');
    f.stored(&chunk).await;
    assert_eq!(f.gc(NO_GRACE, false).await.condemned.chunks, 1);
    f.running_backup("j1", 1).await;
    f.complete("j1", std::slice::from_ref(&chunk)).await;

    let second = f.gc(NO_GRACE, false).await;
    assert_eq!(second.freed, Tally::default());
    assert_eq!(second.referenced_chunks, 1);
    assert!(f.exists(&chunk).await);
}

#[tokio::test]
async fn a_chunk_pinned_by_a_running_upload_is_never_condemned() {
    let f = fixture().await;
    let chunk = id('e');
    f.stored(&chunk).await;
    let attempt = f.running_backup("j1", 1).await;
    f.catalog
        .record_upload_chunks(
            &attempt,
            0,
            &[RecordedChunk {
                chunk: ManifestChunk {
                    id: ChunkId::from_hex(&chunk).unwrap(),
                    hash: None,
                    plaintext_bytes: 200,
                    sealed_bytes: 100,
                },
                new_bytes: 100,
            }],
        )
        .await
        .unwrap();
    // Stored before the attempt began (at 1, not after it): only the pin
    // protects it.
    for _ in 0..2 {
        let report = f.gc(NO_GRACE, false).await;
        assert_eq!(report.pinned_chunks, 1);
        assert_eq!(report.condemned, Tally::default());
        assert_eq!(report.freed, Tally::default());
    }
    assert!(f.exists(&chunk).await);

    // The attempt fails: its chunks are garbage like any other.
    f.catalog
        .end_attempt(
            "j1",
            &attempt,
            &AttemptEnd::Final(JobState::Failed),
            "gone",
            3,
        )
        .await
        .unwrap();
    assert_eq!(f.gc(NO_GRACE, false).await.condemned.chunks, 1);
    assert_eq!(f.gc(NO_GRACE, false).await.freed.chunks, 1);
    assert!(!f.exists(&chunk).await);
}

#[tokio::test]
async fn nothing_stored_or_reused_since_the_oldest_running_upload_began_is_condemned() {
    let f = fixture().await;
    let chunk = id('f');
    f.stored(&chunk).await;
    // The chunk was stored at 1; an upload running since 0 may use it.
    f.running_backup("j1", 0).await;
    let report = f.gc(NO_GRACE, false).await;
    assert_eq!(report.cutoff_ms, 0);
    assert_eq!(report.condemned, Tally::default());
    assert_eq!(report.recent_chunks, 1);
}

#[tokio::test]
async fn an_orphan_object_older_than_the_grace_is_deleted() {
    let f = fixture().await;
    let orphan = id('1');
    f.object(&orphan).await;
    // Written just now: inside an hour's grace, it may be an upload's.
    let young = f.gc(Duration::from_secs(3600), false).await;
    assert_eq!(young.orphans_freed, Tally::default());
    assert!(f.exists(&orphan).await);

    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = f.gc(NO_GRACE, false).await;
    assert_eq!(
        report.orphans_freed,
        Tally {
            chunks: 1,
            bytes: 100
        }
    );
    assert!(!f.exists(&orphan).await);
    assert!(
        f.catalog.gc_chunks(&[orphan]).await.unwrap().is_empty(),
        "its claim row goes with it"
    );
}

#[tokio::test]
async fn a_dry_run_changes_nothing_and_says_what_would_happen() {
    let f = fixture().await;
    let (garbage, orphan) = (id('2'), id('3'));
    f.stored(&garbage).await;
    f.object(&orphan).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let dry = f.gc(NO_GRACE, true).await;
    assert!(dry.dry_run);
    assert_eq!(dry.condemned.chunks, 1);
    assert_eq!(dry.orphans_freed.chunks, 1);
    let rows = f
        .catalog
        .gc_chunks(std::slice::from_ref(&garbage))
        .await
        .unwrap();
    assert_eq!(rows[0].condemned_at, None);
    assert!(f.exists(&orphan).await);

    // Really condemned; then a dry run says it would free it, and does not.
    f.gc(NO_GRACE, false).await;
    let dry = f.gc(NO_GRACE, true).await;
    assert_eq!(dry.freed.chunks, 1);
    assert!(f.exists(&garbage).await);
}

#[tokio::test]
async fn one_collection_at_a_time_and_a_dead_holders_lease_expires() {
    let f = fixture().await;
    let now = crate::clock::now_ms();
    assert!(
        f.catalog
            .claim_gc_lease("other/1", now, now + 60_000, None)
            .await
            .unwrap()
            .is_some()
    );
    let refused = collect_garbage(
        f.catalog.clone(),
        f.repository.clone(),
        GcOptions {
            grace: NO_GRACE,
            dry_run: false,
        },
        "test/holder",
    )
    .await
    .unwrap_err();
    assert!(
        refused.to_string().contains("other/1"),
        "names the holder: {refused}"
    );
    // Its holder died: once the lease expires another run takes it.
    assert!(
        f.catalog
            .claim_gc_lease("third/1", now + 60_001, now + 120_000, None)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn the_daily_run_is_claimed_once_per_interval() {
    let f = fixture().await;
    let options = GcOptions {
        grace: DEFAULT_GRACE,
        dry_run: false,
    };
    let day = Duration::from_secs(24 * 3600);
    let first =
        collect_garbage_if_due(f.catalog.clone(), f.repository.clone(), options, "a/1", day)
            .await
            .unwrap();
    assert!(first.is_some());
    let again =
        collect_garbage_if_due(f.catalog.clone(), f.repository.clone(), options, "b/1", day)
            .await
            .unwrap();
    assert!(again.is_none(), "not due again within the day");
}

#[tokio::test]
async fn an_upload_cannot_record_a_chunk_while_its_deletion_runs() {
    let f = fixture().await;
    let chunk = id('4');
    f.stored(&chunk).await;
    f.gc(NO_GRACE, false).await;
    // The next run's first step, stopped before the object goes (a crash).
    assert!(
        f.catalog
            .begin_chunk_deletion(&chunk, crate::clock::now_ms(), i64::MAX)
            .await
            .unwrap()
    );
    // Neither reused nor recorded while it is being deleted.
    assert!(
        f.catalog
            .stored_chunks(std::slice::from_ref(&chunk), 9)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!f.catalog.insert_chunk(&chunk, 100, 200, 9).await.unwrap());
    assert!(f.catalog.chunk_being_deleted(&chunk).await.unwrap());
    // The next run finishes the deletion; then the upload's put sticks.
    assert_eq!(f.gc(NO_GRACE, false).await.freed.chunks, 1);
    assert!(!f.exists(&chunk).await);
    assert!(f.catalog.insert_chunk(&chunk, 100, 200, 9).await.unwrap());
}
