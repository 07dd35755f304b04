-- One statement per group commit: apply_batch() writes the runs' transitions queued by a replica
-- (write_runs()), then admits the runs queued meanwhile (admit_runs()), in one call and one commit.
-- The two used to be two statements, each with its own round trip and commit; most of a short run's
-- cost in PostgreSQL was those statements' fixed cost, not their rows.
--
-- Admission of a batch in one call: admit_runs() admits every row of a group commit in order, with what
-- admit_run() (0005) does per row, but with each org's counters read once and written once per batch
-- instead of once per row: its advisory lock, its token bucket, its count of active runs and its daily
-- and monthly quota rows. Many admissions of one org arrive together (a burst of API calls, a schedule
-- firing), and those per-row reads and writes were most of an admission's time (batches of 16
-- admissions of one org: 0.19 -> 0.11 ms of PostgreSQL CPU per admission). The outcomes are those of
-- admit_run() called row after row: a row sees the rows before it (their tokens, slots, quota, request
-- ids and duplicate keys). admit_run() stays for the replicas of the previous release.
--
-- The rows are taken in the order of their orgs' lock keys (then org, then their order in the batch), as
-- every batch of every replica does, so two batches never wait for each other's locks in a cycle.

-- Writes an org's counters back: the bucket's tokens and the runs it accepted in the day and month.
CREATE FUNCTION save_admission_counters(p_org text, p_day text, p_month text, p_accepted integer,
                                        p_tokens double precision, p_token_at timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE token_buckets SET tokens = p_tokens, updated_at = p_token_at WHERE bucket = 'rate:' || p_org;
    IF p_accepted > 0 THEN
        INSERT INTO quota_usage VALUES (p_org, p_day, p_accepted), (p_org, p_month, p_accepted)
            ON CONFLICT (org_slug, period) DO UPDATE SET used = quota_usage.used + excluded.used;
    END IF;
END $$;

CREATE FUNCTION admit_runs(p_owner text, p_items jsonb)
RETURNS TABLE (n integer, outcome text, run_id text, wait double precision)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    org_ text;                 -- the org whose counters are loaded (NULL: none yet)
    day_ text;
    month_ text;
    tokens_ double precision;  -- its bucket, refilled up to token_at_
    token_at_ timestamptz;
    now_ timestamptz;
    rate_ double precision;
    active_ integer;           -- its active runs
    daily_ integer;            -- its runs accepted in day_ and month_
    monthly_ integer;
    accepted_ integer := 0;    -- accepted in this batch since its counters were loaded
    accepted_rows integer[] := '{}';
BEGIN
    FOR r IN
        SELECT * FROM jsonb_to_recordset(p_items) AS x(
            n integer, run_id text, org text, request_id text, dedupe_key text, at timestamptz, rate integer,
            concurrent integer, daily integer, monthly integer, pipeline_key text, pipeline_id text,
            trigger text, triggered_by text, parameters jsonb, steps jsonb, identity text, state text,
            start_time timestamptz)
        ORDER BY hashtextextended('admit:' || x.org, 0), x.org, x.n
    LOOP
        n := r.n;
        run_id := '';
        wait := 0;
        IF org_ IS DISTINCT FROM r.org
           OR day_ <> 'D' || to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
           OR month_ <> 'M' || to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM') THEN
            IF org_ IS NOT NULL THEN
                PERFORM save_admission_counters(org_, day_, month_, accepted_, tokens_, token_at_);
            END IF;
            IF org_ IS DISTINCT FROM r.org THEN
                PERFORM pg_advisory_xact_lock(hashtextextended('admit:' || r.org, 0));
                SELECT b.tokens, b.updated_at INTO tokens_, token_at_
                    FROM token_buckets b WHERE b.bucket = 'rate:' || r.org FOR UPDATE;
                IF NOT FOUND THEN
                    INSERT INTO token_buckets VALUES ('rate:' || r.org, greatest(r.rate, 1), clock_timestamp())
                        ON CONFLICT DO NOTHING;
                    SELECT b.tokens, b.updated_at INTO tokens_, token_at_
                        FROM token_buckets b WHERE b.bucket = 'rate:' || r.org FOR UPDATE;
                END IF;
                SELECT count(*) INTO active_ FROM runs x
                    WHERE x.org_slug = r.org AND x.state IN ('PENDING', 'RUNNING', 'CANCELLING');
            END IF;
            org_ := r.org;
            day_ := 'D' || to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD');
            month_ := 'M' || to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM');
            SELECT coalesce(max(q.used) FILTER (WHERE q.period = day_), 0),
                   coalesce(max(q.used) FILTER (WHERE q.period = month_), 0)
                INTO daily_, monthly_
                FROM quota_usage q WHERE q.org_slug = r.org AND q.period IN (day_, month_);
            accepted_ := 0;
        END IF;

        IF r.request_id <> '' THEN
            SELECT x.run_id INTO run_id FROM runs x WHERE x.org_slug = r.org AND x.request_id = r.request_id;
            IF FOUND THEN outcome := 'REPLAY'; RETURN NEXT; CONTINUE; END IF;
        END IF;
        SELECT x.run_id INTO run_id FROM runs x
            WHERE x.dedupe_key = r.dedupe_key AND x.state IN ('PENDING', 'RUNNING', 'CANCELLING');
        IF FOUND THEN outcome := 'ACTIVE'; RETURN NEXT; CONTINUE; END IF;
        run_id := '';
        -- The RunPipeline rate, as take_token(): the token stays spent when a later check refuses.
        rate_ := greatest(r.rate, 1);
        now_ := greatest(clock_timestamp(), token_at_);
        tokens_ := least(rate_, tokens_ + extract(epoch FROM now_ - token_at_) * rate_ / 60.0);
        token_at_ := now_;
        IF tokens_ < 1 THEN
            outcome := 'RATE_LIMITED';
            wait := (1 - tokens_) / (rate_ / 60.0);
            RETURN NEXT;
            CONTINUE;
        END IF;
        tokens_ := tokens_ - 1;
        IF active_ >= r.concurrent THEN outcome := 'CONCURRENT_LIMIT_EXCEEDED'; RETURN NEXT; CONTINUE; END IF;
        IF daily_ >= r.daily THEN outcome := 'DAILY_LIMIT_EXCEEDED'; RETURN NEXT; CONTINUE; END IF;
        IF monthly_ >= r.monthly THEN outcome := 'MONTHLY_LIMIT_EXCEEDED'; RETURN NEXT; CONTINUE; END IF;

        INSERT INTO runs (run_id, org_slug, pipeline_key, pipeline_id, state, trigger, triggered_by,
                          parameters, request_id, dedupe_key, owner, create_time, start_time, steps)
            VALUES (r.run_id, r.org, r.pipeline_key, r.pipeline_id, r.state, r.trigger, r.triggered_by,
                    r.parameters, r.request_id, r.dedupe_key, p_owner, r.at, r.start_time, r.steps);
        active_ := active_ + 1;
        daily_ := daily_ + 1;
        monthly_ := monthly_ + 1;
        accepted_ := accepted_ + 1;
        accepted_rows := accepted_rows || r.n;
        outcome := 'ACCEPTED';
        run_id := r.run_id;
        RETURN NEXT;
    END LOOP;
    IF org_ IS NOT NULL THEN
        PERFORM save_admission_counters(org_, day_, month_, accepted_, tokens_, token_at_);
    END IF;
    -- The accepted runs' PENDING events (with their identity), and RUNNING for those admitted running.
    INSERT INTO run_events (run_id, org_slug, kind, from_state, to_state, at, run)
        SELECT x.run_id, x.org, 'RUN_TRANSITION', e.from_state, e.to_state, e.at, e.run
        FROM jsonb_to_recordset(p_items) AS x(n integer, run_id text, org text, at timestamptz,
                                             identity text, state text, start_time timestamptz)
        CROSS JOIN LATERAL (VALUES (1, NULL, 'PENDING', x.at, x.identity),
                                   (2, 'PENDING', 'RUNNING', x.start_time, NULL))
            AS e(k, from_state, to_state, at, run)
        WHERE x.n = ANY (accepted_rows) AND (e.k = 1 OR x.state = 'RUNNING')
        ORDER BY x.n, e.k;
END $$;

-- A replica's run writes: each run's state, reason, error, times and steps, and its events appended in
-- order. Only the owner's active runs change (fencing: a run closed as INTERRUPTED by another replica
-- stays closed); returns the ids of the runs written. PL/pgSQL, not SQL: PostgreSQL 16 plans a SQL
-- function's statement anew at every call, PL/pgSQL keeps its plan.
CREATE FUNCTION write_runs(p_owner text, p_writes jsonb) RETURNS SETOF text
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY WITH input AS (
        SELECT * FROM jsonb_to_recordset(p_writes) AS x(
            run_id text, state text, reason text, error text, start_time timestamptz,
            end_time timestamptz, steps jsonb, events jsonb, n integer)),
    u AS (
        UPDATE runs r SET state = i.state, reason = i.reason, error = i.error,
            start_time = i.start_time, end_time = i.end_time, steps = i.steps
        FROM input i
        WHERE r.run_id = i.run_id AND r.owner = p_owner AND r.state IN ('PENDING', 'RUNNING', 'CANCELLING')
        RETURNING r.run_id, r.org_slug, i.events, i.n),
    ev AS (
        INSERT INTO run_events (run_id, org_slug, kind, step_id, ps_type, attempt, from_state, to_state,
                                reason, error, error_reason, started_at, ended_at, duration_ms,
                                rows_written, at)
        SELECT u.run_id, u.org_slug, e.kind, e.step_id, e.ps_type, e.attempt, e.from_state, e.to_state,
               e.reason, e.error, e.error_reason, e.started_at, e.ended_at, e.duration_ms,
               e.rows_written, e.at
        FROM u, ROWS FROM (jsonb_to_recordset(u.events) AS (
                kind text, step_id text, ps_type text, attempt integer, from_state text, to_state text,
                reason text, error text, error_reason text, started_at timestamptz, ended_at timestamptz,
                duration_ms bigint, rows_written bigint, at timestamptz)) WITH ORDINALITY
            AS e(kind, step_id, ps_type, attempt, from_state, to_state, reason, error, error_reason,
                 started_at, ended_at, duration_ms, rows_written, at, k)
        ORDER BY u.n, e.k)
    SELECT u.run_id FROM u;
END $$;

-- A group commit: the writes first (a run that ended frees its slot for the admissions after it), then
-- the admissions. Rows: (NULL, 'WRITTEN', run_id, 0) per run written, then admit_runs()' rows.
CREATE FUNCTION apply_batch(p_owner text, p_writes jsonb, p_admissions jsonb)
RETURNS TABLE (n integer, outcome text, run_id text, wait double precision)
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_array_length(p_writes) > 0 THEN
        RETURN QUERY SELECT NULL::integer, 'WRITTEN'::text, w, 0::double precision
            FROM write_runs(p_owner, p_writes) AS w;
    END IF;
    IF jsonb_array_length(p_admissions) > 0 THEN
        RETURN QUERY SELECT * FROM admit_runs(p_owner, p_admissions);
    END IF;
END $$;
