//! The job engine end to end: jobs queue, run within the limits of
//! `[jobs]` (one at a time per instance by default), say why they wait, and
//! end with their attempts recorded.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use cairn_integration_tests::{
    AgentOptions, Coordinator, PgCluster, TestDir, job_is_active, wait_for,
};
use chrono::{DateTime, Utc};
use serde_json::Value;

const POLL: Duration = Duration::from_millis(100);

fn time_of(job: &Value, field: &str) -> DateTime<Utc> {
    let text = job[field]
        .as_str()
        .unwrap_or_else(|| panic!("job has no {field}: {job}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{field} {text:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

#[test]
fn five_databases_on_one_instance_are_backed_up_one_at_a_time() {
    let test_dir = TestDir::new("five_databases_queue");
    let pg = PgCluster::start_in(&test_dir, "pg");
    let databases: Vec<String> = (1..=5).map(|i| format!("shop{i}")).collect();
    for database in &databases {
        pg.create_sample_database(database, 20);
    }
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));

    let mut args = vec!["backup", "run", "--agent", "db1"];
    for database in &databases {
        args.extend(["--database", database.as_str()]);
    }
    let queued = coordinator.cli_json(&args);
    let ids: Vec<String> = queued
        .as_array()
        .unwrap()
        .iter()
        .map(|job| {
            assert!(job_is_active(job), "{job}");
            job["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 5, "{queued}");

    // While one runs, the others wait, and say for what.
    let waiting = wait_for(
        Duration::from_secs(30),
        POLL,
        "a queued job waits for the busy instance",
        || {
            let list = coordinator.cli_json(&["jobs", "list"]);
            list.as_array()
                .unwrap()
                .iter()
                .find(|job| {
                    job["status"] == "queued"
                        && job["waiting_for"]
                            .as_str()
                            .is_some_and(|w| w.contains("jobs.max_per_instance"))
                })
                .cloned()
        },
    );
    assert!(
        waiting["waiting_for"]
            .as_str()
            .unwrap()
            .contains("db1/main"),
        "{waiting}"
    );

    let mut ended: Vec<Value> = ids
        .iter()
        .map(|id| {
            wait_for(
                Duration::from_secs(300),
                POLL,
                &format!("job {id} ends"),
                || {
                    let job = coordinator.cli_json(&["jobs", "show", id]);
                    (!job_is_active(&job)).then_some(job)
                },
            )
        })
        .collect();
    for job in &ended {
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    }
    // No two ran at once: each started after the one before it ended.
    ended.sort_by_key(|job| time_of(job, "started_at"));
    for pair in ended.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            time_of(after, "started_at") >= time_of(before, "finished_at"),
            "two backups of one instance overlapped:\n{before}\n{after}"
        );
    }
    let listed = coordinator.cli_json(&["backups", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(5), "{listed}");
}
