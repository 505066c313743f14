-- Scheduled campaigns (issue #5): a template sent to every row of an uploaded CSV file, once or
-- on a cron schedule. The file lives in the store (so any ingest process can run it), in pieces
-- of about 1 MiB that each end on a row boundary. Times are unix milliseconds.
CREATE TABLE campaigns (
    id              INTEGER PRIMARY KEY,
    app_id          INTEGER NOT NULL REFERENCES apps(id),
    app             TEXT NOT NULL,
    template_id     INTEGER NOT NULL,
    name            TEXT NOT NULL,
    cron            TEXT,                 -- NULL: runs once
    timezone        TEXT,                 -- of the cron schedule; NULL: the app policy's, else UTC
    columns         TEXT NOT NULL,        -- JSON array: the CSV header
    state           TEXT NOT NULL,        -- uploading | waiting | running | done | cancelled | failed
    error           TEXT,                 -- why it failed
    total_rows      INTEGER NOT NULL DEFAULT 0,
    runs            INTEGER NOT NULL DEFAULT 0,   -- runs started; the current (or last) is number `runs`
    -- The current (or last) run; processed_rows is also its checkpoint: the rows before it were
    -- published and counted in the same transaction.
    processed_rows  INTEGER NOT NULL DEFAULT 0,
    accepted        INTEGER NOT NULL DEFAULT 0,
    bad_rows        INTEGER NOT NULL DEFAULT 0,
    run_started_at  INTEGER,
    next_run_at     INTEGER,               -- when the next run starts; NULL when none will
    claimed_until   INTEGER NOT NULL DEFAULT 0,   -- the lease of the ingest process running it
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX campaigns_by_app ON campaigns (app_id, id);
CREATE INDEX campaigns_by_next_run ON campaigns (next_run_at);

-- The uploaded file without its header, in order; each piece starts at data row `first_row`
-- (from 0) on line `first_line` of the file (from 1, the header being line 1 or more).
CREATE TABLE campaign_chunks (
    campaign_id  INTEGER NOT NULL REFERENCES campaigns(id),
    seq          INTEGER NOT NULL,
    first_row    INTEGER NOT NULL,
    first_line   INTEGER NOT NULL,
    data         BLOB NOT NULL,
    PRIMARY KEY (campaign_id, seq)
);

-- Rows that were not sent (a bad receiver, a wrong number of fields, ...), the first 10,000 of
-- each run, for the last 10 runs.
CREATE TABLE campaign_bad_rows (
    campaign_id  INTEGER NOT NULL REFERENCES campaigns(id),
    run          INTEGER NOT NULL,
    line         INTEGER NOT NULL,
    receiver     TEXT NOT NULL,
    reason       TEXT NOT NULL,
    PRIMARY KEY (campaign_id, run, line)
) WITHOUT ROWID;

-- Finished runs and their counts.
CREATE TABLE campaign_runs (
    campaign_id     INTEGER NOT NULL REFERENCES campaigns(id),
    run             INTEGER NOT NULL,
    started_at      INTEGER NOT NULL,
    finished_at     INTEGER NOT NULL,
    processed_rows  INTEGER NOT NULL,
    accepted        INTEGER NOT NULL,
    bad_rows        INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, run)
) WITHOUT ROWID;
