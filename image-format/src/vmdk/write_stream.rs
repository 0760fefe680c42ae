//! The streamOptimized writer, in the layout VMware's own tools write (what ESXi, ovftool and
//! vSphere's content library import): everything in one front-to-back pass, metadata after the
//! data it describes, the grain directory found through a footer.
//!
//! ```text
//! sector 0        header: version 3, flags 0x30001, deflate, gdOffset = GD_AT_END
//! 1..21           embedded descriptor
//! 128 (overhead)  grain marker {lba, size} + zlib stream, padded to a sector   } ascending
//!                 ...                                                          } guest order
//!                 GT marker {4 sectors, type 1} + grain table   after the grains of each table
//!                 GD marker {n sectors, type 2} + grain directory
//!                 footer marker {1, type 3} + footer (the header with the real gdOffset)
//!                 end-of-stream marker (a zero sector); nothing after it
//! ```
//!
//! `prepare` deflates each grain (a partial last grain padded with zeros to a whole grain, so
//! every reader inflates exactly one grain) into its finished marker, on the engine's worker
//! threads. `commit` ([`WriteOrder::Ascending`]) only appends; when the first grain of a new
//! grain table arrives, the previous table is appended. Grain tables with no grain are not
//! written at all (directory entry 0), as VMware allocates stream tables on demand. Memory: the
//! directory and one grain table.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use flate2::Compression;
use flate2::write::ZlibEncoder;

use crate::create::{ImageWriter, Prepared, TempOutput, Unit, WriteOrder};
use crate::error::{Error, Result};

use super::header::{GD_AT_END, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR, SparseHeader};
use super::write::{
    DESCRIPTOR_SECTORS, GT_SECTORS, GTES_PER_GT, Identity, Params, encode_eos_marker,
    encode_grain_marker_head, encode_header, encode_metadata_marker, gd_sectors, new_header,
    pointer, single_sparse_descriptor, validate_header,
};
use super::write_sparse::encode_table;

/// Appending state (one committer at a time, but `commit` takes `&self`).
#[derive(Debug)]
struct Tail {
    /// Next sector to append at.
    next: u64,
    /// Directory index of the table being filled, with its entries.
    table: Option<(u64, Vec<u32>)>,
    /// Grain directory: sector of each written table, 0 for none.
    gd: Vec<u32>,
    /// The last grain appended, to enforce ascending order.
    last_grain: Option<u64>,
}

/// Writes a new streamOptimized VMDK.
#[derive(Debug)]
pub struct StreamWriter {
    out: TempOutput,
    header: SparseHeader,
    descriptor: Vec<u8>,
    size: u64,
    tail: Mutex<Tail>,
}

impl StreamWriter {
    /// Starts the file at `path` (recorded in its own descriptor as `name`).
    pub fn create(
        path: &Path,
        name: &str,
        params: &Params,
        ids: &Identity,
    ) -> Result<Box<dyn ImageWriter>> {
        let mut header = new_header(params, true);
        header.gd_offset = GD_AT_END;
        // Grains start at the first grain boundary after the descriptor, as VMware's files do.
        header.overhead =
            (1 + DESCRIPTOR_SECTORS).div_ceil(header.grain_sectors) * header.grain_sectors;
        validate_header(&header)?;
        let descriptor = single_sparse_descriptor(params, ids, name)?;
        let entries = usize::try_from(header.gd_entries).map_err(|_| {
            Error::unsupported(format!("{} grain tables", header.gd_entries)).in_file(path)
        })?;
        let out = TempOutput::create_with(path, params.durable)?;
        Ok(Box::new(StreamWriter {
            out,
            size: params.capacity * SECTOR,
            tail: Mutex::new(Tail {
                next: header.overhead,
                table: None,
                gd: vec![0; entries],
                last_grain: None,
            }),
            header,
            descriptor,
        }))
    }

    fn grain(&self) -> u64 {
        self.header.grain_size()
    }

    fn path(&self) -> &Path {
        self.out.file().path()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        // A failed commit fails the conversion, which then drops the writer: a poisoned lock is
        // never used to finish a file.
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Deflates one grain into its finished on-disk form: marker head, zlib stream, zero padding to
/// a sector. `data` shorter than `grain` (the disk's last grain) is padded with zeros first.
pub fn encode_grain(lba: u64, data: &[u8], grain: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(grain / 2 + 512);
    out.extend_from_slice(&encode_grain_marker_head(lba, 0));
    let mut z = ZlibEncoder::new(out, Compression::default());
    let deflate_err = |e: std::io::Error| Error::Io {
        path: Default::default(),
        op: "deflate",
        offset: lba * SECTOR,
        source: e,
    };
    z.write_all(data).map_err(deflate_err)?;
    if data.len() < grain {
        z.write_all(&vec![0u8; grain - data.len()])
            .map_err(deflate_err)?;
    }
    let mut out = z.finish().map_err(deflate_err)?;
    let size = u32::try_from(out.len() - 12).map_err(|_| {
        Error::unsupported(format!("a compressed grain of {} bytes", out.len() - 12))
    })?;
    out[8..12].copy_from_slice(&size.to_le_bytes());
    out.resize(out.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
    Ok(out)
}

impl Tail {
    /// Appends the table being filled, if any.
    fn flush_table(&mut self, file: &crate::file::ImageFile, path: &Path) -> Result<()> {
        let Some((index, entries)) = self.table.take() else {
            return Ok(());
        };
        let at = self.next;
        file.write_all_at(&encode_metadata_marker(GT_SECTORS, MARKER_GT), at * SECTOR)?;
        file.write_all_at(&encode_table(&entries), (at + 1) * SECTOR)?;
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.gd.get_mut(i))
            .ok_or_else(|| Error::InvalidArgument {
                path: path.to_path_buf(),
                reason: format!("grain table {index} past the grain directory"),
            })?;
        *slot = pointer(at + 1, path)?;
        self.next = at + 1 + GT_SECTORS;
        Ok(())
    }
}

impl ImageWriter for StreamWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        self.grain()
    }

    fn order(&self) -> WriteOrder {
        WriteOrder::Ascending
    }

    fn prepare(&self, off: u64, data: Vec<u8>) -> Result<Prepared> {
        let grain = self.grain();
        let len = data.len() as u64;
        if !off.is_multiple_of(grain) || off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::InvalidArgument {
                path: self.path().to_path_buf(),
                reason: format!(
                    "range of {len} bytes at {off:#x}: not grain-aligned or past the end"
                ),
            });
        }
        let mut units = Vec::with_capacity(data.len().div_ceil(grain as usize));
        for (i, chunk) in data.chunks(grain as usize).enumerate() {
            let lba = (off + i as u64 * grain) / SECTOR;
            let bytes =
                encode_grain(lba, chunk, grain as usize).map_err(|e| e.in_file(self.path()))?;
            units.push(Unit {
                bytes,
                compressed: true,
            });
        }
        Ok(Prepared { off, len, units })
    }

    fn commit(&self, prepared: Prepared) -> Result<()> {
        let grain = self.grain();
        let path = self.path();
        let file = self.out.file();
        let per_gt = u64::from(GTES_PER_GT);
        let mut tail = self.lock();
        for (i, unit) in prepared.units.iter().enumerate() {
            let g = prepared.off / grain + i as u64;
            if tail.last_grain.is_some_and(|last| g <= last) {
                return Err(Error::InvalidArgument {
                    path: path.to_path_buf(),
                    reason: format!("grain {g} committed out of ascending order"),
                });
            }
            let index = g / per_gt;
            if tail.table.as_ref().is_some_and(|(t, _)| *t != index) {
                tail.flush_table(file, path)?;
            }
            let at = tail.next;
            let sector = pointer(at, path)?;
            let sectors = (unit.bytes.len() as u64).div_ceil(SECTOR);
            pointer(at + sectors, path)?;
            file.write_all_at(&unit.bytes, at * SECTOR)?;
            let (_, entries) = tail
                .table
                .get_or_insert_with(|| (index, vec![0u32; GTES_PER_GT as usize]));
            entries[(g % per_gt) as usize] = sector;
            tail.next = at + sectors;
            tail.last_grain = Some(g);
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        // Only overlays need this, and a new VMDK has no parent: grains never written read as
        // zeros already.
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::InvalidArgument {
                path: self.path().to_path_buf(),
                reason: format!("zero range {off:#x}+{len:#x} past the end"),
            });
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let StreamWriter {
            out,
            mut header,
            descriptor,
            tail,
            ..
        } = *self;
        let mut tail = tail.into_inner().unwrap_or_else(|e| e.into_inner());
        let file = out.file();
        let path = file.path().to_path_buf();
        tail.flush_table(file, &path)?;
        let dir_sectors = gd_sectors(header.gd_entries);
        let at = tail.next;
        let mut dir = encode_table(&tail.gd);
        dir.resize((dir_sectors * SECTOR) as usize, 0);
        file.write_all_at(&encode_metadata_marker(dir_sectors, MARKER_GD), at * SECTOR)?;
        file.write_all_at(&dir, (at + 1) * SECTOR)?;
        let mut footer = header.clone();
        footer.gd_offset = at + 1;
        pointer(footer.gd_offset, &path)?;
        let at = at + 1 + dir_sectors;
        file.write_all_at(&encode_metadata_marker(1, MARKER_FOOTER), at * SECTOR)?;
        file.write_all_at(&encode_header(&footer), (at + 1) * SECTOR)?;
        file.write_all_at(&encode_eos_marker(), (at + 2) * SECTOR)?;
        header.gd_offset = GD_AT_END;
        file.write_all_at(&descriptor, SECTOR)?;
        file.write_all_at(&encode_header(&header), 0)?;
        // The file ends right after the end-of-stream marker (set_len also trims nothing, and
        // keeps the descriptor-to-first-grain gap a hole).
        out.set_len((at + 3) * SECTOR)?;
        out.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::{Marker, parse_marker};
    use super::*;
    use std::io::Read;

    #[test]
    fn encoded_grain_is_a_marker_and_a_zlib_stream_padded_to_a_sector() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let g = encode_grain(256, &data, 65536).unwrap();
        assert_eq!(g.len() % 512, 0);
        let Marker::Grain { lba, size } = parse_marker(&g, 0).unwrap() else {
            panic!("not a grain marker");
        };
        assert_eq!(lba, 256);
        assert!(size as usize + 12 <= g.len() && size as usize + 12 + 512 > g.len());
        let mut inflated = Vec::new();
        flate2::read::ZlibDecoder::new(&g[12..12 + size as usize])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated, data);
    }

    #[test]
    fn partial_last_grain_inflates_to_a_whole_grain() {
        let g = encode_grain(0, &[7u8; 1024], 4096).unwrap();
        let Marker::Grain { size, .. } = parse_marker(&g, 0).unwrap() else {
            panic!("not a grain marker");
        };
        let mut inflated = Vec::new();
        flate2::read::ZlibDecoder::new(&g[12..12 + size as usize])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated.len(), 4096);
        assert_eq!(&inflated[..1024], &[7u8; 1024][..]);
        assert!(inflated[1024..].iter().all(|&b| b == 0));
    }
}
