//! Certificate renewal, end to end, with one-minute agent certificates
//! (`fleet.agent_certificate_lifetime = "1m"`): the real agent renews at
//! two thirds of the lifetime over its own connection, keeps a running
//! backup going across its first certificate's expiry, moves to the new
//! certificate when the job ends, renews again, and the certificates it
//! left behind are refused.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_common::identity::certificate_validity;
use cairn_common::pki::generate_key_and_csr;
use cairn_common::proto::{self, agent_gateway_client::AgentGatewayClient};
use cairn_common::tls::{self, CoordinatorUrl, parse_certificates};
use cairn_integration_tests::{
    AgentOptions, Coordinator, PgCluster, TestDir, job_is_active, wait_for, wait_until,
};
use serde_json::Value;

const AGENT: &str = "db1";
const DATABASE: &str = "shop";
const POLL: Duration = Duration::from_millis(250);
/// Past a certificate's expiry, how long the test lets pg_dump wait on the
/// lock it holds, so that the backup's calls outlive the certificate.
const LOCK_BEYOND_EXPIRY: Duration = Duration::from_secs(8);

/// A `psql` that holds an ACCESS EXCLUSIVE lock on a table until it is
/// done sleeping (pg_dump waits for it); killed on drop.
struct LockHolder(Child);

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The current certificate's serial and expiry (Unix seconds) of agent
/// `AGENT` as `cairn agents list --output json` shows them.
fn listed_certificate(coordinator: &Coordinator) -> (String, String) {
    let agent = coordinator
        .agents()
        .into_iter()
        .find(|a| a["name"] == AGENT)
        .unwrap();
    (
        agent["certificate_serial"].as_str().unwrap().to_string(),
        agent["certificate_not_after"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn audit_events(coordinator: &Coordinator, action: &str) -> Vec<Value> {
    match coordinator.cli_json(&["audit", "list", "--limit", "1000"]) {
        Value::Array(events) => events
            .into_iter()
            .filter(|e| e["action"] == action)
            .collect(),
        other => panic!("audit list did not print an array: {other}"),
    }
}

/// The agent identity's `cert.pem` and `key.pem`, and its expiry.
fn held_identity(agent_dir: &Path) -> (Vec<u8>, Vec<u8>, i64) {
    let identity = agent_dir.join("identity");
    let cert = std::fs::read(identity.join("cert.pem")).unwrap();
    let key = std::fs::read(identity.join("key.pem")).unwrap();
    let der = parse_certificates(&cert, "agent certificate").unwrap();
    let (_, not_after) = certificate_validity(&der[0]).unwrap();
    (cert, key, not_after)
}

/// `RenewCertificate` on a new connection presenting `cert`/`key`.
async fn renew_as(
    coordinator: &Coordinator,
    cert: &[u8],
    key: &[u8],
) -> Result<proto::RenewCertificateResponse, String> {
    let ca = std::fs::read(coordinator.ca_cert()).unwrap();
    let config = tls::client_config(&ca, Some((cert, key))).unwrap();
    let url = CoordinatorUrl::parse(&coordinator.url()).unwrap();
    let channel = tls::connect(&url, config, None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let csr = generate_key_and_csr(AGENT).unwrap().csr_pem;
    let mut client = AgentGatewayClient::new(channel);
    let call = client.renew_certificate(proto::RenewCertificateRequest { csr_pem: csr });
    match tokio::time::timeout(Duration::from_secs(15), call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!(
            "{:?}: {} ({})",
            status.code(),
            status.message(),
            tls::describe_transport_error(&status)
        )),
        Err(_) => panic!("RenewCertificate hung"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_one_minute_certificates_and_a_running_backup_survives_the_switch() {
    let test_dir = TestDir::new("certificate_renewal");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_sample_database(DATABASE, 1);
    let mut coordinator = Coordinator::start(&test_dir);
    let config = std::fs::read_to_string(coordinator.config_path()).unwrap();
    let line = config
        .lines()
        .find(|l| l.starts_with("agent_certificate_lifetime = "))
        .expect("cairn init writes fleet.agent_certificate_lifetime")
        .to_string();
    std::fs::write(
        coordinator.config_path(),
        config.replace(&line, "agent_certificate_lifetime = \"1m\""),
    )
    .unwrap();
    coordinator.restart();
    let log = coordinator.process().log();
    assert!(
        log.contains("fleet.agent_certificate_lifetime is 1m, under a day"),
        "the coordinator warns about a lifetime under a day:\n{log}"
    );

    let agent = coordinator.enroll_agent(AGENT, &pg, AgentOptions::default().allow("backup"));
    let (first_cert, first_key, first_not_after) = held_identity(agent.dir());
    let (first_serial, _) = listed_certificate(&coordinator);
    let lifetime_left = first_not_after - now_unix();
    assert!(
        (45..=61).contains(&lifetime_left),
        "the first certificate lasts a minute: {lifetime_left}s left"
    );

    // A backup that starts now, before the renewal (due at 40 s), and
    // cannot finish until after the first certificate expired: pg_dump
    // waits for a lock the test holds until then.
    let hold =
        Duration::from_secs((first_not_after - now_unix()).max(0) as u64) + LOCK_BEYOND_EXPIRY;
    let mut psql = pg.pg_command("psql");
    psql.args([
        "-X",
        "-q",
        "-d",
        DATABASE,
        "-c",
        &format!(
            "BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({}); COMMIT;",
            hold.as_secs()
        ),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _lock = LockHolder(psql.spawn().unwrap());
    wait_until(
        Duration::from_secs(20),
        POLL,
        "the test holds the lock",
        || {
            pg.psql(
            DATABASE,
            "SELECT count(*) FROM pg_locks WHERE relation = 'orders'::regclass AND mode = 'AccessExclusiveLock' AND granted",
        ) == "1"
        },
    );
    let jobs = coordinator.cli_json(&["backup", "run", "--agent", AGENT, "--database", DATABASE]);
    let job_id = jobs[0]["id"].as_str().unwrap().to_string();
    assert!(job_is_active(&jobs[0]), "{jobs}");

    // The renewal happens while the job runs; the agent keeps its session
    // (and so its job), so the listed serial stays the first one.
    wait_until(Duration::from_secs(60), POLL, "the agent renewed", || {
        audit_events(&coordinator, "agent.renew")
            .iter()
            .any(|e| e["outcome"] == "success")
    });
    assert_eq!(listed_certificate(&coordinator).0, first_serial);

    // Past the first certificate's expiry: still online, job still running.
    let past_expiry = Duration::from_secs((first_not_after + 2 - now_unix()).max(0) as u64);
    tokio::time::sleep(past_expiry).await;
    assert_eq!(coordinator.agent_status(AGENT).as_deref(), Some("online"));
    let job = coordinator.cli_json(&["jobs", "show", &job_id]);
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(listed_certificate(&coordinator).0, first_serial);

    // The lock goes; the backup finishes on the old connection.
    let job = wait_for(Duration::from_secs(60), POLL, "the backup ends", || {
        let job = coordinator.cli_json(&["jobs", "show", &job_id]);
        (!job_is_active(&job)).then_some(job)
    });
    assert_eq!(job["status"], "succeeded", "{job}");

    // Then the agent reconnects with the new certificate, which becomes
    // current and revokes the first.
    let second_serial = wait_for(
        Duration::from_secs(20),
        POLL,
        "the agent uses its renewed certificate",
        || {
            let (serial, _) = listed_certificate(&coordinator);
            (serial != first_serial).then_some(serial)
        },
    );
    coordinator.wait_for_agent_status(AGENT, "online", Duration::from_secs(10));
    let switches = audit_events(&coordinator, "agent.certificate-switch");
    assert!(
        switches.iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&first_serial)),
        "the switch revoked the first serial: {switches:?}"
    );
    let (second_cert, second_key, second_not_after) = held_identity(agent.dir());
    assert!(second_not_after > first_not_after);
    assert!(
        renew_as(&coordinator, &first_cert, &first_key)
            .await
            .is_err(),
        "the first certificate is refused"
    );

    // With no job running, the next renewal (at two thirds of the second
    // certificate) moves the agent at once, and revokes the second
    // certificate while it is still within its lifetime.
    let third_serial = wait_for(
        Duration::from_secs(60),
        POLL,
        "the agent renews again and moves to the third certificate",
        || {
            let (serial, _) = listed_certificate(&coordinator);
            (serial != first_serial && serial != second_serial).then_some(serial)
        },
    );
    assert!(now_unix() < second_not_after, "renewed before expiry");
    let refusal = renew_as(&coordinator, &second_cert, &second_key)
        .await
        .expect_err("the replaced certificate is refused");
    // The refusal reaches the client as the TLS alert or as a closed
    // connection, depending on timing; the coordinator says why.
    let log = coordinator.process().log();
    assert!(
        refusal.to_lowercase().contains("revoked")
            || log.contains("invalid peer certificate: Revoked"),
        "the replaced, unexpired certificate is refused as revoked: {refusal}"
    );
    coordinator.wait_for_agent_status(AGENT, "online", Duration::from_secs(10));

    // `agents list` and /metrics show the expiry.
    let (serial, not_after) = listed_certificate(&coordinator);
    assert_eq!(serial, third_serial);
    assert!(!not_after.is_empty());
    let table = coordinator.cli(&["agents", "list"]);
    assert!(table.stdout.contains("CERT EXPIRES"), "{}", table.stdout);
    let metrics = coordinator.http_get("/metrics").unwrap().body;
    assert!(
        metrics.contains("cairn_agent_certificate_expiry_seconds{agent=\"db1\"}")
            && metrics.contains("cairn_agent_certificate_soonest_expiry_seconds"),
        "{metrics}"
    );
    let refusals = audit_events(&coordinator, "agent.renew")
        .into_iter()
        .filter(|e| e["outcome"] != "success")
        .count();
    assert_eq!(refusals, 0, "the agent's own renewals all succeeded");
}

fn serial_in(identity: &Path) -> String {
    let cert = std::fs::read(identity.join("cert.pem")).unwrap();
    let der = parse_certificates(&cert, "operator certificate").unwrap();
    cairn_common::identity::certificate_serial(&der[0]).unwrap()
}

/// `cairn operators renew` renews the caller's own identity in place (name
/// and role from its certificate), the renewed identity works, it is
/// audited, and a revoked operator cannot renew. `cairn init` prints the
/// CA's expiry.
#[test]
fn operators_renew_their_own_identity() {
    let test_dir = TestDir::new("operator_renew");
    let coordinator = Coordinator::start(&test_dir);
    let viewer_dir = test_dir.path().join("viewer");
    let viewer = viewer_dir.to_str().unwrap();
    coordinator.issue_operator("carol", "viewer", &viewer_dir);
    let before = serial_in(&viewer_dir);
    let key_before = std::fs::read(viewer_dir.join("key.pem")).unwrap();

    let renewed = coordinator
        .cli(&["operators", "renew", "--identity", viewer])
        .assert_success();
    assert!(
        renewed.stdout.contains("Renewed operator:carol(viewer)"),
        "{renewed}"
    );
    let after = serial_in(&viewer_dir);
    assert_ne!(after, before, "a new certificate in the identity directory");
    assert_ne!(
        std::fs::read(viewer_dir.join("key.pem")).unwrap(),
        key_before
    );
    let left: Vec<_> = std::fs::read_dir(test_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("viewer"))
        .collect();
    assert_eq!(left, vec!["viewer".to_string()]);
    // Still a viewer: the role came from the certificate, not the request.
    coordinator
        .cli(&["agents", "list", "--identity", viewer])
        .assert_success();
    coordinator
        .cli(&["token", "create", "--agent", "db9", "--identity", viewer])
        .assert_failure();
    let renewals = audit_events(&coordinator, "operator.renew");
    assert!(
        renewals.iter().any(|e| e["outcome"] == "success"
            && e["actor"] == "operator:carol(viewer)"
            && e["detail"].as_str().unwrap_or_default().contains(&after)),
        "{renewals:?}"
    );

    // Revoked: no renewal.
    coordinator.cli_json(&["operators", "revoke", "carol"]);
    coordinator
        .cli(&["operators", "renew", "--identity", viewer])
        .assert_failure();
    assert_eq!(serial_in(&viewer_dir), after, "the identity is left alone");

    let home = test_dir.path().join("another-home");
    let init = cairn_integration_tests::run(
        std::process::Command::new(&cairn_integration_tests::binaries().cairn).args([
            "init",
            "--dir",
            home.to_str().unwrap(),
        ]),
    )
    .assert_success();
    assert!(init.stdout.contains("fleet CA expires: "), "{init}");
}
