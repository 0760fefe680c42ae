//! Parallels expandable images (read-only), as QEMU's docs/interop/parallels.rst describes them.
//!
//! Layout: a 64-byte header, the BAT (one little-endian u32 per cluster) right after it, then the
//! data area. A BAT entry of zero means the cluster reads as zeros; otherwise it is the cluster's
//! file offset, counted in 512-byte sectors for `WithoutFreeSpace` images and in clusters for
//! `WithouFreSpacExt` images. The Format Extension cluster (dirty bitmaps) is reported, not read:
//! it does not change guest content.

mod header;

use std::sync::Arc;

use crate::blockdev::{BlockDevice, Caps, Extent, ExtentKind, check_range, check_status_range};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::image::{CheckReport, Image, ImageInfo};
use crate::registry::{Driver, OpenContext, Probe};

pub use header::{HEADER_SIZE, Header, Magic};

/// The Parallels format driver.
#[derive(Debug, Default)]
pub struct ParallelsDriver;

impl Driver for ParallelsDriver {
    fn name(&self) -> &'static str {
        "parallels"
    }

    fn probe(&self, probe: &Probe<'_>) -> u32 {
        match Header::parse(probe.head) {
            Ok(_) => 100,
            Err(_) => 0,
        }
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Arc<dyn Image>> {
        if ctx.writable() {
            return Err(Error::ReadOnly {
                path: ctx.path().to_path_buf(),
                reason: "writing parallels images is not supported".into(),
            });
        }
        let file = ImageFile::open(ctx.path())?;
        let head = file.read_vec(0, HEADER_SIZE.min(file.len() as usize), "header")?;
        let header = Header::parse(&head).map_err(|e| e.in_file(ctx.path()))?;
        header
            .validate(file.len())
            .map_err(|e| e.in_file(ctx.path()))?;
        let raw_bat = file.read_vec(HEADER_SIZE as u64, header.bat_entries as usize * 4, "BAT")?;
        let bat = raw_bat
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Arc::new(ParallelsImage { file, header, bat }))
    }
}

/// An open Parallels image.
#[derive(Debug)]
pub struct ParallelsImage {
    file: ImageFile,
    header: Header,
    bat: Vec<u32>,
}

impl ParallelsImage {
    /// Host offset of cluster `index`, or `None` when it is unallocated.
    fn cluster_host(&self, index: u64) -> Option<u64> {
        if self.header.empty {
            return None;
        }
        let entry = *self.bat.get(usize::try_from(index).ok()?)?;
        (entry != 0).then(|| self.header.entry_to_offset(entry))
    }
}

impl BlockDevice for ParallelsImage {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn caps(&self) -> Caps {
        Caps::EXTENTS | Caps::MULTI_CONN
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        let cs = self.header.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_cluster = pos % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match self.cluster_host(pos / cs) {
                Some(host) => self
                    .file
                    .read_exact_at(piece, host + in_cluster, "data cluster")?,
                None => piece.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        check_status_range(off, len, self.size())?;
        let cs = self.header.cluster_size;
        let end = off + len;
        let first = self.cluster_host(off / cs);
        let mut pos = off - off % cs + cs;
        // Extend over following clusters of the same kind (contiguous on the host for data).
        while pos < end {
            let next = self.cluster_host(pos / cs);
            let same = match (first, next) {
                (None, None) => true,
                (Some(a), Some(b)) => b == a + (pos - (off - off % cs)),
                _ => false,
            };
            if !same {
                break;
            }
            pos += cs;
        }
        let run = pos.min(end) - off;
        Ok(match first {
            Some(host) => Extent::data_at(run, self.file.shared_path(), host + off % cs),
            None => Extent::new(ExtentKind::Unallocated, run),
        })
    }
}

impl Image for ParallelsImage {
    fn format(&self) -> &'static str {
        "parallels"
    }

    fn info(&self) -> Result<ImageInfo> {
        let path = self.file.path().to_path_buf();
        let mut info = ImageInfo::new(path.clone(), "parallels", self.size(), vec![path]);
        info.subformat = Some(self.header.magic.name().to_string());
        info.cluster_size = Some(self.header.cluster_size);
        info.dirty = self.header.in_use;
        info.specific("bat-entries", self.header.bat_entries);
        info.specific("data-offset", self.header.data_offset);
        if self.header.ext_off != 0 {
            info.specific("format-extension-offset", self.header.ext_off);
        }
        if self.header.empty {
            info.specific("empty-image", true);
        }
        Ok(info)
    }

    fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let cs = self.header.cluster_size;
        let mut seen = std::collections::HashMap::new();
        let mut allocated = 0u64;
        let mut end = self.header.data_offset;
        for (i, &entry) in self.bat.iter().enumerate() {
            if entry == 0 {
                continue;
            }
            allocated += 1;
            let at = Some(HEADER_SIZE as u64 + 4 * i as u64);
            let host = self.header.entry_to_offset(entry);
            if host < self.header.data_offset {
                report.corruption(
                    "BAT",
                    at,
                    format!("cluster {i} at {host:#x} lies before the data area"),
                );
            } else if !(host - self.header.data_offset).is_multiple_of(cs) {
                report.corruption(
                    "BAT",
                    at,
                    format!("cluster {i} at {host:#x} is not cluster-aligned"),
                );
            }
            if host.saturating_add(cs) > self.file.len() {
                report.corruption(
                    "BAT",
                    at,
                    format!("cluster {i} at {host:#x} lies past the end of the file"),
                );
            }
            if let Some(other) = seen.insert(host, i) {
                report.corruption(
                    "BAT",
                    at,
                    format!("clusters {other} and {i} share host offset {host:#x}"),
                );
            }
            end = end.max(host.saturating_add(cs));
        }
        report.allocated_clusters = Some(allocated);
        report.total_clusters = Some(self.header.size.div_ceil(cs));
        report.image_end_offset = Some(end.max(self.header.data_offset));
        Ok(report)
    }
}
