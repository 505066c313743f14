//! The warehouse: where Parquet tables live, in a local directory or under a prefix of an S3
//! bucket ([`Warehouse::open`]). Every operation the sink needs goes through [`Warehouse`] in
//! terms of `/`-separated keys relative to the root, and each backend gives the sink protocol
//! ([`crate::sink`]) what it relies on:
//!
//! | | local directory | object store |
//! |---|---|---|
//! | durable write | write, fsync | one put (durable once acknowledged) |
//! | manifest (commit point) | temporary file, fsync, rename, fsync of the directory | a conditional put that refuses to overwrite |
//! | staged file into place | rename | copy, then delete (after a crash between the two, the copy is redone) |
//! | directories | created and fsynced | none: a key prefix, listed by prefix |
//! | one writer | a file lock on `_sink.lock` | not enforced: see below |
//!
//! # One sink per warehouse on an object store
//!
//! An object store has no lock that is released when its holder dies: a lock object created
//! with a conditional put would outlive a crashed sink and block its restart until an operator
//! deleted it, which defeats unattended crash recovery. So on an object store the sink takes no
//! lock, and **at most one sink (one `herald serve` or `herald analytics` process) may write a
//! given warehouse location**. As a backstop, manifests are created with a conditional put: a
//! second sink that commits a sequence number the first one already used fails (not retryably)
//! instead of replacing the other's manifest. That catches a second writer at its first
//! clashing commit but cannot undo what it did before (its recovery deletes the other's
//! uncommitted staged files), so it is a safety net, not a lock.
//!
//! # Blocking
//!
//! The key operations are blocking. On an object store they drive the store's requests on the
//! Tokio runtime that was current when the warehouse was opened, so they must run on a blocking
//! thread (`spawn_blocking`, as the sink does), never in async code.

use crate::error::{AnalyticsError, IoContext};
use crate::privacy::ReceiverPrivacy;
use crate::schema::{TABLE, batch_to_events};
use crate::view::CompactedView;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::execution::context::SessionContext;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::parquet::file::reader::ChunkReader;
use herald_core::DeliveryEvent;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode};
use std::fmt;
use std::fs::{self, File, TryLockError};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Handle;

/// Directory of files written but not yet committed by a manifest.
pub(crate) const STAGING: &str = "_staging";
/// Directory of the sink's commit manifests.
pub(crate) const MANIFESTS: &str = "_manifests";
/// File locked by the one sink writing to a local warehouse.
const SINK_LOCK: &str = "_sink.lock";

/// A warehouse rooted at a local directory or at a prefix of an S3 bucket.
#[derive(Debug, Clone)]
pub struct Warehouse {
    backend: Backend,
    /// How receivers are written into this warehouse's tables (events and bills alike).
    receivers: ReceiverPrivacy,
    /// Held shared by the readers of this process and exclusively by compaction while it
    /// swaps files (see [`Warehouse::reading`]); clones share it.
    layout: Arc<tokio::sync::RwLock<()>>,
    /// Held shared by the queries of this process and exclusively by the stats aggregator
    /// while it moves a stats file over the old one (see [`Warehouse::replacing_stats`]).
    stats_files: Arc<tokio::sync::RwLock<()>>,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(PathBuf),
    Remote(Remote),
}

/// A warehouse under a prefix of an object store bucket.
#[derive(Debug, Clone)]
struct Remote {
    /// The bucket's store; its paths are full object keys.
    store: Arc<dyn ObjectStore>,
    /// `s3://<bucket>`: where DataFusion finds `store`.
    bucket_url: String,
    /// The warehouse root inside the bucket, without leading or trailing `/` (empty: the bucket).
    prefix: String,
    /// Drives the store's requests for the blocking operations.
    runtime: Handle,
}

/// A query's hold on the warehouse's layout ([`Warehouse::reading`]), released when dropped.
pub(crate) struct ReadHold<'a> {
    _events: tokio::sync::RwLockReadGuard<'a, ()>,
    _stats: tokio::sync::RwLockReadGuard<'a, ()>,
}

/// The sink's hold on a warehouse, released when dropped: a locked file for a local warehouse,
/// nothing for an object store (see the module docs).
#[derive(Debug)]
pub(crate) struct WriterLock {
    _file: Option<File>,
}

impl Warehouse {
    /// A warehouse in the local directory `root` (created on first write).
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Warehouse {
            backend: Backend::Local(root.into()),
            receivers: ReceiverPrivacy::Clear,
            layout: Arc::default(),
            stats_files: Arc::default(),
        }
    }

    /// This warehouse, with receivers written as `receivers` says from now on.
    pub fn with_receivers(self, receivers: ReceiverPrivacy) -> Self {
        Warehouse { receivers, ..self }
    }

    /// How receivers are written into this warehouse.
    pub fn receivers(&self) -> &ReceiverPrivacy {
        &self.receivers
    }

    /// The warehouse at `location`: `s3://bucket` or `s3://bucket/prefix`, or else a local
    /// directory. An S3 store takes its credentials, region and endpoint from the standard
    /// `AWS_*` environment variables (`AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true` for a local
    /// S3-compatible server), must be opened inside a Tokio runtime, and must be written by one
    /// sink at a time (module docs).
    pub fn open(location: &str) -> Result<Warehouse, AnalyticsError> {
        if location.starts_with("s3://") {
            Self::s3(AmazonS3Builder::from_env(), location)
        } else if location.contains("://") {
            Err(AnalyticsError::Location {
                location: location.to_string(),
                reason: "unsupported scheme (expected a local path or s3://bucket/prefix)".into(),
            })
        } else {
            Ok(Self::local(location))
        }
    }

    /// The warehouse at `location` (`s3://bucket[/prefix]`) in the store `builder` configures.
    pub(crate) fn s3(
        builder: AmazonS3Builder,
        location: &str,
    ) -> Result<Warehouse, AnalyticsError> {
        let bad = |reason: String| AnalyticsError::Location {
            location: location.to_string(),
            reason,
        };
        let rest = location
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(bad("no bucket".into()));
        }
        ObjectPath::parse(prefix).map_err(|e| bad(e.to_string()))?;
        let runtime = Handle::try_current()
            .map_err(|_| bad("an S3 warehouse must be opened inside a Tokio runtime".into()))?;
        let store = builder.with_bucket_name(bucket).build().map_err(|source| {
            AnalyticsError::ObjectStore {
                location: location.to_string(),
                source,
            }
        })?;
        Ok(Warehouse {
            backend: Backend::Remote(Remote {
                store: Arc::new(store),
                bucket_url: format!("s3://{bucket}"),
                prefix: prefix.to_string(),
                runtime,
            }),
            receivers: ReceiverPrivacy::Clear,
            layout: Arc::default(),
            stats_files: Arc::default(),
        })
    }

    /// Where `key` is, for messages: a local path or an `s3://` URL.
    pub(crate) fn locate(&self, key: &str) -> String {
        match &self.backend {
            Backend::Local(root) => root.join(key).display().to_string(),
            Backend::Remote(r) => r.locate(key),
        }
    }

    /// The URL or path of table directory `name`, with a trailing `/`, for a listing table.
    pub(crate) fn table_url(&self, name: &str) -> String {
        format!("{}/", self.locate(name))
    }

    /// Registers the store DataFusion reads this warehouse through, with compacted-away files
    /// left out of its listings ([`CompactedView`]): `file://` for a local warehouse, the
    /// bucket's URL for an object store.
    pub(crate) fn register_store(&self, ctx: &SessionContext) -> Result<(), AnalyticsError> {
        let (url, store): (ObjectStoreUrl, Arc<dyn ObjectStore>) = match &self.backend {
            Backend::Local(_) => (
                ObjectStoreUrl::local_filesystem(),
                Arc::new(LocalFileSystem::new()),
            ),
            Backend::Remote(r) => (ObjectStoreUrl::parse(&r.bucket_url)?, r.store.clone()),
        };
        ctx.register_object_store(url.as_ref(), Arc::new(CompactedView::new(store)));
        Ok(())
    }

    /// A query's shared hold on the layout of this process's warehouse: compaction does not
    /// swap files while it is held, so a query never finds a file it listed deleted, and the
    /// stats aggregator does not replace a stats file, so a query never reads a file of
    /// another size than it listed. Take it once per task (a second hold waits behind a
    /// waiting compaction: a deadlock).
    pub(crate) async fn reading(&self) -> ReadHold<'_> {
        let events = self.layout.read().await;
        ReadHold {
            _events: events,
            _stats: self.stats_files.read().await,
        }
    }

    /// The stats aggregator's shared hold on the layout of `delivery_events` alone (see
    /// [`Warehouse::reading`]): it replaces stats files while holding it.
    pub(crate) async fn reading_events(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.layout.read().await
    }

    /// The exclusive hold the stats aggregator takes while it moves a stats file into place
    /// (see [`Warehouse::reading`]); blocks, so call it on a blocking thread.
    pub(crate) fn replacing_stats(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.stats_files.blocking_write()
    }

    /// The exclusive hold compaction takes while it swaps files (see [`Warehouse::reading`]).
    pub(crate) fn swapping(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.layout.blocking_write()
    }

    /// The names of the directories (key prefixes) directly under the root.
    pub(crate) async fn root_dirs(&self) -> Result<Vec<String>, AnalyticsError> {
        match &self.backend {
            Backend::Local(root) => {
                let entries = match fs::read_dir(root) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(e).at(root),
                };
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry.at(root)?;
                    if entry.path().is_dir() {
                        names.extend(entry.file_name().to_str().map(str::to_string));
                    }
                }
                Ok(names)
            }
            Backend::Remote(r) => {
                let root = r.object("")?;
                let listed = r
                    .store
                    .list_with_delimiter(Some(&root))
                    .await
                    .map_err(|e| r.error("", e))?;
                Ok(listed
                    .common_prefixes
                    .iter()
                    .filter_map(|p| p.filename().map(str::to_string))
                    .collect())
            }
        }
    }

    /// Takes the warehouse's writer lock, held until the returned value is dropped; for a
    /// local warehouse, fails if another sink (in this process or another) holds it. An object
    /// store has no lock (module docs).
    pub(crate) fn lock_for_sink(&self) -> Result<WriterLock, AnalyticsError> {
        let Backend::Local(root) = &self.backend else {
            return Ok(WriterLock { _file: None });
        };
        let path = root.join(SINK_LOCK);
        create_parent(&path)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(WriterLock { _file: Some(file) }),
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

    /// The start of the day a partition directory `dt=YYYY-MM-DD` names.
    pub(crate) fn day_of(dir: &str) -> Option<DateTime<Utc>> {
        let day = NaiveDate::parse_from_str(dir.strip_prefix("dt=")?, "%Y-%m-%d").ok()?;
        Some(day.and_time(chrono::NaiveTime::MIN).and_utc())
    }

    /// The offset into its day of the hour a partition directory `hour=HH` names.
    pub(crate) fn hour_of(dir: &str) -> Option<TimeDelta> {
        let h = dir.strip_prefix("hour=")?.parse::<i64>().ok()?;
        (0..24).contains(&h).then(|| TimeDelta::hours(h))
    }

    /// Writes `batch` as a zstd-compressed Parquet file with statistics, durably (the settings
    /// of every file the sink writes). Blocking (module docs).
    pub fn write_parquet(&self, key: &str, batch: &RecordBatch) -> Result<(), AnalyticsError> {
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(key);
                create_parent(&path)?;
                let file = File::create(&path).at(&path)?;
                encode_parquet(batch, file)?.sync_all().at(&path)
            }
            Backend::Remote(r) => {
                r.put(key, encode_parquet(batch, Vec::new())?, PutMode::Overwrite)
            }
        }
    }

    /// Writes the rows of the Parquet files `inputs`, in order, into one Parquet file `key`
    /// with the settings of [`Warehouse::write_parquet`], durably; returns its row count. The
    /// inputs are read one at a time (a local output is written as it goes; an object-store one
    /// is put once whole). Blocking (module docs).
    pub(crate) fn merge_parquet(
        &self,
        key: &str,
        inputs: &[String],
    ) -> Result<u64, AnalyticsError> {
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(key);
                create_parent(&path)?;
                let (file, rows) = self.merge_into(inputs, File::create(&path).at(&path)?, key)?;
                file.sync_all().at(&path)?;
                Ok(rows)
            }
            Backend::Remote(r) => {
                let (bytes, rows) = self.merge_into(inputs, Vec::new(), key)?;
                r.put(key, bytes, PutMode::Overwrite)?;
                Ok(rows)
            }
        }
    }

    /// Encodes the rows of `inputs` into `out` (see [`Warehouse::merge_parquet`]).
    fn merge_into<W: Write + Send>(
        &self,
        inputs: &[String],
        out: W,
        key: &str,
    ) -> Result<(W, u64), AnalyticsError> {
        let (mut out, mut writer, mut rows) = (Some(out), None, 0);
        for input in inputs {
            self.read_batches(input, None, &mut |batch| {
                if let Some(out) = out.take() {
                    let props = Some(writer_properties());
                    writer = Some(ArrowWriter::try_new(out, batch.schema(), props)?);
                }
                rows += batch.num_rows() as u64;
                match &mut writer {
                    Some(w) => Ok(w.write(&batch)?),
                    None => Ok(()),
                }
            })?;
        }
        match writer {
            Some(w) => Ok((w.into_inner()?, rows)),
            None => Err(AnalyticsError::Corrupt(format!(
                "no rows to merge into {}",
                self.locate(key)
            ))),
        }
    }

    /// Hands each record batch of the Parquet file `key` to `f` (an object-store file is
    /// fetched whole): every column, or those named in `columns` that the file has (a file
    /// written before a column existed lacks it).
    pub(crate) fn read_batches(
        &self,
        key: &str,
        columns: Option<&[&str]>,
        f: &mut dyn FnMut(RecordBatch) -> Result<(), AnalyticsError>,
    ) -> Result<(), AnalyticsError> {
        fn each(
            file: impl ChunkReader + 'static,
            columns: Option<&[&str]>,
            f: &mut dyn FnMut(RecordBatch) -> Result<(), AnalyticsError>,
        ) -> Result<(), AnalyticsError> {
            let mut builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
            if let Some(columns) = columns {
                let roots: Vec<usize> = builder
                    .schema()
                    .fields()
                    .iter()
                    .enumerate()
                    .filter(|(_, field)| columns.contains(&field.name().as_str()))
                    .map(|(i, _)| i)
                    .collect();
                let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
                builder = builder.with_projection(mask);
            }
            for batch in builder.build()? {
                f(batch?)?;
            }
            Ok(())
        }
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(key);
                each(File::open(&path).at(&path)?, columns, f)
            }
            Backend::Remote(r) => {
                let path = r.object(key)?;
                each(
                    r.block_on(key, async { r.store.get(&path).await?.bytes().await })?,
                    columns,
                    f,
                )
            }
        }
    }

    /// Reads the events of a `delivery_events` Parquet file.
    pub(crate) fn read_events(&self, key: &str) -> Result<Vec<DeliveryEvent>, AnalyticsError> {
        let mut out = Vec::new();
        self.read_batches(key, None, &mut |batch| {
            out.extend(batch_to_events(&batch)?);
            Ok(())
        })?;
        Ok(out)
    }
    /// Writes `key` atomically and durably; meant for a key written once (a manifest). A local
    /// file is replaced if present (temporary file, fsync, rename), as the sink's file lock
    /// rules out another writer; an object store refuses to overwrite an existing object
    /// ([`object_store::Error::AlreadyExists`]), which fences a second sink (module docs).
    pub(crate) fn put_new(&self, key: &str, bytes: &[u8]) -> Result<(), AnalyticsError> {
        let root = match &self.backend {
            Backend::Local(root) => root,
            Backend::Remote(r) => return r.put(key, bytes.to_vec(), PutMode::Create),
        };
        let path = root.join(key);
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
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(key);
                fs::read(&path).at(&path)
            }
            Backend::Remote(r) => {
                let path = r.object(key)?;
                let bytes = r.block_on(key, async { r.store.get(&path).await?.bytes().await })?;
                Ok(bytes.to_vec())
            }
        }
    }

    /// Moves `from` to `to`; `Ok(false)` if `from` does not exist.
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<bool, AnalyticsError> {
        match &self.backend {
            Backend::Local(root) => {
                let (from, to) = (root.join(from), root.join(to));
                create_parent(&to)?;
                match fs::rename(&from, &to) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == ErrorKind::NotFound && !from.exists() => Ok(false),
                    Err(e) => Err(e).at(&from),
                }
            }
            Backend::Remote(r) => {
                let (source, target) = (r.object(from)?, r.object(to)?);
                match r.runtime.block_on(r.store.copy(&source, &target)) {
                    Ok(()) => {}
                    Err(object_store::Error::NotFound { .. }) => return Ok(false),
                    Err(e) => return Err(r.error(from, e)),
                }
                r.delete(from)?;
                Ok(true)
            }
        }
    }

    /// Whether `key` exists.
    pub(crate) fn exists(&self, key: &str) -> Result<bool, AnalyticsError> {
        match &self.backend {
            Backend::Local(root) => Ok(root.join(key).exists()),
            Backend::Remote(r) => {
                let path = r.object(key)?;
                match r.runtime.block_on(r.store.head(&path)) {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(r.error(key, e)),
                }
            }
        }
    }

    /// Makes the entries of directory `dir` durable (an object store has no directories).
    pub(crate) fn sync_dir(&self, dir: &str) -> Result<(), AnalyticsError> {
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(dir);
                File::open(&path).and_then(|d| d.sync_all()).at(&path)
            }
            Backend::Remote(_) => Ok(()),
        }
    }

    /// The names of the files directly in `dir` (none if it does not exist).
    pub(crate) fn list(&self, dir: &str) -> Result<Vec<String>, AnalyticsError> {
        Ok(self
            .entries(dir, false)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// The names and sizes in bytes of the files directly in `dir` (none if it does not exist).
    pub(crate) fn list_sized(&self, dir: &str) -> Result<Vec<(String, u64)>, AnalyticsError> {
        self.entries(dir, false)
    }

    /// The names of the directories (key prefixes) directly in `dir` (none if it does not exist).
    pub(crate) fn dirs(&self, dir: &str) -> Result<Vec<String>, AnalyticsError> {
        Ok(self
            .entries(dir, true)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// The names of the files (with their sizes), or of the directories (size 0), directly in
    /// `dir`.
    fn entries(&self, dir: &str, dirs: bool) -> Result<Vec<(String, u64)>, AnalyticsError> {
        let root = match &self.backend {
            Backend::Local(root) => root,
            Backend::Remote(r) => {
                let path = r.object(dir)?;
                let listed = r.block_on(dir, r.store.list_with_delimiter(Some(&path)))?;
                let names: Vec<(ObjectPath, u64)> = if dirs {
                    listed.common_prefixes.into_iter().map(|p| (p, 0)).collect()
                } else {
                    listed
                        .objects
                        .into_iter()
                        .map(|o| (o.location, o.size))
                        .collect()
                };
                return Ok(names
                    .iter()
                    .filter_map(|(p, size)| Some((p.filename()?.to_string(), *size)))
                    .collect());
            }
        };
        let path = root.join(dir);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).at(&path),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.at(&path)?;
            let kind = entry.file_type().at(&path)?;
            if if dirs { kind.is_dir() } else { kind.is_file() } {
                let size = if dirs {
                    0
                } else {
                    entry.metadata().at(&path)?.len()
                };
                names.extend(entry.file_name().to_str().map(|n| (n.to_string(), size)));
            }
        }
        Ok(names)
    }

    /// Deletes `key` if it exists.
    pub(crate) fn delete(&self, key: &str) -> Result<(), AnalyticsError> {
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(key);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != ErrorKind::NotFound => Err(e).at(&path),
                    _ => Ok(()),
                }
            }
            Backend::Remote(r) => r.delete(key),
        }
    }
}

/// A local warehouse shows as its directory, an object-store one as `s3://bucket/prefix`.
impl fmt::Display for Warehouse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Local(root) => write!(f, "{}", root.display()),
            Backend::Remote(r) if r.prefix.is_empty() => f.write_str(&r.bucket_url),
            Backend::Remote(r) => write!(f, "{}/{}", r.bucket_url, r.prefix),
        }
    }
}

impl Remote {
    fn locate(&self, key: &str) -> String {
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => format!("{}/{key}", self.bucket_url),
            (false, true) => format!("{}/{}", self.bucket_url, self.prefix),
            (false, false) => format!("{}/{}/{key}", self.bucket_url, self.prefix),
        }
    }

    /// The object path of `key` in the bucket.
    fn object(&self, key: &str) -> Result<ObjectPath, AnalyticsError> {
        let full = match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{key}", self.prefix),
        };
        ObjectPath::parse(full).map_err(|e| self.error(key, e.into()))
    }

    fn error(&self, key: &str, source: object_store::Error) -> AnalyticsError {
        AnalyticsError::ObjectStore {
            location: self.locate(key),
            source,
        }
    }

    /// Runs a request on `key` to completion (from a blocking thread).
    fn block_on<T>(
        &self,
        key: &str,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, AnalyticsError> {
        self.runtime
            .block_on(request)
            .map_err(|e| self.error(key, e))
    }

    fn put(&self, key: &str, bytes: Vec<u8>, mode: PutMode) -> Result<(), AnalyticsError> {
        let path = self.object(key)?;
        self.block_on(key, self.store.put_opts(&path, bytes.into(), mode.into()))?;
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), AnalyticsError> {
        let path = self.object(key)?;
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }
}

/// Encodes `batch` as one zstd-compressed Parquet file with statistics into `out`.
fn encode_parquet<W: Write + Send>(batch: &RecordBatch, out: W) -> Result<W, AnalyticsError> {
    let mut writer = ArrowWriter::try_new(out, batch.schema(), Some(writer_properties()))?;
    writer.write(batch)?;
    Ok(writer.into_inner()?)
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
    use crate::testing::{TestWarehouse, blocking, sample_events};
    use chrono::TimeZone;

    #[test]
    fn partitions_are_by_utc_date_and_hour() {
        let ts = Utc.with_ymd_and_hms(2026, 11, 26, 7, 59, 59).unwrap();
        assert_eq!(
            Warehouse::partition_of(ts),
            "delivery_events/dt=2026-11-26/hour=07"
        );
        // Read back: the directories name the start of the event's hour.
        let start =
            Warehouse::day_of("dt=2026-11-26").unwrap() + Warehouse::hour_of("hour=07").unwrap();
        assert_eq!(start, Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, 0).unwrap());
        for bad in ["dt=2026-13-01", "hour=07", "dt=x"] {
            assert_eq!(Warehouse::day_of(bad), None, "{bad}");
        }
        for bad in ["hour=24", "hour=-1", "dt=2026-11-26", "hour=x"] {
            assert_eq!(Warehouse::hour_of(bad), None, "{bad}");
        }
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

    /// Moves report a missing source, and listings see only the files directly in a directory.
    fn check_renames_and_listings(wh: &Warehouse) {
        wh.put_new("a/x", b"1").unwrap();
        assert!(wh.rename("a/x", "b/c/y").unwrap());
        assert!(!wh.rename("a/x", "b/c/y").unwrap());
        assert!(!wh.exists("a/x").unwrap());
        assert!(wh.exists("b/c/y").unwrap());
        assert_eq!(wh.get("b/c/y").unwrap(), b"1");
        assert_eq!(wh.list("b/c").unwrap(), vec!["y".to_string()]);
        assert!(wh.list("b").unwrap().is_empty());
        assert_eq!(wh.dirs("b").unwrap(), vec!["c".to_string()]);
        assert!(wh.dirs("b/c").unwrap().is_empty());
        assert!(wh.dirs("nope").unwrap().is_empty());
        assert!(wh.list("nope").unwrap().is_empty());
        wh.delete("b/c/y").unwrap();
        wh.delete("b/c/y").unwrap();
        assert!(!wh.exists("b/c/y").unwrap());
    }

    #[test]
    fn renames_report_a_missing_source() {
        let dir = tempfile::tempdir().unwrap();
        check_renames_and_listings(&Warehouse::local(dir.path()));
    }

    #[tokio::test]
    async fn s3_renames_report_a_missing_source() {
        let wh = TestWarehouse::s3().await;
        blocking(&wh.wh, check_renames_and_listings).await;
    }

    #[tokio::test]
    async fn s3_parquet_files_read_back_and_put_new_refuses_to_overwrite() {
        let wh = TestWarehouse::s3().await;
        blocking(&wh.wh, |wh| {
            let events = sample_events(20, 0);
            wh.write_parquet("t/a.parquet", &events_to_batch(&events))
                .unwrap();
            assert_eq!(wh.read_events("t/a.parquet").unwrap(), events);

            wh.put_new("m/1.json", b"first").unwrap();
            let err = wh.put_new("m/1.json", b"second").unwrap_err();
            assert!(
                matches!(
                    &err,
                    AnalyticsError::ObjectStore {
                        source: object_store::Error::AlreadyExists { .. },
                        ..
                    }
                ),
                "{err}"
            );
            assert!(!err.is_retryable());
            assert_eq!(wh.get("m/1.json").unwrap(), b"first");
            let missing = wh.get("m/2.json").unwrap_err();
            assert!(
                missing.to_string().contains("/herald/warehouse/m/2.json"),
                "{missing}"
            );
        })
        .await;
    }

    #[test]
    fn a_local_put_new_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::local(dir.path());
        wh.put_new("m/1.json", b"first").unwrap();
        wh.put_new("m/1.json", b"second").unwrap();
        assert_eq!(wh.get("m/1.json").unwrap(), b"second");
    }

    #[tokio::test]
    async fn locations_open_a_local_directory_or_an_s3_prefix() {
        let shown = |location: &str| Warehouse::open(location).map(|wh| wh.to_string());
        assert_eq!(shown("/var/herald/wh").unwrap(), "/var/herald/wh");
        assert_eq!(shown("relative/wh").unwrap(), "relative/wh");
        assert_eq!(shown("s3://bucket").unwrap(), "s3://bucket");
        assert_eq!(shown("s3://bucket/").unwrap(), "s3://bucket");
        assert_eq!(shown("s3://bucket/a/b/").unwrap(), "s3://bucket/a/b");
        let wh = Warehouse::open("s3://bucket/a/b").unwrap();
        assert_eq!(
            wh.locate("_manifests/1.json"),
            "s3://bucket/a/b/_manifests/1.json"
        );
        assert_eq!(wh.table_url("t"), "s3://bucket/a/b/t/");
        for bad in [
            "s3://",
            "s3:///a",
            "s3://bucket/a//b",
            "gs://bucket/a",
            "file:///tmp",
        ] {
            let err = Warehouse::open(bad).unwrap_err();
            assert!(
                matches!(err, AnalyticsError::Location { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn an_s3_warehouse_needs_a_tokio_runtime() {
        let err = Warehouse::open("s3://bucket/a").unwrap_err();
        assert!(err.to_string().contains("Tokio runtime"), "{err}");
    }
}
