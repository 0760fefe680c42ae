//! In-place writing of existing fixed and dynamic VHD images: the [`BlockDeviceMut`] of
//! [`VhdImage`]. Differencing disks are refused at a writable open (their sector bitmaps would
//! need per-sector copy-on-write from the parent).
//!
//! * Fixed: guest offset = file offset; zeroes and discards punch holes (or write zeros).
//! * Dynamic: a write into an allocated block goes in place, without a lock. A write into an
//!   unallocated block allocates it where the footer at the end of the file is: its sector
//!   bitmap (every sector present: readers of dynamic disks ignore it) and the written bytes go
//!   there, the rest of the block is a hole of the host file (zeros), and the footer moves to the
//!   block's end. Only then, after a sync, is the BAT entry written. A crash before the BAT entry
//!   leaves an unreferenced block (VHD has no refcounts: nothing to repair); a crash while the
//!   block is written leaves no footer at the end, and readers (ours, qemu's) fall back to the
//!   copy at offset 0. BAT entries only ever go from unallocated to allocated, so a block's host
//!   offset never changes once a request has seen it. `write_zeroes` and `discard` punch holes
//!   in allocated blocks' data and leave unallocated blocks alone (they read as zeros).

use std::sync::{Arc, Mutex};

use crate::blockdev::{BlockDeviceMut, check_range};
use crate::error::{Error, Result};
use crate::file::ImageFile;

use super::header::{BAT_UNALLOCATED, DiskType, FOOTER_SIZE, SECTOR};
use super::map::BlockLocation;
use super::{FooterCopy, Layout, Place, VhdImage};

/// The in-place write state of a VHD opened writable.
#[derive(Debug)]
pub(super) struct Writer {
    /// The footer as written at the end of the file after each allocation.
    footer: [u8; FOOTER_SIZE],
    /// Where the next block goes (the footer at the end sits there); behind the allocation lock.
    next_block: Mutex<u64>,
}

/// Checks that the image can be written in place and finds where new blocks go.
pub(super) fn open_writer(
    file: &ImageFile,
    disk_type: DiskType,
    copies: &[FooterCopy],
    chosen: usize,
) -> Result<Writer> {
    if disk_type == DiskType::Differencing {
        return Err(Error::unsupported(
            "writing VHD differencing disks in place (only fixed and dynamic ones)",
        )
        .in_file(file.path()));
    }
    let copy = &copies[chosen];
    // The footer at the end is overwritten by the first new block; without one (a crash while
    // a block was written, or only the copy at offset 0), new blocks go past everything.
    let next = match copy.place {
        Place::End | Place::EndOld => copy.offset.div_ceil(SECTOR) * SECTOR,
        Place::Start => file.len().div_ceil(SECTOR) * SECTOR,
    };
    Ok(Writer {
        footer: copy.bytes,
        next_block: Mutex::new(next),
    })
}

impl VhdImage {
    fn vhd_writer(&self) -> Result<&Writer> {
        self.writer.as_ref().ok_or_else(|| Error::ReadOnly {
            path: self.file.path().to_path_buf(),
            reason: "image opened read-only".into(),
        })
    }

    /// Writes `data` at guest `off`, allocating dynamic blocks as needed.
    fn vhd_write(&self, data: &[u8], off: u64) -> Result<()> {
        check_range(off, data.len() as u64, self.size)?;
        let w = self.vhd_writer()?;
        let Layout::Sparse { map, .. } = &self.layout else {
            return self.file.write_all_at(data, off);
        };
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let in_block = pos % map.block_size();
            let n = ((map.block_size() - in_block) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            match map.locate(pos, n as u64)? {
                BlockLocation::Allocated { data_offset, .. } => {
                    self.file.write_all_at(piece, data_offset)?;
                }
                BlockLocation::Unallocated { .. } => self.allocate_block(w, pos, piece)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Allocates the block holding guest `pos` with `piece` written into it (another thread
    /// may have allocated it meanwhile: then the piece is written in place).
    fn allocate_block(&self, w: &Writer, pos: u64, piece: &[u8]) -> Result<()> {
        let Layout::Sparse { map, header, .. } = &self.layout else {
            return Ok(());
        };
        let mut next = w.next_block.lock().unwrap_or_else(|e| e.into_inner());
        if let BlockLocation::Allocated { data_offset, .. } = map.locate(pos, 1)? {
            return self.file.write_all_at(piece, data_offset);
        }
        let block = pos / map.block_size();
        let start = *next;
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNALLOCATED)
            .ok_or_else(|| {
                Error::unsupported("a VHD block past the 2 TiB the BAT can address")
                    .in_file(self.file.path())
            })?;
        let bitmap = super::write::full_bitmap(header.block_size);
        let data_start = start + map.bitmap_size();
        let end = data_start + map.block_size();
        self.file.write_all_at(&bitmap, start)?;
        self.file
            .write_all_at(piece, data_start + pos % map.block_size())?;
        self.file.write_all_at(&w.footer, end)?;
        self.file.sync_data()?;
        self.file
            .write_all_at(&sector.to_be_bytes(), map.table_offset() + block * 4)?;
        map.set_entry(block, sector);
        *next = end;
        Ok(())
    }

    /// Makes `[off, off + len)` read as zeros: holes in fixed disks and allocated blocks;
    /// unallocated blocks already read as zeros.
    fn vhd_zero(&self, off: u64, len: u64) -> Result<()> {
        check_range(off, len, self.size)?;
        self.vhd_writer()?;
        let Layout::Sparse { map, .. } = &self.layout else {
            return self.file.zero_range(off, len);
        };
        let mut pos = off;
        while pos < off + len {
            match map.locate(pos, off + len - pos)? {
                BlockLocation::Allocated {
                    data_offset, len, ..
                } => {
                    self.file.zero_range(data_offset, len)?;
                    pos += len;
                }
                BlockLocation::Unallocated { len } => pos += len,
            }
        }
        Ok(())
    }

    /// This image as a writable device, when it was opened writable.
    pub(super) fn mut_device(self: Arc<Self>) -> Option<Arc<dyn BlockDeviceMut>> {
        if self.writer.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl BlockDeviceMut for VhdImage {
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.vhd_write(buf, off)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.vhd_zero(off, len)
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.vhd_zero(off, len)
    }

    fn flush(&self) -> Result<()> {
        self.vhd_writer()?;
        self.file.sync_data()
    }
}
