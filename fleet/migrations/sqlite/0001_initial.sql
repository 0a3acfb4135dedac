-- Devices, raw telemetry events (one row per query, primary key = the event's UUIDv7), and hourly
-- roll-ups that outlive the raw events.

CREATE TABLE devices (
    id TEXT PRIMARY KEY NOT NULL,
    device_group TEXT,
    model_version TEXT,
    model_at_ms BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'unknown',
    status_at_ms BIGINT,
    first_seen_ms BIGINT,
    last_seen_ms BIGINT
);

CREATE TABLE events (
    id TEXT PRIMARY KEY NOT NULL,
    device_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    route TEXT NOT NULL,
    help_requested BOOLEAN NOT NULL,
    help_probability DOUBLE PRECISION,
    local_prompt_tokens BIGINT NOT NULL,
    local_completion_tokens BIGINT NOT NULL,
    local_latency_ms BIGINT NOT NULL,
    local_latency_q BIGINT NOT NULL,
    cloud_prompt_tokens BIGINT NOT NULL,
    cloud_completion_tokens BIGINT NOT NULL,
    cloud_latency_ms BIGINT NOT NULL,
    cloud_latency_q BIGINT NOT NULL,
    transport TEXT,
    budget_cloud_share DOUBLE PRECISION NOT NULL,
    budget_calls_available BIGINT NOT NULL,
    error_class TEXT,
    prompt TEXT,
    local_answer TEXT,
    cloud_answer TEXT
) WITHOUT ROWID;

CREATE INDEX events_by_time ON events (at_ms);
CREATE INDEX events_by_device ON events (device_id, id);

CREATE TABLE rollup_hourly (
    hour_ms BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    queries BIGINT NOT NULL,
    local_n BIGINT NOT NULL,
    cloud_n BIGINT NOT NULL,
    fallback_n BIGINT NOT NULL,
    help_n BIGINT NOT NULL,
    error_n BIGINT NOT NULL,
    local_prompt_tokens BIGINT NOT NULL,
    local_completion_tokens BIGINT NOT NULL,
    cloud_prompt_tokens BIGINT NOT NULL,
    cloud_completion_tokens BIGINT NOT NULL,
    budget_share_sum DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hour_ms, device_id, model_version)
) WITHOUT ROWID;

CREATE TABLE rollup_latency_hourly (
    hour_ms BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    latency_q BIGINT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (hour_ms, device_id, model_version, kind, latency_q)
) WITHOUT ROWID;

-- Ids of rolled-up (deleted) raw events, remembered for retention.dedup_days so that a late copy of
-- one is still recognised as a duplicate.
CREATE TABLE rolled_up_events (
    id TEXT PRIMARY KEY NOT NULL,
    hour_ms BIGINT NOT NULL
) WITHOUT ROWID;

CREATE INDEX rolled_up_events_by_hour ON rolled_up_events (hour_ms);

CREATE TABLE fleet_meta (
    name TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);

CREATE TABLE gateway_budget (
    scope TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL
);
