-- Retention (server/state/retention.py): the oldest exported runs and finished scheduler jobs are found
-- by index, so a prune reads what it deletes and not the whole table.
CREATE INDEX runs_exported_end ON runs (end_time) WHERE exported;
CREATE INDEX scheduled_jobs_ended ON scheduled_jobs (ended_at)
    WHERE kind = 'SCHEDULE' AND state IN ('SUCCEEDED', 'FAILED', 'CANCELLED');
