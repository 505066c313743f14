//! The group-commit writer: a dedicated thread that takes every publish waiting at the moment,
//! appends each touched partition's records with one `write`, makes every touched file durable
//! with one `fdatasync` (in parallel across files, since each costs a device flush), then
//! publishes the new extent to readers and completes every waiting caller. While one batch is
//! being made durable the next one queues up, so the number of syncs per second stays bounded
//! however many callers publish.

use super::format;
use super::lock;
use super::topic::{self, Active, Partition, Topic, Visible};
use crate::bus::{BusError, Record, partition_for};
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The longest the writer waits for more callers before syncing a batch; see [`gather`].
const GATHER_WAIT: Duration = Duration::from_micros(200);
/// Encode buffers larger than this are not kept for reuse.
const MAX_REUSED_BUFFER: usize = 4 << 20;

/// One `publish` call waiting for its records to be durable.
pub(super) struct Append {
    pub(super) topic: Arc<Topic>,
    pub(super) records: Vec<Record>,
    pub(super) done: oneshot::Sender<Result<(), BusError>>,
}

/// Handle to the writer thread; dropping it lets the thread finish what is queued, then joins it.
pub(super) struct Writer {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Append>,
    /// While the writer waits: the queue length at which a submitter wakes it (others need not).
    wake_at: Option<usize>,
    closed: bool,
}

impl Writer {
    pub(super) fn start(segment_bytes: u64, fsync: bool) -> io::Result<Writer> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread = thread::Builder::new()
            .name("herald-bus-writer".into())
            .spawn(move || run(&thread_shared, segment_bytes, fsync))?;
        Ok(Writer {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues an append; its `done` is completed once the records are durable (or failed).
    pub(super) fn submit(&self, append: Append) -> Result<(), BusError> {
        let mut queue = lock(&self.shared.queue);
        if queue.closed {
            return Err(BusError::Closed);
        }
        queue.pending.push(append);
        if queue.wake_at.is_some_and(|n| queue.pending.len() >= n) {
            queue.wake_at = None;
            drop(queue);
            self.shared.wake.notify_one();
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // A panic in the writer has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}

/// If the writer thread ever unwinds, later publishes fail with `Closed` instead of waiting forever.
struct CloseOnExit<'a>(&'a Shared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.closed = true;
        queue.pending.clear();
    }
}

fn run(shared: &Shared, segment_bytes: u64, fsync: bool) {
    let _close = CloseOnExit(shared);
    let mut batch = Vec::new();
    let mut buffers = Vec::new();
    let mut last_batch = 0;
    loop {
        {
            let mut queue = lock(&shared.queue);
            while queue.pending.is_empty() {
                if queue.closed {
                    return;
                }
                queue.wake_at = Some(1);
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if fsync {
                queue = gather(shared, queue, last_batch);
            }
            queue.wake_at = None;
            std::mem::swap(&mut queue.pending, &mut batch);
        }
        last_batch = batch.len();
        let result = append_batch(&batch, &mut buffers, segment_bytes, fsync);
        for append in batch.drain(..) {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(BusError::Io(io::Error::new(e.kind(), e.to_string()))),
            };
            // A caller that stopped waiting does not need the answer.
            let _ = append.done.send(outcome);
        }
    }
}

/// Waits up to [`GATHER_WAIT`] for the queue to grow back to the size of the last batch.
///
/// Callers completed together tend to publish again together, but the first of them wakes the
/// writer before the rest arrive; syncing at once would spend a whole device flush on a handful
/// of records and leave the others waiting a full flush longer. A short wait, small next to a
/// flush, keeps batches large. Only used with fsync: without it a batch is cheap anyway.
fn gather<'a>(
    shared: &'a Shared,
    mut queue: MutexGuard<'a, Queue>,
    last_batch: usize,
) -> MutexGuard<'a, Queue> {
    let deadline = Instant::now() + GATHER_WAIT;
    while queue.pending.len() < last_batch && !queue.closed {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        queue.wake_at = Some(last_batch);
        queue = shared
            .wake
            .wait_timeout(queue, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    queue
}

/// The records of one batch bound for one partition.
struct Pending<'a> {
    topic: &'a Topic,
    partition: &'a Partition,
    frames: Vec<u8>,
    /// The offset after the last encoded record.
    next: u64,
}

/// Appends a whole batch, all or nothing: on any failure every touched file is truncated back
/// and nothing becomes visible.
fn append_batch(
    batch: &[Append],
    buffers: &mut Vec<Vec<u8>>,
    segment_bytes: u64,
    fsync: bool,
) -> io::Result<()> {
    let mut pending: Vec<Pending<'_>> = Vec::new();
    for append in batch {
        let topic = &*append.topic;
        let count = topic.partitions.len() as u32;
        for record in &append.records {
            let partition = &topic.partitions[partition_for(&record.key, count) as usize];
            let index = match pending
                .iter()
                .position(|p| std::ptr::eq(p.partition, partition))
            {
                Some(index) => index,
                None => {
                    pending.push(Pending {
                        topic,
                        partition,
                        frames: buffers.pop().unwrap_or_default(),
                        next: lock(&partition.active).next,
                    });
                    pending.len() - 1
                }
            };
            let p = &mut pending[index];
            format::encode(&mut p.frames, p.next, record);
            p.next += 1;
        }
    }
    let result = write_and_sync(&pending, segment_bytes, fsync);
    for p in pending {
        let mut frames = p.frames;
        if frames.capacity() <= MAX_REUSED_BUFFER {
            frames.clear();
            buffers.push(frames);
        }
    }
    result
}

fn write_and_sync(pending: &[Pending<'_>], segment_bytes: u64, fsync: bool) -> io::Result<()> {
    let mut actives: Vec<MutexGuard<'_, Active>> =
        pending.iter().map(|p| lock(&p.partition.active)).collect();
    let mut attempted = 0;
    let mut result = Ok(());
    for (p, active) in pending.iter().zip(actives.iter_mut()) {
        attempted += 1;
        result = write_one(p, active, segment_bytes, fsync);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() && fsync {
        let files: Vec<&File> = actives.iter().map(|a| &a.file).collect();
        result = sync_files(&files);
    }
    if let Err(e) = result {
        for active in actives.iter_mut().take(attempted) {
            if active.file.set_len(active.len).is_err() {
                active.needs_truncate = true;
            }
        }
        return Err(e);
    }
    for (p, active) in pending.iter().zip(actives.iter_mut()) {
        active.len += p.frames.len() as u64;
        active.next = p.next;
        *lock(&p.partition.visible) = Visible {
            end: active.next,
            active_base: active.base,
            active_len: active.len,
        };
    }
    drop(actives);
    for (i, p) in pending.iter().enumerate() {
        if !pending[..i].iter().any(|q| std::ptr::eq(q.topic, p.topic)) {
            p.topic.appended.send_replace(());
        }
    }
    Ok(())
}

/// Appends one partition's frames, first rolling to a new segment if the active one is full (so a
/// segment may overshoot `segment_bytes` by one batch, and a batch never spans two files).
fn write_one(
    p: &Pending<'_>,
    active: &mut Active,
    segment_bytes: u64,
    fsync: bool,
) -> io::Result<()> {
    if active.needs_truncate {
        active.file.set_len(active.len)?;
        active.needs_truncate = false;
    }
    if active.len > 0 && active.len >= segment_bytes {
        // The full segment is already durable: every batch written to it was synced.
        active.file = topic::create_segment(&p.partition.dir, active.next, fsync)?;
        active.base = active.next;
        active.len = 0;
        lock(&p.partition.segments).push(active.base);
    }
    active.file.write_all(&p.frames)
}

/// `fdatasync`s every file, concurrently: each sync waits for a device flush, and flushes of
/// different files overlap.
fn sync_files(files: &[&File]) -> io::Result<()> {
    let Some((first, rest)) = files.split_first() else {
        return Ok(());
    };
    thread::scope(|scope| {
        let others: Vec<_> = rest
            .iter()
            .map(|&file| {
                thread::Builder::new()
                    .spawn_scoped(scope, move || file.sync_data())
                    .map_err(|_| file)
            })
            .collect();
        let mut result = first.sync_data();
        for other in others {
            let synced = match other {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("fsync thread panicked"))),
                // No thread to spare: sync here instead.
                Err(file) => file.sync_data(),
            };
            result = result.and(synced);
        }
        result
    })
}
