//! The embedded bus's consumer: one member per group, reading every partition of a topic through
//! a cursor per partition (an open segment file and its read buffer kept between polls).

use super::format::{self, Next, SegmentReader};
use super::topic::{Partition, Topic, Visible};
use super::{Inner, invalid_input, lock, run_blocking};
use crate::bus::{BusError, Consumer, Delivered, Position, Record};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub(super) struct EmbeddedConsumer {
    /// Keeps the bus (its writer and its directory lock) alive while the consumer is.
    _bus: Arc<Inner>,
    topic: Arc<Topic>,
    group: String,
    appended: watch::Receiver<()>,
    /// Shared with the blocking task that reads files. Records read but not yet returned wait in
    /// `ready`, so a poll that is cancelled mid-read loses nothing.
    state: Arc<Mutex<ReadState>>,
}

struct ReadState {
    cursors: Vec<Cursor>,
    ready: VecDeque<Delivered>,
    /// The partition read first by the next fill, rotated for fairness.
    turn: usize,
}

/// A read position in one partition.
struct Cursor {
    /// The next offset to return.
    next: u64,
    segment: Option<OpenSegment>,
}

struct OpenSegment {
    reader: SegmentReader,
    /// The file's length, fetched once the segment is no longer the active one (it is final then).
    sealed_len: Option<u64>,
}

impl EmbeddedConsumer {
    /// A consumer starting at `committed`. The caller has registered `group` in `topic.members`;
    /// dropping the consumer removes it.
    pub(super) fn new(bus: Arc<Inner>, topic: Arc<Topic>, group: String) -> Self {
        let cursors = topic
            .committed(&group)
            .into_iter()
            .map(|next| Cursor {
                next,
                segment: None,
            })
            .collect();
        EmbeddedConsumer {
            _bus: bus,
            appended: topic.appended.subscribe(),
            topic,
            group,
            state: Arc::new(Mutex::new(ReadState {
                cursors,
                ready: VecDeque::new(),
                turn: 0,
            })),
        }
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        lock(&self.topic.members).remove(&self.group);
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>, BusError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Mark the current extent as seen before looking, so no append is missed in between.
            self.appended.mark_unchanged();
            let (buffered, behind) = {
                let state = lock(&self.state);
                (state.ready.len(), state.behind(&self.topic))
            };
            if buffered < max && behind {
                let state = self.state.clone();
                let topic = self.topic.clone();
                run_blocking(move || lock(&state).fill(&topic, max)).await?;
            }
            let records = lock(&self.state).take(max);
            if !records.is_empty() || max == 0 {
                return Ok(records);
            }
            let appended = self.appended.changed();
            let woken = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, appended).await.ok(),
                None => Some(appended.await),
            };
            match woken {
                None => return Ok(Vec::new()),
                Some(Err(_)) => return Err(BusError::Closed),
                Some(Ok(())) => {}
            }
        }
    }

    async fn commit(&mut self, positions: &[Position]) -> Result<(), BusError> {
        let count = self.topic.partitions.len();
        if let Some(bad) = positions.iter().find(|p| p.partition as usize >= count) {
            return Err(invalid_input(format!(
                "partition {} out of range: topic `{}` has {count}",
                bad.partition, self.topic.name
            )));
        }
        if positions.is_empty() {
            return Ok(());
        }
        let positions: Vec<(u32, u64)> = positions
            .iter()
            .map(|p| (p.partition, p.next_offset))
            .collect();
        let topic = self.topic.clone();
        let group = self.group.clone();
        run_blocking(move || Ok(topic.commit(&group, &positions)?)).await
    }
}

impl ReadState {
    /// Whether some partition has durable records this consumer has not read yet.
    fn behind(&self, topic: &Topic) -> bool {
        self.cursors
            .iter()
            .zip(&topic.partitions)
            .any(|(c, p)| c.next < lock(&p.visible).end)
    }

    fn take(&mut self, max: usize) -> Vec<Delivered> {
        let n = max.min(self.ready.len());
        self.ready.drain(..n).collect()
    }

    /// Reads until `ready` holds `max` records or every partition is caught up, taking one
    /// record from each partition in turn so that a busy partition cannot starve the others.
    /// Blocking.
    fn fill(&mut self, topic: &Topic, max: usize) -> Result<(), BusError> {
        let visible: Vec<Visible> = topic.partitions.iter().map(|p| *lock(&p.visible)).collect();
        let count = self.cursors.len();
        let first = self.turn;
        self.turn = (self.turn + 1) % count.max(1);
        let mut caught_up = vec![false; count];
        while self.ready.len() < max && caught_up.contains(&false) {
            for i in (0..count).map(|k| (first + k) % count) {
                if self.ready.len() >= max {
                    break;
                }
                if caught_up[i] {
                    continue;
                }
                match self.cursors[i].read(&topic.partitions[i], visible[i])? {
                    Some((offset, record)) => self.ready.push_back(Delivered {
                        topic: topic.name.clone(),
                        partition: i as u32,
                        offset,
                        record,
                    }),
                    None => caught_up[i] = true,
                }
            }
        }
        Ok(())
    }
}

impl Cursor {
    /// The next record below `visible.end`, if any. Blocking.
    fn read(
        &mut self,
        partition: &Partition,
        visible: Visible,
    ) -> Result<Option<(u64, Record)>, BusError> {
        loop {
            if self.next >= visible.end {
                return Ok(None);
            }
            let segment = match self.segment.take() {
                Some(segment) => segment,
                None => self.open(partition)?,
            };
            let segment = self.segment.insert(segment);
            let active = segment.reader.base == visible.active_base;
            let limit = match (active, segment.sealed_len) {
                (true, _) => visible.active_len,
                (false, Some(len)) => len,
                (false, None) => *segment.sealed_len.insert(segment.reader.file_len()?),
            };
            let base = segment.reader.base;
            match segment.reader.next_frame(limit)? {
                Next::Frame(frame) => {
                    // Frames before the start position are skipped without decoding them.
                    if format::frame_offset(frame) >= self.next {
                        let (offset, record) = format::decode(frame)?;
                        self.next = offset + 1;
                        return Ok(Some((offset, record)));
                    }
                }
                // Inconsistent with `visible.end`; stop rather than spin.
                Next::End if active => return Ok(None),
                Next::Torn if active => {
                    return Err(BusError::Corrupt(format!(
                        "damaged record in {}",
                        format::segment_path(&partition.dir, base).display()
                    )));
                }
                end_of_sealed => {
                    if matches!(end_of_sealed, Next::Torn) {
                        // Only possible after a power loss with fsync off; later segments are intact.
                        tracing::warn!(segment = %format::segment_path(&partition.dir, base).display(),
                            "skipping the damaged tail of a sealed segment");
                    }
                    let following = lock(&partition.segments)
                        .iter()
                        .copied()
                        .find(|&b| b > base);
                    let following = following.ok_or_else(|| {
                        BusError::Corrupt(format!(
                            "no segment after {base} in {}",
                            partition.dir.display()
                        ))
                    })?;
                    self.next = self.next.max(following);
                    self.segment = None;
                }
            }
        }
    }

    /// Opens the segment holding `next`, or the oldest one left if retention deleted it (then
    /// `next` moves to that segment's base). Blocking.
    fn open(&mut self, partition: &Partition) -> Result<OpenSegment, BusError> {
        loop {
            let base = {
                let segments = lock(&partition.segments);
                let holding = segments.iter().rev().find(|&&b| b <= self.next);
                match holding.or(segments.first()) {
                    Some(&base) => base,
                    None => return Err(BusError::Corrupt("partition without segments".into())),
                }
            };
            self.next = self.next.max(base);
            let path = format::segment_path(&partition.dir, base);
            match SegmentReader::open(&path, base) {
                Ok(reader) => {
                    return Ok(OpenSegment {
                        reader,
                        sealed_len: None,
                    });
                }
                // Retention deleted it after we looked it up: look again.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && !lock(&partition.segments).contains(&base) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
