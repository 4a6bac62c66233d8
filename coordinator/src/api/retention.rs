//! The Admin service's retention calls, behind the handlers in `admin`:
//! policies, a schedule's policy, protected backups, and `apply`.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_common::names::AgentName;
use cairn_common::proto;
use tonic::Status;

use crate::api::admin::AdminService;
use crate::api::wire::retention_report_to_wire;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::{RetentionPolicyRecord, unknown_policy};
use crate::error::CoordinatorError;
use crate::retention::Policy;
use crate::retention::apply::{ApplyRequest, Deleter, Scope};
use crate::schedules::targets::matches;
use crate::schedules::timing::parse_timezone;

fn stored_policy(record: &RetentionPolicyRecord) -> Result<Policy, CoordinatorError> {
    Policy::from_stored(&record.name, &record.policy)
}

/// Checks a policy name: the same rules as every other name.
fn policy_name(name: &str) -> Result<(), Status> {
    AgentName::new(name).map(drop).map_err(|_| {
        Status::invalid_argument(format!(
            "retention policy name {name:?}: use 1-63 characters of a-z, 0-9 and -, \
             starting with a letter or digit"
        ))
    })
}

impl AdminService {
    pub(super) async fn policy_to_wire(
        &self,
        record: RetentionPolicyRecord,
    ) -> Result<proto::RetentionPolicy, Status> {
        let policy = stored_policy(&record)?;
        let schedules = self.catalog.schedules_using_policy(&record.name).await?;
        Ok(proto::RetentionPolicy {
            name: record.name,
            policy_json: record.policy,
            summary: policy.to_string(),
            created_by: record.created_by,
            created_at_unix_ms: record.created_at,
            schedules,
        })
    }

    pub(super) async fn create_policy(
        &self,
        actor: &str,
        body: proto::CreateRetentionPolicyRequest,
    ) -> Result<proto::RetentionPolicy, Status> {
        policy_name(&body.name)?;
        let policy: Policy = serde_json::from_str(&body.policy_json).map_err(|e| {
            Status::invalid_argument(format!(
                "policy_json: {e}: give the rules as {{\"keep_last\": 7, \"keep_within\": \"7d\"}}"
            ))
        })?;
        policy.validate()?;
        let record = RetentionPolicyRecord {
            name: body.name,
            // Stored in its canonical form.
            policy: serde_json::to_string(&policy)
                .map_err(|e| CoordinatorError::Internal(format!("cannot encode: {e}")))?,
            created_by: actor.to_string(),
            created_at: self.jobs.clock.now_ms(),
        };
        self.catalog.insert_retention_policy(&record).await?;
        self.audit
            .record(AuditEvent::new(
                actor,
                "retention.create",
                record.name.clone(),
                Outcome::Success,
                policy.to_string(),
            ))
            .await;
        self.policy_to_wire(record).await
    }

    pub(super) async fn policy_named(&self, name: &str) -> Result<RetentionPolicyRecord, Status> {
        Ok(self
            .catalog
            .get_retention_policy(name)
            .await?
            .ok_or_else(|| unknown_policy(name))?)
    }

    pub(super) async fn delete_policy(&self, actor: &str, name: &str) -> Result<(), Status> {
        match self.catalog.delete_retention_policy(name).await {
            Ok(true) => {}
            Ok(false) => return Err(unknown_policy(name).into()),
            Err(error) => {
                self.audit
                    .record(AuditEvent::new(
                        actor,
                        "retention.delete",
                        name,
                        Outcome::Refused,
                        error.to_string(),
                    ))
                    .await;
                return Err(error.into());
            }
        }
        self.audit
            .record(AuditEvent::new(
                actor,
                "retention.delete",
                name,
                Outcome::Success,
                "",
            ))
            .await;
        Ok(())
    }

    pub(super) async fn set_schedule_policy(
        &self,
        actor: &str,
        body: proto::SetScheduleRetentionRequest,
    ) -> Result<proto::Schedule, Status> {
        let policy = (!body.policy.is_empty()).then_some(body.policy.as_str());
        if !self
            .catalog
            .set_schedule_retention(&body.schedule, policy)
            .await?
        {
            return Err(Status::not_found(format!(
                "no schedule named {:?}: see cairn schedule list",
                body.schedule
            )));
        }
        self.audit
            .record(AuditEvent::new(
                actor,
                "schedule.retention",
                body.schedule.clone(),
                Outcome::Success,
                match policy {
                    Some(policy) => format!("retention policy {policy}"),
                    None => "no retention policy".to_string(),
                },
            ))
            .await;
        let record = self
            .catalog
            .get_schedule(&body.schedule)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("schedule {:?} was deleted", body.schedule))
            })?;
        Ok(self.schedule_summary(record))
    }

    pub(super) async fn set_protected(
        &self,
        actor: &str,
        body: proto::SetBackupProtectedRequest,
    ) -> Result<proto::Backup, Status> {
        let id = body.backup_id;
        if !self
            .catalog
            .set_backup_protected(&id, body.protected)
            .await?
        {
            return Err(Status::not_found(format!(
                "no complete backup {id}: see cairn backups list"
            )));
        }
        self.audit
            .record(AuditEvent::new(
                actor,
                if body.protected {
                    "backup.protect"
                } else {
                    "backup.unprotect"
                },
                id.clone(),
                Outcome::Success,
                "",
            ))
            .await;
        let backup = self
            .catalog
            .get_backup(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("backup {id} was deleted")))?;
        let mut verified = self
            .catalog
            .latest_verifications(std::slice::from_ref(&id))
            .await?;
        let verification = verified.remove(&id);
        Ok(crate::api::wire::backup_to_wire(backup, verification))
    }

    pub(super) async fn apply(
        &self,
        actor: &str,
        body: proto::ApplyRetentionRequest,
    ) -> Result<proto::ApplyRetentionResponse, Status> {
        let record = self.policy_named(&body.policy).await?;
        let policy = stored_policy(&record)?;
        let zone = match body.timezone.as_str() {
            "" => chrono_tz::UTC,
            zone => parse_timezone(zone)?,
        };
        let agents = match (body.agent_name.as_str(), body.selector.is_empty()) {
            ("", true) => None,
            ("", false) => {
                let selector: BTreeMap<String, String> = body.selector.into_iter().collect();
                Some(
                    self.catalog
                        .list_agents()
                        .await?
                        .into_iter()
                        .filter(|agent| matches(&selector, &agent.labels))
                        .map(|agent| agent.name)
                        .collect(),
                )
            }
            (agent, true) => {
                self.agent_record(agent).await?;
                Some(vec![agent.to_string()])
            }
            (_, false) => {
                return Err(Status::invalid_argument(
                    "give --agent or --selector, not both",
                ));
            }
        };
        let request = ApplyRequest {
            policy_name: record.name,
            policy,
            scope: Scope {
                agents,
                databases: (!body.database.is_empty()).then(|| vec![body.database]),
            },
            dry_run: body.dry_run,
            zone,
            actor: actor.to_string(),
        };
        let now =
            chrono::DateTime::from_timestamp_millis(self.jobs.clock.now_ms()).unwrap_or_default();
        // Its own task: a caller that goes away does not cut the deletions
        // short between their steps.
        let (catalog, repository, audit) = (
            Arc::clone(&self.catalog),
            Arc::clone(&self.repository),
            self.audit.clone(),
        );
        let dry_run = request.dry_run;
        let run = tokio::spawn(async move {
            Deleter {
                catalog: &catalog,
                repository: &repository,
                audit: &audit,
            }
            .apply(&request, now)
            .await
        });
        let report = match run.await {
            Ok(result) => result?,
            Err(error) => {
                return Err(cairn_common::error::internal_status(&format!(
                    "the retention run stopped: {error}"
                )));
            }
        };
        Ok(retention_report_to_wire(report, dry_run))
    }
}
