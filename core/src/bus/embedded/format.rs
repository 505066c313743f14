//! Record framing and sequential frame reading.
//!
//! A frame, all integers little-endian:
//!
//! ```text
//! [u32 len][u32 crc][u64 offset][u32 key_len][key][u32 header_count]
//!     {[u16 name_len][name][u32 value_len][value]}*  [payload]
//! ```
//!
//! `len` counts the bytes after the `crc` field and `crc` is the CRC-32 (IEEE) of exactly those
//! bytes, so a frame torn by a crash or damaged on disk is detected before it is decoded. The
//! payload takes the rest of the frame. Storing the offset in every frame lets recovery check that
//! a segment holds consecutive offsets starting at its base.

use super::super::{BusError, Record};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Bytes before the checksummed body: `len` and `crc`.
const PREFIX: usize = 8;
/// Bytes read from a segment file at a time.
const READ_CHUNK: usize = 64 * 1024;

/// The path of the segment whose first record has offset `base`.
pub(super) fn segment_path(partition_dir: &Path, base: u64) -> PathBuf {
    partition_dir.join(format!("{base:020}.log"))
}

/// The base offset named by a segment file name, if `name` is one.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Checks that `record` fits the frame's length fields, so that a batch never fails half-way
/// through encoding.
pub(super) fn check_record(record: &Record) -> Result<(), BusError> {
    let too_big = |what: &str| {
        BusError::InvalidArgument(format!(
            "record {what} too large for the embedded log's frame format"
        ))
    };
    if record.key.len() > u32::MAX as usize {
        return Err(too_big("key"));
    }
    if record.headers.len() > u32::MAX as usize {
        return Err(too_big("header count"));
    }
    for (name, value) in &record.headers {
        if name.len() > usize::from(u16::MAX) || value.len() > u32::MAX as usize {
            return Err(too_big("header"));
        }
    }
    if body_len(record) > u32::MAX as usize {
        return Err(too_big("size"));
    }
    Ok(())
}

fn body_len(record: &Record) -> usize {
    let headers: usize = record
        .headers
        .iter()
        .map(|(n, v)| 2 + n.len() + 4 + v.len())
        .sum();
    8 + 4 + record.key.len() + 4 + headers + record.payload.len()
}

/// Appends the frame of `record` at `offset` to `buf`. The record must have passed
/// [`check_record`], which makes the length casts below lossless.
pub(super) fn encode(buf: &mut Vec<u8>, offset: u64, record: &Record) {
    let start = buf.len();
    let body = body_len(record);
    buf.reserve(PREFIX + body);
    buf.extend_from_slice(&(body as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled in below
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&(record.key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record.key);
    buf.extend_from_slice(&(record.headers.len() as u32).to_le_bytes());
    for (name, value) in &record.headers {
        buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(value.as_bytes());
    }
    buf.extend_from_slice(&record.payload);
    let crc = crc32fast::hash(&buf[start + PREFIX..]);
    buf[start + 4..start + PREFIX].copy_from_slice(&crc.to_le_bytes());
}

/// The offset stored in a frame returned by [`SegmentReader::next_frame`] (which checked its
/// length), without decoding the rest.
pub(super) fn frame_offset(frame: &[u8]) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&frame[PREFIX..PREFIX + 8]);
    u64::from_le_bytes(bytes)
}

/// Decodes a checked frame into its offset and record.
pub(super) fn decode(frame: &[u8]) -> Result<(u64, Record), BusError> {
    let corrupt = || BusError::Corrupt("malformed record frame".into());
    let mut body = Fields(&frame[PREFIX..]);
    let offset = body.u64().ok_or_else(corrupt)?;
    let key_len = body.u32().ok_or_else(corrupt)?;
    let key = body.bytes(key_len as usize).ok_or_else(corrupt)?.to_vec();
    let count = body.u32().ok_or_else(corrupt)?;
    let mut headers = Vec::new();
    for _ in 0..count {
        let name_len = body.u16().ok_or_else(corrupt)?;
        let name = body.string(usize::from(name_len)).ok_or_else(corrupt)?;
        let value_len = body.u32().ok_or_else(corrupt)?;
        let value = body.string(value_len as usize).ok_or_else(corrupt)?;
        headers.push((name, value));
    }
    let record = Record {
        key,
        payload: body.0.to_vec(),
        headers,
    };
    Ok((offset, record))
}

/// A little-endian field reader over a frame body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn string(&mut self, n: usize) -> Option<String> {
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
}

/// What [`SegmentReader::next_frame`] found.
pub(super) enum Next<'a> {
    /// A whole frame with a valid checksum (length prefix included).
    Frame(&'a [u8]),
    /// No bytes left before the limit: the reader has caught up.
    End,
    /// Bytes that are not a whole valid frame: a torn or damaged tail.
    Torn,
}

/// Reads the frames of one segment file in order through its own buffer, never past a byte limit
/// given per call. The limit is what keeps readers off bytes that the writer has written but not
/// yet made durable (and might still roll back).
pub(super) struct SegmentReader {
    file: File,
    /// Offset of the segment's first record.
    pub(super) base: u64,
    buf: Vec<u8>,
    /// Index in `buf` of the first byte not yet returned.
    start: usize,
    /// File position just past the last byte in `buf`.
    file_pos: u64,
}

impl SegmentReader {
    pub(super) fn open(path: &Path, base: u64) -> io::Result<Self> {
        Ok(SegmentReader {
            file: File::open(path)?,
            base,
            buf: Vec::new(),
            start: 0,
            file_pos: 0,
        })
    }

    /// The length of the file now.
    pub(super) fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The file position of the first byte not yet returned as part of a frame.
    pub(super) fn position(&self) -> u64 {
        self.file_pos - (self.buf.len() - self.start) as u64
    }

    /// The next frame lying wholly before byte `limit` of the file. The limit also bounds what a
    /// damaged length prefix can make the reader allocate, so pass the file's length rather than
    /// "no limit" for a file that is not growing.
    pub(super) fn next_frame(&mut self, limit: u64) -> io::Result<Next<'_>> {
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() >= PREFIX {
                let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
                let total = PREFIX + len;
                // The smallest valid body is offset + key_len + header_count.
                if len < 16 || self.position() + total as u64 > limit {
                    return Ok(Next::Torn);
                }
                if avail.len() >= total {
                    let crc = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
                    if crc32fast::hash(&avail[PREFIX..total]) != crc {
                        return Ok(Next::Torn);
                    }
                    let frame = self.start..self.start + total;
                    self.start += total;
                    return Ok(Next::Frame(&self.buf[frame]));
                }
            }
            if !self.fill(limit)? {
                return Ok(if self.start == self.buf.len() {
                    Next::End
                } else {
                    Next::Torn
                });
            }
        }
    }

    /// Reads more bytes, up to `limit`; false when nothing more could be read.
    fn fill(&mut self, limit: u64) -> io::Result<bool> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let wanted = READ_CHUNK.max(self.frame_len_hint());
        let room = usize::try_from(limit.saturating_sub(self.file_pos)).unwrap_or(usize::MAX);
        let n = wanted.min(room);
        if n == 0 {
            return Ok(false);
        }
        let old = self.buf.len();
        self.buf.resize(old + n, 0);
        let read = loop {
            match self.file.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                self.buf.truncate(old);
                return Err(e);
            }
        };
        self.buf.truncate(old + read);
        self.file_pos += read as u64;
        Ok(read > 0)
    }

    /// The whole length of a frame whose prefix is buffered, so that large frames are read in one go.
    fn frame_len_hint(&self) -> usize {
        match self.buf.get(self.start..self.start + 4) {
            Some(len) => PREFIX + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn frames_round_trip_and_torn_tails_are_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = segment_path(dir.path(), 7);
        assert_eq!(parse_segment_name("00000000000000000007.log"), Some(7));
        assert_eq!(parse_segment_name("7.log"), None);

        let mut record = Record::new("key", "payload");
        record.headers.push(("reason".into(), "bad json ✓".into()));
        let mut buf = Vec::new();
        encode(&mut buf, 7, &record);
        encode(&mut buf, 8, &Record::new("", ""));
        let whole = buf.len() as u64;
        buf.extend_from_slice(&[1, 0, 0]); // a torn third frame
        File::create(&path)
            .and_then(|mut f| f.write_all(&buf))
            .expect("write");

        let mut reader = SegmentReader::open(&path, 7).expect("open");
        let Next::Frame(frame) = reader.next_frame(whole).expect("read") else {
            panic!("expected a frame");
        };
        assert_eq!(frame_offset(frame), 7);
        assert_eq!(decode(frame).expect("decode"), (7, record));
        assert!(matches!(reader.next_frame(whole), Ok(Next::Frame(_))));
        assert!(matches!(reader.next_frame(whole), Ok(Next::End)));
        assert_eq!(reader.position(), whole);
        let len = reader.file_len().expect("len");
        assert!(matches!(reader.next_frame(len), Ok(Next::Torn)));
    }
}
