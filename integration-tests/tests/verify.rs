//! `cairn backup verify` without an agent: every chunk read from the
//! repository, authenticated, decrypted and re-hashed, the dump's rows
//! recounted; a tampered or missing chunk is named by position and id, and
//! the outcome shows in `cairn backups list`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cairn_integration_tests::{AgentOptions, Coordinator, PgCluster, TestDir};
use serde_json::Value;

fn listed(coordinator: &Coordinator, id: &str) -> Value {
    coordinator
        .cli_json(&["backups", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap()
        .clone()
}

#[test]
fn verify_checks_every_chunk_and_names_a_bad_one() {
    let test_dir = TestDir::new("verify_chunks");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 16);
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let id = coordinator.backup("db1", "shop");
    assert_eq!(listed(&coordinator, &id)["last_verification"], Value::Null);

    let report = coordinator
        .cli(&["backup", "verify", &id, "--output", "json"])
        .assert_success()
        .json();
    assert_eq!(report["ok"], true, "{report}");
    let backup = listed(&coordinator, &id);
    // Every dump chunk and the globals chunk.
    assert_eq!(
        report["chunks_checked"].as_u64().unwrap(),
        backup["chunk_count"].as_u64().unwrap(),
        "{report} {backup}"
    );
    assert!(report["bytes_checked"].as_u64().unwrap() >= backup["logical_bytes"].as_u64().unwrap());
    assert!(report["tables_checked"].as_u64().unwrap() >= 2, "{report}");
    let verification = &backup["last_verification"];
    assert_eq!(verification["ok"], true, "{backup}");
    assert_eq!(verification["method"], "chunks");
    let table = coordinator.cli(&["backups", "list"]).assert_success();
    assert!(table.stdout.contains("ok "), "{table}");

    // One byte flipped in one chunk: the check fails, names that chunk and
    // goes on to the end.
    let files = coordinator.chunk_files();
    let victim = &files[files.len() / 2];
    let victim_id = victim.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = std::fs::read(victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();
    let output = coordinator.cli(&["backup", "verify", &id, "--output", "json"]);
    assert_eq!(output.status_code, Some(1), "{output}");
    let report = output.json();
    assert_eq!(report["ok"], false);
    let bad = report["bad_chunks"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(bad[0]["id"], victim_id.as_str(), "{report}");
    assert_eq!(
        report["chunks_checked"].as_u64().unwrap(),
        backup["chunk_count"].as_u64().unwrap(),
        "every chunk is still checked: {report}"
    );
    let verification = &listed(&coordinator, &id)["last_verification"];
    assert_eq!(verification["ok"], false);
    assert!(
        verification["detail"]
            .as_str()
            .unwrap()
            .contains(&victim_id),
        "{verification}"
    );

    // A missing chunk is named too; the table output says NOT VERIFIED.
    std::fs::remove_file(victim).unwrap();
    let output = coordinator.cli(&["backup", "verify", &id]);
    assert_eq!(output.status_code, Some(1), "{output}");
    assert!(
        output.stdout.contains(&victim_id) && output.stdout.contains("NOT VERIFIED"),
        "{output}"
    );
    assert!(output.stdout.contains("does not exist"), "{output}");

    let unknown = coordinator.cli(&["backup", "verify", "bk-nope"]);
    assert!(
        !unknown.success() && unknown.stderr.contains("no complete backup bk-nope"),
        "{unknown}"
    );
    let events = coordinator.cli_json(&["audit", "list", "--limit", "100"]);
    let verifications = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "backup.verify")
        .count();
    assert!(verifications >= 3, "{events}");
}
