//! [`ImageFile`]: a host file read with positioned I/O (`pread`), so one handle serves many
//! threads, and whose errors always name the file and the offset.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::blockdev::ExtentKind;
use crate::error::{Error, Result};

/// An open host file: an image, a VMDK extent, a backing file.
#[derive(Debug)]
pub struct ImageFile {
    path: Arc<Path>,
    file: File,
    /// Length in bytes: as opened, grown by writes past the end (in-place writers append).
    len: AtomicU64,
    writable: bool,
    /// A regular file (not a block device): it can grow.
    regular: bool,
    /// Bytes written since writeback was last started (see [`ImageFile::write_all_at`]).
    unflushed: AtomicU64,
    /// Start writeback as writes accumulate (off for outputs that will not be synced).
    writeback: bool,
    /// Test-only fault injection and crash simulation (see [`fault`]).
    #[cfg(test)]
    faults: std::sync::Mutex<Option<fault::Recorder>>,
}

/// Written bytes after which writeback of the file is started in the background, so the fsync
/// that makes an image durable at the end has little left to do.
const WRITEBACK_EVERY: u64 = 32 << 20;

impl ImageFile {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Opens `path`, for writing too when `writable`.
    pub fn open_with(path: &Path, writable: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                op: "open",
                offset: 0,
                source,
            })?;
        let meta = file.metadata().map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op: "stat",
            offset: 0,
            source,
        })?;
        if meta.is_dir() {
            return Err(Error::InvalidArgument {
                path: path.to_path_buf(),
                reason: "is a directory".into(),
            });
        }
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            block_device_len(&file).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                op: "size query",
                offset: 0,
                source,
            })?
        };
        Ok(ImageFile {
            path: Arc::from(path),
            file,
            len: AtomicU64::new(len),
            writable,
            regular: meta.file_type().is_file(),
            unflushed: AtomicU64::new(0),
            writeback: writable,
            #[cfg(test)]
            faults: std::sync::Mutex::new(None),
        })
    }

    /// The path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path, shared, for [`crate::HostLocation`]s.
    pub fn shared_path(&self) -> &Arc<Path> {
        &self.path
    }

    /// Length of the file: as opened, or as grown since by [`ImageFile::write_all_at`].
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The underlying handle.
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// Reads exactly `buf.len()` bytes at `off`. A read past the end of the file is a corruption
    /// of `structure` (the image points outside itself), not an I/O error.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64, structure: &'static str) -> Result<()> {
        let end = off.checked_add(buf.len() as u64);
        let file_len = self.len();
        if end.is_none_or(|end| end > file_len) {
            return Err(Error::Corrupt {
                path: self.path.to_path_buf(),
                structure,
                offset: off,
                reason: format!(
                    "{} bytes needed but the file ends at {:#x}",
                    buf.len(),
                    file_len
                ),
            });
        }
        self.file
            .read_exact_at(buf, off)
            .map_err(|source| self.io_error("read", off, source))
    }

    /// Reads up to `buf.len()` bytes at `off`; bytes past the end of the file read as zeros.
    /// For flat extents and raw files, whose logical end may pass the physical one.
    pub fn read_zero_padded(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let avail = self.len().saturating_sub(off).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            self.file
                .read_exact_at(head, off)
                .map_err(|source| self.io_error("read", off, source))?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Reads a whole structure of `len` bytes (bounded by the caller) into a new vector.
    pub fn read_vec(&self, off: u64, len: usize, structure: &'static str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, off, structure)?;
        Ok(buf)
    }

    /// Writes all of `buf` at `off`. Every [`WRITEBACK_EVERY`] bytes, writeback of the file's
    /// dirty pages is started (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so a
    /// large conversion reaches the disk while it runs instead of all in its final fsync.
    pub fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        #[cfg(test)]
        self.fault_point("write", off, Some(buf), buf.len() as u64)?;
        self.file
            .write_all_at(buf, off)
            .map_err(|source| self.io_error("write", off, source))?;
        self.len
            .fetch_max(off.saturating_add(buf.len() as u64), Ordering::AcqRel);
        if !self.writeback {
            return Ok(());
        }
        let total = self
            .unflushed
            .fetch_add(buf.len() as u64, Ordering::Relaxed)
            + buf.len() as u64;
        if total >= WRITEBACK_EVERY
            && self
                .unflushed
                .compare_exchange(total, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // SAFETY: sync_file_range on a descriptor we own, over the whole file (offset 0,
            // length 0); it only schedules writeback. A failure is harmless: the final fsync
            // still makes everything durable.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        Ok(())
    }

    /// Deallocates `[off, off + len)` (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), so it reads as zeros
    /// and takes no space. Returns false when the file system cannot punch holes; the caller then
    /// writes zeros.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<bool> {
        let (Ok(off_t), Ok(len_t)) = (libc::off_t::try_from(off), libc::off_t::try_from(len))
        else {
            return Ok(false);
        };
        #[cfg(test)]
        self.fault_point("punch hole", off, None, len)?;
        // SAFETY: fallocate on a descriptor we own; it changes only the file's allocation in the
        // given range, which the caller asked to read as zeros.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off_t,
                len_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
            _ => Err(self.io_error("punch hole", off, err)),
        }
    }

    /// Grows a regular file to `len` bytes (a hole: reads as zeros) when it is shorter; returns
    /// false, doing nothing, for a block device, which cannot grow.
    pub fn extend_to(&self, len: u64) -> Result<bool> {
        if !self.regular {
            return Ok(false);
        }
        if len <= self.len() {
            return Ok(true);
        }
        #[cfg(test)]
        self.fault_point("extend", len, None, 0)?;
        self.file
            .set_len(len)
            .map_err(|source| self.io_error("extend", len, source))?;
        self.len.fetch_max(len, Ordering::AcqRel);
        Ok(true)
    }

    /// Makes `[off, off + len)` read as zeros: punches a hole, or writes zeros (in bounded
    /// pieces) where the file system cannot punch holes (a block device must still end up
    /// reading zeros).
    pub fn zero_range(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 || self.punch_hole(off, len)? {
            return Ok(());
        }
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(PIECE);
            self.write_all_at(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Stops starting writeback as writes accumulate (for files that will not be synced).
    pub fn disable_writeback(&mut self) {
        self.writeback = false;
    }

    /// `fdatasync`.
    pub fn sync_data(&self) -> Result<()> {
        #[cfg(test)]
        self.fault_point("sync", 0, None, 0)?;
        self.file
            .sync_data()
            .map_err(|source| self.io_error("sync", 0, source))
    }

    /// Bytes the file occupies on the host (allocated blocks), as `du` reports.
    pub fn allocated_bytes(&self) -> u64 {
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Whether the bytes at `off` are data or a hole of the host file system, and for how long
    /// (at most `max` bytes). Files on systems without SEEK_DATA report everything as data.
    pub fn allocation_at(&self, off: u64, max: u64) -> Result<(ExtentKind, u64)> {
        let file_len = self.len();
        if off >= file_len {
            return Ok((ExtentKind::Zero, max));
        }
        let fd = self.file.as_raw_fd();
        let Ok(off_t) = libc::off_t::try_from(off) else {
            return Ok((ExtentKind::Data, max));
        };
        // SAFETY: lseek on a descriptor we own; it only moves the file position, which this type
        // never uses (all reads and writes are positioned).
        let data = unsafe { libc::lseek(fd, off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data after `off`: a hole up to the end of the file.
                Some(libc::ENXIO) => Ok((ExtentKind::Zero, (file_len - off).min(max))),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((ExtentKind::Data, max)),
                _ => Err(self.io_error("SEEK_DATA", off, err)),
            };
        }
        let data = data as u64;
        if data > off {
            return Ok((ExtentKind::Zero, (data - off).min(max)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            let err = io::Error::last_os_error();
            return Err(self.io_error("SEEK_HOLE", off, err));
        }
        let hole = (hole as u64).min(file_len);
        Ok((ExtentKind::Data, hole.saturating_sub(off).max(1).min(max)))
    }

    fn io_error(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            path: self.path.to_path_buf(),
            op,
            offset,
            source,
        }
    }
}

/// Test-only fault injection: count the writes, hole punches and syncs of one file, fail the
/// N-th and every one after it (the "crash"), and remember what each write since the last sync
/// overwrote, so a test can rebuild the file a power cut could leave: everything synced, plus
/// any subset of the unsynced writes.
#[cfg(test)]
pub(crate) mod fault {
    /// The state of one armed file.
    #[derive(Debug, Default)]
    pub struct Recorder {
        /// Operations seen so far.
        pub ops: u64,
        /// The operation (1-based) that fails; 0 never.
        pub fail_at: u64,
        /// An operation failed: every later one fails too.
        pub crashed: bool,
        /// Writes since the last sync: (offset, bytes before, bytes after).
        pub unsynced: Vec<(u64, Vec<u8>, Vec<u8>)>,
        /// File length at the last sync.
        pub synced_len: u64,
    }
}

#[cfg(test)]
impl ImageFile {
    /// Starts counting operations; the `fail_at`-th (1-based; 0: none) and all later ones fail.
    pub(crate) fn arm_faults(&self, fail_at: u64) {
        *self.faults.lock().unwrap() = Some(fault::Recorder {
            fail_at,
            synced_len: self.len(),
            ..Default::default()
        });
    }

    /// Operations counted since [`ImageFile::arm_faults`].
    pub(crate) fn fault_ops(&self) -> u64 {
        self.faults.lock().unwrap().as_ref().map_or(0, |r| r.ops)
    }

    /// Rewrites the file as a power cut could leave it: the synced state plus the unsynced
    /// writes for which `keep(index)` is true, applied in their order. The power stays off:
    /// every later operation through this handle fails (a writer dropped after the crash must
    /// not write to what the crash left).
    pub(crate) fn simulate_crash(&self, mut keep: impl FnMut(usize) -> bool) {
        let rec = {
            let mut faults = self.faults.lock().unwrap();
            let Some(rec) = faults.take() else {
                return;
            };
            *faults = Some(fault::Recorder {
                crashed: true,
                ..Default::default()
            });
            rec
        };
        for (off, before, _) in rec.unsynced.iter().rev() {
            self.file.write_all_at(before, *off).unwrap();
        }
        self.file.set_len(rec.synced_len).unwrap();
        for (i, (off, _, after)) in rec.unsynced.iter().enumerate() {
            if keep(i) {
                self.file.write_all_at(after, *off).unwrap();
            }
        }
        self.file.sync_all().unwrap();
    }

    fn fault_point(&self, op: &'static str, off: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        let mut guard = self.faults.lock().unwrap();
        let Some(rec) = guard.as_mut() else {
            return Ok(());
        };
        rec.ops += 1;
        if rec.crashed || rec.ops == rec.fail_at {
            rec.crashed = true;
            return Err(self.io_error(op, off, io::Error::other("injected fault")));
        }
        if op == "sync" {
            rec.unsynced.clear();
            rec.synced_len = self.len();
            return Ok(());
        }
        let mut before = vec![0u8; len as usize];
        let avail = self.len().saturating_sub(off).min(len) as usize;
        self.file.read_exact_at(&mut before[..avail], off).unwrap();
        let after = data.map_or_else(|| vec![0u8; len as usize], <[u8]>::to_vec);
        rec.unsynced.push((off, before, after));
        Ok(())
    }
}

fn block_device_len(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Bytes allocated on the host by all of `files`.
pub fn allocated_bytes_of(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmnest-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn read_past_end_is_a_corruption_naming_file_and_offset() {
        let path = temp_file("short.img", &[1, 2, 3, 4]);
        let f = ImageFile::open(&path).unwrap();
        let mut buf = [0u8; 4];
        let err = f.read_exact_at(&mut buf, 2, "grain table").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("short.img"), "{msg}");
        assert!(msg.contains("corrupt grain table at offset 0x2"), "{msg}");
    }

    #[test]
    fn zero_padded_read_fills_past_the_end() {
        let path = temp_file("pad.img", &[7, 7]);
        let f = ImageFile::open(&path).unwrap();
        let mut buf = [9u8; 4];
        f.read_zero_padded(&mut buf, 1).unwrap();
        assert_eq!(buf, [7, 0, 0, 0]);
    }

    #[test]
    fn sparse_file_reports_holes_and_data() {
        let path = temp_file("sparse.img", &[]);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 2 << 20).unwrap();
        drop(file);
        let f = ImageFile::open(&path).unwrap();
        let (kind, len) = f.allocation_at(0, 4 << 20).unwrap();
        assert_eq!((kind, len), (ExtentKind::Zero, 2 << 20));
        let (kind, len) = f.allocation_at(2 << 20, 4 << 20).unwrap();
        assert_eq!(kind, ExtentKind::Data);
        assert!(len >= 4096);
    }
}
