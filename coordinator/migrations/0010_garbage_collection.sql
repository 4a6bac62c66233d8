-- Garbage collection of chunks no backup needs (`cairn repository gc`).
--
-- Two phases: a run condemns an unreferenced chunk (condemned_at), a later
-- run deletes it if it is still condemned and unreferenced. A dedup hit or
-- a new backup's reference clears condemned_at (and sets revived_at) in the
-- transaction that records it. A deletion marks the row first
-- (deleting_at), then deletes the object, then the row: while the row says
-- "deleting" an upload neither reuses the chunk nor trusts a copy it
-- stores, so no deletion can undo a newer put.
ALTER TABLE chunks ADD COLUMN condemned_at INTEGER;
ALTER TABLE chunks ADD COLUMN deleting_at INTEGER;
ALTER TABLE chunks ADD COLUMN revived_at INTEGER;
-- The last time an upload reused the chunk: a chunk used since the oldest
-- running upload began is never condemned.
ALTER TABLE chunks ADD COLUMN used_at INTEGER;
CREATE INDEX chunks_condemned ON chunks (condemned_at) WHERE condemned_at IS NOT NULL;

-- Which running uploads pin a chunk: looked up per chunk GC would condemn.
CREATE INDEX upload_chunks_by_chunk ON upload_chunks (chunk_id);

-- One GC at a time, across coordinators: the lease row is claimed with a
-- conditional update (free, or expired because its holder died).
CREATE TABLE gc_lease (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    holder            TEXT NOT NULL DEFAULT '',
    expires_at        INTEGER NOT NULL DEFAULT 0,
    -- When the last run started and when it finished (0: never).
    last_started_at   INTEGER NOT NULL DEFAULT 0,
    last_finished_at  INTEGER NOT NULL DEFAULT 0
);
INSERT INTO gc_lease (id) VALUES (1);

-- Chunks named by manifests the reference index does not cover (a backup
-- completing, or indexed later): GC's own scratch list, refilled each run,
-- so marking needs no set of ids in memory.
CREATE TABLE gc_pins (
    chunk_id TEXT PRIMARY KEY
) WITHOUT ROWID;
