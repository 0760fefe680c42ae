//! [`LoggedFile`]: the image file as it would be after replaying its log, without writing it.
//!
//! Every read of the driver (region tables, metadata, BAT, sector bitmaps, payload data) goes
//! through [`LoggedFile::read_exact_at`], which reads the file and then patches in the bytes the
//! replayed log overwrites. A file without a log to replay has no overlay and reads straight
//! through. The overlay is immutable after open, so reads need no lock.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::file::ImageFile;

use super::log::{Overlay, Replay};

/// An image file seen through an optional in-memory log replay.
#[derive(Debug)]
pub struct LoggedFile {
    file: ImageFile,
    overlay: Option<Overlay>,
    /// The file's length after replay: the log may extend it (LastFileOffset).
    len: u64,
}

impl LoggedFile {
    /// The file as it is.
    pub fn plain(file: ImageFile) -> Self {
        let len = file.len();
        LoggedFile {
            file,
            overlay: None,
            len,
        }
    }

    /// The file with `replay` applied in memory.
    pub fn replayed(file: ImageFile, replay: Replay) -> Self {
        let len = file
            .len()
            .max(replay.last_file_offset)
            .max(replay.overlay.end());
        LoggedFile {
            file,
            overlay: Some(replay.overlay),
            len,
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The path, shared, for host locations.
    pub fn shared_path(&self) -> &Arc<Path> {
        self.file.shared_path()
    }

    /// Length after replay.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when a log was replayed in memory.
    pub fn is_replayed(&self) -> bool {
        self.overlay.is_some()
    }

    /// True when `[off, off + len)` holds bytes from the log rather than from the file.
    pub fn overlaid(&self, off: u64, len: u64) -> bool {
        self.overlay
            .as_ref()
            .is_some_and(|o| o.intersects(off, len))
    }

    /// Reads exactly `buf.len()` bytes at `off` as they are after replay. Past the replayed
    /// length is a corruption of `structure`; between the file's end and the replayed length
    /// (a file the log extends) reads zeros.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64, structure: &'static str) -> Result<()> {
        let Some(overlay) = &self.overlay else {
            return self.file.read_exact_at(buf, off, structure);
        };
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(Error::Corrupt {
                path: self.path().to_path_buf(),
                structure,
                offset: off,
                reason: format!(
                    "{} bytes needed but the file ends at {:#x} after log replay",
                    buf.len(),
                    self.len
                ),
            });
        }
        self.file.read_zero_padded(buf, off)?;
        overlay.patch(buf, off);
        Ok(())
    }

    /// Reads a structure of `len` bytes (bounded by the caller) into a new vector.
    pub fn read_vec(&self, off: u64, len: usize, structure: &'static str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, off, structure)?;
        Ok(buf)
    }
}
