-- Vendor billing reconciliation, step 4 of 6: every pair of a bill row (`line`) and a message,
-- each row and message in at most one pair. Run by `herald reconcile` over `bills`, `sends`
-- (step 1) and `by_id` (step 3), with the match window in microseconds filled in.
WITH
bills_in AS (
  SELECT line, vendor_message_id, receiver, CAST(ts AS BIGINT) AS ts_us FROM bills
),
-- The rest, where one side has no vendor message id (a bill without the id column, a send
-- herald saw fail): same receiver, within the window; a pair is kept when each is the other's
-- nearest.
bills_left AS (
  SELECT * FROM bills_in b WHERE NOT EXISTS (SELECT 1 FROM by_id i WHERE i.line = b.line)
),
sends_left AS (
  SELECT message_id, receiver, vendor_message_id, ts_us FROM sends s
  WHERE NOT EXISTS (SELECT 1 FROM by_id i WHERE i.message_id = s.message_id)
),
candidates AS (
  SELECT b.line, s.message_id, abs(b.ts_us - s.ts_us) AS gap
  FROM bills_left b
  JOIN sends_left s ON b.receiver = s.receiver
  WHERE (b.vendor_message_id IS NULL OR s.vendor_message_id IS NULL)
    AND abs(b.ts_us - s.ts_us) <= ${window_us}
),
nearest AS (
  SELECT line, message_id,
         row_number() OVER (PARTITION BY line ORDER BY gap, message_id) AS for_bill,
         row_number() OVER (PARTITION BY message_id ORDER BY gap, line) AS for_send
  FROM candidates
)
SELECT line, message_id, 'vendor_message_id' AS matched_by FROM by_id
UNION ALL
SELECT line, message_id, 'receiver_time' AS matched_by FROM nearest
WHERE for_bill = 1 AND for_send = 1
