//! Whole-system tests of the fleet: enrollment as the coordinator sees it,
//! health probes compared with what PostgreSQL itself reports, replication,
//! `/metrics`, heartbeats and offline detection, reconnection after a
//! coordinator restart or crash, and unreachable instances.
//!
//! Everything is real: the `cairn` and `cairn-agent` binaries (run
//! `cargo build --workspace --bins` first), PostgreSQL clusters made with
//! `initdb`, mutual TLS on loopback. The fixture's coordinator heartbeats
//! every second and its agents probe every second, so every wait below is a
//! bounded poll of a few seconds.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_integration_tests::{
    Agent, AgentOptions, Coordinator, PgCluster, TestDir, privileges, wait_for, wait_until,
};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

/// How long an agent may take to be shown offline once it stops
/// heartbeating: three 1 s heartbeat intervals, plus slack for a loaded CI
/// machine and the polling CLI.
const OFFLINE_WITHIN: Duration = Duration::from_secs(10);

/// How long agents may take to reconnect by themselves after the
/// coordinator comes back: their reconnect backoff is capped at 30 s.
const RECONNECT_WITHIN: Duration = Duration::from_secs(40);

/// How long periodic probes, metrics and replication may take to show
/// something that already happened.
const SETTLE_WITHIN: Duration = Duration::from_secs(20);

const POLL: Duration = Duration::from_millis(200);

/// Tolerance when comparing a database's size in a probe with
/// `pg_database_size` read a moment later (autovacuum may add a page or
/// two in between).
const DATABASE_SIZE_TOLERANCE: u64 = 1024 * 1024;

/// Tolerance when comparing the probe's uptime with PostgreSQL's, read a
/// moment later.
const UPTIME_TOLERANCE_SECONDS: f64 = 5.0;

// ---------------------------------------------------------------- helpers

/// Collects every failed expectation about one subject and reports them all
/// at once, with the subject (usually the JSON the CLI printed).
struct Checks {
    subject: String,
    failures: Vec<String>,
}

impl Checks {
    fn new(subject: impl Display) -> Self {
        Checks {
            subject: subject.to_string(),
            failures: Vec::new(),
        }
    }

    /// `what` must hold; `detail` says what was seen instead.
    fn check(&mut self, what: &str, holds: bool, detail: impl Display) {
        if !holds {
            self.failures.push(format!("{what}: {detail}"));
        }
    }

    /// `actual` must equal `expected`.
    fn eq<A: PartialEq<E> + Debug, E: Debug>(&mut self, what: &str, actual: A, expected: E) {
        if actual != expected {
            self.failures
                .push(format!("{what}: got {actual:?}, expected {expected:?}"));
        }
    }

    /// Panics listing every failure, if there was one.
    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} expectation(s) failed:\n  - {}\nin:\n{}",
            self.failures.len(),
            self.failures.join("\n  - "),
            self.subject
        );
    }
}

/// The prometheus text of `/metrics`, parsed into `series -> value`, where
/// a series is written as the coordinator prints it:
/// `cairn_agent_up{agent="db1"}`.
struct Metrics {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Metrics {
    fn get(coordinator: &Coordinator) -> Metrics {
        let response = coordinator
            .http_get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(response.status, 200, "GET /metrics: {}", response.body);
        let samples = response
            .body
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("metrics line without a value: {line:?}"));
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|e| panic!("metrics line {line:?}: bad value: {e}"));
                (series.to_string(), value)
            })
            .collect();
        Metrics {
            text: response.body,
            samples,
        }
    }

    fn value(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }
}

/// `{agent="A",instance="I"}` series of metric `name`.
fn instance_series(name: &str, agent: &str, instance: &str) -> String {
    format!("{name}{{agent=\"{agent}\",instance=\"{instance}\"}}")
}

/// Polls `/metrics` until every `(series, expected value)` holds; `None`
/// means the series must be absent.
fn wait_for_metrics(coordinator: &Coordinator, expected: &[(String, Option<f64>)]) -> Metrics {
    let description = format!(
        "/metrics shows {}",
        expected
            .iter()
            .map(|(series, value)| match value {
                Some(value) => format!("{series} {value}"),
                None => format!("no {series}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut last = String::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(SETTLE_WITHIN, POLL, &description, || {
            let metrics = Metrics::get(coordinator);
            let all_hold = expected
                .iter()
                .all(|(series, value)| metrics.value(series) == *value);
            if all_hold {
                Some(metrics)
            } else {
                last = metrics.text;
                None
            }
        })
    }));
    match outcome {
        Ok(metrics) => metrics,
        Err(panic) => {
            eprintln!("the last /metrics seen:\n{last}");
            std::panic::resume_unwind(panic)
        }
    }
}

/// `cairn probe NAME --output json`, which must succeed and print exactly
/// one probe, of instance `main`.
fn probe_main(coordinator: &Coordinator, agent: &str) -> Value {
    let probes = coordinator.cli_json(&["probe", agent]);
    single_main_probe(&probes)
}

fn single_main_probe(probes: &Value) -> Value {
    let list = probes
        .as_array()
        .unwrap_or_else(|| panic!("`cairn probe` did not print an array: {probes}"));
    assert_eq!(list.len(), 1, "one instance, one probe: {probes:#}");
    assert_eq!(list[0]["instance"], "main", "{probes:#}");
    list[0].clone()
}

/// The entry of agent `name` in `cairn agents list --output json`.
fn listed_agent(coordinator: &Coordinator, name: &str) -> Value {
    let agents = coordinator.agents();
    agents
        .iter()
        .find(|agent| agent["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("agent {name} is not in `cairn agents list`: {agents:#?}"))
}

fn timestamp(value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is not a timestamp string"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

/// The first line of a psql answer parsed as a number.
fn psql_number<T: std::str::FromStr>(pg: &PgCluster, sql: &str) -> T
where
    T::Err: Display,
{
    let text = pg.psql("postgres", sql);
    text.parse()
        .unwrap_or_else(|e| panic!("psql answered {text:?} to {sql:?}: {e}"))
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
            let file_type = entry
                .file_type()
                .unwrap_or_else(|e| panic!("stat {}: {e}", entry.path().display()));
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                files.push(entry.path());
            }
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `server.shutdown_grace` from the coordinator's config, which
/// `cairn init` writes in whole seconds (`shutdown_grace = "30s"`).
fn shutdown_grace(coordinator: &Coordinator) -> Duration {
    let config = std::fs::read_to_string(coordinator.config_path())
        .unwrap_or_else(|e| panic!("read {}: {e}", coordinator.config_path().display()));
    let value = config
        .lines()
        .find_map(|line| line.trim().strip_prefix("shutdown_grace = "))
        .unwrap_or_else(|| panic!("no shutdown_grace in coordinator.toml:\n{config}"));
    let seconds: u64 = value
        .trim_matches('"')
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("shutdown_grace {value} is not whole seconds"));
    Duration::from_secs(seconds)
}

/// Waits until both agents are online again, each still the same process
/// (it reconnected by itself), and answers a probe.
fn assert_reconnected(coordinator: &Coordinator, agents: &[(&Agent, u32)], after: &str) {
    for (agent, pid) in agents {
        coordinator.wait_for_agent_status(agent.name(), "online", RECONNECT_WITHIN);
        assert_eq!(
            agent.process().pid(),
            *pid,
            "agent {} was restarted instead of reconnecting after {after}",
            agent.name()
        );
        assert!(
            agent.process().try_exit_status().is_none(),
            "agent {} exited after {after}",
            agent.name()
        );
        let probe = probe_main(coordinator, agent.name());
        assert_eq!(
            probe["reachable"],
            true,
            "probe of {} after {after}: {probe:#}",
            agent.name()
        );
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn enrolled_agent_is_listed_online_with_what_it_registered() {
    let test_dir = TestDir::new("enrolled_agent_is_listed_online_with_what_it_registered");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let agent = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default()
            .label("env", "test")
            .label("team", "payments")
            .allow("backup"),
    );

    let listed = listed_agent(&coordinator, "db1");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read /proc/sys/kernel/hostname")
        .trim()
        .to_string();
    let cert_pem = std::fs::read(agent.dir().join("identity").join("cert.pem"))
        .expect("read the agent's certificate");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&cert_pem).expect("the agent's cert.pem");
    let certificate = pem.parse_x509().expect("the agent's certificate parses");
    let serial = hex(certificate.raw_serial());
    let source = format!("{}:", agent.source_address());

    let mut checks = Checks::new(format!("{listed:#}"));
    checks.eq("status", &listed["status"], "online");
    checks.eq("hostname", &listed["hostname"], hostname.as_str());
    checks.check(
        "hostname is not empty",
        listed["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        &listed["hostname"],
    );
    checks.eq("version", &listed["version"], cairn_common::VERSION);
    checks.eq(
        "labels",
        &listed["labels"],
        &json!({"env": "test", "team": "payments"}),
    );
    checks.eq("instances", &listed["instances"], &json!(["main"]));
    checks.eq(
        "permitted_operations",
        &listed["permitted_operations"],
        &json!(["backup"]),
    );
    let peer = listed["peer_address"].as_str().unwrap_or_default();
    checks.check(
        &format!("peer_address is {source}PORT"),
        peer.strip_prefix(&source)
            .is_some_and(|port| port.parse::<u16>().is_ok_and(|p| p != 0)),
        peer,
    );
    checks.eq(
        "certificate_serial (of the agent's cert.pem)",
        &listed["certificate_serial"],
        serial.as_str(),
    );
    checks.check(
        "certificate_serial is not empty",
        !serial.is_empty(),
        "empty serial in cert.pem",
    );
    for field in ["enrolled_at", "last_seen_at", "certificate_not_after"] {
        checks.check(
            &format!("{field} is a time"),
            listed[field]
                .as_str()
                .is_some_and(|t| DateTime::parse_from_rfc3339(t).is_ok()),
            &listed[field],
        );
    }
    checks.eq("revoked_at", &listed["revoked_at"], &Value::Null);
    checks.finish();

    // The private key stays on the agent's host: 0600, owned by the agent's
    // user, and no copy of it on the coordinator's side, not even in logs.
    let key_path = agent.dir().join("identity").join("key.pem");
    let metadata = std::fs::metadata(&key_path).expect("stat the agent's key.pem");
    assert_eq!(
        metadata.permissions().mode() & 0o777,
        0o600,
        "{} mode",
        key_path.display()
    );
    if let Some(user) = privileges::postgres_user() {
        assert_eq!(
            metadata.uid(),
            user.uid.as_raw(),
            "{} belongs to the user the agent runs as",
            key_path.display()
        );
    }
    let key_pem = std::fs::read_to_string(&key_path).expect("read the agent's key.pem");
    let key_der = rcgen::KeyPair::from_pem(&key_pem)
        .expect("key.pem is a private key")
        .serialize_der();
    let key_base64: Vec<&str> = key_pem
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() >= 32)
        .collect();
    assert!(!key_base64.is_empty(), "key.pem has a body: {key_path:?}");
    let mut looked_at = 0;
    for file in files_under(coordinator.home())
        .into_iter()
        .chain(files_under(&test_dir.logs_dir()))
    {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        looked_at += 1;
        assert!(
            !contains(&bytes, &key_der)
                && !key_base64
                    .iter()
                    .any(|line| contains(&bytes, line.as_bytes())),
            "{} holds (part of) the agent's private key",
            file.display()
        );
    }
    assert!(
        looked_at >= 5,
        "the coordinator home and logs should hold files (catalog, CA, config, ...); found \
         {looked_at}"
    );

    // The human table names the agent, its status, address and permits.
    let table = coordinator.cli(&["agents", "list"]).assert_success();
    let row = table
        .stdout
        .lines()
        .find(|line| line.contains("db1"))
        .unwrap_or_else(|| panic!("`cairn agents list` has no row for db1:\n{}", table.stdout));
    for expected in ["online", source.as_str(), "main", "backup"] {
        assert!(
            row.contains(expected),
            "the row of db1 in `cairn agents list` does not mention {expected:?}:\n{}",
            table.stdout
        );
    }
}

#[test]
fn probe_fields_match_what_psql_reports() {
    let test_dir = TestDir::new("probe_fields_match_what_psql_reports");
    let pg = PgCluster::start_in(&test_dir, "main");
    pg.create_database("shop");
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());

    // Periodic probes arrive without anyone asking: the history grows, and
    // is listed newest first.
    let shown = wait_for(
        SETTLE_WITHIN,
        POLL,
        "`cairn agents show db1` holds at least 2 probes of instance main",
        || {
            let shown = coordinator.cli_json(&["agents", "show", "db1"]);
            let count = shown["probes"].as_array().map_or(0, |probes| probes.len());
            (count >= 2).then_some(shown)
        },
    );
    let history = shown["probes"].as_array().expect("probes is an array");
    let mut checks = Checks::new(format!("{shown:#}"));
    checks.eq("agent.name", &shown["agent"]["name"], "db1");
    for (index, probe) in history.iter().enumerate() {
        checks.eq(
            &format!("probes[{index}].instance"),
            &probe["instance"],
            "main",
        );
        checks.eq(
            &format!("probes[{index}].reachable"),
            &probe["reachable"],
            true,
        );
    }
    let times: Vec<DateTime<Utc>> = history.iter().map(|p| timestamp(&p["probed_at"])).collect();
    checks.check(
        "probes are newest first",
        times.windows(2).all(|pair| pair[0] >= pair[1]),
        format!("{times:?}"),
    );
    checks.check(
        "periodic probes are distinct probes",
        times.first() != times.last(),
        format!("{times:?}"),
    );
    checks.finish();

    let probe = probe_main(&coordinator, "db1");

    // What PostgreSQL says, read right after the probe.
    let server_version = pg.psql("postgres", "SHOW server_version");
    let server_version_num: u64 = psql_number(&pg, "SHOW server_version_num");
    let max_connections: u64 = psql_number(&pg, "SHOW max_connections");
    let uptime: f64 = psql_number(
        &pg,
        "SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8",
    );
    let databases: Vec<(String, u64)> = pg
        .psql(
            "postgres",
            "SELECT datname, pg_database_size(oid) FROM pg_database WHERE NOT datistemplate \
             ORDER BY datname",
        )
        .lines()
        .map(|line| {
            let (name, size) = line
                .split_once('|')
                .unwrap_or_else(|| panic!("psql row {line:?}"));
            let size = size
                .parse()
                .unwrap_or_else(|e| panic!("psql size {size:?}: {e}"));
            (name.to_string(), size)
        })
        .collect();
    assert!(
        databases.iter().any(|(name, _)| name == "shop"),
        "psql lists shop: {databases:?}"
    );
    let statvfs = nix::sys::statvfs::statvfs(pg.data_dir())
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", pg.data_dir().display()));
    let disk_total = statvfs.blocks() * statvfs.fragment_size();

    let mut checks = Checks::new(format!("{probe:#}"));
    checks.eq("reachable", &probe["reachable"], true);
    checks.eq("error", &probe["error"], &Value::Null);
    checks.eq(
        "server_version",
        &probe["server_version"],
        server_version.as_str(),
    );
    checks.eq(
        "server_version_num",
        &probe["server_version_num"],
        server_version_num,
    );
    checks.eq("in_recovery", &probe["in_recovery"], false);
    checks.eq("role", &probe["role"], "primary");
    checks.eq("standbys", &probe["standbys"], &json!([]));
    checks.eq("receiver", &probe["receiver"], &Value::Null);
    checks.eq(
        "max_connections",
        &probe["max_connections"],
        max_connections,
    );
    let connections = probe["connections"].as_u64().unwrap_or(0);
    checks.check(
        "1 <= connections <= max_connections",
        (1..=max_connections).contains(&connections),
        &probe["connections"],
    );
    checks.check(
        "select1_rtt_micros > 0",
        probe["select1_rtt_micros"].as_u64().unwrap_or(0) > 0,
        &probe["select1_rtt_micros"],
    );
    let probe_uptime = probe["uptime_seconds"].as_u64().unwrap_or(u64::MAX) as f64;
    checks.check(
        &format!("uptime_seconds within {UPTIME_TOLERANCE_SECONDS}s of psql's {uptime:.1}"),
        (probe_uptime - uptime).abs() <= UPTIME_TOLERANCE_SECONDS,
        &probe["uptime_seconds"],
    );
    let probed: Vec<(String, u64)> = probe["databases"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|d| {
                    (
                        d["name"].as_str().unwrap_or_default().to_string(),
                        d["size_bytes"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut probed_names: Vec<&str> = probed.iter().map(|(name, _)| name.as_str()).collect();
    probed_names.sort_unstable();
    let psql_names: Vec<&str> = databases.iter().map(|(name, _)| name.as_str()).collect();
    checks.eq("database names", probed_names, psql_names);
    for (name, size) in &databases {
        let reported = probed.iter().find(|(n, _)| n == name).map(|(_, s)| *s);
        checks.check(
            &format!("size of database {name} within {DATABASE_SIZE_TOLERANCE} of {size}"),
            reported.is_some_and(|r| r.abs_diff(*size) <= DATABASE_SIZE_TOLERANCE),
            format!("{reported:?}"),
        );
    }
    let disk = &probe["data_directory_disk"];
    checks.eq(
        "data_directory_disk.path",
        &disk["path"],
        pg.data_dir().to_str().expect("UTF-8 data directory"),
    );
    checks.eq(
        "data_directory_disk.total_bytes (statvfs of the data directory)",
        &disk["total_bytes"],
        disk_total,
    );
    let available = disk["available_bytes"].as_u64().unwrap_or(0);
    checks.check(
        "0 < data_directory_disk.available_bytes <= total_bytes",
        available > 0 && available <= disk_total,
        &disk["available_bytes"],
    );
    checks.check(
        "archiver is reported",
        probe["archiver"]["failed_count"].is_u64(),
        &probe["archiver"],
    );
    checks.finish();
}

#[test]
fn standby_and_primary_report_replication() {
    let test_dir = TestDir::new("standby_and_primary_report_replication");
    let primary = PgCluster::start_in(&test_dir, "primary");
    primary.psql(
        "postgres",
        "CREATE TABLE events (id int); INSERT INTO events VALUES (1)",
    );
    let standby = PgCluster::standby_of(&primary);
    let coordinator = Coordinator::start(&test_dir);
    let _primary_agent = coordinator.enroll_agent("primary-db", &primary, AgentOptions::default());
    let _standby_agent = coordinator.enroll_agent("standby-db", &standby, AgentOptions::default());

    let standby_probe = wait_for(
        SETTLE_WITHIN,
        POLL,
        "the standby's probe says its WAL receiver is streaming",
        || {
            let probe = probe_main(&coordinator, "standby-db");
            (probe["receiver"]["streaming"] == true).then_some(probe)
        },
    );
    let mut checks = Checks::new(format!("standby: {standby_probe:#}"));
    checks.eq("reachable", &standby_probe["reachable"], true);
    checks.eq("in_recovery", &standby_probe["in_recovery"], true);
    checks.eq("role", &standby_probe["role"], "standby");
    checks.eq(
        "receiver.streaming",
        &standby_probe["receiver"]["streaming"],
        true,
    );
    checks.check(
        "receiver.replay_lag_bytes is a number",
        standby_probe["receiver"]["replay_lag_bytes"].is_u64(),
        &standby_probe["receiver"]["replay_lag_bytes"],
    );
    checks.eq("standbys", &standby_probe["standbys"], &json!([]));
    checks.finish();

    let primary_probe = wait_for(
        SETTLE_WITHIN,
        POLL,
        "the primary's probe lists a streaming standby",
        || {
            let probe = probe_main(&coordinator, "primary-db");
            (probe["standbys"][0]["state"] == "streaming").then_some(probe)
        },
    );
    let client_address = primary.psql(
        "postgres",
        "SELECT coalesce(host(client_addr), '') FROM pg_stat_replication",
    );
    let application_name = primary.psql(
        "postgres",
        "SELECT application_name FROM pg_stat_replication",
    );
    let mut checks = Checks::new(format!("primary: {primary_probe:#}"));
    checks.eq("reachable", &primary_probe["reachable"], true);
    checks.eq("in_recovery", &primary_probe["in_recovery"], false);
    checks.eq("role", &primary_probe["role"], "primary");
    checks.eq("receiver", &primary_probe["receiver"], &Value::Null);
    let standbys = primary_probe["standbys"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    checks.eq("number of standbys", standbys.len(), 1);
    if let Some(entry) = standbys.first() {
        checks.eq("standbys[0].state", &entry["state"], "streaming");
        checks.eq(
            "standbys[0].application_name (pg_stat_replication)",
            &entry["application_name"],
            application_name.as_str(),
        );
        checks.check(
            "standbys[0].replay_lag_bytes is a number",
            entry["replay_lag_bytes"].is_u64(),
            &entry["replay_lag_bytes"],
        );
    }
    checks.finish();

    let standby_lag_series = format!(
        "cairn_standby_replay_lag_bytes{{agent=\"primary-db\",instance=\"main\",standby=\"{application_name}\",client_address=\"{client_address}\"}}"
    );
    let metrics = wait_for_metrics(
        &coordinator,
        &[
            (
                instance_series("cairn_instance_in_recovery", "standby-db", "main"),
                Some(1.0),
            ),
            (
                instance_series("cairn_instance_in_recovery", "primary-db", "main"),
                Some(0.0),
            ),
        ],
    );
    wait_until(
        SETTLE_WITHIN,
        POLL,
        &format!("/metrics has {standby_lag_series} and the standby's own lag"),
        || {
            let metrics = Metrics::get(&coordinator);
            metrics.value(&standby_lag_series).is_some()
                && metrics
                    .value(&instance_series(
                        "cairn_instance_replication_lag_bytes",
                        "standby-db",
                        "main",
                    ))
                    .is_some()
        },
    );
    assert!(
        metrics
            .text
            .contains("cairn_instance_in_recovery{agent=\"standby-db\",instance=\"main\"} 1"),
        "{}",
        metrics.text
    );
}

#[test]
fn metrics_expose_the_fleet() {
    let test_dir = TestDir::new("metrics_expose_the_fleet");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let mut agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    let max_connections: f64 = psql_number(&pg, "SHOW max_connections");

    for (path, body) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let response = coordinator
            .http_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(
            (response.status, response.body.trim()),
            (200, body),
            "GET {path}"
        );
    }

    let reachable = instance_series("cairn_instance_reachable", "db1", "main");
    let available = instance_series("cairn_instance_disk_available_bytes", "db1", "main");
    let total = instance_series("cairn_instance_disk_total_bytes", "db1", "main");
    let metrics = wait_for_metrics(
        &coordinator,
        &[
            ("cairn_agents{status=\"online\"}".into(), Some(1.0)),
            ("cairn_agents{status=\"offline\"}".into(), Some(0.0)),
            ("cairn_agents{status=\"revoked\"}".into(), Some(0.0)),
            ("cairn_agent_up{agent=\"db1\"}".into(), Some(1.0)),
            (reachable.clone(), Some(1.0)),
            (
                instance_series("cairn_instance_max_connections", "db1", "main"),
                Some(max_connections),
            ),
        ],
    );
    let mut checks = Checks::new(&metrics.text);
    let available_bytes = metrics.value(&available).unwrap_or(0.0);
    let total_bytes = metrics.value(&total).unwrap_or(0.0);
    checks.check(
        &format!("0 < {available} <= {total}"),
        available_bytes > 0.0 && available_bytes <= total_bytes,
        format!("{available_bytes} of {total_bytes}"),
    );
    checks.check(
        "an instance_probe_age_seconds series",
        metrics
            .value(&instance_series(
                "cairn_instance_probe_age_seconds",
                "db1",
                "main",
            ))
            .is_some_and(|age| (0.0..10.0).contains(&age)),
        "missing or not a few seconds",
    );
    checks.finish();

    let status = agent.stop();
    assert!(
        status.success(),
        "SIGTERM stops the agent cleanly: {status}"
    );
    coordinator.wait_for_agent_status("db1", "offline", OFFLINE_WITHIN);
    wait_for_metrics(
        &coordinator,
        &[
            ("cairn_agents{status=\"online\"}".into(), Some(0.0)),
            ("cairn_agents{status=\"offline\"}".into(), Some(1.0)),
            ("cairn_agent_up{agent=\"db1\"}".into(), Some(0.0)),
        ],
    );
}

#[test]
fn agent_that_misses_three_heartbeats_is_offline_and_comes_back() {
    let test_dir = TestDir::new("agent_that_misses_three_heartbeats_is_offline_and_comes_back");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    let pid = agent.process().pid();

    // A hung host: the process keeps its connection but sends nothing.
    agent.process().pause();
    let paused_at = Instant::now();
    coordinator.wait_for_agent_status("db1", "offline", OFFLINE_WITHIN);
    let offline_after = paused_at.elapsed();
    // The last heartbeat came at most one interval (1 s) before the pause,
    // so three missed ones take at least two seconds from it.
    assert!(
        offline_after >= Duration::from_secs(2),
        "db1 was shown offline {offline_after:?} after it stopped, before missing three 1s \
         heartbeats"
    );
    let metrics = Metrics::get(&coordinator);
    assert_eq!(
        metrics.value("cairn_agent_up{agent=\"db1\"}"),
        Some(0.0),
        "{}",
        metrics.text
    );

    // Asking an offline agent fails at once, on one line, saying why.
    for args in [&["probe", "db1"][..], &["probe", "db1", "--output", "json"]] {
        let started = Instant::now();
        let refused = coordinator.cli(args);
        let mut checks = Checks::new(&refused);
        checks.eq("exit code", refused.status_code, Some(1));
        checks.eq("stdout", refused.stdout.trim(), "");
        checks.eq("lines on stderr", refused.stderr.trim().lines().count(), 1);
        checks.check(
            "stderr mentions offline",
            refused.stderr.contains("offline"),
            refused.stderr.trim(),
        );
        checks.check(
            "stderr names the agent",
            refused.stderr.contains("db1"),
            refused.stderr.trim(),
        );
        checks.check(
            "fails without waiting for the probe timeout (10s)",
            started.elapsed() < Duration::from_secs(8),
            format!("{:?}", started.elapsed()),
        );
        checks.finish();
    }

    agent.process().resume();
    coordinator.wait_for_agent_status("db1", "online", OFFLINE_WITHIN);
    assert_eq!(agent.process().pid(), pid, "the same process came back");
    assert!(
        agent.process().try_exit_status().is_none(),
        "the agent still runs"
    );
    let probe = probe_main(&coordinator, "db1");
    assert_eq!(probe["reachable"], true, "{probe:#}");
}

#[test]
fn agents_reconnect_by_themselves_after_a_coordinator_restart() {
    let test_dir = TestDir::new("agents_reconnect_by_themselves_after_a_coordinator_restart");
    let pg = PgCluster::start_in(&test_dir, "main");
    let mut coordinator = Coordinator::start(&test_dir);
    let db1 = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    let db2 = coordinator.enroll_agent("db2", &pg, AgentOptions::default());
    let agents = [(&db1, db1.process().pid()), (&db2, db2.process().pid())];

    // A clean restart (SIGTERM, then serve again on the same ports).
    coordinator.restart();
    assert_reconnected(&coordinator, &agents, "a coordinator restart");

    // A crash.
    let killed = coordinator.kill();
    assert!(!killed.success(), "SIGKILL: {killed}");
    coordinator.start_again();
    assert_reconnected(&coordinator, &agents, "a coordinator crash");

    // SIGTERM with agents connected ends the coordinator cleanly, within
    // its grace period.
    let grace = shutdown_grace(&coordinator);
    let started = Instant::now();
    let status = coordinator.stop();
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "cairn serve after SIGTERM: {status}"
    );
    assert!(
        took < grace,
        "cairn serve took {took:?} to stop, more than shutdown_grace {grace:?}"
    );
}

#[test]
fn unreachable_instance_is_reported_not_hidden() {
    let test_dir = TestDir::new("unreachable_instance_is_reported_not_hidden");
    let mut pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let _agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    let reachable = instance_series("cairn_instance_reachable", "db1", "main");
    wait_for_metrics(&coordinator, &[(reachable.clone(), Some(1.0))]);

    pg.stop();
    let answer = coordinator.cli(&["probe", "db1", "--output", "json"]);
    assert_eq!(
        answer.status_code,
        Some(1),
        "`cairn probe` exits 1 when an instance is unreachable: {answer}"
    );
    let probe = single_main_probe(&answer.json());
    let mut checks = Checks::new(format!("{probe:#}"));
    checks.eq("reachable", &probe["reachable"], false);
    checks.check(
        "error says why",
        probe["error"]
            .as_str()
            .is_some_and(|e| !e.trim().is_empty()),
        &probe["error"],
    );
    checks.check(
        "error does not leak the connection string",
        !probe["error"]
            .as_str()
            .unwrap_or_default()
            .contains("user=postgres"),
        &probe["error"],
    );
    checks.finish();

    // The agent itself is fine: it stays online and says so.
    assert_eq!(coordinator.agent_status("db1").as_deref(), Some("online"));
    wait_for_metrics(
        &coordinator,
        &[
            (reachable.clone(), Some(0.0)),
            ("cairn_agent_up{agent=\"db1\"}".into(), Some(1.0)),
        ],
    );
    let shown = coordinator.cli_json(&["agents", "show", "db1"]);
    assert_eq!(
        shown["probes"][0]["reachable"], false,
        "the newest stored probe is the unreachable one: {shown:#}"
    );

    pg.start_again();
    let probe = wait_for(
        SETTLE_WITHIN,
        POLL,
        "`cairn probe db1` reaches the restarted instance",
        || {
            let answer = coordinator.cli(&["probe", "db1", "--output", "json"]);
            answer.success().then(|| single_main_probe(&answer.json()))
        },
    );
    assert_eq!(probe["reachable"], true, "{probe:#}");
    assert_eq!(probe["error"], Value::Null, "{probe:#}");
    wait_for_metrics(&coordinator, &[(reachable, Some(1.0))]);
}

/// `/readyz` reads the repository's descriptor back and writes nothing: a
/// repository where no new object can be made under `readyz/` (here a file
/// stands where that directory would go, as a write-once bucket or another
/// coordinator's object would) is still ready, and a repository whose
/// descriptor is gone is not, with a reason naming it.
#[test]
fn readyz_reads_the_repository_descriptor_and_writes_nothing() {
    let test_dir = TestDir::new("readyz_reads_the_repository");
    let coordinator = Coordinator::start(&test_dir);
    let repository = coordinator.home().join("repository");
    let descriptor = repository.join("cairn-repository.json");
    assert!(descriptor.is_file(), "{}", descriptor.display());
    std::fs::write(repository.join("readyz"), "not a directory").unwrap();
    let files = || {
        let mut files = files_under(&repository);
        files.sort();
        files
    };
    let before = files();

    let ready = coordinator.http_get("/readyz").unwrap();
    assert_eq!(
        (ready.status, ready.body.trim()),
        (200, "ready"),
        "{}",
        ready.body
    );
    assert_eq!(files(), before, "/readyz wrote to the repository");

    let moved = repository.join("descriptor.moved");
    std::fs::rename(&descriptor, &moved).unwrap();
    let unready = coordinator.http_get("/readyz").unwrap();
    assert_eq!(unready.status, 503, "{}", unready.body);
    assert!(
        unready.body.contains("cairn-repository.json"),
        "the reason names the descriptor: {}",
        unready.body
    );
    std::fs::rename(&moved, &descriptor).unwrap();
    assert_eq!(coordinator.http_get("/readyz").unwrap().status, 200);
}
