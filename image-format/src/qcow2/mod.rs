//! qcow2 (versions 2 and 3): reading, and writing new images (`write.rs`). Spec: qemu's `docs/interop/qcow2.rst`.
//!
//! # Design
//!
//! ```text
//!  header.rs  pure: header, extensions, feature names, snapshot and bitmap directory entries
//!  map.rs     pure: L2 entry -> Cluster, (L2 table, guest offset) -> Mapping run
//!  io.rs      L2 table LRU cache, compressed-cluster decompression
//!  check.rs   refcount rebuild from every reference, compared with the stored refcounts
//!  mod.rs     the driver: open (validate, load L1, snapshots, backing), read_at, block_status
//!  write.rs   the writer of new images: options, allocator, compression, exact refcounts
//!  rw.rs      in-place writes to an existing image opened writable (BlockDeviceMut)
//! ```
//!
//! At open the header is validated against named caps (L1 entries, refcount table bytes,
//! snapshot count, name lengths, cluster_bits 9..=21) and the active L1 table is loaded whole.
//! L2 tables are loaded on demand through [`io::L2Cache`], a bounded LRU behind a mutex that is
//! held only for the lookup. A read walks the request one [`map::Mapping`] run at a time (a run
//! never leaves its L2 table) and merges runs that are contiguous on the host into one pread.
//!
//! Unallocated ranges read from the backing image (opened through the registry, with the
//! backing-format extension as the format hint, and read with [`read_padded`] because it may be
//! smaller), or as zeros without one. A recorded backing file that was not opened makes such
//! reads fail rather than read zeros.
//!
//! Dirty (incompatible bit 0) and corrupt (bit 1) images open read-only: reading needs only the
//! L1/L2 tables, never the refcounts. Opened writable, an existing image is written in place by
//! `rw.rs` (copy-on-write, allocation, crash-safe ordering: see that module); new images are made
//! by [`write::create`] (see its module for the layout).

mod check;
pub mod header;
mod io;
pub mod map;
mod overlap;
#[cfg(test)]
mod overlap_tests;
mod rw;
pub mod write;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use crate::blockdev::{
    BlockDevice, BlockDeviceMut, Caps, Extent, ExtentKind, backing_status, check_range,
    check_status_range, read_padded,
};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::image::{CheckReport, Image, ImageInfo, SnapshotInfo};
use crate::registry::{Driver, OpenContext, Probe};

use header::{
    Bitmap, COMPAT_LAZY_REFCOUNTS, CompressionType, Extensions, HEADER_PREFIX_LEN, Header,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAGIC, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAPS,
    MAX_SNAPSHOT_TABLE_BYTES, SNAPSHOT_FIXED_LEN, Snapshot,
};
use map::{Geometry, L2Table, Mapping, OFFSET_MASK};

/// The qcow2 format driver.
#[derive(Debug, Default)]
pub struct Qcow2Driver;

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, probe: &Probe<'_>) -> u32 {
        let version = probe
            .head
            .get(4..8)
            .and_then(|v| v.try_into().ok())
            .map(u32::from_be_bytes);
        match (probe.head.get(..4) == Some(&MAGIC[..]), version) {
            (true, Some(2 | 3)) => 100,
            (true, _) => 50,
            _ => 0,
        }
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Arc<dyn Image>> {
        let file = ImageFile::open_with(ctx.path(), ctx.writable())?;
        Ok(Arc::new(Qcow2Image::open(file, ctx)?))
    }

    fn create(
        &self,
        path: &std::path::Path,
        options: &crate::create::CreateOptions,
    ) -> Result<Box<dyn crate::create::ImageWriter>> {
        write::create(path, options)
    }
}

/// The image this one reads unallocated ranges from.
enum Backing {
    None,
    Open(Arc<dyn Image>),
    /// Recorded but not opened (`OpenOptions::open_backing` off).
    NotOpened(String),
}

/// An open qcow2 image.
pub struct Qcow2Image {
    file: ImageFile,
    header: Header,
    ext: Extensions,
    geometry: Geometry,
    /// The active L1 table (changed in place by [`rw`] when opened writable).
    l1: RwLock<Vec<u64>>,
    l2_cache: io::L2Cache,
    /// Held shared from looking up a host offset to using it; taken exclusively by the writer
    /// before a host cluster may be reused (see [`rw`]).
    in_flight: RwLock<()>,
    /// The in-place write state, when opened writable.
    writer: Option<rw::Writer>,
    /// The last decompressed cluster: sequential small reads of one compressed cluster
    /// decompress it once.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    backing_name: Option<String>,
    backing: Backing,
    snapshots: Vec<Snapshot>,
    /// Bytes of the snapshot table (its entries' lengths, summed when they were read).
    snapshot_table_len: u64,
    bitmaps: Vec<Bitmap>,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::None => f.write_str("None"),
            Backing::Open(b) => write!(f, "Open({})", b.format()),
            Backing::NotOpened(name) => write!(f, "NotOpened({name:?})"),
        }
    }
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.file.path())
            .field("header", &self.header)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    fn open(file: ImageFile, ctx: &OpenContext<'_>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let prefix_len = file.len().min(HEADER_PREFIX_LEN as u64) as usize;
        let prefix = file.read_vec(0, prefix_len, "qcow2 header")?;
        let cluster_bits = header::peek_cluster_bits(&prefix).map_err(|e| e.in_file(&path))?;
        let cluster0_len = file.len().min(1 << cluster_bits) as usize;
        let cluster0 = file.read_vec(0, cluster0_len, "qcow2 header")?;
        let header = header::parse_header(&cluster0).map_err(|e| e.in_file(&path))?;
        let cluster_size = header.cluster_size() as usize;
        let ext_limit = match header.backing_file_offset {
            0 => cluster_size,
            off => usize::try_from(off)
                .unwrap_or(cluster_size)
                .min(cluster_size),
        };
        let ext = header::parse_extensions(&cluster0, header.header_length as usize, ext_limit)
            .map_err(|e| e.in_file(&path))?;
        header::check_features(&header, &ext).map_err(|e| e.in_file(&path))?;

        let backing_name = if header.backing_file_offset != 0 && header.backing_file_size > 0 {
            let raw = file.read_vec(
                header.backing_file_offset,
                header.backing_file_size as usize,
                "qcow2 backing file name",
            )?;
            Some(String::from_utf8(raw).map_err(|_| {
                Error::corrupt(
                    "qcow2 backing file name",
                    header.backing_file_offset,
                    "not UTF-8",
                )
                .in_file(&path)
            })?)
        } else {
            None
        };

        let geometry = Geometry {
            cluster_bits: header.cluster_bits,
            l2_entries: header.l2_entries(),
            extended: header.extended_l2(),
            v3: header.version >= 3,
        };
        // Bounded by MAX_L1_ENTRIES (checked in parse_header) and by the file's length.
        let l1 = io::read_table(
            &file,
            header.l1_table_offset,
            header.l1_size as usize * 8,
            "qcow2 L1 table",
        )?;
        let (snapshots, snapshot_table_len) = read_snapshots(&file, &header)?;
        let bitmaps = match &ext.bitmaps {
            Some(b) => read_bitmaps(&file, b)?,
            None => Vec::new(),
        };
        let backing = match &backing_name {
            None => Backing::None,
            Some(name) if ctx.options.open_backing => {
                Backing::Open(ctx.open_backing(name, ext.backing_format.as_deref())?)
            }
            Some(name) => Backing::NotOpened(name.clone()),
        };
        let mut img = Qcow2Image {
            l2_cache: io::L2Cache::new(header.cluster_size()),
            file,
            header,
            ext,
            geometry,
            l1: RwLock::new(l1),
            in_flight: RwLock::new(()),
            writer: None,
            last_compressed: Mutex::new(None),
            backing_name,
            backing,
            snapshots,
            snapshot_table_len,
            bitmaps,
        };
        if img.file.is_writable() {
            img.writer = Some(rw::open_writer(&img)?);
        }
        Ok(img)
    }

    /// Loads (through the cache) the L2 table at `offset`.
    fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        self.l2_cache.get(offset, || {
            io::read_table(
                &self.file,
                offset,
                self.header.cluster_size() as usize,
                "qcow2 L2 table",
            )
        })
    }

    /// The L2 table offset an L1 entry names, validated.
    fn l2_offset(&self, l1_index: u64) -> Result<Option<u64>> {
        let at = self
            .header
            .l1_table_offset
            .saturating_add(l1_index.saturating_mul(8));
        let entry = usize::try_from(l1_index)
            .ok()
            .and_then(|i| {
                self.l1
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(i)
                    .copied()
            })
            .ok_or_else(|| {
                Error::corrupt("qcow2 L1 table", at, "guest offset beyond the L1 table")
                    .in_file(self.file.path())
            })?;
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.header.cluster_size() - 1) != 0 {
            return Err(Error::corrupt(
                "qcow2 L1 table",
                at,
                format!("L2 table offset {off:#x} is not cluster-aligned"),
            )
            .in_file(self.file.path()));
        }
        Ok(Some(off))
    }

    /// The run of one kind starting at guest offset `off`, at most `len` bytes.
    fn map(&self, off: u64, len: u64) -> Result<Mapping> {
        let (l1_index, _, _) = self.geometry.split(off);
        let table = match self.l2_offset(l1_index)? {
            Some(t) => Some((t, self.l2_table(t)?)),
            None => None,
        };
        let view = table.as_ref().map(|(offset, words)| L2Table {
            words,
            offset: *offset,
        });
        map::map_run(&self.geometry, view, off, len).map_err(|e| e.in_file(self.file.path()))
    }

    /// The decompressed cluster stored at `host`.
    fn compressed_cluster(&self, host: u64, clen: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((h, data)) = self.lock_compressed().as_ref()
            && *h == host
        {
            return Ok(Arc::clone(data));
        }
        let mut out = vec![0u8; self.header.cluster_size() as usize];
        io::read_compressed(
            &self.file,
            self.header.compression_type,
            host,
            clen,
            &mut out,
        )?;
        let data = Arc::new(out);
        *self.lock_compressed() = Some((host, Arc::clone(&data)));
        Ok(data)
    }

    fn lock_compressed(&self) -> std::sync::MutexGuard<'_, Option<(u64, Arc<Vec<u8>>)>> {
        self.last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a run of contiguous data clusters from `host`. A last cluster may be cut short by
    /// the end of the file (qemu writes only the subclusters it uses; the rest reads as zeros,
    /// as qemu reads it), but a cluster that starts past the end is a corruption.
    fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let end = host.saturating_add(buf.len() as u64);
        let last_cluster = end.saturating_sub(1) & !(self.header.cluster_size() - 1);
        if last_cluster >= self.file.len() {
            return Err(Error::corrupt(
                "qcow2 data cluster",
                last_cluster.max(host),
                format!(
                    "cluster lies past the end of the file ({:#x})",
                    self.file.len()
                ),
            )
            .in_file(self.file.path()));
        }
        self.file.read_zero_padded(buf, host)
    }

    /// Fills `buf` (guest offset `off`) from the backing image, or zeros.
    fn read_unallocated(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match &self.backing {
            Backing::None => {
                buf.fill(0);
                Ok(())
            }
            Backing::Open(b) => read_padded(b.as_ref(), buf, off),
            Backing::NotOpened(name) => Err(Error::InvalidArgument {
                path: self.file.path().to_path_buf(),
                reason: format!(
                    "backing file {name:?} was not opened; unallocated data cannot be read"
                ),
            }),
        }
    }
}

/// The snapshots, and the table's length in bytes.
fn read_snapshots(file: &ImageFile, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    let mut at = h.snapshots_offset;
    let mut total = 0u64;
    for _ in 0..h.nb_snapshots {
        let fixed = file.read_vec(at, SNAPSHOT_FIXED_LEN, "qcow2 snapshot table")?;
        let sizes = header::snapshot_sizes(&fixed, at).map_err(|e| e.in_file(file.path()))?;
        total = total.saturating_add(sizes.entry_len());
        if total > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::corrupt(
                "qcow2 snapshot table",
                h.snapshots_offset,
                "table exceeds the size cap",
            )
            .in_file(file.path()));
        }
        let entry = file.read_vec(
            at,
            SNAPSHOT_FIXED_LEN + sizes.variable_len(),
            "qcow2 snapshot table",
        )?;
        out.push(
            header::parse_snapshot(&entry, at, h.cluster_size())
                .map_err(|e| e.in_file(file.path()))?,
        );
        at = at.saturating_add(sizes.entry_len());
    }
    Ok((out, total))
}

fn read_bitmaps(file: &ImageFile, b: &header::BitmapsExtension) -> Result<Vec<Bitmap>> {
    if b.nb_bitmaps > MAX_BITMAPS || b.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(Error::corrupt(
            "qcow2 bitmaps extension",
            0,
            format!(
                "{} bitmaps in a {}-byte directory exceed the caps",
                b.nb_bitmaps, b.directory_size
            ),
        )
        .in_file(file.path()));
    }
    let dir = file.read_vec(
        b.directory_offset,
        b.directory_size as usize,
        "qcow2 bitmap directory",
    )?;
    header::parse_bitmap_directory(&dir, b.directory_offset, b.nb_bitmaps)
        .map_err(|e| e.in_file(file.path()))
}

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn caps(&self) -> Caps {
        let base = Caps::EXTENTS | Caps::MULTI_CONN;
        if self.writer.is_some() {
            base | Caps::WRITE | Caps::FLUSH | Caps::WRITE_ZEROES | Caps::DISCARD
        } else {
            base
        }
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        let _in_flight = self.in_flight.read().unwrap_or_else(|e| e.into_inner());
        // A pending host run: (host offset, start in buf, length), flushed as one pread.
        let mut pending: Option<(u64, usize, usize)> = None;
        let flush = |p: &mut Option<(u64, usize, usize)>, buf: &mut [u8]| -> Result<()> {
            if let Some((host, start, len)) = p.take() {
                let part = buf.get_mut(start..start + len).unwrap_or_default();
                self.read_data(part, host)?;
            }
            Ok(())
        };
        let mut done = 0usize;
        while done < buf.len() {
            let guest = off + done as u64;
            let m = self.map(guest, (buf.len() - done) as u64)?;
            // map_run returns at least one byte and at most what was asked.
            let len = usize::try_from(m.len())
                .unwrap_or(0)
                .min(buf.len() - done)
                .max(1);
            match m {
                Mapping::Data { host, .. } => {
                    pending = match pending {
                        Some((h, s, l)) if h + l as u64 == host => Some((h, s, l + len)),
                        other => {
                            let mut other = other;
                            flush(&mut other, buf)?;
                            Some((host, done, len))
                        }
                    };
                }
                Mapping::Compressed {
                    host, clen, offset, ..
                } => {
                    flush(&mut pending, buf)?;
                    let data = self.compressed_cluster(host, clen)?;
                    let src = usize::try_from(offset)
                        .ok()
                        .and_then(|o| data.get(o..o + len));
                    let dst = buf.get_mut(done..done + len);
                    if let (Some(src), Some(dst)) = (src, dst) {
                        dst.copy_from_slice(src);
                    }
                }
                Mapping::Zero { .. } => {
                    flush(&mut pending, buf)?;
                    buf.get_mut(done..done + len).unwrap_or_default().fill(0);
                }
                Mapping::Unallocated { .. } => {
                    flush(&mut pending, buf)?;
                    self.read_unallocated(
                        buf.get_mut(done..done + len).unwrap_or_default(),
                        guest,
                    )?;
                }
            }
            done += len;
        }
        flush(&mut pending, buf)
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        check_status_range(off, len, self.size())?;
        Ok(match self.map(off, len)? {
            Mapping::Data { host, len } => Extent::data_at(len, self.file.shared_path(), host),
            Mapping::Compressed { len, .. } => Extent {
                compressed: true,
                ..Extent::new(ExtentKind::Data, len)
            },
            Mapping::Zero { len } => Extent::new(ExtentKind::Zero, len),
            Mapping::Unallocated { len } => match &self.backing {
                Backing::Open(b) => backing_status(b.as_ref(), off, len)?,
                _ => Extent::new(ExtentKind::Unallocated, len),
            },
        })
    }
}

impl Image for Qcow2Image {
    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn info(&self) -> Result<ImageInfo> {
        let h = &self.header;
        let path: PathBuf = self.file.path().to_path_buf();
        let mut info = ImageInfo::new(path.clone(), "qcow2", h.size, vec![path]);
        let v3 = h.version >= 3;
        info.subformat = Some(if v3 { "v3" } else { "v2" }.into());
        info.cluster_size = Some(h.cluster_size());
        info.dirty = h.incompatible_features & INCOMPAT_DIRTY != 0;
        info.backing_filename = self.backing_name.clone();
        info.backing_format = self
            .ext
            .backing_format
            .clone()
            .or_else(|| match &self.backing {
                Backing::Open(b) if self.backing_name.is_some() => Some(b.format().to_string()),
                _ => None,
            });
        info.snapshots = self
            .snapshots
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: u64::from(s.date_sec),
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                disk_size: s.disk_size,
            })
            .collect();
        info.specific("compat", if v3 { "1.1" } else { "0.10" });
        info.specific("compression-type", h.compression_type.name());
        if v3 {
            info.specific(
                "lazy-refcounts",
                h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
            );
        }
        info.specific("refcount-bits", h.refcount_bits());
        if v3 {
            info.specific("corrupt", h.incompatible_features & INCOMPAT_CORRUPT != 0);
            info.specific("extended-l2", h.extended_l2());
        }
        if !self.bitmaps.is_empty() {
            let list: Vec<serde_json::Value> = self
                .bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & 1 != 0 {
                        flags.push("in-use");
                    }
                    if b.flags & 2 != 0 {
                        flags.push("auto");
                    }
                    serde_json::json!({
                        "name": b.name,
                        "granularity": 1u64.checked_shl(u32::from(b.granularity_bits)).unwrap_or(0),
                        "flags": flags,
                    })
                })
                .collect();
            info.specific("bitmaps", list);
        }
        Ok(info)
    }

    fn check(&self) -> Result<CheckReport> {
        check::check(self)
    }

    fn backing(&self) -> Option<&Arc<dyn Image>> {
        match &self.backing {
            Backing::Open(b) => Some(b),
            _ => None,
        }
    }

    fn writes_in_place(&self) -> bool {
        true
    }

    fn into_mut_device(self: Arc<Self>) -> Option<Arc<dyn BlockDeviceMut>> {
        self.mut_device()
    }
}

impl Qcow2Image {
    /// How compressed clusters of this image are compressed.
    pub fn compression_type(&self) -> CompressionType {
        self.header.compression_type
    }
}
