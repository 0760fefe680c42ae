//! What a virtual disk is: the [`BlockDevice`] and [`BlockDeviceMut`] traits.
//!
//! Everything in vmnest that moves guest data (the converter, the NBD server, the FUSE mount, the
//! store) codes against these traits and never names a format.
//!
//! # Contract
//!
//! * All I/O takes `&self`: an implementation is shared between threads (NBD serves several
//!   requests at once) and locks internally. It never holds a metadata lock across data I/O.
//! * `read_at` is exact: it fills the whole buffer or fails. Ranges past [`BlockDevice::size`]
//!   fail with [`Error::OutOfRange`]. Unallocated ranges read as their backing, or as zeros when
//!   there is none.
//! * `block_status(off, len)` describes the range that starts at `off`: one [`Extent`] of at least
//!   one byte and at most `len` bytes. It may stop early (at a table boundary, say); callers loop.
//! * [`Caps`] declares what the device can do, one flag per NBD transmission flag, so an export
//!   never learns a capability by failing.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// What a device can do beyond reading. Flags map one-to-one onto NBD transmission flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Caps(u32);

impl Caps {
    /// No capability beyond reading.
    pub const NONE: Caps = Caps(0);
    /// `write_at` works (NBD: not READ_ONLY).
    pub const WRITE: Caps = Caps(1 << 0);
    /// `flush` makes writes durable (NBD_FLAG_SEND_FLUSH).
    pub const FLUSH: Caps = Caps(1 << 1);
    /// Writes can be forced to stable storage one by one (NBD_FLAG_SEND_FUA).
    pub const FUA: Caps = Caps(1 << 2);
    /// `discard` releases space (NBD_FLAG_SEND_TRIM).
    pub const DISCARD: Caps = Caps(1 << 3);
    /// `write_zeroes` is cheaper than writing zeros (NBD_FLAG_SEND_WRITE_ZEROES).
    pub const WRITE_ZEROES: Caps = Caps(1 << 4);
    /// `block_status` reports real allocation, not just "all data" (NBD base:allocation).
    pub const EXTENTS: Caps = Caps(1 << 5);
    /// Several connections may share the device with consistent flushes (NBD_FLAG_CAN_MULTI_CONN).
    pub const MULTI_CONN: Caps = Caps(1 << 6);

    /// The union of two sets.
    pub const fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }

    /// The flags of `self` that are not in `other`.
    pub const fn without(self, other: Caps) -> Caps {
        Caps(self.0 & !other.0)
    }

    /// True if every flag of `other` is set.
    pub const fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for Caps {
    type Output = Caps;
    fn bitor(self, rhs: Caps) -> Caps {
        self.union(rhs)
    }
}

/// What a range of the guest address space holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Stored data (which may happen to be zeros): read it.
    Data,
    /// Known to read as zeros: an explicit zero cluster, a hole in a sparse file.
    Zero,
    /// Not allocated anywhere in the chain; reads as zeros.
    Unallocated,
}

impl ExtentKind {
    /// True for the kinds that read as zeros without looking.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, ExtentKind::Data)
    }
}

/// Where the bytes of an extent live in a host file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLocation {
    /// The file holding the bytes (an image, a VMDK extent, a backing file).
    pub file: Arc<Path>,
    /// Byte offset in that file.
    pub offset: u64,
}

/// One run of the guest address space, as returned by [`BlockDevice::block_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Data, zero or unallocated.
    pub kind: ExtentKind,
    /// Length in bytes, at least 1.
    pub len: u64,
    /// Which image of the chain answered: 0 is the device itself, 1 its backing file, and so on.
    pub depth: u32,
    /// Where the data lives on the host, when that is meaningful (uncompressed data).
    pub host: Option<HostLocation>,
    /// The data is stored compressed.
    pub compressed: bool,
}

impl Extent {
    /// An extent of `kind` with no host location, at depth 0.
    pub fn new(kind: ExtentKind, len: u64) -> Self {
        Extent {
            kind,
            len,
            depth: 0,
            host: None,
            compressed: false,
        }
    }

    /// A data extent stored uncompressed at `offset` in `file`.
    pub fn data_at(len: u64, file: &Arc<Path>, offset: u64) -> Self {
        Extent {
            kind: ExtentKind::Data,
            len,
            depth: 0,
            host: Some(HostLocation {
                file: Arc::clone(file),
                offset,
            }),
            compressed: false,
        }
    }

    /// The same extent seen from one level up a backing chain.
    pub fn one_level_down(mut self) -> Self {
        self.depth += 1;
        self
    }
}

/// A virtual disk that can be read. See the module documentation for the contract.
pub trait BlockDevice: Send + Sync {
    /// Size of the guest disk in bytes.
    fn size(&self) -> u64;

    /// What the device can do besides reading.
    fn caps(&self) -> Caps;

    /// Fills `buf` with the guest bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;

    /// Describes the range starting at `off`, at most `len` bytes long (`len` > 0).
    fn block_status(&self, off: u64, len: u64) -> Result<Extent>;
}

/// A virtual disk that can also be changed.
pub trait BlockDeviceMut: BlockDevice {
    /// Writes `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()>;
    /// Makes `len` bytes at `off` read as zeros, cheaply where the format allows.
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()>;
    /// Tells the device the range is no longer needed; it may then read as anything the format
    /// defines (zeros or backing).
    fn discard(&self, off: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
}

/// Checks that `[off, off + len)` lies inside a device of `size` bytes.
pub fn check_range(off: u64, len: u64, size: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            offset: off,
            len,
            size,
        }),
    }
}

/// Checks the arguments of a `block_status` call: in range and non-empty.
pub fn check_status_range(off: u64, len: u64, size: u64) -> Result<()> {
    if len == 0 {
        return Err(Error::OutOfRange {
            offset: off,
            len,
            size,
        });
    }
    check_range(off, len, size)
}

/// Calls `f` for each extent of `dev` in `[off, off + len)`, merging neighbours of the same kind,
/// depth and compression whose host locations (if any) are contiguous.
pub fn for_each_extent(
    dev: &dyn BlockDevice,
    off: u64,
    len: u64,
    mut f: impl FnMut(u64, &Extent) -> Result<()>,
) -> Result<()> {
    check_range(off, len, dev.size())?;
    let end = off + len;
    let mut pos = off;
    let mut pending: Option<(u64, Extent)> = None;
    while pos < end {
        let ext = dev.block_status(pos, end - pos)?;
        if ext.len == 0 || ext.len > end - pos {
            return Err(Error::InvalidArgument {
                path: Default::default(),
                reason: format!(
                    "block_status at {pos:#x} returned an extent of {} bytes",
                    ext.len
                ),
            });
        }
        let next = pos + ext.len;
        pending = match pending {
            Some((start, mut prev)) if mergeable(&prev, &ext) => {
                prev.len += ext.len;
                Some((start, prev))
            }
            Some((start, prev)) => {
                f(start, &prev)?;
                Some((pos, ext))
            }
            None => Some((pos, ext)),
        };
        pos = next;
    }
    if let Some((start, prev)) = pending {
        f(start, &prev)?;
    }
    Ok(())
}

fn mergeable(a: &Extent, b: &Extent) -> bool {
    if a.kind != b.kind || a.depth != b.depth || a.compressed != b.compressed {
        return false;
    }
    match (&a.host, &b.host) {
        (None, None) => true,
        (Some(x), Some(y)) => x.file == y.file && x.offset + a.len == y.offset,
        _ => false,
    }
}

/// Reads `buf.len()` bytes at `off` from `dev` where `dev` may be smaller than the request: bytes
/// past its end read as zeros. Used for backing files shorter than their overlay.
pub fn read_padded(dev: &dyn BlockDevice, buf: &mut [u8], off: u64) -> Result<()> {
    let size = dev.size();
    if off >= size {
        buf.fill(0);
        return Ok(());
    }
    let avail = usize::try_from((size - off).min(buf.len() as u64)).unwrap_or(buf.len());
    let (head, tail) = buf.split_at_mut(avail);
    dev.read_at(head, off)?;
    tail.fill(0);
    Ok(())
}

/// `block_status` of a backing device seen from its overlay, which may be larger than it: past
/// the backing's end the range is unallocated. The answer's depth is one more than the backing's.
pub fn backing_status(backing: &dyn BlockDevice, off: u64, len: u64) -> Result<Extent> {
    let size = backing.size();
    if off >= size {
        let mut ext = Extent::new(ExtentKind::Unallocated, len);
        ext.depth = 1;
        return Ok(ext);
    }
    Ok(backing
        .block_status(off, len.min(size - off))?
        .one_level_down())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Striped;

    impl BlockDevice for Striped {
        fn size(&self) -> u64 {
            100
        }
        fn caps(&self) -> Caps {
            Caps::EXTENTS
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
            check_range(off, buf.len() as u64, 100)?;
            buf.fill(1);
            Ok(())
        }
        fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
            check_status_range(off, len, 100)?;
            // 10-byte pieces: data below 50, zero above, each reported separately.
            let piece = (10 - off % 10).min(len);
            let kind = if off < 50 {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            Ok(Extent::new(kind, piece))
        }
    }

    #[test]
    fn for_each_extent_merges_neighbours_of_one_kind() {
        let mut seen = Vec::new();
        for_each_extent(&Striped, 5, 90, |start, e| {
            seen.push((start, e.len, e.kind));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(5, 45, ExtentKind::Data), (50, 45, ExtentKind::Zero)]
        );
    }

    #[test]
    fn check_range_rejects_overflowing_requests() {
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
        assert!(check_range(90, 10, 100).is_ok());
        assert!(check_range(91, 10, 100).is_err());
    }

    #[test]
    fn read_padded_zero_fills_past_the_end() {
        let mut buf = [9u8; 20];
        read_padded(&Striped, &mut buf, 90).unwrap();
        assert_eq!(&buf[..10], &[1; 10]);
        assert_eq!(&buf[10..], &[0; 10]);
    }

    #[test]
    fn caps_flags_combine() {
        let c = Caps::WRITE | Caps::FLUSH;
        assert!(c.contains(Caps::WRITE));
        assert!(!c.contains(Caps::DISCARD));
        assert_eq!(c.without(Caps::WRITE), Caps::FLUSH);
    }
}
