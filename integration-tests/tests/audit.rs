//! The audit log: security-relevant events are recorded, and an edited or
//! deleted row is caught by `cairn audit verify`, which names the first bad
//! row. Tampering goes straight at the SQLite file, as an attacker with the
//! file would.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use cairn_integration_tests::{AgentOptions, Coordinator, PgCluster, TestDir};
use serde_json::Value;
use sqlx::Connection;

fn actions(coordinator: &Coordinator) -> Vec<(String, String)> {
    let events = coordinator.cli_json(&["audit", "list", "--limit", "1000"]);
    events
        .as_array()
        .expect("audit list prints an array")
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_string(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn security_events_are_recorded_in_a_verifiable_chain() {
    let test_dir = TestDir::new("audit_records");
    let pg = PgCluster::start_in(&test_dir, "pg");
    let coordinator = Coordinator::start(&test_dir);
    let agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    coordinator.cli(&["probe", "db1"]).assert_success();
    // A refused call: the agent's identity on the Admin API.
    let identity = agent.dir().join("identity");
    coordinator
        .cli(&["agents", "list", "--identity", identity.to_str().unwrap()])
        .assert_failure();
    coordinator
        .cli(&["agents", "revoke", "db1"])
        .assert_success();

    let recorded = actions(&coordinator);
    for expected in [
        ("coordinator.init", "success"),
        ("coordinator.start", "success"),
        ("token.create", "success"),
        ("agent.enroll", "success"),
        ("agent.connect", "success"),
        ("agent.probe", "success"),
        ("admin.call", "refused"),
        ("agent.revoke", "success"),
    ] {
        assert!(
            recorded.contains(&(expected.0.to_string(), expected.1.to_string())),
            "no {expected:?} in the audit log: {recorded:?}"
        );
    }
    let report = coordinator.cli_json(&["audit", "verify"]);
    assert_eq!(report["ok"], Value::Bool(true), "{report}");
    assert!(report["rows_checked"].as_u64().unwrap() >= 8, "{report}");
}

/// Tampers with the catalog through SQL (dropping the append-only triggers
/// first, as someone holding the file can) and checks what verify says.
fn check_tampering(name: &str, tamper: &'static [&'static str], first_bad_row: i64) {
    let test_dir = TestDir::new(name);
    let coordinator = Coordinator::start(&test_dir);
    for agent in ["db1", "db2", "db3", "db4"] {
        coordinator.create_token(agent, "10m");
    }
    assert_eq!(
        coordinator.cli_json(&["audit", "verify"])["ok"],
        Value::Bool(true)
    );

    let catalog = coordinator.catalog_path();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let url = format!("sqlite://{}", catalog.display());
        let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
        // The triggers refuse the edit as long as they exist.
        let refused = sqlx::query("UPDATE audit_log SET detail = 'x' WHERE id = 1")
            .execute(&mut connection)
            .await;
        assert!(
            refused.is_err(),
            "the append-only trigger let an UPDATE through"
        );
        for statement in tamper {
            sqlx::query(*statement)
                .execute(&mut connection)
                .await
                .unwrap();
        }
        connection.close().await.unwrap();
    });

    let human = coordinator.cli(&["audit", "verify"]);
    assert_eq!(human.status_code, Some(1), "verify must fail: {human}");
    assert!(
        human.stdout.contains(&format!("row {first_bad_row}")),
        "verify must name row {first_bad_row}: {human}"
    );
    let json = coordinator
        .cli(&["audit", "verify", "--output", "json"])
        .json();
    assert_eq!(json["ok"], Value::Bool(false), "{json}");
    assert_eq!(json["first_bad_row"], Value::from(first_bad_row), "{json}");
}

#[test]
fn an_edited_row_is_named() {
    check_tampering(
        "audit_edited_row",
        &[
            "DROP TRIGGER audit_log_no_update",
            "UPDATE audit_log SET detail = 'nothing happened' WHERE id = 3",
        ],
        3,
    );
}

#[test]
fn a_deleted_row_breaks_the_next_link() {
    check_tampering(
        "audit_deleted_row",
        &[
            "DROP TRIGGER audit_log_no_delete",
            "DELETE FROM audit_log WHERE id = 2",
        ],
        3,
    );
}

#[test]
fn a_rehashed_row_still_breaks_the_chain() {
    // Changing the actor and recomputing nothing else: the stored hash no
    // longer matches. Even an attacker who recomputes the row's own hash
    // breaks the next row's link (unit-tested in coordinator::audit).
    check_tampering(
        "audit_forged_actor",
        &[
            "DROP TRIGGER audit_log_no_update",
            "UPDATE audit_log SET actor = 'operator:mallory(admin)' WHERE id = 4",
        ],
        4,
    );
}
