//! Backups under faults, end to end: a job cancelled, an agent or a
//! coordinator killed, the network between them cut or silenced, the
//! repository's disk full or unusable, each in the middle of a real backup
//! of a real database.
//!
//! Whatever the fault, the promise is the same (ARCHITECTURE.md, "The path
//! of a backup"): the job ends, within a bound, `failed` or `cancelled` with
//! the reason; no backup is listed and no manifest is written for it; no
//! `pg_dump` is left running; and the chunks stored before the fault stay
//! and are reused by the next backup, which succeeds.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_integration_tests::proxy::{ProxyMode, TcpProxy};
use cairn_integration_tests::{
    Agent, AgentOptions, Coordinator, Output, PgCluster, TestDir, job_is_active, logged_numbers,
    run, wait_for, wait_until,
};
use serde_json::Value;

const AGENT: &str = "db1";
const DATABASE: &str = "shop";
/// Big enough that a backup takes a few seconds even with the data path
/// optimised, so that a fault lands in its middle.
const DATABASE_MIB: u32 = 200;
/// Chunks the job must have stored before a fault is injected. The first
/// chunk of every dump is new (the archive's header holds the time of the
/// dump), so the next backup can reuse the second and later ones.
const CHUNKS_BEFORE_FAULT: u64 = 3;

const POLL: Duration = Duration::from_millis(100);
/// How long a backup may take to store its first chunks.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a job may take to end once it was cancelled or its agent or
/// coordinator died; the connection is closed, so this is seconds.
const JOB_END_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed or abandoned `pg_dump` may take to exit.
const PG_DUMP_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole backup of the test database may take.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(180);

/// One test's fleet: a filled database, a coordinator, and one agent
/// allowed to back it up. Fields drop in order: the agent first, the test
/// directory last.
struct Fleet {
    agent: Agent,
    coordinator: Coordinator,
    _pg: PgCluster,
    _test_dir: TestDir,
}

impl Fleet {
    fn start(test_name: &str) -> Fleet {
        Fleet::start_with(test_name, DATABASE_MIB)
    }

    /// [`Fleet::start`] with a database of `mib` MiB.
    fn start_with(test_name: &str, mib: u32) -> Fleet {
        let test_dir = TestDir::new(test_name);
        let pg = PgCluster::start_in(&test_dir, "pg");
        pg.create_sample_database(DATABASE, mib);
        let coordinator = Coordinator::start(&test_dir);
        let agent = coordinator.enroll_agent(AGENT, &pg, AgentOptions::default().allow("backup"));
        Fleet {
            agent,
            coordinator,
            _pg: pg,
            _test_dir: test_dir,
        }
    }

    fn agent_pid(&self) -> u32 {
        self.agent.process().pid()
    }

    /// `cairn backup run` without `--wait`: the new job, running.
    fn start_backup(&self) -> Value {
        self.start_backup_with(&[])
    }

    /// [`Fleet::start_backup`] with more arguments.
    fn start_backup_with(&self, args: &[&str]) -> Value {
        let mut all = vec!["backup", "run", "--agent", AGENT, "--database", DATABASE];
        all.extend_from_slice(args);
        let jobs = self.coordinator.cli_json(&all);
        assert_eq!(jobs.as_array().map(Vec::len), Some(1), "{jobs}");
        let job = jobs[0].clone();
        assert!(job_is_active(&job), "{job}");
        job
    }

    /// `cairn backup run --wait`, bounded: its output.
    fn backup_and_wait(&self) -> Output {
        cli_within(
            &self.coordinator,
            &[
                "backup",
                "run",
                "--agent",
                AGENT,
                "--database",
                DATABASE,
                "--wait",
                "--output",
                "json",
            ],
            BACKUP_TIMEOUT,
        )
    }

    /// `cairn backup verify` of the job's backup succeeds.
    fn assert_verifies(&self, job: &Value) {
        let backup_id = job["backup_id"].as_str().unwrap();
        self.coordinator
            .cli(&["backup", "verify", backup_id])
            .assert_success();
    }

    fn job(&self, id: &str) -> Value {
        self.coordinator.cli_json(&["jobs", "show", id])
    }

    /// Waits until job `id` has stored [`CHUNKS_BEFORE_FAULT`] chunks and
    /// returns it; panics if it ends first (the database is too small to be
    /// caught mid-backup).
    fn wait_for_progress(&self, id: &str) -> Value {
        wait_for(
            PROGRESS_TIMEOUT,
            POLL,
            &format!("job {id} has read from pg_dump and stored {CHUNKS_BEFORE_FAULT} chunks"),
            || {
                let job = self.job(id);
                assert!(
                    job_is_active(&job),
                    "job {id} ended before a fault could be injected in its middle; \
                     make DATABASE_MIB bigger: {job}"
                );
                let read = job["bytes_read"].as_u64().unwrap();
                let chunks = job["chunks"].as_u64().unwrap();
                (read > 0 && chunks >= CHUNKS_BEFORE_FAULT).then_some(job)
            },
        )
    }

    /// Waits until job `id` is no longer running; returns it and how long
    /// that took.
    fn wait_for_end(&self, id: &str, timeout: Duration) -> (Value, Duration) {
        let started = Instant::now();
        let job = wait_for(
            timeout,
            POLL,
            &format!("job {id} is no longer running"),
            || {
                let job = self.job(id);
                (!job_is_active(&job)).then_some(job)
            },
        );
        (job, started.elapsed())
    }

    /// The promise after any fault: no backup listed, `backups show`
    /// refuses the job's backup, and the repository holds no manifest for
    /// it.
    fn assert_nothing_listed(&self, job: &Value) {
        let problems = self.listing_problems(job);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// What breaks [`Fleet::assert_nothing_listed`], one sentence each.
    fn listing_problems(&self, job: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        let listed = self.coordinator.cli_json(&["backups", "list"]);
        if listed != Value::Array(Vec::new()) {
            problems.push(format!("after job {job}, backups are listed: {listed}"));
        }
        let backup_id = job["backup_id"].as_str().unwrap();
        assert!(!backup_id.is_empty(), "{job}");
        let shown = self.coordinator.cli(&["backups", "show", backup_id]);
        if shown.success() {
            problems.push(format!("an incomplete backup is shown: {shown}"));
        }
        let manifest = self.manifest_path(backup_id);
        if manifest.exists() {
            problems.push(format!(
                "job {} ended {} but its manifest {} exists",
                job["id"],
                job["status"],
                manifest.display()
            ));
        }
        problems
    }

    fn manifest_path(&self, backup_id: &str) -> PathBuf {
        self.coordinator
            .home()
            .join("repository/manifests")
            .join(backup_id)
    }

    /// A new backup with `--wait` succeeds, is the only one listed, and
    /// reuses the chunks the interrupted job stored (all but the first,
    /// which holds the time of the dump, and those still in flight).
    /// Returns the listed backup.
    fn backup_again_reusing(&self, stored_before_fault: u64) -> Value {
        let output = self.backup_and_wait();
        assert!(
            output.success(),
            "the backup after the fault failed: {output}"
        );
        let job = output.json()[0].clone();
        assert_eq!(job["status"], "succeeded", "{job}");
        let listed = self.coordinator.cli_json(&["backups", "list"]);
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let backup = listed[0].clone();
        assert_eq!(backup["id"], job["backup_id"], "{backup}");
        assert!(
            self.manifest_path(backup["id"].as_str().unwrap()).is_file(),
            "{backup}"
        );
        let chunk_count = backup["chunk_count"].as_u64().unwrap();
        let new_chunk_count = backup["new_chunk_count"].as_u64().unwrap();
        assert!(
            new_chunk_count < chunk_count,
            "the backup after the fault reused no chunk: {backup}"
        );
        eprintln!(
            "the backup after the fault: {} bytes in {chunk_count} chunks, {new_chunk_count} new",
            backup["logical_bytes"]
        );
        // The progress counts chunks received; up to STORE_IN_FLIGHT of
        // them were still on their way to storage when the fault struck.
        let in_flight = cairn_coordinator::jobs::upload::STORE_IN_FLIGHT as u64;
        assert!(
            chunk_count - new_chunk_count >= stored_before_fault.saturating_sub(1 + in_flight),
            "the interrupted job had stored {stored_before_fault} chunks but the next backup \
             reused only {}: {backup}",
            chunk_count - new_chunk_count
        );
        backup
    }
}

/// Runs `cairn ARGS` as admin, killed (and the test failed) if it has not
/// exited within `timeout`: a hang is a failure, not a stuck test run.
fn cli_within(coordinator: &Coordinator, args: &[&str], timeout: Duration) -> Output {
    let mut command = coordinator.cli_command(args);
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {description}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let stdout_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // Killed if the wait below panics, so a hung command does not outlive
    // the test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let mut child = KillOnDrop(child);
    let status = wait_for(
        timeout,
        POLL,
        &format!("`cairn {}` exits", args.join(" ")),
        || child.0.try_wait().unwrap(),
    );
    use std::os::unix::process::ExitStatusExt as _;
    Output {
        command: description,
        status_code: status.code(),
        signal: status.signal(),
        stdout: stdout_reader.join().unwrap(),
        stderr: stderr_reader.join().unwrap(),
    }
}

/// A process as `/proc/PID/stat` describes it.
#[derive(Debug)]
struct ProcStat {
    pid: u32,
    comm: String,
    state: char,
    parent: u32,
}

impl ProcStat {
    fn read(pid: u32) -> Option<ProcStat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let mut rest = text[close + 1..].split_whitespace();
        let state = rest.next()?.chars().next()?;
        let parent = rest.next()?.parse().ok()?;
        Some(ProcStat {
            pid,
            comm: text[open + 1..close].to_string(),
            state,
            parent,
        })
    }

    /// A `pg_dump` that still runs (a zombie has exited, only its parent
    /// has not reaped it yet).
    fn is_live_pg_dump(&self) -> bool {
        self.comm == "pg_dump" && !matches!(self.state, 'Z' | 'X')
    }
}

/// The live `pg_dump` processes whose parent is `parent` (the agent: other
/// tests run their own agents and dumps in parallel).
fn pg_dumps_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(ProcStat::read)
        .filter(|p| p.parent == parent && p.is_live_pg_dump())
        .map(|p| p.pid)
        .collect()
}

/// Where the agent's upload resumed (the `next_position` of each "upload
/// resumed" line in its log): a resume past 0 reused what was recorded.
fn resumed_positions(agent: &Agent) -> Vec<u64> {
    logged_numbers(&agent.process().log(), "upload resumed", "next_position")
}

/// Whether `pid` is still a running pg_dump.
fn the_pg_dumps_alive(pid: u32) -> bool {
    ProcStat::read(pid).is_some_and(|p| p.is_live_pg_dump())
}

/// The `pg_dump` of the running job: its agent's only child of that name.
fn the_pg_dump_of(agent_pid: u32) -> u32 {
    let dumps = pg_dumps_of(agent_pid);
    assert_eq!(
        dumps.len(),
        1,
        "agent (pid {agent_pid}) runs one backup, so one pg_dump; found {dumps:?}"
    );
    dumps[0]
}

/// Waits until `pg_dump` `pid` no longer runs, wherever it was reparented,
/// and no other `pg_dump` runs under `agent_pid` (if the agent still runs).
fn wait_until_pg_dump_gone(pid: u32, agent_pid: Option<u32>, timeout: Duration) -> Duration {
    let started = Instant::now();
    wait_until(
        timeout,
        POLL,
        &format!("pg_dump (pid {pid}) has exited and the agent runs no other pg_dump"),
        || {
            let gone = ProcStat::read(pid).is_none_or(|p| !p.is_live_pg_dump());
            gone && agent_pid.is_none_or(|agent| pg_dumps_of(agent).is_empty())
        },
    );
    started.elapsed()
}

/// How soon a job's pg_dump stops once the coordinator ended the job for a
/// storage failure: well under the 2 s a broken stream waits to resume.
const STRAY_PG_DUMP_GRACE: Duration = Duration::from_millis(1500);

fn report(test: &str, what: &str, took: Duration) {
    eprintln!("{test}: {what} in {:.1}s", took.as_secs_f64());
}

#[test]
fn a_cancelled_backup_leaves_nothing_listed_and_stops_pg_dump() {
    let fleet = Fleet::start("backup_fault_cancel");
    let job = fleet.start_backup();
    let id = job["id"].as_str().unwrap();
    let progress = fleet.wait_for_progress(id);
    let pg_dump = the_pg_dump_of(fleet.agent_pid());

    let cancelled = fleet.coordinator.cli(&["jobs", "cancel", id]);
    assert!(cancelled.success(), "{cancelled}");
    // The answer says what happens: the cancel is underway, not done.
    assert!(
        cancelled
            .stdout
            .contains(&format!("Cancel requested for job {id}"))
            && cancelled.stdout.contains("will end as cancelled"),
        "{cancelled}"
    );
    let (job, took) = fleet.wait_for_end(id, JOB_END_TIMEOUT);
    report("cancel", "the job ended", took);
    assert_eq!(job["status"], "cancelled", "{job}");
    let shown = fleet.coordinator.cli(&["jobs", "show", id]);
    assert!(
        shown.stdout.contains("(not completed)")
            && !shown.stdout.contains(job["backup_id"].as_str().unwrap()),
        "a cancelled job names a backup that never completed: {shown}"
    );
    assert!(
        job["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cancelled"),
        "{job}"
    );
    // The agent kills and reaps pg_dump before it answers the cancel.
    let remaining = pg_dumps_of(fleet.agent_pid());
    assert!(
        remaining.is_empty() && ProcStat::read(pg_dump).is_none_or(|p| !p.is_live_pg_dump()),
        "the job is cancelled but pg_dump still runs: {remaining:?} (was {pg_dump})"
    );
    fleet.assert_nothing_listed(&job);

    fleet.backup_again_reusing(progress["chunks"].as_u64().unwrap());
}

#[test]
fn an_agent_killed_mid_backup_fails_the_job_and_the_next_backup_reuses_chunks() {
    let mut fleet = Fleet::start("backup_fault_agent_killed");
    let job = fleet.start_backup();
    let id = job["id"].as_str().unwrap();
    let progress = fleet.wait_for_progress(id);
    let pg_dump = the_pg_dump_of(fleet.agent_pid());

    fleet.agent.kill();
    // Orphaned, pg_dump dies on its next write to the dead agent's pipe.
    let took = wait_until_pg_dump_gone(pg_dump, None, PG_DUMP_EXIT_TIMEOUT);
    report("agent killed", "the orphaned pg_dump exited", took);
    // The job waits for its agent; back, the agent no longer holds the
    // attempt, which fails (no --retries: so does the job).
    assert!(job_is_active(&fleet.job(id)), "{}", fleet.job(id));
    fleet.agent.start();
    fleet.coordinator.wait_until_online(&fleet.agent);
    let (job, took) = fleet.wait_for_end(id, JOB_END_TIMEOUT);
    report(
        "agent killed",
        "the job ended once the agent was back",
        took,
    );
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"]
            .as_str()
            .unwrap_or_default()
            .contains("restarted"),
        "{job}"
    );
    fleet.assert_nothing_listed(&job);
    fleet.backup_again_reusing(progress["chunks"].as_u64().unwrap());
}

#[test]
fn an_agent_killed_mid_backup_fails_the_attempt_and_a_retry_succeeds() {
    let mut fleet = Fleet::start("backup_fault_agent_killed_retried");
    let job = fleet.start_backup_with(&["--retries", "2"]);
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["max_attempts"], 3, "{job}");
    fleet.wait_for_progress(id);

    // The attempt fails when the agent comes back without it; the job
    // queues for the next one instead of ending.
    fleet.agent.kill();
    assert!(job_is_active(&fleet.job(id)), "{}", fleet.job(id));
    fleet.agent.start();
    fleet.coordinator.wait_until_online(&fleet.agent);
    let retrying = wait_for(JOB_END_TIMEOUT, POLL, "the job queued for a retry", || {
        let job = fleet.job(id);
        assert!(
            job_is_active(&job),
            "the job ended instead of retrying: {job}"
        );
        (job["status"] == "queued" && job["attempt"] == 1).then_some(job)
    });
    assert!(
        !retrying["waiting_for"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "a queued retry says what it waits for: {retrying}"
    );
    let (job, took) = fleet.wait_for_end(id, BACKUP_TIMEOUT);
    report("agent killed, retried", "the retried job ended", took);
    assert_eq!(job["status"], "succeeded", "{job}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job}");
    assert_eq!(attempts[0]["outcome"], "failed", "{job}");
    assert!(
        attempts[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("restarted"),
        "{job}"
    );
    assert_eq!(attempts[1]["outcome"], "succeeded", "{job}");
    assert_ne!(
        attempts[0]["attempt_id"], attempts[1]["attempt_id"],
        "{job}"
    );
    fleet.assert_verifies(&job);
    let audit = fleet
        .coordinator
        .cli_json(&["audit", "list", "--limit", "0"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == id)
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["job.attempt", "job.retry", "backup.end"] {
        assert!(
            actions.contains(&action),
            "no {action} for {id}: {actions:?}"
        );
    }
}

/// A database of about 1 GiB, for the coordinator-restart test.
const LARGE_DATABASE_MIB: u32 = 1024;

#[test]
fn a_coordinator_killed_mid_backup_comes_back_and_the_same_job_succeeds() {
    let mut fleet = Fleet::start_with("backup_fault_coordinator_killed", LARGE_DATABASE_MIB);
    let job = fleet.start_backup();
    let id = job["id"].as_str().unwrap().to_string();
    fleet.wait_for_progress(&id);
    let pg_dump = the_pg_dump_of(fleet.agent_pid());

    fleet.coordinator.kill();
    fleet.coordinator.start_again();
    // The new coordinator keeps the job for its agent, which reconnects,
    // holds the attempt, and resumes the upload where it was recorded.
    let job = fleet.job(&id);
    assert!(job_is_active(&job), "{job}");
    // The same pg_dump goes on (paused, not restarted).
    assert!(
        the_pg_dumps_alive(pg_dump),
        "pg_dump was stopped with the coordinator"
    );
    let (job, took) = fleet.wait_for_end(&id, BACKUP_TIMEOUT);
    report("coordinator killed", "the same job ended", took);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["attempts"].as_array().map(Vec::len),
        Some(1),
        "re-attached, not retried: {job}"
    );
    let resumed = resumed_positions(&fleet.agent);
    assert!(
        resumed.iter().any(|position| *position > 0),
        "the upload did not resume past its start (positions {resumed:?})"
    );
    fleet.assert_verifies(&job);
    let audit = fleet
        .coordinator
        .cli_json(&["audit", "list", "--limit", "1000"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "job.reattach" && e["target"] == id.as_str()),
        "no job.reattach for {id}: {audit}"
    );
}

/// The agent reaches the coordinator through a [`TcpProxy`]; the network
/// fails (`fault`) in the middle of a backup, then comes back.
fn network_fault_mid_backup(test_name: &str, fault: ProxyMode, job_end_timeout: Duration) {
    let mut fleet = Fleet::start(test_name);
    let proxy = TcpProxy::start(fleet.coordinator.grpc_address());
    // Enrolled directly; from now on through the proxy.
    fleet.coordinator.route_through(&mut fleet.agent, &proxy);

    let job = fleet.start_backup();
    let id = job["id"].as_str().unwrap();
    let progress = fleet.wait_for_progress(id);
    let pg_dump = the_pg_dump_of(fleet.agent_pid());

    proxy.set_mode(fault);
    // Thirty seconds without the coordinator: the job waits (pg_dump is
    // paused by backpressure, not stopped).
    std::thread::sleep(Duration::from_secs(30));
    let during = fleet.job(id);
    assert!(
        job_is_active(&during),
        "the job ended while cut off: {during}"
    );
    assert!(
        the_pg_dumps_alive(pg_dump),
        "pg_dump was stopped while the network was out"
    );
    proxy.restore();
    let (job, took) = fleet.wait_for_end(id, job_end_timeout);
    report(test_name, "the job ended after the network came back", took);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["attempts"].as_array().map(Vec::len),
        Some(1),
        "resumed, not retried: {job}"
    );
    let resumed = resumed_positions(&fleet.agent);
    assert!(
        resumed.iter().any(|position| *position > 0),
        "the upload did not resume past its start (positions {resumed:?}; {} chunks were \
         stored before the fault)",
        progress["chunks"]
    );
    fleet.assert_verifies(&job);
}

#[test]
fn a_network_cut_for_thirty_seconds_mid_backup_and_the_job_completes() {
    network_fault_mid_backup("backup_fault_network_cut", ProxyMode::Cut, BACKUP_TIMEOUT);
}

#[test]
fn a_silent_network_for_thirty_seconds_mid_backup_and_the_job_completes() {
    network_fault_mid_backup(
        "backup_fault_network_silent",
        ProxyMode::Blackhole,
        BACKUP_TIMEOUT,
    );
}

/// A small tmpfs mounted over a directory; unmounted (lazily, so a busy
/// mount cannot fail a test that already failed) when dropped.
struct Tmpfs {
    path: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        let output = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("cairn-test-full-disk")
            .arg(path));
        assert!(
            output.success(),
            "mounting a {size} tmpfs on {} failed; this test needs root (or CAP_SYS_ADMIN) to \
             give the repository a disk that fills up: {output}",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
            mounted: true,
        }
    }

    /// Moves what the tmpfs holds to the directory under it, then unmounts
    /// it: the chunks stored on the full disk stay in the repository.
    fn unmount_keeping_files(mut self) {
        let staging = self.path.with_extension("from-tmpfs");
        copy_tree(&self.path, &staging);
        let output = run(Command::new("umount").arg(&self.path));
        assert!(output.success(), "{output}");
        self.mounted = false;
        copy_tree(&staging, &self.path);
        std::fs::remove_dir_all(&staging).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let output = run(Command::new("umount").arg("-l").arg(&self.path));
            if !output.success() {
                eprintln!("could not unmount {}: {output}", self.path.display());
            }
        }
    }
}

/// Copies the files under `from` to the same places under `to`, skipping
/// the store's temporary files.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// Ways to break the repository's storage under a running coordinator.
#[derive(Debug, Clone, Copy)]
enum StorageFault {
    /// `chunks/` on an 8 MiB tmpfs: a few chunks fit, then ENOSPC.
    FullDisk,
    /// `chunks/` replaced by a file: no chunk directory can be made.
    ChunksNotADirectory,
}

/// What undoes a [`StorageFault`].
enum Broken {
    Mount(Tmpfs),
    File(PathBuf),
}

impl StorageFault {
    fn inject(self, chunks: &Path) -> Broken {
        match self {
            StorageFault::FullDisk => Broken::Mount(Tmpfs::mount(chunks, "8m")),
            StorageFault::ChunksNotADirectory => {
                let aside = chunks.with_extension("aside");
                std::fs::rename(chunks, &aside).unwrap();
                std::fs::write(chunks, b"not a directory").unwrap();
                Broken::File(aside)
            }
        }
    }
}

impl Broken {
    fn repair(self, chunks: &Path) {
        match self {
            Broken::Mount(tmpfs) => tmpfs.unmount_keeping_files(),
            Broken::File(aside) => {
                std::fs::remove_file(chunks).unwrap();
                std::fs::rename(aside, chunks).unwrap();
            }
        }
    }
}

#[test]
fn a_full_repository_disk_fails_the_job_with_the_storage_error() {
    let fleet = Fleet::start("backup_fault_storage");
    // The store makes `chunks/` with the first chunk; make it now, to break it.
    let chunks = fleet.coordinator.home().join("repository/chunks");
    std::fs::create_dir_all(&chunks).unwrap();

    // (fault, what the job's error says)
    let cases = [
        (StorageFault::ChunksNotADirectory, "Not a directory"),
        (StorageFault::FullDisk, "No space left on device"),
    ];
    // Every case runs (and repairs its fault) before the test fails, so one
    // run tells about all of them.
    let mut problems = Vec::new();
    let mut stored_before_fault = 0;
    for (fault, expected) in cases {
        let broken = fault.inject(&chunks);
        let started = Instant::now();
        let output = fleet.backup_and_wait();
        report(
            &format!("storage {fault:?}"),
            "the backup ended",
            started.elapsed(),
        );
        let job = output.json()[0].clone();
        stored_before_fault = stored_before_fault.max(job["chunks"].as_u64().unwrap());
        if output.status_code != Some(1) || job["status"] != "failed" {
            problems.push(format!(
                "{fault:?}: the backup did not fail although the repository could not store \
                 it (so it is listed): {output}"
            ));
            broken.repair(&chunks);
            continue;
        }
        let error = job["error"].as_str().unwrap_or_default();
        if !(error.contains("repository") && error.contains(expected)) {
            problems.push(format!(
                "{fault:?}: the job's error does not name the repository's error \
                 ({expected:?}): {error:?}"
            ));
        }
        problems.extend(
            fleet
                .listing_problems(&job)
                .into_iter()
                .map(|problem| format!("{fault:?}: {problem}")),
        );
        // The coordinator ends the attempt first, then tells the agent: its
        // pg_dump stops within seconds, not when a resume gives up.
        let ended = Instant::now();
        let mut dumps = pg_dumps_of(fleet.agent_pid());
        while !dumps.is_empty() && ended.elapsed() < STRAY_PG_DUMP_GRACE {
            std::thread::sleep(POLL);
            dumps = pg_dumps_of(fleet.agent_pid());
        }
        if !dumps.is_empty() {
            problems.push(format!(
                "{fault:?}: pg_dump {dumps:?} still runs {}s after the job ended",
                STRAY_PG_DUMP_GRACE.as_secs()
            ));
        }
        broken.repair(&chunks);
    }
    assert!(
        problems.is_empty(),
        "the repository's failures were not reported as failed jobs that say why:\n{}",
        problems.join("\n")
    );

    // Storage repaired, the coordinator stores backups again, reusing what
    // the full disk took before it filled up.
    assert!(
        stored_before_fault >= 2,
        "the full disk took fewer than 2 chunks: make the tmpfs bigger"
    );
    fleet.backup_again_reusing(stored_before_fault);
}
