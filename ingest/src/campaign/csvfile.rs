//! The receiver file of a campaign: split into stored pieces as it is uploaded, and read back
//! one piece at a time when it runs.
//!
//! The upload is parsed as it arrives (a push parser, `csv-core`) only to find where rows end:
//! each stored piece ends on a row boundary, so a run parses every piece on its own with the
//! `csv` crate, and resumes at any row by starting from the piece that holds it. Lines are
//! counted as an editor shows them: `\n`, `\r\n` and a `\r` alone (old Mac files) each end
//! one.

use csv_core::{ReadRecordResult, Reader};
use herald_core::store::CampaignChunk;

/// Size a stored piece reaches before it is cut at the next row boundary.
pub(crate) const CHUNK_BYTES: usize = 1024 * 1024;

/// Longest row accepted, in bytes.
pub(crate) const MAX_ROW_BYTES: usize = 1024 * 1024;

/// The column every file has.
pub(crate) const RECEIVER: &str = "receiver";

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// Why an upload is not a campaign file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadCsv(pub(crate) String);

/// Splits an upload into pieces of whole rows, after reading its header.
pub(crate) struct Splitter {
    reader: Reader,
    /// Whether the parser has had its first read. `csv_core` drops a byte order mark only when
    /// its first read holds all of it, which depends on how the upload was framed; so the
    /// splitter drops the file's mark itself and gives the parser one byte first.
    started: bool,
    /// Bytes not yet in a piece (after the header).
    buf: Vec<u8>,
    /// How much of `buf` the parser has seen.
    parsed: usize,
    /// Where in `buf` the last whole row ends.
    cut: usize,
    header: Option<Vec<String>>,
    /// The header's field bytes and ends so far, while it is read.
    header_out: Vec<u8>,
    header_used: usize,
    header_ends: Vec<usize>,
    header_fields: usize,
    /// Data rows seen, and up to `cut`.
    rows: i64,
    rows_at_cut: i64,
    /// The next piece's number, first row and first line.
    seq: i64,
    first_row: i64,
    first_line: i64,
    /// Whether what was cut off before `buf` ended with a `\r`: a line break unless `buf`
    /// starts with the `\n` of a `\r\n` (the parser ends a record on its `\r`).
    pending_cr: bool,
    scratch: Vec<u8>,
    scratch_ends: Vec<usize>,
}

impl Splitter {
    pub(crate) fn new() -> Self {
        Splitter {
            reader: Reader::new(),
            started: false,
            buf: Vec::new(),
            parsed: 0,
            cut: 0,
            header: None,
            header_out: vec![0; 1024],
            header_used: 0,
            header_ends: vec![0; 64],
            header_fields: 0,
            rows: 0,
            rows_at_cut: 0,
            seq: 0,
            first_row: 0,
            first_line: 1,
            pending_cr: false,
            scratch: vec![0; 64 * 1024],
            scratch_ends: vec![0; 1024],
        }
    }

    /// The header, once it was read.
    pub(crate) fn header(&self) -> Option<&[String]> {
        self.header.as_deref()
    }

    /// Data rows seen so far.
    pub(crate) fn rows(&self) -> i64 {
        self.rows
    }

    /// Takes the next bytes of the upload; returns the pieces that are now complete.
    pub(crate) fn push(&mut self, data: &[u8]) -> Result<Vec<CampaignChunk>, BadCsv> {
        self.buf.extend_from_slice(data);
        self.parse(false)
    }

    /// Ends the upload; returns the last pieces.
    pub(crate) fn finish(&mut self) -> Result<Vec<CampaignChunk>, BadCsv> {
        let mut out = self.parse(true)?;
        if self.header.is_none() {
            return Err(BadCsv("the file is empty: it needs a header row".into()));
        }
        if self.cut > 0 {
            out.push(self.take_piece());
        }
        Ok(out)
    }

    fn parse(&mut self, eof: bool) -> Result<Vec<CampaignChunk>, BadCsv> {
        let mut out = Vec::new();
        loop {
            let mut input = &self.buf[self.parsed..];
            let at_end = input.is_empty();
            if at_end && !eof {
                break;
            }
            let first = !self.started;
            if first {
                if !eof && self.buf.len() <= BOM.len() && BOM.starts_with(&self.buf) {
                    // Perhaps a mark: wait for its other bytes, and for one after it (the
                    // parser takes an empty read for the end of the file).
                    break;
                }
                if self.buf.starts_with(BOM) {
                    self.parsed = BOM.len();
                }
                input = &self.buf[self.parsed..];
                input = &input[..input.len().min(1)];
                self.started = true;
            }
            let (result, nin) = match self.header {
                None => {
                    let (r, nin, nout, nend) = self.reader.read_record(
                        input,
                        &mut self.header_out[self.header_used..],
                        &mut self.header_ends[self.header_fields..],
                    );
                    self.header_used += nout;
                    self.header_fields += nend;
                    (r, nin)
                }
                Some(_) => {
                    // Data rows are only delimited here; their fields are read when the
                    // campaign runs, so what the parser copies out is thrown away.
                    let (r, nin, _, _) =
                        self.reader
                            .read_record(input, &mut self.scratch, &mut self.scratch_ends);
                    (r, nin)
                }
            };
            self.parsed += nin;
            if self.parsed - self.cut > MAX_ROW_BYTES {
                let start = row_start(&self.buf, self.cut);
                return Err(BadCsv(format!(
                    "the row starting on line {} is longer than {MAX_ROW_BYTES} bytes",
                    self.line_at(start)
                )));
            }
            match result {
                ReadRecordResult::InputEmpty => {
                    if (!eof || at_end) && !first {
                        break;
                    }
                }
                ReadRecordResult::OutputFull => {
                    if self.header.is_none() {
                        self.grow_header(true)?;
                    }
                }
                ReadRecordResult::OutputEndsFull => {
                    if self.header.is_none() {
                        self.grow_header(false)?;
                    }
                }
                ReadRecordResult::Record => {
                    if self.header.is_none() {
                        self.read_header()?;
                    } else {
                        self.rows += 1;
                        self.cut = self.parsed;
                        self.rows_at_cut = self.rows;
                        if self.cut >= CHUNK_BYTES {
                            out.push(self.take_piece());
                        }
                    }
                }
                ReadRecordResult::End => break,
            }
        }
        Ok(out)
    }

    fn grow_header(&mut self, out: bool) -> Result<(), BadCsv> {
        let v = if out {
            self.header_out.len()
        } else {
            self.header_ends.len()
        };
        if v >= 64 * 1024 {
            return Err(BadCsv("the header row is too long".into()));
        }
        if out {
            self.header_out.resize(v * 2, 0);
        } else {
            self.header_ends.resize(v * 2, 0);
        }
        Ok(())
    }

    fn read_header(&mut self) -> Result<(), BadCsv> {
        let mut columns = Vec::with_capacity(self.header_fields);
        let mut start = 0;
        for &end in &self.header_ends[..self.header_fields] {
            let name = std::str::from_utf8(&self.header_out[start..end])
                .map_err(|_| BadCsv("the header row is not UTF-8".into()))?;
            // A second byte order mark, or one before another column, is dropped too.
            columns.push(name.trim_start_matches('\u{feff}').trim().to_string());
            start = end;
        }
        check_header(&columns)?;
        self.header = Some(columns);
        let header = self.buf.drain(..self.parsed);
        self.first_line += count_lines(header.as_slice());
        self.pending_cr = header.as_slice().ends_with(b"\r");
        drop(header);
        self.parsed = 0;
        Ok(())
    }

    /// The line of byte `at` of `buf`, where a row starts.
    fn line_at(&self, at: usize) -> i64 {
        let end = (at + 1).min(self.buf.len());
        self.first_line + self.lone_cr_before() + count_lines(&self.buf[..end])
    }

    /// 1 if the `\r` that ended what was cut off before `buf` is a line break of its own.
    fn lone_cr_before(&self) -> i64 {
        i64::from(self.pending_cr && self.buf.first() != Some(&b'\n'))
    }

    /// The rows up to `cut` as the next piece.
    fn take_piece(&mut self) -> CampaignChunk {
        let first_line = self.first_line + self.lone_cr_before();
        let data: Vec<u8> = self.buf.drain(..self.cut).collect();
        let piece = CampaignChunk {
            seq: self.seq,
            first_row: self.first_row,
            first_line,
            data,
        };
        self.seq += 1;
        self.first_row = self.rows_at_cut;
        self.first_line = first_line + count_lines(&piece.data);
        self.pending_cr = piece.data.ends_with(b"\r");
        self.parsed -= self.cut;
        self.cut = 0;
        piece
    }
}

/// A header has one `receiver` column and names every column once.
fn check_header(columns: &[String]) -> Result<(), BadCsv> {
    if !columns.iter().any(|c| c == RECEIVER) {
        return Err(BadCsv(format!(
            "the header row has no `{RECEIVER}` column (it has: {})",
            columns.join(", ")
        )));
    }
    for (i, c) in columns.iter().enumerate() {
        if c.is_empty() {
            return Err(BadCsv(format!(
                "column {} of the header has no name",
                i + 1
            )));
        }
        if columns[..i].contains(c) {
            return Err(BadCsv(format!("the header names column `{c}` twice")));
        }
    }
    Ok(())
}

/// Where the row after byte `from` starts: past the line ends (and blank lines) before it.
fn row_start(data: &[u8], mut from: usize) -> usize {
    while from < data.len() && matches!(data[from], b'\r' | b'\n') {
        from += 1;
    }
    from
}

/// The line breaks in `bytes`: each `\n`, and each `\r` not followed by a `\n`. A `\r` at
/// the end is not counted: what follows it decides.
fn count_lines(bytes: &[u8]) -> i64 {
    let lf = bytes.iter().filter(|&&b| b == b'\n').count();
    let lone_cr = bytes
        .windows(2)
        .filter(|w| w[0] == b'\r' && w[1] != b'\n')
        .count();
    (lf + lone_cr) as i64
}

/// One row of a stored piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    /// Its line in the file.
    pub(crate) line: i64,
    pub(crate) fields: csv::ByteRecord,
}

/// The rows of a stored piece, in order, with their lines. (The `csv` crate's positions cannot
/// give lines: a record's position is where the one before it ended, before the line end and
/// blank lines between them.)
pub(crate) fn rows(chunk: &CampaignChunk) -> impl Iterator<Item = Result<Row, String>> + '_ {
    let data = chunk.data.as_slice();
    let (mut seen, mut line) = (0, chunk.first_line);
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(OneByteFirst { data, first: true })
        .into_byte_records()
        .map(move |r| {
            let fields = r.map_err(|e| format!("the stored file does not parse: {e}"))?;
            let ended = fields.position().map_or(seen, |p| p.byte() as usize);
            let start = row_start(data, ended.max(seen));
            // With the row's first byte, which tells whether a `\r` just before it ends a line.
            line += count_lines(&data[seen..(start + 1).min(data.len())]);
            seen = start;
            Ok(Row { line, fields })
        })
}

/// A piece's bytes for the `csv` crate, the first read one byte long. The parser drops a byte
/// order mark at the start of its first read, and a piece holds only data rows (a file's own
/// mark is before its header): a row that starts with one keeps it, as it does when the row is
/// not the first of its piece, and as the upload's parser saw it.
struct OneByteFirst<'a> {
    data: &'a [u8],
    first: bool,
}

impl std::io::Read for OneByteFirst<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = if std::mem::take(&mut self.first) {
            buf.len().min(1)
        } else {
            buf.len()
        };
        self.data.read(&mut buf[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of `file` as (line, fields), split into pieces as an upload in `step`-byte
    /// frames would be, then read back piece by piece (the fuzz check's own splitting, which
    /// also checks the pieces' order and row counts).
    fn through_pieces(file: &[u8], step: usize) -> (Vec<String>, Vec<(i64, Vec<String>)>) {
        let (header, rows) = crate::fuzzing::split_campaign_file(file, step).unwrap();
        let rows = rows
            .into_iter()
            .map(|(line, fields)| {
                let fields = fields
                    .iter()
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect();
                (line, fields)
            })
            .collect();
        (header, rows)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rows_keep_their_lines_across_pieces_and_frames() {
        // CRLF, a quoted field with a newline in it, a blank line, no final newline, a BOM.
        let file = "\u{feff}receiver,name\r\nalice,\"A\nB\"\r\n\r\nbob,Bob\r\n\n\ncarol,\"x,y\"";
        for step in [1, 2, 3, 7, 1000] {
            let (header, rows) = through_pieces(file.as_bytes(), step);
            assert_eq!(header, ["receiver", "name"], "step {step}");
            assert_eq!(
                rows,
                vec![
                    (2, strings(&["alice", "A\nB"])),
                    (5, strings(&["bob", "Bob"])),
                    (8, strings(&["carol", "x,y"])),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_carriage_return_alone_ends_a_line() {
        // Old Mac files: `\r` alone; mixed with `\r\n` and `\n`; one in a quoted field.
        let file = "receiver,name\ralice,A\r\rbob,\"B\rC\"\rcarol,x\r\n\rdave,y\n\r\reve,z\r";
        for step in [1, 2, 3, 1000] {
            let (_, rows) = through_pieces(file.as_bytes(), step);
            let lines: Vec<(i64, &str)> = rows
                .iter()
                .map(|(line, fields)| (*line, fields[0].as_str()))
                .collect();
            assert_eq!(
                lines,
                [
                    (2, "alice"),
                    (4, "bob"),
                    (6, "carol"),
                    (8, "dave"),
                    (11, "eve")
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_byte_order_mark_before_a_quoted_header_is_dropped_in_every_framing() {
        // Found by fuzzing: in one-byte frames the parser kept the mark, and the quotes with it.
        let file = "\u{feff}\"receiver\",name\nu1,x\n";
        for step in [1, 2, 3, 4, 1000] {
            let (header, rows) = through_pieces(file.as_bytes(), step);
            assert_eq!(header, ["receiver", "name"], "step {step}");
            assert_eq!(rows, vec![(2, strings(&["u1", "x"]))], "step {step}");
        }
    }

    #[test]
    fn a_byte_order_mark_is_dropped_before_the_header_only() {
        let file = "\u{feff}receiver,name\n\u{feff}u1,x\n\"u2\",\u{feff}\n";
        for step in [1, 2, 1000] {
            let (header, rows) = through_pieces(file.as_bytes(), step);
            assert_eq!(header, ["receiver", "name"], "step {step}");
            assert_eq!(
                rows,
                vec![
                    (2, strings(&["\u{feff}u1", "x"])),
                    (3, strings(&["u2", "\u{feff}"])),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn large_files_are_cut_on_row_boundaries() {
        for end in ["\r\n", "\r", "\n"] {
            large_file_cut_on_row_boundaries(end);
        }
    }

    /// Some rows over two lines, some blank lines, every line ending in `end`.
    fn large_file_cut_on_row_boundaries(end: &str) {
        let mut file = format!("receiver,name{end}");
        let n = 100_000;
        for i in 0..n {
            if i % 1000 == 7 {
                file.push_str(&format!("user{i},\"multi{end}line {i}\"{end}"));
            } else {
                file.push_str(&format!("user{i},name {i}{end}"));
            }
            if i % 5000 == 3 {
                file.push_str(end);
            }
        }
        let mut s = Splitter::new();
        let mut pieces = Vec::new();
        for frame in file.as_bytes().chunks(64 * 1024 + 13) {
            pieces.extend(s.push(frame).unwrap());
        }
        pieces.extend(s.finish().unwrap());
        assert!(pieces.len() > 1, "{} pieces", pieces.len());
        assert!(
            pieces
                .iter()
                .all(|p| p.data.len() < CHUNK_BYTES + 128 * 1024)
        );
        let mut line = 2;
        let mut count = 0;
        for p in &pieces {
            for r in rows(p) {
                let r = r.unwrap();
                let i = count;
                assert_eq!(r.line, line, "row {i}, {end:?}");
                assert_eq!(&r.fields[0], format!("user{i}").as_bytes());
                line += if i % 1000 == 7 { 2 } else { 1 };
                line += i64::from(i % 5000 == 3);
                count += 1;
            }
        }
        assert_eq!((count, s.rows()), (n, n as i64));
    }

    #[test]
    fn bad_headers_are_refused() {
        for (file, why) in [
            ("", "empty"),
            ("name,phone\nx,y\n", "no `receiver` column"),
            ("receiver,name,name\n", "twice"),
            ("receiver,,name\n", "column 2"),
        ] {
            let mut s = Splitter::new();
            let e = s
                .push(file.as_bytes())
                .and_then(|_| s.finish())
                .unwrap_err();
            assert!(e.0.contains(why), "{file:?}: {}", e.0);
        }
        let mut s = Splitter::new();
        s.push(b"receiver\n").unwrap();
        assert_eq!(s.finish().unwrap(), vec![]);
        assert_eq!(s.rows(), 0);
    }

    #[test]
    fn overlong_rows_are_refused() {
        let mut s = Splitter::new();
        s.push(b"receiver,name\nalice,x\n").unwrap();
        let long = vec![b'a'; MAX_ROW_BYTES + 10];
        let e = s.push(&long).unwrap_err();
        assert!(e.0.contains("on line 3"), "{}", e.0);
    }
}
