//! The spool directory (`spool_dir` in `agent.toml`, by default `spool`
//! next to it): where a parallel restore writes the decrypted dump for
//! `pg_restore --jobs`, and a partial restore its `--use-list` file.
//!
//! Those files are a backup in plaintext, and `pg_restore` (connected as
//! the database superuser) reopens them by path, in every worker. So the
//! directory is this agent's alone, or the agent refuses it: created 0700
//! by the agent, owned by its uid, no permission for group or others, not
//! a symbolic link, and no directory above it that another user could
//! write to (unless sticky, like `/var/tmp`). In it, files are created
//! exclusively (`O_EXCL`) with mode 0600: no other user can read one, plant
//! one beforehand, or swap one while `pg_restore` reads it.
//!
//! One agent per spool directory: `cairn-agent run` holds an exclusive
//! lock on [`LOCK_FILE`] in it while it runs. So the restore files found
//! there at start are its own leftovers (an agent killed mid-restore
//! cannot remove them), and it removes them and says so in its log.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Held locked by the running agent, so no two agents share a spool
/// directory.
pub const LOCK_FILE: &str = ".cairn-agent.lock";
/// How every restore file in the spool directory begins
/// (`cairn-restore-<8 hex>.dump`, `.list`).
pub const RESTORE_FILE_PREFIX: &str = "cairn-restore-";

/// What to do about a spool directory that is not private.
const FIX: &str = "set spool_dir in agent.toml to a directory only this agent's user can \
    enter (it is created 0700 when missing), or fix this one with chown and chmod 0700";

/// Makes sure `dir` is private to this agent: creates it (and missing
/// parents) with mode 0700 when it does not exist, then checks it and
/// what is above it. The error names `spool_dir`, the problem and the fix.
pub fn ensure_private(dir: &Path) -> Result<(), String> {
    let dir = std::path::absolute(dir).map_err(|error| {
        format!(
            "spool_dir {}: cannot make the path absolute: {error}",
            dir.display()
        )
    })?;
    match std::fs::symlink_metadata(&dir) {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true).mode(0o700);
            builder.create(&dir).map_err(|error| {
                format!(
                    "spool_dir {}: cannot create it: {error}; create it owned by this agent's \
                     user with mode 0700, or set spool_dir in agent.toml to a directory the \
                     agent can create",
                    dir.display()
                )
            })?;
            tracing::info!(spool_dir = %dir.display(), "created the spool directory (0700)");
        }
        Err(error) => {
            return Err(format!("spool_dir {}: {error}", dir.display()));
        }
    }
    check_private(&dir, rustix::process::geteuid().as_raw())
}

/// The checks of [`ensure_private`] on an existing `dir` (absolute), for
/// the user `uid`.
fn check_private(dir: &Path, uid: u32) -> Result<(), String> {
    let refuse = |problem: String| {
        Err(format!(
            "spool_dir {} {problem}; restores write decrypted backups there and pg_restore \
             reads them back by name, so another user must not be able to replace them: {FIX}",
            dir.display()
        ))
    };
    let metadata = std::fs::symlink_metadata(dir)
        .map_err(|error| format!("spool_dir {}: {error}", dir.display()))?;
    if metadata.file_type().is_symlink() {
        return refuse("is a symbolic link".into());
    }
    if !metadata.is_dir() {
        return refuse("is not a directory".into());
    }
    if metadata.uid() != uid {
        return refuse(format!(
            "is owned by uid {}, not by this agent's user (uid {uid})",
            metadata.uid()
        ));
    }
    if metadata.mode() & 0o077 != 0 {
        return refuse(format!(
            "has mode {:04o}, which lets other users in (0700 is needed)",
            metadata.mode() & 0o7777
        ));
    }
    // Whoever may write to a directory above could rename the spool
    // directory away and put another in its place. Both the path as given
    // and the path its symbolic links lead to are checked.
    let mut above: Vec<PathBuf> = dir.ancestors().skip(1).map(Path::to_path_buf).collect();
    if let Ok(real) = std::fs::canonicalize(dir) {
        above.extend(real.ancestors().skip(1).map(Path::to_path_buf));
    }
    for ancestor in above {
        let Ok(metadata) = std::fs::metadata(&ancestor) else {
            continue;
        };
        let owner = metadata.uid();
        let mode = metadata.mode();
        let sticky = mode & 0o1000 != 0;
        if owner != 0 && owner != uid {
            return refuse(format!(
                "is inside {}, which is owned by uid {owner}, neither root nor this agent's \
                 user (uid {uid})",
                ancestor.display()
            ));
        }
        if mode & 0o022 != 0 && !sticky {
            return refuse(format!(
                "is inside {}, which other users can write to (mode {:04o})",
                ancestor.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// The running agent's hold on its spool directory, released when dropped
/// (or when the process dies).
#[derive(Debug)]
pub struct SpoolLock {
    _file: File,
    dir: PathBuf,
}

impl SpoolLock {
    /// At `cairn-agent run`: makes sure `dir` is private, locks it against
    /// another agent, and removes the restore files a killed agent left
    /// there (each named in the log).
    pub fn acquire(dir: &Path) -> Result<SpoolLock, String> {
        ensure_private(dir)?;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|error| format!("spool_dir: cannot open {}: {error}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(format!(
                    "spool_dir {} is in use by another running agent; give each agent its own \
                     spool_dir in agent.toml",
                    dir.display()
                ));
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(format!(
                    "spool_dir: cannot lock {}: {error}",
                    path.display()
                ));
            }
        }
        let lock = SpoolLock {
            _file: file,
            dir: dir.to_path_buf(),
        };
        lock.remove_leftovers();
        Ok(lock)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the restore files of earlier runs: this agent holds the
    /// lock, so no restore of another agent is writing them.
    fn remove_leftovers(&self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(spool_dir = %self.dir.display(), %error, "cannot list the spool directory");
                return;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(RESTORE_FILE_PREFIX) {
                continue;
            }
            let path = entry.path();
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::warn!(
                    path = %path.display(),
                    bytes,
                    "removed a stale spool file that an interrupted restore left (the agent \
                     was killed mid-restore)"
                ),
                Err(error) => tracing::warn!(
                    path = %path.display(),
                    %error,
                    "cannot remove a stale spool file that an interrupted restore left; remove \
                     it by hand"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn uid() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    #[test]
    fn a_missing_spool_dir_is_created_private() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("a/spool");
        ensure_private(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Again: it exists and is fine.
        ensure_private(&dir).unwrap();
    }

    #[test]
    fn a_spool_dir_others_can_enter_or_replace_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ensure_private(&dir).unwrap_err();
        assert!(
            error.contains("has mode 0777")
                && error.contains("spool_dir")
                && error.contains("chmod 0700"),
            "{error}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = check_private(&dir, uid() + 1).unwrap_err();
        assert!(error.contains("not by this agent's user"), "{error}");

        let link = top.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let error = ensure_private(&link).unwrap_err();
        assert!(error.contains("is a symbolic link"), "{error}");

        // A world-writable parent without the sticky bit.
        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ensure_private(&open.join("spool")).unwrap_err();
        assert!(error.contains("other users can write to"), "{error}");
        // Sticky, like /var/tmp: fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_private(&open.join("spool")).unwrap();
    }

    #[test]
    fn the_lock_removes_leftovers_and_keeps_a_second_agent_out() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("spool");
        ensure_private(&dir).unwrap();
        std::fs::write(dir.join("cairn-restore-0badc0de.dump"), b"plaintext").unwrap();
        std::fs::write(dir.join("cairn-restore-0badc0de.list"), b"1;").unwrap();
        std::fs::write(dir.join("not-ours"), b"x").unwrap();
        let lock = SpoolLock::acquire(&dir).unwrap();
        assert!(!dir.join("cairn-restore-0badc0de.dump").exists());
        assert!(!dir.join("cairn-restore-0badc0de.list").exists());
        assert!(dir.join("not-ours").exists());
        let error = SpoolLock::acquire(&dir).unwrap_err();
        assert!(error.contains("in use by another running agent"), "{error}");
        drop(lock);
        SpoolLock::acquire(&dir).unwrap();
    }
}
