//! Connecting the operator CLI to the coordinator with an operator identity
//! (`DIR/ca.pem`, `DIR/cert.pem`, `DIR/key.pem`), and turning gRPC failures
//! into one-line errors that say what to fix.

use std::path::Path;

use anyhow::{Context, anyhow};
use cairn_common::proto::admin_client::AdminClient;
use cairn_common::tls::{self, CoordinatorUrl};
use tonic::transport::Channel;

pub async fn connect(
    coordinator: &str,
    identity_dir: &Path,
) -> anyhow::Result<AdminClient<Channel>> {
    let url = CoordinatorUrl::parse(coordinator)?;
    let config = tls::IdentityPaths::in_dir(identity_dir)
        .client_config()
        .context("--identity must be a directory with ca.pem, cert.pem and key.pem, e.g. HOME/admin from cairn init")?;
    let channel = tls::connect(&url, config, None)
        .await
        .map_err(|e| match e {
            cairn_common::Error::Refused { reason, .. } => refused_connection(&reason),
            other => anyhow!(
                "{other}: check --coordinator (or CAIRN_COORDINATOR) and that `cairn serve` runs there"
            ),
        })?;
    Ok(AdminClient::new(channel))
}

/// A one-line error for a failed call.
///
/// With TLS 1.3 the client finishes its handshake before the server checks
/// the client certificate, so a refused certificate surfaces on the first
/// call: as a transport error when the server's alert arrives first, or as a
/// cancelled call when the closed connection wins the race. Both mean the
/// coordinator would not talk to this identity.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let transport_failure = std::error::Error::source(&status).is_some()
        || status.code() == Code::Cancelled
        || status.message().contains("transport error");
    match status.code() {
        Code::Unknown | Code::Unavailable | Code::Cancelled if transport_failure => {
            refused_connection(&tls::describe_transport_error(&status))
        }
        Code::PermissionDenied => anyhow!("permission denied: {}", status.message()),
        Code::Unauthenticated => anyhow!("not authenticated: {}", status.message()),
        _ => anyhow!("{}", status.message()),
    }
}

fn refused_connection(cause: &str) -> anyhow::Error {
    anyhow!(
        "the coordinator refused the connection ({cause}): check that --identity holds a valid, unrevoked certificate from this fleet's CA"
    )
}
