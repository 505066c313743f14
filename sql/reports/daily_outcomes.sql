-- Per day (UTC), app and channel: how many messages ended in each final state, and the share
-- sent of those herald tried to send. One row per day, app and channel.
--   herald sql --file sql/reports/daily_outcomes.sql
-- Each message counts once per final state it reached (a message retried and then sent counts
-- once as sent). `stopped`: a policy or the app ended it before a vendor call (discarded,
-- blocked, deduplicated, rejected for sensitive words, expired) or recalled it; `accepted`,
-- `sending`, `retrying`, `rate_limited`, `deferred` and masked words are steps, not outcomes.
SELECT
    dt,
    app,
    channel,
    count(DISTINCT CASE WHEN state = 'sent' THEN message_id END) AS sent,
    count(DISTINCT CASE WHEN state = 'send_failed' THEN message_id END) AS send_failed,
    count(DISTINCT CASE WHEN state = 'delivered' THEN message_id END) AS delivered,
    count(DISTINCT CASE WHEN state = 'delivery_failed' THEN message_id END) AS delivery_failed,
    count(DISTINCT CASE WHEN state IN ('discarded', 'blocked', 'dedup_content', 'dedup_frequency',
        'expired', 'recalled') OR (state = 'filtered' AND error_code <> 'masked')
        THEN message_id END) AS stopped,
    round(
        CAST(count(DISTINCT CASE WHEN state = 'sent' THEN message_id END) AS DOUBLE)
        / nullif(count(DISTINCT CASE WHEN state IN ('sent', 'send_failed') THEN message_id END), 0),
        4
    ) AS success_rate
FROM delivery_events
GROUP BY dt, app, channel
ORDER BY dt, app, channel;
