-- DuckDB's equivalent of `herald reconcile`'s matching and daily report, the baseline of the
-- reconcile figure of `herald bench` (run over the same `delivery_events` files and the
-- `vendor_bills` files herald imported): the vendor's sends in the period, grouped by message
-- as `reconcile_sends.sql` groups them, joined one to one with the bill by vendor message id
-- and receiver, categorised as `reconcile_rows.sql` does and counted per day. It leaves out
-- what the bench's data never needs (pairing by receiver and time where one side has no vendor
-- message id, keys repeated on either side, prices), so it does less work than herald.
WITH
accounts AS (
  SELECT DISTINCT account_id FROM delivery_events
  WHERE vendor = '${vendor}' AND state = 'sent' AND account_id IS NOT NULL
    AND dt BETWEEN '${dt_from}' AND '${dt_to}'
),
events AS (
  SELECT message_id, state, epoch_us(ts) AS ts_us, receiver, vendor_message_id, billing_units
  FROM delivery_events
  WHERE dt BETWEEN '${dt_from}' AND '${dt_to}'
    AND ((vendor = '${vendor}' AND state IN ('sent', 'delivered', 'delivery_failed'))
         OR (state = 'send_failed' AND account_id IN (SELECT account_id FROM accounts)))
),
sends AS (
  SELECT message_id,
         max(ts_us) FILTER (WHERE state IN ('sent', 'send_failed')) AS ts_us,
         max(receiver) AS receiver,
         max(vendor_message_id) FILTER (WHERE state = 'sent') AS vendor_message_id,
         max(billing_units) FILTER (WHERE state = 'sent') AS units,
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
),
joined AS (
  SELECT b.line, epoch_us(b.ts) AS billed_us, b.billing_units AS billed_units, b.status,
         s.message_id, s.ts_us AS sent_us, s.units AS herald_units, s.outcome
  FROM bills b
  FULL OUTER JOIN sends s
    ON b.vendor_message_id = s.vendor_message_id AND b.receiver = s.receiver
),
categorised AS (
  SELECT *,
         CASE
           WHEN message_id IS NULL THEN 'billed_not_sent'
           WHEN line IS NULL AND outcome IN ('send_failed', 'delivery_failed')
             THEN 'failed_not_billed'
           WHEN line IS NULL THEN 'sent_not_billed'
           WHEN billed_units > 0
                AND (outcome IN ('send_failed', 'delivery_failed') OR status = 'failed')
             THEN 'billed_though_failed'
           WHEN billed_units <> coalesce(herald_units, 0) THEN 'unit_mismatch'
           ELSE 'matched'
         END AS category
  FROM joined
)
SELECT
  CAST(make_timestamp(coalesce(sent_us, billed_us) + ${offset_us}) AS DATE) AS day,
  count(message_id) AS herald_sends,
  count(line) AS bill_rows,
  count(*) FILTER (WHERE category = 'matched') AS matched,
  count(*) FILTER (WHERE category = 'billed_not_sent') AS billed_not_sent,
  count(*) FILTER (WHERE category = 'sent_not_billed') AS sent_not_billed,
  count(*) FILTER (WHERE category = 'billed_though_failed') AS billed_though_failed,
  count(*) FILTER (WHERE category = 'unit_mismatch') AS unit_mismatch,
  count(*) FILTER (WHERE category = 'failed_not_billed') AS failed_not_billed,
  coalesce(sum(herald_units), 0) AS herald_units,
  coalesce(sum(billed_units), 0) AS billed_units
FROM categorised
GROUP BY day
ORDER BY day
