//! Guest-content comparison of two block devices, as `vmnest compare` and `qemu-img compare` do.
//!
//! Ranges that both devices report as reading zero are skipped without I/O; a range that only one
//! side stores is checked for zeros; the rest is read from both sides, each side on its own thread
//! with a few chunks in flight, and compared.
//!
//! Sizes may differ: unless `strict`, the part of the larger device past the smaller one's end
//! must read as zeros, as qemu-img compare decides.

use std::collections::VecDeque;
use std::sync::mpsc;

use crate::blockdev::BlockDevice;
use crate::bytes::{first_difference, first_nonzero};
use crate::error::Result;

/// Bytes read per request.
const CHUNK: u64 = 4 << 20;
/// Requests in flight per side.
const DEPTH: usize = 3;

/// The outcome of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Same guest content.
    Identical,
    /// The first differing byte.
    Differ { offset: u64 },
    /// Strict mode: the sizes differ.
    SizeMismatch { a: u64, b: u64 },
}

/// Options for [`compare`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CompareOptions {
    /// Different sizes are a mismatch, even when the excess reads as zeros.
    pub strict: bool,
}

/// Reports progress in bytes of the larger device.
pub trait CompareProgress {
    /// `done` of `total` bytes compared.
    fn progress(&self, done: u64, total: u64);
}

impl CompareProgress for () {
    fn progress(&self, _done: u64, _total: u64) {}
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    off: u64,
    len: u64,
    read_a: bool,
    read_b: bool,
}

/// Compares the guest content of `a` and `b`.
pub fn compare(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    options: CompareOptions,
    progress: &dyn CompareProgress,
) -> Result<Comparison> {
    let (size_a, size_b) = (a.size(), b.size());
    if options.strict && size_a != size_b {
        return Ok(Comparison::SizeMismatch {
            a: size_a,
            b: size_b,
        });
    }
    let total = size_a.max(size_b);
    std::thread::scope(|scope| {
        let (req_a, res_a) = reader(scope, a);
        let (req_b, res_b) = reader(scope, b);
        let mut in_flight: VecDeque<Segment> = VecDeque::new();
        let mut planner = Planner {
            a,
            b,
            pos: 0,
            total,
            pending: None,
        };
        let outcome = loop {
            while in_flight.len() < DEPTH {
                let Some(seg) = planner.next()? else { break };
                if seg.read_a {
                    let _ = req_a.send((seg.off, seg.len));
                }
                if seg.read_b {
                    let _ = req_b.send((seg.off, seg.len));
                }
                in_flight.push_back(seg);
            }
            let Some(seg) = in_flight.pop_front() else {
                break Comparison::Identical;
            };
            let buf_a = if seg.read_a {
                Some(recv(&res_a)?)
            } else {
                None
            };
            let buf_b = if seg.read_b {
                Some(recv(&res_b)?)
            } else {
                None
            };
            let diff = match (&buf_a, &buf_b) {
                (Some(x), Some(y)) => first_difference(x, y),
                (Some(x), None) | (None, Some(x)) => first_nonzero(x),
                (None, None) => None,
            };
            if let Some(i) = diff {
                break Comparison::Differ {
                    offset: seg.off + i as u64,
                };
            }
            progress.progress(seg.off + seg.len, total);
        };
        drop(req_a);
        drop(req_b);
        Ok(outcome)
    })
}

type Request = mpsc::SyncSender<(u64, u64)>;
type Response = mpsc::Receiver<Result<Vec<u8>>>;

fn reader<'s, 'e>(
    scope: &'s std::thread::Scope<'s, 'e>,
    dev: &'e dyn BlockDevice,
) -> (Request, Response) {
    let (req_tx, req_rx) = mpsc::sync_channel::<(u64, u64)>(DEPTH);
    let (res_tx, res_rx) = mpsc::sync_channel::<Result<Vec<u8>>>(DEPTH);
    scope.spawn(move || {
        for (off, len) in req_rx {
            let mut buf = vec![0u8; len as usize];
            let res = dev.read_at(&mut buf, off).map(|()| buf);
            let failed = res.is_err();
            if res_tx.send(res).is_err() || failed {
                break;
            }
        }
    });
    (req_tx, res_rx)
}

fn recv(rx: &Response) -> Result<Vec<u8>> {
    rx.recv().unwrap_or_else(|_| {
        Err(crate::Error::InvalidArgument {
            path: Default::default(),
            reason: "compare reader stopped".into(),
        })
    })
}

/// Cuts the address space into segments, asking both devices which side must be read.
struct Planner<'a> {
    a: &'a dyn BlockDevice,
    b: &'a dyn BlockDevice,
    pos: u64,
    total: u64,
    /// Cached extent ends: (reads-zero, end) for each side.
    pending: Option<((bool, u64), (bool, u64))>,
}

impl Planner<'_> {
    fn side(dev: &dyn BlockDevice, pos: u64, limit: u64) -> Result<(bool, u64)> {
        if pos >= dev.size() {
            return Ok((true, u64::MAX));
        }
        let len = (dev.size() - pos).min(limit);
        let ext = dev.block_status(pos, len)?;
        Ok((ext.kind.reads_as_zero(), pos + ext.len.max(1)))
    }

    fn next(&mut self) -> Result<Option<Segment>> {
        while self.pos < self.total {
            let limit = (self.total - self.pos).min(1 << 30);
            let ((za, ea), (zb, eb)) = match self.pending {
                Some(((za, ea), (zb, eb))) => {
                    let sa = if ea > self.pos {
                        (za, ea)
                    } else {
                        Self::side(self.a, self.pos, limit)?
                    };
                    let sb = if eb > self.pos {
                        (zb, eb)
                    } else {
                        Self::side(self.b, self.pos, limit)?
                    };
                    (sa, sb)
                }
                None => (
                    Self::side(self.a, self.pos, limit)?,
                    Self::side(self.b, self.pos, limit)?,
                ),
            };
            self.pending = Some(((za, ea), (zb, eb)));
            let end = ea.min(eb).min(self.total);
            if za && zb {
                self.pos = end;
                continue;
            }
            let len = (end - self.pos).min(CHUNK);
            let seg = Segment {
                off: self.pos,
                len,
                read_a: !za,
                read_b: !zb,
            };
            self.pos += len;
            return Ok(Some(seg));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::{Caps, Extent, ExtentKind, check_range, check_status_range};

    /// A device of `size` bytes whose data is `data` at `at`, zeros elsewhere (reported as such).
    struct Mem {
        size: u64,
        at: u64,
        data: Vec<u8>,
    }

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.size
        }
        fn caps(&self) -> Caps {
            Caps::EXTENTS
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
            check_range(off, buf.len() as u64, self.size)?;
            for (i, b) in buf.iter_mut().enumerate() {
                let p = off + i as u64;
                *b = if p >= self.at && p < self.at + self.data.len() as u64 {
                    self.data[(p - self.at) as usize]
                } else {
                    0
                };
            }
            Ok(())
        }
        fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
            check_status_range(off, len, self.size)?;
            let end = self.at + self.data.len() as u64;
            Ok(if off < self.at {
                Extent::new(ExtentKind::Zero, (self.at - off).min(len))
            } else if off < end {
                Extent::new(ExtentKind::Data, (end - off).min(len))
            } else {
                Extent::new(ExtentKind::Unallocated, len)
            })
        }
    }

    fn mem(size: u64, at: u64, data: &[u8]) -> Mem {
        Mem {
            size,
            at,
            data: data.to_vec(),
        }
    }

    #[test]
    fn same_content_in_different_places_of_allocation_is_identical() {
        let a = mem(20 << 20, 9 << 20, &[0, 0, 5, 6]);
        let b = mem(20 << 20, (9 << 20) + 2, &[5, 6, 0, 0, 0]);
        assert_eq!(
            compare(&a, &b, CompareOptions::default(), &()).unwrap(),
            Comparison::Identical
        );
    }

    #[test]
    fn reports_the_first_differing_byte() {
        let a = mem(20 << 20, 9 << 20, &[1, 2, 3]);
        let b = mem(20 << 20, 9 << 20, &[1, 2, 4]);
        assert_eq!(
            compare(&a, &b, CompareOptions::default(), &()).unwrap(),
            Comparison::Differ {
                offset: (9 << 20) + 2
            }
        );
    }

    #[test]
    fn data_against_a_hole_differs_where_it_is_nonzero() {
        let a = mem(8 << 20, 0, &[]);
        let b = mem(8 << 20, 5 << 20, &[0, 0, 0, 7]);
        assert_eq!(
            compare(&a, &b, CompareOptions::default(), &()).unwrap(),
            Comparison::Differ {
                offset: (5 << 20) + 3
            }
        );
    }

    #[test]
    fn larger_device_with_zero_tail_is_identical_unless_strict() {
        let a = mem(1 << 20, 0, &[3; 100]);
        let b = mem(2 << 20, 0, &[3; 100]);
        assert_eq!(
            compare(&a, &b, CompareOptions::default(), &()).unwrap(),
            Comparison::Identical
        );
        assert_eq!(
            compare(&a, &b, CompareOptions { strict: true }, &()).unwrap(),
            Comparison::SizeMismatch {
                a: 1 << 20,
                b: 2 << 20
            }
        );
    }

    #[test]
    fn nonzero_tail_of_larger_device_differs() {
        let a = mem(1 << 20, 0, &[]);
        let b = mem(2 << 20, (1 << 20) + 10, &[9]);
        assert_eq!(
            compare(&a, &b, CompareOptions::default(), &()).unwrap(),
            Comparison::Differ {
                offset: (1 << 20) + 10
            }
        );
    }
}
