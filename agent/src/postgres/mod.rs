//! The only code in the agent that talks to PostgreSQL; connection strings may
//! carry passwords and are never logged.
//!
//! A [`ConnectionString`] is validated once, when the configuration is read,
//! and redacts itself in `Debug`. Errors ([`PostgresError`]) carry
//! PostgreSQL's own message but never the connection string.
//!
//! [`probe`] gathers one [`InstanceProbe`] and never fails: an instance that
//! cannot be reached is reported as such, and a query that fails after
//! connecting is named in the probe's `error` while everything else that
//! could be gathered is still reported. The agent is expected to run on the
//! database host: the free space reported for the data directory is that of
//! the path as seen by the agent.
//!
//! Every call is bounded by the `timeout` it is given, which covers the
//! connection (TCP or Unix socket, and authentication) and the queries.
//!
//! The PostgreSQL client programs the agent runs (`pg_dump`, `pg_dumpall`,
//! `pg_restore`) are found ([`PgTools`]) and their command lines built in
//! `tools` ([`pg_dump_command`], [`pg_dumpall_globals_command`],
//! [`pg_restore_command`]): the connection string becomes a quoted conninfo
//! on the command line and the password goes to the child's environment
//! only.
//!
//! The SQL a restore runs on its target instance (checks, `CREATE DATABASE`,
//! the swap) is in [`target`].

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use cairn_common::model::{
    ArchiverStatus, DatabaseSize, DiskSpace, InstanceProbe, ReceiverLag, ReplicationRole,
    StandbyLag, time_from_unix_ms,
};
use chrono::Utc;
use tokio::time::Instant as Deadline;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config, NoTls};

/// `application_name` the agent's sessions carry unless the connection string
/// sets one, so that they can be told apart in `pg_stat_activity`.
const APPLICATION_NAME: &str = "cairn-agent";

/// How long a connection may outlive the deadline of the call that opened it,
/// to end its session cleanly, before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The message of a query that did not answer before the deadline.
const TIMED_OUT: &str = "timed out";

/// The forms of connection string accepted, for error messages.
const EXPECTED_FORMS: &str = "expected a libpq URL such as \
    `postgresql://user@localhost:5432/postgres` or key=value pairs such as \
    `host=/var/run/postgresql port=5432 user=postgres`";

/// A validated libpq connection string: a URL (`postgresql://...`) or
/// `key=value` pairs. It may carry a password, so `Debug` never shows it and
/// nothing in this module logs it.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString(String);

impl ConnectionString {
    /// Validates `s` as a connection string the agent can use: it must parse,
    /// name a host (a Unix-socket directory such as `/var/run/postgresql`
    /// counts) and not require TLS, which the agent does not speak to
    /// PostgreSQL. The error never echoes the string.
    pub fn parse(s: &str) -> Result<Self, PostgresError> {
        let config = Config::from_str(s)
            .map_err(|e| PostgresError::InvalidConnectionString(parse_error_reason(&e)))?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(PostgresError::InvalidConnectionString(
                "it names no host (give a host name, an address or a Unix-socket \
                 directory such as `host=/var/run/postgresql`)"
                    .into(),
            ));
        }
        if matches!(config.get_ssl_mode(), SslMode::Require) {
            return Err(PostgresError::InvalidConnectionString(
                "sslmode=require is not supported, the agent connects to PostgreSQL \
                 without TLS (use a Unix socket or a local address)"
                    .into(),
            ));
        }
        Ok(ConnectionString(s.to_string()))
    }

    /// The string itself, password included: for handing to PostgreSQL
    /// tools (such as `pg_dump`), never for logging.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn config(&self) -> Result<Config, PostgresError> {
        let mut config = Config::from_str(&self.0)
            .map_err(|e| PostgresError::InvalidConnectionString(parse_error_reason(&e)))?;
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        Ok(config)
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectionString(<redacted>)")
    }
}

impl FromStr for ConnectionString {
    type Err = PostgresError;
    fn from_str(s: &str) -> Result<Self, PostgresError> {
        ConnectionString::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for ConnectionString {
    /// Validates while deserializing; the error never echoes the string.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        ConnectionString::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What went wrong talking to PostgreSQL. No variant carries the connection
/// string.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PostgresError {
    /// The connection string does not parse or cannot be used; the payload
    /// says why, without echoing the string.
    #[error("invalid PostgreSQL connection string: {0}; {EXPECTED_FORMS}")]
    InvalidConnectionString(String),
    /// The server could not be reached, refused the connection or failed
    /// authentication; the payload carries PostgreSQL's (or the operating
    /// system's) own message.
    #[error("cannot connect to PostgreSQL: {0}")]
    Unreachable(String),
    /// A query failed after connecting.
    #[error("query `{query}` failed: {message}")]
    Query {
        /// A short name for the query, such as `pg_stat_replication`.
        query: &'static str,
        message: String,
    },
}

/// Connects once and returns the server's `server_version`: used at
/// enrollment to check that the configured instance answers.
pub async fn check_reachable(
    conn: &ConnectionString,
    timeout: Duration,
) -> Result<String, PostgresError> {
    let deadline = Deadline::now() + timeout;
    let client = connect(conn, timeout, deadline).await?;
    let version = run("server_version", deadline, async {
        client
            .query_typed_one("SELECT current_setting('server_version')", &[])
            .await?
            .try_get::<_, String>(0)
    })
    .await;
    if version.as_ref().is_err_and(is_timeout) {
        cancel_in_background(client.cancel_token());
    }
    version
}

/// Probes one instance. Never fails: an unreachable instance gives
/// `reachable: false` with the error; a query that fails after connecting is
/// named in `error` while the fields gathered by the other queries are still
/// filled in.
///
/// One connection, a timed `SELECT 1`, then the other queries pipelined (a
/// single round trip), with `statvfs` of the data directory as soon as its
/// path is known.
///
/// Fields a role may not see (`data_directory` needs superuser or
/// `pg_read_all_settings`; the replication views' details need
/// `pg_read_all_stats`; a database's size needs `CONNECT` on it) are left
/// empty, and noted in `error` where the model cannot otherwise tell.
pub async fn probe(instance: &str, conn: &ConnectionString, timeout: Duration) -> InstanceProbe {
    let probed_at = Utc::now();
    let deadline = Deadline::now() + timeout;
    let client = match connect(conn, timeout, deadline).await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(instance, %error, "PostgreSQL instance unreachable");
            return InstanceProbe::unreachable(instance, probed_at, error.to_string());
        }
    };

    let mut probe = InstanceProbe::unreachable(instance, probed_at, String::new());
    probe.reachable = true;
    probe.error = None;
    let mut notes: Vec<String> = Vec::new();

    // The round trip alone: the simple protocol sends one message and gets
    // one answer.
    let cancel = client.cancel_token();
    let started = Instant::now();
    let select1 = run("SELECT 1", deadline, async {
        client.simple_query("SELECT 1").await.map(drop)
    })
    .await;
    let elapsed = started.elapsed();
    if let Err(error) = select1 {
        if is_timeout(&error) {
            cancel_in_background(cancel);
        }
        tracing::debug!(instance, %error, "PostgreSQL probe failed");
        probe.error = Some(error.to_string());
        return probe;
    }
    probe.select1_rtt_micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);

    // Everything else, pipelined on the one connection.
    let ((general, disk), receiver, standbys, databases, archiver, system_identifier) = tokio::join!(
        // The data directory's filesystem is looked at while the later
        // queries run.
        async {
            let general = run("instance", deadline, query_general(&client)).await;
            let disk = match &general {
                Ok(General {
                    data_directory: Some(path),
                    ..
                }) => Some(disk_space(path.clone(), deadline).await),
                _ => None,
            };
            (general, disk)
        },
        run("standby receiver", deadline, query_receiver(&client)),
        run("pg_stat_replication", deadline, query_standbys(&client)),
        run("databases", deadline, query_databases(&client)),
        run("pg_stat_archiver", deadline, query_archiver(&client)),
        run(
            "system identifier",
            deadline,
            query_system_identifier(&client)
        ),
    );
    drop(client);
    let errors = [
        general.as_ref().err(),
        receiver.as_ref().err(),
        standbys.as_ref().err(),
        databases.as_ref().err(),
        archiver.as_ref().err(),
    ];
    if errors.into_iter().flatten().any(is_timeout) {
        cancel_in_background(cancel);
    }

    match system_identifier {
        Ok(identifier) => probe.system_identifier = identifier,
        // Backups still group by host then; not worth a note on the probe.
        Err(error) => tracing::debug!(instance, %error, "system identifier not readable"),
    }
    match general {
        Ok(general) => {
            probe.server_version = general.server_version;
            probe.server_version_num = general.server_version_num;
            probe.uptime_seconds = general.uptime_seconds;
            set_recovery(&mut probe, general.in_recovery);
            probe.connections = general.connections;
            probe.max_connections = general.max_connections;
            if general.data_directory.is_none() {
                notes.push(
                    "data directory: `data_directory` is not visible to this role \
                     (needs superuser or pg_read_all_settings)"
                        .into(),
                );
            }
        }
        Err(error) => notes.push(error.to_string()),
    }
    match disk {
        Some(Ok(disk)) => probe.data_directory_disk = Some(disk),
        Some(Err(note)) => notes.push(note),
        None => {}
    }
    match receiver {
        Ok(receiver) => {
            // The role from this query if the instance query failed.
            if probe.role == ReplicationRole::Unknown {
                set_recovery(&mut probe, receiver.in_recovery);
            }
            // Only a standby has a receiver; a promotion between the queries
            // is settled by the instance query's answer.
            if receiver.in_recovery && probe.in_recovery {
                if receiver.hidden {
                    notes.push(
                        "pg_stat_wal_receiver: status not visible to this role, `streaming` \
                         unknown (needs pg_read_all_stats)"
                            .into(),
                    );
                }
                probe.receiver = Some(receiver.lag);
            }
        }
        Err(error) => notes.push(error.to_string()),
    }
    match standbys {
        Ok((standbys, hidden)) => {
            probe.standbys = standbys;
            if hidden {
                notes.push(
                    "pg_stat_replication: details not visible to this role, standbys' \
                     state and lag unknown (needs pg_read_all_stats)"
                        .into(),
                );
            }
        }
        Err(error) => notes.push(error.to_string()),
    }
    match databases {
        Ok((sizes, hidden)) => {
            probe.databases = sizes;
            if !hidden.is_empty() {
                notes.push(format!(
                    "databases: no permission to read the size of {} (needs CONNECT or \
                     pg_read_all_stats)",
                    hidden.join(", ")
                ));
            }
        }
        Err(error) => notes.push(error.to_string()),
    }
    match archiver {
        Ok(archiver) => probe.archiver = Some(archiver),
        Err(error) => notes.push(error.to_string()),
    }

    if !notes.is_empty() {
        let error = notes.join("; ");
        tracing::debug!(instance, %error, "PostgreSQL probe incomplete");
        probe.error = Some(error);
    }
    probe
}

fn set_recovery(probe: &mut InstanceProbe, in_recovery: bool) {
    probe.in_recovery = in_recovery;
    probe.role = if in_recovery {
        ReplicationRole::Standby
    } else {
        ReplicationRole::Primary
    };
}

/// Opens a session, bounded by `deadline` (socket and authentication); the
/// connection task is spawned and ends when the returned client is dropped,
/// or shortly after the deadline at the latest.
async fn connect(
    conn: &ConnectionString,
    timeout: Duration,
    deadline: Deadline,
) -> Result<Client, PostgresError> {
    let mut config = conn.config()?;
    config.connect_timeout(timeout);
    let (client, connection) = match tokio::time::timeout_at(deadline, config.connect(NoTls)).await
    {
        Ok(Ok(connected)) => connected,
        Ok(Err(error)) => {
            return Err(PostgresError::Unreachable(format!(
                "{}: {}",
                describe_target(&config),
                describe(&error)
            )));
        }
        Err(_) => {
            return Err(PostgresError::Unreachable(format!(
                "{}: timed out after {} connecting or authenticating",
                describe_target(&config),
                humantime::format_duration(timeout)
            )));
        }
    };
    tokio::spawn(async move {
        match tokio::time::timeout_at(deadline + CLOSE_GRACE, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(error = %describe(&error), "PostgreSQL connection"),
            Err(_) => tracing::debug!("PostgreSQL connection dropped after its deadline"),
        }
    });
    Ok(client)
}

/// Runs one named query (or a few steps under one name) before `deadline`.
async fn run<T>(
    query: &'static str,
    deadline: Deadline,
    future: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PostgresError> {
    match tokio::time::timeout_at(deadline, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(PostgresError::Query {
            query,
            message: describe(&error),
        }),
        Err(_) => Err(PostgresError::Query {
            query,
            message: TIMED_OUT.into(),
        }),
    }
}

fn is_timeout(error: &PostgresError) -> bool {
    matches!(error, PostgresError::Query { message, .. } if message == TIMED_OUT)
}

/// Asks the server to cancel what the session is still running (such as a
/// query waiting on a lock), in the background: dropping the connection
/// alone would leave the backend busy until its query ends.
fn cancel_in_background(cancel: tokio_postgres::CancelToken) {
    tokio::spawn(async move {
        match tokio::time::timeout(CLOSE_GRACE, cancel.cancel_query(NoTls)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(error = %describe(&error), "PostgreSQL cancel"),
            Err(_) => tracing::debug!("PostgreSQL cancel timed out"),
        }
    });
}

struct General {
    server_version: String,
    server_version_num: u32,
    uptime_seconds: u64,
    in_recovery: bool,
    max_connections: u32,
    connections: u32,
    data_directory: Option<String>,
}

/// `pg_settings` rather than `current_setting`: a role that may not see
/// `data_directory` gets NULL instead of an error that would sink the row.
/// The connection count includes the probe's own session, which takes a slot
/// of `max_connections` like any other.
const GENERAL_SQL: &str = "\
SELECT current_setting('server_version'),
       current_setting('server_version_num')::int4,
       extract(epoch FROM now() - pg_postmaster_start_time())::float8,
       pg_is_in_recovery(),
       current_setting('max_connections')::int4,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int4,
       (SELECT setting FROM pg_settings WHERE name = 'data_directory')";

/// The cluster's system identifier: a backup's lineage (with the
/// database), the same on a primary and its physical standbys.
pub(crate) const SYSTEM_IDENTIFIER_SQL: &str =
    "SELECT system_identifier::text FROM pg_control_system()";

async fn query_system_identifier(client: &Client) -> Result<String, tokio_postgres::Error> {
    client
        .query_typed_one(SYSTEM_IDENTIFIER_SQL, &[])
        .await?
        .try_get(0)
}

async fn query_general(client: &Client) -> Result<General, tokio_postgres::Error> {
    let row = client.query_typed_one(GENERAL_SQL, &[]).await?;
    Ok(General {
        server_version: row.try_get(0)?,
        server_version_num: to_u32(row.try_get::<_, i32>(1)?),
        uptime_seconds: to_u64_from_f64(row.try_get::<_, f64>(2)?),
        in_recovery: row.try_get(3)?,
        max_connections: to_u32(row.try_get::<_, i32>(4)?),
        connections: to_u32(row.try_get::<_, i32>(5)?),
        data_directory: row.try_get(6)?,
    })
}

struct Receiver {
    in_recovery: bool,
    lag: ReceiverLag,
    /// A WAL receiver runs but this role may not see its status.
    hidden: bool,
}

/// Safe on a primary too (the functions return NULL there). The receive LSN
/// is NULL before anything was streamed, and behind the replay LSN when WAL
/// comes from the archive: both count as no lag.
const RECEIVER_SQL: &str = "\
SELECT pg_is_in_recovery(),
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::int8,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
       EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'),
       EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status IS NULL)";

async fn query_receiver(client: &Client) -> Result<Receiver, tokio_postgres::Error> {
    let row = client.query_typed_one(RECEIVER_SQL, &[]).await?;
    Ok(Receiver {
        in_recovery: row.try_get(0)?,
        lag: ReceiverLag {
            replay_lag_bytes: row.try_get::<_, Option<i64>>(1)?.map_or(0, to_u64),
            replay_lag_seconds: row.try_get(2)?,
            streaming: row.try_get(3)?,
        },
        hidden: row.try_get(4)?,
    })
}

/// The primary's view; nothing while in recovery (`pg_current_wal_lsn()`
/// would fail there). `replay_lsn` is NULL until a standby reports, and for
/// base backups: counted as no lag. `client_addr` is NULL over a Unix
/// socket: reported as empty. A role without `pg_read_all_stats` sees only
/// the names: the last column says so.
const STANDBYS_SQL: &str = "\
SELECT coalesce(application_name, ''),
       coalesce(host(client_addr), ''),
       coalesce(state, ''),
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::int8,
       extract(epoch FROM replay_lag)::float8,
       state IS NULL
  FROM pg_stat_replication
 WHERE NOT pg_is_in_recovery()
 ORDER BY application_name, client_addr, pid";

/// The standbys, and whether this role was denied their details.
async fn query_standbys(client: &Client) -> Result<(Vec<StandbyLag>, bool), tokio_postgres::Error> {
    let rows = client.query_typed(STANDBYS_SQL, &[]).await?;
    let mut standbys = Vec::with_capacity(rows.len());
    let mut hidden = false;
    for row in &rows {
        standbys.push(StandbyLag {
            application_name: row.try_get(0)?,
            client_address: row.try_get(1)?,
            state: row.try_get(2)?,
            replay_lag_bytes: row.try_get::<_, Option<i64>>(3)?.map_or(0, to_u64),
            replay_lag_seconds: row.try_get(4)?,
        });
        hidden |= row.try_get::<_, bool>(5)?;
    }
    Ok((standbys, hidden))
}

/// All databases but templates. `pg_database_size` fails without `CONNECT`
/// (or `pg_read_all_stats`), so it is only asked for where allowed; it is
/// NULL for a database dropped meanwhile, which is left out.
const DATABASES_SQL: &str = "\
SELECT datname::text, allowed, CASE WHEN allowed THEN pg_database_size(oid) END
  FROM (SELECT datname, oid,
               has_database_privilege(oid, 'CONNECT')
               OR pg_has_role('pg_read_all_stats', 'USAGE') AS allowed
          FROM pg_database
         WHERE NOT datistemplate) AS d
 ORDER BY datname";

/// The sizes, and the databases whose size this role may not read.
async fn query_databases(
    client: &Client,
) -> Result<(Vec<DatabaseSize>, Vec<String>), tokio_postgres::Error> {
    let rows = client.query_typed(DATABASES_SQL, &[]).await?;
    let mut sizes = Vec::with_capacity(rows.len());
    let mut hidden = Vec::new();
    for row in &rows {
        let name: String = row.try_get(0)?;
        if !row.try_get::<_, bool>(1)? {
            hidden.push(name);
        } else if let Some(size) = row.try_get::<_, Option<i64>>(2)? {
            sizes.push(DatabaseSize {
                name,
                size_bytes: to_u64(size),
            });
        }
    }
    Ok((sizes, hidden))
}

const ARCHIVER_SQL: &str = "\
SELECT archived_count,
       failed_count,
       coalesce(last_failed_wal, ''),
       (extract(epoch FROM last_failed_time) * 1000)::int8
  FROM pg_stat_archiver";

async fn query_archiver(client: &Client) -> Result<ArchiverStatus, tokio_postgres::Error> {
    let row = client.query_typed_one(ARCHIVER_SQL, &[]).await?;
    Ok(ArchiverStatus {
        archived_count: to_u64(row.try_get::<_, i64>(0)?),
        failed_count: to_u64(row.try_get::<_, i64>(1)?),
        last_failed_wal: row.try_get(2)?,
        last_failed_at: row
            .try_get::<_, Option<i64>>(3)?
            .and_then(time_from_unix_ms),
    })
}

/// `statvfs` of the data directory, off the async threads (a hung network
/// filesystem must not hang the agent) and before `deadline`. The error is a
/// note for the probe's `error`.
pub(crate) async fn disk_space(path: String, deadline: Deadline) -> Result<DiskSpace, String> {
    let stat_path = path.clone();
    let stat = tokio::task::spawn_blocking(move || rustix::fs::statvfs(stat_path.as_str()));
    match tokio::time::timeout_at(deadline, stat).await {
        Ok(Ok(Ok(stat))) => {
            let fragment = if stat.f_frsize != 0 {
                stat.f_frsize
            } else {
                stat.f_bsize
            };
            Ok(DiskSpace {
                path,
                total_bytes: stat.f_blocks.saturating_mul(fragment),
                available_bytes: stat.f_bavail.saturating_mul(fragment),
            })
        }
        Ok(Ok(Err(errno))) => Err(format!("data directory {path}: cannot stat: {errno}")),
        Ok(Err(join)) => Err(format!("data directory {path}: cannot stat: {join}")),
        Err(_) => Err(format!("data directory {path}: stat timed out")),
    }
}

/// A tokio-postgres error on one line, with PostgreSQL's (or the operating
/// system's) own message: `Display` alone says only "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut message = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            message.push_str(&format!(" (DETAIL: {detail})"));
        }
        if let Some(hint) = db.hint() {
            message.push_str(&format!(" (HINT: {hint})"));
        }
        return message;
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Where a connection goes, as libpq names it in its errors (a socket path
/// or host:port, each host in turn): no user, database or password.
fn describe_target(config: &Config) -> String {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    (0..hosts.len().max(addrs.len()))
        .map(|i| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match (addrs.get(i), hosts.get(i)) {
                (Some(addr), _) => format!("{addr}:{port}"),
                (None, Some(Host::Tcp(host))) => format!("{host}:{port}"),
                (None, Some(Host::Unix(dir))) => {
                    format!("socket {}", dir.join(format!(".s.PGSQL.{port}")).display())
                }
                (None, None) => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why tokio-postgres refused a connection string, without any of its
/// characters: "unexpected character" errors quote the character found.
fn parse_error_reason(error: &tokio_postgres::Error) -> String {
    let reason = match std::error::Error::source(error) {
        Some(cause) => cause.to_string(),
        None => error.to_string(),
    };
    match reason.find(" but got ") {
        Some(at) => reason[..at].to_string(),
        None => reason,
    }
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_u32(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// Saturating: negative and NaN give 0.
fn to_u64_from_f64(value: f64) -> u64 {
    value as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_key_value_and_url_forms() {
        for s in [
            "host=/tmp port=5432 user=postgres",
            "postgresql://u:secret@h/db",
            "postgres://h:6543/db?application_name=x",
            "host=db.example hostaddr=127.0.0.1 user=postgres sslmode=disable",
        ] {
            let conn = ConnectionString::parse(s).unwrap();
            assert_eq!(conn.as_str(), s);
            assert_eq!(s.parse::<ConnectionString>().unwrap(), conn);
        }
    }

    #[test]
    fn rejects_junk_saying_what_is_expected() {
        for s in [
            "junk",
            "",
            "port=5432 user=postgres",
            "host=/tmp bogus=1",
            "postgresql://u:secret@h/db?bogus=1",
            "host=h port=notaport",
            "host=h sslmode=require",
        ] {
            let error = ConnectionString::parse(s).unwrap_err();
            assert!(
                matches!(error, PostgresError::InvalidConnectionString(_)),
                "{s:?}: {error:?}"
            );
            let message = error.to_string();
            assert!(message.contains("postgresql://"), "{message}");
            assert!(message.contains("key=value"), "{message}");
        }
    }

    #[test]
    fn the_password_never_shows() {
        for s in [
            "postgresql://u:secret@h/db",
            "host=/tmp user=u password=secret",
            "host=/tmp password='secret'",
        ] {
            let conn = ConnectionString::parse(s).unwrap();
            let debug = format!("{conn:?}");
            assert!(!debug.contains("secret"), "{debug}");
            let debug = format!("{:?}", Some(conn));
            assert!(!debug.contains("secret"), "{debug}");
        }
        // Nor in the errors for strings that do not parse.
        for s in [
            "postgresql://u:secret@h/db?bogus=1",
            "postgresql://u:secret@h:notaport/db",
            "host=/tmp password=secret bogus",
            "host=/tmp password='secret",
            "host=/tmp password=secret sslmode=require",
            "password=secret",
            "password = s=ecret",
            "host=/tmp 'secret'",
        ] {
            let error = ConnectionString::parse(s).unwrap_err();
            for shown in [error.to_string(), format!("{error:?}")] {
                assert!(!shown.contains("secret"), "{s:?}: {shown}");
                assert!(!shown.contains("ecret"), "{s:?}: {shown}");
            }
        }
    }

    #[test]
    fn deserializing_validates_without_echoing() {
        #[derive(serde::Deserialize)]
        struct Wrapper {
            #[allow(dead_code)]
            conn: ConnectionString,
        }
        let ok: Result<Wrapper, _> = toml::from_str("conn = \"postgresql://u:secret@h/db\"");
        assert!(ok.is_ok());
        let error = toml::from_str::<Wrapper>("conn = \"password=secret bogus\"")
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("invalid PostgreSQL connection string"),
            "{error}"
        );
        // toml quotes the offending line of its input; the message itself
        // must not add the value.
        assert_eq!(error.matches("secret").count(), 1, "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_instance_is_reported_quickly() {
        let conn = ConnectionString::parse("host=127.0.0.1 port=1 user=postgres").unwrap();
        let started = Instant::now();
        let probe = probe("main", &conn, Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(probe.instance, "main");
        assert!(!probe.reachable);
        assert_eq!(probe.role, ReplicationRole::Unknown);
        let error = probe.error.unwrap();
        assert!(error.contains("cannot connect to PostgreSQL"), "{error}");
        assert!(error.contains("refused"), "{error}");

        let error = check_reachable(&conn, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, PostgresError::Unreachable(_)), "{error:?}");
    }

    #[tokio::test]
    async fn a_silent_server_is_given_up_on_at_the_timeout() {
        // Accepts the connection, then never answers the startup message:
        // the socket-level connect timeout alone would wait forever.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let conn =
            ConnectionString::parse(&format!("host=127.0.0.1 port={port} user=postgres")).unwrap();
        let started = Instant::now();
        let probe = probe("main", &conn, Duration::from_millis(300)).await;
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert!(!probe.reachable);
        let error = probe.error.unwrap();
        assert!(error.contains("timed out"), "{error}");
        server.abort();
    }

    #[test]
    fn errors_name_the_query() {
        let error = PostgresError::Query {
            query: "pg_stat_replication",
            message: "ERROR: boom".into(),
        };
        assert_eq!(
            error.to_string(),
            "query `pg_stat_replication` failed: ERROR: boom"
        );
    }

    #[test]
    fn conversions_clamp() {
        assert_eq!(to_u64(-5), 0);
        assert_eq!(to_u32(-1), 0);
        assert_eq!(to_u64_from_f64(-1.5), 0);
        assert_eq!(to_u64_from_f64(f64::NAN), 0);
        assert_eq!(to_u64_from_f64(12.9), 12);
    }
}

mod facts;
pub mod target;
mod tools;
pub use facts::{DatabaseFacts, database_facts};
pub use tools::{
    PgRestoreOptions, PgTools, pg_dump_command, pg_dumpall_globals_command, pg_restore_command,
    tool_version_command,
};
