-- PostgreSQL twin of migrations/sqlite/0002_registry_rollouts.sql: the same tables and columns.

-- What each device last said about itself in its status message: the version it serves and its
-- updater's report on the current assignment (received_ms is the fleet's clock).
ALTER TABLE devices ADD COLUMN reported_version TEXT;
ALTER TABLE devices ADD COLUMN update_version TEXT;
ALTER TABLE devices ADD COLUMN update_state TEXT;
ALTER TABLE devices ADD COLUMN update_detail TEXT;
ALTER TABLE devices ADD COLUMN update_received_ms BIGINT;

-- Registered bundles; their files are in the registry directory under NAME/VERSION/.
CREATE TABLE models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    files BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    registered_at_ms BIGINT NOT NULL,
    evaluation TEXT NOT NULL,
    provenance TEXT NOT NULL,
    PRIMARY KEY (name, version)
);

-- Rollouts and their recorded progress (plan = the stages and gates as JSON).
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY NOT NULL,
    model_name TEXT NOT NULL,
    version TEXT NOT NULL,
    rollback_version TEXT NOT NULL,
    plan TEXT NOT NULL,
    status TEXT NOT NULL,
    stage BIGINT NOT NULL,
    stage_started_ms BIGINT NOT NULL,
    reason TEXT,
    waiting TEXT,
    superseded_by TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE INDEX rollouts_by_status ON rollouts (status);

-- The devices each rollout gave its version, kept after a rollback so that exactly they are
-- rolled back and reported.
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    assigned_at_ms BIGINT NOT NULL,
    rolled_back_ms BIGINT,
    PRIMARY KEY (rollout_id, device_id)
);

-- Each device's current assignment: the retained ModelAssignment payload, published again at
-- every start (the embedded broker keeps retained messages in memory only).
CREATE TABLE device_assignments (
    device_id TEXT PRIMARY KEY NOT NULL,
    rollout_id TEXT,
    bundle_name TEXT NOT NULL,
    version TEXT NOT NULL,
    assigned_at_ms BIGINT NOT NULL,
    payload TEXT NOT NULL
);
