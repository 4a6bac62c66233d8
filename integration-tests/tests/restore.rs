//! Restores end to end: real PostgreSQL clusters (a source and a different
//! target host), real binaries, the local repository. Each safety rule of
//! the restore is a test here, and so is a restore that outlives a network
//! cut or a coordinator crash (its download resumes).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use cairn_common::proto::{self, agent_gateway_client::AgentGatewayClient, download_message};
use cairn_common::tls::{self, CoordinatorUrl};
use cairn_integration_tests::proxy::{ProxyMode, TcpProxy};
use cairn_integration_tests::{
    Agent, AgentOptions, Coordinator, Output, PgCluster, TestDir, job_is_active, logged_numbers,
    wait_for, wait_until,
};
use serde_json::Value;

/// Source and target hosts, each with its agent (db1 backs up, db2 restores).
struct Fleet {
    source: PgCluster,
    target: PgCluster,
    coordinator: Coordinator,
    agents: Vec<Agent>,
    _test_dir: TestDir,
}

fn fleet(name: &str) -> Fleet {
    let test_dir = TestDir::new(name);
    let source = PgCluster::start_in(&test_dir, "source");
    let target = PgCluster::start_in(&test_dir, "target");
    let coordinator = Coordinator::start(&test_dir);
    let db1 = coordinator.enroll_agent("db1", &source, AgentOptions::default().allow("backup"));
    let db2 = coordinator.enroll_agent(
        "db2",
        &target,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    Fleet {
        source,
        target,
        coordinator,
        agents: vec![db1, db2],
        _test_dir: test_dir,
    }
}

impl Fleet {
    fn backup(&self, agent: &str, database: &str) -> String {
        self.coordinator.backup(agent, database)
    }

    /// `cairn restore ID --agent db2 --wait --output json ARGS`.
    fn restore(&self, backup: &str, args: &[&str]) -> Output {
        let mut all = vec![
            "restore", backup, "--agent", "db2", "--wait", "--output", "json",
        ];
        all.extend_from_slice(args);
        self.coordinator.cli(&all)
    }

    /// Starts a restore into `database` on db2 and pauses (SIGSTOP) its
    /// pg_restore session on the target once it is there, so whatever the
    /// test does next surely lands mid-restore. Returns the job id.
    fn start_paused_restore(&self, backup: &str, database: &str) -> (String, PausedBackend) {
        self.start_paused_restore_with(backup, database, &[])
    }

    /// [`Fleet::start_paused_restore`] with more arguments.
    fn start_paused_restore_with(
        &self,
        backup: &str,
        database: &str,
        args: &[&str],
    ) -> (String, PausedBackend) {
        let mut all = vec![
            "restore",
            backup,
            "--agent",
            "db2",
            "--database",
            database,
            "--output",
            "json",
        ];
        all.extend_from_slice(args);
        let started = self.coordinator.cli(&all).assert_success().json();
        assert!(job_is_active(&started), "{started}");
        // A backend seen in pg_stat_activity may be on its way out (pg_restore
        // -j closes its first connection before it forks workers): only a
        // backend that is still there, stopped, after the signal counts.
        let mut paused = None;
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(20),
            "pg_restore to connect to the staging database",
            || {
                let pids = self.target.psql(
                    "postgres",
                    "SELECT pid FROM pg_stat_activity
                      WHERE datname LIKE 'cairn_restore_%' AND backend_type = 'client backend'",
                );
                for pid in pids.lines() {
                    let backend = PausedBackend(pid.to_string());
                    if backend.try_signal("-STOP") && backend.is_stopped() {
                        paused = Some(backend);
                        return true;
                    }
                    backend.try_signal("-CONT");
                }
                false
            },
        );
        let backend = paused.unwrap();
        (started["id"].as_str().unwrap().to_string(), backend)
    }

    /// Restarts db2 with `spool_dir = DIR` in its agent.toml (a top-level
    /// key, so it goes first); does not wait for it to come online.
    fn set_spool_dir(&mut self, dir: &Path) {
        let agent = &mut self.agents[1];
        agent.stop();
        let config = std::fs::read_to_string(agent.config_path()).unwrap();
        let line = format!("spool_dir = {:?}\n", dir.display().to_string());
        std::fs::write(agent.config_path(), format!("{line}{config}")).unwrap();
        agent.start();
    }

    fn target_databases(&self) -> Vec<String> {
        self.target
            .psql(
                "postgres",
                "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1",
            )
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// The restore files (`cairn-restore-*`) in a spool directory.
fn spool_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("cairn-restore-"))
        .collect();
    names.sort();
    names
}

/// The constraints of every table in `public`, with their definitions.
fn constraints(pg: &PgCluster, database: &str) -> String {
    pg.psql(
        database,
        "SELECT conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
           FROM pg_constraint WHERE connamespace = 'public'::regnamespace
          ORDER BY conrelid::regclass::text, conname",
    )
}

/// A PostgreSQL backend paused with SIGSTOP.
struct PausedBackend(String);

impl PausedBackend {
    fn signal(&self, name: &str) {
        assert!(self.try_signal(name), "kill {name} {}", self.0);
    }

    fn try_signal(&self, name: &str) -> bool {
        std::process::Command::new("kill")
            .args([name, &self.0])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Whether the process is there and stopped (state `T` in
    /// `/proc/PID/stat`), not a zombie on its way out.
    fn is_stopped(&self) -> bool {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .ok()
            .and_then(|stat| {
                let after_name = stat.rsplit_once(')')?.1;
                after_name
                    .split_whitespace()
                    .next()
                    .map(|state| state == "T")
            })
            .unwrap_or(false)
    }

    fn resume(&self) {
        self.signal("-CONT");
    }
}

/// A table-by-table fingerprint of a database: every user table's row
/// count and an md5 of its rows in a stable order.
fn fingerprint(pg: &PgCluster, database: &str) -> String {
    let tables = pg.psql(
        database,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    );
    let mut lines = Vec::new();
    for table in tables.lines() {
        let digest = pg.psql(
            database,
            &format!(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))
                 FROM {table} t"
            ),
        );
        lines.push(format!("{table} {digest}"));
    }
    lines.join("\n")
}

/// A psql session connected to `database` until killed.
fn connected_session(pg: &PgCluster, database: &str) -> Child {
    pg.pg_command("psql")
        .args(["-X", "-d", database, "-c", "SELECT pg_sleep(600)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sessions_on(pg: &PgCluster, database: &str) -> u64 {
    pg.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}'",
            database.replace('\'', "''")
        ),
    )
    .parse()
    .unwrap()
}

/// Awkward content: names with spaces, quotes and non-ASCII characters,
/// large objects, contrib extensions, a view, a materialized view, a
/// function, and grants to a role the target does not have.
const AWKWARD: &str = r#"
CREATE ROLE reporting NOLOGIN BYPASSRLS CREATEROLE;
GRANT pg_read_server_files TO reporting;
CREATE EXTENSION hstore;
CREATE EXTENSION pg_trgm;
CREATE SCHEMA "Sales Dept";
CREATE TABLE "Sales Dept"."Order ""Items"" ünï" (
    id int PRIMARY KEY,
    label text,
    attrs hstore,
    payload bytea
);
INSERT INTO "Sales Dept"."Order ""Items"" ünï"
  SELECT i, 'item ' || i || E'\twith a tab\nand a newline', hstore('k', i::text), decode(md5(i::text), 'hex')
  FROM generate_series(1, 5000) i;
CREATE INDEX ON "Sales Dept"."Order ""Items"" ünï" USING gin (label gin_trgm_ops);
CREATE TABLE public.customers AS
  SELECT i AS id, md5(i::text) AS name FROM generate_series(1, 20000) i;
CREATE VIEW public.big_customers AS SELECT * FROM public.customers WHERE id > 19000;
CREATE MATERIALIZED VIEW public.customer_count AS SELECT count(*) AS n FROM public.customers;
CREATE FUNCTION public.double_it(x int) RETURNS int LANGUAGE sql AS 'SELECT x * 2';
GRANT USAGE ON SCHEMA "Sales Dept" TO reporting;
GRANT SELECT ON "Sales Dept"."Order ""Items"" ünï", public.customers TO reporting;
SELECT lo_from_bytea(0, 'a large object'::bytea);
SELECT lo_from_bytea(0, decode(repeat('ab', 100000), 'hex'));
"#;

#[test]
fn awkward_content_restores_onto_another_host_under_another_name() {
    let fleet = fleet("restore_awkward");
    fleet.source.create_database("shop floor");
    fleet.source.psql("shop floor", AWKWARD);
    let backup = fleet.backup("db1", "shop floor");

    let output = fleet.restore(&backup, &["--database", "copy of \"shop\" ü"]);
    assert!(output.success(), "{output}");
    let job = output.json();
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["kind"], "restore");
    let report = &job["restore"];
    assert_eq!(report["database"], "copy of \"shop\" ü", "{job}");
    assert!(
        report["roles_created"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "reporting"),
        "the role the grants name was created from the globals: {job}"
    );

    // Copied without the power over the whole instance it had there, and
    // the report says so.
    assert_eq!(
        fleet.target.psql(
            "postgres",
            "SELECT rolbypassrls, rolcreaterole, pg_has_role('reporting', 'pg_read_server_files', 'MEMBER')
               FROM pg_roles WHERE rolname = 'reporting'"
        ),
        "f|f|f"
    );
    let warnings = report["warnings"].as_str().unwrap();
    assert!(
        warnings.contains("BYPASSRLS") && warnings.contains("pg_read_server_files"),
        "{warnings}"
    );
    let copy = "copy of \"shop\" ü";
    assert_eq!(
        fingerprint(&fleet.target, copy),
        fingerprint(&fleet.source, "shop floor")
    );
    let objects = "SELECT (SELECT count(*) FROM pg_largeobject_metadata),
                          (SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension),
                          (SELECT count(*) FROM public.big_customers),
                          (SELECT n FROM public.customer_count),
                          public.double_it(21),
                          has_table_privilege('reporting', 'public.customers', 'SELECT'),
                          (SELECT count(*) FROM pg_indexes WHERE schemaname = 'Sales Dept')";
    assert_eq!(
        fleet.target.psql(copy, objects),
        fleet.source.psql("shop floor", objects)
    );
    let large_object =
        "SELECT string_agg(md5(lo_get(oid)), ',' ORDER BY oid) FROM pg_largeobject_metadata";
    assert_eq!(
        fleet.target.psql(copy, large_object),
        fleet.source.psql("shop floor", large_object)
    );
    // No staging database is left behind.
    let databases = fleet.target_databases();
    assert!(
        !databases.iter().any(|d| d.starts_with("cairn_")),
        "{databases:?}"
    );
    let events = fleet
        .coordinator
        .cli_json(&["audit", "list", "--limit", "200"]);
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"restore.start") && actions.contains(&"restore.end"),
        "{actions:?}"
    );
}

#[test]
fn a_non_empty_target_is_refused_then_replaced_with_clients_connected() {
    let fleet = fleet("restore_replace");
    fleet.source.create_sample_database("shop", 4);
    let backup = fleet.backup("db1", "shop");
    fleet.target.create_database("shop");
    fleet.target.psql(
        "shop",
        "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (42);",
    );

    let refused = fleet.restore(&backup, &[]);
    assert_eq!(refused.status_code, Some(1), "{refused}");
    assert!(
        refused.stderr.contains("exists and is not empty") && refused.stderr.contains("--replace"),
        "{refused}"
    );
    assert_eq!(fleet.target.psql("shop", "SELECT x FROM keep_me"), "42");

    // With --replace while a client is connected: the session is
    // terminated and reported, the old database kept under another name.
    let mut session = connected_session(&fleet.target, "shop");
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "the psql session to connect",
        || sessions_on(&fleet.target, "shop") > 0,
    );
    let output = fleet.restore(&backup, &["--replace"]);
    assert!(output.success(), "{output}");
    let job = output.json();
    let report = &job["restore"];
    assert_eq!(
        report["terminated_sessions"].as_array().unwrap().len(),
        1,
        "{job}"
    );
    let previous = report["previous"].as_str().unwrap().to_string();
    assert!(previous.starts_with("shop_previous_"), "{job}");
    assert_eq!(report["previous_dropped"], false);
    // The terminated client is gone, not waiting out its sleep.
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        "the terminated psql session to exit",
        || session.try_wait().unwrap().is_some(),
    );
    assert_eq!(fleet.target.psql(&previous, "SELECT x FROM keep_me"), "42");
    assert_eq!(
        fingerprint(&fleet.target, "shop"),
        fingerprint(&fleet.source, "shop")
    );

    // --drop-previous drops what was set aside.
    let output = fleet.restore(&backup, &["--replace", "--drop-previous"]);
    assert!(output.success(), "{output}");
    let job = output.json();
    assert_eq!(job["restore"]["previous_dropped"], true, "{job}");
    let dropped = job["restore"]["previous"].as_str().unwrap();
    assert!(
        !fleet.target_databases().iter().any(|d| d == dropped),
        "{dropped} still exists"
    );
    assert!(
        fleet.target_databases().contains(&previous),
        "the first previous database is still kept"
    );
}

#[test]
fn a_tampered_chunk_stops_the_restore_and_renames_nothing() {
    let fleet = fleet("restore_tampered");
    fleet.source.create_sample_database("shop", 12);
    let backup = fleet.backup("db1", "shop");
    fleet.target.create_database("shop");
    fleet.target.psql(
        "shop",
        "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (42);",
    );
    let chunks_dir = fleet.coordinator.home().join("repository/chunks");
    let mut files: Vec<_> = std::fs::read_dir(&chunks_dir)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .collect();
    files.sort();
    // A chunk in the middle of the dump, so pg_restore is already running
    // on the staging database when it arrives: `backup verify` tells each
    // chunk's position.
    let mut victim = None;
    for file in &files {
        let original = std::fs::read(file).unwrap();
        let mut bytes = original.clone();
        let at = bytes.len() - 20;
        bytes[at] ^= 1;
        std::fs::write(file, &bytes).unwrap();
        let report = fleet
            .coordinator
            .cli(&["backup", "verify", &backup, "--output", "json"])
            .json();
        let position = report["bad_chunks"][0]["position"]
            .as_str()
            .unwrap()
            .to_string();
        if position != "globals" && position != "1" {
            victim = Some((file.clone(), position));
            break;
        }
        std::fs::write(file, &original).unwrap();
    }
    let (victim, position) = victim.expect("the backup has a chunk past the first");
    let id = victim.file_name().unwrap().to_str().unwrap().to_string();

    let output = fleet.restore(&backup, &["--replace"]);
    assert_eq!(output.status_code, Some(1), "{output}");
    let job = output.json();
    assert_eq!(job["status"], "failed");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains(&id) && error.contains(&format!("chunk {position} of")),
        "the error names the chunk ({position}, {id}): {job}"
    );
    assert_eq!(fleet.target.psql("shop", "SELECT x FROM keep_me"), "42");
    let databases = fleet.target_databases();
    assert!(
        !databases
            .iter()
            .any(|d| d.starts_with("shop_previous") || d.starts_with("cairn_")),
        "{databases:?}"
    );
}

#[test]
fn a_failed_restore_leaves_the_target_untouched() {
    let fleet = fleet("restore_failed");
    fleet.source.create_database("shop");
    fleet.source.psql(
        "shop",
        "CREATE ROLE auditor NOLOGIN; CREATE TABLE t (x int); INSERT INTO t VALUES (1);
         GRANT SELECT ON t TO auditor;
         CREATE ROLE app NOLOGIN; CREATE TABLE owned (y int); ALTER TABLE owned OWNER TO app;",
    );
    let backup = fleet.backup("db1", "shop");
    fleet.target.create_database("shop");
    fleet.target.psql(
        "shop",
        "CREATE TABLE old (y int); INSERT INTO old VALUES (7);",
    );

    // --no-roles on a host without the role: pg_restore's GRANT fails, and
    // its own message is the job's error; the target keeps its data.
    let output = fleet.restore(&backup, &["--replace", "--no-roles"]);
    assert_eq!(output.status_code, Some(1), "{output}");
    let job = output.json();
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("pg_restore failed (exit status: 1): pg_restore: error: could not execute query: ERROR:  role"),
        "{job}"
    );
    assert_eq!(fleet.target.psql("shop", "SELECT y FROM old"), "7");
    let databases = fleet.target_databases();
    assert!(
        !databases
            .iter()
            .any(|d| d.starts_with("cairn_") || d.starts_with("shop_previous")),
        "{databases:?}"
    );
    // --no-owner and the roles: a clean restore.
    let output = fleet.restore(&backup, &["--database", "shop2", "--no-owner"]);
    assert!(output.success(), "{output}");
    assert_eq!(fleet.target.psql("shop2", "SELECT x FROM t"), "1");
    // Owned by the connecting role; the owner role was not needed, the
    // grantee was created.
    assert_eq!(
        fleet.target.psql(
            "shop2",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'owned'"
        ),
        "postgres"
    );
    assert_eq!(
        fleet.target.psql(
            "postgres",
            "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('app', 'auditor')"
        ),
        "auditor"
    );
    // A staging database an interrupted restore left behind is named in
    // the next restore's report (not dropped: it may be another agent's).
    fleet.target.create_database("cairn_restore_0badc0de");
    let output = fleet.restore(&backup, &["--database", "shop3"]);
    assert!(output.success(), "{output}");
    let job = output.json();
    assert!(
        job["restore"]["warnings"]
            .as_str()
            .unwrap()
            .contains("cairn_restore_0badc0de"),
        "{job}"
    );
    assert_eq!(job["restore"]["pg_restore_messages"], "", "{job}");
    assert!(
        fleet
            .target_databases()
            .contains(&"cairn_restore_0badc0de".to_string())
    );
    // Printed for people as cairn's own warning, not as pg_restore's.
    let output = fleet.coordinator.cli(&[
        "restore",
        &backup,
        "--agent",
        "db2",
        "--database",
        "shop4",
        "--wait",
    ]);
    assert!(output.success(), "{output}");
    assert!(
        output
            .stderr
            .contains("warning: staging databases of earlier restores")
            && output.stderr.contains("cairn_restore_0badc0de")
            && !output.stderr.contains("pg_restore said"),
        "{output}"
    );
}

#[test]
fn refusals_are_clear_and_audited() {
    let test_dir = TestDir::new("restore_refusals");
    let primary = PgCluster::start_in(&test_dir, "primary");
    primary.create_sample_database("shop", 2);
    let standby = PgCluster::builder()
        .name("standby")
        .in_test_dir(&test_dir)
        .standby_of(&primary)
        .start();
    let coordinator = Coordinator::start(&test_dir);
    let _db1 = coordinator.enroll_agent("db1", &primary, AgentOptions::default().allow("backup"));
    let _replica = coordinator.enroll_agent(
        "replica",
        &standby,
        AgentOptions::default().allow("restore"),
    );
    let backup = coordinator.backup("db1", "shop");

    // db1 does not permit restores.
    let output = coordinator.cli(&[
        "restore",
        &backup,
        "--agent",
        "db1",
        "--database",
        "x",
        "--wait",
    ]);
    assert_eq!(output.status_code, Some(1), "{output}");
    assert!(
        output.stderr.contains("does not permit restore"),
        "{output}"
    );
    // A standby is refused.
    let output = coordinator.cli(&[
        "restore",
        &backup,
        "--agent",
        "replica",
        "--database",
        "x",
        "--wait",
    ]);
    assert_eq!(output.status_code, Some(1), "{output}");
    assert!(output.stderr.contains("standby"), "{output}");
    // Bad input names the flag.
    let cases: [(&[&str], &str); 4] = [
        (
            &["restore", "bk-none", "--agent", "db1"],
            "no complete backup bk-none",
        ),
        (&["restore", &backup, "--agent", "nobody"], "no agent named"),
        (
            &["restore", &backup, "--agent", "db1", "--table", "orders"],
            "SCHEMA.TABLE",
        ),
        (
            &[
                "restore",
                &backup,
                "--agent",
                "db1",
                "--database",
                &"x".repeat(64),
            ],
            "--database",
        ),
    ];
    for (args, expected) in cases {
        let output = coordinator.cli(args);
        assert!(
            !output.success() && output.stderr.contains(expected),
            "{args:?}: {output}"
        );
    }
    let events = coordinator.cli_json(&["audit", "list", "--limit", "200"]);
    let refused = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "agent.refused-command")
        .count();
    assert!(refused >= 1, "{events}");
    assert_eq!(
        standby.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'x'"
        ),
        "0"
    );
}

#[test]
fn a_drill_restores_counts_and_records_its_outcome() {
    let fleet = fleet("restore_drill");
    fleet.source.create_sample_database("shop", 4);
    fleet
        .source
        .psql("shop", "CREATE TABLE empty (x int); CREATE SCHEMA \"odd ñame\"; CREATE TABLE \"odd ñame\".\"t t\" AS SELECT 1 AS x;");
    let backup = fleet.backup("db1", "shop");

    let output = fleet.coordinator.cli(&[
        "backup",
        "verify",
        &backup,
        "--restore-on",
        "db2",
        "--output",
        "json",
    ]);
    assert!(output.success(), "{output}");
    let job = output.json();
    assert_eq!(job["kind"], "drill", "{job}");
    let counted: Vec<(String, u64)> = job["restore"]["table_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                format!(
                    "{}.{}",
                    t["schema"].as_str().unwrap(),
                    t["table"].as_str().unwrap()
                ),
                t["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        counted.contains(&("public.orders".to_string(), 16000)),
        "{counted:?}"
    );
    assert!(
        counted.contains(&("public.empty".to_string(), 0)),
        "{counted:?}"
    );
    assert!(
        counted.contains(&("odd ñame.t t".to_string(), 1)),
        "{counted:?}"
    );
    let listed = fleet.coordinator.cli_json(&["backups", "list"]);
    let verification = &listed[0]["last_verification"];
    assert_eq!(verification["ok"], true, "{listed}");
    assert_eq!(verification["method"], "restore drill on db2");
    assert!(
        verification["detail"]
            .as_str()
            .unwrap()
            .contains("as at backup time"),
        "{verification}"
    );
    let databases = fleet.target_databases();
    assert!(
        !databases.iter().any(|d| d.starts_with("cairn_")),
        "the scratch database is dropped: {databases:?}"
    );
}

#[test]
fn single_tables_restore_into_an_existing_database() {
    let fleet = fleet("restore_tables");
    fleet.source.create_sample_database("shop", 2);
    let backup = fleet.backup("db1", "shop");
    fleet.target.create_database("shop");
    fleet.target.psql(
        "shop",
        "CREATE TABLE customers (id int, name text); INSERT INTO customers VALUES (1, 'mine');",
    );

    // orders is missing on the target: restored alone, with its primary key.
    let output = fleet.restore(&backup, &["--table", "public.orders"]);
    assert!(output.success(), "{output}");
    assert_eq!(
        fleet.target.psql("shop", "SELECT count(*) FROM orders"),
        "8000"
    );
    assert_eq!(
        fleet.target.psql(
            "shop",
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'orders'"
        ),
        "1"
    );
    // customers exists with rows: refused, unless --replace.
    let refused = fleet.restore(&backup, &["--table", "public.customers"]);
    assert_eq!(refused.status_code, Some(1), "{refused}");
    assert!(
        refused.stderr.contains("customers") && refused.stderr.contains("--replace"),
        "{refused}"
    );
    assert_eq!(
        fleet.target.psql("shop", "SELECT name FROM customers"),
        "mine"
    );
    let output = fleet.restore(&backup, &["--table", "public.customers", "--replace"]);
    assert!(output.success(), "{output}");
    assert_eq!(
        fleet.target.psql("shop", "SELECT count(*) FROM customers"),
        "20000"
    );
    // A whole schema, new on the target.
    fleet.source.psql(
        "shop",
        "CREATE SCHEMA \"Archive ü\"; CREATE TABLE \"Archive ü\".old AS SELECT 1 AS x;",
    );
    let backup = fleet.backup("db1", "shop");
    let output = fleet.restore(&backup, &["--schema", "\"Archive ü\""]);
    assert!(output.success(), "{output}");
    assert_eq!(
        fleet.target.psql("shop", "SELECT x FROM \"Archive ü\".old"),
        "1"
    );
    // A table the backup does not have is named.
    let missing = fleet.restore(&backup, &["--table", "public.nope"]);
    assert_eq!(missing.status_code, Some(1), "{missing}");
    assert!(missing.stderr.contains("nope"), "{missing}");
}

#[test]
fn a_target_short_of_disk_space_is_refused_before_anything_is_written() {
    let test_dir = TestDir::new("restore_disk_space");
    let source = PgCluster::start_in(&test_dir, "source");
    source.create_sample_database("shop", 48);
    // initdb takes about 40 MB; the backup's database is larger than what
    // is left.
    let small = PgCluster::builder()
        .name("small")
        .in_test_dir(&test_dir)
        .on_tmpfs("96m")
        .start();
    let coordinator = Coordinator::start(&test_dir);
    let _db1 = coordinator.enroll_agent("db1", &source, AgentOptions::default().allow("backup"));
    let _small =
        coordinator.enroll_agent("small", &small, AgentOptions::default().allow("restore"));
    let backup = coordinator.backup("db1", "shop");
    let output = coordinator.cli(&["restore", &backup, "--agent", "small", "--wait"]);
    assert_eq!(output.status_code, Some(1), "{output}");
    assert!(
        output.stderr.contains("not enough free disk space"),
        "{output}"
    );
    assert_eq!(
        small.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'shop' OR datname LIKE 'cairn%'"
        ),
        "0"
    );
}

#[test]
fn a_parallel_restore_spools_and_a_cancelled_or_interrupted_one_leaves_nothing() {
    let fleet = fleet("restore_cancel_jobs");
    fleet.source.create_sample_database("shop", 16);
    let backup = fleet.backup("db1", "shop");

    // --jobs 2: pg_restore -j needs a file, so the dump is spooled.
    let output = fleet.restore(&backup, &["--database", "parallel", "--jobs", "2"]);
    assert!(output.success(), "{output}");
    let job = output.json();
    assert_eq!(job["restore"]["spooled"], true, "{job}");
    assert_eq!(
        fingerprint(&fleet.target, "parallel"),
        fingerprint(&fleet.source, "shop")
    );
    // In the agent's own directory, private, and empty again.
    let spool = fleet.agents[1].dir().join("spool");
    let metadata = std::fs::symlink_metadata(&spool).unwrap();
    assert!(metadata.is_dir());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o700);
    assert_eq!(
        metadata.uid(),
        std::fs::metadata(fleet.agents[1].config_path())
            .unwrap()
            .uid()
    );
    assert_eq!(spool_files(&spool), Vec::<String>::new());

    // A restore cancelled midway: its pg_restore session on the target is
    // paused (SIGSTOP) so the cancel surely lands while it runs.
    let (job_id, restore_backend) = fleet.start_paused_restore(&backup, "halfway");
    let cancelled = fleet.coordinator.cli(&["jobs", "cancel", &job_id]);
    assert!(cancelled.success(), "{cancelled}");
    restore_backend.resume();
    let mut job = Value::Null;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "the cancelled restore to end",
        || {
            job = fleet.coordinator.cli_json(&["jobs", "show", &job_id]);
            !job_is_active(&job)
        },
    );
    assert_eq!(job["status"], "cancelled", "{job}");
    let databases = fleet.target_databases();
    assert!(
        !databases
            .iter()
            .any(|d| d == "halfway" || d.starts_with("cairn_")),
        "{databases:?}"
    );

    // The agent stopped (SIGTERM) mid-restore: it cleans up before it
    // exits.
    let (_, restore_backend) = fleet.start_paused_restore(&backup, "stopped");
    let agent = fleet.agents[1].process();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    restore_backend.resume();
    let status = agent.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "the agent exits cleanly: {status}");
    let databases = fleet.target_databases();
    assert!(
        !databases
            .iter()
            .any(|d| d == "stopped" || d.starts_with("cairn_")),
        "the stopped agent left {databases:?}"
    );
}

#[test]
fn a_partial_restore_gives_up_on_a_held_lock_and_commits_nothing() {
    let fleet = fleet("restore_lock_wait");
    fleet.source.create_sample_database("shop", 1);
    let backup = fleet.backup("db1", "shop");
    fleet.target.create_database("shop");
    fleet.target.psql(
        "shop",
        "CREATE TABLE customers (id int, name text); INSERT INTO customers VALUES (1, 'mine');",
    );
    // A long transaction holds a lock on the table the restore must drop.
    let mut holder = fleet
        .target
        .pg_command("psql")
        .args([
            "-X",
            "-d",
            "shop",
            "-c",
            "BEGIN; LOCK TABLE customers IN ACCESS SHARE MODE; SELECT pg_sleep(600);",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "the lock holder to connect",
        || sessions_on(&fleet.target, "shop") > 0,
    );
    let started = std::time::Instant::now();
    let output = fleet.restore(&backup, &["--table", "public.customers", "--replace"]);
    let waited = started.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(output.status_code, Some(1), "{output}");
    assert!(
        output.stderr.contains("waited more than 30s for a lock"),
        "{output}"
    );
    assert!(waited < Duration::from_secs(90), "it waited {waited:?}");
    // Rolled back: the table is as it was.
    assert_eq!(
        fleet.target.psql("shop", "SELECT name FROM customers"),
        "mine"
    );
}

#[test]
fn a_spool_dir_other_users_can_enter_is_refused_and_no_archive_is_swapped_in() {
    let mut fleet = fleet("restore_spool_private");
    fleet.source.create_sample_database("shop", 4);
    let backup = fleet.backup("db1", "shop");
    // Another user's archive, and a spool directory that user can write
    // to, as /var/tmp/cairn-agent was when that user made it first.
    fleet.source.create_database("evil");
    fleet.source.psql(
        "evil",
        "CREATE TABLE planted (x int); INSERT INTO planted VALUES (666);",
    );
    let attacker = fleet._test_dir.postgres_subdir("attacker");
    let evil_dump = attacker.join("evil.dump");
    let dumped = cairn_integration_tests::run(fleet.source.pg_command("pg_dump").args([
        "-Fc",
        "-Z0",
        "-d",
        "evil",
        "-f",
        evil_dump.to_str().unwrap(),
    ]));
    assert!(dumped.success(), "{dumped}");
    std::fs::set_permissions(&evil_dump, std::fs::Permissions::from_mode(0o644)).unwrap();
    let shared = fleet._test_dir.path().join("shared-spool");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let give_to_nobody = |path: &Path| {
        nix::unistd::chown(path, Some(nobody.uid), Some(nobody.gid)).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    };
    std::fs::create_dir(&shared).unwrap();
    give_to_nobody(&shared);
    // That user replaces every dump that appears there with its own.
    let mut swapper = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while :; do for f in '{dir}'/*.dump; do [ -f \"$f\" ] && cp '{evil}' \"$f.x\" \
                 && mv -f \"$f.x\" \"$f\"; done; sleep 0.005; done",
                dir = shared.display(),
                evil = evil_dump.display()
            ))
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    // The agent's own and private when the agent starts; opened to every
    // user while it runs: a parallel restore is refused before anything
    // is written.
    let agent_uid = std::fs::metadata(fleet.agents[1].config_path())
        .unwrap()
        .uid();
    nix::unistd::chown(&shared, Some(nix::unistd::Uid::from_raw(agent_uid)), None).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700)).unwrap();
    fleet.set_spool_dir(&shared);
    fleet.coordinator.wait_until_online(&fleet.agents[1]);
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = fleet.restore(&backup, &["--database", "victim", "--jobs", "2"]);
    let _ = swapper.kill();
    let _ = swapper.wait();
    let planted = fleet.target.try_psql("victim", "SELECT x FROM planted");
    assert_eq!(
        output.status_code,
        Some(1),
        "{output}\nthe other user's table in victim: {}",
        planted.stdout.trim()
    );
    assert!(
        output.stderr.contains("spool_dir") && output.stderr.contains("has mode 0777"),
        "{output}"
    );
    assert!(
        !fleet
            .target_databases()
            .iter()
            .any(|d| d == "victim" || d.starts_with("cairn_")),
        "{:?}",
        fleet.target_databases()
    );
    assert_eq!(spool_files(&shared), Vec::<String>::new());

    // Made by that user: the agent refuses to start with it.
    give_to_nobody(&shared);
    fleet.agents[1].restart();
    let status = fleet.agents[1].process().wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = fleet.agents[1].process().log();
    assert!(
        log.contains("spool_dir")
            && log.contains("is owned by uid 65534")
            && log.contains("chmod 0700"),
        "{log}"
    );
}

#[test]
fn a_spool_file_a_killed_agent_left_is_removed_at_its_next_start() {
    let mut fleet = fleet("restore_spool_leftover");
    fleet.source.create_sample_database("shop", 16);
    let backup = fleet.backup("db1", "shop");
    let spool = fleet.agents[1].dir().join("spool");
    fleet.set_spool_dir(&spool);
    fleet.coordinator.wait_until_online(&fleet.agents[1]);

    // Killed (SIGKILL) while pg_restore -j reads the spooled dump.
    let (_, restore_backend) = fleet.start_paused_restore_with(&backup, "killed", &["--jobs", "2"]);
    let left = spool_files(&spool);
    assert!(
        left.iter().any(|name| name.ends_with(".dump")),
        "the dump is spooled while pg_restore runs: {left:?}"
    );
    fleet.agents[1].kill();
    restore_backend.resume();
    assert_eq!(spool_files(&spool), left, "nothing removes it now");

    fleet.agents[1].start();
    fleet.coordinator.wait_until_online(&fleet.agents[1]);
    assert_eq!(spool_files(&spool), Vec::<String>::new());
    let log = fleet.agents[1].process().log();
    assert!(
        log.contains("removed a stale spool file") && log.contains(&left[0]),
        "{log}"
    );
}

#[test]
fn template_databases_and_the_connection_database_are_refused() {
    let fleet = fleet("restore_templates");
    fleet.source.create_sample_database("shop", 1);
    let backup = fleet.backup("db1", "shop");
    fleet
        .target
        .psql("postgres", "CREATE DATABASE tmpl IS_TEMPLATE true");
    let cases: [(&[&str], &str); 6] = [
        (&["--database", "template1"], "is a template database"),
        (
            &["--database", "template1", "--replace"],
            "is a template database",
        ),
        (
            &["--database", "template1", "--table", "public.orders"],
            "is a template database",
        ),
        (
            &["--database", "template0", "--replace"],
            "is a template database",
        ),
        (&["--database", "tmpl", "--replace"], "IS_TEMPLATE false"),
        // The agent's connection string names database postgres.
        (
            &["--database", "postgres", "--replace"],
            "is the one this agent connects through",
        ),
    ];
    for (args, expected) in cases {
        let output = fleet.restore(&backup, args);
        assert_eq!(output.status_code, Some(1), "{args:?}: {output}");
        assert!(output.stderr.contains(expected), "{args:?}: {output}");
    }
    // Nothing was written anywhere.
    assert_eq!(
        fleet.target.psql(
            "postgres",
            "SELECT string_agg(datname || ':' || datistemplate, ',' ORDER BY datname)
               FROM pg_database"
        ),
        "postgres:false,template0:true,template1:true,tmpl:true"
    );
    assert_eq!(
        fleet.target.psql(
            "template1",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
    // A drill's scratch database is not affected.
    let output = fleet.coordinator.cli(&[
        "backup",
        "verify",
        &backup,
        "--restore-on",
        "db2",
        "--output",
        "json",
    ]);
    assert!(output.success(), "{output}");
}

#[test]
fn a_partial_restore_keeps_the_foreign_keys_from_and_to_its_tables() {
    let fleet = fleet("restore_foreign_keys");
    fleet.source.create_database("shop");
    fleet.source.psql(
        "shop",
        "CREATE TABLE customers (id int PRIMARY KEY, name text);
         CREATE TABLE orders (id int PRIMARY KEY, c int NOT NULL REFERENCES customers (id));
         CREATE TABLE items (o int REFERENCES orders (id) ON DELETE CASCADE, n int);
         INSERT INTO customers SELECT i, 'c' || i FROM generate_series(1, 100) i;
         INSERT INTO orders SELECT i, 1 + i % 100 FROM generate_series(1, 500) i;
         INSERT INTO items SELECT 1 + i % 500, i FROM generate_series(1, 1000) i;",
    );
    let backup = fleet.backup("db1", "shop");
    let output = fleet.restore(&backup, &["--database", "shop"]);
    assert!(output.success(), "{output}");
    let before = constraints(&fleet.target, "shop");
    assert!(
        before.contains("orders_c_fkey") && before.contains("items_o_fkey"),
        "{before}"
    );

    // items: its own key to orders (nothing points at items).
    let output = fleet.restore(&backup, &["--table", "public.items", "--replace"]);
    assert!(output.success(), "{output}");
    assert_eq!(constraints(&fleet.target, "shop"), before);
    // orders: its own key to customers, and items' key to it.
    let output = fleet.restore(&backup, &["--table", "public.orders", "--replace"]);
    assert!(output.success(), "{output}");
    assert_eq!(constraints(&fleet.target, "shop"), before);
    // customers: orders' key to it is dropped and added again.
    let output = fleet.restore(&backup, &["--table", "public.customers", "--replace"]);
    assert!(output.success(), "{output}");
    assert_eq!(constraints(&fleet.target, "shop"), before);
    assert_eq!(
        fingerprint(&fleet.target, "shop"),
        fingerprint(&fleet.source, "shop")
    );

    // A row of orders that the restored customers would not satisfy: the
    // key cannot be added again, and nothing is committed.
    fleet.target.psql(
        "shop",
        "INSERT INTO customers VALUES (999, 'new'); INSERT INTO orders VALUES (999, 999);",
    );
    let output = fleet.restore(&backup, &["--table", "public.customers", "--replace"]);
    assert_eq!(output.status_code, Some(1), "{output}");
    assert!(output.stderr.contains("orders_c_fkey"), "{output}");
    assert_eq!(constraints(&fleet.target, "shop"), before);
    assert_eq!(
        fleet
            .target
            .psql("shop", "SELECT name FROM customers WHERE id = 999"),
        "new"
    );

    // A key the backup does not have: refused up front, naming it.
    fleet.target.psql(
        "shop",
        "CREATE TABLE refunds (o int REFERENCES orders (id));",
    );
    let output = fleet.restore(&backup, &["--table", "public.orders", "--replace"]);
    assert_eq!(output.status_code, Some(1), "{output}");
    assert!(
        output.stderr.contains("refunds_o_fkey on public.refunds"),
        "{output}"
    );
    assert_eq!(
        fleet.target.psql("shop", "SELECT count(*) FROM orders"),
        "501"
    );
}

/// Roles whose globals would give power over the whole target: one member
/// of pg_read_server_files, one of pg_execute_server_program, one member of
/// a superuser role (which the database's grants name too, so it is copied
/// as well).
const POWERFUL_ROLES: &str = r#"
CREATE ROLE file_reader NOLOGIN;
GRANT pg_read_server_files TO file_reader;
CREATE ROLE program_runner NOLOGIN;
GRANT pg_execute_server_program TO program_runner;
CREATE ROLE boss SUPERUSER NOLOGIN;
CREATE ROLE minion NOLOGIN;
GRANT boss TO minion;
CREATE TABLE public.ledger AS SELECT i AS id FROM generate_series(1, 100) i;
GRANT SELECT ON public.ledger TO file_reader, program_runner, minion, boss;
"#;

/// The globals' memberships in predefined roles and in a superuser role,
/// and the superuser attribute, are taken out before anything runs on the
/// target: the copied roles exist without them, and the target's statement
/// log shows that no statement granted them, not even for a moment.
#[test]
fn copied_roles_never_get_power_over_the_target_not_even_for_a_moment() {
    let test_dir = TestDir::new("restore_role_filter");
    let source = PgCluster::start_in(&test_dir, "source");
    let target = PgCluster::builder()
        .name("target")
        .in_test_dir(&test_dir)
        .setting("log_statement", "'all'")
        .start();
    let coordinator = Coordinator::start(&test_dir);
    let _db1 = coordinator.enroll_agent("db1", &source, AgentOptions::default().allow("backup"));
    let _db2 = coordinator.enroll_agent("db2", &target, AgentOptions::default().allow("restore"));
    source.create_database("books");
    source.psql("books", POWERFUL_ROLES);
    let backup = coordinator.backup("db1", "books");
    let log_before = target.log().len();

    let output = coordinator.cli(&[
        "restore", &backup, "--agent", "db2", "--wait", "--output", "json",
    ]);
    assert!(output.success(), "{output}");
    let job = output.json();
    assert_eq!(job["status"], "succeeded", "{job}");
    let created: Vec<&str> = job["restore"]["roles_created"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for role in ["file_reader", "program_runner", "boss", "minion"] {
        assert!(created.contains(&role), "{role} created: {job}");
    }

    assert_eq!(
        target.psql(
            "postgres",
            "SELECT pg_has_role('file_reader', 'pg_read_server_files', 'MEMBER'),
                    pg_has_role('program_runner', 'pg_execute_server_program', 'MEMBER'),
                    pg_has_role('minion', 'boss', 'MEMBER'),
                    (SELECT rolsuper FROM pg_roles WHERE rolname = 'boss'),
                    (SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
                      WHERE r.rolname IN ('file_reader', 'program_runner', 'boss', 'minion'))"
        ),
        "f|f|f|f|0",
        "the copied roles are members of nothing and boss is no superuser"
    );
    assert_eq!(
        target.psql(
            "books",
            "SELECT has_table_privilege('minion', 'public.ledger', 'SELECT')"
        ),
        "t",
        "the database's own grants still name the roles"
    );
    let warnings = job["restore"]["warnings"].as_str().unwrap_or_default();
    for withheld in [
        "pg_read_server_files",
        "pg_execute_server_program",
        "SUPERUSER",
    ] {
        assert!(
            warnings.contains(withheld),
            "the report names {withheld}: {warnings}"
        );
    }

    // What ran on the target: every statement, as PostgreSQL logged it.
    let log = target.log();
    let statements: Vec<&str> = log
        .get(log_before..)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("statement: "))
        .collect();
    assert!(
        statements
            .iter()
            .any(|line| line.contains("CREATE ROLE minion")),
        "the statement log is on: {statements:#?}"
    );
    for line in &statements {
        let upper = line.to_uppercase();
        let granted_power = upper.contains(" SUPERUSER")
            || upper.contains(" IN ROLE")
            || upper.contains("GRANT PG_")
            || upper.contains("GRANT BOSS TO");
        assert!(
            !granted_power,
            "a statement granted power on the target: {line}"
        );
    }
}

/// Big enough that the restore's chunks do not all fit in what the agent
/// buffers (a few chunks of about 2 MiB each, and the stream's window)
/// while its pg_restore is paused: the rest must come after the fault.
const RESUMED_RESTORE_MIB: u32 = 128;
/// How long a whole restore of that database may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(180);

impl Fleet {
    /// Waits until restore job `id` has ended; returns it.
    fn wait_for_end(&self, id: &str) -> Value {
        wait_for(
            RESTORE_TIMEOUT,
            Duration::from_millis(200),
            &format!("restore job {id} to end"),
            || {
                let job = self.coordinator.cli_json(&["jobs", "show", id]);
                (!job_is_active(&job)).then_some(job)
            },
        )
    }

    /// A job broken by a fault mid-download came back: the same job
    /// succeeded with its one attempt, db2's download resumed past its
    /// start, the job's progress counts every chunk of backup `backup`
    /// (those sent before the fault too), and `copy` holds what the
    /// source's `shop` does.
    fn assert_resumed_and_restored(&self, job: &Value, backup: &str) {
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(
            job["attempts"].as_array().map(Vec::len),
            Some(1),
            "resumed, not retried: {job}"
        );
        let resumed = logged_numbers(
            &self.agents[1].process().log(),
            "download resumed",
            "from_chunk",
        );
        assert!(
            resumed.iter().any(|from_chunk| *from_chunk > 0),
            "the download did not resume past its start (from chunks {resumed:?})"
        );
        eprintln!("the download resumed from chunks {resumed:?}");
        // The backup's count has the globals chunk; the job's progress
        // counts the dump's.
        let listed = self.coordinator.cli_json(&["backups", "show", backup]);
        assert_eq!(
            job["chunks"].as_u64().map(|dump_chunks| dump_chunks + 1),
            listed["chunk_count"].as_u64(),
            "{job}\n{listed}"
        );
        assert_eq!(
            fingerprint(&self.target, "copy"),
            fingerprint(&self.source, "shop")
        );
    }
}

/// db2 reaches the coordinator through a proxy, whose network fails
/// (`fault`) for 30 s in the middle of a restore's download; the same
/// restore then goes on from the chunks it had, and succeeds.
fn network_fault_mid_restore(test_name: &str, fault: ProxyMode) {
    let mut fleet = fleet(test_name);
    fleet
        .source
        .create_sample_database("shop", RESUMED_RESTORE_MIB);
    let backup = fleet.backup("db1", "shop");
    let proxy = TcpProxy::start(fleet.coordinator.grpc_address());
    fleet
        .coordinator
        .route_through(&mut fleet.agents[1], &proxy);

    // pg_restore's session is paused, so the download is surely in its
    // middle when the network goes; then it runs on, through the chunks
    // the agent holds, and waits for the rest.
    let (id, restore_backend) = fleet.start_paused_restore(&backup, "copy");
    proxy.set_mode(fault);
    restore_backend.resume();
    std::thread::sleep(Duration::from_secs(30));
    let during = fleet.coordinator.cli_json(&["jobs", "show", &id]);
    assert!(
        job_is_active(&during),
        "the job ended while cut off: {during}"
    );
    proxy.restore();

    let job = fleet.wait_for_end(&id);
    fleet.assert_resumed_and_restored(&job, &backup);
}

#[test]
fn a_restore_cut_off_for_thirty_seconds_resumes_its_download_and_succeeds() {
    network_fault_mid_restore("restore_network_cut", ProxyMode::Cut);
}

#[test]
fn a_restore_whose_network_goes_silent_for_thirty_seconds_resumes_and_succeeds() {
    network_fault_mid_restore("restore_network_silent", ProxyMode::Blackhole);
}

/// `DownloadBackup` as db2 (with its own certificate): the first message
/// of the stream, or the status that refused it.
fn download_as_db2(
    fleet: &Fleet,
    request: proto::DownloadRequest,
) -> Result<proto::DownloadMessage, tonic::Status> {
    let identity = fleet.agents[1].dir().join("identity");
    let read = |file: &str| std::fs::read(identity.join(file)).unwrap();
    let config = tls::client_config(
        &read("ca.pem"),
        Some((read("cert.pem").as_slice(), read("key.pem").as_slice())),
    )
    .unwrap();
    let url = CoordinatorUrl::parse(&fleet.coordinator.url()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let call = async {
            let channel = tls::connect(&url, config, None).await.unwrap();
            let mut client = AgentGatewayClient::new(channel)
                .max_decoding_message_size(cairn_common::chunk::MAX_CHUNK_MESSAGE_BYTES);
            let mut messages = client.download_backup(request).await?.into_inner();
            Ok(messages.message().await?.unwrap())
        };
        tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("DownloadBackup answers within 30 s")
    })
}

/// The coordinator is killed (SIGKILL) in the middle of a restore's
/// download and started again: the same job goes on and succeeds.
#[test]
fn a_coordinator_killed_mid_restore_comes_back_and_the_same_job_succeeds() {
    let mut fleet = fleet("restore_coordinator_killed");
    fleet
        .source
        .create_sample_database("shop", RESUMED_RESTORE_MIB);
    let backup = fleet.backup("db1", "shop");

    let (id, restore_backend) = fleet.start_paused_restore(&backup, "copy");
    // While it runs, its agent may resume its download, but not for
    // another attempt, nor past the backup's end.
    let running = fleet.coordinator.cli_json(&["jobs", "show", &id]);
    let attempt_id = running["attempts"][0]["attempt_id"].as_str().unwrap();
    let request = |attempt_id: &str, from_chunk: u64| proto::DownloadRequest {
        job_id: id.clone(),
        from_chunk,
        attempt_id: attempt_id.to_string(),
    };
    let resumed = download_as_db2(&fleet, request(attempt_id, 2)).unwrap();
    let Some(download_message::Body::List(page)) = resumed.body else {
        panic!("a resumed download starts with a page of the list: {resumed:?}")
    };
    assert_eq!(page.first_chunk, 2, "{page:?}");
    assert!(page.chunks.iter().all(|entry| !entry.globals), "{page:?}");
    let refused = download_as_db2(&fleet, request("at-0000000000000000", 2)).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = download_as_db2(&fleet, request(attempt_id, 1_000_000)).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("from_chunk"), "{refused:?}");

    fleet.coordinator.kill();
    restore_backend.resume();
    // A few of the agent's tries to resume meet no coordinator at all.
    std::thread::sleep(Duration::from_secs(5));
    fleet.coordinator.start_again();
    let job = fleet.coordinator.cli_json(&["jobs", "show", &id]);
    assert!(job_is_active(&job), "{job}");

    let job = fleet.wait_for_end(&id);
    fleet.assert_resumed_and_restored(&job, &backup);
    let audit = fleet
        .coordinator
        .cli_json(&["audit", "list", "--limit", "1000"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "job.reattach" && e["target"] == id.as_str()),
        "no job.reattach for {id}: {audit}"
    );
}
