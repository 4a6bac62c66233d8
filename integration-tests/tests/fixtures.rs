//! Tests of the fixtures themselves: that a real PostgreSQL cluster starts,
//! answers, replicates and goes away, and that processes, ports and waits
//! behave as the whole-system tests rely on. None of these needs the Cairn
//! binaries.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use cairn_integration_tests::privileges;
use cairn_integration_tests::{
    LoopbackAddresses, PgCluster, Process, TestDir, free_port, run, wait_until,
};

#[test]
fn pg_cluster_answers_psql_and_creates_databases() {
    let test_dir = TestDir::new("pg_cluster_answers_psql_and_creates_databases");
    let cluster = PgCluster::start_in(&test_dir, "main");

    assert_eq!(cluster.psql("postgres", "SELECT 1"), "1");
    assert_eq!(
        cluster.psql(
            "postgres",
            "SHOW wal_level; SHOW fsync; SHOW listen_addresses"
        ),
        "replica\noff\n127.0.0.1"
    );

    cluster.create_database("shop");
    cluster.psql(
        "shop",
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric);\n\
         INSERT INTO orders SELECT n, n * 1.5 FROM generate_series(1, 10) AS n;",
    );
    assert_eq!(
        cluster.psql("shop", "SELECT current_database(), count(*) FROM orders"),
        "shop|10"
    );

    // A failing statement is reported, not swallowed.
    let failed = cluster.try_psql("shop", "SELECT * FROM no_such_table");
    assert!(!failed.success(), "{failed}");
    assert!(failed.stderr.contains("no_such_table"), "{failed}");

    // The socket connection string and the TCP URL both reach the server,
    // from a real client library.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    for target in [cluster.connstring_for("shop"), cluster.url_for("shop")] {
        let total: i64 = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&target, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect with {target}: {e}"));
            tokio::spawn(connection);
            client
                .query_one("SELECT count(*) FROM orders", &[])
                .await
                .expect("count orders")
                .get(0)
        });
        assert_eq!(total, 10, "through {target}");
    }
}

#[test]
fn standby_streams_from_its_primary() {
    let test_dir = TestDir::new("standby_streams_from_its_primary");
    let primary = PgCluster::start_in(&test_dir, "primary");
    primary.psql(
        "postgres",
        "CREATE TABLE events (id int); INSERT INTO events VALUES (1);",
    );

    let standby = PgCluster::standby_of(&primary);
    assert_ne!(standby.port(), primary.port());
    assert_eq!(standby.name(), "primary-standby");
    assert_eq!(standby.psql("postgres", "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(primary.psql("postgres", "SELECT pg_is_in_recovery()"), "f");

    primary.psql("postgres", "INSERT INTO events VALUES (2)");
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the standby has replayed the second insert",
        || standby.psql("postgres", "SELECT count(*) FROM events") == "2",
    );
    assert_eq!(
        primary.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        ),
        "1"
    );

    standby.promote();
    assert_eq!(standby.psql("postgres", "SELECT pg_is_in_recovery()"), "f");
}

#[test]
fn dropping_a_cluster_stops_the_server_and_removes_its_directories() {
    let cluster = PgCluster::start();
    let address = cluster.tcp_address();
    let data_dir = cluster.data_dir().to_path_buf();
    let socket_dir = cluster.socket_dir().to_path_buf();
    assert!(TcpStream::connect(address).is_ok());
    assert!(
        socket_dir.as_os_str().len() < 40,
        "socket directory path too long for a unix socket: {}",
        socket_dir.display()
    );

    drop(cluster);

    assert!(
        TcpStream::connect(address).is_err(),
        "{address} still accepts connections after the cluster was dropped"
    );
    assert!(!data_dir.exists(), "{} was not removed", data_dir.display());
    assert!(
        !socket_dir.exists(),
        "{} was not removed",
        socket_dir.display()
    );
}

#[test]
fn stopped_cluster_starts_again_on_the_same_port() {
    let test_dir = TestDir::new("stopped_cluster_starts_again_on_the_same_port");
    let mut cluster = PgCluster::start_in(&test_dir, "main");
    cluster.psql(
        "postgres",
        "CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)",
    );
    let port = cluster.port();

    cluster.stop();
    assert!(TcpStream::connect(cluster.tcp_address()).is_err());
    cluster.start_again();

    assert_eq!(cluster.port(), port);
    assert_eq!(cluster.psql("postgres", "SELECT id FROM kept"), "7");
}

#[test]
fn pg_tools_run_as_postgres_when_root() {
    let cluster = PgCluster::start();
    let output = run(cluster
        .pg_command("pgbench")
        .args(["-i", "-s", "1", "-q", "postgres"]));
    assert!(output.success(), "{output}");
    assert_eq!(
        cluster.psql("postgres", "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    // The server itself runs as the postgres OS user when the tests run as
    // root, and as the test's user otherwise.
    let pid = cluster
        .postmaster_pid()
        .expect("postmaster.pid names the server");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let uid: u32 = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .expect("a Uid line");
    let expected = match privileges::postgres_user() {
        Some(user) => user.uid.as_raw(),
        None => nix::unistd::geteuid().as_raw(),
    };
    assert_eq!(uid, expected);
}

#[test]
fn processes_log_stop_pause_and_run_as_postgres() {
    let test_dir = TestDir::new("processes_log_stop_pause_and_run_as_postgres");
    let process = Process::builder(&test_dir, "sleeper", "/bin/sh")
        .args([
            "-c",
            "echo started as $(id -un) with $GREETING; trap 'echo bye; exit 3' TERM; \
             while true; do sleep 0.05; done",
        ])
        .env("GREETING", "hello")
        .as_postgres(true)
        .spawn();
    let expected_user = if privileges::is_root() {
        "postgres"
    } else {
        ""
    };
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "the sleeper has written its first line",
        || process.log().contains("with hello"),
    );
    if !expected_user.is_empty() {
        assert!(
            process
                .log()
                .contains(&format!("started as {expected_user} ")),
            "{}",
            process.log()
        );
    }
    assert!(process.is_running());
    process.pause();
    assert!(process.is_running(), "a paused process still exists");
    process.resume();

    let status = process.terminate();
    assert_eq!(status.code(), Some(3));
    assert!(!process.is_running());
    assert!(process.log().contains("bye"));
    assert!(test_dir.log_path("sleeper").is_file());

    let killed = Process::builder(&test_dir, "stubborn", "/bin/sh")
        .args(["-c", "trap '' TERM; while true; do sleep 0.05; done"])
        .spawn();
    let status = killed.kill();
    assert_eq!(status.code(), None);
}

#[test]
fn one_shot_commands_report_output_and_json() {
    let output = run(Command::new("/bin/sh").args([
        "-c",
        r#"echo '{"agent": "db-1", "status": "online"}'; echo warning >&2; exit 0"#,
    ]));
    assert!(output.success());
    assert_eq!(output.json()["status"], "online");
    assert_eq!(output.stderr.trim(), "warning");

    let failed = run(Command::new("/bin/sh").args(["-c", "exit 7"]));
    assert_eq!((failed.success(), failed.status_code), (false, Some(7)));
}

#[test]
fn ports_and_loopback_addresses_are_usable() {
    let first = free_port();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, first)).expect("bind a free port");
    let second = free_port();
    assert_ne!(first, second, "a port in use was handed out");
    drop(listener);

    let mut addresses = LoopbackAddresses::new();
    let a = addresses.next_address();
    let b = addresses.next_address();
    assert_eq!(
        (a, b),
        (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3))
    );
    // Each address is usable on this host without setup.
    let bound = TcpListener::bind((b, 0)).expect("bind on 127.0.0.3");
    assert_eq!(bound.local_addr().expect("local address").ip(), b);

    let mut addresses = LoopbackAddresses::new();
    assert_eq!(addresses.nth(253), Some(Ipv4Addr::new(127, 0, 1, 1)));
}

#[test]
fn wait_until_names_what_it_waited_for() {
    let outcome = std::panic::catch_unwind(|| {
        wait_until(
            Duration::from_millis(100),
            Duration::from_millis(10),
            "the impossible happens",
            || false,
        );
    });
    let message = outcome
        .expect_err("wait_until gave up")
        .downcast::<String>()
        .expect("a message");
    assert!(message.contains("the impossible happens"), "{message}");

    let mut polls = 0;
    wait_until(
        Duration::from_secs(5),
        Duration::from_millis(1),
        "three polls",
        || {
            polls += 1;
            polls == 3
        },
    );
    assert_eq!(polls, 3);
}
