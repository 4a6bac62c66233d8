//! `cairn repository check`: the catalog's dedup index is not trusted
//! blindly. A chunk object deleted from the repository is named with the
//! backup it damages; the damaged backup is shown and refused for restores;
//! the next backup of the same database uploads the chunk again and
//! verifies; a `--read-data` check finds a flipped byte and clears the
//! damage once the backup is whole again.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cairn_integration_tests::{AgentOptions, Coordinator, PgCluster, TestDir};
use serde_json::Value;

fn file_name(path: &std::path::Path) -> String {
    path.file_name().unwrap().to_str().unwrap().to_string()
}

/// `cairn repository check [--read-data] --output json`: (exit code, report).
fn check(coordinator: &Coordinator, read_data: bool) -> (Option<i32>, Value) {
    let mut args = vec!["repository", "check", "--output", "json"];
    if read_data {
        args.push("--read-data");
    }
    let output = coordinator.cli(&args);
    (output.status_code, output.json())
}

fn listed(coordinator: &Coordinator, id: &str) -> Value {
    coordinator
        .cli_json(&["backups", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("backup {id} is not listed"))
        .clone()
}

#[test]
fn a_lost_chunk_is_found_uploaded_again_and_its_backup_repaired() {
    let test_dir = TestDir::new("repository_check");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 16);
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    let first = coordinator.backup("db1", "shop");

    let (code, report) = check(&coordinator, false);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let stored = report["stored_chunks"].as_u64().unwrap();
    assert!(stored >= 2, "the dump and the globals: {report}");
    assert_eq!(report["referenced_chunks"].as_u64().unwrap(), stored);
    assert_eq!(report["unreferenced_count"], 0, "{report}");

    // A chunk both backups of the database share, found by hiding each in
    // turn from `backup verify` of both. A dump's first chunk holds the
    // time of the dump to the second, so the second backup waits for the
    // next second: then only chunks every later backup has too are shared.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = coordinator.backup("db1", "shop");
    let victim = coordinator
        .chunk_files()
        .into_iter()
        .find(|file| {
            let hidden = file.with_extension("hidden");
            std::fs::rename(file, &hidden).unwrap();
            let needed_by = |id: &str| {
                coordinator
                    .cli(&["backup", "verify", id, "--output", "json"])
                    .status_code
                    == Some(1)
            };
            let shared = needed_by(&first) && needed_by(&second);
            std::fs::rename(&hidden, file).unwrap();
            shared
        })
        .expect("the backups share a chunk");
    let victim_id = file_name(&victim);
    std::fs::remove_file(&victim).unwrap();

    let (code, report) = check(&coordinator, false);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["missing_count"], 1, "{report}");
    assert_eq!(report["missing"][0]["id"], victim_id.as_str(), "{report}");
    assert_eq!(report["unindexed_chunks"], 1, "{report}");
    let damaged: Vec<&str> = report["damaged_backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert!(
                d["reason"].as_str().unwrap().contains(&victim_id),
                "{report}"
            );
            d["backup_id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(damaged, {
        let mut both = vec![first.as_str(), second.as_str()];
        both.sort();
        both
    });
    // The human output names both too.
    let human = coordinator.cli(&["repository", "check"]);
    assert_eq!(human.status_code, Some(1), "{human}");
    assert!(
        human.stdout.contains(&victim_id) && human.stdout.contains(&first),
        "{human}"
    );

    // Shown damaged, never restorable.
    let backup = listed(&coordinator, &first);
    assert_eq!(backup["status"], "damaged", "{backup}");
    assert!(backup["damage"].as_str().unwrap().contains(&victim_id));
    let table = coordinator.cli(&["backups", "list"]).assert_success();
    assert!(table.stdout.contains("DAMAGED"), "{table}");
    let refused = coordinator.cli(&[
        "restore",
        &first,
        "--agent",
        "db1",
        "--database",
        "shop_copy",
        "--wait",
    ]);
    assert!(!refused.success(), "{refused}");
    assert!(refused.stderr.contains("damaged"), "{refused}");

    // The next backup of the same database uploads the lost chunk again
    // (the index no longer claims it), and verifies.
    let third = coordinator.backup("db1", "shop");
    assert!(victim.is_file(), "the lost chunk was not uploaded again");
    let verified = coordinator
        .cli(&["backup", "verify", &third, "--output", "json"])
        .assert_success()
        .json();
    assert_eq!(verified["ok"], true, "{verified}");

    // A full check reads every chunk: all good, the first backup whole again.
    let (code, report) = check(&coordinator, true);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["repaired_backups"], 2, "{report}");
    assert_eq!(report["damaged_count"], 0, "{report}");
    assert!(report["bytes_read"].as_u64().unwrap() > 0);
    assert_eq!(listed(&coordinator, &first)["status"], "complete");

    // A flipped byte (in the shared chunk) is found only by reading: every
    // backup is damaged.
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    let (code, report) = check(&coordinator, false);
    assert_eq!(
        code,
        Some(0),
        "a check without --read-data reads no chunk: {report}"
    );
    let (code, report) = check(&coordinator, true);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["corrupt_count"], 1, "{report}");
    assert_eq!(report["corrupt"][0]["id"], victim_id.as_str(), "{report}");
    let damaged: Vec<&str> = report["damaged_backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["backup_id"].as_str().unwrap())
        .collect();
    assert!(
        damaged.contains(&first.as_str()) && damaged.contains(&second.as_str()),
        "{report}"
    );
    // A check that reads nothing is still not ok while backups are damaged.
    let (code, report) = check(&coordinator, false);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["corrupt_count"], 0, "{report}");
    assert!(report["damaged_count"].as_u64().unwrap() >= 2, "{report}");

    // A backup whose manifest is gone is damaged too.
    std::fs::remove_file(coordinator.home().join("repository/manifests").join(&third)).unwrap();
    let (code, report) = check(&coordinator, false);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["missing_manifest_count"], 1, "{report}");
    assert_eq!(
        report["missing_manifests"][0]["id"],
        third.as_str(),
        "{report}"
    );
    assert_eq!(listed(&coordinator, &third)["status"], "damaged");
}

#[test]
fn rebuild_catalog_checks_that_every_chunk_exists() {
    let test_dir = TestDir::new("rebuild_checks_chunks");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 4);
    let mut coordinator = Coordinator::start(&test_dir);
    let mut agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let id = coordinator.backup("db1", "shop");
    agent.stop();
    coordinator.stop();

    coordinator.move_catalog_aside(test_dir.path());
    let victim = coordinator.chunk_files().remove(0);
    let victim_id = file_name(&victim);
    std::fs::remove_file(&victim).unwrap();
    let config = coordinator.config_path();
    let rebuilt = coordinator.cli(&[
        "repository",
        "rebuild-catalog",
        "--config",
        config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(rebuilt.status_code, Some(1), "{rebuilt}");
    let report = rebuilt.json();
    assert_eq!(report["backups"], 1, "{report}");
    assert_eq!(report["missing_chunks"], 1, "{report}");
    assert!(
        report["damaged_backups"][&id]
            .as_str()
            .unwrap()
            .contains(&victim_id),
        "{report}"
    );

    // The rebuilt catalog lists the backup as damaged and does not claim the
    // lost chunk: a check agrees and finds nothing new to remove.
    coordinator.start_again();
    assert_eq!(listed(&coordinator, &id)["status"], "damaged");
    let (code, report) = check(&coordinator, false);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["unindexed_chunks"], 0, "{report}");
    assert_eq!(report["missing"][0]["id"], victim_id.as_str(), "{report}");
}
