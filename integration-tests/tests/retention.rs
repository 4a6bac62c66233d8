//! Retention on the real binaries. `cairn retention simulate` offline (no
//! coordinator, no config, no identity): a year of daily backups through a
//! GFS policy (table and JSON), standard input with a time zone, and
//! refusals. Then against a coordinator and real backups: `retention
//! apply` (dry run, then real: manifests gone, the kept backups verify, a
//! protected one survives), a schedule's policy applied after each of its
//! backups, and one lineage across a primary and its standby.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use std::time::Duration;

use cairn_integration_tests::process::run_with_stdin;
use cairn_integration_tests::{
    AgentOptions, Coordinator, Output, PgCluster, TestDir, binaries, run, wait_for,
};
use chrono::Datelike as _;
use serde_json::Value;

const GFS: [&str; 8] = [
    "--keep-daily",
    "7",
    "--keep-weekly",
    "4",
    "--keep-monthly",
    "12",
    "--keep-yearly",
    "2",
];

/// What GFS keeps of 2025's dailies, worked out by hand (see the engine's
/// unit test `a_year_of_daily_backups_...` for the calendar reasoning).
const KEPT: [&str; 21] = [
    "2025-12-31",
    "2025-12-30",
    "2025-12-29",
    "2025-12-28",
    "2025-12-27",
    "2025-12-26",
    "2025-12-25",
    "2025-12-21",
    "2025-12-14",
    "2025-11-30",
    "2025-10-31",
    "2025-09-30",
    "2025-08-31",
    "2025-07-31",
    "2025-06-30",
    "2025-05-31",
    "2025-04-30",
    "2025-03-31",
    "2025-02-28",
    "2025-01-31",
    "2025-01-01",
];

/// The `cairn` binary with the environment cleared, so no coordinator
/// address or identity can be picked up: simulate needs neither.
fn cairn(args: &[&str]) -> Command {
    let mut command = Command::new(&binaries().cairn);
    command.env_clear().args(args);
    command
}

/// Writes 2025's dailies at 03:00 UTC, oldest first, with a comment and
/// blank lines between the months.
fn write_year(path: &Path) {
    let mut text = String::from("# one backup a day, 2025\n");
    let mut day = chrono::NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
    while day.year() == 2025 {
        if day.format("%d").to_string() == "01" {
            text.push_str(&format!("\n# {}\n", day.format("%B")));
        }
        text.push_str(&format!("{day}T03:00:00Z\n"));
        day = day.succ_opt().unwrap();
    }
    std::fs::write(path, text).unwrap();
}

fn simulate(times: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["retention", "simulate"];
    args.extend(GFS);
    args.extend(["--times", times.to_str().unwrap()]);
    args.extend(["--now", "2026-01-01T00:00:00Z"]);
    args.extend(extra);
    run(&mut cairn(&args))
}

#[test]
fn simulate_a_year_of_dailies_offline() {
    let test_dir = TestDir::new("retention_simulate_year");
    let times = test_dir.path().join("times.txt");
    write_year(&times);

    // The table: newest first, each with its fate and rules, then the sums.
    let table = simulate(&times, &[]).assert_success();
    let rows: Vec<&str> = table
        .stdout
        .lines()
        .filter(|line| line.contains("2025-"))
        .collect();
    assert_eq!(rows.len(), 365, "{table}");
    assert!(
        rows[0].contains("2025-12-31T03:00:00Z")
            && rows[0].contains("keep")
            && rows[0].contains("daily 2025-12-31, weekly 2026-W01, monthly 2025-12, yearly 2025"),
        "{table}"
    );
    assert!(rows[7].contains("2025-12-24T03:00:00Z") && rows[7].contains("remove"));
    assert!(
        rows[364].contains("2025-01-01T03:00:00Z") && rows[364].contains("oldest yearly 2025"),
        "{table}"
    );
    assert!(
        table.stdout.contains(
            "kept 21, removed 344 (--keep-daily 7 --keep-weekly 4 --keep-monthly 12 \
             --keep-yearly 2; periods in UTC; now 2026-01-01T00:00:00Z)"
        ),
        "{table}"
    );

    // JSON: an array of {time, fate, rules}, newest first.
    let json = simulate(&times, &["--output", "json"])
        .assert_success()
        .json();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 365);
    assert_eq!(
        entries[3],
        serde_json::json!({
            "time": "2025-12-28T03:00:00Z",
            "fate": "keep",
            "rules": ["daily 2025-12-28", "weekly 2025-W52"],
        })
    );
    let kept: Vec<String> = entries
        .iter()
        .filter(|e| e["fate"] == "keep")
        .map(|e| e["time"].as_str().unwrap()[..10].to_string())
        .collect();
    assert_eq!(kept, KEPT);
    for entry in entries.iter().filter(|e| e["fate"] == "remove") {
        assert_eq!(entry["rules"], Value::Array(Vec::new()), "{entry}");
    }
}

#[test]
fn simulate_reads_standard_input_in_a_time_zone() {
    // 23:30 UTC on Mar 4 is 00:30 on Mar 5 in Berlin: the newest of Mar 5
    // there is 10:00 UTC, and Mar 4's only backup is 22:00 UTC.
    let input = b"2026-03-04T22:00:00Z\n2026-03-04T23:30:00Z\n2026-03-05T10:00:00Z\n";
    let berlin = run_with_stdin(
        &mut cairn(&[
            "retention",
            "simulate",
            "--keep-daily",
            "2",
            "--timezone",
            "Europe/Berlin",
            "--times",
            "-",
            "--output",
            "json",
        ]),
        input,
    )
    .assert_success()
    .json();
    let fates: Vec<(&str, &str)> = berlin
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["time"].as_str().unwrap(), e["fate"].as_str().unwrap()))
        .collect();
    assert_eq!(
        fates,
        [
            ("2026-03-05T10:00:00Z", "keep"),
            ("2026-03-04T23:30:00Z", "remove"),
            ("2026-03-04T22:00:00Z", "keep"),
        ]
    );
    // The table shows the zone's own time too.
    let table = run_with_stdin(
        &mut cairn(&[
            "retention",
            "simulate",
            "--keep-daily",
            "2",
            "--timezone",
            "Europe/Berlin",
            "--times",
            "-",
        ]),
        input,
    )
    .assert_success();
    assert!(table.stdout.contains("2026-03-05 00:30:00 CET"), "{table}");
}

#[test]
fn simulate_refuses_a_bad_line_and_an_empty_policy() {
    let test_dir = TestDir::new("retention_simulate_refusals");
    let times = test_dir.path().join("times.txt");
    std::fs::write(
        &times,
        "2026-03-01T03:00:00Z\n# a comment\n2026-03-02 03:00\n2026-03-03T03:00:00Z\n",
    )
    .unwrap();
    let path = times.to_str().unwrap();

    let bad_line = run(&mut cairn(&[
        "retention",
        "simulate",
        "--keep-daily",
        "7",
        "--times",
        path,
    ]));
    assert!(!bad_line.success(), "{bad_line}");
    assert!(bad_line.stdout.is_empty(), "{bad_line}");
    let error = bad_line.stderr.trim();
    assert!(
        error.starts_with("error: ")
            && error.contains(&format!("{path} line 3"))
            && error.contains("\"2026-03-02 03:00\" is not an RFC 3339 time")
            && error.contains("such as 2026-03-04T03:00:00Z"),
        "{bad_line}"
    );

    let no_rule = run(&mut cairn(&[
        "retention",
        "simulate",
        "--min-keep",
        "3",
        "--times",
        path,
    ]));
    assert!(!no_rule.success(), "{no_rule}");
    assert!(
        no_rule.stderr.contains("at least one rule: --keep-last")
            && no_rule.stderr.contains("--min-keep is only a floor"),
        "{no_rule}"
    );
}

/// The ids `cairn backups list` shows, sorted.
fn listed(coordinator: &Coordinator) -> Vec<String> {
    let mut ids: Vec<String> = coordinator
        .cli_json(&["backups", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn sorted(ids: &[&String]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    ids.sort();
    ids
}

fn manifest_exists(coordinator: &Coordinator, id: &str) -> bool {
    coordinator
        .home()
        .join("repository")
        .join("manifests")
        .join(id)
        .exists()
}

/// Each backup of the one lineage an apply printed: (id, fate, kept by,
/// deleted).
fn fates(applied: &Value) -> Vec<(String, String, Vec<String>, bool)> {
    let lineages = applied["lineages"].as_array().unwrap();
    assert_eq!(lineages.len(), 1, "{applied}");
    lineages[0]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["fate"].as_str().unwrap().to_string(),
                b["kept_by"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
                b["deleted"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn apply_deletes_what_the_policy_removes_and_keeps_the_rest_restorable() {
    let test_dir = TestDir::new("retention_apply");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 2);
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let ids: Vec<String> = (0..4).map(|_| coordinator.backup("db1", "shop")).collect();
    let [b1, b2, b3, b4] = [&ids[0], &ids[1], &ids[2], &ids[3]];

    // The lineage is the cluster's system identifier and the database.
    let system_identifier = pg.psql(
        "postgres",
        "SELECT system_identifier FROM pg_control_system()",
    );
    let shown = coordinator.cli_json(&["backups", "show", b1]);
    assert_eq!(
        shown["system_identifier"],
        system_identifier.trim(),
        "{shown}"
    );
    assert_eq!(
        shown["lineage"],
        format!("cluster {} database shop", system_identifier.trim()),
        "{shown}"
    );
    let table = coordinator.cli(&["backups", "show", b1]).assert_success();
    assert!(table.stdout.contains("lineage: cluster"), "{table}");

    coordinator
        .cli(&["backups", "protect", b1])
        .assert_success();
    assert_eq!(
        coordinator.cli_json(&["backups", "show", b1])["protected"],
        true
    );
    let empty = coordinator.cli(&["retention", "create", "nothing"]);
    assert_eq!(empty.status_code, Some(1), "{empty}");
    assert!(empty.stderr.contains("--keep-last"), "{empty}");
    coordinator
        .cli(&["retention", "create", "short", "--keep-last", "2"])
        .assert_success();
    let shown = coordinator.cli_json(&["retention", "show", "short"]);
    assert_eq!(shown["policy"]["keep_last"], 2, "{shown}");
    let policies = coordinator.cli_json(&["retention", "list"]);
    assert_eq!(policies[0]["name"], "short", "{policies}");

    // simulate --policy reads the stored policy and tries it locally.
    let times = test_dir.path().join("times.txt");
    std::fs::write(
        &times,
        "2026-01-01T00:00:00Z\n2026-01-02T00:00:00Z\n2026-01-03T00:00:00Z\n",
    )
    .unwrap();
    let simulated = coordinator.cli_json(&[
        "retention",
        "simulate",
        "--policy",
        "short",
        "--times",
        times.to_str().unwrap(),
        "--now",
        "2026-02-01T00:00:00Z",
    ]);
    let simulated_fates: Vec<&str> = simulated
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["fate"].as_str().unwrap())
        .collect();
    assert_eq!(simulated_fates, ["keep", "keep", "remove"], "{simulated}");
    let both = coordinator.cli(&[
        "retention",
        "simulate",
        "--policy",
        "short",
        "--keep-last",
        "1",
        "--times",
        "-",
    ]);
    assert_eq!(both.status_code, Some(2), "{both}");

    // A viewer may look (a dry run) but not delete.
    let viewer = test_dir.path().join("viewer");
    coordinator.issue_operator("vera", "viewer", &viewer);
    coordinator
        .cli_as(
            &viewer,
            &["retention", "apply", "--policy", "short", "--dry-run"],
        )
        .assert_success();
    let denied = coordinator.cli_as(&viewer, &["retention", "apply", "--policy", "short"]);
    assert_eq!(denied.status_code, Some(1), "{denied}");
    assert!(denied.stderr.contains("operator"), "{denied}");
    assert_eq!(listed(&coordinator).len(), 4);

    // A dry run shows every fate and what keeps each; nothing goes.
    let dry = coordinator.cli_json(&["retention", "apply", "--policy", "short", "--dry-run"]);
    let strings = |items: &[&str]| items.iter().map(ToString::to_string).collect::<Vec<_>>();
    let expected = vec![
        (
            b4.clone(),
            "keep".to_string(),
            strings(&[
                "last 1",
                "guard: newest complete backup",
                "guard: no newer complete backup",
            ]),
            false,
        ),
        (b3.clone(), "keep".to_string(), strings(&["last 2"]), false),
        (b2.clone(), "remove".to_string(), vec![], false),
        (
            b1.clone(),
            "keep".to_string(),
            strings(&["guard: protected"]),
            false,
        ),
    ];
    assert_eq!(fates(&dry), expected, "{dry}");
    assert_eq!(listed(&coordinator), sorted(&[b1, b2, b3, b4]));
    assert!(manifest_exists(&coordinator, b2));
    let table = coordinator
        .cli(&["retention", "apply", "--policy", "short", "--dry-run"])
        .assert_success();
    assert!(
        table.stdout.contains("would be removed (dry run)"),
        "{table}"
    );

    // The real run deletes b2: listing, manifest and all.
    let applied = coordinator.cli_json(&["retention", "apply", "--policy", "short"]);
    let mut expected = expected;
    expected[2].3 = true;
    assert_eq!(fates(&applied), expected, "{applied}");
    assert_eq!(listed(&coordinator), sorted(&[b1, b3, b4]));
    assert!(!manifest_exists(&coordinator, b2));
    for kept in [b1, b3, b4] {
        assert!(manifest_exists(&coordinator, kept), "{kept}");
    }
    for kept in [b1, b3] {
        let report = coordinator
            .cli(&["backup", "verify", kept, "--output", "json"])
            .assert_success()
            .json();
        assert_eq!(report["ok"], true, "{report}");
    }
    let gone = coordinator.cli(&["backups", "show", b2]);
    assert_eq!(gone.status_code, Some(1), "{gone}");

    let audit = coordinator.cli_json(&["audit", "list", "--limit", "50"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["action"].as_str().unwrap())
        .collect();
    for action in [
        "retention.create",
        "backup.protect",
        "retention.apply",
        "backup.delete",
    ] {
        assert!(actions.contains(&action), "{action} not in {actions:?}");
    }

    // Unprotected, b1 goes at the next run; the two newest stay.
    coordinator
        .cli(&["backups", "unprotect", b1])
        .assert_success();
    coordinator
        .cli(&["retention", "apply", "--policy", "short"])
        .assert_success();
    assert_eq!(listed(&coordinator), sorted(&[b3, b4]));
    coordinator
        .cli(&["retention", "delete", "short"])
        .assert_success();
}

#[test]
fn a_schedules_policy_runs_after_each_of_its_backups() {
    let test_dir = TestDir::new("retention_schedule");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 2);
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let by_hand = coordinator.backup("db1", "shop");

    let schedule = |retention: &str| {
        coordinator.cli(&[
            "schedule",
            "create",
            "yearly",
            "--agent",
            "db1",
            "--database",
            "shop",
            "--cron",
            "0 0 1 1 *",
            "--retention",
            retention,
        ])
    };
    let unknown = schedule("nope");
    assert_eq!(unknown.status_code, Some(1), "{unknown}");
    assert!(
        unknown.stderr.contains("cairn retention create nope"),
        "{unknown}"
    );
    coordinator
        .cli(&["retention", "create", "newest", "--keep-last", "1"])
        .assert_success();
    schedule("newest").assert_success();
    let shown = coordinator.cli_json(&["schedule", "show", "yearly"]);
    assert_eq!(shown["retention"], "newest", "{shown}");
    let refused = coordinator.cli(&["retention", "delete", "newest"]);
    assert_eq!(refused.status_code, Some(1), "{refused}");
    assert!(refused.stderr.contains("yearly"), "{refused}");

    // After the scheduled backup succeeds, the policy leaves only it.
    let jobs = coordinator.cli_json(&["schedule", "run-now", "yearly"]);
    let job = jobs[0]["id"].as_str().unwrap().to_string();
    let backup = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(250),
        "the scheduled backup",
        || {
            let shown = coordinator.cli_json(&["jobs", "show", &job]);
            (shown["status"] == "succeeded")
                .then(|| shown["backup_id"].as_str().unwrap().to_string())
        },
    );
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "retention after the backup",
        || (listed(&coordinator) == [backup.clone()]).then_some(()),
    );
    assert!(!manifest_exists(&coordinator, &by_hand));

    coordinator
        .cli(&["schedule", "update", "yearly", "--no-retention"])
        .assert_success();
    assert_eq!(
        coordinator.cli_json(&["schedule", "show", "yearly"])["retention"],
        Value::Null
    );
    coordinator
        .cli(&["retention", "delete", "newest"])
        .assert_success();
}

#[test]
fn a_standbys_backups_continue_its_primarys_lineage() {
    let test_dir = TestDir::new("retention_lineage");
    let primary = PgCluster::start_in(&test_dir, "primary");
    primary.create_sample_database("shop", 2);
    let standby = PgCluster::builder()
        .name("standby")
        .in_test_dir(&test_dir)
        .standby_of(&primary)
        .start();
    let mut coordinator = Coordinator::start(&test_dir);
    let _db1 = coordinator.enroll_agent("db1", &primary, AgentOptions::default().allow("backup"));
    let _db2 = coordinator.enroll_agent("db2", &standby, AgentOptions::default().allow("backup"));
    let from_primary = coordinator.backup("db1", "shop");
    let from_standby = coordinator.backup("db2", "shop");
    let lineage = |id: &str| coordinator.cli_json(&["backups", "show", id])["lineage"].clone();
    assert!(
        lineage(&from_primary)
            .as_str()
            .unwrap()
            .starts_with("cluster ")
    );
    assert_eq!(lineage(&from_primary), lineage(&from_standby));
    // The standby's agent reports the same identifier in its probes.
    let system_identifier =
        coordinator.cli_json(&["backups", "show", &from_primary])["system_identifier"].clone();
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "a probe of the standby with its system identifier",
        || {
            let shown = coordinator.cli_json(&["agents", "show", "db2"]);
            shown["probes"]
                .as_array()?
                .iter()
                .any(|probe| probe["system_identifier"] == system_identifier)
                .then_some(())
        },
    );

    // Applied to db2's backups, the policy sees the whole lineage: the
    // primary's older backup is the one removed.
    coordinator
        .cli(&["retention", "create", "newest", "--keep-last", "1"])
        .assert_success();
    let applied =
        coordinator.cli_json(&["retention", "apply", "--policy", "newest", "--agent", "db2"]);
    let deleted: Vec<(String, bool)> = fates(&applied)
        .into_iter()
        .map(|(id, _, _, deleted)| (id, deleted))
        .collect();
    assert_eq!(
        deleted,
        vec![(from_standby.clone(), false), (from_primary, true)],
        "{applied}"
    );
    assert_eq!(listed(&coordinator), std::slice::from_ref(&from_standby));

    // The lineage is in the manifest: a catalog rebuilt from the
    // repository keeps it.
    let before = lineage(&from_standby);
    coordinator.stop();
    coordinator.move_catalog_aside(test_dir.path());
    let config = coordinator.config_path();
    coordinator
        .cli(&[
            "repository",
            "rebuild-catalog",
            "--config",
            config.to_str().unwrap(),
        ])
        .assert_success();
    coordinator.start_again();
    assert_eq!(
        coordinator.cli_json(&["backups", "show", &from_standby])["lineage"],
        before
    );
}
