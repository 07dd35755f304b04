-- The service's operational state: runs, their events (the ledger), quota counters, token buckets and
-- replica leases. Admission of a run is one call of admit_run(). Finished runs not yet `exported` are the
-- outbox of BigQuery's analytics copy (a run's row and its events go together).

CREATE TABLE replicas (
    replica_id  text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz NOT NULL
);

CREATE TABLE runs (
    run_id            text PRIMARY KEY,
    org_slug          text NOT NULL,
    pipeline_key      text NOT NULL,
    pipeline_id       text NOT NULL,
    state             text NOT NULL,
    trigger           text NOT NULL,
    triggered_by      text NOT NULL DEFAULT '',
    parameters        jsonb NOT NULL,
    request_id        text NOT NULL DEFAULT '',
    dedupe_key        text NOT NULL,
    owner             text NOT NULL,              -- the replica executing the run
    cancel_requested  boolean NOT NULL DEFAULT false,
    create_time       timestamptz NOT NULL,
    start_time        timestamptz,
    end_time          timestamptz,
    reason            text NOT NULL DEFAULT '',
    error             text NOT NULL DEFAULT '',
    steps             jsonb NOT NULL DEFAULT '[]',
    exported          boolean NOT NULL DEFAULT false -- its row and its events are in BigQuery
);
-- Idempotency (AIP-155): one run per org and request id.
CREATE UNIQUE INDEX runs_request ON runs (org_slug, request_id) WHERE request_id <> '';
-- The duplicate-run guard: one active run per org + pipeline + resolved parameters.
CREATE UNIQUE INDEX runs_active_dedupe ON runs (dedupe_key)
    WHERE state IN ('PENDING', 'RUNNING', 'CANCELLING');
CREATE INDEX runs_active_org ON runs (org_slug) WHERE state IN ('PENDING', 'RUNNING', 'CANCELLING');
CREATE INDEX runs_active_owner ON runs (owner) WHERE state IN ('PENDING', 'RUNNING', 'CANCELLING');
CREATE INDEX runs_org_newest ON runs (org_slug, create_time DESC, run_id DESC);
CREATE INDEX runs_unexported ON runs (end_time)
    WHERE NOT exported AND state NOT IN ('PENDING', 'RUNNING', 'CANCELLING');

CREATE TABLE run_events (
    event_id      bigserial PRIMARY KEY,
    run_id        text NOT NULL,
    org_slug      text NOT NULL,
    kind          text NOT NULL,                  -- RUN_TRANSITION, STEP_TRANSITION, STEP_ATTEMPT
    step_id       text,
    ps_type       text,
    attempt       integer,
    from_state    text,
    to_state      text NOT NULL,
    reason        text,
    error         text,
    error_reason  text,
    started_at    timestamptz,
    ended_at      timestamptz,
    duration_ms   bigint,
    rows_written  bigint,
    at            timestamptz NOT NULL,
    run           text                            -- on PENDING: the run's identity as JSON
);
CREATE INDEX run_events_run ON run_events (run_id, event_id);

-- Runs accepted per org and UTC period ('D2026-11-30', 'M2026-11'): a run counts where it was accepted.
CREATE TABLE quota_usage (
    org_slug  text NOT NULL,
    period    text NOT NULL,
    used      integer NOT NULL,
    PRIMARY KEY (org_slug, period)
);

CREATE TABLE token_buckets (
    bucket      text PRIMARY KEY,
    tokens      double precision NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Take one token from a bucket refilled at p_per_s up to p_capacity (created with p_initial tokens), on
-- the database's clock. Returns 0 when a token was taken, else the seconds until one will be there.
CREATE FUNCTION take_token(p_bucket text, p_per_s double precision, p_capacity double precision,
                           p_initial double precision) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    t double precision;
    at_ timestamptz;
    now_ timestamptz;
BEGIN
    INSERT INTO token_buckets VALUES (p_bucket, p_initial, clock_timestamp()) ON CONFLICT DO NOTHING;
    SELECT tokens, updated_at INTO t, at_ FROM token_buckets WHERE bucket = p_bucket FOR UPDATE;
    now_ := greatest(clock_timestamp(), at_);
    t := least(p_capacity, t + extract(epoch FROM now_ - at_) * p_per_s);
    IF t >= 1 THEN
        UPDATE token_buckets SET tokens = t - 1, updated_at = now_ WHERE bucket = p_bucket;
        RETURN 0;
    END IF;
    UPDATE token_buckets SET tokens = t, updated_at = now_ WHERE bucket = p_bucket;
    RETURN (1 - t) / p_per_s;
END $$;

-- Admission of one run, in the caller's one transaction, serialized per org by an advisory lock:
-- request-id replay, duplicate guard, RunPipeline rate (the token stays spent when a later check
-- refuses: the rate counts calls), concurrent, daily and monthly limits, then the run row, its PENDING
-- event and the counters. p_now (the service's clock) decides the UTC day and month.
-- Outcomes: ACCEPTED, REPLAY (run_id), ACTIVE (run_id), RATE_LIMITED (wait seconds),
-- CONCURRENT_LIMIT_EXCEEDED, DAILY_LIMIT_EXCEEDED, MONTHLY_LIMIT_EXCEEDED.
CREATE FUNCTION admit_run(
    p_run_id text, p_org text, p_request_id text, p_dedupe_key text, p_owner text, p_now timestamptz,
    p_rate_per_minute integer, p_concurrent integer, p_daily integer, p_monthly integer,
    p_pipeline_key text, p_pipeline_id text, p_trigger text, p_triggered_by text, p_parameters jsonb,
    p_steps jsonb, p_identity text,
    OUT outcome text, OUT run_id text, OUT wait double precision)
LANGUAGE plpgsql AS $$
DECLARE
    day_ text := 'D' || to_char(p_now AT TIME ZONE 'UTC', 'YYYY-MM-DD');
    month_ text := 'M' || to_char(p_now AT TIME ZONE 'UTC', 'YYYY-MM');
    n integer;
BEGIN
    wait := 0;
    PERFORM pg_advisory_xact_lock(hashtextextended('admit:' || p_org, 0));
    IF p_request_id <> '' THEN
        SELECT r.run_id INTO run_id FROM runs r WHERE r.org_slug = p_org AND r.request_id = p_request_id;
        IF FOUND THEN outcome := 'REPLAY'; RETURN; END IF;
    END IF;
    SELECT r.run_id INTO run_id FROM runs r
        WHERE r.dedupe_key = p_dedupe_key AND r.state IN ('PENDING', 'RUNNING', 'CANCELLING');
    IF FOUND THEN outcome := 'ACTIVE'; RETURN; END IF;
    run_id := '';
    wait := take_token('rate:' || p_org, greatest(p_rate_per_minute, 1) / 60.0,
                       greatest(p_rate_per_minute, 1), greatest(p_rate_per_minute, 1));
    IF wait > 0 THEN outcome := 'RATE_LIMITED'; RETURN; END IF;
    SELECT count(*) INTO n FROM runs r
        WHERE r.org_slug = p_org AND r.state IN ('PENDING', 'RUNNING', 'CANCELLING');
    IF n >= p_concurrent THEN outcome := 'CONCURRENT_LIMIT_EXCEEDED'; RETURN; END IF;
    SELECT coalesce(max(used), 0) INTO n FROM quota_usage WHERE org_slug = p_org AND period = day_;
    IF n >= p_daily THEN outcome := 'DAILY_LIMIT_EXCEEDED'; RETURN; END IF;
    SELECT coalesce(max(used), 0) INTO n FROM quota_usage WHERE org_slug = p_org AND period = month_;
    IF n >= p_monthly THEN outcome := 'MONTHLY_LIMIT_EXCEEDED'; RETURN; END IF;

    INSERT INTO quota_usage VALUES (p_org, day_, 1), (p_org, month_, 1)
        ON CONFLICT (org_slug, period) DO UPDATE SET used = quota_usage.used + 1;
    INSERT INTO runs (run_id, org_slug, pipeline_key, pipeline_id, state, trigger, triggered_by, parameters,
                      request_id, dedupe_key, owner, create_time, steps)
        VALUES (p_run_id, p_org, p_pipeline_key, p_pipeline_id, 'PENDING', p_trigger, p_triggered_by,
                p_parameters, p_request_id, p_dedupe_key, p_owner, p_now, p_steps);
    INSERT INTO run_events (run_id, org_slug, kind, to_state, at, run)
        VALUES (p_run_id, p_org, 'RUN_TRANSITION', 'PENDING', p_now, p_identity);
    outcome := 'ACCEPTED';
    run_id := p_run_id;
END $$;
