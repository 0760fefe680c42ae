//! The block allocation table ([MS-VHDX] 2.5) and the mapping from guest offsets to where their
//! bytes live: a pure function of the geometry and the table, returning a [`Mapping`].
//!
//! The BAT interleaves payload block entries with sector bitmap entries: after every
//! `chunk_ratio` payload entries comes the entry of the sector bitmap block covering them
//! (`chunk_ratio = 2^23 * logical_sector_size / block_size`, since one 1 MiB bitmap block has
//! 2^23 bits, one per logical sector).
//!
//! ```text
//! index: 0   1   ...  cr-1  cr        cr+1 ...
//!        P0  P1  ...  Pcr-1 SB0       Pcr  ...
//! ```

use crate::error::{Error, Result};

/// Cap on BAT entries loaded in memory (256 MiB of table: a 32 TiB disk of 1 MiB blocks).
pub const MAX_BAT_ENTRIES: u64 = 32 << 20;
/// Bytes of one sector bitmap block.
pub const SECTOR_BITMAP_BLOCK: u64 = 1 << 20;

/// PAYLOAD_BLOCK_NOT_PRESENT: no data in this file (zeros, or the parent's for a child).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u8 = 0;
/// PAYLOAD_BLOCK_UNDEFINED: contents undefined; read as zeros.
pub const PAYLOAD_BLOCK_UNDEFINED: u8 = 1;
/// PAYLOAD_BLOCK_ZERO: reads as zeros.
pub const PAYLOAD_BLOCK_ZERO: u8 = 2;
/// PAYLOAD_BLOCK_UNMAPPED: unmapped (trimmed); read as zeros.
pub const PAYLOAD_BLOCK_UNMAPPED: u8 = 3;
/// PAYLOAD_BLOCK_FULLY_PRESENT: the whole block is at the entry's file offset.
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u8 = 6;
/// PAYLOAD_BLOCK_PARTIALLY_PRESENT (differencing only): the sector bitmap says which sectors
/// are in this file and which come from the parent.
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u8 = 7;
/// SB_BLOCK_NOT_PRESENT: no sector bitmap block.
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
/// SB_BLOCK_PRESENT: the sector bitmap block is at the entry's file offset.
pub const SB_BLOCK_PRESENT: u8 = 6;

/// The state bits (0-2) of a BAT entry.
pub fn state(entry: u64) -> u8 {
    (entry & 7) as u8
}

/// The file offset of a BAT entry (bits 20-63 count MiB).
pub fn file_offset(entry: u64) -> u64 {
    entry & !0xF_FFFF
}

/// The shape of the disk, from the metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per payload block.
    pub block_size: u64,
    /// Bytes per logical sector (512 or 4096).
    pub logical_sector_size: u64,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks covering the disk.
    pub data_blocks: u64,
    /// Sector bitmap blocks covering the disk.
    pub bitmap_blocks: u64,
    /// The disk is a differencing disk.
    pub has_parent: bool,
}

impl Geometry {
    /// The geometry of validated metadata values (block size a power of two in 1..=256 MiB,
    /// sector size 512 or 4096, size non-zero).
    pub fn new(
        block_size: u32,
        logical_sector_size: u32,
        virtual_size: u64,
        has_parent: bool,
    ) -> Result<Self> {
        let block_size = u64::from(block_size);
        let logical_sector_size = u64::from(logical_sector_size);
        let chunk_ratio = ((1u64 << 23) * logical_sector_size) / block_size.max(1);
        if chunk_ratio == 0 || virtual_size == 0 {
            return Err(Error::corrupt(
                "metadata region",
                0,
                "block size, sector size and disk size are inconsistent",
            ));
        }
        let data_blocks = virtual_size.div_ceil(block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        Ok(Geometry {
            block_size,
            logical_sector_size,
            virtual_size,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            has_parent,
        })
    }

    /// BAT entries the disk needs ([MS-VHDX] 2.5): a differencing disk needs every sector
    /// bitmap entry, a dynamic or fixed disk only those between payload entries.
    pub fn total_entries(&self) -> u64 {
        if self.has_parent {
            self.bitmap_blocks.saturating_mul(self.chunk_ratio + 1)
        } else {
            self.data_blocks + (self.data_blocks - 1) / self.chunk_ratio
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap block of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }
}

/// The BAT as loaded from the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bat {
    /// Entries, [`Geometry::total_entries`] of them.
    pub entries: Vec<u64>,
    /// File offset of the BAT region, for error messages.
    pub offset: u64,
}

/// Parses the BAT region bytes read at `offset` into `count` entries.
pub fn parse_bat(buf: &[u8], offset: u64, count: u64) -> Result<Bat> {
    let needed = count.checked_mul(8).filter(|n| *n <= buf.len() as u64);
    if needed.is_none() || count > MAX_BAT_ENTRIES {
        return Err(Error::corrupt(
            "BAT",
            offset,
            format!(
                "{count} entries needed but the region holds {} (cap {MAX_BAT_ENTRIES})",
                buf.len() / 8
            ),
        ));
    }
    let entries = buf
        .chunks_exact(8)
        .take(count as usize)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Ok(Bat { entries, offset })
}

/// Where a run of guest bytes (never crossing a block) lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// In this file at `host`.
    Data { host: u64, len: u64 },
    /// Reads as zeros in this layer (ZERO, UNMAPPED, UNDEFINED blocks).
    Zero { len: u64 },
    /// Not present and no parent: reads as zeros, reported unallocated.
    Unallocated { len: u64 },
    /// Not present in a differencing disk: the parent's bytes.
    Parent { len: u64 },
    /// A partially present block: sector `first_sector` of the chunk's bitmap (at file offset
    /// `bitmap`) onwards says, sector by sector, whether the bytes are at `host` or the parent's.
    Partial {
        host: u64,
        bitmap: u64,
        first_sector: u64,
        len: u64,
    },
}

impl Mapping {
    /// Bytes the mapping covers.
    pub fn len(&self) -> u64 {
        match *self {
            Mapping::Data { len, .. }
            | Mapping::Zero { len }
            | Mapping::Unallocated { len }
            | Mapping::Parent { len }
            | Mapping::Partial { len, .. } => len,
        }
    }

    /// True for an empty mapping (never returned by [`map`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Maps `[off, off + len)` (inside the disk, `len` > 0) to the run that starts at `off` and
/// ends at the end of its block or of the request.
pub fn map(geo: &Geometry, bat: &Bat, off: u64, len: u64) -> Result<Mapping> {
    let block = off / geo.block_size;
    let within = off % geo.block_size;
    let len = len.min(geo.block_size - within);
    let index = geo.payload_index(block);
    let entry_at = bat.offset.saturating_add(index.saturating_mul(8));
    let entry = bat
        .entries
        .get(usize::try_from(index).unwrap_or(usize::MAX))
        .copied()
        .ok_or_else(|| Error::corrupt("BAT", bat.offset, format!("no entry for block {block}")))?;
    let host = file_offset(entry);
    let present = |host: u64| {
        if host == 0 {
            Err(Error::corrupt(
                "BAT entry",
                entry_at,
                format!("block {block} is present at file offset 0"),
            ))
        } else {
            Ok(host + within)
        }
    };
    Ok(match state(entry) {
        PAYLOAD_BLOCK_NOT_PRESENT if geo.has_parent => Mapping::Parent { len },
        PAYLOAD_BLOCK_NOT_PRESENT => Mapping::Unallocated { len },
        PAYLOAD_BLOCK_UNDEFINED | PAYLOAD_BLOCK_ZERO | PAYLOAD_BLOCK_UNMAPPED => {
            Mapping::Zero { len }
        }
        PAYLOAD_BLOCK_FULLY_PRESENT => Mapping::Data {
            host: present(host)?,
            len,
        },
        PAYLOAD_BLOCK_PARTIALLY_PRESENT if geo.has_parent => {
            let chunk = block / geo.chunk_ratio;
            let sb_index = geo.bitmap_index(chunk);
            let sb = bat
                .entries
                .get(usize::try_from(sb_index).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0);
            if state(sb) != SB_BLOCK_PRESENT || file_offset(sb) == 0 {
                return Err(Error::corrupt(
                    "BAT entry",
                    bat.offset.saturating_add(sb_index.saturating_mul(8)),
                    format!(
                        "block {block} is partially present but its sector bitmap block is not present"
                    ),
                ));
            }
            let blocks_before = (block % geo.chunk_ratio) * geo.block_size;
            Mapping::Partial {
                host: present(host)?,
                bitmap: file_offset(sb),
                first_sector: (blocks_before + within) / geo.logical_sector_size,
                len,
            }
        }
        other => {
            return Err(Error::corrupt(
                "BAT entry",
                entry_at,
                format!(
                    "block {block} has invalid state {other}{}",
                    if other == 7 {
                        " (partially present outside a differencing disk)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    })
}

/// The length of the run of sectors, starting at bit `first` of `bitmap` (bit 0 of byte 0 is
/// the first sector, least significant bit first), that share bit `first`'s value, capped at
/// `max` sectors and at the bits present. Returns (value, sectors).
pub fn bitmap_run(bitmap: &[u8], first: u64, max: u64) -> (bool, u64) {
    let bit = |i: u64| {
        bitmap
            .get(usize::try_from(i / 8).unwrap_or(usize::MAX))
            .is_some_and(|b| b >> (i % 8) & 1 == 1)
    };
    let value = bit(first);
    let mut n = 1;
    while n < max && bit(first + n) == value {
        n += 1;
    }
    (value, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(block: u32, sector: u32, size: u64, parent: bool) -> Geometry {
        Geometry::new(block, sector, size, parent).unwrap()
    }

    #[test]
    fn chunk_ratio_follows_the_sector_and_block_sizes() {
        assert_eq!(geo(1 << 20, 512, 1 << 30, false).chunk_ratio, 4096);
        assert_eq!(geo(32 << 20, 512, 1 << 30, false).chunk_ratio, 128);
        assert_eq!(geo(1 << 20, 4096, 1 << 30, false).chunk_ratio, 32768);
        assert_eq!(geo(256 << 20, 512, 1 << 30, false).chunk_ratio, 16);
    }

    #[test]
    fn entries_interleave_sector_bitmaps() {
        // 256 MiB blocks: chunk ratio 16; 40 blocks.
        let g = geo(256 << 20, 512, 40 * (256 << 20), false);
        assert_eq!(g.payload_index(15), 15);
        assert_eq!(g.payload_index(16), 17);
        assert_eq!(g.bitmap_index(0), 16);
        assert_eq!(g.total_entries(), 40 + 39 / 16);
        let d = geo(256 << 20, 512, 40 * (256 << 20), true);
        assert_eq!(d.total_entries(), 3 * 17);
    }

    #[test]
    fn states_map_to_data_zero_and_parent() {
        let g = geo(1 << 20, 512, 4 << 20, true);
        let mut entries = vec![0u64; g.total_entries() as usize];
        entries[0] = (5 << 20) | 6;
        entries[1] = 2;
        entries[2] = 0;
        let bat = Bat {
            entries,
            offset: 0x30_0000,
        };
        assert_eq!(
            map(&g, &bat, 10, 1 << 30).unwrap(),
            Mapping::Data {
                host: (5 << 20) + 10,
                len: (1 << 20) - 10
            }
        );
        assert_eq!(map(&g, &bat, 1 << 20, 5).unwrap(), Mapping::Zero { len: 5 });
        assert_eq!(
            map(&g, &bat, 2 << 20, 5).unwrap(),
            Mapping::Parent { len: 5 }
        );
    }

    #[test]
    fn partially_present_block_points_at_its_bitmap_sectors() {
        let g = geo(1 << 20, 512, 4 << 20, true);
        let mut entries = vec![0u64; g.total_entries() as usize];
        entries[1] = (7 << 20) | 7;
        entries[g.bitmap_index(0) as usize] = (9 << 20) | 6;
        let bat = Bat { entries, offset: 0 };
        let m = map(&g, &bat, (1 << 20) + 1024, 512).unwrap();
        assert_eq!(
            m,
            Mapping::Partial {
                host: (7 << 20) + 1024,
                bitmap: 9 << 20,
                first_sector: 2048 + 2,
                len: 512
            }
        );
    }

    #[test]
    fn partially_present_without_parent_or_bitmap_is_corrupt() {
        let g = geo(1 << 20, 512, 4 << 20, false);
        let mut entries = vec![0u64; g.total_entries() as usize];
        entries[0] = (7 << 20) | 7;
        let bat = Bat {
            entries: entries.clone(),
            offset: 0x40_0000,
        };
        assert!(
            map(&g, &bat, 0, 1)
                .unwrap_err()
                .to_string()
                .contains("BAT entry at offset 0x400000")
        );
        let g = geo(1 << 20, 512, 4 << 20, true);
        entries.resize(g.total_entries() as usize, 0);
        let bat = Bat { entries, offset: 0 };
        assert!(
            map(&g, &bat, 0, 1)
                .unwrap_err()
                .to_string()
                .contains("sector bitmap")
        );
    }

    #[test]
    fn bitmap_runs_are_lsb_first() {
        let bm = [0b1111_0000u8, 0xff];
        assert_eq!(bitmap_run(&bm, 0, 100), (false, 4));
        assert_eq!(bitmap_run(&bm, 4, 100), (true, 12));
        assert_eq!(bitmap_run(&bm, 4, 3), (true, 3));
    }

    #[test]
    fn short_bat_region_is_refused() {
        assert!(parse_bat(&[0u8; 16], 0x10_0000, 3).is_err());
        assert_eq!(
            parse_bat(&[1, 0, 0, 0, 0, 0, 0, 0], 0, 1).unwrap().entries,
            vec![1]
        );
    }
}
