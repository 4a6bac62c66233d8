//! A streaming reader of `pg_dump --format=custom` archives, fed the dump in
//! pieces as it goes by, that counts the rows of every table's data.
//!
//! The agent feeds it the dump while backing up, so the manifest records the
//! exact row count of every table (not the planner's estimate); a restore
//! drill then checks the restored tables against those counts, and
//! `cairn backup verify` recounts them from the repository.
//!
//! Only what the counting needs is read: the header, the table of contents
//! (which dump id is which table), and the framing of the data blocks. The
//! layout follows `pg_backup_archiver.c` and `pg_backup_custom.c` of
//! PostgreSQL 12 to 17 (archive versions 1.14 to 1.16) for an archive
//! written to a pipe with compression off (`-Z0`), which is how Cairn runs
//! `pg_dump`:
//!
//! ```text
//! "PGDMP" vmaj vmin vrev intSize offSize format
//! compression (int before 1.15, one byte from 1.15)   creation time (7 ints)
//! database name, server version, pg_dump version (strings)
//! TOC: count, then per entry: dumpId, hadDumper, tableoid, oid, tag, desc,
//!      section, defn, dropStmt, copyStmt, namespace, tablespace, tableam,
//!      [relkind from 1.16], owner, "false", dependencies (strings to a NULL),
//!      data offset (flag byte + offSize bytes)
//! data blocks, in TOC order: type byte (1 data, 3 large objects), dumpId,
//!      then chunks (int length + bytes) up to a zero length; large objects
//!      are (oid, chunks...) pairs up to a zero oid
//! ```
//!
//! An int is a sign byte and `intSize` little-endian bytes; a string is an
//! int length (-1 for NULL) and its bytes. Table data is `COPY` text: one
//! row per newline (newlines inside values are escaped), ended by `\.` and
//! two blank lines in the archive versions that write them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Largest table of contents read (it is buffered until whole).
pub const MAX_TOC_BYTES: usize = 256 << 20;

const MAGIC: &[u8] = b"PGDMP";
const FORMAT_CUSTOM: u8 = 1;
const BLOCK_DATA: u8 = 1;
const BLOCK_LARGE_OBJECTS: u8 = 3;
/// What `dumpTableData_copy` writes after the rows.
const COPY_END: &[u8] = b"\\.\n\n\n";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a pg_dump custom-format archive: {0}")]
    NotCustomFormat(String),
    #[error("pg_dump archive version {0}.{1}.{2} is not supported (1.14 to 1.16 are)")]
    UnsupportedVersion(u8, u8, u8),
    #[error("the archive is compressed ({0}); Cairn dumps with -Z0")]
    Compressed(String),
    #[error("malformed archive: {0}")]
    Malformed(String),
    #[error("the archive ends early ({0})")]
    Truncated(&'static str),
}

/// The rows of one table's data in the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRows {
    pub schema: String,
    pub table: String,
    pub rows: u64,
}

/// What a whole archive holds, as far as counting goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveSummary {
    /// Like "1.14.0".
    pub archive_version: String,
    pub database: String,
    pub toc_entries: u64,
    /// Every `TABLE DATA` entry, in archive order.
    pub tables: Vec<TableRows>,
    pub large_objects: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    schema: String,
    tag: String,
    table_data: bool,
}

#[derive(Debug, Clone, Copy)]
enum Data {
    /// The type byte of the next block (or the end of the archive).
    BlockType,
    BlockId {
        kind: u8,
    },
    /// Length of the next chunk of table data.
    ChunkLength {
        index: Option<usize>,
    },
    ChunkBytes {
        index: Option<usize>,
        left: usize,
    },
    /// The oid of the next large object (0 ends the block).
    ObjectOid,
    ObjectChunkLength,
    ObjectChunkBytes {
        left: usize,
    },
}

/// Feed it the archive with [`ArchiveScanner::feed`], in order, then call
/// [`ArchiveScanner::finish`].
#[derive(Debug)]
pub struct ArchiveScanner {
    /// Bytes not yet parsed: the whole head until the TOC is read, then at
    /// most the few bytes of an int split across two feeds.
    pending: Vec<u8>,
    int_size: usize,
    head: Option<Head>,
    data: Data,
    summary: ArchiveSummary,
    /// Index in `summary.tables` by dump id.
    tables_by_id: HashMap<i64, usize>,
    /// The last bytes of each table's data, to spot the end marker.
    tails: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct Head {
    entries: HashMap<i64, Entry>,
}

impl Default for ArchiveScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ArchiveScanner {
    pub fn new() -> ArchiveScanner {
        ArchiveScanner {
            pending: Vec::new(),
            int_size: 4,
            head: None,
            data: Data::BlockType,
            summary: ArchiveSummary::default(),
            tables_by_id: HashMap::new(),
            tails: Vec::new(),
        }
    }

    /// The next bytes of the archive.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ArchiveError> {
        if self.head.is_none() {
            self.pending.extend_from_slice(bytes);
            match parse_head(&self.pending)? {
                None if self.pending.len() > MAX_TOC_BYTES => {
                    return Err(ArchiveError::Malformed(format!(
                        "the table of contents is larger than {MAX_TOC_BYTES} bytes"
                    )));
                }
                None => return Ok(()),
                Some((parsed, used)) => {
                    self.int_size = parsed.int_size;
                    self.summary.archive_version = parsed.version.clone();
                    self.summary.database = parsed.database.clone();
                    self.summary.toc_entries = parsed.entries.len() as u64;
                    let rest = self.pending.split_off(used);
                    self.pending.clear();
                    self.head = Some(Head {
                        entries: parsed.entries,
                    });
                    return self.feed_data(&rest);
                }
            }
        }
        // Finish an int split across feeds first.
        while !self.pending.is_empty() && !bytes.is_empty() {
            let want = 1 + self.int_size;
            let take = (want - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == want {
                let pending = std::mem::take(&mut self.pending);
                self.feed_data(&pending)?;
            }
        }
        self.feed_data(bytes)
    }

    fn feed_data(&mut self, mut bytes: &[u8]) -> Result<(), ArchiveError> {
        while !bytes.is_empty() {
            match self.data {
                Data::BlockType => {
                    let kind = bytes[0];
                    bytes = &bytes[1..];
                    if kind != BLOCK_DATA && kind != BLOCK_LARGE_OBJECTS {
                        return Err(ArchiveError::Malformed(format!(
                            "unknown data block type {kind}"
                        )));
                    }
                    self.data = Data::BlockId { kind };
                }
                Data::BlockId { kind } => {
                    let Some((id, used)) = self.take_int(bytes)? else {
                        return Ok(());
                    };
                    bytes = &bytes[used..];
                    self.data = if kind == BLOCK_LARGE_OBJECTS {
                        Data::ObjectOid
                    } else {
                        Data::ChunkLength {
                            index: self.table_index(id),
                        }
                    };
                }
                Data::ChunkLength { index } => {
                    let Some((length, used)) = self.take_int(bytes)? else {
                        return Ok(());
                    };
                    bytes = &bytes[used..];
                    self.data = match usize::try_from(length) {
                        Ok(0) => Data::BlockType,
                        Ok(left) => Data::ChunkBytes { index, left },
                        Err(_) => {
                            return Err(ArchiveError::Malformed(format!(
                                "negative data chunk length {length}"
                            )));
                        }
                    };
                }
                Data::ChunkBytes { index, left } => {
                    let take = left.min(bytes.len());
                    if let Some(index) = index {
                        self.count(index, &bytes[..take]);
                    }
                    bytes = &bytes[take..];
                    self.data = if take == left {
                        Data::ChunkLength { index }
                    } else {
                        Data::ChunkBytes {
                            index,
                            left: left - take,
                        }
                    };
                }
                Data::ObjectOid => {
                    let Some((oid, used)) = self.take_int(bytes)? else {
                        return Ok(());
                    };
                    bytes = &bytes[used..];
                    if oid == 0 {
                        self.data = Data::BlockType;
                    } else {
                        self.summary.large_objects += 1;
                        self.data = Data::ObjectChunkLength;
                    }
                }
                Data::ObjectChunkLength => {
                    let Some((length, used)) = self.take_int(bytes)? else {
                        return Ok(());
                    };
                    bytes = &bytes[used..];
                    self.data = match usize::try_from(length) {
                        Ok(0) => Data::ObjectOid,
                        Ok(left) => Data::ObjectChunkBytes { left },
                        Err(_) => {
                            return Err(ArchiveError::Malformed(format!(
                                "negative large object chunk length {length}"
                            )));
                        }
                    };
                }
                Data::ObjectChunkBytes { left } => {
                    let take = left.min(bytes.len());
                    bytes = &bytes[take..];
                    self.data = if take == left {
                        Data::ObjectChunkLength
                    } else {
                        Data::ObjectChunkBytes { left: left - take }
                    };
                }
            }
        }
        Ok(())
    }

    /// Reads an int from the front of `bytes`, or keeps a partial one in
    /// `pending` and returns `None`.
    fn take_int(&mut self, bytes: &[u8]) -> Result<Option<(i64, usize)>, ArchiveError> {
        let want = 1 + self.int_size;
        if bytes.len() < want {
            self.pending.extend_from_slice(bytes);
            return Ok(None);
        }
        Ok(Some((decode_int(&bytes[..want])?, want)))
    }

    fn table_index(&mut self, id: i64) -> Option<usize> {
        if let Some(index) = self.tables_by_id.get(&id) {
            return Some(*index);
        }
        let entry = self.head.as_ref()?.entries.get(&id)?;
        if !entry.table_data {
            return None;
        }
        let index = self.summary.tables.len();
        self.summary.tables.push(TableRows {
            schema: entry.schema.clone(),
            table: entry.tag.clone(),
            rows: 0,
        });
        self.tails.push(Vec::new());
        self.tables_by_id.insert(id, index);
        Some(index)
    }

    fn count(&mut self, index: usize, data: &[u8]) {
        self.summary.tables[index].rows += memchr::memchr_iter(b'\n', data).count() as u64;
        let tail = &mut self.tails[index];
        tail.extend_from_slice(&data[data.len().saturating_sub(COPY_END.len())..]);
        let excess = tail.len().saturating_sub(COPY_END.len());
        tail.drain(..excess);
    }

    /// Ends the archive: it must stop between blocks.
    pub fn finish(mut self) -> Result<ArchiveSummary, ArchiveError> {
        if self.head.is_none() {
            return Err(ArchiveError::Truncated("in the table of contents"));
        }
        if !matches!(self.data, Data::BlockType) || !self.pending.is_empty() {
            return Err(ArchiveError::Truncated("in a data block"));
        }
        // The end marker and its blank lines are not rows.
        for (table, tail) in self.summary.tables.iter_mut().zip(&self.tails) {
            if tail.as_slice() == COPY_END {
                table.rows = table.rows.saturating_sub(3);
            }
        }
        Ok(self.summary)
    }
}

struct ParsedHead {
    version: String,
    database: String,
    int_size: usize,
    entries: HashMap<i64, Entry>,
}

/// A cursor over the buffered head; `None` from a read means "need more".
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    int_size: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn int(&mut self) -> Option<Result<i64, ArchiveError>> {
        let size = 1 + self.int_size;
        self.take(size).map(decode_int)
    }

    fn string(&mut self) -> Option<Result<Option<String>, ArchiveError>> {
        let length = match self.int()? {
            Ok(length) => length,
            Err(error) => return Some(Err(error)),
        };
        if length < 0 {
            return Some(Ok(None));
        }
        let Ok(length) = usize::try_from(length) else {
            return Some(Err(ArchiveError::Malformed("string length".into())));
        };
        if length > MAX_TOC_BYTES {
            return Some(Err(ArchiveError::Malformed(format!(
                "a string of {length} bytes in the table of contents"
            ))));
        }
        let bytes = self.take(length)?;
        Some(Ok(Some(String::from_utf8_lossy(bytes).into_owned())))
    }
}

fn decode_int(bytes: &[u8]) -> Result<i64, ArchiveError> {
    let (sign, magnitude) = bytes
        .split_first()
        .ok_or(ArchiveError::Truncated("in an int"))?;
    let mut value: u64 = 0;
    for (shift, byte) in magnitude.iter().enumerate() {
        if shift >= 8 {
            if *byte != 0 {
                return Err(ArchiveError::Malformed("an int wider than 64 bits".into()));
            }
            continue;
        }
        value |= u64::from(*byte) << (8 * shift);
    }
    let value = i64::try_from(value)
        .map_err(|_| ArchiveError::Malformed("an int wider than 63 bits".into()))?;
    Ok(if *sign == 0 { value } else { -value })
}

macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(value) => value,
            None => return Ok(None),
        }
    };
}

/// Parses the header and the TOC from the front of `bytes`; `None` if they
/// are not all there yet. Returns them and how many bytes they took.
fn parse_head(bytes: &[u8]) -> Result<Option<(ParsedHead, usize)>, ArchiveError> {
    let mut cursor = Cursor {
        bytes,
        at: 0,
        int_size: 4,
    };
    let magic = need!(cursor.take(MAGIC.len()));
    if magic != MAGIC {
        return Err(ArchiveError::NotCustomFormat("no PGDMP magic".into()));
    }
    let (major, minor, revision) = (
        need!(cursor.byte()),
        need!(cursor.byte()),
        need!(cursor.byte()),
    );
    let version = (major, minor, revision);
    if !((1, 14, 0)..=(1, 16, 255)).contains(&version) {
        return Err(ArchiveError::UnsupportedVersion(major, minor, revision));
    }
    let int_size = usize::from(need!(cursor.byte()));
    if !(1..=8).contains(&int_size) {
        return Err(ArchiveError::Malformed(format!("int size {int_size}")));
    }
    cursor.int_size = int_size;
    let offset_size = usize::from(need!(cursor.byte()));
    if !(1..=16).contains(&offset_size) {
        return Err(ArchiveError::Malformed(format!(
            "offset size {offset_size}"
        )));
    }
    let format = need!(cursor.byte());
    if format != FORMAT_CUSTOM {
        return Err(ArchiveError::NotCustomFormat(format!(
            "format {format} is not custom"
        )));
    }
    if minor >= 15 {
        let algorithm = need!(cursor.byte());
        if algorithm != 0 {
            return Err(ArchiveError::Compressed(format!("algorithm {algorithm}")));
        }
    } else {
        let level = need!(cursor.int())?;
        if level != 0 {
            return Err(ArchiveError::Compressed(format!("level {level}")));
        }
    }
    for _ in 0..7 {
        need!(cursor.int())?;
    }
    let database = need!(cursor.string())?.unwrap_or_default();
    need!(cursor.string())?; // server version
    need!(cursor.string())?; // pg_dump version

    let count = need!(cursor.int())?;
    let count = usize::try_from(count)
        .map_err(|_| ArchiveError::Malformed(format!("TOC count {count}")))?;
    let mut entries = HashMap::new();
    for _ in 0..count {
        let id = need!(cursor.int())?;
        need!(cursor.int())?; // had dumper
        need!(cursor.string())?; // table oid
        need!(cursor.string())?; // oid
        let tag = need!(cursor.string())?.unwrap_or_default();
        let desc = need!(cursor.string())?.unwrap_or_default();
        need!(cursor.int())?; // section
        for _ in 0..3 {
            need!(cursor.string())?; // defn, drop, copy statements
        }
        let schema = need!(cursor.string())?.unwrap_or_default();
        need!(cursor.string())?; // tablespace
        need!(cursor.string())?; // table access method
        if minor >= 16 {
            need!(cursor.int())?; // relkind
        }
        need!(cursor.string())?; // owner
        need!(cursor.string())?; // "false": with oids
        loop {
            if need!(cursor.string())?.is_none() {
                break;
            }
        }
        need!(cursor.byte()); // offset flag
        need!(cursor.take(offset_size));
        entries.insert(
            id,
            Entry {
                schema,
                table_data: desc == "TABLE DATA",
                tag,
            },
        );
    }
    Ok(Some((
        ParsedHead {
            version: format!("{major}.{minor}.{revision}"),
            database,
            int_size,
            entries,
        },
        cursor.at,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny archive in the layout above (version 1.14, 4-byte ints).
    fn archive(tables: &[(&str, &str, &[u8])]) -> Vec<u8> {
        let int = |out: &mut Vec<u8>, value: i64| {
            out.push(u8::from(value < 0));
            out.extend_from_slice(&(value.unsigned_abs() as u32).to_le_bytes());
        };
        let string = |out: &mut Vec<u8>, value: Option<&str>| match value {
            None => {
                out.push(1);
                out.extend_from_slice(&1u32.to_le_bytes());
            }
            Some(text) => {
                out.push(0);
                out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        };
        let mut out = b"PGDMP".to_vec();
        out.extend_from_slice(&[1, 14, 0, 4, 8, 1]);
        int(&mut out, 0);
        for _ in 0..7 {
            int(&mut out, 1);
        }
        string(&mut out, Some("shop"));
        string(&mut out, Some("15.0"));
        string(&mut out, Some("15.0"));
        int(&mut out, tables.len() as i64 + 1);
        let entry = |out: &mut Vec<u8>, id: i64, schema: &str, tag: &str, desc: &str| {
            int(out, id);
            int(out, 1);
            string(out, Some("0"));
            string(out, Some("0"));
            string(out, Some(tag));
            string(out, Some(desc));
            int(out, 2);
            for _ in 0..3 {
                string(out, Some(""));
            }
            string(out, Some(schema));
            string(out, Some(""));
            string(out, Some("heap"));
            string(out, Some("postgres"));
            string(out, Some("false"));
            string(out, Some("1"));
            string(out, None);
            out.push(1);
            out.extend_from_slice(&[0; 8]);
        };
        entry(&mut out, 1, "public", "t_seq", "SEQUENCE");
        for (index, (schema, table, _)) in tables.iter().enumerate() {
            entry(&mut out, index as i64 + 10, schema, table, "TABLE DATA");
        }
        for (index, (_, _, data)) in tables.iter().enumerate() {
            out.push(BLOCK_DATA);
            int(&mut out, index as i64 + 10);
            for piece in data.chunks(7) {
                int(&mut out, piece.len() as i64);
                out.extend_from_slice(piece);
            }
            int(&mut out, 0);
        }
        out.push(BLOCK_LARGE_OBJECTS);
        int(&mut out, 99);
        int(&mut out, 16400);
        int(&mut out, 3);
        out.extend_from_slice(b"abc");
        int(&mut out, 0);
        int(&mut out, 0);
        out
    }

    fn scan_in_pieces(bytes: &[u8], piece: usize) -> Result<ArchiveSummary, ArchiveError> {
        let mut scanner = ArchiveScanner::new();
        for part in bytes.chunks(piece) {
            scanner.feed(part)?;
        }
        scanner.finish()
    }

    #[test]
    fn counts_rows_whatever_the_feed_sizes() {
        let bytes = archive(&[
            ("public", "orders", b"1\ta\n2\tb\\nc\n3\tc\n\\.\n\n\n"),
            ("my schema", "Ünïcode \"t\"", b"x\n"),
            ("public", "empty", b"\\.\n\n\n"),
        ]);
        for piece in [1, 2, 3, 5, 64, bytes.len()] {
            let summary = scan_in_pieces(&bytes, piece).unwrap();
            assert_eq!(summary.database, "shop");
            assert_eq!(summary.archive_version, "1.14.0");
            assert_eq!(summary.toc_entries, 4);
            assert_eq!(summary.large_objects, 1);
            let rows: Vec<(&str, &str, u64)> = summary
                .tables
                .iter()
                .map(|t| (t.schema.as_str(), t.table.as_str(), t.rows))
                .collect();
            assert_eq!(
                rows,
                [
                    ("public", "orders", 3),
                    ("my schema", "Ünïcode \"t\"", 1),
                    ("public", "empty", 0)
                ],
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn a_truncated_or_foreign_stream_is_an_error() {
        let bytes = archive(&[("public", "t", b"1\n\\.\n\n\n")]);
        for cut in [3, 40, bytes.len() - 3] {
            assert!(
                scan_in_pieces(&bytes[..cut], 16).is_err(),
                "cut at {cut} was accepted"
            );
        }
        let error = scan_in_pieces(b"-- PostgreSQL database dump\n", 4).unwrap_err();
        assert!(matches!(error, ArchiveError::NotCustomFormat(_)), "{error}");
        let mut compressed = bytes.clone();
        compressed[12] = 6; // compression level 6
        let error = scan_in_pieces(&compressed, 100).unwrap_err();
        assert!(matches!(error, ArchiveError::Compressed(_)), "{error}");
    }
}
