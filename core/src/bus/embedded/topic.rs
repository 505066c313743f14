//! A topic on disk: its partitions' segment files, recovery on open, what readers may see,
//! committed group offsets, and retention.

use super::format::{self, Next, SegmentReader};
use super::groups::{self, GroupOffsets};
use super::lock;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The file in a topic's directory that fixes its partition count.
const PARTITIONS_FILE: &str = "partitions";
/// Retention runs after a commit at most this often per topic.
const RETENTION_INTERVAL: Duration = Duration::from_secs(5);

pub(super) struct Topic {
    pub(super) name: String,
    pub(super) partitions: Vec<Partition>,
    /// Bumped by the writer after each durable append, to wake waiting consumers.
    pub(super) appended: watch::Sender<()>,
    /// Groups with a live consumer (the embedded bus allows one member per group).
    pub(super) members: Mutex<HashSet<String>>,
    /// Every group that has committed on this topic, including in earlier runs.
    groups: Mutex<HashMap<String, Arc<GroupOffsets>>>,
    root: PathBuf,
    fsync: bool,
    last_retention: Mutex<Option<Instant>>,
}

pub(super) struct Partition {
    pub(super) dir: PathBuf,
    /// Base offsets of the segment files, ascending; the last one is the active segment.
    pub(super) segments: Mutex<Vec<u64>>,
    /// What readers may read: only durable, acknowledged records.
    pub(super) visible: Mutex<Visible>,
    /// The append side; only the writer thread locks it after the topic is opened.
    pub(super) active: Mutex<Active>,
}

/// The durable extent of a partition, published by the writer after each group commit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Visible {
    /// One past the last durable offset.
    pub(super) end: u64,
    /// Base offset of the segment the writer appends to.
    pub(super) active_base: u64,
    /// Durable bytes in that segment: readers stop here, never reading bytes that may be rolled back.
    pub(super) active_len: u64,
}

/// The segment file being appended to.
pub(super) struct Active {
    pub(super) file: File,
    pub(super) base: u64,
    /// Bytes of acknowledged records in `file`.
    pub(super) len: u64,
    /// The offset the next record gets.
    pub(super) next: u64,
    /// A failed append could not be truncated away: retry before the next write.
    pub(super) needs_truncate: bool,
}

impl Topic {
    /// Opens the topic `name` under `root`, creating it with `partitions` partitions if it does
    /// not exist, and recovers the tail of every partition. Blocking.
    pub(super) fn open(root: &Path, name: &str, partitions: u32, fsync: bool) -> io::Result<Topic> {
        let dir = root.join(name);
        let count = match fs::read_to_string(dir.join(PARTITIONS_FILE)) {
            Ok(text) => text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad partition count in {}", dir.display()),
                    )
                })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_topic_dir(root, &dir, partitions, fsync)?;
                partitions
            }
            Err(e) => return Err(e),
        };
        let partitions = (0..count)
            .map(|p| Partition::open(dir.join(p.to_string()), fsync))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Topic {
            name: name.to_owned(),
            partitions,
            appended: watch::Sender::new(()),
            members: Mutex::new(HashSet::new()),
            groups: Mutex::new(groups::load(root, name, count)?),
            root: root.to_owned(),
            fsync,
            last_retention: Mutex::new(None),
        })
    }

    /// The group's committed next offset per partition (0 where it never committed).
    pub(super) fn committed(&self, group: &str) -> Vec<u64> {
        match lock(&self.groups).get(group) {
            Some(offsets) => offsets.committed(),
            None => vec![0; self.partitions.len()],
        }
    }

    /// Records not committed by `group`, summed over partitions. Records deleted by retention
    /// are not counted.
    pub(super) fn lag(&self, group: &str) -> u64 {
        let committed = self.committed(group);
        self.partitions
            .iter()
            .zip(committed)
            .map(|(p, c)| {
                let start = lock(&p.segments).first().copied().unwrap_or(0);
                lock(&p.visible).end.saturating_sub(c.max(start))
            })
            .sum()
    }

    /// Makes `positions` (partition, next offset; partitions in range) durable for `group`, then
    /// applies retention if it is due. Blocking.
    pub(super) fn commit(&self, group: &str, positions: &[(u32, u64)]) -> io::Result<()> {
        let offsets = lock(&self.groups)
            .entry(group.to_owned())
            .or_insert_with(|| {
                let n = self.partitions.len() as u32;
                Arc::new(groups::fresh(&self.root, group, &self.name, n))
            })
            .clone();
        offsets.commit(positions, self.fsync)?;
        self.retain_if_due();
        Ok(())
    }

    /// Deletes every segment, except the active one, whose records are all below the lowest
    /// offset committed on its partition by any group that ever committed on the topic. A group
    /// that never committed here does not hold data back (its consumer skips to the oldest
    /// segment left). Runs at most once per [`RETENTION_INTERVAL`]; failures are only logged,
    /// since the next run retries them.
    fn retain_if_due(&self) {
        {
            let mut last = lock(&self.last_retention);
            if last.is_some_and(|t| t.elapsed() < RETENTION_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let groups: Vec<Vec<u64>> = lock(&self.groups).values().map(|g| g.committed()).collect();
        if groups.is_empty() {
            return;
        }
        for (index, partition) in self.partitions.iter().enumerate() {
            let min = groups.iter().map(|c| c[index]).min().unwrap_or(0);
            let doomed: Vec<u64> = {
                let mut segments = lock(&partition.segments);
                // Segment i ends just before segment i + 1 begins.
                let n = segments.windows(2).take_while(|w| w[1] <= min).count();
                segments.drain(..n).collect()
            };
            for base in doomed {
                let path = format::segment_path(&partition.dir, base);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::debug!(topic = %self.name, path = %path.display(), "retention deleted segment")
                    }
                    Err(e) => {
                        tracing::warn!(topic = %self.name, path = %path.display(), error = %e, "retention could not delete segment")
                    }
                }
            }
        }
    }
}

impl Partition {
    /// Opens (creating if needed) a partition directory and recovers its last segment: frames
    /// are checked up to the first torn or damaged one, where the file is truncated.
    fn open(dir: PathBuf, fsync: bool) -> io::Result<Partition> {
        if !dir.exists() {
            fs::create_dir_all(&dir)?;
            if fsync {
                // The new directory's entry in the topic directory must survive a power loss too.
                if let Some(topic_dir) = dir.parent() {
                    File::open(topic_dir)?.sync_all()?;
                }
            }
        }
        let mut segments = Vec::new();
        for entry in fs::read_dir(&dir)? {
            if let Some(base) = entry?
                .file_name()
                .to_str()
                .and_then(format::parse_segment_name)
            {
                segments.push(base);
            }
        }
        segments.sort_unstable();
        let base = match segments.last() {
            Some(&base) => base,
            None => {
                create_segment(&dir, 0, fsync)?;
                segments.push(0);
                0
            }
        };
        let path = format::segment_path(&dir, base);
        let (len, next) = recover_segment(&path, base)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        if file.metadata()?.len() > len {
            tracing::warn!(path = %path.display(), valid_bytes = len, "truncating a torn or damaged log tail");
            file.set_len(len)?;
            file.sync_all()?;
        }
        Ok(Partition {
            dir,
            segments: Mutex::new(segments),
            visible: Mutex::new(Visible {
                end: next,
                active_base: base,
                active_len: len,
            }),
            active: Mutex::new(Active {
                file,
                base,
                len,
                next,
                needs_truncate: false,
            }),
        })
    }
}

/// The length of the valid prefix of a segment and the offset after its last valid record.
fn recover_segment(path: &Path, base: u64) -> io::Result<(u64, u64)> {
    let mut reader = SegmentReader::open(path, base)?;
    let limit = reader.file_len()?;
    let mut next = base;
    loop {
        let valid = reader.position();
        match reader.next_frame(limit)? {
            Next::Frame(frame) if format::frame_offset(frame) == next => next += 1,
            Next::Frame(_) | Next::Torn | Next::End => return Ok((valid, next)),
        }
    }
}

/// Creates the empty segment file `base` (replacing a leftover from a failed roll) and makes its
/// directory entry durable. Returns it opened for appending.
pub(super) fn create_segment(dir: &Path, base: u64, fsync: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(format::segment_path(dir, base))?;
    file.set_len(0)?;
    if fsync {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// Creates a topic directory whose partition count is recorded before anything else, so that a
/// crash part-way through leaves a topic that opens with the intended count.
fn create_topic_dir(root: &Path, dir: &Path, partitions: u32, fsync: bool) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{PARTITIONS_FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(format!("{partitions}\n").as_bytes())?;
    if fsync {
        file.sync_all()?;
    }
    fs::rename(&tmp, dir.join(PARTITIONS_FILE))?;
    if fsync {
        File::open(dir)?.sync_all()?;
        File::open(root)?.sync_all()?;
    }
    Ok(())
}
