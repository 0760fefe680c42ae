//! A sparse extent opened: its header, grain directory and grain-table cache, and the mapping of
//! an offset inside the extent to where its bytes are ([`GrainMap`]).
//!
//! The grain directory (GD) is read at open (capped by [`MAX_GD_ENTRIES`] and by the file's
//! length). Grain tables (GT) are read on demand into a bounded FIFO cache behind a mutex; the
//! lock is held only to look up or insert an `Arc` of a table, never during data I/O.
//!
//! Stream-optimized disks written by VMware put `GD_AT_END` in the header: the real header is
//! the footer, one sector before the end-of-stream marker and one after a footer marker:
//!
//! ```text
//! ... | GT marker | GTs | GD marker | GD | footer marker | footer (header copy) | EOS marker |
//!                                          len-1536        len-1024               len-512
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::file::ImageFile;

use super::header::{
    self, GD_AT_END, GTE_ZEROED, MARKER_EOS, MARKER_FOOTER, MAX_GD_ENTRIES, Marker, SECTOR,
    SparseHeader, SparseKind,
};

/// Grain tables kept in memory per extent: 512 tables of 512 entries cover 16 GiB of guest space
/// at 64 KiB grains in 1 MiB of memory (8 MiB for COWD's 4096-entry tables).
pub const MAX_CACHED_GTS: usize = 512;

/// Where the bytes of a run inside a sparse extent are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrainMap {
    /// Uncompressed grain data at this byte offset of the extent file.
    Host(u64),
    /// A zeroed grain (GTE 1 with the zeroed-grain flag).
    Zero,
    /// Not allocated in this extent: the parent's bytes, or zeros.
    Unallocated,
    /// A compressed grain whose marker (or stream) starts at byte `at` of the file; the run
    /// starts `within` bytes into the grain, which begins at byte `grain_start` of the extent.
    Compressed {
        at: u64,
        grain_start: u64,
        within: u64,
    },
}

/// Bounded FIFO cache of grain tables, keyed by grain directory index.
#[derive(Debug, Default)]
struct GtCache {
    tables: HashMap<u64, Arc<[u32]>>,
    order: VecDeque<u64>,
}

/// An open sparse extent (hosted KDMV or COWD).
#[derive(Debug)]
pub struct SparseExtent {
    /// The extent file.
    pub file: ImageFile,
    /// The effective header (the footer for GD-at-end stream-optimized files).
    pub header: SparseHeader,
    /// The start-of-file header said `GD_AT_END` and `header` is the footer.
    pub gd_at_end: bool,
    /// Grain directory: sector offsets of the grain tables (0: table absent).
    pub gd: Vec<u32>,
    cache: Mutex<GtCache>,
}

impl SparseExtent {
    /// Opens the sparse extent in `file`, whose first bytes `head` (at least 2048 when the file
    /// is that long) were already read.
    pub fn open(file: ImageFile, head: &[u8]) -> Result<Self> {
        let magic = head.get(0..4);
        let (header, gd_at_end) = if magic == Some(&header::COWD_MAGIC[..]) {
            (header::parse_cowd(head, 0)?, false)
        } else {
            let h = header::parse_hosted(head, 0)?;
            if h.gd_offset == GD_AT_END {
                (read_footer(&file)?, true)
            } else {
                (h, false)
            }
        };
        let gd = read_directory(&file, &header, header.gd_offset, "grain directory")?;
        Ok(SparseExtent {
            file,
            header,
            gd_at_end,
            gd,
            cache: Mutex::new(GtCache::default()),
        })
    }

    /// Reads the grain table at `sector` (uncached; for checks too).
    pub fn read_gt_at(&self, sector: u32, structure: &'static str) -> Result<Vec<u32>> {
        let off = u64::from(sector) * SECTOR;
        let raw = read_bounded(&self.file, off, self.header.gt_bytes(), structure)?;
        Ok(le_u32s(&raw))
    }

    /// The grain table of directory index `index`, or `None` when the directory has no table.
    fn grain_table(&self, index: u64) -> Result<Option<Arc<[u32]>>> {
        let Some(&sector) = usize::try_from(index).ok().and_then(|i| self.gd.get(i)) else {
            return Ok(None);
        };
        if sector == 0 {
            return Ok(None);
        }
        if let Some(t) = self.lock().tables.get(&index) {
            return Ok(Some(Arc::clone(t)));
        }
        // Read without the lock; two threads may read the same table, which is harmless.
        let table: Arc<[u32]> = self.read_gt_at(sector, "grain table")?.into();
        let mut cache = self.lock();
        if !cache.tables.contains_key(&index) {
            if cache.order.len() >= MAX_CACHED_GTS
                && let Some(old) = cache.order.pop_front()
            {
                cache.tables.remove(&old);
            }
            cache.order.push_back(index);
            cache.tables.insert(index, Arc::clone(&table));
        }
        Ok(Some(table))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GtCache> {
        // A panic while holding the lock cannot leave the cache inconsistent (inserts are
        // paired), so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps `[off, off + max)` of the extent (`max` > 0) to its first run: grains of one kind
    /// inside one grain table, with contiguous host offsets for [`GrainMap::Host`]. Returns the
    /// mapping and the run's length (at least 1, at most `max`).
    pub fn map(&self, off: u64, max: u64) -> Result<(GrainMap, u64)> {
        let h = &self.header;
        let grain = h.grain_size();
        let cap = h.capacity_bytes();
        if off >= cap {
            return Ok((GrainMap::Unallocated, max));
        }
        let max = max.min(cap - off);
        let coverage = h.gt_coverage();
        let gd_index = off / coverage;
        let gt_end = (gd_index + 1).saturating_mul(coverage).min(cap);
        let limit = max.min(gt_end - off);
        let Some(table) = self.grain_table(gd_index)? else {
            return Ok((GrainMap::Unallocated, limit));
        };
        let first = ((off % coverage) / grain) as usize;
        let within = off % grain;
        let classify = |gte: u32| -> GrainMap {
            match gte {
                0 => GrainMap::Unallocated,
                GTE_ZEROED if h.zeroed_grain_gte() => GrainMap::Zero,
                s if h.compressed() => GrainMap::Compressed {
                    at: u64::from(s) * SECTOR,
                    grain_start: 0,
                    within: 0,
                },
                s => GrainMap::Host(u64::from(s) * SECTOR),
            }
        };
        let gte = table.get(first).copied().unwrap_or(0);
        let head = classify(gte);
        let mut run = (grain - within).min(limit);
        match head {
            GrainMap::Compressed { at, .. } => {
                let grain_start = off - within;
                Ok((
                    GrainMap::Compressed {
                        at,
                        grain_start,
                        within,
                    },
                    run,
                ))
            }
            GrainMap::Host(host) => {
                let start = host + within;
                let mut next_host = host + grain;
                let mut i = first + 1;
                while run < limit {
                    match table.get(i).map(|&g| classify(g)) {
                        Some(GrainMap::Host(h2)) if h2 == next_host => {
                            run = (run + grain).min(limit);
                            next_host += grain;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                Ok((GrainMap::Host(start), run))
            }
            kind => {
                let mut i = first + 1;
                while run < limit {
                    match table.get(i).map(|&g| classify(g)) {
                        Some(k) if k == kind => {
                            run = (run + grain).min(limit);
                            i += 1;
                        }
                        _ => break,
                    }
                }
                Ok((kind, run))
            }
        }
    }
}

/// Reads `len` bytes at `off`, refusing before allocating when the range passes the file's end.
pub fn read_bounded(
    file: &ImageFile,
    off: u64,
    len: usize,
    structure: &'static str,
) -> Result<Vec<u8>> {
    if off
        .checked_add(len as u64)
        .is_none_or(|end| end > file.len())
    {
        return Err(Error::Corrupt {
            path: file.path().to_path_buf(),
            structure,
            offset: off,
            reason: format!("{len} bytes needed but the file ends at {:#x}", file.len()),
        });
    }
    file.read_vec(off, len, structure)
}

/// Reads a grain directory of `header.gd_entries` entries at `sector`.
pub fn read_directory(
    file: &ImageFile,
    header: &SparseHeader,
    sector: u64,
    structure: &'static str,
) -> Result<Vec<u32>> {
    // gd_entries is capped by MAX_GD_ENTRIES at parse time; re-check for the type's sake.
    if header.gd_entries > MAX_GD_ENTRIES {
        return Err(Error::corrupt(structure, 0, "too many entries").in_file(file.path()));
    }
    let off = sector.checked_mul(SECTOR).ok_or_else(|| {
        Error::corrupt(structure, 0, format!("sector {sector:#x} overflows")).in_file(file.path())
    })?;
    let raw = read_bounded(file, off, header.gd_entries as usize * 4, structure)?;
    Ok(le_u32s(&raw))
}

fn le_u32s(raw: &[u8]) -> Vec<u32> {
    raw.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads and validates the footer of a GD-at-end stream-optimized file: footer marker at
/// `len - 1536`, footer at `len - 1024`, end-of-stream marker at `len - 512`.
fn read_footer(file: &ImageFile) -> Result<SparseHeader> {
    let len = file.len();
    let corrupt = |structure: &'static str, offset: u64, reason: String| Error::Corrupt {
        path: file.path().to_path_buf(),
        structure,
        offset,
        reason,
    };
    if len < 4 * SECTOR {
        return Err(corrupt(
            "footer",
            0,
            "header says the grain directory is at the end, but the file is too short for a footer"
                .into(),
        ));
    }
    let base = len - 3 * SECTOR;
    let tail = file.read_vec(base, 3 * SECTOR as usize, "footer")?;
    let (marker, rest) = tail.split_at(SECTOR as usize);
    let (footer, eos) = rest.split_at(SECTOR as usize);
    match header::parse_marker(marker, base)? {
        Marker::Metadata {
            kind: MARKER_FOOTER,
            ..
        } => {}
        other => {
            return Err(corrupt(
                "footer marker",
                base,
                format!("expected a footer marker, found {other:?}"),
            ));
        }
    }
    match header::parse_marker(eos, len - SECTOR)? {
        Marker::Metadata {
            sectors: 0,
            kind: MARKER_EOS,
        } => {}
        other => {
            return Err(corrupt(
                "end-of-stream marker",
                len - SECTOR,
                format!("expected an end-of-stream marker, found {other:?}"),
            ));
        }
    }
    let h = header::parse_hosted(footer, base + SECTOR).map_err(|e| e.in_file(file.path()))?;
    if h.gd_offset == GD_AT_END {
        return Err(corrupt(
            "footer",
            base + SECTOR + 56,
            "footer's grain directory offset is GD_AT_END too".into(),
        ));
    }
    debug_assert_eq!(h.kind, SparseKind::Hosted);
    Ok(h)
}
