-- Vendor billing reconciliation, step 2 of 6: the vendor message id and receiver keys found
-- both on the bill and among herald's sends. A key on one bill row and one message (nearly
-- all) pairs them; `repeated` marks a key with several on either side (a vendor billing one
-- message twice), which step 3 pairs one by one. Run by `herald reconcile`
-- (analytics/src/reconcile/report.rs) over `bills` (the period's `vendor_bills`) and `sends`
-- (step 1).
WITH
bill_keys AS (
  SELECT vendor_message_id, receiver, count(*) AS n, min(line) AS line
  FROM bills WHERE vendor_message_id IS NOT NULL
  GROUP BY vendor_message_id, receiver
),
send_keys AS (
  SELECT vendor_message_id, receiver, count(*) AS n, min(message_id) AS message_id
  FROM sends WHERE vendor_message_id IS NOT NULL
  GROUP BY vendor_message_id, receiver
)
SELECT b.vendor_message_id, b.receiver, b.line, s.message_id, b.n > 1 OR s.n > 1 AS repeated
FROM bill_keys b
JOIN send_keys s ON b.vendor_message_id = s.vendor_message_id AND b.receiver = s.receiver
