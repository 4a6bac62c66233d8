//! Recording audit events: a thin handle over the catalog that every
//! component holds. A failed append is logged loudly; security-relevant
//! mutations use [`AuditLog::record_strict`] so that an action whose audit
//! row cannot be written does not happen.

use std::sync::Arc;

use crate::audit::AuditEvent;
use crate::catalog::Catalog;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct AuditLog {
    catalog: Arc<Catalog>,
}

impl AuditLog {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        AuditLog { catalog }
    }

    /// Appends, failing if the row cannot be written.
    pub async fn record_strict(&self, event: AuditEvent) -> Result<()> {
        tracing::info!(
            actor = %event.actor,
            action = event.action,
            target = %event.target,
            outcome = event.outcome.as_str(),
            detail = %event.detail,
            "audit"
        );
        self.catalog.append_audit(&event).await?;
        Ok(())
    }

    /// Appends; a failure is logged, not returned.
    pub async fn record(&self, event: AuditEvent) {
        if let Err(error) = self.record_strict(event).await {
            tracing::error!(%error, "cannot append to the audit log");
        }
    }
}
