//! The repository: where backups live, as sealed objects in a local
//! directory or an S3 bucket. The only code that touches storage.
//!
//! Layout (every object is immutable once written, and written whole or
//! not at all):
//!
//! ```text
//! cairn-repository.json        format and id: what makes a repository self-describing
//! keys/repository.json         the repository keys, wrapped by the master key
//! chunks/ab/abcdef...          sealed chunks, named by their keyed hash
//! manifests/<backup id>        sealed manifests (written after their chunks)
//! ```
//!
//! With only the store and the master key, everything else can be rebuilt.

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
const KEYS_KEY: &str = "keys/repository.json";

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
    /// constant memory. (Keys of one shape, such as `chunks/ab/<hex>`: the
    /// local store walks directories in sorted order.)
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
        let wrapped = WrappedKeys::wrap(master, &keys)?;
        store
            .put(&ObjectKey::new(KEYS_KEY)?, to_json(&wrapped)?)
            .await?;
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
        let wrapped: WrappedKeys = from_json(&store, &ObjectKey::new(KEYS_KEY)?).await?;
        let keys = wrapped.unwrap(master)?;
        Ok(Repository {
            store,
            keys,
            id: descriptor.id,
        })
    }

    /// Rewraps the repository keys under `new_master`. No chunk or manifest
    /// is touched: the keys themselves do not change.
    pub async fn rewrap_keys(&self, new_master: &SecretKey) -> Result<()> {
        let wrapped = WrappedKeys::wrap(new_master, &self.keys)?;
        self.store
            .put(&ObjectKey::new(KEYS_KEY)?, to_json(&wrapped)?)
            .await
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
    async fn create_open_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalStore::new(dir.path().to_path_buf()));
        let master = SecretKey::generate().unwrap();
        let created = Repository::create(store.clone(), &master).await.unwrap();
        assert!(Repository::create(store.clone(), &master).await.is_err());
        let opened = Repository::open(store.clone(), &master).await.unwrap();
        assert_eq!(opened.keys(), created.keys());
        assert_eq!(opened.id(), created.id());

        let new_master = SecretKey::generate().unwrap();
        opened.rewrap_keys(&new_master).await.unwrap();
        let error = Repository::open(store.clone(), &master)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(&new_master.key_id()), "{error}");
        let rotated = Repository::open(store, &new_master).await.unwrap();
        assert_eq!(
            rotated.keys(),
            created.keys(),
            "rotation keeps the data keys"
        );

        let empty = Store::Local(LocalStore::new(dir.path().join("empty")));
        let error = Repository::open(empty, &master)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds no cairn repository"), "{error}");
    }
}
