//! Pure parsers of the VHDX header section and metadata region ([MS-VHDX] 2.2 and 2.6): the file
//! type identifier, the two headers, the two region tables, the metadata table and its items,
//! and the parent locator. They take bytes and the file offset those bytes came from, and return
//! errors that name the structure and the absolute offset (the driver adds the file name).

use crate::bytes::Fields;
use crate::error::{Error, Result};

use super::guid::Guid;

/// 1 MiB: the alignment of regions, the log and payload blocks.
pub const MIB: u64 = 1 << 20;
/// 64 KiB: the size of each structure slot of the header section.
pub const KIB64: u64 = 64 << 10;

/// "vhdxfile": the file type identifier signature at offset 0 ([MS-VHDX] 2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Bytes of the creator field (UTF-16LE, optionally NUL-terminated) after the signature.
pub const CREATOR_LEN: usize = 512;

/// Offsets of the two header copies ([MS-VHDX] 2.2.2).
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes covered by a header's checksum.
pub const HEADER_SIZE: usize = 4096;
/// "head": the header signature.
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";

/// Offsets of the two region table copies ([MS-VHDX] 2.2.3).
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes covered by a region table's checksum.
pub const REGION_TABLE_SIZE: usize = 64 << 10;
/// "regi": the region table signature.
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Cap on region table entries set by the specification.
pub const MAX_REGION_ENTRIES: u32 = 2047;

/// "metadata": the metadata table signature ([MS-VHDX] 2.6.1).
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// Bytes of the metadata table at the start of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 << 10;
/// Cap on metadata table entries set by the specification.
pub const MAX_METADATA_ENTRIES: u16 = 2047;
/// Cap on the bytes of one metadata item we read (the specification caps items at 1 MiB).
pub const MAX_METADATA_ITEM_LEN: u32 = 1 << 20;
/// Cap on the virtual disk size set by the specification (64 TiB).
pub const MAX_VIRTUAL_DISK_SIZE: u64 = 64 << 40;
/// Smallest and largest block sizes ([MS-VHDX] 2.6.2.1).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Cap on the key/value entries of a parent locator.
pub const MAX_LOCATOR_ENTRIES: u16 = 256;

/// The BAT region, 2DC27766-F623-4200-9D64-115E9BFD4A08.
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// The metadata region, 8B7CA206-4790-4B9A-B8FE-575F050F886E.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

/// Metadata item: File Parameters, CAA16737-FA36-4D43-B3B6-33F0AA44E76B.
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata item: Virtual Disk Size, 2FA54224-CD1B-4876-B211-5DBED83BF4B8.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata item: Virtual Disk ID, BECA12AB-B2E6-4523-93EF-C309E000C746.
pub const VIRTUAL_DISK_ID: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata item: Logical Sector Size, 8141BF1D-A96F-4709-BA47-F233A8FAAB5F.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata item: Physical Sector Size, CDA348C7-445D-4471-9CC9-E9885251C556.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Metadata item: Parent Locator, A8D35F2D-B30B-454D-ABF7-D3D84834AB0C.
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// Parent locator type of a VHDX parent, B04AEFB7-D19E-4A81-B789-25B8E9445913.
pub const VHDX_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// CRC-32C of `buf` with the 4-byte checksum field at `at` read as zeros.
pub fn crc32c_with_hole(buf: &[u8], at: usize) -> u32 {
    let (head, rest) = buf.split_at(at.min(buf.len()));
    let tail = rest.get(4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(head);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4][..rest.len().min(4)]);
    crc32c::crc32c_append(crc, tail)
}

/// Verifies the checksum stored at byte 4 of `buf` (header, region table, log entry).
pub fn check_crc(f: &Fields<'_>) -> Result<()> {
    let stored = f.u32_le(4)?;
    let computed = crc32c_with_hole(f.bytes(), 4);
    if stored != computed {
        return Err(f.error(
            4,
            format!("checksum {stored:#010x} does not match the computed {computed:#010x}"),
        ));
    }
    Ok(())
}

/// The creator string of the file type identifier, or an error when the signature is wrong.
pub fn parse_file_identifier(buf: &[u8]) -> Result<String> {
    let f = Fields::new(buf, "file type identifier", 0);
    if f.slice(0, 8)? != FILE_SIGNATURE {
        return Err(f.error(0, "signature is not \"vhdxfile\""));
    }
    Ok(utf16le_string(f.slice(8, CREATOR_LEN)?))
}

pub use crate::bytes::utf16le_string;

/// One header copy ([MS-VHDX] 2.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Where this copy was read.
    pub offset: u64,
    /// The copy with the higher sequence number is current.
    pub sequence_number: u64,
    /// Changes when the file is first opened for writing.
    pub file_write_guid: Guid,
    /// Changes when guest-visible data first changes; children record it as parent_linkage.
    pub data_write_guid: Guid,
    /// Non-zero when the log holds entries to replay.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Bytes of the log, a multiple of 1 MiB.
    pub log_length: u32,
    /// File offset of the log, a multiple of 1 MiB.
    pub log_offset: u64,
}

/// Parses and validates the 4 KiB header copy read at `offset`.
pub fn parse_header(buf: &[u8], offset: u64) -> Result<Header> {
    let f = Fields::new(buf, "header", offset);
    if f.len() != HEADER_SIZE {
        return Err(f.error(0, format!("{} bytes, expected {HEADER_SIZE}", f.len())));
    }
    if f.slice(0, 4)? != HEADER_SIGNATURE {
        return Err(f.error(0, "signature is not \"head\""));
    }
    check_crc(&f)?;
    let h = Header {
        offset,
        sequence_number: f.u64_le(8)?,
        file_write_guid: Guid(f.array(16)?),
        data_write_guid: Guid(f.array(32)?),
        log_guid: Guid(f.array(48)?),
        log_version: f.u16_le(64)?,
        version: f.u16_le(66)?,
        log_length: f.u32_le(68)?,
        log_offset: f.u64_le(72)?,
    };
    if h.version != 1 {
        return Err(f.error(66, format!("version {} (only 1 is defined)", h.version)));
    }
    if h.log_version != 0 {
        return Err(f.error(
            64,
            format!("log version {} (only 0 is defined)", h.log_version),
        ));
    }
    if u64::from(h.log_length) % MIB != 0 {
        return Err(f.error(
            68,
            format!("log length {:#x} is not a multiple of 1 MiB", h.log_length),
        ));
    }
    if !h.log_offset.is_multiple_of(MIB) || (h.log_length != 0 && h.log_offset < MIB) {
        return Err(f.error(
            72,
            format!(
                "log offset {:#x} is not 1 MiB aligned past the header section",
                h.log_offset
            ),
        ));
    }
    Ok(h)
}

/// Chooses the current header from the two copies' parse results: the valid one with the
/// higher sequence number. Both invalid is an error naming both offsets and reasons.
pub fn choose_header(first: Result<Header>, second: Result<Header>) -> Result<Header> {
    match (first, second) {
        (Ok(a), Ok(b)) => Ok(if b.sequence_number > a.sequence_number {
            b
        } else {
            a
        }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(e1), Err(e2)) => Err(Error::corrupt(
            "header",
            HEADER_OFFSETS[0],
            format!(
                "both header copies (at {:#x} and {:#x}) are invalid: {e1}; {e2}",
                HEADER_OFFSETS[0], HEADER_OFFSETS[1]
            ),
        )),
    }
}

/// One region table entry ([MS-VHDX] 2.2.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// What the region is.
    pub guid: Guid,
    /// File offset, 1 MiB aligned.
    pub file_offset: u64,
    /// Length in bytes, a multiple of 1 MiB.
    pub length: u32,
    /// A reader that does not know this region must refuse the file.
    pub required: bool,
}

impl RegionEntry {
    /// End offset, saturating.
    pub fn end(&self) -> u64 {
        self.file_offset.saturating_add(u64::from(self.length))
    }
}

/// Parses and validates the 64 KiB region table copy read at `offset`.
pub fn parse_region_table(buf: &[u8], offset: u64) -> Result<Vec<RegionEntry>> {
    let f = Fields::new(buf, "region table", offset);
    if f.len() != REGION_TABLE_SIZE {
        return Err(f.error(
            0,
            format!("{} bytes, expected {REGION_TABLE_SIZE}", f.len()),
        ));
    }
    if f.slice(0, 4)? != REGION_SIGNATURE {
        return Err(f.error(0, "signature is not \"regi\""));
    }
    check_crc(&f)?;
    let count = f.u32_le(8)?;
    if count > MAX_REGION_ENTRIES {
        return Err(f.error(
            8,
            format!("{count} entries, more than the {MAX_REGION_ENTRIES} allowed"),
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = 16 + i * 32;
        entries.push(RegionEntry {
            guid: Guid(f.array(at)?),
            file_offset: f.u64_le(at + 16)?,
            length: f.u32_le(at + 24)?,
            required: f.u32_le(at + 28)? & 1 != 0,
        });
    }
    Ok(entries)
}

/// The two regions a reader needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    /// The block allocation table.
    pub bat: RegionEntry,
    /// The metadata region.
    pub metadata: RegionEntry,
}

/// Validates the entries of the region table at `table_offset` against a file of `file_len`
/// bytes: known regions found once, unknown required regions refused, every region 1 MiB
/// aligned, inside the file, past the header section, and not overlapping another.
pub fn resolve_regions(
    entries: &[RegionEntry],
    table_offset: u64,
    file_len: u64,
) -> Result<Regions> {
    let mut bat = None;
    let mut metadata = None;
    for (i, e) in entries.iter().enumerate() {
        let at = table_offset + 16 + 32 * i as u64;
        let err = |reason: String| Error::corrupt("region table entry", at, reason);
        if e.guid == BAT_REGION || e.guid == METADATA_REGION {
            let slot = if e.guid == BAT_REGION {
                &mut bat
            } else {
                &mut metadata
            };
            if slot.replace(*e).is_some() {
                return Err(err(format!("region {} listed twice", e.guid)));
            }
        } else if e.required {
            return Err(Error::unsupported(format!(
                "required region {} (region table entry at {at:#x})",
                e.guid
            )));
        }
        if e.file_offset % MIB != 0 || u64::from(e.length) % MIB != 0 || e.length == 0 {
            return Err(err(format!(
                "region {} at {:#x}, {:#x} bytes, is not a non-empty 1 MiB-aligned range",
                e.guid, e.file_offset, e.length
            )));
        }
        if e.file_offset < MIB
            || e.file_offset
                .checked_add(u64::from(e.length))
                .is_none_or(|end| end > file_len)
        {
            return Err(err(format!(
                "region {} [{:#x}, {:#x}) lies outside [0x100000, {file_len:#x}), the file past its header section",
                e.guid,
                e.file_offset,
                e.end()
            )));
        }
        for other in &entries[..i] {
            if e.file_offset < other.end() && other.file_offset < e.end() {
                return Err(err(format!(
                    "region {} overlaps region {}",
                    e.guid, other.guid
                )));
            }
        }
    }
    let missing =
        |what: &str| Error::corrupt("region table", table_offset, format!("no {what} region"));
    Ok(Regions {
        bat: bat.ok_or_else(|| missing("BAT"))?,
        metadata: metadata.ok_or_else(|| missing("metadata"))?,
    })
}

/// One metadata table entry ([MS-VHDX] 2.6.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    /// What the item is.
    pub item_id: Guid,
    /// Offset from the start of the metadata region.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
    /// User metadata (not interpreted here).
    pub is_user: bool,
    /// The item describes the virtual disk (as opposed to this file).
    pub is_virtual_disk: bool,
    /// A reader that does not know the item must refuse the file.
    pub is_required: bool,
}

/// Parses the metadata table read from the start of the metadata region at `region_offset`,
/// checking that every item lies inside a region of `region_len` bytes past the table.
pub fn parse_metadata_table(
    buf: &[u8],
    region_offset: u64,
    region_len: u32,
) -> Result<Vec<MetadataEntry>> {
    let f = Fields::new(buf, "metadata table", region_offset);
    if f.slice(0, 8)? != METADATA_SIGNATURE {
        return Err(f.error(0, "signature is not \"metadata\""));
    }
    let count = f.u16_le(10)?;
    if count > MAX_METADATA_ENTRIES {
        return Err(f.error(
            10,
            format!("{count} entries, more than the {MAX_METADATA_ENTRIES} allowed"),
        ));
    }
    let mut entries: Vec<MetadataEntry> = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let at = 32 + i * 32;
        let flags = f.u32_le(at + 24)?;
        let e = MetadataEntry {
            item_id: Guid(f.array(at)?),
            offset: f.u32_le(at + 16)?,
            length: f.u32_le(at + 20)?,
            is_user: flags & 1 != 0,
            is_virtual_disk: flags & 2 != 0,
            is_required: flags & 4 != 0,
        };
        if e.length != 0 {
            let end = u64::from(e.offset) + u64::from(e.length);
            if u64::from(e.offset) < METADATA_TABLE_SIZE as u64 || end > u64::from(region_len) {
                return Err(f.error(
                    at + 16,
                    format!(
                        "item {} at [{:#x}, {end:#x}) of the region lies outside [0x10000, {region_len:#x})",
                        e.item_id, e.offset
                    ),
                ));
            }
        }
        if e.length > MAX_METADATA_ITEM_LEN {
            return Err(f.error(
                at + 20,
                format!("item {} is {} bytes, more than 1 MiB", e.item_id, e.length),
            ));
        }
        if !e.is_user && entries.iter().any(|p| !p.is_user && p.item_id == e.item_id) {
            return Err(f.error(at, format!("item {} listed twice", e.item_id)));
        }
        entries.push(e);
    }
    Ok(entries)
}

/// True for the system metadata items this reader understands.
pub fn is_known_item(id: &Guid) -> bool {
    [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        VIRTUAL_DISK_ID,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ]
    .contains(id)
}

/// The File Parameters item ([MS-VHDX] 2.6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileParameters {
    /// Bytes per payload block, a power of two in 1 MiB..=256 MiB.
    pub block_size: u32,
    /// Blocks are allocated up front and never freed (a fixed disk).
    pub leave_blocks_allocated: bool,
    /// The disk is a differencing disk.
    pub has_parent: bool,
}

/// Parses the File Parameters item read at `offset`.
pub fn parse_file_parameters(buf: &[u8], offset: u64) -> Result<FileParameters> {
    let f = Fields::new(buf, "file parameters metadata", offset);
    let block_size = f.u32_le(0)?;
    let flags = f.u32_le(4)?;
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(f.error(
            0,
            format!("block size {block_size:#x} is not a power of two in 1 MiB..=256 MiB"),
        ));
    }
    Ok(FileParameters {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent: flags & 2 != 0,
    })
}

/// Parses the Virtual Disk Size item read at `offset`.
pub fn parse_virtual_disk_size(buf: &[u8], offset: u64, logical_sector_size: u32) -> Result<u64> {
    let f = Fields::new(buf, "virtual disk size metadata", offset);
    let size = f.u64_le(0)?;
    if size == 0 || size > MAX_VIRTUAL_DISK_SIZE || size % u64::from(logical_sector_size) != 0 {
        return Err(f.error(
            0,
            format!("virtual disk size {size:#x} is not a non-zero multiple of the {logical_sector_size}-byte sector up to 64 TiB"),
        ));
    }
    Ok(size)
}

/// Parses a sector size item (logical or physical) read at `offset`: 512 or 4096.
pub fn parse_sector_size(buf: &[u8], offset: u64, structure: &'static str) -> Result<u32> {
    let f = Fields::new(buf, structure, offset);
    let size = f.u32_le(0)?;
    if size != 512 && size != 4096 {
        return Err(f.error(
            0,
            format!("sector size {size} (only 512 and 4096 are defined)"),
        ));
    }
    Ok(size)
}

/// The parent locator item ([MS-VHDX] 2.6.2.6): a type and key/value pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// The locator type; [`VHDX_LOCATOR_TYPE`] for a VHDX parent.
    pub locator_type: Guid,
    /// Key/value pairs, decoded from UTF-16LE, in file order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the parent locator item (all of its bytes) read at `offset`.
pub fn parse_parent_locator(buf: &[u8], offset: u64) -> Result<ParentLocator> {
    let f = Fields::new(buf, "parent locator metadata", offset);
    let locator_type = Guid(f.array(0)?);
    let count = f.u16_le(18)?;
    if count > MAX_LOCATOR_ENTRIES {
        return Err(f.error(
            18,
            format!("{count} key/value entries, more than the {MAX_LOCATOR_ENTRIES} accepted"),
        ));
    }
    let mut entries = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let at = 20 + i * 12;
        let key_offset = f.u32_le(at)? as usize;
        let value_offset = f.u32_le(at + 4)? as usize;
        let key_len = usize::from(f.u16_le(at + 8)?);
        let value_len = usize::from(f.u16_le(at + 10)?);
        if key_len == 0 || value_len == 0 || key_len % 2 != 0 || value_len % 2 != 0 {
            return Err(f.error(at, "key and value must be non-empty UTF-16 strings"));
        }
        let key = utf16le_string(f.slice(key_offset, key_len)?);
        let value = utf16le_string(f.slice(value_offset, value_len)?);
        if entries.iter().any(|(k, _)| *k == key) {
            return Err(f.error(at, format!("key {key:?} listed twice")));
        }
        entries.push((key, value));
    }
    Ok(ParentLocator {
        locator_type,
        entries,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid header copy: signature, sequence number 5, data write GUID 0x11.., log GUID
    /// `log`, log version 0, version 1, a 1 MiB log at 1 MiB; checksum filled in.
    pub(crate) fn header_bytes(seq: u64, log: Guid) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head"); // signature
        b[8..16].copy_from_slice(&seq.to_le_bytes()); // sequence number
        b[16..32].fill(0x22); // file write GUID
        b[32..48].fill(0x11); // data write GUID
        b[48..64].copy_from_slice(&log.0); // log GUID
        b[64..66].copy_from_slice(&0u16.to_le_bytes()); // log version
        b[66..68].copy_from_slice(&1u16.to_le_bytes()); // version
        b[68..72].copy_from_slice(&(1u32 << 20).to_le_bytes()); // log length
        b[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes()); // log offset
        let crc = crc32c_with_hole(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes()); // checksum
        b
    }

    #[test]
    fn valid_header_parses() {
        let h = parse_header(&header_bytes(5, Guid::ZERO), 0x10000).unwrap();
        assert_eq!(h.sequence_number, 5);
        assert_eq!(h.data_write_guid, Guid([0x11; 16]));
        assert_eq!((h.log_offset, h.log_length), (1 << 20, 1 << 20));
    }

    #[test]
    fn header_with_bad_checksum_is_refused_naming_the_offset() {
        let mut b = header_bytes(5, Guid::ZERO);
        b[100] ^= 1;
        let err = parse_header(&b, 0x20000).unwrap_err().to_string();
        assert!(err.contains("corrupt header at offset 0x20004"), "{err}");
    }

    #[test]
    fn newer_valid_header_wins_and_a_bad_copy_is_skipped() {
        let a = parse_header(&header_bytes(5, Guid::ZERO), HEADER_OFFSETS[0]);
        let b = parse_header(&header_bytes(6, Guid::ZERO), HEADER_OFFSETS[1]);
        assert_eq!(choose_header(a, b).unwrap().sequence_number, 6);
        let a = parse_header(&header_bytes(5, Guid::ZERO), HEADER_OFFSETS[0]);
        let bad = parse_header(&[0u8; HEADER_SIZE], HEADER_OFFSETS[1]);
        assert_eq!(choose_header(a, bad).unwrap().sequence_number, 5);
    }

    #[test]
    fn both_headers_invalid_names_both_offsets() {
        let a = parse_header(&[0u8; HEADER_SIZE], HEADER_OFFSETS[0]);
        let b = parse_header(&[0u8; HEADER_SIZE], HEADER_OFFSETS[1]);
        let err = choose_header(a, b).unwrap_err().to_string();
        assert!(err.contains("0x10000") && err.contains("0x20000"), "{err}");
    }

    fn region_table(entries: &[(Guid, u64, u32, bool)]) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[0..4].copy_from_slice(b"regi"); // signature
        b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes()); // entry count
        for (i, (g, off, len, req)) in entries.iter().enumerate() {
            let at = 16 + 32 * i;
            b[at..at + 16].copy_from_slice(&g.0); // region GUID
            b[at + 16..at + 24].copy_from_slice(&off.to_le_bytes()); // file offset
            b[at + 24..at + 28].copy_from_slice(&len.to_le_bytes()); // length
            b[at + 28..at + 32].copy_from_slice(&u32::from(*req).to_le_bytes()); // required
        }
        let crc = crc32c_with_hole(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn region_table_yields_bat_and_metadata() {
        let t = region_table(&[
            (BAT_REGION, 2 << 20, 1 << 20, true),
            (METADATA_REGION, 3 << 20, 1 << 20, true),
        ]);
        let entries = parse_region_table(&t, 0x30000).unwrap();
        let r = resolve_regions(&entries, 0x30000, 8 << 20).unwrap();
        assert_eq!(r.bat.file_offset, 2 << 20);
        assert_eq!(r.metadata.file_offset, 3 << 20);
    }

    #[test]
    fn unknown_required_region_is_unsupported() {
        let other = Guid([7; 16]);
        let t = region_table(&[
            (BAT_REGION, 2 << 20, 1 << 20, true),
            (METADATA_REGION, 3 << 20, 1 << 20, true),
            (other, 4 << 20, 1 << 20, true),
        ]);
        let entries = parse_region_table(&t, 0x30000).unwrap();
        let err = resolve_regions(&entries, 0x30000, 8 << 20).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }

    #[test]
    fn overlapping_or_outside_regions_are_refused() {
        let t = region_table(&[
            (BAT_REGION, 2 << 20, 2 << 20, true),
            (METADATA_REGION, 3 << 20, 1 << 20, true),
        ]);
        let entries = parse_region_table(&t, 0x30000).unwrap();
        assert!(
            resolve_regions(&entries, 0x30000, 8 << 20)
                .unwrap_err()
                .to_string()
                .contains("overlaps")
        );
        let t = region_table(&[
            (BAT_REGION, 2 << 20, 1 << 20, true),
            (METADATA_REGION, 9 << 20, 1 << 20, true),
        ]);
        let entries = parse_region_table(&t, 0x30000).unwrap();
        assert!(
            resolve_regions(&entries, 0x30000, 8 << 20)
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
    }

    #[test]
    fn region_table_with_too_many_entries_is_refused() {
        let mut t = region_table(&[]);
        t[8..12].copy_from_slice(&4000u32.to_le_bytes());
        let crc = crc32c_with_hole(&t, 4);
        t[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(
            parse_region_table(&t, 0x30000)
                .unwrap_err()
                .to_string()
                .contains("4000 entries")
        );
    }

    #[test]
    fn block_size_must_be_a_power_of_two_in_range() {
        let ok = [0, 0, 0x20, 0, 1, 0, 0, 0]; // 2 MiB, LeaveBlocksAllocated
        let p = parse_file_parameters(&ok, 0).unwrap();
        assert_eq!(
            (p.block_size, p.leave_blocks_allocated, p.has_parent),
            (2 << 20, true, false)
        );
        assert!(parse_file_parameters(&[0, 0, 0x30, 0, 0, 0, 0, 0], 0).is_err()); // 3 MiB
        assert!(parse_file_parameters(&[0, 0, 0, 0x20, 0, 0, 0, 0], 0).is_err()); // 512 MiB
    }

    #[test]
    fn parent_locator_decodes_utf16_pairs() {
        fn utf16(s: &str) -> Vec<u8> {
            s.encode_utf16().flat_map(u16::to_le_bytes).collect()
        }
        let key = utf16("relative_path");
        let value = utf16(".\\base.vhdx");
        let mut b = Vec::new();
        b.extend_from_slice(&VHDX_LOCATOR_TYPE.0); // locator type
        b.extend_from_slice(&0u16.to_le_bytes()); // reserved
        b.extend_from_slice(&1u16.to_le_bytes()); // key/value count
        b.extend_from_slice(&32u32.to_le_bytes()); // key offset
        b.extend_from_slice(&(32 + key.len() as u32).to_le_bytes()); // value offset
        b.extend_from_slice(&(key.len() as u16).to_le_bytes()); // key length
        b.extend_from_slice(&(value.len() as u16).to_le_bytes()); // value length
        b.extend_from_slice(&key);
        b.extend_from_slice(&value);
        let loc = parse_parent_locator(&b, 0).unwrap();
        assert_eq!(loc.locator_type, VHDX_LOCATOR_TYPE);
        assert_eq!(loc.get("relative_path"), Some(".\\base.vhdx"));
    }

    #[test]
    fn metadata_item_outside_the_region_is_refused() {
        let mut b = vec![0u8; METADATA_TABLE_SIZE];
        b[0..8].copy_from_slice(b"metadata"); // signature
        b[10..12].copy_from_slice(&1u16.to_le_bytes()); // entry count
        b[32..48].copy_from_slice(&FILE_PARAMETERS.0); // item id
        b[48..52].copy_from_slice(&(0x10_0000u32 - 4).to_le_bytes()); // offset
        b[52..56].copy_from_slice(&8u32.to_le_bytes()); // length
        let err = parse_metadata_table(&b, 3 << 20, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside"), "{err}");
    }
}
