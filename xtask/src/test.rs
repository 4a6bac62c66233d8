//! `cargo xtask test`: build the real binaries the integration tests run,
//! then the whole test suite with cargo-nextest.

use std::process::{ExitCode, ExitStatus, Stdio};

use anyhow::Context;

use crate::cargo;

pub fn run(extra_args: &[String]) -> anyhow::Result<ExitCode> {
    ensure_nextest()?;
    let build = cargo::build_bins()?;
    if !build.success() {
        return Ok(exit_code(build));
    }
    let mut args = vec!["nextest".to_string(), "run".into(), "--workspace".into()];
    args.extend(extra_args.iter().cloned());
    eprintln!("$ cargo {}", args.join(" "));
    Ok(exit_code(cargo::status(&args)?))
}

/// Installs cargo-nextest when `cargo nextest` is not available.
fn ensure_nextest() -> anyhow::Result<()> {
    let present = cargo::command(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if present {
        return Ok(());
    }
    eprintln!(
        "cargo-nextest is not installed; installing it with `cargo install cargo-nextest --locked`"
    );
    let install = cargo::status(["install", "cargo-nextest", "--locked"])?;
    anyhow::ensure!(
        install.success(),
        "`cargo install cargo-nextest --locked` failed ({install})"
    );
    let works = cargo::command(["nextest", "--version"])
        .stdout(Stdio::null())
        .status()
        .context("run `cargo nextest --version`")?;
    anyhow::ensure!(
        works.success(),
        "cargo-nextest was installed but `cargo nextest` does not run"
    );
    Ok(())
}

/// The child's exit code as ours; a child killed by a signal counts as 1
/// (after the shell convention 128 + signal when it fits).
fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}
