//! The delivery-statistics figure: an hour of `--stats-events` delivery events in
//! `--stats-files` files (as the sink writes them, a flush a second), and the aggregator's
//! passes over it: the first (it reads the whole hour) and the next after one more file (it
//! reads only that file). The baseline is what every pass did before the aggregator kept its
//! hours in memory: the shipped query `sql/delivery_stats.sql` of both tables over the hour's
//! files.

use super::Row;
use super::warehouse::{Scratch, cpu_seconds, event, on_two_threads, t0};
use herald_analytics::{Aggregator, Warehouse, events_to_batch};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The query of both statistics tables; `{window}` is the window width.
const STATS_SQL: &str = include_str!("../../sql/delivery_stats.sql");

/// The statistics passes beside the query they replace, as rows of the harness's table.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    let (n, files) = (args.stats_events as u64, args.stats_files.max(1) as u64);
    let scratch = Scratch::new("stats")?;
    let root = scratch.dir.join("warehouse");
    let wh = Warehouse::local(&root);
    let started = Instant::now();
    let writer = wh.clone();
    tokio::task::spawn_blocking(move || write_files(&writer, n, files, 0..files, 0)).await??;
    println!(
        "stats: wrote {n} events of one hour in {files} files in {:.1?}",
        started.elapsed()
    );

    let (started, cpu) = (Instant::now(), cpu_seconds());
    let mut groups = 0;
    for window in ["1 minute", "1 hour"] {
        let sql = STATS_SQL.replace("{window}", window);
        let batches = herald_analytics::sql::query(&root, &sql).await?;
        groups += batches.iter().map(|b| b.num_rows()).sum::<usize>();
    }
    let (query, query_cpu) = (started.elapsed(), cpu_seconds() - cpu);

    let mut aggregator =
        Aggregator::open(wh.clone(), Arc::default(), Duration::from_secs(3600)).await?;
    let (started, cpu) = (Instant::now(), cpu_seconds());
    aggregator.pass().await?;
    let (first, first_cpu) = (started.elapsed(), cpu_seconds() - cpu);
    let writer = wh.clone();
    // One more flush: the events of the hour's last second again, in a new file.
    tokio::task::spawn_blocking(move || write_files(&writer, n, files, files - 1..files, 1))
        .await??;
    let (started, cpu) = (Instant::now(), cpu_seconds());
    aggregator.pass().await?;
    let (next, next_cpu) = (started.elapsed(), cpu_seconds() - cpu);
    let secs = |d: Duration| d.as_secs_f64();
    Ok(vec![
        Row::new(
            format!(
                "the stats query of both tables over an hour of {n} events in {files} files, \
                 {groups} rows (baseline: what each pass did before; CPU {query_cpu:.2} s)"
            ),
            secs(query),
            "s",
            1.0,
            None,
        ),
        Row::new(
            format!(
                "aggregator: first pass over that hour (reads it whole, writes both tables; CPU \
                 {first_cpu:.2} s; ratio: the query's time / this)"
            ),
            secs(first),
            "s",
            secs(query) / secs(first),
            None,
        ),
        Row::new(
            format!(
                "aggregator: the next pass, after one more file (CPU {next_cpu:.2} s; ratio: the \
                 query's time / this)"
            ),
            secs(next),
            "s",
            secs(query) / secs(next),
            None,
        ),
    ])
}

/// Writes the files `which` of `files` holding `n` events of the hour from [`t0`], file `k`
/// the events of its slice of the hour, named as the sink names files of events on time with
/// the sequence number `k + seq_offset`.
fn write_files(
    wh: &Warehouse,
    n: u64,
    files: u64,
    which: std::ops::Range<u64>,
    seq_offset: u64,
) -> anyhow::Result<()> {
    let hour_us = 3_600_000_000u64;
    on_two_threads(which, |k| {
        let (first, end) = ((n * k).div_ceil(files), (n * (k + 1)).div_ceil(files));
        let events: Vec<_> = (first..end)
            .map(|i| {
                let us = (i as u128 * hour_us as u128 / n as u128) as i64;
                event(i, t0() + chrono::Duration::microseconds(us))
            })
            .collect();
        let seq = k + seq_offset;
        let key = format!(
            "{}/dt=2026-11-02/hour=00/part-{seq:020}-{}.parquet",
            herald_analytics::TABLE,
            events.len()
        );
        wh.write_parquet(&key, &events_to_batch(&events))
            .map_err(Into::into)
    })
}
