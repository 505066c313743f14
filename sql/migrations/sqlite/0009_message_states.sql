-- One row per message for the tracing endpoints (`GET /v1/receivers/{receiver}/messages`,
-- `GET /v1/templates/{id}/stats`): whose and what it is, when it was accepted (its earliest
-- event) and its current state, the state of its latest event in the trace's order (time, then
-- attempt, then pipeline order: state_rank is the state's place in it). Written by the analytics
-- sink in the transaction that indexes the events in message_events.
CREATE TABLE message_states (
    message_id    TEXT PRIMARY KEY,
    app           TEXT NOT NULL,     -- the app's name, as on delivery events
    receiver      TEXT NOT NULL,
    template_id   INTEGER NOT NULL,
    channel       TEXT NOT NULL,
    biz_id        TEXT,
    accepted_at   INTEGER NOT NULL,  -- unix microseconds
    state         TEXT NOT NULL,
    state_at      INTEGER NOT NULL,  -- unix microseconds
    state_attempt INTEGER NOT NULL,
    state_rank    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX message_states_by_receiver ON message_states (app, receiver, accepted_at, message_id);
CREATE INDEX message_states_by_template ON message_states (app, template_id, accepted_at);

-- The messages indexed before this table existed.
WITH ranked AS (
  SELECT message_id, event, ts, state,
         CAST(json_extract(event, '$.attempt') AS INTEGER) AS attempt,
         CASE state
           WHEN 'accepted' THEN 0 WHEN 'received' THEN 1 WHEN 'discarded' THEN 2
           WHEN 'blocked' THEN 3 WHEN 'deferred' THEN 4 WHEN 'scheduled' THEN 5
           WHEN 'dedup_content' THEN 6 WHEN 'dedup_frequency' THEN 7 WHEN 'filtered' THEN 8
           WHEN 'rate_limited' THEN 9 WHEN 'sending' THEN 10 WHEN 'sent' THEN 11
           WHEN 'send_failed' THEN 12 WHEN 'retrying' THEN 13 WHEN 'delivered' THEN 14
           WHEN 'delivery_failed' THEN 15 WHEN 'recalled' THEN 16 WHEN 'expired' THEN 17
         END AS state_rank
  FROM message_events
),
latest AS (
  SELECT *, min(ts) OVER (PARTITION BY message_id) AS first_ts,
         row_number() OVER (PARTITION BY message_id
                            ORDER BY ts DESC, attempt DESC, state_rank DESC) AS n
  FROM ranked
)
INSERT INTO message_states (message_id, app, receiver, template_id, channel, biz_id, accepted_at,
                            state, state_at, state_attempt, state_rank)
SELECT message_id, json_extract(event, '$.app'), json_extract(event, '$.receiver'),
       CAST(json_extract(event, '$.template_id') AS INTEGER), json_extract(event, '$.channel'),
       json_extract(event, '$.biz_id'), first_ts, state, ts, attempt, state_rank
FROM latest
WHERE n = 1;
