//! Compaction of `delivery_events`: the sink writes one file per hour partition (and lateness)
//! per flush, about one a second; compaction merges the small files of a partition into files
//! of up to [`CompactConfig::target_bytes`].
//!
//! # Which files
//!
//! In each `dt=/hour=` directory, the files of one [`Lateness`] (merging across lateness would
//! change what the stats count) that are visible ([`crate::parts`]), smaller than the target,
//! and older than the newest manifest (`to < seq` of the newest manifest: the newest flush may
//! still be moving its files into place or re-reading them after a crash, so its files are
//! never touched). Consecutive such files (in sequence order) are grouped into runs of at most
//! `target_bytes`; a run of at least [`CompactConfig::min_files`] files is merged. Only hours
//! that ended at least [`CompactConfig::after`] before the newest committed event time are
//! compacted: the current hour gets a new file every flush, and each merge of an hour still
//! open for the stats makes the aggregator recompute it. A late event written into a compacted
//! hour makes a new small file, merged with the rest once there are enough of them.
//!
//! # Exactly once, and what readers see
//!
//! A merge of the files `from..=to` of a partition:
//!
//! 1. writes the merged file to `_compact_staging/<uuid>.parquet`, durably;
//! 2. moves it into the partition as `part-<from>-to-<to>[-late_…].parquet` (locally a rename
//!    and an fsync of the directory; on an object store a copy, which appears whole, then a
//!    delete of the staged copy). **This is the commit point**: the name says which files the
//!    new one replaces, and from this moment readers that apply the rule of
//!    [`crate::parts`] see the merged file and not its inputs;
//! 3. deletes the inputs.
//!
//! A crash before step 2 leaves a staged file, deleted by the next pass (or the command); a
//! crash after it leaves inputs that are hidden, deleted by the next pass. Either way the table
//! holds every event exactly once, for herald's readers at every moment. Readers that list the
//! directory without the rule (DuckDB or pyarrow on a glob) see the inputs beside the merged
//! file between steps 2 and 3 (milliseconds, or until the next pass after a crash).
//!
//! Herald's readers in the compacting process hold [`Warehouse::reading`] while they query and
//! steps 2–3 hold it exclusively, so they never find a file they listed deleted; a query in
//! another process (`herald sql`) that listed an input just before step 3 fails with a
//! not-found error and can be run again — it never returns a wrong result.
//!
//! One compactor per warehouse: the analytics role runs one, and `herald warehouse compact`
//! takes the sink's lock on a local warehouse (so it runs only while the role is stopped); on
//! an object store nothing enforces it. Two compactors at once cannot lose or duplicate rows
//! (a merged file is committed only by its own name, and a vanished staged file fails the
//! merge before anything is deleted) but can make each other fail.

use crate::error::AnalyticsError;
use crate::faults::Faults;
use crate::manifest::Manifest;
use crate::parts::{PartName, hidden};
use crate::schema::TABLE;
use crate::stats::Lateness;
use crate::warehouse::Warehouse;
use chrono::{DateTime, TimeDelta, Utc};
use herald_core::config::AnalyticsConfig;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::spawn_blocking;

/// Merged files being written (not a table: the leading `_` keeps it out of `herald sql`).
const STAGING: &str = "_compact_staging";

/// What compaction merges: the `analytics.compact_*` settings.
#[derive(Debug, Clone)]
pub struct CompactConfig {
    /// Compact an hour once the newest committed event is this far past the hour's end.
    pub after: Duration,
    /// Merge a run of files only if it has at least this many.
    pub min_files: usize,
    /// Merge files up to about this many bytes (of the inputs, compressed); larger files stay.
    pub target_bytes: u64,
}

impl From<&AnalyticsConfig> for CompactConfig {
    fn from(c: &AnalyticsConfig) -> Self {
        CompactConfig {
            after: c.compact_after,
            min_files: c.compact_min_files,
            target_bytes: c.compact_target_bytes,
        }
    }
}

/// A step of a merge where tests simulate a crash ([`Faults`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The merged file is staged, not in place.
    Staged,
    /// The merged file is in place, no input deleted.
    Placed,
    /// The merged file is in place and one input deleted.
    FirstInputDeleted,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Partitions (hour directories) that got a merged file.
    pub partitions: usize,
    /// Files merged (and deleted).
    pub files_merged: usize,
    /// Merged files written.
    pub files_written: usize,
    /// Rows in the merged files.
    pub rows: u64,
    /// Leftovers of an interrupted merge deleted: staged files and hidden inputs.
    pub leftovers: usize,
}

impl fmt::Display for Compacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "merged {} files ({} rows) into {} in {} partitions; deleted {} leftovers",
            self.files_merged, self.rows, self.files_written, self.partitions, self.leftovers
        )
    }
}

/// Compacts the `delivery_events` table of a warehouse (see the module docs).
pub struct Compactor {
    wh: Warehouse,
    config: CompactConfig,
    pub(crate) faults: Faults<Step>,
}

impl Compactor {
    /// A compactor of `wh`.
    pub fn new(wh: Warehouse, config: CompactConfig) -> Self {
        Compactor {
            wh,
            config,
            faults: Faults::default(),
        }
    }

    /// One pass over every partition: deletes leftovers, merges what is due.
    pub async fn pass(&self) -> Result<Compacted, AnalyticsError> {
        let (wh, config, faults) = (self.wh.clone(), self.config.clone(), self.faults);
        spawn_blocking(move || compact(&wh, &config, faults))
            .await
            .map_err(AnalyticsError::Task)?
    }

    /// One pass outside the analytics role (`herald warehouse compact`): on a local warehouse
    /// it takes the sink's lock first, so it fails while a sink runs; on an object store
    /// nothing stops a running role from compacting at the same time (module docs).
    pub async fn pass_alone(&self) -> Result<Compacted, AnalyticsError> {
        let _lock = self.wh.lock_for_sink()?;
        self.pass().await
    }

    /// Runs a pass every `interval` until `shutdown` turns true, telling `on_pass` each
    /// outcome. A failed pass is logged and the next one cleans up after it.
    pub async fn run(
        self,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
        on_pass: impl Fn(Result<&Compacted, &AnalyticsError>),
    ) {
        loop {
            let done = self.pass().await;
            on_pass(done.as_ref());
            match done {
                Ok(done) if done == Compacted::default() => {}
                Ok(done) => tracing::info!(%done, "delivery_events compacted"),
                Err(e) => tracing::warn!(error = %e, "compaction pass failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// A visible file of a partition that compaction may merge.
struct Part {
    name: PartName,
    file: String,
    bytes: u64,
}

fn compact(
    wh: &Warehouse,
    config: &CompactConfig,
    faults: Faults<Step>,
) -> Result<Compacted, AnalyticsError> {
    let mut done = Compacted::default();
    for name in wh.list(STAGING)? {
        wh.delete(&format!("{STAGING}/{name}"))?;
        done.leftovers += 1;
    }
    let Some(newest) = Manifest::newest(wh)? else {
        return Ok(done);
    };
    let due_by = newest.max_event_ts.unwrap_or_else(Utc::now);
    let after = TimeDelta::from_std(config.after).unwrap_or(TimeDelta::MAX);
    for (start, dir) in partitions(wh)? {
        let parts = visible_parts(wh, &dir, newest.seq, &mut done)?;
        let due = start
            .checked_add_signed(TimeDelta::hours(1))
            .and_then(|end| end.checked_add_signed(after))
            .is_some_and(|t| t <= due_by);
        if !due {
            continue;
        }
        let mut merged_here = false;
        for run in runs(parts, config) {
            done.rows += merge(wh, &dir, &run, faults)?;
            done.files_merged += run.len();
            done.files_written += 1;
            merged_here = true;
        }
        done.partitions += usize::from(merged_here);
    }
    Ok(done)
}

/// Every `delivery_events` partition directory with the start of its hour, oldest first.
fn partitions(wh: &Warehouse) -> Result<Vec<(DateTime<Utc>, String)>, AnalyticsError> {
    let mut out = Vec::new();
    for dt in wh.dirs(TABLE)? {
        let Some(day) = Warehouse::day_of(&dt) else {
            continue;
        };
        for hour in wh.dirs(&format!("{TABLE}/{dt}"))? {
            let Some(h) = Warehouse::hour_of(&hour) else {
                continue;
            };
            out.push((day + h, format!("{TABLE}/{dt}/{hour}")));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the hidden files of `dir` (inputs of a merge interrupted after its commit point)
/// and returns the visible ones older than manifest `newest_seq`.
fn visible_parts(
    wh: &Warehouse,
    dir: &str,
    newest_seq: u64,
    done: &mut Compacted,
) -> Result<Vec<Part>, AnalyticsError> {
    let files = wh.list_sized(dir)?;
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let mut parts = Vec::new();
    for ((file, bytes), hide) in files.iter().zip(hidden(&names)) {
        if hide {
            wh.delete(&format!("{dir}/{file}"))?;
            done.leftovers += 1;
            continue;
        }
        if let Some(name) = PartName::parse(file).filter(|n| n.to < newest_seq) {
            parts.push(Part {
                name,
                file: file.clone(),
                bytes: *bytes,
            });
        }
    }
    Ok(parts)
}

/// The runs of `parts` to merge: per lateness, in sequence order, consecutive files smaller
/// than the target, at most the target together, at least `min_files` of them.
fn runs(parts: Vec<Part>, config: &CompactConfig) -> Vec<Vec<Part>> {
    let mut by_lateness: BTreeMap<Lateness, Vec<Part>> = BTreeMap::new();
    for p in parts {
        by_lateness.entry(p.name.lateness).or_default().push(p);
    }
    let mut runs = Vec::new();
    for mut parts in by_lateness.into_values() {
        parts.sort_by_key(|p| p.name.from);
        let (mut run, mut bytes) = (Vec::new(), 0);
        let mut close = |run: &mut Vec<Part>| {
            let run = std::mem::take(run);
            if run.len() >= config.min_files.max(2) {
                runs.push(run);
            }
        };
        for p in parts {
            if p.bytes >= config.target_bytes || bytes + p.bytes > config.target_bytes {
                close(&mut run);
                bytes = 0;
            }
            if p.bytes < config.target_bytes {
                bytes += p.bytes;
                run.push(p);
            }
        }
        close(&mut run);
    }
    runs
}

/// Merges `run` (files of `dir`) into one file (the protocol in the module docs); returns its
/// row count.
fn merge(
    wh: &Warehouse,
    dir: &str,
    run: &[Part],
    faults: Faults<Step>,
) -> Result<u64, AnalyticsError> {
    let (first, last) = (&run[0].name, &run[run.len() - 1].name);
    let target = format!(
        "{dir}/{}",
        PartName::compacted(first.from, last.to, first.lateness)
    );
    let inputs: Vec<String> = run.iter().map(|p| format!("{dir}/{}", p.file)).collect();
    let staged = format!("{STAGING}/{}.parquet", uuid::Uuid::now_v7());
    let rows = wh.merge_parquet(&staged, &inputs)?;
    wh.sync_dir(STAGING)?;
    faults.check(Step::Staged)?;

    let _swapping = wh.swapping();
    if !wh.rename(&staged, &target)? {
        return Err(AnalyticsError::Corrupt(format!(
            "the merged file {} vanished before it was moved into place (another compactor?)",
            wh.locate(&staged)
        )));
    }
    wh.sync_dir(dir)?;
    faults.check(Step::Placed)?;
    for (i, input) in inputs.iter().enumerate() {
        if i == 1 {
            faults.check(Step::FirstInputDeleted)?;
        }
        wh.delete(input)?;
    }
    wh.sync_dir(dir)?;
    Ok(rows)
}

#[cfg(test)]
mod tests;
