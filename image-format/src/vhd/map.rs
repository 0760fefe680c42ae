//! Mapping guest offsets of a dynamic or differencing VHD to places in the file.
//!
//! A dynamic disk is cut into blocks of `block_size` guest bytes. The block allocation table
//! (BAT) holds, for each block, the sector number where the block starts in the file, or
//! [`BAT_UNALLOCATED`]. An allocated block is its sector bitmap (one bit per sector, most
//! significant bit first, rounded up to whole sectors) followed by its data:
//!
//! ```text
//! file:  ... | bitmap (512 B for 2 MiB blocks) | block data (block_size bytes) | ...
//!            ^ BAT[i] * 512                     ^ BAT[i] * 512 + bitmap_size
//! ```
//!
//! Everything here is pure: [`BlockMap::locate`] returns a [`BlockLocation`] and
//! [`bitmap_run`] reads a bitmap the caller has fetched; the I/O module executes the answer.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};

use super::header::{BAT_UNALLOCATED, SECTOR};

/// The BAT of an open image with the geometry needed to use it.
#[derive(Debug)]
pub struct BlockMap {
    /// Entries change only from unallocated to allocated, by an in-place writer that has
    /// written the block first.
    bat: Vec<AtomicU32>,
    block_size: u64,
    bitmap_size: u64,
    disk_size: u64,
    table_offset: u64,
}

/// Where the guest range starting at some offset lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockLocation {
    /// In block `block`, allocated in this file: the block's bitmap is at `bitmap_offset`, the
    /// guest bytes at `data_offset`, for `len` bytes (never past the block's end).
    /// `in_block` is the offset of the first byte inside the block.
    Allocated {
        block: u64,
        bitmap_offset: u64,
        data_offset: u64,
        in_block: u64,
        len: u64,
    },
    /// Not allocated in this file, for `len` bytes (possibly spanning several blocks).
    Unallocated { len: u64 },
}

impl BlockMap {
    /// A map over `bat` (already bounded by the header's caps), read from `table_offset`.
    pub fn new(
        bat: Vec<u32>,
        block_size: u64,
        bitmap_size: u64,
        disk_size: u64,
        table_offset: u64,
    ) -> Self {
        BlockMap {
            bat: bat.into_iter().map(AtomicU32::new).collect(),
            block_size,
            bitmap_size,
            disk_size,
            table_offset,
        }
    }

    /// Decodes a big-endian BAT as read from the file.
    pub fn decode_bat(raw: &[u8]) -> Vec<u32> {
        raw.chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The BAT entries (a copy).
    pub fn entries(&self) -> Vec<u32> {
        self.bat.iter().map(|e| e.load(Ordering::Acquire)).collect()
    }

    /// Records that block `block` now starts at `sector` (the entry has been written to the
    /// file). Out-of-range blocks are ignored (the caller looked the block up first).
    pub fn set_entry(&self, block: u64, sector: u32) {
        if let Some(e) = usize::try_from(block).ok().and_then(|i| self.bat.get(i)) {
            e.store(sector, Ordering::Release);
        }
    }

    /// Guest bytes per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Bytes of each block's sector bitmap.
    pub fn bitmap_size(&self) -> u64 {
        self.bitmap_size
    }

    /// Guest size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Offset of the BAT in the file.
    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    /// Number of blocks the disk uses (the BAT may hold more entries).
    pub fn blocks_in_use(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }

    /// Host offset of block `block`'s bitmap, when it is allocated.
    pub fn block_start(&self, block: u64) -> Option<u64> {
        let entry = self
            .bat
            .get(usize::try_from(block).ok()?)?
            .load(Ordering::Acquire);
        (entry != BAT_UNALLOCATED).then(|| u64::from(entry) * SECTOR)
    }

    /// Where `[off, off + len)` begins. The caller has checked the range lies inside the disk.
    /// An allocated answer stops at the block's end; an unallocated one runs over every
    /// following unallocated block up to `len`.
    pub fn locate(&self, off: u64, len: u64) -> Result<BlockLocation> {
        let block = off / self.block_size;
        let in_block = off % self.block_size;
        let first_run = (self.block_size - in_block).min(len);
        let Some(start) = self.lookup(block)? else {
            let mut run = first_run;
            let mut next = block + 1;
            while run < len && self.lookup(next)?.is_none() {
                run = run.saturating_add(self.block_size).min(len);
                next += 1;
            }
            return Ok(BlockLocation::Unallocated { len: run });
        };
        Ok(BlockLocation::Allocated {
            block,
            bitmap_offset: start,
            data_offset: start + self.bitmap_size + in_block,
            in_block,
            len: first_run,
        })
    }

    /// The host offset of block `block`, `None` if unallocated; an error if the BAT has no
    /// such entry (cannot happen once the header's table was checked against the disk size).
    fn lookup(&self, block: u64) -> Result<Option<u64>> {
        let entry = usize::try_from(block)
            .ok()
            .and_then(|i| self.bat.get(i))
            .ok_or_else(|| {
                Error::corrupt(
                    "VHD block allocation table",
                    self.table_offset,
                    format!(
                        "no entry for block {block} of the {}-byte disk",
                        self.disk_size
                    ),
                )
            })?;
        let entry = entry.load(Ordering::Acquire);
        Ok((entry != BAT_UNALLOCATED).then(|| u64::from(entry) * SECTOR))
    }
}

/// In a block whose sector bitmap is `bitmap`, whether the bytes at `in_block` are present in
/// this file (bit set) or come from the parent (bit clear), and for how many bytes (at most
/// `len`) that stays true. Bits past the bitmap's end read as clear.
pub fn bitmap_run(bitmap: &[u8], in_block: u64, len: u64) -> (bool, u64) {
    let bit = |sector: u64| -> bool {
        usize::try_from(sector / 8)
            .ok()
            .and_then(|i| bitmap.get(i))
            .is_some_and(|byte| byte & (0x80 >> (sector % 8)) != 0)
    };
    let first = in_block / SECTOR;
    let last = (in_block + len - 1) / SECTOR;
    let present = bit(first);
    let mut sector = first + 1;
    while sector <= last && bit(sector) == present {
        sector += 1;
    }
    let run = (sector * SECTOR - in_block).min(len);
    (present, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 blocks of 4 KiB (8 sectors, one 512-byte bitmap): block 1 at sector 10, block 3 at
    /// sector 30; blocks 0 and 2 unallocated.
    fn map() -> BlockMap {
        BlockMap::new(
            vec![BAT_UNALLOCATED, 10, BAT_UNALLOCATED, 30],
            4096,
            512,
            4 * 4096,
            0x600,
        )
    }

    #[test]
    fn allocated_block_maps_past_its_bitmap() {
        let loc = map().locate(4096 + 100, 10_000).unwrap();
        assert_eq!(
            loc,
            BlockLocation::Allocated {
                block: 1,
                bitmap_offset: 5120,
                data_offset: 5120 + 512 + 100,
                in_block: 100,
                len: 4096 - 100,
            }
        );
    }

    #[test]
    fn unallocated_run_stops_at_the_next_allocated_block() {
        let m = BlockMap::new(
            vec![BAT_UNALLOCATED, BAT_UNALLOCATED, 7],
            4096,
            512,
            3 * 4096,
            0x600,
        );
        assert_eq!(
            m.locate(10, 3 * 4096 - 10).unwrap(),
            BlockLocation::Unallocated { len: 2 * 4096 - 10 }
        );
        assert_eq!(
            map().locate(8192, 100).unwrap(),
            BlockLocation::Unallocated { len: 100 }
        );
    }

    #[test]
    fn missing_bat_entry_is_an_error_not_zeros() {
        let m = BlockMap::new(vec![BAT_UNALLOCATED], 4096, 512, 2 * 4096, 0x600);
        let err = m.locate(4096, 10).unwrap_err().to_string();
        assert!(
            err.contains("corrupt VHD block allocation table at offset 0x600"),
            "{err}"
        );
    }

    #[test]
    fn bitmap_runs_follow_bits_msb_first() {
        let bitmap = [0b1110_0000u8, 0xff];
        assert_eq!(bitmap_run(&bitmap, 0, 8 * 512), (true, 3 * 512));
        assert_eq!(
            bitmap_run(&bitmap, 3 * 512 + 7, 100_000),
            (false, 5 * 512 - 7)
        );
        assert_eq!(bitmap_run(&bitmap, 8 * 512, 100), (true, 100));
        // Past the bitmap: clear.
        assert_eq!(bitmap_run(&bitmap, 16 * 512, 1024), (false, 1024));
    }
}
