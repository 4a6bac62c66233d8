//! `cairn audit list|verify`.

use cairn_common::proto;
use clap::Subcommand;

use super::Connection;
use super::client::explain;
use super::output::AuditView;
use super::output::{self, print_json};
use super::pages;

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// The newest audit events.
    List {
        /// How many events (0: all of them).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        connection: Connection,
    },
    /// Recompute the hash chain; exit 1 and name the first bad row if it is broken.
    Verify {
        #[command(flatten)]
        connection: Connection,
    },
}

pub(super) async fn run(command: AuditCommand) -> anyhow::Result<i32> {
    match command {
        AuditCommand::List { limit, connection } => {
            let client = connection.admin().await?;
            let events: Vec<AuditView> =
                pages::collect((limit > 0).then_some(limit), |page_token, limit| {
                    let mut client = client.clone();
                    async move {
                        let page = client
                            .list_audit_events(proto::ListAuditEventsRequest { limit, page_token })
                            .await
                            .map_err(explain)?
                            .into_inner();
                        Ok((
                            page.events.into_iter().map(Into::into).collect(),
                            page.next_page_token,
                        ))
                    }
                })
                .await?;
            connection.show(&events, || {
                println!("{}", output::audit_table(&events));
            })?;
            Ok(0)
        }
        AuditCommand::Verify { connection } => {
            let report = connection
                .admin()
                .await?
                .verify_audit_log(proto::VerifyAuditLogRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if connection.json() {
                print_json(&serde_json::json!({
                    "ok": report.ok,
                    "rows_checked": report.rows_checked,
                    "first_bad_row": (report.first_bad_row != 0).then_some(report.first_bad_row),
                    "problem": (!report.problem.is_empty()).then_some(&report.problem),
                }))?;
            } else if report.ok {
                println!("audit log intact: {} rows checked", report.rows_checked);
            } else {
                println!(
                    "audit log BROKEN at row {}: {}",
                    report.first_bad_row, report.problem
                );
            }
            Ok(if report.ok { 0 } else { 1 })
        }
    }
}
