//! Loading configuration files: TOML, unknown keys refused, and every error
//! naming the file and the key path (`fleet.heartbeat_interval`), so that an
//! operator can fix it without guessing. Each binary owns its config struct
//! and its `validate()`.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::Error;

/// Reads and parses `path` into `T`. `T` should be
/// `#[serde(deny_unknown_fields)]` at every level.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        message: format!("cannot read the config file: {e}"),
    })?;
    parse_toml(&text, path)
}

/// A duration as an operator wrote it, in its largest whole unit: `100d`,
/// `36h`, `90m`, `45s` (`1500ms` below a second). humantime's own
/// formatting counts in 30.44-day months, so 365 days would be echoed as
/// "11months 30days 3h 50m 24s"; this reads back as the same duration.
pub fn display_duration(duration: std::time::Duration) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    if duration.subsec_nanos() != 0 || duration.is_zero() {
        return format!("{}ms", duration.as_millis());
    }
    let seconds = duration.as_secs();
    let (size, unit) = UNITS
        .into_iter()
        .find(|(size, _)| seconds.is_multiple_of(*size))
        .unwrap_or((1, "s"));
    format!("{}{unit}", seconds / size)
}

/// Parses TOML text; `path` only names the source in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, Error> {
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        message: format!("not valid TOML: {}", e.message()),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let message = e.inner().message().to_string();
        Error::Config {
            file: path.to_path_buf(),
            message: if key == "." {
                message
            } else {
                format!("key `{key}`: {message}")
            },
        }
    })
}

/// Resolves a path from a config file against the file's own directory, so
/// a home directory can be moved as a whole.
pub fn resolve(config_file: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    config_file
        .parent()
        .map(|dir| dir.join(path))
        .unwrap_or_else(|| path.to_path_buf())
}

/// Writes a file atomically with the given mode: a temporary name in the same
/// directory, fsync, rename, fsync of the directory. Nothing half-written is
/// ever visible under `path`.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let temporary = write_temporary(path, contents, mode)?;
    if let Err(error) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(format!("cannot write {}", path.display()), error));
    }
    sync_parent(path);
    Ok(())
}

/// Writes a file that must not exist yet, whole or not at all: the content
/// goes to a temporary name first and is then hard-linked into place, which
/// fails if `path` exists (no rename could refuse that), so an existing
/// file is never overwritten and a crash never leaves half a file.
pub fn write_new_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let temporary = write_temporary(path, contents, mode)?;
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {
            sync_parent(path);
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::io(
            format!(
                "{} already exists: nothing is ever overwritten; choose another file",
                path.display()
            ),
            error,
        )),
        Err(error) => Err(Error::io(format!("cannot write {}", path.display()), error)),
    }
}

/// The content, fsynced, under a temporary name beside `path`. The name is
/// random, not the pid: a temporary left by a crash must not block a later
/// write by a process that got the same pid (in a container, always 1).
fn write_temporary(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = hex::encode(crate::pki::random_bytes(8)?);
    let temporary = dir.join(format!(".{file_name}.tmp-{unique}"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(format!("cannot write {}", path.display()), error));
    }
    Ok(temporary)
}

/// Makes a rename or link in `path`'s directory durable.
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Ok(directory) = std::fs::File::open(dir) {
        let _ = directory.sync_all();
    }
}

/// The hidden sibling a replacement of `dir` is staged in.
fn replacement_staging(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dir".into());
    dir.with_file_name(format!(".{name}.replacing"))
}

/// Removes what an interrupted [`replace_directory_files`] left beside
/// `dir` (either the new files never switched to, or the old ones switched
/// away from); `dir` itself is always whole. True if there was something.
pub fn clean_up_replacement(dir: &Path) -> Result<bool, Error> {
    let staging = replacement_staging(dir);
    match std::fs::remove_dir_all(&staging) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(Error::io(
            format!("cannot remove {}", staging.display()),
            error,
        )),
    }
}

/// Replaces files of the existing directory `dir` together: a copy of the
/// directory with `files` (name, contents, mode) written over it is built
/// in a hidden sibling, then exchanged with `dir` in one
/// `renameat2(RENAME_EXCHANGE)`, then the old copy is removed. A crash
/// leaves `dir` wholly old or wholly new, never a mix (a key of one
/// certificate beside another certificate). Linux only, like Cairn.
pub fn replace_directory_files(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    clean_up_replacement(dir)?;
    // Only a real directory of plain files is exchanged: a symbolic link
    // would be replaced by a directory (its target left stale), and
    // anything but files would be lost with the old directory.
    let link = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
    if !link.is_dir() {
        return Err(Error::invalid(
            dir.display().to_string(),
            "must be a directory, not a symbolic link, for its files to be replaced together",
        ));
    }
    let staging = replacement_staging(dir);
    let mode = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?
        .permissions()
        .mode();
    std::fs::DirBuilder::new()
        .mode(mode & 0o777)
        .create(&staging)
        .map_err(|e| Error::io(format!("cannot create {}", staging.display()), e))?;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
        let name = entry.file_name();
        let kind = entry
            .file_type()
            .map_err(|e| Error::io(format!("cannot read {}", entry.path().display()), e))?;
        if !kind.is_file() {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(Error::invalid(
                entry.path().display().to_string(),
                "only files may sit in a directory whose files are replaced together: move it elsewhere",
            ));
        }
        if files.iter().any(|(file, _, _)| name == *file) {
            continue;
        }
        let contents = std::fs::read(entry.path())
            .map_err(|e| Error::io(format!("cannot read {}", entry.path().display()), e))?;
        let mode = entry
            .metadata()
            .map_err(|e| Error::io(format!("cannot read {}", entry.path().display()), e))?
            .permissions()
            .mode();
        write_file_atomic(&staging.join(&name), &contents, mode & 0o777)?;
    }
    for (name, contents, mode) in files {
        write_file_atomic(&staging.join(name), contents, *mode)?;
    }
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &staging,
        rustix::fs::CWD,
        dir,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(|e| {
        Error::io(
            format!(
                "cannot exchange {} with {}",
                staging.display(),
                dir.display()
            ),
            e.into(),
        )
    })?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Ok(directory) = std::fs::File::open(parent.unwrap_or_else(|| Path::new("."))) {
        let _ = directory.sync_all();
    }
    // The staging name now holds the old files.
    clean_up_replacement(dir)?;
    Ok(())
}

/// A directory built under a hidden staging name and moved into place by
/// [`StagedDirectory::commit`], so that a failure part-way leaves nothing
/// that looks like a finished directory. Dropped without a commit, the
/// staging directory is removed.
///
/// A new target is staged as a hidden sibling and renamed whole. An
/// existing empty target (say `/var/lib/postgresql/cairn-agent`, made by
/// root for `postgres` in a parent only root may write) is staged inside
/// itself, and the commit moves the entries in: directories first, files
/// last, so the config file that makes it look finished appears last.
#[derive(Debug)]
pub struct StagedDirectory {
    staging: PathBuf,
    target: PathBuf,
    /// The target existed (empty): commit moves entries into it.
    in_place: bool,
    committed: bool,
}

impl StagedDirectory {
    /// Refuses a `target` that exists and is not an empty directory; `flag`
    /// names the option that chose it, for the error.
    pub fn new(target: &Path, flag: &str) -> Result<StagedDirectory, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let in_place = target.exists();
        if in_place {
            let empty = std::fs::read_dir(target)
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(Error::invalid(
                    flag,
                    format!(
                        "{} already exists and is not an empty directory: nothing is ever overwritten; choose another {flag}",
                        target.display()
                    ),
                ));
            }
        }
        let name = target
            .file_name()
            .ok_or_else(|| Error::invalid(flag, "has no final path component"))?
            .to_string_lossy()
            .into_owned();
        let staging = if in_place {
            target.join(format!(".staging-{}", std::process::id()))
        } else {
            let parent = match target.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            };
            std::fs::create_dir_all(&parent)
                .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
            parent.join(format!(".{name}.staging-{}", std::process::id()))
        };
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| Error::io(format!("cannot create {}", staging.display()), e))?;
        Ok(StagedDirectory {
            staging,
            target: target.to_path_buf(),
            in_place,
            committed: false,
        })
    }

    /// Where to write the contents.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the staged contents to the target.
    pub fn commit(mut self) -> Result<PathBuf, Error> {
        if self.in_place {
            self.move_entries_in()?;
        } else {
            std::fs::rename(&self.staging, &self.target).map_err(|e| {
                Error::io(
                    format!("cannot move the new directory to {}", self.target.display()),
                    e,
                )
            })?;
        }
        self.committed = true;
        let synced = if self.in_place {
            Some(self.target.as_path())
        } else {
            self.target.parent()
        };
        if let Some(directory) = synced
            && let Ok(directory) = std::fs::File::open(directory)
        {
            let _ = directory.sync_all();
        }
        Ok(self.target.clone())
    }

    /// Renames each staged entry into the existing target (directories
    /// first), then removes the empty staging directory.
    fn move_entries_in(&self) -> Result<(), Error> {
        let read_error = |e| Error::io(format!("cannot read {}", self.staging.display()), e);
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.staging).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let is_dir = entry.file_type().map_err(read_error)?.is_dir();
            entries.push((!is_dir, entry.file_name()));
        }
        entries.sort();
        for (_, name) in entries {
            std::fs::rename(self.staging.join(&name), self.target.join(&name)).map_err(|e| {
                Error::io(
                    format!(
                        "cannot move {} into {}",
                        name.to_string_lossy(),
                        self.target.display()
                    ),
                    e,
                )
            })?;
        }
        std::fs::remove_dir(&self.staging)
            .map_err(|e| Error::io(format!("cannot remove {}", self.staging.display()), e))
    }
}

impl Drop for StagedDirectory {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_in_whole_units_and_read_back() {
        use std::time::Duration;
        for (duration, shown) in [
            (Duration::from_secs(365 * 86_400), "365d"),
            (Duration::from_secs(100 * 86_400), "100d"),
            (Duration::from_secs(36 * 3_600), "36h"),
            (Duration::from_secs(90 * 60), "90m"),
            (Duration::from_secs(61), "61s"),
            (Duration::from_millis(1_500), "1500ms"),
        ] {
            assert_eq!(display_duration(duration), shown);
            assert_eq!(humantime::parse_duration(shown).unwrap(), duration);
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    fn check(text: &str, expected_error: &str) {
        let error = parse_toml::<Outer>(text, Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("/etc/x.toml: "), "{error}");
        assert!(
            error.contains(expected_error),
            "{error} lacks {expected_error}"
        );
    }

    #[test]
    fn errors_name_the_file_and_key_path() {
        check(
            "name = \"a\"\n[inner]\nport = 1\nextra = 2\n",
            "key `inner.extra`: unknown field `extra`",
        );
        check("name = \"a\"\n[inner]\nport = \"x\"\n", "key `inner.port`");
        check("name = \"a\"\n", "missing field `inner`");
        check("name = \n", "not valid TOML");
    }

    #[test]
    fn staged_directories_appear_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("home");
        {
            let staged = StagedDirectory::new(&target, "--dir").unwrap();
            std::fs::write(staged.path().join("a"), b"1").unwrap();
            // Dropped without commit: nothing is left.
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let staged = StagedDirectory::new(&target, "--dir").unwrap();
        std::fs::write(staged.path().join("a"), b"1").unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");
        let error = StagedDirectory::new(&target, "--dir")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--dir") && error.contains("not an empty directory"),
            "{error}"
        );
    }

    #[test]
    fn an_existing_empty_directory_is_filled_from_inside() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("agent");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o750)).unwrap();
        {
            let staged = StagedDirectory::new(&target, "--dir").unwrap();
            assert!(
                staged.path().starts_with(&target),
                "staged inside the target"
            );
            std::fs::write(staged.path().join("a"), b"1").unwrap();
        }
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "left empty");
        let staged = StagedDirectory::new(&target, "--dir").unwrap();
        std::fs::create_dir(staged.path().join("identity")).unwrap();
        std::fs::write(staged.path().join("identity/key.pem"), b"k").unwrap();
        std::fs::write(staged.path().join("agent.toml"), b"t").unwrap();
        staged.commit().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["agent.toml", "identity"], "no staging left behind");
        assert_eq!(
            std::fs::read(target.join("identity/key.pem")).unwrap(),
            b"k"
        );
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750, "the existing directory itself is kept");
    }

    #[test]
    fn only_a_real_directory_of_files_has_its_files_replaced() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("identity");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), "old cert").unwrap();
        std::fs::create_dir(dir.join("spool")).unwrap();
        let files = [("cert.pem", b"new cert".as_slice(), 0o644)];
        let error = replace_directory_files(&dir, &files)
            .unwrap_err()
            .to_string();
        assert!(error.contains("spool"), "{error}");
        assert_eq!(std::fs::read(dir.join("cert.pem")).unwrap(), b"old cert");
        assert!(dir.join("spool").is_dir(), "a subdirectory was lost");
        assert!(!replacement_staging(&dir).exists());

        std::fs::remove_dir(dir.join("spool")).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let error = replace_directory_files(&link, &files)
            .unwrap_err()
            .to_string();
        assert!(error.contains("symbolic link"), "{error}");
        assert!(link.is_symlink());
    }

    #[test]
    fn directory_files_are_replaced_together() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("identity");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), "ca").unwrap();
        std::fs::write(dir.join("cert.pem"), "old cert").unwrap();
        std::fs::write(dir.join("key.pem"), "old key").unwrap();
        // What a replacement that crashed before the exchange leaves.
        std::fs::create_dir(replacement_staging(&dir)).unwrap();
        std::fs::write(replacement_staging(&dir).join("cert.pem"), "half").unwrap();

        replace_directory_files(
            &dir,
            &[
                ("cert.pem", b"new cert".as_slice(), 0o644),
                ("key.pem", b"new key".as_slice(), 0o600),
            ],
        )
        .unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(
            (read("ca.pem"), read("cert.pem"), read("key.pem")),
            ("ca".into(), "new cert".into(), "new key".into())
        );
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("identity")]);
    }

    #[test]
    fn atomic_write_sets_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        write_file_atomic(&path, b"k", 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(write_file_atomic(&path, b"again", 0o600).is_ok());
        assert_eq!(std::fs::read(&path).unwrap(), b"again");
    }

    #[test]
    fn a_temporary_left_by_a_crash_does_not_block_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        // What a crashed process with our pid would have left (in a
        // container the pid repeats on every start).
        let stale = dir
            .path()
            .join(format!(".master.key.tmp-{}", std::process::id()));
        std::fs::write(&stale, b"half").unwrap();
        write_file_atomic(&path, b"k", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"k");
        write_new_file_atomic(&dir.path().join("other.key"), b"o", 0o600).unwrap();
    }

    #[test]
    fn a_new_file_is_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recovery.key");
        write_new_file_atomic(&path, b"first", 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let error = write_new_file_atomic(&path, b"second", 0o600)
            .unwrap_err()
            .to_string();
        assert!(error.contains("already exists"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        // No temporary is left behind either way.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
