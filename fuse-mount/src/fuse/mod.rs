//! A FUSE filesystem that shows disks, and their partitions, as files (`fuser`, no libfuse).
//!
//! The mount is one flat directory: a file per disk (`disk`, or `disk0`, `disk1`, … for a
//! bundle of several) and a file per partition (`disk-part1`, numbered as Linux numbers them, see
//! [`crate::partition`]), so `mount -o loop disk-part1` needs no offset. A file is a window
//! `(offset, len)` on its disk; every read and write is clipped to it.
//!
//! * Reads go straight to [`BlockDevice::read_at`] into a per-thread buffer that is reused (never
//!   zeroed again). The kernel may send a request of up to [`MAX_REQUEST`] bytes; readahead is
//!   raised to [`MountOptions::readahead`] through the mount's `read_ahead_kb` in sysfs (the
//!   kernel starts every FUSE mount at 128 KiB and ignores a larger value in the INIT reply;
//!   1 MiB roughly doubled buffered throughput here).
//! * Concurrency: [`MountOptions::threads`] event loops, each with its own cloned `/dev/fuse`
//!   descriptor, call the filesystem through `&self`; nothing here takes a lock on the I/O path
//!   (devices lock internally, as their contract says).
//! * Read-only unless [`MountOptions::writable`]: the mount is then `MS_RDONLY` (the kernel
//!   answers `EROFS` itself) and the files are mode 0444; writes that still arrive get `EROFS`.
//!   Writable files are 0644; `fsync`, and `flush` (close) of a descriptor opened for writing, call
//!   [`BlockDeviceMut::flush`]. The size of a file never changes: truncation gets `EINVAL`, a
//!   write at or past the end `ENOSPC` (one that straddles the end is cut short).
//! * The end: when the mount goes away (`fusermount3 -u`, `umount`, [`unmount`]), the event
//!   loops end, every writable device is flushed, and [`Mount::run`] returns a [`Report`] that
//!   counts writes and lists what failed, so a caller can commit (or refuse to) before exiting.
//! * A disk file and its partition files alias the same bytes through separate page caches.
//!   Read-only mounts keep the cache between opens; writable ones drop a file's cache when it is
//!   opened, so use one view at a time when writing.

mod fs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use image_format::blockdev::{BlockDevice, BlockDeviceMut, Caps, ExtentKind};

use crate::partition::{self, Scheme};

/// The largest read or write request asked of the kernel (`max_write`, and `max_pages` for
/// reads).
pub const MAX_REQUEST: u32 = 1 << 20;
/// Default readahead of a mount, in bytes.
pub const DEFAULT_READAHEAD: u32 = 1 << 20;
/// Default number of FUSE event loops (threads).
pub const DEFAULT_THREADS: usize = 4;
/// Most `block_status` calls spent counting one file's allocated blocks at mount time; past
/// that the file reports every block as allocated.
const MAX_STATUS_CALLS: usize = 4096;
/// Most error messages a [`Report`] keeps (it counts the rest).
const MAX_REPORTED_ERRORS: usize = 20;

/// One disk to show.
#[derive(Clone)]
pub struct Disk {
    /// The file name of the whole disk (`disk`, `disk0`, …).
    pub name: String,
    /// The device, read by every file of this disk.
    pub device: Arc<dyn BlockDevice>,
    /// The same device, writable, for a writable mount.
    pub writer: Option<Arc<dyn BlockDeviceMut>>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .field("writable", &self.writer.is_some())
            .finish()
    }
}

impl Disk {
    /// A disk that is only read.
    pub fn read_only(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Disk {
        Disk {
            name: name.into(),
            device,
            writer: None,
        }
    }

    /// A disk that can be written.
    pub fn writable(name: impl Into<String>, device: Arc<dyn BlockDeviceMut>) -> Disk {
        let reader: Arc<dyn BlockDevice> = device.clone();
        Disk {
            name: name.into(),
            device: reader,
            writer: Some(device),
        }
    }
}

/// A file of the mount: a window on a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Its name in the mount's directory.
    pub name: String,
    /// Index of its disk in the list given to [`mount`].
    pub disk: usize,
    /// Offset of the window on the disk.
    pub offset: u64,
    /// Length of the window (the file's size).
    pub len: u64,
    /// Allocated 512-byte blocks, as counted at mount time.
    pub blocks: u64,
    /// For a partition: `mbr`/`gpt`, its number and type.
    pub partition: Option<(Scheme, u32, String)>,
}

/// What a mount will show: the files, and what was wrong with partition tables.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Disks first, each followed by its partitions.
    pub files: Vec<FileEntry>,
    /// Partition table problems (the disk is still shown; its partitions may not be).
    pub warnings: Vec<String>,
}

/// Reads each disk's partition table and lays out the files.
pub fn layout(disks: &[Disk]) -> Layout {
    let mut out = Layout::default();
    for (index, disk) in disks.iter().enumerate() {
        let device = disk.device.as_ref();
        let size = device.size();
        out.files.push(FileEntry {
            name: disk.name.clone(),
            disk: index,
            offset: 0,
            len: size,
            blocks: allocated_blocks(device, 0, size),
            partition: None,
        });
        match partition::read_table(&disk.name, device) {
            Ok(None) => {}
            Ok(Some(table)) => {
                out.warnings.extend(
                    table
                        .warnings
                        .iter()
                        .map(|w| format!("{w} (partition skipped)")),
                );
                for p in &table.partitions {
                    out.files.push(FileEntry {
                        name: format!("{}-part{}", disk.name, p.number),
                        disk: index,
                        offset: p.offset,
                        len: p.len,
                        blocks: allocated_blocks(device, p.offset, p.len),
                        partition: Some((table.scheme, p.number, p.type_id.clone())),
                    });
                }
            }
            Err(e) => out
                .warnings
                .push(format!("{e}; showing the whole disk only")),
        }
    }
    out
}

/// 512-byte blocks of `[off, off + len)` that hold data, if a few `block_status` calls can
/// tell; else all of them.
fn allocated_blocks(device: &dyn BlockDevice, off: u64, len: u64) -> u64 {
    let all = len.div_ceil(512);
    if !device.caps().contains(Caps::EXTENTS) {
        return all;
    }
    let end = off + len;
    let mut pos = off;
    let mut data = 0u64;
    for _ in 0..MAX_STATUS_CALLS {
        if pos >= end {
            return data.div_ceil(512);
        }
        let Ok(extent) = device.block_status(pos, end - pos) else {
            return all;
        };
        if extent.len == 0 || extent.len > end - pos {
            return all;
        }
        if extent.kind == ExtentKind::Data {
            data += extent.len;
        }
        pos += extent.len;
    }
    if pos >= end { data.div_ceil(512) } else { all }
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let writes through (every disk needs a writer).
    pub writable: bool,
    /// Let other users than the mounting one in (`allow_other`).
    pub allow_other: bool,
    /// Number of FUSE event loops.
    pub threads: usize,
    /// Readahead of the mount in bytes (set through sysfs; needs root).
    pub readahead: u32,
    /// What `mount` and `/proc/mounts` show as the source.
    pub fsname: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            writable: false,
            allow_other: false,
            threads: DEFAULT_THREADS,
            readahead: DEFAULT_READAHEAD,
            fsname: "vmnest".to_string(),
        }
    }
}

/// What went wrong mounting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FuseError {
    /// A writable mount of a disk that has no writer.
    #[error("disk {0} cannot be written (no writable device)")]
    NotWritable(String),
    /// Two files would have the same name.
    #[error("two disks are named {0}")]
    DuplicateName(String),
    /// The mount itself failed.
    #[error("mounting on {}", .mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The FUSE session ended with an error.
    #[error("serving {}", .mountpoint.display())]
    Session {
        mountpoint: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {}: {reason}", .mountpoint.display())]
    Unmount { mountpoint: PathBuf, reason: String },
}

/// What happened while mounted, returned when the mount is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Write requests that succeeded.
    pub writes: u64,
    /// Bytes they wrote.
    pub bytes_written: u64,
    /// Read, write and flush failures (the first [`MAX_REPORTED_ERRORS`] messages).
    pub errors: Vec<String>,
    /// How many failures there were in all.
    pub error_count: u64,
}

impl Report {
    /// True when no read, write or flush failed.
    pub fn is_clean(&self) -> bool {
        self.error_count == 0
    }
}

/// Counters shared by the event loops and the [`Mount`].
#[derive(Debug, Default)]
struct Stats {
    writes: AtomicU64,
    bytes_written: AtomicU64,
    error_count: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, message: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < MAX_REPORTED_ERRORS {
            errors.push(message);
        }
    }

    fn report(&self) -> Report {
        Report {
            writes: self.writes.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            error_count: self.error_count.load(Ordering::Relaxed),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// A live mount. Dropping it without [`Mount::run`] unmounts.
#[derive(Debug)]
pub struct Mount {
    session: fuser::Session<fs::DiskFs>,
    stats: Arc<Stats>,
    files: Vec<FileEntry>,
    mountpoint: PathBuf,
    notes: Vec<String>,
}

/// Mounts `disks` (laid out by [`layout`]) on `mountpoint`. When this returns, the mount is live
/// and the kernel has finished its handshake.
pub fn mount(
    mountpoint: &Path,
    disks: Vec<Disk>,
    layout: Layout,
    options: &MountOptions,
) -> Result<Mount, FuseError> {
    let mut names = std::collections::HashSet::new();
    for f in &layout.files {
        if !names.insert(f.name.as_str()) {
            return Err(FuseError::DuplicateName(f.name.clone()));
        }
    }
    if let Some(d) = disks
        .iter()
        .find(|d| options.writable && d.writer.is_none())
    {
        return Err(FuseError::NotWritable(d.name.clone()));
    }
    let stats = Arc::new(Stats::default());
    let filesystem = fs::DiskFs::new(disks, layout.files.clone(), options, stats.clone());
    let mut mount_options = vec![
        fuser::MountOption::FSName(options.fsname.clone()),
        fuser::MountOption::Subtype("vmnest".to_string()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoAtime,
    ];
    mount_options.push(if options.writable {
        fuser::MountOption::RW
    } else {
        fuser::MountOption::RO
    });
    let mut config = fuser::Config::default();
    config.mount_options = mount_options;
    config.acl = if options.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(filesystem, mountpoint, &config).map_err(|source| {
        FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        }
    })?;
    let mut notes = Vec::new();
    if let Err(e) = set_readahead(mountpoint, options.readahead) {
        notes.push(format!("readahead left at the kernel's default: {e}"));
    }
    Ok(Mount {
        session,
        stats,
        files: layout.files,
        mountpoint: mountpoint.to_path_buf(),
        notes,
    })
}

/// Raises the readahead of the FUSE mount at `mountpoint`, whose bdi is named after the mount's
/// `major:minor`. That number comes from `/proc/self/mountinfo`: a `stat` of the mount point
/// would wait for this very server, which does not answer requests yet.
fn set_readahead(mountpoint: &Path, bytes: u32) -> std::io::Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let dev = mount_device(&info, mountpoint).ok_or_else(|| {
        std::io::Error::other(format!(
            "{} not in /proc/self/mountinfo",
            mountpoint.display()
        ))
    })?;
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    std::fs::write(&path, format!("{}\n", bytes / 1024))
        .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// True when a FUSE file system is mounted at `mountpoint` (an absolute, canonical path).
pub fn is_fuse_mounted(mountpoint: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| find_mount(&info, mountpoint).map(|(_, t)| t.starts_with("fuse")))
        .unwrap_or(false)
}

/// The `major:minor` of the newest mount at `mountpoint` in a mountinfo text (whose mount points
/// escape blanks and backslashes in octal).
fn mount_device<'a>(info: &'a str, mountpoint: &Path) -> Option<&'a str> {
    find_mount(info, mountpoint).map(|(dev, _)| dev)
}

/// `(major:minor, file system type)` of the newest mount at `mountpoint` in a mountinfo text.
fn find_mount<'a>(info: &'a str, mountpoint: &Path) -> Option<(&'a str, &'a str)> {
    let mut wanted = String::new();
    for c in mountpoint.to_str()?.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => wanted.push_str(&format!("\\{:03o}", c as u32)),
            c => wanted.push(c),
        }
    }
    info.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let fields: Vec<&str> = head.split(' ').collect();
            if fields.get(4) != Some(&wanted.as_str()) {
                return None;
            }
            Some((*fields.get(2)?, tail.split(' ').next()?))
        })
        .next_back()
}

impl Mount {
    /// The files the mount shows.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// Things worth telling the user that did not stop the mount.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Serves until the mount goes away (see [`unmount`]), flushes every writable disk, and says
    /// what happened.
    pub fn run(self) -> Result<Report, FuseError> {
        let Mount {
            session,
            stats,
            mountpoint,
            ..
        } = self;
        session
            .run()
            .map_err(|source| FuseError::Session { mountpoint, source })?;
        Ok(stats.report())
    }
}

/// Unmounts the FUSE mount at `mountpoint` with `fusermount3 -u` (never lazily: a mount still in
/// use, by a loop device say, stays and this fails).
pub fn unmount(mountpoint: &Path) -> Result<(), FuseError> {
    let err = |reason: String| FuseError::Unmount {
        mountpoint: mountpoint.to_path_buf(),
        reason,
    };
    let output = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .output()
        .map_err(|e| err(format!("running fusermount3 (Debian package fuse3): {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stderr);
    let text = text.trim();
    Err(err(if text.is_empty() {
        format!("fusermount3 -u {}", output.status)
    } else {
        text.to_string()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_format::blockdev::{Extent, check_range, check_status_range};

    /// A disk in memory whose first `data` bytes are allocated (the rest a hole).
    struct Mem {
        bytes: Vec<u8>,
        data: u64,
    }

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn caps(&self) -> Caps {
            Caps::EXTENTS
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> image_format::Result<()> {
            check_range(off, buf.len() as u64, self.size())?;
            buf.copy_from_slice(&self.bytes[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn block_status(&self, off: u64, len: u64) -> image_format::Result<Extent> {
            check_status_range(off, len, self.size())?;
            Ok(if off < self.data {
                Extent::new(ExtentKind::Data, len.min(self.data - off))
            } else {
                Extent::new(ExtentKind::Zero, len)
            })
        }
    }

    /// A 4 MiB disk with MBR partitions 1 (1 MiB at 1 MiB) and 3 (1 MiB at 2 MiB); the first
    /// `data` bytes allocated.
    fn mbr_disk(name: &str, data: u64) -> Disk {
        let mut bytes = vec![0u8; 4 << 20];
        for (slot, start) in [(0usize, 2048u32), (2, 4096)] {
            let e = 446 + 16 * slot;
            bytes[e + 4] = 0x83;
            bytes[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            bytes[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
        }
        bytes[510] = 0x55;
        bytes[511] = 0xAA;
        Disk::read_only(name, Arc::new(Mem { bytes, data }))
    }

    #[test]
    fn each_disk_is_followed_by_its_partition_windows() {
        let layout = layout(&[mbr_disk("disk0", 3 << 20), mbr_disk("disk1", 512)]);
        let files: Vec<(&str, usize, u64, u64, u64)> = layout
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.disk, f.offset, f.len, f.blocks))
            .collect();
        assert_eq!(
            files,
            [
                ("disk0", 0, 0, 4 << 20, 6144),
                ("disk0-part1", 0, 1 << 20, 1 << 20, 2048),
                ("disk0-part3", 0, 2 << 20, 1 << 20, 2048),
                ("disk1", 1, 0, 4 << 20, 1),
                ("disk1-part1", 1, 1 << 20, 1 << 20, 0),
                ("disk1-part3", 1, 2 << 20, 1 << 20, 0),
            ]
        );
        assert!(layout.warnings.is_empty());
    }

    #[test]
    fn an_unreadable_table_leaves_the_disk_alone_with_a_warning() {
        let mut disk = mbr_disk("disk", 0);
        let mut bytes = vec![0u8; 4 << 20];
        bytes[446 + 4] = 0xEE;
        bytes[446 + 12..446 + 16].copy_from_slice(&8191u32.to_le_bytes());
        bytes[510] = 0x55;
        bytes[511] = 0xAA;
        disk.device = Arc::new(Mem { bytes, data: 0 });
        let layout = layout(&[disk]);
        assert_eq!(layout.files.len(), 1);
        assert_eq!(
            layout.warnings,
            [
                "disk: partition table at offset 0x200: protective MBR (type 0xee) but no GPT \
              header (EFI PART) here; showing the whole disk only"
            ]
        );
    }

    #[test]
    fn the_newest_mount_at_a_point_names_the_device() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 22 0:50 / /tmp/a\\040b rw - fuse x rw\n\
                    91 22 0:51 / /tmp/a\\040b ro - fuse vmnest:d ro\n";
        assert_eq!(mount_device(info, Path::new("/tmp/a b")), Some("0:51"));
        assert_eq!(mount_device(info, Path::new("/tmp/a")), None);
        assert_eq!(find_mount(info, Path::new("/proc")), Some(("0:21", "proc")));
    }
}
