//! `cargo xtask bench [--quick]`: how fast a Cairn backup and a Cairn
//! restore are, against plain `pg_dump` and `pg_restore`, on this machine.
//!
//! It builds the release binaries (`cargo build --release --workspace
//! --bins`, which includes this xtask, so the in-process S3 server is
//! optimised too), then replaces itself with the release xtask
//! (`CAIRN_BIN_DIR=<target>/release`). For each of two datasets, each in a
//! throwaway `PgCluster` tuned for loading (`shared_buffers = 256MB`,
//! `max_wal_size = 4GB`, `autovacuum = off`; the fixture already sets
//! `fsync = off`):
//!
//! - `pgbench`: `pgbench -i -s SCALE` (`CAIRN_BENCH_PGBENCH_SCALE`, 64 ≈ 1 GB);
//! - `realistic`: about `CAIRN_BENCH_REALISTIC_MB` (300) MB of orders (one
//!   million rows or more: random words, tracking codes, numerics,
//!   timestamps, a little bytea) and customers, which zstd -1 compresses
//!   about 2.4x;
//!
//! it runs these cases, (s) to (d) interleaved `CAIRN_BENCH_RUNS` (3) times
//! and reports the median run:
//!
//! - (s) `pg_dump -Fc -Z0 > /dev/null`
//! - (a) `pg_dump -Fc -f FILE`
//! - (b) `pg_dump -Fc -Z0 | zstd -1 -T2 | openssl enc -aes-256-ctr ... > FILE`
//! - (c) `cairn backup run --wait` into the local repository
//! - (d) the same into S3 (the fixtures' s3s server on loopback)
//!
//! (c) and (d) get a fresh coordinator home, repository and agent for
//! every run, so every run uploads everything. Then, on the last (c) fleet:
//!
//! - (e) a second backup after appending 2% of the database to one table
//!   and updating 1,000 random rows of another;
//! - (f) one more after updating a random 1% of every table's rows.
//!
//! Then the restores ([`restore`]), into new databases of the same cluster,
//! of the database as (f) backed up, interleaved `CAIRN_BENCH_RUNS` times,
//! each checked (every table's row count, the index count) and dropped:
//!
//! - (g) `pg_restore -d DB FILE`, FILE from `pg_dump -Fc -Z0`
//! - (h) `openssl enc -d ... < FILE.enc | zstd -d | pg_restore -d DB`
//! - (i) `cairn restore BACKUP --database DB --wait` of (f)'s backup
//! - (j) `pg_restore -j 2 -d DB FILE`
//! - (k) `cairn restore BACKUP --database DB --jobs 2 --wait`
//!
//! Per case it prints wall time, MB/s (of `pg_database_size` for backups, of
//! FILE for restores), CPU seconds of the client processes (from
//! `/proc/PID/stat`; the coordinator's also per GB of dump) and of the
//! PostgreSQL server (the postmaster and its
//! children), peak RSS of agent and coordinator (`VmHWM`, reset through
//! `clear_refs` before each backup or restore), stored or uploaded bytes,
//! the ratios, and the targets with PASS/MISS.
//! `--quick` uses tiny sizes (scale 2, 30 MB) to check the bench itself.
//!
//! Last, a separate case without PostgreSQL ([`engine`]): the wall time of
//! the job engine's tick with one schedule over 10,000 targets (idle, at
//! the fire, and while the jobs wait), against the 50 ms target with
//! PASS/OVER. `--engine` runs only that case.
//!
//! Everything (clusters, coordinators, agents, the S3 server, files) lives
//! in one `/tmp/cairn-bench-*` directory that is removed at the end, also on
//! error and on Ctrl-C (`CAIRN_KEEP_TEST_DIRS=1` keeps it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use cairn_integration_tests::{
    Agent, AgentOptions, Coordinator, CoordinatorOptions, PgCluster, S3Server, TestDir, pg, process,
};
use serde_json::Value;

use crate::cargo;
use crate::interrupt::Interrupts;
use restore::Restores;

mod engine;
mod restore;

const USAGE: &str = "usage: cargo xtask bench [--quick] [--engine]

Per dataset, backups: (s) pg_dump -Fc -Z0 > /dev/null, (a) pg_dump -Fc,
(b) pg_dump -Z0 | zstd -1 | openssl enc, (c) cairn backup into a local and
(d) into an S3 repository, (e) (f) later backups after small changes; then
restores, each checked: (g) pg_restore -d from a file, (h) openssl enc -d |
zstd -d | pg_restore -d, (i) cairn restore, (j) pg_restore -j 2 from a file,
(k) cairn restore --jobs 2. Then, in process, the job engine's tick with one
schedule over 10,000 targets: before the fire, at the fire, and while the jobs
wait (target: under 50 ms each).

  --quick   tiny datasets (pgbench scale 2, 30 MB, 1,000 targets), to check the bench itself
  --engine  only the engine tick case (no PostgreSQL)

environment:
  CAIRN_BENCH_PGBENCH_SCALE   pgbench -i -s SCALE (default 64, about 1 GB)
  CAIRN_BENCH_REALISTIC_MB    size of the realistic dataset in MB (default 300)
  CAIRN_BENCH_RUNS            interleaved runs per case, median reported (default 3)
  CAIRN_BENCH_ENGINE_TARGETS  targets of the engine case's schedule (default 10000)
  CAIRN_BENCH_ENGINE_TICKS    ticks measured before and after the fire (default 20)
  CAIRN_KEEP_TEST_DIRS=1      keep the bench directory and its logs
";

/// Set on the release xtask this command re-executes, so it does not build
/// and re-execute again.
const BUILT_ENV: &str = "CAIRN_BENCH_BUILT";

/// The database every dataset lives in.
const DATABASE: &str = "bench";

/// Case (b)'s compression and encryption, after `pg_dump -Fc -Z0 |`.
const COMPRESS_ENCRYPT: &str = "zstd -q -1 -T2 | openssl enc -aes-256-ctr -pbkdf2 -pass pass:bench";

/// The S3 bucket of case (d).
const BUCKET: &str = "cairn-bench";

const MB: f64 = 1e6;
const MIB: f64 = 1024.0 * 1024.0;

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let (mut quick, mut engine_only) = (false, false);
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--engine" => engine_only = true,
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            _ => {
                eprint!("{USAGE}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    if std::env::var_os(BUILT_ENV).is_none() {
        return build_and_reexec(args);
    }
    let settings = Settings::from_env(quick, engine_only)?;

    // As in the demo: a Ctrl-C reaches only this process, which stops the
    // fleet and the clusters in order.
    process::set_new_process_groups(true);
    let interrupts = Interrupts::install()?;
    let test_dir = TestDir::new("bench");
    let directory = test_dir.path().to_path_buf();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        run_bench(&test_dir, &interrupts, &settings)
    }));
    let kept = std::env::var_os(cairn_integration_tests::testdir::KEEP_TEST_DIRS_ENV).is_some();
    drop(test_dir);
    let removed = if kept {
        format!("kept {}", directory.display())
    } else {
        format!("removed {}", directory.display())
    };
    match outcome {
        // Missed targets are results, not failures of the bench.
        Ok(Ok(())) => {
            println!("\nStopped everything and {removed}.");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(error)) => {
            eprintln!("\nStopped everything and {removed}.");
            Err(error)
        }
        Err(_panic) => {
            eprintln!(
                "\nThe bench failed (see above). Everything was stopped and {removed}; run with \
                 {}=1 to keep its logs.",
                cairn_integration_tests::testdir::KEEP_TEST_DIRS_ENV
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `cargo build --release --workspace --bins`, then `exec` of the release
/// xtask with `CAIRN_BIN_DIR` pointing at the release binaries.
fn build_and_reexec(args: &[String]) -> anyhow::Result<ExitCode> {
    eprintln!("$ cargo build --release --workspace --bins");
    let build = cargo::status(["build", "--release", "--workspace", "--bins"])?;
    ensure!(
        build.success(),
        "`cargo build --release --workspace --bins` failed ({build})"
    );
    // This xtask runs from <target>/<profile>/xtask.
    let exe = std::env::current_exe().context("find the running xtask")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("the xtask executable has no <target>/<profile> parent")?;
    let release = target.join("release");
    let xtask = release.join("xtask");
    ensure!(
        xtask.is_file(),
        "the release build left no {}",
        xtask.display()
    );
    eprintln!(
        "$ CAIRN_BIN_DIR={} {} bench {}",
        release.display(),
        xtask.display(),
        args.join(" ")
    );
    let error = Command::new(&xtask)
        .arg("bench")
        .args(args)
        .env(cairn_integration_tests::bins::BIN_DIR_ENV, &release)
        .env(BUILT_ENV, "1")
        .exec();
    Err(error).with_context(|| format!("execute {}", xtask.display()))
}

#[derive(Debug)]
struct Settings {
    quick: bool,
    /// `--engine`: only the engine tick case, no PostgreSQL.
    engine_only: bool,
    pgbench_scale: u32,
    realistic_mb: u32,
    runs: usize,
    clock_ticks: f64,
    zstd: Option<PathBuf>,
    openssl: Option<PathBuf>,
}

impl Settings {
    fn from_env(quick: bool, engine_only: bool) -> anyhow::Result<Settings> {
        let (scale, megabytes) = if quick { (2, 30) } else { (64, 300) };
        Ok(Settings {
            quick,
            engine_only,
            pgbench_scale: env_number("CAIRN_BENCH_PGBENCH_SCALE", scale)?,
            realistic_mb: env_number("CAIRN_BENCH_REALISTIC_MB", megabytes)?,
            runs: env_number("CAIRN_BENCH_RUNS", 3)?,
            clock_ticks: clock_ticks(),
            zstd: find_in_path("zstd"),
            openssl: find_in_path("openssl"),
        })
    }
}

fn env_number<T>(name: &str, default: T) -> anyhow::Result<T>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
{
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => match text.trim().parse::<T>() {
            Ok(value) if value >= T::from(1) => Ok(value),
            _ => bail!("{name}={text:?}: give a positive whole number"),
        },
    }
}

/// `getconf CLK_TCK`: the unit of the times in `/proc/PID/stat`.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

// ---------------------------------------------------------------------------
// The bench

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Stream,
    Gzip,
    Pipeline,
    Local,
    S3,
    Incremental,
    Scattered,
}

impl Case {
    const ALL: [Case; 7] = [
        Case::Stream,
        Case::Gzip,
        Case::Pipeline,
        Case::Local,
        Case::S3,
        Case::Incremental,
        Case::Scattered,
    ];

    fn letter(self) -> char {
        match self {
            Case::Stream => 's',
            Case::Gzip => 'a',
            Case::Pipeline => 'b',
            Case::Local => 'c',
            Case::S3 => 'd',
            Case::Incremental => 'e',
            Case::Scattered => 'f',
        }
    }

    fn label(self) -> &'static str {
        match self {
            Case::Stream => "pg_dump -Fc -Z0 > /dev/null",
            Case::Gzip => "pg_dump -Fc -f FILE",
            Case::Pipeline => "pg_dump -Z0 | zstd -1 -T2 | openssl",
            Case::Local => "cairn backup, local repository",
            Case::S3 => "cairn backup, S3 on loopback",
            Case::Incremental => "2nd backup: +2% rows, 1,000 updated",
            Case::Scattered => "next backup: 1% of rows updated",
        }
    }
}

/// One measured run of one case.
#[derive(Debug, Clone, Default)]
struct Sample {
    wall: f64,
    /// `pg_database_size` when the case ran.
    database_bytes: u64,
    client_cpu: f64,
    server_cpu: f64,
    agent_rss: Option<u64>,
    coordinator_rss: Option<u64>,
    /// Output file size, or the backup's `new_stored_bytes`.
    bytes: Option<u64>,
    /// The backup's `logical_bytes` (the pg_dump archive and the globals).
    logical_bytes: Option<u64>,
    /// How the client CPU divides.
    detail: String,
    /// The job's own duration by the coordinator's clock (the CLI's wall
    /// time adds up to 0.1 s: `--wait` polls the job every 100 ms).
    job_seconds: Option<f64>,
}

#[derive(Debug)]
enum Outcome {
    Measured(Vec<Sample>),
    Skipped(String),
}

impl Outcome {
    /// The run with the median wall time (the lower one of an even count).
    fn median(&self) -> Option<&Sample> {
        let Outcome::Measured(samples) = self else {
            return None;
        };
        let mut sorted: Vec<&Sample> = samples.iter().collect();
        sorted.sort_by(|a, b| a.wall.total_cmp(&b.wall));
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dataset {
    Pgbench,
    Realistic,
}

impl Dataset {
    fn name(self) -> &'static str {
        match self {
            Dataset::Pgbench => "pgbench",
            Dataset::Realistic => "realistic",
        }
    }
}

/// What one dataset's bench found.
struct DatasetReport {
    dataset: Dataset,
    description: String,
    database_bytes: u64,
    outcomes: BTreeMap<Case, Outcome>,
    /// The first backup of the (e)/(f) repository: what (e) and (f) are
    /// compared with.
    baseline_bytes: Option<u64>,
    /// (g) to (k).
    restores: Option<Restores>,
    notes: Vec<String>,
    targets: Vec<Target>,
}

struct Target {
    what: String,
    measured: String,
    passed: Option<bool>,
}

fn run_bench(
    test_dir: &TestDir,
    interrupts: &Interrupts,
    settings: &Settings,
) -> anyhow::Result<()> {
    print_machine(settings);
    let mut reports = Vec::new();
    if !settings.engine_only {
        let s3 = S3Server::start();
        s3.create_bucket(BUCKET);
        for dataset in [Dataset::Pgbench, Dataset::Realistic] {
            interrupts.check()?;
            let report = bench_dataset(test_dir, interrupts, settings, dataset, &s3)?;
            print_report(&report);
            reports.push(report);
        }
    }
    interrupts.check()?;
    let engine = engine::bench_engine(&test_dir.path().join("engine"), interrupts, settings.quick)?;
    engine.print();
    println!("\n==> Summary of the targets");
    for report in &reports {
        for target in &report.targets {
            println!(
                "  {:<10} {:<48} {:>22}  {}",
                report.dataset.name(),
                target.what,
                target.measured,
                verdict(target.passed)
            );
        }
    }
    for target in engine.targets() {
        println!(
            "  {:<10} {:<48} {:>22}  {}",
            "engine",
            target.what,
            target.measured,
            engine::verdict(target.passed)
        );
    }
    Ok(())
}

fn print_machine(settings: &Settings) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown".to_string(),
            |kib| format!("{:.1} GiB", kib / MIB),
        );
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version = |program: &Path, flag: &str| {
        Command::new(program)
            .arg(flag)
            .output()
            .ok()
            .and_then(|output| {
                let text = String::from_utf8_lossy(&output.stdout).into_owned()
                    + &String::from_utf8_lossy(&output.stderr);
                text.lines().next().map(|line| line.trim().to_string())
            })
            .unwrap_or_else(|| "?".to_string())
    };
    println!("==> Machine");
    println!("  nproc {nproc}, memory {memory}, CPU {cpu}");
    println!("  {}", version(&pg::pg_binary("pg_dump"), "--version"));
    for (name, path, flag) in [
        ("zstd", &settings.zstd, "--version"),
        ("openssl", &settings.openssl, "version"),
    ] {
        let package = name;
        match path {
            Some(path) => println!("  {name}: {}", version(path, flag)),
            None => println!(
                "  {name}: missing (apt-get install {package}); cases (b) and (h) are skipped"
            ),
        }
    }
    println!(
        "  binaries: release, {}={}",
        cairn_integration_tests::bins::BIN_DIR_ENV,
        cairn_integration_tests::binaries().source_dir.display()
    );
    println!(
        "  sizes: pgbench scale {}, realistic {} MB{}; {} interleaved run(s) per case, median shown",
        settings.pgbench_scale,
        settings.realistic_mb,
        if settings.quick { " (--quick)" } else { "" },
        settings.runs
    );
    println!(
        "  units: MB = 10^6 bytes, MiB = 2^20 bytes; CPU in seconds from /proc (clock tick 1/{})",
        settings.clock_ticks
    );
}

fn bench_dataset(
    test_dir: &TestDir,
    interrupts: &Interrupts,
    settings: &Settings,
    dataset: Dataset,
    s3: &S3Server,
) -> anyhow::Result<DatasetReport> {
    println!(
        "\n==> Dataset {}: a PostgreSQL cluster and its data",
        dataset.name()
    );
    let postgres = PgCluster::builder()
        .in_test_dir(test_dir)
        .name(dataset.name())
        .setting("shared_buffers", "256MB")
        .setting("max_wal_size", "4GB")
        .setting("autovacuum", "off")
        .start();
    postgres.create_database(DATABASE);
    let started = Instant::now();
    let description = match dataset {
        Dataset::Pgbench => load_pgbench(&postgres, settings.pgbench_scale)?,
        Dataset::Realistic => load_realistic(&postgres, settings.realistic_mb)?,
    };
    postgres.psql(DATABASE, "VACUUM (FREEZE, ANALYZE)");
    postgres.psql("postgres", "CHECKPOINT");
    let database_bytes = database_size(&postgres)?;
    println!(
        "  loaded in {:.0} s: {description}; pg_database_size {:.1} MB",
        started.elapsed().as_secs_f64(),
        database_bytes as f64 / MB
    );
    interrupts.check()?;

    let mut report = DatasetReport {
        dataset,
        description,
        database_bytes,
        outcomes: BTreeMap::new(),
        baseline_bytes: None,
        restores: None,
        notes: Vec::new(),
        targets: Vec::new(),
    };
    let mut samples: BTreeMap<Case, Vec<Sample>> = BTreeMap::new();
    let pipeline_skipped = match (&settings.zstd, &settings.openssl) {
        (Some(_), Some(_)) => None,
        (None, Some(_)) => Some("zstd is missing: apt-get install zstd".to_string()),
        (Some(_), None) => Some("openssl is missing: apt-get install openssl".to_string()),
        (None, None) => {
            Some("zstd and openssl are missing: apt-get install zstd openssl".to_string())
        }
    };
    let mut kept_fleet: Option<Fleet> = None;
    for run in 1..=settings.runs {
        println!("  run {run}/{}:", settings.runs);
        for case in [
            Case::Stream,
            Case::Gzip,
            Case::Pipeline,
            Case::Local,
            Case::S3,
        ] {
            interrupts.check()?;
            if case == Case::Pipeline && pipeline_skipped.is_some() {
                continue;
            }
            let sample = match case {
                Case::Stream | Case::Gzip | Case::Pipeline => {
                    pg_dump_case(test_dir, &postgres, settings, case)?
                }
                Case::Local => {
                    let name = format!("{}-c{run}", dataset.name());
                    let fleet = Fleet::local(test_dir, &postgres, &name)?;
                    let (sample, _) = fleet.measured_backup(&postgres, settings)?;
                    // The last local fleet stays for (e) and (f).
                    if run == settings.runs {
                        if let Some(previous) = kept_fleet.replace(fleet) {
                            previous.remove()?;
                        }
                    } else {
                        fleet.remove()?;
                    }
                    sample
                }
                Case::S3 => {
                    let name = format!("{}-d{run}", dataset.name());
                    let fleet = Fleet::s3(test_dir, &postgres, &name, s3);
                    let (sample, _) = fleet.measured_backup(&postgres, settings)?;
                    fleet.remove()?;
                    let prefix_dir = s3.data_dir().join(BUCKET).join(&name);
                    let _ = std::fs::remove_dir_all(prefix_dir);
                    sample
                }
                Case::Incremental | Case::Scattered => unreachable_case(case)?,
            };
            println!(
                "    ({}) {:<38} {:>8.2} s{}",
                case.letter(),
                case.label(),
                sample.wall,
                sample
                    .bytes
                    .map(|b| format!("  {:>10.1} MB", b as f64 / MB))
                    .unwrap_or_default()
            );
            samples.entry(case).or_default().push(sample);
        }
    }

    // (e) and (f) on the last local fleet, whose one backup is the baseline.
    let fleet = kept_fleet.context("no local fleet was kept for (e) and (f)")?;
    report.baseline_bytes = samples
        .get(&Case::Local)
        .and_then(|runs| runs.last())
        .and_then(|sample| sample.bytes);
    interrupts.check()?;
    let change = append_and_update(&postgres, dataset)?;
    report.notes.push(format!("(e) changes: {change}"));
    let (incremental, _) = fleet.measured_backup(&postgres, settings)?;
    println!(
        "    (e) {:<38} {:>8.2} s  {:>10.1} MB uploaded",
        Case::Incremental.label(),
        incremental.wall,
        incremental.bytes.unwrap_or(0) as f64 / MB
    );
    samples
        .entry(Case::Incremental)
        .or_default()
        .push(incremental);
    interrupts.check()?;
    let change = update_one_percent(&postgres, dataset)?;
    report.notes.push(format!("(f) changes: {change}"));
    let (scattered, last_backup) = fleet.measured_backup(&postgres, settings)?;
    println!(
        "    (f) {:<38} {:>8.2} s  {:>10.1} MB uploaded",
        Case::Scattered.label(),
        scattered.wall,
        scattered.bytes.unwrap_or(0) as f64 / MB
    );
    samples.entry(Case::Scattered).or_default().push(scattered);

    // (g) to (k): restores of the database as it is now, (f)'s backup.
    interrupts.check()?;
    report.restores = Some(restore::bench_restores(
        test_dir,
        interrupts,
        settings,
        &postgres,
        &fleet,
        &last_backup,
        pipeline_skipped.as_deref(),
    )?);
    fleet.remove()?;
    drop(postgres);

    for case in Case::ALL {
        let outcome = match (samples.remove(&case), case, &pipeline_skipped) {
            (_, Case::Pipeline, Some(reason)) => Outcome::Skipped(reason.clone()),
            (Some(runs), _, _) => Outcome::Measured(runs),
            (None, _, _) => Outcome::Skipped("not run".to_string()),
        };
        report.outcomes.insert(case, outcome);
    }
    report.targets = targets(&report);
    Ok(report)
}

fn unreachable_case(case: Case) -> anyhow::Result<Sample> {
    bail!(
        "case ({}) is not part of the interleaved runs",
        case.letter()
    )
}

// ---------------------------------------------------------------------------
// Datasets

fn load_pgbench(postgres: &PgCluster, scale: u32) -> anyhow::Result<String> {
    let output = process::run(postgres.pg_command("pgbench").args([
        "-i",
        "-s",
        &scale.to_string(),
        "-q",
        DATABASE,
    ]));
    ensure!(output.success(), "pgbench -i failed: {output}");
    Ok(format!(
        "pgbench -i -s {scale}, {} accounts",
        u64::from(scale) * 100_000
    ))
}

/// Words for the realistic text; drawn with a skew towards the first ones,
/// as word frequencies are.
const WORDS: &str = "time year people way day man thing woman life child world school state \
    family student group country problem hand part place case week company system program \
    question work government number night point home water room mother area money story fact \
    month lot right study book eye job word business issue side kind head house service friend \
    father power hour game line end member law car city community name president team minute \
    idea kid body information back parent face others level office door health person art war \
    history party result change morning reason research girl guy moment air teacher force \
    education foot boy age policy process music market sense nation plan college interest death \
    experience effect use class control care field development role effort rate heart drug show \
    leader light voice wife police mind price report decision son view relationship town road \
    arm difference value building action model season society tax director position player \
    record paper space ground form event official matter center couple site project activity \
    star table need court oil situation cost industry figure street image phase sort shipped \
    delivered pending refund invoice order customer warehouse parcel tracking address payment \
    card bank transfer discount coupon return damaged replacement express standard priority \
    handling fragile gift wrap note please thanks asap call before after monday friday weekend \
    morning evening leave door neighbour reception";

const REALISTIC_SCHEMA: &str = "
CREATE TABLE customers (
    id integer PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    city text NOT NULL,
    balance numeric(14,2) NOT NULL,
    updated_at timestamptz NOT NULL,
    notes text
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id integer NOT NULL,
    tracking text NOT NULL,
    status text NOT NULL,
    quantity integer NOT NULL,
    amount numeric(12,2) NOT NULL,
    ordered_at timestamptz NOT NULL,
    note text NOT NULL,
    attachment bytea
);
";

/// `INSERT` of `{rows}` orders for `{customers}` customers.
fn insert_orders_sql(rows: u64, customers: u64) -> String {
    format!(
        "INSERT INTO orders (customer_id, tracking, status, quantity, amount, ordered_at, note, attachment)
         SELECT 1 + (random() * ({customers} - 1))::int,
                'TRK' || upper(substr(md5(random()::text), 1, 12)),
                (ARRAY['new', 'paid', 'shipped', 'delivered', 'returned'])[1 + (random() * 4)::int],
                1 + (random() * 20)::int,
                round((random() * 2000)::numeric, 2),
                date_trunc('second', timestamptz '2023-01-01' + random() * interval '2 years'),
                bench_words(3 + (random() * 30)::int),
                CASE WHEN random() < 0.1
                     THEN decode(md5(random()::text) || md5(random()::text), 'hex') END
         FROM generate_series(1, {rows})"
    )
}

fn load_realistic(postgres: &PgCluster, megabytes: u32) -> anyhow::Result<String> {
    let word_count = WORDS.split_whitespace().count();
    let words = WORDS.split_whitespace().collect::<Vec<_>>().join(" ");
    let customers = u64::from(megabytes) * 600;
    postgres.psql(
        DATABASE,
        &format!(
            "{REALISTIC_SCHEMA}
             CREATE FUNCTION bench_words(n integer) RETURNS text LANGUAGE sql AS $$
               SELECT string_agg(split_part('{words}', ' ', 1 + (random() ^ 2 * {last})::int), ' ')
               FROM generate_series(1, n) $$;
             INSERT INTO customers
             SELECT i, bench_words(2), split_part(bench_words(1), ' ', 1) || i || '@example.com',
                    (ARRAY['Lisbon', 'Oslo', 'Quito', 'Nairobi', 'Hanoi', 'Lima', 'Perth', 'Austin'])[1 + i % 8],
                    round((random() * 10000)::numeric, 2),
                    date_trunc('second', now() - random() * interval '3 years'),
                    CASE WHEN random() < 0.5 THEN bench_words(5 + (random() * 20)::int) END
             FROM generate_series(1, {customers}) i;",
            last = word_count - 1
        ),
    );
    // Orders in batches of about a tenth of the target, until the database
    // is as large as asked.
    let target = u64::from(megabytes) * 1_000_000;
    let batch = (u64::from(megabytes) * 440).max(10_000);
    let mut rows = 0;
    while database_size(postgres)? < target {
        postgres.psql(DATABASE, &insert_orders_sql(batch, customers));
        rows += batch;
    }
    Ok(format!(
        "{rows} orders and {customers} customers (random words, tracking codes, numerics, \
         timestamps, bytea in 10% of orders)"
    ))
}

fn database_size(postgres: &PgCluster) -> anyhow::Result<u64> {
    let text = postgres.psql(DATABASE, &format!("SELECT pg_database_size('{DATABASE}')"));
    text.parse()
        .with_context(|| format!("pg_database_size printed {text:?}"))
}

fn number(postgres: &PgCluster, sql: &str) -> anyhow::Result<u64> {
    let text = postgres.psql(DATABASE, sql);
    text.parse()
        .with_context(|| format!("{sql} printed {text:?}"))
}

/// (e): append rows worth 2% of the database to one table, update 1,000
/// random rows of another. Returns what was done.
fn append_and_update(postgres: &PgCluster, dataset: Dataset) -> anyhow::Result<String> {
    let database_bytes = database_size(postgres)?;
    let goal = database_bytes / 50;
    let (table, updated) = match dataset {
        Dataset::Pgbench => ("pgbench_history", "pgbench_accounts"),
        Dataset::Realistic => ("orders", "customers"),
    };
    let before = number(
        postgres,
        &format!("SELECT pg_total_relation_size('{table}')"),
    )?;
    match dataset {
        Dataset::Pgbench => {
            let accounts = number(postgres, "SELECT count(*) FROM pgbench_accounts")?;
            let tellers = number(postgres, "SELECT count(*) FROM pgbench_tellers")?;
            let branches = number(postgres, "SELECT count(*) FROM pgbench_branches")?;
            // A history row takes about 50 bytes on disk.
            let rows = (goal / 50).max(1);
            postgres.psql(
                DATABASE,
                &format!(
                    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
                     SELECT 1 + (random() * ({tellers} - 1))::int,
                            1 + (random() * ({branches} - 1))::int,
                            1 + (random() * ({accounts} - 1))::int,
                            (random() * 10000)::int - 5000,
                            now() - random() * interval '1 day'
                     FROM generate_series(1, {rows});
                     UPDATE pgbench_accounts SET abalance = abalance + (random() * 1000)::int
                     WHERE aid IN (SELECT DISTINCT 1 + (random() * ({accounts} - 1))::int
                                   FROM generate_series(1, 1200) LIMIT 1000);"
                ),
            );
        }
        Dataset::Realistic => {
            let orders = number(postgres, "SELECT count(*) FROM orders")?;
            let customers = number(postgres, "SELECT count(*) FROM customers")?;
            let per_row = (before / orders.max(1)).max(1);
            let rows = (goal / per_row).max(1);
            postgres.psql(
                DATABASE,
                &format!(
                    "{};
                     UPDATE customers SET balance = round((random() * 10000)::numeric, 2),
                                          updated_at = date_trunc('second', now())
                     WHERE id IN (SELECT DISTINCT 1 + (random() * ({customers} - 1))::int
                                  FROM generate_series(1, 1200) LIMIT 1000);",
                    insert_orders_sql(rows, customers)
                ),
            );
        }
    }
    let after = number(
        postgres,
        &format!("SELECT pg_total_relation_size('{table}')"),
    )?;
    let grown = after.saturating_sub(before);
    Ok(format!(
        "appended {:.1} MB to {table} ({:.1}% of the database), updated 1,000 random rows of {updated}",
        grown as f64 / MB,
        grown as f64 * 100.0 / database_bytes.max(1) as f64
    ))
}

/// (f): a uniformly random 1% of every table's rows updated.
fn update_one_percent(postgres: &PgCluster, dataset: Dataset) -> anyhow::Result<String> {
    let updates: &[(&str, &str)] = match dataset {
        Dataset::Pgbench => &[
            ("pgbench_accounts", "abalance = abalance + 1"),
            ("pgbench_tellers", "tbalance = tbalance + 1"),
            ("pgbench_branches", "bbalance = bbalance + 1"),
            ("pgbench_history", "delta = delta + 1"),
        ],
        Dataset::Realistic => &[
            ("orders", "quantity = quantity + 1"),
            ("customers", "balance = balance + 1"),
        ],
    };
    let mut sql = String::new();
    for (table, set) in updates {
        let _ = writeln!(sql, "UPDATE {table} SET {set} WHERE random() < 0.01;");
    }
    postgres.psql(DATABASE, &sql);
    let tables: Vec<&str> = updates.iter().map(|(table, _)| *table).collect();
    Ok(format!(
        "updated a random 1% of the rows of {}",
        tables.join(", ")
    ))
}

// ---------------------------------------------------------------------------
// (s), (a), (b): plain pg_dump

fn pg_dump_case(
    test_dir: &TestDir,
    postgres: &PgCluster,
    settings: &Settings,
    case: Case,
) -> anyhow::Result<Sample> {
    let file = test_dir.path().join("dump.out");
    let script = match case {
        Case::Stream => "pg_dump -Fc -Z0 > /dev/null".to_string(),
        Case::Gzip => format!("pg_dump -Fc -f '{}'", file.display()),
        Case::Pipeline => format!(
            "pg_dump -Fc -Z0 | {COMPRESS_ENCRYPT} > '{}'",
            file.display()
        ),
        _ => bail!("case ({}) is not a pg_dump case", case.letter()),
    };
    let database_bytes = database_size(postgres)?;
    let measured = measured_script(test_dir, postgres, settings, &script)?;
    let bytes = if case == Case::Stream {
        None
    } else {
        let size = std::fs::metadata(&file)
            .with_context(|| format!("stat {}", file.display()))?
            .len();
        std::fs::remove_file(&file).with_context(|| format!("remove {}", file.display()))?;
        Some(size)
    };
    let client = measured.client_cpu;
    Ok(Sample {
        wall: measured.wall,
        database_bytes,
        client_cpu: client,
        server_cpu: measured.server_cpu,
        agent_rss: None,
        coordinator_rss: None,
        bytes,
        logical_bytes: None,
        detail: format!("the shell pipeline {client:.1}"),
        job_seconds: None,
    })
}

/// `bash -c 'set -euo pipefail; SCRIPT'` in the bench directory, with the
/// PostgreSQL programs first in a short `PATH` and libpq aimed at the
/// cluster (`PGDATABASE` is the bench database).
fn shell_command(test_dir: &TestDir, postgres: &PgCluster, script: &str) -> Command {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!("set -euo pipefail; {script}"))
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", pg::pg_bindir().display()),
        )
        .env("LC_ALL", "C")
        .env("PGHOST", postgres.socket_dir())
        .env("PGPORT", postgres.port().to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", DATABASE)
        .current_dir(test_dir.path());
    process::apply_process_group(&mut command);
    command
}

/// Runs [`shell_command`]`(script)` unmeasured; fails if it does.
fn run_script(test_dir: &TestDir, postgres: &PgCluster, script: &str) -> anyhow::Result<()> {
    let output = process::run(&mut shell_command(test_dir, postgres, script));
    ensure!(output.success(), "`{script}` failed: {output}");
    Ok(())
}

/// Wall time and CPU seconds of a measured command.
#[derive(Debug, Clone, Copy)]
struct Measured {
    wall: f64,
    /// The shell and everything in its pipeline.
    client_cpu: f64,
    /// The PostgreSQL server.
    server_cpu: f64,
}

/// Runs [`shell_command`]`(script)`, measured; fails if it does.
fn measured_script(
    test_dir: &TestDir,
    postgres: &PgCluster,
    settings: &Settings,
    script: &str,
) -> anyhow::Result<Measured> {
    let mut command = shell_command(test_dir, postgres, script);
    let postmaster = postmaster_pid(postgres)?;
    let server_before = server_ticks(postmaster);
    let children_before = proc_times("self")?.children;
    let started = Instant::now();
    let output = process::run(&mut command);
    let wall = started.elapsed().as_secs_f64();
    let children_after = proc_times("self")?.children;
    let server_after = server_ticks(postmaster);
    ensure!(output.success(), "`{script}` failed: {output}");
    let ticks = settings.clock_ticks;
    Ok(Measured {
        wall,
        client_cpu: children_after.saturating_sub(children_before) as f64 / ticks,
        server_cpu: server_after.saturating_sub(server_before) as f64 / ticks,
    })
}

// ---------------------------------------------------------------------------
// (c) to (f): a coordinator, an agent, `cairn backup run --wait`

/// A coordinator and one agent allowed to back up and to restore.
struct Fleet {
    name: String,
    coordinator: Coordinator,
    agent: Agent,
}

impl Fleet {
    /// A fresh coordinator home with a local repository, and its agent
    /// (allowed to back up and to restore).
    fn local(test_dir: &TestDir, postgres: &PgCluster, name: &str) -> anyhow::Result<Fleet> {
        let coordinator = Coordinator::start_with(test_dir, coordinator_options(name, Vec::new()));
        Ok(Fleet::with_agent(coordinator, postgres, name))
    }

    /// A fresh coordinator home whose repository is in the S3 bucket under
    /// the prefix `name` (made by `cairn repository init`, as an operator
    /// would), and its agent.
    fn s3(test_dir: &TestDir, postgres: &PgCluster, name: &str, s3: &S3Server) -> Fleet {
        let env = vec![
            ("AWS_ACCESS_KEY_ID".to_string(), s3.access_key().to_string()),
            (
                "AWS_SECRET_ACCESS_KEY".to_string(),
                s3.secret_key().to_string(),
            ),
        ];
        let mut options = coordinator_options(name, env);
        options.repository_table = Some(format!(
            "[repository]\nkind = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"{name}\"\n\
             region = \"{}\"\nendpoint = \"{}\"\npath_style = true\n",
            s3.region(),
            s3.endpoint()
        ));
        let coordinator = Coordinator::start_with(test_dir, options);
        Fleet::with_agent(coordinator, postgres, name)
    }

    fn with_agent(coordinator: Coordinator, postgres: &PgCluster, name: &str) -> Fleet {
        // Production intervals (probes every 15 s, heartbeats every 5 s),
        // not the fixtures' fast ones.
        let options = AgentOptions {
            probe_interval: None,
            ..AgentOptions::default()
        }
        .allow("backup")
        .allow("restore");
        let agent = coordinator.enroll_agent(name, postgres, options);
        Fleet {
            name: name.to_string(),
            coordinator,
            agent,
        }
    }

    /// `cairn backup run --wait` of the bench database, measured.
    fn measured_backup(
        &self,
        postgres: &PgCluster,
        settings: &Settings,
    ) -> anyhow::Result<(Sample, Value)> {
        let database_bytes = database_size(postgres)?;
        let run = self.measured_cli(
            postgres,
            settings,
            &[
                "backup",
                "run",
                "--agent",
                &self.name,
                "--database",
                DATABASE,
                "--wait",
                "--output",
                "json",
            ],
        )?;
        let output = &run.output;
        ensure!(output.success(), "the backup failed: {output}");

        let jobs: Value = serde_json::from_str(&output.stdout)
            .with_context(|| format!("`cairn backup run --output json` printed {output}"))?;
        let backup_id = jobs[0]["backup_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .with_context(|| format!("no backup_id in {jobs}"))?
            .to_string();
        let show = process::run(
            &mut self
                .coordinator
                .cli_command(&["backups", "show", &backup_id, "--output", "json"]),
        );
        ensure!(show.success(), "cairn backups show failed: {show}");
        let backup: Value = serde_json::from_str(&show.stdout)
            .with_context(|| format!("`cairn backups show --output json` printed {show}"))?;

        let sample = Sample {
            wall: run.wall,
            database_bytes,
            client_cpu: run.client_cpu(),
            server_cpu: run.server,
            agent_rss: run.agent_rss,
            coordinator_rss: run.coordinator_rss,
            bytes: backup["new_stored_bytes"].as_u64(),
            logical_bytes: backup["logical_bytes"].as_u64(),
            detail: run.detail("pg_dump", backup["logical_bytes"].as_u64()),
            job_seconds: job_seconds(&jobs[0]),
        };
        Ok((sample, backup))
    }

    /// `cairn ARGS` as admin, measured: wall time, CPU seconds of agent
    /// (and the children it waited for), coordinator, CLI and server, and
    /// the peak RSS of agent and coordinator during the command. The
    /// command's failure is the caller's to report.
    fn measured_cli(
        &self,
        postgres: &PgCluster,
        settings: &Settings,
        args: &[&str],
    ) -> anyhow::Result<CliRun> {
        let agent_pid = self.agent.process().pid().to_string();
        let coordinator_pid = self.coordinator.process().pid().to_string();
        reset_peak_rss(&agent_pid);
        reset_peak_rss(&coordinator_pid);
        let postmaster = postmaster_pid(postgres)?;
        let mut command = self.coordinator.cli_command(args);

        let server_before = server_ticks(postmaster);
        let agent_before = proc_times(&agent_pid)?;
        let coordinator_before = proc_times(&coordinator_pid)?;
        let self_before = proc_times("self")?;
        let started = Instant::now();
        let output = process::run(&mut command);
        let wall = started.elapsed().as_secs_f64();
        let self_after = proc_times("self")?;
        let coordinator_after = proc_times(&coordinator_pid)?;
        let agent_after = proc_times(&agent_pid)?;
        let server_after = server_ticks(postmaster);

        let ticks = settings.clock_ticks;
        let seconds = |before: u64, after: u64| after.saturating_sub(before) as f64 / ticks;
        Ok(CliRun {
            wall,
            agent: seconds(agent_before.own, agent_after.own),
            agent_children: seconds(agent_before.children, agent_after.children),
            coordinator: seconds(coordinator_before.own, coordinator_after.own),
            cli: seconds(self_before.children, self_after.children),
            // This process only waits, except for the S3 server's threads.
            in_process: seconds(self_before.own, self_after.own),
            server: seconds(server_before, server_after),
            agent_rss: peak_rss(&agent_pid),
            coordinator_rss: peak_rss(&coordinator_pid),
            output,
        })
    }

    /// Stops the agent and the coordinator and removes their directories
    /// (the repository with them).
    fn remove(mut self) -> anyhow::Result<()> {
        self.agent.stop();
        self.coordinator.stop();
        for dir in [self.agent.dir(), self.coordinator.home()] {
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        Ok(())
    }
}

/// One measured `cairn` command ([`Fleet::measured_cli`]); CPU in seconds.
struct CliRun {
    output: cairn_integration_tests::Output,
    wall: f64,
    agent: f64,
    /// What the agent ran and waited for: pg_dump, pg_restore.
    agent_children: f64,
    coordinator: f64,
    cli: f64,
    /// This process: the in-process S3 server's threads (not counted).
    in_process: f64,
    server: f64,
    agent_rss: Option<u64>,
    coordinator_rss: Option<u64>,
}

impl CliRun {
    fn client_cpu(&self) -> f64 {
        self.agent + self.agent_children + self.coordinator + self.cli
    }

    /// How the client CPU divides; `child` names what the agent ran. With
    /// the dump's size, the coordinator's CPU seconds per GB of it (what
    /// checking, sealing and storing, or authenticating and sending,
    /// costs the one process every agent shares).
    fn detail(&self, child: &str, dump_bytes: Option<u64>) -> String {
        let mut detail = format!(
            "agent {:.1} + {child} {:.1} + coordinator {:.1} + cli {:.1}",
            self.agent, self.agent_children, self.coordinator, self.cli
        );
        if let Some(bytes) = dump_bytes.filter(|&bytes| bytes > 0) {
            let _ = write!(
                detail,
                "; coordinator {:.2} CPU s per GB of dump",
                self.coordinator / (bytes as f64 / 1e9)
            );
        }
        if self.in_process >= 0.05 {
            let _ = write!(
                detail,
                "; in-process S3 server {:.1} (not counted)",
                self.in_process
            );
        }
        detail
    }
}

/// `finished_at - started_at` of a job as `cairn ... --output json`
/// prints it (RFC 3339).
fn job_seconds(job: &Value) -> Option<f64> {
    let time = |key: &str| {
        job[key]
            .as_str()
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
    };
    let elapsed = time("finished_at")? - time("started_at")?;
    Some(elapsed.num_milliseconds() as f64 / 1000.0)
}

fn coordinator_options(name: &str, env: Vec<(String, String)>) -> CoordinatorOptions {
    CoordinatorOptions {
        name: format!("coordinator-{name}"),
        heartbeat_interval: None,
        extra_init_args: Vec::new(),
        env,
        repository_table: None,
    }
}

// ---------------------------------------------------------------------------
// /proc

/// CPU ticks of a process: its own (utime + stime) and those of its
/// children it has waited for (cutime + cstime).
#[derive(Debug, Clone, Copy)]
struct ProcTimes {
    own: u64,
    children: u64,
}

/// The fields after the command name in `/proc/PID/stat` (the name may
/// hold spaces and parentheses): index 0 is field 3, the state.
fn stat_fields(pid: &str) -> anyhow::Result<Vec<u64>> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let (_, rest) = text
        .rsplit_once(')')
        .with_context(|| format!("{path}: no command name"))?;
    Ok(rest
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect())
}

fn proc_times(pid: &str) -> anyhow::Result<ProcTimes> {
    let fields = stat_fields(pid)?;
    // utime, stime, cutime, cstime are fields 14 to 17.
    let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
    Ok(ProcTimes {
        own: field(14) + field(15),
        children: field(16) + field(17),
    })
}

/// CPU ticks of the PostgreSQL server: the postmaster, its children alive
/// now, and those it has reaped.
///
/// A child reaped while `/proc` is scanned would be missed (its backend
/// often exits just as a client command ends), so the scan is repeated
/// until the postmaster's reaped children's time is the same before and
/// after it.
fn server_ticks(postmaster: u32) -> u64 {
    let postmaster_text = postmaster.to_string();
    let mut total = 0;
    for _ in 0..20 {
        let Ok(before) = proc_times(&postmaster_text) else {
            return total;
        };
        let live = live_children_ticks(postmaster);
        let Ok(after) = proc_times(&postmaster_text) else {
            return total;
        };
        total = after.own + before.children + live;
        if after.children == before.children {
            break;
        }
    }
    total
}

/// utime + stime of the children of `parent` that `/proc` lists now
/// (running, or ended and not yet reaped).
fn live_children_ticks(parent: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Gone already: reaped, so in the parent's children's times.
        let Ok(fields) = stat_fields(pid) else {
            continue;
        };
        if fields.get(1).copied().unwrap_or(0) == u64::from(parent) {
            total += fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        }
    }
    total
}

fn postmaster_pid(postgres: &PgCluster) -> anyhow::Result<u32> {
    postgres
        .postmaster_pid()
        .context("no postmaster.pid: is the cluster running?")
}

/// `VmHWM` of a process, in bytes.
fn peak_rss(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Restarts the peak RSS (`VmHWM`) of a process from its current RSS
/// (needs root; without it the peak covers the whole life of the process).
fn reset_peak_rss(pid: &str) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

// ---------------------------------------------------------------------------
// Report

fn verdict(passed: Option<bool>) -> &'static str {
    match passed {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "n/a",
    }
}

fn median_wall(report: &DatasetReport, case: Case) -> Option<f64> {
    report
        .outcomes
        .get(&case)
        .and_then(Outcome::median)
        .map(|sample| sample.wall)
}

fn median_bytes(report: &DatasetReport, case: Case) -> Option<u64> {
    report
        .outcomes
        .get(&case)
        .and_then(Outcome::median)
        .and_then(|sample| sample.bytes)
}

/// The largest peak over every backup run of the dataset.
fn max_rss(report: &DatasetReport, pick: fn(&Sample) -> Option<u64>) -> Option<u64> {
    report
        .outcomes
        .values()
        .filter_map(|outcome| match outcome {
            Outcome::Measured(samples) => samples.iter().filter_map(pick).max(),
            Outcome::Skipped(_) => None,
        })
        .max()
}

/// `a / b` when both were measured.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratio_target(what: &str, ratio: Option<f64>, limit: f64, at_most: bool) -> Target {
    Target {
        what: what.to_string(),
        measured: ratio.map_or_else(|| "not measured".to_string(), |r| format!("{r:.2}x")),
        passed: ratio.map(|r| if at_most { r <= limit } else { r >= limit }),
    }
}

fn targets(report: &DatasetReport) -> Vec<Target> {
    let wall = |case| median_wall(report, case);
    let local = wall(Case::Local);
    let mut targets = vec![
        ratio_target(
            "(c) wall <= 1.10 x (s)   [c/s]",
            ratio(local, wall(Case::Stream)),
            1.10,
            true,
        ),
        ratio_target(
            "(c) wall <= (b)          [c/b]",
            ratio(local, wall(Case::Pipeline)),
            1.0,
            true,
        ),
    ];
    if report.dataset == Dataset::Realistic {
        targets.push(ratio_target(
            "(c) >= 4x faster than (a) [a/c]",
            ratio(wall(Case::Gzip), local),
            4.0,
            false,
        ));
    }
    targets.push(ratio_target(
        "(c) stored <= 1.05 x (b)'s output",
        ratio(
            median_bytes(report, Case::Local).map(|b| b as f64),
            median_bytes(report, Case::Pipeline).map(|b| b as f64),
        ),
        1.05,
        true,
    ));
    targets.push(ratio_target(
        "(d) wall <= 1.2 x (c)    [d/c]",
        ratio(wall(Case::S3), local),
        1.2,
        true,
    ));
    let incremental = ratio(
        median_bytes(report, Case::Incremental).map(|b| b as f64),
        report.baseline_bytes.map(|b| b as f64),
    );
    targets.push(Target {
        what: "(e) uploads <= 15% of (c)'s bytes".to_string(),
        measured: incremental.map_or_else(
            || "not measured".to_string(),
            |r| format!("{:.1}%", r * 100.0),
        ),
        passed: incremental.map(|r| r <= 0.15),
    });
    for (what, pick, limit) in [
        (
            "agent peak RSS <= 128 MiB",
            (|s: &Sample| s.agent_rss) as fn(&Sample) -> Option<u64>,
            128.0,
        ),
        (
            "coordinator peak RSS <= 256 MiB",
            |s: &Sample| s.coordinator_rss,
            256.0,
        ),
    ] {
        let peak = max_rss(report, pick).map(|b| b as f64 / MIB);
        targets.push(Target {
            what: what.to_string(),
            measured: peak.map_or_else(|| "not measured".to_string(), |p| format!("{p:.0} MiB")),
            passed: peak.map(|p| p <= limit),
        });
    }
    if let Some(restores) = &report.restores {
        targets.extend(restores.targets());
    }
    targets
}

/// The header of a table of cases, up to the RSS column.
fn columns_header(title: &str) -> String {
    format!(
        "{title:<42} {:>18} {:>6} {:>7} {:>9} {:>9} {:>13}",
        "wall s (min-max)", "job s", "MB/s", "client s", "server s", "RSS MiB a/c"
    )
}

/// A measured case's columns under [`columns_header`], after the title;
/// MB/s is `rate_bytes` over the median wall time.
fn columns(samples: &[Sample], median: &Sample, rate_bytes: u64) -> String {
    let min = samples.iter().map(|s| s.wall).fold(f64::MAX, f64::min);
    let max = samples.iter().map(|s| s.wall).fold(0.0, f64::max);
    let walls = if samples.len() > 1 {
        format!("{:.2} ({min:.2}-{max:.2})", median.wall)
    } else {
        format!("{:.2}", median.wall)
    };
    let rss = match (median.agent_rss, median.coordinator_rss) {
        (Some(a), Some(c)) => format!("{:.0}/{:.0}", a as f64 / MIB, c as f64 / MIB),
        _ => "-".to_string(),
    };
    let job = median
        .job_seconds
        .map_or_else(|| "-".to_string(), |j| format!("{j:.2}"));
    format!(
        "{walls:>18} {job:>6} {:>7.1} {:>9.1} {:>9.1} {rss:>13}",
        rate_bytes as f64 / MB / median.wall.max(1e-9),
        median.client_cpu,
        median.server_cpu,
    )
}

fn print_report(report: &DatasetReport) {
    println!(
        "\n==> Results: {} ({}), pg_database_size {:.1} MB",
        report.dataset.name(),
        report.description,
        report.database_bytes as f64 / MB
    );
    if let Some(local) = report.outcomes.get(&Case::Local).and_then(Outcome::median) {
        let archive = local.logical_bytes.unwrap_or(0);
        let compressed = median_bytes(report, Case::Pipeline);
        println!(
            "  pg_dump -Fc -Z0 archive {:.1} MB{}",
            archive as f64 / MB,
            compressed
                .map(|c| format!(
                    "; zstd -1 shrinks it {:.2}x ((b)'s output)",
                    archive as f64 / c.max(1) as f64
                ))
                .unwrap_or_default()
        );
    }
    println!(
        "\n  {} {:>11}",
        columns_header("case (median run)"),
        "bytes MB"
    );
    for (case, outcome) in &report.outcomes {
        let title = format!("({}) {}", case.letter(), case.label());
        match outcome {
            Outcome::Skipped(reason) => println!("  {title:<42} skipped: {reason}"),
            Outcome::Measured(samples) => {
                let Some(median) = outcome.median() else {
                    continue;
                };
                let bytes = median
                    .bytes
                    .map_or_else(|| "-".to_string(), |b| format!("{:.1}", b as f64 / MB));
                println!(
                    "  {title:<42} {} {bytes:>11}",
                    columns(samples, median, median.database_bytes)
                );
            }
        }
    }
    println!(
        "\n  wall s: of the command (for (c)-(f) the CLI's `--wait`, which polls every 100 ms); \
         job s: the job's own start to end by the coordinator's clock; MB/s: \
         pg_database_size / wall;\n  client s: CPU of the client processes (pg_dump and the pipeline for (s)-(b); \
         agent, its pg_dump, coordinator and CLI for (c)-(f));\n  server s: CPU of the \
         PostgreSQL server; RSS: peak (VmHWM) of agent/coordinator during the backup;\n  bytes: \
         output file for (a)/(b), new stored (uploaded) bytes for (c)-(f). (c)/(d): fresh \
         coordinator, repository and agent per run."
    );
    for (case, outcome) in &report.outcomes {
        if let Some(median) = outcome.median()
            && matches!(
                case,
                Case::Local | Case::S3 | Case::Incremental | Case::Scattered
            )
        {
            println!("  ({}) client CPU: {}", case.letter(), median.detail);
        }
    }
    for note in &report.notes {
        println!("  {note}");
    }
    let wall = |case| median_wall(report, case);
    let mut ratios = Vec::new();
    if let Some(local) = wall(Case::Local) {
        for (name, case) in [
            ("c/s", Case::Stream),
            ("c/a", Case::Gzip),
            ("c/b", Case::Pipeline),
        ] {
            if let Some(other) = wall(case) {
                ratios.push(format!("{name} {:.2}", local / other));
            }
        }
        if let Some(s3) = wall(Case::S3) {
            ratios.push(format!("d/c {:.2}", s3 / local));
        }
    }
    if let (Some(e), Some(base)) = (
        median_bytes(report, Case::Incremental),
        report.baseline_bytes,
    ) {
        ratios.push(format!(
            "e/c bytes {:.1}%",
            e as f64 * 100.0 / base.max(1) as f64
        ));
    }
    if let (Some(f), Some(base)) = (median_bytes(report, Case::Scattered), report.baseline_bytes) {
        ratios.push(format!(
            "f/c bytes {:.1}%",
            f as f64 * 100.0 / base.max(1) as f64
        ));
    }
    println!("  ratios of wall time: {}", ratios.join(", "));
    if let Some(restores) = &report.restores {
        restores.print();
    }
    println!(
        "\n  {:<48} {:>14}  result",
        "target (from the issue)", "measured"
    );
    for target in &report.targets {
        println!(
            "  {:<48} {:>14}  {}",
            target.what,
            target.measured,
            verdict(target.passed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_run_by_wall_time() {
        let sample = |wall| Sample {
            wall,
            ..Sample::default()
        };
        let outcome = Outcome::Measured(vec![sample(3.0), sample(1.0), sample(2.0)]);
        assert_eq!(outcome.median().map(|s| s.wall), Some(2.0));
        let even = Outcome::Measured(vec![sample(4.0), sample(1.0)]);
        assert_eq!(even.median().map(|s| s.wall), Some(1.0));
        assert!(Outcome::Skipped("x".into()).median().is_none());
    }

    #[test]
    fn server_ticks_count_the_process_and_its_children() {
        let own = proc_times("self").expect("read /proc/self/stat");
        let parent = std::process::id();
        let mut child = Command::new("sleep").arg("5").spawn().expect("start sleep");
        let total = server_ticks(parent);
        let _ = child.kill();
        let _ = child.wait();
        assert!(total >= own.own + own.children, "{total} < {own:?}");
        assert_eq!(server_ticks(u32::MAX), 0, "no such process");
    }

    #[test]
    fn stat_fields_survive_names_with_spaces_and_parentheses() {
        let fields = stat_fields("self").expect("read /proc/self/stat");
        // state is not a number; ppid (field 4) is.
        assert!(fields[1] > 0);
    }
}
