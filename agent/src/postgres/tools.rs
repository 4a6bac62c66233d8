//! PostgreSQL client programs (`pg_dump`, `pg_dumpall`, `pg_restore`).
//!
//! The agent's connection string is turned into a libpq key=value conninfo
//! with every value single-quoted, handed over as `--dbname=...` (never
//! through a shell), and the password travels apart, in the child's
//! `PGPASSWORD`: the command line of a process is world-readable in `/proc`,
//! its environment is not. The children inherit none of the agent's own
//! `PG*` variables, so the configured connection string alone says where
//! they connect, as it does for the agent's own sessions; messages are in
//! English (`LC_ALL=C`) so that they read the same in the coordinator
//! whatever the host's locale.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command as TokioCommand;
use tokio_postgres::config::{
    ChannelBinding, Host, LoadBalanceHosts, SslMode, SslNegotiation, TargetSessionAttrs,
};

use super::{APPLICATION_NAME, ConnectionString, PostgresError};

/// `connect_timeout` of client-program sessions, in seconds, unless the
/// connection string sets one: libpq's default is to wait forever.
const TOOL_CONNECT_TIMEOUT_SECONDS: u64 = 30;

/// libpq's default `keepalives_idle` as tokio-postgres reports it when the
/// connection string sets none (2 hours).
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Where the PostgreSQL client programs (`pg_dump`, `pg_dumpall`) are taken
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTools {
    /// `None`: found through `PATH`.
    bindir: Option<PathBuf>,
}

impl PgTools {
    /// `explicit` if given; else `pg_config --bindir` when it holds
    /// `pg_dump`; else the newest `/usr/lib/postgresql/<major>/bin` holding
    /// `pg_dump` (Debian and Ubuntu install majors side by side, and a
    /// `pg_dump` must be at least as new as the server it dumps); else
    /// whatever `PATH` finds.
    pub async fn locate(explicit: Option<&Path>) -> PgTools {
        if let Some(dir) = explicit {
            return PgTools::in_dir(dir);
        }
        if let Some(dir) = pg_config_bindir().await {
            return PgTools::in_dir(&dir);
        }
        if let Some(dir) = newest_debian_bindir() {
            return PgTools::in_dir(&dir);
        }
        PgTools::from_path()
    }

    /// The programs in `dir`.
    pub fn in_dir(dir: &Path) -> PgTools {
        PgTools {
            bindir: Some(dir.to_path_buf()),
        }
    }

    /// The programs that `PATH` finds.
    pub fn from_path() -> PgTools {
        PgTools { bindir: None }
    }

    pub fn bindir(&self) -> Option<&Path> {
        self.bindir.as_deref()
    }

    /// The path of `program` (a bare name when found through `PATH`).
    pub fn program(&self, program: &str) -> PathBuf {
        match &self.bindir {
            Some(dir) => dir.join(program),
            None => PathBuf::from(program),
        }
    }

    /// A command for `program` with the environment described above, stdin
    /// closed, and killed when dropped (a caller that gives up on it never
    /// leaves it running).
    fn command(&self, program: &str) -> TokioCommand {
        let mut command = TokioCommand::new(self.program(program));
        for (key, _) in std::env::vars_os() {
            if key.as_encoded_bytes().starts_with(b"PG") {
                command.env_remove(key);
            }
        }
        command
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }
}

async fn pg_config_bindir() -> Option<PathBuf> {
    let output = TokioCommand::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .ok()
        .filter(|output| output.status.success())?;
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    dir.join("pg_dump").is_file().then_some(dir)
}

fn newest_debian_bindir() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bindir = entry.path().join("bin");
            bindir.join("pg_dump").is_file().then_some((major, bindir))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bindir)| bindir)
}

/// `pg_dump --format=custom --compress=0 --no-password` of `database`, its
/// archive on stdout; stdout and stderr piped.
pub fn pg_dump_command(
    tools: &PgTools,
    conn: &ConnectionString,
    database: &str,
) -> Result<TokioCommand, PostgresError> {
    let target = conn.tool_connection(Some(database))?;
    let mut command = tools.command("pg_dump");
    command
        .args(["--format=custom", "--compress=0", "--no-password"])
        .arg(format!("--dbname={}", target.conninfo))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    target.set_password(&mut command);
    Ok(command)
}

/// How [`pg_restore_command`] restores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgRestoreOptions {
    /// The archive file; `None` reads the archive from stdin (piped).
    pub archive: Option<PathBuf>,
    /// A `--use-list` file: only the entries it names (by dump id, one per
    /// line), in its order.
    pub list: Option<PathBuf>,
    /// `--jobs`; only with an archive file (a pipe cannot be shared).
    pub jobs: u32,
    /// `--no-owner`: everything is owned by the connecting role.
    pub no_owner: bool,
    /// `--single-transaction`: all or nothing (not with `jobs` above 1).
    pub single_transaction: bool,
    /// `--clean --if-exists`: drop each object before creating it.
    pub clean: bool,
    /// `application_name` of its sessions, so the agent can find them in
    /// `pg_stat_activity` (the lock watcher of a partial restore); the
    /// instance's own otherwise.
    pub application_name: Option<String>,
}

/// `pg_restore --format=custom --exit-on-error --no-password` into
/// `database`, with `options`; stdout discarded, stderr piped, stdin piped
/// when the archive comes that way.
pub fn pg_restore_command(
    tools: &PgTools,
    conn: &ConnectionString,
    database: &str,
    options: &PgRestoreOptions,
) -> Result<TokioCommand, PostgresError> {
    let mut target = conn.tool_connection(Some(database))?;
    if let Some(application_name) = &options.application_name {
        // A later keyword wins in a conninfo.
        push_conninfo(&mut target.conninfo, "application_name", application_name);
    }
    let mut command = tools.command("pg_restore");
    command
        .args(["--format=custom", "--exit-on-error", "--no-password"])
        .arg(format!("--dbname={}", target.conninfo));
    if options.no_owner {
        command.arg("--no-owner");
    }
    if options.single_transaction {
        command.arg("--single-transaction");
    }
    if options.clean {
        command.args(["--clean", "--if-exists"]);
    }
    if let Some(list) = &options.list {
        command.arg(format!("--use-list={}", list.display()));
    }
    match &options.archive {
        Some(archive) => {
            if options.jobs > 1 {
                command.arg(format!("--jobs={}", options.jobs));
            }
            // Absolute, so it can never be read as an option.
            command.arg(std::path::absolute(archive).unwrap_or_else(|_| archive.clone()));
        }
        None => {
            command.stdin(Stdio::piped());
        }
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    target.set_password(&mut command);
    Ok(command)
}

/// `pg_dumpall --globals-only --no-password` (roles, memberships,
/// tablespaces; `--no-role-passwords` unless `include_role_passwords`), its
/// SQL on stdout; stdout and stderr piped.
///
/// pg_dumpall ignores the database of `--dbname`; the database it connects
/// to is `--database` (else `postgres`, then `template1`), which libpq
/// expands when it looks like a conninfo (has a `=`, or a URL prefix). So
/// the connection string's database goes as it is when it cannot be taken
/// for one, and otherwise as the whole conninfo with the name quoted in it,
/// which no name can break.
///
/// pg_dumpall does not say why it could not connect to the `--database` it
/// was given, only that it could not.
pub fn pg_dumpall_globals_command(
    tools: &PgTools,
    conn: &ConnectionString,
    include_role_passwords: bool,
) -> Result<TokioCommand, PostgresError> {
    let server = conn.tool_connection(None)?;
    let mut command = tools.command("pg_dumpall");
    command
        .args(["--globals-only", "--no-password"])
        .arg(format!("--dbname={}", server.conninfo));
    if let Some(database) = conn.config()?.get_dbname() {
        if looks_like_conninfo(database) {
            let target = conn.tool_connection(Some(database))?;
            command.arg(format!("--database={}", target.conninfo));
        } else {
            command.arg(format!("--database={database}"));
        }
    }
    if !include_role_passwords {
        command.arg("--no-role-passwords");
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    server.set_password(&mut command);
    Ok(command)
}

/// Whether libpq would expand `dbname` as a connection string rather than
/// take it as a name (`recognized_connection_string` in libpq).
fn looks_like_conninfo(dbname: &str) -> bool {
    dbname.contains('=') || dbname.starts_with("postgresql://") || dbname.starts_with("postgres://")
}

/// `<program> --version`, to be run with `output()`.
pub fn tool_version_command(tools: &PgTools, program: &str) -> TokioCommand {
    let mut command = tools.command(program);
    command.arg("--version");
    command
}

/// A connection for a client program: the conninfo for its command line
/// (no password in it) and the password for its environment.
struct ToolConnection {
    conninfo: String,
    password: Option<Vec<u8>>,
}

impl fmt::Debug for ToolConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ToolConnection(<redacted>)")
    }
}

impl ToolConnection {
    fn set_password(&self, command: &mut TokioCommand) {
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", OsStr::from_bytes(password));
        }
    }
}

impl ConnectionString {
    /// This connection as a libpq key=value conninfo, every value quoted,
    /// `dbname` replaced by `database` (left out with `None`), and the
    /// password taken out.
    fn tool_connection(&self, database: Option<&str>) -> Result<ToolConnection, PostgresError> {
        let config = self.config()?;
        let mut conninfo = String::new();
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(dir) => dir.to_string_lossy().into_owned(),
            })
            .collect();
        if !hosts.is_empty() {
            push_conninfo(&mut conninfo, "host", &hosts.join(","));
        }
        let addrs = config.get_hostaddrs();
        if !addrs.is_empty() {
            let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            push_conninfo(&mut conninfo, "hostaddr", &addrs.join(","));
        }
        let ports = config.get_ports();
        if !ports.is_empty() {
            let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
            push_conninfo(&mut conninfo, "port", &ports.join(","));
        }
        if let Some(user) = config.get_user() {
            push_conninfo(&mut conninfo, "user", user);
        }
        if let Some(database) = database {
            push_conninfo(&mut conninfo, "dbname", database);
        }
        if let Some(options) = config.get_options() {
            push_conninfo(&mut conninfo, "options", options);
        }
        push_conninfo(
            &mut conninfo,
            "application_name",
            config.get_application_name().unwrap_or(APPLICATION_NAME),
        );
        match config.get_ssl_mode() {
            SslMode::Disable => push_conninfo(&mut conninfo, "sslmode", "disable"),
            SslMode::Require => push_conninfo(&mut conninfo, "sslmode", "require"),
            _ => push_conninfo(&mut conninfo, "sslmode", "prefer"),
        }
        if config.get_ssl_negotiation() == SslNegotiation::Direct {
            push_conninfo(&mut conninfo, "sslnegotiation", "direct");
        }
        let connect_timeout = config
            .get_connect_timeout()
            .map_or(TOOL_CONNECT_TIMEOUT_SECONDS, |t| t.as_secs().max(1));
        push_conninfo(
            &mut conninfo,
            "connect_timeout",
            &connect_timeout.to_string(),
        );
        if let Some(timeout) = config.get_tcp_user_timeout() {
            // libpq counts milliseconds (tokio-postgres parses seconds).
            push_conninfo(
                &mut conninfo,
                "tcp_user_timeout",
                &timeout.as_millis().to_string(),
            );
        }
        if !config.get_keepalives() {
            push_conninfo(&mut conninfo, "keepalives", "0");
        }
        if config.get_keepalives_idle() != DEFAULT_KEEPALIVES_IDLE {
            push_conninfo(
                &mut conninfo,
                "keepalives_idle",
                &config.get_keepalives_idle().as_secs().to_string(),
            );
        }
        if let Some(interval) = config.get_keepalives_interval() {
            push_conninfo(
                &mut conninfo,
                "keepalives_interval",
                &interval.as_secs().to_string(),
            );
        }
        if let Some(retries) = config.get_keepalives_retries() {
            push_conninfo(&mut conninfo, "keepalives_retries", &retries.to_string());
        }
        match config.get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => {
                push_conninfo(&mut conninfo, "target_session_attrs", "read-write");
            }
            TargetSessionAttrs::ReadOnly => {
                push_conninfo(&mut conninfo, "target_session_attrs", "read-only");
            }
            _ => {}
        }
        match config.get_channel_binding() {
            ChannelBinding::Disable => push_conninfo(&mut conninfo, "channel_binding", "disable"),
            ChannelBinding::Require => push_conninfo(&mut conninfo, "channel_binding", "require"),
            _ => {}
        }
        if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
            push_conninfo(&mut conninfo, "load_balance_hosts", "random");
        }
        let password = config.get_password().map(<[u8]>::to_vec);
        // Neither a command-line argument nor an environment variable can
        // hold a NUL byte.
        if conninfo.contains('\0') || password.as_ref().is_some_and(|p| p.contains(&0)) {
            return Err(PostgresError::InvalidConnectionString(
                "a value contains a NUL character".into(),
            ));
        }
        Ok(ToolConnection { conninfo, password })
    }
}

/// Appends `key='value'` to a libpq conninfo, with `\` and `'` escaped by a
/// backslash: any string is then one value, whatever it holds.
fn push_conninfo(conninfo: &mut String, key: &str, value: &str) {
    if !conninfo.is_empty() {
        conninfo.push(' ');
    }
    conninfo.push_str(key);
    conninfo.push_str("='");
    for c in value.chars() {
        if c == '\\' || c == '\'' {
            conninfo.push('\\');
        }
        conninfo.push(c);
    }
    conninfo.push('\'');
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tokio_postgres::Config;

    use super::*;

    fn args_of(command: &TokioCommand) -> Vec<String> {
        command
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn password_of(command: &TokioCommand) -> Option<String> {
        command.as_std().get_envs().find_map(|(key, value)| {
            (key == "PGPASSWORD").then(|| value.unwrap().to_string_lossy().into_owned())
        })
    }

    #[test]
    fn tool_conninfo_quotes_every_value_and_keeps_the_password_apart() {
        let conn = ConnectionString::parse(
            "host=/run/pg,db.example port=5433,5434 user='o\\'k' password='p w\\'d' \
             dbname=configured connect_timeout=7 application_name=mine",
        )
        .unwrap();
        let target = conn.tool_connection(Some("it's a \"db\" \\ = ü")).unwrap();
        assert_eq!(
            target.conninfo,
            "host='/run/pg,db.example' port='5433,5434' user='o\\'k' \
             dbname='it\\'s a \"db\" \\\\ = ü' application_name='mine' sslmode='prefer' \
             connect_timeout='7'"
        );
        assert_eq!(target.password.as_deref(), Some(&b"p w'd"[..]));
        assert!(!format!("{target:?}").contains("p w"));
        // Parsed back, the conninfo says the same (tokio-postgres reads the
        // same quoting as libpq).
        let back = Config::from_str(&target.conninfo).unwrap();
        assert_eq!(back.get_dbname(), Some("it's a \"db\" \\ = ü"));
        assert_eq!(back.get_user(), Some("o'k"));
        assert_eq!(back.get_password(), None);

        // URL form, percent-encoded password; no database.
        let conn = ConnectionString::parse("postgresql://u:s%40cret@127.0.0.1:6543/db").unwrap();
        let target = conn.tool_connection(None).unwrap();
        assert_eq!(
            target.conninfo,
            "host='127.0.0.1' port='6543' user='u' application_name='cairn-agent' \
             sslmode='prefer' connect_timeout='30'"
        );
        assert_eq!(target.password.as_deref(), Some(&b"s@cret"[..]));
    }

    #[test]
    fn tool_commands_never_carry_the_password_on_their_command_line() {
        let conn =
            ConnectionString::parse("host=/tmp user=postgres password=sekrit dbname=app").unwrap();
        let tools = PgTools::in_dir(Path::new("/opt/pg/bin"));
        let dump = pg_dump_command(&tools, &conn, "other db").unwrap();
        assert_eq!(
            dump.as_std().get_program(),
            Path::new("/opt/pg/bin/pg_dump").as_os_str()
        );
        let args = args_of(&dump);
        assert_eq!(
            args[..3],
            ["--format=custom", "--compress=0", "--no-password"]
        );
        assert!(args[3].starts_with("--dbname=host='/tmp'"), "{args:?}");
        assert!(args[3].contains("dbname='other db'"), "{args:?}");
        assert!(!args.join(" ").contains("sekrit"), "{args:?}");
        assert_eq!(password_of(&dump).as_deref(), Some("sekrit"));

        for include in [false, true] {
            let globals = pg_dumpall_globals_command(&tools, &conn, include).unwrap();
            let args = args_of(&globals);
            assert_eq!(args[..2], ["--globals-only", "--no-password"]);
            assert!(args[2].starts_with("--dbname=host="), "{args:?}");
            assert!(!args[2].contains("dbname='"), "{args:?}");
            assert_eq!(args[3], "--database=app");
            assert_eq!(args.contains(&"--no-role-passwords".to_string()), !include);
            assert!(!args.join(" ").contains("sekrit"), "{args:?}");
            assert_eq!(password_of(&globals).as_deref(), Some("sekrit"));
        }
        // A database name libpq would take for a conninfo goes inside one.
        let conn = ConnectionString::parse("host=/tmp user=postgres dbname='a=b'").unwrap();
        let args = args_of(&pg_dumpall_globals_command(&tools, &conn, false).unwrap());
        assert!(args[3].starts_with("--database=host='/tmp'"), "{args:?}");
        assert!(args[3].contains("dbname='a=b'"), "{args:?}");

        // No password configured: none set (and the agent's own PGPASSWORD
        // is not passed on).
        let conn = ConnectionString::parse("host=/tmp user=postgres").unwrap();
        let dump = pg_dump_command(&PgTools::from_path(), &conn, "db").unwrap();
        assert_eq!(dump.as_std().get_program(), "pg_dump");
        assert_eq!(password_of(&dump), None);
    }

    #[test]
    fn pg_restore_reads_stdin_or_a_file_and_never_sees_the_password() {
        let conn =
            ConnectionString::parse("host=/tmp user=postgres password=sekrit dbname=app").unwrap();
        let tools = PgTools::in_dir(Path::new("/opt/pg/bin"));
        let piped = pg_restore_command(
            &tools,
            &conn,
            "cairn_restore_0a1b2c3d",
            &PgRestoreOptions {
                no_owner: true,
                jobs: 4,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            piped.as_std().get_program(),
            Path::new("/opt/pg/bin/pg_restore").as_os_str()
        );
        let args = args_of(&piped);
        assert_eq!(
            args[..3],
            ["--format=custom", "--exit-on-error", "--no-password"]
        );
        assert!(args[3].starts_with("--dbname=host='/tmp'"), "{args:?}");
        assert!(
            args[3].contains("dbname='cairn_restore_0a1b2c3d'"),
            "{args:?}"
        );
        // No --jobs from a pipe, and no file argument.
        assert_eq!(args[4..], ["--no-owner"]);
        assert!(!args.join(" ").contains("sekrit"), "{args:?}");
        assert_eq!(password_of(&piped).as_deref(), Some("sekrit"));

        let from_file = pg_restore_command(
            &tools,
            &conn,
            "it's \"odd\"",
            &PgRestoreOptions {
                archive: Some(PathBuf::from("/spool/x.dump")),
                list: Some(PathBuf::from("/spool/x.list")),
                jobs: 4,
                single_transaction: false,
                clean: true,
                no_owner: false,
                application_name: Some("cairn-restore-0a1b2c3d".into()),
            },
        )
        .unwrap();
        let args = args_of(&from_file);
        assert!(
            args[3].ends_with("application_name='cairn-restore-0a1b2c3d'"),
            "{args:?}"
        );
        assert!(args[3].contains("dbname='it\\'s \"odd\"'"), "{args:?}");
        assert_eq!(
            args[4..],
            [
                "--clean",
                "--if-exists",
                "--use-list=/spool/x.list",
                "--jobs=4",
                "/spool/x.dump"
            ]
        );
        let partial = pg_restore_command(
            &tools,
            &conn,
            "app",
            &PgRestoreOptions {
                single_transaction: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(args_of(&partial)[4..], ["--single-transaction"]);
    }
}
