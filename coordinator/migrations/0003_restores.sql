-- Restores and verification: a restore job names the database it restores
-- into and keeps the agent's report; every verification of a backup (a
-- check of its chunks, or a restore drill) is kept, the newest shown.

ALTER TABLE jobs ADD COLUMN target_database TEXT NOT NULL DEFAULT '';
-- JSON: the agent's restore report, once the job is done.
ALTER TABLE jobs ADD COLUMN report TEXT NOT NULL DEFAULT '';

CREATE TABLE verifications (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    backup_id TEXT NOT NULL,
    at        INTEGER NOT NULL,
    -- 'chunks' or 'restore drill on AGENT'
    method    TEXT NOT NULL,
    ok        INTEGER NOT NULL CHECK (ok IN (0, 1)),
    detail    TEXT NOT NULL DEFAULT '',
    millis    INTEGER NOT NULL DEFAULT 0,
    job_id    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX verifications_by_backup ON verifications (backup_id, at DESC, id DESC);
