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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let context = |what: &str| format!("{what} {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(|e| Error::io(context("cannot create"), e))?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(context("cannot write"), error));
    }
    if let Ok(directory) = std::fs::File::open(dir) {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// A directory built under a hidden sibling name and renamed into place by
/// [`StagedDirectory::commit`], so that a failure part-way leaves nothing
/// that looks like a finished directory. Dropped without a commit, the
/// staging directory is removed.
#[derive(Debug)]
pub struct StagedDirectory {
    staging: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDirectory {
    /// Refuses a `target` that exists and is not empty; `flag` names the
    /// option that chose it, for the error.
    pub fn new(target: &Path, flag: &str) -> Result<StagedDirectory, Error> {
        use std::os::unix::fs::DirBuilderExt;
        if target.exists() {
            let empty = std::fs::read_dir(target)
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(Error::invalid(
                    flag,
                    format!(
                        "{} already exists and is not empty: nothing is ever overwritten; choose another {flag}",
                        target.display()
                    ),
                ));
            }
        }
        let parent = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| Error::invalid(flag, "has no final path component"))?
            .to_string_lossy()
            .into_owned();
        std::fs::create_dir_all(&parent)
            .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
        let staging = parent.join(format!(".{name}.staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| Error::io(format!("cannot create {}", staging.display()), e))?;
        Ok(StagedDirectory {
            staging,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write the contents.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Renames the staging directory to the target.
    pub fn commit(mut self) -> Result<PathBuf, Error> {
        if self.target.exists() {
            std::fs::remove_dir(&self.target).map_err(|e| {
                Error::io(format!("cannot replace empty {}", self.target.display()), e)
            })?;
        }
        std::fs::rename(&self.staging, &self.target).map_err(|e| {
            Error::io(
                format!("cannot move the new directory to {}", self.target.display()),
                e,
            )
        })?;
        self.committed = true;
        if let Some(parent) = self.target.parent()
            && let Ok(directory) = std::fs::File::open(parent)
        {
            let _ = directory.sync_all();
        }
        Ok(self.target.clone())
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
            error.contains("--dir") && error.contains("not empty"),
            "{error}"
        );
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
}
