//! The statistics of one hour kept in memory between passes, so that a pass reads only the
//! event files that are new since the one before (see the `stats` module docs, "Cost").
//!
//! [`HourState`] holds what the hour's counted files add up to per minute window and group:
//! events, billing units, cost, and every latency (the percentiles are exact, so they need
//! them all). [`HourState::table`] computes the rows of either table from it as
//! `sql/delivery_stats.sql` computes them from the same files; the tests check that both give
//! the same table.

use super::{Lateness, Width};
use crate::error::AnalyticsError;
use crate::warehouse::Warehouse;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef, TimestampMicrosecondType};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// The columns of `delivery_events` the statistics read.
pub(super) const COLUMNS: [&str; 10] = [
    "ts",
    "app",
    "template_id",
    "channel",
    "vendor",
    "state",
    "currency",
    "latency_ms",
    "billing_units",
    "cost_micros",
];

/// Microseconds in a minute and in an hour.
const MINUTE_US: i64 = 60_000_000;
const HOUR_US: i64 = 60 * MINUTE_US;

/// A window (its start, unix µs) and the columns the query groups by, declared in the order of
/// its `ORDER BY` (`None` sorts first, as `NULLS FIRST` does).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Group {
    window_start: i64,
    app: String,
    template_id: i64,
    channel: String,
    vendor: Option<String>,
    state: String,
    currency: Option<String>,
}

impl Group {
    /// Its window, app, template and channel.
    fn channel_key(&self) -> ChannelKey<'_> {
        (
            self.window_start,
            &self.app,
            self.template_id,
            &self.channel,
        )
    }
}

/// A window, app, template and channel: the partition of the query's `success_rate`.
type ChannelKey<'a> = (i64, &'a str, i64, &'a str);

/// What the events of a group add up to.
#[derive(Debug, Default, Clone)]
struct Sums {
    events: i64,
    billing_units: Option<i64>,
    cost_micros: Option<i64>,
    /// The events' latencies that are not null, in no order.
    latencies: Vec<i64>,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        self.events += other.events;
        self.billing_units = sum(self.billing_units, other.billing_units);
        self.cost_micros = sum(self.cost_micros, other.cost_micros);
        self.latencies.extend_from_slice(&other.latencies);
    }
}

/// SQL's `sum` of two partial sums: null only when both are (no value was added).
fn sum(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.wrapping_add(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// One hour's counted event files and what they add up to.
#[derive(Debug, Default)]
pub(super) struct HourState {
    /// The files added.
    files: BTreeSet<String>,
    /// Per minute window and group, and whether its events count in the minute table (files on
    /// time) or only in the hour table (files of events late for their minute).
    groups: HashMap<(Group, bool), Sums>,
}

impl HourState {
    /// Of `files` (an hour's counted files now), those not added yet, if every file added is
    /// among them; `None` when one was replaced (compaction merged it), so the state must be
    /// built again.
    pub(super) fn new_files(&self, files: &[String]) -> Option<Vec<String>> {
        if self.files.iter().any(|f| !files.contains(f)) {
            return None;
        }
        Some(
            files
                .iter()
                .filter(|f| !self.files.contains(*f))
                .cloned()
                .collect(),
        )
    }

    /// Adds the events of the file `name` of the partition `dir` (blocks on the warehouse).
    pub(super) fn add_file(
        &mut self,
        wh: &Warehouse,
        dir: &str,
        name: &str,
    ) -> Result<(), AnalyticsError> {
        let on_time = Lateness::of_file(name) == Some(Lateness::OnTime);
        wh.read_batches(&format!("{dir}/{name}"), Some(&COLUMNS), &mut |batch| {
            self.add_batch(&batch, on_time)
        })?;
        self.files.insert(name.to_string());
        Ok(())
    }

    /// Adds one batch of events (with the columns the file had of [`COLUMNS`]).
    fn add_batch(&mut self, batch: &RecordBatch, on_time: bool) -> Result<(), AnalyticsError> {
        let strings = |name: &str| -> Result<Option<StringArray>, AnalyticsError> {
            match batch.column_by_name(name) {
                Some(c) => Ok(Some(cast(c, &DataType::Utf8)?.as_string::<i32>().clone())),
                None => Ok(None),
            }
        };
        let ints = |name: &str| -> Result<Option<Int64Array>, AnalyticsError> {
            match batch.column_by_name(name) {
                Some(c) => Ok(Some(
                    cast(c, &DataType::Int64)?
                        .as_primitive::<Int64Type>()
                        .clone(),
                )),
                None => Ok(None),
            }
        };
        let ts = required(batch.column_by_name("ts"), "ts")?
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| AnalyticsError::Corrupt("an event file whose ts is not in µs".into()))?;
        let app = required(strings("app")?, "app")?;
        let template_id = required(ints("template_id")?, "template_id")?;
        let channel = required(strings("channel")?, "channel")?;
        let state = required(strings("state")?, "state")?;
        let vendor = strings("vendor")?;
        let currency = strings("currency")?;
        let latency = ints("latency_ms")?;
        let units = ints("billing_units")?;
        let cost = ints("cost_micros")?;
        // Grouped with borrowed keys first: one owned key per group of the batch, not per event.
        type Key<'a> = (
            i64,
            &'a str,
            i64,
            &'a str,
            Option<&'a str>,
            &'a str,
            Option<&'a str>,
        );
        let mut batch_groups: HashMap<Key<'_>, Sums> = HashMap::new();
        for i in 0..batch.num_rows() {
            let key = (
                ts.value(i).div_euclid(MINUTE_US) * MINUTE_US,
                app.value(i),
                template_id.value(i),
                channel.value(i),
                text(&vendor, i),
                state.value(i),
                text(&currency, i),
            );
            let sums = batch_groups.entry(key).or_default();
            sums.events += 1;
            sums.billing_units = sum(sums.billing_units, int(&units, i));
            sums.cost_micros = sum(sums.cost_micros, int(&cost, i));
            sums.latencies.extend(int(&latency, i));
        }
        for ((window_start, app, template_id, channel, vendor, state, currency), sums) in
            batch_groups
        {
            let group = Group {
                window_start,
                app: app.to_string(),
                template_id,
                channel: channel.to_string(),
                vendor: vendor.map(str::to_string),
                state: state.to_string(),
                currency: currency.map(str::to_string),
            };
            self.groups.entry((group, on_time)).or_default().add(&sums);
        }
        Ok(())
    }

    /// The rows of the table of `width` for this hour, in the query's order, with its `schema`.
    pub(super) fn table(
        &self,
        width: Width,
        schema: SchemaRef,
    ) -> Result<RecordBatch, AnalyticsError> {
        let window = match width {
            Width::Minute => MINUTE_US,
            Width::Hour => HOUR_US,
        };
        let mut windows: BTreeMap<Group, Sums> = BTreeMap::new();
        for ((group, on_time), sums) in &self.groups {
            if width == Width::Minute && !on_time {
                continue;
            }
            let mut key = group.clone();
            key.window_start = key.window_start.div_euclid(window) * window;
            windows.entry(key).or_default().add(sums);
        }
        for sums in windows.values_mut() {
            sums.latencies.sort_unstable();
        }
        // The query's window functions: per window, app, template and channel the sent and
        // tried (sent or failed) events; per window, app, template, channel and vendor the sent
        // and delivered ones.
        let mut per_channel: HashMap<ChannelKey<'_>, (i64, i64)> = HashMap::new();
        let mut per_vendor: HashMap<(ChannelKey<'_>, Option<&str>), (i64, i64)> = HashMap::new();
        for (g, s) in &windows {
            let state = g.state.as_str();
            let channel = per_channel.entry(g.channel_key()).or_default();
            let vendor = per_vendor
                .entry((g.channel_key(), g.vendor.as_deref()))
                .or_default();
            if state == "sent" {
                channel.0 += s.events;
                vendor.0 += s.events;
            }
            if state == "sent" || state == "send_failed" {
                channel.1 += s.events;
            }
            if state == "delivered" {
                vendor.1 += s.events;
            }
        }
        let ratio = |part: i64, whole: i64| (whole != 0).then(|| part as f64 / whole as f64);
        let n = windows.len();
        let mut window_start = Vec::with_capacity(n);
        let (mut app, mut channel, mut vendor, mut state, mut currency) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut template_id, mut events, mut units, mut cost) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut success_rate, mut delivery_rate) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut percentiles = [
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        ];
        for (g, s) in &windows {
            let (sent, tried) = per_channel[&g.channel_key()];
            let (vendor_sent, delivered) = per_vendor[&(g.channel_key(), g.vendor.as_deref())];
            window_start.push(g.window_start);
            app.push(g.app.as_str());
            template_id.push(g.template_id);
            channel.push(g.channel.as_str());
            vendor.push(g.vendor.as_deref());
            state.push(g.state.as_str());
            currency.push(g.currency.as_deref());
            events.push(s.events);
            success_rate.push(ratio(sent, tried));
            delivery_rate.push(ratio(delivered, vendor_sent));
            for (column, p) in percentiles.iter_mut().zip([0.5, 0.95, 0.99]) {
                column.push(percentile_cont(&s.latencies, p).map(round3));
            }
            units.push(s.billing_units);
            cost.push(s.cost_micros);
        }
        let [p50, p95, p99] = percentiles;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampMicrosecondArray::from(window_start)),
            Arc::new(StringArray::from(app)),
            Arc::new(Int64Array::from(template_id)),
            Arc::new(StringArray::from(channel)),
            Arc::new(StringArray::from(vendor)),
            Arc::new(StringArray::from(state)),
            Arc::new(StringArray::from(currency)),
            Arc::new(Int64Array::from(events)),
            Arc::new(Float64Array::from(success_rate)),
            Arc::new(Float64Array::from(delivery_rate)),
            Arc::new(Float64Array::from(p50)),
            Arc::new(Float64Array::from(p95)),
            Arc::new(Float64Array::from(p99)),
            Arc::new(Int64Array::from(units)),
            Arc::new(Int64Array::from(cost)),
        ];
        if columns.len() != schema.fields().len() {
            return Err(AnalyticsError::Corrupt(format!(
                "the stats query has {} columns, the in-memory stats {}",
                schema.fields().len(),
                columns.len()
            )));
        }
        let columns = columns
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

/// `column`, or an error naming it when the file lacks it.
fn required<T>(column: Option<T>, name: &str) -> Result<T, AnalyticsError> {
    column
        .ok_or_else(|| AnalyticsError::Corrupt(format!("an event file without the column {name}")))
}

/// Row `i` of an optional text column: null when the column or the value is.
fn text(column: &Option<StringArray>, i: usize) -> Option<&str> {
    column
        .as_ref()
        .filter(|a| a.is_valid(i))
        .map(|a| a.value(i))
}

/// Row `i` of an optional integer column: null when the column or the value is.
fn int(column: &Option<Int64Array>, i: usize) -> Option<i64> {
    column
        .as_ref()
        .filter(|a| a.is_valid(i))
        .map(|a| a.value(i))
}

/// `percentile_cont(p) WITHIN GROUP (ORDER BY …)` of sorted values as DataFusion computes it:
/// linear interpolation between the values at ranks ⌊p(n−1)⌋ and ⌈p(n−1)⌉, with the weight
/// quantised to millionths; null without values.
fn percentile_cont(sorted: &[i64], p: f64) -> Option<f64> {
    const PRECISION: f64 = 1_000_000.0;
    match sorted {
        [] => None,
        [only] => Some(*only as f64),
        _ => {
            let index = p * (sorted.len() - 1) as f64;
            let (lower, upper) = (index.floor() as usize, index.ceil() as usize);
            let (low, high) = (sorted[lower] as f64, sorted[upper] as f64);
            if lower == upper {
                return Some(low);
            }
            let weight = ((index - lower as f64) * PRECISION) as usize as f64 / PRECISION;
            Some(low + (high - low) * weight)
        }
    }
}

/// SQL's `round(x, 3)`.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_the_query_does() {
        assert_eq!(percentile_cont(&[], 0.5), None);
        assert_eq!(percentile_cont(&[7], 0.99), Some(7.0));
        // Ranks 0.5 × 3 = 1.5: halfway between 20 and 30.
        assert_eq!(percentile_cont(&[10, 20, 30, 40], 0.5), Some(25.0));
        // 0.95 × 3 = 2.85: 30 + 0.85 × 10.
        assert_eq!(
            percentile_cont(&[10, 20, 30, 40], 0.95).map(round3),
            Some(38.5)
        );
        assert_eq!(percentile_cont(&[1, 2, 3], 0.5), Some(2.0));
    }
}
