//! A repository in a local directory. Each object is written to a
//! temporary name in its final directory, fsynced, renamed into place, and
//! the directory fsynced: a crash leaves either the whole object or none
//! (plus, at worst, a `.tmp-` file that listings skip).

use std::path::PathBuf;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{ObjectKey, ObjectStat, RepositoryError, Result, system_time_ms};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

const TEMPORARY_PREFIX: &str = ".tmp-";

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    pub fn describe(&self) -> String {
        format!("local repository {}", self.root.display())
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        // ObjectKey admits no absolute paths and no `..`.
        self.root.join(key.as_str())
    }

    fn io(key: &ObjectKey, source: std::io::Error) -> RepositoryError {
        RepositoryError::Io {
            key: key.to_string(),
            cause: source,
        }
    }

    pub async fn put(&self, key: &ObjectKey, bytes: Bytes) -> Result<()> {
        let path = self.path(key);
        let dir = path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.root.clone());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Self::io(key, e))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let unique = hex::encode(
            cairn_common::pki::random_bytes(8)
                .map_err(|e| RepositoryError::Invalid(e.to_string()))?,
        );
        let temporary = dir.join(format!("{TEMPORARY_PREFIX}{file_name}.{unique}"));
        let written = async {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temporary)
                .await?;
            file.write_all(&bytes).await?;
            // tokio writes in the background: only `flush` reports a failed
            // write (a full disk), and `sync_all` does not wait for it.
            file.flush().await?;
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&temporary, &path).await?;
            tokio::fs::File::open(&dir).await?.sync_all().await
        }
        .await;
        if let Err(error) = written {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(Self::io(key, error));
        }
        Ok(())
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        match tokio::fs::read(self.path(key)).await {
            Ok(bytes) => Ok(Bytes::from(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(RepositoryError::NotFound(key.to_string()))
            }
            Err(error) => Err(Self::io(key, error)),
        }
    }

    pub async fn exists(&self, key: &ObjectKey) -> Result<bool> {
        tokio::fs::try_exists(self.path(key))
            .await
            .map_err(|e| Self::io(key, e))
    }

    /// The object's size and when it was written (the file's mtime: a put
    /// renames a new file into place), `None` if there is none.
    pub async fn stat(&self, key: &ObjectKey) -> Result<Option<ObjectStat>> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(metadata) => {
                let modified = metadata.modified().map_err(|e| Self::io(key, e))?;
                Ok(Some(ObjectStat {
                    bytes: metadata.len(),
                    modified_ms: system_time_ms(modified),
                }))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(Self::io(key, error)),
        }
    }

    /// Sends every object under `prefix` to `sender` in the order of their
    /// keys, walking one directory at a time, so memory holds one
    /// directory's names at most; stops early if the receiver is gone.
    pub async fn list_into(
        &self,
        prefix: &str,
        sender: &tokio::sync::mpsc::Sender<Result<ObjectKey>>,
    ) -> Result<()> {
        enum Item {
            Dir(PathBuf),
            Object(ObjectKey),
        }
        let io = |error| RepositoryError::Io {
            key: prefix.to_string(),
            cause: error,
        };
        let mut pending = vec![Item::Dir(self.root.join(prefix.trim_end_matches('/')))];
        while let Some(item) = pending.pop() {
            let dir = match item {
                Item::Object(key) => {
                    if sender.send(Ok(key)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Item::Dir(dir) => dir,
            };
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io(error)),
            };
            let mut items = Vec::new();
            while let Some(entry) = entries.next_entry().await.map_err(io)? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TEMPORARY_PREFIX) || name.starts_with('.') {
                    continue;
                }
                let path = entry.path();
                if entry.file_type().await.map_err(io)?.is_dir() {
                    // Sorted as the keys under it begin (`name/`), so that
                    // the walk yields keys in the order of their full names
                    // (`ab.x` before `ab/...`, as S3 lists them).
                    items.push((format!("{name}/"), Item::Dir(path)));
                } else if let Ok(relative) = path.strip_prefix(&self.root)
                    && let Ok(key) = ObjectKey::new(relative.to_string_lossy().into_owned())
                {
                    items.push((name, Item::Object(key)));
                }
            }
            // Reversed onto the stack, so the smallest name comes out first.
            items.sort_by(|a, b| b.0.cmp(&a.0));
            pending.extend(items.into_iter().map(|(_, item)| item));
        }
        Ok(())
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>> {
        let mut keys = Vec::new();
        let mut pending = vec![self.root.join(prefix.trim_end_matches('/'))];
        while let Some(dir) = pending.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    return Err(RepositoryError::Io {
                        key: prefix.to_string(),
                        cause: error,
                    });
                }
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| RepositoryError::Io {
                    key: prefix.to_string(),
                    cause: e,
                })?
            {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TEMPORARY_PREFIX) || name.starts_with('.') {
                    continue;
                }
                let file_type = entry.file_type().await.map_err(|e| RepositoryError::Io {
                    key: prefix.to_string(),
                    cause: e,
                })?;
                if file_type.is_dir() {
                    pending.push(path);
                } else if let Ok(relative) = path.strip_prefix(&self.root)
                    && let Ok(key) = ObjectKey::new(relative.to_string_lossy().into_owned())
                {
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(Self::io(key, error)),
        }
        // A removed key slot must stay removed after a power loss, or a
        // retired key would open the repository again.
        if let Some(dir) = path.parent() {
            tokio::fs::File::open(dir)
                .await
                .map_err(|e| Self::io(key, e))?
                .sync_all()
                .await
                .map_err(|e| Self::io(key, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_streamed_listing_comes_in_the_order_of_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::Local(LocalStore::new(dir.path().to_path_buf()));
        // `ab.bak` sorts before `ab/...` ('.' < '/'), as S3 lists them.
        let keys = [
            "chunks/ab/ab02",
            "chunks/ab.bak",
            "chunks/ab/ab01",
            "chunks/0f/0f01",
        ];
        for key in keys {
            store
                .put(&ObjectKey::new(key).unwrap(), Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        let mut listing = store.list_streamed("chunks/");
        let mut listed = Vec::new();
        while let Some(key) = listing.next().await.unwrap() {
            listed.push(key.as_str().to_string());
        }
        let mut expected: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        expected.sort();
        assert_eq!(listed, expected);
    }

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let key = |k: &str| ObjectKey::new(k).unwrap();
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
        // A crash's leftover is not an object.
        std::fs::write(dir.path().join("chunks/ab/.tmp-ab03.x"), b"partial").unwrap();

        assert_eq!(
            store.get(&key("chunks/ab/ab01")).await.unwrap(),
            Bytes::from_static(b"one")
        );
        assert!(matches!(
            store.get(&key("chunks/ab/nope")).await,
            Err(RepositoryError::NotFound(_))
        ));
        let listed: Vec<String> = store
            .list("chunks/")
            .await
            .unwrap()
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(listed, ["chunks/ab/ab01", "chunks/cd/cd02"]);
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
        store.delete(&key("chunks/ab/ab01")).await.unwrap();
    }
}
