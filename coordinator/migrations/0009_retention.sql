-- Catalog-backed retention.
--
-- A backup's lineage is the cluster's system identifier and the database
-- name, not the host, so a promoted standby continues its primary's
-- history; empty for backups made before agents reported it (they group
-- by agent, instance and database). `protected` backups are never removed
-- by retention. `deleting_at` marks a backup retention is removing: it is
-- no longer listed nor restorable, its manifest is deleted next, then its
-- row and chunk references; a crash in between leaves the mark, and the
-- next apply (or start) finishes the deletion.
ALTER TABLE backups ADD COLUMN system_identifier TEXT NOT NULL DEFAULT '';
ALTER TABLE backups ADD COLUMN protected INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1));
ALTER TABLE backups ADD COLUMN deleting_at INTEGER;
CREATE INDEX backups_by_lineage ON backups (system_identifier, database) WHERE status = 'complete';
CREATE INDEX backups_deleting ON backups (deleting_at) WHERE deleting_at IS NOT NULL;

-- Named policies: the JSON form of `retention::Policy`.
CREATE TABLE retention_policies (
    name       TEXT PRIMARY KEY,
    policy     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- A schedule's policy (a name in retention_policies; a policy in use is
-- not deleted), and when its daily apply was last claimed: the claim is a
-- conditional update, so of several coordinators on one catalog one runs it.
ALTER TABLE schedules ADD COLUMN retention_policy TEXT;
ALTER TABLE schedules ADD COLUMN retention_applied_at INTEGER;
