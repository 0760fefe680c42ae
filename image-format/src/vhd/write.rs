//! Writing VHD images: fixed and dynamic disks (`vmnest convert -O vpc`).
//!
//! # Options (`-o`)
//!
//! * `subformat=dynamic|fixed` (default dynamic).
//! * `block_size=SIZE`: dynamic disks only; a power of two from 512 KiB to 256 MiB (default
//!   2 MiB, what Hyper-V and qemu write; Microsoft tools also use 512 KiB). Smaller blocks would
//!   only grow the table; the reader's own limit is 256 MiB.
//! * `force_size=on|off` (default on): on keeps the requested size exact; off rounds it up to
//!   the size of the CHS geometry the specification derives from it (as Virtual PC sized its
//!   disks, and as qemu does with `force_size=off`).
//! * `azure=on|off` (default off): the layout Azure accepts, a fixed disk whose size is a whole
//!   number of MiB. It implies `subformat=fixed` (asking for `subformat=dynamic` too is an
//!   error, Azure takes only fixed disks) and rounds the size up to the next MiB; it cannot be
//!   combined with `force_size=off`.
//!
//! Every size is first rounded up to whole sectors (512 bytes): a VHD holds nothing smaller.
//!
//! # The size rule: creator and geometry
//!
//! The footer carries the size twice, as "current size" and as a CHS geometry, and readers
//! disagree about which one counts. Hyper-V, Azure and libvhdi read the current size. qemu
//! before 10.0 reads the geometry's size (cylinders × heads × sectors × 512) unless the creator
//! application is one it knows to mean current size ("win ", "qem2", "d2v ", "tap\0", "CTXS")
//! or the geometry is the maximum 65535/16/255, which says "too big for CHS". qemu 10.0
//! (February 2025, for Azure's "wa\0\0" exports) inverted the list: the geometry only for
//! "vpc " and "qemu", the current size for everyone else, and still for the maximum geometry.
//! Our reader takes the geometry only for Virtual PC and Virtual Server ("vpc ", "vs  ") and
//! otherwise the current size (see [`Footer::size_rule`](super::header::Footer::size_rule)).
//!
//! We identify ourselves truthfully, creator application `"vmns"`, and choose the geometry so
//! that every one of those readers, old qemu included, lands on the current size:
//!
//! * when the geometry the specification's algorithm derives from the size
//!   ([`chs_geometry`]) addresses exactly that size, it is stored: the two fields agree, and a
//!   BIOS sees the disk whole;
//! * otherwise the maximum geometry 65535/16/255 is stored, which every qemu reads as "use the
//!   current size". Microsoft's Disk2vhd does the same for small disks (qemu's iotest image
//!   `d2v-zerofilled.vhd` is a 251 MiB disk with geometry 65535/16/255) and the specification
//!   itself stores it for every disk past 127 GiB, so Hyper-V and Windows take it. The geometry
//!   is only a hint for an emulated ATA BIOS; an emulator that sizes the disk by it (Virtual PC)
//!   would see it as 127 GiB, but such an emulator is not a target of this writer. Storing the
//!   rounded-down geometry instead would be read as a smaller disk by qemu before 10.0.
//!
//! `force_size=off` never needs the maximum below 127 GiB: the size is the geometry's. Past the
//! largest CHS size (65535 × 16 × 255 sectors) every disk stores the maximum geometry and its
//! exact size.
//!
//! Other footer fields: features 2 (the reserved bit the specification requires), format
//! version 1.0, creator version = vmnest's major.minor, creator host OS `"Wi2k"` (the
//! specification knows only Windows and Macintosh; qemu and Hyper-V write "Wi2k", and every
//! reader ignores the field), original size = current size, a random unique id (a version 4
//! UUID from `/dev/urandom`), the time stamp in seconds since 2000-01-01 00:00 UTC.
//!
//! # Layout written
//!
//! ```text
//! fixed:    | guest data (holes where nothing was written) ........... | footer |
//! dynamic:  | footer copy | dynamic header | BAT | block | block | ... | footer |
//!             0             512              1536
//! ```
//!
//! A dynamic block is its sector bitmap (all ones: every sector of an allocated block is
//! present, uncommitted ones reading as the zeros of a hole) followed by its data. The bitmap is
//! placed so the data starts on a 4 KiB boundary (the gap before it is a hole), unless that
//! would push sector numbers past what a BAT entry holds for the largest disks. Blocks are
//! allocated in commit order, under a mutex held only to pick the offset; data is written
//! outside it. The BAT lives in memory and is written by `finish`, with the headers and the
//! footer, which ends the file.
//!
//! # Zeros
//!
//! Ranges never committed read as zeros: a fixed disk is a sparse file, an unallocated dynamic
//! block reads as zeros and VHD has no backing file in conversions. `write_zeroes` therefore
//! does nothing.

use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use crate::create::{CreateOptions, ImageWriter, Prepared, TempOutput, WriteOrder};
use crate::error::{Error, Result};

use super::header::{
    BAT_UNALLOCATED, CHS_MAX, DYN_COOKIE, DYN_HEADER_SIZE, DiskType, DynamicHeader, FOOTER_COOKIE,
    FOOTER_SIZE, Footer, Geometry, Integrity, LOCATOR_COUNT, NO_DATA_OFFSET, SECTOR, checksum,
};

/// Creator application written in the footer.
pub const CREATOR_APP: &[u8; 4] = b"vmns";
/// Creator host OS written in the footer.
pub const CREATOR_HOST_OS: &[u8; 4] = b"Wi2k";
/// Default block size of dynamic disks.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Smallest block size written.
pub const MIN_WRITE_BLOCK_SIZE: u32 = 512 << 10;
/// Largest block size written (the reader's limit).
pub const MAX_WRITE_BLOCK_SIZE: u32 = super::header::MAX_BLOCK_SIZE;
/// Largest dynamic disk: 2040 GiB, the specification's limit (BAT entries are 32-bit sector
/// numbers).
pub const MAX_DYNAMIC_SIZE: u64 = 2040 << 30;
/// Where the dynamic header goes (right after the footer copy).
const HEADER_OFFSET: u64 = FOOTER_SIZE as u64;
/// Where the BAT goes (right after the dynamic header).
const TABLE_OFFSET: u64 = HEADER_OFFSET + DYN_HEADER_SIZE as u64;
/// Block data is aligned to this in the file, when possible.
const DATA_ALIGN: u64 = 4096;
/// Seconds from the Unix epoch to 2000-01-01 00:00 UTC.
const VHD_EPOCH: u64 = 946_684_800;

/// What `-o` asked for, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Fixed or dynamic.
    pub disk_type: DiskType,
    /// Block size (dynamic disks).
    pub block_size: u32,
    /// The guest size written.
    pub size: u64,
    /// The geometry stored.
    pub geometry: Geometry,
}

/// Reads the options and decides the disk's size and geometry.
pub fn params(options: &CreateOptions) -> Result<Params> {
    let mut r = options.reader("vpc");
    let subformat = r.choice("subformat", &["dynamic", "fixed"])?;
    let block_size = r.size("block_size")?;
    let force_size = r.bool("force_size")?.unwrap_or(true);
    let azure = r.bool("azure")?.unwrap_or(false);
    r.finish()?;
    let invalid = |reason: String| Error::InvalidArgument {
        path: Default::default(),
        reason,
    };
    let disk_type = match (subformat.as_deref(), azure) {
        (Some("dynamic"), true) => {
            return Err(invalid(
                "vpc option azure=on needs subformat=fixed: Azure accepts only fixed VHDs".into(),
            ));
        }
        (Some("fixed"), _) | (None, true) => DiskType::Fixed,
        _ => DiskType::Dynamic,
    };
    if azure && !force_size {
        return Err(invalid(
            "vpc option azure=on keeps the size a whole MiB and cannot be combined with force_size=off".into(),
        ));
    }
    let block_size = match block_size {
        Some(_) if disk_type == DiskType::Fixed => {
            return Err(invalid(
                "vpc option block_size applies to dynamic disks only (subformat=fixed)".into(),
            ));
        }
        Some(b) => u32::try_from(b)
            .ok()
            .filter(|b| {
                b.is_power_of_two() && (MIN_WRITE_BLOCK_SIZE..=MAX_WRITE_BLOCK_SIZE).contains(b)
            })
            .ok_or_else(|| {
                invalid(format!(
                    "vpc option block_size={b}: expected a power of two from 512K to 256M"
                ))
            })?,
        None => DEFAULT_BLOCK_SIZE,
    };
    let too_big = || {
        invalid(format!(
            "vpc: a size of {} bytes is too large",
            options.size
        ))
    };
    let mut size = options
        .size
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(too_big)?;
    if azure {
        size = size.checked_next_multiple_of(1 << 20).ok_or_else(too_big)?;
    }
    let geometry = if force_size {
        geometry_for(size / SECTOR)
    } else {
        let (sectors, geometry) = round_up_to_chs(size / SECTOR);
        size = sectors * SECTOR;
        geometry
    };
    // A fixed disk's file is its size plus the footer.
    size.checked_add(FOOTER_SIZE as u64).ok_or_else(too_big)?;
    if disk_type == DiskType::Dynamic && size > MAX_DYNAMIC_SIZE {
        return Err(invalid(format!(
            "vpc: a dynamic disk holds at most 2040 GiB; {size} bytes asked (use subformat=fixed)"
        )));
    }
    Ok(Params {
        disk_type,
        block_size,
        size,
        geometry,
    })
}

/// The CHS geometry the VHD specification's algorithm ("CHS calculation", appendix) derives
/// from a sector count; its size is at most the count (it rounds down), capped at [`CHS_MAX`].
pub fn chs_geometry(total_sectors: u64) -> Geometry {
    let max = CHS_MAX.size() / SECTOR;
    let total = total_sectors.min(max);
    let (sectors, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut spt = 17u64;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    let cylinders = (cyl_times_heads / heads).min(65535);
    Geometry {
        // All bounded above: cylinders by min, heads <= 16, sectors <= 255.
        cylinders: cylinders as u16,
        heads: heads as u8,
        sectors: sectors as u8,
    }
}

/// The geometry stored for an exact size of `total_sectors`: the specification's geometry when
/// it addresses exactly that many sectors, else the maximum (see the module documentation).
pub fn geometry_for(total_sectors: u64) -> Geometry {
    let g = chs_geometry(total_sectors);
    if g.size() / SECTOR == total_sectors {
        g
    } else {
        CHS_MAX
    }
}

/// `force_size=off`: the smallest sector count at least `total_sectors` whose specification
/// geometry addresses it exactly, and that geometry. Past the largest CHS size, the count as
/// is with the maximum geometry.
pub fn round_up_to_chs(total_sectors: u64) -> (u64, Geometry) {
    let max = CHS_MAX.size() / SECTOR;
    if total_sectors >= max {
        return (total_sectors, CHS_MAX);
    }
    // Each step of the algorithm's rounding is below 16 × 255 sectors; the loop ends well
    // before this bound, which only guards against a mistake.
    let first = total_sectors.max(1);
    (first..first + (1 << 20))
        .map(chs_geometry)
        .map(|g| (g.size() / SECTOR, g))
        .find(|&(got, _)| got >= total_sectors && got > 0)
        .unwrap_or((max, CHS_MAX))
}

/// Encodes a footer (its `checksum` and `integrity` fields are ignored: the checksum is
/// computed).
pub fn encode_footer(f: &Footer) -> [u8; FOOTER_SIZE] {
    let mut b = [0u8; FOOTER_SIZE];
    b[0..8].copy_from_slice(FOOTER_COOKIE);
    b[8..12].copy_from_slice(&f.features.to_be_bytes());
    b[12..16].copy_from_slice(&f.version.to_be_bytes());
    b[16..24].copy_from_slice(&f.data_offset.to_be_bytes());
    b[24..28].copy_from_slice(&f.timestamp.to_be_bytes());
    b[28..32].copy_from_slice(&f.creator_app);
    b[32..36].copy_from_slice(&f.creator_version.to_be_bytes());
    b[36..40].copy_from_slice(&f.creator_host_os);
    b[40..48].copy_from_slice(&f.original_size.to_be_bytes());
    b[48..56].copy_from_slice(&f.current_size.to_be_bytes());
    b[56..58].copy_from_slice(&f.geometry.cylinders.to_be_bytes());
    b[58] = f.geometry.heads;
    b[59] = f.geometry.sectors;
    b[60..64].copy_from_slice(&f.disk_type.code().to_be_bytes());
    b[68..84].copy_from_slice(&f.unique_id);
    b[84] = f.saved_state;
    let sum = checksum(&b, 64);
    b[64..68].copy_from_slice(&sum.to_be_bytes());
    b
}

/// Encodes a dynamic disk header (checksum computed). The parent name is written as UTF-16BE,
/// cut at 256 units; locators go to their `index` slot.
pub fn encode_dynamic_header(h: &DynamicHeader) -> [u8; DYN_HEADER_SIZE] {
    let mut b = [0u8; DYN_HEADER_SIZE];
    b[0..8].copy_from_slice(DYN_COOKIE);
    b[8..16].copy_from_slice(&NO_DATA_OFFSET.to_be_bytes());
    b[16..24].copy_from_slice(&h.table_offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.version.to_be_bytes());
    b[28..32].copy_from_slice(&h.max_table_entries.to_be_bytes());
    b[32..36].copy_from_slice(&h.block_size.to_be_bytes());
    b[40..56].copy_from_slice(&h.parent_unique_id);
    b[56..60].copy_from_slice(&h.parent_timestamp.to_be_bytes());
    for (i, unit) in h.parent_name.encode_utf16().take(256).enumerate() {
        b[64 + 2 * i..66 + 2 * i].copy_from_slice(&unit.to_be_bytes());
    }
    for loc in h.locators.iter().filter(|l| l.index < LOCATOR_COUNT) {
        let at = 576 + 24 * loc.index;
        let code: [u8; 4] = loc.code.name().as_bytes().try_into().unwrap_or(*b"    ");
        b[at..at + 4].copy_from_slice(&code);
        b[at + 4..at + 8].copy_from_slice(&loc.data_space.to_be_bytes());
        b[at + 8..at + 12].copy_from_slice(&loc.data_length.to_be_bytes());
        b[at + 16..at + 24].copy_from_slice(&loc.data_offset.to_be_bytes());
    }
    let sum = checksum(&b, 36);
    b[36..40].copy_from_slice(&sum.to_be_bytes());
    b
}

/// Encodes a BAT: big-endian entries, padded with unallocated entries to whole sectors.
pub fn encode_bat(bat: &[u32]) -> Vec<u8> {
    let bytes = (bat.len() * 4).next_multiple_of(SECTOR as usize);
    let mut out = Vec::with_capacity(bytes);
    for e in bat {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out.resize(bytes, 0xff);
    out
}

/// The sector bitmap of an allocated block: one bit per sector, all set, padded to sectors.
pub fn full_bitmap(block_size: u32) -> Vec<u8> {
    let sectors = u64::from(block_size) / SECTOR;
    let bits = usize::try_from(sectors.div_ceil(8)).unwrap_or(0);
    let mut out = vec![0xffu8; bits];
    out.resize(bits.next_multiple_of(SECTOR as usize), 0);
    out
}

/// The footer of a new image.
pub fn new_footer(p: &Params, unique_id: [u8; 16], timestamp: u32) -> Footer {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: match p.disk_type {
            DiskType::Fixed => NO_DATA_OFFSET,
            _ => HEADER_OFFSET,
        },
        timestamp,
        creator_app: *CREATOR_APP,
        creator_version: (major.min(0xffff) << 16) | minor.min(0xffff),
        creator_host_os: *CREATOR_HOST_OS,
        original_size: p.size,
        current_size: p.size,
        geometry: p.geometry,
        disk_type: p.disk_type,
        checksum: 0,
        unique_id,
        saved_state: 0,
        integrity: Integrity::Valid,
    }
}

/// Seconds since 2000-01-01 00:00 UTC, now (0 before it, saturated after 2136).
fn vhd_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// A random version 4 UUID.
fn random_uuid(path: &Path) -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op: "read /dev/urandom for the unique id of",
            offset: 0,
            source,
        })?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

/// Creates the writer (`VhdDriver::create`).
pub fn create(path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    let p = params(options)?;
    if options.backing.is_some() {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "a backing file for a new VHD (differencing disks are not written)".into(),
        });
    }
    let footer = encode_footer(&new_footer(&p, random_uuid(path)?, vhd_timestamp()));
    let out = TempOutput::create_with(path, !options.no_sync)?;
    let layout = match p.disk_type {
        DiskType::Fixed => {
            out.set_len(p.size)?;
            Layout::Fixed
        }
        _ => Layout::Dynamic(DynamicLayout::new(p.size, p.block_size)?),
    };
    Ok(Box::new(VhdWriter {
        out,
        size: p.size,
        footer,
        layout,
    }))
}

/// Writes a new VHD.
#[derive(Debug)]
pub struct VhdWriter {
    out: TempOutput,
    size: u64,
    footer: [u8; FOOTER_SIZE],
    layout: Layout,
}

#[derive(Debug)]
enum Layout {
    Fixed,
    Dynamic(DynamicLayout),
}

/// The dynamic disk's geometry and its allocation state.
#[derive(Debug)]
struct DynamicLayout {
    block_size: u64,
    bitmap: Vec<u8>,
    entries: u32,
    /// Align block data on [`DATA_ALIGN`].
    align: bool,
    state: Mutex<Allocation>,
}

#[derive(Debug)]
struct Allocation {
    bat: Vec<u32>,
    /// The next free byte of the file.
    next: u64,
}

impl DynamicLayout {
    fn new(size: u64, block_size: u32) -> Result<Self> {
        let bs = u64::from(block_size);
        let blocks = size.div_ceil(bs).max(1);
        let entries = u32::try_from(blocks).map_err(|_| Error::InvalidArgument {
            path: Default::default(),
            reason: format!("vpc: {blocks} blocks are too many for a table"),
        })?;
        let bitmap = full_bitmap(block_size);
        let table_end = TABLE_OFFSET + (blocks * 4).next_multiple_of(SECTOR);
        // Aligning costs at most DATA_ALIGN per block; keep it only while the last block's
        // sector number still fits a BAT entry.
        let worst_aligned = blocks
            .checked_mul(bs + bitmap.len() as u64 + DATA_ALIGN)
            .and_then(|b| b.checked_add(table_end));
        let align = worst_aligned.is_some_and(|end| end / SECTOR < u64::from(u32::MAX));
        Ok(DynamicLayout {
            block_size: bs,
            entries,
            align,
            state: Mutex::new(Allocation {
                bat: vec![BAT_UNALLOCATED; blocks as usize],
                next: table_end,
            }),
            bitmap,
        })
    }

    /// The file offset of block `block`'s data, allocating the block if needed. Returns the
    /// offset and, for a new block, where its bitmap must be written.
    fn block_data(&self, block: u64) -> Result<(u64, Option<u64>)> {
        let bitmap_len = self.bitmap.len() as u64;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let idx = usize::try_from(block).map_err(|_| overflow())?;
        let entry = *st.bat.get(idx).ok_or_else(overflow)?;
        if entry != BAT_UNALLOCATED {
            return Ok((u64::from(entry) * SECTOR + bitmap_len, None));
        }
        let data = if self.align {
            (st.next + bitmap_len).next_multiple_of(DATA_ALIGN)
        } else {
            st.next + bitmap_len
        };
        let start = data - bitmap_len;
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNALLOCATED)
            .ok_or_else(overflow)?;
        st.bat[idx] = sector;
        st.next = data.checked_add(self.block_size).ok_or_else(overflow)?;
        Ok((data, Some(start)))
    }
}

fn overflow() -> Error {
    Error::InvalidArgument {
        path: Default::default(),
        reason: "vpc: the image grew past what a block allocation table can address".into(),
    }
}

impl ImageWriter for VhdWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        // The file system block: partly written dynamic blocks keep holes at this grain.
        4096
    }

    fn order(&self) -> WriteOrder {
        WriteOrder::Any
    }

    fn commit(&self, prepared: Prepared) -> Result<()> {
        let file = self.out.file();
        let mut off = prepared.off;
        for unit in &prepared.units {
            let bytes = &unit.bytes[..];
            let end = off
                .checked_add(bytes.len() as u64)
                .filter(|&e| e <= self.size)
                .ok_or_else(|| Error::InvalidArgument {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "write of {} bytes at {off:#x} past the {}-byte disk",
                        bytes.len(),
                        self.size
                    ),
                })?;
            match &self.layout {
                Layout::Fixed => file.write_all_at(bytes, off)?,
                Layout::Dynamic(d) => {
                    let mut pos = off;
                    while pos < end {
                        let block = pos / d.block_size;
                        let in_block = pos % d.block_size;
                        let n = (d.block_size - in_block).min(end - pos);
                        let (data, new_bitmap) = d.block_data(block)?;
                        if let Some(at) = new_bitmap {
                            file.write_all_at(&d.bitmap, at)?;
                        }
                        let from = (pos - off) as usize;
                        file.write_all_at(&bytes[from..from + n as usize], data + in_block)?;
                        pos += n;
                    }
                }
            }
            off = end;
        }
        Ok(())
    }

    fn write_zeroes(&self, _off: u64, _len: u64) -> Result<()> {
        // Uncommitted ranges already read as zeros (module documentation, "Zeros").
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let file = self.out.file();
        let end = match &self.layout {
            Layout::Fixed => self.size,
            Layout::Dynamic(d) => {
                let st = d.state.lock().unwrap_or_else(|e| e.into_inner());
                let header = DynamicHeader {
                    table_offset: TABLE_OFFSET,
                    version: 0x0001_0000,
                    max_table_entries: d.entries,
                    block_size: d.block_size as u32,
                    checksum: 0,
                    parent_unique_id: [0; 16],
                    parent_timestamp: 0,
                    parent_name: String::new(),
                    locators: Vec::new(),
                };
                file.write_all_at(&encode_bat(&st.bat), TABLE_OFFSET)?;
                file.write_all_at(&encode_dynamic_header(&header), HEADER_OFFSET)?;
                file.write_all_at(&self.footer, 0)?;
                st.next
            }
        };
        file.write_all_at(&self.footer, end)?;
        self.out.set_len(end + FOOTER_SIZE as u64)?;
        self.out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::header::{parse_dynamic_header, parse_footer};

    fn opts(size: u64, text: &str) -> CreateOptions {
        let mut o = CreateOptions {
            size,
            ..Default::default()
        };
        o.parse_options(text).unwrap();
        o
    }

    #[test]
    fn footer_round_trips_through_the_parser() {
        let p = params(&opts(1 << 30, "")).unwrap();
        let f = new_footer(&p, [7; 16], 12345);
        let bytes = encode_footer(&f);
        let back = parse_footer(&bytes, 0).unwrap();
        assert_eq!(
            back,
            Footer {
                checksum: back.checksum,
                ..f
            }
        );
        assert_eq!(back.virtual_size(), 1 << 30);
        assert_eq!(back.creator_app_str(), "vmns");
    }

    #[test]
    fn dynamic_header_round_trips_through_the_parser() {
        let h = DynamicHeader {
            table_offset: TABLE_OFFSET,
            version: 0x0001_0000,
            max_table_entries: 11,
            block_size: 512 << 10,
            checksum: 0,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
        };
        let back = parse_dynamic_header(&encode_dynamic_header(&h), 512).unwrap();
        assert_eq!(
            back,
            DynamicHeader {
                checksum: back.checksum,
                ..h
            }
        );
        assert!(back.check_table(11 * (512 << 10) - 512, 512).is_ok());
        assert_eq!(back.bitmap_size(), full_bitmap(512 << 10).len() as u64);
    }

    #[test]
    fn bat_is_big_endian_and_padded_with_unallocated_entries() {
        let b = encode_bat(&[1, BAT_UNALLOCATED, 0x0102_0304]);
        assert_eq!(b.len(), 512);
        assert_eq!(&b[..12], &[0, 0, 0, 1, 255, 255, 255, 255, 1, 2, 3, 4]);
        assert!(b[12..].iter().all(|&x| x == 0xff));
    }

    #[test]
    fn bitmap_covers_every_sector_of_the_block() {
        assert_eq!(full_bitmap(2 << 20), vec![0xff; 512]);
        let small = full_bitmap(512 << 10);
        assert_eq!(small.len(), 512);
        assert!(small[..128].iter().all(|&x| x == 0xff) && small[128..].iter().all(|&x| x == 0));
    }

    #[test]
    fn chs_geometry_follows_the_specification() {
        // 1 GiB: 63 sectors, 16 heads, 2080 cylinders (rounds down).
        assert_eq!(
            chs_geometry(2 << 20),
            Geometry {
                cylinders: 2080,
                heads: 16,
                sectors: 63
            }
        );
        // Small disk: 17 sectors per track, at least 4 heads.
        assert_eq!(
            chs_geometry(2048),
            Geometry {
                cylinders: 30,
                heads: 4,
                sectors: 17
            }
        );
        assert_eq!(chs_geometry(u64::MAX), CHS_MAX);
    }

    #[test]
    fn size_not_representable_in_chs_gets_the_maximum_geometry() {
        assert_eq!(geometry_for((20 << 20) / 512 + 7), CHS_MAX);
        assert_eq!(geometry_for(2 << 20), CHS_MAX);
        // 30 × 4 × 17 sectors is exact.
        let g = geometry_for(30 * 4 * 17);
        assert_eq!((g.cylinders, g.heads, g.sectors), (30, 4, 17));
    }

    #[test]
    fn force_size_off_rounds_up_to_an_exact_geometry() {
        let p = params(&opts(1 << 30, "force_size=off")).unwrap();
        assert!(p.size >= 1 << 30 && p.size - (1 << 30) < 16 * 63 * 512);
        assert_eq!(p.geometry.size(), p.size);
        assert_ne!(p.geometry, CHS_MAX);
        let huge = params(&opts(200 << 30, "force_size=off")).unwrap();
        assert_eq!((huge.size, huge.geometry), (200 << 30, CHS_MAX));
    }

    #[test]
    fn azure_rounds_up_to_a_mib_and_implies_fixed() {
        let p = params(&opts((20 << 20) + 3584, "azure=on")).unwrap();
        assert_eq!((p.size, p.disk_type), (21 << 20, DiskType::Fixed));
        let err = params(&opts(1 << 20, "azure=on,subformat=dynamic"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("subformat=fixed"), "{err}");
        let err = params(&opts(1 << 20, "azure=on,force_size=off"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("force_size=off"), "{err}");
    }

    #[test]
    fn bad_block_sizes_are_rejected_naming_the_option() {
        for text in ["block_size=3M", "block_size=4k", "block_size=512M"] {
            let err = params(&opts(1 << 30, text)).unwrap_err().to_string();
            assert!(err.contains("block_size="), "{err}");
        }
        let err = params(&opts(1 << 30, "subformat=fixed,block_size=2M"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dynamic disks only"), "{err}");
        let err = params(&opts(1 << 30, "colour=red"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"colour\""), "{err}");
    }

    #[test]
    fn size_is_rounded_up_to_sectors_and_dynamic_is_capped() {
        assert_eq!(params(&opts(1000, "")).unwrap().size, 1024);
        assert!(params(&opts(2041 << 30, "")).is_err());
        assert!(params(&opts(2041 << 30, "subformat=fixed")).is_ok());
        assert!(params(&opts(u64::MAX, "subformat=fixed")).is_err());
    }

    #[test]
    fn blocks_are_allocated_once_with_aligned_data() {
        let d = DynamicLayout::new(8 << 20, 2 << 20).unwrap();
        let (data, bitmap) = d.block_data(2).unwrap();
        assert_eq!(data % DATA_ALIGN, 0);
        assert_eq!(bitmap, Some(data - 512));
        assert_eq!(d.block_data(2).unwrap(), (data, None));
        let (next, _) = d.block_data(0).unwrap();
        assert!(next >= data + (2 << 20));
        assert!(d.block_data(4).is_err());
    }
}
