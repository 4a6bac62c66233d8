-- Backups: jobs (what was asked and how it went), backups (listed only when
-- complete, i.e. once the manifest is durable), and the chunks the
-- repository holds (so the agent uploads only what is missing).

CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    agent_name     TEXT NOT NULL,
    instance       TEXT NOT NULL,
    database       TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    error          TEXT NOT NULL DEFAULT '',
    backup_id      TEXT NOT NULL DEFAULT '',
    created_by     TEXT NOT NULL,
    started_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    bytes_read     INTEGER NOT NULL DEFAULT 0,
    bytes_uploaded INTEGER NOT NULL DEFAULT 0,
    chunks         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_start ON jobs (started_at DESC);

CREATE TABLE backups (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL,
    agent_name       TEXT NOT NULL,
    instance         TEXT NOT NULL,
    database         TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed', 'cancelled')),
    server_version   TEXT NOT NULL DEFAULT '',
    pg_dump_version  TEXT NOT NULL DEFAULT '',
    started_at       INTEGER NOT NULL,
    finished_at      INTEGER,
    logical_bytes    INTEGER NOT NULL DEFAULT 0,
    new_stored_bytes INTEGER NOT NULL DEFAULT 0,
    referenced_bytes INTEGER NOT NULL DEFAULT 0,
    chunk_count      INTEGER NOT NULL DEFAULT 0,
    new_chunk_count  INTEGER NOT NULL DEFAULT 0,
    database_bytes   INTEGER NOT NULL DEFAULT 0,
    tags             TEXT NOT NULL DEFAULT '{}',
    error            TEXT NOT NULL DEFAULT ''
);
CREATE INDEX backups_by_database ON backups (agent_name, database, started_at DESC);

CREATE TABLE chunks (
    id              TEXT PRIMARY KEY,
    sealed_bytes    INTEGER NOT NULL,
    plaintext_bytes INTEGER NOT NULL,
    stored_at       INTEGER NOT NULL
);
