//! The SQL a restore runs on its target instance: the safety checks (is it
//! a standby, is the target empty, do the tables hold rows), the roles the
//! backup needs, `CREATE DATABASE` of the staging database, the swap into
//! place, and the row counts of a drill.
//!
//! Every identifier that reaches SQL is quoted with [`quote_ident`] and
//! every value is a bind parameter or quoted with [`quote_literal`]:
//! database, schema, table and role names may hold anything PostgreSQL
//! allows (spaces, quotes, dots, non-ASCII). Statements that cannot take
//! parameters (DDL) are built from quoted names only.
//!
//! [`Instance`] is one session on the instance's maintenance database (the
//! connection string's own database, `postgres` when it names none, never
//! a database the restore renames or drops), held for the whole job. The
//! checks inside other databases open a short session of their own.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tracing::Instrument;

use super::{ConnectionString, PostgresError, describe, describe_target};

/// How long connecting (and authenticating) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one check (a catalog query) may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one DDL statement may take (`CREATE DATABASE` copies
/// `template0`, `DROP DATABASE` removes files).
const DDL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the swap waits for a lock on either database before it gives
/// up (and is retried): a session that holds one must not hang the job.
const SWAP_LOCK_TIMEOUT: &str = "10s";
/// The database used when the connection string names none, as libpq's
/// tools do for maintenance.
const DEFAULT_MAINTENANCE_DATABASE: &str = "postgres";

/// `name` as an SQL identifier: always double-quoted, with `"` doubled, so
/// that no name can change the statement it is put in.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `value` as an SQL string literal (standard conforming strings, which
/// every session here sets): `'` doubled.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `"schema"."table"`.
pub fn quote_qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// A session on another database, from `pg_stat_activity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSession {
    pub pid: i32,
    pub user: String,
    pub application: String,
}

impl fmt::Display for BackendSession {
    /// `pid 1234 alice@psql` (`pid 1234 alice` without an application name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} {}", self.pid, self.user)?;
        if !self.application.is_empty() {
            write!(f, "@{}", self.application)?;
        }
        Ok(())
    }
}

/// What a database holds outside the system schemas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatabaseContents {
    /// Tables (plain and partitioned).
    pub tables: u64,
    /// Views, materialized views, sequences and foreign tables.
    pub other_relations: u64,
    /// Functions, types, large objects, extensions (but plpgsql) and
    /// schemas (but public): what a database with no relation may still
    /// hold.
    pub other_objects: u64,
}

impl DatabaseContents {
    /// Nothing but what `CREATE DATABASE` puts there.
    pub fn is_empty(&self) -> bool {
        self.tables == 0 && self.other_relations == 0 && self.other_objects == 0
    }
}

impl fmt::Display for DatabaseContents {
    /// Like `12 tables` or `1 table and 3 other relations`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        match (self.tables, self.other_relations) {
            (0, 0) => write!(
                f,
                "{} object{} (functions, types, large objects, extensions or schemas)",
                self.other_objects,
                plural(self.other_objects)
            ),
            (tables, 0) => write!(f, "{tables} table{}", plural(tables)),
            (0, others) => write!(
                f,
                "{others} relation{} (views, sequences...)",
                plural(others)
            ),
            (tables, others) => write!(
                f,
                "{tables} table{} and {others} other relation{}",
                plural(tables),
                plural(others)
            ),
        }
    }
}

/// A table of a partial restore as the target has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableState {
    pub exists: bool,
    pub has_rows: bool,
}

/// Why the swap did not happen. Either way nothing was renamed (it is one
/// transaction).
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// A session connected to one of the databases meanwhile, or held a
    /// lock on it: worth another try.
    #[error("{0}")]
    InUse(String),
    #[error(transparent)]
    Failed(#[from] PostgresError),
}

/// The restore's session on the instance's maintenance database.
pub struct Instance {
    client: Client,
    server_version_num: u32,
    maintenance_database: String,
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("maintenance_database", &self.maintenance_database)
            .field("server_version_num", &self.server_version_num)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Connects to the maintenance database: the connection string's own,
    /// else `postgres`; `postgres` too when the connection string's is one
    /// of `avoid` (the databases the restore renames or drops: a session on
    /// them would stand in the way).
    pub async fn connect(
        conn: &ConnectionString,
        avoid: &[&str],
    ) -> Result<Instance, PostgresError> {
        let configured = conn.config()?.get_dbname().map(str::to_string);
        let maintenance_database = match configured {
            Some(name) if !avoid.contains(&name.as_str()) => name,
            _ => DEFAULT_MAINTENANCE_DATABASE.to_string(),
        };
        let client = open(conn, &maintenance_database).await?;
        let row = timed(
            "server_version_num",
            CHECK_TIMEOUT,
            client.query_one("SELECT current_setting('server_version_num')::int4", &[]),
        )
        .await?;
        let version: i32 = row.get(0);
        Ok(Instance {
            client,
            server_version_num: u32::try_from(version).unwrap_or(0),
            maintenance_database,
        })
    }

    pub fn maintenance_database(&self) -> &str {
        &self.maintenance_database
    }

    /// Whether the session still works (a restarted server ends it).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub async fn in_recovery(&self) -> Result<bool, PostgresError> {
        let row = timed(
            "pg_is_in_recovery",
            CHECK_TIMEOUT,
            self.client.query_one("SELECT pg_is_in_recovery()", &[]),
        )
        .await?;
        Ok(row.get(0))
    }

    /// The data directory; `None` when this role may not see it (it needs
    /// superuser or `pg_read_all_settings`).
    pub async fn data_directory(&self) -> Result<Option<String>, PostgresError> {
        let row = timed(
            "data_directory",
            CHECK_TIMEOUT,
            self.client.query_one(
                "SELECT (SELECT setting FROM pg_settings WHERE name = 'data_directory')",
                &[],
            ),
        )
        .await?;
        Ok(row.get(0))
    }

    pub async fn database_exists(&self, name: &str) -> Result<bool, PostgresError> {
        let row = timed(
            "pg_database",
            CHECK_TIMEOUT,
            self.client.query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname::text = $1)",
                &[&name],
            ),
        )
        .await?;
        Ok(row.get(0))
    }

    /// Whether `name` is a template database (`datistemplate`); false when
    /// it does not exist.
    pub async fn is_template(&self, name: &str) -> Result<bool, PostgresError> {
        let row = timed(
            "pg_database",
            CHECK_TIMEOUT,
            self.client.query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname::text = $1 AND datistemplate)",
                &[&name],
            ),
        )
        .await?;
        Ok(row.get(0))
    }

    /// Whether a membership in `role` would hand out power over the whole
    /// instance: a superuser, or one of PostgreSQL's predefined `pg_*`
    /// roles (server files, programs, signals...).
    pub async fn is_instance_wide_role(&self, role: &str) -> Result<bool, PostgresError> {
        if role.starts_with("pg_") {
            return Ok(true);
        }
        let row = timed(
            "pg_roles",
            CHECK_TIMEOUT,
            self.client.query_opt(
                "SELECT rolsuper FROM pg_roles WHERE rolname::text = $1",
                &[&role],
            ),
        )
        .await?;
        Ok(row.is_some_and(|row| row.get::<_, bool>(0)))
    }

    /// Drops a role this restore created (when it could not be made safe).
    pub async fn drop_role(&self, role: &str) -> Result<(), PostgresError> {
        let sql = format!("DROP ROLE IF EXISTS {}", quote_ident(role));
        timed("DROP ROLE", CHECK_TIMEOUT, self.client.batch_execute(&sql)).await
    }

    /// Staging and scratch databases of restores that did not clean up
    /// after themselves (an agent killed mid-job), other than `except`.
    pub async fn leftover_staging_databases(
        &self,
        except: &str,
    ) -> Result<Vec<String>, PostgresError> {
        let rows = timed(
            "pg_database",
            CHECK_TIMEOUT,
            self.client.query(
                "SELECT datname::text FROM pg_database
                  WHERE datname ~ '^cairn_(restore|drill)_[0-9a-f]{8}$' AND datname <> $1
                  ORDER BY 1",
                &[&except],
            ),
        )
        .await?;
        Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
    }

    /// Which of `names` are roles here.
    pub async fn existing_roles(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, PostgresError> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let rows = timed(
            "pg_roles",
            CHECK_TIMEOUT,
            self.client.query(
                "SELECT rolname::text FROM pg_roles WHERE rolname::text = ANY($1::text[])",
                &[&names],
            ),
        )
        .await?;
        Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
    }

    /// Takes SUPERUSER, REPLICATION, BYPASSRLS and CREATEROLE away from a
    /// role this restore created: a role copied to another host gets the
    /// objects it owns and the grants it had, not power over the whole
    /// instance. Returns the attributes it had.
    pub async fn strip_instance_wide_attributes(
        &self,
        role: &str,
    ) -> Result<Vec<&'static str>, PostgresError> {
        let row = timed(
            "pg_roles",
            CHECK_TIMEOUT,
            self.client.query_one(
                "SELECT rolsuper, rolreplication, rolbypassrls, rolcreaterole
                   FROM pg_roles WHERE rolname::text = $1",
                &[&role],
            ),
        )
        .await?;
        let had: Vec<&'static str> = [
            (0, "SUPERUSER"),
            (1, "REPLICATION"),
            (2, "BYPASSRLS"),
            (3, "CREATEROLE"),
        ]
        .into_iter()
        .filter(|(index, _)| row.get::<_, bool>(*index))
        .map(|(_, name)| name)
        .collect();
        if !had.is_empty() {
            let sql = format!(
                "ALTER ROLE {} NOSUPERUSER NOREPLICATION NOBYPASSRLS NOCREATEROLE",
                quote_ident(role)
            );
            timed("ALTER ROLE", CHECK_TIMEOUT, self.client.batch_execute(&sql)).await?;
        }
        Ok(had)
    }

    /// Runs one statement of a backup's globals (`CREATE ROLE`, `ALTER
    /// ROLE`, `GRANT`) as it is written there. The error is PostgreSQL's
    /// message.
    pub async fn run_globals_statement(&self, sql: &str) -> Result<(), String> {
        match tokio::time::timeout(CHECK_TIMEOUT, self.client.batch_execute(sql)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(describe(&error)),
            Err(_) => Err("timed out".into()),
        }
    }

    /// `CREATE DATABASE name TEMPLATE template0` with `options` (keys are
    /// SQL keywords chosen by the caller, values are quoted here).
    pub async fn create_database(
        &self,
        name: &str,
        options: &[(&'static str, String)],
    ) -> Result<(), PostgresError> {
        let mut sql = format!("CREATE DATABASE {} TEMPLATE template0", quote_ident(name));
        for (key, value) in options {
            sql.push_str(&format!(" {key} = {}", quote_literal(value)));
        }
        ddl(&self.client, "CREATE DATABASE", &sql).await
    }

    /// Drops `name` if it exists, ending its sessions first.
    pub async fn drop_database(&self, name: &str) -> Result<(), PostgresError> {
        if self.server_version_num >= 130_000 {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name));
            return ddl(&self.client, "DROP DATABASE", &sql).await;
        }
        // Before PostgreSQL 13: no FORCE. A session that connects between
        // the two statements makes the drop fail, and it is reported.
        for session in self.sessions(name).await? {
            self.terminate(session.pid).await?;
        }
        let sql = format!("DROP DATABASE IF EXISTS {}", quote_ident(name));
        ddl(&self.client, "DROP DATABASE", &sql).await
    }

    /// The sessions connected to `database`, but autovacuum's (which
    /// `ALTER DATABASE ... RENAME` stops by itself).
    pub async fn sessions(&self, database: &str) -> Result<Vec<BackendSession>, PostgresError> {
        let rows = timed(
            "pg_stat_activity",
            CHECK_TIMEOUT,
            self.client.query(
                "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, '')
                   FROM pg_stat_activity
                  WHERE datname::text = $1
                    AND pid <> pg_backend_pid()
                    AND backend_type IS DISTINCT FROM 'autovacuum worker'
                  ORDER BY pid",
                &[&database],
            ),
        )
        .await?;
        Ok(rows
            .iter()
            .map(|row| BackendSession {
                pid: row.get(0),
                user: row.get(1),
                application: row.get(2),
            })
            .collect())
    }

    /// `pg_terminate_backend`; false when the session had already ended.
    pub async fn terminate(&self, pid: i32) -> Result<bool, PostgresError> {
        let row = timed(
            "pg_terminate_backend",
            CHECK_TIMEOUT,
            self.client
                .query_one("SELECT coalesce(pg_terminate_backend($1), false)", &[&pid]),
        )
        .await?;
        Ok(row.get(0))
    }

    /// Sessions named `application_name` that have waited for a lock for
    /// longer than `limit`.
    pub async fn lock_waiters(
        &self,
        application_name: &str,
        limit: Duration,
    ) -> Result<Vec<i32>, PostgresError> {
        let seconds = limit.as_secs_f64();
        let rows = timed(
            "pg_stat_activity",
            CHECK_TIMEOUT,
            self.client.query(
                "SELECT pid FROM pg_stat_activity
                  WHERE application_name = $1 AND wait_event_type = 'Lock'
                    AND now() - query_start > make_interval(secs => $2)",
                &[&application_name, &seconds],
            ),
        )
        .await?;
        Ok(rows.iter().map(|row| row.get::<_, i32>(0)).collect())
    }

    /// `pg_cancel_backend`: the session's current statement fails.
    pub async fn cancel_backend(&self, pid: i32) -> Result<bool, PostgresError> {
        let row = timed(
            "pg_cancel_backend",
            CHECK_TIMEOUT,
            self.client
                .query_one("SELECT coalesce(pg_cancel_backend($1), false)", &[&pid]),
        )
        .await?;
        Ok(row.get(0))
    }

    pub async fn set_database_owner(
        &self,
        database: &str,
        owner: &str,
    ) -> Result<(), PostgresError> {
        let sql = format!(
            "ALTER DATABASE {} OWNER TO {}",
            quote_ident(database),
            quote_ident(owner)
        );
        ddl(&self.client, "ALTER DATABASE OWNER", &sql).await
    }

    /// In one transaction: `target` renamed to `previous` (when given), then
    /// `staging` renamed to `target`. Either both happen or neither.
    pub async fn swap(
        &self,
        staging: &str,
        target: &str,
        previous: Option<&str>,
    ) -> Result<(), SwapError> {
        let mut sql = format!(
            "BEGIN; SET LOCAL lock_timeout = {}; ",
            quote_literal(SWAP_LOCK_TIMEOUT)
        );
        if let Some(previous) = previous {
            sql.push_str(&format!(
                "ALTER DATABASE {} RENAME TO {}; ",
                quote_ident(target),
                quote_ident(previous)
            ));
        }
        sql.push_str(&format!(
            "ALTER DATABASE {} RENAME TO {}; COMMIT",
            quote_ident(staging),
            quote_ident(target)
        ));
        let result = tokio::time::timeout(DDL_TIMEOUT, self.client.batch_execute(&sql)).await;
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(SwapError::Failed(PostgresError::Query {
                    query: "ALTER DATABASE RENAME",
                    message: "timed out".into(),
                }));
            }
        };
        // A failed statement leaves the transaction aborted: end it.
        if let Err(rollback) = self.client.batch_execute("ROLLBACK").await {
            tracing::debug!(error = %describe(&rollback), "rolling back the swap");
        }
        let in_use = matches!(
            error.code(),
            Some(code) if *code == SqlState::OBJECT_IN_USE || *code == SqlState::LOCK_NOT_AVAILABLE
        );
        let message = describe(&error);
        if in_use {
            Err(SwapError::InUse(message))
        } else {
            Err(SwapError::Failed(PostgresError::Query {
                query: "ALTER DATABASE RENAME",
                message,
            }))
        }
    }
}

/// The database the agent connects through: the connection string's own,
/// else the maintenance database [`Instance::connect`] uses.
pub fn connection_database(conn: &ConnectionString) -> Result<String, PostgresError> {
    Ok(conn
        .config()?
        .get_dbname()
        .unwrap_or(DEFAULT_MAINTENANCE_DATABASE)
        .to_string())
}

/// What `database` holds outside `pg_catalog`, `information_schema` and the
/// toast and temporary schemas.
pub async fn database_contents(
    conn: &ConnectionString,
    database: &str,
) -> Result<DatabaseContents, PostgresError> {
    let client = open(conn, database).await?;
    let row = timed(
        "database contents",
        CHECK_TIMEOUT,
        client.query_one(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                        AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'),
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relkind IN ('v', 'm', 'S', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                        AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'),
                    (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
                  + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                        AND n.nspname NOT LIKE 'pg\\_toast%' AND t.typrelid = 0 AND t.typelem = 0)
                  + (SELECT count(*) FROM pg_largeobject_metadata)
                  + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')
                  + (SELECT count(*) FROM pg_namespace
                      WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public')
                        AND nspname NOT LIKE 'pg\\_toast%' AND nspname NOT LIKE 'pg\\_temp\\_%')",
            &[],
        ),
    )
    .await?;
    Ok(DatabaseContents {
        tables: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        other_relations: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        other_objects: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
    })
}

/// Which of `schemas` exist in `database`.
pub async fn existing_schemas(
    conn: &ConnectionString,
    database: &str,
    schemas: &BTreeSet<String>,
) -> Result<BTreeSet<String>, PostgresError> {
    let client = open(conn, database).await?;
    let names: Vec<&str> = schemas.iter().map(String::as_str).collect();
    let rows = timed(
        "pg_namespace",
        CHECK_TIMEOUT,
        client.query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname::text = ANY($1::text[])",
            &[&names],
        ),
    )
    .await?;
    Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
}

/// The foreign keys in `database` of tables not among `tables` (schema,
/// table) that point at one of them: (schema, table, constraint). A
/// partition's copy of its parent's key is not counted (pg_dump dumps the
/// parent's only).
pub async fn foreign_keys_into(
    conn: &ConnectionString,
    database: &str,
    tables: &[(String, String)],
) -> Result<Vec<(String, String, String)>, PostgresError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let client = open(conn, database).await?;
    let schemas: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|(_, t)| t.as_str()).collect();
    let rows = timed(
        "pg_constraint",
        CHECK_TIMEOUT,
        client.query(
            "WITH chosen (nspname, relname) AS (SELECT * FROM unnest($1::text[], $2::text[]))
             SELECT n.nspname::text, c.relname::text, con.conname::text
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_class r ON r.oid = con.confrelid
               JOIN pg_namespace rn ON rn.oid = r.relnamespace
              WHERE con.contype = 'f' AND con.conparentid = 0
                AND (rn.nspname::text, r.relname::text) IN (SELECT nspname, relname FROM chosen)
                AND (n.nspname::text, c.relname::text) NOT IN (SELECT nspname, relname FROM chosen)
              ORDER BY 1, 2, 3",
            &[&schemas, &names],
        ),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect())
}

/// Whether each of `tables` (schema, table) exists in `database` and holds
/// a row.
pub async fn table_states(
    conn: &ConnectionString,
    database: &str,
    tables: &[(String, String)],
) -> Result<Vec<TableState>, PostgresError> {
    let client = open(conn, database).await?;
    let mut states = Vec::with_capacity(tables.len());
    for (schema, table) in tables {
        let row = timed(
            "pg_class",
            CHECK_TIMEOUT,
            client.query_opt(
                "SELECT c.relkind::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname::text = $1 AND c.relname::text = $2",
                &[schema, table],
            ),
        )
        .await?;
        let Some(row) = row else {
            states.push(TableState::default());
            continue;
        };
        let relkind: String = row.get(0);
        let has_rows = if relkind == "r" || relkind == "p" {
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM {} LIMIT 1)",
                quote_qualified(schema, table)
            );
            let row = timed("table rows", CHECK_TIMEOUT, client.query_one(&sql, &[])).await?;
            row.get(0)
        } else {
            false
        };
        states.push(TableState {
            exists: true,
            has_rows,
        });
    }
    Ok(states)
}

/// `count(*)` of each of `tables` (schema, table) in `database`, its own
/// rows only (`ONLY`: an inheritance parent's children are counted as
/// themselves). Unbounded in time: the caller can drop it.
pub async fn count_rows(
    conn: &ConnectionString,
    database: &str,
    tables: &[(String, String)],
) -> Result<Vec<u64>, PostgresError> {
    let client = open(conn, database).await?;
    let mut counts = Vec::with_capacity(tables.len());
    for (schema, table) in tables {
        let sql = format!(
            "SELECT count(*) FROM ONLY {}",
            quote_qualified(schema, table)
        );
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(|error| PostgresError::Query {
                query: "count(*)",
                message: format!("{schema}.{table}: {}", describe(&error)),
            })?;
        counts.push(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0));
    }
    Ok(counts)
}

/// A session on `database`; its connection task ends when the client is
/// dropped.
async fn open(conn: &ConnectionString, database: &str) -> Result<Client, PostgresError> {
    let mut config = conn.config()?;
    config.dbname(database);
    config.connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => {
                return Err(PostgresError::Unreachable(format!(
                    "{} (database {database:?}): {}",
                    describe_target(&config),
                    describe(&error)
                )));
            }
            Err(_) => {
                return Err(PostgresError::Unreachable(format!(
                    "{} (database {database:?}): timed out after {} connecting or authenticating",
                    describe_target(&config),
                    humantime::format_duration(CONNECT_TIMEOUT)
                )));
            }
        };
    tokio::spawn(
        async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %describe(&error), "PostgreSQL connection");
            }
        }
        .in_current_span(),
    );
    // The literals built here assume it (the default since 9.1).
    timed(
        "standard_conforming_strings",
        CHECK_TIMEOUT,
        client.batch_execute("SET standard_conforming_strings = on"),
    )
    .await?;
    Ok(client)
}

async fn timed<T>(
    query: &'static str,
    timeout: Duration,
    future: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PostgresError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(PostgresError::Query {
            query,
            message: describe(&error),
        }),
        Err(_) => Err(PostgresError::Query {
            query,
            message: format!("timed out after {}", humantime::format_duration(timeout)),
        }),
    }
}

async fn ddl(client: &Client, query: &'static str, sql: &str) -> Result<(), PostgresError> {
    timed(query, DDL_TIMEOUT, client.batch_execute(sql)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_always_quoted() {
        for (name, quoted) in [
            ("shop", "\"shop\""),
            ("Shop", "\"Shop\""),
            ("my db", "\"my db\""),
            ("a\"b", "\"a\"\"b\""),
            ("\"", "\"\"\"\""),
            ("ünï; DROP DATABASE x", "\"ünï; DROP DATABASE x\""),
            ("", "\"\""),
        ] {
            assert_eq!(quote_ident(name), quoted, "{name:?}");
        }
        assert_eq!(
            quote_qualified("my.schema", "t\""),
            "\"my.schema\".\"t\"\"\""
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "'a\\b'");
    }

    #[test]
    fn sessions_and_contents_read_well() {
        let session = BackendSession {
            pid: 1234,
            user: "alice".into(),
            application: "psql".into(),
        };
        assert_eq!(session.to_string(), "pid 1234 alice@psql");
        let session = BackendSession {
            application: String::new(),
            ..session
        };
        assert_eq!(session.to_string(), "pid 1234 alice");
        for (tables, others, text) in [
            (12, 0, "12 tables"),
            (1, 0, "1 table"),
            (1, 3, "1 table and 3 other relations"),
            (2, 1, "2 tables and 1 other relation"),
            (0, 2, "2 relations (views, sequences...)"),
        ] {
            let contents = DatabaseContents {
                tables,
                other_relations: others,
                other_objects: 0,
            };
            assert_eq!(contents.to_string(), text);
            assert!(!contents.is_empty());
        }
        assert!(DatabaseContents::default().is_empty());
        let objects = DatabaseContents {
            other_objects: 3,
            ..DatabaseContents::default()
        };
        assert!(!objects.is_empty());
        assert_eq!(
            objects.to_string(),
            "3 objects (functions, types, large objects, extensions or schemas)"
        );
    }
}
