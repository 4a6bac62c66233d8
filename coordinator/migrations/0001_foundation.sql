-- The foundation: agents and their certificates, enrollment tokens, probe
-- history and the audit log. Times are milliseconds since the Unix epoch.

CREATE TABLE agents (
    name                  TEXT PRIMARY KEY,
    enrolled_at           INTEGER NOT NULL,
    certificate_serial    TEXT NOT NULL,
    certificate_not_after INTEGER NOT NULL,
    revoked_at            INTEGER,
    hostname              TEXT NOT NULL DEFAULT '',
    version               TEXT NOT NULL DEFAULT '',
    labels                TEXT NOT NULL DEFAULT '{}',
    instances             TEXT NOT NULL DEFAULT '[]',
    permitted_operations  TEXT NOT NULL DEFAULT '[]',
    peer_address          TEXT NOT NULL DEFAULT '',
    last_seen_at          INTEGER
);

-- Every certificate the fleet CA issued, so that revocation is by serial.
CREATE TABLE certificates (
    serial     TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('agent', 'operator')),
    name       TEXT NOT NULL,
    role       TEXT,
    issued_at  INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    revoked_at INTEGER
);

-- The secret is stored only as its SHA-256.
CREATE TABLE enrollment_tokens (
    id            TEXT PRIMARY KEY,
    agent_name    TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER
);

CREATE TABLE probes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_name  TEXT NOT NULL,
    instance    TEXT NOT NULL,
    probed_at   INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    result      TEXT NOT NULL
);
CREATE INDEX probes_by_instance ON probes (agent_name, instance, id DESC);

-- Append-only and hash-chained: each row's hash covers its fields and the
-- previous row's hash. The triggers stop accidental edits through SQL; the
-- chain detects deliberate ones (`cairn audit verify`).
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
