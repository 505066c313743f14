#!/usr/bin/env python3
"""Reads herald's warehouse with pyarrow — a Parquet reader herald did not write — and prints
the count of delivery events per state as JSON, plus the number of distinct message ids sent.

Usage: read_parquet.py WAREHOUSE_DIR
"""

import json
import sys

import pyarrow.compute as pc
import pyarrow.dataset as ds

table = ds.dataset(f"{sys.argv[1]}/delivery_events", format="parquet", partitioning="hive").to_table()
states = {}
for s in table.column("state").to_pylist():
    states[s] = states.get(s, 0) + 1
sent = table.filter(pc.equal(table.column("state"), "sent"))
print(json.dumps({
    "rows": table.num_rows,
    "states": states,
    "distinct_sent": len(set(sent.column("message_id").to_pylist())),
    "columns": table.schema.names,
}))
