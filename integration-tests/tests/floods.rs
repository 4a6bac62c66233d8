//! What anyone who can reach the gRPC port can make the coordinator do:
//! floods of anonymous calls and made-up enrollments are counted into a few
//! audit rows (exactly: the first of each window plus the counts of its
//! summary add up to every refusal), operators keep getting answers during
//! the flood, connections without a certificate and their messages are
//! bounded, and enrollment says nothing about agent names to a caller
//! without a valid token.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cairn_common::names::AgentName;
use cairn_common::pki::{ca_fingerprint, generate_key_and_csr};
use cairn_common::proto::{
    self, admin_client::AdminClient, agent_gateway_client::AgentGatewayClient,
};
use cairn_common::tls::{self, CoordinatorUrl};
use cairn_common::token::EnrollmentToken;
use cairn_integration_tests::{Coordinator, TestDir, wait_for};
use serde_json::Value;
use tonic::transport::Channel;

const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The refusal window the flood test configures, so that summary rows
/// appear within the test.
const WINDOW: &str = "3s";

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A channel to the coordinator, presenting `identity` (certificate and
/// key PEM) or no certificate.
async fn channel(coordinator: &Coordinator, identity: Option<(&[u8], &[u8])>) -> Channel {
    channel_from(coordinator, identity, None).await
}

/// [`channel`] from the loopback address `source`.
async fn channel_from(
    coordinator: &Coordinator,
    identity: Option<(&[u8], &[u8])>,
    source: Option<IpAddr>,
) -> Channel {
    let ca_pem = read(&coordinator.ca_cert());
    let config = tls::client_config(&ca_pem, identity).expect("build a client TLS config");
    let url = CoordinatorUrl::parse(&coordinator.url()).expect("parse the coordinator URL");
    tokio::time::timeout(CALL_TIMEOUT, tls::connect(&url, config, source))
        .await
        .expect("connecting hung")
        .expect("connect to the coordinator")
}

/// Like `channel_from`, but a connection the coordinator closes right
/// after the handshake (a limit) is an error naming the refusal.
async fn try_channel_from(
    coordinator: &Coordinator,
    identity: Option<(&[u8], &[u8])>,
    source: Option<IpAddr>,
) -> Result<Channel, String> {
    let ca_pem = read(&coordinator.ca_cert());
    let config = tls::client_config(&ca_pem, identity).expect("build a client TLS config");
    let url = CoordinatorUrl::parse(&coordinator.url()).expect("parse the coordinator URL");
    match tokio::time::timeout(CALL_TIMEOUT, tls::connect(&url, config, source))
        .await
        .expect("connecting hung")
    {
        Ok(channel) => Ok(channel),
        Err(error @ cairn_common::Error::Refused { .. }) => Err(error.to_string()),
        Err(other) => panic!("connect failed for another reason than a refusal: {other}"),
    }
}

/// `list_agents` on a connection that may have been refused: the count, or
/// the refusal (the call's code, or the failed connect).
async fn list_agents_on(channel: &Result<Channel, String>) -> Result<usize, String> {
    match channel {
        Ok(channel) => list_agents(channel.clone())
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message())),
        Err(refused) => Err(refused.clone()),
    }
}

/// The admin identity `cairn init` wrote: (certificate, key).
fn admin_identity(coordinator: &Coordinator) -> (Vec<u8>, Vec<u8>) {
    let dir = coordinator.admin_identity();
    (read(&dir.join("cert.pem")), read(&dir.join("key.pem")))
}

/// Every audit event, oldest first.
fn audit_events(coordinator: &Coordinator) -> Vec<Value> {
    match coordinator.cli_json(&["audit", "list", "--limit", "100000"]) {
        Value::Array(mut events) => {
            events.sort_by_key(|e| e["id"].as_i64().unwrap_or_default());
            events
        }
        other => panic!("`cairn audit list --output json` did not print an array: {other}"),
    }
}

/// The count a summary row's detail carries (`refused 2,311 more times in
/// 3 s: ...`), or `None` for a row recorded as it happened.
fn summary_count(detail: &str) -> Option<u64> {
    let rest = detail.strip_prefix("refused ")?;
    let (count, rest) = rest.split_once(' ')?;
    rest.starts_with("more times in ")
        .then(|| count.replace(',', "").parse().expect("a summary count"))
}

/// Refusals of `action` among `events`: (rows, refusals they account for).
fn accounted(events: &[Value], action: &str) -> (usize, u64) {
    let rows: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == action && e["outcome"] == "refused")
        .collect();
    let refusals = rows
        .iter()
        .map(|e| summary_count(e["detail"].as_str().unwrap_or_default()).unwrap_or(1))
        .sum();
    (rows.len(), refusals)
}

/// A well-formed enrollment token the coordinator never made.
fn made_up_token(coordinator: &Coordinator, agent: &str) -> String {
    let ca = read(&coordinator.ca_cert());
    let ca_der = tls::parse_certificates(&ca, "the CA")
        .expect("parse the CA")
        .remove(0);
    EnrollmentToken::generate(
        AgentName::new(agent).expect("a valid name"),
        ca_fingerprint(&ca_der),
    )
    .expect("generate a token")
    .expose()
}

async fn enroll(
    channel: Channel,
    token: &str,
    csr_pem: &str,
) -> Result<proto::EnrollResponse, tonic::Status> {
    let mut client = AgentGatewayClient::new(channel);
    let call = client.enroll(proto::EnrollRequest {
        token: token.to_string(),
        agent_name: String::new(),
        csr_pem: csr_pem.to_string(),
    });
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .expect("Enroll hung")
        .map(|r| r.into_inner())
}

async fn list_agents(channel: Channel) -> Result<usize, tonic::Status> {
    let mut client = AdminClient::new(channel);
    let call = client.list_agents(proto::ListAgentsRequest {});
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .expect("ListAgents hung")
        .map(|r| r.into_inner().agents.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_floods_add_a_few_audit_rows_and_operators_still_get_answers() {
    let test_dir = TestDir::new("anonymous_floods");
    let mut coordinator = Coordinator::start(&test_dir);
    let config = std::fs::read_to_string(coordinator.config_path()).expect("read the config");
    assert!(
        config.contains("refusal_audit_window = \"60s\""),
        "{config}"
    );
    std::fs::write(
        coordinator.config_path(),
        config.replace(
            "refusal_audit_window = \"60s\"",
            &format!("refusal_audit_window = \"{WINDOW}\""),
        ),
    )
    .expect("write the config");
    coordinator.restart();
    let rows_before = audit_events(&coordinator).len();

    // The flood, from one address and as many connections without a
    // certificate as it may hold (4): 400 anonymous Admin calls on two and
    // 100 enrollments with made-up tokens on the other two, all at once.
    let csr = generate_key_and_csr("flood").expect("a CSR").csr_pem;
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let channel = channel(&coordinator, None).await;
        flood.spawn(async move {
            for _ in 0..200 {
                let status = list_agents(channel.clone())
                    .await
                    .expect_err("an anonymous ListAgents is refused");
                assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            }
        });
    }
    for _ in 0..2 {
        let channel = channel(&coordinator, None).await;
        let tokens: Vec<String> = (0..50)
            .map(|i| made_up_token(&coordinator, &format!("flood-{i}")))
            .collect();
        let csr = csr.clone();
        flood.spawn(async move {
            for token in tokens {
                let status = enroll(channel.clone(), &token, &csr)
                    .await
                    .expect_err("a made-up token is refused");
                assert!(
                    status.message().contains("token is not valid"),
                    "{status:?}"
                );
            }
        });
    }

    // An operator during the flood: every call answers, and promptly (the
    // median of its calls under a second: one slow call on a loaded
    // 2-core CI machine says nothing about the flood).
    let (cert, key) = admin_identity(&coordinator);
    let mut latencies = Vec::new();
    while latencies.len() < 5 || !flood.is_empty() && latencies.len() < 50 {
        let started = Instant::now();
        let admin = channel(&coordinator, Some((&cert, &key))).await;
        list_agents(admin).await.expect("the operator's ListAgents");
        latencies.push(started.elapsed());
        if let Some(joined) = flood.try_join_next() {
            joined.expect("a flood task");
        }
    }
    while let Some(joined) = flood.join_next().await {
        joined.expect("a flood task");
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(
        median < Duration::from_secs(1),
        "an operator's agents list took {median:?} (median) during the flood: {latencies:?}"
    );

    // Every refusal is accounted for, in a few dozen rows: the windows'
    // summaries are written as they close.
    let (events, admin_rows, enroll_rows) = tokio::task::spawn_blocking(move || {
        let found = wait_for(
            Duration::from_secs(30),
            Duration::from_millis(250),
            "every refusal counted in the audit log",
            || {
                let events = audit_events(&coordinator);
                let (admin_rows, admin_refusals) = accounted(&events, "admin.call");
                let (enroll_rows, enroll_refusals) = accounted(&events, "agent.enroll");
                (admin_refusals >= 400 && enroll_refusals >= 100).then(|| {
                    assert_eq!(admin_refusals, 400, "{events:#?}");
                    assert_eq!(enroll_refusals, 100, "{events:#?}");
                    (events, admin_rows, enroll_rows)
                })
            },
        );
        drop(coordinator);
        found
    })
    .await
    .expect("the audit check");
    let new_rows = events.len() - rows_before;
    assert!(
        new_rows <= 40,
        "the flood added {new_rows} audit rows ({admin_rows} for calls, {enroll_rows} for enrollments): {:#?}",
        &events[rows_before..]
    );
    assert!(
        events
            .iter()
            .any(|e| summary_count(e["detail"].as_str().unwrap_or_default()).is_some()),
        "no summary row: {events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_messages_without_a_certificate_are_bounded() {
    let test_dir = TestDir::new("anonymous_bounds");
    let coordinator = Coordinator::start(&test_dir);

    // An enrollment far larger than any real one never reaches the handler
    // (which would have answered that the token is not valid).
    let huge_csr = "A".repeat(1024 * 1024);
    let token = made_up_token(&coordinator, "big");
    let status = enroll(channel(&coordinator, None).await, &token, &huge_csr)
        .await
        .expect_err("a 1 MiB enrollment is refused");
    assert!(
        !status.message().contains("token"),
        "a 1 MiB enrollment reached the token check: {status:?}"
    );
    let small = enroll(
        channel(&coordinator, None).await,
        &token,
        &generate_key_and_csr("small").expect("a CSR").csr_pem,
    )
    .await
    .expect_err("a made-up token is refused");
    assert!(small.message().contains("token is not valid"), "{small:?}");

    // At most 4 connections without a certificate from one address, and
    // 32 in all (the defaults): the ones beyond are closed after their
    // handshake, while an operator still gets in.
    // The ones closed by a limit now fail to connect (the client waits for
    // the coordinator's first bytes), so each connection is counted as
    // reaching the service only if its connect and its call both got there.
    let reached = |results: Vec<Result<usize, String>>| {
        results
            .into_iter()
            .filter(|result| match result {
                Err(reason) => reason.contains("Unauthenticated"),
                Ok(count) => panic!("an anonymous ListAgents answered {count}"),
            })
            .count()
    };
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(try_channel_from(&coordinator, None, None).await);
    }
    let mut results = Vec::new();
    for channel in &held {
        results.push(list_agents_on(channel).await);
    }
    assert_eq!(reached(results), 4, "one address holds at most 4");
    for address in 1..=10u8 {
        let source = IpAddr::from([127, 0, 1, address]);
        for _ in 0..4 {
            held.push(try_channel_from(&coordinator, None, Some(source)).await);
        }
    }
    let mut results = Vec::new();
    for channel in &held {
        results.push(list_agents_on(channel).await);
    }
    assert_eq!(reached(results), 32, "at most 32 in all");
    let (cert, key) = admin_identity(&coordinator);
    list_agents(channel(&coordinator, Some((&cert, &key))).await)
        .await
        .expect("an operator is served while anonymous connections are at their limit");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_checks_the_token_before_saying_anything_about_the_name() {
    let test_dir = TestDir::new("enrollment_enumeration");
    let coordinator = Coordinator::start(&test_dir);
    let token = coordinator.create_token("db9", "1h");
    let csr = generate_key_and_csr("db9").expect("a CSR").csr_pem;
    enroll(channel(&coordinator, None).await, &token, &csr)
        .await
        .expect("a real token enrolls db9");

    // db9 is enrolled; a caller without a valid token must not learn it.
    let made_up = made_up_token(&coordinator, "db9");
    let status = enroll(channel(&coordinator, None).await, &made_up, &csr)
        .await
        .expect_err("a made-up token is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("token is not valid") && !status.message().contains("enrolled"),
        "{status:?}"
    );
    // A caller holding a valid token (here db8's) is told what is wrong
    // with it: the token itself is the secret that earns an explanation.
    let second = coordinator.create_token("db8", "1h");
    let status = enroll(
        channel(&coordinator, None).await,
        &second.replace("cairn1.db8.", "cairn1.db9."),
        &csr,
    )
    .await
    .expect_err("a token of db8 cannot enroll db9");
    assert!(status.message().contains("made for agent"), "{status:?}");
}
