//! The guards and the deletion steps of `retention apply`, on a real
//! SQLite catalog and a real local repository.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use cairn_common::crypto::SecretKey;
use chrono::{DateTime, Utc};

use super::apply::{ApplyRequest, Deleter, Deletion, Guard, Planned, Scope, guard, plan_lineage};
use super::{Fate, Policy};
use crate::audit::log::AuditLog;
use crate::catalog::{BackupStats, Catalog, JobKind, JobRecord, Lineage, LineageBackup};
use crate::repository::manifest::Manifest;
use crate::repository::{LocalStore, Repository, Store};

const SYSID: &str = "7345678901234567890";
const HOUR_MS: i64 = 3_600_000;

struct Fixture {
    _dir: tempfile::TempDir,
    catalog: Arc<Catalog>,
    repository: Arc<Repository>,
    audit: AuditLog,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(
            Catalog::open_sqlite(&dir.path().join("c.sqlite"))
                .await
                .unwrap(),
        );
        let repository = Arc::new(
            Repository::create(
                Store::Local(LocalStore::new(dir.path().join("repository"))),
                &SecretKey::generate().unwrap(),
            )
            .await
            .unwrap(),
        );
        Fixture {
            _dir: dir,
            audit: AuditLog::new(catalog.clone()),
            catalog,
            repository,
        }
    }

    fn deleter(&self) -> Deleter<'_> {
        Deleter {
            catalog: &self.catalog,
            repository: &self.repository,
            audit: &self.audit,
        }
    }

    /// A complete backup of `agent`/main/shop finished at `hour` (hours
    /// after the epoch), with one chunk reference and a manifest in the
    /// repository.
    async fn backup(&self, id: &str, agent: &str, system_identifier: &str, hour: i64) {
        complete_backup(
            &self.catalog,
            &self.repository,
            id,
            agent,
            "shop",
            system_identifier,
            hour,
        )
        .await;
    }

    async fn listed(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .catalog
            .list_backups(None, None, None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        ids.sort();
        ids
    }

    async fn has_manifest(&self, id: &str) -> bool {
        self.repository
            .store
            .exists(&Manifest::key(id).unwrap())
            .await
            .unwrap()
    }

    async fn references(&self, id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM backup_chunks WHERE backup_id = ?")
            .bind(id)
            .fetch_one(&self.catalog.pool)
            .await
            .unwrap()
    }

    async fn audited(&self, action: &str) -> Vec<(String, String, String)> {
        self.catalog
            .all_audit()
            .await
            .unwrap()
            .into_iter()
            .filter(|row| row.action == action)
            .map(|row| (row.target, row.outcome, row.detail))
            .collect()
    }
}

/// A complete backup of `agent`/main/`database` finished at `hour` (hours
/// after the epoch), with one chunk reference and a manifest in the
/// repository.
async fn complete_backup(
    catalog: &Catalog,
    repository: &Repository,
    id: &str,
    agent: &str,
    database: &str,
    system_identifier: &str,
    hour: i64,
) {
    let mut job = JobRecord::queued(
        format!("job-{id}"),
        JobKind::Backup,
        agent,
        "main",
        database,
        "admin",
        hour * HOUR_MS,
    );
    job.backup_id = id.to_string();
    catalog
        .insert_job(&job, Some(&BTreeMap::new()))
        .await
        .unwrap();
    let chunk = chunk_of(id);
    catalog.insert_chunk(&chunk, 10, 10, 0).await.unwrap();
    let stats = BackupStats {
        system_identifier: system_identifier.to_string(),
        ..BackupStats::default()
    };
    catalog
        .complete_backup(id, &stats, &[chunk], hour * HOUR_MS)
        .await
        .unwrap();
    let mut manifest = manifest(id, agent, system_identifier);
    manifest.database = database.into();
    manifest.store(repository).await.unwrap();
}

/// The (hex) id of the one chunk backup `id` references.
fn chunk_of(id: &str) -> String {
    blake3::hash(id.as_bytes()).to_hex().to_string()
}

fn manifest(id: &str, agent: &str, system_identifier: &str) -> Manifest {
    Manifest {
        format: Manifest::new_format(),
        backup_id: id.into(),
        job_id: format!("job-{id}"),
        agent: agent.into(),
        instance: "main".into(),
        database: "shop".into(),
        server_version: "16".into(),
        pg_dump_version: "16".into(),
        started_at: 0,
        finished_at: 0,
        dump_millis: 0,
        dump_bytes: 0,
        database_bytes: 0,
        row_estimates: BTreeMap::new(),
        tags: BTreeMap::new(),
        chunks: vec![],
        globals: None,
        table_rows: None,
        rows_not_counted: String::new(),
        archive_version: String::new(),
        system_identifier: system_identifier.into(),
    }
}

fn keep_last(n: u32) -> Policy {
    Policy {
        keep_last: Some(n),
        ..Policy::default()
    }
}

fn request(policy: Policy, dry_run: bool) -> ApplyRequest {
    ApplyRequest {
        policy_name: "short".into(),
        policy,
        scope: Scope::default(),
        dry_run,
        zone: chrono_tz::UTC,
        actor: "operator:admin:alice".into(),
    }
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1000 * HOUR_MS).unwrap()
}

fn lineage() -> Lineage {
    Lineage::Cluster {
        system_identifier: SYSID.into(),
        database: "shop".into(),
    }
}

/// A backup as the rules left it, for the guard alone.
fn planned(id: &str, hour: i64, fate: Fate) -> Planned {
    Planned {
        backup: LineageBackup {
            id: id.into(),
            agent_name: "db1".into(),
            instance: "main".into(),
            database: "shop".into(),
            system_identifier: SYSID.into(),
            finished_at: hour * HOUR_MS,
            protected: false,
        },
        time: DateTime::from_timestamp_millis(hour * HOUR_MS).unwrap(),
        fate,
        rules: Vec::new(),
        guards: Vec::new(),
    }
}

/// The fates and guards the guard gives `planned` (newest first).
fn check(input: Vec<Planned>, in_use: &[&str], expected: &[(&str, Fate, &[Guard])]) {
    let in_use: HashSet<String> = in_use.iter().map(ToString::to_string).collect();
    let plan = guard(lineage(), input, &in_use);
    let got: Vec<(String, Fate, Vec<Guard>)> = plan
        .backups
        .iter()
        .map(|p| (p.backup.id.clone(), p.fate, p.guards.clone()))
        .collect();
    let expected: Vec<(String, Fate, Vec<Guard>)> = expected
        .iter()
        .map(|(id, fate, guards)| (id.to_string(), *fate, guards.to_vec()))
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn the_newest_backup_is_kept_even_when_the_rules_remove_it() {
    check(
        vec![
            planned("b3", 3, Fate::Remove),
            planned("b2", 2, Fate::Keep),
            planned("b1", 1, Fate::Remove),
        ],
        &[],
        &[
            ("b3", Fate::Keep, &[Guard::Newest, Guard::NoNewerBackup]),
            ("b2", Fate::Keep, &[]),
            ("b1", Fate::Remove, &[]),
        ],
    );
}

#[test]
fn nothing_is_removed_without_a_strictly_newer_backup() {
    // Two backups dated alike: the rules keep one (keep-last 1); the other
    // has no newer backup, so it stays too.
    let backups: Vec<LineageBackup> = ["b1", "b2"]
        .iter()
        .map(|id| planned(id, 5, Fate::Keep).backup)
        .collect();
    let plan = plan_lineage(
        lineage(),
        &keep_last(1),
        backups,
        &HashSet::new(),
        chrono_tz::UTC,
        now(),
    )
    .unwrap();
    let fates: Vec<(String, Fate, Vec<Guard>)> = plan
        .backups
        .iter()
        .map(|p| (p.backup.id.clone(), p.fate, p.guards.clone()))
        .collect();
    assert_eq!(
        fates,
        vec![
            (
                "b2".to_string(),
                Fate::Keep,
                vec![Guard::Newest, Guard::NoNewerBackup]
            ),
            ("b1".to_string(), Fate::Keep, vec![Guard::NoNewerBackup]),
        ]
    );
    assert_eq!(plan.backups[1].rules, vec![]);
    assert_eq!(
        plan.backups[1].kept_by(),
        vec!["guard: no newer complete backup".to_string()]
    );
}

#[test]
fn backups_in_use_and_protected_backups_are_kept() {
    let mut protected = planned("b1", 1, Fate::Remove);
    protected.backup.protected = true;
    check(
        vec![
            planned("b3", 3, Fate::Keep),
            planned("b2", 2, Fate::Remove),
            protected,
        ],
        &["b2"],
        &[
            ("b3", Fate::Keep, &[Guard::Newest, Guard::NoNewerBackup]),
            ("b2", Fate::Keep, &[Guard::InUse]),
            ("b1", Fate::Keep, &[Guard::Protected]),
        ],
    );
}

#[test]
fn a_policy_that_removes_every_backup_is_refused() {
    let plan = guard(
        lineage(),
        vec![
            planned("b2", 2, Fate::Remove),
            planned("b1", 1, Fate::Remove),
        ],
        &HashSet::new(),
    );
    let refusal = plan.refused.expect("refused");
    assert!(refusal.contains("remove all 2"), "{refusal}");
    assert!(
        plan.backups
            .iter()
            .all(|p| p.fate == Fate::Keep && p.guards.contains(&Guard::RemovesEverything))
    );
}

#[tokio::test]
async fn a_refused_lineage_is_audited_and_nothing_is_deleted() {
    let fixture = Fixture::new().await;
    fixture.backup("b1", "db1", SYSID, 1).await;
    fixture.backup("b2", "db1", SYSID, 2).await;
    // restic's rules always keep the newest backup, so a plan that removes
    // everything is made by hand: the refusal must hold whatever the rules.
    let plan = guard(
        lineage(),
        vec![
            planned("b2", 2, Fate::Remove),
            planned("b1", 1, Fate::Remove),
        ],
        &HashSet::new(),
    );
    let report = fixture
        .deleter()
        .execute(&request(keep_last(1), false), plan, now())
        .await;
    assert!(report.plan.refused.is_some());
    assert!(report.deletions.is_empty());
    assert_eq!(fixture.listed().await, vec!["b1", "b2"]);
    assert!(fixture.has_manifest("b1").await);
    let audited = fixture.audited("retention.apply").await;
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].1, "refused");
    assert!(audited[0].2.contains("would remove all 2"), "{audited:?}");
}

#[tokio::test]
async fn apply_deletes_the_removed_backups_manifest_row_and_references() {
    let fixture = Fixture::new().await;
    for (id, hour) in [("b1", 1), ("b2", 2), ("b3", 3), ("b4", 4)] {
        fixture.backup(id, "db1", SYSID, hour).await;
    }
    fixture
        .catalog
        .set_backup_protected("b1", true)
        .await
        .unwrap();

    // A dry run decides the same and deletes nothing.
    let dry = fixture
        .deleter()
        .apply(&request(keep_last(2), true), now())
        .await
        .unwrap();
    assert_eq!(dry.lineages.len(), 1);
    let fates: Vec<(String, Fate, Vec<String>)> = dry.lineages[0]
        .plan
        .backups
        .iter()
        .map(|p| (p.backup.id.clone(), p.fate, p.kept_by()))
        .collect();
    assert_eq!(
        fates,
        vec![
            (
                "b4".to_string(),
                Fate::Keep,
                vec![
                    "last 1".to_string(),
                    "guard: newest complete backup".to_string(),
                    "guard: no newer complete backup".to_string()
                ]
            ),
            ("b3".to_string(), Fate::Keep, vec!["last 2".to_string()]),
            ("b2".to_string(), Fate::Remove, vec![]),
            (
                "b1".to_string(),
                Fate::Keep,
                vec!["guard: protected".to_string()]
            ),
        ]
    );
    assert!(dry.lineages[0].deletions.is_empty());
    assert_eq!(fixture.listed().await, vec!["b1", "b2", "b3", "b4"]);
    assert!(fixture.has_manifest("b2").await);

    let real = fixture
        .deleter()
        .apply(&request(keep_last(2), false), now())
        .await
        .unwrap();
    assert_eq!(
        real.lineages[0].deletions,
        BTreeMap::from([("b2".to_string(), Deletion::Deleted)])
    );
    assert_eq!(fixture.listed().await, vec!["b1", "b3", "b4"]);
    assert!(fixture.catalog.get_backup("b2").await.unwrap().is_none());
    assert!(!fixture.has_manifest("b2").await);
    assert_eq!(fixture.references("b2").await, 0);
    for kept in ["b1", "b3", "b4"] {
        assert!(fixture.has_manifest(kept).await, "{kept}");
        assert_eq!(fixture.references(kept).await, 1, "{kept}");
    }
    // The chunk itself stays for the garbage collector.
    assert_eq!(
        fixture
            .catalog
            .stored_chunks(&[chunk_of("b2")], 0)
            .await
            .unwrap()
            .len(),
        1
    );
    let applies = fixture.audited("retention.apply").await;
    assert_eq!(applies.len(), 2, "{applies:?}");
    assert!(
        applies[0]
            .2
            .starts_with("dry run; 4 backups: 3 kept, 1 removed, 0 deleted")
    );
    assert!(
        applies[1]
            .2
            .starts_with("4 backups: 3 kept, 1 removed, 1 deleted")
    );
    let deletes = fixture.audited("backup.delete").await;
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].0, "b2");
}

#[tokio::test]
async fn a_backup_a_restore_reads_is_kept_and_never_marked() {
    let fixture = Fixture::new().await;
    for (id, hour) in [("b1", 1), ("b2", 2), ("b3", 3)] {
        fixture.backup(id, "db1", SYSID, hour).await;
    }
    let mut restore = JobRecord::queued(
        "job-restore".into(),
        JobKind::Restore,
        "db1",
        "main",
        "shop",
        "admin",
        0,
    );
    restore.backup_id = "b1".into();
    fixture.catalog.insert_job(&restore, None).await.unwrap();
    let report = fixture
        .deleter()
        .apply(&request(keep_last(1), false), now())
        .await
        .unwrap();
    let b1 = report.lineages[0]
        .plan
        .backups
        .iter()
        .find(|p| p.backup.id == "b1")
        .unwrap();
    assert_eq!(b1.guards, vec![Guard::InUse]);
    assert_eq!(fixture.listed().await, vec!["b1", "b3"]);
    // A restore queued after the plan was made still keeps it: the mark
    // itself refuses.
    assert!(!fixture.catalog.mark_backup_deleting("b1", 5).await.unwrap());
}

#[tokio::test]
async fn an_interrupted_deletion_is_not_listed_and_is_finished_later() {
    let fixture = Fixture::new().await;
    fixture.backup("b1", "db1", SYSID, 1).await;
    fixture.backup("b2", "db1", SYSID, 2).await;
    // The first step only, as a crash after it leaves things.
    assert!(fixture.catalog.mark_backup_deleting("b1", 5).await.unwrap());
    assert_eq!(fixture.listed().await, vec!["b2"]);
    let marked = fixture.catalog.get_backup("b1").await.unwrap().unwrap();
    assert!(!marked.is_listed(), "a marked backup is not restorable");
    assert!(fixture.has_manifest("b1").await);
    // Protecting a marked backup is refused (it is no longer listed).
    assert!(
        !fixture
            .catalog
            .set_backup_protected("b1", true)
            .await
            .unwrap()
    );

    let finished = fixture.deleter().finish_pending().await.unwrap();
    assert_eq!(finished, vec!["b1"]);
    assert!(fixture.catalog.get_backup("b1").await.unwrap().is_none());
    assert!(!fixture.has_manifest("b1").await);
    assert_eq!(fixture.references("b1").await, 0);
    // Idempotent: a manifest already gone is no error.
    assert!(fixture.catalog.mark_backup_deleting("b2", 6).await.unwrap());
    fixture
        .repository
        .store
        .delete(&Manifest::key("b2").unwrap())
        .await
        .unwrap();
    assert_eq!(
        fixture.deleter().finish_pending().await.unwrap(),
        vec!["b2"]
    );
}

#[tokio::test]
async fn backups_of_one_cluster_and_database_form_one_lineage_whichever_agent_made_them() {
    let fixture = Fixture::new().await;
    // db1 backed up the primary; after a failover db2 backs up the
    // promoted standby: the same cluster identifier.
    fixture.backup("b1", "db1", SYSID, 1).await;
    fixture.backup("b2", "db1", SYSID, 2).await;
    fixture.backup("b3", "db2", SYSID, 3).await;
    // Backups without an identifier group by host.
    fixture.backup("old1", "db1", "", 1).await;
    fixture.backup("old2", "db1", "", 2).await;

    let scoped = fixture
        .catalog
        .lineages_in_scope(Some(&["db2".to_string()]), None)
        .await
        .unwrap();
    assert_eq!(scoped, vec![lineage()]);
    let mut members: Vec<String> = fixture
        .catalog
        .lineage_backups(&lineage())
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    members.sort();
    assert_eq!(members, vec!["b1", "b2", "b3"]);

    // Applying to db2's backups keeps only db2's newest of the lineage:
    // db1's are older backups of the same database.
    let mut scoped_request = request(keep_last(1), false);
    scoped_request.scope.agents = Some(vec!["db2".into()]);
    fixture
        .deleter()
        .apply(&scoped_request, now())
        .await
        .unwrap();
    assert_eq!(fixture.listed().await, vec!["b3", "old1", "old2"]);

    let all = fixture
        .catalog
        .lineages_in_scope(None, Some(&["shop".to_string()]))
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![
            lineage(),
            Lineage::Host {
                agent: "db1".into(),
                instance: "main".into(),
                database: "shop".into()
            }
        ]
    );
    let backup = fixture.catalog.get_backup("b3").await.unwrap().unwrap();
    assert_eq!(backup.system_identifier, SYSID);
}

#[tokio::test]
async fn a_policy_in_use_is_not_deleted_and_the_daily_run_is_claimed_once() {
    let fixture = Fixture::new().await;
    let record = crate::catalog::RetentionPolicyRecord {
        name: "short".into(),
        policy: serde_json::to_string(&keep_last(2)).unwrap(),
        created_by: "admin".into(),
        created_at: 0,
    };
    fixture
        .catalog
        .insert_retention_policy(&record)
        .await
        .unwrap();
    assert!(
        fixture
            .catalog
            .insert_retention_policy(&record)
            .await
            .is_err()
    );
    sqlx::query(
        "INSERT INTO schedules (id, name, kind, agent_name, all_databases, cron, timezone,
                                on_overlap, created_by, created_at, evaluated_until)
         VALUES ('sch-1', 'nightly', 'backup', 'db1', 1, '0 3 * * *', 'UTC', 'skip', 'a', 0, 0)",
    )
    .execute(&fixture.catalog.pool)
    .await
    .unwrap();
    let unknown = fixture
        .catalog
        .set_schedule_retention("nightly", Some("nope"))
        .await
        .unwrap_err();
    assert!(
        unknown.to_string().contains("cairn retention create nope"),
        "{unknown}"
    );
    assert!(
        fixture
            .catalog
            .set_schedule_retention("nightly", Some("short"))
            .await
            .unwrap()
    );
    let refused = fixture
        .catalog
        .delete_retention_policy("short")
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("nightly"), "{refused}");

    let day = super::automatic::DAILY_RETENTION_INTERVAL_MS;
    assert_eq!(
        fixture
            .catalog
            .schedules_due_for_retention(10 * day - day)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        fixture
            .catalog
            .claim_daily_retention("sch-1", 10 * day, day)
            .await
            .unwrap()
    );
    // A second coordinator (or tick) the same day gets nothing.
    assert!(
        !fixture
            .catalog
            .claim_daily_retention("sch-1", 10 * day + 1, day)
            .await
            .unwrap()
    );
    assert!(
        fixture
            .catalog
            .schedules_due_for_retention(10 * day + 1 - day)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        fixture
            .catalog
            .claim_daily_retention("sch-1", 11 * day, day)
            .await
            .unwrap()
    );

    assert!(
        fixture
            .catalog
            .set_schedule_retention("nightly", None)
            .await
            .unwrap()
    );
    assert!(
        fixture
            .catalog
            .delete_retention_policy("short")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_schedules_policy_runs_once_a_day_on_its_targets_only() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = crate::schedules::fire::tests::engine(dir.path(), "2026-03-01T12:00:00Z").await;
    let record = crate::catalog::RetentionPolicyRecord {
        name: "newest".into(),
        policy: serde_json::to_string(&keep_last(1)).unwrap(),
        created_by: "admin".into(),
        created_at: 0,
    };
    jobs.catalog.insert_retention_policy(&record).await.unwrap();
    let unknown = jobs
        .create_schedule(
            "admin",
            crate::schedules::manage::ScheduleRequest {
                name: "nightly".into(),
                agent: Some("db1".into()),
                databases: vec!["shop".into()],
                cron: "0 3 * * *".into(),
                timezone: "UTC".into(),
                retention: Some("nope".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        unknown.to_string().contains("cairn retention create nope"),
        "{unknown}"
    );
    jobs.create_schedule(
        "admin",
        crate::schedules::manage::ScheduleRequest {
            name: "nightly".into(),
            agent: Some("db1".into()),
            databases: vec!["shop".into()],
            cron: "0 3 * * *".into(),
            timezone: "UTC".into(),
            retention: Some("newest".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for (id, database, hour) in [
        ("s1", "shop", 1),
        ("s2", "shop", 2),
        ("o1", "other", 1),
        ("o2", "other", 2),
    ] {
        complete_backup(
            &jobs.catalog,
            &jobs.repository,
            id,
            "db1",
            database,
            SYSID,
            hour,
        )
        .await;
    }
    let now = jobs.clock.now_ms();
    assert_eq!(jobs.daily_retention(now).await.unwrap(), 1);
    let mut listed: Vec<String> = jobs
        .catalog
        .list_backups(None, None, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    listed.sort();
    // The schedule covers shop only: other's backups are not its to remove.
    assert_eq!(listed, vec!["o1", "o2", "s2"]);
    // Claimed for the day: the next tick (or another coordinator) runs
    // nothing.
    assert_eq!(jobs.daily_retention(now + 1000).await.unwrap(), 0);
    let audited: Vec<String> = jobs
        .catalog
        .all_audit()
        .await
        .unwrap()
        .into_iter()
        .filter(|row| row.action == "retention.apply")
        .map(|row| row.actor)
        .collect();
    assert_eq!(audited, vec!["coordinator"]);
}

#[tokio::test]
async fn a_repository_check_during_a_deletion_does_not_call_the_backup_damaged() {
    let fixture = Fixture::new().await;
    fixture.backup("b1", "db1", SYSID, 1).await;
    fixture.backup("b2", "db1", SYSID, 2).await;
    // A crash after the manifest went, before the row did.
    assert!(fixture.catalog.mark_backup_deleting("b1", 5).await.unwrap());
    fixture
        .repository
        .store
        .delete(&Manifest::key("b1").unwrap())
        .await
        .unwrap();
    let report = crate::repository::check::check_repository(
        fixture.catalog.clone(),
        fixture.repository.clone(),
        false,
    )
    .await
    .unwrap();
    // (Its chunks were never stored, so other findings are expected; the
    // manifest retention deleted is not one of them.)
    assert_eq!(report.missing_manifests.count, 0);
}
