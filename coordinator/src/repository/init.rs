//! `cairn repository init`: makes the repository that `[repository]` in
//! coordinator.toml names (an S3 bucket and prefix, or a local directory)
//! with fresh keys wrapped by the master key. `cairn init` does this for
//! its local default; an operator who points `[repository]` at S3 runs it
//! once before `cairn serve`.

use serde::Serialize;

use crate::audit::{AuditEvent, Outcome};
use crate::catalog::Catalog;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::repository::Repository;

#[derive(Debug, Serialize)]
pub struct InitRepositoryReport {
    pub repository: String,
    pub id: String,
    pub master_key_id: String,
}

pub async fn init_repository(config: &CoordinatorConfig) -> Result<InitRepositoryReport> {
    let store = config.open_store()?;
    let master = config.master_key()?;
    // Refuse a prefix that already holds objects: a repository shares its
    // place with nothing, so `rebuild-catalog` never meets strangers.
    for prefix in ["chunks/", "manifests/"] {
        let found = store
            .list(prefix)
            .await
            .map_err(|e| CoordinatorError::Unavailable(format!("repository: {e}")))?;
        if !found.is_empty() {
            return Err(CoordinatorError::Conflict(format!(
                "{} already holds backup data under {prefix}; choose an empty bucket prefix (repository.prefix) or directory (repository.path)",
                store.describe()
            )));
        }
    }
    let repository = Repository::create(store, &master)
        .await
        .map_err(|e| match e {
            crate::repository::RepositoryError::Invalid(message) => {
                CoordinatorError::Conflict(message)
            }
            other => {
                CoordinatorError::Unavailable(format!("cannot create the repository: {other}"))
            }
        })?;
    let report = InitRepositoryReport {
        repository: repository.store.describe(),
        id: repository.id().to_string(),
        master_key_id: master.key_id(),
    };
    let catalog = Catalog::open_sqlite(&config.catalog.sqlite_path).await?;
    catalog
        .append_audit(&AuditEvent::new(
            "cairn repository init",
            "repository.init",
            report.repository.clone(),
            Outcome::Success,
            format!("repository id {}", report.id),
        ))
        .await?;
    catalog.close().await;
    Ok(report)
}
