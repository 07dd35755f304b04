-- Admission may start the run: a replica that executes a run the moment it is admitted (every API and
-- scheduled run: there is no queue between the two) admits it as RUNNING, with its PENDING and RUNNING
-- events, in the admission's one statement, instead of writing RUNNING in a second one. p_state is
-- 'PENDING' or 'RUNNING' (then p_start_time is its start). Everything else is as in 0001.

-- take_token() as in 0001, but the bucket is created only when missing: an admission takes its org's
-- token every time, and the insert attempted before each take was most of its time (in the benchmark,
-- 78 -> 23 us of function time per take).
CREATE OR REPLACE FUNCTION take_token(p_bucket text, p_per_s double precision, p_capacity double precision,
                                      p_initial double precision) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    t double precision;
    at_ timestamptz;
    now_ timestamptz;
BEGIN
    SELECT tokens, updated_at INTO t, at_ FROM token_buckets WHERE bucket = p_bucket FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO token_buckets VALUES (p_bucket, p_initial, clock_timestamp()) ON CONFLICT DO NOTHING;
        SELECT tokens, updated_at INTO t, at_ FROM token_buckets WHERE bucket = p_bucket FOR UPDATE;
    END IF;
    now_ := greatest(clock_timestamp(), at_);
    t := least(p_capacity, t + extract(epoch FROM now_ - at_) * p_per_s);
    IF t >= 1 THEN
        UPDATE token_buckets SET tokens = t - 1, updated_at = now_ WHERE bucket = p_bucket;
        RETURN 0;
    END IF;
    UPDATE token_buckets SET tokens = t, updated_at = now_ WHERE bucket = p_bucket;
    RETURN (1 - t) / p_per_s;
END $$;

-- The new admit_run() is an overload with two more arguments: 0001's stays, so the replicas of the
-- previous release keep admitting during a rolling upgrade (a later migration may drop it).

-- Admission of one run, in the caller's one transaction, serialized per org by an advisory lock:
-- request-id replay, duplicate guard, RunPipeline rate (the token stays spent when a later check
-- refuses: the rate counts calls), concurrent, daily and monthly limits, then the run row (in p_state),
-- its PENDING event (and RUNNING event) and the counters. p_now (the service's clock) decides the UTC
-- day and month.
-- Outcomes: ACCEPTED, REPLAY (run_id), ACTIVE (run_id), RATE_LIMITED (wait seconds),
-- CONCURRENT_LIMIT_EXCEEDED, DAILY_LIMIT_EXCEEDED, MONTHLY_LIMIT_EXCEEDED.
CREATE FUNCTION admit_run(
    p_run_id text, p_org text, p_request_id text, p_dedupe_key text, p_owner text, p_now timestamptz,
    p_rate_per_minute integer, p_concurrent integer, p_daily integer, p_monthly integer,
    p_pipeline_key text, p_pipeline_id text, p_trigger text, p_triggered_by text, p_parameters jsonb,
    p_steps jsonb, p_identity text, p_state text, p_start_time timestamptz,
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
                      request_id, dedupe_key, owner, create_time, start_time, steps)
        VALUES (p_run_id, p_org, p_pipeline_key, p_pipeline_id, p_state, p_trigger, p_triggered_by,
                p_parameters, p_request_id, p_dedupe_key, p_owner, p_now, p_start_time, p_steps);
    INSERT INTO run_events (run_id, org_slug, kind, to_state, at, run)
        VALUES (p_run_id, p_org, 'RUN_TRANSITION', 'PENDING', p_now, p_identity);
    IF p_state = 'RUNNING' THEN
        INSERT INTO run_events (run_id, org_slug, kind, from_state, to_state, at)
            VALUES (p_run_id, p_org, 'RUN_TRANSITION', 'PENDING', 'RUNNING', p_start_time);
    END IF;
    outcome := 'ACCEPTED';
    run_id := p_run_id;
END $$;
