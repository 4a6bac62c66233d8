//! The agent's dump path (`cairn_agent::dump`) against a real PostgreSQL
//! and the real `pg_dump`: chunks that reassemble into an archive
//! `pg_restore` reads, deduplication between dumps, awkward database names,
//! pg_dump's own errors, cancellation and backpressure, and
//! `pg_dumpall --globals-only`.
//!
//! The dump runs in the test process (as root in CI) and connects over the
//! cluster's socket as `postgres` (trust authentication).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use cairn_agent::dump::{DumpError, DumpOutcome, DumpProgress, DumpRequest, dump, dump_globals};
use cairn_agent::postgres::ConnectionString;
use cairn_common::chunk::{
    CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, ContentHash, PackedChunk, unpack_chunk,
};
use cairn_integration_tests::{PgCluster, TestDir, run};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// No dump in these tests may take longer.
const DUMP_TIMEOUT: Duration = Duration::from_secs(60);

fn request(connection: &str, database: &str) -> DumpRequest {
    DumpRequest {
        connection: ConnectionString::parse(connection).expect("a valid connection string"),
        database: database.to_string(),
        zstd_level: 1,
        pg_bindir: None,
    }
}

/// Runs a whole dump, collecting every chunk it sends.
async fn dump_all(
    request: &DumpRequest,
) -> (
    Result<DumpOutcome, DumpError>,
    Vec<PackedChunk>,
    DumpProgress,
) {
    let (chunks_tx, mut chunks_rx) = mpsc::channel(4);
    let (progress_tx, progress_rx) = watch::channel(DumpProgress::default());
    let collector = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(chunk) = chunks_rx.recv().await {
            chunks.push(chunk);
        }
        chunks
    });
    let result = timeout(
        DUMP_TIMEOUT,
        dump(request, chunks_tx, progress_tx, CancellationToken::new()),
    )
    .await
    .expect("the dump finishes in time");
    let chunks = collector.await.expect("the collector ends");
    let progress = *progress_rx.borrow();
    (result, chunks, progress)
}

fn hashes(chunks: &[PackedChunk]) -> Vec<ContentHash> {
    chunks.iter().map(|chunk| chunk.hash).collect()
}

/// Three tables, about 13 MiB of dump: a few thousand rows of
/// non-repeating text, so that content-defined chunking has something to
/// work with.
fn fill_shop(pg: &PgCluster, database: &str) {
    pg.psql(
        database,
        "CREATE TABLE accounts (id int PRIMARY KEY, note text);
         INSERT INTO accounts
           SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '')
                        FROM generate_series(1, 30) AS i)
             FROM generate_series(1, 8000) AS g;
         CREATE TABLE events (id int PRIMARY KEY, account int, payload text);
         INSERT INTO events
           SELECT g, g % 8000, (SELECT string_agg(md5('event' || g || ':' || i), '')
                                  FROM generate_series(1, 30) AS i)
             FROM generate_series(1, 6000) AS g;
         CREATE TABLE tags (id int PRIMARY KEY, name text);
         INSERT INTO tags SELECT g, 'tag-' || g FROM generate_series(1, 3000) AS g;
         CREATE TABLE empty (id int);
         CREATE SCHEMA \"weird schema\";
         CREATE TABLE \"weird schema\".\"multi\nline\" (v text);
         INSERT INTO \"weird schema\".\"multi\nline\"
           VALUES (E'a\\nb\\tc'), (E'\\\\.'), ('');",
    );
}

/// A table of about 50 MiB of dump, quick to generate: more than the dump
/// pipeline can hold, so pg_dump is still running when a test stops it.
fn fill_big(pg: &PgCluster, database: &str) {
    pg.psql(
        database,
        "CREATE TABLE big (id int, filler text);
         INSERT INTO big SELECT g, md5(g::text) || repeat('x', 1000)
           FROM generate_series(1, 50000) AS g;",
    );
}

/// Unpacks every chunk (checked against its hash) and concatenates the
/// plaintext.
fn reassemble(chunks: &[PackedChunk]) -> Vec<u8> {
    let mut archive = Vec::new();
    for chunk in chunks {
        let plaintext = unpack_chunk(
            &chunk.hash,
            chunk.plaintext_len as u64,
            chunk.compression,
            &chunk.payload,
            CHUNK_MAX_BYTES,
        )
        .unwrap_or_else(|e| panic!("chunk {} does not unpack: {e}", chunk.hash));
        archive.extend_from_slice(&plaintext);
    }
    archive
}

/// `pg_restore --list FILE`, as `postgres`; panics if it fails.
fn pg_restore_list(pg: &PgCluster, file: &Path) -> String {
    let output = run(pg.pg_command("pg_restore").arg("--list").arg(file));
    assert!(output.success(), "pg_restore --list failed: {output}");
    output.stdout
}

/// The pids of this process's children called `pg_dump`.
fn pg_dump_children() -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if comm == "pg_dump" && ppid == Some(me) {
            found.push(pid);
        }
    }
    found
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dump_reassembles_into_an_archive_that_pg_restore_reads() {
    let test_dir = TestDir::new("a_dump_reassembles_into_an_archive_that_pg_restore_reads");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_database("shop");
    fill_shop(&pg, "shop");

    let (result, chunks, progress) = dump_all(&request(&pg.connstring(), "shop")).await;
    let outcome = result.expect("the dump succeeds");

    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    assert_eq!(outcome.chunk_count, chunks.len() as u64);
    assert!(
        outcome.pg_dump_version.starts_with("pg_dump (PostgreSQL) "),
        "{}",
        outcome.pg_dump_version
    );
    // The exact row count of every table, counted as the dump went by,
    // including a table with a newline and a tab in its values and an
    // empty one.
    let rows = outcome.rows.as_ref().expect("the rows are counted");
    assert_eq!(rows.database, "shop");
    let mut counted: Vec<(&str, &str, u64)> = rows
        .tables
        .iter()
        .map(|t| (t.schema.as_str(), t.table.as_str(), t.rows))
        .collect();
    counted.sort();
    assert_eq!(
        counted,
        [
            ("public", "accounts", 8000),
            ("public", "empty", 0),
            ("public", "events", 6000),
            ("public", "tags", 3000),
            ("weird schema", "multi\nline", 3),
        ]
    );
    let archive = reassemble(&chunks);
    assert_eq!(archive.len() as u64, outcome.dump_bytes);
    assert!(
        outcome.dump_bytes > 3 * 1024 * 1024,
        "{}",
        outcome.dump_bytes
    );
    assert!(archive.starts_with(b"PGDMP"), "a custom-format archive");
    for (i, chunk) in chunks.iter().enumerate() {
        assert!(chunk.plaintext_len <= CHUNK_MAX_BYTES, "chunk {i}");
        if i + 1 < chunks.len() {
            assert!(chunk.plaintext_len >= CHUNK_MIN_BYTES, "chunk {i}");
        }
    }
    assert_eq!(
        progress,
        DumpProgress {
            bytes_read: outcome.dump_bytes,
            chunks: outcome.chunk_count
        }
    );

    let file = test_dir.path().join("shop.dump");
    std::fs::write(&file, &archive).unwrap();
    let list = pg_restore_list(&pg, &file);
    for table in ["accounts", "events", "tags"] {
        assert!(list.contains(&format!("TABLE public {table} ")), "{list}");
        assert!(
            list.contains(&format!("TABLE DATA public {table} ")),
            "{list}"
        );
    }

    // And it restores to the same data.
    pg.create_database("restored");
    let output = run(pg
        .pg_command("pg_restore")
        .args(["--dbname=restored", "--exit-on-error"])
        .arg(&file));
    assert!(output.success(), "pg_restore failed: {output}");
    let digest = "SELECT count(*), md5(string_agg(note, '' ORDER BY id)) FROM accounts;
                  SELECT count(*), md5(string_agg(payload, '' ORDER BY id)) FROM events;
                  SELECT count(*) FROM tags;";
    assert_eq!(pg.psql("restored", digest), pg.psql("shop", digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dumps_of_a_database_share_their_chunks() {
    let test_dir = TestDir::new("dumps_of_a_database_share_their_chunks");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_database("shop");
    fill_shop(&pg, "shop");
    let request = request(&pg.connstring(), "shop");

    let (first, first_chunks, _) = dump_all(&request).await;
    let (second, second_chunks, _) = dump_all(&request).await;
    first.unwrap();
    second.unwrap();
    let (first, second) = (hashes(&first_chunks), hashes(&second_chunks));
    // The archive's header records when the dump was made (to the second),
    // so only the first chunk may differ between two dumps of the same
    // data; content-defined boundaries realign right after it.
    assert_eq!(first.len(), second.len());
    assert_eq!(first[1..], second[1..]);

    pg.psql(
        "shop",
        "INSERT INTO accounts
           SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '')
                        FROM generate_series(1, 30) AS i)
             FROM generate_series(8001, 8100) AS g;",
    );
    let (third, third_chunks, _) = dump_all(&request).await;
    third.unwrap();
    let third: HashSet<ContentHash> = hashes(&third_chunks).into_iter().collect();
    let shared = first.iter().filter(|id| third.contains(id)).count();
    assert!(
        shared * 2 >= first.len(),
        "only {shared} of {} chunks shared after appending rows",
        first.len()
    );
    assert!(shared < first.len(), "the appended rows are in some chunk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_with_an_awkward_name_dumps() {
    let test_dir = TestDir::new("a_database_with_an_awkward_name_dumps");
    let pg = PgCluster::start_in(&test_dir, "pg");
    let name = "it's a \"db\" = \\ ü";
    pg.create_database(name);
    // psql takes a database name with `=` in it for a conninfo: give it one.
    let psql_target = format!(
        "dbname='{}'",
        name.replace('\\', "\\\\").replace('\'', "\\'")
    );
    pg.psql(
        &psql_target,
        "CREATE TABLE plain (id int); INSERT INTO plain VALUES (1), (2);",
    );

    // Over TCP with the URL form, too, whose own database is replaced.
    for connection in [pg.connstring(), pg.url()] {
        let (result, chunks, _) = dump_all(&request(&connection, name)).await;
        let outcome = result.expect("the dump succeeds");
        assert_eq!(outcome.chunk_count, 1);
        let file = test_dir.path().join("awkward.dump");
        std::fs::write(&file, reassemble(&chunks)).unwrap();
        let list = pg_restore_list(&pg, &file);
        assert!(list.contains(&format!("dbname: {name}\n")), "{list}");
        assert!(list.contains("TABLE DATA public plain "), "{list}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_database_fails_with_pg_dumps_own_message() {
    let test_dir = TestDir::new("an_unknown_database_fails_with_pg_dumps_own_message");
    let pg = PgCluster::start_in(&test_dir, "pg");

    let (result, chunks, _) = dump_all(&request(&pg.connstring(), "no_such_db")).await;
    let error = result.expect_err("the dump fails");
    let DumpError::PgDump {
        program,
        status,
        stderr,
    } = &error
    else {
        panic!("expected DumpError::PgDump, got {error:?}");
    };
    assert_eq!(*program, "pg_dump");
    assert!(!status.success());
    assert!(
        stderr.contains("database \"no_such_db\" does not exist"),
        "{stderr}"
    );
    assert_eq!(stderr.trim(), stderr);
    let message = error.to_string();
    assert!(message.starts_with("pg_dump failed"), "{message}");
    assert!(message.contains("does not exist"), "{message}");
    assert!(chunks.is_empty());
    assert!(pg_dump_children().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_dump_kills_pg_dump_and_a_slow_receiver_pauses_it() {
    let test_dir = TestDir::new("a_cancelled_dump_kills_pg_dump_and_a_slow_receiver_pauses_it");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_database("big");
    fill_big(&pg, "big");
    // Trust authentication ignores the password, but it is passed on.
    let connection = format!("{} password=sekrit", pg.connstring());
    let request = request(&connection, "big");

    let (chunks_tx, mut chunks_rx) = mpsc::channel(1);
    let (progress_tx, mut progress_rx) = watch::channel(DumpProgress::default());
    let cancel = CancellationToken::new();
    let dumping = tokio::spawn({
        let cancel = cancel.clone();
        async move { dump(&request, chunks_tx, progress_tx, cancel).await }
    });

    // One chunk, then the receiver stops reading.
    let first = timeout(DUMP_TIMEOUT, chunks_rx.recv())
        .await
        .expect("a first chunk in time")
        .expect("a first chunk");
    assert!(first.plaintext_len >= CHUNK_MIN_BYTES);
    let children = pg_dump_children();
    assert_eq!(children.len(), 1, "{children:?}");
    let pid = children[0];

    // The password is in pg_dump's environment, not on its command line.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(!cmdline.contains("sekrit"), "{cmdline}");
    assert!(cmdline.contains("dbname='big'"), "{cmdline}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|var| var == b"PGPASSWORD=sekrit"),
        "PGPASSWORD in pg_dump's environment"
    );

    // Backpressure: with the receiver stalled, reading stops after what the
    // pipeline holds (the chunker's buffer, the chunks being packed, the
    // channel), far short of the 50 MiB dump, and pg_dump waits, alive.
    let mut stalled_at = progress_rx.borrow_and_update().bytes_read;
    loop {
        match timeout(Duration::from_millis(500), progress_rx.changed()).await {
            Err(_) => break,
            Ok(changed) => {
                changed.unwrap();
                stalled_at = progress_rx.borrow_and_update().bytes_read;
            }
        }
    }
    assert!(
        stalled_at < 40 * 1024 * 1024,
        "read {stalled_at} bytes with the receiver stalled"
    );
    assert!(process_exists(pid), "pg_dump waits for the receiver");
    assert!(!dumping.is_finished());

    cancel.cancel();
    let result = timeout(Duration::from_secs(10), dumping)
        .await
        .expect("the cancelled dump returns promptly")
        .unwrap();
    assert!(matches!(result, Err(DumpError::Cancelled)), "{result:?}");
    assert!(!process_exists(pid), "pg_dump {pid} is gone, reaped");
    assert!(pg_dump_children().is_empty());
    // The channel was closed by the dump: what was queued, then the end.
    while chunks_rx.recv().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_receiver_ends_the_dump() {
    let test_dir = TestDir::new("a_dropped_receiver_ends_the_dump");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.create_database("big");
    fill_big(&pg, "big");
    let request = request(&pg.connstring(), "big");

    let (chunks_tx, mut chunks_rx) = mpsc::channel(1);
    let (progress_tx, _progress_rx) = watch::channel(DumpProgress::default());
    let dumping = tokio::spawn(async move {
        dump(&request, chunks_tx, progress_tx, CancellationToken::new()).await
    });
    timeout(DUMP_TIMEOUT, chunks_rx.recv())
        .await
        .expect("a first chunk in time")
        .expect("a first chunk");
    let children = pg_dump_children();
    assert_eq!(children.len(), 1, "{children:?}");
    drop(chunks_rx);

    let result = timeout(Duration::from_secs(10), dumping)
        .await
        .expect("the dump ends promptly once its receiver is gone")
        .unwrap();
    assert!(
        matches!(result, Err(DumpError::ReceiverClosed)),
        "{result:?}"
    );
    assert!(!process_exists(children[0]));
    assert!(pg_dump_children().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn globals_list_roles_without_their_passwords_by_default() {
    let test_dir = TestDir::new("globals_list_roles_without_their_passwords_by_default");
    let pg = PgCluster::start_in(&test_dir, "pg");
    pg.psql(
        "postgres",
        "CREATE ROLE cairn_reader LOGIN PASSWORD 'hunter2-secret';",
    );

    for connection in [pg.connstring(), pg.url()] {
        let connection = ConnectionString::parse(&connection).unwrap();
        let sql = dump_globals(&connection, false, None)
            .await
            .expect("pg_dumpall succeeds");
        let sql = String::from_utf8(sql).unwrap();
        assert!(sql.contains("CREATE ROLE cairn_reader;"), "{sql}");
        assert!(sql.contains("CREATE ROLE postgres;"), "{sql}");
        assert!(!sql.contains("PASSWORD"), "{sql}");
        assert!(!sql.contains("SCRAM-SHA-256"), "{sql}");

        let sql = dump_globals(&connection, true, None)
            .await
            .expect("pg_dumpall succeeds");
        let sql = String::from_utf8(sql).unwrap();
        assert!(sql.contains("CREATE ROLE cairn_reader;"), "{sql}");
        assert!(sql.contains("PASSWORD 'SCRAM-SHA-256$"), "{sql}");
        assert!(!sql.contains("hunter2"), "only the hash: {sql}");
    }

    // pg_dumpall's own error, when the database it is pointed at is gone
    // (it does not say why it could not connect).
    let connection = ConnectionString::parse(&pg.connstring_for("no_such_db")).unwrap();
    let error = dump_globals(&connection, false, None).await.unwrap_err();
    assert!(
        matches!(&error, DumpError::PgDump { program: "pg_dumpall", stderr, .. }
            if stderr.contains("could not connect to database \"no_such_db\"")),
        "{error:?}"
    );
}
