//! Backups into an S3 repository end to end: a real S3-protocol server on
//! loopback, `cairn repository init` making the repository from
//! coordinator.toml, real binaries and PostgreSQL.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use cairn_integration_tests::{
    AgentOptions, Coordinator, CoordinatorOptions, PgCluster, S3Server, TestDir,
};
use serde_json::Value;

const BUCKET: &str = "fleet-backups";
const PREFIX: &str = "prod/eu";

fn repository_table(server: &S3Server, secret_file: &Path) -> String {
    server.repository_table(BUCKET, PREFIX, secret_file)
}

/// Every object under the repository prefix, relative to it.
fn objects(server: &S3Server, under: &str) -> Vec<String> {
    let root = server.data_dir().join(BUCKET).join(PREFIX);
    let mut found = Vec::new();
    let mut pending = vec![root.join(under)];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let name = path.strip_prefix(&root).unwrap().to_string_lossy();
                // s3s-fs keeps its own metadata beside the objects.
                if !name.contains(".s3s-fs") && !name.ends_with(".metadata.json") {
                    found.push(name.into_owned());
                }
            }
        }
    }
    found.sort();
    found
}

fn backups(coordinator: &Coordinator) -> Vec<Value> {
    coordinator
        .cli_json(&["backups", "list"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn backups_land_in_s3_sealed_deduplicated_and_rebuildable() {
    let test_dir = TestDir::new("s3_backup");
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let secret_file = server.write_secret_file(test_dir.path());

    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 48);
    let mut coordinator = Coordinator::start_with(
        &test_dir,
        CoordinatorOptions {
            repository_table: Some(repository_table(&server, &secret_file)),
            ..CoordinatorOptions::default()
        },
    );
    let mut agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));

    // `cairn repository init` made the repository in the bucket, and will
    // not make a second one over it.
    let layout = objects(&server, "");
    assert!(
        layout.contains(&"cairn-repository.json".to_string())
            && layout.iter().any(|key| key.starts_with("keys/slots/")),
        "{layout:?}"
    );
    let config = coordinator.config_path();
    let again = coordinator.cli(&["repository", "init", "--config", config.to_str().unwrap()]);
    assert!(
        !again.success() && again.stderr.contains("already holds a repository"),
        "{again}"
    );

    coordinator.backup("db1", "shop");
    let listed = backups(&coordinator);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();
    let chunks = objects(&server, "chunks");
    assert_eq!(
        chunks.len() as u64,
        listed[0]["new_chunk_count"].as_u64().unwrap(),
        "every new chunk is an object in the bucket: {chunks:?}"
    );
    assert_eq!(objects(&server, "manifests"), [format!("manifests/{id}")]);
    let manifest = server
        .data_dir()
        .join(BUCKET)
        .join(PREFIX)
        .join("manifests")
        .join(&id);
    let sealed = std::fs::read(&manifest).unwrap();
    assert!(
        !String::from_utf8_lossy(&sealed).contains("shop"),
        "the manifest in the bucket is not sealed"
    );
    assert!(
        !coordinator.home().join("repository/chunks").exists(),
        "nothing may go to the local directory"
    );

    // A small change uploads a small part of the first backup.
    pg.psql(
        "shop",
        "INSERT INTO orders (customer, note, amount, at)
           SELECT md5(i::text), repeat(md5((i * 7)::text), 4), 2, now() FROM generate_series(1, 500) i",
    );
    coordinator.backup("db1", "shop");
    let listed = backups(&coordinator);
    assert_eq!(listed.len(), 2);
    let (second_new, first_new) = (
        listed[0]["new_stored_bytes"].as_u64().unwrap(),
        listed[1]["new_stored_bytes"].as_u64().unwrap(),
    );
    assert!(
        second_new * 4 < first_new,
        "second backup stored {second_new} new bytes, the first {first_new}"
    );

    // With only the bucket and the master key, an empty catalog gets both
    // backups back.
    agent.stop();
    coordinator.stop();
    coordinator.move_catalog_aside(test_dir.path());
    let rebuilt = coordinator
        .cli(&[
            "repository",
            "rebuild-catalog",
            "--config",
            config.to_str().unwrap(),
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    assert_eq!(rebuilt["backups"], 2, "{rebuilt}");
    assert!(
        rebuilt["repository"].as_str().unwrap().contains(BUCKET),
        "{rebuilt}"
    );
    coordinator.start_again();
    let ids: Vec<&str> = listed.iter().map(|b| b["id"].as_str().unwrap()).collect();
    let relisted = backups(&coordinator);
    let reids: Vec<&str> = relisted.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(reids, ids);
}

#[test]
fn repository_init_refuses_a_prefix_with_data_and_names_a_missing_bucket() {
    let test_dir = TestDir::new("s3_repository_init");
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let secret_file = server.write_secret_file(test_dir.path());
    let mut coordinator = Coordinator::start(&test_dir);
    coordinator.stop();
    let config_path = coordinator.config_path();
    let config = std::fs::read_to_string(&config_path).unwrap();
    let local = "[repository]\nkind = \"local\"\npath = \"repository\"\n";
    let init = |table: &str| {
        std::fs::write(&config_path, config.replace(local, table)).unwrap();
        coordinator.cli(&[
            "repository",
            "init",
            "--config",
            config_path.to_str().unwrap(),
        ])
    };

    let missing = repository_table(&server, &secret_file).replace(BUCKET, "no-such-bucket");
    let output = init(&missing);
    assert!(
        !output.success() && output.stderr.contains("no-such-bucket"),
        "{output}"
    );

    // Strangers' objects under the prefix: refused, nothing written.
    let stranger = server
        .data_dir()
        .join(BUCKET)
        .join(PREFIX)
        .join("chunks/ab");
    std::fs::create_dir_all(&stranger).unwrap();
    std::fs::write(stranger.join("abcdef"), b"not ours").unwrap();
    let output = init(&repository_table(&server, &secret_file));
    assert!(
        !output.success() && output.stderr.contains("already holds backup data"),
        "{output}"
    );
    assert!(!objects(&server, "").contains(&"cairn-repository.json".to_string()));

    // `cairn serve` on a bucket without a repository says how to make one.
    let refused = coordinator.try_start_again().unwrap_err();
    assert!(refused.contains("cairn repository init"), "{refused}");
}

#[test]
fn retention_deletes_a_removed_backups_manifest_from_s3() {
    let test_dir = TestDir::new("s3_retention");
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let secret_file = server.write_secret_file(test_dir.path());
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 2);
    let coordinator = Coordinator::start_with(
        &test_dir,
        CoordinatorOptions {
            repository_table: Some(repository_table(&server, &secret_file)),
            ..CoordinatorOptions::default()
        },
    );
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let older = coordinator.backup("db1", "shop");
    let newer = coordinator.backup("db1", "shop");
    let manifests = |server: &S3Server| objects(server, "manifests/");
    assert_eq!(
        manifests(&server),
        [format!("manifests/{older}"), format!("manifests/{newer}")]
    );
    let chunks_before = objects(&server, "chunks/");

    coordinator
        .cli(&["retention", "create", "newest", "--keep-last", "1"])
        .assert_success();
    let applied = coordinator.cli_json(&["retention", "apply", "--policy", "newest"]);
    assert_eq!(applied["lineages"][0]["deleted"], 1, "{applied}");
    assert_eq!(manifests(&server), [format!("manifests/{newer}")]);
    let listed: Vec<Value> = backups(&coordinator)
        .into_iter()
        .map(|b| b["id"].clone())
        .collect();
    assert_eq!(listed, [Value::from(newer.clone())]);
    // Chunks are garbage collection's to delete, not retention's.
    assert_eq!(objects(&server, "chunks/"), chunks_before);
    coordinator
        .cli(&["backup", "verify", &newer])
        .assert_success();
}
