//! Backups written before agents gave up the repository keys (format 1:
//! chunks named by the keyed hash of their plaintext, manifests without
//! content hashes) still rebuild into a catalog, verify and restore, beside
//! new ones in the same repository.
//!
//! The format-1 backup is written here the way the old code wrote it: a
//! real `pg_dump -Fc` and `pg_dumpall --globals-only`, each cut into chunks
//! sealed with `seal_legacy_chunk`, and a `cairn-manifest-v1` manifest,
//! into the repository of a real coordinator; then the real binaries do
//! the rest.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use bytes::Bytes;
use cairn_common::chunk::seal_legacy_chunk;
use cairn_common::crypto::SecretKey;
use cairn_coordinator::repository::manifest::{Manifest, ManifestChunk};
use cairn_coordinator::repository::{LocalStore, ObjectKey, Repository, Store};
use cairn_integration_tests::{AgentOptions, Coordinator, PgCluster, TestDir, run};

/// A table-by-table fingerprint of `shop`: row counts and an md5 of rows.
fn fingerprint(pg: &PgCluster, database: &str) -> String {
    pg.psql(
        database,
        "SELECT count(*), md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o;
         SELECT count(*), md5(string_agg(c::text, ',' ORDER BY id)) FROM customers c;",
    )
}

/// Seals `plaintext` as format-1 chunks of at most 1 MiB and stores them.
async fn store_legacy(repository: &Repository, plaintext: &[u8]) -> Vec<ManifestChunk> {
    let mut chunks = Vec::new();
    for piece in plaintext.chunks(1024 * 1024) {
        let sealed = seal_legacy_chunk(repository.keys(), piece, 1).expect("seal a chunk");
        let sealed_bytes = sealed.bytes.len() as u64;
        repository
            .store
            .put(&ObjectKey::chunk(&sealed.id), Bytes::from(sealed.bytes))
            .await
            .expect("store a chunk");
        chunks.push(ManifestChunk {
            id: sealed.id,
            hash: None,
            plaintext_bytes: piece.len() as u64,
            sealed_bytes,
        });
    }
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_one_backups_rebuild_verify_and_restore_beside_new_ones() {
    let test_dir = TestDir::new("format_one");
    let source = PgCluster::start_in(&test_dir, "source");
    let target = PgCluster::start_in(&test_dir, "target");
    source.create_sample_database("shop", 6);
    source.psql(
        "shop",
        "CREATE ROLE legacy_reader LOGIN; GRANT SELECT ON orders TO legacy_reader;",
    );
    let mut coordinator = Coordinator::start(&test_dir);
    coordinator.stop();

    // The old agent's dump and globals, as the old coordinator stored them.
    // pg_dump runs as `postgres` when the test runs as root.
    let dumps = test_dir.path().join("dumps");
    std::fs::create_dir(&dumps).unwrap();
    std::fs::set_permissions(&dumps, std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = dumps.join("shop.dump");
    let dump = run(source
        .pg_command("pg_dump")
        .args(["-Fc", "-Z0", "-d", "shop", "-f"])
        .arg(&file));
    assert!(dump.success(), "{dump}");
    let globals = run(source.pg_command("pg_dumpall").arg("--globals-only"));
    assert!(globals.success(), "{globals}");
    let archive = std::fs::read(&file).unwrap();
    assert!(archive.len() > 2 * 1024 * 1024, "{} bytes", archive.len());

    let master = SecretKey::from_hex(
        &std::fs::read_to_string(coordinator.home().join("master.key")).unwrap(),
    )
    .unwrap();
    let store = Store::Local(LocalStore::new(coordinator.home().join("repository")));
    let repository = Repository::open(store, &master).await.unwrap();
    let chunks = store_legacy(&repository, &archive).await;
    let globals_chunk = store_legacy(&repository, globals.stdout.as_bytes())
        .await
        .remove(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 60_000;
    let backup_id = format!("bk-{now}-0f1e2d3c");
    let manifest = Manifest {
        format: "cairn-manifest-v1".into(),
        backup_id: backup_id.clone(),
        job_id: format!("job-{now}-0f1e2d3c"),
        agent: "db1".into(),
        instance: "main".into(),
        database: "shop".into(),
        server_version: "15".into(),
        pg_dump_version: "pg_dump (PostgreSQL) 15".into(),
        started_at: now,
        finished_at: now + 1000,
        dump_millis: 1000,
        dump_bytes: archive.len() as u64,
        database_bytes: 0,
        row_estimates: BTreeMap::new(),
        tags: BTreeMap::new(),
        chunks,
        globals: Some(globals_chunk),
        table_rows: None,
        rows_not_counted: "written by a test".into(),
        archive_version: String::new(),
        // Old manifests have none: the backup groups by host.
        system_identifier: String::new(),
    };
    manifest.store(&repository).await.unwrap();
    drop(repository);

    // The catalog comes back from the repository, the old backup with it.
    coordinator.move_catalog_aside(test_dir.path());
    let config = coordinator.config_path();
    let rebuilt = coordinator.cli(&[
        "repository",
        "rebuild-catalog",
        "--config",
        config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(rebuilt.success(), "{rebuilt}");
    assert_eq!(rebuilt.json()["backups"], 1, "{rebuilt}");
    coordinator.start_again();
    coordinator
        .cli(&["backup", "verify", &backup_id])
        .assert_success();

    // A new agent backs up with the new format beside it.
    let source_agent =
        coordinator.enroll_agent("db1", &source, AgentOptions::default().allow("backup"));
    let target_agent =
        coordinator.enroll_agent("db2", &target, AgentOptions::default().allow("restore"));
    coordinator.wait_until_online(&source_agent);
    let new_backup = coordinator.backup("db1", "shop");
    coordinator
        .cli(&["backup", "verify", &new_backup])
        .assert_success();

    // Both restore, identical, on another host.
    coordinator.wait_until_online(&target_agent);
    for (backup, database) in [(&backup_id, "old_shop"), (&new_backup, "new_shop")] {
        let output = coordinator.cli(&[
            "restore",
            backup,
            "--agent",
            "db2",
            "--database",
            database,
            "--wait",
            "--output",
            "json",
        ]);
        assert!(output.success(), "{output}");
        assert_eq!(output.json()["status"], "succeeded", "{output}");
        assert_eq!(
            fingerprint(&target, database),
            fingerprint(&source, "shop"),
            "{backup}"
        );
        // The old backup, restored first, had its globals read: the role
        // its grant needs was created on the target.
        assert_eq!(
            target.psql(
                "postgres",
                "SELECT count(*) FROM pg_roles WHERE rolname = 'legacy_reader'"
            ),
            "1",
            "{backup}"
        );
    }
}
