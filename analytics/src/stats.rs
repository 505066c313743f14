//! Windowed delivery statistics: the tables `delivery_stats_minute` (1-minute tumbling windows)
//! and `delivery_stats_hour` (1-hour windows), computed from `delivery_events` by
//! `sql/delivery_stats.sql`, one row per window, app, template, channel, vendor, state and
//! currency (the columns are documented in that file).
//!
//! # Layout
//!
//! Each hour of events has one stats file per table, replaced as a whole when the hour's events
//! change: `delivery_stats_minute/dt=YYYY-MM-DD/hour=HH/stats.parquet` (its sixty minutes) and
//! `delivery_stats_hour/dt=YYYY-MM-DD/hour-HH.parquet`. A replacement is a staged file renamed
//! over the old one (on an object store, a copy over it), so a reader sees the old file or the
//! new one, never a mix; the two tables of one hour are replaced one after the other. A query
//! lists its files before it reads them, and a file replaced in between has another size than
//! listed (DataFusion reads it at the listed size and fails): queries in the aggregator's
//! process hold off replacements ([`Warehouse::reading`]), and one in another process is run
//! again ([`crate::sql`]).
//!
//! # Lateness and the watermark
//!
//! Windows are by event time (`ts`), and events arrive late: a receipt carries the vendor's
//! delivery time and can come hours after. The watermark is the newest event time committed to
//! `delivery_events` minus `analytics.allowed_lateness`; a window is closed once the watermark
//! has reached its end. The sink judges every event against the watermark of the flushes
//! committed before its own and records the verdict in the event file's name ([`Lateness`]):
//! `part-<seq>-<n>.parquet` (on time), `…-late_minute.parquet` (its minute window is closed but
//! its hour is not: it counts in `delivery_stats_hour` only) or `…-late_hour.parquet` (both
//! closed: it counts in neither). Late events stay in `delivery_events`; they are counted in
//! the metric `herald_stats_late_events_total{table=…}`.
//!
//! # Exactly-once consistency
//!
//! The stats of an hour are a pure function of the names and contents of its committed event
//! files, so recomputing them is idempotent: computed twice, or again after a crash, they are
//! the same. The [`Aggregator`] runs in the analytics role beside the sink and, every
//! `analytics.stats_interval`, recomputes each hour that may still change (its end is after the
//! watermark of the last completed pass) and whose counted files differ from the ones it last
//! computed from. Only open hours gain counted files, so once an hour's last counted file is in
//! place and a pass has recomputed it, its stats are final.
//!
//! After a crash nothing is lost: the watermark of the last completed pass is kept in
//! `_stats/checkpoint.json`, written after the pass, and on start every hour ending after it is
//! recomputed (a hour that a flush after that pass filled and closed included). Without a
//! checkpoint (a first start, or a warehouse written before the stats existed) every hour is
//! computed, its existing files all counting as on time.
//!
//! # Cost
//!
//! The aggregator keeps, for each hour that may still change, what its counted files add up
//! to per minute window and group ([`hour::HourState`]: counts, sums and every latency, since
//! the percentiles are exact), and which files those are. A pass reads only the files added
//! since the last one and computes both tables of the hour from memory, as
//! `sql/delivery_stats.sql` computes them from the files (the tests check both agree). The
//! hour is read whole again only when a file it counted is gone (compaction merged it), and
//! after a restart. Memory: 8 bytes per event with a latency, plus one entry per minute window
//! and group, for each open hour (with the default lateness of 1 h, two hours).

mod hour;

use crate::error::AnalyticsError;
use crate::parts::hidden;
use crate::schema::{TABLE, schema};
use crate::sink::SinkStats;
use crate::warehouse::Warehouse;
use chrono::{DateTime, TimeDelta, Utc};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionContext;
use hour::HourState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::spawn_blocking;

/// The table of 1-minute windows.
pub const MINUTE_TABLE: &str = "delivery_stats_minute";
/// The table of 1-hour windows.
pub const HOUR_TABLE: &str = "delivery_stats_hour";

/// The aggregate query of both tables; `{window}` is the window width.
const STATS_SQL: &str = include_str!("../../sql/delivery_stats.sql");
/// Stats files being written (not a table: the leading `_` keeps it out of `herald sql`).
const STAGING: &str = "_stats_staging";
/// The watermark of the last completed pass.
const CHECKPOINT: &str = "_stats/checkpoint.json";

const MINUTE: TimeDelta = TimeDelta::minutes(1);
const HOUR: TimeDelta = TimeDelta::hours(1);

/// Whether an event came in time for its windows, judged when it is committed; encoded in the
/// name of its `delivery_events` file (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Lateness {
    /// Counted in both tables.
    OnTime,
    /// Its minute window was closed: counted in `delivery_stats_hour` only.
    LateMinute,
    /// Its hour window was closed: counted in neither table.
    LateHour,
}

impl Lateness {
    /// The lateness of an event at `ts` under `watermark` (none: nothing is late).
    pub(crate) fn of(ts: DateTime<Utc>, watermark: Option<DateTime<Utc>>) -> Lateness {
        let Some(w) = watermark else {
            return Lateness::OnTime;
        };
        if window_end(ts, HOUR) <= w {
            Lateness::LateHour
        } else if window_end(ts, MINUTE) <= w {
            Lateness::LateMinute
        } else {
            Lateness::OnTime
        }
    }

    /// What the sink appends to the name of a file of such events (before `.parquet`).
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Lateness::OnTime => "",
            Lateness::LateMinute => "-late_minute",
            Lateness::LateHour => "-late_hour",
        }
    }

    /// The lateness of the events in the `delivery_events` file at `path`, as the sink names
    /// them: `part-…<digit>.parquet` on time, `part-…-late_minute.parquet`,
    /// `part-…-late_hour.parquet`; `None` for any other name (a file the stats ignore).
    pub(crate) fn of_file(path: &str) -> Option<Lateness> {
        let name = path.rsplit('/').next().unwrap_or(path);
        let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
        if stem.ends_with(Lateness::LateHour.suffix()) {
            Some(Lateness::LateHour)
        } else if stem.ends_with(Lateness::LateMinute.suffix()) {
            Some(Lateness::LateMinute)
        } else if stem.ends_with(|c: char| c.is_ascii_digit()) {
            Some(Lateness::OnTime)
        } else {
            None
        }
    }
}

/// The end of the tumbling window of `width` (a divisor of a day) that holds `ts`.
fn window_end(ts: DateTime<Utc>, width: TimeDelta) -> DateTime<Utc> {
    let w = width.num_microseconds().unwrap_or(i64::MAX);
    let start = ts.timestamp_micros().div_euclid(w) * w;
    DateTime::from_timestamp_micros(start).unwrap_or(ts) + width
}

/// `event_time` minus `lateness`; none if that is before the earliest time there is.
pub(crate) fn watermark(event_time: DateTime<Utc>, lateness: Duration) -> Option<DateTime<Utc>> {
    event_time.checked_sub_signed(TimeDelta::from_std(lateness).ok()?)
}

/// One of the two tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Width {
    Minute,
    Hour,
}

impl Width {
    /// The value of `{window}` in the query.
    fn interval(self) -> &'static str {
        match self {
            Width::Minute => "1 minute",
            Width::Hour => "1 hour",
        }
    }

    /// The table's name.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Width::Minute => MINUTE_TABLE,
            Width::Hour => HOUR_TABLE,
        }
    }

    /// The table's hive partition columns.
    pub(crate) fn partition_columns(self) -> Vec<(String, DataType)> {
        let mut cols = vec![("dt".to_string(), DataType::Utf8)];
        if self == Width::Minute {
            cols.push(("hour".to_string(), DataType::Utf8));
        }
        cols
    }

    /// The key of the table's file for the hour starting at `start`.
    fn file(self, start: DateTime<Utc>) -> String {
        match self {
            Width::Minute => format!(
                "{MINUTE_TABLE}/{}/stats.parquet",
                start.format("dt=%Y-%m-%d/hour=%H")
            ),
            Width::Hour => format!(
                "{HOUR_TABLE}/{}.parquet",
                start.format("dt=%Y-%m-%d/hour-%H")
            ),
        }
    }

    /// The query of this table.
    pub(crate) fn sql(self) -> String {
        STATS_SQL.replace("{window}", self.interval())
    }
}

/// The Arrow schema of the rows of the table of `width` (without its partition columns).
pub(crate) async fn stats_schema(width: Width) -> Result<SchemaRef, AnalyticsError> {
    let ctx = SessionContext::new();
    ctx.register_table(TABLE, Arc::new(MemTable::try_new(schema(), vec![vec![]])?))?;
    let frame = ctx.sql(&width.sql()).await?;
    Ok(Arc::new(frame.schema().as_arrow().clone()))
}

/// The watermark of the last completed pass, kept across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    /// The newest committed event time when the pass started.
    event_time: DateTime<Utc>,
    /// The allowed lateness then, in seconds.
    allowed_lateness_secs: u64,
}

/// Keeps `delivery_stats_minute` and `delivery_stats_hour` up to date with `delivery_events`
/// (see the module docs). One per warehouse, in the process of its sink.
pub struct Aggregator {
    wh: Warehouse,
    sink: Arc<SinkStats>,
    allowed_lateness: Duration,
    checkpoint: Option<Checkpoint>,
    /// Per hour (its start), the counted event files its stats were last computed from.
    computed: BTreeMap<DateTime<Utc>, Vec<String>>,
    /// Per hour that may still change, what its counted files add up to.
    hours: BTreeMap<DateTime<Utc>, HourState>,
    /// The schemas of the minute table and of the hour table (the query's).
    schemas: [SchemaRef; 2],
    /// Tests: fail as if the process died after this many more stats files were written.
    #[cfg(test)]
    pub(crate) crash_after_writes: Option<usize>,
}

impl Aggregator {
    /// An aggregator of `wh`, following the event time the sink publishes in `sink`: reads the
    /// checkpoint and deletes stats files a crashed pass left staged.
    pub async fn open(
        wh: Warehouse,
        sink: Arc<SinkStats>,
        allowed_lateness: Duration,
    ) -> Result<Aggregator, AnalyticsError> {
        let checkpoint = blocking(&wh, |wh| {
            for name in wh.list(STAGING)? {
                wh.delete(&format!("{STAGING}/{name}"))?;
            }
            if !wh.exists(CHECKPOINT)? {
                return Ok(None);
            }
            match serde_json::from_slice(&wh.get(CHECKPOINT)?) {
                Ok(checkpoint) => Ok(Some(checkpoint)),
                Err(e) => {
                    // Safe to forget: without a checkpoint every hour is recomputed.
                    let at = wh.locate(CHECKPOINT);
                    tracing::warn!(error = %e, checkpoint = %at, "ignoring an unreadable stats checkpoint");
                    Ok(None)
                }
            }
        })
        .await?;
        let schemas = [
            stats_schema(Width::Minute).await?,
            stats_schema(Width::Hour).await?,
        ];
        Ok(Aggregator {
            wh,
            sink,
            allowed_lateness,
            checkpoint,
            computed: BTreeMap::new(),
            hours: BTreeMap::new(),
            schemas,
            #[cfg(test)]
            crash_after_writes: None,
        })
    }

    /// Runs a pass every `interval` until `shutdown` turns true. A failed pass is logged and
    /// redone by the next one.
    pub async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.pass().await {
                Ok(0) => {}
                Ok(hours) => tracing::debug!(hours, "delivery stats recomputed"),
                Err(e) => tracing::warn!(error = %e, "delivery stats pass failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// One pass: recomputes every hour that may still change and whose counted event files
    /// changed since it was last computed, then writes the checkpoint. Returns how many hours
    /// were recomputed.
    pub async fn pass(&mut self) -> Result<usize, AnalyticsError> {
        // Compaction in this process waits: no file listed below disappears during the pass.
        let wh = self.wh.clone();
        let _reading = wh.reading_events().await;
        // Read before listing: every flush up to this event time has its files in place.
        let event_time = self.sink.event_time();
        // Hours that ended by the last completed pass's watermark got no counted file since.
        let bound = self.checkpoint.and_then(|c| {
            let lateness = Duration::from_secs(c.allowed_lateness_secs).max(self.allowed_lateness);
            watermark(c.event_time, lateness)
        });
        let hours = blocking(&self.wh, move |wh| open_hours(wh, bound)).await?;
        let mut recomputed = 0;
        for (start, files) in hours {
            if self.computed.get(&start) == Some(&files) {
                continue;
            }
            self.recompute(start, &files).await?;
            self.computed.insert(start, files);
            recomputed += 1;
        }
        if let Some(event_time) = event_time {
            let checkpoint = Checkpoint {
                event_time,
                // Rounded up: a longer lateness only widens the next bound.
                allowed_lateness_secs: self.allowed_lateness.as_secs()
                    + u64::from(self.allowed_lateness.subsec_nanos() > 0),
            };
            if self.checkpoint != Some(checkpoint) {
                let json = serde_json::to_vec(&checkpoint)
                    .map_err(|e| AnalyticsError::Corrupt(e.to_string()))?;
                blocking(&self.wh, move |wh| {
                    let staged = format!("{STAGING}/{}.json", uuid::Uuid::now_v7());
                    wh.put_new(&staged, &json)?;
                    wh.rename(&staged, CHECKPOINT)?;
                    wh.sync_dir("_stats")
                })
                .await?;
                self.checkpoint = Some(checkpoint);
                if let Some(w) = watermark(event_time, self.allowed_lateness) {
                    self.computed.retain(|start, _| *start + HOUR > w);
                    self.hours.retain(|start, _| *start + HOUR > w);
                }
            }
        }
        Ok(recomputed)
    }

    /// Replaces the stats files of the hour starting at `start`, whose counted event files
    /// are `files`: adds the files new since the hour's last pass to its state (all of them
    /// when one it counted is gone), and computes both tables from the state.
    async fn recompute(
        &mut self,
        start: DateTime<Utc>,
        files: &[String],
    ) -> Result<(), AnalyticsError> {
        let dir = Warehouse::partition_of(start);
        let mut state = self.hours.remove(&start).unwrap_or_default();
        let new = match state.new_files(files) {
            Some(new) => new,
            None => {
                state = HourState::default();
                files.to_vec()
            }
        };
        let on_time = files
            .iter()
            .any(|f| Lateness::of_file(f) == Some(Lateness::OnTime));
        let schemas = self.schemas.clone();
        // A failure drops the state: the next pass builds it again from the files.
        let (state, tables) = blocking(&self.wh, move |wh| {
            for name in &new {
                state.add_file(wh, &dir, name)?;
            }
            let mut tables = Vec::new();
            for (width, schema) in [Width::Minute, Width::Hour].into_iter().zip(schemas) {
                if width == Width::Minute && !on_time {
                    continue;
                }
                tables.push((width, state.table(width, schema)?));
            }
            Ok((state, tables))
        })
        .await?;
        self.hours.insert(start, state);
        for (width, batch) in tables {
            #[cfg(test)]
            if let Some(left) = self.crash_after_writes.as_mut() {
                if *left == 0 {
                    return Err(AnalyticsError::Corrupt("injected crash".into()));
                }
                *left -= 1;
            }
            let key = width.file(start);
            blocking(&self.wh, move |wh| {
                let staged = format!("{STAGING}/{}.parquet", uuid::Uuid::now_v7());
                wh.write_parquet(&staged, &batch)?;
                // Queries in this process wait: none lists the old file and reads the new one.
                let replacing = wh.replacing_stats();
                wh.rename(&staged, &key)?;
                drop(replacing);
                match key.rsplit_once('/') {
                    Some((dir, _)) => wh.sync_dir(dir),
                    None => Ok(()),
                }
            })
            .await?;
        }
        Ok(())
    }
}

/// An hour of `delivery_events` (its start) and its counted event files.
type HourFiles = (DateTime<Utc>, Vec<String>);

/// The hours of `delivery_events` (their start) that end after `bound` (all without one), each
/// with its counted event files (on time or late only for their minute), sorted.
fn open_hours(
    wh: &Warehouse,
    bound: Option<DateTime<Utc>>,
) -> Result<Vec<HourFiles>, AnalyticsError> {
    let after = |start: DateTime<Utc>, width: TimeDelta| bound.is_none_or(|b| start + width > b);
    let mut out = Vec::new();
    for dt in wh.dirs(TABLE)? {
        let Some(day) = Warehouse::day_of(&dt) else {
            continue;
        };
        if !after(day, TimeDelta::days(1)) {
            continue;
        }
        for hour in wh.dirs(&format!("{TABLE}/{dt}"))? {
            let Some(h) = Warehouse::hour_of(&hour) else {
                continue;
            };
            let start = day + h;
            if !after(start, HOUR) {
                continue;
            }
            let listed = wh.list(&format!("{TABLE}/{dt}/{hour}"))?;
            let names: Vec<&str> = listed.iter().map(String::as_str).collect();
            let mut files: Vec<String> = names
                .iter()
                .zip(hidden(&names))
                .filter(|(f, hide)| {
                    !hide
                        && matches!(
                            Lateness::of_file(f),
                            Some(Lateness::OnTime | Lateness::LateMinute)
                        )
                })
                .map(|(f, _)| f.to_string())
                .collect();
            files.sort();
            out.push((start, files));
        }
    }
    Ok(out)
}

/// Runs `f` on a blocking thread (warehouse operations block).
async fn blocking<T: Send + 'static>(
    wh: &Warehouse,
    f: impl FnOnce(&Warehouse) -> Result<T, AnalyticsError> + Send + 'static,
) -> Result<T, AnalyticsError> {
    let wh = wh.clone();
    spawn_blocking(move || f(&wh))
        .await
        .map_err(AnalyticsError::Task)?
}

#[cfg(test)]
mod tests;
