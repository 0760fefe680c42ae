//! The monolithicSparse writer: one hosted sparse file in VMware's layout.
//!
//! ```text
//! sector 0      header (version 1, flags: newline test + redundant grain tables)
//! 1..21         embedded descriptor (20 sectors, NUL padded)
//! rgd           redundant grain directory   } every grain table preallocated, 4 sectors each,
//! rgd + g       redundant grain tables      } the directories pointing at all of them
//! gd            grain directory
//! gd + g        grain tables
//! overhead      (rounded up to a grain) first grain; grains are appended in commit order
//! ```
//!
//! Concurrency ([`WriteOrder::Any`]): a commit takes the mutex only to reserve contiguous grains
//! at the end of the file and to note them in the in-memory grain tables, then writes the data
//! outside the lock. Grain tables exist in memory only for the table ranges that received data
//! (memory follows the data, not the disk size) and are written, both copies, by `finish`;
//! tables that stay empty are never written and read as zeros from the file's holes.
//! Grains never committed keep a zero entry: unallocated, reading as zeros (the disk has no
//! parent), which is also why `write_zeroes` has nothing to do.

use std::path::Path;
use std::sync::Mutex;

use crate::create::{ImageWriter, Prepared, TempOutput, WriteOrder};
use crate::error::{Error, Result};

use super::header::{SECTOR, SparseHeader};
use super::write::{
    DESCRIPTOR_SECTORS, GT_SECTORS, GTES_PER_GT, Identity, Params, encode_header, gd_sectors,
    new_header, pointer, single_sparse_descriptor, validate_header,
};

/// Where the metadata of a new monolithic sparse file goes, in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseLayout {
    /// Redundant grain directory.
    pub rgd: u64,
    /// First redundant grain table.
    pub rgt: u64,
    /// Grain directory.
    pub gd: u64,
    /// First grain table.
    pub gt: u64,
    /// First grain (a grain multiple).
    pub overhead: u64,
    /// Grain directory entries (= grain tables).
    pub tables: u64,
}

impl SparseLayout {
    /// The layout for `tables` grain tables and grains of `grain_sectors`.
    pub fn new(tables: u64, grain_sectors: u64) -> Self {
        let dir = gd_sectors(tables);
        let rgd = 1 + DESCRIPTOR_SECTORS;
        let rgt = rgd + dir;
        let gd = rgt + tables * GT_SECTORS;
        let gt = gd + dir;
        let end = gt + tables * GT_SECTORS;
        SparseLayout {
            rgd,
            rgt,
            gd,
            gt,
            overhead: end.div_ceil(grain_sectors) * grain_sectors,
            tables,
        }
    }

    /// A grain directory pointing at the tables starting at sector `first`, encoded.
    pub fn encode_directory(&self, first: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((gd_sectors(self.tables) * SECTOR) as usize);
        for i in 0..self.tables {
            // The layout is built for capacities whose metadata fits in 32-bit sectors (checked
            // at create), so the cast cannot truncate.
            out.extend_from_slice(&((first + i * GT_SECTORS) as u32).to_le_bytes());
        }
        out.resize((gd_sectors(self.tables) * SECTOR) as usize, 0);
        out
    }
}

/// Encodes a grain table.
pub fn encode_table(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// State behind the allocation mutex.
#[derive(Debug)]
struct Alloc {
    /// Next free sector at the end of the file.
    next: u64,
    /// Grain tables that received data, by directory index.
    tables: Vec<Option<Box<[u32]>>>,
}

/// Writes a new monolithicSparse VMDK.
#[derive(Debug)]
pub struct SparseWriter {
    out: TempOutput,
    header: SparseHeader,
    layout: SparseLayout,
    descriptor: Vec<u8>,
    size: u64,
    alloc: Mutex<Alloc>,
}

impl SparseWriter {
    /// Starts the file at `path` (recorded in its own descriptor as `name`).
    pub fn create(
        path: &Path,
        name: &str,
        params: &Params,
        ids: &Identity,
    ) -> Result<Box<dyn ImageWriter>> {
        let mut header = new_header(params, false);
        let layout = SparseLayout::new(header.gd_entries, header.grain_sectors);
        header.rgd_offset = layout.rgd;
        header.gd_offset = layout.gd;
        header.overhead = layout.overhead;
        validate_header(&header)?;
        pointer(layout.overhead, path)?;
        let descriptor = single_sparse_descriptor(params, ids, name)?;
        let out = TempOutput::create_with(path, params.durable)?;
        let tables = usize::try_from(layout.tables).map_err(|_| {
            Error::unsupported(format!("{} grain tables", layout.tables)).in_file(path)
        })?;
        Ok(Box::new(SparseWriter {
            out,
            size: params.capacity * SECTOR,
            alloc: Mutex::new(Alloc {
                next: layout.overhead,
                tables: vec![None; tables],
            }),
            header,
            layout,
            descriptor,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        // Every update under the lock is complete before it is released: a poisoned lock still
        // holds consistent state.
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn grain(&self) -> u64 {
        self.header.grain_size()
    }
}

impl ImageWriter for SparseWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        self.grain()
    }

    fn order(&self) -> WriteOrder {
        WriteOrder::Any
    }

    fn commit(&self, prepared: Prepared) -> Result<()> {
        let grain = self.grain();
        let path = self.out.file().path();
        let len: u64 = prepared.units.iter().map(|u| u.bytes.len() as u64).sum();
        if !prepared.off.is_multiple_of(grain)
            || prepared
                .off
                .checked_add(len)
                .is_none_or(|end| end > self.size)
        {
            return Err(Error::InvalidArgument {
                path: path.to_path_buf(),
                reason: format!(
                    "commit of {len} bytes at {:#x}: not grain-aligned or past the end",
                    prepared.off
                ),
            });
        }
        let count = len.div_ceil(grain);
        let first = prepared.off / grain;
        let per_gt = u64::from(GTES_PER_GT);
        let start = {
            let mut a = self.lock();
            let start = a.next;
            let end = start + count * self.header.grain_sectors;
            pointer(end, path)?;
            for i in 0..count {
                let g = first + i;
                let gt_index = (g / per_gt) as usize;
                let sector = pointer(start + i * self.header.grain_sectors, path)?;
                let table = a
                    .tables
                    .get_mut(gt_index)
                    .ok_or_else(|| Error::InvalidArgument {
                        path: path.to_path_buf(),
                        reason: format!("grain {g} past the grain directory"),
                    })?
                    .get_or_insert_with(|| vec![0u32; GTES_PER_GT as usize].into());
                table[(g % per_gt) as usize] = sector;
            }
            a.next = end;
            start
        };
        let mut at = start * SECTOR;
        for unit in &prepared.units {
            self.out.file().write_all_at(&unit.bytes, at)?;
            at += unit.bytes.len() as u64;
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        // Only overlays need this, and a new VMDK has no parent: unallocated grains read as
        // zeros already.
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::InvalidArgument {
                path: self.out.file().path().to_path_buf(),
                reason: format!("zero range {off:#x}+{len:#x} past the end"),
            });
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let SparseWriter {
            out,
            header,
            layout,
            descriptor,
            alloc,
            ..
        } = *self;
        let alloc = alloc.into_inner().unwrap_or_else(|e| e.into_inner());
        let file = out.file();
        for (i, table) in alloc.tables.iter().enumerate() {
            if let Some(t) = table {
                let bytes = encode_table(t);
                let rel = i as u64 * GT_SECTORS;
                file.write_all_at(&bytes, (layout.rgt + rel) * SECTOR)?;
                file.write_all_at(&bytes, (layout.gt + rel) * SECTOR)?;
            }
        }
        file.write_all_at(&layout.encode_directory(layout.rgt), layout.rgd * SECTOR)?;
        file.write_all_at(&layout.encode_directory(layout.gt), layout.gd * SECTOR)?;
        file.write_all_at(&descriptor, SECTOR)?;
        file.write_all_at(&encode_header(&header), 0)?;
        // The last grain is whole in the file even when the disk ends inside it, and an empty
        // disk still spans its preallocated metadata.
        out.set_len(alloc.next.max(layout.overhead) * SECTOR)?;
        out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_vmwares_for_a_small_disk() {
        // VMware's 10 MiB monolithicSparse sample: rgd 21, gd 26, overhead 128.
        let l = SparseLayout::new(1, 128);
        assert_eq!(
            (l.rgd, l.rgt, l.gd, l.gt, l.overhead),
            (21, 22, 26, 27, 128)
        );
    }

    #[test]
    fn layout_of_a_large_disk_rounds_overhead_to_a_grain() {
        // 100 GiB at 64 KiB grains: 3200 tables, 25-sector directories.
        let l = SparseLayout::new(3200, 128);
        assert_eq!(l.rgt, 21 + 25);
        assert_eq!(l.gd, 46 + 3200 * 4);
        assert_eq!(l.gt, l.gd + 25);
        assert_eq!(l.overhead % 128, 0);
        assert!(l.overhead >= l.gt + 3200 * 4 && l.overhead < l.gt + 3200 * 4 + 128);
        let dir = l.encode_directory(l.gt);
        assert_eq!(dir.len(), 25 * 512);
        assert_eq!(&dir[4..8], &((l.gt + 4) as u32).to_le_bytes());
    }
}
