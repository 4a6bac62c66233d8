//! Listings stay bounded however large the catalog: `backups list`,
//! `jobs list` and `audit list` are paged in SQL and the CLI follows the
//! pages (one answer of 20,000 backups would pass the CLI's 4 MiB receive
//! limit), and `audit verify` walks the chain a page at a time.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;

use cairn_coordinator::audit::{AuditEvent, Outcome};
use cairn_coordinator::catalog::Catalog;
use cairn_integration_tests::{Coordinator, TestDir};
use serde_json::Value;

const BACKUPS: usize = 20_000;
/// More than one page of `audit verify` (2,000 rows).
const AUDIT_ROWS: usize = 4_500;

/// 20,000 complete backups (and their succeeded jobs) straight into the
/// catalog, in one statement each; three share each start time, so pages
/// must break ties by id.
async fn fill_catalog(path: &std::path::Path) {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    for statement in [
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
         INSERT INTO jobs (id, kind, agent_name, instance, database, status, backup_id,
                           created_by, created_at, started_at, finished_at)
         SELECT printf('job-%05d', i), 'backup', 'db' || (i % 7), 'main', 'shop' || (i % 5),
                'succeeded', printf('bk-%05d', i), 'test', 1700000000000 + i / 3,
                1700000000000 + i / 3, 1700000000000 + i / 3 + 10
         FROM n",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
         INSERT INTO backups (id, job_id, agent_name, instance, database, status, started_at,
                              finished_at, logical_bytes, chunk_count, tags)
         SELECT printf('bk-%05d', i), printf('job-%05d', i), 'db' || (i % 7), 'main',
                'shop' || (i % 5), 'complete', 1700000000000 + i / 3,
                1700000000000 + i / 3 + 10, 1000 + i, 2,
                '{\"note\":\"a tag long enough to make every backup a few hundred bytes on the wire\"}'
         FROM n",
    ] {
        sqlx::query(statement)
            .bind(BACKUPS as i64)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    // Audit rows through the catalog itself: each is hash-chained.
    let catalog = Catalog::open_sqlite(path).await.unwrap();
    for i in 0..AUDIT_ROWS {
        catalog
            .append_audit(&AuditEvent::new(
                "test",
                "test.fill",
                format!("row {i}"),
                Outcome::Success,
                "",
            ))
            .await
            .unwrap();
    }
    catalog.close().await;
}

fn ids(listing: &Value) -> Vec<String> {
    listing
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_backups_are_listed_page_by_page() {
    let test_dir = TestDir::new("listings");
    let mut coordinator = Coordinator::start(&test_dir);
    coordinator.stop();
    fill_catalog(&coordinator.catalog_path()).await;
    coordinator.start_again();

    let coordinator = tokio::task::spawn_blocking(move || {
        // Every backup, newest first, each once.
        let all = coordinator.cli_json(&["backups", "list"]);
        let all_ids = ids(&all);
        assert_eq!(all_ids.len(), BACKUPS);
        assert_eq!(all_ids.iter().collect::<HashSet<_>>().len(), BACKUPS);
        let starts: Vec<(i64, String)> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    chrono::DateTime::parse_from_rfc3339(b["started_at"].as_str().unwrap())
                        .unwrap()
                        .timestamp_millis(),
                    b["id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(
            starts.windows(2).all(|pair| pair[0] > pair[1]),
            "not newest first"
        );

        // A limit across a page boundary is the head of the whole list; a
        // filter pages too.
        let head = coordinator.cli_json(&["backups", "list", "--limit", "1500"]);
        assert_eq!(ids(&head), all_ids[..1500]);
        let filtered = coordinator.cli_json(&["backups", "list", "--agent", "db3"]);
        let expected = all
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["agent"] == "db3")
            .count();
        assert_eq!(ids(&filtered).len(), expected);

        let jobs = coordinator.cli_json(&["jobs", "list", "--limit", "0"]);
        assert_eq!(ids(&jobs).len(), BACKUPS);
        let table = coordinator
            .cli(&["backups", "list", "--limit", "3"])
            .assert_success();
        assert!(table.stdout.contains("bk-20000"), "{table}");

        // The whole audit log, and its chain checked in pages.
        let audit = coordinator.cli_json(&["audit", "list", "--limit", "0"]);
        let rows = ids(&audit).len();
        assert!(rows > AUDIT_ROWS, "{rows}");
        let verified = coordinator.cli_json(&["audit", "verify"]);
        assert_eq!(verified["ok"], true, "{verified}");
        assert!(
            verified["rows_checked"].as_u64().unwrap() >= rows as u64,
            "{verified}"
        );
        coordinator
    })
    .await
    .unwrap();
    drop(coordinator);
}
