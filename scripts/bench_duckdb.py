"""DuckDB's side of `herald bench` (the aggregate and reconcile figures).

Reads a JSON job from the file named by the first argument:
  {"setup": [SQL, ...], "query": SQL, "repeat": N}
runs the setup statements (views over the warehouse's Parquet files), then runs the query N
times, fetching every row, and prints one JSON line:
  {"seconds": [t1, ...], "cpu_seconds": [c1, ...], "rows": R, "sums": {column: total, ...}}
where `cpu_seconds` is the CPU time of this process in each run (all threads) and `sums` totals
each integer column of the result, for checking it against herald's.
Only the query is timed, inside this process, so Python's and DuckDB's start-up are excluded.
Needs DuckDB's Python package: python3 -m pip install duckdb
"""

import json
import sys
import time

import duckdb


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    con = duckdb.connect()
    for statement in job["setup"]:
        con.execute(statement)
    seconds = []
    cpu_seconds = []
    rows = []
    names = []
    for _ in range(int(job.get("repeat", 1))):
        started, cpu = time.perf_counter(), time.process_time()
        cursor = con.execute(job["query"])
        rows = cursor.fetchall()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu)
        names = [d[0] for d in cursor.description]
    sums = {}
    for i, name in enumerate(names):
        values = [row[i] for row in rows if row[i] is not None]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            sums[name] = sum(values)
    print(
        json.dumps(
            {"seconds": seconds, "cpu_seconds": cpu_seconds, "rows": len(rows), "sums": sums}
        )
    )


if __name__ == "__main__":
    main()
