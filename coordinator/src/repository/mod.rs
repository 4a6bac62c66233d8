//! The repository: where backups live, as sealed objects in a local
//! directory or an S3 bucket. The only code that touches storage.
//!
//! Layout (every object is immutable once written, and written whole or
//! not at all):
//!
//! ```text
//! cairn-repository.json        format and id: what makes a repository self-describing
//! keys/slots/<slot id>.json    the repository keys, wrapped by one master key per slot
//! keys/repository.json         (repositories made before key slots: the one wrapped
//!                              copy; `cairn serve` moves it into a slot)
//! chunks/ab/abcdef...          sealed chunks, named by their keyed hash
//! manifests/<backup id>        sealed manifests (written after their chunks)
//! ```
//!
//! Key slots, as LUKS and restic have them: the same repository keys are
//! wrapped once per master key that may open the repository (the key the
//! coordinator runs on, and recovery keys kept elsewhere), each copy its own
//! object named by the slot id ([`SecretKey::key_id`] of its master key, a
//! keyed hash that says nothing about the key). Adding or removing a slot is
//! one put or one delete of its own object, so no change to one slot can
//! lose another.
//!
//! With only the store and any one master key, everything else can be
//! rebuilt.

pub mod check;
pub mod gc;
pub mod init;
pub mod keys;
pub mod manifest;
pub mod rebuild;

mod walk;

mod local;
mod s3;

use bytes::Bytes;
use cairn_common::chunk::ChunkId;
use cairn_common::crypto::{RepositoryKeys, SecretKey, WrappedKeys};
use serde::{Deserialize, Serialize};

pub use local::LocalStore;
pub use s3::{S3Credentials, S3Settings, S3Store, normalize_prefix as normalize_s3_prefix};

const REPOSITORY_FORMAT: &str = "cairn-repository-v1";
const DESCRIPTOR_KEY: &str = "cairn-repository.json";
/// The single wrapped copy of repositories made before key slots.
const LEGACY_KEYS_KEY: &str = "keys/repository.json";
const SLOTS_PREFIX: &str = "keys/slots/";
const SLOT_FORMAT: &str = "cairn-key-slot-v1";

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("repository object {0} does not exist")]
    NotFound(String),
    /// The cause is in the message only (see `cairn_common::error`).
    #[error("repository object {key}: {cause}")]
    Io { key: String, cause: std::io::Error },
    /// The storage service refused or failed a request; `message` is what
    /// it said (an S3 error code and message, or the transport failure).
    #[error("repository object {key}: {message}")]
    Storage { key: String, message: String },
    #[error("repository: {0}")]
    Invalid(String),
    /// The master key has no slot: names the slots there are, never a key.
    #[error(
        "no key slot of this repository opens with master key {master_key_id} (its slots: {slots}): use the master key the coordinator last ran on or a recovery key of this repository (`cairn keys list` shows the slots)"
    )]
    NoSlot {
        master_key_id: String,
        slots: String,
    },
    #[error(transparent)]
    Keys(#[from] cairn_common::Error),
}

pub type Result<T, E = RepositoryError> = std::result::Result<T, E>;

/// A validated object name: relative, `/`-separated, from `[a-z0-9._-]`,
/// no empty, `.` or `..` segments. It becomes a file path or an S3 key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub fn new(key: impl Into<String>) -> Result<ObjectKey> {
        let key = key.into();
        let valid = !key.is_empty()
            && key.len() <= 512
            && key.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !valid {
            return Err(RepositoryError::Invalid(format!(
                "{key:?} is not a valid object name"
            )));
        }
        Ok(ObjectKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn chunk(id: &ChunkId) -> ObjectKey {
        let hex = id.to_hex();
        ObjectKey(format!("chunks/{}/{hex}", &hex[..2]))
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A storage backend.
#[derive(Debug, Clone)]
pub enum Store {
    Local(LocalStore),
    S3(S3Store),
}

impl Store {
    /// Stores `bytes` under `key`; readers see the whole object or none.
    pub async fn put(&self, key: &ObjectKey, bytes: Bytes) -> Result<()> {
        match self {
            Store::Local(store) => store.put(key, bytes).await,
            Store::S3(store) => store.put(key, bytes).await,
        }
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        match self {
            Store::Local(store) => store.get(key).await,
            Store::S3(store) => store.get(key).await,
        }
    }

    pub async fn exists(&self, key: &ObjectKey) -> Result<bool> {
        match self {
            Store::Local(store) => store.exists(key).await,
            Store::S3(store) => store.exists(key).await,
        }
    }

    /// Every object whose name starts with `prefix` (a directory-like prefix
    /// ending in `/`), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>> {
        match self {
            Store::Local(store) => store.list(prefix).await,
            Store::S3(store) => store.list(prefix).await,
        }
    }

    /// Every object under `prefix`, in increasing order, streamed with
    /// backpressure: a repository of millions of chunks is listed in
    /// constant memory.
    pub fn list_streamed(&self, prefix: &str) -> Listing {
        let (sender, receiver) = tokio::sync::mpsc::channel(LISTING_BUFFER);
        let store = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let listed = match &store {
                Store::Local(store) => store.list_into(&prefix, &sender).await,
                Store::S3(store) => store.list_into(&prefix, &sender).await,
            };
            if let Err(error) = listed {
                let _ = sender.send(Err(error)).await;
            }
        });
        Listing {
            receiver,
            last: None,
        }
    }

    /// The object's size and when it was written, `None` if there is none:
    /// how garbage collection tells an old orphan from a chunk an upload is
    /// storing now.
    pub async fn stat(&self, key: &ObjectKey) -> Result<Option<ObjectStat>> {
        match self {
            Store::Local(store) => store.stat(key).await,
            Store::S3(store) => store.stat(key).await,
        }
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        match self {
            Store::Local(store) => store.delete(key).await,
            Store::S3(store) => store.delete(key).await,
        }
    }

    /// Where this store is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Store::Local(store) => store.describe(),
            Store::S3(store) => store.describe(),
        }
    }
}

/// What [`Store::stat`] says of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectStat {
    pub bytes: u64,
    /// When it was written, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// Milliseconds since the Unix epoch (0 before it).
fn system_time_ms(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Object names listed ahead of their consumer.
const LISTING_BUFFER: usize = 1000;

/// A listing in progress ([`Store::list_streamed`]).
#[derive(Debug)]
pub struct Listing {
    receiver: tokio::sync::mpsc::Receiver<Result<ObjectKey>>,
    last: Option<ObjectKey>,
}

impl Listing {
    /// The next object name, `None` at the end. Names come in strictly
    /// increasing order, or the listing fails: callers merge it with other
    /// sorted lists.
    pub async fn next(&mut self) -> Result<Option<ObjectKey>> {
        let Some(listed) = self.receiver.recv().await else {
            return Ok(None);
        };
        let key = listed?;
        if let Some(last) = &self.last
            && key <= *last
        {
            return Err(RepositoryError::Invalid(format!(
                "the storage listed {key} after {last}: not in increasing order"
            )));
        }
        self.last = Some(key.clone());
        Ok(Some(key))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Descriptor {
    format: String,
    /// Random, for telling repositories apart.
    id: String,
}

/// An open repository: its store and its unwrapped keys.
#[derive(Debug, Clone)]
pub struct Repository {
    pub store: Store,
    keys: RepositoryKeys,
    id: String,
}

impl Repository {
    /// Makes a new, empty repository in `store` (which must not hold one),
    /// with fresh keys wrapped by `master`.
    pub async fn create(store: Store, master: &SecretKey) -> Result<Repository> {
        let descriptor_key = ObjectKey::new(DESCRIPTOR_KEY)?;
        if store.exists(&descriptor_key).await? {
            return Err(RepositoryError::Invalid(format!(
                "{} already holds a repository",
                store.describe()
            )));
        }
        let keys = RepositoryKeys::generate()?;
        write_slot(&store, master, &keys, SlotPurpose::Master).await?;
        let id = hex::encode(cairn_common::pki::random_bytes(16)?);
        let descriptor = Descriptor {
            format: REPOSITORY_FORMAT.to_string(),
            id: id.clone(),
        };
        // The descriptor last: a repository is only a repository once its
        // keys are stored.
        store.put(&descriptor_key, to_json(&descriptor)?).await?;
        Ok(Repository { store, keys, id })
    }

    /// Opens the repository in `store` with the master key.
    pub async fn open(store: Store, master: &SecretKey) -> Result<Repository> {
        let descriptor: Descriptor = from_json(&store, &ObjectKey::new(DESCRIPTOR_KEY)?)
            .await
            .map_err(|e| match e {
                RepositoryError::NotFound(_) => RepositoryError::Invalid(format!(
                    "{} holds no cairn repository (no {DESCRIPTOR_KEY}); create one with `cairn repository init --config FILE`",
                    store.describe()
                )),
                other => other,
            })?;
        if descriptor.format != REPOSITORY_FORMAT {
            return Err(RepositoryError::Invalid(format!(
                "unknown repository format {:?}",
                descriptor.format
            )));
        }
        let keys = match unwrap_with(&store, master).await? {
            Some(keys) => keys,
            None => {
                let slots = list_slots(&store)
                    .await?
                    .iter()
                    .map(|slot| slot.id.clone())
                    .collect::<Vec<_>>();
                return Err(RepositoryError::NoSlot {
                    master_key_id: master.key_id(),
                    slots: if slots.is_empty() {
                        "none".to_string()
                    } else {
                        slots.join(", ")
                    },
                });
            }
        };
        Ok(Repository {
            store,
            keys,
            id: descriptor.id,
        })
    }

    /// Every key slot, oldest first.
    pub async fn key_slots(&self) -> Result<Vec<KeySlot>> {
        list_slots(&self.store).await
    }

    /// Whether a slot with this id exists (a legacy single copy counts).
    pub async fn has_slot(&self, id: &str) -> Result<bool> {
        if self.store.exists(&slot_key(id)?).await? {
            return Ok(true);
        }
        Ok(read_legacy(&self.store)
            .await?
            .is_some_and(|wrapped| wrapped.master_key_id == id))
    }

    /// Wraps the repository keys under `master` into a new slot. No chunk
    /// or manifest is touched: the keys themselves never change.
    pub async fn add_slot(&self, master: &SecretKey, purpose: SlotPurpose) -> Result<KeySlot> {
        write_slot(&self.store, master, &self.keys, purpose).await
    }

    /// Deletes the slot `id` (and the legacy copy, if that is what it is):
    /// its master key no longer opens the repository.
    pub async fn remove_slot(&self, id: &str) -> Result<()> {
        self.store.delete(&slot_key(id)?).await?;
        if let Some(wrapped) = read_legacy(&self.store).await?
            && wrapped.master_key_id == id
        {
            self.store.delete(&ObjectKey::new(LEGACY_KEYS_KEY)?).await?;
        }
        Ok(())
    }

    /// Moves a repository made before key slots onto them: the single
    /// wrapped copy becomes a slot of `master`'s, then goes. A crash in
    /// between leaves both, which open alike; the next start finishes.
    /// Returns whether there was anything to move.
    pub async fn migrate_legacy_keys(&self, master: &SecretKey) -> Result<bool> {
        let Some(wrapped) = read_legacy(&self.store).await? else {
            return Ok(false);
        };
        if wrapped.master_key_id != master.key_id() {
            // Another key's copy: listed as a legacy slot until removed.
            return Ok(false);
        }
        // After a crash between the two steps the slot is already there.
        if !self.store.exists(&slot_key(&master.key_id())?).await? {
            write_slot(&self.store, master, &self.keys, SlotPurpose::Master).await?;
        }
        self.store.delete(&ObjectKey::new(LEGACY_KEYS_KEY)?).await?;
        Ok(true)
    }

    /// Reads the descriptor back and checks that it still describes this
    /// repository: what `/readyz` asks of storage. It writes nothing, so
    /// coordinators sharing a bucket do not collide and a write-once
    /// (object-locked) bucket answers too.
    pub async fn check_readable(&self) -> Result<()> {
        let descriptor: Descriptor =
            from_json(&self.store, &ObjectKey::new(DESCRIPTOR_KEY)?).await?;
        if descriptor.format != REPOSITORY_FORMAT || descriptor.id != self.id {
            return Err(RepositoryError::Invalid(format!(
                "{DESCRIPTOR_KEY} describes repository {:?} (format {:?}), not the repository {} \
                 this coordinator opened: restart it on the right repository",
                descriptor.id, descriptor.format, self.id
            )));
        }
        Ok(())
    }

    pub fn keys(&self) -> &RepositoryKeys {
        &self.keys
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// What a key slot's master key is for. It only labels the slot: every
/// slot opens the repository alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotPurpose {
    /// Made by `cairn init`, `repository init` or a rotation: a key for the
    /// coordinator to run on.
    Master,
    /// Made by `cairn keys add`: a key kept away from the coordinator.
    Recovery,
    /// The single wrapped copy of a repository made before key slots.
    Legacy,
}

impl SlotPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotPurpose::Master => "master",
            SlotPurpose::Recovery => "recovery",
            SlotPurpose::Legacy => "legacy",
        }
    }
}

/// A key slot as listed: public facts only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// [`SecretKey::key_id`] of the slot's master key.
    pub id: String,
    pub purpose: SlotPurpose,
    /// 0 for a legacy copy, which did not record it.
    pub created_at_ms: i64,
}

/// One slot object. The metadata beside the wrapped keys is not
/// authenticated: it only labels the slot, and whoever could alter it could
/// as well delete the object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotObject {
    format: String,
    purpose: SlotPurpose,
    created_at_ms: i64,
    wrapped: WrappedKeys,
}

/// A slot id is 16 lowercase hex digits; anything else never reaches an
/// object name.
pub fn slot_key(id: &str) -> Result<ObjectKey> {
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if id.len() != 16 || !id.bytes().all(hex) {
        return Err(RepositoryError::Invalid(format!(
            "{id:?} is not a key slot id (16 hex digits, as `cairn keys list` shows them)"
        )));
    }
    ObjectKey::new(format!("{SLOTS_PREFIX}{id}.json"))
}

async fn write_slot(
    store: &Store,
    master: &SecretKey,
    keys: &RepositoryKeys,
    purpose: SlotPurpose,
) -> Result<KeySlot> {
    let slot = SlotObject {
        format: SLOT_FORMAT.to_string(),
        purpose,
        created_at_ms: crate::clock::now_ms(),
        wrapped: WrappedKeys::wrap(master, keys)?,
    };
    store
        .put(&slot_key(&slot.wrapped.master_key_id)?, to_json(&slot)?)
        .await?;
    Ok(KeySlot {
        id: slot.wrapped.master_key_id,
        purpose,
        created_at_ms: slot.created_at_ms,
    })
}

async fn read_slot(store: &Store, key: &ObjectKey) -> Result<SlotObject> {
    let slot: SlotObject = from_json(store, key).await?;
    if slot.format != SLOT_FORMAT {
        return Err(RepositoryError::Invalid(format!(
            "{key}: unknown key slot format {:?}",
            slot.format
        )));
    }
    // The name must agree with the copy inside, or removing one slot could
    // leave another key's copy behind.
    if slot_key(&slot.wrapped.master_key_id)? != *key {
        return Err(RepositoryError::Invalid(format!(
            "{key} holds the keys of slot {}",
            slot.wrapped.master_key_id
        )));
    }
    Ok(slot)
}

async fn read_legacy(store: &Store) -> Result<Option<WrappedKeys>> {
    match from_json(store, &ObjectKey::new(LEGACY_KEYS_KEY)?).await {
        Ok(wrapped) => Ok(Some(wrapped)),
        Err(RepositoryError::NotFound(_)) => Ok(None),
        Err(error) => Err(error),
    }
}

/// The repository keys, if `master` has a slot (or the legacy copy).
async fn unwrap_with(store: &Store, master: &SecretKey) -> Result<Option<RepositoryKeys>> {
    let id = master.key_id();
    match read_slot(store, &slot_key(&id)?).await {
        Ok(slot) => return Ok(Some(slot.wrapped.unwrap(master)?)),
        Err(RepositoryError::NotFound(_)) => {}
        Err(error) => return Err(error),
    }
    match read_legacy(store).await? {
        Some(wrapped) if wrapped.master_key_id == id => Ok(Some(wrapped.unwrap(master)?)),
        _ => Ok(None),
    }
}

async fn list_slots(store: &Store) -> Result<Vec<KeySlot>> {
    let mut slots = Vec::new();
    for key in store.list(SLOTS_PREFIX).await? {
        let slot = read_slot(store, &key).await?;
        slots.push(KeySlot {
            id: slot.wrapped.master_key_id,
            purpose: slot.purpose,
            created_at_ms: slot.created_at_ms,
        });
    }
    if let Some(wrapped) = read_legacy(store).await?
        && !slots.iter().any(|slot| slot.id == wrapped.master_key_id)
    {
        slots.push(KeySlot {
            id: wrapped.master_key_id,
            purpose: SlotPurpose::Legacy,
            created_at_ms: 0,
        });
    }
    slots.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(slots)
}

fn to_json<T: Serialize>(value: &T) -> Result<Bytes> {
    serde_json::to_vec_pretty(value)
        .map(Bytes::from)
        .map_err(|e| RepositoryError::Invalid(format!("cannot encode: {e}")))
}

async fn from_json<T: serde::de::DeserializeOwned>(store: &Store, key: &ObjectKey) -> Result<T> {
    let bytes = store.get(key).await?;
    serde_json::from_slice(&bytes).map_err(|e| RepositoryError::Invalid(format!("{key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_key(key: &str, valid: bool) {
        assert_eq!(ObjectKey::new(key).is_ok(), valid, "{key:?}");
    }

    #[test]
    fn object_keys() {
        check_key("chunks/ab/abcd", true);
        check_key("manifests/2026-11-23.x_y-z", true);
        check_key("", false);
        check_key("/etc/passwd", false);
        check_key("chunks/../../etc", false);
        check_key("chunks//x", false);
        check_key("Chunks/x", false);
        check_key("chunks/x ", false);
    }

    #[tokio::test]
    async fn create_open_and_key_slots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalStore::new(dir.path().to_path_buf()));
        let master = SecretKey::generate().unwrap();
        let created = Repository::create(store.clone(), &master).await.unwrap();
        assert!(Repository::create(store.clone(), &master).await.is_err());
        let opened = Repository::open(store.clone(), &master).await.unwrap();
        assert_eq!(opened.keys(), created.keys());
        assert_eq!(opened.id(), created.id());

        // A second slot opens the same keys; removing the first shuts its
        // key out and names the slots that remain, never a key.
        let recovery = SecretKey::generate().unwrap();
        opened
            .add_slot(&recovery, SlotPurpose::Recovery)
            .await
            .unwrap();
        let slots = opened.key_slots().await.unwrap();
        let ids: Vec<&str> = slots.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, [master.key_id(), recovery.key_id()]);
        assert_eq!(slots[1].purpose, SlotPurpose::Recovery);
        let by_recovery = Repository::open(store.clone(), &recovery).await.unwrap();
        assert_eq!(
            by_recovery.keys(),
            created.keys(),
            "slots keep the data keys"
        );
        opened.remove_slot(&master.key_id()).await.unwrap();
        let error = Repository::open(store.clone(), &master)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&master.key_id()) && error.contains(&recovery.key_id()),
            "{error}"
        );
        assert!(!error.contains(&master.expose_hex()), "{error}");
        assert!(opened.remove_slot("../descriptor").await.is_err());

        let empty = Store::Local(LocalStore::new(dir.path().join("empty")));
        let error = Repository::open(empty, &master)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds no cairn repository"), "{error}");
    }

    #[tokio::test]
    async fn a_repository_from_before_key_slots_opens_and_moves_onto_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalStore::new(dir.path().to_path_buf()));
        let master = SecretKey::generate().unwrap();
        let created = Repository::create(store.clone(), &master).await.unwrap();
        // Rewrite it as the previous format had it: one wrapped copy at
        // keys/repository.json, no slots.
        let legacy = ObjectKey::new(LEGACY_KEYS_KEY).unwrap();
        let wrapped = WrappedKeys::wrap(&master, created.keys()).unwrap();
        store
            .put(&legacy, to_json(&wrapped).unwrap())
            .await
            .unwrap();
        store
            .delete(&slot_key(&master.key_id()).unwrap())
            .await
            .unwrap();

        let opened = Repository::open(store.clone(), &master).await.unwrap();
        assert_eq!(opened.keys(), created.keys());
        let slots = opened.key_slots().await.unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].purpose, SlotPurpose::Legacy);
        assert!(opened.migrate_legacy_keys(&master).await.unwrap());
        assert!(!store.exists(&legacy).await.unwrap());
        let slots = opened.key_slots().await.unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].purpose, SlotPurpose::Master);
        assert_eq!(slots[0].id, master.key_id());
        let reopened = Repository::open(store, &master).await.unwrap();
        assert_eq!(reopened.keys(), created.keys());
        assert!(!opened.migrate_legacy_keys(&master).await.unwrap());
    }
}
