//! Partition tables (MBR with extended/EBR chains, and GPT), read from a disk's untrusted bytes.
//!
//! The parser is pure: it sees the disk only through a `read(offset, buf)` function and its size,
//! so it is tested on byte arrays and fuzzed (`fuzz_targets/partition.rs`). Every read is of a
//! bounded size, every count is capped by a named constant, every offset is computed with checked
//! arithmetic, and every error names the disk and the byte offset of the structure at fault.
//!
//! Numbering follows Linux: MBR primaries are 1-4 by slot, logical partitions are 5, 6, ... in
//! the order of the EBR chain; GPT partitions are numbered by entry index (entry 0 is 1). The
//! extended container itself keeps its primary number but is not listed (it is not a file
//! system, only the box the logical partitions live in).
//!
//! What is fatal and what is not:
//!
//! | problem | result |
//! |---|---|
//! | no `55 AA` signature, boot flag other than 0x00/0x80 | no table (`Ok(None)`) |
//! | protective MBR (type 0xEE) but no valid GPT header (primary nor backup) | error |
//! | GPT header or entry array CRC wrong, header fields out of bounds | the backup header is tried, else error |
//! | one partition extends past the end of the disk (or its extended container) | that partition is left out, with a warning |
//! | an EBR without signature, a loop in the EBR chain, more than [`MAX_LOGICAL`] EBRs | the chain stops there, with a warning |
//!
//! GPT is looked for with 512-byte sectors, then 4096-byte sectors. An MBR without a protective
//! entry is read with 512-byte sectors.

use std::collections::HashSet;
use std::fmt;

use image_format::bytes::utf16le_string;

/// The MBR sector and an EBR are 512 bytes, whatever the sector size.
const MBR_LEN: usize = 512;
/// Offset of the first of the four partition entries in an MBR or EBR.
const MBR_ENTRIES: usize = 446;
/// Size of one MBR partition entry.
const MBR_ENTRY_LEN: usize = 16;
/// The boot signature at offset 510: `55 AA`.
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Partition type of a GPT protective MBR entry.
const TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// Partition types of an extended partition (CHS, LBA, and Linux's own).
const EXTENDED_TYPES: [u8; 3] = [0x05, 0x0F, 0x85];
/// The sector sizes GPT is looked for with, in order.
pub const GPT_SECTOR_SIZES: [u32; 2] = [512, 4096];
/// "EFI PART", the GPT header signature.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// The reason given when a sector holds no GPT header.
const NO_GPT_SIGNATURE: &str = "protective MBR (type 0xee) but no GPT header (EFI PART) here";
/// The smallest GPT header (UEFI 2.x: 92 bytes).
const GPT_MIN_HEADER: u32 = 92;
/// The smallest GPT partition entry (UEFI: 128 × 2^n bytes).
const GPT_MIN_ENTRY: u32 = 128;
/// The largest GPT partition entry accepted.
const GPT_MAX_ENTRY: u32 = 1024;
/// The largest GPT entry array read (the usual one is 16 KiB: 128 entries of 128 bytes).
pub const MAX_GPT_ARRAY: u64 = 1 << 20;
/// The most EBRs followed in an extended partition (Linux lists at most 256 partitions).
pub const MAX_LOGICAL: usize = 252;

/// Which kind of table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A DOS master boot record (primaries and an optional extended partition).
    Mbr,
    /// A GUID partition table (behind a protective MBR).
    Gpt,
}

impl Scheme {
    /// `mbr` or `gpt`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Mbr => "mbr",
            Scheme::Gpt => "gpt",
        }
    }
}

/// One partition: a window of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The number Linux gives it (`sda<number>`).
    pub number: u32,
    /// Byte offset of its first byte on the disk.
    pub offset: u64,
    /// Length in bytes (at least one sector).
    pub len: u64,
    /// The type: `0x83` for MBR, the type GUID for GPT.
    pub type_id: String,
    /// The GPT partition name (empty for MBR).
    pub name: String,
}

/// A disk's partition table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// MBR or GPT.
    pub scheme: Scheme,
    /// The logical sector size the table was read with.
    pub sector_size: u32,
    /// The partitions, by number.
    pub partitions: Vec<Partition>,
    /// Partitions or EBRs that were left out, and why.
    pub warnings: Vec<PartitionError>,
}

/// A problem with a disk's partition table, naming the disk and the offset of the structure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionError {
    /// The disk's name, as the mount shows it.
    pub disk: String,
    /// Byte offset of the structure at fault.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for PartitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: partition table at offset {:#x}: {}",
            self.disk, self.offset, self.reason
        )
    }
}

impl std::error::Error for PartitionError {}

/// Reads the partition table of a [`image_format::BlockDevice`] named `disk`.
pub fn read_table(
    disk: &str,
    device: &dyn image_format::BlockDevice,
) -> Result<Option<Table>, PartitionError> {
    parse(disk, device.size(), |off, buf| {
        device.read_at(buf, off).map_err(|e| e.to_string())
    })
}

/// Parses the partition table of a disk of `size` bytes that `read(offset, buf)` reads (exactly,
/// or fails with a message). `Ok(None)`: the disk has no partition table.
pub fn parse<R>(disk: &str, size: u64, read: R) -> Result<Option<Table>, PartitionError>
where
    R: FnMut(u64, &mut [u8]) -> Result<(), String>,
{
    let mut p = Parser {
        disk,
        size,
        read,
        warnings: Vec::new(),
    };
    p.table()
}

/// One of the four 16-byte entries of an MBR or EBR.
#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    boot: u8,
    kind: u8,
    start: u32,
    sectors: u32,
}

impl MbrEntry {
    fn at(sector: &[u8; MBR_LEN], slot: usize) -> MbrEntry {
        let e = MBR_ENTRIES + slot * MBR_ENTRY_LEN;
        MbrEntry {
            boot: sector[e],
            kind: sector[e + 4],
            start: le32(&sector[e + 8..e + 12]),
            sectors: le32(&sector[e + 12..e + 16]),
        }
    }

    fn is_used(&self) -> bool {
        self.kind != 0 && self.sectors != 0
    }

    fn is_extended(&self) -> bool {
        EXTENDED_TYPES.contains(&self.kind)
    }
}

/// The fields of a GPT header that the parser uses.
#[derive(Clone, Copy, Debug)]
struct GptHeader {
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

struct Parser<'a, R> {
    disk: &'a str,
    size: u64,
    read: R,
    warnings: Vec<PartitionError>,
}

impl<R> Parser<'_, R>
where
    R: FnMut(u64, &mut [u8]) -> Result<(), String>,
{
    fn error(&self, offset: u64, reason: impl Into<String>) -> PartitionError {
        PartitionError {
            disk: self.disk.to_string(),
            offset,
            reason: reason.into(),
        }
    }

    fn warn(&mut self, offset: u64, reason: impl Into<String>) {
        let e = self.error(offset, reason);
        self.warnings.push(e);
    }

    /// Reads `buf.len()` bytes at `offset`, which the caller has checked lie inside the disk.
    fn read_exact(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), PartitionError> {
        (self.read)(offset, buf).map_err(|e| self.error(offset, format!("read failed: {e}")))
    }

    /// Reads a 512-byte MBR or EBR at `offset`; `None` when it lies past the end of the disk.
    fn read_mbr(&mut self, offset: u64) -> Result<Option<[u8; MBR_LEN]>, PartitionError> {
        match offset.checked_add(MBR_LEN as u64) {
            Some(end) if end <= self.size => {}
            _ => return Ok(None),
        }
        let mut sector = [0u8; MBR_LEN];
        self.read_exact(offset, &mut sector)?;
        Ok(Some(sector))
    }

    fn table(&mut self) -> Result<Option<Table>, PartitionError> {
        let Some(mbr) = self.read_mbr(0)? else {
            return Ok(None);
        };
        if mbr[510..512] != MBR_SIGNATURE {
            return Ok(None);
        }
        let entries: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::at(&mbr, i)).collect();
        // A boot sector of a file system also ends in 55 AA; its "entries" are code and data,
        // and an MBR's boot flags are 0x00 or 0x80 (Linux uses the same test).
        if entries.iter().any(|e| e.boot != 0 && e.boot != 0x80) {
            return Ok(None);
        }
        if entries.iter().any(|e| e.kind == TYPE_GPT_PROTECTIVE) {
            return self.gpt().map(Some);
        }
        self.mbr(&entries).map(Some)
    }

    fn mbr(&mut self, entries: &[MbrEntry]) -> Result<Table, PartitionError> {
        const SECTOR: u64 = 512;
        let mut partitions = Vec::new();
        let mut extended = None;
        for (slot, e) in entries.iter().enumerate() {
            if !e.is_used() {
                continue;
            }
            let entry_offset = (MBR_ENTRIES + slot * MBR_ENTRY_LEN) as u64;
            let number = slot as u32 + 1;
            let offset = u64::from(e.start) * SECTOR;
            let len = u64::from(e.sectors) * SECTOR;
            if offset.saturating_add(len) > self.size {
                self.warn(
                    entry_offset,
                    format!(
                        "partition {number} ({len} bytes at {offset:#x}) ends past the end of \
                         the disk ({} bytes); left out",
                        self.size
                    ),
                );
                continue;
            }
            if e.is_extended() {
                if extended.is_none() {
                    extended = Some((offset, len));
                } else {
                    self.warn(
                        entry_offset,
                        format!("a second extended partition ({number}); left out"),
                    );
                }
                continue;
            }
            partitions.push(Partition {
                number,
                offset,
                len,
                type_id: format!("{:#04x}", e.kind),
                name: String::new(),
            });
        }
        if let Some((start, len)) = extended {
            self.logical(start, len, &mut partitions)?;
        }
        Ok(Table {
            scheme: Scheme::Mbr,
            sector_size: SECTOR as u32,
            partitions,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// Follows the EBR chain of the extended partition `[ext_start, ext_start + ext_len)`.
    /// Logical partition starts are relative to their EBR; links to the next EBR are relative
    /// to the extended partition's start.
    fn logical(
        &mut self,
        ext_start: u64,
        ext_len: u64,
        partitions: &mut Vec<Partition>,
    ) -> Result<(), PartitionError> {
        const SECTOR: u64 = 512;
        // Both lie inside the disk (checked by the caller), so this cannot overflow.
        let ext_end = ext_start + ext_len;
        let mut number = 5u32;
        let mut ebr = ext_start;
        let mut seen = HashSet::new();
        for _ in 0..MAX_LOGICAL {
            if !seen.insert(ebr) {
                self.warn(ebr, "the EBR chain loops back to this EBR; stopped there");
                return Ok(());
            }
            let Some(sector) = self.read_mbr(ebr)? else {
                self.warn(ebr, "EBR past the end of the disk; chain stopped");
                return Ok(());
            };
            if sector[510..512] != MBR_SIGNATURE {
                self.warn(ebr, "EBR without the 55 AA signature; chain stopped");
                return Ok(());
            }
            let data = MbrEntry::at(&sector, 0);
            let link = MbrEntry::at(&sector, 1);
            if data.is_used() && !data.is_extended() {
                let offset = ebr.saturating_add(u64::from(data.start) * SECTOR);
                let len = u64::from(data.sectors) * SECTOR;
                let end = offset.saturating_add(len);
                if end > ext_end || end > self.size {
                    self.warn(
                        ebr + MBR_ENTRIES as u64,
                        format!(
                            "logical partition {number} ({len} bytes at {offset:#x}) ends past \
                             its extended partition (which ends at {ext_end:#x}); left out"
                        ),
                    );
                } else {
                    partitions.push(Partition {
                        number,
                        offset,
                        len,
                        type_id: format!("{:#04x}", data.kind),
                        name: String::new(),
                    });
                }
                // Linux numbers the slot even when it leaves the partition out.
                number += 1;
            }
            if !(link.is_used() && link.is_extended()) {
                return Ok(());
            }
            let next = ext_start.saturating_add(u64::from(link.start) * SECTOR);
            if next >= ext_end {
                self.warn(
                    ebr + (MBR_ENTRIES + MBR_ENTRY_LEN) as u64,
                    format!(
                        "next EBR at {next:#x} lies past the extended partition; chain stopped"
                    ),
                );
                return Ok(());
            }
            ebr = next;
        }
        self.warn(
            ebr,
            format!("more than {MAX_LOGICAL} EBRs in the chain; stopped"),
        );
        Ok(())
    }

    fn gpt(&mut self) -> Result<Table, PartitionError> {
        let mut first_error: Option<PartitionError> = None;
        for sector_size in GPT_SECTOR_SIZES {
            let ss = u64::from(sector_size);
            if self.size < 2 * ss {
                continue;
            }
            let err = match self.gpt_at(sector_size, 1) {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            let last = self.size / ss - 1;
            if last > 1
                && let Ok(mut t) = self.gpt_at(sector_size, last)
            {
                let reason = format!("primary GPT unusable ({}); read the backup", err.reason);
                t.warnings.insert(0, self.error(err.offset, reason));
                return Ok(t);
            }
            // A missing signature at one sector size is expected (the other one may hold it);
            // any other fault is what the user needs to hear about.
            let better = match &first_error {
                None => true,
                Some(e) => e.reason == NO_GPT_SIGNATURE && err.reason != NO_GPT_SIGNATURE,
            };
            if better {
                first_error = Some(err);
            }
        }
        Err(first_error.unwrap_or_else(|| {
            self.error(
                0,
                "protective MBR (type 0xee) on a disk too small for a GPT",
            )
        }))
    }

    /// Reads the GPT whose header is at `lba` with `sector_size`-byte sectors.
    fn gpt_at(&mut self, sector_size: u32, lba: u64) -> Result<Table, PartitionError> {
        self.warnings.clear();
        let ss = u64::from(sector_size);
        let sectors = self.size / ss;
        let at = lba * ss;
        let header = self.gpt_header(sector_size, lba)?;
        let array_len = u64::from(header.entries) * u64::from(header.entry_size);
        let array_at = header
            .entries_lba
            .checked_mul(ss)
            .filter(|&o| o.checked_add(array_len).is_some_and(|end| end <= self.size))
            .ok_or_else(|| {
                self.error(
                    at + 72,
                    format!(
                        "partition entry array ({array_len} bytes at LBA {}) lies past the end \
                         of the disk",
                        header.entries_lba
                    ),
                )
            })?;
        // array_len <= MAX_GPT_ARRAY, checked by gpt_header.
        let mut array = vec![0u8; array_len as usize];
        self.read_exact(array_at, &mut array)?;
        let crc = crc32fast::hash(&array);
        if crc != header.entries_crc {
            return Err(self.error(
                array_at,
                format!(
                    "partition entry array CRC32 is {crc:#010x}, the header says {:#010x}",
                    header.entries_crc
                ),
            ));
        }
        let mut partitions = Vec::new();
        for (i, entry) in array.chunks_exact(header.entry_size as usize).enumerate() {
            let type_guid: [u8; 16] = entry[0..16].try_into().unwrap_or([0; 16]);
            if type_guid == [0; 16] {
                continue;
            }
            let number = i as u32 + 1;
            let entry_at = array_at + i as u64 * u64::from(header.entry_size);
            let first = le64(&entry[32..40]);
            let last = le64(&entry[40..48]);
            if first > last || last >= sectors {
                self.warn(
                    entry_at,
                    format!(
                        "partition {number} (LBA {first}..={last}) is empty or ends past the \
                         end of the disk ({sectors} sectors); left out"
                    ),
                );
                continue;
            }
            partitions.push(Partition {
                number,
                offset: first * ss,
                len: (last - first + 1) * ss,
                type_id: guid_text(&type_guid),
                name: utf16le_string(&entry[56..128]),
            });
        }
        Ok(Table {
            scheme: Scheme::Gpt,
            sector_size,
            partitions,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn gpt_header(&mut self, sector_size: u32, lba: u64) -> Result<GptHeader, PartitionError> {
        let ss = u64::from(sector_size);
        let sectors = self.size / ss;
        let at = lba * ss;
        let mut bytes = vec![0u8; sector_size as usize];
        self.read_exact(at, &mut bytes)?;
        if &bytes[0..8] != GPT_SIGNATURE {
            return Err(self.error(at, NO_GPT_SIGNATURE));
        }
        let header_size = le32(&bytes[12..16]);
        if !(GPT_MIN_HEADER..=sector_size).contains(&header_size) {
            return Err(self.error(
                at + 12,
                format!("header size {header_size} is not within {GPT_MIN_HEADER}..={sector_size}"),
            ));
        }
        let stored_crc = le32(&bytes[16..20]);
        let mut copy = bytes[..header_size as usize].to_vec();
        copy[16..20].fill(0);
        let crc = crc32fast::hash(&copy);
        if crc != stored_crc {
            return Err(self.error(
                at + 16,
                format!("header CRC32 is {crc:#010x}, the header says {stored_crc:#010x}"),
            ));
        }
        let my_lba = le64(&bytes[24..32]);
        if my_lba != lba {
            return Err(self.error(
                at + 24,
                format!("header says it is at LBA {my_lba}, but it was read at LBA {lba}"),
            ));
        }
        let first_usable = le64(&bytes[40..48]);
        let last_usable = le64(&bytes[48..56]);
        if first_usable > last_usable || last_usable >= sectors {
            return Err(self.error(
                at + 40,
                format!(
                    "usable LBAs {first_usable}..={last_usable} do not fit a disk of {sectors} \
                     sectors"
                ),
            ));
        }
        let entries = le32(&bytes[80..84]);
        let entry_size = le32(&bytes[84..88]);
        if !(GPT_MIN_ENTRY..=GPT_MAX_ENTRY).contains(&entry_size)
            || !(entry_size / GPT_MIN_ENTRY).is_power_of_two()
            || !entry_size.is_multiple_of(GPT_MIN_ENTRY)
        {
            return Err(self.error(
                at + 84,
                format!(
                    "partition entry size {entry_size} is not 128 × 2^n (at most {GPT_MAX_ENTRY})"
                ),
            ));
        }
        let array_len = u64::from(entries) * u64::from(entry_size);
        if array_len > MAX_GPT_ARRAY {
            return Err(self.error(
                at + 80,
                format!(
                    "{entries} partition entries of {entry_size} bytes exceed the \
                     {MAX_GPT_ARRAY}-byte limit"
                ),
            ));
        }
        Ok(GptHeader {
            entries_lba: le64(&bytes[72..80]),
            entries,
            entry_size,
            entries_crc: le32(&bytes[88..92]),
        })
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A GUID as text: the first three fields are little-endian on disk.
fn guid_text(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(&g[0..4]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn parse_bytes(disk: &[u8]) -> Result<Option<Table>, PartitionError> {
        parse("disk", disk.len() as u64, |off, buf| {
            let start = off as usize;
            buf.copy_from_slice(&disk[start..start + buf.len()]);
            Ok(())
        })
    }

    /// Writes MBR entry `slot` of the 512-byte sector at `sector`.
    fn mbr_entry(disk: &mut [u8], sector: usize, slot: usize, kind: u8, start: u32, len: u32) {
        let e = sector + MBR_ENTRIES + slot * MBR_ENTRY_LEN;
        disk[e + 4] = kind;
        disk[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
        disk[sector + 510..sector + 512].copy_from_slice(&MBR_SIGNATURE);
    }

    fn numbers(t: &Table) -> Vec<(u32, u64, u64)> {
        t.partitions
            .iter()
            .map(|p| (p.number, p.offset, p.len))
            .collect()
    }

    /// A GPT disk of `sectors` sectors of `ss` bytes with `entries` (index, first, last),
    /// primary and backup headers.
    fn gpt_disk(ss: usize, sectors: usize, entries: &[(usize, u64, u64)]) -> Vec<u8> {
        let mut disk = vec![0u8; ss * sectors];
        mbr_entry(
            &mut disk,
            0,
            0,
            TYPE_GPT_PROTECTIVE,
            1,
            (sectors - 1) as u32,
        );
        let array_sectors = (128usize * 128).div_ceil(ss);
        let mut array = vec![0u8; 128 * 128];
        for &(i, first, last) in entries {
            let e = &mut array[i * 128..(i + 1) * 128];
            // Linux filesystem data: 0FC63DAF-8483-4772-8E79-3D69D8477DE4.
            e[0..16].copy_from_slice(&[
                0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
                0x7D, 0xE4,
            ]);
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (k, u) in "root".encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        let last_lba = sectors as u64 - 1;
        let backup_array = last_lba - array_sectors as u64;
        for (my, alt, array_lba) in [(1u64, last_lba, 2u64), (last_lba, 1, backup_array)] {
            let at = array_lba as usize * ss;
            disk[at..at + array.len()].copy_from_slice(&array);
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(GPT_SIGNATURE);
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + array_sectors as u64).to_le_bytes());
            h[48..56].copy_from_slice(&(backup_array - 1).to_le_bytes());
            h[72..80].copy_from_slice(&array_lba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc32fast::hash(&array).to_le_bytes());
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            let at = my as usize * ss;
            disk[at..at + 92].copy_from_slice(&h);
        }
        disk
    }

    #[test]
    fn a_disk_without_signature_has_no_table() {
        let disk = vec![0u8; 4096];
        assert_eq!(parse_bytes(&disk), Ok(None));
    }

    #[test]
    fn a_boot_sector_with_bad_boot_flags_is_not_an_mbr() {
        let mut disk = vec![0u8; 4096];
        mbr_entry(&mut disk, 0, 0, 0x83, 1, 2);
        disk[MBR_ENTRIES] = 0x29;
        assert_eq!(parse_bytes(&disk), Ok(None));
    }

    #[test]
    fn a_disk_shorter_than_a_sector_has_no_table() {
        assert_eq!(parse_bytes(&[0x55; 300]), Ok(None));
    }

    #[test]
    fn mbr_primaries_are_numbered_by_slot() {
        let mut disk = vec![0u8; 4 * MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x83, 2048, 2048);
        mbr_entry(&mut disk, 0, 2, 0x07, 4096, 100);
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(t.scheme, Scheme::Mbr);
        assert_eq!(numbers(&t), vec![(1, MIB, MIB), (3, 2 * MIB, 51200)]);
        assert_eq!(t.partitions[0].type_id, "0x83");
        assert!(t.warnings.is_empty());
    }

    #[test]
    fn logical_partitions_follow_the_ebr_chain_from_five() {
        let mut disk = vec![0u8; 8 * MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x83, 2048, 2048);
        // Extended partition: sectors 4096..16384.
        mbr_entry(&mut disk, 0, 1, 0x05, 4096, 12288);
        // EBR 1 at 4096: logical at +2048, link to the EBR at extended + 4096.
        mbr_entry(&mut disk, 4096 * 512, 0, 0x83, 2048, 1024);
        mbr_entry(&mut disk, 4096 * 512, 1, 0x05, 4096, 4096);
        // EBR 2 at 8192: logical at +2048, end of chain.
        mbr_entry(&mut disk, 8192 * 512, 0, 0x82, 2048, 2048);
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(
            numbers(&t),
            vec![
                (1, MIB, MIB),
                (5, 6144 * 512, 1024 * 512),
                (6, 10240 * 512, MIB)
            ]
        );
        assert!(t.warnings.is_empty());
    }

    #[test]
    fn a_looping_ebr_chain_stops_with_a_warning() {
        let mut disk = vec![0u8; 8 * MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x0F, 2048, 8192);
        mbr_entry(&mut disk, 2048 * 512, 0, 0x83, 2048, 100);
        // Links back to the first EBR (offset 0 in the extended partition).
        mbr_entry(&mut disk, 2048 * 512, 1, 0x05, 0, 4096);
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(numbers(&t), vec![(5, 4096 * 512, 100 * 512)]);
        assert_eq!(t.warnings.len(), 1);
        assert_eq!(t.warnings[0].offset, 2048 * 512);
        assert!(t.warnings[0].reason.contains("loops"), "{}", t.warnings[0]);
    }

    #[test]
    fn a_long_ebr_chain_is_cut_at_the_bound() {
        let sectors = 2 + 2 * (MAX_LOGICAL + 8);
        let mut disk = vec![0u8; sectors * 512];
        mbr_entry(&mut disk, 0, 0, 0x05, 2, (sectors - 2) as u32);
        for i in 0..MAX_LOGICAL + 8 {
            let ebr = (2 + 2 * i) * 512;
            mbr_entry(&mut disk, ebr, 0, 0x83, 1, 1);
            mbr_entry(&mut disk, ebr, 1, 0x05, 2 * (i as u32 + 1), 2);
        }
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(t.partitions.len(), MAX_LOGICAL);
        assert_eq!(t.partitions.last().unwrap().number, 4 + MAX_LOGICAL as u32);
        assert!(
            t.warnings[0].reason.contains("more than"),
            "{}",
            t.warnings[0]
        );
    }

    #[test]
    fn a_partition_past_the_end_of_the_disk_is_left_out_with_its_offset() {
        let mut disk = vec![0u8; 4 * MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x83, 2048, 2048);
        mbr_entry(&mut disk, 0, 1, 0x83, 4096, 8192);
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(numbers(&t), vec![(1, MIB, MIB)]);
        assert_eq!(t.warnings[0].offset, 462);
        assert_eq!(
            t.warnings[0].to_string(),
            "disk: partition table at offset 0x1ce: partition 2 (4194304 bytes at 0x200000) \
             ends past the end of the disk (4194304 bytes); left out"
        );
    }

    #[test]
    fn gpt_partitions_are_numbered_by_entry_index() {
        let disk = gpt_disk(512, 8192, &[(0, 2048, 4095), (2, 4096, 8000)]);
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(t.scheme, Scheme::Gpt);
        assert_eq!(t.sector_size, 512);
        assert_eq!(numbers(&t), vec![(1, MIB, MIB), (3, 2 * MIB, 3905 * 512)]);
        assert_eq!(t.partitions[0].name, "root");
        assert_eq!(
            t.partitions[0].type_id,
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        );
        assert!(t.warnings.is_empty());
    }

    #[test]
    fn gpt_with_4096_byte_sectors() {
        let disk = gpt_disk(4096, 1024, &[(0, 256, 511)]);
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(t.sector_size, 4096);
        assert_eq!(numbers(&t), vec![(1, MIB, MIB)]);
    }

    #[test]
    fn a_damaged_primary_gpt_header_falls_back_to_the_backup() {
        let mut disk = gpt_disk(512, 8192, &[(0, 2048, 4095)]);
        disk[512 + 40] ^= 1;
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(numbers(&t), vec![(1, MIB, MIB)]);
        assert_eq!(t.warnings[0].offset, 512 + 16);
        assert!(t.warnings[0].reason.contains("CRC32"), "{}", t.warnings[0]);
    }

    #[test]
    fn damaged_primary_and_backup_headers_are_an_error_naming_the_offset() {
        let mut disk = gpt_disk(512, 8192, &[(0, 2048, 4095)]);
        disk[512 + 40] ^= 1;
        let last = disk.len() - 512;
        disk[last + 40] ^= 1;
        let err = parse_bytes(&disk).unwrap_err();
        assert_eq!(err.offset, 512 + 16);
        assert!(
            err.to_string()
                .starts_with("disk: partition table at offset 0x210: header CRC32")
        );
    }

    #[test]
    fn a_damaged_entry_array_is_an_error() {
        let mut disk = gpt_disk(512, 8192, &[(0, 2048, 4095)]);
        disk[1024 + 33] ^= 1;
        let last_array = disk.len() - 512 - 128 * 128 + 33;
        disk[last_array] ^= 1;
        let err = parse_bytes(&disk).unwrap_err();
        assert_eq!(err.offset, 1024);
        assert!(err.reason.contains("entry array CRC32"), "{err}");
    }

    #[test]
    fn a_gpt_partition_past_the_end_is_left_out() {
        let disk = gpt_disk(512, 8192, &[(0, 2048, 4095), (1, 4096, 9000)]);
        let t = parse_bytes(&disk).unwrap().unwrap();
        assert_eq!(numbers(&t), vec![(1, MIB, MIB)]);
        assert_eq!(t.warnings[0].offset, 1024 + 128);
    }

    #[test]
    fn a_huge_entry_count_is_refused_before_reading() {
        let mut disk = gpt_disk(512, 8192, &[]);
        for at in [512, disk.len() - 512] {
            disk[at + 80..at + 84].copy_from_slice(&u32::MAX.to_le_bytes());
            disk[at + 16..at + 20].fill(0);
            let crc = crc32fast::hash(&disk[at..at + 92]);
            disk[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
        }
        let err = parse_bytes(&disk).unwrap_err();
        assert_eq!(err.offset, 512 + 80);
        assert!(err.reason.contains("limit"), "{err}");
    }

    #[test]
    fn a_protective_mbr_without_gpt_is_an_error() {
        let mut disk = vec![0u8; MIB as usize];
        mbr_entry(&mut disk, 0, 0, TYPE_GPT_PROTECTIVE, 1, 2047);
        let err = parse_bytes(&disk).unwrap_err();
        assert_eq!(err.offset, 512);
        assert!(err.reason.contains("no GPT header"), "{err}");
    }

    #[test]
    fn read_errors_name_the_offset() {
        let mut disk = vec![0u8; 2 * MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x05, 2048, 16);
        let err = parse("disk0", disk.len() as u64, |off, buf| {
            if off == 0 {
                buf.copy_from_slice(&disk[..512]);
                Ok(())
            } else {
                Err("injected".into())
            }
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk0: partition table at offset 0x100000: read failed: injected"
        );
    }
}
