-- Vendor billing reconciliation, the HTML summary's list: the bill rows and messages that need
-- a look (every category but `matched` and `failed_not_billed`), first by day and category.
-- Run by `herald reconcile` (analytics/src/reconcile/report.rs) over `reconcile_rows` (step 5);
-- `${limit}` caps the rows listed (the summary says how many there are in all).
SELECT
  day,
  category,
  receiver,
  vendor_message_id,
  bill_line,
  herald_outcome,
  bill_status,
  herald_units,
  billed_units,
  expected_micros,
  billed_micros,
  count(*) OVER () AS total
FROM reconcile_rows
WHERE category NOT IN ('matched', 'failed_not_billed')
ORDER BY day, category, receiver, bill_line
LIMIT ${limit}
