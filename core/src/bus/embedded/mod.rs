//! The embedded bus: a durable write-ahead log in a local directory, for the one-machine
//! deployment. Nothing accepted is lost when the process is killed.
//!
//! # Layout
//!
//! ```text
//! <dir>/_lock                                   held (flock) by the one bus using <dir>
//! <dir>/<topic>/partitions                      the topic's partition count, fixed at creation
//! <dir>/<topic>/<partition>/<base:020>.log      segment files; <base> is the first offset inside
//! <dir>/_groups/<group>/<topic>.offsets         committed offsets ("<partition> <next_offset>" lines)
//! ```
//!
//! Topic names are 1–249 characters of `[A-Za-z0-9._-]`, not `.` or `..`, and must not start
//! with `_` (reserved for the bus's own files). Topics are created on first publish or subscribe.
//! The record framing is described in the `format` submodule.
//!
//! # Why segment files
//!
//! Each partition is an append-only sequence of files. Appends and reads are sequential; a
//! crash can only damage the tail of the last file, so recovery on open scans just that file,
//! checks each record's CRC and truncates at the first torn record; and retention frees space
//! by deleting whole files, with no compaction.
//!
//! # Group commit
//!
//! Every publish is handed to one writer thread. The writer takes all publishes waiting at that
//! moment, appends each touched partition's records with one `write`, then issues one
//! `fdatasync` per touched file (in parallel), and only then makes the records visible to
//! consumers and completes the waiting callers. While a batch is being synced the next one
//! accumulates, so throughput grows with the number of concurrent publishers instead of being
//! capped at one sync per record. With fsync on, the writer also waits up to 200 µs for the
//! callers it just completed to publish again, so that a device flush is not spent on the
//! first of them alone. A failed batch is truncated away and every caller in it gets the error.
//!
//! # Durability
//!
//! `publish` returns only after its records have been written with `write(2)`: they are in the
//! kernel's page cache, so they survive the process being killed (`kill -9`, a panic, an OOM
//! kill) with `fsync = false` (the default). With `fsync = true` they have also been
//! flushed to the device, so they survive a power loss or kernel crash too. Committed consumer
//! offsets follow the same rule. A segment may overshoot `segment_bytes` by one batch, because
//! a batch is never split across files.
//!
//! # Consumers
//!
//! A group has one member at a time on the embedded bus: it reads every partition, fairly,
//! starting at the group's committed offsets. Consumers see only records that are durable and
//! acknowledged. Retention deletes a segment once every record in it is below the offset
//! committed by every group that has ever committed on the topic; a group that never committed
//! on a topic does not hold data back (it then starts at the oldest record left).

mod consumer;
mod format;
mod groups;
mod topic;
mod writer;

#[cfg(test)]
mod tests;

use super::{Bus, BusError, Consumer, Record, lock, run_blocking};
use async_trait::async_trait;
use consumer::EmbeddedConsumer;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::sync::oneshot;
use topic::Topic;
use writer::{Append, Writer};

/// The lock file that keeps two buses from using one directory.
const LOCK_FILE: &str = "_lock";
/// Kafka's limit, kept so topic names stay portable to the distributed deployment.
const MAX_TOPIC_NAME: usize = 249;

/// Settings of the embedded bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedBusConfig {
    /// Partitions of each topic this bus creates (existing topics keep their count). Consumers
    /// read partitions in parallel only in the distributed deployment, so this mostly matters
    /// for compatibility with it. Default 4; 0 counts as 1.
    pub partitions: u32,
    /// Size in bytes at which a segment file is closed and a new one started. Retention deletes
    /// whole segments, so this is also its granularity. Default 64 MiB.
    pub segment_bytes: u64,
    /// Flush every batch to the device (`fdatasync`) before acknowledging it, so acknowledged
    /// records survive a power loss, not just a process crash. Default false: without it records
    /// still survive a killed process, which is the same level the SQLite store (WAL,
    /// `synchronous = NORMAL`) keeps, and acceptance is about 45% faster (see the README).
    pub fsync: bool,
}

impl Default for EmbeddedBusConfig {
    fn default() -> Self {
        EmbeddedBusConfig {
            partitions: 4,
            segment_bytes: 64 << 20,
            fsync: false,
        }
    }
}

/// The embedded write-ahead-log bus. Cloning is cheap and shares the bus. The directory stays
/// locked until every clone and every consumer is dropped; the last drop waits for the writer
/// to finish the batch in progress.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus")
            .field("dir", &self.inner.root)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// State shared by the bus handles and their consumers.
struct Inner {
    root: PathBuf,
    config: EmbeddedBusConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation (held on a blocking thread, never across an await).
    creating: Mutex<()>,
    // Field order matters: the writer is stopped before the directory lock is released.
    writer: Writer,
    _dir_lock: File,
}

impl EmbeddedBus {
    /// Opens (creating if needed) the bus in `dir`, recovering every topic: torn record tails
    /// left by a crash are truncated. Fails if another bus, in this process or another, has the
    /// directory open. The file work runs on a blocking thread, so this must be called inside a
    /// Tokio runtime.
    pub async fn open(dir: &Path, config: EmbeddedBusConfig) -> Result<EmbeddedBus, BusError> {
        let root = dir.to_owned();
        let inner = run_blocking(move || Inner::open(root, config)).await?;
        Ok(EmbeddedBus {
            inner: Arc::new(inner),
        })
    }

    /// The topic `name`, created if it does not exist yet.
    async fn topic(&self, name: &str) -> Result<Arc<Topic>, BusError> {
        if let Some(topic) = read(&self.inner.topics).get(name) {
            return Ok(topic.clone());
        }
        check_topic_name(name)?;
        let inner = self.inner.clone();
        let name = name.to_owned();
        run_blocking(move || inner.create_topic(&name)).await
    }
}

impl Inner {
    fn open(root: PathBuf, config: EmbeddedBusConfig) -> Result<Inner, BusError> {
        fs::create_dir_all(&root)?;
        let dir_lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK_FILE))?;
        dir_lock.try_lock().map_err(|e| match e {
            TryLockError::WouldBlock => BusError::Io(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another embedded bus", root.display()),
            )),
            TryLockError::Error(e) => BusError::Io(e),
        })?;
        let mut topics = HashMap::new();
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if entry.file_type()?.is_dir() && check_topic_name(&name).is_ok() {
                let topic = Topic::open(&root, &name, config.partitions.max(1), config.fsync)?;
                topics.insert(name, Arc::new(topic));
            }
        }
        let writer = Writer::start(config.segment_bytes, config.fsync)?;
        Ok(Inner {
            root,
            config,
            topics: RwLock::new(topics),
            creating: Mutex::new(()),
            writer,
            _dir_lock: dir_lock,
        })
    }

    /// Blocking.
    fn create_topic(&self, name: &str) -> Result<Arc<Topic>, BusError> {
        let _creating = lock(&self.creating);
        if let Some(topic) = read(&self.topics).get(name) {
            return Ok(topic.clone());
        }
        let partitions = self.config.partitions.max(1);
        let topic = Arc::new(Topic::open(
            &self.root,
            name,
            partitions,
            self.config.fsync,
        )?);
        write(&self.topics).insert(name.to_owned(), topic.clone());
        Ok(topic)
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, topic: &str, records: Vec<Record>) -> Result<(), BusError> {
        records.iter().try_for_each(format::check_record)?;
        let topic = self.topic(topic).await?;
        if records.is_empty() {
            return Ok(());
        }
        let (done, acked) = oneshot::channel();
        self.inner.writer.submit(Append {
            topic,
            records,
            done,
        })?;
        acked.await.map_err(|_| BusError::Closed)?
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, BusError> {
        if group.is_empty() {
            return Err(invalid_input("empty consumer group name".into()));
        }
        let topic = self.topic(topic).await?;
        if !lock(&topic.members).insert(group.to_owned()) {
            return Err(BusError::GroupBusy {
                group: group.to_owned(),
                topic: topic.name.clone(),
            });
        }
        let consumer = EmbeddedConsumer::new(self.inner.clone(), topic, group.to_owned());
        Ok(Box::new(consumer))
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64, BusError> {
        match read(&self.inner.topics).get(topic) {
            Some(topic) => Ok(topic.lag(group)),
            None => Err(BusError::UnknownTopic(topic.to_owned())),
        }
    }
}

/// Rejects names that are not valid topic directory names (see the module docs).
fn check_topic_name(name: &str) -> Result<(), BusError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME
        && name != "."
        && name != ".."
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(BusError::UnknownTopic(name.to_owned()))
    }
}

/// An error for a caller's bad argument.
fn invalid_input(message: String) -> BusError {
    BusError::InvalidArgument(message)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
