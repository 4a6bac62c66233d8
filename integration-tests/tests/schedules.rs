//! Fleet schedules end to end, on the real binaries and a real cron: a
//! schedule by label covers an agent enrolled after it was made, a
//! coordinator killed at a fire time fires it once, and `cairn coverage`
//! says what is and is not covered.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::time::Duration;

use cairn_integration_tests::{AgentOptions, Coordinator, PgCluster, TestDir, wait_for};
use serde_json::Value;

const POLL: Duration = Duration::from_millis(250);
/// A minutely schedule fires within this (a minute, the engine's tick, and
/// a small backup).
const FIRE_TIMEOUT: Duration = Duration::from_secs(150);

fn prod() -> AgentOptions {
    AgentOptions {
        labels: vec![("env".into(), "prod".into())],
        ..AgentOptions::default()
    }
    .allow("backup")
}

fn jobs_of(coordinator: &Coordinator) -> Vec<Value> {
    coordinator
        .cli_json(&["jobs", "list", "--limit", "0"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_schedule_by_label_covers_a_later_agent_and_a_restart_at_a_fire_fires_it_once() {
    let test_dir = TestDir::new("schedule_by_label");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database("shop", 2);
    let mut coordinator = Coordinator::start(&test_dir);
    let _db1 = coordinator.enroll_agent("db1", &pg, prod());

    let created = coordinator.cli_json(&[
        "schedule",
        "create",
        "minutely",
        "--selector",
        "env=prod",
        "--database",
        "shop",
        "--cron",
        "* * * * *",
        "--timezone",
        "Europe/Berlin",
        "--spread",
        "10s",
    ]);
    assert_eq!(created["name"], "minutely", "{created}");
    let shown = coordinator.cli_json(&["schedule", "show", "minutely"]);
    assert_eq!(
        shown["next_fires"].as_array().map(Vec::len),
        Some(5),
        "{shown}"
    );
    let targets: Vec<&str> = shown["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["agent"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["db1"], "{shown}");
    assert!(
        shown["targets"][0]["slot_offset_seconds"].as_u64().unwrap() < 10,
        "{shown}"
    );

    // Enrolled after the schedule, with its label: covered from the next
    // fire.
    let _db2 = coordinator.enroll_agent("db2", &pg, prod());
    let backed_up = |agent: &str| {
        jobs_of(&coordinator).into_iter().find(|job| {
            job["agent"] == agent
                && job["status"] == "succeeded"
                && job["schedule_id"].as_str().is_some_and(|s| !s.is_empty())
        })
    };
    for agent in ["db2", "db1"] {
        wait_for(
            FIRE_TIMEOUT,
            POLL,
            &format!("a scheduled backup of {agent}"),
            || backed_up(agent),
        );
    }

    // Killed right after a fire time, the coordinator comes back and the
    // fire is not made twice.
    wait_for(
        Duration::from_secs(70),
        Duration::from_millis(50),
        "a fire time",
        || {
            let second = chrono::Utc::now().timestamp() % 60;
            (second == 0).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    coordinator.kill();
    coordinator.start_again();
    let before = chrono::Utc::now();
    wait_for(FIRE_TIMEOUT, POLL, "a fire after the restart", || {
        jobs_of(&coordinator).into_iter().find(|job| {
            job["fire_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t > before)
        })
    });
    let mut per_fire: HashMap<(String, String), usize> = HashMap::new();
    for job in jobs_of(&coordinator) {
        if let (Some(target), Some(fire)) = (job["target"].as_str(), job["fire_at"].as_str()) {
            *per_fire
                .entry((target.to_string(), fire.to_string()))
                .or_default() += 1;
        }
    }
    assert!(!per_fire.is_empty());
    for ((target, fire), count) in &per_fire {
        assert_eq!(*count, 1, "{count} jobs for {target} at {fire}");
    }

    // Coverage: shop is covered on both agents, the other databases not;
    // exit 1 for the uncovered.
    let coverage = coordinator.cli(&["coverage", "--output", "json"]);
    assert_eq!(coverage.status_code, Some(1), "{coverage}");
    let rows = coverage.json();
    let row = |agent: &str, database: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["agent"] == agent && r["database"] == database)
            .cloned()
            .unwrap_or_else(|| panic!("no coverage row for {agent}/{database}: {rows}"))
    };
    for agent in ["db1", "db2"] {
        let shop = row(agent, "shop");
        assert_eq!(shop["covered"], true, "{shop}");
        assert_eq!(shop["schedules"][0], "minutely", "{shop}");
        assert!(
            shop["last_backup_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty()),
            "{shop}"
        );
        let postgres = row(agent, "postgres");
        assert_eq!(postgres["covered"], false, "{postgres}");
    }

    // Paused, it fires no more.
    coordinator
        .cli(&["schedule", "pause", "minutely"])
        .assert_success();
    let listed = coordinator.cli_json(&["schedule", "list"]);
    assert_eq!(listed[0]["paused"], true, "{listed}");
}
