//! Byte streams (memory states, migration streams, config files) as recipes: ordered segments,
//! each a stored chunk or a few inline bytes, listed in *parts* that are themselves chunks.
//!
//! A part (a chunk in a pack, so compressed and checksummed like any other) is:
//!
//! ```text
//! magic   8 bytes   first 8 bytes of BLAKE3("vmnest recipe part v1")
//! version u32 LE    1
//! count   u32 LE    number of entries (at most PART_ENTRIES)
//! entries           tag u8, len u32 LE, then 32-byte chunk id (tag 1) or len bytes (tag 2)
//! ```
//!
//! Cutters: a QEMU migration stream ([`crate::chunker::qemu_migration`]) gives every 4 KiB RAM
//! page its own chunk, so the same page in two VMs (or two saves) is stored once; the record
//! headers between pages (a few bytes) go inline; longer opaque runs (device state, the JSON
//! description) are cut by the pinned CDC ([`crate::chunker::cdc`]). Other streams are cut by the
//! CDC alone. Export concatenates the segments: the stream comes back byte for byte.

use std::io::Write;

use crate::chunk::{ChunkId, ChunkStore, is_zero_chunk};
use crate::chunker::cdc::Cdc;
use crate::chunker::qemu_migration::{self, Segment};
use crate::error::{Error, Result};
use crate::pack::label_magic;
use crate::store::Layout;

/// Most entries in one part.
pub const PART_ENTRIES: usize = 16 << 10;
/// Opaque runs up to this long are kept inline in the part.
pub const INLINE_MAX: usize = 256;
/// Largest part accepted when reading.
pub const MAX_PART_LEN: usize = 16 + PART_ENTRIES * (5 + INLINE_MAX);
const TAG_CHUNK: u8 = 1;
const TAG_INLINE: u8 = 2;
const TAG_ZERO: u8 = 3;

fn part_magic() -> [u8; 8] {
    label_magic("vmnest recipe part v1")
}

/// One segment of a recipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A stored chunk of `len` bytes.
    Chunk(ChunkId, u32),
    /// Bytes kept in the part.
    Inline(Vec<u8>),
    /// `len` zero bytes (never stored).
    Zero(u32),
}

impl Entry {
    fn len(&self) -> u64 {
        match self {
            Entry::Chunk(_, len) | Entry::Zero(len) => u64::from(*len),
            Entry::Inline(b) => b.len() as u64,
        }
    }
}

/// Encodes a part.
pub fn encode_part(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 37);
    out.extend_from_slice(&part_magic());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        match e {
            Entry::Chunk(id, len) => {
                out.push(TAG_CHUNK);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&id.0);
            }
            Entry::Inline(bytes) => {
                out.push(TAG_INLINE);
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Entry::Zero(len) => {
                out.push(TAG_ZERO);
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }
    out
}

/// Parses a part; `object` names it in errors.
pub fn decode_part(object: &str, bytes: &[u8]) -> Result<Vec<Entry>> {
    let bad =
        |at: usize, why: &str| Error::corrupt(object, at as u64, format!("recipe part: {why}"));
    if bytes.len() > MAX_PART_LEN {
        return Err(bad(0, "larger than a part can be"));
    }
    if bytes.len() < 16 || bytes[..8] != part_magic() {
        return Err(bad(0, "no part magic"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != 1 {
        return Err(bad(8, &format!("version {version}")));
    }
    let count = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default()) as usize;
    if count > PART_ENTRIES {
        return Err(bad(
            12,
            &format!("{count} entries (at most {PART_ENTRIES})"),
        ));
    }
    let mut entries = Vec::with_capacity(count);
    let mut at = 16usize;
    for _ in 0..count {
        let Some(head) = bytes.get(at..at + 5) else {
            return Err(bad(at, "truncated entry"));
        };
        let len = u32::from_le_bytes(head[1..5].try_into().unwrap_or_default());
        at += 5;
        match head[0] {
            TAG_CHUNK => {
                let Some(id) = bytes.get(at..at + 32) else {
                    return Err(bad(at, "truncated chunk id"));
                };
                if len == 0 || len as usize > crate::pack::MAX_CHUNK_LEN {
                    return Err(bad(at - 4, &format!("chunk length {len}")));
                }
                entries.push(Entry::Chunk(
                    ChunkId(id.try_into().unwrap_or_default()),
                    len,
                ));
                at += 32;
            }
            TAG_INLINE => {
                if len as usize > INLINE_MAX {
                    return Err(bad(at - 4, &format!("inline run of {len} bytes")));
                }
                let Some(data) = bytes.get(at..at + len as usize) else {
                    return Err(bad(at, "truncated inline bytes"));
                };
                entries.push(Entry::Inline(data.to_vec()));
                at += len as usize;
            }
            TAG_ZERO => entries.push(Entry::Zero(len)),
            tag => return Err(bad(at - 5, &format!("unknown entry tag {tag}"))),
        }
    }
    if at != bytes.len() {
        return Err(bad(at, "bytes after the last entry"));
    }
    Ok(entries)
}

fn load_part<S: ChunkStore + ?Sized>(store: &S, part: &ChunkId) -> Result<Vec<Entry>> {
    let bytes = store.get(part)?;
    decode_part(&format!("recipe part {part}"), &bytes)
}

/// The chunk ids a part refers to (gc, verify).
pub fn part_chunks<S: ChunkStore + ?Sized>(store: &S, part: &ChunkId) -> Result<Vec<ChunkId>> {
    Ok(load_part(store, part)?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Chunk(id, _) => Some(id),
            _ => None,
        })
        .collect())
}

/// Builds a recipe: segments in, parts out.
#[derive(Debug)]
pub struct RecipeWriter<'a, S: ChunkStore + ?Sized> {
    store: &'a S,
    cdc: Cdc,
    entries: Vec<Entry>,
    parts: Vec<ChunkId>,
    segments: u64,
    size: u64,
    /// Opaque bytes not yet cut.
    pending: Vec<u8>,
}

impl<'a, S: ChunkStore + ?Sized> RecipeWriter<'a, S> {
    /// A writer into `store`.
    pub fn new(store: &'a S) -> Self {
        RecipeWriter {
            store,
            cdc: Cdc::default(),
            entries: Vec::new(),
            parts: Vec::new(),
            segments: 0,
            size: 0,
            pending: Vec::new(),
        }
    }

    fn push(&mut self, e: Entry) -> Result<()> {
        self.size += e.len();
        self.segments += 1;
        self.entries.push(e);
        if self.entries.len() >= PART_ENTRIES {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        if self.parts.len() >= crate::store::manifest::MAX_PARTS {
            return Err(Error::InvalidArgument(
                "stream too long for one recipe".into(),
            ));
        }
        let bytes = encode_part(&self.entries);
        // Parts hold inline bytes (record headers): in an encrypted store they are sealed like
        // data (`put`, not `put_meta`), so a keyless verify checks recipe roots for presence.
        let id = self.store.id_hasher().id(&bytes);
        self.store.put(id, &bytes)?;
        self.parts.push(id);
        self.entries.clear();
        Ok(())
    }

    /// Stores `data` as one chunk (a page) — or a zero entry when it is all zero.
    pub fn chunk(&mut self, data: &[u8]) -> Result<()> {
        self.cut_pending()?;
        self.store_chunk(data)
    }

    fn store_chunk(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if is_zero_chunk(data) {
            return self.push(Entry::Zero(data.len() as u32));
        }
        let id = self.store.id_hasher().id(data);
        self.store.put(id, data)?;
        self.push(Entry::Chunk(id, data.len() as u32))
    }

    /// Adds opaque bytes; runs of them are cut when a chunk follows or at the end.
    pub fn bytes(&mut self, data: &[u8]) -> Result<()> {
        self.pending.extend_from_slice(data);
        // Keep the buffer bounded: cut whole CDC chunks once it holds several.
        if self.pending.len() >= 4 * self.cdc.params().max() {
            let mut taken = 0;
            while self.pending.len() - taken >= 2 * self.cdc.params().max() {
                let len = self
                    .cdc
                    .find_cut(&self.pending[taken..])
                    .unwrap_or(self.pending.len() - taken);
                let piece = self.pending[taken..taken + len].to_vec();
                self.store_chunk(&piece)?;
                taken += len;
            }
            self.pending.drain(..taken);
        }
        Ok(())
    }

    fn cut_pending(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(());
        }
        if pending.len() <= INLINE_MAX {
            return self.push(Entry::Inline(pending));
        }
        for cut in self.cdc.cut_points(&pending) {
            let piece = &pending[cut.offset as usize..cut.offset as usize + cut.len];
            self.store_chunk(piece)?;
        }
        Ok(())
    }

    /// Finishes: the recipe's layout and the stream's size. The store is flushed.
    pub fn finish(mut self, cutter: &str) -> Result<(Layout, u64)> {
        self.cut_pending()?;
        self.seal()?;
        self.store.flush()?;
        Ok((
            Layout::Recipe {
                cutter: cutter.to_string(),
                segments: self.segments,
                parts: self.parts,
            },
            self.size,
        ))
    }
}

/// What a stream import found.
#[derive(Clone, Debug, Default)]
pub struct StreamReport {
    /// `qemu-migration` or `cdc`.
    pub cutter: String,
    /// RAM pages stored as their own chunks.
    pub pages: u64,
    /// Why the migration parser stopped early, if it did (the rest was cut by CDC).
    pub stopped: Option<String>,
}

/// Stores a byte stream (`data`, typically a mapped file) as a recipe: a QEMU migration stream
/// is split at its RAM pages, anything else is cut by CDC.
pub fn import_stream<S: ChunkStore + ?Sized>(
    store: &S,
    data: &[u8],
) -> Result<(Layout, u64, StreamReport)> {
    import_stream_with(store, data, &mut |_| {})
}

/// Bytes of input between calls of the `done` callback of [`import_stream_with`].
pub const RELEASE_STEP: usize = 64 << 20;

/// Like [`import_stream`]; `done(n)` is called every [`RELEASE_STEP`] bytes with the length of the
/// input prefix that is no longer needed (a caller that mapped the file drops those pages, so a
/// multi-GiB stream does not stay resident).
pub fn import_stream_with<S: ChunkStore + ?Sized>(
    store: &S,
    data: &[u8],
    done: &mut dyn FnMut(usize),
) -> Result<(Layout, u64, StreamReport)> {
    let mut released = 0usize;
    let mut w = RecipeWriter::new(store);
    let mut report = StreamReport::default();
    let is_migration = data.len() >= 8
        && data[..4] == qemu_migration::QEMU_VM_FILE_MAGIC.to_be_bytes()
        && data[4..8] == qemu_migration::QEMU_VM_FILE_VERSION.to_be_bytes();
    if is_migration {
        report.cutter = "qemu-migration".into();
        let mut split = qemu_migration::split(data);
        for seg in split.by_ref() {
            let range = seg.range();
            let bytes = data
                .get(range.start as usize..range.end as usize)
                .ok_or_else(|| Error::InvalidArgument("segment outside the stream".into()))?;
            match seg {
                Segment::Page { .. } => {
                    report.pages += 1;
                    w.chunk(bytes)?;
                }
                Segment::Bytes(_) | Segment::ZeroPage { .. } => w.bytes(bytes)?,
            }
            if range.end as usize >= released + RELEASE_STEP {
                released = range.end as usize;
                done(released);
            }
        }
        report.stopped = split.stop().map(|s| format!("{s:?}"));
    } else if let Some(loads) = elf_loads(data) {
        // A memory dump (QEMU's dump-guest-memory): each loadable segment's pages are chunks,
        // wherever the segment starts in the file; headers and notes are bytes.
        report.cutter = "elf-pages".into();
        let mut at = 0usize;
        for (start, end) in loads {
            w.bytes(&data[at..start])?;
            let mut page = start;
            while page + PAGE <= end {
                w.chunk(&data[page..page + PAGE])?;
                report.pages += 1;
                page += PAGE;
            }
            w.bytes(&data[page..end])?;
            at = end;
            if at >= released + RELEASE_STEP {
                released = at;
                done(released);
            }
        }
        w.bytes(&data[at..])?;
    } else {
        report.cutter = "cdc".into();
        for piece in data.chunks(RELEASE_STEP) {
            w.bytes(piece)?;
            released += piece.len();
            done(released);
        }
    }
    let cutter = report.cutter.clone();
    let (layout, size) = w.finish(&cutter)?;
    if size != data.len() as u64 {
        return Err(Error::InvalidArgument(format!(
            "recipe covers {size} bytes of a {}-byte stream",
            data.len()
        )));
    }
    Ok((layout, size, report))
}

const PAGE: usize = 4096;
/// Most program headers read from an ELF memory dump.
const MAX_ELF_SEGMENTS: usize = 4096;

/// The file ranges of the loadable segments of a little-endian ELF64 file, sorted, inside the
/// file and not overlapping; None when `data` is not such a file (then it is cut by CDC).
fn elf_loads(data: &[u8]) -> Option<Vec<(usize, usize)>> {
    // Offsets come from the file: every addition is checked.
    let field = |o: usize, n: usize| data.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| field(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        field(o, 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        field(o, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Magic, 64-bit, little-endian, version 1.
    if data.get(..7)? != b"\x7fELF\x02\x01\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 56 || phnum > MAX_ELF_SEGMENTS {
        return None;
    }
    let mut loads = Vec::new();
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != 1 {
            continue; // not PT_LOAD
        }
        let off = usize::try_from(u64_at(ph.checked_add(8)?)?).ok()?;
        let len = usize::try_from(u64_at(ph.checked_add(32)?)?).ok()?;
        let end = off.checked_add(len)?;
        if end > data.len() {
            return None;
        }
        if len > 0 {
            loads.push((off, end));
        }
    }
    loads.sort_unstable();
    if loads.windows(2).any(|w| w[0].1 > w[1].0) {
        return None;
    }
    Some(loads)
}

/// Writes the stream of a recipe to `out`; returns the bytes written.
pub fn export_stream<S: ChunkStore + ?Sized>(
    store: &S,
    layout: &Layout,
    out: &mut dyn Write,
) -> Result<u64> {
    let Layout::Recipe { parts, .. } = layout else {
        return Err(Error::InvalidArgument("not a stream member".into()));
    };
    let zeros = vec![0u8; 64 << 10];
    let mut written = 0u64;
    let io = |e: std::io::Error| Error::Io {
        path: "output".into(),
        op: "write stream",
        source: e,
    };
    for part in parts {
        for e in load_part(store, part)? {
            written += e.len();
            match e {
                Entry::Chunk(id, len) => {
                    let data = store.get(&id)?;
                    if data.len() != len as usize {
                        return Err(Error::corrupt(
                            format!("recipe part {part}"),
                            0,
                            format!("chunk {id} has {} bytes, the recipe says {len}", data.len()),
                        ));
                    }
                    out.write_all(&data).map_err(io)?;
                }
                Entry::Inline(b) => out.write_all(&b).map_err(io)?,
                Entry::Zero(len) => {
                    let mut left = len as usize;
                    while left > 0 {
                        let n = left.min(zeros.len());
                        out.write_all(&zeros[..n]).map_err(io)?;
                        left -= n;
                    }
                }
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::MemoryChunkStore;

    #[test]
    fn parts_round_trip_and_reject_damage() {
        let entries = vec![
            Entry::Chunk(ChunkId::of(b"a"), 4096),
            Entry::Inline(b"hdr".to_vec()),
            Entry::Zero(4096),
        ];
        let bytes = encode_part(&entries);
        assert_eq!(decode_part("p", &bytes).unwrap(), entries);
        for cut in 0..bytes.len() {
            assert!(
                decode_part("p", &bytes[..cut]).is_err(),
                "truncated at {cut}"
            );
        }
        let mut bad = bytes.clone();
        bad[16] = 9;
        assert!(
            decode_part("p", &bad)
                .unwrap_err()
                .to_string()
                .contains("tag 9")
        );
    }

    #[test]
    fn a_stream_round_trips_byte_for_byte_and_dedups() {
        let store = MemoryChunkStore::new();
        let mut data = crate::chunker::cdc::xorshift_bytes(7, 3 << 20);
        data.extend(std::iter::repeat_n(0u8, 1 << 20));
        data.extend_from_within(..1 << 20);
        let (layout, size, report) = import_stream(&store, &data).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(report.cutter, "cdc");
        let mut out = Vec::new();
        export_stream(&store, &layout, &mut out).unwrap();
        assert_eq!(out, data);
        let stored = store.stored_bytes();
        // Without dedup it would be 4 MiB; CDC resynchronises within a few chunks of each edge.
        assert!(stored < 3 * (1 << 20) + (640 << 10), "stored {stored}");
    }

    /// A little ELF64 core file: a header, one program header table, a note, then two loadable
    /// segments at file offsets that are not page-aligned, holding the same pages.
    fn elf_dump(pages: &[Vec<u8>]) -> Vec<u8> {
        let seg = pages.concat();
        let note = vec![0x4eu8; 100];
        let phoff = 64usize;
        let data_off = phoff + 3 * 56 + note.len();
        let mut f = vec![0u8; data_off];
        f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        f[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let mut put_ph = |i: usize, kind: u32, off: usize, len: usize| {
            let ph = phoff + i * 56;
            f[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            f[ph + 8..ph + 16].copy_from_slice(&(off as u64).to_le_bytes());
            f[ph + 32..ph + 40].copy_from_slice(&(len as u64).to_le_bytes());
        };
        put_ph(0, 4, phoff + 3 * 56, note.len());
        put_ph(1, 1, data_off, seg.len());
        put_ph(2, 1, data_off + seg.len(), seg.len());
        f[phoff + 3 * 56..].copy_from_slice(&note);
        f.extend_from_slice(&seg);
        f.extend_from_slice(&seg);
        f
    }

    #[test]
    fn an_elf_dump_is_cut_at_its_segments_pages() {
        let pages: Vec<Vec<u8>> = (0..64u64)
            .map(|i| crate::chunker::cdc::xorshift_bytes(i % 16 + 1, PAGE))
            .collect();
        let dump = elf_dump(&pages);
        assert_ne!(
            (64 + 3 * 56 + 100) % PAGE,
            0,
            "segments are not page-aligned in the file"
        );
        let store = MemoryChunkStore::new();
        let (layout, size, report) = import_stream(&store, &dump).unwrap();
        assert_eq!(report.cutter, "elf-pages");
        assert_eq!(report.pages, 128);
        assert_eq!(size, dump.len() as u64);
        // 16 distinct pages, each stored once, and the recipe part.
        assert!(
            store.stored_bytes() < 16 * PAGE as u64 + 16 * 1024,
            "{}",
            store.stored_bytes()
        );
        let mut out = Vec::new();
        export_stream(&store, &layout, &mut out).unwrap();
        assert!(out == dump);
        // Damaged headers fall back to CDC, never panic.
        let mut bad = dump.clone();
        bad[0x38] = 0xff;
        bad[0x39] = 0xff;
        assert_eq!(import_stream(&store, &bad).unwrap().2.cutter, "cdc");
        // A program header table at the end of the address space (offsets would overflow).
        let mut bad = dump.clone();
        bad[0x20..0x28].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert_eq!(import_stream(&store, &bad).unwrap().2.cutter, "cdc");
        bad[0x20..0x28].copy_from_slice(&(u64::MAX - 40).to_le_bytes());
        assert_eq!(import_stream(&store, &bad).unwrap().2.cutter, "cdc");
    }

    #[test]
    fn the_qemu_fixture_round_trips_with_its_pages_as_chunks() {
        let data = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/qemu-7.2-pc-64m.mig"
        ))
        .unwrap();
        let store = MemoryChunkStore::new();
        let (layout, _, report) = import_stream(&store, &data).unwrap();
        assert_eq!(report.cutter, "qemu-migration");
        assert_eq!(report.pages, 42);
        assert_eq!(report.stopped, None);
        let mut out = Vec::new();
        export_stream(&store, &layout, &mut out).unwrap();
        assert!(out == data);
    }
}
