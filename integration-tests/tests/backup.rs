//! Backups end to end: real PostgreSQL, real binaries, the local repository.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cairn_integration_tests::{AgentOptions, Coordinator, PgCluster, TestDir, wait_for};
use serde_json::Value;

fn backups(coordinator: &Coordinator) -> Vec<Value> {
    coordinator
        .cli_json(&["backups", "list"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn backups_are_listed_complete_and_deduplicated() {
    let test_dir = TestDir::new("backup_dedup");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 48);
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));

    let first = coordinator
        .cli(&[
            "backup",
            "run",
            "--agent",
            "db1",
            "--database",
            "shop",
            "--wait",
            "--tag",
            "ticket=OPS-1",
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    assert_eq!(first[0]["status"], "succeeded", "{first}");
    let listed = backups(&coordinator);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let b1 = &listed[0];
    assert_eq!(b1["database"], "shop");
    assert_eq!(b1["tags"]["ticket"], "OPS-1");
    assert!(b1["chunk_count"].as_u64().unwrap() >= 2, "{b1}");
    assert!(b1["logical_bytes"].as_u64().unwrap() > 4 << 20, "{b1}");
    assert!(
        b1["server_version"].as_str().unwrap().starts_with("15"),
        "{b1}"
    );
    // The manifest and the chunks are in the repository, sealed.
    let id = b1["id"].as_str().unwrap();
    let manifest = coordinator.home().join("repository/manifests").join(id);
    assert!(manifest.is_file(), "no manifest at {}", manifest.display());
    let raw = std::fs::read(&manifest).unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains("shop"),
        "the manifest is not sealed"
    );

    // Append about 2% to one table: the second backup stores a fraction.
    pg.psql(
        "shop",
        "INSERT INTO orders (customer, note, amount, at)
           SELECT md5(i::text), repeat(md5((i * 3)::text), 4), 1, now() FROM generate_series(1, 1000) i",
    );
    coordinator
        .cli(&[
            "backup",
            "run",
            "--agent",
            "db1",
            "--database",
            "shop",
            "--wait",
        ])
        .assert_success();
    let listed = backups(&coordinator);
    assert_eq!(listed.len(), 2);
    let (second, first) = (&listed[0], &listed[1]);
    let first_new = first["new_stored_bytes"].as_u64().unwrap();
    let second_new = second["new_stored_bytes"].as_u64().unwrap();
    assert!(
        second_new * 4 < first_new,
        "the second backup stored {second_new} new bytes, the first {first_new}"
    );
    assert!(second["chunk_count"].as_u64().unwrap() > second["new_chunk_count"].as_u64().unwrap());

    let show = coordinator.cli_json(&["backups", "show", id]);
    assert_eq!(show["id"], id);
    let jobs = coordinator.cli_json(&["jobs", "list"]);
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");
}

#[test]
fn failed_backups_are_never_listed_and_say_why() {
    let test_dir = TestDir::new("backup_failures");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_database("shop");
    let coordinator = Coordinator::start(&test_dir);
    let _allowed = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let _forbidden = coordinator.enroll_agent("db2", &pg, AgentOptions::default().allow("restore"));

    // (agent, database, what the error says)
    let cases = [
        ("db1", "nosuchdb", "does not exist"),
        ("db2", "shop", "does not permit backup"),
    ];
    for (agent, database, expected) in cases {
        let output = coordinator.cli(&[
            "backup",
            "run",
            "--agent",
            agent,
            "--database",
            database,
            "--wait",
        ]);
        assert_eq!(output.status_code, Some(1), "{output}");
        assert!(output.stderr.contains(expected), "{output}");
    }
    let unknown = coordinator.cli(&["backup", "run", "--agent", "nobody", "--database", "shop"]);
    assert!(
        !unknown.success() && unknown.stderr.contains("no agent named"),
        "{unknown}"
    );
    assert!(backups(&coordinator).is_empty());

    let jobs = coordinator.cli_json(&["jobs", "list"]);
    let statuses: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["failed", "failed"], "{jobs}");
    let events = coordinator.cli_json(&["audit", "list", "--limit", "200"]);
    let refused = events
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "agent.refused-command" && e["target"] == "db2");
    assert!(refused, "{events}");
}

#[test]
fn key_rotation_keeps_backups_and_the_catalog_rebuilds_from_the_repository() {
    let test_dir = TestDir::new("backup_keys_rebuild");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 8);
    let mut coordinator = Coordinator::start(&test_dir);
    let mut agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let run = |coordinator: &Coordinator| {
        coordinator
            .cli(&[
                "backup",
                "run",
                "--agent",
                "db1",
                "--database",
                "shop",
                "--wait",
            ])
            .assert_success();
    };
    run(&coordinator);

    let master_key = coordinator.home().join("master.key");
    let before = std::fs::read(&master_key).unwrap();
    let chunks_before = std::fs::read_dir(coordinator.home().join("repository/chunks"))
        .unwrap()
        .count();
    let rotated = coordinator.cli_json(&["keys", "rotate"]);
    assert_ne!(rotated["old_key_id"], rotated["new_key_id"], "{rotated}");
    assert_ne!(
        std::fs::read(&master_key).unwrap(),
        before,
        "master.key was not replaced"
    );
    // The coordinator restarts on the new key; the old backup is still
    // there and the next one deduplicates against it (same data keys).
    coordinator.restart();
    coordinator.wait_until_online(&agent);
    run(&coordinator);
    let listed = backups(&coordinator);
    assert_eq!(listed.len(), 2);
    assert!(
        listed[0]["new_chunk_count"].as_u64().unwrap() < listed[0]["chunk_count"].as_u64().unwrap()
    );
    let chunks_after = std::fs::read_dir(coordinator.home().join("repository/chunks"))
        .unwrap()
        .count();
    assert!(
        chunks_after >= chunks_before,
        "rotation must not rewrite or drop chunks"
    );
    let ids: Vec<String> = listed
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();

    // Only the repository and the master key: an empty catalog gets the
    // backups back; an altered manifest is reported, not trusted.
    agent.stop();
    coordinator.stop();
    coordinator.move_catalog_aside(test_dir.path());
    let tampered = coordinator
        .home()
        .join("repository/manifests")
        .join(&ids[1]);
    let mut bytes = std::fs::read(&tampered).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&tampered, &bytes).unwrap();
    let config = coordinator.config_path();
    let rebuilt = coordinator.cli(&[
        "repository",
        "rebuild-catalog",
        "--config",
        config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(
        rebuilt.status_code,
        Some(1),
        "an altered manifest must fail the rebuild: {rebuilt}"
    );
    let report = rebuilt.json();
    assert_eq!(report["backups"], 1, "{report}");
    assert!(
        report["problems"][0].as_str().unwrap().contains(&ids[1]),
        "{report}"
    );

    coordinator.start_again();
    let listed = backups(&coordinator);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], ids[0].as_str());
    assert_eq!(listed[0]["database"], "shop");
    // Not while the coordinator runs on this home, nor into a catalog that
    // holds backups.
    let rebuild = |coordinator: &Coordinator| {
        coordinator.cli(&[
            "repository",
            "rebuild-catalog",
            "--config",
            config.to_str().unwrap(),
        ])
    };
    let running = rebuild(&coordinator);
    assert!(
        !running.success() && running.stderr.contains("another cairn process"),
        "{running}"
    );
    coordinator.stop();
    let again = rebuild(&coordinator);
    assert!(
        !again.success() && again.stderr.contains("already holds backups"),
        "{again}"
    );
}

#[test]
fn all_databases_offline_agents_and_unreadable_databases() {
    let test_dir = TestDir::new("backup_all_offline");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_database("shop");
    pg.create_database("crm");
    // A role that may log in but not read `crm`'s table.
    pg.psql(
        "crm",
        "CREATE TABLE secrets (x int); INSERT INTO secrets VALUES (1);
         CREATE ROLE reader LOGIN; REVOKE ALL ON secrets FROM PUBLIC;",
    );
    let coordinator = Coordinator::start(&test_dir);
    let mut agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let reader = AgentOptions {
        postgres_connstring: Some(pg.connstring().replace("user=postgres", "user=reader")),
        ..AgentOptions::default()
    }
    .allow("backup");
    let _reader = coordinator.enroll_agent("db2", &pg, reader);
    // The latest probe lists the databases (it runs every second here).
    coordinator.cli(&["probe", "db1"]).assert_success();

    let jobs = coordinator
        .cli(&[
            "backup",
            "run",
            "--agent",
            "db1",
            "--all-databases",
            "--wait",
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    let mut databases: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["database"].as_str().unwrap())
        .collect();
    databases.sort();
    assert_eq!(databases, ["crm", "postgres", "shop"], "{jobs}");
    assert_eq!(backups(&coordinator).len(), 3);

    // A database the agent's role cannot read: pg_dump's own message.
    let denied = coordinator.cli(&[
        "backup",
        "run",
        "--agent",
        "db2",
        "--database",
        "crm",
        "--wait",
    ]);
    assert_eq!(denied.status_code, Some(1), "{denied}");
    assert!(denied.stderr.contains("permission denied"), "{denied}");

    // An offline agent: the job queues and says why it waits; not started
    // by its deadline, it ends `missed`, still saying why.
    agent.stop();
    coordinator.wait_for_agent_status("db1", "offline", std::time::Duration::from_secs(20));
    let queued = coordinator
        .cli(&[
            "backup",
            "run",
            "--agent",
            "db1",
            "--database",
            "shop",
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    let queued_id = queued[0]["id"].as_str().unwrap().to_string();
    assert_eq!(queued[0]["status"], "queued", "{queued}");
    let waiting = wait_for(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(200),
        "the queued job says it waits for the offline agent",
        || {
            let shown = coordinator
                .cli(&["jobs", "show", &queued_id, "--output", "json"])
                .assert_success()
                .json();
            shown["waiting_for"]
                .as_str()
                .is_some_and(|w| w.contains("db1 is offline"))
                .then_some(shown)
        },
    );
    assert_eq!(waiting["status"], "queued", "{waiting}");
    let offline = coordinator.cli(&[
        "backup",
        "run",
        "--agent",
        "db1",
        "--database",
        "shop",
        "--deadline",
        "2s",
        "--wait",
        "--output",
        "json",
    ]);
    assert_eq!(offline.status_code, Some(1), "{offline}");
    let job = &offline.json()[0];
    assert_eq!(job["status"], "missed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("offline"), "{job}");
    coordinator
        .cli(&["jobs", "cancel", &queued_id])
        .assert_success();
    let cancelled = coordinator
        .cli(&["jobs", "show", &queued_id, "--output", "json"])
        .assert_success()
        .json();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(backups(&coordinator).len(), 3);
}
