"""The scheduler: effective schedules, the minute tick, backfills and the job worker."""
