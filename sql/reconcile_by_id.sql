-- Vendor billing reconciliation, step 3 of 6: pairs of a bill row (`line`) and a message with
-- the same vendor message id and receiver, each row and message in at most one pair: the one
-- of a key that is not repeated, else the k-th bill row in time with the k-th message (the
-- rest is left over). Run by `herald reconcile` over `bills`, `sends` (step 1) and `keys`
-- (step 2).
WITH
repeated_bills AS (
  SELECT b.line, b.vendor_message_id, b.receiver,
         row_number() OVER (PARTITION BY b.vendor_message_id, b.receiver ORDER BY b.ts, b.line) AS k
  FROM bills b
  JOIN keys r
    ON r.repeated AND b.vendor_message_id = r.vendor_message_id AND b.receiver = r.receiver
),
repeated_sends AS (
  SELECT s.message_id, s.vendor_message_id, s.receiver,
         row_number() OVER (PARTITION BY s.vendor_message_id, s.receiver ORDER BY s.ts_us, s.message_id) AS k
  FROM sends s
  JOIN keys r
    ON r.repeated AND s.vendor_message_id = r.vendor_message_id AND s.receiver = r.receiver
)
SELECT line, message_id FROM keys WHERE NOT repeated
UNION ALL
SELECT b.line, s.message_id
FROM repeated_bills b
JOIN repeated_sends s
  ON b.vendor_message_id = s.vendor_message_id AND b.receiver = s.receiver AND b.k = s.k
