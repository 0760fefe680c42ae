//! The chunk index: chunk id -> (pack, frame, offset, length) for the whole store.
//!
//! It need not fit in RAM: it is a set of immutable, sorted *index files* that are
//! memory-mapped and binary-searched, plus an in-memory *delta* of the chunks of packs written
//! since the last index file. [`ChunkIndex::persist_delta`] writes the delta as a new index file;
//! [`ChunkIndex::merge`] folds every file and the delta into one. When the index is lost or
//! corrupt it is rebuilt from the packs' own indexes ([`ChunkIndex::rebuild`]).
//!
//! Files are `index/<seq as 16 hex digits>.idx`; a newer file (higher seq) wins a lookup.
//!
//! # Byte layout of an index file (integers little-endian)
//!
//! ```text
//! header     48 B   0  magic      [8]  = BLAKE3("vmnest chunk index v1")[..8]
//!                   8  version    u32  = 1
//!                  12  record_len u32  = 48
//!                  16  n_packs    u32  (<= MAX_INDEX_PACKS)
//!                  20  body_crc   u32  CRC-32C of the pack table and the records
//!                  24  n_records  u64
//!                  32  reserved   [12] = 0
//!                  44  header_crc u32  CRC-32C of header bytes 0..44
//! pack table n_packs × 32 B: pack ids (BLAKE3 names), the packs this file covers
//! records    n_records × 48 B, sorted by chunk id, strictly increasing:
//!                   0  chunk id [32]
//!                  32  pack_no  u32   index into the pack table
//!                  36  frame    u32
//!                  40  offset   u32   in the frame's plaintext
//!                  44  len      u32
//! ```
//!
//! The file length must be exactly `48 + 32 n_packs + 48 n_records`. Opening checks the header,
//! the body checksum, the order of the records and every pack number (one pass over the map).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::pack::{
    ChunkLoc, PackEntry, PackId, create_locked_temp, io_err, label_magic, remove_stale_temp,
    sync_dir, temp_path,
};

/// Bytes of the header.
pub const HEADER_LEN: usize = 48;
/// Bytes of a record.
pub const RECORD_LEN: usize = 48;
/// Format version.
pub const VERSION: u32 = 1;
/// Most packs one index file may cover.
pub const MAX_INDEX_PACKS: u32 = 1 << 24;
/// Index files beyond which [`ChunkIndex::persist_delta`] merges them all into one.
pub const MAX_INDEX_FILES: usize = 8;

/// Where a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// The pack.
    pub pack: PackId,
    /// Where inside it.
    pub loc: ChunkLoc,
}

fn index_magic() -> [u8; 8] {
    label_magic("vmnest chunk index v1")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

/// Checks an index file image (header, lengths, checksum, order, pack numbers); returns
/// `(packs, n_records)`. `object` names the file in errors.
pub fn parse_index_file(object: &str, bytes: &[u8]) -> Result<(Vec<PackId>, usize)> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::corrupt(object, 0, "file too short for an index"));
    }
    let h = &bytes[..HEADER_LEN];
    if h[..8] != index_magic() {
        return Err(Error::corrupt(object, 0, "bad index magic"));
    }
    if crc32c::crc32c(&h[..44]) != u32_at(h, 44) {
        return Err(Error::corrupt(object, 44, "header checksum mismatch"));
    }
    if u32_at(h, 8) != VERSION || u32_at(h, 12) != RECORD_LEN as u32 {
        return Err(Error::corrupt(
            object,
            8,
            "unsupported version or record length",
        ));
    }
    let n_packs = u32_at(h, 16);
    if n_packs > MAX_INDEX_PACKS {
        return Err(Error::corrupt(
            object,
            16,
            format!("{n_packs} packs, more than {MAX_INDEX_PACKS}"),
        ));
    }
    let n_records = u64::from_le_bytes(h[24..32].try_into().unwrap_or([0; 8]));
    let want = (n_packs as u64 * 32)
        .checked_add(n_records.saturating_mul(RECORD_LEN as u64))
        .and_then(|b| b.checked_add(HEADER_LEN as u64));
    if want != Some(bytes.len() as u64) {
        return Err(Error::corrupt(
            object,
            24,
            format!(
                "{n_packs} packs and {n_records} records do not fill {} bytes",
                bytes.len()
            ),
        ));
    }
    let body = &bytes[HEADER_LEN..];
    if crc32c::crc32c(body) != u32_at(h, 20) {
        return Err(Error::corrupt(
            object,
            HEADER_LEN as u64,
            "body checksum mismatch",
        ));
    }
    let packs: Vec<PackId> = body[..n_packs as usize * 32]
        .chunks_exact(32)
        .map(|c| PackId(c.try_into().unwrap_or([0; 32])))
        .collect();
    let recs_at = HEADER_LEN + n_packs as usize * 32;
    let recs = &bytes[recs_at..];
    let mut prev: Option<&[u8]> = None;
    for (i, r) in recs.chunks_exact(RECORD_LEN).enumerate() {
        let off = (recs_at + i * RECORD_LEN) as u64;
        if prev.is_some_and(|p| p >= &r[..32]) {
            return Err(Error::corrupt(object, off, "records not sorted"));
        }
        if u32_at(r, 32) >= n_packs {
            return Err(Error::corrupt(
                object,
                off,
                "record names a pack outside the table",
            ));
        }
        prev = Some(&r[..32]);
    }
    Ok((packs, n_records as usize))
}

/// Encodes an index file from records sorted by chunk id (duplicates: the first wins).
pub fn encode_index_file(records: &BTreeMap<ChunkId, Location>) -> Vec<u8> {
    let mut packs: Vec<PackId> = records
        .values()
        .map(|l| l.pack)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    packs.sort();
    encode_with_packs(&packs, records)
}

fn encode_with_packs(packs: &[PackId], records: &BTreeMap<ChunkId, Location>) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    for p in packs {
        out.extend_from_slice(&p.0);
    }
    for (id, l) in records {
        let no = packs.binary_search(&l.pack).unwrap_or(0) as u32;
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&no.to_le_bytes());
        out.extend_from_slice(&l.loc.frame.to_le_bytes());
        out.extend_from_slice(&l.loc.offset.to_le_bytes());
        out.extend_from_slice(&l.loc.len.to_le_bytes());
    }
    let body_crc = crc32c::crc32c(&out[HEADER_LEN..]);
    let h = &mut out[..HEADER_LEN];
    h[..8].copy_from_slice(&index_magic());
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(packs.len() as u32).to_le_bytes());
    h[20..24].copy_from_slice(&body_crc.to_le_bytes());
    h[24..32].copy_from_slice(&(records.len() as u64).to_le_bytes());
    let hc = crc32c::crc32c(&h[..44]);
    h[44..48].copy_from_slice(&hc.to_le_bytes());
    out
}

/// One memory-mapped index file.
#[derive(Debug)]
pub struct IndexFile {
    seq: u64,
    path: PathBuf,
    map: Mmap,
    packs: Vec<PackId>,
    n: usize,
}

impl IndexFile {
    /// Maps and checks the file at `path`.
    pub fn open(path: &Path, seq: u64) -> Result<IndexFile> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.into(),
            op: "open index",
            source,
        })?;
        // SAFETY: index files are immutable once renamed into place; the store never writes
        // to a named index file, and a replaced file is a new inode, so the mapping is stable.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.into(),
            op: "map index",
            source,
        })?;
        let object = format!("index file {}", path.display());
        let (packs, n) = parse_index_file(&object, &map)?;
        Ok(IndexFile {
            seq,
            path: path.to_path_buf(),
            map,
            packs,
            n,
        })
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when the file holds no record.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn record(&self, i: usize) -> &[u8] {
        let at = HEADER_LEN + self.packs.len() * 32 + i * RECORD_LEN;
        &self.map[at..at + RECORD_LEN]
    }

    fn decode(&self, r: &[u8]) -> (ChunkId, Location) {
        let id = ChunkId(r[..32].try_into().unwrap_or([0; 32]));
        let pack = self.packs[u32_at(r, 32) as usize];
        (
            id,
            Location {
                pack,
                loc: ChunkLoc {
                    frame: u32_at(r, 36),
                    offset: u32_at(r, 40),
                    len: u32_at(r, 44),
                },
            },
        )
    }

    /// Binary search for `id`.
    pub fn lookup(&self, id: &ChunkId) -> Option<Location> {
        let (mut lo, mut hi) = (0usize, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let r = self.record(mid);
            match r[..32].cmp(&id.0[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.decode(r).1),
            }
        }
        None
    }

    /// Every record, in order.
    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, Location)> + '_ {
        (0..self.n).map(|i| self.decode(self.record(i)))
    }

    /// The packs this file covers.
    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }
}

/// The whole chunk index of a store directory's `index/` folder.
#[derive(Debug)]
pub struct ChunkIndex {
    dir: PathBuf,
    files: Vec<IndexFile>,
    delta: BTreeMap<ChunkId, Location>,
    delta_packs: HashSet<PackId>,
}

fn parse_seq(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".idx")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

impl ChunkIndex {
    /// Opens the index files in `dir` (created if missing). Temporary leftovers are removed and
    /// returned. Any damaged file is an error (the caller rebuilds).
    pub fn open(dir: &Path) -> Result<(ChunkIndex, Vec<PathBuf>)> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.into(),
            op: "create index dir",
            source,
        })?;
        let mut removed = Vec::new();
        let mut files = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
            path: dir.into(),
            op: "list index dir",
            source,
        })?;
        for ent in rd {
            let ent = ent.map_err(|source| Error::Io {
                path: dir.into(),
                op: "list index dir",
                source,
            })?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                if remove_stale_temp(&ent.path()) {
                    removed.push(ent.path());
                }
            } else if let Some(seq) = parse_seq(&name) {
                files.push(IndexFile::open(&ent.path(), seq)?);
            }
        }
        files.sort_by_key(|f| std::cmp::Reverse(f.seq));
        Ok((
            ChunkIndex {
                dir: dir.to_path_buf(),
                files,
                delta: BTreeMap::new(),
                delta_packs: HashSet::new(),
            },
            removed,
        ))
    }

    /// Opens index files that appeared in the directory since this index was opened (written
    /// by another process); returns how many.
    pub fn refresh(&mut self) -> Result<usize> {
        let known: HashSet<PathBuf> = self.files.iter().map(|f| f.path.clone()).collect();
        let rd = std::fs::read_dir(&self.dir).map_err(io_err(&self.dir, "list index dir"))?;
        let mut added = 0;
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(seq) = parse_seq(&name)
                && !known.contains(&ent.path())
            {
                match IndexFile::open(&ent.path(), seq) {
                    Ok(file) => {
                        self.files.push(file);
                        added += 1;
                    }
                    // Merged away by its writer between the listing and the open.
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.files.sort_by_key(|f| std::cmp::Reverse(f.seq));
        Ok(added)
    }

    /// Removes every index file in `dir` and builds one from `packs` (each pack's own index).
    pub fn rebuild<'a>(
        dir: &Path,
        packs: impl IntoIterator<Item = (PackId, &'a [PackEntry])>,
    ) -> Result<ChunkIndex> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.into(),
            op: "create index dir",
            source,
        })?;
        if let Ok(rd) = std::fs::read_dir(dir) {
            for ent in rd.flatten() {
                if ent.file_name().to_string_lossy().ends_with(".tmp") {
                    remove_stale_temp(&ent.path());
                } else {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
        let mut index = ChunkIndex {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            delta: BTreeMap::new(),
            delta_packs: HashSet::new(),
        };
        for (pack, entries) in packs {
            index.insert_pack(pack, entries);
        }
        index.persist_delta()?;
        Ok(index)
    }

    /// The location of `id`: the delta first, then files newest first.
    pub fn lookup(&self, id: &ChunkId) -> Option<Location> {
        self.delta
            .get(id)
            .copied()
            .or_else(|| self.files.iter().find_map(|f| f.lookup(id)))
    }

    /// Every location recorded for `id`, newest first (a chunk stored again after damage).
    pub fn lookup_all(&self, id: &ChunkId) -> Vec<Location> {
        self.delta
            .get(id)
            .copied()
            .into_iter()
            .chain(self.files.iter().filter_map(|f| f.lookup(id)))
            .collect()
    }

    /// Adds a pack's entries to the delta (a later insert of the same id wins).
    pub fn insert_pack(&mut self, pack: PackId, entries: &[PackEntry]) {
        for e in entries {
            self.delta.insert(e.id, Location { pack, loc: e.loc });
        }
        self.delta_packs.insert(pack);
    }

    /// Packs covered by index files or the delta.
    pub fn covered_packs(&self) -> HashSet<PackId> {
        self.files
            .iter()
            .flat_map(|f| f.packs.iter().copied())
            .chain(self.delta_packs.iter().copied())
            .collect()
    }

    /// Number of records in the delta.
    pub fn delta_len(&self) -> usize {
        self.delta.len()
    }

    /// Number of index files.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    fn write_file(
        &self,
        seq: u64,
        packs: &[PackId],
        records: &BTreeMap<ChunkId, Location>,
    ) -> Result<IndexFile> {
        let bytes = encode_with_packs(packs, records);
        let tmp = temp_path(&self.dir, "idx");
        let mut f = create_locked_temp(&tmp, "create index")?;
        let written = f
            .write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp, "write index"));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Another process may write index files into the same directory: the name is taken with
        // a hard link, which never replaces, and the next number is tried when it is in use.
        let mut seq = seq;
        let path = loop {
            let path = self.dir.join(format!("{seq:016x}.idx"));
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => break path,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && seq < u64::MAX => {
                    seq += 1;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io_err(&path, "name index")(e));
                }
            }
        };
        let _ = std::fs::remove_file(&tmp);
        drop(f);
        sync_dir(&self.dir)?;
        IndexFile::open(&path, seq)
    }

    fn next_seq(&self) -> u64 {
        self.files.iter().map(|f| f.seq + 1).max().unwrap_or(1)
    }

    /// Writes the delta as a new index file (durable), then merges when there are more than
    /// [`MAX_INDEX_FILES`] files. A pack with no chunk is not recorded.
    pub fn persist_delta(&mut self) -> Result<()> {
        if self.delta.is_empty() {
            return Ok(());
        }
        let mut packs: Vec<PackId> = self.delta_packs.iter().copied().collect();
        for l in self.delta.values() {
            packs.push(l.pack);
        }
        packs.sort();
        packs.dedup();
        let file = self.write_file(self.next_seq(), &packs, &self.delta)?;
        self.files.insert(0, file);
        self.delta.clear();
        self.delta_packs.clear();
        if self.files.len() > MAX_INDEX_FILES {
            self.merge()?;
        }
        Ok(())
    }

    /// Merges every index file and the delta into one new file, then removes the old files.
    pub fn merge(&mut self) -> Result<()> {
        let mut all: BTreeMap<ChunkId, Location> = BTreeMap::new();
        // Oldest first so newer locations overwrite older ones.
        for f in self.files.iter().rev() {
            all.extend(f.iter());
        }
        all.extend(self.delta.iter().map(|(k, v)| (*k, *v)));
        let mut packs: Vec<PackId> = self.covered_packs().into_iter().collect();
        packs.sort();
        let file = self.write_file(self.next_seq(), &packs, &all)?;
        let old: Vec<PathBuf> = self.files.iter().map(|f| f.path.clone()).collect();
        self.files = vec![file];
        self.delta.clear();
        self.delta_packs.clear();
        for p in old {
            let _ = std::fs::remove_file(p);
        }
        sync_dir(&self.dir)
    }

    /// Every (chunk, location) known, newest location per chunk.
    pub fn all(&self) -> BTreeMap<ChunkId, Location> {
        let mut all = BTreeMap::new();
        for f in self.files.iter().rev() {
            all.extend(f.iter());
        }
        all.extend(self.delta.iter().map(|(k, v)| (*k, *v)));
        all
    }
}

#[cfg(test)]
mod tests;
