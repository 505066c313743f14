-- The hourly aggregate of `herald bench --only aggregate`: per hour, app, template, channel,
-- vendor and state, the events, their latency (mean and exact 95th percentile) and what they
-- were billed. Written in SQL that DataFusion (herald's `sql` path) and DuckDB both run as it
-- is, over `delivery_events` with its `dt` and `hour` partition columns as text.
SELECT dt, hour, app, template_id, channel, vendor, state,
       count(*) AS events,
       avg(latency_ms) AS avg_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency_ms,
       sum(billing_units) AS billing_units,
       sum(cost_micros) AS cost_micros
FROM delivery_events
GROUP BY dt, hour, app, template_id, channel, vendor, state
ORDER BY dt, hour, app, template_id, channel, vendor, state
