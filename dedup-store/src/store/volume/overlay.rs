//! The overlay index of a volume: which guest bytes the write log covers, and with what.
//!
//! Disjoint segments keyed by their first guest byte; a later write splits or replaces what it
//! overlaps. A segment costs one map entry whatever its length, so the index grows with the
//! number of distinct written ranges (adjacent zero ranges merge), not with the disk size.

use std::collections::BTreeMap;

/// Where the bytes of a segment come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The log, from this log offset on (byte `k` of the segment is at offset + k).
    Log(u64),
    /// A sealed log's record, from log offset `at` on: its ciphertext, whose keystream starts
    /// at `payload_at` under `nonce` (byte `k` of the segment is at `at + k`, keystream
    /// position `at + k - payload_at`). A segment never spans two records: log segments do
    /// not merge.
    Sealed {
        at: u64,
        payload_at: u64,
        nonce: [u8; crate::crypt::NONCE_LEN],
    },
    /// Zeros.
    Zero,
}

impl Source {
    /// The source of the bytes `n` further on.
    pub fn advance(self, n: u64) -> Source {
        match self {
            Source::Log(at) => Source::Log(at + n),
            Source::Sealed {
                at,
                payload_at,
                nonce,
            } => Source::Sealed {
                at: at + n,
                payload_at,
                nonce,
            },
            Source::Zero => Source::Zero,
        }
    }
}

/// One piece of a range: guest bytes `start..end` read from `source` (None: from the base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub source: Option<Source>,
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    segs: BTreeMap<u64, (u64, Source)>,
}

impl Overlay {
    /// No segments.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    /// Makes `start..end` read from `source` (a later write wins over what it overlaps).
    pub fn insert(&mut self, start: u64, end: u64, source: Source) {
        if start >= end {
            return;
        }
        // A segment that begins before `start` and reaches into the range keeps its head (and
        // its tail past `end`).
        if let Some((&s, &(e, src))) = self.segs.range(..start).next_back()
            && e > start
        {
            self.segs.insert(s, (start, src));
            if e > end {
                self.segs.insert(end, (e, src.advance(end - s)));
            }
        }
        let inside: Vec<u64> = self.segs.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some((e, src)) = self.segs.remove(&k)
                && e > end
            {
                self.segs.insert(end, (e, src.advance(end - k)));
            }
        }
        let (mut start, mut end) = (start, end);
        if source == Source::Zero {
            // Merge with zero neighbours that touch.
            if let Some((&s, &(e, Source::Zero))) = self.segs.range(..start).next_back()
                && e == start
            {
                self.segs.remove(&s);
                start = s;
            }
            if let Some(&(e, Source::Zero)) = self.segs.get(&end) {
                self.segs.remove(&end);
                end = e;
            }
        }
        self.segs.insert(start, (end, source));
    }

    /// The pieces that make up `start..end`, in order, with the gaps (read from the base).
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = start;
        let first = match self.segs.range(..=start).next_back() {
            Some((&s, &(e, _))) if e > start => s,
            _ => start,
        };
        for (&s, &(e, src)) in self.segs.range(first..end) {
            if s > at {
                out.push(Piece {
                    start: at,
                    end: s,
                    source: None,
                });
                at = s;
            }
            let piece_end = e.min(end);
            out.push(Piece {
                start: at,
                end: piece_end,
                source: Some(src.advance(at - s)),
            });
            at = piece_end;
        }
        if at < end {
            out.push(Piece {
                start: at,
                end,
                source: None,
            });
        }
        out
    }

    /// Every segment, in order.
    pub fn segments(&self) -> impl Iterator<Item = (u64, u64, Source)> + '_ {
        self.segs.iter().map(|(&s, &(e, src))| (s, e, src))
    }

    /// The segment holding `at`, if any.
    pub fn at(&self, at: u64) -> Option<(u64, u64, Source)> {
        match self.segs.range(..=at).next_back() {
            Some((&s, &(e, src))) if e > at => Some((s, e, src)),
            _ => None,
        }
    }

    /// The first segment start after `at`, if any.
    pub fn next_start(&self, at: u64) -> Option<u64> {
        self.segs.range(at + 1..).next().map(|(&s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-per-byte model: each guest byte's source.
    fn model(ops: &[(u64, u64, Source)], size: u64) -> Vec<Option<Source>> {
        let mut m = vec![None; size as usize];
        for &(s, e, src) in ops {
            for b in s..e {
                m[b as usize] = Some(src.advance(b - s));
            }
        }
        m
    }

    #[test]
    fn overlapping_writes_split_and_replace_like_a_byte_model() {
        let random = crate::chunker::cdc::xorshift_bytes(12345, 8 * 40_000);
        let mut words = random
            .chunks(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()));
        let mut next = || words.next().unwrap();
        for round in 0..200 {
            let size = 64;
            let mut ov = Overlay::default();
            let mut ops = Vec::new();
            let mut log_at = 1000 * round;
            for _ in 0..(next() % 12) {
                let s = next() % size;
                let e = (s + 1 + next() % 20).min(size);
                let src = if next() % 3 == 0 {
                    Source::Zero
                } else {
                    log_at += 100;
                    Source::Log(log_at)
                };
                ov.insert(s, e, src);
                ops.push((s, e, src));
            }
            let want = model(&ops, size);
            for s in 0..size {
                for e in s + 1..=size {
                    let mut got = Vec::new();
                    for p in ov.pieces(s, e) {
                        for b in p.start..p.end {
                            got.push(p.source.map(|src| src.advance(b - p.start)));
                        }
                    }
                    assert_eq!(got, want[s as usize..e as usize], "round {round} {s}..{e}");
                }
            }
            // Segments are disjoint and ordered.
            let segs: Vec<_> = ov.segments().collect();
            for w in segs.windows(2) {
                assert!(w[0].1 <= w[1].0);
            }
        }
    }

    #[test]
    fn touching_zero_ranges_merge() {
        let mut ov = Overlay::default();
        ov.insert(0, 10, Source::Zero);
        ov.insert(20, 30, Source::Zero);
        ov.insert(10, 20, Source::Zero);
        assert_eq!(ov.len(), 1);
        assert_eq!(ov.at(25), Some((0, 30, Source::Zero)));
        assert_eq!(ov.next_start(0), None);
    }
}
