-- Per day (UTC), channel and vendor account: sends, receipts, latency and spend — the figures
-- to compare vendors by and to take to a vendor's account manager.
--   herald sql --file sql/reports/vendor_accounts.sql
--   sent            messages the account took (`sent` events)
--   failed          calls the account refused for good (`send_failed` events naming it)
--   delivered       receipts saying the handset or mailbox got it
--   delivery_rate   delivered / sent
--   latency_*_ms    exact percentiles of the account's call latency for sent messages
--   billing_units, cost_micros: sums over `sent` events, per currency
SELECT
    dt,
    channel,
    account_id,
    max(vendor) AS vendor,
    currency,
    count(CASE WHEN state = 'sent' THEN 1 END) AS sent,
    count(CASE WHEN state = 'send_failed' THEN 1 END) AS failed,
    count(CASE WHEN state = 'delivered' THEN 1 END) AS delivered,
    round(
        CAST(count(CASE WHEN state = 'delivered' THEN 1 END) AS DOUBLE)
        / nullif(count(CASE WHEN state = 'sent' THEN 1 END), 0),
        4
    ) AS delivery_rate,
    round(percentile_cont(0.5) WITHIN GROUP (ORDER BY CASE WHEN state = 'sent' THEN latency_ms END), 1)
        AS latency_p50_ms,
    round(percentile_cont(0.95) WITHIN GROUP (ORDER BY CASE WHEN state = 'sent' THEN latency_ms END), 1)
        AS latency_p95_ms,
    sum(CASE WHEN state = 'sent' THEN billing_units END) AS billing_units,
    sum(CASE WHEN state = 'sent' THEN cost_micros END) AS cost_micros
FROM delivery_events
WHERE account_id IS NOT NULL
GROUP BY dt, channel, account_id, currency
ORDER BY dt, channel, account_id, currency;
