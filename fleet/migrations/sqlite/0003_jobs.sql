-- Retraining jobs of the scheduler (PostgreSQL twin: migrations/postgres/0003_jobs.sql).

-- One row per job: its template and trigger, its state (queued, running, succeeded, failed,
-- cancelled), the run configuration it used (TOML text), its folder and log, and its outputs.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    template TEXT NOT NULL,
    trigger_kind TEXT NOT NULL,
    trigger_detail TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT,
    finished_ms BIGINT,
    run_config TEXT NOT NULL,
    work_dir TEXT NOT NULL,
    log_path TEXT NOT NULL,
    dataset_rows BIGINT,
    model_name TEXT,
    model_version TEXT,
    rollout_id TEXT,
    evaluation TEXT
) WITHOUT ROWID;

CREATE INDEX jobs_by_template ON jobs (template, created_ms);
CREATE INDEX jobs_by_state ON jobs (state);
