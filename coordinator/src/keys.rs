//! The master key file and its rotation.
//!
//! Rotation is ordered so that a crash at any point leaves a repository
//! that opens: the new key is written to `master.key.new` first, then the
//! repository keys are rewrapped, then `master.key.new` is renamed over
//! `master.key`. At startup, a repository that does not open with
//! `master.key` but does with `master.key.new` finishes that rename.

use std::path::{Path, PathBuf};

use cairn_common::config::write_file_atomic;
use cairn_common::crypto::SecretKey;

use crate::error::{CoordinatorError, Result};
use crate::repository::{Repository, Store};

fn pending_path(master_key_file: &Path) -> PathBuf {
    let mut name = master_key_file.as_os_str().to_os_string();
    name.push(".new");
    PathBuf::from(name)
}

fn read_key(path: &Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CoordinatorError::io(format!("cannot read {}", path.display()), e))?;
    SecretKey::from_hex(&text).map_err(|_| {
        CoordinatorError::InvalidArgument(format!("{} must hold 64 hex digits", path.display()))
    })
}

/// Opens the repository with the master key, finishing an interrupted
/// rotation if that is what stands in the way.
pub async fn open_repository(
    store: Store,
    master_key_file: &Path,
    master: SecretKey,
) -> Result<Repository> {
    let opened = Repository::open(store.clone(), &master).await;
    let pending = pending_path(master_key_file);
    match opened {
        Ok(repository) => {
            // A rotation that never reached the rewrap leaves a stale file.
            let _ = std::fs::remove_file(&pending);
            Ok(repository)
        }
        Err(error) if pending.exists() => {
            let new_master = read_key(&pending)?;
            let repository = Repository::open(store, &new_master)
                .await
                .map_err(|_| CoordinatorError::Unavailable(format!("repository: {error}")))?;
            std::fs::rename(&pending, master_key_file).map_err(|e| {
                CoordinatorError::io(
                    format!(
                        "cannot finish the master key rotation ({})",
                        pending.display()
                    ),
                    e,
                )
            })?;
            tracing::warn!(
                key = new_master.key_id(),
                "finished an interrupted master key rotation"
            );
            Ok(repository)
        }
        Err(error) => Err(CoordinatorError::Unavailable(format!(
            "repository: {error}"
        ))),
    }
}

/// Rotates the master key; returns (old key id, new key id).
pub async fn rotate(repository: &Repository, master_key_file: &Path) -> Result<(String, String)> {
    let old = read_key(master_key_file)?;
    let new = SecretKey::generate()?;
    let pending = pending_path(master_key_file);
    write_file_atomic(
        &pending,
        format!("{}\n", new.expose_hex()).as_bytes(),
        0o600,
    )?;
    repository
        .rewrap_keys(&new)
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("repository: {e}")))?;
    std::fs::rename(&pending, master_key_file).map_err(|e| {
        CoordinatorError::io(format!("cannot replace {}", master_key_file.display()), e)
    })?;
    Ok((old.key_id(), new.key_id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::LocalStore;

    #[tokio::test]
    async fn rotation_and_recovery_from_an_interrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalStore::new(dir.path().join("repository")));
        let key_file = dir.path().join("master.key");
        let master = SecretKey::generate().unwrap();
        write_file_atomic(&key_file, master.expose_hex().as_bytes(), 0o600).unwrap();
        let repository = Repository::create(store.clone(), &master).await.unwrap();

        let (old_id, new_id) = rotate(&repository, &key_file).await.unwrap();
        assert_eq!(old_id, master.key_id());
        let new_master = read_key(&key_file).unwrap();
        assert_eq!(new_master.key_id(), new_id);
        let reopened = open_repository(store.clone(), &key_file, new_master.clone())
            .await
            .unwrap();
        assert_eq!(reopened.keys(), repository.keys());

        // A crash after the rewrap but before the rename: master.key still
        // holds the previous key, master.key.new the one that opens.
        let newer = SecretKey::generate().unwrap();
        write_file_atomic(
            &pending_path(&key_file),
            newer.expose_hex().as_bytes(),
            0o600,
        )
        .unwrap();
        repository.rewrap_keys(&newer).await.unwrap();
        let recovered = open_repository(store, &key_file, new_master).await.unwrap();
        assert_eq!(recovered.keys(), repository.keys());
        assert_eq!(read_key(&key_file).unwrap(), newer);
        assert!(!pending_path(&key_file).exists());
    }
}
