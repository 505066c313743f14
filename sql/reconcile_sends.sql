-- Vendor billing reconciliation, step 1 of 6: one row per message herald handed to the vendor
-- in the period, with its send (or failure to send) and the outcome its receipts tell.
--
-- Run by `herald reconcile` (analytics/src/reconcile/report.rs) over `delivery_events` after it
-- fills in the placeholders: the vendor, the `dt` partitions to read (the period and the three
-- days of receipts after it), the period as Unix microseconds [start_us, end_us) and the
-- currency of the vendor's prices (the cost dispatch put on `sent` events counts only in it).
WITH
-- The vendor's accounts: `send_failed` events carry the account but no vendor.
accounts AS (
  SELECT DISTINCT account_id FROM delivery_events
  WHERE vendor = '${vendor}' AND state = 'sent' AND account_id IS NOT NULL
    AND dt BETWEEN '${dt_from}' AND '${dt_to}'
),
-- The vendor's own events, and the failures on its accounts: two disjoint sets (by state), read
-- apart so that the few failures alone meet the accounts (one condition with OR made every
-- event go through that join, all of them in one partition: one account).
events AS (
  SELECT message_id, state, ts, CAST(ts AS BIGINT) AS ts_us, receiver, vendor_message_id,
         billing_units, account_id, msg_type, cost_micros, currency
  FROM delivery_events
  WHERE dt BETWEEN '${dt_from}' AND '${dt_to}'
    AND vendor = '${vendor}' AND state IN ('sent', 'delivered', 'delivery_failed')
  UNION ALL
  SELECT message_id, state, ts, CAST(ts AS BIGINT) AS ts_us, receiver, vendor_message_id,
         billing_units, account_id, msg_type, cost_micros, currency
  FROM delivery_events
  WHERE dt BETWEEN '${dt_from}' AND '${dt_to}'
    AND state = 'send_failed' AND account_id IN (SELECT account_id FROM accounts)
)
SELECT message_id,
       max(ts) FILTER (WHERE state IN ('sent', 'send_failed')) AS sent_at,
       max(ts_us) FILTER (WHERE state IN ('sent', 'send_failed')) AS ts_us,
       max(receiver) AS receiver,
       max(vendor_message_id) FILTER (WHERE state = 'sent') AS vendor_message_id,
       max(billing_units) FILTER (WHERE state = 'sent') AS units,
       max(cost_micros) FILTER (WHERE state = 'sent' AND currency = '${currency}') AS cost_micros,
       max(account_id) AS account_id,
       max(msg_type) AS msg_type,
       CASE
         WHEN bool_or(state = 'sent') IS NOT TRUE THEN 'send_failed'
         WHEN bool_or(state = 'delivery_failed') THEN 'delivery_failed'
         WHEN bool_or(state = 'delivered') THEN 'delivered'
         ELSE 'sent'
       END AS outcome
FROM events
GROUP BY message_id
HAVING max(ts_us) FILTER (WHERE state IN ('sent', 'send_failed')) >= ${start_us}
   AND max(ts_us) FILTER (WHERE state IN ('sent', 'send_failed')) < ${end_us}
