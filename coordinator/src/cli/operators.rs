//! `cairn operators issue|renew|revoke`: operator identities, the key
//! always generated here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use cairn_common::names::OperatorName;
use cairn_common::pki::generate_key_and_csr;
use cairn_common::proto;
use cairn_coordinator::config::CoordinatorConfig;
use clap::Subcommand;

use super::Connection;
use super::client::explain;

#[derive(Debug, Subcommand)]
pub(super) enum OperatorsCommand {
    /// Issue an operator identity with a role into a new directory (role: admin).
    /// The private key is generated here and never sent. With --offline, on
    /// the coordinator host: signed with the fleet CA on disk, no admin
    /// identity needed (the break-glass path when none is left); audited.
    Issue {
        /// Operator name: [a-z0-9][a-z0-9-]{0,62}.
        #[arg(long)]
        name: String,
        /// viewer (read only), operator (also runs work) or admin (also manages identity).
        #[arg(long)]
        role: cairn_common::identity::Role,
        /// Directory to create for ca.pem, cert.pem and key.pem.
        #[arg(long)]
        out: PathBuf,
        /// Sign with the CA key named by --config instead of asking the
        /// coordinator (run as the user that can read it); works whether or
        /// not `cairn serve` runs.
        #[arg(long, requires = "config")]
        offline: bool,
        /// With --offline: the coordinator's coordinator.toml.
        #[arg(long, requires = "offline")]
        config: Option<PathBuf>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Renew your own operator identity (the one --identity names) before it
    /// expires: a new key generated here, a new certificate for the same
    /// name and role (fleet.operator_certificate_lifetime). The identity
    /// directory's key and certificate are replaced together, or with
    /// --out a new directory is written. The old certificate stays valid
    /// until it expires.
    Renew {
        /// Write the renewed identity into this new directory instead of
        /// replacing the --identity directory.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Revoke every certificate of an operator; refused from its next call on
    /// (role: admin). The last admin cannot be revoked.
    Revoke {
        /// Operator name.
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
}

pub(super) async fn run(command: OperatorsCommand) -> anyhow::Result<i32> {
    match command {
        OperatorsCommand::Revoke { name, connection } => revoke_operator(name, connection).await,
        OperatorsCommand::Renew { out, connection } => renew_operator(out, connection).await,
        OperatorsCommand::Issue {
            name,
            role,
            out,
            offline,
            config,
            connection,
        } => {
            let name = OperatorName::new(name)?;
            if out.exists() {
                bail!(
                    "{} already exists: choose a new --out directory",
                    out.display()
                );
            }
            let request = generate_key_and_csr(name.as_str())?;
            let (ca_pem, certificate_pem) = match config.filter(|_| offline) {
                Some(config) => {
                    let config = CoordinatorConfig::load(&config)?;
                    let issued = cairn_coordinator::fleet::authority::issue_operator_offline(
                        &config,
                        name.as_str(),
                        role,
                        &request.csr_pem,
                    )
                    .await?;
                    (issued.ca_pem, issued.certificate.pem)
                }
                None => {
                    let response = connection
                        .admin()
                        .await?
                        .issue_operator_certificate(proto::IssueOperatorCertificateRequest {
                            name: name.to_string(),
                            role: proto::OperatorRole::from(role) as i32,
                            csr_pem: request.csr_pem.clone(),
                        })
                        .await
                        .map_err(explain)?
                        .into_inner();
                    (response.ca_pem, response.certificate_pem)
                }
            };
            write_identity(&out, &ca_pem, &certificate_pem, &request.key_pem)?;
            connection.show(
                &serde_json::json!({ "name": name, "role": role, "identity": out }),
                || {
                    println!("Issued {role} identity {name} in {}", out.display());
                },
            )?;
            Ok(0)
        }
    }
}

async fn renew_operator(out: Option<PathBuf>, connection: Connection) -> anyhow::Result<i32> {
    let Some(identity_dir) = connection.identity.clone() else {
        bail!(
            "cairn operators renew renews the identity --identity names (or CAIRN_IDENTITY): pass it"
        );
    };
    if let Some(out) = &out
        && out.exists()
    {
        bail!(
            "{} already exists: choose a new --out directory",
            out.display()
        );
    }
    let certificate = std::fs::read(identity_dir.join("cert.pem"))
        .with_context(|| format!("cannot read {}", identity_dir.join("cert.pem").display()))?;
    let der = cairn_common::tls::parse_certificates(&certificate, "the operator certificate")?;
    let current = cairn_common::identity::Identity::from_certificate_der(&der[0])?;
    let request = generate_key_and_csr(current.principal.common_name())?;
    let response = connection
        .admin()
        .await?
        .renew_operator_certificate(proto::RenewOperatorCertificateRequest {
            csr_pem: request.csr_pem.clone(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    let written = match &out {
        Some(out) => {
            write_identity(
                out,
                &response.ca_pem,
                &response.certificate_pem,
                &request.key_pem,
            )?;
            out.clone()
        }
        None => {
            cairn_common::config::replace_directory_files(
                &identity_dir,
                &[
                    ("cert.pem", response.certificate_pem.as_bytes(), 0o644),
                    ("key.pem", request.key_pem.as_bytes(), 0o600),
                ],
            )?;
            identity_dir
        }
    };
    let valid_until = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(response.not_after_unix.max(0) as u64),
    );
    connection.show(
        &serde_json::json!({
            "principal": current.principal.to_string(),
            "identity": written,
            "not_after": valid_until.to_string(),
        }),
        || {
            println!(
                "Renewed {} in {}: valid until {valid_until}.",
                current.principal,
                written.display()
            );
        },
    )?;
    Ok(0)
}

async fn revoke_operator(name: String, connection: Connection) -> anyhow::Result<i32> {
    let name = OperatorName::new(name)?;
    let response = connection
        .admin()
        .await?
        .revoke_operator(proto::RevokeOperatorRequest {
            name: name.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    connection.show(
        &serde_json::json!({
            "operator": name,
            "revoked_serials": response.revoked_serials,
        }),
        || {
            println!(
                "Revoked {} certificate(s) of operator {name}: refused from now on.",
                response.revoked_serials.len()
            );
        },
    )?;
    Ok(0)
}

/// Writes an identity directory whole or not at all.
fn write_identity(
    out: &std::path::Path,
    ca: &str,
    certificate: &str,
    key: &str,
) -> anyhow::Result<()> {
    use cairn_common::config::{StagedDirectory, write_file_atomic};
    let staged = StagedDirectory::new(out, "--out")?;
    write_file_atomic(&staged.path().join("ca.pem"), ca.as_bytes(), 0o644)?;
    write_file_atomic(
        &staged.path().join("cert.pem"),
        certificate.as_bytes(),
        0o644,
    )?;
    write_file_atomic(&staged.path().join("key.pem"), key.as_bytes(), 0o600)?;
    staged.commit()?;
    Ok(())
}
