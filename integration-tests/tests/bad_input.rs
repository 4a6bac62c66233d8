//! Bad input: each mistake gives a one-line error that says what to fix, a
//! non-zero exit, and nothing half-written on disk.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use cairn_integration_tests::{AgentOptions, Coordinator, Output, PgCluster, TestDir, free_port};

/// The first line of stderr is the error, and it mentions every `expected`.
fn check_error(output: &Output, expected: &[&str]) {
    assert!(!output.success(), "must fail: {output}");
    let first = output
        .stderr
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    assert!(
        first.starts_with("error:"),
        "the first line is not the error: {output}"
    );
    for needle in expected {
        assert!(
            first.contains(needle),
            "the error lacks {needle:?}: {output}"
        );
    }
}

/// Like [`check_error`], and the whole of stderr is that one line.
fn check_one_line_error(output: &Output, expected: &[&str]) {
    check_error(output, expected);
    assert_eq!(
        output.stderr.trim().lines().count(),
        1,
        "not a one-line error: {output}"
    );
}

#[test]
fn bad_agent_names_and_ttls_are_refused_by_the_cli() {
    let test_dir = TestDir::new("bad_names_ttls");
    let coordinator = Coordinator::start(&test_dir);
    let long_name = "a".repeat(64);
    // (arguments, what the error names, whether clap parsed it: clap adds a
    // usage hint after the error line).
    let cases: &[(&[&str], &[&str], bool)] = &[
        (
            &["token", "create", "--agent", "Bad_Name"],
            &["agent name", "[a-z0-9][a-z0-9-]{0,62}"],
            false,
        ),
        (
            &["token", "create", "--agent", &long_name],
            &["agent name"],
            false,
        ),
        (
            &["token", "create", "--agent", "db1", "--ttl", "soon"],
            &["--ttl"],
            true,
        ),
        (
            &["token", "create", "--agent", "db1", "--ttl", "0s"],
            &["--ttl", "longer than zero"],
            true,
        ),
        (
            &["token", "create", "--agent", "db1", "--ttl", "30d"],
            &["--ttl", "between"],
            false,
        ),
        (
            &["token", "create", "--agent", "db1", "--ttl", "10s"],
            &["--ttl", "between"],
            false,
        ),
        (&["agents", "show", "nosuch"], &["no agent named"], false),
        (&["agents", "revoke", "nosuch"], &["no agent named"], false),
    ];
    for (args, expected, by_clap) in cases {
        let output = coordinator.cli(args);
        if *by_clap {
            check_error(&output, expected);
        } else {
            check_one_line_error(&output, expected);
        }
    }
    // The refused calls created no token.
    let events = coordinator.cli_json(&["audit", "list"]);
    let created = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "token.create" && e["outcome"] == "success")
        .count();
    assert_eq!(created, 0, "{events}");
}

#[test]
fn the_cli_without_a_coordinator_or_identity_says_what_to_fix() {
    let test_dir = TestDir::new("cli_unreachable");
    let coordinator = Coordinator::start(&test_dir);
    let unused = format!("https://127.0.0.1:{}", free_port());
    let output = coordinator.cli(&["agents", "list", "--coordinator", &unused]);
    check_one_line_error(
        &output,
        &["cannot connect to the coordinator", "--coordinator"],
    );

    let mut no_identity = coordinator.cli_command(&["agents", "list"]);
    no_identity.env_remove("CAIRN_IDENTITY");
    let output = cairn_integration_tests::run(&mut no_identity);
    check_one_line_error(&output, &["--identity"]);

    let output = coordinator.cli(&["agents", "list", "--coordinator", "http://127.0.0.1:1"]);
    check_one_line_error(&output, &["https"]);
}

fn serve_with_config(coordinator: &Coordinator, config: &Path) -> Output {
    let config = config.to_str().unwrap();
    coordinator.cli(&["serve", "--config", config])
}

#[test]
fn bad_coordinator_config_fails_at_startup_naming_file_and_key() {
    let test_dir = TestDir::new("bad_coordinator_config");
    let mut coordinator = Coordinator::start(&test_dir);
    coordinator.stop();
    let path = coordinator.config_path();
    let good = std::fs::read_to_string(&path).unwrap();
    let file = path.display().to_string();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "[fleet]",
            "[fleet]\nbogus = 1",
            &["fleet.bogus", "unknown field"],
        ),
        (
            "heartbeat_interval = \"1s\"",
            "heartbeat_interval = \"soon\"",
            &["fleet.heartbeat_interval"],
        ),
        (
            "heartbeat_interval = \"1s\"",
            "heartbeat_interval = \"1h\"",
            &["fleet.heartbeat_interval", "between"],
        ),
        (
            "probe_history = 20",
            "probe_history = 0",
            &["fleet.probe_history"],
        ),
        (
            "[catalog]",
            "[catalogue]\n[catalog]",
            &["unknown field `catalogue`"],
        ),
        (
            "path = \"repository\"",
            "path = \"no-such-dir\"",
            &["repository.path"],
        ),
    ];
    for (from, to, expected) in cases {
        assert!(good.contains(from), "the config has no {from:?}");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let output = serve_with_config(&coordinator, &path);
        let mut expected = expected.to_vec();
        expected.push(&file);
        check_one_line_error(&output, &expected);
    }

    // Secret files readable by others are refused, with the fix.
    std::fs::write(&path, &good).unwrap();
    let master_key = coordinator.home().join("master.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&master_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = serve_with_config(&coordinator, &path);
    check_one_line_error(&output, &["keys.master_key_file", "chmod 600"]);
    std::fs::set_permissions(&master_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Another master key cannot open the repository: a startup error that
    // names both keys, never a failed backup later.
    let right_key = std::fs::read(&master_key).unwrap();
    std::fs::write(&master_key, format!("{}\n", "ab".repeat(32))).unwrap();
    let output = serve_with_config(&coordinator, &path);
    check_one_line_error(&output, &["repository", "master key"]);
    std::fs::write(&master_key, "not hex\n").unwrap();
    let output = serve_with_config(&coordinator, &path);
    check_one_line_error(&output, &["keys.master_key_file", "64 hex digits"]);
    std::fs::write(&master_key, right_key).unwrap();

    // Put right, it serves again.
    coordinator.start_again();
}

#[test]
fn init_refuses_to_overwrite_and_leaves_nothing_behind() {
    let test_dir = TestDir::new("init_refuses");
    let coordinator = Coordinator::start(&test_dir);
    let home = coordinator.home().display().to_string();
    let before = std::fs::read(coordinator.config_path()).unwrap();
    let output = coordinator.cli(&["init", "--dir", &home]);
    check_one_line_error(&output, &["already exists", "--dir"]);
    assert_eq!(std::fs::read(coordinator.config_path()).unwrap(), before);

    let fresh = test_dir.path().join("fresh");
    let output = coordinator.cli(&[
        "init",
        "--dir",
        fresh.to_str().unwrap(),
        "--grpc-listen",
        "127.0.0.1:7443",
        "--http-listen",
        "127.0.0.1:7443",
    ]);
    check_one_line_error(&output, &["--grpc-listen", "--http-listen"]);
    let leftovers: Vec<String> = std::fs::read_dir(test_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("fresh"))
        .collect();
    assert!(leftovers.is_empty(), "init left {leftovers:?}");
}

#[test]
fn failed_enrollments_write_nothing_and_keep_the_token() {
    let test_dir = TestDir::new("failed_enrollments");
    let pg = PgCluster::start_in(&test_dir, "pg");
    let coordinator = Coordinator::start(&test_dir);
    let token = coordinator.create_token("db1", "10m");
    let dir = coordinator.agents_dir().join("db1");
    let dir_arg = dir.to_str().unwrap().to_string();
    let url = coordinator.url();
    let unused_port = free_port().to_string();
    let unreachable_coordinator = format!("https://127.0.0.1:{unused_port}");
    let unreachable_pg = format!("host=127.0.0.1 port={unused_port} user=postgres");
    let good_pg = pg.connstring();

    let enroll = |coordinator_url: &str, token: &str, postgres: &str, extra: &[&str]| {
        let mut args = vec![
            "enroll",
            "--coordinator",
            coordinator_url,
            "--token",
            token,
            "--dir",
            &dir_arg,
            "--postgres",
            postgres,
        ];
        args.extend_from_slice(extra);
        coordinator.agent_cli(&args)
    };
    let cases: Vec<(Output, &[&str])> = vec![
        (
            enroll(&unreachable_coordinator, &token, &good_pg, &[]),
            &["cannot reach the coordinator"],
        ),
        (
            enroll(&url, &token, &unreachable_pg, &[]),
            &["PostgreSQL", "--postgres"],
        ),
        (
            enroll(&url, &token, "nonsense", &[]),
            &["connection string"],
        ),
        (
            enroll(&url, "cairn1.db1.nope", &good_pg, &[]),
            &["token", "cairn token create"],
        ),
        (
            enroll(&url, &token, &good_pg, &["--label", "Bad Key=x"]),
            &["--label"],
        ),
        (
            enroll(&url, &token, &good_pg, &["--name", "Bad_Name"]),
            &["agent name"],
        ),
    ];
    for (output, expected) in &cases {
        check_one_line_error(output, expected);
        assert!(!dir.exists(), "a failed enrollment left {}", dir.display());
        let hidden: Vec<_> = std::fs::read_dir(coordinator.agents_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(hidden.is_empty(), "a failed enrollment left {hidden:?}");
    }

    // None of those used up the token.
    enroll(&url, &token, &good_pg, &["--source-address", "127.0.0.2"]).assert_success();
    assert!(dir.join("agent.toml").is_file());
}

#[test]
fn bad_agent_config_fails_at_startup_naming_file_and_key() {
    let test_dir = TestDir::new("bad_agent_config");
    let pg = PgCluster::start_in(&test_dir, "pg");
    let coordinator = Coordinator::start(&test_dir);
    let mut agent = coordinator.enroll_agent("db1", &pg, AgentOptions::default());
    agent.stop();
    let path = agent.config_path().to_path_buf();
    let good = std::fs::read_to_string(&path).unwrap();
    let file = path.display().to_string();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "name = \"db1\"",
            "bogus = 1\nname = \"db1\"",
            &["unknown field `bogus`"],
        ),
        (
            "probe_interval = \"1s\"",
            "probe_interval = \"0s\"",
            &["probe_interval"],
        ),
        (
            "allow = [\"backup\"]",
            "allow = [\"drop\"]",
            &["permissions.allow"],
        ),
        (
            "name = \"main\"",
            "name = \"Main Instance\"",
            &["instances[0].name"],
        ),
        (
            "coordinator = \"https",
            "coordinator = \"http",
            &["coordinator"],
        ),
    ];
    for (from, to, expected) in cases {
        assert!(good.contains(from), "agent.toml has no {from:?}:\n{good}");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let output = coordinator.agent_cli(&["run", "--config", &file]);
        let mut expected = expected.to_vec();
        expected.push(&file);
        check_one_line_error(&output, &expected);
    }
    std::fs::write(&path, &good).unwrap();
    agent.start();
    coordinator.wait_until_online(&agent);
}
