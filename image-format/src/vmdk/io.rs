//! Executing mappings: reads of the guest address space split into runs by
//! [`VmdkImage::map`], contiguous host runs of one file merged into one `pread`, compressed grains
//! inflated (with a one-grain cache so small sequential reads inflate each grain once), and
//! unallocated runs read from the parent.

use std::sync::Arc;

use flate2::{Decompress, FlushDecompress, Status};

use crate::blockdev::read_padded;
use crate::error::{Error, Result};
use crate::file::ImageFile;

use super::header::{self, Marker};
use super::sparse::SparseExtent;
use super::{Body, Map, VmdkImage};

/// Largest compressed grain accepted, in bytes beyond the grain size: deflate can expand
/// incompressible data slightly, never by this much.
pub const MAX_COMPRESSED_OVERHEAD: u64 = 64 * 1024;

/// Bytes of a grain marker's head: `lba: u64`, `size: u32`.
const GRAIN_MARKER_HEAD: u64 = 12;

/// The last grain inflated, so reads smaller than a grain inflate it once.
#[derive(Debug, Default)]
pub struct GrainCache {
    slot: Option<(usize, u64, Arc<Vec<u8>>)>,
}

impl VmdkImage {
    /// Fills `buf` with guest bytes at `off` (range already checked).
    pub(super) fn read_guest(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let len = buf.len() as u64;
        let mut done = 0u64;
        // A pending host read: extent index, host offset, start in buf, length, zero-padded.
        let mut pending: Option<(usize, u64, usize, usize, bool)> = None;
        while done < len {
            let (map, run) = self.map(off + done, len - done)?;
            let start = done as usize;
            let run_usize = usize::try_from(run)
                .unwrap_or(usize::MAX)
                .min(buf.len() - start);
            let end = start + run_usize;
            if let Map::Host {
                extent,
                offset,
                padded,
            } = map
            {
                match &mut pending {
                    Some((e, h, s, l, p))
                        if *e == extent
                            && *p == padded
                            && *h + *l as u64 == offset
                            && *s + *l == start =>
                    {
                        *l += run_usize;
                    }
                    _ => {
                        if let Some(p) = pending.take() {
                            self.flush_host(buf, p)?;
                        }
                        pending = Some((extent, offset, start, run_usize, padded));
                    }
                }
            } else {
                if let Some(p) = pending.take() {
                    self.flush_host(buf, p)?;
                }
                let chunk = &mut buf[start..end];
                match map {
                    Map::Host { .. } => {}
                    Map::Zero => chunk.fill(0),
                    Map::Unallocated => self.read_parent(chunk, off + done)?,
                    Map::Compressed {
                        extent,
                        at,
                        grain_start,
                        within,
                    } => {
                        let grain = self.inflated_grain(extent, at, grain_start)?;
                        let from = usize::try_from(within).unwrap_or(usize::MAX);
                        let src = grain
                            .get(from..from.saturating_add(chunk.len()))
                            .ok_or_else(|| {
                                Error::corrupt("compressed grain", at, "grain shorter than its run")
                            })?;
                        chunk.copy_from_slice(src);
                    }
                }
            }
            done += run_usize as u64;
        }
        if let Some(p) = pending.take() {
            self.flush_host(buf, p)?;
        }
        Ok(())
    }

    fn flush_host(
        &self,
        buf: &mut [u8],
        (extent, host, start, len, padded): (usize, u64, usize, usize, bool),
    ) -> Result<()> {
        let file = self.extent_file(extent);
        let chunk = &mut buf[start..start + len];
        if padded {
            file.read_zero_padded(chunk, host)
        } else {
            file.read_exact_at(chunk, host, "grain")
        }
    }

    fn extent_file(&self, index: usize) -> &ImageFile {
        match self.extents.get(index).map(|e| &e.body) {
            Some(Body::Flat { file, .. }) => file,
            Some(Body::Sparse(s)) => &s.file,
            // map() only returns host runs of extents with files.
            _ => &self.main_file,
        }
    }

    /// Unallocated bytes: the parent's, zeros without a parent, an error when the parent is
    /// recorded but was not opened.
    fn read_parent(&self, chunk: &mut [u8], off: u64) -> Result<()> {
        match &self.parent {
            Some(parent) => read_padded(parent.as_ref(), chunk, off),
            None if self.parent_recorded => Err(Error::ReadOnly {
                path: self.path.clone(),
                reason: format!("read at {off:#x} needs the parent image, which was not opened"),
            }),
            None => {
                chunk.fill(0);
                Ok(())
            }
        }
    }

    /// The inflated grain whose marker is at `at` in the sparse extent `index`.
    fn inflated_grain(&self, index: usize, at: u64, grain_start: u64) -> Result<Arc<Vec<u8>>> {
        {
            let cache = self.grain_cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((i, a, g)) = &cache.slot
                && *i == index
                && *a == at
            {
                return Ok(Arc::clone(g));
            }
        }
        let Some(Body::Sparse(sparse)) = self.extents.get(index).map(|e| &e.body) else {
            return Err(Error::corrupt(
                "compressed grain",
                at,
                "not in a sparse extent",
            ));
        };
        let grain = Arc::new(inflate_grain(sparse, at, grain_start)?);
        let mut cache = self.grain_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.slot = Some((index, at, Arc::clone(&grain)));
        Ok(grain)
    }
}

/// Reads and inflates the compressed grain at byte `at` of `sparse`'s file; `grain_start` is
/// the grain's byte offset inside the extent (the last grain of a disk may be partial).
///
/// With markers, the grain is `{lba: u64, size: u32, data[size]}`; without, a zlib stream
/// starts at `at`. The result is exactly one grain: an inflated size other than the grain size
/// is a corruption, except that the disk's last grain may stop at the capacity.
pub fn inflate_grain(sparse: &SparseExtent, at: u64, grain_start: u64) -> Result<Vec<u8>> {
    let file = &sparse.file;
    let grain = sparse.header.grain_size();
    let max_compressed = grain + MAX_COMPRESSED_OVERHEAD;
    let corrupt = |reason: String| Error::Corrupt {
        path: file.path().to_path_buf(),
        structure: "compressed grain",
        offset: at,
        reason,
    };
    let (data_at, data_len) = if sparse.header.markers() {
        let mut head = [0u8; 16];
        let n = file.len().saturating_sub(at).min(16);
        if n < GRAIN_MARKER_HEAD {
            return Err(corrupt(format!(
                "grain marker past the end of the file ({:#x})",
                file.len()
            )));
        }
        file.read_exact_at(&mut head[..n as usize], at, "grain marker")?;
        match header::parse_marker(&head[..n as usize], at).map_err(|e| e.in_file(file.path()))? {
            Marker::Grain { size, .. } => (at + GRAIN_MARKER_HEAD, u64::from(size)),
            other => return Err(corrupt(format!("expected a grain marker, found {other:?}"))),
        }
    } else {
        (at, file.len().saturating_sub(at).min(max_compressed))
    };
    if data_len > max_compressed {
        return Err(corrupt(format!(
            "{data_len} compressed bytes for a {grain}-byte grain"
        )));
    }
    let data_len = data_len as usize;
    let mut input = vec![0u8; data_len];
    file.read_exact_at(&mut input, data_at, "compressed grain")?;
    let mut out = vec![0u8; grain as usize + 1];
    let mut z = Decompress::new(true);
    let status = z
        .decompress(&input, &mut out, FlushDecompress::Finish)
        .map_err(|e| corrupt(format!("deflate error: {e}")))?;
    let produced = z.total_out();
    if produced > grain {
        return Err(corrupt(format!(
            "inflates to more than the {grain}-byte grain"
        )));
    }
    if status != Status::StreamEnd {
        return Err(corrupt(format!(
            "deflate stream truncated after {produced} bytes"
        )));
    }
    let needed = grain.min(sparse.header.capacity_bytes().saturating_sub(grain_start));
    if produced < needed {
        return Err(corrupt(format!(
            "inflates to {produced} bytes, the grain needs {needed}"
        )));
    }
    // Bytes past `produced` are still the zeros the buffer was made of.
    out.truncate(grain as usize);
    Ok(out)
}
