#!/usr/bin/env python3
"""Recomputes herald's delivery statistics from its `delivery_events` Parquet files with pyarrow
(a reader herald did not write) and plain Python, and compares them with the tables
`delivery_stats_minute` and `delivery_stats_hour` that herald wrote.

Files named `*-late_hour.parquet` count in neither table and `*-late_minute.parquet` in the hour
table only (events that arrived after their window closed). Percentiles are exact with linear
interpolation (compared to 0.01 ms); rates are sent / (sent + send_failed) per window, app, template and channel, and
delivered / sent per window, app, template, channel and vendor.

Usage: check_stats.py WAREHOUSE_DIR
Prints JSON: {"minute_rows", "hour_rows", "events_counted": {"minute", "hour"}, "mismatches"}.
"""

import json
import math
import os
import sys

import pyarrow.dataset as ds
import pyarrow.parquet as pq

root = sys.argv[1]
KEY = ("window_start", "app", "template_id", "channel", "vendor", "state", "currency")


def counted_events(left_out):
    rows = []
    for dirpath, _, files in os.walk(os.path.join(root, "delivery_events")):
        for f in files:
            if f.endswith(".parquet") and not any(f.endswith(s) for s in left_out):
                rows += pq.read_table(os.path.join(dirpath, f)).to_pylist()
    return rows


def percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def total(values):
    values = [x for x in values if x is not None]
    return sum(values) if values else None


def expected(events, truncate):
    groups = {}
    for e in events:
        key = (truncate(e["ts"]),) + tuple(e[k] for k in KEY[1:])
        groups.setdefault(key, []).append(e)
    by_channel, by_vendor = {}, {}
    for (w, app, tpl, ch, vendor, state, _), g in groups.items():
        c = by_channel.setdefault((w, app, tpl, ch), {"sent": 0, "tried": 0})
        v = by_vendor.setdefault((w, app, tpl, ch, vendor), {"sent": 0, "delivered": 0})
        if state == "sent":
            c["sent"] += len(g)
            v["sent"] += len(g)
        if state in ("sent", "send_failed"):
            c["tried"] += len(g)
        if state == "delivered":
            v["delivered"] += len(g)
    out = {}
    for key, g in groups.items():
        c, v = by_channel[key[:4]], by_vendor[key[:5]]
        latencies = [e["latency_ms"] for e in g if e["latency_ms"] is not None]
        out[key] = {
            "events": len(g),
            "success_rate": c["sent"] / c["tried"] if c["tried"] else None,
            "delivery_rate": v["delivered"] / v["sent"] if v["sent"] else None,
            "latency_p50_ms": percentile(latencies, 0.5),
            "latency_p95_ms": percentile(latencies, 0.95),
            "latency_p99_ms": percentile(latencies, 0.99),
            "billing_units": total(e["billing_units"] for e in g),
            "cost_micros": total(e["cost_micros"] for e in g),
        }
    return out


def same(col, a, b):
    if a is None or b is None:
        return a is None and b is None
    if col.startswith("latency_"):
        # herald rounds percentiles to 0.001 ms, and DataFusion rounds the interpolation weight
        # down to a multiple of 1e-6 (at most 1e-6 of the gap between two latencies).
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.01)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def compare(table, events, truncate, mismatches):
    want = expected(events, truncate)
    path = os.path.join(root, table)
    rows = ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pylist()
    seen = set()
    for r in rows:
        key = tuple(r[k] for k in KEY)
        w = r["window_start"]
        if str(r["dt"]) != w.strftime("%Y-%m-%d"):
            mismatches.append(f"{table} {key}: in partition dt={r['dt']}")
        if key in seen:
            mismatches.append(f"{table} {key}: twice")
        seen.add(key)
        if key not in want:
            mismatches.append(f"{table} {key}: not in the events")
            continue
        for col, value in want[key].items():
            if not same(col, r[col], value):
                mismatches.append(f"{table} {key} {col}: {r[col]} != {value}")
    for key in want.keys() - seen:
        mismatches.append(f"{table} {key}: missing")
    return len(rows)


mismatches = []
minute_events = counted_events(("-late_minute.parquet", "-late_hour.parquet"))
hour_events = counted_events(("-late_hour.parquet",))
minute_rows = compare(
    "delivery_stats_minute",
    minute_events,
    lambda t: t.replace(second=0, microsecond=0),
    mismatches,
)
hour_rows = compare(
    "delivery_stats_hour",
    hour_events,
    lambda t: t.replace(minute=0, second=0, microsecond=0),
    mismatches,
)
print(json.dumps({
    "minute_rows": minute_rows,
    "hour_rows": hour_rows,
    "events_counted": {"minute": len(minute_events), "hour": len(hour_events)},
    "mismatches": mismatches[:20],
}))
