//! Raw images: the guest bytes as they are, holes kept sparse (SEEK_DATA/SEEK_HOLE), read and
//! written.

use std::path::Path;
use std::sync::Arc;

use crate::blockdev::{
    BlockDevice, BlockDeviceMut, Caps, Extent, ExtentKind, check_range, check_status_range,
};
use crate::create::{CreateOptions, ImageWriter, Prepared, TempOutput, WriteOrder};
use crate::error::{Error, Result};
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

    fn create(&self, path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
        options.reader("raw").finish()?;
        if options.backing.is_some() {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "a backing file for a raw image".into(),
            });
        }
        let out = TempOutput::create_with(path, !options.no_sync)?;
        out.set_len(options.size)?;
        Ok(Box::new(RawWriter {
            out,
            size: options.size,
        }))
    }
}

/// Writes a new raw image: data where the engine commits it, holes everywhere else.
#[derive(Debug)]
pub struct RawWriter {
    out: TempOutput,
    size: u64,
}

impl ImageWriter for RawWriter {
    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        // The file system block: the smallest hole a sparse file can keep.
        4096
    }

    fn order(&self) -> WriteOrder {
        WriteOrder::Any
    }

    fn commit(&self, prepared: Prepared) -> Result<()> {
        prepared.write_plain(self.out.file(), self.size)
    }

    fn write_zeroes(&self, _off: u64, _len: u64) -> Result<()> {
        // A new raw file is all holes: uncommitted ranges already read as zeros.
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.out.commit()
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
        let base = Caps::EXTENTS | Caps::MULTI_CONN;
        if self.file.is_writable() {
            base | Caps::WRITE | Caps::FLUSH | Caps::WRITE_ZEROES | Caps::DISCARD
        } else {
            base
        }
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

impl BlockDeviceMut for RawImage {
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.size())?;
        self.writable_file()?.write_all_at(buf, off)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        check_range(off, len, self.size())?;
        self.writable_file()?.zero_range(off, len)
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.write_zeroes(off, len)
    }

    fn flush(&self) -> Result<()> {
        self.writable_file()?.sync_data()
    }
}

impl RawImage {
    fn writable_file(&self) -> Result<&ImageFile> {
        if self.file.is_writable() {
            Ok(&self.file)
        } else {
            Err(Error::ReadOnly {
                path: self.file.path().to_path_buf(),
                reason: "image opened read-only".into(),
            })
        }
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

    fn writes_in_place(&self) -> bool {
        true
    }

    fn into_mut_device(self: Arc<Self>) -> Option<Arc<dyn BlockDeviceMut>> {
        if self.file.is_writable() {
            Some(self)
        } else {
            None
        }
    }
}
