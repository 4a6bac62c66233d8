//! The restore cases of `cargo xtask bench`, (g) to (k): on each dataset,
//! after its backup cases, the database as it is then (what (f) backed up)
//! restored into new databases of the same cluster:
//!
//! - (g) `createdb DB; pg_restore -d DB FILE`, FILE from `pg_dump -Fc -Z0`;
//! - (h) `createdb DB; openssl enc -d ... < FILE.enc | zstd -d | pg_restore
//!   -d DB`, FILE.enc made like (b)'s output (`pg_dump -Fc -Z0 | zstd -1 |
//!   openssl enc -aes-256-ctr`);
//! - (i) `cairn restore ID --database DB --wait` of (f)'s backup, from the
//!   local repository of the last (c) fleet: the agent downloads, decrypts,
//!   decompresses and re-hashes the chunks and streams them into one
//!   `pg_restore` (the staging database, the row count of every table and
//!   the rename into place are part of it);
//! - (j) `createdb DB; pg_restore -j 2 -d DB FILE`;
//! - (k) `cairn restore ID --database DB --jobs 2 --wait`: the agent spools
//!   the checked dump to its `spool_dir` (the default, `spool` in the
//!   agent's directory; the agent removes the file), then runs
//!   `pg_restore -j 2 FILE`.
//!
//! The baselines include `createdb`, as cairn's restore includes creating
//! its staging database. FILE and FILE.enc are made once per dataset, before
//! the runs; the cases run interleaved `CAIRN_BENCH_RUNS` times like the
//! backup cases. After every restore the new database is compared with the
//! bench database: the same user tables with the same `count(*)`, and as
//! many indexes (`pg_indexes`, outside the system schemas); a difference
//! fails the bench. Then it is dropped. Every restore starts right after a
//! `CHECKPOINT`, so none pays for what the one before left in shared
//! buffers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, ensure};
use cairn_integration_tests::{PgCluster, TestDir};
use serde_json::Value;

use super::{
    COMPRESS_ENCRYPT, DATABASE, Fleet, MB, MIB, Outcome, Sample, Settings, Target, columns,
    columns_header, job_seconds, measured_script, ratio, ratio_target, run_script,
};
use crate::interrupt::Interrupts;

/// `pg_restore -j` of (j) and `cairn restore --jobs` of (k).
const JOBS: u32 = 2;

/// The agent's peak RSS limit, as for backups.
const AGENT_RSS_LIMIT_MIB: f64 = 128.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum RestoreCase {
    File,
    Pipe,
    Cairn,
    FileJobs,
    CairnJobs,
}

impl RestoreCase {
    const ALL: [RestoreCase; 5] = [
        RestoreCase::File,
        RestoreCase::Pipe,
        RestoreCase::Cairn,
        RestoreCase::FileJobs,
        RestoreCase::CairnJobs,
    ];

    /// After the backup cases' (s) and (a) to (f).
    fn letter(self) -> char {
        match self {
            RestoreCase::File => 'g',
            RestoreCase::Pipe => 'h',
            RestoreCase::Cairn => 'i',
            RestoreCase::FileJobs => 'j',
            RestoreCase::CairnJobs => 'k',
        }
    }

    fn label(self) -> &'static str {
        match self {
            RestoreCase::File => "pg_restore -d DB FILE",
            RestoreCase::Pipe => "openssl -d | zstd -d | pg_restore -d",
            RestoreCase::Cairn => "cairn restore --wait",
            RestoreCase::FileJobs => "pg_restore -j 2 -d DB FILE",
            RestoreCase::CairnJobs => "cairn restore --jobs 2 --wait",
        }
    }

    fn jobs(self) -> u32 {
        match self {
            RestoreCase::File | RestoreCase::Pipe | RestoreCase::Cairn => 1,
            RestoreCase::FileJobs | RestoreCase::CairnJobs => JOBS,
        }
    }
}

/// What a restore must reproduce: every user table's row count (by
/// `schema.table`, quoted as needed) and the number of indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Contents {
    rows: BTreeMap<String, u64>,
    indexes: u64,
}

impl Contents {
    fn summary(&self) -> String {
        format!(
            "{} tables, {} rows, {} indexes",
            self.rows.len(),
            self.rows.values().sum::<u64>(),
            self.indexes
        )
    }
}

/// How `restored` differs from `source`; empty when it does not.
fn differences(source: &Contents, restored: &Contents) -> Vec<String> {
    let mut found = Vec::new();
    for (table, rows) in &source.rows {
        match restored.rows.get(table) {
            None => found.push(format!("table {table} is missing")),
            Some(count) if count != rows => {
                found.push(format!("table {table} has {count} rows, the source {rows}"));
            }
            Some(_) => {}
        }
    }
    for table in restored.rows.keys() {
        if !source.rows.contains_key(table) {
            found.push(format!("table {table} is not in the source"));
        }
    }
    if restored.indexes != source.indexes {
        found.push(format!(
            "{} indexes, the source {}",
            restored.indexes, source.indexes
        ));
    }
    found
}

fn contents(postgres: &PgCluster, database: &str) -> anyhow::Result<Contents> {
    const USER_SCHEMAS: &str = "schemaname NOT IN ('pg_catalog', 'information_schema')";
    let tables = postgres.psql(
        database,
        &format!(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE {USER_SCHEMAS} \
             ORDER BY 1"
        ),
    );
    let mut rows = BTreeMap::new();
    for table in tables.lines().filter(|line| !line.is_empty()) {
        let sql = format!("SELECT count(*) FROM {table}");
        let text = postgres.psql(database, &sql);
        let count = text
            .parse()
            .with_context(|| format!("{sql} in database {database} printed {text:?}"))?;
        rows.insert(table.to_string(), count);
    }
    let sql = format!("SELECT count(*) FROM pg_indexes WHERE {USER_SCHEMAS}");
    let text = postgres.psql(database, &sql);
    let indexes = text
        .parse()
        .with_context(|| format!("{sql} in database {database} printed {text:?}"))?;
    Ok(Contents { rows, indexes })
}

/// What one dataset's restores found.
pub(super) struct Restores {
    backup_id: String,
    /// The backup's `logical_bytes`: its pg_dump archive and the globals.
    backup_logical_bytes: Option<u64>,
    /// FILE, `pg_dump -Fc -Z0`: what MB/s divides.
    dump_bytes: u64,
    /// FILE.enc, when zstd and openssl are there.
    encrypted_bytes: Option<u64>,
    source: Contents,
    outcomes: BTreeMap<RestoreCase, Outcome>,
}

/// (g) to (k) of one dataset, on `postgres`, whose bench database `fleet`
/// backed up last as `backup` (as `cairn backups show` prints it).
pub(super) fn bench_restores(
    test_dir: &TestDir,
    interrupts: &Interrupts,
    settings: &Settings,
    postgres: &PgCluster,
    fleet: &Fleet,
    backup: &Value,
    pipeline_skipped: Option<&str>,
) -> anyhow::Result<Restores> {
    let backup_id = backup["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .with_context(|| format!("no id in {backup}"))?;
    let source = contents(postgres, DATABASE)?;
    let file = test_dir.path().join("restore.dump");
    let encrypted = test_dir.path().join("restore.dump.enc");
    run_script(
        test_dir,
        postgres,
        &format!("pg_dump -Fc -Z0 -f {}", quoted(&file)),
    )?;
    let dump_bytes = file_size(&file)?;
    let encrypted_bytes = match pipeline_skipped {
        Some(_) => None,
        None => {
            run_script(
                test_dir,
                postgres,
                &format!(
                    "pg_dump -Fc -Z0 | {COMPRESS_ENCRYPT} > {}",
                    quoted(&encrypted)
                ),
            )?;
            Some(file_size(&encrypted)?)
        }
    };
    println!(
        "  restores of backup {backup_id} ((f)'s): {}; FILE {:.1} MB{}",
        source.summary(),
        dump_bytes as f64 / MB,
        encrypted_bytes
            .map(|b| format!(", FILE.enc {:.1} MB", b as f64 / MB))
            .unwrap_or_default()
    );

    let mut samples: BTreeMap<RestoreCase, Vec<Sample>> = BTreeMap::new();
    for run in 1..=settings.runs {
        println!("  restore run {run}/{}:", settings.runs);
        for case in RestoreCase::ALL {
            interrupts.check()?;
            if case == RestoreCase::Pipe && encrypted_bytes.is_none() {
                continue;
            }
            let database = format!("restore_{}{run}", case.letter());
            // What the last case (or the backups) left dirty is written
            // out now, not during this restore.
            postgres.psql("postgres", "CHECKPOINT");
            let pg_restore = match case.jobs() {
                1 => format!("pg_restore --exit-on-error -d {database}"),
                jobs => format!("pg_restore --exit-on-error -j {jobs} -d {database}"),
            };
            let sample = match case {
                RestoreCase::File | RestoreCase::FileJobs => script_restore(
                    test_dir,
                    postgres,
                    settings,
                    &format!("createdb {database}; {pg_restore} {}", quoted(&file)),
                )?,
                // Undoes COMPRESS_ENCRYPT.
                RestoreCase::Pipe => script_restore(
                    test_dir,
                    postgres,
                    settings,
                    &format!(
                        "createdb {database}; openssl enc -d -aes-256-ctr -pbkdf2 -pass pass:bench \
                         < {} | zstd -q -d | {pg_restore}",
                        quoted(&encrypted)
                    ),
                )?,
                RestoreCase::Cairn | RestoreCase::CairnJobs => {
                    fleet.measured_restore(postgres, settings, backup_id, &database, case.jobs())?
                }
            };
            let restored = contents(postgres, &database)?;
            let found = differences(&source, &restored);
            ensure!(
                found.is_empty(),
                "({}) {} restored database {database} unlike the bench database: {}",
                case.letter(),
                case.label(),
                found.join("; ")
            );
            postgres.psql(
                "postgres",
                &format!("DROP DATABASE {database} WITH (FORCE)"),
            );
            println!(
                "    ({}) {:<38} {:>8.2} s  checked",
                case.letter(),
                case.label(),
                sample.wall
            );
            samples.entry(case).or_default().push(sample);
        }
    }
    for path in [&file, &encrypted] {
        if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
        }
    }

    let mut outcomes = BTreeMap::new();
    for case in RestoreCase::ALL {
        let outcome = match (samples.remove(&case), case, pipeline_skipped) {
            (_, RestoreCase::Pipe, Some(reason)) => Outcome::Skipped(reason.to_string()),
            (Some(runs), _, _) => Outcome::Measured(runs),
            (None, _, _) => Outcome::Skipped("not run".to_string()),
        };
        outcomes.insert(case, outcome);
    }
    Ok(Restores {
        backup_id: backup_id.to_string(),
        backup_logical_bytes: backup["logical_bytes"].as_u64(),
        dump_bytes,
        encrypted_bytes,
        source,
        outcomes,
    })
}

/// `'path'` for the shell (the bench directory's paths hold no quote).
fn quoted(path: &Path) -> String {
    format!("'{}'", path.display())
}

fn file_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .len())
}

/// (g), (h), (j): a shell script, measured.
fn script_restore(
    test_dir: &TestDir,
    postgres: &PgCluster,
    settings: &Settings,
    script: &str,
) -> anyhow::Result<Sample> {
    let measured = measured_script(test_dir, postgres, settings, script)?;
    Ok(Sample {
        wall: measured.wall,
        client_cpu: measured.client_cpu,
        server_cpu: measured.server_cpu,
        detail: format!(
            "createdb, pg_restore and the pipeline {:.1}",
            measured.client_cpu
        ),
        ..Sample::default()
    })
}

impl Fleet {
    /// (i), (k): `cairn restore BACKUP --database DATABASE --jobs JOBS
    /// --wait`, measured.
    fn measured_restore(
        &self,
        postgres: &PgCluster,
        settings: &Settings,
        backup_id: &str,
        database: &str,
        jobs: u32,
    ) -> anyhow::Result<Sample> {
        let jobs_text = jobs.to_string();
        let run = self.measured_cli(
            postgres,
            settings,
            &[
                "restore",
                backup_id,
                "--agent",
                &self.name,
                "--database",
                database,
                "--jobs",
                &jobs_text,
                "--wait",
                "--output",
                "json",
            ],
        )?;
        let output = &run.output;
        ensure!(
            output.success(),
            "cairn restore {backup_id} --database {database} --jobs {jobs} failed: {output}"
        );
        let job: Value = serde_json::from_str(&output.stdout)
            .with_context(|| format!("`cairn restore --output json` printed {output}"))?;
        let report = &job["restore"];
        ensure!(
            job["status"] == "succeeded" && report["database"] == database,
            "cairn restore did not restore database {database}: {job}"
        );
        let mut detail = run.detail("pg_restore", report["bytes_restored"].as_u64());
        if let Some(millis) = report["restore_millis"].as_u64() {
            let _ = write!(
                detail,
                "; the agent's restore {:.2} s",
                millis as f64 / 1000.0
            );
        }
        if jobs > 1 && report["spooled"] != true {
            let _ = write!(
                detail,
                "; NOT spooled, so one pg_restore job: {}",
                report["warnings"]
            );
        }
        Ok(Sample {
            wall: run.wall,
            client_cpu: run.client_cpu(),
            server_cpu: run.server,
            agent_rss: run.agent_rss,
            coordinator_rss: run.coordinator_rss,
            bytes: report["bytes_restored"].as_u64(),
            detail,
            job_seconds: job_seconds(&job),
            ..Sample::default()
        })
    }
}

impl Restores {
    fn wall(&self, case: RestoreCase) -> Option<f64> {
        self.outcomes
            .get(&case)
            .and_then(Outcome::median)
            .map(|sample| sample.wall)
    }

    /// The largest agent peak over every cairn restore.
    fn agent_rss(&self) -> Option<u64> {
        self.outcomes
            .values()
            .filter_map(|outcome| match outcome {
                Outcome::Measured(samples) => samples.iter().filter_map(|s| s.agent_rss).max(),
                Outcome::Skipped(_) => None,
            })
            .max()
    }

    pub(super) fn targets(&self) -> Vec<Target> {
        let cairn = self.wall(RestoreCase::Cairn);
        let peak = self.agent_rss().map(|b| b as f64 / MIB);
        vec![
            ratio_target(
                "(i) restore <= 1.10 x (h) [i/h]",
                ratio(cairn, self.wall(RestoreCase::Pipe)),
                1.10,
                true,
            ),
            ratio_target(
                "(i) restore <= 1.15 x (g) [i/g]",
                ratio(cairn, self.wall(RestoreCase::File)),
                1.15,
                true,
            ),
            ratio_target(
                "(k) restore <= 1.15 x (j) [k/j]",
                ratio(
                    self.wall(RestoreCase::CairnJobs),
                    self.wall(RestoreCase::FileJobs),
                ),
                1.15,
                true,
            ),
            Target {
                what: format!("agent peak RSS in restores <= {AGENT_RSS_LIMIT_MIB:.0} MiB"),
                measured: peak
                    .map_or_else(|| "not measured".to_string(), |p| format!("{p:.0} MiB")),
                passed: peak.map(|p| p <= AGENT_RSS_LIMIT_MIB),
            },
        ]
    }

    pub(super) fn print(&self) {
        println!(
            "\n  Restores of backup {} ((f)'s{}) into new databases of the same cluster, each \
             checked against the bench database ({}):",
            self.backup_id,
            self.backup_logical_bytes
                .map(|b| format!(", {:.1} MB of archive", b as f64 / MB))
                .unwrap_or_default(),
            self.source.summary()
        );
        println!(
            "  FILE (pg_dump -Fc -Z0) {:.1} MB{}",
            self.dump_bytes as f64 / MB,
            self.encrypted_bytes
                .map(|b| format!(
                    "; FILE.enc (| zstd -1 | openssl enc) {:.1} MB",
                    b as f64 / MB
                ))
                .unwrap_or_default()
        );
        println!("\n  {}", columns_header("restore (median run)"));
        for (case, outcome) in &self.outcomes {
            let title = format!("({}) {}", case.letter(), case.label());
            match outcome {
                Outcome::Skipped(reason) => println!("  {title:<42} skipped: {reason}"),
                Outcome::Measured(samples) => {
                    if let Some(median) = outcome.median() {
                        println!(
                            "  {title:<42} {}",
                            columns(samples, median, self.dump_bytes)
                        );
                    }
                }
            }
        }
        println!(
            "\n  MB/s: FILE's size / wall; client s: createdb, pg_restore and the pipeline for \
             (g), (h), (j); agent, its pg_restore,\n  coordinator and CLI for (i), (k); RSS: \
             peak of agent/coordinator during the restore. (k) spools the dump, then \
             pg_restore -j {JOBS}."
        );
        for case in [RestoreCase::Cairn, RestoreCase::CairnJobs] {
            if let Some(median) = self.outcomes.get(&case).and_then(Outcome::median) {
                println!("  ({}) client CPU: {}", case.letter(), median.detail);
            }
        }
        let mut ratios = Vec::new();
        for (name, a, b) in [
            ("i/g", RestoreCase::Cairn, RestoreCase::File),
            ("i/h", RestoreCase::Cairn, RestoreCase::Pipe),
            ("k/j", RestoreCase::CairnJobs, RestoreCase::FileJobs),
            ("j/g", RestoreCase::FileJobs, RestoreCase::File),
            ("k/i", RestoreCase::CairnJobs, RestoreCase::Cairn),
        ] {
            if let Some(r) = ratio(self.wall(a), self.wall(b)) {
                ratios.push(format!("{name} {r:.2}"));
            }
        }
        println!("  ratios of wall time: {}", ratios.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents_of(tables: &[(&str, u64)], indexes: u64) -> Contents {
        Contents {
            rows: tables
                .iter()
                .map(|(table, rows)| (table.to_string(), *rows))
                .collect(),
            indexes,
        }
    }

    #[test]
    fn a_faithful_restore_has_no_differences() {
        let source = contents_of(&[("public.a", 10), ("public.b", 0)], 2);
        assert!(differences(&source, &source.clone()).is_empty());
    }

    #[test]
    fn every_difference_is_named() {
        let source = contents_of(&[("public.a", 10), ("public.b", 5)], 2);
        let restored = contents_of(&[("public.a", 9), ("public.c", 1)], 1);
        assert_eq!(
            differences(&source, &restored),
            [
                "table public.a has 9 rows, the source 10",
                "table public.b is missing",
                "table public.c is not in the source",
                "1 indexes, the source 2",
            ]
        );
    }

    #[test]
    fn restore_letters_follow_the_backup_cases() {
        let letters: Vec<char> = RestoreCase::ALL.iter().map(|c| c.letter()).collect();
        assert_eq!(letters, ['g', 'h', 'i', 'j', 'k']);
        for case in RestoreCase::ALL {
            assert!(case.label().len() <= 38, "{}", case.label());
        }
    }
}
