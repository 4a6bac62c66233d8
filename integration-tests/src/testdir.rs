//! One directory per test under `/tmp`, holding everything the test's
//! processes write: coordinator and agent homes, PostgreSQL data
//! directories, and `logs/` with one log file per process.
//!
//! The directory is mode 0755 so that processes running as `postgres` can
//! traverse it. It is removed when the test passes and kept (with its path
//! printed) when the test panics, or always when `CAIRN_KEEP_TEST_DIRS` is
//! set, so a failure can be read after the fact.

use std::path::{Path, PathBuf};

use crate::privileges;

/// Environment variable that keeps every test directory, passed or failed.
pub const KEEP_TEST_DIRS_ENV: &str = "CAIRN_KEEP_TEST_DIRS";

/// The directory of one test. Declare it first in a test, so that it is
/// dropped last, after the processes writing into it have stopped.
#[derive(Debug)]
pub struct TestDir {
    name: String,
    path: PathBuf,
    kept: bool,
}

impl TestDir {
    /// Creates `/tmp/cairn-<test_name>-XXXXXX/` with an empty `logs/`.
    pub fn new(test_name: &str) -> TestDir {
        let name: String = test_name
            .rsplit("::")
            .next()
            .unwrap_or(test_name)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let path = tempfile::Builder::new()
            .prefix(&format!("cairn-{name}-"))
            .tempdir_in("/tmp")
            .expect("create a test directory under /tmp")
            .keep();
        privileges::create_dir_world_readable(&path);
        privileges::create_dir_world_readable(&path.join("logs"));
        TestDir {
            name,
            path,
            kept: false,
        }
    }

    /// The test name this directory was made for (sanitised).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `logs/`, where every process of the test appends its output.
    pub fn logs_dir(&self) -> PathBuf {
        self.path.join("logs")
    }

    /// `logs/<name>.log`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.log"))
    }

    /// `<test dir>/<name>/`, created with mode 0755 and owned by the test
    /// process's user.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        privileges::create_dir_world_readable(&path);
        path
    }

    /// `<test dir>/<name>/`, created with mode 0755 and owned by `postgres`
    /// when the tests run as root, so PostgreSQL tools and agents can create
    /// their directories in it.
    pub fn postgres_subdir(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        privileges::create_dir_for_postgres(&path);
        path
    }

    /// Disarms the removal and returns the path: the directory outlives the
    /// test process (used by `cargo xtask demo --keep`).
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.path.clone()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if std::thread::panicking() || std::env::var_os(KEEP_TEST_DIRS_ENV).is_some() {
            eprintln!(
                "keeping the test directory {} (logs in logs/)",
                self.path.display()
            );
            return;
        }
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!(
                "could not remove the test directory {}: {error}",
                self.path.display()
            );
        }
    }
}
