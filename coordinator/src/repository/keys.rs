//! The master key file, the repository's key slots, and rotation.
//!
//! Every master key that may open the repository has a key slot there
//! (`repository` owns the format): the key the coordinator runs on, in
//! `keys.master_key_file`, and any recovery keys operators keep elsewhere
//! (`cairn keys add`). Losing every one of them loses every backup, so each
//! change here keeps at least one key that opens the repository in a file,
//! at every instant:
//!
//! A rotation runs in four steps, each durable before the next:
//! 1. a new key is written to `master.key.new` (the pending key);
//! 2. a slot for it is added to the repository;
//! 3. the old key's slot is removed;
//! 4. `master.key.new` is renamed over `master.key`.
//!
//! A pending key file therefore always means "a rotation from `master.key`
//! to this key was under way", and is resolved the same way at startup and
//! before any later key operation ([`resolve_pending`]): if its slot exists
//! (after step 2) the rotation is finished (steps 3 and 4 again); if not, the
//! file is set aside as `master.key.discarded-<id>` (never deleted: a key
//! file may be the only copy of a key), since `master.key`'s slot was never
//! touched. A slot of purpose `recovery` that the coordinator was running
//! on (a recovery key copied into `master.key` after a disaster) is kept by
//! a rotation: it is still in the operators' safe.
//!
//! One process at a time: every process that opens the repository with the
//! key file ([`open_repository`]: `cairn serve`, `rebuild-catalog`) holds an
//! exclusive lock on `master.key.lock` until it exits, so a second one on
//! the same home cannot resolve a pending key under a running rotation.
//! One key operation at a time within it: [`MasterKeys`] holds a lock across
//! the whole operation, and a second caller is refused at once, told what
//! is in progress. The operation runs in a task of its own that owns the lock, so
//! a client that hangs up (tonic then drops the handler's future) cannot
//! stop it halfway; its audit row is written by that task too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_common::config::write_file_atomic;
use cairn_common::crypto::SecretKey;
use tokio_util::task::TaskTracker;

use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};
use crate::catalog::Catalog;
use crate::error::{CoordinatorError, Result};
use crate::repository::{KeySlot, Repository, RepositoryError, SlotPurpose, Store};

/// What the audit rows name as the target of key operations.
const AUDIT_TARGET: &str = "master key";

fn pending_path(master_key_file: &Path) -> PathBuf {
    let mut name = master_key_file.as_os_str().to_os_string();
    name.push(".new");
    PathBuf::from(name)
}

/// Reads a key file; errors name the config key that chose the file.
fn read_key(path: &Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CoordinatorError::io(
            format!("cannot read keys.master_key_file {}", path.display()),
            e,
        )
    })?;
    SecretKey::from_hex(&text).map_err(|_| {
        CoordinatorError::InvalidArgument(format!(
            "keys.master_key_file: {} must hold 64 hex digits (a key file as cairn init or cairn keys add writes it)",
            path.display()
        ))
    })
}

fn storage(error: RepositoryError) -> CoordinatorError {
    CoordinatorError::Unavailable(format!("repository: {error}"))
}

/// Renames the pending key over the master key file, durably.
fn install_pending(pending: &Path, master_key_file: &Path) -> Result<()> {
    std::fs::rename(pending, master_key_file).map_err(|e| {
        CoordinatorError::io(
            format!(
                "cannot rename {} over {} to finish the master key rotation",
                pending.display(),
                master_key_file.display()
            ),
            e,
        )
    })?;
    let directory = master_key_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    if let Ok(directory) = std::fs::File::open(directory) {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// Finishes or discards the rotation a pending key file stands for (see
/// the module doc). Returns what it did, for the log and the audit, or
/// `None` when there was no pending key. A pending file that is not a key
/// is an error, never deleted: it might be the only copy of one.
pub async fn resolve_pending(store: &Store, master_key_file: &Path) -> Result<Option<String>> {
    let pending = pending_path(master_key_file);
    if !pending.exists() {
        return Ok(None);
    }
    let new = read_key(&pending).map_err(|e| {
        CoordinatorError::Conflict(format!(
            "{e}; {} is left by an unfinished master key rotation: if master.key opens the repository, move it aside",
            pending.display()
        ))
    })?;
    match Repository::open(store.clone(), &new).await {
        Ok(repository) => {
            // Steps 3 and 4 again; both are harmless to repeat.
            if let Ok(old) = read_key(master_key_file)
                && old.key_id() != new.key_id()
                && !is_recovery_slot(&repository, &old.key_id()).await?
            {
                repository
                    .remove_slot(&old.key_id())
                    .await
                    .map_err(storage)?;
            }
            install_pending(&pending, master_key_file)?;
            Ok(Some(format!(
                "finished an interrupted master key rotation: the coordinator's key is now slot {}",
                new.key_id()
            )))
        }
        Err(RepositoryError::NoSlot { .. }) => {
            // Step 2 never happened, so master.key's slot is untouched. Set
            // aside, not deleted: a key file may be the only copy of a key.
            let discarded = discarded_path(master_key_file, &new.key_id());
            std::fs::rename(&pending, &discarded).map_err(|e| {
                CoordinatorError::io(
                    format!(
                        "cannot move {} to {}",
                        pending.display(),
                        discarded.display()
                    ),
                    e,
                )
            })?;
            Ok(Some(format!(
                "set aside an unfinished master key rotation as {}: its new key never reached the repository, the previous key stays",
                discarded.display()
            )))
        }
        // The storage cannot answer: nothing can be decided yet.
        Err(error) => Err(storage(error)),
    }
}

/// Whether slot `id` holds a recovery key: a rotation away from it keeps it.
async fn is_recovery_slot(repository: &Repository, id: &str) -> Result<bool> {
    Ok(repository
        .key_slots()
        .await
        .map_err(storage)?
        .iter()
        .any(|slot| slot.id == id && slot.purpose == SlotPurpose::Recovery))
}

/// Where a pending key that never reached the repository is set aside.
fn discarded_path(master_key_file: &Path, key_id: &str) -> PathBuf {
    PathBuf::from(format!("{}.discarded-{key_id}", master_key_file.display()))
}

/// The key files this process holds locked (`master.key.lock`), until it
/// exits.
static KEY_FILE_LOCKS: std::sync::Mutex<Vec<(PathBuf, std::fs::File)>> =
    std::sync::Mutex::new(Vec::new());

/// Locks `master_key_file` against every other process (see the module
/// doc); a no-op if this process holds it already.
pub fn lock_key_file(master_key_file: &Path) -> Result<()> {
    let mut locks = KEY_FILE_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if locks.iter().any(|(path, _)| path == master_key_file) {
        return Ok(());
    }
    let lock_path = PathBuf::from(format!("{}.lock", master_key_file.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| CoordinatorError::io(format!("cannot open {}", lock_path.display()), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(CoordinatorError::Conflict(format!(
                "another cairn process (a running `cairn serve`, or `repository rebuild-catalog`) uses {}: stop it first",
                master_key_file.display()
            )));
        }
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(CoordinatorError::io(
                format!("cannot lock {}", lock_path.display()),
                error,
            ));
        }
    }
    locks.push((master_key_file.to_path_buf(), file));
    Ok(())
}

/// Opens the repository with the key in `master_key_file`, first resolving
/// an unfinished rotation, then moving a repository made before key slots
/// onto them. What it resolved is logged and audited (actor `actor`).
pub async fn open_repository(
    store: Store,
    master_key_file: &Path,
    catalog: &Catalog,
    actor: &str,
) -> Result<Repository> {
    lock_key_file(master_key_file)?;
    if let Some(resolved) = resolve_pending(&store, master_key_file).await? {
        tracing::warn!("{resolved}");
        catalog
            .append_audit(&AuditEvent::new(
                actor,
                "keys.resolve",
                AUDIT_TARGET,
                Outcome::Success,
                resolved,
            ))
            .await?;
    }
    let master = read_key(master_key_file)?;
    let repository = Repository::open(store, &master).await.map_err(storage)?;
    if repository
        .migrate_legacy_keys(&master)
        .await
        .map_err(storage)?
    {
        let detail = format!(
            "moved the repository keys from keys/repository.json into key slot {}",
            master.key_id()
        );
        tracing::info!("{detail}");
        catalog
            .append_audit(&AuditEvent::new(
                actor,
                "keys.migrate",
                AUDIT_TARGET,
                Outcome::Success,
                detail,
            ))
            .await?;
    }
    Ok(repository)
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub old_key_id: String,
    pub new_key_id: String,
    /// What became of an unfinished rotation found first.
    pub resolved: Option<String>,
}

/// A key slot and whether the coordinator's master key file holds its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedSlot {
    pub slot: KeySlot,
    pub in_use: bool,
}

/// The coordinator's handle on its master key and the repository's key
/// slots; every change goes through here, one at a time.
#[derive(Debug, Clone)]
pub struct MasterKeys {
    repository: Arc<Repository>,
    master_key_file: PathBuf,
    audit: AuditLog,
    /// Tracks the operation tasks, so shutdown waits for them.
    tasks: TaskTracker,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// What holds `lock`, for the refusal message.
    running: Arc<std::sync::Mutex<&'static str>>,
}

impl MasterKeys {
    pub fn new(
        repository: Arc<Repository>,
        master_key_file: PathBuf,
        audit: AuditLog,
        tasks: TaskTracker,
    ) -> MasterKeys {
        MasterKeys {
            repository,
            master_key_file,
            audit,
            tasks,
            lock: Arc::new(tokio::sync::Mutex::new(())),
            running: Arc::new(std::sync::Mutex::new("key operation")),
        }
    }

    /// Runs `work` in its own task holding the lock, or refuses at once if
    /// another key operation holds it. The refusal is audited as `action`.
    async fn exclusive<T, F, Fut>(
        &self,
        operation: &'static str,
        action: &'static str,
        actor: &str,
        work: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(MasterKeys) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let guard = match self.lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                let running = match self.running.lock() {
                    Ok(name) => *name,
                    Err(poisoned) => *poisoned.into_inner(),
                };
                let message = format!(
                    "a {running} is in progress: try again once it has finished (one key operation at a time)"
                );
                self.audit
                    .record(AuditEvent::new(
                        actor,
                        action,
                        AUDIT_TARGET,
                        Outcome::Refused,
                        message.clone(),
                    ))
                    .await;
                return Err(CoordinatorError::Conflict(message));
            }
        };
        match self.running.lock() {
            Ok(mut name) => *name = operation,
            Err(poisoned) => *poisoned.into_inner() = operation,
        }
        let future = work(self.clone());
        let task = self.tasks.spawn(async move {
            let result = future.await;
            drop(guard);
            result
        });
        task.await.map_err(|e| {
            CoordinatorError::Internal(format!("the {operation} stopped unexpectedly: {e}"))
        })?
    }

    /// The key id of the key in the master key file, after resolving a
    /// pending rotation. Called with the lock held.
    async fn settle(&self) -> Result<(SecretKey, Option<String>)> {
        let resolved = resolve_pending(&self.repository.store, &self.master_key_file).await?;
        let master = read_key(&self.master_key_file)?;
        Ok((master, resolved))
    }

    /// Records a key operation's outcome (the detail of a success, or the
    /// error); a success must be recorded or the call fails.
    async fn record<T>(
        &self,
        actor: &str,
        action: &'static str,
        outcome: &Result<T>,
        detail: impl FnOnce(&T) -> String,
    ) -> Result<()> {
        match outcome {
            Ok(value) => {
                self.audit
                    .record_strict(AuditEvent::new(
                        actor,
                        action,
                        AUDIT_TARGET,
                        Outcome::Success,
                        detail(value),
                    ))
                    .await
            }
            Err(error) => {
                self.audit
                    .record(AuditEvent::new(
                        actor,
                        action,
                        AUDIT_TARGET,
                        Outcome::Failed,
                        error.to_string(),
                    ))
                    .await;
                Ok(())
            }
        }
    }

    /// Replaces the coordinator's master key with a new one (see the
    /// module doc for the steps). Other slots (recovery keys) stay.
    pub async fn rotate(&self, actor: &str) -> Result<Rotation> {
        let owned_actor = actor.to_string();
        self.exclusive(
            "master key rotation",
            "keys.rotate",
            actor,
            |keys| async move {
                let rotation = keys.rotate_locked().await;
                keys.record(&owned_actor, "keys.rotate", &rotation, |r| {
                    let done = format!(
                        "slot {} -> slot {}; repository keys wrapped anew, no data rewritten",
                        r.old_key_id, r.new_key_id
                    );
                    match &r.resolved {
                        Some(resolved) => format!("{resolved}; then {done}"),
                        None => done,
                    }
                })
                .await?;
                rotation
            },
        )
        .await
    }

    async fn rotate_locked(&self) -> Result<Rotation> {
        let (old, resolved) = self.settle().await?;
        let repository = &self.repository;
        if !repository.has_slot(&old.key_id()).await.map_err(storage)? {
            return Err(CoordinatorError::Conflict(format!(
                "the key in {} (slot {}) does not open the repository: put back the key the coordinator started with",
                self.master_key_file.display(),
                old.key_id()
            )));
        }
        let new = SecretKey::generate()?;
        let pending = pending_path(&self.master_key_file);
        write_file_atomic(
            &pending,
            format!("{}\n", new.expose_hex()).as_bytes(),
            0o600,
        )?;
        repository
            .add_slot(&new, SlotPurpose::Master)
            .await
            .map_err(storage)?;
        if !is_recovery_slot(repository, &old.key_id()).await? {
            repository
                .remove_slot(&old.key_id())
                .await
                .map_err(storage)?;
        }
        install_pending(&pending, &self.master_key_file)?;
        Ok(Rotation {
            old_key_id: old.key_id(),
            new_key_id: new.key_id(),
            resolved,
        })
    }

    /// Every slot, marking the one whose key is in the master key file.
    pub async fn list(&self) -> Result<Vec<ListedSlot>> {
        let in_use = read_key(&self.master_key_file)?.key_id();
        let slots = self.repository.key_slots().await.map_err(storage)?;
        Ok(slots
            .into_iter()
            .map(|slot| ListedSlot {
                in_use: slot.id == in_use,
                slot,
            })
            .collect())
    }

    /// Adds a recovery slot for `key` (which the caller made and keeps).
    pub async fn add(&self, actor: &str, key: SecretKey) -> Result<KeySlot> {
        let owned_actor = actor.to_string();
        self.exclusive("key slot addition", "keys.add", actor, |keys| async move {
            let added = keys.add_locked(&key).await;
            let recorded = keys
                .record(&owned_actor, "keys.add", &added, |slot| {
                    format!("added recovery key slot {}", slot.id)
                })
                .await;
            if let Err(error) = recorded {
                // Not audited, so not done: the slot goes again.
                if let Ok(slot) = &added {
                    let _ = keys.repository.remove_slot(&slot.id).await;
                }
                return Err(error);
            }
            added
        })
        .await
    }

    async fn add_locked(&self, key: &SecretKey) -> Result<KeySlot> {
        self.settle().await?;
        if self
            .repository
            .has_slot(&key.key_id())
            .await
            .map_err(storage)?
        {
            return Err(CoordinatorError::Conflict(format!(
                "the repository already has slot {} for this key",
                key.key_id()
            )));
        }
        self.repository
            .add_slot(key, SlotPurpose::Recovery)
            .await
            .map_err(storage)
    }

    /// Removes slot `id`; refused for the last slot and for the slot of the
    /// key the coordinator runs on.
    pub async fn remove(&self, actor: &str, id: &str) -> Result<()> {
        let owned_actor = actor.to_string();
        let id = id.to_string();
        self.exclusive(
            "key slot removal",
            "keys.remove",
            actor,
            |keys| async move {
                let removed = keys.remove_locked(&id).await;
                keys.record(&owned_actor, "keys.remove", &removed, |()| {
                    format!("removed key slot {id}: its key no longer opens the repository")
                })
                .await?;
                removed
            },
        )
        .await
    }

    async fn remove_locked(&self, id: &str) -> Result<()> {
        let (master, _) = self.settle().await?;
        let slots = self.repository.key_slots().await.map_err(storage)?;
        if !slots.iter().any(|slot| slot.id == id) {
            return Err(CoordinatorError::NotFound(format!(
                "the repository has no key slot {id:?}: see cairn keys list"
            )));
        }
        if id == master.key_id() {
            return Err(CoordinatorError::Conflict(format!(
                "slot {id} is the coordinator's own master key ({}): rotate it with cairn keys rotate instead",
                self.master_key_file.display()
            )));
        }
        if slots.len() == 1 {
            return Err(CoordinatorError::Conflict(format!(
                "slot {id} is the last key slot: without it no key opens the repository"
            )));
        }
        // The key file must still open the repository, or removing another
        // slot could leave none that a file holds.
        if !slots.iter().any(|slot| slot.id == master.key_id()) {
            return Err(CoordinatorError::Conflict(format!(
                "the key in {} (slot {}) does not open the repository: put back the key the coordinator started with before removing a slot",
                self.master_key_file.display(),
                master.key_id()
            )));
        }
        self.repository.remove_slot(id).await.map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::LocalStore;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        key_file: PathBuf,
        catalog: Arc<Catalog>,
        keys: MasterKeys,
        repository: Arc<Repository>,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalStore::new(dir.path().join("repository")));
        let key_file = dir.path().join("master.key");
        let master = SecretKey::generate().unwrap();
        write_file_atomic(&key_file, master.expose_hex().as_bytes(), 0o600).unwrap();
        Repository::create(store.clone(), &master).await.unwrap();
        let catalog = Arc::new(
            Catalog::open_sqlite(&dir.path().join("catalog.sqlite"))
                .await
                .unwrap(),
        );
        let repository = Arc::new(
            open_repository(store.clone(), &key_file, &catalog, "test")
                .await
                .unwrap(),
        );
        let tasks = TaskTracker::new();
        let audit = AuditLog::new(catalog.clone());
        let keys = MasterKeys::new(repository.clone(), key_file.clone(), audit, tasks);
        Fixture {
            _dir: dir,
            store,
            key_file,
            catalog,
            keys,
            repository,
        }
    }

    /// The slot ids, read from the store itself.
    async fn slot_ids(store: &Store) -> Vec<String> {
        let mut ids: Vec<String> = store
            .list("keys/slots/")
            .await
            .unwrap()
            .iter()
            .map(|k| {
                k.as_str()
                    .trim_start_matches("keys/slots/")
                    .trim_end_matches(".json")
                    .to_string()
            })
            .collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn racing_rotations_leave_one_key_that_opens() {
        let f = fixture().await;
        for _ in 0..10 {
            let attempts: Vec<_> = (0..6).map(|_| f.keys.rotate("test")).collect();
            let results = futures::future::join_all(attempts).await;
            assert!(results.iter().any(|r| r.is_ok()), "{results:?}");
            for result in results.iter().filter(|r| r.is_err()) {
                let error = result.as_ref().unwrap_err().to_string();
                assert!(error.contains("rotation is in progress"), "{error}");
            }
        }
        let master = read_key(&f.key_file).unwrap();
        assert_eq!(slot_ids(&f.store).await, [master.key_id()]);
        let reopened = open_repository(f.store.clone(), &f.key_file, &f.catalog, "test")
            .await
            .unwrap();
        assert_eq!(reopened.keys(), f.repository.keys());
        assert!(!pending_path(&f.key_file).exists());
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_does_not_cut_a_rotation_short() {
        let f = fixture().await;
        let before = read_key(&f.key_file).unwrap();
        // Poll the call once (it spawns its task) and drop it, as tonic
        // does when the client disconnects.
        {
            let call = f.keys.rotate("test");
            tokio::pin!(call);
            let _ = futures::poll!(call.as_mut());
        }
        // The rotation goes on to its end; the next one waits its turn.
        let rotation = loop {
            match f.keys.rotate("test").await {
                Ok(rotation) => break rotation,
                Err(error) if error.to_string().contains("in progress") => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(error) => panic!("{error}"),
            }
        };
        assert_ne!(
            rotation.old_key_id,
            before.key_id(),
            "the first one finished"
        );
        assert!(rotation.resolved.is_none(), "{rotation:?}");
        let master = read_key(&f.key_file).unwrap();
        assert_eq!(slot_ids(&f.store).await, [master.key_id()]);
        let events = f.catalog.audit_page(None, 10).await.unwrap();
        let rotations = events
            .iter()
            .filter(|e| e.action == "keys.rotate" && e.outcome == "success")
            .count();
        assert_eq!(rotations, 2, "both audited: {events:?}");
    }

    /// A crash after each step of a rotation: the next start must open the
    /// repository, with exactly one slot, the one of the key in master.key.
    #[tokio::test]
    async fn a_crash_after_any_step_of_a_rotation_is_resolved_at_start() {
        // (steps done before the crash, whether the rotation is finished)
        let cases = [(1, false), (2, true), (3, true)];
        for (steps, finished) in cases {
            let f = fixture().await;
            let old = read_key(&f.key_file).unwrap();
            let new = SecretKey::generate().unwrap();
            let pending = pending_path(&f.key_file);
            write_file_atomic(&pending, new.expose_hex().as_bytes(), 0o600).unwrap();
            if steps >= 2 {
                f.repository
                    .add_slot(&new, SlotPurpose::Master)
                    .await
                    .unwrap();
            }
            if steps >= 3 {
                f.repository.remove_slot(&old.key_id()).await.unwrap();
            }
            let reopened = open_repository(f.store.clone(), &f.key_file, &f.catalog, "test")
                .await
                .unwrap_or_else(|e| panic!("after step {steps}: {e}"));
            assert_eq!(reopened.keys(), f.repository.keys());
            let expected = if finished { &new } else { &old };
            assert_eq!(&read_key(&f.key_file).unwrap(), expected, "step {steps}");
            assert_eq!(
                slot_ids(&f.store).await,
                [expected.key_id()],
                "step {steps}"
            );
            assert!(!pending.exists(), "step {steps}");
            let events = f.catalog.audit_page(None, 10).await.unwrap();
            let said = events.iter().find(|e| e.action == "keys.resolve").unwrap();
            let word = if finished { "finished" } else { "discarded" };
            assert!(said.detail.contains(word), "step {steps}: {}", said.detail);
        }
    }

    #[tokio::test]
    async fn a_pending_key_is_resolved_before_the_next_rotation() {
        let f = fixture().await;
        // A rotation that failed after step 2 in this process.
        let new = SecretKey::generate().unwrap();
        write_file_atomic(
            &pending_path(&f.key_file),
            new.expose_hex().as_bytes(),
            0o600,
        )
        .unwrap();
        f.repository
            .add_slot(&new, SlotPurpose::Master)
            .await
            .unwrap();
        let rotation = f.keys.rotate("test").await.unwrap();
        assert_eq!(rotation.old_key_id, new.key_id());
        assert!(
            rotation.resolved.as_deref().unwrap().contains("finished"),
            "{rotation:?}"
        );
        let master = read_key(&f.key_file).unwrap();
        assert_eq!(master.key_id(), rotation.new_key_id);
        assert_eq!(slot_ids(&f.store).await, [master.key_id()]);
    }

    #[tokio::test]
    async fn recovery_slots_survive_rotation_and_removal_has_limits() {
        let f = fixture().await;
        let recovery = SecretKey::generate().unwrap();
        let added = f.keys.add("test", recovery.clone()).await.unwrap();
        assert_eq!(added.purpose, SlotPurpose::Recovery);
        let again = f.keys.add("test", recovery.clone()).await.unwrap_err();
        assert!(again.to_string().contains("already has slot"), "{again}");
        f.keys.rotate("test").await.unwrap();
        let listed = f.keys.list().await.unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!(listed.iter().filter(|s| s.in_use).count(), 1);
        let running = listed.iter().find(|s| s.in_use).unwrap().slot.id.clone();
        // The recovery key alone opens the repository.
        let by_recovery = Repository::open(f.store.clone(), &recovery).await.unwrap();
        assert_eq!(by_recovery.keys(), f.repository.keys());

        let own = f.keys.remove("test", &running).await.unwrap_err();
        assert!(own.to_string().contains("coordinator's own"), "{own}");
        let unknown = f.keys.remove("test", "0123456789abcdef").await.unwrap_err();
        assert!(unknown.to_string().contains("no key slot"), "{unknown}");
        f.keys.remove("test", &recovery.key_id()).await.unwrap();
        assert!(Repository::open(f.store.clone(), &recovery).await.is_err());
        // The coordinator's own slot is now the last one as well.
        let last = f.keys.remove("test", &running).await.unwrap_err();
        assert!(last.to_string().contains("coordinator's own"), "{last}");
        // Even with another key in master.key, the last slot stays.
        let stranger = SecretKey::generate().unwrap();
        write_file_atomic(&f.key_file, stranger.expose_hex().as_bytes(), 0o600).unwrap();
        let last = f.keys.remove("test", &running).await.unwrap_err();
        assert!(last.to_string().contains("last key slot"), "{last}");

        let events = f.catalog.audit_page(None, 20).await.unwrap();
        let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
        for action in ["keys.add", "keys.rotate", "keys.remove"] {
            assert!(actions.contains(&action), "{actions:?}");
        }
        let details: String = events.iter().map(|e| e.detail.clone()).collect();
        assert!(!details.contains(&recovery.expose_hex()));
    }

    /// A repository made before key slots, mid-rotation as the previous
    /// code left it (keys rewrapped under master.key.new, crash before the
    /// rename): the start finishes the rotation and moves the keys into a
    /// slot, and says both.
    #[tokio::test]
    async fn a_repository_from_before_key_slots_is_resolved_and_moved_onto_them() {
        let f = fixture().await;
        let pending_key = SecretKey::generate().unwrap();
        let old = read_key(&f.key_file).unwrap();
        f.repository.remove_slot(&old.key_id()).await.unwrap();
        let legacy = crate::repository::ObjectKey::new("keys/repository.json").unwrap();
        let wrapped =
            cairn_common::crypto::WrappedKeys::wrap(&pending_key, f.repository.keys()).unwrap();
        f.store
            .put(&legacy, serde_json::to_vec(&wrapped).unwrap().into())
            .await
            .unwrap();
        write_file_atomic(
            &pending_path(&f.key_file),
            pending_key.expose_hex().as_bytes(),
            0o600,
        )
        .unwrap();

        let reopened = open_repository(f.store.clone(), &f.key_file, &f.catalog, "test")
            .await
            .unwrap();
        assert_eq!(reopened.keys(), f.repository.keys());
        assert_eq!(read_key(&f.key_file).unwrap(), pending_key);
        assert!(!f.store.exists(&legacy).await.unwrap());
        assert_eq!(slot_ids(&f.store).await, [pending_key.key_id()]);
        let events = f.catalog.audit_page(None, 10).await.unwrap();
        let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
        assert!(
            actions.contains(&"keys.resolve") && actions.contains(&"keys.migrate"),
            "{actions:?}"
        );
    }
}
