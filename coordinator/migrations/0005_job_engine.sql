-- The job engine: a job is queued, then runs as one or more attempts, and
-- ends succeeded, failed, cancelled or missed. SQLite cannot change a
-- CHECK constraint, so the table is rebuilt; `started_at` of old rows (their
-- creation) becomes `created_at`, and `started_at` now means the first
-- attempt's start.

CREATE TABLE jobs_engine (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('backup', 'restore', 'drill')),
    agent_name      TEXT NOT NULL,
    instance        TEXT NOT NULL,
    database        TEXT NOT NULL,
    status          TEXT NOT NULL
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'missed')),
    error           TEXT NOT NULL DEFAULT '',
    backup_id       TEXT NOT NULL DEFAULT '',
    created_by      TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    bytes_read      INTEGER NOT NULL DEFAULT 0,
    bytes_uploaded  INTEGER NOT NULL DEFAULT 0,
    chunks          INTEGER NOT NULL DEFAULT 0,
    target_database TEXT NOT NULL DEFAULT '',
    report          TEXT NOT NULL DEFAULT '',
    -- JSON: what the kind needs to build its command at dispatch time
    -- (a restore's options), so any coordinator can dispatch a queued job.
    spec            TEXT NOT NULL DEFAULT '{}',
    -- The current (or last) attempt: its number from 1, and its id, which
    -- every command and report of the attempt carries.
    attempt         INTEGER NOT NULL DEFAULT 0,
    attempt_id      TEXT NOT NULL DEFAULT '',
    attempt_started_at INTEGER,
    max_attempts    INTEGER NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    timeout_ms      INTEGER,
    -- A queued job not started by then ends `missed`.
    deadline_at     INTEGER,
    -- Not dispatched before (a retry's backoff, a schedule's spread slot).
    not_before      INTEGER NOT NULL DEFAULT 0,
    -- Why a queued job waits, for `jobs list`.
    wait_reason     TEXT NOT NULL DEFAULT '',
    -- The coordinator term that dispatched the current attempt.
    term            INTEGER NOT NULL DEFAULT 0,
    schedule_id     TEXT,
    fire_at         INTEGER
);

INSERT INTO jobs_engine (id, kind, agent_name, instance, database, status, error, backup_id,
                         created_by, created_at, started_at, finished_at, bytes_read,
                         bytes_uploaded, chunks, target_database, report, attempt)
SELECT id, kind, agent_name, instance, database, status, error, backup_id,
       created_by, started_at, started_at, finished_at, bytes_read,
       bytes_uploaded, chunks, target_database, report, 1
FROM jobs;

DROP TABLE jobs;
ALTER TABLE jobs_engine RENAME TO jobs;

CREATE INDEX jobs_by_creation ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_active ON jobs (status, not_before) WHERE status IN ('queued', 'running');
-- One job per schedule fire and target, however many coordinators fire it.
CREATE UNIQUE INDEX jobs_one_per_fire ON jobs (schedule_id, agent_name, instance, database, fire_at)
    WHERE schedule_id IS NOT NULL;

CREATE TABLE job_attempts (
    job_id      TEXT NOT NULL,
    number      INTEGER NOT NULL,
    attempt_id  TEXT NOT NULL UNIQUE,
    term        INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    -- 'running', 'succeeded', 'failed', 'cancelled'
    outcome     TEXT NOT NULL DEFAULT 'running',
    reason      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, number)
);

-- The coordinator term: incremented at each start; every command carries
-- it, and agents refuse commands of an older term.
CREATE TABLE coordinator_term (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL
);
INSERT INTO coordinator_term (id, term) VALUES (1, 0);
