-- Pipeline policies (issue #5): per-app policy documents, receiver lists, durable schedules and
-- the counters behind content dedup and frequency caps. Times are unix milliseconds.

-- One JSON policy document per app (see herald_core::policy::AppPolicy), replaced as a whole.
CREATE TABLE app_policies (
    app_id      BIGINT PRIMARY KEY REFERENCES apps(id),
    policy      TEXT NOT NULL,
    version     BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- Receivers blocked, allowed or unsubscribed, per app and channel.
CREATE TABLE receiver_lists (
    app_id      BIGINT NOT NULL REFERENCES apps(id),
    channel     TEXT NOT NULL,
    list        TEXT NOT NULL,       -- block | allow | unsubscribed
    receiver    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (app_id, channel, list, receiver)
);
CREATE INDEX receiver_lists_by_receiver ON receiver_lists (app_id, receiver);

-- Messages waiting for their time: a future `send_at`, or a quiet-hours deferral. A dispatch
-- worker claims due rows for a lease, publishes them to herald.requests, then deletes them.
CREATE TABLE schedule (
    message_id     TEXT PRIMARY KEY,
    app            TEXT NOT NULL,
    due_at         BIGINT NOT NULL,
    kind           TEXT NOT NULL,    -- scheduled | deferred
    record         TEXT NOT NULL,    -- the message record (JSON) to publish when due
    claimed_until  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX schedule_by_due ON schedule (due_at);

-- Content dedup: one row per (app, template, receiver, rendered content) while its window lasts.
CREATE TABLE content_dedup (
    key         BIGINT PRIMARY KEY,   -- 64 bits of the SHA-256 of (app, template, receiver, content)
    message_id  TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);

-- Frequency caps: messages counted per scope (app, receiver, channel, msg type, cap) and window.
CREATE TABLE frequency_counts (
    scope         BIGINT NOT NULL,   -- 64 bits of the SHA-256 of (app, receiver, cap)
    window_start  BIGINT NOT NULL,
    count         BIGINT NOT NULL,
    cap           BIGINT NOT NULL,      -- the cap's max when last counted
    expires_at    BIGINT NOT NULL,
    PRIMARY KEY (scope, window_start)
);

-- Messages that failed for good (`send_failed`), with their record, for POST /v1/messages/redrive.
CREATE TABLE failed_messages (
    message_id   TEXT PRIMARY KEY,
    app          TEXT NOT NULL,
    template_id  BIGINT NOT NULL,
    failed_at    BIGINT NOT NULL,
    record       TEXT NOT NULL
);
CREATE INDEX failed_messages_by_template ON failed_messages (app, template_id, failed_at);

-- When a message was sent or failed for good (unix microseconds, the time of its event), so
-- that events re-emitted for a redelivered message carry the original time.
ALTER TABLE send_ledger ADD COLUMN done_at BIGINT;
