//! VHDX images (Hyper-V's format, Microsoft [MS-VHDX] v1): dynamic, fixed and differencing
//! disks, read-only, with a dirty metadata log replayed in memory; new dynamic and fixed disks
//! are written by [`write`].
//!
//! # Layout ([MS-VHDX] 2.1)
//!
//! ```text
//! 0       64K      128K     192K        256K        1M
//! | ident | header1 | header2 | region tbl1 | region tbl2 | ... | log | BAT | metadata | blocks
//! ```
//!
//! * The file type identifier says "vhdxfile" and names the creator (UTF-16LE).
//! * Two headers, each CRC-32C protected; the valid one with the higher sequence number is
//!   current. It locates the log and carries the data write GUID that children record.
//! * Two region table copies locate the BAT and the metadata region; an unknown region marked
//!   required makes the file unreadable to us ([`Error::Unsupported`]).
//! * The metadata region holds the block size, disk size, sector sizes, disk id and, for a
//!   differencing disk, the parent locator ([`header`]).
//! * The BAT maps each payload block and, in differencing disks, each sector bitmap block
//!   ([`bat`]).
//!
//! # Dirty logs
//!
//! A header whose log GUID is non-zero means metadata updates may sit in the log, not yet
//! written to their place. Opening read-only, we replay the log in memory ([`log`]) and read the
//! whole file through that overlay ([`io::LoggedFile`]): region tables, metadata, BAT and data
//! alike. The file itself is never modified. The headers are read as they are on disk: they are
//! what locates the log, and the log protects the structures after the header section.
//! Opening a dirty image for writing is refused.
//!
//! # Three steps
//!
//! [`header`], [`bat`] and [`log`] parse bytes (pure, tested on byte arrays); [`bat::map`]
//! turns a guest offset into a [`bat::Mapping`]; this module executes mappings with positioned
//! reads, merging blocks that are contiguous in the file into one read.
//!
//! # Concurrency
//!
//! Everything is loaded at open (BAT, metadata, log overlay) and immutable afterwards, so reads
//! and block status take no lock at all.
//!
//! # Differencing disks
//!
//! The parent is found through the parent locator (relative_path first, then volume_path and
//! absolute_win32_path reduced to their file name in the child's directory), opened as VHDX
//! under the registry's path rules, and must carry the data write GUID the child recorded as
//! parent_linkage (or parent_linkage2), else [`Error::ParentMismatch`]. A missing parent is an
//! error, never zeros.

pub mod bat;
pub mod guid;
pub mod header;
pub mod io;
pub mod log;
pub mod write;

use std::sync::Arc;

use crate::blockdev::{
    self, BlockDevice, Caps, Extent, ExtentKind, check_range, check_status_range,
};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::image::{CheckReport, Image, ImageInfo};
use crate::registry::{Driver, OpenContext, Probe};

use bat::{Bat, Geometry, Mapping};
use guid::Guid;
use header::{FileParameters, Header, ParentLocator, Regions};
use io::LoggedFile;

/// Cap on block_status lookups merged into one answer.
const MAX_STATUS_BLOCKS: u32 = 4096;
/// Cap on the problems one check reports per kind.
const MAX_CHECK_PROBLEMS: usize = 1000;

/// A used range of the file, for the overlap check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Area {
    Headers,
    Log,
    BatRegion,
    MetadataRegion,
    /// A payload block, by BAT index.
    Payload(u64),
    /// A sector bitmap block, by BAT index.
    Bitmap(u64),
}

impl std::fmt::Display for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Area::Headers => write!(f, "header section"),
            Area::Log => write!(f, "log"),
            Area::BatRegion => write!(f, "BAT region"),
            Area::MetadataRegion => write!(f, "metadata region"),
            Area::Payload(i) => write!(f, "payload block (BAT entry {i})"),
            Area::Bitmap(i) => write!(f, "sector bitmap block (BAT entry {i})"),
        }
    }
}

/// The VHDX format driver.
#[derive(Debug, Default)]
pub struct VhdxDriver;

impl Driver for VhdxDriver {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    fn probe(&self, probe: &Probe<'_>) -> u32 {
        if probe.head.starts_with(header::FILE_SIGNATURE) {
            100
        } else {
            0
        }
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Arc<dyn Image>> {
        Ok(Arc::new(VhdxImage::open(ctx)?))
    }

    fn create(
        &self,
        path: &std::path::Path,
        options: &crate::create::CreateOptions,
    ) -> Result<Box<dyn crate::create::ImageWriter>> {
        write::create(path, options)
    }
}

/// What the log replay did, for info().
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReplayInfo {
    entries: u32,
    last_sequence: u64,
    overlay_bytes: u64,
}

/// An open VHDX image.
pub struct VhdxImage {
    file: LoggedFile,
    creator: String,
    header: Header,
    regions: Regions,
    params: FileParameters,
    geo: Geometry,
    bat: Bat,
    logical_sector_size: u32,
    physical_sector_size: u32,
    disk_id: Guid,
    locator: Option<ParentLocator>,
    parent: Option<Arc<dyn Image>>,
    parent_name: Option<String>,
    replay: Option<ReplayInfo>,
}

impl std::fmt::Debug for VhdxImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxImage")
            .field("file", &self.file)
            .field("header", &self.header)
            .field("regions", &self.regions)
            .field("geo", &self.geo)
            .field("parent", &self.parent_name)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

impl VhdxImage {
    /// Opens the image `ctx` names, replaying a dirty log in memory and opening the parent of a
    /// differencing disk.
    pub fn open(ctx: &OpenContext<'_>) -> Result<Self> {
        let file = ImageFile::open(ctx.path())?;
        let ident = file.read_vec(0, 8 + header::CREATOR_LEN, "file type identifier")?;
        let creator = header::parse_file_identifier(&ident)?;
        let copies = header::HEADER_OFFSETS.map(|off| {
            file.read_vec(off, header::HEADER_SIZE, "header")
                .and_then(|b| header::parse_header(&b, off))
        });
        let [h1, h2] = copies;
        let header = header::choose_header(h1, h2)?;
        if ctx.writable() {
            let reason = if header.log_guid.is_zero() {
                "writing vhdx is not supported yet".to_string()
            } else {
                "the image contains a log that must be replayed; writing vhdx is not supported yet"
                    .to_string()
            };
            return Err(Error::ReadOnly {
                path: ctx.path().to_path_buf(),
                reason,
            });
        }
        let (file, replay) = replay_log(file, &header)?;

        let regions = read_regions(&file)?;
        let md = read_metadata(&file, &regions)?;
        let geo = Geometry::new(
            md.params.block_size,
            md.logical_sector_size,
            md.virtual_size,
            md.params.has_parent,
        )?;
        let count = geo.total_entries();
        let region_entries = u64::from(regions.bat.length) / 8;
        if count > bat::MAX_BAT_ENTRIES || count > region_entries {
            return Err(Error::corrupt(
                "BAT",
                regions.bat.file_offset,
                format!(
                    "the disk needs {count} entries but the region holds {region_entries} (cap {})",
                    bat::MAX_BAT_ENTRIES
                ),
            ));
        }
        let bytes = file.read_vec(regions.bat.file_offset, (count * 8) as usize, "BAT")?;
        let bat = bat::parse_bat(&bytes, regions.bat.file_offset, count)?;

        let mut image = VhdxImage {
            file,
            creator,
            header,
            regions,
            params: md.params,
            geo,
            bat,
            logical_sector_size: md.logical_sector_size,
            physical_sector_size: md.physical_sector_size,
            disk_id: md.disk_id,
            locator: md.locator,
            parent: None,
            parent_name: None,
            replay,
        };
        if image.params.has_parent {
            image.open_parent(ctx)?;
        }
        Ok(image)
    }

    /// Finds, opens and verifies the parent of a differencing disk.
    fn open_parent(&mut self, ctx: &OpenContext<'_>) -> Result<()> {
        let locator = self.locator.as_ref().ok_or_else(|| {
            Error::corrupt(
                "metadata region",
                self.regions.metadata.file_offset,
                "differencing disk without a parent locator",
            )
        })?;
        if locator.locator_type != header::VHDX_LOCATOR_TYPE {
            return Err(Error::unsupported(format!(
                "parent locator type {}",
                locator.locator_type
            )));
        }
        let candidates = parent_candidates(locator);
        if !ctx.options.open_backing {
            // Recorded, not followed: reads that need the parent fail (see `parent`).
            self.parent_name = candidates.first().cloned();
            return Ok(());
        }
        let Some(first) = candidates.first() else {
            return Err(Error::corrupt(
                "parent locator metadata",
                self.regions.metadata.file_offset,
                "no parent path",
            ));
        };
        let mut chosen = None;
        let mut first_error = None;
        for name in &candidates {
            match ctx.open_backing(name, Some("vhdx")) {
                Ok(parent) => {
                    chosen = Some((name.clone(), parent));
                    break;
                }
                Err(e @ Error::MissingFile { .. }) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((name, parent)) = chosen else {
            return Err(first_error.unwrap_or_else(|| {
                Error::corrupt(
                    "parent locator metadata",
                    0,
                    format!("parent {first} not found"),
                )
            }));
        };
        let links: Vec<Guid> = ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| locator.get(k))
            .filter_map(Guid::parse)
            .collect();
        if links.is_empty() {
            return Err(Error::corrupt(
                "parent locator metadata",
                self.regions.metadata.file_offset,
                "no valid parent_linkage GUID",
            ));
        }
        let info = parent.info()?;
        let parent_guid = info
            .format_specific
            .get("data-write-guid")
            .and_then(|v| v.as_str())
            .and_then(Guid::parse);
        if !parent_guid.is_some_and(|g| links.contains(&g)) {
            return Err(Error::ParentMismatch {
                path: ctx.path().to_path_buf(),
                parent: info.filename,
                reason: format!(
                    "its data write GUID {} is not the parent_linkage {} recorded by the child",
                    parent_guid.map_or_else(|| "(none)".to_string(), |g| g.to_string()),
                    links
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" / ")
                ),
            });
        }
        self.parent = Some(parent);
        self.parent_name = Some(name);
        Ok(())
    }

    fn map(&self, off: u64, len: u64) -> Result<Mapping> {
        bat::map(&self.geo, &self.bat, off, len)
    }

    fn parent(&self) -> Result<&Arc<dyn Image>> {
        self.parent.as_ref().ok_or_else(|| Error::InvalidArgument {
            path: Default::default(),
            reason: format!(
                "parent {} was not opened (backing files not followed), so this range cannot be read",
                self.parent_name.as_deref().unwrap_or("(unnamed)")
            ),
        })
    }

    /// Reads the sector bitmap bits covering a partial mapping that starts at guest `off`:
    /// returns the bytes and the bit index of the first sector in them.
    fn bitmap_bits(
        &self,
        bitmap: u64,
        first_sector: u64,
        off: u64,
        len: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let s = self.geo.logical_sector_size;
        let sectors = (off % s + len).div_ceil(s);
        let first_byte = first_sector / 8;
        let bit0 = first_sector % 8;
        let nbytes = (bit0 + sectors).div_ceil(8);
        // A block's bits are at most 256 MiB / 512 / 8 = 64 KiB.
        let bytes =
            self.file
                .read_vec(bitmap + first_byte, nbytes as usize, "sector bitmap block")?;
        Ok((bytes, bit0))
    }

    /// Splits a partial mapping at guest `off` into runs of (in this file, length).
    fn partial_runs(
        &self,
        bitmap: u64,
        first_sector: u64,
        off: u64,
        len: u64,
        first_only: bool,
    ) -> Result<Vec<(bool, u64)>> {
        let s = self.geo.logical_sector_size;
        let (bits, mut bit) = self.bitmap_bits(bitmap, first_sector, off, len)?;
        let mut runs = Vec::new();
        let mut done = 0u64;
        let mut intra = off % s;
        while done < len {
            let max_sectors = (intra + len - done).div_ceil(s);
            let (set, n) = bat::bitmap_run(&bits, bit, max_sectors);
            let run = (n * s - intra).min(len - done);
            runs.push((set, run));
            done += run;
            bit += n;
            intra = 0;
            if first_only {
                break;
            }
        }
        Ok(runs)
    }

    /// Extends a Data mapping at guest `off` over following blocks contiguous in the file.
    fn data_run(&self, off: u64, host: u64, len: u64, max: u64, max_blocks: u32) -> Result<u64> {
        let mut run = len;
        for _ in 0..max_blocks {
            if run >= max {
                break;
            }
            match self.map(off + run, max - run)? {
                Mapping::Data { host: h, len: l } if h == host + run => run += l,
                _ => break,
            }
        }
        Ok(run)
    }
}

/// Replays the log of a dirty image in memory; returns the file view and what was replayed.
fn replay_log(file: ImageFile, header: &Header) -> Result<(LoggedFile, Option<ReplayInfo>)> {
    if header.log_guid.is_zero() {
        return Ok((LoggedFile::plain(file), None));
    }
    let at = header.offset + 68;
    if header.log_length == 0 || header.log_length > log::MAX_LOG_LENGTH {
        return Err(Error::unsupported(format!(
            "log of {} bytes (header at {:#x}; this reader replays logs of 1 byte..={} bytes)",
            header.log_length,
            header.offset,
            log::MAX_LOG_LENGTH
        )));
    }
    if header
        .log_offset
        .checked_add(u64::from(header.log_length))
        .is_none_or(|end| end > file.len())
    {
        return Err(Error::corrupt(
            "header",
            at,
            format!(
                "log [{:#x}, +{:#x}) lies outside the file",
                header.log_offset, header.log_length
            ),
        ));
    }
    let bytes = file.read_vec(header.log_offset, header.log_length as usize, "log")?;
    let Some(replay) = log::replay(&bytes, header.log_guid, header.log_offset)? else {
        return Ok((LoggedFile::plain(file), None));
    };
    if replay.flushed_file_offset > file.len() {
        return Err(Error::corrupt(
            "log",
            header.log_offset,
            format!(
                "the newest entry needs a file of {:#x} bytes but the file has {:#x} (truncated?)",
                replay.flushed_file_offset,
                file.len()
            ),
        ));
    }
    let info = ReplayInfo {
        entries: replay.entries,
        last_sequence: replay.last_sequence,
        overlay_bytes: replay.overlay.data_bytes(),
    };
    Ok((LoggedFile::replayed(file, replay), Some(info)))
}

/// Reads both region table copies (through the log overlay) and resolves the first valid one.
/// Regions must lie inside the file as it is on disk, not as a log might extend it, so a
/// crafted LastFileOffset cannot make the BAT read allocate more than the file holds.
fn read_regions(file: &LoggedFile) -> Result<Regions> {
    let mut errors = Vec::new();
    for off in header::REGION_TABLE_OFFSETS {
        let parsed = file
            .read_vec(off, header::REGION_TABLE_SIZE, "region table")
            .and_then(|b| header::parse_region_table(&b, off));
        match parsed {
            Ok(entries) => return header::resolve_regions(&entries, off, file.file().len()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(Error::corrupt(
        "region table",
        header::REGION_TABLE_OFFSETS[0],
        format!(
            "both copies (at {:#x} and {:#x}) are invalid: {}",
            header::REGION_TABLE_OFFSETS[0],
            header::REGION_TABLE_OFFSETS[1],
            errors.join("; ")
        ),
    ))
}

/// The metadata items a reader needs.
struct Metadata {
    params: FileParameters,
    virtual_size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
    disk_id: Guid,
    locator: Option<ParentLocator>,
}

fn read_metadata(file: &LoggedFile, regions: &Regions) -> Result<Metadata> {
    let region = regions.metadata;
    let table_len = header::METADATA_TABLE_SIZE.min(region.length as usize);
    let table = file.read_vec(region.file_offset, table_len, "metadata table")?;
    let entries = header::parse_metadata_table(&table, region.file_offset, region.length)?;
    let item = |id: Guid| -> Result<Option<(Vec<u8>, u64)>> {
        let Some(e) = entries.iter().find(|e| !e.is_user && e.item_id == id) else {
            return Ok(None);
        };
        let at = region.file_offset + u64::from(e.offset);
        Ok(Some((
            file.read_vec(at, e.length as usize, "metadata item")?,
            at,
        )))
    };
    for e in &entries {
        if !e.is_user && e.is_required && !header::is_known_item(&e.item_id) {
            return Err(Error::unsupported(format!(
                "required metadata item {} (metadata region at {:#x})",
                e.item_id, region.file_offset
            )));
        }
    }
    let missing = |what: &str| {
        Error::corrupt(
            "metadata table",
            region.file_offset,
            format!("no {what} item"),
        )
    };
    let (b, at) = item(header::FILE_PARAMETERS)?.ok_or_else(|| missing("file parameters"))?;
    let params = header::parse_file_parameters(&b, at)?;
    let (b, at) =
        item(header::LOGICAL_SECTOR_SIZE)?.ok_or_else(|| missing("logical sector size"))?;
    let logical_sector_size = header::parse_sector_size(&b, at, "logical sector size metadata")?;
    let physical_sector_size = match item(header::PHYSICAL_SECTOR_SIZE)? {
        Some((b, at)) => header::parse_sector_size(&b, at, "physical sector size metadata")?,
        None => logical_sector_size,
    };
    let (b, at) = item(header::VIRTUAL_DISK_SIZE)?.ok_or_else(|| missing("virtual disk size"))?;
    let virtual_size = header::parse_virtual_disk_size(&b, at, logical_sector_size)?;
    let disk_id = match item(header::VIRTUAL_DISK_ID)? {
        Some((b, at)) => {
            Guid(crate::bytes::Fields::new(&b, "virtual disk id metadata", at).array(0)?)
        }
        None => Guid::ZERO,
    };
    let locator = match item(header::PARENT_LOCATOR)? {
        Some((b, at)) if params.has_parent => Some(header::parse_parent_locator(&b, at)?),
        _ => None,
    };
    Ok(Metadata {
        params,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        disk_id,
        locator,
    })
}

/// Parent file names to try, best first: relative_path, then the file names of volume_path
/// and absolute_win32_path (Windows paths: backslashes become slashes; absolute ones are
/// looked for in the child's directory).
fn parent_candidates(locator: &ParentLocator) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Some(rel) = locator.get("relative_path") {
        let mut p = rel.replace('\\', "/");
        while let Some(rest) = p.strip_prefix("./") {
            p = rest.to_string();
        }
        if !p.is_empty() {
            out.push(p);
        }
    }
    for key in ["volume_path", "absolute_win32_path"] {
        if let Some(v) = locator.get(key)
            && let Some(name) = v.rsplit(['\\', '/']).next().filter(|n| !n.is_empty())
            && !out.iter().any(|o| o == name)
        {
            out.push(name.to_string());
        }
    }
    out
}

impl BlockDevice for VhdxImage {
    fn size(&self) -> u64 {
        self.geo.virtual_size
    }

    fn caps(&self) -> Caps {
        Caps::EXTENTS | Caps::MULTI_CONN
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        let total = buf.len() as u64;
        let mut done = 0u64;
        while done < total {
            let pos = off + done;
            let rest = total - done;
            let m = self.map(pos, rest)?;
            let start = done as usize;
            match m {
                Mapping::Data { host, len } => {
                    let run = self.data_run(pos, host, len, rest, u32::MAX)?;
                    let part = &mut buf[start..start + run as usize];
                    self.file.read_exact_at(part, host, "payload block")?;
                    done += run;
                }
                Mapping::Zero { len } | Mapping::Unallocated { len } => {
                    buf[start..start + len as usize].fill(0);
                    done += len;
                }
                Mapping::Parent { len } => {
                    let part = &mut buf[start..start + len as usize];
                    blockdev::read_padded(self.parent()?.as_ref(), part, pos)?;
                    done += len;
                }
                Mapping::Partial {
                    host,
                    bitmap,
                    first_sector,
                    len,
                } => {
                    let mut rel = 0u64;
                    for (in_file, run) in
                        self.partial_runs(bitmap, first_sector, pos, len, false)?
                    {
                        let a = start + rel as usize;
                        let part = &mut buf[a..a + run as usize];
                        if in_file {
                            self.file.read_exact_at(part, host + rel, "payload block")?;
                        } else {
                            blockdev::read_padded(self.parent()?.as_ref(), part, pos + rel)?;
                        }
                        rel += run;
                    }
                    done += len;
                }
            }
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        check_status_range(off, len, self.size())?;
        match self.map(off, len)? {
            Mapping::Data { host, len: first } => {
                let run = self.data_run(off, host, first, len, MAX_STATUS_BLOCKS)?;
                if self.file.overlaid(host, run) {
                    return Ok(Extent::new(ExtentKind::Data, run));
                }
                Ok(Extent::data_at(run, self.file.shared_path(), host))
            }
            Mapping::Zero { len: first } => {
                let run =
                    self.same_kind_run(off, first, len, |m| matches!(m, Mapping::Zero { .. }))?;
                Ok(Extent::new(ExtentKind::Zero, run))
            }
            Mapping::Unallocated { len: first } => {
                let run = self.same_kind_run(off, first, len, |m| {
                    matches!(m, Mapping::Unallocated { .. })
                })?;
                Ok(Extent::new(ExtentKind::Unallocated, run))
            }
            Mapping::Parent { len: first } => {
                let run =
                    self.same_kind_run(off, first, len, |m| matches!(m, Mapping::Parent { .. }))?;
                blockdev::backing_status(self.parent()?.as_ref(), off, run)
            }
            Mapping::Partial {
                host,
                bitmap,
                first_sector,
                len: first,
            } => {
                let runs = self.partial_runs(bitmap, first_sector, off, first, true)?;
                let (in_file, run) = runs.first().copied().unwrap_or((false, first));
                if in_file {
                    if self.file.overlaid(host, run) {
                        return Ok(Extent::new(ExtentKind::Data, run));
                    }
                    Ok(Extent::data_at(run, self.file.shared_path(), host))
                } else {
                    blockdev::backing_status(self.parent()?.as_ref(), off, run)
                }
            }
        }
    }
}

impl VhdxImage {
    /// Extends a run of `first` bytes at `off` over following blocks whose mapping satisfies
    /// `same`, up to `max` bytes and [`MAX_STATUS_BLOCKS`] blocks.
    fn same_kind_run(
        &self,
        off: u64,
        first: u64,
        max: u64,
        same: impl Fn(&Mapping) -> bool,
    ) -> Result<u64> {
        let mut run = first;
        for _ in 0..MAX_STATUS_BLOCKS {
            if run >= max {
                break;
            }
            let m = self.map(off + run, max - run)?;
            if !same(&m) {
                break;
            }
            run += m.len();
        }
        Ok(run)
    }

    /// Records the problems of one header or region table copy.
    fn check_copies(&self, report: &mut CheckReport) {
        for off in header::HEADER_OFFSETS {
            let r = self
                .file
                .file()
                .read_vec(off, header::HEADER_SIZE, "header")
                .and_then(|b| header::parse_header(&b, off));
            if let Err(e) = r {
                report.corruption("header", Some(off), e.to_string());
            }
        }
        for off in header::REGION_TABLE_OFFSETS {
            let r = self
                .file
                .read_vec(off, header::REGION_TABLE_SIZE, "region table")
                .and_then(|b| header::parse_region_table(&b, off))
                .and_then(|entries| header::resolve_regions(&entries, off, self.file.file().len()));
            match r {
                Err(e) => report.corruption("region table", Some(off), e.to_string()),
                Ok(r) if r != self.regions => {
                    report.corruption("region table", Some(off), "differs from the copy in use")
                }
                Ok(_) => {}
            }
        }
    }
}

impl Image for VhdxImage {
    fn format(&self) -> &'static str {
        "vhdx"
    }

    fn info(&self) -> Result<ImageInfo> {
        let path = self.file.path().to_path_buf();
        let mut info = ImageInfo::new(path.clone(), "vhdx", self.size(), vec![path]);
        let subformat = if self.params.has_parent {
            "differencing"
        } else if self.params.leave_blocks_allocated {
            // The spec's mark of a fixed disk. Not "every block present": qemu-img convert -o
            // subformat=fixed marks all-zero blocks PAYLOAD_BLOCK_ZERO in its fixed images.
            "fixed"
        } else {
            "dynamic"
        };
        info.subformat = Some(subformat.to_string());
        info.cluster_size = Some(self.geo.block_size);
        info.dirty = self.replay.is_some();
        if let Some(name) = &self.parent_name {
            info.backing_filename = Some(name.clone());
            info.backing_format = Some("vhdx".to_string());
        }
        info.specific("block-size", self.geo.block_size);
        info.specific("logical-sector-size", self.logical_sector_size);
        info.specific("physical-sector-size", self.physical_sector_size);
        info.specific("log-replayed-in-memory", self.replay.is_some());
        if let Some(r) = &self.replay {
            info.specific("log-entries-replayed", r.entries);
            info.specific("log-last-sequence-number", r.last_sequence);
            info.specific("log-overlay-bytes", r.overlay_bytes);
        }
        info.specific("creator", self.creator.clone());
        info.specific("virtual-disk-id", self.disk_id.to_string());
        info.specific("data-write-guid", self.header.data_write_guid.to_string());
        info.specific("file-write-guid", self.header.file_write_guid.to_string());
        info.specific("header-sequence-number", self.header.sequence_number);
        Ok(info)
    }

    fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        self.check_copies(&mut report);
        // Compact entries (no strings): a check of a large disk lists one per present block.
        let mut areas: Vec<(u64, u64, Area)> = vec![(0, header::MIB, Area::Headers)];
        if self.header.log_length > 0 {
            areas.push((
                self.header.log_offset,
                self.header
                    .log_offset
                    .saturating_add(u64::from(self.header.log_length)),
                Area::Log,
            ));
        }
        areas.push((
            self.regions.bat.file_offset,
            self.regions.bat.end(),
            Area::BatRegion,
        ));
        areas.push((
            self.regions.metadata.file_offset,
            self.regions.metadata.end(),
            Area::MetadataRegion,
        ));
        let file_len = self.file.len();
        // Present entries are checked against the file, so the list holds at most one area
        // per BAT entry (at most MAX_BAT_ENTRIES).
        let mut problems = 0usize;
        let mut allocated = 0u64;
        for (i, &entry) in self.bat.entries.iter().enumerate() {
            let i = i as u64;
            let at = self.bat.offset + i * 8;
            let is_bitmap = (i + 1).is_multiple_of(self.geo.chunk_ratio + 1);
            let st = bat::state(entry);
            let off = bat::file_offset(entry);
            let mut bad = |msg: String| {
                if problems < MAX_CHECK_PROBLEMS {
                    report.corruption("BAT entry", Some(at), msg);
                }
                problems += 1;
            };
            let (present, len, what) = if is_bitmap {
                match st {
                    bat::SB_BLOCK_NOT_PRESENT => (false, 0, ""),
                    bat::SB_BLOCK_PRESENT => {
                        (true, bat::SECTOR_BITMAP_BLOCK, "sector bitmap block")
                    }
                    other => {
                        bad(format!("sector bitmap entry {i} has invalid state {other}"));
                        continue;
                    }
                }
            } else {
                let block = i - i / (self.geo.chunk_ratio + 1);
                let in_disk = self
                    .geo
                    .virtual_size
                    .saturating_sub(block * self.geo.block_size)
                    .min(self.geo.block_size);
                match st {
                    bat::PAYLOAD_BLOCK_FULLY_PRESENT => (true, in_disk, "payload block"),
                    bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT if self.geo.has_parent => {
                        (true, in_disk, "payload block")
                    }
                    0..=3 => (false, 0, ""),
                    other => {
                        bad(format!("block {block} has invalid state {other}"));
                        continue;
                    }
                }
            };
            if !present {
                continue;
            }
            if what == "payload block" {
                allocated += 1;
            }
            if off < header::MIB || off.checked_add(len).is_none_or(|end| end > file_len) {
                bad(format!(
                    "{what} at {off:#x} (+{len:#x}) lies outside the file past its header section ({file_len:#x} bytes)"
                ));
                continue;
            }
            let area = if is_bitmap {
                Area::Bitmap(i)
            } else {
                Area::Payload(i)
            };
            areas.push((off, off + len, area));
        }
        areas.sort();
        let mut reach: Option<(u64, usize)> = None;
        let mut overlaps = 0usize;
        for (k, (start, end, name)) in areas.iter().enumerate() {
            if let Some((reach_end, owner)) = reach {
                if *start < reach_end && *end > *start {
                    if overlaps < MAX_CHECK_PROBLEMS {
                        report.corruption(
                            "file layout",
                            Some(*start),
                            format!("{name} [{start:#x}, {end:#x}) overlaps {}", areas[owner].2),
                        );
                    }
                    overlaps += 1;
                }
                if *end > reach_end {
                    reach = Some((*end, k));
                }
            } else {
                reach = Some((*end, k));
            }
        }
        let unlisted = problems.saturating_sub(MAX_CHECK_PROBLEMS)
            + overlaps.saturating_sub(MAX_CHECK_PROBLEMS);
        if unlisted > 0 {
            report.corruption(
                "BAT",
                Some(self.bat.offset),
                format!("{unlisted} more problems not listed"),
            );
        }
        report.allocated_clusters = Some(allocated);
        report.total_clusters = Some(self.geo.data_blocks);
        report.image_end_offset = areas.iter().map(|a| a.1).max();
        Ok(report)
    }

    fn backing(&self) -> Option<&Arc<dyn Image>> {
        self.parent.as_ref()
    }
}
