//! The staging (or scratch) database's life: created like the backed-up
//! database (encoding, locale), swapped into place after `pg_restore`
//! (rules 5 and 6 of [`super`]), counted (drills), and dropped whenever it
//! is not swapped.

use std::collections::BTreeSet;

use cairn_common::archive::ArchiveHead;
use cairn_common::proto;
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::request::Request;
use super::selection::display_table;
use super::{
    IDENTIFIER_MAX_BYTES, RestoreError, Restored, SESSIONS_WAIT, SWAP_ATTEMPTS, SWAP_RETRY_PAUSE,
    State, list_names, sql,
};
use crate::postgres::target::{self, Instance, SwapError};

/// `CREATE DATABASE` of the staging (or scratch) database, with the
/// backed-up database's encoding and locale when the instance has them.
pub(super) async fn create_staging(
    request: &Request,
    instance: &Instance,
    state: &mut State,
    head: Option<&ArchiveHead>,
) -> Result<(), RestoreError> {
    // Marked as ours before CREATE DATABASE (a cancel may land while the
    // server finishes it), once the name is known to be free, so the
    // clean-up never drops a database this job did not make.
    if instance.database_exists(&request.staging).await? {
        return Err(RestoreError::Refused(format!(
            "a database named {:?} already exists on instance {}: another restore's staging \
             database; drop it if no restore runs there, and try again",
            request.staging, request.instance
        )));
    }
    state.staging = Some(request.staging.clone());
    let options = head
        .and_then(|head| head.entries.iter().find(|e| e.desc == "DATABASE"))
        .and_then(|entry| entry.defn.as_deref())
        .map(sql::database_options)
        .unwrap_or_default();
    if !options.is_empty() {
        match instance.create_database(&request.staging, &options).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                let wanted: Vec<String> = options.iter().map(|(k, v)| format!("{k} {v}")).collect();
                state.warn(format!(
                    "the database was created with the instance's default encoding and locale: \
                     the backup's ({}) cannot be used here: {error}",
                    wanted.join(", ")
                ));
            }
        }
    }
    instance.create_database(&request.staging, &[]).await?;
    Ok(())
}

/// The staging database renamed into place, the target (if any) renamed
/// aside in the same transaction, then dropped only with --drop-previous.
pub(super) async fn swap_into_place(
    request: &Request,
    instance: &Instance,
    state: &mut State,
    restored: &Restored,
) -> Result<(), RestoreError> {
    if !request.no_owner
        && let Some(owner) = restored
            .head
            .as_ref()
            .and_then(|head| head.database_owner.as_ref())
    {
        let wanted: BTreeSet<String> = [owner.clone()].into();
        if instance.existing_roles(&wanted).await?.contains(owner) {
            if let Err(error) = instance.set_database_owner(&request.staging, owner).await {
                state.warn(format!(
                    "the database's owner was not set to {owner:?}: {error}"
                ));
            }
        } else {
            state.warn(format!(
                "the database's owner {owner:?} is not a role here: it is owned by the \
                 restoring role"
            ));
        }
    }

    let Some(_previous_contents) = restored.target else {
        swap_once_free(request, instance, None, state).await?;
        state.staging = None;
        state.report.database = request.target.clone();
        return Ok(());
    };
    // Two restores within the same second must not collide: the first
    // free name of `_previous_<time>`, `_previous_<time>_2`, ...
    let now = Utc::now();
    let mut previous = previous_name(&request.target, now, 1);
    for attempt in 2..=PREVIOUS_NAME_ATTEMPTS {
        if !instance.database_exists(&previous).await? {
            break;
        }
        previous = previous_name(&request.target, now, attempt);
    }
    swap_once_free(request, instance, Some(&previous), state).await?;
    state.staging = None;
    state.report.database = request.target.clone();
    state.report.previous = previous.clone();
    tracing::info!(previous = %previous, "the restored database is in place");
    // Dropped only when asked: even an empty-looking database keeps its
    // settings, grants and owner, and is the operator's to drop.
    if request.drop_previous {
        match instance.drop_database(&previous).await {
            Ok(()) => state.report.previous_dropped = true,
            Err(error) => state.warn(format!(
                "the previous database {previous:?} could not be dropped: {error}; drop it by hand"
            )),
        }
    }
    Ok(())
}

/// Swaps, once the target's sessions are gone: terminated with
/// `--replace`, waited for otherwise.
async fn swap_once_free(
    request: &Request,
    instance: &Instance,
    previous: Option<&str>,
    state: &mut State,
) -> Result<(), RestoreError> {
    let deadline = Instant::now() + SESSIONS_WAIT;
    let mut attempts = 0;
    loop {
        attempts += 1;
        if previous.is_some() {
            let sessions = instance.sessions(&request.target).await?;
            if !sessions.is_empty() {
                if request.replace {
                    for session in sessions {
                        if instance.terminate(session.pid).await? {
                            tracing::info!(%session, "terminated a session on the target");
                            state.report.terminated_sessions.push(session.to_string());
                        }
                    }
                } else if Instant::now() < deadline {
                    tokio::time::sleep(SWAP_RETRY_PAUSE).await;
                    continue;
                } else {
                    let names: Vec<String> = sessions.iter().map(ToString::to_string).collect();
                    return Err(RestoreError::Refused(format!(
                        "database {:?} is empty but still has sessions after {}s ({}); nothing \
                         was renamed: end them and restore again, or pass --replace to \
                         terminate them",
                        request.target,
                        SESSIONS_WAIT.as_secs(),
                        list_names(&names)
                    )));
                }
            }
            // Without --replace the target was empty when the restore
            // began; with its sessions gone, it must still be, or whatever
            // was written to it meanwhile would be swapped out under
            // nobody's order.
            if !request.replace {
                let now = target::database_contents(&request.connection, &request.target).await?;
                if !now.is_empty() {
                    return Err(RestoreError::Refused(format!(
                        "database {:?} was empty when the restore began but now holds {now}; \
                         nothing was renamed: restore again under another name with --database, \
                         or with --replace",
                        request.target
                    )));
                }
            }
        }
        match instance
            .swap(&request.staging, &request.target, previous)
            .await
        {
            Ok(()) => return Ok(()),
            Err(SwapError::InUse(message)) => {
                let again = if request.replace {
                    attempts < SWAP_ATTEMPTS
                } else {
                    Instant::now() < deadline
                };
                if !again {
                    return Err(RestoreError::Refused(format!(
                        "database {:?} could not be swapped after {attempts} attempts: {message}; \
                         nothing was renamed",
                        request.target
                    )));
                }
                tracing::info!(%message, attempts, "the swap met sessions; trying again");
                tokio::time::sleep(SWAP_RETRY_PAUSE).await;
            }
            Err(SwapError::Failed(error)) => return Err(error.into()),
        }
    }
}

/// A drill's count of every restored table, in the scratch database.
pub(super) async fn count_rows(
    request: &Request,
    state: &mut State,
    restored: &Restored,
) -> Result<(), RestoreError> {
    state.report.database = request.staging.clone();
    let Some(head) = &restored.head else {
        state
            .warn("rows were not counted: the backup's table of contents could not be read".into());
        return Ok(());
    };
    let tables: Vec<(String, String)> = head
        .entries
        .iter()
        .filter(|e| e.desc == "TABLE DATA")
        .map(|e| (e.namespace.clone(), e.tag.clone()))
        .collect();
    let counts = target::count_rows(&request.connection, &request.staging, &tables).await?;
    for ((schema, table), rows) in tables.into_iter().zip(counts) {
        if let Ok(summary) = &restored.summary
            && let Some(dumped) = summary
                .tables
                .iter()
                .find(|t| t.schema == schema && t.table == table)
            && dumped.rows != rows
        {
            state.warn(format!(
                "{}: {rows} rows restored, but the dump holds {}",
                display_table(&schema, &table),
                dumped.rows
            ));
        }
        state.report.table_rows.push(proto::TableRows {
            schema,
            table,
            rows,
        });
    }
    tracing::info!(tables = state.report.table_rows.len(), "drill rows counted");
    Ok(())
}

/// Drops the staging or scratch database if it is still there; what could
/// not be cleaned up, for the job's message.
pub(super) async fn clean_up(
    request: &Request,
    instance: &Instance,
    state: &mut State,
) -> Option<String> {
    let staging = state.staging.take()?;
    let result = if instance.is_closed() {
        // The session died (a server restart?): a new one.
        match Instance::connect(&request.connection, &[&request.target, &staging]).await {
            Ok(fresh) => fresh.drop_database(&staging).await,
            Err(error) => Err(error),
        }
    } else {
        instance.drop_database(&staging).await
    };
    match result {
        Ok(()) => {
            tracing::info!(database = %staging, "dropped the staging database");
            None
        }
        Err(error) => {
            tracing::warn!(database = %staging, %error, "cannot drop the staging database");
            Some(format!(
                "the database {staging:?} could not be dropped ({error}): drop it by hand"
            ))
        }
    }
}

/// How many `_previous_` names are tried before the last is used (and the
/// rename then fails with PostgreSQL's own message).
const PREVIOUS_NAME_ATTEMPTS: u32 = 100;

/// `<target>_previous_<YYYYMMDDHHMMSS>` (UTC), with `_<n>` from the second
/// choice on, the target's part cut (at a character boundary) so that the
/// whole fits PostgreSQL's 63 bytes.
fn previous_name(target: &str, now: DateTime<Utc>, choice: u32) -> String {
    let mut suffix = format!("_previous_{}", now.format("%Y%m%d%H%M%S"));
    if choice > 1 {
        suffix.push_str(&format!("_{choice}"));
    }
    let mut keep = IDENTIFIER_MAX_BYTES
        .saturating_sub(suffix.len())
        .min(target.len());
    while !target.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &target[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn previous_names_fit_in_63_bytes() {
        let now = Utc.with_ymd_and_hms(2025, 3, 9, 14, 5, 7).unwrap();
        let check = |target: &str, expected: &str| {
            let name = previous_name(target, now, 1);
            assert_eq!(name, expected, "{target:?}");
            assert!(name.len() <= IDENTIFIER_MAX_BYTES);
        };
        check("shop", "shop_previous_20250309140507");
        check("my \"db\"", "my \"db\"_previous_20250309140507");
        let long = "x".repeat(63);
        check(
            &long,
            &format!("{}_previous_20250309140507", "x".repeat(39)),
        );
        // Never half a character: 'ü' is two bytes.
        let umlauts = "ü".repeat(30);
        check(
            &umlauts,
            &format!("{}_previous_20250309140507", "ü".repeat(19)),
        );
        assert_eq!(
            previous_name("shop", now, 2),
            "shop_previous_20250309140507_2"
        );
        assert_eq!(previous_name(&long, now, 17).len(), IDENTIFIER_MAX_BYTES);
    }
}
