//! A backup's manifest: the ordered chunk list and what is known about the
//! dump, sealed under the repository data key with the backup id bound in,
//! stored at `manifests/<backup id>`. Written after every chunk it names is
//! durable, and before the catalog lists the backup.
//!
//! Format 2 lists each chunk's content hash beside its stored name (what a
//! restore sends the agent to check against); format 1, written while
//! agents held the keys, has names only, and still opens.

use std::collections::BTreeMap;

use bytes::Bytes;
use cairn_common::archive::TableRows;
use cairn_common::chunk::{ChunkId, ContentHash};
use cairn_common::crypto::{Domain, RepositoryKeys, open, seal};
use serde::{Deserialize, Serialize};

use crate::repository::{ObjectKey, Repository, RepositoryError};

const MANIFEST_FORMAT: &str = "cairn-manifest-v2";
/// Chunks named by the keyed hash of their plaintext, no content hashes.
const MANIFEST_FORMAT_V1: &str = "cairn-manifest-v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestChunk {
    /// The stored object's name.
    pub id: ChunkId,
    /// BLAKE3 of the plaintext; `None` only in format-1 manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<ContentHash>,
    pub plaintext_bytes: u64,
    pub sealed_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub backup_id: String,
    pub job_id: String,
    pub agent: String,
    pub instance: String,
    pub database: String,
    pub server_version: String,
    pub pg_dump_version: String,
    /// Milliseconds since the epoch.
    pub started_at: i64,
    pub finished_at: i64,
    pub dump_millis: u64,
    pub dump_bytes: u64,
    pub database_bytes: u64,
    pub row_estimates: BTreeMap<String, i64>,
    pub tags: BTreeMap<String, String>,
    /// The custom-format dump, in order.
    pub chunks: Vec<ManifestChunk>,
    /// `pg_dumpall --globals-only`, one chunk.
    pub globals: Option<ManifestChunk>,
    /// Exact rows of every table's data in the dump, in archive order;
    /// `None` when the agent could not count them (see `rows_not_counted`).
    #[serde(default)]
    pub table_rows: Option<Vec<TableRows>>,
    #[serde(default)]
    pub rows_not_counted: String,
    #[serde(default)]
    pub archive_version: String,
    /// The cluster's system identifier (`pg_control_system()`): with
    /// `database`, the backup's lineage. Empty in manifests written before
    /// agents reported it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_identifier: String,
}

impl Manifest {
    /// Every chunk in the order a restore reads them: the globals chunk
    /// first (position `None`), then the dump's (its 0-based index).
    pub fn chunks_in_order(&self) -> Vec<(Option<usize>, ManifestChunk)> {
        self.globals
            .iter()
            .map(|chunk| (None, chunk.clone()))
            .chain(
                self.chunks
                    .iter()
                    .enumerate()
                    .map(|(index, chunk)| (Some(index), chunk.clone())),
            )
            .collect()
    }

    /// The ids (hex) of every chunk the backup needs, globals included,
    /// each once, sorted: what the catalog's reference index holds.
    pub fn referenced_chunk_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .globals
            .iter()
            .chain(self.chunks.iter())
            .map(|chunk| chunk.id.to_hex())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn new_format() -> String {
        MANIFEST_FORMAT.to_string()
    }

    pub fn key(backup_id: &str) -> Result<ObjectKey, RepositoryError> {
        ObjectKey::new(format!("manifests/{backup_id}"))
    }

    pub fn seal(&self, keys: &RepositoryKeys) -> Result<Bytes, RepositoryError> {
        let json = serde_json::to_vec(self)
            .map_err(|e| RepositoryError::Invalid(format!("manifest: {e}")))?;
        Ok(Bytes::from(seal(
            &keys.data,
            Domain::Manifest,
            self.backup_id.as_bytes(),
            &json,
        )?))
    }

    pub fn open(
        keys: &RepositoryKeys,
        backup_id: &str,
        sealed: &[u8],
    ) -> Result<Manifest, RepositoryError> {
        let json = open(&keys.data, Domain::Manifest, backup_id.as_bytes(), sealed)
            .map_err(|e| RepositoryError::Invalid(format!("manifest of {backup_id}: {e}")))?;
        let manifest: Manifest = serde_json::from_slice(&json)
            .map_err(|e| RepositoryError::Invalid(format!("manifest of {backup_id}: {e}")))?;
        if manifest.backup_id != backup_id {
            return Err(RepositoryError::Invalid(format!(
                "manifest of {backup_id}: wrong backup id"
            )));
        }
        let hashed = manifest
            .globals
            .iter()
            .chain(&manifest.chunks)
            .all(|chunk| chunk.hash.is_some());
        match manifest.format.as_str() {
            MANIFEST_FORMAT if hashed => Ok(manifest),
            MANIFEST_FORMAT => Err(RepositoryError::Invalid(format!(
                "manifest of {backup_id}: a chunk without its content hash"
            ))),
            MANIFEST_FORMAT_V1 => Ok(manifest),
            other => Err(RepositoryError::Invalid(format!(
                "manifest of {backup_id}: unknown format {other:?}"
            ))),
        }
    }

    /// Writes the manifest durably (whole or not at all).
    pub async fn store(&self, repository: &Repository) -> Result<(), RepositoryError> {
        let sealed = self.seal(repository.keys())?;
        repository
            .store
            .put(&Manifest::key(&self.backup_id)?, sealed)
            .await
    }

    pub async fn load(
        repository: &Repository,
        backup_id: &str,
    ) -> Result<Manifest, RepositoryError> {
        let sealed = repository.store.get(&Manifest::key(backup_id)?).await?;
        Manifest::open(repository.keys(), backup_id, &sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: Manifest::new_format(),
            backup_id: "bk-1".into(),
            job_id: "job-1".into(),
            agent: "db1".into(),
            instance: "main".into(),
            database: "shop".into(),
            server_version: "15".into(),
            pg_dump_version: "15".into(),
            started_at: 1,
            finished_at: 2,
            dump_millis: 1,
            dump_bytes: 3,
            database_bytes: 4,
            row_estimates: BTreeMap::from([("public.t".into(), 10)]),
            tags: BTreeMap::new(),
            chunks: vec![],
            globals: None,
            table_rows: Some(vec![TableRows {
                schema: "public".into(),
                table: "t".into(),
                rows: 10,
            }]),
            rows_not_counted: String::new(),
            archive_version: "1.14.0".into(),
            system_identifier: "7345678901234567890".into(),
        }
    }

    #[test]
    fn sealed_manifests_open_only_under_their_backup_id() {
        let keys = RepositoryKeys::generate().unwrap();
        let sealed = manifest().seal(&keys).unwrap();
        assert_eq!(Manifest::open(&keys, "bk-1", &sealed).unwrap(), manifest());
        assert!(Manifest::open(&keys, "bk-2", &sealed).is_err());
        let mut altered = sealed.to_vec();
        altered[20] ^= 1;
        assert!(Manifest::open(&keys, "bk-1", &altered).is_err());
    }
}
