//! The delivery-log sink: reads [`DELIVERY_TOPIC`] as consumer group [`CONSUMER_GROUP`] and
//! appends every delivery event exactly once to the warehouse table `delivery_events`.
//!
//! # The exactly-once protocol
//!
//! Events are buffered and flushed when the buffer holds [`SinkConfig::max_rows`] events or is
//! [`SinkConfig::max_age`] old. A flush of sequence number `seq` ([`Sink::flush`]):
//!
//! 1. writes one Parquet file per `dt=/hour=` partition to `_staging/<uuid>.parquet`, fsynced
//!    (`stage`);
//! 2. writes `_manifests/<seq:020>.json` atomically (locally: temporary file, fsync, rename,
//!    fsync of the directory; on an object store: one put that refuses to overwrite, see
//!    [`Warehouse`]) listing each staged file, its final path `part-<seq>-<n>.parquet`, its row count,
//!    and the bus position (next offset per partition) covered by this and every earlier flush
//!    ([`Manifest::write`]). **This is the commit point**: the rows are in the warehouse exactly
//!    when the manifest exists;
//! 3. renames the staged files into place (on an object store: copy, then delete) and fsyncs
//!    their directories
//!    ([`Manifest::complete_renames`]), then deletes all but the newest few manifests, and
//!    publishes the manifest's newest event time for the stats ([`SinkStats::event_time`]);
//! 4. commits the manifest's positions to the bus;
//! 5. hands the flushed events to the [`EventIndex`].
//!
//! Steps 1–2 run on a blocking thread while the next batch is read (`Sink::start_flush`,
//! `Sink::land`); at most one flush is before its commit point at any time, so manifests are
//! written in order and each one's positions include every earlier one's. A flush that fails
//! before its commit point puts its events back in front of the buffer.
//!
//! Steps 3–5 are idempotent and are done by `Sink::finish` both after a flush and, for the
//! newest manifest, on start ([`Sink::recover`]), which first deletes staging files that no
//! manifest lists (a flush that crashed before its commit point: its records were never
//! committed on the bus, so they are read again). The manifest, not the bus, is the source of
//! truth for what has been written: recovery commits its positions to the bus, and records
//! below them are skipped even if the bus delivers them. A crash at any point therefore leaves
//! every event in the table exactly once. A failure in steps 3–5 at run time keeps the flush
//! pending; it is retried before anything else.
//!
//! Separately, dispatch re-emits events after its own crash with `redelivered` set and the
//! same deterministic `event_id`; such an event is dropped if its id is in the buffer, in the
//! flush being written, or already known to the index ([`EventIndex::known`]).
//!
//! # Late events
//!
//! Each flush judges its events against the stats watermark of the flushes committed before
//! it (the newest event time in the previous manifest minus [`SinkConfig::allowed_lateness`])
//! and names their files accordingly ([`Lateness`]): events too late for their window are
//! written to `delivery_events` like every other, but in files that `delivery_stats_minute`
//! or `delivery_stats_hour` leave out, and counted ([`SinkStats::late_for_minute`],
//! [`SinkStats::late_for_hour`]). The judgement is part of the commit, so a recomputation of
//! the stats, after a crash or not, always leaves out the same events (see [`crate::stats`]).

use crate::error::AnalyticsError;
use crate::faults::Faults;
use crate::index::EventIndex;
use crate::manifest::{FileEntry, Manifest};
use crate::schema::events_to_batch_with;
use crate::stats::{Lateness, watermark};
use crate::warehouse::{STAGING, Warehouse, WriterLock};
use chrono::{DateTime, TimeDelta, Utc};
use herald_core::bus::{Bus, Consumer, Delivered};
use herald_core::wire::DELIVERY_TOPIC;
use herald_core::{DeliveryEvent, MessageId};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::{JoinHandle, spawn_blocking};

/// The consumer group of the sink on [`DELIVERY_TOPIC`].
pub const CONSUMER_GROUP: &str = "herald-analytics";

/// How long [`Sink::run`] waits after a retryable failure.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Tuning of the sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Flush when the buffer holds this many events.
    pub max_rows: usize,
    /// Flush when the oldest buffered record was read this long ago.
    pub max_age: Duration,
    /// Most records taken from the bus per poll.
    pub poll_max: usize,
    /// How long one poll waits for records.
    pub poll_timeout: Duration,
    /// How many of the newest manifests to keep.
    pub keep_manifests: usize,
    /// How far behind the newest committed event time an event may be and still count in the
    /// stats of its window (see [`crate::stats`]).
    pub allowed_lateness: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            max_rows: 100_000,
            max_age: Duration::from_secs(1),
            poll_max: 10_000,
            poll_timeout: Duration::from_millis(200),
            keep_manifests: 3,
            allowed_lateness: Duration::from_secs(3600),
        }
    }
}

/// Counters of a running sink, for metrics.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Rows committed to the warehouse.
    pub events_written: AtomicU64,
    /// Parquet files committed to the warehouse.
    pub files_written: AtomicU64,
    /// Redelivered events dropped because their id was already buffered or indexed.
    pub duplicates_dropped: AtomicU64,
    /// Records that were not a valid delivery event (skipped, logged).
    pub malformed_dropped: AtomicU64,
    /// Unix time in milliseconds of the last completed flush.
    pub last_flush_ms: AtomicU64,
    /// How long the last completed flush took, in milliseconds.
    pub last_flush_duration_ms: AtomicU64,
    /// Events committed too late for their minute window: left out of `delivery_stats_minute`
    /// (this includes those counted in `late_for_hour`).
    pub late_for_minute: AtomicU64,
    /// Events committed too late for their hour window: left out of `delivery_stats_hour`
    /// (and of `delivery_stats_minute`).
    pub late_for_hour: AtomicU64,
    /// The newest event time of the flushes committed and moved into place: what the stats
    /// aggregator's watermark follows.
    pub event_time: Mutex<Option<DateTime<Utc>>>,
}

impl SinkStats {
    /// The newest event time committed and in place, if any.
    pub fn event_time(&self) -> Option<DateTime<Utc>> {
        *self.event_time.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A point in a flush where tests simulate a crash ([`Faults`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    AfterStaging,
    AfterManifest,
    BeforeBusCommit,
    BeforeIndex,
}

/// A flush past its commit point whose renames, bus commit or indexing may not have happened.
struct Committed {
    manifest: Manifest,
    /// The flushed events; `None` after a restart, when they are read back from the files.
    events: Option<Vec<DeliveryEvent>>,
}

/// Events read since the last flush started.
#[derive(Default)]
struct Batch {
    events: Vec<DeliveryEvent>,
    /// The ids of `events`, to recognise redelivered copies.
    ids: HashSet<String>,
    /// Per bus partition, the next offset after the records read into this batch.
    positions: BTreeMap<u32, u64>,
    /// When the first record of this batch was read.
    since: Option<Instant>,
}

impl Batch {
    /// Whether no record (not even a dropped one) was read into the batch.
    fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Puts `earlier` (a flush that failed before its commit point) back in front.
    fn prepend(&mut self, mut earlier: Batch) {
        earlier.events.append(&mut self.events);
        self.events = earlier.events;
        self.ids.extend(earlier.ids);
        merge_positions(&mut self.positions, &earlier.positions);
        self.since = earlier.since.or(self.since);
    }
}

/// A flush writing its files and manifest on a blocking thread while the next batch is read.
struct InFlight {
    task: JoinHandle<(Vec<DeliveryEvent>, Result<Manifest, AnalyticsError>)>,
    /// The batch without its events (which are with the task).
    batch: Batch,
    started: Instant,
}

/// Streams delivery events from the bus into the warehouse, exactly once.
///
/// After an error that is not [retryable](AnalyticsError::is_retryable), drop the sink and
/// [recover](Sink::recover) a new one.
pub struct Sink {
    consumer: Box<dyn Consumer>,
    warehouse: Warehouse,
    index: Arc<dyn EventIndex>,
    config: SinkConfig,
    stats: Arc<SinkStats>,
    /// Positions covered by the newest manifest: records below them are already written.
    committed: BTreeMap<u32, u64>,
    /// Records polled but not yet admitted into the buffer (kept when admission fails).
    inbox: Vec<Delivered>,
    buffer: Batch,
    /// At most one flush before its commit point, so manifests are written in order.
    inflight: Option<InFlight>,
    unfinished: Option<Committed>,
    next_seq: u64,
    /// The newest event time committed (the newest manifest's): the stats watermark's base.
    event_time: Option<DateTime<Utc>>,
    /// The warehouse's writer lock; a flush in flight holds it too, so that even a dropped
    /// sink's last flush ends before another sink can start.
    lock: Arc<WriterLock>,
    pub(crate) faults: Faults<Step>,
}

impl Sink {
    /// Joins [`CONSUMER_GROUP`] on `bus` and recovers the warehouse: completes the newest
    /// manifest's renames, deletes uncommitted staging files, commits the manifest's positions
    /// to the bus and re-indexes its events. Call again if it fails.
    pub async fn recover(
        bus: Arc<dyn Bus>,
        warehouse: Warehouse,
        index: Arc<dyn EventIndex>,
        config: SinkConfig,
    ) -> Result<Sink, AnalyticsError> {
        let wh = warehouse.clone();
        let (lock, newest) = joined(spawn_blocking(move || {
            let lock = wh.lock_for_sink()?;
            let newest = Manifest::newest(&wh)?;
            Manifest::delete_unlisted_staging(newest.as_ref(), &wh)?;
            Ok::<_, AnalyticsError>((lock, newest))
        }))
        .await??;
        let consumer = bus.subscribe(DELIVERY_TOPIC, CONSUMER_GROUP).await?;
        if let Some(m) = &newest {
            tracing::info!(
                seq = m.seq,
                files = m.files.len(),
                "analytics sink recovering"
            );
        }
        let mut sink = Sink {
            consumer,
            warehouse,
            index,
            config,
            stats: Arc::default(),
            committed: newest
                .as_ref()
                .map(|m| m.positions.clone())
                .unwrap_or_default(),
            inbox: Vec::new(),
            buffer: Batch::default(),
            inflight: None,
            next_seq: newest.as_ref().map_or(1, |m| m.seq + 1),
            event_time: newest.as_ref().and_then(|m| m.max_event_ts),
            unfinished: newest.map(|manifest| Committed {
                manifest,
                events: None,
            }),
            lock: Arc::new(lock),
            faults: Faults::default(),
        };
        sink.finish().await?;
        Ok(sink)
    }

    /// The sink's counters (shared; they keep counting after this call).
    pub fn stats(&self) -> Arc<SinkStats> {
        self.stats.clone()
    }

    /// Polls, flushes by size and age, and on `shutdown` (a `true` value, or the sender being
    /// dropped) flushes what is buffered and returns. Retryable failures are logged and
    /// retried; anything else ends the loop with the error.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AnalyticsError> {
        while !*shutdown.borrow() && shutdown.has_changed().is_ok() {
            if let Err(e) = self.poll_once().await {
                if !e.is_retryable() {
                    if let Err(flush) = self.land().await {
                        tracing::warn!(error = %flush, "analytics flush in flight failed");
                    }
                    return Err(e);
                }
                tracing::warn!(error = %e, "analytics sink failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        self.flush().await
    }

    /// Polls until the bus has nothing more, then flushes: for tests and one-shot catch-up.
    pub async fn process_available(&mut self) -> Result<(), AnalyticsError> {
        while self.poll_once().await? > 0 {}
        self.flush().await
    }

    /// One step: completes a flush that is done writing, polls once, buffers what arrived and
    /// starts a flush if the buffer is full or old enough (writing overlaps the next polls).
    /// Returns how many records the poll returned.
    pub async fn poll_once(&mut self) -> Result<usize, AnalyticsError> {
        if self.inflight.as_ref().is_some_and(|f| f.task.is_finished()) {
            self.land().await?;
        }
        self.finish().await?;
        if self.inbox.is_empty() {
            self.inbox = self
                .consumer
                .poll(self.config.poll_max, self.config.poll_timeout)
                .await?;
        }
        let polled = self.inbox.len();
        self.admit().await?;
        let old = self
            .buffer
            .since
            .is_some_and(|t| t.elapsed() >= self.config.max_age);
        if old || self.buffer.events.len() >= self.config.max_rows {
            self.land().await?;
            self.start_flush();
        }
        Ok(polled)
    }

    /// Writes everything read so far to the warehouse and commits it (the protocol in the
    /// module docs), waiting until it is done.
    pub async fn flush(&mut self) -> Result<(), AnalyticsError> {
        self.land().await?;
        self.finish().await?;
        self.start_flush();
        self.land().await
    }

    /// Decodes the inbox into the buffer, dropping redelivered duplicates. Leaves the inbox as
    /// it is if the index cannot be asked.
    async fn admit(&mut self) -> Result<(), AnalyticsError> {
        let mut events = Vec::with_capacity(self.inbox.len());
        let mut positions = BTreeMap::<u32, u64>::new();
        let mut malformed = 0;
        for d in &self.inbox {
            if d.offset < self.committed.get(&d.partition).copied().unwrap_or(0) {
                continue; // already in the warehouse (redelivered by the bus after a restart)
            }
            let p = positions.entry(d.partition).or_default();
            *p = (*p).max(d.offset + 1);
            match serde_json::from_slice::<DeliveryEvent>(&d.record.payload) {
                Ok(e) => events.push(e),
                Err(e) => {
                    malformed += 1;
                    tracing::warn!(partition = d.partition, offset = d.offset, error = %e,
                        "skipping a malformed delivery event");
                }
            }
        }
        let suspects: Vec<(MessageId, String)> = events
            .iter()
            .filter(|e| e.redelivered && !self.seen(&e.event_id))
            .map(|e| (e.message_id, e.event_id.clone()))
            .collect();
        let known = if suspects.is_empty() {
            HashSet::new()
        } else {
            self.index
                .known(&suspects)
                .await
                .map_err(AnalyticsError::Index)?
        };

        self.inbox.clear();
        if !positions.is_empty() && self.buffer.since.is_none() {
            self.buffer.since = Some(Instant::now());
        }
        merge_positions(&mut self.buffer.positions, &positions);
        let mut duplicates = 0;
        for e in events {
            if e.redelivered && (known.contains(&e.event_id) || self.seen(&e.event_id)) {
                duplicates += 1;
                continue;
            }
            self.buffer.ids.insert(e.event_id.clone());
            self.buffer.events.push(e);
        }
        self.stats
            .duplicates_dropped
            .fetch_add(duplicates, Ordering::Relaxed);
        self.stats
            .malformed_dropped
            .fetch_add(malformed, Ordering::Relaxed);
        Ok(())
    }

    /// Whether event `id` is buffered or in the flush in flight.
    fn seen(&self, id: &str) -> bool {
        self.buffer.ids.contains(id)
            || self
                .inflight
                .as_ref()
                .is_some_and(|f| f.batch.ids.contains(id))
    }

    /// Starts writing the buffer (staged files, then the manifest) on a blocking thread.
    /// Requires that no flush is in flight.
    fn start_flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.buffer);
        let mut events = std::mem::take(&mut batch.events);
        let mut positions = self.committed.clone();
        merge_positions(&mut positions, &batch.positions);
        let (wh, faults, seq) = (self.warehouse.clone(), self.faults, self.next_seq);
        let lock = self.lock.clone();
        let before = self.event_time;
        let cutoff = before.and_then(|t| watermark(t, self.config.allowed_lateness));
        let task = spawn_blocking(move || {
            let _lock = lock;
            let newest = newest_event_time(&events, before);
            let written = stage(&wh, seq, &mut events, cutoff).and_then(|files| {
                faults.check(Step::AfterStaging)?;
                let manifest = Manifest::new(seq, files, positions, newest);
                manifest.write(&wh)?;
                Ok(manifest)
            });
            (events, written)
        });
        self.inflight = Some(InFlight {
            task,
            batch,
            started: Instant::now(),
        });
    }

    /// Waits for the flush in flight, if any, and completes it; if it failed before its
    /// commit point, puts its events back into the buffer.
    async fn land(&mut self) -> Result<(), AnalyticsError> {
        let Some(InFlight {
            task,
            mut batch,
            started,
        }) = self.inflight.take()
        else {
            return Ok(());
        };
        let (events, written) = joined(task).await?;
        let manifest = match written {
            Ok(manifest) => manifest,
            Err(e) => {
                batch.events = events;
                self.buffer.prepend(batch); // not committed: written again by a later flush
                return Err(e);
            }
        };

        // Committed: from here on the flush is only ever completed, never redone.
        let rows: u64 = manifest.files.iter().map(|f| f.rows).sum();
        let files = manifest.files.len() as u64;
        self.stats.events_written.fetch_add(rows, Ordering::Relaxed);
        self.stats.files_written.fetch_add(files, Ordering::Relaxed);
        for f in &manifest.files {
            let late = Lateness::of_file(&f.path);
            if matches!(late, Some(Lateness::LateMinute | Lateness::LateHour)) {
                self.stats
                    .late_for_minute
                    .fetch_add(f.rows, Ordering::Relaxed);
            }
            if late == Some(Lateness::LateHour) {
                self.stats
                    .late_for_hour
                    .fetch_add(f.rows, Ordering::Relaxed);
            }
        }
        self.committed = manifest.positions.clone();
        self.next_seq = manifest.seq + 1;
        self.event_time = manifest.max_event_ts;
        let seq = manifest.seq;
        self.unfinished = Some(Committed {
            manifest,
            events: Some(events),
        });
        self.finish().await?;

        let elapsed = started.elapsed().as_millis() as u64;
        tracing::debug!(seq, rows, files, ms = elapsed, "analytics flush");
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        self.stats.last_flush_ms.store(now_ms, Ordering::Relaxed);
        self.stats
            .last_flush_duration_ms
            .store(elapsed, Ordering::Relaxed);
        Ok(())
    }

    /// Completes the committed flush, if one is pending: renames, bus commit, index. Keeps it
    /// pending if a step fails.
    async fn finish(&mut self) -> Result<(), AnalyticsError> {
        let Some(mut committed) = self.unfinished.take() else {
            return Ok(());
        };
        let result = self.complete(&mut committed).await;
        if result.is_err() {
            self.unfinished = Some(committed);
        }
        result
    }

    async fn complete(&mut self, committed: &mut Committed) -> Result<(), AnalyticsError> {
        self.faults.check(Step::AfterManifest)?;
        let (wh, manifest) = (self.warehouse.clone(), committed.manifest.clone());
        let (keep, read_back) = (self.config.keep_manifests, committed.events.is_none());
        let read = joined(spawn_blocking(move || {
            manifest.complete_renames(&wh)?;
            Manifest::prune(&wh, keep)?;
            read_back.then(|| manifest.read_events(&wh)).transpose()
        }))
        .await??;
        if let Some(t) = committed.manifest.max_event_ts {
            let mut published = self
                .stats
                .event_time
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *published = (*published).max(Some(t));
        }
        let events = committed
            .events
            .get_or_insert_with(|| read.unwrap_or_default());
        self.faults.check(Step::BeforeBusCommit)?;
        self.consumer
            .commit(&committed.manifest.bus_positions())
            .await?;
        self.faults.check(Step::BeforeIndex)?;
        self.index
            .index(events)
            .await
            .map_err(AnalyticsError::Index)
    }
}

/// Raises each partition's position in `into` to the one in `from`.
fn merge_positions(into: &mut BTreeMap<u32, u64>, from: &BTreeMap<u32, u64>) {
    for (&partition, &next) in from {
        let p = into.entry(partition).or_default();
        *p = (*p).max(next);
    }
}

/// The result of a blocking task; a panic in it is resumed here.
async fn joined<T>(task: JoinHandle<T>) -> Result<T, AnalyticsError> {
    match task.await {
        Ok(value) => Ok(value),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(AnalyticsError::Task(e)),
    }
}

/// Writes `events` to one staged Parquet file per partition and [`Lateness`] against
/// `watermark` (sorting them by both) and returns the entries for the manifest. On failure,
/// removes what it staged.
fn stage(
    wh: &Warehouse,
    seq: u64,
    events: &mut [DeliveryEvent],
    watermark: Option<DateTime<Utc>>,
) -> Result<Vec<FileEntry>, AnalyticsError> {
    let key = |e: &DeliveryEvent| {
        (
            e.ts.timestamp().div_euclid(3600),
            Lateness::of(e.ts, watermark),
        )
    };
    events.sort_by_key(key);
    let mut files: Vec<FileEntry> = Vec::new();
    for (n, group) in events.chunk_by(|a, b| key(a) == key(b)).enumerate() {
        let file = FileEntry {
            staged: format!("{STAGING}/{}.parquet", uuid::Uuid::now_v7()),
            path: format!(
                "{}/part-{seq:020}-{n:04}{}.parquet",
                Warehouse::partition_of(group[0].ts),
                key(&group[0]).1.suffix()
            ),
            rows: group.len() as u64,
        };
        let batch = events_to_batch_with(group, wh.receivers());
        let written = wh.write_parquet(&file.staged, &batch);
        files.push(file);
        if let Err(e) = written {
            for f in &files {
                let _ = wh.delete(&f.staged);
            }
            return Err(e);
        }
    }
    if !files.is_empty() {
        wh.sync_dir(STAGING)?;
    }
    Ok(files)
}

/// How far ahead of the sink's clock an event time may move the stats watermark: a vendor
/// receipt dated next year (a wrong clock, a bad field) must not close every window at once.
const MAX_FUTURE: TimeDelta = TimeDelta::minutes(5);

/// The newest event time of `events` and the flushes `before` them, an event dated more than
/// [`MAX_FUTURE`] ahead counting as that far ahead (it is still written with its own time).
fn newest_event_time(
    events: &[DeliveryEvent],
    before: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let limit = Utc::now() + MAX_FUTURE;
    let ahead = events.iter().filter(|e| e.ts > limit).count();
    if ahead > 0 {
        tracing::warn!(
            count = ahead,
            "events dated more than 5 minutes ahead; the stats watermark does not follow them"
        );
    }
    events.iter().map(|e| e.ts.min(limit)).max().max(before)
}

#[cfg(test)]
mod tests;
