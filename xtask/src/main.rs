//! `cargo xtask <command>`: the everyday commands of the workspace as plain
//! cargo, through the alias in `.cargo/config.toml`.
//!
//! - `test [ARGS]`: build the binaries, then `cargo nextest run --workspace
//!   ARGS` (installing cargo-nextest first if it is missing).
//! - `demo [--keep]`: a throwaway fleet of one coordinator, one agent and one
//!   PostgreSQL cluster, and the operator commands that look at it.
//! - `bench [--quick] [--engine]`: builds the release binaries and
//!   measures backups against plain pg_dump and restores against plain
//!   pg_restore (MB/s, CPU, memory, stored bytes, the targets), then the
//!   job engine's tick with one schedule over 10,000 targets.

mod bench;
mod cargo;
mod demo;
mod interrupt;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test [ARGS...]   build the binaries, then `cargo nextest run --workspace ARGS...`
  demo [--keep]    start PostgreSQL, a coordinator and an agent, and show the CLI;
                   --keep leaves them running and prints how to stop them
  bench [--quick] [--engine]
                   build the release binaries, then time pg_dump and cairn backups,
                   and pg_restore and cairn restores, of two throwaway databases,
                   and the job engine's tick over 10,000 schedule targets, and
                   check the performance targets; --quick uses tiny datasets,
                   --engine runs only the engine tick (see `cargo xtask bench --help`)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let outcome = match command.as_str() {
        "test" => test::run(rest),
        "demo" => demo::run(rest),
        "bench" => bench::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprint!("unknown command `{other}`\n\n{USAGE}");
            Ok(ExitCode::from(2))
        }
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
