//! Writing new qcow2 images (version 2 or 3), plain or compressed, optionally over a backing file.
//!
//! # Layout
//!
//! ```text
//!  cluster 0       header, extensions, backing file name     (written last)
//!  clusters 1..    L1 table (its size is known at creation)
//!  data area       data clusters, appended as commits arrive; compressed clusters are packed
//!                  byte by byte, several to a host cluster
//!  then            L2 tables, refcount table, refcount blocks (all computed in `finish`)
//! ```
//!
//! Plain images accept commits in any order from many threads: the host offset of a run of
//! clusters is taken from the allocator under a short mutex (which also records the L2 entries in
//! memory), the data is written after the lock is released. Compressed images compress in
//! [`ImageWriter::prepare`] (on the engine's workers) and take commits in ascending order.
//!
//! Every host cluster is referenced exactly once, except those holding compressed data, whose
//! refcount is the number of compressed clusters touching them (that is how the spec's readers
//! and checkers count them), so the refcounts written in `finish` are exact: no leaks, no
//! corruptions.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::create::{
    BackingSpec, CreateOptions, ImageWriter, Prepared, TempOutput, Unit, WriteOrder,
};
use crate::error::{Error, Result};

use super::header::{
    COMPAT_LAZY_REFCOUNTS, CompressionType, EXT_BACKING_FORMAT, EXT_END, Header,
    INCOMPAT_COMPRESSION, MAGIC, MAX_BACKING_NAME_LEN, MAX_CLUSTER_BITS, MAX_L1_ENTRIES,
    MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, V2_HEADER_LEN,
};
use super::map::{COPIED, L2_COMPRESSED, L2_ZERO};

/// `header_length` written in version 3 headers: the fields up to `compression_type`, padded
/// to a multiple of 8.
pub const V3_HEADER_LEN: u32 = 112;
/// Refcount width this writer produces (refcount_order 4).
pub const REFCOUNT_BITS: u32 = 16;
/// Largest refcount a 16-bit entry holds; a host cluster shared by compressed clusters never
/// gets more.
const MAX_REFCOUNT: u16 = u16::MAX;
/// zlib level for compressed clusters (zlib's default).
const ZLIB_LEVEL: u32 = 6;
/// Deflate window qcow2 readers accept: 4 KiB (qemu inflates with a 12-bit window).
const DEFLATE_WINDOW_BITS: u8 = 12;
/// zstd level for compressed clusters (zstd's default).
const ZSTD_LEVEL: i32 = 3;
/// Bytes in a compressed-cluster sector.
const SECTOR: u64 = 512;

/// What `-o`, `-c` and `-B` asked for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Guest size (rounded up to a sector).
    pub size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub cluster_bits: u32,
    pub compression: CompressionType,
    pub lazy_refcounts: bool,
    /// `-c`: compress every data cluster.
    pub compress: bool,
    pub backing: Option<BackingSpec>,
}

impl Settings {
    /// Reads and validates the options (unknown keys are refused, naming them).
    pub fn from_options(options: &CreateOptions) -> Result<Settings> {
        let mut r = options.reader("qcow2");
        let version = match r.choice("compat", &["1.1", "v3", "0.10", "v2"])?.as_deref() {
            Some("0.10" | "v2") => 2,
            _ => 3,
        };
        let cluster_size = r.size("cluster_size")?.unwrap_or(1 << 16);
        let min = 1u64 << MIN_CLUSTER_BITS;
        let max = 1u64 << MAX_CLUSTER_BITS;
        if !cluster_size.is_power_of_two() || !(min..=max).contains(&cluster_size) {
            return Err(r.bad(
                "cluster_size",
                &cluster_size.to_string(),
                &format!("a power of two from {min} to {max}"),
            ));
        }
        let cluster_bits = cluster_size.trailing_zeros();
        let compression = match r.choice("compression_type", &["zlib", "zstd"])?.as_deref() {
            Some("zstd") => CompressionType::Zstd,
            _ => CompressionType::Zlib,
        };
        if compression == CompressionType::Zstd && version < 3 {
            return Err(invalid(
                "qcow2 option compression_type=zstd needs compat=1.1 (version 2 images have no \
                 compression type field)",
            ));
        }
        let lazy_refcounts = r.bool("lazy_refcounts")?.unwrap_or(false);
        if lazy_refcounts && version < 3 {
            return Err(invalid("qcow2 option lazy_refcounts=on needs compat=1.1"));
        }
        if let Some(bits) = r.string("refcount_bits")
            && bits != REFCOUNT_BITS.to_string()
        {
            return Err(r.bad(
                "refcount_bits",
                &bits,
                "16 (the only refcount width this writer produces)",
            ));
        }
        if let Some(mode) = r.string("preallocation")
            && mode != "off"
        {
            return Err(r.bad("preallocation", &mode, "off (the only mode supported)"));
        }
        let file = r.string("backing_file");
        let fmt = r.string("backing_fmt");
        r.finish()?;
        let backing = match (&options.backing, file, fmt) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(invalid(
                    "qcow2: the backing file is given twice (-B and -o backing_file/backing_fmt)",
                ));
            }
            (Some(b), None, None) => Some(b.clone()),
            (None, Some(recorded), fmt) => Some(BackingSpec {
                recorded,
                format: fmt.unwrap_or_default(),
            }),
            (None, None, Some(_)) => {
                return Err(invalid("qcow2 option backing_fmt needs backing_file"));
            }
            (None, None, None) => None,
        };
        if let Some(b) = &backing
            && (b.recorded.is_empty() || b.recorded.len() > MAX_BACKING_NAME_LEN as usize)
        {
            return Err(invalid(format!(
                "qcow2 backing file name of {} bytes: expected 1 to {MAX_BACKING_NAME_LEN}",
                b.recorded.len()
            )));
        }
        let size = options
            .size
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| invalid(format!("qcow2 size {} too large", options.size)))?;
        Ok(Settings {
            size,
            version,
            cluster_bits,
            compression,
            lazy_refcounts,
            compress: options.compress,
            backing,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest clusters one L2 table maps.
    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        path: PathBuf::new(),
        reason: reason.into(),
    }
}

/// The backing file name and format recorded in the first cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderExtras<'a> {
    pub backing_name: Option<&'a str>,
    pub backing_format: Option<&'a str>,
}

/// Encodes the first cluster: the header fields of `h` (version 2 or 3), a backing format
/// extension, the end-of-extensions marker, then the backing file name (whose offset and size
/// are filled in here, overriding `h`). Fails if it does not fit in one cluster.
pub fn encode_header(h: &Header, extras: HeaderExtras<'_>) -> Result<Vec<u8>> {
    let header_len = if h.version >= 3 {
        h.header_length.max(V3_HEADER_LEN)
    } else {
        V2_HEADER_LEN
    } as usize;
    let mut b = vec![0u8; header_len];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    b[0..4].copy_from_slice(&MAGIC);
    put32(&mut b, 4, h.version);
    put32(&mut b, 20, h.cluster_bits);
    put64(&mut b, 24, h.size);
    put32(&mut b, 32, h.crypt_method);
    put32(&mut b, 36, h.l1_size);
    put64(&mut b, 40, h.l1_table_offset);
    put64(&mut b, 48, h.refcount_table_offset);
    put32(&mut b, 56, h.refcount_table_clusters);
    put32(&mut b, 60, h.nb_snapshots);
    put64(&mut b, 64, h.snapshots_offset);
    if h.version >= 3 {
        put64(&mut b, 72, h.incompatible_features);
        put64(&mut b, 80, h.compatible_features);
        put64(&mut b, 88, h.autoclear_features);
        put32(&mut b, 96, h.refcount_order);
        put32(&mut b, 100, header_len as u32);
        b[104] = match h.compression_type {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        };
    }
    if let Some(fmt) = extras.backing_format {
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        b.extend_from_slice(fmt.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b.extend_from_slice(&EXT_END.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    if let Some(name) = extras.backing_name {
        let at = b.len();
        b.extend_from_slice(name.as_bytes());
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, name.len() as u32);
    }
    if b.len() as u64 > h.cluster_size() {
        return Err(invalid(format!(
            "qcow2 header with its backing file name needs {} bytes, more than a {}-byte cluster",
            b.len(),
            h.cluster_size()
        )));
    }
    Ok(b)
}

/// The L2 entry of a compressed cluster whose `len` stream bytes start at byte `host`.
pub fn compressed_entry(cluster_bits: u32, host: u64, len: u64) -> u64 {
    let shift = 62 - (cluster_bits - 8);
    // Sectors touched, counted from the one holding `host`, minus one.
    let extra = (host % SECTOR + len).div_ceil(SECTOR).saturating_sub(1);
    L2_COMPRESSED | (extra << shift) | host
}

/// Big-endian bytes of a table of u64 entries.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Sizes of the refcount structures covering a file of `base` clusters plus themselves:
/// (refcount table clusters, refcount block clusters).
pub fn refcount_sizes(base: u64, cluster_size: u64) -> Option<(u64, u64)> {
    let per_block = cluster_size * 8 / u64::from(REFCOUNT_BITS);
    let per_table_cluster = cluster_size / 8;
    let (mut rt, mut rb) = (0u64, 0u64);
    // Each round only grows; it converges in a few rounds (blocks cover far more than they use).
    for _ in 0..64 {
        let total = base.checked_add(rt)?.checked_add(rb)?;
        let nb = total.div_ceil(per_block);
        let nt = nb.div_ceil(per_table_cluster);
        if (nt, nb) == (rt, rb) {
            return Some((rt, rb));
        }
        (rt, rb) = (nt, nb);
    }
    None
}

/// One refcount block (16-bit entries) for the clusters from `first`, `count_of` giving each
/// cluster's refcount for clusters below `total`, zero after.
pub fn encode_refcount_block(
    cluster_size: u64,
    first: u64,
    total: u64,
    count_of: impl Fn(u64) -> u16,
) -> Vec<u8> {
    let per_block = cluster_size / 2;
    let mut b = vec![0u8; cluster_size as usize];
    for i in 0..per_block {
        let c = first + i;
        if c >= total {
            break;
        }
        let at = i as usize * 2;
        b[at..at + 2].copy_from_slice(&count_of(c).to_be_bytes());
    }
    b
}

/// Creates a qcow2 image at `path` (under a temporary name until `finish`).
pub fn create(path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    let s = Settings::from_options(options).map_err(|e| e.in_file(path))?;
    let cs = s.cluster_size();
    let l1_size = s
        .size
        .div_ceil(s.l2_entries() * cs)
        .try_into()
        .ok()
        .filter(|&n: &u32| n <= MAX_L1_ENTRIES)
        .ok_or_else(|| {
            invalid(format!(
                "a {}-byte qcow2 image with {cs}-byte clusters needs more than {MAX_L1_ENTRIES} L1 \
                 entries (use larger clusters)",
                s.size
            ))
            .in_file(path)
        })?;
    let l1_clusters = (u64::from(l1_size) * 8).div_ceil(cs);
    // Check the header fits before any file exists.
    let probe = header_for(&s, l1_size, 0, 0)?;
    encode_header(&probe, extras(&s)).map_err(|e| e.in_file(path))?;
    let out = TempOutput::create_with(path, !options.no_sync)?;
    let first_data = 1 + l1_clusters;
    let counts = if s.compress {
        Some(vec![1u16; first_data as usize])
    } else {
        None
    };
    Ok(Box::new(Qcow2Writer {
        l1_size,
        state: Mutex::new(State {
            next_cluster: first_data,
            cursor: 0,
            counts,
            l2: (0..l1_size).map(|_| None).collect(),
        }),
        out,
        s,
    }))
}

fn extras(s: &Settings) -> HeaderExtras<'_> {
    HeaderExtras {
        backing_name: s.backing.as_ref().map(|b| b.recorded.as_str()),
        backing_format: s
            .backing
            .as_ref()
            .map(|b| b.format.as_str())
            .filter(|f| !f.is_empty()),
    }
}

fn header_for(s: &Settings, l1_size: u32, rt_offset: u64, rt_clusters: u64) -> Result<Header> {
    let mut incompatible = 0;
    if s.compression == CompressionType::Zstd {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    Ok(Header {
        version: s.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: s.cluster_bits,
        size: s.size,
        crypt_method: 0,
        l1_size,
        l1_table_offset: if l1_size > 0 { s.cluster_size() } else { 0 },
        refcount_table_offset: rt_offset,
        refcount_table_clusters: u32::try_from(rt_clusters)
            .map_err(|_| invalid("qcow2 refcount table too large"))?,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if s.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: REFCOUNT_BITS.trailing_zeros(),
        header_length: if s.version >= 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: s.compression,
    })
}

/// A qcow2 image being written.
#[derive(Debug)]
pub struct Qcow2Writer {
    s: Settings,
    l1_size: u32,
    state: Mutex<State>,
    out: TempOutput,
}

/// The allocator and the in-memory L2 tables.
#[derive(Debug)]
struct State {
    /// First host cluster not yet used.
    next_cluster: u64,
    /// Compressed images: the byte where the next compressed stream may go (0: none yet).
    cursor: u64,
    /// Compressed images: the refcount of every host cluster below `next_cluster`.
    counts: Option<Vec<u16>>,
    /// One L2 table per L1 entry, made when first needed.
    l2: Vec<Option<Box<[u64]>>>,
}

impl State {
    /// `n` whole clusters at the end of the data area: their first host offset.
    fn clusters(&mut self, n: u64, cluster_bits: u32) -> Result<u64> {
        let first = self.next_cluster;
        self.next_cluster = first
            .checked_add(n)
            .filter(|&c| c < 1 << (56 - cluster_bits))
            .ok_or_else(|| invalid("qcow2 image grows past the 64 PiB host offset limit"))?;
        if let Some(counts) = &mut self.counts {
            counts.resize(self.next_cluster as usize, 1);
        }
        Ok(first << cluster_bits)
    }

    /// Room for a compressed stream of `len` bytes: packed after the previous one when it fits
    /// in that one's last cluster, or that cluster is the last one allocated (the stream may then
    /// run on into new clusters); else at the next free cluster.
    fn compressed(&mut self, len: u64, cluster_bits: u32) -> Result<u64> {
        let cs = 1u64 << cluster_bits;
        let counts = self.counts.get_or_insert_with(Vec::new);
        let cur = self.cursor;
        let cur_cluster = cur >> cluster_bits;
        let usable = !cur.is_multiple_of(cs)
            && counts
                .get(cur_cluster as usize)
                .is_some_and(|&n| n < MAX_REFCOUNT)
            && (cur + len <= (cur_cluster + 1) * cs || cur_cluster + 1 == self.next_cluster);
        let start = if usable {
            cur
        } else {
            self.next_cluster << cluster_bits
        };
        let end = start + len;
        let end_cluster = end.div_ceil(cs);
        if end_cluster >= 1 << (56 - cluster_bits) {
            return Err(invalid(
                "qcow2 image grows past the 64 PiB host offset limit",
            ));
        }
        if end_cluster > self.next_cluster {
            self.next_cluster = end_cluster;
            counts.resize(end_cluster as usize, 0);
        }
        for c in (start >> cluster_bits)..end_cluster {
            if let Some(n) = counts.get_mut(c as usize) {
                *n = n.saturating_add(1);
            }
        }
        self.cursor = end;
        Ok(start)
    }

    /// The L2 entry slot of guest cluster `cluster`.
    fn entry(&mut self, cluster: u64, l2_entries: u64) -> Result<&mut u64> {
        let l1 = (cluster / l2_entries) as usize;
        let table = self
            .l2
            .get_mut(l1)
            .ok_or_else(|| invalid("qcow2 write past the end of the disk"))?
            .get_or_insert_with(|| vec![0u64; l2_entries as usize].into_boxed_slice());
        Ok(&mut table[(cluster % l2_entries) as usize])
    }

    /// Sets the entry of guest cluster `cluster`, which must be unset.
    fn set(&mut self, cluster: u64, l2_entries: u64, value: u64) -> Result<()> {
        let slot = self.entry(cluster, l2_entries)?;
        if *slot != 0 {
            return Err(invalid(format!(
                "qcow2 writer: guest cluster {cluster} written twice"
            )));
        }
        *slot = value;
        Ok(())
    }
}

thread_local! {
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses one cluster; `None` when the result would not be smaller than the cluster.
pub fn compress_cluster(kind: CompressionType, data: &[u8]) -> Result<Option<Vec<u8>>> {
    // One byte less than the cluster: a stream that does not fit is not worth storing.
    let mut out = vec![0u8; data.len().saturating_sub(1)];
    let n = match kind {
        CompressionType::Zlib => DEFLATE.with(|cell| {
            let mut cell = cell.borrow_mut();
            let c = cell.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(
                    flate2::Compression::new(ZLIB_LEVEL),
                    false,
                    DEFLATE_WINDOW_BITS,
                )
            });
            let result = match c.compress(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Ok(Some(c.total_out() as usize)),
                Ok(_) => Ok(None),
                Err(e) => Err(invalid(format!("deflate failed: {e}"))),
            };
            // Reuse the state only after a finished stream: resetting one abandoned with its
            // output full leaves stale pending bytes behind in zlib-rs 0.6 (a later stored block
            // then overflows its buffer and panics).
            match result {
                Ok(Some(_)) => c.reset(),
                _ => *cell = None,
            }
            result
        })?,
        CompressionType::Zstd => ZSTD.with(|cell| {
            let mut cell = cell.borrow_mut();
            let c = match cell.as_mut() {
                Some(c) => c,
                None => cell.insert(
                    zstd::bulk::Compressor::new(ZSTD_LEVEL)
                        .map_err(|e| invalid(format!("zstd init failed: {e}")))?,
                ),
            };
            // An error here means the output buffer is too small: store the cluster as is.
            Ok::<_, Error>(c.compress_to_buffer(data, &mut out).ok())
        })?,
    };
    Ok(n.map(|n| {
        out.truncate(n);
        out
    }))
}

impl Qcow2Writer {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cluster_size_u(&self) -> u64 {
        self.s.cluster_size()
    }

    /// Checks that `[off, off + len)` is cluster-aligned (its end may be the disk's end).
    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size_u();
        let end = off.checked_add(len).filter(|&e| e <= self.s.size);
        match end {
            Some(end)
                if off.is_multiple_of(cs) && (end.is_multiple_of(cs) || end == self.s.size) =>
            {
                Ok(())
            }
            _ => Err(invalid(format!(
                "qcow2 writer: range {off:#x}+{len:#x} is not cluster-aligned inside the \
                 {}-byte disk",
                self.s.size
            ))
            .in_file(self.out.dest())),
        }
    }

    /// Stores uncompressed bytes for the clusters from guest offset `off`.
    fn store_plain(&self, off: u64, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size_u();
        let bits = self.s.cluster_bits;
        let n = (bytes.len() as u64).div_ceil(cs);
        let host = {
            let mut st = self.lock();
            let host = st.clusters(n, bits)?;
            for i in 0..n {
                st.set(
                    (off >> bits) + i,
                    self.s.l2_entries(),
                    (host + i * cs) | COPIED,
                )?;
            }
            host
        };
        self.out.file().write_all_at(bytes, host)
    }
}

impl ImageWriter for Qcow2Writer {
    fn size(&self) -> u64 {
        self.s.size
    }

    fn cluster_size(&self) -> u64 {
        self.cluster_size_u()
    }

    fn order(&self) -> WriteOrder {
        if self.s.compress {
            WriteOrder::Ascending
        } else {
            WriteOrder::Any
        }
    }

    fn prepare(&self, off: u64, data: Vec<u8>) -> Result<Prepared> {
        if !self.s.compress {
            return Ok(Prepared::plain(off, data));
        }
        let cs = self.cluster_size_u() as usize;
        let mut units = Vec::with_capacity(data.len().div_ceil(cs));
        let mut padded = Vec::new();
        for chunk in data.chunks(cs) {
            // A short last cluster is compressed as a whole cluster ending in zeros.
            let whole: &[u8] = if chunk.len() == cs {
                chunk
            } else {
                padded.clear();
                padded.extend_from_slice(chunk);
                padded.resize(cs, 0);
                &padded
            };
            units.push(match compress_cluster(self.s.compression, whole)? {
                Some(bytes) => Unit {
                    bytes,
                    compressed: true,
                },
                None => Unit {
                    bytes: chunk.to_vec(),
                    compressed: false,
                },
            });
        }
        Ok(Prepared {
            off,
            len: data.len() as u64,
            units,
        })
    }

    fn commit(&self, prepared: Prepared) -> Result<()> {
        self.check_range(prepared.off, prepared.len)?;
        let cs = self.cluster_size_u();
        if !prepared.units.iter().any(|u| u.compressed) {
            // Plain units are consecutive guest bytes: one run of host clusters.
            if prepared.units.len() == 1 {
                return self.store_plain(prepared.off, &prepared.units[0].bytes);
            }
        }
        let bits = self.s.cluster_bits;
        let mut guest = prepared.off;
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        {
            let mut st = self.lock();
            for unit in prepared.units {
                let len = unit.bytes.len() as u64;
                if len == 0 {
                    continue;
                }
                let (host, entry) = if unit.compressed {
                    let host = st.compressed(len, bits)?;
                    (host, compressed_entry(bits, host, len))
                } else {
                    if len > cs {
                        return Err(invalid("qcow2 writer: a unit is larger than a cluster")
                            .in_file(self.out.dest()));
                    }
                    let host = st.clusters(1, bits)?;
                    (host, host | COPIED)
                };
                st.set(guest >> bits, self.s.l2_entries(), entry)?;
                // Merge streams that follow each other on the host into one write.
                match writes.last_mut() {
                    Some((h, buf)) if *h + buf.len() as u64 == host => {
                        buf.extend_from_slice(&unit.bytes)
                    }
                    _ => writes.push((host, unit.bytes)),
                }
                guest += cs;
            }
        }
        for (host, buf) in writes {
            self.out.file().write_all_at(&buf, host)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        let bits = self.s.cluster_bits;
        let first = off >> bits;
        let count = len.div_ceil(self.cluster_size_u());
        if self.s.version >= 3 {
            let mut st = self.lock();
            for c in first..first + count {
                st.set(c, self.s.l2_entries(), L2_ZERO)?;
            }
            return Ok(());
        }
        // Version 2 has no zero flag: store zeros.
        let zeros = vec![0u8; self.cluster_size_u() as usize];
        for c in first..first + count {
            let at = c << bits;
            let n = (self.s.size - at).min(zeros.len() as u64) as usize;
            self.store_plain(at, &zeros[..n])?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let Qcow2Writer {
            s,
            l1_size,
            state,
            out,
        } = *self;
        let path = out.dest().to_path_buf();
        let st = state.into_inner().unwrap_or_else(|e| e.into_inner());
        let cs = s.cluster_size();
        let bits = s.cluster_bits;
        let data_end = st.next_cluster;
        // L2 tables, in L1 order, right after the data.
        let mut l1 = vec![0u64; l1_size as usize];
        let mut next = data_end;
        for (i, t) in st.l2.iter().enumerate() {
            if let Some(t) = t {
                out.file().write_all_at(&encode_table(t), next << bits)?;
                l1[i] = (next << bits) | COPIED;
                next += 1;
            }
        }
        let (rt_clusters, rb_clusters) = refcount_sizes(next, cs)
            .filter(|(rt, _)| rt * cs <= MAX_REFCOUNT_TABLE_BYTES)
            .ok_or_else(|| invalid("qcow2 refcount table too large").in_file(&path))?;
        let rt_first = next;
        let rb_first = rt_first + rt_clusters;
        let total = rb_first + rb_clusters;
        let per_block = cs / 2;
        let counts = st.counts.as_deref();
        let count_of = |c: u64| match counts {
            Some(v) if c < data_end => v.get(c as usize).copied().unwrap_or(1),
            _ => 1,
        };
        let mut table = vec![0u64; (rt_clusters * cs / 8) as usize];
        for b in 0..rb_clusters {
            let block = encode_refcount_block(cs, b * per_block, total, count_of);
            let at = (rb_first + b) << bits;
            out.file().write_all_at(&block, at)?;
            table[b as usize] = at;
        }
        out.file()
            .write_all_at(&encode_table(&table), rt_first << bits)?;
        if l1_size > 0 {
            out.file().write_all_at(&encode_table(&l1), cs)?;
        }
        let h = header_for(&s, l1_size, rt_first << bits, rt_clusters)?;
        let head = encode_header(&h, extras(&s)).map_err(|e| e.in_file(&path))?;
        out.file().write_all_at(&head, 0)?;
        // The file ends at the last refcount block (written whole above).
        out.set_len(total << bits)?;
        out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::{parse_extensions, parse_header};
    use super::super::map::{Cluster, Geometry, decode_l2};
    use super::*;

    fn settings(opts: &str) -> Result<Settings> {
        let mut o = CreateOptions {
            size: 1 << 30,
            ..Default::default()
        };
        o.parse_options(opts)?;
        Settings::from_options(&o)
    }

    #[test]
    fn defaults_are_v3_64k_zlib() {
        let s = settings("").unwrap();
        assert_eq!(
            (s.version, s.cluster_bits, s.compression, s.lazy_refcounts),
            (3, 16, CompressionType::Zlib, false)
        );
    }

    #[test]
    fn zstd_needs_version_3() {
        assert!(settings("compat=0.10,compression_type=zstd").is_err());
        assert_eq!(
            settings("compression_type=zstd").unwrap().compression,
            CompressionType::Zstd
        );
    }

    #[test]
    fn bad_options_are_named() {
        for (opts, word) in [
            ("cluster_size=1000", "cluster_size"),
            ("cluster_size=4M", "cluster_size"),
            ("refcount_bits=8", "refcount_bits"),
            ("preallocation=full", "preallocation"),
            ("compat=2.0", "compat"),
            ("colour=blue", "colour"),
            ("backing_fmt=raw", "backing_fmt"),
        ] {
            let msg = settings(opts).unwrap_err().to_string();
            assert!(msg.contains(word), "{opts}: {msg}");
        }
    }

    #[test]
    fn size_rounds_up_to_a_sector() {
        let mut o = CreateOptions {
            size: 1000,
            ..Default::default()
        };
        o.parse_options("").unwrap();
        assert_eq!(Settings::from_options(&o).unwrap().size, 1024);
    }

    #[test]
    fn header_round_trips_through_the_parser() {
        for (version, zstd) in [(3, false), (3, true), (2, false)] {
            let s = Settings {
                size: 20 << 20,
                version,
                cluster_bits: 16,
                compression: if zstd {
                    CompressionType::Zstd
                } else {
                    CompressionType::Zlib
                },
                lazy_refcounts: version == 3,
                compress: false,
                backing: Some(BackingSpec {
                    recorded: "base.qcow2".into(),
                    format: "qcow2".into(),
                }),
            };
            let h = header_for(&s, 1, 0x30000, 1).unwrap();
            let bytes = encode_header(&h, extras(&s)).unwrap();
            let parsed = parse_header(&bytes).unwrap();
            let mut want = h.clone();
            want.backing_file_offset = parsed.backing_file_offset;
            want.backing_file_size = 10;
            assert_eq!(parsed, want);
            let name_at = parsed.backing_file_offset as usize;
            assert_eq!(&bytes[name_at..], b"base.qcow2");
            let ext = parse_extensions(&bytes, parsed.header_length as usize, name_at).unwrap();
            assert_eq!(ext.backing_format.as_deref(), Some("qcow2"));
        }
    }

    #[test]
    fn header_too_big_for_the_cluster_is_refused() {
        let mut s = settings("cluster_size=512").unwrap();
        s.backing = Some(BackingSpec {
            recorded: "x".repeat(500),
            format: "raw".into(),
        });
        let h = header_for(&s, 1, 512, 1).unwrap();
        assert!(encode_header(&h, extras(&s)).is_err());
    }

    #[test]
    fn compressed_entry_decodes_to_the_same_stream() {
        for bits in [9u32, 12, 16, 21] {
            let g = Geometry {
                cluster_bits: bits,
                l2_entries: (1 << bits) / 8,
                extended: false,
                v3: true,
            };
            for (host, len) in [(0x30000u64 + 7, 100u64), (0x30000 + 511, 2), (0x40000, 512)] {
                let len = len.min((1 << bits) - 1);
                let e = compressed_entry(bits, host, len);
                match decode_l2(&g, e, 0, 0).unwrap() {
                    Cluster::Compressed { host: h, len: l } => {
                        assert_eq!(h, host);
                        // The decoded length covers the stream and ends on a sector.
                        assert!(l >= len && l - len < 512 && (h + l) % 512 == 0);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn refcount_structures_cover_themselves() {
        for (base, cs) in [
            (1u64, 512u64),
            (5, 65536),
            (100_000, 4096),
            (256, 512),
            (255, 512),
        ] {
            let (rt, rb) = refcount_sizes(base, cs).unwrap();
            let total = base + rt + rb;
            assert!(rb * (cs / 2) >= total, "{base} {cs}");
            assert!(rt * (cs / 8) >= rb);
            assert!((rb - 1) * (cs / 2) < total, "no spare block");
        }
    }

    #[test]
    fn refcount_block_holds_big_endian_counts_then_zeros() {
        let b = encode_refcount_block(512, 256, 258, |c| c as u16);
        assert_eq!(&b[..6], &[1, 0, 1, 1, 0, 0]);
    }

    #[test]
    fn compressed_clusters_pack_and_share_host_clusters() {
        let mut st = State {
            next_cluster: 2,
            cursor: 0,
            counts: Some(vec![1, 1]),
            l2: Vec::new(),
        };
        let a = st.compressed(300, 9).unwrap();
        let b = st.compressed(300, 9).unwrap(); // runs on into a new cluster
        assert_eq!((a, b), (1024, 1324));
        let c = st.clusters(1, 9).unwrap(); // a plain cluster after them
        assert_eq!(c, 2048);
        let d = st.compressed(100, 9).unwrap(); // fits in the half-used cluster 2
        assert_eq!(d, 1624);
        let e = st.compressed(400, 9).unwrap(); // does not: fresh cluster
        assert_eq!(e, 2560);
        assert_eq!(st.counts.unwrap(), vec![1, 1, 2, 2, 1, 1]);
    }

    #[test]
    fn deflate_state_survives_an_abandoned_stream() {
        let mut x = 0x9e37_79b9_u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        // Alternate incompressible and half-compressible clusters on one thread.
        for _ in 0..20 {
            assert!(
                compress_cluster(CompressionType::Zlib, &noise(4096))
                    .unwrap()
                    .is_none()
            );
            let mut half = noise(2048);
            half.resize(4096, 0);
            let packed = compress_cluster(CompressionType::Zlib, &half)
                .unwrap()
                .unwrap();
            let mut out = vec![0u8; 4096];
            let mut d = flate2::Decompress::new_with_window_bits(false, DEFLATE_WINDOW_BITS);
            d.decompress(&packed, &mut out, flate2::FlushDecompress::Finish)
                .unwrap();
            assert_eq!(out, half);
        }
    }

    #[test]
    fn incompressible_cluster_is_not_compressed() {
        let mut x = 0x1234_5678_u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(compress_cluster(kind, &data).unwrap().is_none());
            let text = vec![b'a'; 4096];
            let packed = compress_cluster(kind, &text).unwrap().unwrap();
            assert!(packed.len() < 100);
        }
    }
}
