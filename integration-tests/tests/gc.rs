//! `cairn repository gc` end to end, with the real binaries: garbage is
//! condemned by one run and freed by the next while every backup left
//! verifies and restores; a backup running while collections condemn and
//! delete loses nothing (its dedup hits revive condemned chunks); the same
//! against the S3 test server; a coordinator killed during a collection,
//! then collecting again, loses nothing referenced.
//!
//! Garbage is made by forgetting a backup by hand (its catalog rows and its
//! manifest), as retention will.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_integration_tests::{
    AgentOptions, Coordinator, CoordinatorOptions, PgCluster, S3Server, TestDir,
};
use serde_json::Value;

/// `cairn repository gc --grace 0s --output json` plus `extra`.
fn gc(coordinator: &Coordinator, extra: &[&str]) -> Value {
    let mut args = vec!["repository", "gc", "--grace", "0s", "--output", "json"];
    args.extend_from_slice(extra);
    coordinator.cli_json(&args)
}

fn chunks(report: &Value, tally: &str) -> u64 {
    report[tally]["chunks"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {tally}.chunks in {report}"))
}

/// Forgets a backup as retention will: its catalog rows (and references),
/// then its manifest object at `manifest`.
fn forget_backup(coordinator: &Coordinator, backup_id: &str, manifest: &Path) {
    let catalog = coordinator.catalog_path();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&catalog)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        for statement in [
            "DELETE FROM backup_chunks WHERE backup_id = ?",
            "DELETE FROM backups WHERE id = ?",
        ] {
            sqlx::query(statement)
                .bind(backup_id)
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;
    });
    std::fs::remove_file(manifest).unwrap_or_else(|e| panic!("remove {}: {e}", manifest.display()));
}

fn local_manifest(coordinator: &Coordinator, backup_id: &str) -> PathBuf {
    coordinator
        .home()
        .join("repository")
        .join("manifests")
        .join(backup_id)
}

/// A database of random rows: its chunks are its own, shared with no
/// other backup.
fn create_random_database(pg: &PgCluster, name: &str) {
    pg.create_database(name);
    pg.psql(
        name,
        "CREATE TABLE junk AS SELECT i, md5(random()::text) || md5(random()::text) AS noise
         FROM generate_series(1, 60000) i;",
    );
}

/// `backup verify` succeeds and a restore of it into `target` holds the
/// source's rows.
fn assert_verifies_and_restores(
    coordinator: &Coordinator,
    pg: &PgCluster,
    backup_id: &str,
    target: &str,
) {
    coordinator
        .cli(&["backup", "verify", backup_id])
        .assert_success();
    let restored = coordinator
        .cli(&[
            "restore",
            backup_id,
            "--agent",
            "db1",
            "--database",
            target,
            "--wait",
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    assert_eq!(restored["status"], "succeeded", "{restored}");
    assert_eq!(
        pg.psql(target, "SELECT count(*) FROM orders").trim(),
        pg.psql("shop", "SELECT count(*) FROM orders").trim()
    );
}

fn assert_check_ok(coordinator: &Coordinator) {
    let check = coordinator.cli(&["repository", "check", "--output", "json"]);
    let report = check.json();
    assert_eq!(check.status_code, Some(0), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["missing_count"], 0, "{report}");
}

#[test]
fn unreferenced_chunks_are_freed_after_two_runs_and_every_backup_left_verifies() {
    let test_dir = TestDir::new("gc_local");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 8);
    create_random_database(&pg, "scratch");
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    let garbage = coordinator.backup("db1", "scratch");
    let kept = coordinator.backup("db1", "shop");
    forget_backup(
        &coordinator,
        &garbage,
        &local_manifest(&coordinator, &garbage),
    );
    let stored = coordinator.chunk_files().len();

    // Deleting data is the admin's: an operator is refused, dry or not.
    let operator = test_dir.path().join("operator-identity");
    coordinator.issue_operator("olga", "operator", &operator);
    for args in [
        &["repository", "gc"][..],
        &["repository", "gc", "--dry-run"][..],
    ] {
        let refused = coordinator.cli_as(&operator, args);
        assert!(!refused.success(), "{refused}");
        assert!(refused.stderr.contains("admin"), "{refused}");
    }

    // A dry run says what it would condemn and changes nothing.
    let dry = gc(&coordinator, &["--dry-run"]);
    assert_eq!(dry["dry_run"], true, "{dry}");
    let garbage_chunks = chunks(&dry, "condemned");
    assert!(garbage_chunks >= 1, "{dry}");
    assert_eq!(
        chunks(&gc(&coordinator, &["--dry-run"]), "condemned"),
        garbage_chunks
    );

    let first = gc(&coordinator, &[]);
    assert_eq!(chunks(&first, "condemned"), garbage_chunks, "{first}");
    assert_eq!(chunks(&first, "freed"), 0, "{first}");
    assert!(first["condemned"]["bytes"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(
        coordinator.chunk_files().len(),
        stored,
        "the first run deletes nothing"
    );

    let second = gc(&coordinator, &[]);
    assert_eq!(chunks(&second, "freed"), garbage_chunks, "{second}");
    assert_eq!(chunks(&second, "condemned"), 0, "{second}");
    assert_eq!(
        coordinator.chunk_files().len(),
        stored - usize::try_from(garbage_chunks).unwrap()
    );
    let third = gc(&coordinator, &[]);
    assert_eq!(chunks(&third, "freed"), 0, "{third}");

    assert_check_ok(&coordinator);
    assert_verifies_and_restores(&coordinator, &pg, &kept, "shop_restored");

    // The runs are audited with their counts.
    let audit = coordinator.cli_json(&["audit", "list", "--limit", "1000"]);
    let runs: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["action"] == "repository.gc")
        .collect();
    assert!(runs.len() >= 5, "{audit}");
    assert!(
        runs.iter().any(|event| event["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("freed {garbage_chunks} "))),
        "{audit}"
    );
}

#[test]
fn a_backup_running_while_gc_condemns_and_deletes_loses_nothing() {
    let test_dir = TestDir::new("gc_concurrent");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 96);
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    // The first backup's chunks become garbage, all condemned; the next
    // backup of the same data reuses them while collections run.
    let first = coordinator.backup("db1", "shop");
    forget_backup(&coordinator, &first, &local_manifest(&coordinator, &first));
    let condemned = chunks(&gc(&coordinator, &[]), "condemned");
    assert!(condemned >= 10, "{condemned}");

    let jobs = coordinator.cli_json(&["backup", "run", "--agent", "db1", "--database", "shop"]);
    let job_id = jobs[0]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut during = Vec::new();
    let job = loop {
        let job = coordinator.cli_json(&["jobs", "show", &job_id]);
        if job["status"] != "running" && job["status"] != "queued" {
            break job;
        }
        assert!(Instant::now() < deadline, "the backup did not end: {job}");
        during.push(gc(&coordinator, &[]));
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        during.len() >= 2,
        "only {} collection(s) ran during the backup",
        during.len()
    );
    let second = job["backup_id"].as_str().unwrap().to_string();

    // One more run after it; between them all, the chunks condemned before
    // the backup reached them were freed under it (and uploaded again) or
    // revived by its dedup hits.
    during.push(gc(&coordinator, &[]));
    let revived: u64 = during.iter().map(|report| chunks(report, "revived")).sum();
    let freed: u64 = during.iter().map(|report| chunks(report, "freed")).sum();
    eprintln!(
        "{} runs during the backup: {revived} chunk(s) revived, {freed} freed",
        during.len() - 1
    );
    assert!(
        revived + freed > 0,
        "the collections did nothing: {during:?}"
    );
    gc(&coordinator, &[]);
    assert_check_ok(&coordinator);
    coordinator
        .cli(&["backup", "verify", &second])
        .assert_success();

    // Condemned again (the second backup forgotten), then reused by a
    // third backup of the same data: its dedup hits revive them, so the
    // next runs free only the chunk or two that differ (around the dump's
    // header, which holds its time).
    forget_backup(
        &coordinator,
        &second,
        &local_manifest(&coordinator, &second),
    );
    let condemned = chunks(&gc(&coordinator, &[]), "condemned");
    assert!(condemned >= 10, "{condemned}");
    let third = coordinator.backup("db1", "shop");
    let next = gc(&coordinator, &[]);
    assert!(chunks(&next, "revived") >= condemned - 2, "{next}");
    let freed = chunks(&next, "freed") + chunks(&gc(&coordinator, &[]), "freed");
    assert!(freed <= 2, "{freed} chunk(s) of the third backup freed");
    assert_check_ok(&coordinator);
    assert_verifies_and_restores(&coordinator, &pg, &third, "shop_restored");
}

const BUCKET: &str = "gc-backups";
const PREFIX: &str = "fleet";

fn s3_repository_table(server: &S3Server, secret_file: &Path) -> String {
    server.repository_table(BUCKET, PREFIX, secret_file)
}

/// Chunk objects in the bucket (s3s-fs keeps them as files).
fn s3_chunk_objects(server: &S3Server) -> usize {
    let root = server.data_dir().join(BUCKET).join(PREFIX).join("chunks");
    std::fs::read_dir(&root)
        .map(|dirs| {
            dirs.flatten()
                .flat_map(|dir| {
                    std::fs::read_dir(dir.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                })
                .filter(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    name.len() == 64 && entry.path().is_file()
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn gc_frees_unreferenced_chunks_of_an_s3_repository() {
    let test_dir = TestDir::new("gc_s3");
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let secret_file = server.write_secret_file(test_dir.path());
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 8);
    create_random_database(&pg, "scratch");
    let coordinator = Coordinator::start_with(
        &test_dir,
        CoordinatorOptions {
            repository_table: Some(s3_repository_table(&server, &secret_file)),
            ..CoordinatorOptions::default()
        },
    );
    let _agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    let garbage = coordinator.backup("db1", "scratch");
    let kept = coordinator.backup("db1", "shop");
    let manifest = server
        .data_dir()
        .join(BUCKET)
        .join(PREFIX)
        .join("manifests")
        .join(&garbage);
    forget_backup(&coordinator, &garbage, &manifest);
    let stored = s3_chunk_objects(&server);
    assert!(stored > 0);

    let first = gc(&coordinator, &[]);
    let condemned = chunks(&first, "condemned");
    assert!(condemned >= 1, "{first}");
    assert_eq!(s3_chunk_objects(&server), stored);
    let second = gc(&coordinator, &[]);
    assert_eq!(chunks(&second, "freed"), condemned, "{second}");
    assert_eq!(
        s3_chunk_objects(&server),
        stored - usize::try_from(condemned).unwrap()
    );
    assert_check_ok(&coordinator);
    assert_verifies_and_restores(&coordinator, &pg, &kept, "shop_restored");
}

/// Writes `count` chunk-named objects no catalog row knows (what a crash
/// between an upload's put and its row leaves), returning their paths.
fn plant_orphans(coordinator: &Coordinator, count: u64) -> Vec<PathBuf> {
    let root = coordinator.home().join("repository").join("chunks");
    (0..count)
        .map(|i| {
            let mixed = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let id = format!("{mixed:016x}{:016x}{mixed:016x}{i:016x}", !mixed);
            let dir = root.join(&id[..2]);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(&id);
            std::fs::write(&path, b"not a chunk").unwrap();
            path
        })
        .collect()
}

#[test]
fn a_coordinator_killed_during_gc_loses_nothing_referenced_and_gc_goes_on() {
    let test_dir = TestDir::new("gc_killed");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 8);
    create_random_database(&pg, "scratch");
    let mut coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    let garbage = coordinator.backup("db1", "scratch");
    let kept = coordinator.backup("db1", "shop");
    forget_backup(
        &coordinator,
        &garbage,
        &local_manifest(&coordinator, &garbage),
    );
    let referenced = coordinator.chunk_files().len();
    // Condemned now, deleted by the run that is killed (or the next).
    assert!(chunks(&gc(&coordinator, &[]), "condemned") >= 1);
    let orphans = plant_orphans(&coordinator, 3000);
    std::thread::sleep(Duration::from_millis(20));

    let mut run = coordinator
        .cli_command(&["repository", "gc", "--grace", "0s"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gone = orphans.iter().filter(|path| !path.exists()).count();
        if gone > 0 {
            assert!(gone < orphans.len(), "the run ended before it was killed");
            break;
        }
        assert!(Instant::now() < deadline, "the collection deleted nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    coordinator.kill();
    let _ = run.wait();
    coordinator.start_again();

    // The lease the killed process held is free again; the next runs
    // finish what it began.
    let after = gc(&coordinator, &[]);
    assert!(chunks(&after, "orphans_freed") > 0, "{after}");
    gc(&coordinator, &[]);
    assert!(orphans.iter().all(|path| !path.exists()));
    assert!(coordinator.chunk_files().len() < referenced);
    assert_check_ok(&coordinator);
    assert_verifies_and_restores(&coordinator, &pg, &kept, "shop_restored");
}
