//! VMDK images, after VMware's "Virtual Disk Format 5.0" technical note: read here, written new
//! (monolithicSparse, streamOptimized, monolithicFlat) by [`write`].
//!
//! A VMDK disk is a list of **extents** that tile the guest address space, described by a
//! **descriptor** (text). The descriptor is either its own file (monolithicFlat,
//! twoGb\*, vmfs\*, delta disks of ESXi) or embedded in a sparse extent (monolithicSparse,
//! streamOptimized). Extent types:
//!
//! | type                  | bytes live in                                 | module        |
//! |-----------------------|-----------------------------------------------|---------------|
//! | `FLAT`, `VMFS`        | a raw file, from a sector offset              | here          |
//! | `ZERO`                | nowhere: zeros                                | here          |
//! | `SPARSE`              | a hosted sparse extent (`KDMV`): GD -> GT -> grain, grains maybe deflated (streamOptimized) | [`sparse`], [`io`] |
//! | `VMFSSPARSE`          | an ESX redo log (`COWD`, or `KDMV`)            | [`sparse`]    |
//! | `VMFSRDM`, `VMFSRAW`, `SESPARSE` | unsupported (clear error)          |               |
//!
//! # Layers
//!
//! * [`descriptor`] and [`header`]: pure parsers of the text descriptor and of the binary
//!   headers and markers, bounded by named caps.
//! * [`sparse`]: an open sparse extent: grain directory loaded at open, grain tables cached
//!   (bounded, behind a mutex), and [`sparse::SparseExtent::map`] turning an extent offset into
//!   a [`sparse::GrainMap`] run.
//! * here, [`VmdkImage::map`]: guest offset -> extent -> [`Map`] run;
//!   [`io`]: executing runs (merged `pread`s, inflating, parent reads); [`check`]: consistency.
//!
//! # Delta disks
//!
//! A descriptor whose `parentCID` is not `ffffffff` names its parent in `parentFileNameHint`.
//! The parent is opened through the registry (directory rule enforced), its `CID` must equal
//! the child's `parentCID` ([`Error::ParentMismatch`] otherwise), and grains the child lacks are
//! read from it. A recorded parent that cannot be opened is an error, never zeros.
//!
//! # Concurrency
//!
//! All state after open is immutable except the grain-table cache and the one-grain inflate
//! cache, each behind its own mutex held only for a lookup or an insert.

pub mod check;
pub mod descriptor;
pub mod header;
pub mod io;
pub mod sparse;
pub mod write;
pub mod write_flat;
pub mod write_sparse;
pub mod write_stream;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::blockdev::{
    BlockDevice, Caps, Extent, ExtentKind, backing_status, check_range, check_status_range,
};
use crate::create::{CreateOptions, ImageWriter};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::image::{CheckReport, Image, ImageInfo};
use crate::registry::{Driver, OpenContext, Probe};

use descriptor::{Access, Descriptor, ExtentType, MAX_DESCRIPTOR_SIZE};
use header::{COWD_MAGIC, MAX_CAPACITY, SECTOR, SPARSE_MAGIC, SparseKind};
use sparse::{GrainMap, SparseExtent};

/// Bytes read from the start of a sparse extent to parse its header (COWD's is 2048).
const HEAD_BYTES: u64 = 2048;

/// The VMDK format driver.
#[derive(Debug, Default)]
pub struct VmdkDriver;

impl Driver for VmdkDriver {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    fn probe(&self, probe: &Probe<'_>) -> u32 {
        let head = probe.head;
        match head.get(0..4) {
            Some(m) if m == SPARSE_MAGIC => {
                let version = head
                    .get(4..8)
                    .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
                if matches!(version, Some(1..=3)) {
                    100
                } else {
                    60
                }
            }
            Some(m) if m == COWD_MAGIC => 90,
            _ => descriptor::probe_text(head),
        }
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Arc<dyn Image>> {
        if ctx.writable() {
            return Err(Error::ReadOnly {
                path: ctx.path().to_path_buf(),
                reason: "opening an existing vmdk for writing is not supported (convert writes new ones)".into(),
            });
        }
        Ok(Arc::new(VmdkImage::open(ctx)?))
    }

    fn create(&self, path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
        write::create(path, options)
    }
}

/// Where the bytes of one extent are.
#[derive(Debug)]
pub(crate) enum Body {
    /// Raw sectors in `file` from byte `base`.
    Flat { file: ImageFile, base: u64 },
    /// Zeros.
    Zero,
    /// A sparse extent.
    Sparse(SparseExtent),
}

/// One extent of the disk, placed in the guest address space.
#[derive(Debug)]
pub(crate) struct VmdkExtent {
    /// First guest byte.
    start: u64,
    /// Guest bytes covered.
    len: u64,
    /// Type as recorded.
    kind: ExtentType,
    /// File name as recorded (empty for ZERO).
    recorded: String,
    /// Sectors the descriptor line gives (for checks).
    line_sectors: Option<u64>,
    body: Body,
}

/// Where a guest run lives, as [`VmdkImage::map`] returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Map {
    /// Uncompressed bytes at `offset` of extent `extent`'s file; `padded`: a flat file that
    /// may end early (bytes past its end read as zeros).
    Host {
        extent: usize,
        offset: u64,
        padded: bool,
    },
    /// Zeros by definition (zeroed grain, ZERO extent).
    Zero,
    /// Not allocated here: parent or zeros.
    Unallocated,
    /// Inside a compressed grain.
    Compressed {
        extent: usize,
        at: u64,
        grain_start: u64,
        within: u64,
    },
}

/// An open VMDK disk.
pub struct VmdkImage {
    /// The file the user named (descriptor, or monolithic sparse file).
    path: PathBuf,
    main_file: ImageFile,
    desc: Descriptor,
    create_type: String,
    /// The descriptor is embedded in the sparse file `path`.
    embedded: bool,
    extents: Vec<VmdkExtent>,
    size: u64,
    parent: Option<Arc<dyn Image>>,
    /// The descriptor records a parent (even if it was not opened).
    parent_recorded: bool,
    grain_cache: Mutex<io::GrainCache>,
}

impl std::fmt::Debug for VmdkImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkImage")
            .field("path", &self.path)
            .field("create_type", &self.create_type)
            .field("size", &self.size)
            .field("extents", &self.extents)
            .field("parent", &self.parent.as_ref().map(|p| p.format()))
            .finish_non_exhaustive()
    }
}

impl VmdkImage {
    fn open(ctx: &OpenContext<'_>) -> Result<Self> {
        let main_file = ImageFile::open(ctx.path())?;
        let head_len = main_file.len().min(HEAD_BYTES) as usize;
        let head = main_file.read_vec(0, head_len, "header")?;
        let magic = head.get(0..4);
        let mut image = if magic == Some(&SPARSE_MAGIC[..]) || magic == Some(&COWD_MAGIC[..]) {
            Self::open_sparse_file(ctx, main_file, &head)?
        } else {
            Self::open_descriptor_file(ctx, main_file)?
        };
        image.open_parent(ctx)?;
        Ok(image)
    }

    /// A monolithic sparse file, or a lone hosted sparse extent. COWD redo logs are refused here.
    fn open_sparse_file(ctx: &OpenContext<'_>, main_file: ImageFile, head: &[u8]) -> Result<Self> {
        let extent_file = ImageFile::open(ctx.path())?;
        let sparse = SparseExtent::open(extent_file, head).map_err(|e| e.in_file(ctx.path()))?;
        let h = &sparse.header;
        if h.kind == SparseKind::Cowd {
            // A redo log holds only what changed since its parent, and only its descriptor
            // names that parent: reading it alone would show the parent's data as zeros.
            return Err(Error::Unsupported {
                path: ctx.path().to_path_buf(),
                what: "opening a vmfsSparse (COWD) redo log on its own: open the descriptor \
                       that names it and its parent"
                    .into(),
            });
        }
        let desc = if h.descriptor_offset != 0 && h.descriptor_size != 0 {
            let too_big = || {
                Error::corrupt(
                    "sparse extent header",
                    36,
                    format!(
                        "embedded descriptor of {} sectors exceeds the {MAX_DESCRIPTOR_SIZE}-byte limit",
                        h.descriptor_size
                    ),
                )
                .in_file(ctx.path())
            };
            let size = h
                .descriptor_size
                .checked_mul(SECTOR)
                .filter(|&s| s <= MAX_DESCRIPTOR_SIZE as u64)
                .ok_or_else(too_big)?;
            let off = h
                .descriptor_offset
                .checked_mul(SECTOR)
                .ok_or_else(too_big)?;
            let text = sparse::read_bounded(&main_file, off, size as usize, "embedded descriptor")?;
            descriptor::parse(&text, off).map_err(|e| e.in_file(ctx.path()))?
        } else {
            Descriptor::default()
        };
        let create_type = desc.create_type.clone().unwrap_or_else(|| {
            if h.compressed() {
                "streamOptimized"
            } else {
                "monolithicSparse"
            }
            .to_string()
        });
        let size = h.capacity_bytes();
        let recorded = ctx
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = ExtentType::Sparse;
        Ok(VmdkImage {
            path: ctx.path().to_path_buf(),
            main_file,
            desc,
            create_type,
            embedded: true,
            extents: vec![VmdkExtent {
                start: 0,
                len: size,
                kind,
                recorded,
                line_sectors: None,
                body: Body::Sparse(sparse),
            }],
            size,
            parent: None,
            parent_recorded: false,
            grain_cache: Mutex::default(),
        })
    }

    /// A text descriptor naming its extent files.
    fn open_descriptor_file(ctx: &OpenContext<'_>, main_file: ImageFile) -> Result<Self> {
        if main_file.len() > MAX_DESCRIPTOR_SIZE as u64 {
            return Err(Error::corrupt(
                "descriptor",
                0,
                format!(
                    "no sparse header, and at {} bytes the file is too large for a descriptor \
                     ({MAX_DESCRIPTOR_SIZE} at most)",
                    main_file.len()
                ),
            )
            .in_file(ctx.path()));
        }
        let text = main_file.read_vec(0, main_file.len() as usize, "descriptor")?;
        let desc = descriptor::parse(&text, 0).map_err(|e| e.in_file(ctx.path()))?;
        if desc.extents.is_empty() {
            return Err(Error::corrupt("descriptor", 0, "no extent lines").in_file(ctx.path()));
        }
        let mut extents = Vec::with_capacity(desc.extents.len());
        let mut start = 0u64;
        for (i, line) in desc.extents.iter().enumerate() {
            let bad =
                |reason: String| Error::corrupt("descriptor", line.at, reason).in_file(ctx.path());
            let len = line
                .sectors
                .checked_mul(SECTOR)
                .filter(|&l| start.checked_add(l).is_some_and(|end| end <= MAX_CAPACITY))
                .ok_or_else(|| {
                    bad(format!(
                        "extents add up to more than the {} TiB limit",
                        MAX_CAPACITY >> 40
                    ))
                })?;
            if line.access == Access::NoAccess {
                return Err(Error::unsupported(format!(
                    "NOACCESS extent {:?} (extent {})",
                    line.filename,
                    i + 1
                ))
                .in_file(ctx.path()));
            }
            let body = match line.kind {
                ExtentType::Zero => Body::Zero,
                ExtentType::Flat | ExtentType::Vmfs => {
                    let base = line
                        .offset_sectors
                        .checked_mul(SECTOR)
                        .ok_or_else(|| bad("extent offset overflows".into()))?;
                    Body::Flat {
                        file: open_extent(ctx, &line.filename)?,
                        base,
                    }
                }
                ExtentType::Sparse | ExtentType::VmfsSparse => {
                    let file = open_extent(ctx, &line.filename)?;
                    let head_len = file.len().min(HEAD_BYTES) as usize;
                    let head = file.read_vec(0, head_len, "sparse extent header")?;
                    let magic = head.get(0..4);
                    let ok = magic == Some(&SPARSE_MAGIC[..])
                        || (line.kind == ExtentType::VmfsSparse && magic == Some(&COWD_MAGIC[..]));
                    if !ok {
                        return Err(Error::Corrupt {
                            path: file.path().to_path_buf(),
                            structure: "sparse extent header",
                            offset: 0,
                            reason: format!(
                                "{} extent has no KDMV{} magic",
                                line.kind.keyword(),
                                if line.kind == ExtentType::VmfsSparse {
                                    " or COWD"
                                } else {
                                    ""
                                }
                            ),
                        });
                    }
                    let path = file.path().to_path_buf();
                    Body::Sparse(SparseExtent::open(file, &head).map_err(|e| e.in_file(&path))?)
                }
                ExtentType::VmfsRdm | ExtentType::VmfsRaw | ExtentType::SeSparse => {
                    return Err(Error::unsupported(format!(
                        "{} extent {:?} (raw device mappings and SE sparse are not implemented)",
                        line.kind.keyword(),
                        line.filename
                    ))
                    .in_file(ctx.path()));
                }
            };
            extents.push(VmdkExtent {
                start,
                len,
                kind: line.kind,
                recorded: line.filename.clone(),
                line_sectors: Some(line.sectors),
                body,
            });
            start += len;
        }
        let create_type = desc.create_type.clone().unwrap_or_else(|| "unknown".into());
        Ok(VmdkImage {
            path: ctx.path().to_path_buf(),
            main_file,
            desc,
            create_type,
            embedded: false,
            extents,
            size: start,
            parent: None,
            parent_recorded: false,
            grain_cache: Mutex::default(),
        })
    }

    /// Opens the parent a delta disk records and checks its CID.
    fn open_parent(&mut self, ctx: &OpenContext<'_>) -> Result<()> {
        if !self.desc.has_parent() {
            return Ok(());
        }
        let expected = self.desc.parent_cid.unwrap_or(descriptor::NO_PARENT_CID);
        let Some(hint) = self.desc.parent_hint.clone() else {
            return Err(Error::corrupt(
                "descriptor",
                0,
                format!(
                    "parentCID {expected:08x} is set but no parentFileNameHint names the parent"
                ),
            )
            .in_file(&self.path));
        };
        self.parent_recorded = true;
        if !ctx.options.open_backing {
            return Ok(());
        }
        let parent = ctx.open_backing(&hint, Some("vmdk"))?;
        let parent_cid = parent
            .info()?
            .format_specific
            .get("cid")
            .and_then(|v| v.as_u64());
        if parent_cid != Some(u64::from(expected)) {
            return Err(Error::ParentMismatch {
                path: self.path.clone(),
                parent: ctx.resolve_related("parent", &hint)?,
                reason: format!(
                    "the child was made from CID {expected:08x}, the parent's CID is {}",
                    parent_cid.map_or_else(|| "unknown".to_string(), |c| format!("{c:08x}"))
                ),
            });
        }
        self.parent = Some(parent);
        Ok(())
    }

    /// Maps the guest run starting at `off` (in range, `max` > 0) to where it lives.
    pub(crate) fn map(&self, off: u64, max: u64) -> Result<(Map, u64)> {
        let index = self.extents.partition_point(|e| e.start + e.len <= off);
        let Some(ext) = self.extents.get(index) else {
            return Ok((Map::Zero, max));
        };
        let rel = off - ext.start;
        let max = max.min(ext.len - rel);
        Ok(match &ext.body {
            Body::Zero => (Map::Zero, max),
            Body::Flat { base, .. } => {
                let offset = base.checked_add(rel).ok_or_else(|| {
                    Error::corrupt("descriptor", 0, "flat extent offset overflows")
                        .in_file(&self.path)
                })?;
                (
                    Map::Host {
                        extent: index,
                        offset,
                        padded: true,
                    },
                    max,
                )
            }
            Body::Sparse(sparse) => {
                let (g, run) = sparse.map(rel, max)?;
                let m = match g {
                    GrainMap::Host(offset) => Map::Host {
                        extent: index,
                        offset,
                        padded: false,
                    },
                    GrainMap::Zero => Map::Zero,
                    GrainMap::Unallocated => Map::Unallocated,
                    GrainMap::Compressed {
                        at,
                        grain_start,
                        within,
                    } => Map::Compressed {
                        extent: index,
                        at,
                        grain_start,
                        within,
                    },
                };
                (m, run)
            }
        })
    }

    /// The files of the disk: the descriptor (or monolithic file) then each extent file, once.
    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        for e in &self.extents {
            let p = match &e.body {
                Body::Flat { file, .. } => file.path(),
                Body::Sparse(s) => s.file.path(),
                Body::Zero => continue,
            };
            if !files.iter().any(|f| f == p) {
                files.push(p.to_path_buf());
            }
        }
        files
    }

    fn first_grain_size(&self) -> Option<u64> {
        self.extents.iter().find_map(|e| match &e.body {
            Body::Sparse(s) => Some(s.header.grain_size()),
            _ => None,
        })
    }
}

/// Opens an extent file the descriptor names; a missing one is an error naming it.
fn open_extent(ctx: &OpenContext<'_>, recorded: &str) -> Result<ImageFile> {
    let target = ctx.resolve_related("extent", recorded)?;
    ImageFile::open(&target).map_err(|err| match err {
        Error::Io { source, .. } => Error::MissingFile {
            path: ctx.path().to_path_buf(),
            what: "extent",
            target: target.clone(),
            source,
        },
        other => other,
    })
}

impl BlockDevice for VmdkImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::EXTENTS | Caps::MULTI_CONN
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size)?;
        self.read_guest(buf, off)
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        check_status_range(off, len, self.size)?;
        let (map, run) = self.map(off, len)?;
        Ok(match map {
            Map::Host {
                extent,
                offset,
                padded,
            } => {
                let file = match self.extents.get(extent).map(|e| &e.body) {
                    Some(Body::Flat { file, .. }) => file,
                    Some(Body::Sparse(s)) => &s.file,
                    _ => &self.main_file,
                };
                if padded {
                    // Flat extents: the host file system knows which parts are holes.
                    let (kind, n) = file.allocation_at(offset, run)?;
                    match kind {
                        ExtentKind::Data => Extent::data_at(n, file.shared_path(), offset),
                        other => Extent::new(other, n),
                    }
                } else {
                    Extent::data_at(run, file.shared_path(), offset)
                }
            }
            Map::Zero => Extent::new(ExtentKind::Zero, run),
            Map::Unallocated => match &self.parent {
                Some(parent) => backing_status(parent.as_ref(), off, run)?,
                None => Extent::new(ExtentKind::Unallocated, run),
            },
            Map::Compressed { .. } => {
                let mut e = Extent::new(ExtentKind::Data, run);
                e.compressed = true;
                e
            }
        })
    }
}

impl Image for VmdkImage {
    fn format(&self) -> &'static str {
        "vmdk"
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(self.path.clone(), "vmdk", self.size, self.files());
        info.subformat = Some(self.create_type.clone());
        info.cluster_size = self.first_grain_size();
        if self.parent_recorded {
            info.backing_filename = self.desc.parent_hint.clone();
            info.backing_format = Some("vmdk".into());
        }
        if let Some(cid) = self.desc.cid {
            info.specific("cid", cid);
        }
        if let Some(pcid) = self.desc.parent_cid {
            info.specific("parent-cid", pcid);
        }
        info.specific("create-type", self.create_type.clone());
        let extents: Vec<serde_json::Value> = self
            .extents
            .iter()
            .map(|e| {
                let filename = match &e.body {
                    Body::Flat { file, .. } => file.path().display().to_string(),
                    Body::Sparse(s) => s.file.path().display().to_string(),
                    Body::Zero => String::new(),
                };
                let mut v = json!({
                    "filename": filename,
                    "format": e.kind.keyword(),
                    "virtual-size": e.len,
                });
                if let Body::Sparse(s) = &e.body {
                    v["cluster-size"] = json!(s.header.grain_size());
                    if s.header.compressed() {
                        v["compressed"] = json!(true);
                    }
                    if s.header.kind == SparseKind::Cowd {
                        v["format"] = json!("COWD");
                    }
                }
                v
            })
            .collect();
        info.specific("extents", extents);
        if let Some(a) = self.desc.ddb("ddb.adapterType") {
            info.specific("adapter-type", a);
        }
        if let Some(hw) = self.desc.ddb("ddb.virtualHWVersion") {
            info.specific("hw-version", hw);
        }
        Ok(info)
    }

    fn check(&self) -> Result<CheckReport> {
        check::check(self)
    }

    fn backing(&self) -> Option<&Arc<dyn Image>> {
        self.parent.as_ref()
    }
}

/// The path of an extent's file, for messages.
pub(crate) fn extent_path(e: &VmdkExtent) -> Option<&Path> {
    match &e.body {
        Body::Flat { file, .. } => Some(file.path()),
        Body::Sparse(s) => Some(s.file.path()),
        Body::Zero => None,
    }
}

#[cfg(test)]
mod tests {
    use super::header::tests::hosted_header;
    use super::header::{FLAG_COMPRESSED, FLAG_MARKERS, FLAG_ZEROED_GRAIN_GTE};
    use super::*;
    use crate::registry::OpenOptions;
    use std::io::Write;

    const G: usize = 4096; // grain bytes in these fixtures (8 sectors)

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        // One directory for the whole process: descriptors name extents beside them.
        static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let dir = DIR.get_or_init(|| crate::scratch::path("vmdk", "unit"));
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn open_vmdk(path: &Path) -> Result<Arc<dyn Image>> {
        crate::open(
            path,
            &OpenOptions {
                format: Some("vmdk".into()),
                ..OpenOptions::default()
            },
        )
    }

    fn put_u32(buf: &mut [u8], at: usize, v: u32) {
        buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A hosted sparse file: 8 grains of 4 KiB, 4 GTEs per GT (2 tables), no descriptor.
    /// Sector 1: GD [2, 3]; sector 2: GT0; sector 3: GT1; grains from sector 8.
    /// GT0 = [grain at 8, grain at 16, unallocated, zeroed]; GT1 = [unallocated, grain at 24,
    /// grain at 32, unallocated]. Grain k is filled with byte 0x10 + k.
    fn tiny_sparse(flags: u32) -> Vec<u8> {
        let mut f = vec![0u8; 40 * 512];
        let mut h = hosted_header(flags, 64, 1);
        h[20..28].copy_from_slice(&8u64.to_le_bytes()); // grainSize: 8 sectors
        h[28..44].fill(0); // no embedded descriptor
        h[44..48].copy_from_slice(&4u32.to_le_bytes()); // numGTEsPerGT
        h[48..56].fill(0); // no redundant GD
        f[..512].copy_from_slice(&h);
        put_u32(&mut f, 512, 2);
        put_u32(&mut f, 516, 3);
        for (i, gte) in [8u32, 16, 0, 1, 0, 24, 32, 0].into_iter().enumerate() {
            put_u32(&mut f, 1024 + (i / 4) * 512 + (i % 4) * 4, gte);
        }
        for (k, sector) in [(0usize, 8usize), (1, 16), (5, 24), (6, 32)] {
            f[sector * 512..sector * 512 + G].fill(0x10 + k as u8);
        }
        f
    }

    #[test]
    fn sparse_reads_grains_holes_and_zeroed_grains() {
        let path = temp("tiny.vmdk", &tiny_sparse(FLAG_ZEROED_GRAIN_GTE));
        let img = open_vmdk(&path).unwrap();
        assert_eq!(img.size(), 8 * G as u64);
        let mut buf = vec![0xffu8; 8 * G];
        img.read_at(&mut buf, 0).unwrap();
        for k in 0..8 {
            let want = match k {
                0 | 1 | 5 | 6 => 0x10 + k as u8,
                _ => 0,
            };
            assert!(
                buf[k * G..(k + 1) * G].iter().all(|&b| b == want),
                "grain {k}"
            );
        }
        // Grains 0 and 1 are contiguous on the host: one run.
        let e = img.block_status(0, 8 * G as u64).unwrap();
        assert_eq!((e.kind, e.len), (ExtentKind::Data, 2 * G as u64));
        assert_eq!(e.host.unwrap().offset, 8 * 512);
        assert_eq!(
            img.block_status(2 * G as u64, G as u64).unwrap().kind,
            ExtentKind::Unallocated
        );
        assert_eq!(
            img.block_status(3 * G as u64, G as u64).unwrap().kind,
            ExtentKind::Zero
        );
        // An unaligned read across a table boundary.
        let mut small = [0u8; 100];
        img.read_at(&mut small, 6 * G as u64 - 50).unwrap();
        assert_eq!(&small[..50], &[0x15; 50]);
        assert_eq!(&small[50..], &[0x16; 50]);
        assert!(img.check().unwrap().corruptions.is_empty());
    }

    #[test]
    fn gte_one_without_the_zeroed_grain_flag_is_a_pointer_that_check_flags() {
        let path = temp("nozeroflag.vmdk", &tiny_sparse(0));
        let img = open_vmdk(&path).unwrap();
        assert_eq!(
            img.block_status(3 * G as u64, G as u64).unwrap().kind,
            ExtentKind::Data
        );
        let report = img.check().unwrap();
        assert!(
            report
                .corruptions
                .iter()
                .any(|c| c.message.contains("overlaps")),
            "{report:?}"
        );
    }

    #[test]
    fn grain_past_the_end_of_file_is_an_error_naming_file_and_offset() {
        let mut f = tiny_sparse(0);
        put_u32(&mut f, 1024, 1000); // GT0[0] -> sector 1000, past the end
        let path = temp("pastend.vmdk", &f);
        let img = open_vmdk(&path).unwrap();
        let mut buf = vec![0u8; G];
        let msg = img.read_at(&mut buf, 0).unwrap_err().to_string();
        assert!(
            msg.contains("pastend.vmdk") && msg.contains("corrupt grain at offset 0x7d000"),
            "{msg}"
        );
        let report = img.check().unwrap();
        assert!(
            report.corruptions.iter().any(|c| c.structure == "grain"),
            "{report:?}"
        );
    }

    #[test]
    fn two_entries_sharing_a_grain_are_reported_by_check() {
        let mut f = tiny_sparse(0);
        put_u32(&mut f, 1536 + 4, 8); // GT1[1] -> the grain GT0[0] uses
        let path = temp("shared.vmdk", &f);
        let report = open_vmdk(&path).unwrap().check().unwrap();
        assert!(
            report
                .corruptions
                .iter()
                .any(|c| c.message.contains("overlaps")),
            "{report:?}"
        );
    }

    #[test]
    fn grain_directory_past_the_end_fails_at_open() {
        let mut f = tiny_sparse(0);
        f[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes()); // gdOffset far away
        let path = temp("gdfar.vmdk", &f);
        let msg = open_vmdk(&path).err().expect("open fails").to_string();
        assert!(
            msg.contains("gdfar.vmdk") && msg.contains("grain directory"),
            "{msg}"
        );
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A stream-optimized file with one compressed grain (grain 1) whose deflate data is
    /// `stream`; marker at sector 8.
    fn tiny_stream(stream: &[u8]) -> Vec<u8> {
        let mut f = tiny_sparse(FLAG_COMPRESSED | FLAG_MARKERS);
        f[77..79].copy_from_slice(&1u16.to_le_bytes()); // compressAlgorithm: deflate
        f.truncate(8 * 512);
        for i in 0..8 {
            put_u32(
                &mut f,
                1024 + (i / 4) * 512 + (i % 4) * 4,
                if i == 1 { 8 } else { 0 },
            );
        }
        f.extend_from_slice(&8u64.to_le_bytes()); // marker lba: grain 1 = sector 8
        f.extend_from_slice(&(stream.len() as u32).to_le_bytes());
        f.extend_from_slice(stream);
        f.resize(f.len().div_ceil(512) * 512, 0);
        f
    }

    #[test]
    fn compressed_grain_inflates_and_is_marked_compressed() {
        let grain: Vec<u8> = (0..G).map(|i| (i % 251) as u8).collect();
        let path = temp("stream.vmdk", &tiny_stream(&zlib(&grain)));
        let img = open_vmdk(&path).unwrap();
        let mut buf = vec![0u8; 2 * G];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..G], &vec![0u8; G][..]);
        assert_eq!(&buf[G..], &grain[..]);
        let mut part = [0u8; 10];
        img.read_at(&mut part, G as u64 + 300).unwrap();
        assert_eq!(&part[..], &grain[300..310]);
        let e = img.block_status(G as u64, G as u64).unwrap();
        assert!(e.compressed && e.kind == ExtentKind::Data && e.host.is_none());
        assert_eq!(
            img.info().unwrap().subformat.as_deref(),
            Some("streamOptimized")
        );
        assert!(img.check().unwrap().corruptions.is_empty());
    }

    #[test]
    fn compressed_grain_larger_than_a_grain_is_refused() {
        let path = temp("bomb.vmdk", &tiny_stream(&zlib(&vec![0u8; 64 * G])));
        let img = open_vmdk(&path).unwrap();
        let mut buf = vec![0u8; G];
        let msg = img.read_at(&mut buf, G as u64).unwrap_err().to_string();
        assert!(
            msg.contains("bomb.vmdk") && msg.contains("more than the 4096-byte grain"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_deflate_stream_is_an_error() {
        let grain: Vec<u8> = (0..G).map(|i| (i * 7) as u8).collect();
        let z = zlib(&grain);
        let path = temp("trunc.vmdk", &tiny_stream(&z[..z.len() / 2]));
        let img = open_vmdk(&path).unwrap();
        let mut buf = vec![0u8; G];
        assert!(img.read_at(&mut buf, G as u64).unwrap_err().is_corruption());
    }

    #[test]
    fn opening_for_writing_is_refused() {
        let path = temp("ro.vmdk", &tiny_sparse(0));
        let err = crate::open(
            &path,
            &OpenOptions {
                format: Some("vmdk".into()),
                writable: true,
                ..OpenOptions::default()
            },
        )
        .err()
        .expect("open fails");
        assert!(
            err.to_string()
                .contains("opening an existing vmdk for writing is not supported"),
            "{err}"
        );
    }

    #[test]
    fn descriptor_extent_escaping_the_directory_is_refused() {
        let path = temp(
            "escape.vmdk",
            b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"../../etc/passwd\" 0\n",
        );
        let err = open_vmdk(&path).err().expect("open fails");
        assert!(matches!(err, Error::PathOutsideDirectory { .. }), "{err}");
    }

    #[test]
    fn zero_and_flat_extents_tile_the_disk() {
        let flat = temp("tile-flat.bin", &[0x77u8; 1024]);
        let _ = flat;
        let path = temp(
            "tile.vmdk",
            b"# Disk DescriptorFile\ncreateType=\"custom\"\nRW 2 ZERO\nRW 2 FLAT \"tile-flat.bin\" 0\nRW 4 FLAT \"tile-flat.bin\" 1\n",
        );
        let img = open_vmdk(&path).unwrap();
        assert_eq!(img.size(), 8 * 512);
        let mut buf = vec![0xffu8; 8 * 512];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..1024], &[0u8; 1024][..]);
        assert_eq!(&buf[1024..2048], &[0x77u8; 1024][..]);
        // The third extent starts at sector 1 of a 2-sector file: one sector, then zeros.
        assert_eq!(&buf[2048..2560], &[0x77u8; 512][..]);
        assert_eq!(&buf[2560..], &[0u8; 1536][..]);
        assert_eq!(img.block_status(0, 8 * 512).unwrap().kind, ExtentKind::Zero);
    }
}
