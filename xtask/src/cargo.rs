//! Running cargo itself: the same cargo that runs xtask, in the workspace
//! root, with the caller's environment (so an existing `CARGO_TARGET_DIR` is
//! respected).

use std::path::PathBuf;
use std::process::{Command, ExitStatus};

use anyhow::Context;

/// The workspace root, one level above this crate.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// `cargo ARGS` in the workspace root, output to the terminal.
pub fn command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    // `cargo run` tells the program which cargo ran it.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(workspace_root());
    // `cargo run` gave xtask the variables of a running package
    // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...). Build scripts such as
    // ring's watch some of them, so passing them on would make every build
    // from here rebuild half the tree, and the next plain `cargo build`
    // rebuild it again.
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        let set_by_cargo_run = key_text.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&key_text.as_ref());
        if set_by_cargo_run {
            command.env_remove(&key);
        }
    }
    command
}

/// Runs `cargo ARGS` and returns its status.
pub fn status<I, S>(args: I) -> anyhow::Result<ExitStatus>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = command(args);
    command.status().with_context(|| format!("run {command:?}"))
}

/// `cargo build --workspace --bins`, failing when the build fails.
pub fn build_bins() -> anyhow::Result<ExitStatus> {
    eprintln!("$ cargo build --workspace --bins");
    status(["build", "--workspace", "--bins"])
}
