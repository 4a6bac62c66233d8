//! Finding the real `cairn` and `cairn-agent` binaries built by cargo, and
//! putting copies where the `postgres` user can execute them.
//!
//! The binaries come from `CAIRN_BIN_DIR` when set, else from the cargo
//! profile directory of the running executable (test executables live in
//! `<target>/<profile>/deps/`, binaries in `<target>/<profile>/`). The
//! target directory may sit under `/root` (mode 0700), where an agent
//! running as `postgres` cannot reach it, so both binaries are copied once
//! into `/tmp/cairn-bins-<hash>/` (mode 0755). The hash covers the source
//! paths, sizes and modification times, so a rebuild gets a fresh copy and
//! parallel test processes share one; the copy is made in a temporary
//! directory and renamed into place, so no process sees half a copy. Copies
//! no test process has used for an hour are removed when a new one is made.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment variable naming the directory that holds the binaries.
pub const BIN_DIR_ENV: &str = "CAIRN_BIN_DIR";

/// Paths of the binaries, executable by every user.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The coordinator and operator CLI.
    pub cairn: PathBuf,
    /// The agent.
    pub cairn_agent: PathBuf,
    /// The world-readable directory holding both copies.
    pub dir: PathBuf,
    /// Where cargo built them.
    pub source_dir: PathBuf,
}

const NAMES: [&str; 2] = ["cairn", "cairn-agent"];

/// The binaries, located and copied on first use in this process.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let source_dir = source_dir();
        let dir = world_readable_copy(&source_dir);
        Binaries {
            cairn: dir.join("cairn"),
            cairn_agent: dir.join("cairn-agent"),
            dir,
            source_dir,
        }
    })
}

/// The directory cargo built the binaries into; panics with the fix if a
/// binary is missing.
pub fn source_dir() -> PathBuf {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("find the path of the running executable");
            let parent = exe
                .parent()
                .expect("the running executable has a parent directory")
                .to_path_buf();
            if parent.file_name().is_some_and(|name| name == "deps") {
                parent
                    .parent()
                    .expect("the deps directory has a parent")
                    .to_path_buf()
            } else {
                parent
            }
        }
    };
    for name in NAMES {
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "the binary {} does not exist: run `cargo build --workspace --bins` first \
             (cargo xtask test does this), or set {BIN_DIR_ENV} to the directory holding \
             `cairn` and `cairn-agent`",
            path.display()
        );
    }
    dir
}

fn world_readable_copy(source_dir: &Path) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    for name in NAMES {
        let path = source_dir.join(name);
        let metadata =
            std::fs::metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        path.hash(&mut hasher);
        metadata.len().hash(&mut hasher);
        metadata
            .modified()
            .ok()
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .map(|since| since.as_nanos())
            .hash(&mut hasher);
    }
    let target = PathBuf::from(format!("/tmp/cairn-bins-{:016x}", hasher.finish()));
    if NAMES.iter().all(|name| target.join(name).is_file()) {
        mark_used(&target);
        return target;
    }

    let staging = tempfile::Builder::new()
        .prefix(".cairn-bins-staging-")
        .tempdir_in("/tmp")
        .expect("create a staging directory under /tmp for the binaries")
        .keep();
    for name in NAMES {
        let copy = staging.join(name);
        std::fs::copy(source_dir.join(name), &copy)
            .unwrap_or_else(|e| panic!("copy {name} into {}: {e}", staging.display()));
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", copy.display()));
    }
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", staging.display()));
    if let Err(error) = std::fs::rename(&staging, &target) {
        // Another test process won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&staging);
        assert!(
            NAMES.iter().all(|name| target.join(name).is_file()),
            "move the binaries into {}: {error}",
            target.display()
        );
    }
    mark_used(&target);
    remove_stale_copies(&target);
    target
}

/// How long a copy of older binaries is kept after a test process last
/// used it; a rebuild makes a new copy, so the old ones would pile up.
const STALE_COPY_AGE: Duration = Duration::from_secs(3600);

/// Sets the copy's modification time to now, so [`remove_stale_copies`]
/// leaves it alone while tests use it. Best effort.
fn mark_used(dir: &Path) {
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.set_modified(SystemTime::now());
    }
}

/// Removes other `/tmp/cairn-bins-*` copies unused for [`STALE_COPY_AGE`].
/// Best effort: a copy that cannot be removed stays.
fn remove_stale_copies(current: &Path) {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_copy = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with("cairn-bins-"));
        let stale = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > STALE_COPY_AGE);
        if is_copy && stale && path != current {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}
