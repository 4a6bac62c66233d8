//! Real processes of a test: spawned with their output appended to
//! `<test dir>/logs/<name>.log`, and stopped, paused or killed on purpose to
//! test faults. Dropping a [`Process`] kills it, so nothing outlives a test.
//!
//! Also [`run`], for one-shot commands whose output the test inspects.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::testdir::TestDir;
use crate::{privileges, wait};

static NEW_PROCESS_GROUPS: AtomicBool = AtomicBool::new(false);

/// Starts every process the fixtures spawn from now on (including
/// PostgreSQL through `pg_ctl`) in a process group of its own, so that a
/// Ctrl-C in the terminal reaches only the driving program, which then stops
/// them in order. For `cargo xtask demo`. Tests leave it off, so that a test
/// runner that kills a test's process group also kills what it started.
pub fn set_new_process_groups(enabled: bool) {
    NEW_PROCESS_GROUPS.store(enabled, Ordering::SeqCst);
}

/// Applies [`set_new_process_groups`] to a command about to be spawned.
pub fn apply_process_group(command: &mut Command) -> &mut Command {
    if NEW_PROCESS_GROUPS.load(Ordering::SeqCst) {
        command.process_group(0);
    }
    command
}

/// How to start a [`Process`]; made by [`Process::builder`].
#[derive(Debug)]
pub struct ProcessBuilder {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log_path: PathBuf,
    current_dir: PathBuf,
    as_postgres: bool,
}

impl ProcessBuilder {
    /// A builder for `program` named `name`, its output appended to
    /// `log_path`, run in `current_dir`. [`Process::builder`] fills these in
    /// from a [`TestDir`].
    pub fn new(
        name: &str,
        program: impl Into<PathBuf>,
        log_path: impl Into<PathBuf>,
        current_dir: impl Into<PathBuf>,
    ) -> Self {
        ProcessBuilder {
            name: name.to_string(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            log_path: log_path.into(),
            current_dir: current_dir.into(),
            as_postgres: false,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_os_string()));
        self
    }

    /// Sets an environment variable. The child inherits the test's
    /// environment except `CAIRN_*` variables, so a developer's shell cannot
    /// leak into a test.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Appends output to this file instead of `logs/<name>.log`.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_path = path.into();
        self
    }

    /// Working directory; the test directory by default.
    pub fn current_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.current_dir = path.into();
        self
    }

    /// Runs the process as the `postgres` OS user when the tests run as root
    /// (agents, and anything that touches a data directory).
    pub fn as_postgres(mut self, as_postgres: bool) -> Self {
        self.as_postgres = as_postgres;
        self
    }

    /// The command as it would be spawned, for one-shot use with [`run`].
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args).current_dir(&self.current_dir);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CAIRN_") {
                command.env_remove(key);
            }
        }
        command.env("RUST_BACKTRACE", "1");
        if self.as_postgres {
            privileges::run_as_postgres(&mut command);
        }
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        apply_process_group(&mut command);
        command
    }

    /// Spawns the process, its stdout and stderr appended to the log file
    /// after a line naming the command.
    pub fn spawn(self) -> Process {
        let mut command = self.command();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open the log file {}: {e}", self.log_path.display()));
        writeln!(log, "==== fixture: starting {command:?}").expect("write to a log file");
        let stderr_log = log.try_clone().expect("duplicate a log file descriptor");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr_log));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} ({}): {e}", self.name, self.program.display()));
        Process {
            name: self.name,
            pid: child.id(),
            child: Mutex::new(child),
            log_path: self.log_path,
            kept: false,
        }
    }
}

/// A running process of a test. Dropping it kills it with SIGKILL and reaps
/// it; to stop it cleanly call [`Process::terminate`].
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: u32,
    child: Mutex<Child>,
    log_path: PathBuf,
    kept: bool,
}

/// How long [`Process::terminate`] waits before calling a process hung.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

impl Process {
    /// A builder for `program` named `name`: output to
    /// `<test dir>/logs/<name>.log`, working directory the test directory.
    pub fn builder(test_dir: &TestDir, name: &str, program: impl Into<PathBuf>) -> ProcessBuilder {
        ProcessBuilder::new(name, program, test_dir.log_path(name), test_dir.path())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process (and earlier processes sharing the log file)
    /// wrote so far.
    pub fn log(&self) -> String {
        let bytes = std::fs::read(&self.log_path)
            .unwrap_or_else(|e| panic!("read the log file {}: {e}", self.log_path.display()));
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process has not exited yet (a paused process is running).
    pub fn is_running(&self) -> bool {
        self.try_exit_status().is_none()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .expect("process mutex poisoned")
            .try_wait()
            .unwrap_or_else(|e| panic!("check whether {} exited: {e}", self.name))
    }

    /// Sends `signal` to the process; a process that already exited is not
    /// an error.
    pub fn signal(&self, signal: Signal) {
        if self.try_exit_status().is_some() {
            return;
        }
        match signal::kill(Pid::from_raw(self.pid as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => panic!("send {signal} to {} (pid {}): {e}", self.name, self.pid),
        }
    }

    /// Waits up to `timeout` for the process to exit on its own and returns
    /// its status; panics with the end of its log if it does not.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        wait::wait_for(
            timeout,
            Duration::from_millis(20),
            &format!("{} (pid {}) exits", self.name, self.pid),
            || self.try_exit_status(),
        )
    }

    /// SIGTERM (after SIGCONT, in case it was paused), then waits up to
    /// `timeout` for the exit and returns its status. A process that ignores
    /// SIGTERM is killed and the call panics with the end of its log:
    /// graceful shutdown is part of the contract.
    pub fn terminate_within(&self, timeout: Duration) -> ExitStatus {
        self.resume();
        self.signal(Signal::SIGTERM);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                let status = self.kill();
                panic!(
                    "{} (pid {}) did not exit within {:.1}s of SIGTERM; killed ({status}). End of its log:\n{}",
                    self.name,
                    self.pid,
                    timeout.as_secs_f64(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Process::terminate_within`] with [`TERMINATE_TIMEOUT`].
    pub fn terminate(&self) -> ExitStatus {
        self.terminate_within(TERMINATE_TIMEOUT)
    }

    /// SIGKILL, and reaps the process; returns its status.
    pub fn kill(&self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.child
            .lock()
            .expect("process mutex poisoned")
            .wait()
            .unwrap_or_else(|e| panic!("wait for {} after SIGKILL: {e}", self.name))
    }

    /// SIGSTOP: the process keeps its sockets but stops responding, like a
    /// hung host.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// Lets the process outlive this handle and returns its pid (used by
    /// `cargo xtask demo --keep`).
    pub fn keep_running(mut self) -> u32 {
        self.kept = true;
        self.pid
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if std::thread::panicking() {
            let tail = std::fs::read(&self.log_path)
                .map(|bytes| {
                    let log = String::from_utf8_lossy(&bytes).into_owned();
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(30)..].join("\n")
                })
                .unwrap_or_default();
            eprintln!(
                "---- last lines of {} ({}):\n{tail}\n----",
                self.name,
                self.log_path.display()
            );
        }
        let Ok(mut child) = self.child.lock() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = signal::kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// The result of a one-shot command.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// The exit code, `None` when killed by a signal.
    pub status_code: Option<i32>,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status_code == Some(0)
    }

    /// Panics with the whole output unless the command succeeded.
    pub fn assert_success(self) -> Self {
        assert!(self.success(), "command failed: {self}");
        self
    }

    /// Panics with the whole output unless the command failed.
    pub fn assert_failure(self) -> Self {
        assert!(!self.success(), "command unexpectedly succeeded: {self}");
        self
    }

    /// stdout parsed as JSON; panics with the output if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.status_code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "unknown status".to_string(),
        };
        write!(
            f,
            "{}\n  {status}\n  stdout:\n{}\n  stderr:\n{}",
            self.command,
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}

/// Runs `command` to completion with stdin closed, capturing stdout and
/// stderr. Failing to start it at all is a panic; a non-zero exit is not.
pub fn run(command: &mut Command) -> Output {
    let description = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {description}: {e}"));
    Output {
        command: description,
        status_code: output.status.code(),
        signal: output.status.signal(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Like [`run`], with `input` written to the command's stdin (from a
/// separate thread, so a command that writes a lot before reading all its
/// input cannot deadlock).
pub fn run_with_stdin(command: &mut Command, input: &[u8]) -> Output {
    use std::io::Write as _;
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {description}: {e}"));
    let mut stdin = child.stdin.take().expect("the child's stdin is piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A command may exit without reading all of its input; its exit
        // status tells what went wrong, not the broken pipe.
        let _ = stdin.write_all(&input);
    });
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {description}: {e}"));
    let _ = writer.join();
    Output {
        command: description,
        status_code: output.status.code(),
        signal: output.status.signal(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
