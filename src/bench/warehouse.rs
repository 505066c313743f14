//! What the analytics figures (`sink`, `aggregate`, `reconcile`) share: deterministic delivery
//! events, writing them to a warehouse in its `dt=/hour=` layout, and running a query in DuckDB
//! (`scripts/bench_duckdb.py`, as a child process) for the baseline of the same run.

use anyhow::{Context, bail};
use chrono::{DateTime, Duration as Span, TimeZone, Utc};
use herald_analytics::{Warehouse, events_to_batch};
use herald_core::wire::event_id;
use herald_core::{Channel, DeliveryEvent, MessageId, MsgType, State};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The DuckDB runner, written next to the data of the figure that runs it.
const DUCKDB_SCRIPT: &str = include_str!("../../scripts/bench_duckdb.py");

/// Apps, templates per app and vendors per channel of [`event`].
const APPS: [&str; 4] = ["shop", "bank", "games", "news"];
const TEMPLATES: u64 = 40;

/// A scratch directory for one figure, deleted when dropped.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(figure: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "herald-bench-{figure}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The start of the generated events: 2026-11-02T00:00:00Z.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 0, 0, 0).unwrap()
}

/// SplitMix64: a cheap, well-mixed hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce5_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Event `i` of a deterministic stream at time `ts`: every message has four events (accepted,
/// sending, then sent or send_failed, then delivered or delivery_failed), on one of
/// [`TEMPLATES`] templates spread over [`APPS`] and the channels, through one of two vendors of
/// its channel, with latency, billing units and cost on the vendor's events.
pub fn event(i: u64, ts: DateTime<Utc>) -> DeliveryEvent {
    let m = i / 4;
    let h = mix(m);
    let template = h % TEMPLATES;
    let channel = Channel::ALL[(template % Channel::ALL.len() as u64) as usize];
    let send_failed = (h >> 20).is_multiple_of(50);
    let state = match (i % 4, send_failed) {
        (0, _) => State::Accepted,
        (1, _) => State::Sending,
        (2, false) => State::Sent,
        (2, true) | (3, true) => State::SendFailed,
        _ if (h >> 30).is_multiple_of(20) => State::DeliveryFailed,
        _ => State::Delivered,
    };
    let vendor_side = i % 4 >= 2;
    let billed = vendor_side && !send_failed;
    let message_id = MessageId(uuid::Uuid::from_u64_pair(0x0190_0000_0000_7000, m));
    let attempt = u32::from(send_failed);
    DeliveryEvent {
        event_id: event_id(&message_id, state, attempt),
        ts,
        message_id,
        request_id: format!("req-{}", m / 8),
        biz_id: h.is_multiple_of(3).then(|| format!("order-{}", h >> 40)),
        app: APPS[(template % APPS.len() as u64) as usize].to_string(),
        template_id: 1000 + template as i64,
        channel,
        msg_type: [MsgType::Notice, MsgType::Marketing, MsgType::AuthCode][(template % 3) as usize],
        receiver: format!("+86138{:08}", (h >> 8) % 100_000_000),
        state,
        vendor: vendor_side.then(|| format!("{}-{}", channel.as_str(), (h >> 12) % 2)),
        account_id: vendor_side.then_some(((h >> 12) % 2) as i64 + 1),
        vendor_message_id: billed.then(|| format!("{:016x}", mix(h))),
        attempt,
        error_code: send_failed.then(|| "E_QUOTA".to_string()),
        error_detail: send_failed.then(|| "daily quota exceeded".to_string()),
        latency_ms: vendor_side.then_some(20 + (h >> 44) % 900 + (i % 4) * 1000),
        billing_units: billed.then_some(1 + u32::from(h.is_multiple_of(7))),
        cost_micros: billed.then_some(45_000),
        currency: billed.then(|| "CNY".to_string()),
        redelivered: false,
    }
}

/// Writes events `0..n` to `wh`'s `delivery_events`, one file per hour partition, on two
/// threads; `make(i)` makes event `i` at [`spread`]`(start, i, n, hours)`, so that hour `h`
/// of the `hours` holds events `ceil(h n / hours)` up to the next hour's first.
pub fn write_hours(
    wh: &Warehouse,
    n: u64,
    hours: u64,
    make: impl Fn(u64) -> DeliveryEvent + Sync,
) -> anyhow::Result<()> {
    on_two_threads(0..hours, |hour| {
        let (first, end) = ((n * hour).div_ceil(hours), (n * (hour + 1)).div_ceil(hours));
        if first == end {
            return Ok(());
        }
        let events: Vec<DeliveryEvent> = (first..end).map(&make).collect();
        let dir = events[0].ts.format("dt=%Y-%m-%d/hour=%H").to_string();
        let key = format!("{}/{dir}/part-{hour:05}.parquet", herald_analytics::TABLE);
        wh.write_parquet(&key, &events_to_batch(&events))
            .map_err(Into::into)
    })
}

/// Runs `each` for every item of `items` on two threads, each taking the next item in turn;
/// the first error ends both.
pub fn on_two_threads(
    items: std::ops::Range<u64>,
    each: impl Fn(u64) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    let next = AtomicUsize::new(items.start as usize);
    let work = || -> anyhow::Result<()> {
        loop {
            let item = next.fetch_add(1, Ordering::Relaxed) as u64;
            if item >= items.end {
                return Ok(());
            }
            each(item)?;
        }
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2).map(|_| s.spawn(work)).collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a generator thread panicked"))
    })
}

/// The time of event `i` of `n` spread evenly over `hours` hours from `start` (rounded down to
/// the microsecond).
pub fn spread(start: DateTime<Utc>, i: u64, n: u64, hours: u64) -> DateTime<Utc> {
    let span_us = hours as i128 * 3_600_000_000;
    start + Span::microseconds((span_us * i as i128 / n as i128) as i64)
}

/// What DuckDB measured.
pub struct DuckDb {
    /// The fastest of the runs, in seconds.
    pub best: f64,
    /// The least CPU time (all threads) of the runs, in seconds.
    pub cpu: f64,
    /// Rows the query returned.
    pub rows: u64,
    /// The total of each integer column of the result, by name.
    pub sums: std::collections::BTreeMap<String, i64>,
}

/// Fails with how to install DuckDB's Python package if `python3` cannot import it.
pub fn require_duckdb() -> anyhow::Result<()> {
    let ok = Command::new("python3")
        .args(["-c", "import duckdb"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        bail!(
            "the aggregate and reconcile figures compare with DuckDB and need its Python package: \
             python3 -m pip install duckdb"
        );
    }
    Ok(())
}

/// Runs `setup` and then `query` `runs` times in DuckDB (a fresh in-memory database, all cores)
/// in a `python3` child; the time of each run is taken inside Python, around the query alone.
pub fn duckdb(dir: &Path, setup: &[String], query: &str, runs: usize) -> anyhow::Result<DuckDb> {
    let script = dir.join("bench_duckdb.py");
    std::fs::write(&script, DUCKDB_SCRIPT)?;
    let job = dir.join("duckdb-job.json");
    std::fs::write(
        &job,
        serde_json::json!({"setup": setup, "query": query, "repeat": runs}).to_string(),
    )?;
    let out = Command::new("python3")
        .arg(&script)
        .arg(&job)
        .output()
        .context("running python3")?;
    if !out.status.success() {
        bail!(
            "DuckDB failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("DuckDB printed {}", String::from_utf8_lossy(&out.stdout)))?;
    let least = |key: &str| {
        answer[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_f64)
            .fold(f64::INFINITY, f64::min)
    };
    Ok(DuckDb {
        best: least("seconds"),
        cpu: least("cpu_seconds"),
        rows: answer["rows"].as_u64().unwrap_or(0),
        sums: answer["sums"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_i64()?)))
            .collect(),
    })
}

/// A DuckDB view named like the warehouse table `table` (hive partition columns as text, as
/// herald reads them) over the Parquet files `files` (a glob under `root`).
pub fn duckdb_view(table: &str, root: &Path, files: &str) -> String {
    format!(
        "CREATE VIEW {table} AS SELECT * FROM read_parquet('{}/{files}', \
         hive_partitioning = true, hive_types_autocast = false)",
        root.display()
    )
}

/// The CPU time (user and system, all threads) this process has used, in seconds: a measure
/// of work that other processes on the same cores do not inflate as they do wall time.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name in parentheses: utime and stime are the 12th and 13th fields, in
    // clock ticks (100 a second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    ticks(11).unwrap_or(0.0) / 100.0 + ticks(12).unwrap_or(0.0) / 100.0
}

/// The one-minute load average, to print beside figures measured on shared cores.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
