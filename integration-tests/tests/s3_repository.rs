//! The S3 repository backend against a real S3-protocol server (s3s +
//! s3s-fs on loopback) through the real `S3Store` and the real SDK: the
//! store's contract (the same as the local store's), pagination, a
//! repository created and opened with the master key, the storage errors
//! an operator must be able to read (wrong secret, missing bucket, server
//! gone, server silent, untrusted TLS), `coordinator.toml`'s `[repository]`
//! keys, and `cairn serve` on an S3 repository end to end.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_common::crypto::SecretKey;
use cairn_coordinator::config::CoordinatorConfig;
use cairn_coordinator::repository::{
    ObjectKey, Repository, RepositoryError, S3Credentials, S3Settings, S3Store, Store,
};
use cairn_integration_tests::{Coordinator, CoordinatorOptions, S3Server, TestDir, wait_until};

const BUCKET: &str = "cairn-backups";

fn key(name: &str) -> ObjectKey {
    ObjectKey::new(name).unwrap()
}

fn settings(server: &S3Server, bucket: &str, prefix: &str) -> S3Settings {
    let mut settings = S3Settings::new(
        bucket,
        S3Credentials::new(server.access_key(), server.secret_key(), None),
    );
    settings.prefix = prefix.to_string();
    settings.region = server.region().to_string();
    settings.endpoint = Some(server.endpoint().to_string());
    settings.path_style = true;
    settings.request_timeout = Duration::from_secs(10);
    settings
}

fn store(server: &S3Server, bucket: &str, prefix: &str) -> S3Store {
    S3Store::new(settings(server, bucket, prefix)).unwrap()
}

/// A server with the test bucket in it.
fn server_with_bucket() -> S3Server {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    server
}

fn names(keys: &[ObjectKey]) -> Vec<String> {
    keys.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn put_get_list_exists_delete_under_a_prefix() {
    let server = server_with_bucket();
    let store = store(&server, BUCKET, "fleet-a");
    assert_eq!(
        store.describe(),
        format!("s3://{BUCKET}/fleet-a/ at {}", server.endpoint())
    );

    store
        .put(&key("chunks/ab/ab01"), Bytes::from_static(b"one"))
        .await
        .unwrap();
    store
        .put(&key("chunks/cd/cd02"), Bytes::from_static(b"two"))
        .await
        .unwrap();
    store
        .put(&key("manifests/b1"), Bytes::from_static(b"m"))
        .await
        .unwrap();
    // The prefix is really part of the stored key.
    assert_eq!(
        std::fs::read(
            server
                .data_dir()
                .join(BUCKET)
                .join("fleet-a/chunks/ab/ab01")
        )
        .unwrap(),
        b"one"
    );
    // Objects that are not ours: another prefix, and a name that is not an
    // object key inside ours. Listings skip both.
    let raw = server.client();
    for stray in ["fleet-b/chunks/ab/ab09", "fleet-a/chunks/ab/Not-A-Key"] {
        raw.put_object()
            .bucket(BUCKET)
            .key(stray)
            .body(Bytes::from_static(b"stray").into())
            .send()
            .await
            .unwrap();
    }

    assert_eq!(
        store.get(&key("chunks/ab/ab01")).await.unwrap(),
        Bytes::from_static(b"one")
    );
    assert!(matches!(
        store.get(&key("chunks/ab/nope")).await,
        Err(RepositoryError::NotFound(_))
    ));
    assert!(store.exists(&key("chunks/cd/cd02")).await.unwrap());
    assert!(!store.exists(&key("chunks/cd/nope")).await.unwrap());
    assert_eq!(
        names(&store.list("chunks/").await.unwrap()),
        ["chunks/ab/ab01", "chunks/cd/cd02"]
    );
    assert_eq!(
        names(&store.list("").await.unwrap()),
        ["chunks/ab/ab01", "chunks/cd/cd02", "manifests/b1"]
    );
    assert!(store.list("nothing/").await.unwrap().is_empty());

    store
        .put(&key("chunks/ab/ab01"), Bytes::from_static(b"new"))
        .await
        .unwrap();
    assert_eq!(
        store.get(&key("chunks/ab/ab01")).await.unwrap(),
        Bytes::from_static(b"new")
    );
    store.delete(&key("chunks/ab/ab01")).await.unwrap();
    assert!(!store.exists(&key("chunks/ab/ab01")).await.unwrap());
    // Deleting what is gone succeeds, as in the local store.
    store.delete(&key("chunks/ab/ab01")).await.unwrap();
    assert_eq!(
        names(&store.list("chunks/").await.unwrap()),
        ["chunks/cd/cd02"]
    );

    // The same bucket without a prefix sees everything, ours and theirs.
    let whole = store_without_prefix(&server);
    assert_eq!(
        names(&whole.list("fleet-a/").await.unwrap()),
        ["fleet-a/chunks/cd/cd02", "fleet-a/manifests/b1"]
    );
}

fn store_without_prefix(server: &S3Server) -> S3Store {
    store(server, BUCKET, "")
}

#[tokio::test]
async fn listing_follows_pages_and_concurrent_puts_all_land() {
    let server = server_with_bucket();
    let mut settings = settings(&server, BUCKET, "paged");
    settings.list_page_size = 7;
    settings.max_concurrent_requests = 3;
    let store = Store::S3(S3Store::new(settings).unwrap());

    // 50 puts at once through 3 permits.
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = store.clone();
        puts.spawn(async move {
            store
                .put(
                    &key(&format!("chunks/{:02x}/{i:04}", i % 5)),
                    Bytes::from(vec![i as u8; 100]),
                )
                .await
        });
    }
    while let Some(result) = puts.join_next().await {
        result.unwrap().unwrap();
    }

    let listed = store.list("chunks/").await.unwrap();
    assert_eq!(listed.len(), 50, "8 pages of at most 7");
    let mut expected: Vec<String> = (0..50)
        .map(|i| format!("chunks/{:02x}/{i:04}", i % 5))
        .collect();
    expected.sort();
    assert_eq!(names(&listed), expected);
    assert_eq!(
        store.get(&key("chunks/03/0013")).await.unwrap(),
        Bytes::from(vec![13u8; 100])
    );
}

#[tokio::test]
async fn listing_more_than_one_default_page() {
    let server = server_with_bucket();
    let store = store(&server, BUCKET, "many");
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..1001 {
        let store = store.clone();
        puts.spawn(async move {
            store
                .put(&key(&format!("manifests/{i:05}")), Bytes::new())
                .await
        });
    }
    while let Some(result) = puts.join_next().await {
        result.unwrap().unwrap();
    }
    let listed = store.list("manifests/").await.unwrap();
    assert_eq!(listed.len(), 1001);
    assert_eq!(listed[1000].as_str(), "manifests/01000");
}

#[tokio::test]
async fn repository_is_created_then_opened_with_the_master_key() {
    let server = server_with_bucket();
    let store = Store::S3(store(&server, BUCKET, "repo"));
    let master = SecretKey::generate().unwrap();
    let created = Repository::create(store.clone(), &master).await.unwrap();
    let error = Repository::create(store.clone(), &master)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("already holds a repository"), "{error}");
    assert!(error.contains("s3://cairn-backups/repo/"), "{error}");

    let opened = Repository::open(store.clone(), &master).await.unwrap();
    assert_eq!(opened.keys(), created.keys());
    assert_eq!(opened.id(), created.id());

    let other = SecretKey::generate().unwrap();
    let error = Repository::open(store.clone(), &other)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(&master.key_id()), "{error}");

    let empty = Store::S3(self::store(&server, BUCKET, "elsewhere"));
    let error = Repository::open(empty, &master)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("holds no cairn repository"), "{error}");
}

#[tokio::test]
async fn a_wrong_secret_key_surfaces_the_storage_error() {
    let server = server_with_bucket();
    let mut settings = settings(&server, BUCKET, "");
    settings.credentials = S3Credentials::new(server.access_key(), "not-the-secret", None);
    let store = Store::S3(S3Store::new(settings).unwrap());
    let master = SecretKey::generate().unwrap();

    let error = Repository::open(store.clone(), &master).await.unwrap_err();
    assert!(
        matches!(error, RepositoryError::Storage { .. }),
        "{error:?}"
    );
    let error = error.to_string();
    assert!(error.contains("SignatureDoesNotMatch"), "{error}");
    assert!(error.contains("HTTP 403"), "{error}");
    assert!(error.contains(BUCKET), "{error}");

    let error = store
        .put(&key("chunks/ab/ab01"), Bytes::from_static(b"x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("SignatureDoesNotMatch"), "{error}");

    // A HEAD answer has no body and so no error code; it still reads as
    // refused access, never as "no such object".
    let error = store.exists(&key("x")).await.unwrap_err().to_string();
    assert!(
        error.contains("AccessDenied") || error.contains("SignatureDoesNotMatch"),
        "{error}"
    );
    let error = Repository::create(store, &master)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("AccessDenied") || error.contains("SignatureDoesNotMatch"),
        "{error}"
    );

    // An unknown access key is refused too.
    let mut settings = self::settings(&server, BUCKET, "");
    settings.credentials = S3Credentials::new("someone-else", server.secret_key(), None);
    let error = S3Store::new(settings)
        .unwrap()
        .get(&key("x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("HTTP 403"), "{error}");
}

#[tokio::test]
async fn a_missing_bucket_is_named() {
    let server = S3Server::start();
    let store = Store::S3(store(&server, "no-such-bucket", "p"));
    let master = SecretKey::generate().unwrap();

    let error = Repository::open(store.clone(), &master)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("NoSuchBucket"), "{error}");
    assert!(error.contains("no-such-bucket"), "{error}");

    // (No PutObject here: s3s-fs, unlike S3, creates the bucket's
    // directory for it.)
    let error = store
        .delete(&key("chunks/ab/ab01"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("NoSuchBucket"), "{error}");
    assert!(error.contains("no-such-bucket"), "{error}");

    // A missing bucket is not a missing object (s3s-fs answers NoSuchKey
    // there; the store asks HeadBucket before believing it).
    let error = store.get(&key("cairn-repository.json")).await.unwrap_err();
    assert!(
        matches!(error, RepositoryError::Storage { .. }),
        "{error:?}"
    );
    let error = store
        .exists(&key("cairn-repository.json"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("NoSuchBucket"), "{error}");
    let error = store.list("chunks/").await.unwrap_err().to_string();
    assert!(error.contains("NoSuchBucket"), "{error}");
    let error = Repository::create(store, &master)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no-such-bucket"), "{error}");
}

#[tokio::test]
async fn a_stopped_server_fails_fast_with_the_cause() {
    let mut server = server_with_bucket();
    let mut settings = settings(&server, BUCKET, "");
    settings.request_timeout = Duration::from_secs(3);
    let store = S3Store::new(settings).unwrap();
    store
        .put(&key("manifests/b1"), Bytes::from_static(b"m"))
        .await
        .unwrap();
    server.stop();

    let started = Instant::now();
    let error = tokio::time::timeout(
        Duration::from_secs(15),
        store.put(&key("manifests/b2"), Bytes::from_static(b"m")),
    )
    .await
    .expect("a put to a stopped server must not hang")
    .unwrap_err();
    let elapsed = started.elapsed();
    let error = error.to_string();
    assert!(
        elapsed < Duration::from_secs(3) + Duration::from_millis(1500),
        "{elapsed:?}: {error}"
    );
    let lowered = error.to_lowercase();
    assert!(
        lowered.contains("connection refused")
            || lowered.contains("connection reset")
            || lowered.contains("request_timeout"),
        "{error}"
    );
    assert!(error.contains("manifests/b2"), "{error}");

    let error = tokio::time::timeout(Duration::from_secs(15), store.get(&key("manifests/b1")))
        .await
        .expect("a get from a stopped server must not hang")
        .unwrap_err()
        .to_string();
    assert!(!error.is_empty());
}

#[tokio::test]
async fn a_silent_server_times_out_within_the_request_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut settings = S3Settings::new(BUCKET, S3Credentials::new("a", "b", None));
    settings.endpoint = Some(endpoint);
    settings.path_style = true;
    settings.request_timeout = Duration::from_secs(2);
    let store = S3Store::new(settings).unwrap();

    for operation in ["put", "get", "list"] {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            match operation {
                "put" => store
                    .put(&key("manifests/b1"), Bytes::from_static(b"m"))
                    .await
                    .map(|_| ()),
                "get" => store.get(&key("manifests/b1")).await.map(|_| ()),
                _ => store.list("manifests/").await.map(|_| ()),
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{operation} hung past the request timeout"));
        let elapsed = started.elapsed();
        let error = result.unwrap_err().to_string();
        assert!(
            elapsed < Duration::from_millis(3500),
            "{operation}: {elapsed:?}: {error}"
        );
        assert!(
            error.contains("timeout") || error.contains("2s"),
            "{operation}: {error}"
        );
    }
    silent.abort();
}

#[tokio::test]
async fn tls_with_a_custom_ca_bundle() {
    let server = S3Server::start_tls();
    assert!(server.endpoint().starts_with("https://"));
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("s3-ca.pem");
    std::fs::write(&bundle, server.ca_pem().unwrap()).unwrap();

    let mut trusted = settings(&server, BUCKET, "tls");
    trusted.ca_bundle = Some(bundle);
    let store = S3Store::new(trusted).unwrap();
    store
        .put(&key("manifests/b1"), Bytes::from_static(b"over tls"))
        .await
        .unwrap();
    assert_eq!(
        store.get(&key("manifests/b1")).await.unwrap(),
        Bytes::from_static(b"over tls")
    );

    // Without the bundle the system's roots do not know the test CA.
    let untrusted = S3Store::new(settings(&server, BUCKET, "tls")).unwrap();
    let error = untrusted
        .get(&key("manifests/b1"))
        .await
        .unwrap_err()
        .to_string();
    let lowered = error.to_lowercase();
    assert!(
        lowered.contains("certificate") || lowered.contains("unknownissuer"),
        "{error}"
    );
}

/// A coordinator home's files, enough for `CoordinatorConfig::load`.
fn config_home(dir: &Path) {
    for sub in ["ca", "tls"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("ca/ca.pem"), "cert").unwrap();
    std::fs::write(dir.join("tls/server.pem"), "cert").unwrap();
    for secret in ["ca/ca.key", "tls/server.key", "master.key"] {
        write_secret(&dir.join(secret), "secret");
    }
    std::fs::create_dir_all(dir.join("repository")).unwrap();
}

fn write_secret(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

const CONFIG_HEAD: &str = r#"
[server]
grpc_listen = "127.0.0.1:7443"
http_listen = "127.0.0.1:7080"
[tls]
ca_certificate = "ca/ca.pem"
ca_key = "ca/ca.key"
server_certificate = "tls/server.pem"
server_key = "tls/server.key"
[catalog]
sqlite_path = "catalog.sqlite"
[keys]
master_key_file = "master.key"
"#;

fn load(dir: &Path, repository: &str) -> Result<CoordinatorConfig, String> {
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, format!("{CONFIG_HEAD}[repository]\n{repository}")).unwrap();
    CoordinatorConfig::load(&path).map_err(|e| e.to_string())
}

#[test]
fn repository_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    config_home(dir.path());
    write_secret(&dir.path().join("s3.secret"), "shh\n");
    let cases: &[(&str, &[&str])] = &[
        (
            "kind = \"local\"\npath = \"repository\"\nbucket = \"b-1\"\n",
            &["repository.bucket", "only for kind = \"s3\""],
        ),
        (
            "kind = \"local\"\npath = \"repository\"\nendpoint = \"http://x\"\n",
            &["repository.endpoint"],
        ),
        ("kind = \"local\"\n", &["repository.path", "required"]),
        (
            "kind = \"local\"\npath = \"no-such-dir\"\n",
            &["repository.path", "not a directory"],
        ),
        ("kind = \"s3\"\n", &["repository.bucket", "required"]),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\npath = \"repository\"\n",
            &["repository.path", "only for kind = \"local\""],
        ),
        (
            "kind = \"s3\"\nbucket = \"Bad_Bucket\"\n",
            &["repository.bucket", "not a bucket name"],
        ),
        ("kind = \"s4\"\n", &["repository.kind", "unknown variant"]),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nsecret_access_key = \"inline\"\n",
            &["unknown field `secret_access_key`"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nendpoint = \"ftp://s3.example.com\"\n",
            &["repository.endpoint"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nprefix = \"a/../b\"\n",
            &["repository.prefix"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nregion = \"us east\"\n",
            &["repository.region"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nmax_concurrent_requests = 0\n",
            &["repository.max_concurrent_requests", "between 1 and 64"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nmax_concurrent_requests = 65\n",
            &["repository.max_concurrent_requests"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nrequest_timeout = \"soon\"\n",
            &["repository.request_timeout"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nrequest_timeout = \"2h\"\n",
            &["repository.request_timeout", "between 1s and 1h"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\naccess_key_id = \"AKID\"\n",
            &["repository.secret_access_key_file", "required"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nsecret_access_key_file = \"s3.secret\"\n",
            &["repository.access_key_id", "required"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\naccess_key_id = \"AKID\"\nsecret_access_key_file = \"missing.secret\"\n",
            &["repository.secret_access_key_file", "missing.secret"],
        ),
        (
            "kind = \"s3\"\nbucket = \"b-1\"\nca_bundle = \"missing.pem\"\n",
            &["repository.ca_bundle", "does not exist"],
        ),
    ];
    for (repository, expected) in cases {
        let error = load(dir.path(), repository)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{repository}"));
        for part in *expected {
            assert!(
                error.contains(part),
                "{repository}\n=> {error}\nlacks {part}"
            );
        }
        assert!(error.contains("coordinator.toml"), "{error}");
    }

    // The secret file must be the owner's only, with the fix in the message.
    let secret = dir.path().join("s3.secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = load(
        dir.path(),
        "kind = \"s3\"\nbucket = \"b-1\"\naccess_key_id = \"AKID\"\nsecret_access_key_file = \"s3.secret\"\n",
    )
    .unwrap_err();
    assert!(
        error.contains("repository.secret_access_key_file"),
        "{error}"
    );
    assert!(error.contains("chmod 600"), "{error}");

    // The local kind as `cairn init` writes it still loads.
    let config = load(dir.path(), "kind = \"local\"\npath = \"repository\"\n").unwrap();
    assert_eq!(config.repository.path, dir.path().join("repository"));
    assert!(matches!(config.open_store().unwrap(), Store::Local(_)));
}

#[tokio::test]
async fn a_toml_configured_s3_store_round_trips() {
    let server = server_with_bucket();
    let dir = tempfile::tempdir().unwrap();
    config_home(dir.path());
    write_secret(
        &dir.path().join("s3.secret"),
        &format!("{}\n", server.secret_key()),
    );
    std::fs::write(dir.path().join("ca-bundle.pem"), "unused").unwrap();
    let config = load(
        dir.path(),
        &format!(
            "kind = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"from-toml/\"\nregion = \"{}\"\n\
             endpoint = \"{}\"\npath_style = true\naccess_key_id = \"{}\"\n\
             secret_access_key_file = \"s3.secret\"\nmax_concurrent_requests = 4\n\
             request_timeout = \"15s\"\n",
            server.region(),
            server.endpoint(),
            server.access_key()
        ),
    )
    .unwrap();
    let settings = config.repository.s3_settings().unwrap();
    assert_eq!(settings.max_concurrent_requests, 4);
    assert_eq!(settings.request_timeout, Duration::from_secs(15));
    assert!(!format!("{settings:?}").contains(server.secret_key()));

    let store = config.open_store().unwrap();
    assert_eq!(
        store.describe(),
        format!("s3://{BUCKET}/from-toml/ at {}", server.endpoint())
    );
    let master = SecretKey::generate().unwrap();
    let created = Repository::create(store.clone(), &master).await.unwrap();
    let opened = Repository::open(store, &master).await.unwrap();
    assert_eq!(opened.id(), created.id());
    assert!(
        server
            .data_dir()
            .join(BUCKET)
            .join("from-toml/cairn-repository.json")
            .is_file()
    );
}

/// `cairn serve` on an S3 repository, credentials from the standard
/// environment variables: it opens the repository, `/readyz` reads its
/// descriptor through S3 and writes nothing, and answers 503 naming the
/// store once the S3 server is gone.
#[test]
fn cairn_serve_on_an_s3_repository() {
    let test_dir = TestDir::new("cairn_serve_on_an_s3_repository");
    let mut server = server_with_bucket();
    let options = CoordinatorOptions {
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), server.access_key().into()),
            ("AWS_SECRET_ACCESS_KEY".into(), server.secret_key().into()),
        ],
        ..CoordinatorOptions::default()
    };
    let mut coordinator = Coordinator::start_with(&test_dir, options);
    coordinator.stop();

    // The same master key makes a repository in the bucket.
    let master_hex = std::fs::read_to_string(coordinator.home().join("master.key")).unwrap();
    let master = SecretKey::from_hex(&master_hex).unwrap();
    let store = store(&server, BUCKET, "served");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let repository_id = runtime
        .block_on(Repository::create(Store::S3(store), &master))
        .unwrap()
        .id()
        .to_string();

    let path = coordinator.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    let local = "[repository]\nkind = \"local\"\npath = \"repository\"\n";
    assert!(config.contains(local), "{config}");
    let s3 = format!(
        "[repository]\nkind = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"served\"\n\
         endpoint = \"{}\"\npath_style = true\nrequest_timeout = \"3s\"\n",
        server.endpoint()
    );
    std::fs::write(&path, config.replace(local, &s3)).unwrap();
    coordinator.start_again();

    let log = std::fs::read_to_string(test_dir.logs_dir().join("coordinator.log")).unwrap();
    assert!(log.contains(&repository_id), "the log names the repository");
    let ready = coordinator.http_get("/readyz").unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    let served: Vec<_> = std::fs::read_dir(server.data_dir().join(BUCKET).join("served"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        !served.iter().any(|name| name == "readyz"),
        "readyz wrote to the bucket: {served:?}"
    );

    server.stop();
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "readyz to fail without S3",
        || {
            coordinator
                .http_get("/readyz")
                .is_ok_and(|r| r.status == 503)
        },
    );
    let unready = coordinator.http_get("/readyz").unwrap();
    assert!(
        unready
            .body
            .contains(&format!("s3://{BUCKET}/served/ at {}", server.endpoint())),
        "{}",
        unready.body
    );
}
