-- The scheduler: per-org schedule overrides, the tick's clock, backfills and the job queue. Each
-- (org, pipeline, scheduled instant) and each backfill day is one job: `job_key` is unique, so a tick
-- delivered twice or run by several replicas inserts it once. Jobs are claimed under an advisory lock
-- (the global, per-org and per-backfill caps count RUNNING jobs) and run as runs of the replica that
-- claimed them; a job of a replica without a lease goes back to the queue.

CREATE TABLE schedule_overrides (
    org_slug      text NOT NULL,
    pipeline_key  text NOT NULL,
    cron          text NOT NULL,
    timezone      text NOT NULL,
    enabled       boolean NOT NULL,
    parameters    jsonb NOT NULL DEFAULT '{}',
    updated_by    text NOT NULL DEFAULT '',
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (org_slug, pipeline_key)
);

-- One row: the instant up to which schedules were looked at (the next tick looks after it).
CREATE TABLE scheduler_clock (
    id         integer PRIMARY KEY CHECK (id = 1),
    last_tick  timestamptz NOT NULL
);

CREATE TABLE backfills (
    backfill_id      text PRIMARY KEY,
    org_slug         text NOT NULL,
    pipeline_key     text NOT NULL,
    start_date       date NOT NULL,
    end_date         date NOT NULL,
    max_concurrency  integer NOT NULL,
    cancelled        boolean NOT NULL DEFAULT false,
    created_by       text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (org_slug, pipeline_key, start_date, end_date)
);

CREATE TABLE scheduled_jobs (
    job_id         bigserial PRIMARY KEY,
    job_key        text NOT NULL UNIQUE,        -- S|org|pipeline|instant, or B|org|pipeline|day
    kind           text NOT NULL,               -- SCHEDULE, BACKFILL
    org_slug       text NOT NULL,
    pipeline_key   text NOT NULL,
    scheduled_for  timestamptz NOT NULL,        -- the schedule's instant; a backfill day's midnight (UTC)
    backfill_id    text,
    parameters     jsonb NOT NULL DEFAULT '{}',
    state          text NOT NULL DEFAULT 'QUEUED',  -- QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED
    attempts       integer NOT NULL DEFAULT 0,  -- runs started
    max_attempts   integer NOT NULL,
    deferrals      integer NOT NULL DEFAULT 0,  -- times a quota or a cap put it back
    run_after      timestamptz NOT NULL,
    run_id         text NOT NULL DEFAULT '',    -- the current (last) attempt's run
    owner          text NOT NULL DEFAULT '',    -- the replica running it
    reason         text NOT NULL DEFAULT '',
    error          text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at     timestamptz,
    ended_at       timestamptz
);
CREATE INDEX scheduled_jobs_due ON scheduled_jobs (run_after, job_id) WHERE state = 'QUEUED';
CREATE INDEX scheduled_jobs_running ON scheduled_jobs (owner) WHERE state = 'RUNNING';
CREATE INDEX scheduled_jobs_latest ON scheduled_jobs (org_slug, pipeline_key, scheduled_for DESC);
CREATE INDEX scheduled_jobs_backfill ON scheduled_jobs (backfill_id) WHERE backfill_id IS NOT NULL;
