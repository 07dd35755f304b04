-- Notifications: each org's settings, the cooldown per org x pipeline x event (one row, claimed by one
-- statement, so replicas never both send), and the log of what was sent, failed or suppressed.

CREATE TABLE notification_settings (
    org_slug          text PRIMARY KEY,
    recipients        text[] NOT NULL DEFAULT '{}',
    events            text[] NOT NULL,
    cooldown_seconds  integer NOT NULL,
    pipelines         jsonb NOT NULL DEFAULT '{}',  -- pipeline key -> {muted, recipients, events}
    slack_webhook     text NOT NULL DEFAULT '',     -- the webhook credential's reference (never the URL)
    updated_by        text NOT NULL DEFAULT '',
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE notification_cooldowns (
    org_slug      text NOT NULL,
    pipeline_key  text NOT NULL,
    event         text NOT NULL,
    sent_at       timestamptz NOT NULL,
    PRIMARY KEY (org_slug, pipeline_key, event)
);

CREATE TABLE notification_log (
    id            bigserial PRIMARY KEY,
    org_slug      text NOT NULL,
    pipeline_key  text NOT NULL,
    event         text NOT NULL,
    channel       text NOT NULL,                 -- EMAIL, SLACK, or '' when suppressed before a channel
    run_id        text NOT NULL DEFAULT '',
    outcome       text NOT NULL,                 -- SENT, FAILED, SUPPRESSED
    reason        text NOT NULL DEFAULT '',
    attempts      integer NOT NULL DEFAULT 0,
    at            timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX notification_log_org ON notification_log (org_slug, id DESC);
