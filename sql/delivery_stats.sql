-- Delivery statistics per tumbling window of {window}: `delivery_stats_minute` ({window} =
-- 1 minute) and `delivery_stats_hour` ({window} = 1 hour). herald runs it over the events of one
-- hour that arrived in time (see analytics/src/stats.rs); run over all of `delivery_events`
-- (`herald sql "$(sed 's/{window}/1 hour/' sql/delivery_stats.sql)"`) it gives the same figures
-- with no event left out for lateness.
--
-- One row per window (by event time, UTC), app, template, channel, vendor, state and currency:
--   events            events in the group
--   success_rate      sent / (sent + send_failed) events of the window, app, template and channel
--                     (every vendor: send_failed events name no vendor); NULL without either
--   delivery_rate     delivered / sent events of the window, app, template, channel and vendor;
--                     NULL without sent events. Receipts count in the window of their own time,
--                     so a window that receives earlier sends' receipts can exceed 1
--   latency_p*_ms     exact percentiles (linear interpolation) of the group's latency_ms, to the
--                     microsecond: the vendor call for sent/send_failed, send to handset for
--                     receipts; NULL without latencies
--   billing_units     sum of billing_units
--   cost_micros       sum of cost_micros (in `currency`: currencies are never added together)
WITH grouped AS (
    SELECT
        date_bin(INTERVAL '{window}', ts, TIMESTAMP '1970-01-01T00:00:00Z') AS window_start,
        app,
        template_id,
        channel,
        vendor,
        state,
        currency,
        count(*) AS events,
        round(percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), 3) AS latency_p50_ms,
        round(percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms), 3) AS latency_p95_ms,
        round(percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms), 3) AS latency_p99_ms,
        sum(billing_units) AS billing_units,
        sum(cost_micros) AS cost_micros
    FROM delivery_events
    GROUP BY 1, app, template_id, channel, vendor, state, currency
),
totals AS (
    SELECT
        *,
        sum(CASE WHEN state = 'sent' THEN events ELSE 0 END)
            OVER (PARTITION BY window_start, app, template_id, channel) AS channel_sent,
        sum(CASE WHEN state IN ('sent', 'send_failed') THEN events ELSE 0 END)
            OVER (PARTITION BY window_start, app, template_id, channel) AS channel_tried,
        sum(CASE WHEN state = 'sent' THEN events ELSE 0 END)
            OVER (PARTITION BY window_start, app, template_id, channel, vendor) AS vendor_sent,
        sum(CASE WHEN state = 'delivered' THEN events ELSE 0 END)
            OVER (PARTITION BY window_start, app, template_id, channel, vendor) AS vendor_delivered
    FROM grouped
)
SELECT
    window_start,
    app,
    template_id,
    channel,
    vendor,
    state,
    currency,
    events,
    CAST(channel_sent AS DOUBLE) / nullif(channel_tried, 0) AS success_rate,
    CAST(vendor_delivered AS DOUBLE) / nullif(vendor_sent, 0) AS delivery_rate,
    latency_p50_ms,
    latency_p95_ms,
    latency_p99_ms,
    billing_units,
    cost_micros
FROM totals
ORDER BY window_start, app, template_id, channel, vendor NULLS FIRST, state, currency NULLS FIRST
