//! The `fuser::Filesystem`: one directory (inode 1) of window files (inodes 2, 3, …).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use super::{Disk, FileEntry, MAX_REQUEST, MountOptions, Stats};

/// How long the kernel may cache names and attributes: they never change while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// The file handle of a descriptor opened for writing (flush on close then means something).
const FH_WRITE: u64 = 1;
/// Background requests (readahead) the kernel may have in flight.
const MAX_BACKGROUND: u16 = 64;

thread_local! {
    /// Each event loop's read buffer, grown to the largest request and never zeroed again.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub(super) struct DiskFs {
    disks: Vec<Disk>,
    files: Vec<FileEntry>,
    by_name: HashMap<String, usize>,
    writable: bool,
    mounted: SystemTime,
    uid: u32,
    gid: u32,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for DiskFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskFs")
            .field("files", &self.files)
            .field("writable", &self.writable)
            .finish()
    }
}

impl DiskFs {
    pub(super) fn new(
        disks: Vec<Disk>,
        files: Vec<FileEntry>,
        options: &MountOptions,
        stats: Arc<Stats>,
    ) -> DiskFs {
        let by_name = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        // SAFETY: getuid and getgid cannot fail and touch no memory of ours.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        DiskFs {
            disks,
            files,
            by_name,
            writable: options.writable,
            mounted: SystemTime::now(),
            uid,
            gid,
            stats,
        }
    }

    /// The file behind an inode.
    fn file(&self, ino: INodeNo) -> Option<&FileEntry> {
        let index = ino.0.checked_sub(2)?;
        self.files.get(usize::try_from(index).ok()?)
    }

    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind: FileType::Directory,
            perm: if self.writable { 0o755 } else { 0o555 },
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, index: usize, f: &FileEntry) -> FileAttr {
        FileAttr {
            ino: INodeNo(index as u64 + 2),
            size: f.len,
            blocks: f.blocks,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind: FileType::RegularFile,
            perm: if self.writable { 0o644 } else { 0o444 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino == INodeNo::ROOT {
            return Some(self.dir_attr());
        }
        let index = usize::try_from(ino.0.checked_sub(2)?).ok()?;
        let f = self.files.get(index)?;
        Some(self.file_attr(index, f))
    }

    fn flush_disk(&self, f: &FileEntry) -> Result<(), Errno> {
        let Some(writer) = &self.disks[f.disk].writer else {
            return Ok(());
        };
        writer.flush().map_err(|e| {
            self.stats
                .error(format!("flushing {}: {e}", self.disks[f.disk].name));
            Errno::EIO
        })
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each setter answers the nearest value the kernel takes when it refuses ours; that one
        // is as good.
        if let Err(nearest) = config.set_max_write(MAX_REQUEST) {
            let _ = config.set_max_write(nearest);
        }
        // The kernel caps this at its own default; `mount` raises it afterwards through sysfs.
        if let Err(nearest) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn destroy(&mut self) {
        for disk in &self.disks {
            if let Some(Err(e)) = disk.writer.as_ref().map(|w| w.flush()) {
                self.stats
                    .error(format!("flushing {} at unmount: {e}", disk.name));
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let found = name
            .to_str()
            .and_then(|n| self.by_name.get(n))
            .map(|&i| self.file_attr(i, &self.files[i]));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        // A disk has the size it has: truncating or growing one is refused, as for a block
        // device. Times are not stored (they stay the mount time).
        match size {
            Some(s) if attr.kind != FileType::RegularFile || s != attr.size => {
                reply.error(Errno::EINVAL)
            }
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(if ino == INodeNo::ROOT {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
        }
        let writing = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if writing && !self.writable {
            return reply.error(Errno::EROFS);
        }
        let fh = FileHandle(if writing { FH_WRITE } else { 0 });
        let cache = if self.writable {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(fh, cache);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if offset >= f.len {
            return reply.data(&[]);
        }
        let n = (f.len - offset).min(u64::from(size.min(MAX_REQUEST))) as usize;
        let device = &self.disks[f.disk].device;
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < n {
                buf.resize(n, 0);
            }
            match device.read_at(&mut buf[..n], f.offset + offset) {
                Ok(()) => reply.data(&buf[..n]),
                Err(e) => {
                    self.stats
                        .error(format!("reading {} at {offset:#x}: {e}", f.name));
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(writer) = self.disks[f.disk].writer.as_ref().filter(|_| self.writable) else {
            return reply.error(Errno::EROFS);
        };
        if offset >= f.len {
            return if data.is_empty() {
                reply.written(0)
            } else {
                reply.error(Errno::ENOSPC)
            };
        }
        let n = (f.len - offset).min(data.len() as u64) as usize;
        match writer.write_at(&data[..n], f.offset + offset) {
            Ok(()) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(n as u64, Ordering::Relaxed);
                reply.written(n as u32)
            }
            Err(e) => {
                self.stats
                    .error(format!("writing {} at {offset:#x}: {e}", f.name));
                reply.error(Errno::EIO)
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.file(ino) {
            Some(f) if fh.0 == FH_WRITE => match self.flush_disk(f) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file(ino) {
            Some(f) => match self.flush_disk(f) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == INodeNo::ROOT {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        // Entry k (0 ".", 1 "..", then the files) carries offset k + 1: where to go on.
        let dots = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
        ];
        let files = self.files.iter().enumerate().map(|(i, f)| {
            (
                INodeNo(i as u64 + 2),
                FileType::RegularFile,
                f.name.as_str(),
            )
        });
        for (k, (ino, kind, name)) in dots
            .into_iter()
            .chain(files)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(ino, k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self.disks.iter().map(|d| d.device.size()).sum();
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            self.files.len() as u64 + 1,
            0,
            4096,
            255,
            4096,
        );
    }
}
