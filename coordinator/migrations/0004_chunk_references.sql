-- Which chunks each complete backup references, so that a repository check
-- (and later garbage collection) can compare the catalog with the storage
-- listing in one sorted pass, and which backups a check found damaged.

CREATE TABLE backup_chunks (
    backup_id TEXT NOT NULL,
    chunk_id  TEXT NOT NULL,
    PRIMARY KEY (backup_id, chunk_id)
) WITHOUT ROWID;
CREATE INDEX backup_chunks_by_chunk ON backup_chunks (chunk_id, backup_id);

-- 1 once backup_chunks holds this backup's references (backups completed
-- before this migration are indexed from their manifests by the next check).
ALTER TABLE backups ADD COLUMN chunks_indexed INTEGER NOT NULL DEFAULT 0;
-- Set by `cairn repository check` when a chunk the backup needs is missing
-- or corrupt: a damaged backup is never offered as restorable.
ALTER TABLE backups ADD COLUMN damaged_at INTEGER;
ALTER TABLE backups ADD COLUMN damage TEXT NOT NULL DEFAULT '';
