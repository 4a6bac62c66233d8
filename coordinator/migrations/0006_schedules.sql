-- Fleet schedules: each fire becomes one job per target (agent, instance,
-- database), unique on (schedule, target, fire time) in `jobs`, so a fire is
-- materialised once however often (or by however many coordinators) the
-- schedule is evaluated. `evaluated_until` is how far fires were looked at.

CREATE TABLE schedules (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL CHECK (kind IN ('backup', 'drill')),
    -- Exactly one of: one agent by name, or a label selector (JSON object).
    agent_name      TEXT,
    selector        TEXT NOT NULL DEFAULT '{}',
    -- JSON array of database names; empty with all_databases.
    databases       TEXT NOT NULL DEFAULT '[]',
    all_databases   INTEGER NOT NULL CHECK (all_databases IN (0, 1)),
    cron            TEXT NOT NULL,
    timezone        TEXT NOT NULL,
    spread_ms       INTEGER NOT NULL DEFAULT 0,
    on_overlap      TEXT NOT NULL CHECK (on_overlap IN ('skip', 'queue')),
    catch_up_ms     INTEGER NOT NULL DEFAULT 0,
    retries         INTEGER NOT NULL DEFAULT 0,
    timeout_ms      INTEGER,
    drill_agent     TEXT,
    paused          INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    created_by      TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    evaluated_until INTEGER NOT NULL,
    CHECK ((agent_name IS NULL) <> (selector = '{}')),
    CHECK ((kind = 'drill') = (drill_agent IS NOT NULL))
);

-- What a scheduled job protects, `agent/instance/database` of the source
-- (a drill runs on another agent): one job per (schedule, target, fire).
ALTER TABLE jobs ADD COLUMN target TEXT;
DROP INDEX jobs_one_per_fire;
CREATE UNIQUE INDEX jobs_one_per_fire ON jobs (schedule_id, target, fire_at)
    WHERE schedule_id IS NOT NULL;
CREATE INDEX jobs_by_schedule ON jobs (schedule_id, status) WHERE schedule_id IS NOT NULL;
