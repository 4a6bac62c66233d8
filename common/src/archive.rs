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
//! table of contents is also handed to the caller ([`ArchiveScanner::head`],
//! an [`ArchiveHead`]) as soon as it is whole: a restore learns from it
//! which roles the archive needs and which entries a partial restore
//! selects, before the first byte reaches `pg_restore`. The
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

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// Largest table of contents read (it is buffered until whole).
pub const MAX_TOC_BYTES: usize = 64 << 20;

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

impl From<TableRows> for crate::proto::TableRows {
    fn from(t: TableRows) -> Self {
        crate::proto::TableRows {
            schema: t.schema,
            table: t.table,
            rows: t.rows,
        }
    }
}

impl From<crate::proto::TableRows> for TableRows {
    fn from(t: crate::proto::TableRows) -> Self {
        TableRows {
            schema: t.schema,
            table: t.table,
            rows: t.rows,
        }
    }
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

/// The `desc` of the entries whose SQL ([`TocEntry::defn`]) is kept: the
/// ones that name roles (privileges, policies) or describe the database.
const DEFN_KEPT_FOR: &[&str] = &["ACL", "DEFAULT ACL", "DATABASE", "POLICY"];

/// One entry of an archive's table of contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    /// The dump id, which dependencies and `pg_restore -L` lists refer to.
    pub dump_id: i64,
    /// What it is: `TABLE`, `TABLE DATA`, `INDEX`, `ACL`, `SCHEMA`, ...
    pub desc: String,
    /// The schema it lives in; empty for objects outside schemas.
    pub namespace: String,
    /// Its name (for an `ACL` or `COMMENT`, like `TABLE orders`).
    pub tag: String,
    /// The role that owns it; empty when none is recorded.
    pub owner: String,
    /// Dump ids of the entries it depends on.
    pub dependencies: Vec<i64>,
    /// The SQL that creates it, kept only for `ACL`, `DEFAULT ACL`,
    /// `DATABASE` and `POLICY` entries (the others' can be large, and
    /// nothing here needs them).
    pub defn: Option<String>,
    /// Where in the archive this entry's data offset is written (its flag
    /// byte), so that a spooled copy can be given the offsets a pipe
    /// could not take; see [`ArchiveScanner::data_offsets`].
    #[serde(default)]
    pub offset_field_at: u64,
}

/// The header and table of contents of an archive, in archive order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveHead {
    /// Like "1.14.0".
    pub archive_version: String,
    /// The database that was dumped.
    pub database: String,
    pub entries: Vec<TocEntry>,
    /// Every role that owns an entry.
    pub owners: BTreeSet<String>,
    /// The owner of the `DATABASE` entry: the database's own owner.
    pub database_owner: Option<String>,
    /// Bytes of a data offset (`offSize`).
    #[serde(default)]
    pub offset_size: usize,
}

impl ArchiveHead {
    /// The entry with this dump id.
    pub fn entry(&self, dump_id: i64) -> Option<&TocEntry> {
        self.entries.iter().find(|entry| entry.dump_id == dump_id)
    }
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
    head: Option<ArchiveHead>,
    /// Index in `head.entries` of every `TABLE DATA` entry, by dump id.
    table_data: HashMap<i64, usize>,
    data: Data,
    summary: ArchiveSummary,
    /// Index in `summary.tables` by dump id.
    tables_by_id: HashMap<i64, usize>,
    /// The last bytes of each table's data, to spot the end marker.
    tails: Vec<Vec<u8>>,
    /// Bytes fed so far.
    fed: u64,
    /// Where the block being read began, until its dump id is read.
    block_at: u64,
    /// (dump id, position of its data block's type byte), in archive order.
    block_starts: Vec<(i64, u64)>,
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
            table_data: HashMap::new(),
            data: Data::BlockType,
            summary: ArchiveSummary::default(),
            tables_by_id: HashMap::new(),
            tails: Vec::new(),
            fed: 0,
            block_at: 0,
            block_starts: Vec::new(),
        }
    }

    /// Once the whole archive went by: for every data block, where its
    /// entry's offset field is and where the block begins, with the size
    /// of an offset. `pg_dump` writing into a pipe cannot go back to fill
    /// these in; a parallel `pg_restore` of a spooled copy needs them to
    /// seek to a table's data instead of reading through the file.
    pub fn data_offsets(&self) -> Option<(usize, Vec<(u64, u64)>)> {
        let head = self.head.as_ref()?;
        let fields: HashMap<i64, u64> = head
            .entries
            .iter()
            .map(|entry| (entry.dump_id, entry.offset_field_at))
            .collect();
        let offsets = self
            .block_starts
            .iter()
            .filter_map(|(dump_id, at)| fields.get(dump_id).map(|field| (*field, *at)))
            .collect();
        Some((head.offset_size, offsets))
    }

    /// The next bytes of the archive.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ArchiveError> {
        let start = self.fed;
        self.fed += bytes.len() as u64;
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
                    let head = parsed.head;
                    self.summary.archive_version = head.archive_version.clone();
                    self.summary.database = head.database.clone();
                    self.summary.toc_entries = head.entries.len() as u64;
                    self.table_data = head
                        .entries
                        .iter()
                        .enumerate()
                        .filter(|(_, entry)| entry.desc == "TABLE DATA")
                        .map(|(index, entry)| (entry.dump_id, index))
                        .collect();
                    let rest = self.pending.split_off(used);
                    self.pending = Vec::new();
                    self.head = Some(head);
                    return self.feed_data(&rest, Some(used as u64));
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
                // An int: never a block's first byte, so no position needed.
                self.feed_data(&pending, None)?;
            }
        }
        let at = self.fed - bytes.len() as u64;
        debug_assert!(at >= start);
        self.feed_data(bytes, Some(at))
    }

    /// Parses `bytes`, which begin at archive position `at` (`None` for a
    /// completed int, which cannot begin a block).
    fn feed_data(&mut self, mut bytes: &[u8], at: Option<u64>) -> Result<(), ArchiveError> {
        let length = bytes.len();
        while !bytes.is_empty() {
            match self.data {
                Data::BlockType => {
                    if let Some(at) = at {
                        self.block_at = at + (length - bytes.len()) as u64;
                    }
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
                    self.block_starts.push((id, self.block_at));
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
        let entry = &self.head.as_ref()?.entries[*self.table_data.get(&id)?];
        let index = self.summary.tables.len();
        self.summary.tables.push(TableRows {
            schema: entry.namespace.clone(),
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

    /// The header and table of contents, once they have been fed whole.
    pub fn head(&self) -> Option<&ArchiveHead> {
        self.head.as_ref()
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
    int_size: usize,
    head: ArchiveHead,
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
    let mut entries = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let dump_id = need!(cursor.int())?;
        need!(cursor.int())?; // had dumper
        need!(cursor.string())?; // table oid
        need!(cursor.string())?; // oid
        let tag = need!(cursor.string())?.unwrap_or_default();
        let desc = need!(cursor.string())?.unwrap_or_default();
        need!(cursor.int())?; // section
        let defn = need!(cursor.string())?;
        need!(cursor.string())?; // drop statement
        need!(cursor.string())?; // copy statement
        let namespace = need!(cursor.string())?.unwrap_or_default();
        need!(cursor.string())?; // tablespace
        need!(cursor.string())?; // table access method
        if minor >= 16 {
            need!(cursor.int())?; // relkind
        }
        let owner = need!(cursor.string())?.unwrap_or_default();
        need!(cursor.string())?; // "false": with oids
        let mut dependencies = Vec::new();
        while let Some(dependency) = need!(cursor.string())? {
            let dependency = dependency.trim().parse::<i64>().map_err(|_| {
                ArchiveError::Malformed(format!(
                    "entry {dump_id} depends on {dependency:?}, not a dump id"
                ))
            })?;
            dependencies.push(dependency);
        }
        let offset_field_at = cursor.at as u64;
        need!(cursor.byte()); // offset flag
        need!(cursor.take(offset_size));
        let defn = if DEFN_KEPT_FOR.contains(&desc.as_str()) {
            defn
        } else {
            None
        };
        entries.push(TocEntry {
            dump_id,
            desc,
            namespace,
            tag,
            owner,
            dependencies,
            defn,
            offset_field_at,
        });
    }
    let owners = entries
        .iter()
        .filter(|entry| !entry.owner.is_empty())
        .map(|entry| entry.owner.clone())
        .collect();
    let database_owner = entries
        .iter()
        .find(|entry| entry.desc == "DATABASE" && !entry.owner.is_empty())
        .map(|entry| entry.owner.clone());
    Ok(Some((
        ParsedHead {
            int_size,
            head: ArchiveHead {
                archive_version: format!("{major}.{minor}.{revision}"),
                database,
                entries,
                owners,
                database_owner,
                offset_size,
            },
        },
        cursor.at,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One TOC entry of a test archive.
    struct TestEntry<'a> {
        id: i64,
        desc: &'a str,
        namespace: &'a str,
        tag: &'a str,
        owner: &'a str,
        dependencies: &'a [i64],
        defn: &'a str,
    }

    impl<'a> TestEntry<'a> {
        fn new(id: i64, desc: &'a str, namespace: &'a str, tag: &'a str) -> Self {
            TestEntry {
                id,
                desc,
                namespace,
                tag,
                owner: "postgres",
                dependencies: &[],
                defn: "",
            }
        }
    }

    fn int(out: &mut Vec<u8>, value: i64) {
        out.push(u8::from(value < 0));
        out.extend_from_slice(&(value.unsigned_abs() as u32).to_le_bytes());
    }

    fn string(out: &mut Vec<u8>, value: Option<&str>) {
        match value {
            None => {
                out.push(1);
                out.extend_from_slice(&1u32.to_le_bytes());
            }
            Some(text) => {
                out.push(0);
                out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
    }

    /// A tiny archive in the layout above (version 1.14, 4-byte ints):
    /// these entries, then these data blocks (dump id, COPY text).
    fn archive_with(toc: &[TestEntry], blocks: &[(i64, &[u8])]) -> Vec<u8> {
        let mut out = b"PGDMP".to_vec();
        out.extend_from_slice(&[1, 14, 0, 4, 8, 1]);
        int(&mut out, 0);
        for _ in 0..7 {
            int(&mut out, 1);
        }
        string(&mut out, Some("shop"));
        string(&mut out, Some("15.0"));
        string(&mut out, Some("15.0"));
        int(&mut out, toc.len() as i64);
        for entry in toc {
            int(&mut out, entry.id);
            int(&mut out, 1);
            string(&mut out, Some("0"));
            string(&mut out, Some("0"));
            string(&mut out, Some(entry.tag));
            string(&mut out, Some(entry.desc));
            int(&mut out, 2);
            string(&mut out, Some(entry.defn));
            string(&mut out, Some(""));
            string(&mut out, Some(""));
            string(&mut out, Some(entry.namespace));
            string(&mut out, Some(""));
            string(&mut out, Some("heap"));
            string(&mut out, Some(entry.owner));
            string(&mut out, Some("false"));
            for dependency in entry.dependencies {
                string(&mut out, Some(&dependency.to_string()));
            }
            string(&mut out, None);
            out.push(1);
            out.extend_from_slice(&[0; 8]);
        }
        for (id, data) in blocks {
            out.push(BLOCK_DATA);
            int(&mut out, *id);
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

    /// An archive with a sequence and the data of these tables.
    fn archive(tables: &[(&str, &str, &[u8])]) -> Vec<u8> {
        let mut toc = vec![TestEntry::new(1, "SEQUENCE", "public", "t_seq")];
        let mut blocks = Vec::new();
        for (index, (schema, table, data)) in tables.iter().enumerate() {
            toc.push(TestEntry::new(
                index as i64 + 10,
                "TABLE DATA",
                schema,
                table,
            ));
            blocks.push((index as i64 + 10, *data));
        }
        archive_with(&toc, &blocks)
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
    fn data_offsets_point_at_the_blocks_and_the_offset_fields() {
        let bytes = archive(&[
            ("public", "orders", b"1\n2\n\\.\n\n\n"),
            ("public", "tags", b"x\n"),
        ]);
        for piece in [1, 3, 7, bytes.len()] {
            let mut scanner = ArchiveScanner::new();
            for part in bytes.chunks(piece) {
                scanner.feed(part).unwrap();
            }
            let (offset_size, offsets) = scanner.data_offsets().unwrap();
            assert_eq!(offset_size, 8);
            // The two tables (the test's large objects have no entry).
            assert_eq!(offsets.len(), 2, "piece size {piece}");
            for (field, block) in offsets {
                // A pipe could not fill the offset in: "not set".
                assert_eq!(bytes[field as usize], 1, "piece size {piece}");
                let kind = bytes[block as usize];
                assert!(
                    kind == BLOCK_DATA || kind == BLOCK_LARGE_OBJECTS,
                    "piece size {piece}: block at {block} starts with {kind}"
                );
            }
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

    #[test]
    fn the_head_is_handed_over_once_whole() {
        let defn_acl = "GRANT SELECT ON TABLE public.orders TO \"Read \"\"Only\"\"\";\n";
        let toc = [
            TestEntry {
                owner: "shop_owner",
                defn: "CREATE DATABASE shop WITH TEMPLATE = template0 ENCODING = 'UTF8';",
                ..TestEntry::new(3000, "DATABASE", "", "shop")
            },
            TestEntry {
                owner: "app",
                defn: "CREATE TABLE public.orders (id integer);",
                ..TestEntry::new(210, "TABLE", "public", "orders")
            },
            TestEntry {
                owner: "app",
                dependencies: &[210],
                ..TestEntry::new(211, "TABLE DATA", "public", "orders")
            },
            TestEntry {
                owner: "",
                dependencies: &[210, 3000],
                defn: defn_acl,
                ..TestEntry::new(212, "ACL", "public", "TABLE orders")
            },
        ];
        let bytes = archive_with(&toc, &[(211, b"1\n2\n\\.\n\n\n")]);
        let mut scanner = ArchiveScanner::new();
        // Not before the last byte of the TOC is in.
        // The large object block that ends every test archive: type,
        // dump id, oid, length, 3 bytes, end of object, end of block.
        let toc_end = archive_with(&toc, &[]).len() - (1 + 5 + 5 + 5 + 3 + 5 + 5);
        for byte in &bytes[..toc_end - 1] {
            scanner.feed(std::slice::from_ref(byte)).unwrap();
            assert!(scanner.head().is_none());
        }
        scanner.feed(&bytes[toc_end - 1..toc_end]).unwrap();
        let head = scanner
            .head()
            .expect("the head after the TOC's last byte")
            .clone();
        assert_eq!(head.archive_version, "1.14.0");
        assert_eq!(head.database, "shop");
        assert_eq!(
            head.entries.iter().map(|e| e.dump_id).collect::<Vec<_>>(),
            [3000, 210, 211, 212],
            "archive order"
        );
        assert_eq!(
            head.owners.iter().map(String::as_str).collect::<Vec<_>>(),
            ["app", "shop_owner"]
        );
        assert_eq!(head.database_owner.as_deref(), Some("shop_owner"));
        let acl = head.entry(212).unwrap();
        assert_eq!(
            (acl.desc.as_str(), acl.namespace.as_str(), acl.tag.as_str()),
            ("ACL", "public", "TABLE orders")
        );
        assert_eq!(acl.dependencies, [210, 3000]);
        assert_eq!(acl.defn.as_deref(), Some(defn_acl));
        assert!(head.entry(3000).unwrap().defn.is_some());
        // The SQL of other entries is not kept.
        assert_eq!(head.entry(210).unwrap().defn, None);
        assert_eq!(head.entry(211).unwrap().dependencies, [210]);
        scanner.feed(&bytes[toc_end..]).unwrap();
        let summary = scanner.finish().unwrap();
        assert_eq!(summary.tables.len(), 1);
        assert_eq!(summary.tables[0].rows, 2);
    }

    #[test]
    fn a_dependency_that_is_not_a_dump_id_is_malformed() {
        let mut bytes = archive_with(
            &[TestEntry {
                dependencies: &[7],
                ..TestEntry::new(1, "TABLE", "public", "t")
            }],
            &[],
        );
        let at = bytes
            .windows(6)
            .position(|w| w == [0, 1, 0, 0, 0, b'7'])
            .unwrap();
        bytes[at + 5] = b'x';
        let error = scan_in_pieces(&bytes, 1000).unwrap_err();
        assert!(matches!(error, ArchiveError::Malformed(_)), "{error}");
    }
}
