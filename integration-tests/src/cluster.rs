//! The fleet of a test: a real coordinator (`cairn init` + `cairn serve`)
//! and real agents (`cairn-agent enroll` + `cairn-agent run`), driven
//! through the real operator CLI.
//!
//! The fixtures follow the binaries' command-line contract and nothing
//! else: a coordinator home made by `cairn init`, readiness from
//! `GET /readyz`, tokens from `cairn token create`, an agent that is online
//! when `cairn agents list` says so. Every CLI call is also appended to
//! `logs/cli.log` with its output, so a failing test can be replayed by
//! hand. The coordinator runs as the test's user (root in CI); agents run as
//! `postgres` when that is root, each from its own loopback source address.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::bins::binaries;
use crate::http::{self, HttpResponse};
use crate::net::{LoopbackAddresses, free_port};
use crate::pg::PgCluster;
use crate::process::{self, Output, Process, ProcessBuilder};
use crate::testdir::TestDir;
use crate::{privileges, wait};

/// How long a coordinator may take to answer `/readyz` with 200.
pub const COORDINATOR_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an agent may take to show up as online after it starts.
pub const AGENT_ONLINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables the CLI reads instead of `--coordinator` and
/// `--identity`.
pub const COORDINATOR_ENV: &str = "CAIRN_COORDINATOR";
pub const IDENTITY_ENV: &str = "CAIRN_IDENTITY";

/// The line `cairn init` writes into the `[fleet]` table, which the fixture
/// rewrites to a shorter interval so tests see agents go offline quickly.
const INIT_HEARTBEAT_LINE: &str = "heartbeat_interval = \"5s\"";

/// The `[repository]` table `cairn init` writes, which the fixture replaces
/// when a test asks for another repository.
const INIT_REPOSITORY_TABLE: &str = "[repository]\nkind = \"local\"\npath = \"repository\"\n";

/// How many times `serve` is retried on fresh ports when a port chosen by
/// [`free_port`] was taken before the coordinator bound it.
const PORT_ATTEMPTS: usize = 3;

/// Choices for [`Coordinator::start_with`].
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// Name of the home directory under the test directory and of the log
    /// file `logs/<name>.log`.
    pub name: String,
    /// Replaces `heartbeat_interval = "5s"` in the generated config; `None`
    /// keeps the default.
    pub heartbeat_interval: Option<String>,
    /// More arguments for `cairn init`.
    pub extra_init_args: Vec<String>,
    /// Environment of `cairn serve`.
    pub env: Vec<(String, String)>,
    /// Replaces the `[repository]` table of the generated config (the whole
    /// table, header included); the fixture then runs
    /// `cairn repository init` on it. `None` keeps the local repository.
    pub repository_table: Option<String>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            name: "coordinator".to_string(),
            heartbeat_interval: Some("1s".to_string()),
            extra_init_args: Vec::new(),
            env: Vec::new(),
            repository_table: None,
        }
    }
}

/// A running coordinator of a test. Dropping it kills `cairn serve`.
#[derive(Debug)]
pub struct Coordinator {
    name: String,
    home: PathBuf,
    test_dir: PathBuf,
    logs_dir: PathBuf,
    grpc_port: u16,
    http_port: u16,
    env: Vec<(String, String)>,
    process: Option<Process>,
    loopback_addresses: Mutex<LoopbackAddresses>,
}

impl Coordinator {
    /// `cairn init` + `cairn serve` with default options, in `test_dir`;
    /// returns once `/readyz` answers 200.
    pub fn start(test_dir: &TestDir) -> Coordinator {
        Self::start_with(test_dir, CoordinatorOptions::default())
    }

    /// [`Coordinator::start`] with options.
    pub fn start_with(test_dir: &TestDir, options: CoordinatorOptions) -> Coordinator {
        let home = test_dir.path().join(&options.name);
        assert!(
            !home.exists(),
            "a coordinator named {:?} already exists in {}",
            options.name,
            test_dir.path().display()
        );
        let grpc_port = free_port();
        let http_port = loop {
            let port = free_port();
            if port != grpc_port {
                break port;
            }
        };
        let mut coordinator = Coordinator {
            name: options.name.clone(),
            home,
            test_dir: test_dir.path().to_path_buf(),
            logs_dir: test_dir.logs_dir(),
            grpc_port,
            http_port,
            env: options.env.clone(),
            process: None,
            loopback_addresses: Mutex::new(LoopbackAddresses::new()),
        };
        coordinator.init(&options);
        coordinator.serve_on_free_ports();
        coordinator
    }

    /// The gRPC endpoint for agents and the CLI: `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    pub fn grpc_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.grpc_port))
    }

    /// The plain-HTTP address of `/healthz`, `/readyz` and `/metrics`.
    pub fn http_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port))
    }

    /// `GET path` on the HTTP address; `Err` if nothing answers.
    pub fn http_get(&self, path: &str) -> std::io::Result<HttpResponse> {
        http::get(self.http_address(), path, Duration::from_secs(5))
    }

    /// The coordinator home made by `cairn init`.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `<home>/coordinator.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.home.join("coordinator.toml")
    }

    /// `<home>/admin`: the operator identity (`ca.pem`, `cert.pem`,
    /// `key.pem`) made by `cairn init`.
    pub fn admin_identity(&self) -> PathBuf {
        self.home.join("admin")
    }

    /// `<home>/ca/ca.pem`: the fleet CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.home.join("ca").join("ca.pem")
    }

    /// `<home>/catalog.sqlite`.
    pub fn catalog_path(&self) -> PathBuf {
        self.home.join("catalog.sqlite")
    }

    /// Moves the catalog (and its WAL files) aside into `dir`, so that the
    /// next start, or `rebuild-catalog`, finds none. Stop the coordinator
    /// first.
    pub fn move_catalog_aside(&self, dir: &Path) {
        let catalog = self.catalog_path();
        std::fs::rename(&catalog, dir.join("old-catalog.sqlite"))
            .unwrap_or_else(|e| panic!("move {} aside: {e}", catalog.display()));
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", catalog.display()));
        }
    }

    /// Every chunk object of the local repository
    /// (`<home>/repository/chunks/*/*`), sorted.
    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let chunks = self.home.join("repository").join("chunks");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&chunks)
            .unwrap_or_else(|e| panic!("read {}: {e}", chunks.display()))
            .flatten()
            .flat_map(|dir| {
                std::fs::read_dir(dir.path())
                    .unwrap_or_else(|e| panic!("read {}: {e}", dir.path().display()))
                    .flatten()
            })
            .map(|entry| entry.path())
            .collect();
        files.sort();
        files
    }

    /// The `cairn serve` process; panics while it is stopped.
    pub fn process(&self) -> &Process {
        self.process
            .as_ref()
            .unwrap_or_else(|| panic!("coordinator {} is not running", self.name))
    }

    /// The environment that points the CLI at this coordinator as admin:
    /// `CAIRN_COORDINATOR` and `CAIRN_IDENTITY`.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            (COORDINATOR_ENV.to_string(), self.url()),
            (
                IDENTITY_ENV.to_string(),
                self.admin_identity().display().to_string(),
            ),
        ]
    }

    /// `cairn ARGS` as admin of this coordinator, not yet run; for callers
    /// that want the output on their own terminal.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut builder = ProcessBuilder::new(
            "cli",
            &binaries().cairn,
            self.logs_dir.join("cli.log"),
            &self.test_dir,
        )
        .args(args);
        for (key, value) in self.cli_env() {
            builder = builder.env(key, value);
        }
        builder.command()
    }

    /// Runs `cairn ARGS` as admin of this coordinator and returns its output,
    /// success or not. The call and its output are appended to
    /// `logs/cli.log`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let output = process::run(&mut self.cli_command(args));
        self.record_cli(args, &output);
        output
    }

    /// `cairn operators issue --name NAME --role ROLE --out DIR` as admin,
    /// asserting success: a new operator identity in `out`.
    pub fn issue_operator(&self, name: &str, role: &str, out: &Path) {
        let out = out.to_str().expect("a UTF-8 identity directory");
        self.cli(&[
            "operators",
            "issue",
            "--name",
            name,
            "--role",
            role,
            "--out",
            out,
        ])
        .assert_success();
    }

    /// Runs `cairn ARGS --identity IDENTITY`: as another operator.
    pub fn cli_as(&self, identity: &Path, args: &[&str]) -> Output {
        let mut args = args.to_vec();
        args.extend([
            "--identity",
            identity.to_str().expect("a UTF-8 identity directory"),
        ]);
        self.cli(&args)
    }

    /// Runs `cairn ARGS --output json` (the flag added unless `args` has
    /// `--output`), asserts success and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        if !args
            .iter()
            .any(|arg| *arg == "--output" || arg.starts_with("--output="))
        {
            args.extend(["--output", "json"]);
        }
        self.cli(&args).assert_success().json()
    }

    /// `cairn agents list --output json` as an array.
    /// `cairn backup run --agent AGENT --database DATABASE --wait`, which
    /// must succeed; returns the new backup's id.
    pub fn backup(&self, agent: &str, database: &str) -> String {
        let jobs = self
            .cli(&[
                "backup",
                "run",
                "--agent",
                agent,
                "--database",
                database,
                "--wait",
                "--output",
                "json",
            ])
            .assert_success()
            .json();
        assert_eq!(jobs[0]["status"], "succeeded", "{jobs}");
        jobs[0]["backup_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no backup_id in {jobs}"))
            .to_string()
    }

    pub fn agents(&self) -> Vec<Value> {
        match self.cli_json(&["agents", "list"]) {
            Value::Array(agents) => agents,
            other => panic!("`cairn agents list --output json` did not print an array: {other}"),
        }
    }

    /// The `status` of agent `name` in `cairn agents list`, `None` if it is
    /// not listed.
    pub fn agent_status(&self, name: &str) -> Option<String> {
        self.agents()
            .into_iter()
            .find(|agent| agent["name"] == name)
            .map(|agent| agent["status"].as_str().unwrap_or_default().to_string())
    }

    /// Waits until `cairn agents list` shows agent `name` with `status`
    /// (`online`, `offline`, `revoked`).
    pub fn wait_for_agent_status(&self, name: &str, status: &str, timeout: Duration) {
        wait::wait_until(
            timeout,
            Duration::from_millis(200),
            &format!("`cairn agents list` shows agent {name} as {status}"),
            || self.agent_status(name).as_deref() == Some(status),
        );
    }

    /// Creates a one-time enrollment token for agent `name` with
    /// `cairn token create`.
    pub fn create_token(&self, name: &str, ttl: &str) -> String {
        let created = self.cli_json(&["token", "create", "--agent", name, "--ttl", ttl]);
        created["token"]
            .as_str()
            .unwrap_or_else(|| panic!("`cairn token create` printed no \"token\": {created}"))
            .to_string()
    }

    /// The next unused loopback source address for an agent of this test.
    pub fn next_source_address(&self) -> Ipv4Addr {
        self.loopback_addresses
            .lock()
            .expect("loopback address mutex poisoned")
            .next_address()
    }

    /// Enrolls and starts an agent named `name` for `postgres`: a token from
    /// the CLI, `cairn-agent enroll` from a fresh loopback address, then
    /// `cairn-agent run`; by default waits until the agent is online.
    pub fn enroll_agent(&self, name: &str, postgres: &PgCluster, options: AgentOptions) -> Agent {
        let dir = self.agents_dir().join(name);
        assert!(
            !dir.exists(),
            "an agent named {name:?} already exists in this test"
        );
        let token = self.create_token(name, &options.token_ttl);
        let source_address = options
            .source_address
            .unwrap_or_else(|| self.next_source_address());
        let connstring = options
            .postgres_connstring
            .clone()
            .unwrap_or_else(|| postgres.connstring());

        let mut enroll_args: Vec<String> = vec![
            "enroll".into(),
            "--coordinator".into(),
            self.url(),
            "--token".into(),
            token,
            "--dir".into(),
            dir.display().to_string(),
            "--postgres".into(),
            connstring,
            "--instance-name".into(),
            options.instance_name.clone(),
            "--source-address".into(),
            source_address.to_string(),
        ];
        if let Some(interval) = &options.probe_interval {
            enroll_args.extend(["--probe-interval".into(), interval.clone()]);
        }
        for (key, value) in &options.labels {
            enroll_args.extend(["--label".into(), format!("{key}={value}")]);
        }
        for kind in &options.allow {
            enroll_args.extend(["--allow".into(), kind.clone()]);
        }
        enroll_args.extend(options.extra_enroll_args.iter().cloned());

        let mut agent = Agent {
            name: name.to_string(),
            config_path: dir.join("agent.toml"),
            dir,
            source_address,
            log_path: self.logs_dir.join(format!("agent-{name}.log")),
            test_dir: self.test_dir.clone(),
            env: options.env.clone(),
            process: None,
        };
        let enroll = process::run(&mut agent.builder().args(&enroll_args).command());
        append_to_log(&agent.log_path, &enroll);
        assert!(
            enroll.success(),
            "`cairn-agent enroll` of {name} failed: {enroll}"
        );
        assert!(
            agent.config_path.is_file(),
            "`cairn-agent enroll` succeeded but wrote no {}",
            agent.config_path.display()
        );

        agent.start();
        if options.wait_online {
            self.wait_until_online(&agent);
        }
        agent
    }

    /// The directory (owned by `postgres`) that holds this test's agent
    /// directories; created on first use.
    pub fn agents_dir(&self) -> PathBuf {
        let dir = self.test_dir.join("agents");
        privileges::create_dir_for_postgres(&dir);
        dir
    }

    /// Runs `cairn-agent ARGS` once, as `postgres` when root, and returns its
    /// output, success or not (for enrollment failures and config errors).
    /// The call is appended to `logs/agent-cli.log`.
    pub fn agent_cli(&self, args: &[&str]) -> Output {
        let log = self.logs_dir.join("agent-cli.log");
        let mut command =
            ProcessBuilder::new("agent-cli", &binaries().cairn_agent, &log, &self.test_dir)
                .as_postgres(true)
                .args(args)
                .command();
        let output = process::run(&mut command);
        append_to_log(&log, &output);
        output
    }

    /// Waits until `agent` is online; panics with the agent's log if its
    /// process exits first.
    pub fn wait_until_online(&self, agent: &Agent) {
        wait::wait_until(
            AGENT_ONLINE_TIMEOUT,
            Duration::from_millis(200),
            &format!("`cairn agents list` shows agent {} as online", agent.name),
            || {
                if let Some(status) = agent.process().try_exit_status() {
                    panic!(
                        "agent {} exited ({status}) before coming online; end of its log:\n{}",
                        agent.name,
                        agent.process().log_tail(40)
                    );
                }
                self.agent_status(&agent.name).as_deref() == Some("online")
            },
        );
    }

    /// Makes `agent` reach this coordinator through `proxy` (a
    /// [`crate::proxy::TcpProxy`] to [`Coordinator::grpc_address`]), so
    /// that a test can cut the network between them: stops the agent,
    /// points its `agent.toml` at the proxy (the TLS stays valid: the
    /// server certificate names 127.0.0.1, as does the proxy's address),
    /// starts it, and waits until it is online through the proxy.
    pub fn route_through(&self, agent: &mut Agent, proxy: &crate::proxy::TcpProxy) {
        agent.stop();
        self.wait_for_agent_status(&agent.name, "offline", AGENT_ONLINE_TIMEOUT);
        let config = std::fs::read_to_string(&agent.config_path).unwrap();
        let direct = format!("coordinator = \"{}\"", self.url());
        assert!(
            config.contains(&direct),
            "{} has no line `{direct}` to point at the proxy:\n{config}",
            agent.config_path.display()
        );
        let via_proxy = format!("coordinator = \"https://{}\"", proxy.address());
        std::fs::write(&agent.config_path, config.replace(&direct, &via_proxy)).unwrap();
        agent.start();
        wait::wait_until(
            AGENT_ONLINE_TIMEOUT,
            Duration::from_millis(200),
            &format!("agent {} is online through the proxy", agent.name),
            || proxy.accepted() > 0 && self.agent_status(&agent.name).as_deref() == Some("online"),
        );
    }

    /// SIGTERM, then `cairn serve` again on the same ports and home; returns
    /// once ready.
    pub fn restart(&mut self) {
        if let Some(process) = self.process.take() {
            process.terminate();
        }
        self.serve()
            .unwrap_or_else(|log| panic!("coordinator {} did not restart:\n{log}", self.name));
    }

    /// SIGTERM and waits for the exit; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let process = self
            .process
            .take()
            .unwrap_or_else(|| panic!("coordinator {} is not running", self.name));
        process.terminate()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) -> ExitStatus {
        let process = self
            .process
            .take()
            .unwrap_or_else(|| panic!("coordinator {} is not running", self.name));
        process.kill()
    }

    /// `cairn serve` again after [`Coordinator::stop`] or
    /// [`Coordinator::kill`].
    pub fn start_again(&mut self) {
        assert!(
            self.process.is_none(),
            "coordinator {} is already running",
            self.name
        );
        self.serve()
            .unwrap_or_else(|log| panic!("coordinator {} did not start again:\n{log}", self.name));
    }

    /// [`Coordinator::start_again`] for a start that may fail: the error
    /// holds the end of the log.
    pub fn try_start_again(&mut self) -> Result<(), String> {
        assert!(
            self.process.is_none(),
            "coordinator {} is already running",
            self.name
        );
        self.serve()
    }

    /// Lets `cairn serve` outlive this handle and returns its pid (used by
    /// `cargo xtask demo --keep`).
    pub fn keep_running(mut self) -> u32 {
        self.process
            .take()
            .unwrap_or_else(|| panic!("coordinator {} is not running", self.name))
            .keep_running()
    }

    fn init(&self, options: &CoordinatorOptions) {
        let grpc_listen = format!("127.0.0.1:{}", self.grpc_port);
        let http_listen = format!("127.0.0.1:{}", self.http_port);
        let mut args = vec![
            "init",
            "--dir",
            self.home.to_str().expect("the coordinator home is UTF-8"),
            "--grpc-listen",
            &grpc_listen,
            "--http-listen",
            &http_listen,
        ];
        args.extend(options.extra_init_args.iter().map(String::as_str));
        let output = process::run(&mut self.serve_builder().args(&args).command());
        append_to_log(&self.log_path(), &output);
        assert!(output.success(), "`cairn init` failed: {output}");

        if let Some(table) = &options.repository_table {
            self.replace_repository_table(table);
        }
        if let Some(interval) = &options.heartbeat_interval {
            let config_path = self.config_path();
            let config = std::fs::read_to_string(&config_path)
                .unwrap_or_else(|e| panic!("read {}: {e}", config_path.display()));
            assert!(
                config.contains(INIT_HEARTBEAT_LINE),
                "{} has no line `{INIT_HEARTBEAT_LINE}` to shorten; the fixture follows the \
                 `cairn init` contract and needs updating:\n{config}",
                config_path.display()
            );
            let config = config.replace(
                INIT_HEARTBEAT_LINE,
                &format!("heartbeat_interval = \"{interval}\""),
            );
            std::fs::write(&config_path, config)
                .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
        }
    }

    /// Points the config at another repository and creates it there with
    /// `cairn repository init`, as an operator would.
    fn replace_repository_table(&self, table: &str) {
        let config_path = self.config_path();
        let config = std::fs::read_to_string(&config_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", config_path.display()));
        assert!(
            config.contains(INIT_REPOSITORY_TABLE),
            "{} has no local `[repository]` table to replace; the fixture follows the \
             `cairn init` contract and needs updating:\n{config}",
            config_path.display()
        );
        std::fs::write(&config_path, config.replace(INIT_REPOSITORY_TABLE, table))
            .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
        let config_arg = config_path.to_str().expect("the config path is UTF-8");
        let output = process::run(
            &mut self
                .serve_builder()
                .args(["repository", "init", "--config", config_arg])
                .command(),
        );
        append_to_log(&self.log_path(), &output);
        assert!(output.success(), "`cairn repository init` failed: {output}");
    }

    fn log_path(&self) -> PathBuf {
        self.logs_dir.join(format!("{}.log", self.name))
    }

    fn serve_builder(&self) -> ProcessBuilder {
        let mut builder = ProcessBuilder::new(
            &self.name,
            &binaries().cairn,
            self.log_path(),
            &self.test_dir,
        );
        for (key, value) in &self.env {
            builder = builder.env(key, value);
        }
        builder
    }

    /// Serves, moving to fresh ports when the chosen ones were taken.
    fn serve_on_free_ports(&mut self) {
        for attempt in 1..=PORT_ATTEMPTS {
            let log_before = std::fs::metadata(self.log_path())
                .map(|m| m.len())
                .unwrap_or(0);
            let Err(log) = self.serve() else {
                return;
            };
            let new_log = log_since(&self.log_path(), log_before);
            let port_taken = new_log
                .to_ascii_lowercase()
                .contains("address already in use")
                || new_log.contains("AddrInUse");
            if !(port_taken && attempt < PORT_ATTEMPTS) {
                panic!("coordinator {} did not start:\n{log}", self.name);
            }
            self.move_to_fresh_ports();
        }
    }

    fn move_to_fresh_ports(&mut self) {
        let config_path = self.config_path();
        let mut config = std::fs::read_to_string(&config_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", config_path.display()));
        for port in [&mut self.grpc_port, &mut self.http_port] {
            let fresh = free_port();
            config = config.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{fresh}"));
            *port = fresh;
        }
        std::fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
    }

    /// Spawns `cairn serve` and waits for `/readyz`; on failure returns a
    /// description with the end of the log (the process is gone then).
    fn serve(&mut self) -> Result<(), String> {
        let config_path = self.config_path();
        let process = self
            .serve_builder()
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .spawn();
        let outcome = wait::wait_for(
            COORDINATOR_READY_TIMEOUT,
            Duration::from_millis(50),
            &format!(
                "coordinator {} answers GET http://{}/readyz with 200",
                self.name,
                self.http_address()
            ),
            || {
                if let Some(status) = process.try_exit_status() {
                    return Some(Err(format!(
                        "`cairn serve` exited ({status}) before it was ready; end of its log:\n{}",
                        process.log_tail(40)
                    )));
                }
                match self.http_get("/readyz") {
                    Ok(response) if response.status == 200 => Some(Ok(())),
                    _ => None,
                }
            },
        );
        if outcome.is_ok() {
            self.process = Some(process);
        }
        outcome
    }

    fn record_cli(&self, args: &[&str], output: &Output) {
        let mut entry = format!("$ cairn {}\n", args.join(" "));
        let _ = writeln!(entry, "{output}");
        let path = self.logs_dir.join("cli.log");
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = file.write_all(entry.as_bytes());
        }
    }
}

/// Choices for [`Coordinator::enroll_agent`]; build on
/// `AgentOptions::default()`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `--instance-name`; `main` by default.
    pub instance_name: String,
    /// `--label k=v`, in order.
    pub labels: Vec<(String, String)>,
    /// `--allow KIND`; empty leaves the agent's default.
    pub allow: Vec<String>,
    /// `--source-address`; the coordinator's next loopback address if unset.
    pub source_address: Option<Ipv4Addr>,
    /// `--probe-interval`; `1s` by default, `None` leaves the agent's default.
    pub probe_interval: Option<String>,
    /// `--ttl` of the enrollment token.
    pub token_ttl: String,
    /// `--postgres`; the cluster's [`PgCluster::connstring`] if unset.
    pub postgres_connstring: Option<String>,
    /// More arguments for `cairn-agent enroll`.
    pub extra_enroll_args: Vec<String>,
    /// Environment of the agent (enroll and run).
    pub env: Vec<(String, String)>,
    /// Wait until `cairn agents list` shows the agent online (default).
    pub wait_online: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            instance_name: "main".to_string(),
            labels: Vec::new(),
            allow: Vec::new(),
            source_address: None,
            probe_interval: Some("1s".to_string()),
            token_ttl: "10m".to_string(),
            postgres_connstring: None,
            extra_enroll_args: Vec::new(),
            env: Vec::new(),
            wait_online: true,
        }
    }
}

impl AgentOptions {
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    pub fn allow(mut self, kind: &str) -> Self {
        self.allow.push(kind.to_string());
        self
    }

    pub fn instance_name(mut self, name: &str) -> Self {
        self.instance_name = name.to_string();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Do not wait for the agent to come online.
    pub fn no_wait(mut self) -> Self {
        self.wait_online = false;
        self
    }
}

/// An enrolled agent of a test, running `cairn-agent run` (as `postgres`
/// when root). Dropping it kills the process.
#[derive(Debug)]
pub struct Agent {
    name: String,
    dir: PathBuf,
    config_path: PathBuf,
    source_address: Ipv4Addr,
    log_path: PathBuf,
    test_dir: PathBuf,
    env: Vec<(String, String)>,
    process: Option<Process>,
}

impl Agent {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's directory made by `cairn-agent enroll`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/agent.toml`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The loopback address the agent connects from.
    pub fn source_address(&self) -> Ipv4Addr {
        self.source_address
    }

    /// The `cairn-agent run` process; panics while it is stopped.
    pub fn process(&self) -> &Process {
        self.process
            .as_ref()
            .unwrap_or_else(|| panic!("agent {} is not running", self.name))
    }

    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(Process::is_running)
    }

    /// SIGTERM and waits; then `cairn-agent run` again with the same config.
    /// Does not wait for it to come online: see
    /// [`Coordinator::wait_until_online`].
    pub fn restart(&mut self) {
        if let Some(process) = self.process.take() {
            process.terminate();
        }
        self.start();
    }

    /// SIGTERM and waits for the exit; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.process
            .take()
            .unwrap_or_else(|| panic!("agent {} is not running", self.name))
            .terminate()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) -> ExitStatus {
        self.process
            .take()
            .unwrap_or_else(|| panic!("agent {} is not running", self.name))
            .kill()
    }

    /// `cairn-agent run` (again, after [`Agent::stop`] or [`Agent::kill`]).
    pub fn start(&mut self) {
        assert!(
            self.process.is_none(),
            "agent {} is already running",
            self.name
        );
        let process = self
            .builder()
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .spawn();
        self.process = Some(process);
    }

    /// Lets the agent outlive this handle and returns its pid (used by
    /// `cargo xtask demo --keep`).
    pub fn keep_running(mut self) -> u32 {
        self.process
            .take()
            .unwrap_or_else(|| panic!("agent {} is not running", self.name))
            .keep_running()
    }

    fn builder(&self) -> ProcessBuilder {
        let mut builder = ProcessBuilder::new(
            &format!("agent-{}", self.name),
            &binaries().cairn_agent,
            &self.log_path,
            &self.test_dir,
        )
        .as_postgres(true);
        for (key, value) in &self.env {
            builder = builder.env(key, value);
        }
        builder
    }
}

/// Appends a one-shot command's output to a process log, so `init` and
/// `enroll` show up next to what `serve` and `run` logged afterwards.
fn append_to_log(path: &Path, output: &Output) {
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(file, "==== fixture: ran {output}");
    }
}

fn log_since(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
