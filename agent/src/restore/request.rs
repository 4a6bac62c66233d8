//! A restore command, checked before anything runs: the instance, the
//! kind of job, the target's name, the tables and schemas of a partial
//! restore, and the names of the job's own databases and files.

use std::path::PathBuf;

use cairn_common::names::{parse_qualified_table, parse_schema_name};
use cairn_common::proto;

use super::IDENTIFIER_MAX_BYTES;
use crate::config::AgentConfig;
use crate::postgres::ConnectionString;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Full,
    Partial,
    Drill,
}

/// A restore command, checked.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) mode: Mode,
    pub(super) job_id: String,
    pub(super) instance: String,
    pub(super) connection: ConnectionString,
    /// The target database (unused by drills).
    pub(super) target: String,
    /// The staging (full restore) or scratch (drill) database.
    pub(super) staging: String,
    pub(super) dump_bytes: u64,
    pub(super) database_bytes: u64,
    pub(super) chunk_count: u64,
    pub(super) replace: bool,
    pub(super) drop_previous: bool,
    pub(super) no_owner: bool,
    pub(super) no_roles: bool,
    pub(super) jobs: u32,
    pub(super) tables: Vec<(String, String)>,
    pub(super) schemas: Vec<String>,
    pub(super) spool_dir: PathBuf,
    /// Names this job's files in `spool_dir`.
    pub(super) file_stem: String,
}

impl Request {
    pub(super) fn new(
        config: &AgentConfig,
        command: proto::RestoreCommand,
    ) -> Result<Request, String> {
        let instance = config
            .instances
            .iter()
            .find(|i| i.name.as_str() == command.instance)
            .ok_or_else(|| format!("this agent has no instance {:?}", command.instance))?;
        let partial = !command.tables.is_empty() || !command.schemas.is_empty();
        let mode = match (command.drill, partial) {
            (true, true) => {
                return Err(
                    "a drill restores the whole backup: it takes no tables or schemas".into(),
                );
            }
            (true, false) => Mode::Drill,
            (false, true) => Mode::Partial,
            (false, false) => Mode::Full,
        };
        if mode != Mode::Drill {
            check_database_name(&command.database)?;
        }
        let tables = command
            .tables
            .iter()
            .map(|table| parse_qualified_table(table))
            .collect::<Result<Vec<_>, _>>()?;
        let schemas = command
            .schemas
            .iter()
            .map(|schema| parse_schema_name(schema))
            .collect::<Result<Vec<_>, _>>()?;
        let tag = job_tag(&command.job_id);
        let staging = match mode {
            Mode::Drill => format!("cairn_drill_{tag}"),
            _ => format!("cairn_restore_{tag}"),
        };
        Ok(Request {
            mode,
            job_id: command.job_id,
            instance: command.instance,
            connection: instance.postgres.clone(),
            target: command.database,
            staging,
            dump_bytes: command.dump_bytes,
            database_bytes: command.database_bytes,
            chunk_count: command.chunk_count,
            replace: command.replace,
            drop_previous: command.drop_previous,
            no_owner: command.no_owner,
            no_roles: command.no_roles,
            jobs: command.jobs.max(1),
            tables,
            schemas,
            spool_dir: config.spool_dir(),
            file_stem: format!("cairn-restore-{tag}"),
        })
    }

    /// What a failure leaves behind, to follow its message.
    pub(super) fn untouched(&self) -> String {
        match self.mode {
            Mode::Full => "nothing was renamed".into(),
            Mode::Partial => "nothing was committed".into(),
            Mode::Drill => "the drill's scratch database was dropped".into(),
        }
    }
}

/// PostgreSQL refuses an empty name and one longer than 63 bytes, and no
/// command line can hold a NUL.
fn check_database_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the target database name is empty".into());
    }
    if name.len() > IDENTIFIER_MAX_BYTES {
        return Err(format!(
            "the target database name {name:?} is longer than {IDENTIFIER_MAX_BYTES} bytes"
        ));
    }
    if name.contains('\0') {
        return Err("the target database name contains a NUL character".into());
    }
    Ok(())
}

/// 8 hex digits that name a job's databases and files (FNV-1a of its id).
fn job_tag(job_id: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in job_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_tags_are_8_hex_and_differ() {
        let a = job_tag("job-1700000000000-0a1b2c3d");
        let b = job_tag("job-1700000000000-0a1b2c3e");
        assert_eq!(a.len(), 8);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(a, job_tag("job-1700000000000-0a1b2c3d"));
    }

    fn config() -> AgentConfig {
        cairn_common::config::parse_toml(
            "name = \"db1\"\ncoordinator = \"https://127.0.0.1:1\"\nidentity_dir = \"i\"\n\
             [[instances]]\nname = \"main\"\npostgres = \"host=/tmp user=postgres\"\n",
            std::path::Path::new("agent.toml"),
        )
        .unwrap()
    }

    fn command() -> proto::RestoreCommand {
        proto::RestoreCommand {
            instance: "main".into(),
            database: "shop".into(),
            job_id: "job-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn commands_are_checked_before_anything_runs() {
        let request = Request::new(&config(), command()).unwrap();
        assert_eq!(request.mode, Mode::Full);
        assert_eq!(
            request.staging,
            format!("cairn_restore_{}", job_tag("job-1"))
        );
        assert_eq!(request.jobs, 1);

        let drill = Request::new(
            &config(),
            proto::RestoreCommand {
                drill: true,
                database: String::new(),
                ..command()
            },
        )
        .unwrap();
        assert_eq!(drill.mode, Mode::Drill);
        assert!(drill.staging.starts_with("cairn_drill_"));

        let partial = Request::new(
            &config(),
            proto::RestoreCommand {
                tables: vec!["public.orders".into(), "\"my.schema\".\"T\"".into()],
                schemas: vec!["sales".into()],
                ..command()
            },
        )
        .unwrap();
        assert_eq!(partial.mode, Mode::Partial);
        assert_eq!(
            partial.tables,
            [
                ("public".to_string(), "orders".to_string()),
                ("my.schema".to_string(), "T".to_string())
            ]
        );

        let check = |command: proto::RestoreCommand, expected: &str| {
            let error = Request::new(&config(), command).unwrap_err();
            assert!(error.contains(expected), "{error} lacks {expected}");
        };
        check(
            proto::RestoreCommand {
                instance: "other".into(),
                ..command()
            },
            "this agent has no instance \"other\"",
        );
        check(
            proto::RestoreCommand {
                database: String::new(),
                ..command()
            },
            "the target database name is empty",
        );
        check(
            proto::RestoreCommand {
                database: "x".repeat(64),
                ..command()
            },
            "longer than 63 bytes",
        );
        check(
            proto::RestoreCommand {
                drill: true,
                tables: vec!["public.t".into()],
                ..command()
            },
            "a drill restores the whole backup",
        );
        check(
            proto::RestoreCommand {
                tables: vec!["orders".into()],
                ..command()
            },
            "is not SCHEMA.TABLE",
        );
    }
}
