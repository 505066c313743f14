-- Vendor billing reconciliation, step 5 of 6: one row per bill row and per message herald
-- handed to the vendor in the period, with the category it falls in (exactly one each).
--
-- Run by `herald reconcile` (analytics/src/reconcile/report.rs) over `bills` (the period's
-- `vendor_bills`), `sends` (step 1) and `pairs` (step 4), after it fills in the bill's UTC
-- offset in microseconds and the price expressions built from the price table (`prices`).
WITH
bills_in AS (
  SELECT line, vendor_message_id, receiver, ts AS billed_at, CAST(ts AS BIGINT) AS ts_us,
         billing_units AS units, amount_micros, status
  FROM bills
),
joined AS (
  SELECT b.line AS bill_line, b.vendor_message_id AS bill_vendor_message_id,
         b.receiver AS bill_receiver, b.billed_at, b.ts_us AS billed_us,
         b.units AS billed_units, b.amount_micros, b.status AS bill_status,
         p.matched_by,
         s.message_id, s.vendor_message_id AS sent_vendor_message_id,
         s.receiver AS sent_receiver, s.sent_at, s.ts_us AS sent_us, s.units AS herald_units,
         s.account_id, s.msg_type, s.outcome, s.cost_micros AS sent_cost_micros
  FROM bills_in b
  LEFT JOIN pairs p ON p.line = b.line
  FULL OUTER JOIN sends s ON s.message_id = p.message_id
),
categorised AS (
  SELECT *,
         CASE
           WHEN message_id IS NULL THEN 'billed_not_sent'
           WHEN bill_line IS NULL AND outcome IN ('send_failed', 'delivery_failed')
             THEN 'failed_not_billed'
           WHEN bill_line IS NULL THEN 'sent_not_billed'
           WHEN billed_units > 0
                AND (outcome IN ('send_failed', 'delivery_failed') OR bill_status = 'failed')
             THEN 'billed_though_failed'
           WHEN billed_units <> coalesce(herald_units, 0) THEN 'unit_mismatch'
           ELSE 'matched'
         END AS category
  FROM joined
)
SELECT
  -- A date cast to text is YYYY-MM-DD, and much cheaper than to_char.
  CAST(CAST(to_timestamp_micros(coalesce(sent_us, billed_us) + ${offset_us}) AS DATE) AS VARCHAR)
    AS day,
  category,
  matched_by,
  message_id,
  bill_line,
  coalesce(sent_vendor_message_id, bill_vendor_message_id) AS vendor_message_id,
  coalesce(sent_receiver, bill_receiver) AS receiver,
  account_id,
  msg_type,
  sent_at,
  billed_at,
  outcome AS herald_outcome,
  bill_status,
  herald_units,
  billed_units,
  -- Herald expects to pay for what it sent and the vendor did not report failed: the cost
  -- dispatch put on the `sent` event (the price when it was sent), else its units times the
  -- price now.
  CASE WHEN outcome IN ('sent', 'delivered')
       THEN coalesce(sent_cost_micros, herald_units * (${expected_price})) END
    AS expected_micros,
  CASE WHEN bill_line IS NOT NULL THEN coalesce(amount_micros, billed_units * (${billed_price})) END
    AS billed_micros
FROM categorised
