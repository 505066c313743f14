-- Per day (UTC), channel and error code: why messages failed, with one example detail. The
-- first thing to read when a success-rate alert fires.
--   herald sql --file sql/reports/failure_reasons.sql
SELECT
    dt,
    channel,
    error_code,
    count(*) AS failures,
    count(DISTINCT app) AS apps,
    min(error_detail) AS example_detail
FROM delivery_events
WHERE state = 'send_failed'
GROUP BY dt, channel, error_code
ORDER BY dt, failures DESC, channel, error_code;
