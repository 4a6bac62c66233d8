//! Running things as the `postgres` OS user when the tests run as root.
//!
//! CI runs the tests as root, but `initdb` and `postgres` refuse to run as
//! root, and the agent must run as the user that owns the data directory (as
//! the units in `deploy/` set it up). So when the effective user is root,
//! every PostgreSQL command and every agent is started with the uid and gid
//! of `postgres` (through `CommandExt::{uid, gid}`, which also drops root's
//! supplementary groups), and the directories they write are chowned to it.
//! When the tests run as an ordinary user, everything runs as that user and
//! these functions change nothing.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::unistd::{Gid, Uid, User};

/// The OS user that PostgreSQL and the agents run as when the tests run as
/// root.
#[derive(Debug, Clone)]
pub struct OsUser {
    /// Login name, `postgres`.
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Home directory from the password database.
    pub home: PathBuf,
}

/// Whether the test process runs as root (and so must drop privileges for
/// PostgreSQL and agents).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The `postgres` OS user when running as root, `None` otherwise. Panics
/// with the fix when running as root and the user does not exist.
pub fn postgres_user() -> Option<&'static OsUser> {
    static USER: OnceLock<Option<OsUser>> = OnceLock::new();
    USER.get_or_init(|| {
        if !is_root() {
            return None;
        }
        let user = User::from_name("postgres")
            .expect("looking up the `postgres` OS user in the password database")
            .expect(
                "the tests run as root, and PostgreSQL refuses root, so they need a `postgres` \
                 OS user: install PostgreSQL (apt-get install postgresql-15), which creates it",
            );
        Some(OsUser {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home: user.dir,
        })
    })
    .as_ref()
}

/// Makes `command` run as `postgres` when the tests run as root, with `HOME`,
/// `USER` and `LOGNAME` to match. Call it after any `env_clear()`, which
/// would erase those variables. Does nothing when not root.
pub fn run_as_postgres(command: &mut Command) -> &mut Command {
    if let Some(user) = postgres_user() {
        command
            .uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    command
}

/// Gives `path` to `postgres` when the tests run as root. Not recursive.
pub fn chown_to_postgres(path: &Path) {
    if let Some(user) = postgres_user() {
        nix::unistd::chown(path, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

/// Creates the directory `path` (and missing parents) with mode 0755 and
/// gives it to `postgres` when the tests run as root, so a process running
/// as `postgres` can create files in it.
pub fn create_dir_for_postgres(path: &Path) {
    create_dir_world_readable(path);
    chown_to_postgres(path);
}

/// Creates the directory `path` (and missing parents) with mode 0755, so a
/// process running as `postgres` can traverse and read it.
pub fn create_dir_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)
        .unwrap_or_else(|e| panic!("create directory {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", path.display()));
}
