//! Throwaway PostgreSQL clusters for tests: `initdb` into a fresh
//! directory, `pg_ctl start` on a free port of 127.0.0.1 and a short unix
//! socket directory, and `pg_ctl stop` plus removal on drop.
//!
//! The server binaries come from `pg_config --bindir`, else from the newest
//! `/usr/lib/postgresql/*/bin`; a missing binary fails the test with the
//! package to install, never skips it. Every PostgreSQL command runs with a
//! cleared environment (so a developer's `PG*` variables cannot point a test
//! at a real server) and, when the tests run as root, as the `postgres` OS
//! user (see [`crate::privileges`]).
//!
//! Settings favour speed over durability (`fsync = off`) and allow streaming
//! replication (`wal_level = replica`), so [`PgCluster::standby_of`] can make
//! a standby with `pg_basebackup -R -X stream`.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{self, Output};
use crate::testdir::TestDir;
use crate::{net, privileges, wait};

/// The package that provides the binaries, named in failure messages.
const INSTALL_HINT: &str = "install postgresql-15 (apt-get install postgresql-15)";

/// How long `pg_ctl` may take to start or stop a cluster.
const PG_CTL_TIMEOUT_SECONDS: u32 = 60;

/// How many times a start is retried with another port when the port was
/// taken between choosing and binding it.
const PORT_ATTEMPTS: usize = 5;

/// The directory holding `initdb`, `pg_ctl`, `postgres`, `psql`, ...
pub fn pg_bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(find_bindir)
}

fn find_bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .filter(|dir| dir.join("initdb").is_file());
    if let Some(dir) = from_pg_config {
        return dir;
    }
    // Debian and Ubuntu install each major version side by side.
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bindir = entry.path().join("bin");
            bindir.join("initdb").is_file().then_some((major, bindir))
        })
        .max_by_key(|(major, _)| *major);
    match newest {
        Some((_, dir)) => dir,
        None => panic!(
            "PostgreSQL server binaries not found (no `pg_config --bindir` with `initdb` in it, \
             nothing in /usr/lib/postgresql/*/bin): {INSTALL_HINT}"
        ),
    }
}

/// The path of a PostgreSQL program; panics with the fix if it is missing.
pub fn pg_binary(name: &str) -> PathBuf {
    let path = pg_bindir().join(name);
    assert!(
        path.is_file(),
        "the PostgreSQL program `{name}` is not in {}: {INSTALL_HINT}",
        pg_bindir().display()
    );
    path
}

/// A command for a PostgreSQL program with a cleared environment, run as
/// `postgres` when the tests run as root, in the working directory `cwd`.
fn pg_tool_command(program: &str, cwd: &Path) -> Command {
    let mut command = Command::new(pg_binary(program));
    command
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", pg_bindir().display()),
        )
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .current_dir(cwd);
    privileges::run_as_postgres(&mut command);
    process::apply_process_group(&mut command);
    command
}

/// Where a cluster lives and what it is called; set by
/// [`PgCluster::builder`].
#[derive(Debug)]
pub struct PgClusterBuilder {
    name: String,
    test_dir: Option<(PathBuf, PathBuf)>,
    settings: Vec<(String, String)>,
    upstream: Option<Upstream>,
    tmpfs_size: Option<String>,
}

/// The primary a standby streams from.
#[derive(Debug, Clone)]
struct Upstream {
    socket_dir: PathBuf,
    port: u16,
}

impl PgClusterBuilder {
    /// Names the cluster in paths and logs (`pg-<name>`,
    /// `logs/postgres-<name>.log`); `main` by default.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Puts the cluster under the test's directory, its log in the test's
    /// `logs/`. Without it the cluster gets a temporary directory of its own.
    pub fn in_test_dir(mut self, test_dir: &TestDir) -> Self {
        self.test_dir = Some((test_dir.path().to_path_buf(), test_dir.logs_dir()));
        self
    }

    /// Adds a `postgresql.conf` setting; `value` is written as is, so quote
    /// strings: `.setting("log_statement", "'all'")`.
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// Puts the whole cluster on a tmpfs of `size` (like `64m`), for tests
    /// of a host short of disk space. Needs root; unmounted when dropped.
    pub fn on_tmpfs(mut self, size: &str) -> Self {
        self.tmpfs_size = Some(size.to_string());
        self
    }

    /// Makes the cluster a streaming standby of `primary` (with
    /// `pg_basebackup -R -X stream`) instead of running `initdb`.
    pub fn standby_of(mut self, primary: &PgCluster) -> Self {
        self.upstream = Some(Upstream {
            socket_dir: primary.socket_dir.clone(),
            port: primary.port,
        });
        self
    }

    /// Creates the cluster and starts it; returns once it accepts
    /// connections.
    pub fn start(self) -> PgCluster {
        let (base_dir, log_path, test_dir) = match &self.test_dir {
            Some((test_dir, logs_dir)) => {
                let base_dir = test_dir.join(format!("pg-{}", self.name));
                assert!(
                    !base_dir.exists(),
                    "a PostgreSQL cluster named {:?} already exists in {}; give the new one \
                     another name",
                    self.name,
                    test_dir.display()
                );
                let log_path = logs_dir.join(format!("postgres-{}.log", self.name));
                (base_dir, log_path, Some(test_dir.clone()))
            }
            None => {
                let base_dir = tempfile::Builder::new()
                    .prefix(&format!("cairn-pg-{}-", self.name))
                    .tempdir_in("/tmp")
                    .expect("create a directory for a PostgreSQL cluster under /tmp")
                    .keep();
                let log_path = base_dir.join("postgres.log");
                (base_dir, log_path, None)
            }
        };
        if let Some(size) = &self.tmpfs_size {
            std::fs::create_dir_all(&base_dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", base_dir.display()));
            let output = process::run(
                Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
                    .arg("cairn-test-pg")
                    .arg(&base_dir),
            );
            assert!(
                output.success(),
                "mounting a {size} tmpfs on {} needs root: {output}",
                base_dir.display()
            );
        }
        privileges::create_dir_for_postgres(&base_dir);
        std::fs::write(&log_path, b"")
            .unwrap_or_else(|e| panic!("create the log file {}: {e}", log_path.display()));
        privileges::chown_to_postgres(&log_path);

        // Unix socket paths are limited to about 107 bytes, and the data
        // directory may be deep, so the sockets get a short directory of
        // their own.
        let socket_dir = tempfile::Builder::new()
            .prefix("cpg")
            .tempdir_in("/tmp")
            .expect("create a socket directory under /tmp")
            .keep();
        privileges::create_dir_for_postgres(&socket_dir);

        let mut cluster = PgCluster {
            on_tmpfs: self.tmpfs_size.is_some(),
            name: self.name,
            data_dir: base_dir.join("data"),
            base_dir,
            socket_dir,
            log_path,
            port: 0,
            test_dir,
            running: false,
            kept: false,
        };
        match &self.upstream {
            None => cluster.initdb(),
            Some(upstream) => cluster.base_backup(upstream),
        }
        cluster.append_settings(&self.settings);
        cluster.start_on_a_free_port();
        cluster
    }
}

/// A running PostgreSQL cluster of a test. Dropping it stops the server
/// (`pg_ctl stop -m immediate`) and removes its directories, except when the
/// test panicked: then they are kept and their paths printed.
#[derive(Debug)]
pub struct PgCluster {
    name: String,
    base_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    /// The test directory the cluster lives in, if any; standbys go there too.
    test_dir: Option<PathBuf>,
    running: bool,
    kept: bool,
    /// `base_dir` is a tmpfs mount of the fixture's.
    on_tmpfs: bool,
}

impl PgCluster {
    /// A builder for a cluster named `main` in a temporary directory of its
    /// own; see [`PgClusterBuilder`].
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder {
            name: "main".to_string(),
            test_dir: None,
            settings: Vec::new(),
            upstream: None,
            tmpfs_size: None,
        }
    }

    /// Starts a cluster with default settings in a temporary directory.
    pub fn start() -> PgCluster {
        Self::builder().start()
    }

    /// Starts a cluster named `name` in `test_dir`, logging to
    /// `logs/postgres-<name>.log`.
    pub fn start_in(test_dir: &TestDir, name: &str) -> PgCluster {
        Self::builder().in_test_dir(test_dir).name(name).start()
    }

    /// Makes and starts a streaming standby of `primary` next to it, named
    /// `<primary>-standby` (`-standby2`, ... if taken).
    pub fn standby_of(primary: &PgCluster) -> PgCluster {
        let mut builder = Self::builder().standby_of(primary);
        let parent = primary
            .base_dir
            .parent()
            .expect("a cluster directory has a parent");
        let name = (1..)
            .map(|n| match n {
                1 => format!("{}-standby", primary.name),
                n => format!("{}-standby{n}", primary.name),
            })
            .find(|name| !parent.join(format!("pg-{name}")).exists())
            .expect("an unused standby name");
        builder.name = name;
        if let Some(test_dir) = &primary.test_dir {
            builder.test_dir = Some((test_dir.clone(), test_dir.join("logs")));
        }
        builder.start()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP port on 127.0.0.1 (also the number in the socket file name).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn tcp_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The directory holding the unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// `PGDATA`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// libpq key=value string over the unix socket for database `postgres`:
    /// `host=SOCKETDIR port=PORT user=postgres dbname=postgres`.
    pub fn connstring(&self) -> String {
        self.connstring_for("postgres")
    }

    /// [`PgCluster::connstring`] for another database.
    pub fn connstring_for(&self, database: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={database}",
            self.socket_dir.display(),
            self.port
        )
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`, over TCP.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// [`PgCluster::url`] for another database.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A command for the PostgreSQL program `program` (`pgbench`,
    /// `pg_dump`, ...) aimed at this cluster through `PGHOST`, `PGPORT`,
    /// `PGUSER` and `PGDATABASE=postgres`, with a cleared environment and
    /// run as `postgres` when root. Run it with [`crate::run`].
    pub fn pg_command(&self, program: &str) -> Command {
        let mut command = pg_tool_command(program, &self.base_dir);
        command
            .env("PGHOST", &self.socket_dir)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGCONNECT_TIMEOUT", "10");
        command
    }

    /// Runs `sql` with the real `psql -X -A -t -q -v ON_ERROR_STOP=1` against
    /// `database` and returns its stdout, trimmed: one row per line, columns
    /// separated by `|`. The script goes through stdin, so each statement
    /// runs on its own (`CREATE DATABASE` works) and the first error stops
    /// it. Panics with psql's stderr when it fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = self.try_psql(database, sql);
        assert!(
            output.success(),
            "psql on cluster {} (database {database}) failed running:\n{sql}\n{output}",
            self.name
        );
        output.stdout.trim().to_string()
    }

    /// [`PgCluster::psql`] that returns the output instead of panicking on
    /// failure, for tests that expect an error.
    pub fn try_psql(&self, database: &str, sql: &str) -> Output {
        let mut command = self.pg_command("psql");
        command.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
            "-f",
            "-",
        ]);
        process::run_with_stdin(&mut command, sql.as_bytes())
    }

    /// `CREATE DATABASE "<name>"`.
    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
    }

    /// Creates `name` with sample data for backup tests: an `orders` table
    /// of about `megabytes` MiB (md5-based text, so it compresses well) and
    /// a 20,000-row `customers` table, analyzed.
    pub fn create_sample_database(&self, name: &str, megabytes: u32) {
        self.create_database(name);
        self.psql(
            name,
            &format!(
                "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text, note text, amount numeric, at timestamptz);
                 INSERT INTO orders (customer, note, amount, at)
                   SELECT md5(i::text), repeat(md5((i * 7)::text), 4), (i % 1000) / 7.0, now() - i * interval '1 minute'
                   FROM generate_series(1, {rows}) i;
                 CREATE TABLE customers AS SELECT i AS id, md5(i::text) AS name FROM generate_series(1, 20000) i;
                 ANALYZE;",
                rows = megabytes * 4000
            ),
        );
    }

    /// Whether the server is started (by this fixture) and not stopped.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The postmaster's pid, from `postmaster.pid`, while it runs.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// `pg_ctl stop -m fast`: a clean shutdown.
    pub fn stop(&mut self) {
        self.stop_with_mode("fast");
    }

    /// `pg_ctl stop -m immediate`: like a crash, recovery on next start.
    pub fn crash(&mut self) {
        self.stop_with_mode("immediate");
    }

    /// Starts the server again after [`PgCluster::stop`], on the same port.
    pub fn start_again(&mut self) {
        assert!(!self.running, "cluster {} is already running", self.name);
        let attempt = self.try_start();
        if !attempt.success() {
            panic!(
                "restart of PostgreSQL cluster {} failed: {attempt}\nEnd of the server log:\n{}",
                self.name,
                tail(&self.log(), 40)
            );
        }
        self.running = true;
        self.wait_ready();
    }

    /// `pg_ctl promote -w`: ends recovery on a standby.
    pub fn promote(&self) {
        let output = process::run(self.pg_ctl().args([
            "-w",
            "-t",
            &PG_CTL_TIMEOUT_SECONDS.to_string(),
            "promote",
        ]));
        assert!(
            output.success(),
            "pg_ctl promote of cluster {} failed: {output}",
            self.name
        );
    }

    /// Lets the server outlive this handle (used by `cargo xtask demo
    /// --keep`); stop it later with `pg_ctl stop -D <data dir>`.
    pub fn keep_running(mut self) {
        self.kept = true;
    }

    fn pg_ctl(&self) -> Command {
        let mut command = pg_tool_command("pg_ctl", &self.base_dir);
        command.arg("-D").arg(&self.data_dir);
        command
    }

    fn initdb(&self) {
        let output = process::run(
            pg_tool_command("initdb", &self.base_dir)
                .arg("-D")
                .arg(&self.data_dir)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "--no-instructions",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]),
        );
        assert!(
            output.success(),
            "initdb for cluster {} failed: {output}",
            self.name
        );
    }

    fn base_backup(&self, upstream: &Upstream) {
        let output = process::run(
            pg_tool_command("pg_basebackup", &self.base_dir)
                .arg("-h")
                .arg(&upstream.socket_dir)
                .args(["-p", &upstream.port.to_string(), "-U", "postgres", "-D"])
                .arg(&self.data_dir)
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]),
        );
        assert!(
            output.success(),
            "pg_basebackup for standby {} failed: {output}",
            self.name
        );
    }

    /// Appends settings to `postgresql.conf`; later lines win, which is how
    /// a standby overrides the port it copied from its primary.
    fn append_settings(&self, extra: &[(String, String)]) {
        let mut text = format!(
            "\n# Added by the Cairn test fixture.\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             wal_level = replica\n\
             max_wal_senders = 5\n\
             max_replication_slots = 5\n\
             shared_buffers = 16MB\n\
             max_connections = 50\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            self.socket_dir.display()
        );
        for (key, value) in extra {
            text.push_str(&format!("{key} = {value}\n"));
        }
        self.append_to_conf(&text);
    }

    fn append_to_conf(&self, text: &str) {
        use std::io::Write;
        let path = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        file.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    }

    /// Starts the server on a free port, retrying with another port when
    /// the chosen one was taken in the meantime.
    fn start_on_a_free_port(&mut self) {
        for attempt in 1..=PORT_ATTEMPTS {
            self.port = net::free_port();
            self.append_to_conf(&format!("port = {}\n", self.port));
            let log_before = self.log().len();
            let output = self.try_start();
            if output.success() {
                self.running = true;
                self.wait_ready();
                return;
            }
            let log = self.log();
            let new_log = log.get(log_before..).unwrap_or(&log);
            let port_taken =
                new_log.contains("could not bind") || new_log.contains("Address already in use");
            if !(port_taken && attempt < PORT_ATTEMPTS) {
                panic!(
                    "starting PostgreSQL cluster {} failed: {output}\nEnd of the server log \
                     ({}):\n{}",
                    self.name,
                    self.log_path.display(),
                    tail(new_log, 40)
                );
            }
        }
    }

    fn try_start(&self) -> Output {
        process::run(
            self.pg_ctl()
                .args(["-w", "-t", &PG_CTL_TIMEOUT_SECONDS.to_string(), "-l"])
                .arg(&self.log_path)
                .arg("start"),
        )
    }

    /// `pg_ctl -w` already waited for the postmaster; this also checks that
    /// both the socket and the TCP port answer, within a bound.
    fn wait_ready(&self) {
        wait::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            &format!(
                "PostgreSQL cluster {} accepts connections on its socket and on port {}",
                self.name, self.port
            ),
            || {
                let mut command = self.pg_command("pg_isready");
                command.args(["-t", "2"]);
                process::run(&mut command).success()
                    && TcpStream::connect_timeout(&self.tcp_address(), Duration::from_secs(1))
                        .is_ok()
            },
        );
    }

    fn stop_with_mode(&mut self, mode: &str) {
        assert!(self.running, "cluster {} is not running", self.name);
        let output = process::run(self.pg_ctl().args([
            "-w",
            "-t",
            &PG_CTL_TIMEOUT_SECONDS.to_string(),
            "-m",
            mode,
            "stop",
        ]));
        assert!(
            output.success(),
            "pg_ctl stop -m {mode} of cluster {} failed: {output}",
            self.name
        );
        self.running = false;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if self.running {
            let output = process::run(self.pg_ctl().args([
                "-w",
                "-t",
                &PG_CTL_TIMEOUT_SECONDS.to_string(),
                "-m",
                "immediate",
                "stop",
            ]));
            if !output.success() {
                eprintln!("stopping PostgreSQL cluster {} failed: {output}", self.name);
            }
            self.running = false;
        }
        let _ = std::fs::remove_dir_all(&self.socket_dir);
        if self.on_tmpfs {
            // Lazily, so a busy mount cannot fail a test that already failed.
            let output = process::run(Command::new("umount").arg("-l").arg(&self.base_dir));
            if !output.success() {
                eprintln!("could not unmount {}: {output}", self.base_dir.display());
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "keeping PostgreSQL cluster {} in {} (log {})",
                self.name,
                self.base_dir.display(),
                self.log_path.display()
            );
            return;
        }
        if let Err(error) = std::fs::remove_dir_all(&self.base_dir) {
            eprintln!("could not remove {}: {error}", self.base_dir.display());
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
