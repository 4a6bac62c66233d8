//! A compromised database host: it holds a real agent certificate and
//! speaks the real gRPC protocol over real mutual TLS to a real
//! coordinator, but what it says is the test's, message by message.
//!
//! Agents hold no repository key, so a hostile host learns none from the
//! commands it is sent; it cannot plant a chunk under a hash that is not
//! its content's; an offer confirms only large chunks it could only name
//! if it already held them; and whatever it uploads is stored under names
//! that say nothing of the content. Each test takes over an enrolled
//! agent's identity with a [`HandDrivenAgent`] (the agent's process is
//! stopped first) and drives the coordinator's side of a backup job.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_common::archive::ArchiveScanner;
use cairn_common::chunk::{
    CHUNK_MIN_BYTES, ChunkId, ContentHash, PackedChunk, open_chunk, pack_chunk,
};
use cairn_common::crypto::{RepositoryKeys, SecretKey};
use cairn_common::model::Operation;
use cairn_common::proto::{
    self, agent_gateway_client::AgentGatewayClient, backup_upload, backup_upload_reply,
    command_result, coordinator_message,
};
use cairn_common::tls::{self, CoordinatorUrl};
use cairn_coordinator::repository::manifest::{Manifest, ManifestChunk};
use cairn_coordinator::repository::{LocalStore, ObjectKey, Repository, Store};
use cairn_integration_tests::privileges::create_dir_for_postgres;
use cairn_integration_tests::{
    Agent, AgentOptions, Coordinator, PgCluster, TestDir, job_is_active, run, wait_for, wait_until,
};
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How long one gRPC exchange of a test may take before it is called hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// zstd level the hand-driven agent packs chunks with. Any level does:
/// the coordinator checks what a chunk decompresses to, not how it was
/// packed.
const ZSTD_LEVEL: i32 = 3;

// ---------------------------------------------------------------------------
// The hand-driven agent
// ---------------------------------------------------------------------------

/// `AgentGateway/Control`, called through [`RawControlCodec`].
const CONTROL_PATH: &str = "/cairn.v1.AgentGateway/Control";

/// The control stream's codec, keeping each coordinator message's bytes
/// as they came over the wire. Decoding them with this crate's `proto`
/// types would drop fields those types do not know (the key fields that
/// commands once had are reserved there), so a check on re-encoded
/// messages could not see a key the coordinator sent.
#[derive(Debug, Clone, Copy, Default)]
struct RawControlCodec;

struct AgentMessageEncoder;

struct RawDecoder;

impl Codec for RawControlCodec {
    type Encode = proto::AgentMessage;
    type Decode = Vec<u8>;
    type Encoder = AgentMessageEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        AgentMessageEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Encoder for AgentMessageEncoder {
    type Item = proto::AgentMessage;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encode an agent message: {e}")))
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// A database host driven by the test instead of by `cairn-agent`: the
/// real agent's certificate and source address, the real protocol, the
/// test's own messages. It registers what the real agent registered and
/// heartbeats at the interval the coordinator gives, so the coordinator
/// counts it online and sends it the agent's jobs.
struct HandDrivenAgent {
    channel: Channel,
    outbound: mpsc::Sender<proto::AgentMessage>,
    /// Coordinator messages, as their wire bytes.
    inbound: tonic::Streaming<Vec<u8>>,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Drop for HandDrivenAgent {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

/// A job command as the hand-driven agent received it.
struct ReceivedCommand {
    command: proto::Command,
    /// The whole `CoordinatorMessage` that carried it, as sent.
    wire_bytes: Vec<u8>,
}

impl HandDrivenAgent {
    /// Stops `agent`'s process and takes its place: its identity, its
    /// source address, and the registration it made (as `cairn agents
    /// show` records it).
    async fn take_over(coordinator: &Coordinator, agent: &mut Agent) -> HandDrivenAgent {
        let name = agent.name().to_string();
        let shown = blocking(|| coordinator.cli_json(&["agents", "show", &name]));
        let registered = &shown["agent"];
        let text = |key: &str| registered[key].as_str().unwrap_or_default().to_string();
        let instances: Vec<String> = registered["instances"]
            .as_array()
            .unwrap_or_else(|| panic!("no instances in {shown}"))
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect();
        let permitted_operations: Vec<i32> = registered["permitted_operations"]
            .as_array()
            .unwrap_or_else(|| panic!("no permitted_operations in {shown}"))
            .iter()
            .map(|op| {
                let op: Operation = serde_json::from_value(op.clone()).unwrap();
                proto::Operation::from(op) as i32
            })
            .collect();
        let labels = registered["labels"]
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        blocking(|| agent.stop());

        let channel = connect(coordinator, agent).await;
        let (outbound, outbound_receiver) = mpsc::channel(16);
        outbound
            .send(proto::AgentMessage {
                body: Some(proto::agent_message::Body::Register(proto::Register {
                    agent_name: name.clone(),
                    version: text("version"),
                    hostname: text("hostname"),
                    labels,
                    instances,
                    permitted_operations,
                    // The fixture's `--probe-interval` (not shown by the
                    // CLI); this host sends no probe reports anyway.
                    probe_interval_seconds: 1,
                    held_attempts: vec![],
                })),
            })
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let mut inbound = within("open the control stream", async {
            grpc.ready().await.expect("the channel is ready");
            grpc.streaming(
                tonic::Request::new(ReceiverStream::new(outbound_receiver)),
                PathAndQuery::from_static(CONTROL_PATH),
                RawControlCodec,
            )
            .await
        })
        .await
        .unwrap_or_else(|status| panic!("the control stream was refused: {status:?}"))
        .into_inner();
        let first = within("the answer to `register`", inbound.message())
            .await
            .expect("the control stream stays open")
            .expect("a message");
        let heartbeat_interval_ms = match proto::CoordinatorMessage::decode(first.as_slice())
            .unwrap()
            .body
        {
            Some(coordinator_message::Body::Registered(registered)) => {
                registered.heartbeat_interval_ms
            }
            other => panic!("the first answer is `registered`, not {other:?}"),
        };
        let heartbeat_sender = outbound.clone();
        let heartbeats = tokio::spawn(async move {
            let mut interval =
                tokio::time::interval(Duration::from_millis(u64::from(heartbeat_interval_ms)));
            for sequence in 1.. {
                interval.tick().await;
                let heartbeat = proto::AgentMessage {
                    body: Some(proto::agent_message::Body::Heartbeat(proto::Heartbeat {
                        sequence,
                    })),
                };
                if heartbeat_sender.send(heartbeat).await.is_err() {
                    break;
                }
            }
        });
        HandDrivenAgent {
            channel,
            outbound,
            inbound,
            heartbeats,
        }
    }

    /// The next command the coordinator sends.
    async fn next_command(&mut self) -> ReceivedCommand {
        let wire_bytes = within("a command from the coordinator", self.inbound.message())
            .await
            .expect("the control stream stays open")
            .expect("a message");
        match proto::CoordinatorMessage::decode(wire_bytes.as_slice())
            .unwrap()
            .body
        {
            Some(coordinator_message::Body::Command(command)) => ReceivedCommand {
                command,
                wire_bytes,
            },
            other => panic!("expected a command, got {other:?}"),
        }
    }

    /// Answers `command` with `outcome`, whatever really happened.
    async fn answer(&self, command: &proto::Command, outcome: command_result::Outcome) {
        self.outbound
            .send(proto::AgentMessage {
                body: Some(proto::agent_message::Body::CommandResult(
                    proto::CommandResult {
                        command_id: command.command_id.clone(),
                        attempt_id: command.attempt_id.clone(),
                        outcome: Some(outcome),
                    },
                )),
            })
            .await
            .expect("the control stream is open");
    }

    /// Opens `UploadBackup` for a job and sends its `start`.
    async fn upload(&self, job_id: &str, backup_id: &str) -> HandDrivenUpload {
        let (outbound, outbound_receiver) = mpsc::channel(16);
        outbound
            .send(proto::BackupUpload {
                body: Some(backup_upload::Body::Start(proto::UploadStart {
                    job_id: job_id.to_string(),
                    backup_id: backup_id.to_string(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
        let mut client = AgentGatewayClient::new(self.channel.clone());
        let replies = within(
            "UploadBackup",
            client.upload_backup(ReceiverStream::new(outbound_receiver)),
        )
        .await
        .unwrap_or_else(|status| panic!("the upload was refused: {status:?}"))
        .into_inner();
        HandDrivenUpload { outbound, replies }
    }
}

/// One `UploadBackup` stream of a [`HandDrivenAgent`].
struct HandDrivenUpload {
    outbound: mpsc::Sender<proto::BackupUpload>,
    replies: tonic::Streaming<proto::BackupUploadReply>,
}

impl HandDrivenUpload {
    async fn send(&self, body: backup_upload::Body) {
        self.outbound
            .send(proto::BackupUpload { body: Some(body) })
            .await
            .expect("the upload stream is open");
    }

    /// The coordinator's next reply, or the error that ended the stream.
    async fn reply(&mut self) -> Result<backup_upload_reply::Body, tonic::Status> {
        match within("a reply on the upload stream", self.replies.message()).await? {
            Some(proto::BackupUploadReply { body: Some(body) }) => Ok(body),
            other => panic!("the upload stream ended without an answer: {other:?}"),
        }
    }

    /// Offers `hashes`; the ones the coordinator asks the bytes of.
    async fn offer(&mut self, hashes: &[ContentHash]) -> Vec<ContentHash> {
        self.send(backup_upload::Body::Offer(proto::ChunkOffer {
            hashes: hashes.iter().map(|h| h.as_bytes().to_vec()).collect(),
        }))
        .await;
        match self.reply().await {
            Ok(backup_upload_reply::Body::Missing(missing)) => missing
                .hashes
                .iter()
                .map(|h| ContentHash::from_bytes(h).unwrap())
                .collect(),
            other => panic!("an offer is answered with `missing`, not {other:?}"),
        }
    }

    /// Sends one offered chunk: `packed` under `hash`, with its bytes or
    /// without them.
    async fn chunk(&self, hash: ContentHash, packed: &PackedChunk, with_bytes: bool) {
        self.send(backup_upload::Body::Chunk(proto::UploadChunk {
            hash: hash.as_bytes().to_vec(),
            plaintext_bytes: packed.plaintext_len as u64,
            payload: if with_bytes {
                packed.payload.clone()
            } else {
                Vec::new()
            },
            compression: packed.compression.to_proto(),
        }))
        .await;
    }

    async fn globals(&self, packed: &PackedChunk) {
        self.send(backup_upload::Body::Globals(proto::UploadGlobals {
            hash: packed.hash.as_bytes().to_vec(),
            plaintext_bytes: packed.plaintext_len as u64,
            payload: packed.payload.clone(),
            compression: packed.compression.to_proto(),
        }))
        .await;
    }

    /// Sends `finish`; the id of the stored backup, or why not.
    async fn finish(&mut self, finish: proto::UploadFinish) -> Result<String, tonic::Status> {
        self.send(backup_upload::Body::Finish(finish)).await;
        match self.reply().await? {
            backup_upload_reply::Body::Stored(stored) => Ok(stored.backup_id),
            other => panic!("`finish` is answered with `stored`, not {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs blocking fixture code (the CLI, waits) without holding up the
/// hand-driven agent's heartbeats on this runtime.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A channel to the coordinator as `agent`: its identity directory, from
/// its loopback source address.
async fn connect(coordinator: &Coordinator, agent: &Agent) -> Channel {
    let identity = agent.dir().join("identity");
    let config = tls::client_config(
        &read(&identity.join("ca.pem")),
        Some((
            &read(&identity.join("cert.pem")),
            &read(&identity.join("key.pem")),
        )),
    )
    .expect("build the agent's TLS config");
    let url = CoordinatorUrl::parse(&coordinator.url()).unwrap();
    within(
        "connect to the coordinator",
        tls::connect(&url, config, Some(agent.source_address().into())),
    )
    .await
    .expect("connect to the coordinator")
}

/// The coordinator's repository, opened as the coordinator opens it: its
/// home's master key unwraps the repository keys.
async fn open_repository(coordinator: &Coordinator) -> Repository {
    let master_hex = std::fs::read_to_string(coordinator.home().join("master.key")).unwrap();
    let master = SecretKey::from_hex(&master_hex).unwrap();
    let store = Store::Local(LocalStore::new(coordinator.home().join("repository")));
    Repository::open(store, &master)
        .await
        .expect("open the repository with the master key")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Asserts that `wire_bytes` hold neither repository key, raw or as hex.
fn assert_no_key_material(wire_bytes: &[u8], keys: &RepositoryKeys, what: &str) {
    for (name, key) in [("data key", &keys.data), ("chunk-id key", &keys.chunk_id)] {
        assert!(
            !contains(wire_bytes, key.expose_bytes()),
            "{what} carries the repository's {name}"
        );
        assert!(
            !contains(wire_bytes, key.expose_hex().as_bytes()),
            "{what} carries the repository's {name} as hex"
        );
    }
}

/// Every chunk object in the local repository; none before the first
/// chunk is stored (the fixture's listing wants the directory).
fn stored_objects(coordinator: &Coordinator) -> Vec<PathBuf> {
    if coordinator.home().join("repository/chunks").is_dir() {
        coordinator.chunk_files()
    } else {
        Vec::new()
    }
}

/// The path of the stored object named `id` in the local repository.
fn chunk_path(coordinator: &Coordinator, id: &ChunkId) -> PathBuf {
    coordinator
        .home()
        .join("repository")
        .join(ObjectKey::chunk(id).as_str())
}

/// `cairn backup run --agent AGENT --database DATABASE` (no `--wait`):
/// the job's id and its backup's.
fn start_backup(coordinator: &Coordinator, agent: &str, database: &str) -> (String, String) {
    let jobs = blocking(|| {
        coordinator.cli_json(&["backup", "run", "--agent", agent, "--database", database])
    });
    assert!(job_is_active(&jobs[0]), "{jobs}");
    (
        jobs[0]["id"].as_str().unwrap().to_string(),
        jobs[0]["backup_id"].as_str().unwrap().to_string(),
    )
}

/// Waits for job `job_id` to end; its `cairn jobs show` view.
fn ended_job(coordinator: &Coordinator, job_id: &str) -> Value {
    blocking(|| {
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(100),
            &format!("job {job_id} ends"),
            || {
                let job = coordinator.cli_json(&["jobs", "show", job_id]);
                (!job_is_active(&job)).then_some(job)
            },
        )
    })
}

/// The backup command of job `job_id`, which must be the command received.
fn backup_command(received: &ReceivedCommand, job_id: &str, backup_id: &str) -> proto::Command {
    match &received.command.kind {
        Some(proto::command::Kind::Backup(backup)) => {
            assert_eq!(backup.job_id, job_id);
            assert_eq!(backup.backup_id, backup_id);
        }
        other => panic!("expected the backup command of job {job_id}, got {other:?}"),
    }
    received.command.clone()
}

fn job_done(job_id: &str) -> command_result::Outcome {
    command_result::Outcome::JobDone(proto::JobDone {
        job_id: job_id.to_string(),
        restore: None,
    })
}

/// A `finish` for chunks of `dump_bytes` whose rows the agent did not
/// count.
fn finish_uncounted(dump_bytes: u64) -> proto::UploadFinish {
    proto::UploadFinish {
        dump_bytes,
        pg_dump_version: "hand-driven".into(),
        server_version: "hand-driven".into(),
        rows_not_counted: "the hand-driven agent does not count rows".into(),
        ..Default::default()
    }
}

/// Runs a PostgreSQL tool of `pg` that writes to `-f FILE` and returns
/// what it wrote (binary: a tool's stdout is read as text by the fixture).
fn tool_output(pg: &PgCluster, dir: &Path, program: &str, args: &[&str]) -> Vec<u8> {
    create_dir_for_postgres(dir);
    let file = dir.join(format!("{program}.out"));
    let mut command = pg.pg_command(program);
    command.args(args).arg("-f").arg(&file);
    let output = run(&mut command);
    assert!(output.success(), "{program} failed: {output}");
    read(&file)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The backup command a host receives carries no key (checked on the
/// bytes that came over the wire); and a chunk whose bytes are not the
/// content its offered hash names is refused with an error naming the
/// hash: nothing is stored under that hash's name, no backup completes,
/// and the job fails even though the host then reports it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_reaches_the_host_and_a_chunk_that_is_not_its_hash_is_refused() {
    let test_dir = TestDir::new("hostile_mismatched_chunk");
    let pg = PgCluster::start_in(&test_dir, "main");
    pg.create_database("shop");
    let coordinator = Coordinator::start(&test_dir);
    let mut db1 = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let repository = open_repository(&coordinator).await;
    let keys = repository.keys();
    let mut host = HandDrivenAgent::take_over(&coordinator, &mut db1).await;

    let (job_id, backup_id) = start_backup(&coordinator, "db1", "shop");
    let received = host.next_command().await;
    let command = backup_command(&received, &job_id, &backup_id);
    assert_no_key_material(&received.wire_bytes, keys, "the backup command");

    // The host offers the hash of A, then sends B (as long as A) under it.
    let claimed: Vec<u8> = b"the rows the host claims to send; "
        .iter()
        .copied()
        .cycle()
        .take(64 * 1024)
        .collect();
    let sent: Vec<u8> = b"what it sends instead, planted! "
        .iter()
        .copied()
        .cycle()
        .take(claimed.len())
        .collect();
    let claimed_hash = ContentHash::of(&claimed);
    let planted = pack_chunk(&sent, ZSTD_LEVEL).unwrap();
    let objects_before = stored_objects(&coordinator);

    let mut upload = host.upload(&job_id, &backup_id).await;
    assert_eq!(upload.offer(&[claimed_hash]).await, vec![claimed_hash]);
    upload.chunk(claimed_hash, &planted, true).await;
    let refused = upload
        .finish(finish_uncounted(claimed.len() as u64))
        .await
        .expect_err("a chunk that is not its hash's content");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains(&claimed_hash.to_hex())
            && refused.message().contains("does not hash"),
        "the refusal names the hash and why: {refused:?}"
    );

    assert_eq!(
        stored_objects(&coordinator),
        objects_before,
        "the refused chunk added an object"
    );
    for hash in [claimed_hash, planted.hash] {
        let path = chunk_path(&coordinator, &ChunkId::for_content(keys, &hash));
        assert!(!path.exists(), "{} exists", path.display());
    }

    // The refused upload failed the job at once, whatever the host says
    // afterwards (a hostile host would not report its own failure).
    let job = ended_job(&coordinator, &job_id);
    host.answer(&command, job_done(&job_id)).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the coordinator refused the upload")
            && error.contains(&claimed_hash.to_hex()),
        "{job}"
    );
    // The host's answer reaches the job engine, which finds the job ended
    // and leaves it, and its one audit row, as they are.
    blocking(|| {
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "the job engine to take the host's answer",
            || {
                coordinator.process().log().lines().any(|line| {
                    line.contains(&job_id) && line.contains("the attempt had ended already")
                })
            },
        )
    });
    assert_eq!(ended_job(&coordinator, &job_id)["error"], job["error"]);
    let audit = blocking(|| coordinator.cli_json(&["audit", "list", "--limit", "10000"]));
    let ends = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "backup.end" && e["target"] == job_id.as_str())
        .count();
    assert_eq!(ends, 1, "backup.end rows for {job_id}: {audit}");
    let listed = blocking(|| coordinator.cli_json(&["backups", "list"]));
    assert!(
        !listed.to_string().contains(&backup_id),
        "backup {backup_id} is listed: {listed}"
    );
    let shown = blocking(|| coordinator.cli(&["backups", "show", &backup_id]));
    assert!(!shown.success(), "backup {backup_id} is shown: {shown}");
}

/// What an offer tells a host: a chunk of at least `CHUNK_MIN_BYTES` the
/// repository holds (from a real agent's backup) is not asked for, while a
/// small one it holds (the globals) is, like a chunk nobody stored; the
/// small one sent again is checked but stores nothing new. And the restore
/// command a host receives carries no key either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_confirm_only_large_chunks_and_restore_commands_carry_no_key() {
    let test_dir = TestDir::new("hostile_offers");
    let pg = PgCluster::start_in(&test_dir, "main");
    pg.create_sample_database("shop", 24);
    let coordinator = Coordinator::start(&test_dir);
    let mut db1 = coordinator.enroll_agent(
        "db1",
        &pg,
        AgentOptions::default().allow("backup").allow("restore"),
    );
    let stored_backup = blocking(|| coordinator.backup("db1", "shop"));
    let repository = open_repository(&coordinator).await;
    let keys = repository.keys();
    let manifest = Manifest::load(&repository, &stored_backup).await.unwrap();
    let large: ManifestChunk = manifest
        .chunks
        .iter()
        .find(|c| c.plaintext_bytes >= CHUNK_MIN_BYTES as u64)
        .cloned()
        .unwrap_or_else(|| panic!("no chunk of at least 512 KiB: {:?}", manifest.chunks));
    let large_hash = large
        .hash
        .expect("a format-2 manifest lists content hashes");
    let small: ManifestChunk = manifest.globals.clone().expect("a globals chunk");
    assert!(
        small.plaintext_bytes < CHUNK_MIN_BYTES as u64,
        "the globals are small: {small:?}"
    );
    let small_object = repository
        .store
        .get(&ObjectKey::chunk(&small.id))
        .await
        .unwrap();
    let (small_plaintext, small_hash) = open_chunk(keys, &small.id, &small_object).unwrap();
    assert_eq!(Some(small_hash), small.hash);
    let small_packed = pack_chunk(&small_plaintext, ZSTD_LEVEL).unwrap();
    let made_up = pack_chunk(b"content no backup ever held", ZSTD_LEVEL).unwrap();
    // The large chunk is confirmed without its bytes; only its length goes.
    let large_announced = PackedChunk {
        hash: large_hash,
        plaintext_len: large.plaintext_bytes as usize,
        compression: cairn_common::chunk::Compression::None,
        payload: Vec::new(),
    };

    let objects_before = stored_objects(&coordinator);
    let small_path = chunk_path(&coordinator, &small.id);
    let small_file = std::fs::metadata(&small_path).unwrap();
    let mut host = HandDrivenAgent::take_over(&coordinator, &mut db1).await;
    let (job_id, backup_id) = start_backup(&coordinator, "db1", "shop");
    let received = host.next_command().await;
    let command = backup_command(&received, &job_id, &backup_id);
    assert_no_key_material(&received.wire_bytes, keys, "the backup command");

    let mut upload = host.upload(&job_id, &backup_id).await;
    let missing = upload.offer(&[large_hash, small_hash, made_up.hash]).await;
    assert_eq!(
        missing,
        vec![small_hash, made_up.hash],
        "asked for: the small stored chunk and the made-up one, not the large stored one"
    );
    upload.chunk(large_hash, &large_announced, false).await;
    upload.chunk(small_hash, &small_packed, true).await;
    upload.chunk(made_up.hash, &made_up, true).await;
    upload.globals(&small_packed).await;
    let dump_bytes = large.plaintext_bytes + small.plaintext_bytes + made_up.plaintext_len as u64;
    let stored = upload
        .finish(finish_uncounted(dump_bytes))
        .await
        .expect("the upload is stored");
    assert_eq!(stored, backup_id);
    host.answer(&command, job_done(&job_id)).await;
    assert_eq!(ended_job(&coordinator, &job_id)["status"], "succeeded");

    // Only the made-up chunk is new; the small one was not written again.
    let objects_after: BTreeSet<PathBuf> = stored_objects(&coordinator).into_iter().collect();
    let new: Vec<&PathBuf> = objects_after
        .iter()
        .filter(|path| !objects_before.contains(path))
        .collect();
    assert_eq!(
        new,
        vec![&chunk_path(
            &coordinator,
            &ChunkId::for_content(keys, &made_up.hash)
        )],
        "the new objects"
    );
    let small_file_after = std::fs::metadata(&small_path).unwrap();
    assert_eq!(
        (
            small_file.ino(),
            small_file.mtime(),
            small_file.mtime_nsec()
        ),
        (
            small_file_after.ino(),
            small_file_after.mtime(),
            small_file_after.mtime_nsec()
        ),
        "the small chunk's object was written again"
    );

    // Bytes of the wrong length get the same answer whether or not the
    // repository holds the hash: no way to confirm guessed small content.
    // Offered twice in one batch, the second copy (without bytes) is held
    // to the length the host gave for the first, never to the stored one.
    let unknown = pack_chunk(b"content nobody ever backed up", ZSTD_LEVEL).unwrap();
    let mut answers = Vec::new();
    for (hash, packed) in [(small_hash, &small_packed), (unknown.hash, &unknown)] {
        let (job_id, backup_id) = start_backup(&coordinator, "db1", "shop");
        let received = host.next_command().await;
        let command = backup_command(&received, &job_id, &backup_id);
        let mut upload = host.upload(&job_id, &backup_id).await;
        assert_eq!(upload.offer(&[hash, hash]).await, vec![hash]);
        let longer = PackedChunk {
            plaintext_len: packed.plaintext_len + 1,
            ..packed.clone()
        };
        upload.chunk(hash, &longer, true).await;
        upload.chunk(hash, &longer, false).await;
        let refused = upload
            .finish(finish_uncounted(2 * longer.plaintext_len as u64))
            .await
            .expect_err("a chunk of the wrong length");
        answers.push((
            refused.code(),
            // The sizes are the host's own; the rest must not differ.
            refused
                .message()
                .replace(&hash.to_hex(), "HASH")
                .replace(&(2 * longer.plaintext_len).to_string(), "2(LEN+1)")
                .replace(&longer.plaintext_len.to_string(), "LEN+1")
                .replace(&packed.plaintext_len.to_string(), "LEN"),
        ));
        let job = ended_job(&coordinator, &job_id);
        assert_eq!(job["status"], "failed", "{job}");
        host.answer(
            &command,
            command_result::Outcome::Error("refused upload".into()),
        )
        .await;
    }
    assert_eq!(
        answers[0], answers[1],
        "a stored small chunk and an unknown one were answered differently"
    );

    // Offered again after the host sent it, a small chunk is confirmed
    // whether the repository held it before (the globals) or not.
    let fresh = pack_chunk(b"sent in this upload for the first time", ZSTD_LEVEL).unwrap();
    let (job_id, backup_id) = start_backup(&coordinator, "db1", "shop");
    let received = host.next_command().await;
    let command = backup_command(&received, &job_id, &backup_id);
    let mut upload = host.upload(&job_id, &backup_id).await;
    let both = [small_hash, fresh.hash];
    assert_eq!(upload.offer(&both).await, both.to_vec());
    upload.chunk(small_hash, &small_packed, true).await;
    upload.chunk(fresh.hash, &fresh, true).await;
    assert_eq!(
        upload.offer(&both).await,
        Vec::<ContentHash>::new(),
        "both were sent in this upload: neither is asked for again"
    );
    upload.chunk(small_hash, &small_packed, false).await;
    upload.chunk(fresh.hash, &fresh, false).await;
    let dump_bytes = 2 * (small_packed.plaintext_len + fresh.plaintext_len) as u64;
    upload
        .finish(finish_uncounted(dump_bytes))
        .await
        .expect("the upload is stored");
    host.answer(&command, job_done(&job_id)).await;
    assert_eq!(ended_job(&coordinator, &job_id)["status"], "succeeded");

    // A restore sent to the host: no key in it either.
    let restore = blocking(|| {
        coordinator.cli_json(&[
            "restore",
            &stored_backup,
            "--agent",
            "db1",
            "--database",
            "shop_copy",
        ])
    });
    let received = host.next_command().await;
    let Some(proto::command::Kind::Restore(command)) = &received.command.kind else {
        panic!("expected a restore command, got {:?}", received.command);
    };
    assert_eq!(command.backup_id, stored_backup, "{restore}");
    assert_no_key_material(&received.wire_bytes, keys, "the restore command");
    host.answer(
        &received.command,
        command_result::Outcome::Error("not restored: the test only read the command".into()),
    )
    .await;
}

/// A whole backup uploaded by hand (a real `pg_dump -Fc` cut into pieces,
/// and the real globals) is stored; every object is named by the keyed
/// name of its content hash, never by the hash itself, so the storage
/// says nothing about what the chunks hold; and `cairn backup verify`
/// passes on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_driven_upload_is_stored_under_keyed_names_and_verifies() {
    let test_dir = TestDir::new("hostile_whole_upload");
    let pg = PgCluster::start_in(&test_dir, "main");
    pg.create_sample_database("shop", 2);
    let coordinator = Coordinator::start(&test_dir);
    let mut db1 = coordinator.enroll_agent("db1", &pg, AgentOptions::default().allow("backup"));
    let repository = open_repository(&coordinator).await;
    let keys = repository.keys();
    assert!(
        stored_objects(&coordinator).is_empty(),
        "a fresh repository holds no chunk"
    );

    let dumps = test_dir.path().join("dumps");
    let archive = tool_output(
        &pg,
        &dumps,
        "pg_dump",
        &["--format=custom", "--compress=0", "--dbname=shop"],
    );
    let globals = tool_output(&pg, &dumps, "pg_dumpall", &["--globals-only"]);
    let mut scanner = ArchiveScanner::new();
    scanner.feed(&archive).unwrap();
    let summary = scanner.finish().expect("pg_dump wrote a whole archive");
    assert!(!summary.tables.is_empty());
    let pieces: Vec<PackedChunk> = archive
        .chunks(archive.len().div_ceil(3))
        .map(|piece| pack_chunk(piece, ZSTD_LEVEL).unwrap())
        .collect();
    assert_eq!(pieces.len(), 3);
    let globals = pack_chunk(&globals, ZSTD_LEVEL).unwrap();

    let mut host = HandDrivenAgent::take_over(&coordinator, &mut db1).await;
    let (job_id, backup_id) = start_backup(&coordinator, "db1", "shop");
    let received = host.next_command().await;
    let command = backup_command(&received, &job_id, &backup_id);
    let mut upload = host.upload(&job_id, &backup_id).await;
    let hashes: Vec<ContentHash> = pieces.iter().map(|p| p.hash).collect();
    assert_eq!(upload.offer(&hashes).await, hashes, "a fresh repository");
    for piece in &pieces {
        upload.chunk(piece.hash, piece, true).await;
    }
    upload.globals(&globals).await;
    let stored = upload
        .finish(proto::UploadFinish {
            dump_bytes: archive.len() as u64,
            pg_dump_version: "hand-driven".into(),
            server_version: "hand-driven".into(),
            table_rows: summary.tables.iter().cloned().map(Into::into).collect(),
            archive_version: summary.archive_version.clone(),
            ..Default::default()
        })
        .await
        .expect("the upload is stored");
    assert_eq!(stored, backup_id);
    host.answer(&command, job_done(&job_id)).await;
    assert_eq!(ended_job(&coordinator, &job_id)["status"], "succeeded");

    let object_names: BTreeSet<String> = coordinator
        .chunk_files()
        .iter()
        .map(|path| path.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    let content_hashes: Vec<ContentHash> = hashes.iter().copied().chain([globals.hash]).collect();
    let keyed_names: BTreeSet<String> = content_hashes
        .iter()
        .map(|hash| ChunkId::for_content(keys, hash).to_hex())
        .collect();
    assert_eq!(object_names, keyed_names, "every object has its keyed name");
    for hash in &content_hashes {
        assert!(
            !object_names.contains(&hash.to_hex()),
            "an object is named by its content hash {hash}"
        );
    }

    blocking(|| coordinator.cli(&["backup", "verify", &backup_id])).assert_success();
}
