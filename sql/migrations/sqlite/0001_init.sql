-- herald store, SQLite flavour. Times are unix milliseconds (INTEGER).

CREATE TABLE apps (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

-- API keys are stored as SHA-256 hashes; the key itself is shown once, at creation.
CREATE TABLE api_keys (
    key_hash    TEXT PRIMARY KEY,
    app_id      INTEGER NOT NULL REFERENCES apps(id),
    prefix      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY,
    app_id      INTEGER NOT NULL REFERENCES apps(id),
    name        TEXT NOT NULL,
    channel     TEXT NOT NULL,
    config      TEXT NOT NULL,        -- JSON, the channel's account config
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deleted_at  INTEGER
);
CREATE INDEX accounts_by_app ON accounts(app_id);

CREATE TABLE templates (
    id          INTEGER PRIMARY KEY,
    app_id      INTEGER NOT NULL REFERENCES apps(id),
    name        TEXT NOT NULL,
    channel     TEXT NOT NULL,
    msg_type    TEXT NOT NULL,
    account_id  INTEGER REFERENCES accounts(id),
    content     TEXT NOT NULL,        -- JSON, the channel's content fields with {$name} placeholders
    version     INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deleted_at  INTEGER
);
CREATE INDEX templates_by_app ON templates(app_id);

-- Idempotency-Key: the first answer is kept and returned for repeats.
CREATE TABLE idempotency (
    app_id        INTEGER NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    status        INTEGER,           -- NULL while the first request is in progress
    response      TEXT,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (app_id, key)
) WITHOUT ROWID;

-- The send ledger: one row per message that dispatch has started to send. It absorbs
-- redelivery from the bus: a message whose row says `sent` is not sent again.
CREATE TABLE send_ledger (
    message_id  TEXT PRIMARY KEY,
    state       TEXT NOT NULL,       -- sending | sent | send_failed
    attempt     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- Every delivery event, indexed by message, for the trace API. Written by the analytics sink
-- after the events are committed to the warehouse.
CREATE TABLE message_events (
    message_id  TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    ts          INTEGER NOT NULL,    -- unix microseconds
    state       TEXT NOT NULL,
    event       TEXT NOT NULL,       -- the delivery event as JSON
    PRIMARY KEY (message_id, event_id)
) WITHOUT ROWID;

-- The in-app inbox channel.
CREATE TABLE inbox (
    message_id  TEXT PRIMARY KEY,
    app         TEXT NOT NULL,       -- the app's name, as on delivery events
    receiver    TEXT NOT NULL,
    template_id INTEGER NOT NULL,
    content     TEXT NOT NULL,       -- JSON: the rendered template content
    created_at  INTEGER NOT NULL,
    read_at     INTEGER
) WITHOUT ROWID;
CREATE INDEX inbox_by_receiver ON inbox(app, receiver, created_at DESC, message_id DESC);
