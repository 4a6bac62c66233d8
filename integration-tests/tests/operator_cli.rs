//! What a new operator sees: the CLI's plain answers (ids, sizes, names and
//! durations as written), its refusals (a repeated tag, the last admin),
//! the break-glass issue of an admin identity, enrollment into a directory
//! made beforehand, and logs without colour codes when they go to a file.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use cairn_integration_tests::privileges::{create_dir_for_postgres, create_dir_world_readable};
use cairn_integration_tests::{AgentOptions, Coordinator, Output, PgCluster, TestDir, wait_until};
use serde_json::Value;

const WEIRD_DATABASE: &str = "we'ird \"db\" name";

fn ratio(backup: &Value, key: &str) -> f64 {
    backup[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {backup}"))
}

/// How often `needle` occurs in `text`.
fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn backups_jobs_and_restores_answer_plainly() {
    let test_dir = TestDir::new("operator_cli_plain");
    let pg = PgCluster::start_in(&test_dir, "main");
    pg.create_sample_database("shop", 4);
    let coordinator = Coordinator::start(&test_dir);
    let agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );

    // The first backup: compression and dedup are reported apart. Nothing
    // was stored before, so dedup saves nothing (1.0x); compression does.
    let waited = coordinator
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
    assert!(
        waited.stdout.contains("compression (") || waited.stdout.contains("after compression"),
        "the summary does not report compression: {waited}"
    );
    assert!(
        waited.stdout.contains("dedup 1.0x"),
        "the first backup's dedup is not 1.0x: {waited}"
    );
    let listed = coordinator.cli_json(&["backups", "list"]);
    let first = &listed[0];
    let backup_id = first["id"].as_str().unwrap().to_string();
    assert!(
        ratio(first, "compression_ratio") > 1.2,
        "the sample data compresses: {first}"
    );
    assert!(
        (ratio(first, "dedup_ratio") - 1.0).abs() < 0.05,
        "a first backup deduplicates nothing: {first}"
    );
    let table = coordinator.cli(&["backups", "list"]).assert_success();
    assert!(
        table.stdout.contains("COMPRESSION") && table.stdout.contains("DEDUP"),
        "{table}"
    );

    // `backups show` is for people unless --output json.
    let shown = coordinator
        .cli(&["backups", "show", &backup_id])
        .assert_success();
    assert!(
        !shown.stdout.trim_start().starts_with('{')
            && shown.stdout.contains(&backup_id)
            && shown.stdout.contains("compression")
            && shown.stdout.contains("dedup"),
        "backups show is not a human view: {shown}"
    );
    let shown_json = coordinator.cli_json(&["backups", "show", &backup_id]);
    assert_eq!(shown_json["id"], backup_id.as_str());

    // Without --wait: the job id, and how to follow that very job.
    let started = coordinator
        .cli(&["backup", "run", "--agent", "db1", "--database", "shop"])
        .assert_success();
    let job_id = started.stdout.trim().to_string();
    assert!(!job_id.is_empty(), "{started}");
    assert!(
        started
            .stderr
            .contains(&format!("Follow with: cairn jobs watch {job_id}")),
        "the follow hint does not name the job: {started}"
    );
    coordinator
        .cli(&["jobs", "watch", &job_id])
        .assert_success();

    // A backup job that fails never completes its backup: jobs list and
    // jobs show say so instead of naming a backup that does not exist.
    let failed = coordinator
        .cli(&[
            "backup",
            "run",
            "--agent",
            "db1",
            "--database",
            "no_such_database",
            "--wait",
            "--output",
            "json",
        ])
        .assert_failure();
    let failed_job = &failed.json()[0];
    assert_eq!(failed_job["status"], "failed", "{failed_job}");
    let failed_id = failed_job["id"].as_str().unwrap();
    let reserved_backup = failed_job["backup_id"].as_str().unwrap();
    for args in [vec!["jobs", "list"], vec!["jobs", "show", failed_id]] {
        let output = coordinator.cli(&args).assert_success();
        let row = output
            .stdout
            .lines()
            .find(|line| line.contains(failed_id))
            .unwrap_or_else(|| panic!("no row for {failed_id}: {output}"));
        assert!(
            row.contains("(not completed)") && !output.stdout.contains(reserved_backup),
            "the failed job names a backup that does not exist: {output}"
        );
    }

    // A key given twice is refused by name, before anything starts.
    let twice = coordinator.cli(&[
        "backup",
        "run",
        "--agent",
        "db1",
        "--database",
        "shop",
        "--tag",
        "k=a",
        "--tag",
        "k=b",
    ]);
    assert!(
        !twice.success() && twice.stderr.contains("--tag k is given twice"),
        "{twice}"
    );

    // Durations are echoed as written, in whole units.
    let ttl = coordinator.cli(&["token", "create", "--agent", "db9", "--ttl", "100d"]);
    assert!(
        !ttl.success() && ttl.stderr.contains("--ttl 100d") && ttl.stderr.contains("7d"),
        "{ttl}"
    );
    assert!(!ttl.stderr.contains("months"), "{ttl}");
    let config = std::fs::read_to_string(coordinator.config_path()).unwrap();
    assert!(
        config.contains("agent_certificate_lifetime = \"365d\""),
        "{config}"
    );

    // The database set aside by --replace is named as SQL spells it.
    pg.create_database(WEIRD_DATABASE);
    pg.psql(WEIRD_DATABASE, "CREATE TABLE keep_me (x int)");
    let restored = coordinator
        .cli(&[
            "restore",
            &backup_id,
            "--agent",
            "db1",
            "--database",
            WEIRD_DATABASE,
            "--replace",
            "--wait",
        ])
        .assert_success();
    assert!(
        restored
            .stdout
            .contains("kept as \"we'ird \"\"db\"\" name_previous_")
            && !restored.stdout.contains("\\\""),
        "the set-aside database is not named as SQL spells it: {restored}"
    );

    // Logs written to files carry no colour codes.
    for (who, log) in [
        ("coordinator", coordinator.process().log()),
        ("agent", agent.process().log()),
    ] {
        assert!(!log.is_empty(), "the {who} logged nothing");
        assert!(
            !log.contains('\u{1b}'),
            "the {who}'s log file has ANSI escapes:\n{log}"
        );
    }

    // `cairn-agent enroll --dir` onto an existing empty directory that
    // belongs to the agent's user, in a parent it cannot write.
    let parent = test_dir.path().join("root-owned");
    create_dir_world_readable(&parent);
    let made_beforehand = parent.join("cairn-agent");
    create_dir_for_postgres(&made_beforehand);
    let token = coordinator.create_token("db2", "1h");
    let source_address = coordinator.next_source_address().to_string();
    let connstring = pg.connstring();
    let enrolled = coordinator.agent_cli(&[
        "enroll",
        "--coordinator",
        &coordinator.url(),
        "--token",
        &token,
        "--dir",
        made_beforehand.to_str().unwrap(),
        "--postgres",
        &connstring,
        "--source-address",
        &source_address,
    ]);
    assert!(enrolled.success(), "{enrolled}");
    let mut entries: Vec<String> = std::fs::read_dir(&made_beforehand)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["agent.toml", "identity"], "{enrolled}");
    assert_eq!(
        std::fs::read_dir(&parent).unwrap().count(),
        1,
        "nothing staged beside it"
    );

    // A revoked agent says it was revoked and must be re-enrolled.
    let log_before = agent.process().log().len();
    coordinator
        .cli(&["agents", "revoke", "db1"])
        .assert_success();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the revoked agent to log that it must be re-enrolled",
        || agent.process().log()[log_before..].contains("must be re-enrolled"),
    );
}

#[test]
fn the_last_admin_cannot_be_revoked_and_break_glass_issues_one_offline() {
    let test_dir = TestDir::new("operator_cli_last_admin");
    let coordinator = Coordinator::start(&test_dir);

    let refused = coordinator.cli(&["operators", "revoke", "admin"]);
    assert!(
        !refused.success() && refused.stderr.contains("last admin"),
        "the only admin revoked itself: {refused}"
    );

    // Break-glass, on the coordinator host while it runs: the CA on disk
    // signs, the catalog records it, the audit log shows it.
    let rescue = test_dir.path().join("rescue");
    let config = coordinator.config_path();
    coordinator
        .cli(&[
            "operators",
            "issue",
            "--offline",
            "--config",
            config.to_str().unwrap(),
            "--name",
            "rescue",
            "--role",
            "admin",
            "--out",
            rescue.to_str().unwrap(),
        ])
        .assert_success();
    let as_rescue = |args: &[&str]| -> Output {
        let mut all = args.to_vec();
        all.extend(["--identity", rescue.to_str().unwrap()]);
        coordinator.cli(&all)
    };
    let events = as_rescue(&["audit", "list", "--output", "json"])
        .assert_success()
        .json();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "operator.issue"
                && e["target"] == "operator:rescue(admin)"
                && e["actor"].as_str().unwrap_or_default().contains("offline")),
        "the offline issue is not audited: {events:#}"
    );

    // With a second admin, the first can go; then the second is the last.
    as_rescue(&["operators", "revoke", "admin"]).assert_success();
    let last = as_rescue(&["operators", "revoke", "rescue"]);
    assert!(
        !last.success() && last.stderr.contains("last admin"),
        "{last}"
    );
    as_rescue(&["agents", "list"]).assert_success();
    let events = as_rescue(&["audit", "list", "--output", "json"])
        .assert_success()
        .json();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "operator.revoke"
                && e["outcome"] == "refused"
                && e["target"] == "operator:rescue"),
        "the refused revocation is not audited: {events:#}"
    );
}

#[test]
fn a_missing_file_is_named_once_with_its_cause() {
    let test_dir = TestDir::new("operator_cli_cause_once");
    let coordinator = Coordinator::start(&test_dir);
    let missing = test_dir.path().join("no-identity");
    let output = coordinator.cli(&["agents", "list", "--identity", missing.to_str().unwrap()]);
    assert!(!output.success(), "{output}");
    assert!(output.stderr.contains("ca.pem"), "{output}");
    assert_eq!(count(&output.stderr, "(os error"), 1, "{output}");

    // The agent: enrolling under a path whose parent is a file.
    let file = test_dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let token = coordinator.create_token("db1", "1h");
    let dir = file.join("agent");
    let output = coordinator.agent_cli(&[
        "enroll",
        "--coordinator",
        &coordinator.url(),
        "--token",
        &token,
        "--dir",
        dir.to_str().unwrap(),
        "--postgres",
        "host=/nonexistent user=postgres",
    ]);
    assert!(!output.success(), "{output}");
    assert_eq!(count(&output.stderr, "(os error"), 1, "{output}");
}
