//! In-place writing of existing fixed and dynamic VHD images: the [`BlockDeviceMut`] of
//! [`VhdImage`]. Differencing disks are refused at a writable open (their sector bitmaps would
//! need per-sector copy-on-write from the parent).
//!
//! * Fixed: guest offset = file offset; zeroes and discards punch holes (or write zeros).
//! * Dynamic: a write into an allocated block goes in place, without a lock. A write into an
//!   unallocated block allocates it where the footer at the end of the file is: first the
//!   footer is written at the block's end and synced (so the file always ends with a footer),
//!   then the block's sector bitmap (every sector present: readers of dynamic disks ignore it)
//!   over the old footer and the written bytes; the rest of the block is a hole of the host file
//!   (zeros). Only after a second sync is the BAT entry written. A crash before the BAT entry
//!   leaves an unreferenced block (VHD has no refcounts: nothing to repair). Should the footer
//!   at the end ever be missing, new blocks go past the end of the file, and readers (ours,
//!   qemu's) use the copy at offset 0. BAT entries only ever go from unallocated to allocated, so a block's host
//!   offset never changes once a request has seen it. `write_zeroes` and `discard` punch holes
//!   in allocated blocks' data and leave unallocated blocks alone (they read as zeros).
//!
//! # Overlap protection
//!
//! The BAT is untrusted: at a writable open the same survey `check` runs ([`survey`]) finds the
//! allocated blocks whose bitmap and data overlap the footer copy, the dynamic header, the BAT,
//! parent locator data, another block or the footer, or run past the file's data. A write,
//! zeroing or discard touching one of them is refused whole (nothing written) with a
//! corruption error naming the block, its BAT entry and host offset, what it overlaps, and
//! the guest offset; the set is empty for a sound image, so the check costs one branch then. A
//! new block is refused when some structure (a stray block past the end) already claims the
//! place it would take.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::blockdev::{BlockDeviceMut, check_range};
use crate::error::{Error, Result};

use super::check::{Claim, Claimant, Finding, survey};
use super::header::{BAT_UNALLOCATED, DiskType, FOOTER_SIZE, SECTOR};
use super::map::{BlockLocation, BlockMap};
use super::{Layout, Place, VhdImage};

/// Why a block of the BAT may not be written (the first reason the survey found), kept small:
/// a crafted table can name millions of bad blocks, and few reasons are ever told.
#[derive(Clone, Copy, Debug)]
enum BadBlock {
    /// It runs past the file's data, which ends at `end`.
    Outside { end: u64 },
    /// It overlaps this other claim.
    Overlaps(Claim),
}

impl std::fmt::Display for BadBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadBlock::Outside { end } => write!(f, "runs past the file's data to {end:#x}"),
            BadBlock::Overlaps(o) => {
                write!(f, "overlaps the {} at {:#x}..{:#x}", o.what, o.start, o.end)
            }
        }
    }
}

/// The in-place write state of a VHD opened writable.
#[derive(Debug)]
pub(super) struct Writer {
    /// The footer as written at the end of the file after each allocation.
    footer: [u8; FOOTER_SIZE],
    /// Where the next block goes (the footer at the end sits there); behind the allocation lock.
    next_block: Mutex<u64>,
    /// Allocated blocks whose bitmap and data overlap another structure or run past the file's
    /// data (found by the same survey as `check`), with why: never written.
    bad_blocks: BTreeMap<u64, BadBlock>,
    /// The end of the furthest range an existing structure claims: new blocks go after it.
    claims_end: u64,
}

/// Checks that the image can be written in place, finds where new blocks go and which
/// allocated blocks must not be written.
pub(super) fn open_writer(image: &VhdImage) -> Result<Writer> {
    let (file, disk_type) = (&image.file, image.footer.disk_type);
    let (copies, chosen) = (&image.copies, image.chosen);
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
    let mut bad_blocks = BTreeMap::new();
    let mut claims_end = 0;
    if let Layout::Sparse {
        header,
        header_offset,
        map,
    } = &image.layout
    {
        let found = survey(
            image,
            header,
            *header_offset,
            map,
            &mut |finding| match finding {
                // The first reason found for a block is the one told.
                Finding::Outside { block, end, .. } => {
                    bad_blocks.entry(block).or_insert(BadBlock::Outside { end });
                }
                Finding::Overlap { claim, prev } => {
                    for (c, other) in [(claim, prev), (prev, claim)] {
                        if let Claimant::Block(b) = c.what {
                            bad_blocks.entry(b).or_insert(BadBlock::Overlaps(other));
                        }
                    }
                }
                Finding::LocatorOutside(_) | Finding::Leaked { .. } => {}
            },
        );
        claims_end = found.claims_end;
    }
    Ok(Writer {
        footer: copy.bytes,
        next_block: Mutex::new(next),
        bad_blocks,
        claims_end,
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
        self.check_blocks(w, map, off, data.len() as u64)?;
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

    /// Refuses a request over `[off, off + len)` (before anything is written) when an allocated
    /// block it touches overlaps another structure or runs past the file's data.
    fn check_blocks(&self, w: &Writer, map: &BlockMap, off: u64, len: u64) -> Result<()> {
        if w.bad_blocks.is_empty() {
            return Ok(());
        }
        let mut pos = off;
        while pos < off + len {
            let loc = map.locate(pos, off + len - pos)?;
            if let BlockLocation::Allocated {
                block,
                bitmap_offset,
                ..
            } = loc
                && let Some(problem) = w.bad_blocks.get(&block)
            {
                return Err(Error::corrupt(
                    "VHD block allocation table",
                    map.table_offset() + 4 * block,
                    format!(
                        "block {block} at host offset {bitmap_offset:#x} {problem}; guest offset \
                         {pos:#x} is not written"
                    ),
                )
                .in_file(self.file.path()));
            }
            pos += match loc {
                BlockLocation::Allocated { len, .. } | BlockLocation::Unallocated { len } => len,
            };
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
        if start < w.claims_end {
            return Err(Error::corrupt(
                "VHD block allocation table",
                map.table_offset() + 4 * block,
                format!(
                    "block {block} would be allocated at host offset {start:#x}, but existing \
                     structures reach {:#x}",
                    w.claims_end
                ),
            )
            .in_file(self.file.path()));
        }
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
        // The footer moves first (and durably), so the file always ends with one: the old
        // copy is overwritten by the bitmap only after the new one is on disk.
        self.file.write_all_at(&w.footer, end)?;
        self.file.sync_data()?;
        self.file.write_all_at(&bitmap, start)?;
        self.file
            .write_all_at(piece, data_start + pos % map.block_size())?;
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
        let w = self.vhd_writer()?;
        let Layout::Sparse { map, .. } = &self.layout else {
            return self.file.zero_range(off, len);
        };
        self.check_blocks(w, map, off, len)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::BlockDevice;
    use crate::crash_test::{Scenario, crash_everywhere, open_writable, qemu, s, scratch};
    use crate::create::CreateOptions;
    use crate::registry::OpenOptions;
    use std::path::Path;

    fn open_rw(path: &Path) -> Arc<VhdImage> {
        open_writable(path, VhdImage::open)
    }

    /// qemu reads the crashed image exactly as we do, and our check finds no corruption.
    fn qemu_reads_it_like_us(path: &Path) -> std::result::Result<(), String> {
        let raw = path.with_extension("qemu.raw");
        let out = qemu(
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", s(path), s(&raw)],
        );
        if !out.status.success() {
            return Err(format!("qemu-img convert: {out:?}"));
        }
        let theirs = std::fs::read(&raw).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&raw);
        let img = crate::open(path, &OpenOptions::default()).map_err(|e| e.to_string())?;
        let mut ours = vec![0u8; img.size() as usize];
        img.read_at(&mut ours, 0).map_err(|e| e.to_string())?;
        if theirs != ours {
            return Err("qemu reads other bytes than we do".into());
        }
        let report = img.check().map_err(|e| e.to_string())?;
        if !report.corruptions.is_empty() {
            return Err(format!("vmnest check: {:?}", report.corruptions));
        }
        Ok(())
    }

    #[test]
    fn crashes_while_allocating_dynamic_blocks_keep_flushed_writes() {
        let dir = scratch("vhd-rw-crash");
        let img = dir.join("disk.vhd");
        let size = 4u64 << 20;
        let options = CreateOptions {
            size,
            options: vec![
                ("subformat".into(), "dynamic".into()),
                ("block_size".into(), "512K".into()),
            ],
            ..CreateOptions::default()
        };
        crate::default_registry()
            .create("vpc", &img, &options)
            .unwrap()
            .finish()
            .unwrap();
        // Some blocks allocated before the session, by a clean run of the writer.
        let mut initial = vec![0u8; size as usize];
        {
            let dev = open_rw(&img);
            assert_eq!(dev.size(), size);
            for (i, b) in initial[..700 << 10].iter_mut().enumerate() {
                *b = (i / 512 % 249) as u8 | 1;
            }
            dev.write_at(&initial[..700 << 10], 0).unwrap();
            dev.flush().unwrap();
        }
        crash_everywhere(&Scenario {
            dir: &dir,
            files: &["disk.vhd"],
            initial: &initial,
            seed: 4242,
            unit: 24 << 10,
            // Discards punch exactly the range (in allocated blocks; the rest reads zeros).
            discard_unit: Some(1),
            open: open_rw,
            file: |img| &img.file,
            peer_check: qemu_reads_it_like_us,
        });
    }
}
