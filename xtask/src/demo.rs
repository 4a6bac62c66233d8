//! `cargo xtask demo`: a whole fleet on this machine in a few seconds, for a
//! first look. It builds the binaries, starts a throwaway PostgreSQL with
//! sample data, a coordinator and one agent (with the same fixtures the
//! integration tests use), and then runs the operator commands an operator
//! would type, each under a heading with the exact command line: the fleet
//! and a probe, then a backup, a restore under another name, a check of
//! every chunk and a restore drill.
//!
//! Without `--keep` it stops everything and removes its directory at the
//! end, also on error and on Ctrl-C. With `--keep` it leaves everything
//! running and prints how to reach and stop it.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail};
use cairn_integration_tests::{
    AgentOptions, Coordinator, CoordinatorOptions, PgCluster, TestDir, binaries, pg, process,
    run as run_command,
};

use crate::cargo;
use crate::interrupt::Interrupts;

/// The agent of the demo, named after its database host.
const AGENT_NAME: &str = "shop-db-1";

/// A small table of our own next to pgbench's, so a restore has something
/// recognisable to show.
const CUSTOMERS_SQL: &str = "\
CREATE TABLE customers (
    id integer PRIMARY KEY,
    name text NOT NULL,
    city text NOT NULL,
    joined date NOT NULL
);
INSERT INTO customers
SELECT n,
       'customer ' || n,
       (ARRAY['Lisbon', 'Oslo', 'Quito', 'Nairobi', 'Hanoi'])[1 + n % 5],
       date '2024-01-01' + n
FROM generate_series(1, 500) AS n;
";

/// The operator commands shown, in order.
const COMMANDS: [&[&str]; 4] = [
    &["agents", "list"],
    &["probe", AGENT_NAME],
    &["agents", "show", AGENT_NAME],
    &["audit", "list"],
];

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let keep = match args {
        [] => false,
        [flag] if flag == "--keep" => true,
        _ => bail!("usage: cargo xtask demo [--keep]"),
    };

    let build = cargo::build_bins()?;
    anyhow::ensure!(
        build.success(),
        "`cargo build --workspace --bins` failed ({build})"
    );

    // From here on a Ctrl-C reaches only this process, which then stops the
    // fleet in order; the fleet's processes get process groups of their own.
    process::set_new_process_groups(true);
    let interrupts = Interrupts::install()?;
    let test_dir = TestDir::new("demo");
    let directory = test_dir.path().to_path_buf();

    let outcome =
        std::panic::catch_unwind(AssertUnwindSafe(|| run_fleet(&test_dir, &interrupts, keep)));
    match outcome {
        Ok(Ok(Kept::Yes)) => {
            test_dir.keep();
            Ok(ExitCode::SUCCESS)
        }
        Ok(Ok(Kept::No)) => {
            drop(test_dir);
            println!("\nStopped everything and removed {}.", directory.display());
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(error)) => {
            drop(test_dir);
            eprintln!("\nStopped everything and removed {}.", directory.display());
            Err(error)
        }
        Err(_panic) => {
            // The fixture's message and the ends of the process logs were
            // printed while unwinding.
            let kept =
                std::env::var_os(cairn_integration_tests::testdir::KEEP_TEST_DIRS_ENV).is_some();
            drop(test_dir);
            if !kept {
                eprintln!(
                    "\nThe demo failed (see above). Everything was stopped and {} removed; run \
                     with {}=1 to keep its logs.",
                    directory.display(),
                    cairn_integration_tests::testdir::KEEP_TEST_DIRS_ENV
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

enum Kept {
    Yes,
    No,
}

fn run_fleet(test_dir: &TestDir, interrupts: &Interrupts, keep: bool) -> anyhow::Result<Kept> {
    step("Starting PostgreSQL with a database `shop` (pgbench tables and `customers`)");
    let postgres = PgCluster::builder()
        .in_test_dir(test_dir)
        .name("shop-db")
        .start();
    interrupts.check()?;
    postgres.create_database("shop");
    run_command(
        postgres
            .pg_command("pgbench")
            .args(["-i", "-s", "1", "-q", "shop"]),
    )
    .assert_success();
    postgres.psql("shop", CUSTOMERS_SQL);
    interrupts.check()?;

    step("Starting the coordinator (cairn init, cairn serve)");
    let mut coordinator = Coordinator::start_with(test_dir, CoordinatorOptions::default());
    interrupts.check()?;

    step(&format!(
        "Enrolling the agent {AGENT_NAME} (cairn token create, cairn-agent enroll, cairn-agent run)"
    ));
    let mut agent = coordinator.enroll_agent(
        AGENT_NAME,
        &postgres,
        AgentOptions::default()
            .label("env", "demo")
            .label("app", "shop")
            .allow("backup")
            .allow("restore"),
    );
    interrupts.check()?;

    println!("\nThe commands below run with:");
    print_exports(&coordinator);
    let mut failed = Vec::new();
    for args in COMMANDS {
        interrupts.check()?;
        println!("\n$ cairn {}", args.join(" "));
        let status = Command::new(&binaries().cairn)
            .args(args)
            .envs(coordinator.cli_env())
            .stdin(Stdio::null())
            .status()
            .context("run cairn")?;
        if !status.success() {
            println!("({status})");
            failed.push(format!("cairn {}", args.join(" ")));
        }
    }

    // A backup, then what proves it: a restore under another name, a check
    // of every chunk, and a restore drill.
    interrupts.check()?;
    let backed_up = demo_cli(
        &coordinator,
        &[
            "backup",
            "run",
            "--agent",
            AGENT_NAME,
            "--database",
            "shop",
            "--wait",
        ],
    );
    let listed = coordinator.cli_json(&["backups", "list"]);
    match (backed_up, listed[0]["id"].as_str()) {
        (Some(_), Some(backup_id)) => {
            for args in [
                vec!["backups", "list"],
                vec![
                    "restore",
                    backup_id,
                    "--agent",
                    AGENT_NAME,
                    "--database",
                    "shop_restored",
                    "--wait",
                ],
                vec!["backup", "verify", backup_id],
                vec!["backup", "verify", backup_id, "--restore-on", AGENT_NAME],
                vec!["backups", "list"],
            ] {
                interrupts.check()?;
                if demo_cli(&coordinator, &args).is_none() {
                    failed.push(format!("cairn {}", args.join(" ")));
                }
            }
        }
        _ => failed.push("cairn backup run".to_string()),
    }

    if keep {
        print_kept(test_dir.path(), &coordinator, &agent, &postgres);
        agent.keep_running();
        coordinator.keep_running();
        postgres.keep_running();
        return Ok(Kept::Yes);
    }

    step("Stopping the agent, the coordinator and PostgreSQL");
    agent.stop();
    coordinator.stop();
    drop(postgres);
    if !failed.is_empty() {
        bail!("these commands failed: {}", failed.join(", "));
    }
    Ok(Kept::No)
}

/// Runs `cairn ARGS` as the demo's admin, showing the command and its
/// output; its stdout when it succeeds.
fn demo_cli(coordinator: &Coordinator, args: &[&str]) -> Option<String> {
    println!("\n$ cairn {}", args.join(" "));
    let output = Command::new(&binaries().cairn)
        .args(args)
        .envs(coordinator.cli_env())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    print!("{stdout}");
    if output.status.success() {
        Some(stdout)
    } else {
        println!("({})", output.status);
        None
    }
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn print_exports(coordinator: &Coordinator) {
    println!("  export PATH={}:$PATH", binaries().dir.display());
    for (key, value) in coordinator.cli_env() {
        println!("  export {key}={value}");
    }
}

fn print_kept(
    directory: &Path,
    coordinator: &Coordinator,
    agent: &cairn_integration_tests::Agent,
    postgres: &PgCluster,
) {
    let coordinator_pid = coordinator.process().pid();
    let agent_pid = agent.process().pid();
    let postgres_pid = postgres
        .postmaster_pid()
        .map_or_else(|| "?".to_string(), |pid| pid.to_string());
    let pg_ctl = pg::pg_binary("pg_ctl");
    let as_postgres = if cairn_integration_tests::privileges::is_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };

    println!("\nEverything keeps running (--keep). To use the CLI, export:");
    print_exports(coordinator);
    println!("\nProcesses:");
    println!(
        "  coordinator        pid {coordinator_pid:<8} home {}  log {}",
        coordinator.home().display(),
        coordinator.process().log_path().display()
    );
    println!(
        "  agent {AGENT_NAME:<12} pid {agent_pid:<8} dir {}  log {}",
        agent.dir().display(),
        agent.process().log_path().display()
    );
    println!(
        "  postgres           pid {postgres_pid:<8} data {}  log {}",
        postgres.data_dir().display(),
        postgres.log_path().display()
    );
    println!(
        "  psql:  {as_postgres}{} \"{}\"",
        pg::pg_binary("psql").display(),
        postgres.connstring_for("shop")
    );
    println!("\nTo stop everything and clean up:");
    println!("  kill {agent_pid} {coordinator_pid}");
    println!(
        "  {as_postgres}{} stop -D {}",
        pg_ctl.display(),
        postgres.data_dir().display()
    );
    println!(
        "  rm -rf {} {}",
        directory.display(),
        postgres.socket_dir().display()
    );
}
