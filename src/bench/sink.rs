//! The sink figure: `--sink-events` delivery events are published to a fresh embedded bus (as
//! dispatch publishes them: JSON keyed by receiver), then the warehouse sink drains them —
//! poll, decode, Arrow, Parquet, manifest commit, bus commit — as `herald serve` runs it
//! (`analytics.flush_rows` and `flush_interval` at their defaults), without the store's event
//! index. The baseline, in the same run, writes the same rows, already in Arrow batches of the
//! same size, to Parquet files with the warehouse's writer settings: what is left when nothing
//! is read or decoded.

use super::Row;
use super::warehouse::{Scratch, event, t0};
use anyhow::bail;
use chrono::Duration as Span;
use herald_analytics::{NoIndex, Sink, SinkConfig, Warehouse, events_to_batch};
use herald_core::bus::Bus;
use herald_core::bus::embedded::{EmbeddedBus, EmbeddedBusConfig};
use herald_core::config::AnalyticsConfig;
use herald_core::wire::DELIVERY_TOPIC;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Records per publish while filling the bus.
const PUBLISH_BATCH: usize = 10_000;

/// The baseline and the sink, as rows of the harness's table.
pub async fn figures(args: &super::BenchArgs) -> anyhow::Result<Vec<Row>> {
    let n = args.sink_events as u64;
    let scratch = Scratch::new("sink")?;
    let defaults = AnalyticsConfig::default();
    let config = SinkConfig {
        max_rows: defaults.flush_rows,
        max_age: defaults.flush_interval,
        ..SinkConfig::default()
    };
    // A millisecond apart: a burst of live traffic, a few hour partitions.
    let at = |i: u64| event(i, t0() + Span::milliseconds(i as i64));

    let baseline = {
        let rows = config.max_rows;
        let dir = scratch.dir.join("baseline");
        let batches = tokio::task::spawn_blocking(move || {
            let events: Vec<_> = (0..n).map(at).collect();
            events.chunks(rows).map(events_to_batch).collect::<Vec<_>>()
        })
        .await?;
        tokio::task::spawn_blocking(move || {
            let wh = Warehouse::local(dir);
            let started = Instant::now();
            for (i, batch) in batches.iter().enumerate() {
                wh.write_parquet(&format!("t/part-{i:06}.parquet"), batch)?;
            }
            anyhow::Ok(n as f64 / started.elapsed().as_secs_f64())
        })
        .await??
    };

    let bus = EmbeddedBus::open(&scratch.dir.join("bus"), EmbeddedBusConfig::default()).await?;
    let mut first = 0;
    while first < n {
        let end = n.min(first + PUBLISH_BATCH as u64);
        let records = (first..end).map(|i| at(i).to_record()).collect();
        bus.publish(DELIVERY_TOPIC, records).await?;
        first = end;
    }
    let bus: Arc<dyn Bus> = Arc::new(bus);
    let wh = Warehouse::local(scratch.dir.join("warehouse"));
    let started = Instant::now();
    let mut sink = Sink::recover(bus, wh, Arc::new(NoIndex), config).await?;
    sink.process_available().await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let written = sink.stats().events_written.load(Ordering::Relaxed);
    if written != n {
        bail!("the sink wrote {written} of {n} events");
    }
    Ok(vec![
        Row::new(
            format!("Arrow batches of {n} events to Parquet, no decoding (baseline for the sink)"),
            baseline,
            "events/s",
            1.0,
            None,
        ),
        Row::new(
            format!("analytics sink: {n} events from the embedded bus into Parquet, committed"),
            rate,
            "events/s",
            rate / baseline,
            None,
        ),
    ])
}
