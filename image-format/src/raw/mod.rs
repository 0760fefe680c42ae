//! Raw images: the guest bytes as they are, holes kept sparse (SEEK_DATA/SEEK_HOLE).

use std::sync::Arc;

use crate::blockdev::{BlockDevice, Caps, Extent, ExtentKind, check_range, check_status_range};
use crate::error::Result;
use crate::file::ImageFile;
use crate::image::{Image, ImageInfo};
use crate::registry::{Driver, OpenContext, Probe};

/// The raw format driver.
#[derive(Debug, Default)]
pub struct RawDriver;

impl Driver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _probe: &Probe<'_>) -> u32 {
        // Anything is a raw image; claim a file only when nothing else does.
        1
    }

    fn open(&self, ctx: &OpenContext<'_>) -> Result<Arc<dyn Image>> {
        let file = ImageFile::open_with(ctx.path(), ctx.writable())?;
        Ok(Arc::new(RawImage::new(file)))
    }
}

/// An open raw image.
#[derive(Debug)]
pub struct RawImage {
    file: ImageFile,
}

impl RawImage {
    /// Wraps an open file.
    pub fn new(file: ImageFile) -> Self {
        RawImage { file }
    }
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.file.len()
    }

    fn caps(&self) -> Caps {
        Caps::EXTENTS | Caps::MULTI_CONN
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        self.file.read_exact_at(buf, off, "raw data")
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        check_status_range(off, len, self.size())?;
        let (kind, run) = self.file.allocation_at(off, len)?;
        Ok(match kind {
            ExtentKind::Data => Extent::data_at(run, self.file.shared_path(), off),
            other => Extent::new(other, run),
        })
    }
}

impl Image for RawImage {
    fn format(&self) -> &'static str {
        "raw"
    }

    fn info(&self) -> Result<ImageInfo> {
        let path = self.file.path().to_path_buf();
        Ok(ImageInfo::new(path.clone(), "raw", self.size(), vec![path]))
    }
}
