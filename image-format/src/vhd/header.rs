//! Pure parsing of the VHD on-disk structures: the hard disk footer, the dynamic disk header
//! and its parent locators, and the rules derived from them (checksums, the disk size rule,
//! parent path conversion). No I/O here: every function takes bytes and the file offset they
//! came from, so errors name the structure and the absolute offset.
//!
//! Layouts follow Microsoft's "Virtual Hard Disk Image Format Specification" v1.0 (October
//! 2006), sections "Hard Disk Footer Format" and "Dynamic Disk Header Format". All integers are
//! big endian.

use crate::bytes::Fields;
use crate::error::{Error, Result};

/// Bytes per sector; the spec fixes it at 512 for every VHD.
pub const SECTOR: u64 = 512;
/// Size of the hard disk footer (and of its copy at offset 0 of dynamic disks).
pub const FOOTER_SIZE: usize = 512;
/// Size of the footer written by Virtual PC versions before 2004: the last reserved byte is
/// missing, so the footer starts 511 bytes before the end of the file.
pub const OLD_FOOTER_SIZE: usize = 511;
/// Size of the dynamic disk header.
pub const DYN_HEADER_SIZE: usize = 1024;

/// Footer cookie, "conectix": the creator of the original format (Connectix, before Microsoft
/// bought Virtual PC). Marks the hard disk footer and its copy at offset 0.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic disk header cookie, "cxsparse": Connectix sparse disk.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Footer "data offset" of a fixed disk: no further structure (all ones).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// BAT entry of a block that is not allocated in this file.
pub const BAT_UNALLOCATED: u32 = u32::MAX;
/// The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors per track). A footer that
/// carries it says "the disk is bigger than CHS can express": its size is the current size.
pub const CHS_MAX: Geometry = Geometry {
    cylinders: 65535,
    heads: 16,
    sectors: 255,
};

/// Smallest block size accepted (one sector).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted. The spec's default is 2 MiB; Hyper-V and qemu use 2 MiB (qemu
/// 512 KiB for small disks). 256 MiB leaves room while keeping a block's bitmap at 64 KiB.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Cap on the number of BAT entries loaded (4 bytes each: a 16 MiB table). With 2 MiB blocks
/// that covers 8 TiB, four times the 2040 GiB the spec allows a dynamic disk.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 22;
/// How many BAT entries a header may declare beyond what its disk size needs. Writers size the
/// table from the disk size (the spec says "equal to the number of blocks in the disk"); Virtual
/// PC images whose size is taken from CHS geometry carry one entry more than the CHS size needs.
/// A table far larger than the disk is a damaged or hostile header (the fuzzed afl5.img
/// declares 1073741825 entries for a 34 KiB disk).
pub const MAX_EXTRA_TABLE_ENTRIES: u32 = 1 << 16;
/// Cap on the bytes of one parent locator's data (a Windows path of 32767 UTF-16 units).
pub const MAX_LOCATOR_BYTES: u32 = 64 << 10;
/// Number of parent locator entries in the dynamic disk header.
pub const LOCATOR_COUNT: usize = 8;

/// The footer's disk type field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the guest data, then the footer.
    Fixed,
    /// 3: footer copy, dynamic header, BAT, blocks, footer.
    Dynamic,
    /// 4: a dynamic disk whose unwritten sectors come from a parent image.
    Differencing,
}

impl DiskType {
    /// The footer code: 2, 3 or 4.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The subformat name, as qemu's `subformat` option spells it (plus "differencing").
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }

    /// True for the types with a dynamic header and a BAT.
    pub fn is_sparse(self) -> bool {
        !matches!(self, DiskType::Fixed)
    }
}

/// Cylinders, heads and sectors per track, as the footer records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Geometry {
    /// Bytes the geometry addresses: cylinders × heads × sectors × 512 (cannot overflow).
    pub fn size(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors) * SECTOR
    }
}

/// How much of a footer its checksum vouches for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Integrity {
    /// The checksum matches the footer as stored.
    Valid,
    /// The checksum matches only if the unique id is taken as all zeros: the id was stamped
    /// after the checksum was computed (old qemu builds without libuuid wrote a null id, and
    /// tools that later filled one in did not update the checksum; dfvfs's `image.vhd` is such
    /// a file). Every field that decides how data is read (sizes, offsets, type) is still
    /// covered; only the identity is not. Reported by `check`.
    UniqueIdUnchecked,
}

/// Which of the two size fields gives the guest-visible size. See [`Footer::size_rule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeRule {
    /// cylinders × heads × sectors × 512.
    Chs,
    /// The footer's current size field.
    CurrentSize,
}

impl SizeRule {
    /// The name `info` shows.
    pub fn name(self) -> &'static str {
        match self {
            SizeRule::Chs => "chs",
            SizeRule::CurrentSize => "current_size",
        }
    }
}

/// The hard disk footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Feature bits (0x2 "reserved" is always set; 0x1 "temporary").
    pub features: u32,
    /// Format version, major in the high 16 bits (0x00010000).
    pub version: u32,
    /// Offset of the dynamic disk header, [`NO_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00 UTC when the image was created.
    pub timestamp: u32,
    /// Creator application: "vpc " (Virtual PC), "vs  " (Virtual Server), "win " (Hyper-V and
    /// Windows), "d2v\0" (Disk2vhd), "qemu"/"qem2" (qemu), "tap\0" (blktap), ...
    pub creator_app: [u8; 4],
    /// Creator version, major in the high 16 bits.
    pub creator_version: u32,
    /// Creator host OS: "Wi2k" (Windows) or "Mac " (Macintosh).
    pub creator_host_os: [u8; 4],
    /// Size at creation, bytes.
    pub original_size: u64,
    /// Current size, bytes.
    pub current_size: u64,
    /// CHS geometry the guest BIOS sees.
    pub geometry: Geometry,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// One's complement of the byte sum of the footer without this field.
    pub checksum: u32,
    /// Identity of the image; a differencing child records its parent's.
    pub unique_id: [u8; 16],
    /// 1 when the image holds a saved VM state.
    pub saved_state: u8,
    /// What the checksum vouches for.
    pub integrity: Integrity,
}

/// One's complement of the sum of `bytes`, skipping the four bytes at `skip` (the checksum
/// field itself). Used by the footer and the dynamic disk header.
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip.saturating_add(4)).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// Byte offset of the footer's checksum field.
const FOOTER_CHECKSUM_AT: usize = 64;
/// Byte offset of the footer's unique id.
const FOOTER_UUID_AT: usize = 68;
/// Byte offset of the dynamic header's checksum field.
const DYN_CHECKSUM_AT: usize = 36;

/// True when `buf` starts with the footer cookie.
pub fn has_footer_cookie(buf: &[u8]) -> bool {
    buf.get(..8) == Some(FOOTER_COOKIE.as_slice())
}

/// How a footer's checksum checks out, without parsing the rest.
pub fn footer_integrity(buf: &[u8; FOOTER_SIZE]) -> Option<Integrity> {
    let stored = u32::from_be_bytes([buf[64], buf[65], buf[66], buf[67]]);
    if checksum(buf, FOOTER_CHECKSUM_AT) == stored {
        return Some(Integrity::Valid);
    }
    let mut zeroed = *buf;
    zeroed[FOOTER_UUID_AT..FOOTER_UUID_AT + 16].fill(0);
    (checksum(&zeroed, FOOTER_CHECKSUM_AT) == stored).then_some(Integrity::UniqueIdUnchecked)
}

/// Parses a footer read from `base`. Rejects a wrong cookie, a checksum that does not match
/// (see [`Integrity`] for the one tolerated case), an unknown disk type or major version.
pub fn parse_footer(buf: &[u8; FOOTER_SIZE], base: u64) -> Result<Footer> {
    let f = Fields::new(buf, "VHD footer", base);
    if !has_footer_cookie(buf) {
        return Err(f.error(0, "no \"conectix\" cookie"));
    }
    let stored = f.u32_be(FOOTER_CHECKSUM_AT)?;
    let integrity = footer_integrity(buf).ok_or_else(|| {
        f.error(
            FOOTER_CHECKSUM_AT,
            format!(
                "checksum {stored:#010x} does not match the footer's bytes (expected {:#010x})",
                checksum(buf, FOOTER_CHECKSUM_AT)
            ),
        )
    })?;
    let version = f.u32_be(12)?;
    if version >> 16 != 1 {
        return Err(f.error(12, format!("unsupported format version {version:#010x}")));
    }
    let disk_type = match f.u32_be(60)? {
        2 => DiskType::Fixed,
        3 => DiskType::Dynamic,
        4 => DiskType::Differencing,
        other => return Err(f.error(60, format!("unknown disk type {other}"))),
    };
    let data_offset = f.u64_be(16)?;
    // A fixed disk's data offset is all ones (NO_DATA_OFFSET); other values are ignored, as
    // nothing follows the footer of a fixed disk.
    Ok(Footer {
        features: f.u32_be(8)?,
        version,
        data_offset,
        timestamp: f.u32_be(24)?,
        creator_app: f.array(28)?,
        creator_version: f.u32_be(32)?,
        creator_host_os: f.array(36)?,
        original_size: f.u64_be(40)?,
        current_size: f.u64_be(48)?,
        geometry: Geometry {
            cylinders: f.u16_be(56)?,
            heads: f.u8(58)?,
            sectors: f.u8(59)?,
        },
        disk_type,
        checksum: stored,
        unique_id: f.array(FOOTER_UUID_AT)?,
        saved_state: f.u8(84)?,
        integrity,
    })
}

impl Footer {
    /// Which size field is the disk size.
    ///
    /// The spec defines both "current size" and the CHS geometry, and writers disagree about
    /// which one the guest sees:
    ///
    /// * Virtual PC ("vpc ") and Virtual Server ("vs  ") present the disk through an emulated
    ///   ATA BIOS, so the guest sees exactly cylinders × heads × sectors; their current size is
    ///   rounded differently (virtualpc-dynamic.vhd: CHS 136363130880, current 136365211648).
    ///   qemu follows the CHS size for these; so do we.
    /// * Everything else (Hyper-V and Windows "win ", Disk2vhd "d2v\0", qemu "qemu"/"qem2",
    ///   blktap "tap\0", Citrix "CTXS", unknown creators) presents current size
    ///   (hyperv2012r2-dynamic.vhd: 136365211648). qemu-made images ("qemu") store a current
    ///   size equal to their CHS size unless made with `force_size`, which marks them "qem2".
    /// * A geometry at the CHS maximum 65535/16/255 means "too big for CHS": current size,
    ///   whoever wrote it (d2v-zerofilled.vhd: 263454720).
    pub fn size_rule(&self) -> SizeRule {
        if self.geometry == CHS_MAX {
            return SizeRule::CurrentSize;
        }
        match &self.creator_app {
            b"vpc " | b"vs  " => SizeRule::Chs,
            _ => SizeRule::CurrentSize,
        }
    }

    /// The guest-visible size under [`Footer::size_rule`], in whole sectors (a current size
    /// that is not a multiple of 512 is rounded down, as qemu does; `check` reports it).
    pub fn virtual_size(&self) -> u64 {
        match self.size_rule() {
            SizeRule::Chs => self.geometry.size(),
            SizeRule::CurrentSize => self.current_size / SECTOR * SECTOR,
        }
    }

    /// The creator application as text (trailing spaces and NULs removed).
    pub fn creator_app_str(&self) -> String {
        fourcc(&self.creator_app)
    }

    /// The creator host OS as text.
    pub fn creator_host_os_str(&self) -> String {
        fourcc(&self.creator_host_os)
    }
}

/// A four-character code as text, trailing NULs and spaces removed, non-ASCII escaped.
pub fn fourcc(code: &[u8; 4]) -> String {
    let text: String = code
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    text.trim_end_matches("\\x00").trim_end().to_string()
}

/// A GUID as 8-4-4-4-12 hex digits, bytes in stored order (as libvhdi's vhdiinfo prints it).
pub fn format_uuid(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A parent locator's platform code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformCode {
    /// "W2ru": relative Windows path, UTF-16LE.
    W2ru,
    /// "W2ku": absolute Windows path, UTF-16LE.
    W2ku,
    /// "Wi2r": relative Windows path (deprecated), single-byte characters.
    Wi2r,
    /// "Wi2k": absolute Windows path (deprecated), single-byte characters.
    Wi2k,
    /// "Mac ": a Mac OS alias record (not followed).
    Mac,
    /// "MacX": a file URL, UTF-8 (not followed).
    MacX,
    /// Anything else.
    Other([u8; 4]),
}

impl PlatformCode {
    /// Decodes the code field.
    pub fn from_bytes(code: [u8; 4]) -> Self {
        match &code {
            b"W2ru" => PlatformCode::W2ru,
            b"W2ku" => PlatformCode::W2ku,
            b"Wi2r" => PlatformCode::Wi2r,
            b"Wi2k" => PlatformCode::Wi2k,
            b"Mac " => PlatformCode::Mac,
            b"MacX" => PlatformCode::MacX,
            _ => PlatformCode::Other(code),
        }
    }

    /// The code as text.
    pub fn name(self) -> String {
        match self {
            PlatformCode::W2ru => "W2ru".into(),
            PlatformCode::W2ku => "W2ku".into(),
            PlatformCode::Wi2r => "Wi2r".into(),
            PlatformCode::Wi2k => "Wi2k".into(),
            PlatformCode::Mac => "Mac".into(),
            PlatformCode::MacX => "MacX".into(),
            PlatformCode::Other(code) => fourcc(&code),
        }
    }

    /// Decodes a locator's data into a path, for the Windows codes. `None` for codes that are
    /// not followed and for data that does not decode.
    pub fn decode_path(self, data: &[u8]) -> Option<String> {
        let text = match self {
            PlatformCode::W2ru | PlatformCode::W2ku => {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&units).ok()?
            }
            PlatformCode::Wi2r | PlatformCode::Wi2k => String::from_utf8(data.to_vec()).ok()?,
            _ => return None,
        };
        let text = text.trim_end_matches('\0');
        (!text.is_empty() && !text.contains('\0')).then(|| text.to_string())
    }

    /// True for the codes that hold an absolute path.
    pub fn is_absolute(self) -> bool {
        matches!(self, PlatformCode::W2ku | PlatformCode::Wi2k)
    }
}

/// One parent locator entry of the dynamic disk header (all zeros when unused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// Position in the header's table, 0..8.
    pub index: usize,
    /// The platform code.
    pub code: PlatformCode,
    /// Space reserved for the data (sectors per the spec; Windows writes bytes).
    pub data_space: u32,
    /// Length of the data in bytes.
    pub data_length: u32,
    /// Absolute offset of the data in the file.
    pub data_offset: u64,
}

/// The dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Offset of the BAT.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub version: u32,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes of guest data per block (not counting its sector bitmap).
    pub block_size: u32,
    /// The header's checksum.
    pub checksum: u32,
    /// Differencing disks: the parent's footer unique id.
    pub parent_unique_id: [u8; 16],
    /// Differencing disks: the parent's modification time when the child was made.
    pub parent_timestamp: u32,
    /// Differencing disks: the parent's file name (UTF-16BE in the file).
    pub parent_name: String,
    /// The non-empty parent locator entries.
    pub locators: Vec<ParentLocator>,
}

/// Parses the dynamic disk header read from `base`: cookie, checksum, version, block size.
/// The table's size against the disk is checked by [`DynamicHeader::check_table`].
pub fn parse_dynamic_header(buf: &[u8; DYN_HEADER_SIZE], base: u64) -> Result<DynamicHeader> {
    let f = Fields::new(buf, "VHD dynamic header", base);
    if f.slice(0, 8)? != DYN_COOKIE {
        return Err(f.error(0, "no \"cxsparse\" cookie"));
    }
    let stored = f.u32_be(DYN_CHECKSUM_AT)?;
    let computed = checksum(buf, DYN_CHECKSUM_AT);
    if stored != computed {
        return Err(f.error(
            DYN_CHECKSUM_AT,
            format!("checksum {stored:#010x} does not match the header's bytes (expected {computed:#010x})"),
        ));
    }
    let version = f.u32_be(24)?;
    if version >> 16 != 1 {
        return Err(f.error(24, format!("unsupported header version {version:#010x}")));
    }
    let block_size = f.u32_be(32)?;
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(f.error(
            32,
            format!(
                "block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            ),
        ));
    }
    let name_bytes = f.slice(64, 512)?;
    let units: Vec<u16> = name_bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let parent_name = String::from_utf16(&units)
        .map_err(|_| f.error(64, "parent unicode name is not valid UTF-16"))?;
    let mut locators = Vec::new();
    for index in 0..LOCATOR_COUNT {
        let at = 576 + 24 * index;
        let code: [u8; 4] = f.array(at)?;
        if code == [0; 4] {
            continue;
        }
        locators.push(ParentLocator {
            index,
            code: PlatformCode::from_bytes(code),
            data_space: f.u32_be(at + 4)?,
            data_length: f.u32_be(at + 8)?,
            data_offset: f.u64_be(at + 16)?,
        });
    }
    Ok(DynamicHeader {
        table_offset: f.u64_be(16)?,
        version,
        max_table_entries: f.u32_be(28)?,
        block_size,
        checksum: stored,
        parent_unique_id: f.array(40)?,
        parent_timestamp: f.u32_be(56)?,
        parent_name,
        locators,
    })
}

impl DynamicHeader {
    /// Blocks a disk of `disk_size` bytes needs.
    pub fn blocks_needed(&self, disk_size: u64) -> u64 {
        disk_size.div_ceil(u64::from(self.block_size))
    }

    /// Checks that the BAT covers `disk_size` and is not absurdly larger, and that it fits the
    /// caps ([`MAX_TABLE_ENTRIES`], [`MAX_EXTRA_TABLE_ENTRIES`]). `base` is the header's offset.
    pub fn check_table(&self, disk_size: u64, base: u64) -> Result<()> {
        let err =
            |reason: String| Error::corrupt("VHD dynamic header", base.saturating_add(28), reason);
        let entries = u64::from(self.max_table_entries);
        let needed = self.blocks_needed(disk_size);
        if entries < needed {
            return Err(err(format!(
                "max table entries {entries} cover less than the {disk_size}-byte disk ({needed} blocks of {} bytes needed)",
                self.block_size
            )));
        }
        if entries > needed.saturating_add(u64::from(MAX_EXTRA_TABLE_ENTRIES)) {
            return Err(err(format!(
                "max table entries {entries} far exceed the {needed} blocks the {disk_size}-byte disk needs"
            )));
        }
        if self.max_table_entries > MAX_TABLE_ENTRIES {
            return Err(Error::unsupported(format!(
                "VHD block allocation table of {entries} entries (more than {MAX_TABLE_ENTRIES})"
            )));
        }
        Ok(())
    }

    /// Bytes of the sector bitmap in front of each block: one bit per sector, rounded up to
    /// whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / SECTOR)
            .div_ceil(8)
            .div_ceil(SECTOR)
            * SECTOR
    }

    /// The BAT's length in bytes (entries × 4).
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.max_table_entries) * 4
    }
}

/// Turns a parent path recorded by Windows into a path relative to the child's directory:
///
/// * backslashes become slashes, leading `.\` are dropped: `.\base.vhd` → `base.vhd`,
///   `..\x\base.vhd` → `../x/base.vhd` (the registry's directory rule then judges it);
/// * an absolute path (drive letter `C:\...`, rooted `\...`, UNC `\\server\...`) names a
///   location on the machine that made the image, which means nothing here: only its file name
///   is kept, to be looked up beside the child.
///
/// `None` for an empty result.
pub fn parent_path_to_relative(recorded: &str) -> Option<String> {
    let slashed = recorded.replace('\\', "/");
    let bytes = slashed.as_bytes();
    let has_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    let rel = if has_drive || slashed.starts_with('/') {
        slashed.rsplit('/').next().unwrap_or_default().to_string()
    } else {
        let mut rest = slashed.as_str();
        while let Some(stripped) = rest.strip_prefix("./") {
            rest = stripped;
        }
        rest.to_string()
    };
    (!rel.is_empty() && rel != "." && rel != "..").then_some(rel)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A footer with a valid checksum: the qemu-made 102 KiB dynamic disk of dfvfs
    /// (`image.vhd`), with its unique id and checksum fixed up.
    pub(crate) fn footer_bytes(
        disk_type: u32,
        creator: &[u8; 4],
        current: u64,
        chs: (u16, u8, u8),
    ) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(b"conectix"); // cookie
        b[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // version 1.0
        let data_offset = if disk_type == 2 { u64::MAX } else { 512 };
        b[16..24].copy_from_slice(&data_offset.to_be_bytes()); // dynamic header right after
        b[24..28].copy_from_slice(&0x1a39_73eau32.to_be_bytes()); // timestamp
        b[28..32].copy_from_slice(creator); // creator application
        b[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes()); // creator version
        b[36..40].copy_from_slice(b"Wi2k"); // creator host OS
        b[40..48].copy_from_slice(&current.to_be_bytes()); // original size
        b[48..56].copy_from_slice(&current.to_be_bytes()); // current size
        b[56..58].copy_from_slice(&chs.0.to_be_bytes()); // cylinders
        b[58] = chs.1; // heads
        b[59] = chs.2; // sectors per track
        b[60..64].copy_from_slice(&disk_type.to_be_bytes()); // disk type
        b[68..84].copy_from_slice(&[0xd4; 16]); // unique id
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// A dynamic header with a valid checksum: BAT at 0x600, `entries` entries, `block` bytes.
    pub(crate) fn dyn_header_bytes(entries: u32, block: u32) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0..8].copy_from_slice(b"cxsparse"); // cookie
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: unused
        b[16..24].copy_from_slice(&0x600u64.to_be_bytes()); // table offset
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // header version
        b[28..32].copy_from_slice(&entries.to_be_bytes()); // max table entries
        b[32..36].copy_from_slice(&block.to_be_bytes()); // block size
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    #[test]
    fn footer_with_valid_checksum_parses() {
        let f = parse_footer(&footer_bytes(3, b"qemu", 104448, (3, 4, 17)), 0).unwrap();
        assert_eq!(f.disk_type, DiskType::Dynamic);
        assert_eq!(f.virtual_size(), 104448);
        assert_eq!(f.integrity, Integrity::Valid);
        assert_eq!(f.creator_app_str(), "qemu");
    }

    #[test]
    fn footer_with_bad_checksum_is_rejected_naming_the_offset() {
        let mut b = footer_bytes(3, b"qemu", 104448, (3, 4, 17));
        b[60..64].copy_from_slice(&4u32.to_be_bytes()); // type changed after checksumming
        let err = parse_footer(&b, 0x200a00).unwrap_err().to_string();
        assert!(
            err.contains("corrupt VHD footer at offset 0x200a40: checksum"),
            "{err}"
        );
    }

    #[test]
    fn footer_checksummed_before_its_unique_id_was_set_is_tolerated_and_marked() {
        let mut b = footer_bytes(3, b"qemu", 104448, (3, 4, 17));
        b[68..84].fill(0);
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b[68..84].copy_from_slice(&[0x5a; 16]); // id stamped afterwards
        let f = parse_footer(&b, 0).unwrap();
        assert_eq!(f.integrity, Integrity::UniqueIdUnchecked);
    }

    #[test]
    fn unknown_disk_type_is_rejected() {
        let b = footer_bytes(5, b"qemu", 104448, (3, 4, 17));
        assert!(
            parse_footer(&b, 0)
                .unwrap_err()
                .to_string()
                .contains("unknown disk type 5")
        );
    }

    #[test]
    fn size_rule_uses_chs_for_virtual_pc_and_current_size_for_hyper_v() {
        let vpc =
            parse_footer(&footer_bytes(3, b"vpc ", 136365211648, (65278, 16, 255)), 0).unwrap();
        let win =
            parse_footer(&footer_bytes(3, b"win ", 136365211648, (65278, 16, 255)), 0).unwrap();
        assert_eq!(
            (vpc.size_rule(), vpc.virtual_size()),
            (SizeRule::Chs, 136363130880)
        );
        assert_eq!(
            (win.size_rule(), win.virtual_size()),
            (SizeRule::CurrentSize, 136365211648)
        );
    }

    #[test]
    fn size_rule_uses_current_size_when_chs_is_at_its_maximum() {
        let d2v = parse_footer(&footer_bytes(3, b"vpc ", 263454720, (65535, 16, 255)), 0).unwrap();
        assert_eq!(
            (d2v.size_rule(), d2v.virtual_size()),
            (SizeRule::CurrentSize, 263454720)
        );
    }

    #[test]
    fn dynamic_header_parses_and_sizes_its_bitmap() {
        let h = parse_dynamic_header(&dyn_header_bytes(2, 2 << 20), 512).unwrap();
        assert_eq!(
            (h.table_offset, h.max_table_entries, h.block_size),
            (0x600, 2, 2 << 20)
        );
        assert_eq!(h.bitmap_size(), 512);
        assert!(h.check_table(4 << 20, 512).is_ok());
    }

    #[test]
    fn table_of_afl5_size_is_rejected_before_any_allocation() {
        // afl5.img: 34816-byte disk, 512-byte blocks, 1073741825 declared entries.
        let h = parse_dynamic_header(&dyn_header_bytes(1_073_741_825, 512), 512).unwrap();
        let err = h.check_table(34816, 512).unwrap_err().to_string();
        assert!(
            err.contains(
                "corrupt VHD dynamic header at offset 0x21c: max table entries 1073741825"
            ),
            "{err}"
        );
    }

    #[test]
    fn table_too_small_for_the_disk_is_rejected() {
        let h = parse_dynamic_header(&dyn_header_bytes(1, 2 << 20), 512).unwrap();
        assert!(h.check_table(4 << 20, 512).is_err());
    }

    #[test]
    fn block_size_not_a_power_of_two_is_rejected() {
        let err = parse_dynamic_header(&dyn_header_bytes(1, 3 << 20), 512)
            .unwrap_err()
            .to_string();
        assert!(err.contains("block size"), "{err}");
    }

    #[test]
    fn dynamic_header_with_bad_checksum_is_rejected() {
        let mut b = dyn_header_bytes(1, 2 << 20);
        b[40] = 1;
        let err = parse_dynamic_header(&b, 512).unwrap_err().to_string();
        assert!(
            err.contains("corrupt VHD dynamic header at offset 0x224: checksum"),
            "{err}"
        );
    }

    #[test]
    fn windows_parent_paths_become_relative() {
        assert_eq!(
            parent_path_to_relative(r".\fat-parent.vhd").as_deref(),
            Some("fat-parent.vhd")
        );
        assert_eq!(
            parent_path_to_relative(r"C:\Projects\dfvfs\test_data\fat-parent.vhd").as_deref(),
            Some("fat-parent.vhd")
        );
        assert_eq!(
            parent_path_to_relative(r"..\base\p.vhd").as_deref(),
            Some("../base/p.vhd")
        );
        assert_eq!(
            parent_path_to_relative(r"\\server\share\p.vhd").as_deref(),
            Some("p.vhd")
        );
        assert_eq!(
            parent_path_to_relative("image.vhd").as_deref(),
            Some("image.vhd")
        );
        assert_eq!(parent_path_to_relative(r"C:\"), None);
    }

    #[test]
    fn w2ru_locator_data_decodes_as_utf16le() {
        let data: Vec<u8> = r".\p.vhd"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        assert_eq!(
            PlatformCode::W2ru.decode_path(&data).as_deref(),
            Some(r".\p.vhd")
        );
        assert_eq!(PlatformCode::MacX.decode_path(b"file:///x"), None);
    }

    #[test]
    fn uuid_prints_in_stored_byte_order() {
        let id = [
            0xd4, 0x9c, 0x5c, 0x80, 0x35, 0x0a, 0x4a, 0x89, 0x89, 0x8a, 0x5a, 0xd6, 0xd1, 0x0f,
            0x65, 0x78,
        ];
        assert_eq!(format_uuid(&id), "d49c5c80-350a-4a89-898a-5ad6d10f6578");
    }
}
