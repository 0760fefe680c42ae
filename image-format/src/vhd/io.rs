//! Executing the mapping: `read_at` and `block_status` of an open VHD.
//!
//! A request is cut into [`Piece`]s, each the longest run that one source serves: a host range
//! of this file (one `pread`: the whole request for a fixed disk, up to a block for dynamic
//! disks, a run of set bitmap bits for differencing disks), zeros, or the parent. BAT entries
//! change only from unallocated to allocated (by `rw.rs`, after the block is written); sector bitmaps of differencing disks are read on demand
//! into a bounded cache whose lock is never held during I/O.

use std::collections::HashMap;
use std::sync::Arc;

use crate::blockdev::{
    BlockDevice, Caps, Extent, ExtentKind, backing_status, check_range, check_status_range,
    read_padded,
};
use crate::error::{Error, Result};

use super::map::{BlockLocation, bitmap_run};
use super::{Layout, VhdImage};

/// Cap on the bytes of sector bitmaps kept in memory (a 2 MiB block has a 512-byte bitmap, so
/// 8 MiB caches the bitmaps of 32 GiB of allocated differencing data). Past it the cache is
/// emptied and refilled.
pub const MAX_CACHED_BITMAP_BYTES: usize = 8 << 20;

/// The bitmaps of allocated blocks of a differencing disk, by block number.
#[derive(Debug, Default)]
pub(super) struct BitmapCache {
    map: HashMap<u64, Arc<[u8]>>,
    bytes: usize,
}

/// One run of a request, served by one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Piece {
    /// `len` bytes stored in this file at `offset`.
    Host { offset: u64, len: u64, fixed: bool },
    /// `len` bytes not allocated in this file, with no parent: zeros.
    Unallocated { len: u64 },
    /// `len` bytes that the parent image holds.
    Parent { len: u64 },
}

impl Piece {
    fn len(self) -> u64 {
        match self {
            Piece::Host { len, .. } | Piece::Unallocated { len } | Piece::Parent { len } => len,
        }
    }
}

impl VhdImage {
    /// The piece that starts at `off`, at most `len` bytes (inside the disk, `len` > 0).
    pub(super) fn piece(&self, off: u64, len: u64) -> Result<Piece> {
        let Layout::Sparse { map, .. } = &self.layout else {
            return Ok(Piece::Host {
                offset: off,
                len,
                fixed: true,
            });
        };
        match map.locate(off, len)? {
            BlockLocation::Unallocated { len } if self.parent.is_some() => {
                Ok(Piece::Parent { len })
            }
            BlockLocation::Unallocated { len } => Ok(Piece::Unallocated { len }),
            BlockLocation::Allocated {
                block,
                bitmap_offset,
                data_offset,
                in_block,
                len,
            } => {
                if self.parent.is_none() {
                    // Dynamic disks: the spec has writers zero-fill new blocks, and qemu, Hyper-V
                    // and Virtual PC all read an allocated block whole; its bitmap is not
                    // consulted.
                    return Ok(Piece::Host {
                        offset: data_offset,
                        len,
                        fixed: false,
                    });
                }
                let bitmap = self.bitmap(block, bitmap_offset, map.bitmap_size())?;
                let (present, run) = bitmap_run(&bitmap, in_block, len);
                Ok(if present {
                    Piece::Host {
                        offset: data_offset,
                        len: run,
                        fixed: false,
                    }
                } else {
                    Piece::Parent { len: run }
                })
            }
        }
    }

    /// The sector bitmap of allocated block `block`, from the cache or the file.
    fn bitmap(&self, block: u64, offset: u64, size: u64) -> Result<Arc<[u8]>> {
        if let Some(hit) = self.lock_bitmaps().map.get(&block) {
            return Ok(Arc::clone(hit));
        }
        // Bounded: the bitmap of a block of at most MAX_BLOCK_SIZE is 64 KiB.
        let len = usize::try_from(size)
            .map_err(|_| Error::corrupt("VHD sector bitmap", offset, "too large"))?;
        let bitmap: Arc<[u8]> = self.file.read_vec(offset, len, "VHD sector bitmap")?.into();
        let mut cache = self.lock_bitmaps();
        if cache.bytes.saturating_add(len) > MAX_CACHED_BITMAP_BYTES {
            cache.map.clear();
            cache.bytes = 0;
        }
        if cache.map.insert(block, Arc::clone(&bitmap)).is_none() {
            cache.bytes += len;
        }
        Ok(bitmap)
    }

    fn lock_bitmaps(&self) -> std::sync::MutexGuard<'_, BitmapCache> {
        // The cache holds no invariant a panic could break: use it even if poisoned.
        self.bitmaps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn parent_device(&self) -> Result<&dyn BlockDevice> {
        match self.parent.as_ref().and_then(|p| p.image.as_ref()) {
            Some(image) => Ok(image.as_ref()),
            None => Err(Error::InvalidArgument {
                path: self.file.path().to_path_buf(),
                reason:
                    "the parent of this differencing disk was not opened; its data cannot be read"
                        .into(),
            }),
        }
    }
}

impl BlockDevice for VhdImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        let base = Caps::EXTENTS | Caps::MULTI_CONN;
        if self.writer.is_some() {
            base | Caps::WRITE | Caps::FLUSH | Caps::WRITE_ZEROES | Caps::DISCARD
        } else {
            base
        }
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let piece = self.piece(pos, (buf.len() - done) as u64)?;
            // A piece is never longer than what was asked, which fits in usize.
            let n = usize::try_from(piece.len())
                .unwrap_or(buf.len() - done)
                .min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match piece {
                Piece::Host { offset, fixed, .. } => {
                    let what = if fixed {
                        "VHD fixed disk data"
                    } else {
                        "VHD data block"
                    };
                    self.file.read_exact_at(out, offset, what)?;
                }
                Piece::Unallocated { .. } => out.fill(0),
                Piece::Parent { .. } => read_padded(self.parent_device()?, out, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        check_status_range(off, len, self.size)?;
        Ok(match self.piece(off, len)? {
            Piece::Host {
                offset,
                len,
                fixed: true,
            } => {
                // Fixed disks: guest offset = host offset; host holes read as zeros.
                let (kind, run) = self.file.allocation_at(offset, len)?;
                match kind {
                    ExtentKind::Data => Extent::data_at(run, self.file.shared_path(), offset),
                    other => Extent::new(other, run),
                }
            }
            Piece::Host { offset, len, .. } => {
                Extent::data_at(len, self.file.shared_path(), offset)
            }
            Piece::Unallocated { len } => Extent::new(ExtentKind::Unallocated, len),
            Piece::Parent { len } => match self.parent.as_ref().and_then(|p| p.image.as_ref()) {
                Some(parent) => backing_status(parent.as_ref(), off, len)?,
                None => Extent::new(ExtentKind::Unallocated, len),
            },
        })
    }
}
