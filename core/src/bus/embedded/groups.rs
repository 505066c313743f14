//! Committed consumer-group offsets: `<dir>/_groups/<group>/<topic>.offsets`, one
//! `<partition> <next_offset>` line per partition, replaced atomically (temporary file, fsync,
//! rename, fsync of the directory) so that a crash leaves either the old or the new offsets.

use super::lock;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The directory under the bus's root that holds every group's offsets.
pub(super) const GROUPS_DIR: &str = "_groups";

/// One group's committed offsets on one topic.
pub(super) struct GroupOffsets {
    path: PathBuf,
    /// Next offset per partition, as last made durable (0 where the group never committed).
    committed: Mutex<Vec<u64>>,
    /// Serialises writers of the file; held across the file I/O, unlike `committed`, so that
    /// readers of the offsets never wait for a disk.
    io: Mutex<()>,
}

impl GroupOffsets {
    fn new(path: PathBuf, committed: Vec<u64>) -> Self {
        GroupOffsets {
            path,
            committed: Mutex::new(committed),
            io: Mutex::new(()),
        }
    }

    /// The committed offsets (a snapshot).
    pub(super) fn committed(&self) -> Vec<u64> {
        lock(&self.committed).clone()
    }

    /// Sets the given `(partition, next_offset)` pairs and makes the result durable before it
    /// becomes visible (retention trusts visible offsets). Partitions must be in range. Blocking.
    pub(super) fn commit(&self, positions: &[(u32, u64)], fsync: bool) -> io::Result<()> {
        let _io = lock(&self.io);
        let mut next = self.committed();
        for &(partition, offset) in positions {
            next[partition as usize] = offset;
        }
        store(&self.path, &next, fsync)?;
        *lock(&self.committed) = next;
        Ok(())
    }
}

/// The groups that have committed offsets on `topic`, read from disk. Blocking.
pub(super) fn load(
    root: &Path,
    topic: &str,
    partitions: u32,
) -> io::Result<HashMap<String, Arc<GroupOffsets>>> {
    let mut out = HashMap::new();
    let dir = root.join(GROUPS_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Some(group) = entry.file_name().to_str().and_then(unescape) else {
            continue;
        };
        let path = offsets_path(root, &group, topic);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let committed = parse(&text, partitions).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed offsets file {}", path.display()),
            )
        })?;
        out.insert(group, Arc::new(GroupOffsets::new(path, committed)));
    }
    Ok(out)
}

/// A group that has not committed on the topic yet: nothing on disk until its first commit.
pub(super) fn fresh(root: &Path, group: &str, topic: &str, partitions: u32) -> GroupOffsets {
    GroupOffsets::new(
        offsets_path(root, group, topic),
        vec![0; partitions as usize],
    )
}

fn offsets_path(root: &Path, group: &str, topic: &str) -> PathBuf {
    root.join(GROUPS_DIR)
        .join(escape(group))
        .join(format!("{topic}.offsets"))
}

fn parse(text: &str, partitions: u32) -> Option<Vec<u64>> {
    let mut committed = vec![0; partitions as usize];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (partition, offset) = line.trim().split_once(' ')?;
        let slot = committed.get_mut(partition.parse::<usize>().ok()?)?;
        *slot = offset.trim().parse().ok()?;
    }
    Some(committed)
}

fn store(path: &Path, committed: &[u64], fsync: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(path);
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        if fsync {
            // Make the new group directory's own entry durable, and the groups directory's.
            for d in dir.ancestors().skip(1).take(2) {
                File::open(d)?.sync_all()?;
            }
        }
    }
    let mut text = String::new();
    for (partition, offset) in committed.iter().enumerate() {
        text.push_str(&format!("{partition} {offset}\n"));
    }
    let tmp = path.with_extension("offsets.tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    if fsync {
        file.sync_data()?;
    }
    fs::rename(&tmp, path)?;
    if fsync {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A group name as a directory name: ASCII letters, digits, `_` and `-` stay, every other byte
/// becomes `%XX`, so any group name is safe on disk and still readable in the usual case.
fn escape(group: &str) -> String {
    let mut out = String::with_capacity(group.len());
    for b in group.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(name: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_escape_reversibly() {
        for name in ["dispatch", "herald.dispatch", "a/b", "..", "组", "x%y"] {
            let escaped = escape(name);
            assert!(
                escaped
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b))
            );
            assert_eq!(unescape(&escaped).as_deref(), Some(name));
        }
        assert_eq!(escape("herald.dispatch"), "herald%2Edispatch");
    }

    #[test]
    fn offsets_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let group = fresh(dir.path(), "g.1", "t", 3);
        group.commit(&[(0, 5), (2, 9)], true).expect("commit");
        group.commit(&[(0, 6)], true).expect("commit");
        let loaded = load(dir.path(), "t", 3).expect("load");
        assert_eq!(loaded["g.1"].committed(), vec![6, 0, 9]);
        assert!(load(dir.path(), "other", 3).expect("load").is_empty());
    }
}
