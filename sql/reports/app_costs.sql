-- Per month, app and currency: what each business team's messages cost (from the price table,
-- `[[prices]]`), for charging back. Currencies are never added together.
--   herald sql --file sql/reports/app_costs.sql
SELECT
    substr(dt, 1, 7) AS month,
    app,
    currency,
    count(*) AS sent,
    sum(billing_units) AS billing_units,
    sum(cost_micros) AS cost_micros,
    round(CAST(sum(cost_micros) AS DOUBLE) / 1000000, 4) AS cost
FROM delivery_events
WHERE state = 'sent'
GROUP BY substr(dt, 1, 7), app, currency
ORDER BY month, app, currency;
