//! `cairn retention simulate`, the real binary, offline: no coordinator,
//! no config, no identity. A year of daily backups through a GFS policy
//! (table and JSON), standard input with a time zone, and refusals.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use cairn_integration_tests::process::run_with_stdin;
use cairn_integration_tests::{Output, TestDir, binaries, run};
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
