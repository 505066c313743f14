//! The warehouse: where Parquet tables live. Only a local directory is implemented; every
//! operation the sink needs goes through [`Warehouse`] in terms of `/`-separated keys relative
//! to the root (as in an object store), so an `object_store` backend can be added here alone.

use crate::error::{AnalyticsError, IoContext};
use crate::schema::{TABLE, batch_to_events};
use chrono::{DateTime, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use herald_core::DeliveryEvent;
use std::fs::{self, File, TryLockError};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Directory of files written but not yet committed by a manifest.
pub(crate) const STAGING: &str = "_staging";
/// Directory of the sink's commit manifests.
pub(crate) const MANIFESTS: &str = "_manifests";
/// File locked by the one sink writing to the warehouse.
const SINK_LOCK: &str = "_sink.lock";

/// A warehouse rooted at a local directory.
#[derive(Debug, Clone)]
pub struct Warehouse {
    root: PathBuf,
}

impl Warehouse {
    /// A warehouse in the local directory `root` (created on first write).
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Warehouse { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the warehouse's writer lock, held until the returned file is closed; fails if
    /// another sink (in this process or another) holds it.
    pub(crate) fn lock_for_sink(&self) -> Result<File, AnalyticsError> {
        let path = self.path(SINK_LOCK);
        create_parent(&path)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(TryLockError::WouldBlock) => Err(std::io::Error::new(
                ErrorKind::WouldBlock,
                "the warehouse is in use by another sink",
            ))
            .at(&path),
            Err(TryLockError::Error(e)) => Err(e).at(&path),
        }
    }

    /// The `delivery_events` partition (hive style, UTC) holding an event at `ts`.
    pub(crate) fn partition_of(ts: DateTime<Utc>) -> String {
        format!("{TABLE}/{}", ts.format("dt=%Y-%m-%d/hour=%H"))
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Writes `batch` as a zstd-compressed Parquet file with statistics, durably.
    pub(crate) fn write_parquet(
        &self,
        key: &str,
        batch: &RecordBatch,
    ) -> Result<(), AnalyticsError> {
        let path = self.path(key);
        create_parent(&path)?;
        let file = File::create(&path).at(&path)?;
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(writer_properties()))?;
        writer.write(batch)?;
        writer.into_inner()?.sync_all().at(&path)
    }

    /// Reads the events of a `delivery_events` Parquet file.
    pub(crate) fn read_events(&self, key: &str) -> Result<Vec<DeliveryEvent>, AnalyticsError> {
        let path = self.path(key);
        let file = File::open(&path).at(&path)?;
        let mut out = Vec::new();
        for batch in ParquetRecordBatchReaderBuilder::try_new(file)?.build()? {
            out.extend(batch_to_events(&batch?)?);
        }
        Ok(out)
    }

    /// Replaces `key` with `bytes` atomically and durably (temporary file, fsync, rename).
    pub(crate) fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), AnalyticsError> {
        let path = self.path(key);
        create_parent(&path)?;
        let tmp = path.with_extension("tmp");
        let mut file = File::create(&tmp).at(&tmp)?;
        file.write_all(bytes).at(&tmp)?;
        file.sync_all().at(&tmp)?;
        fs::rename(&tmp, &path).at(&path)?;
        sync_parent(&path)
    }

    /// The content of `key`.
    pub(crate) fn get(&self, key: &str) -> Result<Vec<u8>, AnalyticsError> {
        let path = self.path(key);
        fs::read(&path).at(&path)
    }

    /// Moves `from` to `to`; `Ok(false)` if `from` does not exist.
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<bool, AnalyticsError> {
        let (from, to) = (self.path(from), self.path(to));
        create_parent(&to)?;
        match fs::rename(&from, &to) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound && !from.exists() => Ok(false),
            Err(e) => Err(e).at(&from),
        }
    }

    /// Whether `key` exists.
    pub(crate) fn exists(&self, key: &str) -> bool {
        self.path(key).exists()
    }

    /// Makes the entries of directory `dir` durable.
    pub(crate) fn sync_dir(&self, dir: &str) -> Result<(), AnalyticsError> {
        let path = self.path(dir);
        File::open(&path).and_then(|d| d.sync_all()).at(&path)
    }

    /// The names of the files directly in `dir` (none if it does not exist).
    pub(crate) fn list(&self, dir: &str) -> Result<Vec<String>, AnalyticsError> {
        let path = self.path(dir);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).at(&path),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.at(&path)?;
            if entry.file_type().at(&path)?.is_file() {
                names.extend(entry.file_name().to_str().map(str::to_string));
            }
        }
        Ok(names)
    }

    /// Deletes `key` if it exists.
    pub(crate) fn delete(&self, key: &str) -> Result<(), AnalyticsError> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).at(&path),
            _ => Ok(()),
        }
    }
}

fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .build()
}

fn create_parent(path: &Path) -> Result<(), AnalyticsError> {
    match path.parent() {
        Some(dir) => fs::create_dir_all(dir).at(dir),
        None => Ok(()),
    }
}

fn sync_parent(path: &Path) -> Result<(), AnalyticsError> {
    match path.parent() {
        Some(dir) => File::open(dir).and_then(|d| d.sync_all()).at(dir),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::events_to_batch;
    use crate::testing::sample_events;
    use chrono::TimeZone;

    #[test]
    fn partitions_are_by_utc_date_and_hour() {
        let ts = Utc.with_ymd_and_hms(2026, 11, 26, 7, 59, 59).unwrap();
        assert_eq!(
            Warehouse::partition_of(ts),
            "delivery_events/dt=2026-11-26/hour=07"
        );
    }

    #[test]
    fn parquet_files_are_zstd_with_statistics_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::local(dir.path());
        let events = sample_events(20, 0);
        wh.write_parquet("t/a.parquet", &events_to_batch(&events))
            .unwrap();
        assert_eq!(wh.read_events("t/a.parquet").unwrap(), events);

        let file = File::open(dir.path().join("t/a.parquet")).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let rg = reader.metadata().row_group(0);
        for col in rg.columns() {
            assert!(matches!(col.compression(), Compression::ZSTD(_)));
            assert!(col.statistics().is_some(), "{}", col.column_path());
        }
    }

    #[test]
    fn renames_report_a_missing_source() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::local(dir.path());
        wh.put_atomic("a/x", b"1").unwrap();
        assert!(wh.rename("a/x", "b/c/y").unwrap());
        assert!(!wh.rename("a/x", "b/c/y").unwrap());
        assert_eq!(wh.get("b/c/y").unwrap(), b"1");
        assert_eq!(wh.list("b/c").unwrap(), vec!["y".to_string()]);
        assert!(wh.list("nope").unwrap().is_empty());
    }
}
