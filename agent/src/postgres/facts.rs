//! What a backup records about its database at dump time: server version,
//! database size and per-table row estimates (restore drills compare
//! against them).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use super::{ConnectionString, PostgresError};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatabaseFacts {
    pub server_version: String,
    pub size_bytes: u64,
    /// `schema.table` (quoted as needed) → `pg_class.reltuples`; -1 for a
    /// table never vacuumed or analyzed.
    pub row_estimates: BTreeMap<String, i64>,
    /// The cluster's system identifier; empty when this role may not read
    /// `pg_control_system()` (the backup then groups by host).
    pub system_identifier: String,
}

pub async fn database_facts(
    connection: &ConnectionString,
    database: &str,
    timeout: Duration,
) -> Result<DatabaseFacts, PostgresError> {
    let mut config = tokio_postgres::Config::from_str(connection.as_str())
        .map_err(|e| PostgresError::InvalidConnectionString(e.to_string()))?;
    config.dbname(database);
    config.application_name("cairn-agent");
    let work = async {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| PostgresError::Unreachable(super::describe(&e)))?;
        let connection = tokio::spawn(connection);
        let query = |name: &'static str| {
            move |e: tokio_postgres::Error| PostgresError::Query {
                query: name,
                message: super::describe(&e),
            }
        };
        let row = client
            .query_one(
                "SELECT current_setting('server_version'), pg_database_size(current_database())::bigint",
                &[],
            )
            .await
            .map_err(query("database size"))?;
        let server_version: String = row.get(0);
        let size: i64 = row.get(1);
        let rows = client
            .query(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.reltuples::bigint
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p', 'm')
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg_toast%'",
                &[],
            )
            .await
            .map_err(query("row estimates"))?;
        let system_identifier = match client.query_one(super::SYSTEM_IDENTIFIER_SQL, &[]).await {
            Ok(row) => row.try_get::<_, String>(0).unwrap_or_default(),
            Err(error) => {
                tracing::warn!(error = %super::describe(&error), "cannot read the system identifier: the backup groups by agent and instance");
                String::new()
            }
        };
        drop(client);
        connection.abort();
        Ok(DatabaseFacts {
            system_identifier,
            server_version,
            size_bytes: u64::try_from(size).unwrap_or(0),
            row_estimates: rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect(),
        })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        PostgresError::Unreachable(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))
    })?
}
