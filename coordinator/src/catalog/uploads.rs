//! What an attempt's upload has recorded so far: the dump's chunks in
//! order, each once it is durable in the repository, so that an upload cut
//! off (a network failure, a coordinator restart) resumes where it
//! stopped. The rows go when the attempt ends.

use cairn_common::chunk::{ChunkId, ContentHash};
use sqlx::Row;

use super::Catalog;
use super::backups::i64_of;
use crate::error::{CoordinatorError, Result};
use crate::repository::manifest::ManifestChunk;

/// A recorded chunk: its manifest entry and the sealed bytes this attempt
/// stored new (0 when the repository held it).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedChunk {
    pub chunk: ManifestChunk,
    pub new_bytes: u64,
}

impl Catalog {
    /// Records the chunks at `first_position` and after for an attempt.
    pub async fn record_upload_chunks(
        &self,
        attempt_id: &str,
        first_position: u64,
        chunks: &[RecordedChunk],
    ) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (offset, recorded) in chunks.iter().enumerate() {
            let hash = recorded.chunk.hash.map(|h| h.to_hex()).unwrap_or_default();
            sqlx::query(
                "INSERT OR REPLACE INTO upload_chunks
                     (attempt_id, position, chunk_id, hash, plaintext_bytes, sealed_bytes, new_bytes)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(attempt_id)
            .bind(i64_of(first_position + offset as u64))
            .bind(recorded.chunk.id.to_hex())
            .bind(hash)
            .bind(i64_of(recorded.chunk.plaintext_bytes))
            .bind(i64_of(recorded.chunk.sealed_bytes))
            .bind(i64_of(recorded.new_bytes))
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// The chunks an attempt recorded, in order.
    pub async fn upload_chunks(&self, attempt_id: &str) -> Result<Vec<RecordedChunk>> {
        let rows = sqlx::query(
            "SELECT chunk_id, hash, plaintext_bytes, sealed_bytes, new_bytes FROM upload_chunks
             WHERE attempt_id = ? ORDER BY position",
        )
        .bind(attempt_id)
        .fetch_all(&self.pool)
        .await?;
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        rows.into_iter()
            .map(|row| {
                let id: String = row.try_get("chunk_id")?;
                let hash: String = row.try_get("hash")?;
                let bad = |e: cairn_common::Error| {
                    CoordinatorError::Internal(format!("upload_chunks of {attempt_id}: {e}"))
                };
                Ok(RecordedChunk {
                    chunk: ManifestChunk {
                        id: ChunkId::from_hex(&id).map_err(bad)?,
                        hash: Some(ContentHash::from_hex(&hash).map_err(bad)?),
                        plaintext_bytes: unsigned(row.try_get("plaintext_bytes")?),
                        sealed_bytes: unsigned(row.try_get("sealed_bytes")?),
                    },
                    new_bytes: unsigned(row.try_get("new_bytes")?),
                })
            })
            .collect()
    }

    /// Forgets what an attempt's upload recorded (a fresh start).
    pub async fn forget_upload_chunks(&self, attempt_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM upload_chunks WHERE attempt_id = ?")
            .bind(attempt_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
