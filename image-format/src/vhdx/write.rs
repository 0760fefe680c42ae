//! Writing new VHDX images: dynamic and fixed disks ([MS-VHDX] v1).
//!
//! # Layout of a new file
//!
//! ```text
//! 0      64K     128K    192K     256K       1M         1M+log    +BAT          +1M
//! | ident | head1 | head2 | region1 | region2 | log (holes) | BAT      | metadata | blocks...
//! ```
//!
//! * The log is empty (log GUID zero) and left as a hole: a reader ignores its bytes.
//! * The BAT region is sized for every payload entry plus the sector bitmap entries between
//!   them, rounded up to 1 MiB; only the entries themselves are written.
//! * The metadata region (1 MiB) holds the table and the five items a non-differencing disk
//!   needs, all marked IsRequired; those that describe the virtual disk (size, disk id, sector
//!   sizes) also IsVirtualDisk.
//! * Both region table entries carry the Required flag, as Hyper-V writes them.
//!
//! # Payload blocks
//!
//! * dynamic: a block gets its file offset (appended, block-size multiples past the regions, so
//!   1 MiB aligned) under a short mutex the first time a commit touches it; the bytes are
//!   written outside the lock. Parts of an allocated block nobody writes stay holes of the sparse
//!   file and read as zeros. Untouched blocks stay `PAYLOAD_BLOCK_NOT_PRESENT`: what Hyper-V
//!   writes for a new dynamic disk, read as zeros by every reader (qemu included), and reported
//!   unallocated by ours. (qemu-img marks them `PAYLOAD_BLOCK_ZERO` by default instead, its
//!   `block_state_zero` option; either reads as zeros.)
//! * fixed: every block lies at its place in one contiguous, sparse run after the regions,
//!   `PAYLOAD_BLOCK_FULLY_PRESENT`, with LeaveBlocksAllocated set.
//!
//! The engine gets a 4 KiB cluster (the largest logical sector), so zero runs inside a block are
//! skipped and stay holes: a block costs host space only where the guest has data.
//!
//! # Finishing
//!
//! [`ImageWriter::finish`] sets the file length to the end of the last block, writes the BAT,
//! the metadata region, the file type identifier and both region tables, syncs, writes the two
//! headers last (distinct sequence numbers, the one at 128 KiB current), and renames the
//! temporary file into place. A writer dropped before that leaves no file.
//!
//! # Options (`-o`)
//!
//! `subformat` = `dynamic` (default) | `fixed`; `block_size` (power of two, 1M..=256M, default
//! 32M as Hyper-V; qemu-img instead picks 8M..64M by disk size); `logical_sector_size` = 512
//! (default) | 4096; `physical_sector_size` = 512 | 4096 (default 4096, as Hyper-V; qemu-img
//! writes 512); `log_size` (a multiple of 1M, 1M..=64M, default 1M). A disk size that is not a
//! multiple of the logical sector is rounded up to one.

use std::path::Path;
use std::sync::Mutex;

use crate::create::{CreateOptions, ImageWriter, Prepared, TempOutput, WriteOrder};
use crate::error::{Error, Result};

use super::bat::{self, Geometry};
use super::guid::Guid;
use super::header::{self, FileParameters, Header, MIB, MetadataEntry, RegionEntry};

/// Default block size: what Hyper-V uses for new dynamic disks.
pub const DEFAULT_BLOCK_SIZE: u64 = 32 << 20;
/// Default log size (the smallest the specification allows).
pub const DEFAULT_LOG_SIZE: u64 = 1 << 20;
/// Default physical sector size: what Hyper-V records.
pub const DEFAULT_PHYSICAL_SECTOR_SIZE: u64 = 4096;
/// Bytes of the metadata region we write.
pub const METADATA_REGION_LEN: u64 = 1 << 20;
/// The engine's unit: the largest logical sector, and the host file system's block.
const CLUSTER: u64 = 4096;

/// Sequence number of the header copy at 64 KiB; the copy at 128 KiB gets the next one and is
/// current.
pub const FIRST_SEQUENCE_NUMBER: u64 = 1;

/// The file type identifier (signature and creator), [`header::CREATOR_LEN`] + 8 bytes.
pub fn encode_file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 8 + header::CREATOR_LEN];
    b[..8].copy_from_slice(header::FILE_SIGNATURE);
    let units: Vec<u8> = creator
        .encode_utf16()
        .take(header::CREATOR_LEN / 2 - 1) // keep a NUL terminator
        .flat_map(u16::to_le_bytes)
        .collect();
    b[8..8 + units.len()].copy_from_slice(&units);
    b
}

/// Stores `crc32c_with_hole(buf, 4)` at byte 4.
fn seal(buf: &mut [u8]) {
    let crc = header::crc32c_with_hole(buf, 4);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// A 4 KiB header copy, checksum filled in (`h.offset` is not stored).
pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; header::HEADER_SIZE];
    b[0..4].copy_from_slice(header::HEADER_SIGNATURE);
    b[8..16].copy_from_slice(&h.sequence_number.to_le_bytes());
    b[16..32].copy_from_slice(&h.file_write_guid.0);
    b[32..48].copy_from_slice(&h.data_write_guid.0);
    b[48..64].copy_from_slice(&h.log_guid.0);
    b[64..66].copy_from_slice(&h.log_version.to_le_bytes());
    b[66..68].copy_from_slice(&h.version.to_le_bytes());
    b[68..72].copy_from_slice(&h.log_length.to_le_bytes());
    b[72..80].copy_from_slice(&h.log_offset.to_le_bytes());
    seal(&mut b);
    b
}

/// A 64 KiB region table copy, checksum filled in. At most [`header::MAX_REGION_ENTRIES`]
/// entries are stored.
pub fn encode_region_table(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; header::REGION_TABLE_SIZE];
    b[0..4].copy_from_slice(header::REGION_SIGNATURE);
    let n = entries.len().min(header::MAX_REGION_ENTRIES as usize);
    b[8..12].copy_from_slice(&(n as u32).to_le_bytes());
    for (i, e) in entries.iter().take(n).enumerate() {
        let at = 16 + 32 * i;
        b[at..at + 16].copy_from_slice(&e.guid.0);
        b[at + 16..at + 24].copy_from_slice(&e.file_offset.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&e.length.to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&u32::from(e.required).to_le_bytes());
    }
    seal(&mut b);
    b
}

/// The 64 KiB metadata table. At most [`header::MAX_METADATA_ENTRIES`] entries are stored.
pub fn encode_metadata_table(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; header::METADATA_TABLE_SIZE];
    b[0..8].copy_from_slice(header::METADATA_SIGNATURE);
    let n = entries.len().min(usize::from(header::MAX_METADATA_ENTRIES));
    b[10..12].copy_from_slice(&(n as u16).to_le_bytes());
    for (i, e) in entries.iter().take(n).enumerate() {
        let at = 32 + 32 * i;
        let flags = u32::from(e.is_user)
            | (u32::from(e.is_virtual_disk) << 1)
            | (u32::from(e.is_required) << 2);
        b[at..at + 16].copy_from_slice(&e.item_id.0);
        b[at + 16..at + 20].copy_from_slice(&e.offset.to_le_bytes());
        b[at + 20..at + 24].copy_from_slice(&e.length.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
    }
    b
}

/// The File Parameters item.
pub fn encode_file_parameters(p: &FileParameters) -> [u8; 8] {
    let flags = u32::from(p.leave_blocks_allocated) | (u32::from(p.has_parent) << 1);
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&p.block_size.to_le_bytes());
    b[4..].copy_from_slice(&flags.to_le_bytes());
    b
}

/// A BAT entry: `state` in bits 0-2, the 1 MiB-aligned `file_offset` in bits 20-63.
pub fn bat_entry(state: u8, file_offset: u64) -> u64 {
    (file_offset & !0xF_FFFF) | u64::from(state & 7)
}

/// The BAT entries as stored (little-endian, in order).
pub fn encode_bat(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Where the new file's pieces go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The log: right after the 1 MiB header section.
    pub log_offset: u64,
    /// Its length.
    pub log_length: u32,
    /// The BAT region, after the log.
    pub bat: RegionEntry,
    /// The metadata region, after the BAT.
    pub metadata: RegionEntry,
    /// First payload block, after the metadata region.
    pub payload_offset: u64,
}

impl Layout {
    /// The layout of a disk of geometry `geo` with a log of `log_length` bytes (a multiple of
    /// 1 MiB). Errors when the BAT would exceed what a reader loads.
    pub fn new(geo: &Geometry, log_length: u32) -> Result<Self> {
        let entries = geo.total_entries();
        if entries > bat::MAX_BAT_ENTRIES {
            return Err(Error::unsupported(format!(
                "a disk of {} bytes in {}-byte blocks needs {entries} BAT entries, more than the {} a reader loads: use a larger block_size",
                geo.virtual_size,
                geo.block_size,
                bat::MAX_BAT_ENTRIES
            )));
        }
        // At most 32 Mi entries: 256 MiB, which fits a region length.
        let bat_len = (entries * 8).div_ceil(MIB) * MIB;
        let log_offset = MIB;
        let bat_offset = log_offset + u64::from(log_length);
        let metadata_offset = bat_offset + bat_len;
        Ok(Layout {
            log_offset,
            log_length,
            bat: RegionEntry {
                guid: header::BAT_REGION,
                file_offset: bat_offset,
                length: bat_len as u32,
                required: true,
            },
            metadata: RegionEntry {
                guid: header::METADATA_REGION,
                file_offset: metadata_offset,
                length: METADATA_REGION_LEN as u32,
                required: true,
            },
            payload_offset: metadata_offset + METADATA_REGION_LEN,
        })
    }
}

/// The metadata region's bytes up to its last item (the rest of the 1 MiB reads as zeros):
/// the table, then the items from 64 KiB on.
pub fn encode_metadata_region(
    params: &FileParameters,
    virtual_size: u64,
    disk_id: Guid,
    logical_sector_size: u32,
    physical_sector_size: u32,
) -> Vec<u8> {
    let mut items: Vec<(Guid, bool, Vec<u8>)> = vec![
        (
            header::FILE_PARAMETERS,
            false,
            encode_file_parameters(params).to_vec(),
        ),
        (
            header::VIRTUAL_DISK_SIZE,
            true,
            virtual_size.to_le_bytes().to_vec(),
        ),
        (header::VIRTUAL_DISK_ID, true, disk_id.0.to_vec()),
        (
            header::LOGICAL_SECTOR_SIZE,
            true,
            logical_sector_size.to_le_bytes().to_vec(),
        ),
        (
            header::PHYSICAL_SECTOR_SIZE,
            true,
            physical_sector_size.to_le_bytes().to_vec(),
        ),
    ];
    let mut entries = Vec::with_capacity(items.len());
    let mut data = Vec::new();
    for (id, virtual_disk, bytes) in &mut items {
        entries.push(MetadataEntry {
            item_id: *id,
            offset: (header::METADATA_TABLE_SIZE + data.len()) as u32,
            length: bytes.len() as u32,
            is_user: false,
            is_virtual_disk: *virtual_disk,
            is_required: true,
        });
        data.append(bytes);
    }
    let mut region = encode_metadata_table(&entries);
    region.extend_from_slice(&data);
    region
}

/// A random (version 4) GUID from the system's random source.
pub fn random_guid() -> Result<Guid> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|source| Error::Io {
            path: "/dev/urandom".into(),
            op: "read",
            offset: 0,
            source,
        })?;
    // Data3 is stored little-endian: its high byte (the version) is byte 7.
    b[7] = (b[7] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    Ok(Guid(b))
}

/// The options of a new VHDX image, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VhdxOptions {
    /// All blocks allocated up front.
    pub fixed: bool,
    /// Bytes per payload block.
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Bytes of the log.
    pub log_size: u32,
}

impl VhdxOptions {
    /// Reads and validates `-o`, rejecting unknown keys.
    pub fn parse(options: &CreateOptions) -> Result<Self> {
        let mut r = options.reader("vhdx");
        let fixed = r.choice("subformat", &["dynamic", "fixed"])?.as_deref() == Some("fixed");
        let block_size = r.size("block_size")?.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !block_size.is_power_of_two()
            || !(u64::from(header::MIN_BLOCK_SIZE)..=u64::from(header::MAX_BLOCK_SIZE))
                .contains(&block_size)
        {
            return Err(r.bad(
                "block_size",
                &block_size.to_string(),
                "a power of two from 1M to 256M",
            ));
        }
        let mut sector = |key: &str, default: u64| -> Result<u32> {
            match r.size(key)?.unwrap_or(default) {
                512 => Ok(512),
                4096 => Ok(4096),
                other => Err(r.bad(key, &other.to_string(), "512 or 4096")),
            }
        };
        let logical_sector_size = sector("logical_sector_size", 512)?;
        let physical_sector_size = sector("physical_sector_size", DEFAULT_PHYSICAL_SECTOR_SIZE)?;
        let log_size = r.size("log_size")?.unwrap_or(DEFAULT_LOG_SIZE);
        if log_size == 0
            || !log_size.is_multiple_of(MIB)
            || log_size > u64::from(super::log::MAX_LOG_LENGTH)
        {
            return Err(r.bad(
                "log_size",
                &log_size.to_string(),
                "a multiple of 1M from 1M to 64M",
            ));
        }
        r.finish()?;
        Ok(VhdxOptions {
            fixed,
            block_size: block_size as u32,
            logical_sector_size,
            physical_sector_size,
            log_size: log_size as u32,
        })
    }
}

/// Creates the writer of a new VHDX image at `path`.
pub fn create(path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    let opts = VhdxOptions::parse(options).map_err(|e| e.in_file(path))?;
    if options.backing.is_some() {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "writing a differencing VHDX (a backing file)".into(),
        });
    }
    if options.compress {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "compression (VHDX has none)".into(),
        });
    }
    let sector = u64::from(opts.logical_sector_size);
    let size = options
        .size
        .checked_next_multiple_of(sector)
        .filter(|s| *s > 0 && *s <= header::MAX_VIRTUAL_DISK_SIZE)
        .ok_or_else(|| Error::InvalidArgument {
            path: path.to_path_buf(),
            reason: format!(
                "a VHDX disk holds 1 byte to 64 TiB, not {} bytes",
                options.size
            ),
        })?;
    let geo = Geometry::new(opts.block_size, opts.logical_sector_size, size, false)
        .map_err(|e| e.in_file(path))?;
    let layout = Layout::new(&geo, opts.log_size).map_err(|e| e.in_file(path))?;
    let total = geo.total_entries() as usize;
    let mut entries = vec![0u64; total];
    let mut next = layout.payload_offset;
    let out = TempOutput::create_with(path, !options.no_sync)?;
    if opts.fixed {
        for block in 0..geo.data_blocks {
            let host = block
                .checked_mul(geo.block_size)
                .and_then(|o| o.checked_add(layout.payload_offset))
                .ok_or_else(|| Error::InvalidArgument {
                    path: path.to_path_buf(),
                    reason: "the disk is too large for a file offset".into(),
                })?;
            entries[geo.payload_index(block) as usize] =
                bat_entry(bat::PAYLOAD_BLOCK_FULLY_PRESENT, host);
        }
        next = layout.payload_offset + geo.data_blocks * geo.block_size;
        out.set_len(next)?;
    }
    Ok(Box::new(VhdxWriter {
        out,
        geo,
        layout,
        opts,
        disk_id: random_guid()?,
        file_write_guid: random_guid()?,
        data_write_guid: random_guid()?,
        alloc: Mutex::new(Alloc { entries, next }),
    }))
}

/// The BAT being built and the end of the allocated blocks.
#[derive(Debug)]
struct Alloc {
    entries: Vec<u64>,
    next: u64,
}

/// Writes a new VHDX image; see the module documentation.
#[derive(Debug)]
pub struct VhdxWriter {
    out: TempOutput,
    geo: Geometry,
    layout: Layout,
    opts: VhdxOptions,
    disk_id: Guid,
    file_write_guid: Guid,
    data_write_guid: Guid,
    alloc: Mutex<Alloc>,
}

impl VhdxWriter {
    /// The file offset of payload block `block`, allocating it on first use.
    fn block_host(&self, block: u64) -> Result<u64> {
        let index = self.geo.payload_index(block) as usize;
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let entry = *a.entries.get(index).ok_or_else(|| Error::OutOfRange {
            offset: block.saturating_mul(self.geo.block_size),
            len: 1,
            size: self.geo.virtual_size,
        })?;
        if bat::state(entry) == bat::PAYLOAD_BLOCK_FULLY_PRESENT {
            return Ok(bat::file_offset(entry));
        }
        let host = a.next;
        a.next = host
            .checked_add(self.geo.block_size)
            .ok_or_else(|| Error::InvalidArgument {
                path: self.out.dest().to_path_buf(),
                reason: "the file would pass the largest offset".into(),
            })?;
        a.entries[index] = bat_entry(bat::PAYLOAD_BLOCK_FULLY_PRESENT, host);
        Ok(host)
    }

    fn header(&self, sequence_number: u64, offset: u64) -> Header {
        Header {
            offset,
            sequence_number,
            file_write_guid: self.file_write_guid,
            data_write_guid: self.data_write_guid,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: self.layout.log_length,
            log_offset: self.layout.log_offset,
        }
    }
}

impl ImageWriter for VhdxWriter {
    fn size(&self) -> u64 {
        self.geo.virtual_size
    }

    fn cluster_size(&self) -> u64 {
        CLUSTER
    }

    fn order(&self) -> WriteOrder {
        WriteOrder::Any
    }

    fn commit(&self, prepared: Prepared) -> Result<()> {
        let mut off = prepared.off;
        for unit in &prepared.units {
            let len = unit.bytes.len() as u64;
            if off
                .checked_add(len)
                .is_none_or(|end| end > self.geo.virtual_size)
            {
                return Err(Error::OutOfRange {
                    offset: off,
                    len,
                    size: self.geo.virtual_size,
                });
            }
            let mut rest: &[u8] = &unit.bytes;
            while !rest.is_empty() {
                let within = off % self.geo.block_size;
                let n = (self.geo.block_size - within).min(rest.len() as u64) as usize;
                let host = self.block_host(off / self.geo.block_size)?;
                self.out.file().write_all_at(&rest[..n], host + within)?;
                rest = &rest[n..];
                off += n as u64;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, _off: u64, _len: u64) -> Result<()> {
        // Never backed (no differencing disks are written) and every block of a new file reads
        // as zeros until written: not present, or a hole of the sparse file.
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let alloc = std::mem::replace(
            &mut *self.alloc.lock().unwrap_or_else(|e| e.into_inner()),
            Alloc {
                entries: Vec::new(),
                next: 0,
            },
        );
        // Cover every allocated block whole (qemu-img check wants each block inside the file).
        self.out.set_len(alloc.next)?;
        let file = self.out.file();
        file.write_all_at(&encode_bat(&alloc.entries), self.layout.bat.file_offset)?;
        let params = FileParameters {
            block_size: self.opts.block_size,
            leave_blocks_allocated: self.opts.fixed,
            has_parent: false,
        };
        let md = encode_metadata_region(
            &params,
            self.geo.virtual_size,
            self.disk_id,
            self.opts.logical_sector_size,
            self.opts.physical_sector_size,
        );
        file.write_all_at(&md, self.layout.metadata.file_offset)?;
        let creator = format!("vmnest {}", env!("CARGO_PKG_VERSION"));
        file.write_all_at(&encode_file_identifier(&creator), 0)?;
        let table = encode_region_table(&[self.layout.bat, self.layout.metadata]);
        for off in header::REGION_TABLE_OFFSETS {
            file.write_all_at(&table, off)?;
        }
        // Everything the headers point at is durable before the headers are written.
        self.out.sync_if_durable()?;
        for (i, off) in header::HEADER_OFFSETS.into_iter().enumerate() {
            let h = self.header(FIRST_SEQUENCE_NUMBER + i as u64, off);
            file.write_all_at(&encode_header(&h), off)?;
        }
        self.out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header(seq: u64) -> Header {
        Header {
            offset: header::HEADER_OFFSETS[1],
            sequence_number: seq,
            file_write_guid: Guid([0x22; 16]),
            data_write_guid: Guid([0x33; 16]),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: 4 << 20,
            log_offset: 1 << 20,
        }
    }

    #[test]
    fn header_round_trips_through_the_parser() {
        let h = sample_header(7);
        assert_eq!(
            header::parse_header(&encode_header(&h), h.offset).unwrap(),
            h
        );
    }

    #[test]
    fn the_higher_sequence_number_is_current() {
        let a = sample_header(1);
        let b = sample_header(2);
        let pa = header::parse_header(&encode_header(&a), header::HEADER_OFFSETS[0]);
        let pb = header::parse_header(&encode_header(&b), header::HEADER_OFFSETS[1]);
        assert_eq!(header::choose_header(pa, pb).unwrap().sequence_number, 2);
    }

    #[test]
    fn file_identifier_round_trips_the_creator() {
        let b = encode_file_identifier("vmnest 0.1.0");
        assert_eq!(header::parse_file_identifier(&b).unwrap(), "vmnest 0.1.0");
        let long = "x".repeat(1000);
        let b = encode_file_identifier(&long);
        assert_eq!(b.len(), 8 + header::CREATOR_LEN);
        assert_eq!(header::parse_file_identifier(&b).unwrap().len(), 255);
    }

    #[test]
    fn region_table_round_trips_with_required_flags() {
        let geo = Geometry::new(32 << 20, 512, 10 << 30, false).unwrap();
        let layout = Layout::new(&geo, 1 << 20).unwrap();
        let t = encode_region_table(&[layout.bat, layout.metadata]);
        let entries = header::parse_region_table(&t, header::REGION_TABLE_OFFSETS[0]).unwrap();
        assert_eq!(entries, vec![layout.bat, layout.metadata]);
        assert!(entries.iter().all(|e| e.required));
        let r = header::resolve_regions(&entries, 0x30000, layout.payload_offset).unwrap();
        assert_eq!((r.bat, r.metadata), (layout.bat, layout.metadata));
    }

    #[test]
    fn metadata_region_round_trips_every_item_with_its_flags() {
        let params = FileParameters {
            block_size: 8 << 20,
            leave_blocks_allocated: true,
            has_parent: false,
        };
        let id = Guid([9; 16]);
        let md = encode_metadata_region(&params, 20 << 20, id, 4096, 512);
        let entries =
            header::parse_metadata_table(&md[..header::METADATA_TABLE_SIZE], 3 << 20, 1 << 20)
                .unwrap();
        assert_eq!(entries.len(), 5);
        let item = |g: Guid| {
            let e = entries.iter().find(|e| e.item_id == g).unwrap();
            assert!(e.is_required && !e.is_user);
            assert_eq!(e.is_virtual_disk, g != header::FILE_PARAMETERS);
            &md[e.offset as usize..(e.offset + e.length) as usize]
        };
        assert_eq!(
            header::parse_file_parameters(item(header::FILE_PARAMETERS), 0).unwrap(),
            params
        );
        assert_eq!(
            header::parse_virtual_disk_size(item(header::VIRTUAL_DISK_SIZE), 0, 4096).unwrap(),
            20 << 20
        );
        assert_eq!(item(header::VIRTUAL_DISK_ID), &id.0);
        assert_eq!(
            header::parse_sector_size(item(header::LOGICAL_SECTOR_SIZE), 0, "l").unwrap(),
            4096
        );
        assert_eq!(
            header::parse_sector_size(item(header::PHYSICAL_SECTOR_SIZE), 0, "p").unwrap(),
            512
        );
    }

    #[test]
    fn bat_round_trips_and_maps_present_blocks() {
        let geo = Geometry::new(1 << 20, 512, 5 << 20, false).unwrap();
        let mut entries = vec![0u64; geo.total_entries() as usize];
        entries[2] = bat_entry(bat::PAYLOAD_BLOCK_FULLY_PRESENT, 7 << 20);
        let bytes = encode_bat(&entries);
        let parsed = bat::parse_bat(&bytes, 2 << 20, entries.len() as u64).unwrap();
        assert_eq!(parsed.entries, entries);
        assert_eq!(
            bat::map(&geo, &parsed, (2 << 20) + 5, 10).unwrap(),
            bat::Mapping::Data {
                host: (7 << 20) + 5,
                len: 10
            }
        );
        assert_eq!(
            bat::map(&geo, &parsed, 0, 10).unwrap(),
            bat::Mapping::Unallocated { len: 10 }
        );
    }

    #[test]
    fn layout_sizes_the_bat_for_bitmap_entries_too() {
        // 1 MiB blocks, 512-byte sectors: chunk ratio 4096; 64 GiB = 65536 blocks + 15 bitmaps.
        let geo = Geometry::new(1 << 20, 512, 64 << 30, false).unwrap();
        let l = Layout::new(&geo, 1 << 20).unwrap();
        assert_eq!(geo.total_entries(), 65536 + 15);
        assert_eq!(l.bat.length, 1 << 20); // 524 408 bytes rounded up
        assert_eq!(l.bat.file_offset, 2 << 20);
        assert_eq!(l.metadata.file_offset, 3 << 20);
        assert_eq!(l.payload_offset, 4 << 20);
        let huge = Geometry::new(1 << 20, 512, 64 << 40, false).unwrap();
        assert!(Layout::new(&huge, 1 << 20).is_err());
    }

    #[test]
    fn random_guids_differ_and_are_version_4() {
        let a = random_guid().unwrap();
        let b = random_guid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().as_bytes()[15], b'4');
    }

    fn opts(text: &str) -> Result<VhdxOptions> {
        let mut o = CreateOptions::default();
        o.parse_options(text).unwrap();
        VhdxOptions::parse(&o)
    }

    #[test]
    fn options_default_and_validate() {
        let d = opts("").unwrap();
        assert_eq!(
            d,
            VhdxOptions {
                fixed: false,
                block_size: 32 << 20,
                logical_sector_size: 512,
                physical_sector_size: 4096,
                log_size: 1 << 20,
            }
        );
        assert!(
            opts("subformat=fixed,block_size=1M,log_size=4M")
                .unwrap()
                .fixed
        );
        for bad in [
            "block_size=3M",
            "block_size=512M",
            "logical_sector_size=1024",
            "log_size=1536k",
            "log_size=0",
            "subformat=differencing",
        ] {
            assert!(opts(bad).is_err(), "{bad}");
        }
        let err = opts("block_size=8M,colour=blue").unwrap_err().to_string();
        assert!(err.contains("\"colour\""), "{err}");
    }
}
