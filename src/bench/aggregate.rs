//! The hourly-aggregate figure: `--aggregate-events` delivery events over a week, one Parquet
//! file per `dt=/hour=` partition as the sink writes them, and the query
//! `sql/bench_hourly_aggregate.sql` over them through herald's SQL path (what `herald sql`
//! runs) and through DuckDB, each `--query-runs` times; the best time of each counts. The
//! baseline is DuckDB's time; the ratio is DuckDB's time over herald's.

use super::Row;
use super::warehouse::{
    Scratch, cpu_seconds, duckdb, duckdb_view, event, require_duckdb, spread, t0,
};
use anyhow::bail;
use herald_analytics::Warehouse;
use std::time::Instant;

/// The query both engines run.
const SQL: &str = include_str!("../../sql/bench_hourly_aggregate.sql");
/// A week of hour partitions.
const HOURS: u64 = 7 * 24;

/// DuckDB's time and herald's, as rows of the harness's table.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    require_duckdb()?;
    let n = args.aggregate_events as u64;
    let scratch = Scratch::new("aggregate")?;
    let root = scratch.dir.join("warehouse");
    let started = Instant::now();
    let wh = Warehouse::local(&root);
    tokio::task::spawn_blocking(move || {
        super::warehouse::write_hours(&wh, n, HOURS, |i| event(i, spread(t0(), i, n, HOURS)))
    })
    .await??;
    println!(
        "aggregate: wrote {n} events in {HOURS} hour partitions in {:.1?}",
        started.elapsed()
    );

    let runs = args.query_runs.max(1);
    let (mut herald, mut herald_cpu) = (f64::INFINITY, f64::INFINITY);
    let mut herald_rows = 0;
    for _ in 0..runs {
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let batches = herald_analytics::sql::query(&root, SQL).await?;
        herald = herald.min(started.elapsed().as_secs_f64());
        herald_cpu = herald_cpu.min(cpu_seconds() - cpu);
        herald_rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    }
    let view = duckdb_view("delivery_events", &root, "delivery_events/*/*/*.parquet");
    let duck = duckdb(&scratch.dir, &[view], SQL, runs)?;
    let duck_events = duck.sums.get("events").copied().unwrap_or(0);
    if duck.rows != herald_rows || duck_events != n as i64 {
        bail!(
            "the engines disagree: herald returned {herald_rows} groups, DuckDB {} groups of \
             {duck_events} events",
            duck.rows
        );
    }
    Ok(vec![
        Row::new(
            format!(
                "DuckDB: hourly aggregate of {n} events on disk, {herald_rows} groups (baseline; \
                 CPU {:.2} s)",
                duck.cpu
            ),
            duck.best,
            "s",
            1.0,
            None,
        ),
        Row::new(
            format!(
                "herald (DataFusion): the same query on the same files (CPU {herald_cpu:.2} s; \
                 ratio: DuckDB's time / herald's)"
            ),
            herald,
            "s",
            duck.best / herald,
            None,
        ),
    ])
}
