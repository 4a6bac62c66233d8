//! The safety checks before anything is written: the target (rules 3
//! and 7 of [`super`]), and the disk space (rule 2). Each refusal names the
//! database and the fix.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use cairn_common::archive::ArchiveHead;
use tokio::time::Instant;

use super::request::{Mode, Request};
use super::selection::{self, display_table};
use super::{RestoreError, STAT_TIMEOUT, State, human_bytes, list_names};
use crate::postgres::disk_space;
use crate::postgres::target::{self, DatabaseContents, Instance};
use crate::spool;

/// Refuses a target that the restore may not touch; returns what a full
/// restore's target holds (`None`: it does not exist).
pub(super) async fn check_target(
    request: &Request,
    instance: &Instance,
) -> Result<Option<DatabaseContents>, RestoreError> {
    if request.mode != Mode::Drill {
        refuse_special_database(request, instance).await?;
    }
    match request.mode {
        Mode::Drill => Ok(None),
        Mode::Partial => {
            if !instance.database_exists(&request.target).await? {
                return Err(RestoreError::Refused(format!(
                    "database {:?} does not exist on instance {}; a partial restore (--table, \
                     --schema) goes into an existing database: create it first, or restore the \
                     whole backup",
                    request.target, request.instance
                )));
            }
            Ok(None)
        }
        Mode::Full => {
            if !instance.database_exists(&request.target).await? {
                return Ok(None);
            }
            let contents = target::database_contents(&request.connection, &request.target).await?;
            if !contents.is_empty() && !request.replace {
                return Err(RestoreError::Refused(format!(
                    "database {:?} exists and is not empty ({contents}); restore under another \
                     name with --database, or pass --replace to swap it (the old database is \
                     kept as {}_previous_<time> unless --drop-previous)",
                    request.target, request.target
                )));
            }
            Ok(Some(contents))
        }
    }
}

/// The foreign keys of other tables that point at the restored ones: a
/// key the target has must be in the backup (it is dropped before the
/// table and added again after it), else the restore is refused; a key of
/// the backup the target lacks is left out (restoring a table does not add
/// keys to others).
async fn check_incoming_foreign_keys(
    request: &Request,
    selection: selection::Selection,
) -> Result<selection::Selection, RestoreError> {
    let on_target =
        target::foreign_keys_into(&request.connection, &request.target, &selection.tables).await?;
    let in_backup: BTreeSet<(&str, &str, &str)> = selection
        .incoming
        .iter()
        .map(|fk| (fk.schema.as_str(), fk.table.as_str(), fk.name.as_str()))
        .collect();
    let unknown: Vec<String> = on_target
        .iter()
        .filter(|(s, t, n)| !in_backup.contains(&(s.as_str(), t.as_str(), n.as_str())))
        .map(|(s, t, n)| format!("{} on {}", selection::display_name(n), display_table(s, t)))
        .collect();
    if !unknown.is_empty() {
        return Err(RestoreError::Refused(format!(
            "database {:?} has foreign keys that point at the tables to restore and that the \
             backup does not have: {}; the tables cannot be dropped and restored under them: \
             drop those keys first (ALTER TABLE ... DROP CONSTRAINT), restore, then add them \
             again",
            request.target,
            list_names(&unknown)
        )));
    }
    let target_keys: BTreeSet<(&str, &str, &str)> = on_target
        .iter()
        .map(|(s, t, n)| (s.as_str(), t.as_str(), n.as_str()))
        .collect();
    let absent: std::collections::HashSet<i64> = selection
        .incoming
        .iter()
        .filter(|fk| {
            !target_keys.contains(&(fk.schema.as_str(), fk.table.as_str(), fk.name.as_str()))
        })
        .map(|fk| fk.dump_id)
        .collect();
    Ok(selection.without(&absent))
}

/// Refuses a template database as a target (a full or partial restore),
/// and the database the agent connects through (a full restore).
async fn refuse_special_database(
    request: &Request,
    instance: &Instance,
) -> Result<(), RestoreError> {
    let target = &request.target;
    let is_template = instance.is_template(target).await?;
    if is_template || target == "template0" || target == "template1" {
        let undo = if target == "template0" || target == "template1" {
            String::new()
        } else {
            format!(
                " (or, if it should no longer be a template, run ALTER DATABASE {} \
                 IS_TEMPLATE false first)",
                target::quote_ident(target)
            )
        };
        return Err(RestoreError::Refused(format!(
            "database {target:?} is a template database: CREATE DATABASE copies it, so the \
             backup restored onto it would be in every database created afterwards; restore \
             under another name with --database{undo}"
        )));
    }
    if request.mode == Mode::Full {
        let connected_through = target::connection_database(&request.connection)?;
        if *target == connected_through {
            return Err(RestoreError::Refused(format!(
                "database {target:?} is the one this agent connects through (the connection \
                 string of instance {}), and a database cannot be renamed aside while in use; \
                 restore under another name with --database, or give the instance a \
                 connection string with another database (dbname=)",
                request.instance
            )));
        }
    }
    Ok(())
}

/// Refuses a restore the data directory has no room for; returns whether
/// to spool for a parallel restore.
pub(super) async fn check_space(
    request: &Request,
    instance: &Instance,
    state: &mut State,
) -> Result<bool, RestoreError> {
    if request.mode == Mode::Partial {
        if request.jobs > 1 {
            state.warn(format!(
                "--jobs {} was not used: a partial restore runs as one transaction, with one job",
                request.jobs
            ));
        }
        return Ok(false);
    }
    let base = request.database_bytes.max(request.dump_bytes);
    let needed = base.saturating_add(base / 5);
    let data_directory = instance.data_directory().await?;
    let data_disk = match &data_directory {
        Some(path) => disk_space(path.clone(), Instant::now() + STAT_TIMEOUT).await,
        None => Err(
            "data_directory is not visible to this role (it needs superuser or \
             pg_read_all_settings)"
                .into(),
        ),
    };
    match &data_disk {
        Ok(disk) if disk.available_bytes < needed => {
            return Err(RestoreError::Refused(format!(
                "not enough free disk space on instance {}: the data directory {} has {} free, \
                 the restore needs {} (the database measured {} at backup, its dump {}, plus \
                 20%); free some space, or restore onto another instance",
                request.instance,
                disk.path,
                human_bytes(disk.available_bytes),
                human_bytes(needed),
                human_bytes(request.database_bytes),
                human_bytes(request.dump_bytes),
            )));
        }
        Ok(_) => {}
        Err(note) => state.warn(format!("free disk space was not checked: {note}")),
    }
    if request.jobs <= 1 {
        return Ok(false);
    }
    // A parallel restore reads a file: the whole dump in the spool
    // directory, on top of the database if they share a filesystem.
    // Refused rather than streamed instead: a spool directory another
    // user can enter is a hole the operator must hear about.
    let spool_dir = request.spool_dir.clone();
    spool::ensure_private(&spool_dir).map_err(RestoreError::Refused)?;
    let spool_disk = disk_space(
        spool_dir.to_string_lossy().into_owned(),
        Instant::now() + STAT_TIMEOUT,
    )
    .await;
    let shared = match (&data_directory, std::fs::metadata(&spool_dir)) {
        (Some(data), Ok(spool)) => std::fs::metadata(data).is_ok_and(|d| d.dev() == spool.dev()),
        _ => false,
    };
    let spool_needed = request
        .dump_bytes
        .saturating_add(if shared { needed } else { 0 });
    let problem = match spool_disk {
        Ok(disk) if disk.available_bytes >= spool_needed => return Ok(true),
        Ok(disk) => format!(
            "the spool directory {} has {} free and needs {} ({})",
            spool_dir.display(),
            human_bytes(disk.available_bytes),
            human_bytes(spool_needed),
            if shared {
                "the dump, and the database on the same filesystem"
            } else {
                "the dump"
            }
        ),
        Err(note) => note,
    };
    state.warn(format!(
        "--jobs {} was not used: {problem}; the dump was streamed into pg_restore with one job \
         instead (set spool_dir in agent.toml to a larger filesystem)",
        request.jobs
    ));
    Ok(false)
}

/// The entries of a partial restore, after refusing tables that hold rows.
pub(super) async fn select_entries(
    request: &Request,
    head: &ArchiveHead,
) -> Result<selection::Selection, RestoreError> {
    let requested: BTreeSet<String> = request.schemas.iter().cloned().collect();
    let on_target = if requested.is_empty() {
        BTreeSet::new()
    } else {
        target::existing_schemas(&request.connection, &request.target, &requested).await?
    };
    let selection = selection::select(head, &request.tables, &request.schemas, &on_target)
        .map_err(RestoreError::Refused)?;
    let selection = check_incoming_foreign_keys(request, selection).await?;
    let states =
        target::table_states(&request.connection, &request.target, &selection.tables).await?;
    let holding_rows: Vec<String> = selection
        .tables
        .iter()
        .zip(&states)
        .filter(|(_, state)| state.has_rows)
        .map(|((schema, table), _)| display_table(schema, table))
        .collect();
    if !holding_rows.is_empty() && !request.replace {
        let message = if holding_rows.len() == 1 {
            format!(
                "table {} exists in database {:?} and is not empty; pass --replace to drop it \
                 and restore it from the backup",
                holding_rows[0], request.target
            )
        } else {
            format!(
                "tables {} exist in database {:?} and are not empty; pass --replace to drop \
                 them and restore them from the backup",
                list_names(&holding_rows),
                request.target
            )
        };
        return Err(RestoreError::Refused(message));
    }
    Ok(selection)
}
