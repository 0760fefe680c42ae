//! Pack files: immutable files of zstd-compressed chunk groups, each with its own index.
//!
//! Consecutive chunks are gathered into *frames* of about [`FRAME_TARGET`] bytes of plaintext;
//! each frame is one zstd frame (or raw bytes when compression does not shrink it), so a read
//! decompresses one frame only. A pack is closed once it holds about [`PACK_TARGET`] bytes.
//! Its name is the lowercase hex of BLAKE3-256 of all its bytes (`<name>.pack`), so a pack is
//! content-addressed and a copy can be checked against its name.
//!
//! # Byte layout (all integers little-endian)
//!
//! ```text
//! header   16 B   0  magic   [8]  = BLAKE3("vmnest pack v1")[..8]
//!                 8  version u32  = 1
//!                12  reserved u32 = 0
//! frames   for each frame, back to back from offset 16:
//!          16 B   0  plain_len  u32   plaintext bytes of the frame (1..=MAX_FRAME_LEN)
//!                 4  stored_len u32   bytes that follow (<= plain_len)
//!                 8  flags      u32   bit 0: zstd-compressed (else raw)
//!                                     bit 1: sealed (encrypted store; see crate::crypt)
//!                                     bit 2: metadata (map nodes) of an encrypted store,
//!                                            deliberately not sealed; other bits 0
//!                12  crc32c     u32   CRC-32C of the stored bytes
//!          stored_len B   the zstd frame, or the raw plaintext; when sealed,
//!                         nonce (24) || XChaCha20-Poly1305 of those bytes || tag (16)
//! index    at index_offset (= end of the last frame):
//!          n_chunks entries of 48 B, sorted by chunk id, strictly increasing:
//!                 0  id     [32]  chunk id (BLAKE3 of the chunk plaintext)
//!                32  frame  u32   frame number
//!                36  offset u32   offset in the frame's plaintext
//!                40  len    u32   chunk length
//!                44  reserved u32 = 0
//!          n_frames frame-table entries of 32 B:
//!                 0  offset     u64  file offset of the frame header
//!                 8  plain_len  u32
//!                12  stored_len u32
//!                16  flags      u32
//!                20  crc32c     u32  (the same four values as the frame header)
//!                24  reserved   u64 = 0
//! trailer  64 B, the last bytes of the file:
//!                 0  magic        [8]  = BLAKE3("vmnest pack trailer v1")[..8]
//!                 8  version      u32  = 1
//!                12  n_frames     u32  (<= MAX_PACK_FRAMES)
//!                16  n_chunks     u64  (<= MAX_PACK_CHUNKS)
//!                24  index_offset u64
//!                32  index_len    u64  = 48 * n_chunks + 32 * n_frames
//!                40  index_crc    u32  CRC-32C of the index section (entries + frame table)
//!                44  reserved     [16] = 0
//!                60  trailer_crc  u32  CRC-32C of trailer bytes 0..60
//! ```
//!
//! A sealed frame's `stored_len` is at most `plain_len + 40` (nonce and tag). An encrypted
//! store reads only sealed and metadata frames; a plain store refuses sealed frames (both
//! errors name the pack and the frame).
//!
//! Frames are contiguous: frame 0 starts at 16, each next one where the previous ends, and
//! the last one ends at `index_offset`; `index_offset + index_len + 64` is the file length.
//! Every entry's `offset + len` lies inside its frame's plaintext.
//!
//! A read checks the frame header against the frame table, the frame's CRC-32C, the
//! decompressed length, and finally the chunk's BLAKE3 against its id: damage is an
//! [`Error::Corrupt`] naming the pack, the frame and the chunk, never wrong data.
//!
//! Writers write `tmp-*.pack.tmp`, fsync it, rename it to `<name>.pack` and fsync the directory.

mod store;

pub use store::{OpenReport, PackStore};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::chunk::ChunkId;
use crate::crypt::{IdHasher, Keys, SEAL_OVERHEAD};
use crate::error::{Error, Result};

/// Target plaintext bytes of a frame: chunks are grouped until the next would pass it.
pub const FRAME_TARGET: usize = 512 << 10;
/// Target size of a pack: the writer reports full once this many stored bytes are written.
pub const PACK_TARGET: u64 = 32 << 20;
/// Largest chunk a pack holds (and so the largest frame plaintext a reader accepts).
pub const MAX_CHUNK_LEN: usize = 16 << 20;
/// Largest frame plaintext a reader accepts (caps the decompression buffer).
pub const MAX_FRAME_LEN: u32 = MAX_CHUNK_LEN as u32;
/// Most chunks in one pack (caps the index a reader loads).
pub const MAX_PACK_CHUNKS: u64 = 1 << 20;
/// Most frames in one pack.
pub const MAX_PACK_FRAMES: u32 = 1 << 16;
/// zstd level of frames.
pub const ZSTD_LEVEL: i32 = 3;

/// Bytes of the pack header.
pub const HEADER_LEN: u64 = 16;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: u64 = 16;
/// Bytes of an index entry.
pub const ENTRY_LEN: u64 = 48;
/// Bytes of a frame-table entry.
pub const FRAME_ENTRY_LEN: u64 = 32;
/// Bytes of the trailer.
pub const TRAILER_LEN: u64 = 64;
/// Format version.
pub const VERSION: u32 = 1;
/// Frame flag: the stored bytes are one zstd frame.
pub const FLAG_ZSTD: u32 = 1;
/// Frame flag: the stored bytes are sealed with the store's frame key ([`crate::crypt`]).
pub const FLAG_SEALED: u32 = 2;
/// Frame flag: an encrypted store's metadata frame (map nodes), not sealed on purpose.
pub const FLAG_META: u32 = 4;
/// Every frame flag.
const FLAGS_KNOWN: u32 = FLAG_ZSTD | FLAG_SEALED | FLAG_META;

/// The first 8 bytes of BLAKE3 of `label`: the magics of the store's formats.
pub fn label_magic(label: &str) -> [u8; 8] {
    let h = blake3::hash(label.as_bytes());
    let mut m = [0u8; 8];
    m.copy_from_slice(&h.as_bytes()[..8]);
    m
}

fn pack_magic() -> [u8; 8] {
    label_magic("vmnest pack v1")
}

fn trailer_magic() -> [u8; 8] {
    label_magic("vmnest pack trailer v1")
}

/// A pack's name: BLAKE3-256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        ChunkId(self.0).to_hex()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Option<PackId> {
        ChunkId::from_hex(text).map(|c| PackId(c.0))
    }

    /// The file name of the pack, `<hex>.pack`.
    pub fn file_name(&self) -> String {
        format!("{}.pack", self.to_hex())
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", &self.to_hex()[..16])
    }
}

/// Where a chunk lies inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Frame number.
    pub frame: u32,
    /// Offset in the frame's plaintext.
    pub offset: u32,
    /// Chunk length.
    pub len: u32,
}

/// One entry of a pack's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Where it is.
    pub loc: ChunkLoc,
}

/// One frame-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// File offset of the frame header.
    pub offset: u64,
    /// Plaintext bytes.
    pub plain_len: u32,
    /// Stored bytes.
    pub stored_len: u32,
    /// Flags ([`FLAG_ZSTD`]).
    pub flags: u32,
    /// CRC-32C of the stored bytes.
    pub crc: u32,
}

pub(crate) fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Fsyncs a directory so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    crate::fault::check("sync", dir)
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temporary name in `dir` ending in `.tmp`.
pub(crate) fn temp_path(dir: &Path, what: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("tmp-{}-{n}.{what}.tmp", std::process::id()))
}

/// Creates a temporary file at `path` and takes an exclusive lock on it, held until the file is
/// closed: the lock tells [`remove_stale_temp`] in another process that the file is in use.
pub(crate) fn create_locked_temp(path: &Path, op: &'static str) -> Result<File> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path, op))?;
    file.try_lock().map_err(|e| Error::Io {
        path: path.to_path_buf(),
        op,
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(file)
}

/// Removes `path`, a temporary file, if no process holds its lock (the leftover of a crash).
/// Returns whether it was removed; a file that another writer is filling stays.
pub(crate) fn remove_stale_temp(path: &Path) -> bool {
    let Ok(file) = File::options().read(true).write(true).open(path) else {
        return false;
    };
    if file.try_lock().is_err() {
        return false;
    }
    std::fs::remove_file(path).is_ok()
}

/// A finished pack.
#[derive(Clone, Debug)]
pub struct FinishedPack {
    /// Its name.
    pub id: PackId,
    /// Its final path.
    pub path: PathBuf,
    /// Its index, sorted by chunk id.
    pub entries: Vec<PackEntry>,
    /// Its size in bytes.
    pub size: u64,
}

/// A frame compressed away from the pack writer: CPU work that importing threads do in parallel,
/// leaving the pack writer only the append.
#[derive(Clone, Debug)]
pub struct EncodedFrame {
    /// Plaintext bytes.
    pub plain_len: u32,
    /// Stored bytes: one zstd frame, or the plaintext when compressing does not shrink it.
    pub stored: Vec<u8>,
    /// [`FLAG_ZSTD`] or 0.
    pub flags: u32,
    /// CRC-32C of `stored`.
    pub crc: u32,
    /// The chunks: id, offset and length in the plaintext.
    pub chunks: Vec<(ChunkId, u32, u32)>,
}

impl EncodedFrame {
    /// Compresses `plain`, the concatenation of `chunks` (id, offset, length; at most
    /// [`MAX_FRAME_LEN`] bytes in all), then seals it when `keys` are given (an encrypted
    /// store's data frame).
    pub fn encode(
        plain: &[u8],
        chunks: Vec<(ChunkId, u32, u32)>,
        level: i32,
        keys: Option<&Keys>,
    ) -> std::io::Result<EncodedFrame> {
        if plain.len() > MAX_FRAME_LEN as usize {
            return Err(std::io::Error::other(format!(
                "frame of {} bytes is larger than {MAX_FRAME_LEN}",
                plain.len()
            )));
        }
        let compressed = zstd::bulk::compress(plain, level)?;
        let (stored, flags) = if compressed.len() < plain.len() {
            (compressed, FLAG_ZSTD)
        } else {
            (plain.to_vec(), 0)
        };
        let (stored, flags) = match keys {
            Some(k) => {
                let flags = flags | FLAG_SEALED;
                let sealed = k
                    .seal_frame(plain.len() as u32, flags, &stored)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                (sealed, flags)
            }
            None => (stored, flags),
        };
        Ok(EncodedFrame {
            plain_len: plain.len() as u32,
            crc: crc32c::crc32c(&stored),
            stored,
            flags,
            chunks,
        })
    }
}

/// Chunks gathered for a pack writer's next frame.
#[derive(Debug, Default)]
struct Pending {
    plain: Vec<u8>,
    chunks: Vec<(ChunkId, u32, u32)>,
}

/// Writes one pack under a temporary name; [`PackWriter::finish`] makes it durable and names it.
#[derive(Debug)]
pub struct PackWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: File,
    hasher: blake3::Hasher,
    pos: u64,
    data: Pending,
    entries: Vec<PackEntry>,
    frames: Vec<FrameInfo>,
    frame_target: usize,
    level: i32,
    /// An encrypted store's keys: data frames are sealed, map nodes go to metadata frames.
    keys: Option<std::sync::Arc<Keys>>,
    meta: Pending,
}

impl PackWriter {
    /// Starts a pack in `dir` with frames of [`FRAME_TARGET`].
    pub fn create(dir: &Path) -> Result<PackWriter> {
        Self::with_frame_target(dir, FRAME_TARGET)
    }

    /// Starts a pack in `dir` with frames of `frame_target` plaintext bytes (tests).
    pub fn with_frame_target(dir: &Path, frame_target: usize) -> Result<PackWriter> {
        Self::with_settings(dir, frame_target, ZSTD_LEVEL)
    }

    /// Starts a pack in `dir` with frames of `frame_target` plaintext bytes compressed at zstd
    /// `level`.
    pub fn with_settings(dir: &Path, frame_target: usize, level: i32) -> Result<PackWriter> {
        let tmp = temp_path(dir, "pack");
        let file = create_locked_temp(&tmp, "create pack")?;
        let mut w = PackWriter {
            dir: dir.to_path_buf(),
            tmp,
            file,
            hasher: blake3::Hasher::new(),
            pos: 0,
            data: Pending::default(),
            entries: Vec::new(),
            frames: Vec::new(),
            frame_target: frame_target.clamp(1, MAX_FRAME_LEN as usize),
            level,
            keys: None,
            meta: Pending::default(),
        };
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(&pack_magic());
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    /// Seals data frames with `keys` (an encrypted store) from now on.
    pub fn sealed_with(mut self, keys: Option<std::sync::Arc<Keys>>) -> PackWriter {
        self.keys = keys;
        self
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        crate::fault::check("write", &self.tmp)
            .and_then(|()| self.file.write_all(bytes))
            .map_err(io_err(&self.tmp, "write pack"))?;
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Adds a chunk (the caller deduplicates; `id` must be the store's id of `data`).
    pub fn add(&mut self, id: ChunkId, data: &[u8]) -> Result<()> {
        self.add_to(false, id, data)
    }

    /// Adds a metadata chunk (a map node). In a plain pack this is [`PackWriter::add`]; in a
    /// sealed one it goes to a metadata frame, compressed but not sealed.
    pub fn add_meta(&mut self, id: ChunkId, data: &[u8]) -> Result<()> {
        self.add_to(self.keys.is_some(), id, data)
    }

    fn add_to(&mut self, meta: bool, id: ChunkId, data: &[u8]) -> Result<()> {
        if data.len() > MAX_CHUNK_LEN {
            return Err(Error::InvalidArgument(format!(
                "chunk {id} of {} bytes is larger than {MAX_CHUNK_LEN}",
                data.len()
            )));
        }
        if self.len() as u64 >= MAX_PACK_CHUNKS {
            return Err(Error::InvalidArgument("pack holds its most chunks".into()));
        }
        let held = self.pending(meta).plain.len();
        if held > 0 && held + data.len() > self.frame_target {
            self.write_pending(meta)?;
        }
        let p = if meta { &mut self.meta } else { &mut self.data };
        let offset = p.plain.len() as u32;
        p.plain.extend_from_slice(data);
        p.chunks.push((id, offset, data.len() as u32));
        Ok(())
    }

    fn pending(&self, meta: bool) -> &Pending {
        if meta { &self.meta } else { &self.data }
    }

    /// Whether the pack reached [`PACK_TARGET`] (or its chunk or frame cap) and should be finished.
    pub fn is_full(&self) -> bool {
        self.pos + self.data.plain.len() as u64 + self.meta.plain.len() as u64 >= PACK_TARGET
            || self.len() + 1 >= MAX_PACK_CHUNKS as usize
            || self.frames.len() + 3 >= MAX_PACK_FRAMES as usize
    }

    /// Number of chunks added.
    pub fn len(&self) -> usize {
        self.entries.len() + self.data.chunks.len() + self.meta.chunks.len()
    }

    /// True when no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the gathered data chunks (sealed with the keys, if any) or metadata chunks (a
    /// metadata frame, not sealed) as one frame.
    fn write_pending(&mut self, meta: bool) -> Result<()> {
        let p = std::mem::take(if meta { &mut self.meta } else { &mut self.data });
        if p.plain.is_empty() {
            return Ok(());
        }
        let keys = if meta { None } else { self.keys.clone() };
        let mut frame = EncodedFrame::encode(&p.plain, p.chunks, self.level, keys.as_deref())
            .map_err(|e| Error::Io {
                path: self.tmp.clone(),
                op: "zstd compress",
                source: e,
            })?;
        if meta {
            frame.flags |= FLAG_META;
        }
        self.write_encoded(&frame)
    }

    fn write_encoded(&mut self, frame: &EncodedFrame) -> Result<()> {
        let info = FrameInfo {
            offset: self.pos,
            plain_len: frame.plain_len,
            stored_len: frame.stored.len() as u32,
            flags: frame.flags,
            crc: frame.crc,
        };
        let frame_no = self.frames.len() as u32;
        self.write(&encode_frame_header(&info))?;
        self.write(&frame.stored)?;
        self.frames.push(info);
        for &(id, offset, len) in &frame.chunks {
            self.entries.push(PackEntry {
                id,
                loc: ChunkLoc {
                    frame: frame_no,
                    offset,
                    len,
                },
            });
        }
        Ok(())
    }

    /// Appends a frame encoded elsewhere (on a worker thread, see [`EncodedFrame::encode`]) as
    /// it is, after sealing the frame being filled.
    pub fn add_encoded(&mut self, frame: &EncodedFrame) -> Result<()> {
        let count = self.len() as u64 + frame.chunks.len() as u64;
        if count >= MAX_PACK_CHUNKS || self.frames.len() + 2 >= MAX_PACK_FRAMES as usize {
            return Err(Error::InvalidArgument("pack holds its most chunks".into()));
        }
        self.write_pending(false)?;
        self.write_encoded(frame)
    }

    /// Writes the last frame, the index and the trailer, fsyncs, renames the pack to its name
    /// and fsyncs the directory.
    pub fn finish(mut self) -> Result<FinishedPack> {
        self.write_pending(false)?;
        self.write_pending(true)?;
        let mut entries = std::mem::take(&mut self.entries);
        entries.sort_by_key(|e| e.id);
        entries.dedup_by_key(|e| e.id);
        let index_offset = self.pos;
        let mut index =
            Vec::with_capacity(entries.len() * ENTRY_LEN as usize + self.frames.len() * 32);
        for e in &entries {
            index.extend_from_slice(&e.id.0);
            index.extend_from_slice(&e.loc.frame.to_le_bytes());
            index.extend_from_slice(&e.loc.offset.to_le_bytes());
            index.extend_from_slice(&e.loc.len.to_le_bytes());
            index.extend_from_slice(&0u32.to_le_bytes());
        }
        for f in &self.frames {
            index.extend_from_slice(&f.offset.to_le_bytes());
            index.extend_from_slice(&f.plain_len.to_le_bytes());
            index.extend_from_slice(&f.stored_len.to_le_bytes());
            index.extend_from_slice(&f.flags.to_le_bytes());
            index.extend_from_slice(&f.crc.to_le_bytes());
            index.extend_from_slice(&0u64.to_le_bytes());
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        trailer[..8].copy_from_slice(&trailer_magic());
        trailer[8..12].copy_from_slice(&VERSION.to_le_bytes());
        trailer[12..16].copy_from_slice(&(self.frames.len() as u32).to_le_bytes());
        trailer[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        trailer[24..32].copy_from_slice(&index_offset.to_le_bytes());
        trailer[32..40].copy_from_slice(&(index.len() as u64).to_le_bytes());
        trailer[40..44].copy_from_slice(&crc32c::crc32c(&index).to_le_bytes());
        let tcrc = crc32c::crc32c(&trailer[..60]);
        trailer[60..64].copy_from_slice(&tcrc.to_le_bytes());
        self.write(&index)?;
        self.write(&trailer)?;
        crate::fault::check("sync", &self.tmp)
            .and_then(|()| self.file.sync_all())
            .map_err(io_err(&self.tmp, "fsync pack"))?;
        let id = PackId(*self.hasher.finalize().as_bytes());
        let path = self.dir.join(id.file_name());
        crate::fault::check("rename", &self.tmp)
            .and_then(|()| std::fs::rename(&self.tmp, &path))
            .map_err(io_err(&self.tmp, "rename pack"))?;
        sync_dir(&self.dir)?;
        Ok(FinishedPack {
            id,
            path,
            entries,
            size: self.pos,
        })
    }

    /// Drops the unfinished pack and its temporary file.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn encode_frame_header(f: &FrameInfo) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&f.plain_len.to_le_bytes());
    h[4..8].copy_from_slice(&f.stored_len.to_le_bytes());
    h[8..12].copy_from_slice(&f.flags.to_le_bytes());
    h[12..16].copy_from_slice(&f.crc.to_le_bytes());
    h
}

/// The parsed trailer of a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Frames in the pack.
    pub n_frames: u32,
    /// Chunks in the pack.
    pub n_chunks: u64,
    /// Offset of the index section.
    pub index_offset: u64,
    /// Length of the index section.
    pub index_len: u64,
    /// CRC-32C of the index section.
    pub index_crc: u32,
}

/// Whether the chunk at `loc` of a pack whose frame table is `frames` lies in a metadata frame
/// (an encrypted store's map node, kept unsealed).
pub fn in_meta_frame(frames: &[FrameInfo], loc: ChunkLoc) -> bool {
    frames
        .get(loc.frame as usize)
        .is_some_and(|f| f.flags & FLAG_META != 0)
}

/// Parses the 64-byte trailer of a pack of `file_len` bytes; `object` names the pack in errors.
pub fn parse_trailer(object: &str, bytes: &[u8], file_len: u64) -> Result<Trailer> {
    let at = file_len.saturating_sub(TRAILER_LEN);
    let bad = |off: u64, why: String| Error::corrupt(object, at + off, why);
    if bytes.len() != TRAILER_LEN as usize || file_len < HEADER_LEN + TRAILER_LEN {
        return Err(Error::corrupt(object, 0, "file too short for a pack"));
    }
    if bytes[..8] != trailer_magic() {
        return Err(bad(0, "bad trailer magic".into()));
    }
    let crc = crc32c::crc32c(&bytes[..60]);
    if crc != u32_at(bytes, 60) {
        return Err(bad(60, "trailer checksum mismatch".into()));
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(bad(8, format!("unsupported version {version}")));
    }
    let t = Trailer {
        n_frames: u32_at(bytes, 12),
        n_chunks: u64_at(bytes, 16),
        index_offset: u64_at(bytes, 24),
        index_len: u64_at(bytes, 32),
        index_crc: u32_at(bytes, 40),
    };
    if t.n_frames > MAX_PACK_FRAMES {
        return Err(bad(
            12,
            format!("{} frames, more than {MAX_PACK_FRAMES}", t.n_frames),
        ));
    }
    if t.n_chunks > MAX_PACK_CHUNKS {
        return Err(bad(
            16,
            format!("{} chunks, more than {MAX_PACK_CHUNKS}", t.n_chunks),
        ));
    }
    let want = t.n_chunks * ENTRY_LEN + t.n_frames as u64 * FRAME_ENTRY_LEN;
    if t.index_len != want {
        return Err(bad(
            32,
            format!("index length {} is not {want}", t.index_len),
        ));
    }
    if t.index_offset < HEADER_LEN
        || t.index_offset
            .checked_add(t.index_len)
            .and_then(|e| e.checked_add(TRAILER_LEN))
            != Some(file_len)
    {
        return Err(bad(
            24,
            format!("index offset {:#x} does not fit the file", t.index_offset),
        ));
    }
    Ok(t)
}

/// Parses a pack's index section (entries then frame table) against its trailer.
pub fn parse_index(
    object: &str,
    t: &Trailer,
    bytes: &[u8],
) -> Result<(Vec<PackEntry>, Vec<FrameInfo>)> {
    if bytes.len() as u64 != t.index_len {
        return Err(Error::corrupt(
            object,
            t.index_offset,
            "index section is cut short",
        ));
    }
    if crc32c::crc32c(bytes) != t.index_crc {
        return Err(Error::corrupt(
            object,
            t.index_offset,
            "index checksum mismatch",
        ));
    }
    let n_chunks = t.n_chunks as usize;
    let n_frames = t.n_frames as usize;
    let ftab_at = n_chunks * ENTRY_LEN as usize;
    let mut frames = Vec::with_capacity(n_frames);
    let mut expect = HEADER_LEN;
    for i in 0..n_frames {
        let b = &bytes[ftab_at + i * 32..ftab_at + i * 32 + 32];
        let off = t.index_offset + (ftab_at + i * 32) as u64;
        let f = FrameInfo {
            offset: u64_at(b, 0),
            plain_len: u32_at(b, 8),
            stored_len: u32_at(b, 12),
            flags: u32_at(b, 16),
            crc: u32_at(b, 20),
        };
        if f.offset != expect {
            return Err(Error::corrupt(
                object,
                off,
                format!("frame {i} at {:#x}, expected {expect:#x}", f.offset),
            ));
        }
        let overhead = if f.flags & FLAG_SEALED != 0 {
            SEAL_OVERHEAD as u64
        } else {
            0
        };
        let max_stored = f.plain_len as u64 + overhead;
        if f.plain_len == 0 || f.plain_len > MAX_FRAME_LEN || f.stored_len as u64 > max_stored {
            return Err(Error::corrupt(
                object,
                off,
                format!("frame {i} has bad lengths"),
            ));
        }
        if f.flags & !FLAGS_KNOWN != 0
            || f.flags & (FLAG_SEALED | FLAG_META) == FLAG_SEALED | FLAG_META
            || (f.flags & FLAG_ZSTD == 0 && f.stored_len as u64 != max_stored)
        {
            return Err(Error::corrupt(
                object,
                off,
                format!("frame {i} has bad flags {:#x}", f.flags),
            ));
        }
        expect = f.offset + FRAME_HEADER_LEN + f.stored_len as u64;
        frames.push(f);
    }
    if expect != t.index_offset {
        return Err(Error::corrupt(
            object,
            t.index_offset,
            "frames do not end where the index starts",
        ));
    }
    let mut entries = Vec::with_capacity(n_chunks);
    for i in 0..n_chunks {
        let b = &bytes[i * 48..i * 48 + 48];
        let off = t.index_offset + (i * 48) as u64;
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        let e = PackEntry {
            id: ChunkId(id),
            loc: ChunkLoc {
                frame: u32_at(b, 32),
                offset: u32_at(b, 36),
                len: u32_at(b, 40),
            },
        };
        let Some(f) = frames.get(e.loc.frame as usize) else {
            return Err(Error::corrupt(
                object,
                off,
                format!("chunk {} in missing frame {}", e.id, e.loc.frame),
            ));
        };
        if e.loc.offset as u64 + e.loc.len as u64 > f.plain_len as u64 {
            return Err(Error::corrupt(
                object,
                off,
                format!("chunk {} runs past frame {}", e.id, e.loc.frame),
            ));
        }
        if let Some(prev) = entries.last().map(|p: &PackEntry| p.id)
            && prev >= e.id
        {
            return Err(Error::corrupt(object, off, "index entries not sorted"));
        }
        entries.push(e);
    }
    Ok((entries, frames))
}

/// Parses a 16-byte frame header and checks it against the frame table.
pub fn check_frame_header(object: &str, frame: u32, want: &FrameInfo, bytes: &[u8]) -> Result<()> {
    if bytes.len() != FRAME_HEADER_LEN as usize {
        return Err(Error::corrupt(
            object,
            want.offset,
            format!("frame {frame} header cut short"),
        ));
    }
    let got = FrameInfo {
        offset: want.offset,
        plain_len: u32_at(bytes, 0),
        stored_len: u32_at(bytes, 4),
        flags: u32_at(bytes, 8),
        crc: u32_at(bytes, 12),
    };
    if &got != want {
        return Err(Error::corrupt(
            object,
            want.offset,
            format!("frame {frame} header disagrees with the frame table"),
        ));
    }
    Ok(())
}

/// Decodes a frame's stored bytes: checksum, then (a sealed frame, with `keys`) authenticated
/// decryption, then decompression to exactly `plain_len`. With `keys` (an encrypted store),
/// a frame neither sealed nor metadata is refused; without, a sealed frame is.
pub fn decode_frame(
    object: &str,
    frame: u32,
    info: &FrameInfo,
    stored: &[u8],
    keys: Option<&Keys>,
) -> Result<Vec<u8>> {
    let at = info.offset + FRAME_HEADER_LEN;
    if stored.len() != info.stored_len as usize {
        return Err(Error::corrupt(
            object,
            at,
            format!("frame {frame} cut short"),
        ));
    }
    if crc32c::crc32c(stored) != info.crc {
        return Err(Error::corrupt(
            object,
            at,
            format!("frame {frame} checksum mismatch"),
        ));
    }
    let opened;
    let body = match (info.flags & FLAG_SEALED != 0, keys) {
        (true, None) => {
            return Err(Error::corrupt(
                object,
                at,
                format!(
                    "frame {frame} is sealed (written by an encrypted store), and no key was given"
                ),
            ));
        }
        (true, Some(k)) => {
            opened = k.open_frame(object, frame, at, info.plain_len, info.flags, stored)?;
            &opened[..]
        }
        (false, Some(_)) if info.flags & FLAG_META == 0 => {
            return Err(Error::corrupt(
                object,
                at,
                format!("frame {frame} is not sealed, but the store is encrypted"),
            ));
        }
        (false, _) => stored,
    };
    if info.flags & FLAG_ZSTD == 0 {
        if body.len() != info.plain_len as usize {
            return Err(Error::corrupt(
                object,
                at,
                format!(
                    "frame {frame} holds {} bytes, not {}",
                    body.len(),
                    info.plain_len
                ),
            ));
        }
        return Ok(body.to_vec());
    }
    let cap = info.plain_len.min(MAX_FRAME_LEN) as usize;
    let plain = zstd::bulk::decompress(body, cap).map_err(|e| {
        Error::corrupt(
            object,
            at,
            format!("frame {frame} does not decompress: {e}"),
        )
    })?;
    if plain.len() != info.plain_len as usize {
        return Err(Error::corrupt(
            object,
            at,
            format!(
                "frame {frame} decompresses to {} bytes, not {}",
                plain.len(),
                info.plain_len
            ),
        ));
    }
    Ok(plain)
}

/// A bounded LRU cache of decompressed frames, keyed by pack and frame, shared by readers.
///
/// A frame is decoded once however many readers want it at the same moment (the others wait for
/// it), and each chunk of a cached frame is hashed against its id once, not on every read: the
/// cache remembers which (offset, length, id) it has checked in that decoded frame.
#[derive(Debug)]
pub struct FrameCache {
    inner: Mutex<CacheInner>,
    /// Signalled when a frame being decoded is ready (or its decoding failed).
    ready: Condvar,
    max_bytes: usize,
}

/// A cache key: the pack and the frame's number in it.
type FrameKey = (PackId, u32);

/// A decoded frame, the tick of its last use, and the chunks checked in it.
#[derive(Debug)]
struct CachedFrame {
    plain: std::sync::Arc<Vec<u8>>,
    tick: u64,
    checked: HashSet<(u32, u32, ChunkId)>,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<FrameKey, CachedFrame>,
    /// The frames of `map` by the tick of their last use: the first is evicted first.
    by_use: BTreeMap<u64, FrameKey>,
    /// Frames some reader is decoding now.
    loading: HashSet<FrameKey>,
    bytes: usize,
    tick: u64,
}

/// Default byte bound of a store's frame cache (imports, exports, verify).
pub const FRAME_CACHE_BYTES: usize = 32 << 20;

/// The bound new pack stores give their frame cache; see [`set_frame_cache_bytes`].
static FRAME_CACHE_LIMIT: AtomicUsize = AtomicUsize::new(FRAME_CACHE_BYTES);

/// Sets the frame-cache bound of pack stores opened from now on in this process. Servers
/// (`vmnest serve`, `mount`) raise it so that a disk read at random is decoded once, not once
/// per read; it is an upper bound, reached only when that much has been read.
pub fn set_frame_cache_bytes(bytes: usize) {
    FRAME_CACHE_LIMIT.store(bytes, Ordering::Relaxed);
}

/// The bound set by [`set_frame_cache_bytes`] (default [`FRAME_CACHE_BYTES`]).
pub fn frame_cache_bytes() -> usize {
    FRAME_CACHE_LIMIT.load(Ordering::Relaxed)
}

impl CacheInner {
    /// Frame `key`, if cached, now its most recently used.
    fn touch(&mut self, key: FrameKey) -> Option<std::sync::Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.map.get_mut(&key)?;
        let old = std::mem::replace(&mut e.tick, tick);
        let plain = e.plain.clone();
        self.by_use.remove(&old);
        self.by_use.insert(tick, key);
        Some(plain)
    }
}

impl FrameCache {
    /// A cache holding at most `max_bytes` of plaintext.
    pub fn new(max_bytes: usize) -> FrameCache {
        FrameCache {
            inner: Mutex::new(CacheInner::default()),
            ready: Condvar::new(),
            max_bytes,
        }
    }

    pub(crate) fn get(&self, key: FrameKey) -> Option<std::sync::Arc<Vec<u8>>> {
        let mut g = self.inner.lock().ok()?;
        g.touch(key)
    }

    /// Whether frame `key` is cached, without counting it as a use (read-ahead looks with it,
    /// so that looking does not change which frames go first).
    pub(crate) fn contains(&self, key: FrameKey) -> bool {
        self.inner.lock().is_ok_and(|g| g.map.contains_key(&key))
    }

    pub(crate) fn insert(&self, key: FrameKey, frame: std::sync::Arc<Vec<u8>>) {
        let Ok(mut g) = self.inner.lock() else { return };
        self.insert_locked(&mut g, key, frame);
    }

    fn insert_locked(&self, g: &mut CacheInner, key: FrameKey, frame: std::sync::Arc<Vec<u8>>) {
        if frame.len() > self.max_bytes {
            return;
        }
        g.tick += 1;
        let tick = g.tick;
        g.bytes += frame.len();
        let entry = CachedFrame {
            plain: frame,
            tick,
            checked: HashSet::new(),
        };
        if let Some(old) = g.map.insert(key, entry) {
            g.bytes -= old.plain.len();
            g.by_use.remove(&old.tick);
        }
        g.by_use.insert(tick, key);
        while g.bytes > self.max_bytes {
            let Some((_, victim)) = g.by_use.pop_first() else {
                break;
            };
            if let Some(v) = g.map.remove(&victim) {
                g.bytes -= v.plain.len();
            }
        }
    }

    /// The cached frame `key`, or `load`'s result, cached. While one caller loads a frame, other
    /// callers of the same frame wait for it instead of decoding it again.
    pub(crate) fn get_or_load(
        &self,
        key: FrameKey,
        load: impl FnOnce() -> Result<std::sync::Arc<Vec<u8>>>,
    ) -> Result<std::sync::Arc<Vec<u8>>> {
        let Ok(mut g) = self.inner.lock() else {
            return load();
        };
        loop {
            if let Some(hit) = g.touch(key) {
                return Ok(hit);
            }
            if g.loading.insert(key) {
                break;
            }
            g = match self.ready.wait(g) {
                Ok(g) => g,
                Err(_) => return load(),
            };
        }
        drop(g);
        let result = load();
        if let Ok(mut g) = self.inner.lock() {
            g.loading.remove(&key);
            if let Ok(frame) = &result {
                self.insert_locked(&mut g, key, frame.clone());
            }
        }
        self.ready.notify_all();
        result
    }

    /// Whether chunk `id` at `offset..offset + len` of the cached frame `plain` (this very
    /// decoded copy) has been checked against its id.
    pub(crate) fn is_checked(
        &self,
        key: FrameKey,
        plain: &std::sync::Arc<Vec<u8>>,
        chunk: (u32, u32, ChunkId),
    ) -> bool {
        self.inner.lock().is_ok_and(|g| {
            g.map.get(&key).is_some_and(|e| {
                std::sync::Arc::ptr_eq(&e.plain, plain) && e.checked.contains(&chunk)
            })
        })
    }

    /// Records that `chunk` of the cached frame `plain` matched its id.
    pub(crate) fn mark_checked(
        &self,
        key: FrameKey,
        plain: &std::sync::Arc<Vec<u8>>,
        chunk: (u32, u32, ChunkId),
    ) {
        if let Ok(mut g) = self.inner.lock()
            && let Some(e) = g.map.get_mut(&key)
            && std::sync::Arc::ptr_eq(&e.plain, plain)
        {
            e.checked.insert(chunk);
        }
    }

    /// Bytes of plaintext held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().map(|g| g.bytes).unwrap_or(0)
    }
}

/// An open pack: its trailer and index, read and checked at open; frames read on demand.
#[derive(Debug)]
pub struct PackReader {
    id: PackId,
    path: PathBuf,
    name: String,
    file: File,
    entries: Vec<PackEntry>,
    frames: Vec<FrameInfo>,
    frames_decoded: AtomicU64,
    keys: Option<std::sync::Arc<Keys>>,
    hasher: IdHasher,
}

impl PackReader {
    /// Opens the pack `id` at `path`, reading and checking its trailer and index.
    pub fn open(id: PackId, path: &Path) -> Result<PackReader> {
        Self::open_keyed(id, path, None)
    }

    /// Opens the pack `id` of an encrypted store (`keys`) or a plain one (`None`).
    pub fn open_keyed(
        id: PackId,
        path: &Path,
        keys: Option<std::sync::Arc<Keys>>,
    ) -> Result<PackReader> {
        let name = format!("pack {}", id.to_hex());
        let file = File::open(path).map_err(io_err(path, "open pack"))?;
        let len = file.metadata().map_err(io_err(path, "stat pack"))?.len();
        if len < HEADER_LEN + TRAILER_LEN {
            return Err(Error::corrupt(&name, 0, "file too short for a pack"));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(io_err(path, "read pack"))?;
        if header[..8] != pack_magic() || u32_at(&header, 8) != VERSION {
            return Err(Error::corrupt(&name, 0, "bad pack magic or version"));
        }
        let mut tb = [0u8; TRAILER_LEN as usize];
        file.read_exact_at(&mut tb, len - TRAILER_LEN)
            .map_err(io_err(path, "read pack"))?;
        let t = parse_trailer(&name, &tb, len)?;
        let mut ib = vec![0u8; t.index_len as usize];
        file.read_exact_at(&mut ib, t.index_offset)
            .map_err(io_err(path, "read pack"))?;
        let (entries, frames) = parse_index(&name, &t, &ib)?;
        Ok(PackReader {
            id,
            path: path.to_path_buf(),
            name,
            file,
            entries,
            frames,
            frames_decoded: AtomicU64::new(0),
            hasher: IdHasher::of(keys.as_deref()),
            keys,
        })
    }

    /// The pack file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// The pack's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pack's name.
    pub fn id(&self) -> PackId {
        self.id
    }

    /// The pack's index, sorted by chunk id.
    pub fn entries(&self) -> &[PackEntry] {
        &self.entries
    }

    /// The frame table.
    pub fn frames(&self) -> &[FrameInfo] {
        &self.frames
    }

    /// How many frames this reader decompressed (cache misses).
    pub fn frames_decoded(&self) -> u64 {
        self.frames_decoded.load(Ordering::Relaxed)
    }

    /// Whether the chunk at `loc` is in a metadata frame (an encrypted store's map node).
    pub fn is_meta(&self, loc: ChunkLoc) -> bool {
        in_meta_frame(&self.frames, loc)
    }

    /// Where `id` is in this pack.
    pub fn locate(&self, id: &ChunkId) -> Option<ChunkLoc> {
        self.entries
            .binary_search_by(|e| e.id.cmp(id))
            .ok()
            .map(|i| self.entries[i].loc)
    }

    /// Reads, checks and decodes frame `frame`, through `cache`.
    pub fn frame(&self, frame: u32, cache: Option<&FrameCache>) -> Result<std::sync::Arc<Vec<u8>>> {
        match cache {
            Some(c) => c.get_or_load((self.id, frame), || self.decode(frame)),
            None => self.decode(frame),
        }
    }

    /// Reads, checks and decodes frame `frame` from the file.
    fn decode(&self, frame: u32) -> Result<std::sync::Arc<Vec<u8>>> {
        let Some(info) = self.frames.get(frame as usize) else {
            return Err(Error::corrupt(&self.name, 0, format!("no frame {frame}")));
        };
        let mut buf = vec![0u8; FRAME_HEADER_LEN as usize + info.stored_len as usize];
        self.file
            .read_exact_at(&mut buf, info.offset)
            .map_err(io_err(&self.path, "read pack frame"))?;
        check_frame_header(&self.name, frame, info, &buf[..16])?;
        let plain = std::sync::Arc::new(decode_frame(
            &self.name,
            frame,
            info,
            &buf[16..],
            self.keys.as_deref(),
        )?);
        self.frames_decoded.fetch_add(1, Ordering::Relaxed);
        Ok(plain)
    }

    /// Reads chunk `id` at `loc`, verifying its BLAKE3 against `id`.
    pub fn read_at(
        &self,
        id: &ChunkId,
        loc: ChunkLoc,
        cache: Option<&FrameCache>,
    ) -> Result<Vec<u8>> {
        self.with_chunk(id, loc, cache, <[u8]>::to_vec)
    }

    /// Calls `f` with the bytes of chunk `id` at `loc` inside its decoded frame, after verifying
    /// their BLAKE3 against `id` (once per cached frame): no copy of the chunk is made.
    pub fn with_chunk<R>(
        &self,
        id: &ChunkId,
        loc: ChunkLoc,
        cache: Option<&FrameCache>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        let plain = self
            .frame(loc.frame, cache)
            .map_err(|e| name_chunk(e, id))?;
        let start = loc.offset as usize;
        let Some(data) = start
            .checked_add(loc.len as usize)
            .and_then(|end| plain.get(start..end))
        else {
            return Err(Error::corrupt(
                &self.name,
                0,
                format!("chunk {id} runs past frame {}", loc.frame),
            ));
        };
        let key = (self.id, loc.frame);
        let chunk = (loc.offset, loc.len, *id);
        if cache.is_some_and(|c| c.is_checked(key, &plain, chunk)) {
            return Ok(f(data));
        }
        if self.hasher.id(data) != *id {
            let at = self.frames.get(loc.frame as usize).map_or(0, |f| f.offset);
            return Err(Error::corrupt(
                &self.name,
                at,
                format!("chunk {id} in frame {} does not match its id", loc.frame),
            ));
        }
        if let Some(c) = cache {
            c.mark_checked(key, &plain, chunk);
        }
        Ok(f(data))
    }

    /// Reads chunk `id`, or `Ok(None)` when this pack lacks it.
    pub fn get(&self, id: &ChunkId, cache: Option<&FrameCache>) -> Result<Option<Vec<u8>>> {
        match self.locate(id) {
            Some(loc) => self.read_at(id, loc, cache).map(Some),
            None => Ok(None),
        }
    }

    /// Re-reads the whole file and checks that its BLAKE3 is its name, and every chunk.
    pub fn verify(&self) -> Result<()> {
        let bytes = std::fs::read(&self.path).map_err(io_err(&self.path, "read pack"))?;
        if blake3::hash(&bytes).as_bytes() != &self.id.0 {
            return Err(Error::corrupt(
                &self.name,
                0,
                "pack bytes do not hash to its name",
            ));
        }
        for e in &self.entries {
            self.read_at(&e.id, e.loc, None)?;
        }
        Ok(())
    }
}

fn name_chunk(e: Error, id: &ChunkId) -> Error {
    match e {
        Error::Corrupt { .. } => e.noted(&format!("reading chunk {id}")),
        other => other,
    }
}

/// Parses a whole pack held in memory (the fuzz entry point): trailer, index, every frame and
/// every chunk. Returns the number of chunks that read back intact.
pub fn parse_pack_bytes(bytes: &[u8]) -> Result<usize> {
    parse_pack_bytes_keyed(bytes, None)
}

/// [`parse_pack_bytes`] for a pack of an encrypted store (`keys`) or a plain one.
pub fn parse_pack_bytes_keyed(bytes: &[u8], keys: Option<&Keys>) -> Result<usize> {
    let hasher = IdHasher::of(keys);
    let name = "pack <memory>";
    let len = bytes.len() as u64;
    if len < HEADER_LEN + TRAILER_LEN {
        return Err(Error::corrupt(name, 0, "file too short for a pack"));
    }
    let t = parse_trailer(name, &bytes[bytes.len() - TRAILER_LEN as usize..], len)?;
    let start = t.index_offset as usize;
    let (entries, frames) = parse_index(name, &t, &bytes[start..start + t.index_len as usize])?;
    let mut decoded: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut ok = 0;
    for e in &entries {
        let f = frames[e.loc.frame as usize];
        if let std::collections::hash_map::Entry::Vacant(v) = decoded.entry(e.loc.frame) {
            let h = f.offset as usize;
            check_frame_header(name, e.loc.frame, &f, &bytes[h..h + 16])?;
            let plain = decode_frame(
                name,
                e.loc.frame,
                &f,
                &bytes[h + 16..h + 16 + f.stored_len as usize],
                keys,
            )?;
            v.insert(plain);
        }
        let plain = &decoded[&e.loc.frame];
        let s = e.loc.offset as usize;
        if hasher.id(&plain[s..s + e.loc.len as usize]) == e.id {
            ok += 1;
        }
        if decoded.len() > 4 {
            decoded.clear();
        }
    }
    Ok(ok)
}

#[cfg(test)]
pub(crate) mod tests;
