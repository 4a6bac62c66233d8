//! Security: who may call what, and what never leaks.
//!
//! Every test runs the real `cairn` and `cairn-agent` binaries against a
//! real PostgreSQL cluster over real mutual TLS. Where a refusal is the
//! point, the same test also shows the allowed case succeeding, so that a
//! refusal for the wrong reason (a coordinator that is down, a broken
//! client) cannot pass for the right one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_common::identity::{Principal, Role, certificate_serial};
use cairn_common::names::OperatorName;
use cairn_common::pki::{CertificateAuthority, generate_key_and_csr};
use cairn_common::proto::{
    self, admin_client::AdminClient, agent_gateway_client::AgentGatewayClient,
};
use cairn_common::tls::{self, CoordinatorUrl};
use cairn_common::token::EnrollmentToken;
use cairn_integration_tests::cluster::AGENT_ONLINE_TIMEOUT;
use cairn_integration_tests::{
    AgentOptions, Coordinator, CoordinatorOptions, Output, PgCluster, Process, ProcessBuilder,
    TestDir, binaries, job_is_active, run, strip_ansi, wait_for, wait_until,
};
use serde_json::Value;
use time::OffsetDateTime;
use tonic::transport::Channel;

/// How long one direct gRPC call from a test may take before the test calls
/// it hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A client certificate and its key, both PEM.
#[derive(Clone)]
struct ClientIdentity {
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn read_text(path: &Path) -> String {
    String::from_utf8(read(path)).unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", path.display()))
}

/// `DIR/cert.pem` and `DIR/key.pem` of an identity directory.
fn read_identity(dir: &Path) -> ClientIdentity {
    ClientIdentity {
        cert: read(&dir.join("cert.pem")),
        key: read(&dir.join("key.pem")),
    }
}

/// Writes an identity directory the CLI can use (`ca.pem`, `cert.pem`,
/// `key.pem`).
fn write_identity(dir: &Path, ca_pem: &[u8], identity: &ClientIdentity) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    for (file, contents) in [
        ("ca.pem", ca_pem),
        ("cert.pem", identity.cert.as_slice()),
        ("key.pem", identity.key.as_slice()),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// The real fleet CA, loaded from the coordinator home.
fn fleet_ca(coordinator: &Coordinator) -> CertificateAuthority {
    let ca_dir = coordinator.home().join("ca");
    CertificateAuthority::load(
        &read_text(&ca_dir.join("ca.pem")),
        &read_text(&ca_dir.join("ca.key")),
    )
    .expect("load the fleet CA from the coordinator home")
}

fn admin_principal(name: &str) -> Principal {
    Principal::Operator {
        name: OperatorName::new(name).expect("a valid operator name"),
        role: Role::Admin,
    }
}

/// An admin identity signed by `ca` with an explicit validity window.
fn issue_with_window(
    ca: &CertificateAuthority,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> ClientIdentity {
    let key = rcgen::KeyPair::generate().expect("generate a key pair");
    let issued = ca
        .issue_client(&admin_principal(name), &key, not_before, not_after)
        .expect("issue a client certificate");
    ClientIdentity {
        cert: issued.pem.into_bytes(),
        key: key.serialize_pem().into_bytes(),
    }
}

/// A well-formed admin identity from a CA that is not the fleet's.
fn foreign_admin_identity(name: &str) -> ClientIdentity {
    let (other_ca, _other_ca_key) =
        CertificateAuthority::generate("some other fleet CA").expect("generate another CA");
    let request = generate_key_and_csr(name).expect("generate a key and CSR");
    let issued = other_ca
        .issue_client_from_csr(
            &admin_principal(name),
            &request.csr_pem,
            Duration::from_secs(3600),
        )
        .expect("issue a certificate from the other CA");
    ClientIdentity {
        cert: issued.pem.into_bytes(),
        key: request.key_pem.into_bytes(),
    }
}

/// A gRPC channel to the coordinator that trusts `ca_pem` and presents
/// `identity` (none: no client certificate).
async fn channel(
    url: &str,
    ca_pem: &[u8],
    identity: Option<&ClientIdentity>,
) -> Result<Channel, String> {
    let config = tls::client_config(
        ca_pem,
        identity.map(|i| (i.cert.as_slice(), i.key.as_slice())),
    )
    .expect("build a client TLS config");
    let url = CoordinatorUrl::parse(url).expect("parse the coordinator URL");
    match tokio::time::timeout(CALL_TIMEOUT, tls::connect(&url, config, None)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(error)) => Err(format!("connect failed: {error}")),
        Err(_) => panic!("connecting to {url} hung for {CALL_TIMEOUT:?}"),
    }
}

/// A refused call, described with its transport cause.
fn describe(status: &tonic::Status) -> String {
    format!(
        "{:?}: {} (cause: {})",
        status.code(),
        status.message(),
        tls::describe_transport_error(status)
    )
}

/// `Admin/ListAgents` on a fresh connection as `identity`; the number of
/// agents, or why the call failed.
async fn list_agents_as(
    url: &str,
    ca_pem: &[u8],
    identity: Option<&ClientIdentity>,
) -> Result<usize, String> {
    let channel = channel(url, ca_pem, identity).await?;
    let mut client = AdminClient::new(channel);
    let call = client.list_agents(proto::ListAgentsRequest {});
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner().agents.len()),
        Ok(Err(status)) => Err(describe(&status)),
        Err(_) => panic!("ListAgents hung for {CALL_TIMEOUT:?}"),
    }
}

/// Opens `AgentGateway/Control` on `channel` and registers as `agent_name`.
/// `Ok` if the stream was accepted.
async fn open_control(channel: Channel, agent_name: &str) -> Result<(), tonic::Status> {
    let register = proto::AgentMessage {
        body: Some(proto::agent_message::Body::Register(proto::Register {
            agent_name: agent_name.to_string(),
            version: cairn_common::VERSION.to_string(),
            ..Default::default()
        })),
    };
    let mut client = AgentGatewayClient::new(channel);
    let call = client.control(tonic::codegen::tokio_stream::iter(vec![register]));
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => panic!("AgentGateway/Control hung for {CALL_TIMEOUT:?}"),
    }
}

/// Whether a refused mismatched `register` says the caller's certificate
/// was read as agent `name`: the coordinator authenticated it.
fn authenticated_as(message: &str, name: &str) -> bool {
    message
        .split_once("certificate is for")
        .is_some_and(|(_, holder)| holder.contains(name))
}

/// The part of a log file written after byte `offset`.
fn log_since(path: &Path, offset: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[offset.min(bytes.len())..]).into_owned()
}

fn file_len(path: &Path) -> usize {
    std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// `cairn audit list --output json` (every event) as an array.
fn audit_events(coordinator: &Coordinator) -> Vec<Value> {
    match coordinator.cli_json(&["audit", "list", "--limit", "10000"]) {
        Value::Array(events) => events,
        other => panic!("`cairn audit list --output json` did not print an array: {other}"),
    }
}

/// The newest audit event with `action` and `target`, if any.
fn last_event<'a>(events: &'a [Value], action: &str, target: &str) -> Option<&'a Value> {
    events
        .iter()
        .filter(|e| e["action"] == action && e["target"] == target)
        .max_by_key(|e| e["id"].as_i64().unwrap_or_default())
}

/// `cairn agents show NAME --output json`'s `agent` object.
fn agent_view(coordinator: &Coordinator, name: &str) -> Value {
    coordinator.cli_json(&["agents", "show", name])["agent"].clone()
}

/// `cairn-agent enroll` into `agents_dir/dir_name` with `token`, from a fresh
/// loopback address, with `extra` arguments.
fn enroll(
    coordinator: &Coordinator,
    pg: &PgCluster,
    token: &str,
    dir_name: &str,
    extra: &[&str],
) -> (Output, PathBuf) {
    let dir = coordinator.agents_dir().join(dir_name);
    let url = coordinator.url();
    let connstring = pg.connstring();
    let source = coordinator.next_source_address().to_string();
    let dir_text = dir.display().to_string();
    let mut args = vec![
        "enroll",
        "--coordinator",
        &url,
        "--token",
        token,
        "--dir",
        &dir_text,
        "--postgres",
        &connstring,
        "--source-address",
        &source,
        "--probe-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    (coordinator.agent_cli(&args), dir)
}

/// Asserts an enrollment was refused with an error naming `expected`, and
/// left nothing behind: no agent directory, no staging directory.
fn check_enroll_refused(coordinator: &Coordinator, output: &Output, dir: &Path, expected: &str) {
    assert!(!output.success(), "enrollment must be refused: {output}");
    let first = output
        .stderr
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    assert!(
        first.starts_with("error:") && first.contains(expected),
        "the error does not say {expected:?}: {output}"
    );
    assert!(
        !dir.exists(),
        "a refused enrollment left {} behind",
        dir.display()
    );
    let leftovers: Vec<String> = std::fs::read_dir(coordinator.agents_dir())
        .expect("list the agents directory")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "a refused enrollment left staging directories: {leftovers:?}"
    );
}

/// Starts `cairn-agent run` for an agent enrolled by hand into `dir`.
fn run_agent(test_dir: &TestDir, name: &str, dir: &Path, env: &[(&str, &str)]) -> Process {
    let mut builder = Process::builder(test_dir, name, &binaries().cairn_agent).as_postgres(true);
    for (key, value) in env {
        builder = builder.env(key, value);
    }
    builder
        .arg("run")
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .spawn()
}

/// Waits until `cairn agents list` shows `name` online while `process` runs.
fn wait_online(coordinator: &Coordinator, name: &str, process: &Process) {
    wait_until(
        AGENT_ONLINE_TIMEOUT,
        Duration::from_millis(200),
        &format!("`cairn agents list` shows agent {name} as online"),
        || {
            if let Some(status) = process.try_exit_status() {
                panic!(
                    "agent {name} exited ({status}) before coming online:\n{}",
                    process.log_tail(40)
                );
            }
            coordinator.agent_status(name).as_deref() == Some("online")
        },
    );
}

/// Lines of an agent log that record a failed reconnection.
fn refused_reconnects(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("control session failed"))
        .count()
}

// ---------------------------------------------------------------------------
// 1. Refused client certificates
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_missing_foreign_and_expired_client_certificates() {
    let test_dir = TestDir::new("admin_api_refuses_bad_certificates");
    let coordinator = Coordinator::start(&test_dir);
    let url = coordinator.url();
    let ca_pem = read(&coordinator.ca_cert());

    let admin = read_identity(&coordinator.admin_identity());
    let fleet_ca = fleet_ca(&coordinator);
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let fresh = issue_with_window(&fleet_ca, "fresh", now - hour, now + hour);
    let expired = issue_with_window(
        &fleet_ca,
        "expired",
        now - time::Duration::days(2),
        now - time::Duration::days(1),
    );
    let foreign = foreign_admin_identity("mallory");

    // (who calls, their identity, whether the call is allowed). The fresh
    // certificate is made exactly like the expired one, so only its dates
    // differ.
    let cases: [(&str, Option<&ClientIdentity>, bool); 5] = [
        ("the admin identity cairn init wrote", Some(&admin), true),
        (
            "a fleet-CA certificate within its validity",
            Some(&fresh),
            true,
        ),
        ("no client certificate", None, false),
        ("a certificate from another CA", Some(&foreign), false),
        ("an expired fleet-CA certificate", Some(&expired), false),
    ];
    for (who, identity, allowed) in cases {
        let result = list_agents_as(&url, &ca_pem, identity).await;
        match (allowed, &result) {
            (true, Ok(_)) | (false, Err(_)) => {}
            (true, Err(error)) => panic!("{who}: ListAgents must succeed, failed: {error}"),
            (false, Ok(count)) => {
                panic!("{who}: ListAgents must be refused, answered with {count} agents")
            }
        }
    }

    // The refusal of an anonymous caller names what is missing.
    let anonymous = list_agents_as(&url, &ca_pem, None)
        .await
        .expect_err("an anonymous call is refused");
    assert!(
        anonymous.contains("Unauthenticated") && anonymous.contains("client certificate"),
        "an anonymous caller is not told a certificate is required: {anonymous}"
    );

    // The handshake refusals (foreign CA, expired) are audited once a minute
    // per client network, the rest counted; the anonymous calls at the RPC,
    // the same way (tests/floods.rs counts them).
    // Refusals are appended in the background: wait (bounded) for them.
    let events = tokio::task::spawn_blocking(move || {
        cairn_integration_tests::wait_for(
            Duration::from_secs(10),
            Duration::from_millis(100),
            "the refused handshake and calls appear in the audit log",
            || {
                let events = audit_events(&coordinator);
                // Both kinds: the rows are appended in the background, in
                // no particular order.
                let seen = |action: &str| events.iter().filter(|e| e["action"] == action).count();
                (seen("tls.handshake") >= 1 && seen("admin.call") >= 1).then_some(events)
            },
        )
    })
    .await
    .unwrap();
    let refused = |action: &str| {
        events
            .iter()
            .filter(|e| e["action"] == action && e["outcome"] == "refused")
            .count()
    };
    assert_eq!(refused("tls.handshake"), 1, "{events:#?}");
    assert_eq!(refused("admin.call"), 1, "{events:#?}");
}

/// Runs `cairn agents list --identity DIR`: with `expected` None it must
/// succeed, else fail with a one-line error mentioning each of `expected`.
fn check_cli_identity(coordinator: &Coordinator, dir: &Path, expected: Option<&[&str]>) {
    let dir_text = dir.display().to_string();
    let output = coordinator.cli(&["agents", "list", "--identity", &dir_text]);
    let Some(expected) = expected else {
        assert!(output.success(), "must succeed with {dir_text}: {output}");
        return;
    };
    assert!(!output.success(), "must fail with {dir_text}: {output}");
    let stderr = output.stderr.trim();
    assert_eq!(
        stderr.lines().count(),
        1,
        "not a one-line error with {dir_text}: {output}"
    );
    assert!(stderr.starts_with("error:"), "{output}");
    for needle in expected {
        assert!(
            stderr.contains(needle),
            "the error with {dir_text} does not mention {needle:?}: {output}"
        );
    }
}

#[test]
fn cli_without_a_client_certificate_fails_with_a_one_line_error() {
    let test_dir = TestDir::new("cli_without_certificate");
    let coordinator = Coordinator::start(&test_dir);
    let only_ca = test_dir.subdir("only-ca");
    std::fs::write(only_ca.join("ca.pem"), read(&coordinator.ca_cert())).expect("write ca.pem");

    check_cli_identity(&coordinator, &coordinator.admin_identity(), None);
    check_cli_identity(&coordinator, &only_ca, Some(&["cert.pem", "--identity"]));
}

#[test]
fn cli_with_a_refused_certificate_says_the_coordinator_refused_it() {
    let test_dir = TestDir::new("cli_with_refused_certificate");
    let coordinator = Coordinator::start(&test_dir);
    let ca_pem = read(&coordinator.ca_cert());
    let foreign = test_dir.subdir("foreign");
    write_identity(&foreign, &ca_pem, &foreign_admin_identity("mallory"));
    let expired = test_dir.subdir("expired");
    let now = OffsetDateTime::now_utc();
    write_identity(
        &expired,
        &ca_pem,
        &issue_with_window(
            &fleet_ca(&coordinator),
            "expired",
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        ),
    );

    check_cli_identity(&coordinator, &coordinator.admin_identity(), None);
    // How the refusal reaches the client varies from run to run (an alert,
    // a reset, a cancelled stream), so each is tried a few times.
    for _ in 0..5 {
        for dir in [&foreign, &expired] {
            check_cli_identity(
                &coordinator,
                dir,
                Some(&["refused the connection", "--identity"]),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_refused_from_its_next_call_without_a_restart() {
    let test_dir = TestDir::new("revoked_agent_is_refused");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    let coordinator_pid = coordinator.process().pid();
    let url = coordinator.url();
    let identity_dir = agent.dir().join("identity");
    let ca_pem = read(&identity_dir.join("ca.pem"));
    let identity = read_identity(&identity_dir);

    // Before the revocation the agent's certificate authenticates: the
    // coordinator reads its name out of it (and refuses the mismatched
    // register only after that). This connection stays open.
    let long_lived = channel(&url, &ca_pem, Some(&identity))
        .await
        .expect("connect with the agent's identity");
    let before = open_control(long_lived.clone(), "not-db1")
        .await
        .expect_err("a mismatched register is refused");
    assert!(
        before.code() == tonic::Code::PermissionDenied && authenticated_as(before.message(), "db1"),
        "the agent's certificate did not authenticate before the revocation: {}",
        describe(&before)
    );

    let agent_log_offset = file_len(agent.process().log_path());
    let coordinator_log_offset = file_len(coordinator.process().log_path());
    coordinator
        .cli(&["agents", "revoke", "db1"])
        .assert_success();

    // (a) Listed as revoked at once.
    assert_eq!(
        coordinator.agent_status("db1").as_deref(),
        Some("revoked"),
        "agents list right after the revocation"
    );

    // (c) The next call on the already-open connection is refused by the
    // per-call check, and a new connection is refused too.
    let on_open_connection = open_control(long_lived, "not-db1")
        .await
        .expect_err("a call on the open connection after revocation is refused");
    assert!(
        on_open_connection.code() == tonic::Code::Unauthenticated
            && on_open_connection.message().contains("revoked"),
        "the revoked certificate still authenticated on an open connection: {}",
        describe(&on_open_connection)
    );
    let on_new_connection = match channel(&url, &ca_pem, Some(&identity)).await {
        Err(error) => error,
        Ok(fresh) => describe(
            &open_control(fresh, "db1")
                .await
                .expect_err("a new connection with the revoked certificate is refused"),
        ),
    };
    assert!(
        !on_new_connection.contains("certificate is for"),
        "the revoked certificate authenticated on a new connection: {on_new_connection}"
    );

    // (b) The live agent process is cut off and its reconnections are
    // refused at the handshake; wait for a few of them, then check it never
    // got back in. (How the refusal reaches the agent varies: a TLS alert
    // naming the revocation, or a closed connection, so the agent's own log
    // is checked for failed sessions and the coordinator's for the reason.)
    let agent_log = agent.process().log_path().to_path_buf();
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the revoked agent logs three refused reconnections",
        || refused_reconnects(&log_since(&agent_log, agent_log_offset)) >= 3,
    );
    let agent_after = strip_ansi(&log_since(&agent_log, agent_log_offset));
    assert!(
        !agent_after.contains("registered with the coordinator"),
        "the revoked agent registered again:\n{agent_after}"
    );
    let coordinator_after = strip_ansi(&log_since(
        coordinator.process().log_path(),
        coordinator_log_offset,
    ));
    let refusal = format!("peer={}:", agent.source_address());
    assert!(
        coordinator_after
            .lines()
            .any(|line| line.contains("TLS handshake refused")
                && line.contains(&refusal)
                && line.contains("Revoked")),
        "the coordinator did not log refusing the agent's revoked certificate:\n{coordinator_after}"
    );
    assert!(agent.is_running(), "the agent keeps running and retrying");
    assert_eq!(coordinator.agent_status("db1").as_deref(), Some("revoked"));

    // (d) The audit log has the revocation and refusals, and no connection
    // of db1 after it.
    let events = audit_events(&coordinator);
    let revoke = last_event(&events, "agent.revoke", "db1").unwrap_or_else(|| {
        panic!("no agent.revoke event for db1: {events:#?}");
    });
    assert_eq!(revoke["outcome"], "success", "{revoke}");
    let revoke_id = revoke["id"].as_i64().expect("audit ids are integers");
    let refused_after: Vec<&Value> = events
        .iter()
        .filter(|e| e["id"].as_i64() > Some(revoke_id) && e["outcome"] == "refused")
        .collect();
    assert!(
        refused_after
            .iter()
            .any(|e| e["detail"].as_str().unwrap_or_default().contains("revoked")),
        "no refused event for the revoked certificate after the revocation: {events:#?}"
    );
    let reconnected: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["id"].as_i64() > Some(revoke_id)
                && e["action"] == "agent.connect"
                && e["outcome"] == "success"
        })
        .collect();
    assert!(
        reconnected.is_empty(),
        "db1 connected again after its revocation: {reconnected:#?}"
    );

    // All of that without restarting the coordinator.
    assert_eq!(coordinator.process().pid(), coordinator_pid);
    assert!(coordinator.process().is_running());
}

// ---------------------------------------------------------------------------
// 2. Agents cannot call Admin; roles limit operators
// ---------------------------------------------------------------------------

/// What a command run with an identity must do.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Allowed,
    /// Permission denied, with an error that says why.
    Denied(&'static str),
}

#[test]
fn agent_identities_and_operator_roles_are_limited_to_what_they_may_do() {
    let test_dir = TestDir::new("roles_limit_identities");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());

    let identities_dir = test_dir.subdir("identities");
    let identity = |name: &str| identities_dir.join(name).display().to_string();
    for (name, role) in [("vera", "viewer"), ("otto", "operator")] {
        let issued = coordinator.cli_json(&[
            "operators",
            "issue",
            "--name",
            name,
            "--role",
            role,
            "--out",
            &identity(name),
        ]);
        assert_eq!(issued["role"], role, "{issued}");
    }
    let agent_identity = agent.dir().join("identity").display().to_string();
    let viewer = identity("vera");
    let operator = identity("otto");
    let issued_by_viewer = identity("eve-by-viewer");
    let issued_by_operator = identity("eve-by-operator");

    let needs_admin = Expect::Denied("needs role admin");
    let needs_operator = Expect::Denied("needs role operator");
    let cases: &[(&str, &[&str], Expect)] = &[
        (
            &agent_identity,
            &["agents", "list"],
            Expect::Denied("agent identities cannot call the Admin API"),
        ),
        (&viewer, &["agents", "list"], Expect::Allowed),
        (&viewer, &["agents", "show", "db1"], Expect::Allowed),
        (&viewer, &["audit", "list"], Expect::Allowed),
        (&viewer, &["audit", "verify"], Expect::Allowed),
        (&viewer, &["token", "create", "--agent", "db2"], needs_admin),
        (&viewer, &["agents", "revoke", "db1"], needs_admin),
        (&viewer, &["probe", "db1"], needs_operator),
        (
            &viewer,
            &[
                "operators",
                "issue",
                "--name",
                "eve",
                "--role",
                "admin",
                "--out",
                &issued_by_viewer,
            ],
            needs_admin,
        ),
        (&operator, &["agents", "list"], Expect::Allowed),
        (&operator, &["probe", "db1"], Expect::Allowed),
        (
            &operator,
            &["token", "create", "--agent", "db2"],
            needs_admin,
        ),
        (&operator, &["agents", "revoke", "db1"], needs_admin),
        (
            &operator,
            &[
                "operators",
                "issue",
                "--name",
                "eve",
                "--role",
                "admin",
                "--out",
                &issued_by_operator,
            ],
            needs_admin,
        ),
    ];
    for (identity, args, expect) in cases {
        let mut full = args.to_vec();
        full.extend(["--identity", identity]);
        let output = coordinator.cli(&full);
        match expect {
            Expect::Allowed => {
                assert!(output.success(), "must succeed: {output}");
            }
            Expect::Denied(reason) => {
                assert!(!output.success(), "must be refused: {output}");
                let stderr = output.stderr.trim();
                assert_eq!(stderr.lines().count(), 1, "not a one-line error: {output}");
                assert!(
                    stderr.starts_with("error: permission denied") && stderr.contains(reason),
                    "the error does not say permission denied and {reason:?}: {output}"
                );
            }
        }
    }

    // The refused commands changed nothing.
    assert_eq!(coordinator.agent_status("db1").as_deref(), Some("online"));
    for dir in [&issued_by_viewer, &issued_by_operator] {
        assert!(
            !Path::new(dir).exists(),
            "a refused operators issue left {dir}"
        );
    }
    let events = audit_events(&coordinator);
    assert!(
        !events
            .iter()
            .any(|e| e["action"] == "token.create" && e["target"] == "db2"),
        "a token was created by a refused command: {events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "agent.revoke" && e["outcome"] == "refused"),
        "the refused revocations are not audited: {events:#?}"
    );
}

// ---------------------------------------------------------------------------
// 3. Enrollment tokens
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_are_single_use_expire_and_enroll_only_their_agent() {
    let test_dir = TestDir::new("enrollment_tokens");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);

    // Single use: the first enrollment works; a second use is refused while
    // the agent is enrolled (as a used token: the token is checked before
    // anything is said about the name), and still once it has been revoked.
    let token = coordinator.create_token("db1", "10m");
    let (first, first_dir) = enroll(&coordinator, &pg, &token, "db1", &[]);
    assert!(first.success(), "the first use of a token enrolls: {first}");
    assert!(first_dir.join("agent.toml").is_file());
    let (again, again_dir) = enroll(&coordinator, &pg, &token, "db1-again", &[]);
    check_enroll_refused(&coordinator, &again, &again_dir, "already used");
    coordinator
        .cli(&["agents", "revoke", "db1"])
        .assert_success();
    let (again, again_dir) = enroll(&coordinator, &pg, &token, "db1-again", &[]);
    check_enroll_refused(&coordinator, &again, &again_dir, "already used");

    // Expiry: the shortest TTL is a minute, so expire the token in the
    // catalog while the coordinator keeps running.
    let token = coordinator.create_token("db2", "1m");
    let token_id = token.split('.').nth(2).expect("a token has an id field");
    let catalog = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(coordinator.catalog_path())
                .busy_timeout(Duration::from_secs(10)),
        )
        .await
        .expect("open the catalog");
    let expired = sqlx::query("UPDATE enrollment_tokens SET expires_at = 0 WHERE id = ?")
        .bind(token_id)
        .execute(&catalog)
        .await
        .expect("expire the token in the catalog");
    assert_eq!(
        expired.rows_affected(),
        1,
        "the token {token_id} is in the catalog"
    );
    catalog.close().await;
    let (output, dir) = enroll(&coordinator, &pg, &token, "db2", &[]);
    check_enroll_refused(&coordinator, &output, &dir, "expired");

    // Name binding: a token for db3 does not enroll db4 (and is not spent
    // by trying), but does enroll db3.
    let token = coordinator.create_token("db3", "10m");
    let (output, dir) = enroll(&coordinator, &pg, &token, "db4", &["--name", "db4"]);
    check_enroll_refused(&coordinator, &output, &dir, "made for agent");
    let (output, _) = enroll(&coordinator, &pg, &token, "db3", &["--name", "db3"]);
    assert!(
        output.success(),
        "the token enrolls its own agent: {output}"
    );

    // Only db1 and db3 were enrolled.
    let mut names: Vec<String> = coordinator
        .agents()
        .iter()
        .map(|a| a["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["db1", "db3"]);
    assert!(coordinator.process().is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reenrolling_an_agent_needs_it_revoked_first() {
    let test_dir = TestDir::new("reenroll_needs_revoke");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let old_agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    let old_identity_dir = old_agent.dir().join("identity");
    let old_identity = read_identity(&old_identity_dir);
    let ca_pem = read(&old_identity_dir.join("ca.pem"));
    let url = coordinator.url();

    let refused = coordinator.cli(&["token", "create", "--agent", "db1"]);
    assert!(
        !refused.success(),
        "a token for an enrolled agent: {refused}"
    );
    assert!(
        refused.stderr.contains("revoke it first"),
        "the error does not say to revoke first: {refused}"
    );

    let old_log = old_agent.process().log_path().to_path_buf();
    let old_log_offset = file_len(&old_log);
    coordinator
        .cli(&["agents", "revoke", "db1"])
        .assert_success();
    let token = coordinator.create_token("db1", "10m");
    let (output, new_dir) = enroll(&coordinator, &pg, &token, "db1-again", &[]);
    assert!(output.success(), "re-enrollment after revocation: {output}");
    let new_agent = run_agent(&test_dir, "agent-db1-again", &new_dir, &[]);
    wait_online(&coordinator, "db1", &new_agent);

    // The catalog holds the new certificate, not the old one.
    let new_serial = certificate_serial(
        &tls::parse_certificates(&read(&new_dir.join("identity/cert.pem")), "new certificate")
            .expect("parse the new certificate")[0],
    )
    .expect("read the new serial");
    let old_serial = certificate_serial(
        &tls::parse_certificates(&old_identity.cert, "old certificate")
            .expect("parse the old certificate")[0],
    )
    .expect("read the old serial");
    assert_ne!(new_serial, old_serial);
    assert_eq!(
        agent_view(&coordinator, "db1")["certificate_serial"],
        new_serial.as_str()
    );

    // The old identity stays refused, the new one is accepted.
    let new_identity = read_identity(&new_dir.join("identity"));
    for (which, identity, accepted) in [("old", &old_identity, false), ("new", &new_identity, true)]
    {
        let result: Result<(), String> = match channel(&url, &ca_pem, Some(identity)).await {
            Err(error) => Err(error),
            // A mismatched register is refused only after authentication,
            // so it tells an accepted certificate from a refused one
            // without disturbing the running agent's session.
            Ok(channel) => match open_control(channel, "not-db1").await {
                Ok(()) => panic!("a mismatched register was accepted"),
                Err(status) => Err(describe(&status)),
            },
        };
        let error = result.expect_err("both calls fail one way or the other");
        let authenticated = authenticated_as(&error, "db1");
        assert_eq!(
            authenticated, accepted,
            "the {which} identity: accepted must be {accepted}: {error}"
        );
    }

    // The old process, still running, never gets back in: it does not
    // register again, and db1's session stays the new agent's.
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the old agent logs two refused reconnections",
        || refused_reconnects(&log_since(&old_log, old_log_offset)) >= 2,
    );
    let old_after = strip_ansi(&log_since(&old_log, old_log_offset));
    assert!(
        !old_after.contains("registered with the coordinator"),
        "the old agent registered again:\n{old_after}"
    );
    assert!(old_agent.is_running());
    let view = agent_view(&coordinator, "db1");
    assert_eq!(view["status"], "online", "{view}");
    assert_eq!(view["certificate_serial"], new_serial.as_str(), "{view}");
    let old_address = format!("{}:", old_agent.source_address());
    assert!(
        !view["peer_address"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&old_address),
        "db1's session comes from the old agent's address: {view}"
    );
}

// ---------------------------------------------------------------------------
// 4. Permitted operations
// ---------------------------------------------------------------------------

#[test]
fn registration_reports_exactly_the_operations_the_agent_config_permits() {
    let test_dir = TestDir::new("permitted_operations");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);

    let cases: [(&str, &[&str]); 3] = [
        ("db1", &["backup"]),
        ("db2", &["backup", "restore", "promote"]),
        // No --allow: enrollment permits only backup.
        ("db3", &[]),
    ];
    let mut agents = Vec::new();
    for (name, allow) in cases {
        let options = allow
            .iter()
            .fold(AgentOptions::default(), |options, kind| options.allow(kind));
        agents.push(coordinator.enroll_agent(name, &pg, options));
    }
    for (name, allow) in cases {
        let expected: Vec<&str> = if allow.is_empty() {
            vec!["backup"]
        } else {
            allow.to_vec()
        };
        let agent = agent_view(&coordinator, name);
        assert_eq!(
            agent["permitted_operations"],
            serde_json::json!(expected),
            "agent {name}: {agent}"
        );
    }

    // An operation the agent does not know is refused at enrollment, with
    // the allowed values named, and nothing is written.
    let token = coordinator.create_token("db4", "10m");
    let (output, dir) = enroll(&coordinator, &pg, &token, "db4", &["--allow", "drop"]);
    assert!(!output.success(), "--allow drop must fail: {output}");
    for needle in ["drop", "backup", "restore", "replica", "promote"] {
        assert!(
            output.stderr.contains(needle),
            "the error does not name {needle:?}: {output}"
        );
    }
    assert!(!dir.exists(), "a refused enrollment left {}", dir.display());
}

// ---------------------------------------------------------------------------
// 5. No secret leaks
// ---------------------------------------------------------------------------

/// Runs `cairn ARGS` as admin at debug level and appends the call to
/// `logs/cli-debug.log` (stdout too, unless it is `token create`'s answer,
/// which exists to show the token).
fn debug_cli(coordinator: &Coordinator, log: &Path, args: &[&str], log_stdout: bool) -> Output {
    let mut command = coordinator.cli_command(args);
    command.env("CAIRN_LOG", "debug");
    let output = run(&mut command);
    let stdout = if log_stdout {
        output.stdout.as_str()
    } else {
        "<not logged: the token itself>"
    };
    append(
        log,
        &format!(
            "$ cairn {}\nexit {:?}\nstdout:\n{stdout}\nstderr:\n{}\n",
            args.join(" "),
            output.status_code,
            output.stderr
        ),
    );
    output
}

fn append(path: &Path, text: &str) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A middle line of a PEM body: secret material, unlike the fixed header.
fn pem_middle_line(path: &Path) -> String {
    let pem = read_text(path);
    let body: Vec<&str> = pem
        .lines()
        .filter(|line| !line.starts_with("-----") && !line.trim().is_empty())
        .collect();
    assert!(body.len() >= 3, "{} is too short a PEM", path.display());
    body[body.len() / 2].to_string()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn no_secret_appears_in_logs_json_output_or_the_catalog() {
    const PASSWORD: &str = "NotInLogs-123";
    let test_dir = TestDir::new("no_secret_leaks");
    let pg = PgCluster::start_in(&test_dir, "main");
    let mut coordinator = Coordinator::start_with(
        &test_dir,
        CoordinatorOptions {
            env: vec![("CAIRN_LOG".into(), "debug".into())],
            ..CoordinatorOptions::default()
        },
    );
    let cli_log = test_dir.log_path("cli-debug");
    let mut json_outputs: Vec<(String, String)> = Vec::new();
    let mut json = |args: &[&str]| -> Value {
        let mut full = args.to_vec();
        full.extend(["--output", "json"]);
        let output = debug_cli(&coordinator, &cli_log, &full, true);
        assert!(output.success(), "{output}");
        json_outputs.push((full.join(" "), output.stdout.clone()));
        output.json()
    };

    // The token, made without recording it anywhere under logs/.
    let created = debug_cli(
        &coordinator,
        &cli_log,
        &[
            "token", "create", "--agent", "db1", "--ttl", "10m", "--output", "json",
        ],
        false,
    );
    assert!(created.success(), "token create: {created}");
    let token = created.json()["token"]
        .as_str()
        .expect("token create prints the token")
        .to_string();
    let token_secret = token.split('.').nth(3).expect("a token has a secret field");
    let secret_sha256 = EnrollmentToken::parse(&token)
        .expect("parse the token")
        .secret_sha256();

    // Enroll with a password in the connection string (PgCluster trusts
    // local connections, so the server ignores it), at debug level, logging
    // the output but not the command line, which holds the token.
    let agent_dir = coordinator.agents_dir().join("db1");
    let connstring = format!("{} password={PASSWORD}", pg.connstring());
    let source = coordinator.next_source_address().to_string();
    let enroll_log = test_dir.log_path("agent-enroll");
    let mut command = ProcessBuilder::new(
        "agent-enroll",
        &binaries().cairn_agent,
        &enroll_log,
        test_dir.path(),
    )
    .as_postgres(true)
    .env("CAIRN_LOG", "debug")
    .args([
        "enroll",
        "--coordinator",
        &coordinator.url(),
        "--token",
        &token,
        "--dir",
        &agent_dir.display().to_string(),
        "--postgres",
        &connstring,
        "--source-address",
        &source,
        "--probe-interval",
        "1s",
    ])
    .command();
    let enrolled = run(&mut command);
    append(
        &enroll_log,
        &format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}\n",
            enrolled.status_code, enrolled.stdout, enrolled.stderr
        ),
    );
    assert!(enrolled.success(), "enroll: {enrolled}");

    let agent = run_agent(
        &test_dir,
        "agent-db1",
        &agent_dir,
        &[("CAIRN_LOG", "debug")],
    );
    wait_online(&coordinator, "db1", &agent);

    let probe = json(&["probe", "db1"]);
    assert_eq!(probe[0]["reachable"], true, "{probe}");
    json(&["agents", "show", "db1"]);
    json(&["agents", "list"]);
    let ops_dir = test_dir.path().join("ops-identity");
    json(&[
        "operators",
        "issue",
        "--name",
        "ops",
        "--role",
        "operator",
        "--out",
        &ops_dir.display().to_string(),
    ]);
    json(&["audit", "list", "--limit", "10000"]);
    json(&["audit", "verify"]);
    let agent_log_offset = file_len(agent.log_path());
    json(&["agents", "revoke", "db1"]);
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the revoked agent logs a refused reconnection",
        || refused_reconnects(&log_since(agent.log_path(), agent_log_offset)) >= 1,
    );
    json(&["audit", "list", "--limit", "10000"]);
    agent.terminate();
    coordinator.stop();

    // The scenario really logged at debug level.
    for log in ["coordinator", "agent-db1", "agent-enroll", "cli-debug"] {
        let text = read_text(&test_dir.log_path(log));
        assert!(
            text.contains("DEBUG"),
            "logs/{log}.log has no debug lines, so it proves little"
        );
    }

    let home = coordinator.home();
    let secrets: Vec<(&str, String)> = vec![
        ("the enrollment token", token.clone()),
        ("the token's secret", token_secret.to_string()),
        ("the PostgreSQL password", PASSWORD.to_string()),
        (
            "the agent's private key",
            pem_middle_line(&agent_dir.join("identity/key.pem")),
        ),
        (
            "the admin's private key",
            pem_middle_line(&home.join("admin/key.pem")),
        ),
        (
            "the new operator's private key",
            pem_middle_line(&ops_dir.join("key.pem")),
        ),
        ("the CA key", pem_middle_line(&home.join("ca/ca.key"))),
        (
            "the server's TLS key",
            pem_middle_line(&home.join("tls/server.key")),
        ),
        (
            "the master key",
            read_text(&home.join("master.key")).trim().to_string(),
        ),
    ];
    let mut places: Vec<(String, String)> = files_under(&test_dir.logs_dir())
        .into_iter()
        .map(|path| {
            (
                path.display().to_string(),
                String::from_utf8_lossy(&read(&path)).into_owned(),
            )
        })
        .collect();
    places.extend(
        json_outputs
            .iter()
            .map(|(command, stdout)| (format!("the output of `cairn {command}`"), stdout.clone())),
    );
    let mut catalog_bytes = String::new();
    for suffix in ["", "-wal"] {
        let path = PathBuf::from(format!("{}{suffix}", coordinator.catalog_path().display()));
        if path.exists() {
            let text = String::from_utf8_lossy(&read(&path)).into_owned();
            catalog_bytes.push_str(&text);
            places.push((path.display().to_string(), text));
        }
    }
    // The catalog bytes read are the ones that hold the token: its hash.
    assert!(
        catalog_bytes.contains(&secret_sha256),
        "the catalog files read do not hold the token's hash; the check would prove nothing"
    );

    let mut leaks = Vec::new();
    for (place, contents) in &places {
        for (what, secret) in &secrets {
            assert!(secret.len() >= 12, "{what} is too short to search for");
            if contents.contains(secret.as_str()) {
                leaks.push(format!("{what} appears in {place}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

#[test]
fn a_revoked_operator_is_refused_from_its_next_call() {
    let test_dir = TestDir::new("operator_revoke");
    let coordinator = Coordinator::start(&test_dir);
    let viewer_dir = test_dir.path().join("viewer");
    coordinator.issue_operator("carol", "viewer", &viewer_dir);
    let as_viewer = |args: &[&str]| coordinator.cli_as(&viewer_dir, args);
    as_viewer(&["agents", "list"]).assert_success();

    // A viewer cannot revoke anyone; an admin can, without a restart.
    as_viewer(&["operators", "revoke", "carol"]).assert_failure();
    let revoked = coordinator.cli_json(&["operators", "revoke", "carol"]);
    assert_eq!(
        revoked["revoked_serials"].as_array().map(Vec::len),
        Some(1),
        "{revoked}"
    );
    let refused = as_viewer(&["agents", "list"]).assert_failure();
    assert!(refused.stderr.contains("refused"), "{refused}");
    coordinator.cli(&["agents", "list"]).assert_success();

    let again = coordinator
        .cli(&["operators", "revoke", "carol"])
        .assert_failure();
    assert!(again.stderr.contains("no unrevoked certificate"), "{again}");
    let events = audit_events(&coordinator);
    assert!(
        last_event(&events, "operator.revoke", "operator:carol").is_some(),
        "{events:#?}"
    );
}

/// `DownloadBackup` on a fresh connection as `identity`: whether the
/// coordinator started streaming the job's chunks, or why not.
async fn download_as(
    url: &str,
    ca_pem: &[u8],
    identity: &ClientIdentity,
    job_id: &str,
) -> Result<(), tonic::Status> {
    let channel = channel(url, ca_pem, Some(identity))
        .await
        .expect("connect for DownloadBackup");
    let mut client = AgentGatewayClient::new(channel);
    let call = client.download_backup(proto::DownloadRequest {
        job_id: job_id.to_string(),
        ..proto::DownloadRequest::default()
    });
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => panic!("DownloadBackup hung for {CALL_TIMEOUT:?}"),
    }
}

/// A backup's chunks go only to the agent a running restore job of it was
/// sent to: not to another agent, not for a backup job, not once the job
/// ended, and never to an operator; and a restore job cannot be used to
/// upload (and so overwrite) the backup it restores.
#[tokio::test]
async fn only_a_running_restore_jobs_own_agent_may_download_and_no_restore_may_upload() {
    let test_dir = TestDir::new("download_authorisation");
    let pg = PgCluster::start_in(&test_dir, "main");
    pg.create_sample_database("shop", 1);
    let coordinator = Coordinator::start(&test_dir);
    let db1 = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let db2 = coordinator.enroll_agent("db2", &pg, AgentOptions::default().allow("restore"));
    let backup_id = coordinator.backup("db1", "shop");
    let backup_job = coordinator.cli_json(&["backups", "show", &backup_id]);
    let restore_job = coordinator
        .cli(&[
            "restore",
            &backup_id,
            "--agent",
            "db2",
            "--database",
            "copy",
            "--wait",
            "--output",
            "json",
        ])
        .assert_success()
        .json();
    assert_eq!(restore_job["status"], "succeeded", "{restore_job}");
    let restore_job_id = restore_job["id"].as_str().unwrap();
    let url = coordinator.url();
    let ca_pem = read(&db1.dir().join("identity/ca.pem"));
    let db1_identity = read_identity(&db1.dir().join("identity"));
    let db2_identity = read_identity(&db2.dir().join("identity"));

    for (who, identity, job_id) in [
        (
            "db1, for its own backup job",
            &db1_identity,
            backup_job["job_id"].as_str().unwrap(),
        ),
        ("db1, for db2's restore job", &db1_identity, restore_job_id),
        (
            "db2, for its finished restore job",
            &db2_identity,
            restore_job_id,
        ),
    ] {
        let refused = download_as(&url, &ca_pem, identity, job_id)
            .await
            .expect_err(who);
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{who}: {}",
            describe(&refused)
        );
    }
    let admin = read_identity(&coordinator.admin_identity());
    let refused = download_as(&url, &ca_pem, &admin, restore_job_id)
        .await
        .expect_err("an operator downloading");
    assert!(
        matches!(
            refused.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "{}",
        describe(&refused)
    );

    // The restore job's agent cannot upload under it: the coordinator
    // refuses the start, so the backup's manifest cannot be replaced.
    let channel = channel(&url, &ca_pem, Some(&db2_identity)).await.unwrap();
    let start = proto::BackupUpload {
        body: Some(proto::backup_upload::Body::Start(proto::UploadStart {
            job_id: restore_job_id.to_string(),
            backup_id: backup_id.clone(),
            ..Default::default()
        })),
    };
    let mut client = AgentGatewayClient::new(channel);
    let call = client.upload_backup(tonic::codegen::tokio_stream::iter(vec![start]));
    let refused = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .expect("UploadBackup answers")
        .expect_err("an upload under a restore job");
    assert_eq!(
        refused.code(),
        tonic::Code::PermissionDenied,
        "{}",
        describe(&refused)
    );
    // The backup is still there, whole.
    coordinator
        .cli(&["backup", "verify", &backup_id])
        .assert_success();
}

/// One upload stream per backup job: while the agent's own upload of a
/// running job is open, a second `UploadBackup` for that job (the same
/// agent's certificate, the right job and backup ids) is refused, and the
/// first one still completes the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upload_stream_for_one_job_is_refused() {
    let test_dir = TestDir::new("second_upload_refused");
    let pg = PgCluster::start_in(&test_dir, "main");
    pg.create_sample_database("shop", 24);
    let coordinator = Coordinator::start(&test_dir);
    let db1 = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let jobs = coordinator.cli_json(&["backup", "run", "--agent", "db1", "--database", "shop"]);
    let job_id = jobs[0]["id"].as_str().unwrap().to_string();
    let backup_id = jobs[0]["backup_id"].as_str().unwrap().to_string();
    // The agent's upload is open once the job has read from pg_dump; from
    // there the agent is held still, so the job cannot end under the test.
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        &format!("job {job_id} has started uploading"),
        || {
            let job = coordinator.cli_json(&["jobs", "show", &job_id]);
            assert!(job_is_active(&job), "the job ended too soon: {job}");
            job["bytes_read"].as_u64().unwrap_or(0) > 0
        },
    );
    db1.process().pause();
    let job = coordinator.cli_json(&["jobs", "show", &job_id]);
    assert_eq!(
        job["status"], "running",
        "the job ended before its agent was paused; make the database bigger: {job}"
    );

    let url = coordinator.url();
    let ca_pem = read(&db1.dir().join("identity/ca.pem"));
    let identity = read_identity(&db1.dir().join("identity"));
    let channel = channel(&url, &ca_pem, Some(&identity)).await.unwrap();
    let start = proto::BackupUpload {
        body: Some(proto::backup_upload::Body::Start(proto::UploadStart {
            job_id: job_id.clone(),
            backup_id: backup_id.clone(),
            ..Default::default()
        })),
    };
    let mut client = AgentGatewayClient::new(channel);
    let call = client.upload_backup(tonic::codegen::tokio_stream::iter(vec![start]));
    let second = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .expect("UploadBackup answers");
    db1.process().resume();
    let refused = second.expect_err("a second upload stream for a running job");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        describe(&refused)
    );
    assert!(
        refused
            .message()
            .contains("already has an upload in progress"),
        "{}",
        describe(&refused)
    );

    // The first upload was not disturbed.
    let job = wait_for(
        Duration::from_secs(120),
        Duration::from_millis(200),
        &format!("job {job_id} ends"),
        || {
            let job = coordinator.cli_json(&["jobs", "show", &job_id]);
            (!job_is_active(&job)).then_some(job)
        },
    );
    assert_eq!(job["status"], "succeeded", "{job}");
    coordinator
        .cli(&["backup", "verify", &backup_id])
        .assert_success();
}

/// A control stream's probe reports speak only for the instances the agent
/// registered on it: a report naming another instance is refused whole
/// (nothing of it stored) and audited, while a report on a registered
/// instance is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_naming_unregistered_instances_are_refused_and_audited() {
    let test_dir = TestDir::new("probe_report_unregistered");
    let pg = PgCluster::start_in(&test_dir, "main");
    let coordinator = Coordinator::start(&test_dir);
    let mut db1 = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    db1.stop();
    let url = coordinator.url();
    let ca_pem = read(&db1.dir().join("identity/ca.pem"));
    let identity = read_identity(&db1.dir().join("identity"));
    let channel = channel(&url, &ca_pem, Some(&identity)).await.unwrap();

    let (outbound, outbound_receiver) = tokio::sync::mpsc::channel(4);
    let send = |body| {
        let outbound = outbound.clone();
        async move {
            outbound
                .send(proto::AgentMessage { body: Some(body) })
                .await
                .expect("the control stream is open");
        }
    };
    send(proto::agent_message::Body::Register(proto::Register {
        agent_name: "db1".into(),
        version: cairn_common::VERSION.into(),
        instances: vec!["main".into()],
        ..Default::default()
    }))
    .await;
    let mut client = AgentGatewayClient::new(channel);
    let call = client.control(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
        outbound_receiver,
    ));
    let mut inbound = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .expect("Control answers")
        .expect("the control stream is accepted")
        .into_inner();
    let registered = tokio::time::timeout(CALL_TIMEOUT, inbound.message())
        .await
        .expect("the coordinator answers the register")
        .expect("a message");
    assert!(
        matches!(
            registered.and_then(|m| m.body),
            Some(proto::coordinator_message::Body::Registered(_))
        ),
        "the first answer is `registered`"
    );

    let probe = |instance: &str, version: &str| proto::InstanceProbe {
        instance: instance.into(),
        probed_at_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
        reachable: true,
        server_version: version.into(),
        ..Default::default()
    };
    // One report naming an instance db1 never registered (beside one it
    // did), then one naming only its own.
    send(proto::agent_message::Body::ProbeReport(
        proto::ProbeResult {
            instances: vec![probe("main", "forged 1"), probe("ghost", "forged 2")],
        },
    ))
    .await;
    send(proto::agent_message::Body::ProbeReport(
        proto::ProbeResult {
            instances: vec![probe("main", "honest 3")],
        },
    ))
    .await;

    let probes = |coordinator: &Coordinator| -> Vec<(String, String)> {
        coordinator.cli_json(&["agents", "show", "db1"])["probes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["instance"].as_str().unwrap_or_default().to_string(),
                    p["server_version"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the registered instance's probe is stored",
        || {
            probes(&coordinator)
                .iter()
                .any(|(_, version)| version == "honest 3")
        },
    );
    let stored = probes(&coordinator);
    assert!(
        !stored
            .iter()
            .any(|(instance, version)| instance == "ghost" || version.starts_with("forged")),
        "nothing of the refused report is stored: {stored:?}"
    );
    let events = audit_events(&coordinator);
    let refusal = last_event(&events, "agent.probe-report", "db1")
        .unwrap_or_else(|| panic!("the refusal is audited: {events:#?}"));
    assert_eq!(refusal["outcome"], "refused", "{refusal}");
    assert!(
        refusal["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("ghost"),
        "{refusal}"
    );
    drop(outbound);
}
