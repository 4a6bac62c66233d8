-- Jobs outlive connections. A running job whose agent's stream ended (or
-- that was running when the coordinator stopped) is `detached` until its
-- agent re-registers holding the attempt, and fails after
-- `jobs.reattach_timeout`. An attempt's upload records the dump's chunks
-- in order as they become durable, so a broken upload resumes where it
-- stopped; the rows go when the attempt ends.

ALTER TABLE jobs ADD COLUMN detached_at INTEGER;
-- An operator cancelled the running job: however its attempt ends (short
-- of success), it ends `cancelled`, never retried.
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;

CREATE TABLE upload_chunks (
    attempt_id      TEXT NOT NULL,
    position        INTEGER NOT NULL,
    chunk_id        TEXT NOT NULL,
    hash            TEXT NOT NULL,
    plaintext_bytes INTEGER NOT NULL,
    sealed_bytes    INTEGER NOT NULL,
    -- Sealed bytes this attempt stored new (0: the chunk was there).
    new_bytes       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (attempt_id, position)
);

CREATE INDEX jobs_by_attempt ON jobs (attempt_id) WHERE status = 'running';
