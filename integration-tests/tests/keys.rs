//! The master key end to end: rotations that race each other, key slots,
//! and a recovery key that brings the backups back into a fresh home.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cairn_integration_tests::{AgentOptions, Coordinator, CoordinatorOptions, PgCluster, TestDir};

/// Restores `backup` on `agent` into `database` and returns the row count
/// of its `orders` table there.
fn restore_and_count(
    coordinator: &Coordinator,
    pg: &PgCluster,
    backup: &str,
    agent: &str,
    database: &str,
) -> String {
    let job = coordinator
        .cli(&[
            "restore",
            backup,
            "--agent",
            agent,
            "--database",
            database,
            "--wait",
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    assert_eq!(job["status"], "succeeded", "{job}");
    pg.psql(database, "SELECT count(*) FROM orders")
        .trim()
        .to_string()
}

#[test]
fn racing_rotations_then_a_restart_keep_old_backups_restorable() {
    let test_dir = TestDir::new("keys_racing_rotations");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 2);
    let expected = pg
        .psql("shop", "SELECT count(*) FROM orders")
        .trim()
        .to_string();
    let mut coordinator = Coordinator::start(&test_dir);
    let agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    let backup = coordinator.backup("db1", "shop");

    // Six rotations at once, thirty times: one at a time gets through, the
    // others are told a rotation is in progress.
    for round in 0..30 {
        let outputs: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6)
                .map(|_| scope.spawn(|| coordinator.cli(&["keys", "rotate", "--output", "json"])))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let succeeded = outputs.iter().filter(|o| o.success()).count();
        assert!(succeeded >= 1, "round {round}: no rotation succeeded");
        for output in outputs.iter().filter(|o| !o.success()) {
            assert!(
                output.stderr.contains("rotation is in progress"),
                "round {round}: {output}"
            );
        }
    }

    coordinator.restart();
    coordinator.wait_until_online(&agent);
    let slots = coordinator.cli_json(&["keys", "list"]);
    assert_eq!(
        slots.as_array().unwrap().len(),
        1,
        "every rotation replaces its slot: {slots}"
    );
    assert_eq!(
        restore_and_count(&coordinator, &pg, &backup, "db1", "restored"),
        expected
    );
}

#[test]
fn a_recovery_key_alone_brings_every_backup_back_in_a_fresh_home() {
    let test_dir = TestDir::new("keys_recovery");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 2);
    let expected = pg
        .psql("shop", "SELECT count(*) FROM orders")
        .trim()
        .to_string();
    let mut old = Coordinator::start(&test_dir);
    let mut agent = old.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let first = old.backup("db1", "shop");

    // A recovery key: written once, 0600, never over an existing file.
    let recovery = test_dir.path().join("recovery.key");
    let recovery_arg = recovery.to_str().unwrap();
    let added = old.cli_json(&["keys", "add", "--out", recovery_arg]);
    let recovery_id = added["id"].as_str().unwrap().to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&recovery).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = std::fs::read(&recovery).unwrap();
    let again = old.cli(&["keys", "add", "--out", recovery_arg]);
    assert!(
        !again.success() && again.stderr.contains("already exists"),
        "{again}"
    );
    assert_eq!(std::fs::read(&recovery).unwrap(), key, "overwritten");

    let slots = old.cli_json(&["keys", "list"]);
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 2, "{slots:?}");
    let own = slots.iter().find(|s| s["in_use"] == true).unwrap();
    let listed_recovery = slots
        .iter()
        .find(|s| s["id"] == recovery_id.as_str())
        .unwrap();
    assert_eq!(listed_recovery["purpose"], "recovery");
    assert_eq!(listed_recovery["in_use"], false);
    let refused = old.cli(&["keys", "remove", own["id"].as_str().unwrap()]);
    assert!(
        !refused.success() && refused.stderr.contains("coordinator's own"),
        "{refused}"
    );

    // A rotation replaces the coordinator's key only: the recovery slot
    // stays. Backups before and after it are both recoverable below.
    old.cli_json(&["keys", "rotate"]);
    let second = old.backup("db1", "shop");
    let events = old.cli_json(&["audit", "list", "--limit", "200"]);
    for action in ["keys.add", "keys.rotate"] {
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == action && e["outcome"] == "success"),
            "{action} not audited: {events}"
        );
    }
    // The recovery key is in its file and nowhere else: not in the audit,
    // not in any log (the coordinator's, the CLI's).
    let key_text = String::from_utf8(key.clone()).unwrap();
    let key_text = key_text.trim();
    assert!(
        !events.to_string().contains(key_text),
        "the key is in the audit"
    );
    for entry in std::fs::read_dir(test_dir.logs_dir()).unwrap() {
        let path = entry.unwrap().path();
        let log = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        assert!(!log.contains(key_text), "the key is in {}", path.display());
    }
    agent.stop();
    old.stop();

    // A fresh home (its own CA, catalog and master key) pointed at the old
    // repository, with nothing else from the old host but the recovery key.
    let mut fresh = Coordinator::start_with(
        &test_dir,
        CoordinatorOptions {
            name: "fresh".to_string(),
            ..CoordinatorOptions::default()
        },
    );
    fresh.stop();
    let config = fresh.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    let repository = old.home().join("repository");
    assert!(text.contains("path = \"repository\""), "{text}");
    std::fs::write(
        &config,
        text.replace(
            "path = \"repository\"",
            &format!("path = {:?}", repository.to_str().unwrap()),
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let without = fresh.cli(&["repository", "rebuild-catalog", "--config", config_arg]);
    assert!(
        !without.success() && without.stderr.contains("no key slot"),
        "the fresh home's own key must not open it: {without}"
    );
    let rebuilt = fresh
        .cli(&[
            "repository",
            "rebuild-catalog",
            "--config",
            config_arg,
            "--master-key",
            recovery_arg,
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    assert_eq!(rebuilt["backups"], 2, "{rebuilt}");

    // The coordinator runs on the recovery key; an old backup restores.
    let master_key = fresh.home().join("master.key");
    std::fs::write(&master_key, &key).unwrap();
    fresh.start_again();
    let listed = fresh.cli_json(&["backups", "list"]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&first.as_str()) && ids.contains(&second.as_str()),
        "{listed}"
    );
    let _restorer = fresh.enroll_agent("db9", &pg, AgentOptions::default().allow("restore"));
    assert_eq!(
        restore_and_count(&fresh, &pg, &first, "db9", "recovered"),
        expected
    );

    // A rotation away from the recovery key keeps its slot: the copy in the
    // operators' safe still opens the repository.
    fresh.cli(&["keys", "rotate"]).assert_success();
    let slots = fresh.cli_json(&["keys", "list"]);
    assert!(
        slots
            .as_array()
            .unwrap()
            .iter()
            .any(|slot| slot["id"] == recovery_id.as_str()),
        "the recovery slot was removed by a rotation: {slots}"
    );
    assert!(
        slots
            .as_array()
            .unwrap()
            .iter()
            .any(|slot| slot["in_use"] == true && slot["id"] != recovery_id.as_str()),
        "the coordinator does not run on a new key: {slots}"
    );

    // A second process on the same home is refused: it could resolve a
    // pending key under a rotation in progress.
    let second = fresh.cli(&["repository", "rebuild-catalog", "--config", config_arg]);
    assert!(
        !second.success() && second.stderr.contains("another cairn process"),
        "{second}"
    );
}
