-- Vendor billing reconciliation, step 6 of 6: per day, the count of each category, the
-- billing units and the money (millionths of the currency). Run by `herald reconcile` over
-- `reconcile_rows` (step 5); the report adds the totals.
SELECT
  day,
  count(message_id) AS herald_sends,
  count(bill_line) AS bill_rows,
  count(*) FILTER (WHERE category = 'matched') AS matched,
  count(*) FILTER (WHERE matched_by = 'receiver_time') AS paired_by_receiver_time,
  count(*) FILTER (WHERE category = 'billed_not_sent') AS billed_not_sent,
  count(*) FILTER (WHERE category = 'sent_not_billed') AS sent_not_billed,
  count(*) FILTER (WHERE category = 'billed_though_failed') AS billed_though_failed,
  count(*) FILTER (WHERE category = 'unit_mismatch') AS unit_mismatch,
  count(*) FILTER (WHERE category = 'failed_not_billed') AS failed_not_billed,
  coalesce(sum(herald_units), 0) AS herald_units,
  coalesce(sum(billed_units), 0) AS billed_units,
  coalesce(sum(expected_micros), 0) AS expected_micros,
  coalesce(sum(billed_micros), 0) AS billed_micros,
  coalesce(sum(billed_micros), 0) - coalesce(sum(expected_micros), 0) AS difference_micros,
  count(*) FILTER (
    WHERE (herald_outcome IN ('sent', 'delivered') AND herald_units IS NOT NULL
           AND expected_micros IS NULL)
       OR (bill_line IS NOT NULL AND billed_micros IS NULL)
  ) AS unpriced
FROM reconcile_rows
GROUP BY day
ORDER BY day
