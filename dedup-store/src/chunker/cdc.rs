//! Content-defined chunking (CDC) of byte streams that are not page-aligned: a QEMU migration
//! stream's device state, a configuration file.
//!
//! # The algorithm (pinned: changing anything here moves every cut point of every stored stream)
//!
//! A rolling **gear hash** runs over the bytes: `h = (h << 1) + GEAR[byte]` (wrapping, 64 bits).
//! Because each step shifts left by one, a byte's contribution has left the 64-bit hash 64 bytes
//! later, so bit `k` of `h` depends on the last `k + 1` bytes only and the top bits on the last
//! 64 bytes: the hash is a 64-byte sliding window for free. Cut conditions therefore test the
//! **top** bits of `h` (the low bits would see only the last few bytes).
//!
//! - `GEAR` is 256 values of SplitMix64 (`state += 0x9e3779b97f4a7c15; z = state;
//!   z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9; z = (z ^ (z >> 27)) * 0x94d049bb133111eb;
//!   z ^ (z >> 31)`) started from [`GEAR_SEED`], in order `GEAR[0]`, `GEAR[1]`, ...
//! - A chunk is at least `min` and at most `max` bytes (the last chunk of a stream may be
//!   shorter than `min`). `avg` is a power of two, `2^b`.
//! - **Normalized chunking**: for candidate lengths in `[min, avg)` the cut condition is that the
//!   top `b + 2` bits of `h` are zero (harder to meet), for lengths in `[avg, max)` the top
//!   `b - 2` bits (easier), and a chunk reaching `max` bytes is cut there. This tightens the size
//!   distribution around `avg`.
//! - The first `min - 64` bytes of a chunk are skipped without hashing (they cannot end it, and
//!   they would have left the 64-byte window anyway): `h` starts at 0 at offset
//!   `max(min - 64, 0)` of the chunk, so a cut decision depends only on the 64 bytes before it
//!   and the distance from the previous cut.
//!
//! The defaults are [`MIN_SIZE`] 16 KiB, [`AVG_SIZE`] 64 KiB and [`MAX_SIZE`] 256 KiB.
//! Streaming ([`StreamChunker`]) holds at most `max` bytes.

use std::io::{self, Read};

use crate::error::{Error, Result};

/// Default minimum chunk size.
pub const MIN_SIZE: usize = 16 * 1024;
/// Default target (average) chunk size.
pub const AVG_SIZE: usize = 64 * 1024;
/// Default maximum chunk size.
pub const MAX_SIZE: usize = 256 * 1024;
/// Smallest `min` accepted by [`CdcParams::new`].
pub const MIN_SIZE_LIMIT: usize = 64;
/// Largest `max` accepted by [`CdcParams::new`] (bounds the streaming buffer).
pub const MAX_SIZE_LIMIT: usize = 64 * 1024 * 1024;
/// The seed of the SplitMix64 sequence that fills the gear table ("vmnestcd" in ASCII).
pub const GEAR_SEED: u64 = 0x766d_6e65_7374_6364;

const fn splitmix64_table(seed: u64) -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut state = seed;
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// The gear table: 256 SplitMix64 values from [`GEAR_SEED`].
pub static GEAR: [u64; 256] = splitmix64_table(GEAR_SEED);

/// Chunk size bounds of the content-defined chunker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdcParams {
    min: usize,
    avg: usize,
    max: usize,
}

impl Default for CdcParams {
    fn default() -> Self {
        CdcParams {
            min: MIN_SIZE,
            avg: AVG_SIZE,
            max: MAX_SIZE,
        }
    }
}

impl CdcParams {
    /// Validates `min < avg < max`, `avg` a power of two of at least 256,
    /// `min >= MIN_SIZE_LIMIT` and `max <= MAX_SIZE_LIMIT`.
    pub fn new(min: usize, avg: usize, max: usize) -> Result<CdcParams> {
        if !avg.is_power_of_two() || avg < 256 {
            return Err(Error::InvalidArgument(format!(
                "CDC average size {avg} is not a power of two of at least 256"
            )));
        }
        if min < MIN_SIZE_LIMIT || min >= avg || avg >= max || max > MAX_SIZE_LIMIT {
            return Err(Error::InvalidArgument(format!(
                "CDC sizes need {MIN_SIZE_LIMIT} <= min < avg < max <= {MAX_SIZE_LIMIT}, \
                 got {min} / {avg} / {max}"
            )));
        }
        Ok(CdcParams { min, avg, max })
    }

    /// Minimum chunk size (except a stream's last chunk).
    pub fn min(&self) -> usize {
        self.min
    }
    /// Target chunk size.
    pub fn avg(&self) -> usize {
        self.avg
    }
    /// Maximum chunk size.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// A chunk of a stream: `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub offset: u64,
    pub len: usize,
}

/// The content-defined chunker (see the module doc for the pinned algorithm).
#[derive(Debug, Clone, Copy)]
pub struct Cdc {
    params: CdcParams,
    mask_small: u64,
    mask_large: u64,
}

impl Default for Cdc {
    fn default() -> Self {
        Cdc::new(CdcParams::default())
    }
}

/// A mask of the top `bits` bits of a u64.
fn top_bits(bits: u32) -> u64 {
    if bits == 0 {
        0
    } else {
        u64::MAX << (64 - bits)
    }
}

impl Cdc {
    /// A chunker with `params`.
    pub fn new(params: CdcParams) -> Cdc {
        let b = params.avg.trailing_zeros();
        Cdc {
            params,
            mask_small: top_bits(b + 2),
            mask_large: top_bits(b - 2),
        }
    }

    /// The size bounds.
    pub fn params(&self) -> CdcParams {
        self.params
    }

    /// The length of the chunk starting at `data[0]`, when it is decided by `data`: a cut found
    /// in `data`, or `max` when `data` holds at least `max` bytes. `None` when `data` is shorter
    /// than `max` and holds no cut (more bytes are needed, or at the end of the stream the whole
    /// of `data` is the last chunk).
    pub fn find_cut(&self, data: &[u8]) -> Option<usize> {
        let CdcParams { min, avg, max } = self.params;
        if data.len() <= min {
            return if data.len() >= max { Some(max) } else { None };
        }
        let end = data.len().min(max);
        let mut h: u64 = 0;
        let start = min.saturating_sub(64);
        // Warm-up: bytes whose position cannot end a chunk (length < min).
        for &byte in &data[start..min - 1] {
            h = (h << 1).wrapping_add(GEAR[byte as usize]);
        }
        // Lengths min..avg: the harder condition.
        let small_end = end.min(avg - 1);
        for (i, &byte) in data.iter().enumerate().take(small_end).skip(min - 1) {
            h = (h << 1).wrapping_add(GEAR[byte as usize]);
            if h & self.mask_small == 0 {
                return Some(i + 1);
            }
        }
        for (i, &byte) in data.iter().enumerate().take(end).skip(small_end) {
            h = (h << 1).wrapping_add(GEAR[byte as usize]);
            if h & self.mask_large == 0 {
                return Some(i + 1);
            }
        }
        if data.len() >= max { Some(max) } else { None }
    }

    /// The cut points of all of `data` (an in-memory stream).
    pub fn cut_points(&self, data: &[u8]) -> Vec<Cut> {
        let mut cuts = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let len = self.find_cut(&data[pos..]).unwrap_or(data.len() - pos);
            cuts.push(Cut {
                offset: pos as u64,
                len,
            });
            pos += len;
        }
        cuts
    }

    /// A streaming chunker over `reader`.
    pub fn stream<R: Read>(&self, reader: R) -> StreamChunker<R> {
        StreamChunker {
            reader,
            cdc: *self,
            buf: vec![0u8; self.params.max].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
        }
    }
}

/// Chunks a reader with a buffer of `max` bytes; [`StreamChunker::next_chunk`] lends each chunk.
#[derive(Debug)]
pub struct StreamChunker<R> {
    reader: R,
    cdc: Cdc,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    offset: u64,
}

impl<R: Read> StreamChunker<R> {
    /// The next chunk and its bytes, or `None` at the end of the stream.
    pub fn next_chunk(&mut self) -> io::Result<Option<(Cut, &[u8])>> {
        // Fill the buffer up to `max` bytes (or the end of the stream).
        if !self.eof && self.end - self.start < self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < self.buf.len() {
                match self.reader.read(&mut self.buf[self.end..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => self.end += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let avail = &self.buf[self.start..self.end];
        if avail.is_empty() {
            return Ok(None);
        }
        let len = self.cdc.find_cut(avail).unwrap_or(avail.len());
        let cut = Cut {
            offset: self.offset,
            len,
        };
        let at = self.start;
        self.start += len;
        self.offset += len as u64;
        Ok(Some((cut, &self.buf[at..at + len])))
    }
}

#[cfg(test)]
pub(crate) fn xorshift_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const GOLDEN_SEED: u64 = 0x0123_4567_89ab_cdef;

    fn cuts_digest(cuts: &[Cut]) -> String {
        let mut hasher = blake3::Hasher::new();
        for c in cuts {
            hasher.update(&c.offset.to_le_bytes());
            hasher.update(&(c.len as u64).to_le_bytes());
        }
        hasher.finalize().to_hex().to_string()
    }

    #[test]
    fn gear_table_is_pinned() {
        // GEAR[0] recomputed independently (a few lines of Python from the module doc).
        assert_eq!(GEAR[0], 0x9200_644c_dfc1_0ac2);
        let digest = blake3::hash(
            &GEAR
                .iter()
                .flat_map(|g| g.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        assert_eq!(
            digest.to_hex().as_str(),
            "836e8292e65b64c2ee4355957baabf75b36f1633195ca4d057b09c4cb7ea8336"
        );
    }

    #[test]
    fn golden_cut_points_of_a_4_mib_xorshift_stream() {
        let data = xorshift_bytes(GOLDEN_SEED, 4 << 20);
        let cuts = Cdc::default().cut_points(&data);
        let offsets: Vec<u64> = cuts.iter().take(4).map(|c| c.offset).collect();
        assert_eq!(offsets, [0, 34386, 115065, 136261], "first cut offsets");
        assert_eq!(cuts.len(), 58, "chunk count");
        assert_eq!(
            cuts_digest(&cuts),
            "a675a351edfb1065371ceb16944fd85c30e70b511bcffe2f7433802a6510c362"
        );
    }

    #[test]
    fn chunks_respect_min_and_max_and_cover_the_stream() {
        let data = xorshift_bytes(7, 3 << 20);
        let cdc = Cdc::default();
        let cuts = cdc.cut_points(&data);
        let mut pos = 0u64;
        for (i, c) in cuts.iter().enumerate() {
            assert_eq!(c.offset, pos);
            assert!(c.len <= MAX_SIZE);
            if i + 1 < cuts.len() {
                assert!(c.len >= MIN_SIZE, "chunk {i} is {} bytes", c.len);
            }
            pos += c.len as u64;
        }
        assert_eq!(pos, data.len() as u64);
        let avg = data.len() / cuts.len();
        assert!((AVG_SIZE / 2..AVG_SIZE * 2).contains(&avg), "average {avg}");
    }

    #[test]
    fn zeros_are_cut_at_max() {
        let data = vec![0u8; MAX_SIZE * 3 + 5];
        let cuts = Cdc::default().cut_points(&data);
        let lens: Vec<usize> = cuts.iter().map(|c| c.len).collect();
        assert_eq!(lens, [MAX_SIZE, MAX_SIZE, MAX_SIZE, 5]);
    }

    /// A reader returning at most a few bytes per call.
    struct Dribble<'a>(&'a [u8], usize);
    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = self.1 % 13 + 1;
            let n = self.1.min(buf.len()).min(self.0.len()) * 997;
            let n = n.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn streaming_matches_in_memory_cut_points() {
        let data = xorshift_bytes(99, (1 << 20) + 12345);
        let cdc = Cdc::new(CdcParams::new(4096, 16384, 65536).unwrap());
        let expected = cdc.cut_points(&data);
        let mut stream = cdc.stream(Dribble(&data, 0));
        let mut got = Vec::new();
        while let Some((cut, bytes)) = stream.next_chunk().unwrap() {
            assert_eq!(
                bytes,
                &data[cut.offset as usize..cut.offset as usize + cut.len]
            );
            got.push(cut);
        }
        assert_eq!(got, expected);
        let mut empty = cdc.stream(&[][..]);
        assert!(empty.next_chunk().unwrap().is_none());
    }

    #[test]
    fn inserting_bytes_near_the_start_shifts_only_the_first_cut_points() {
        let data = xorshift_bytes(GOLDEN_SEED, 4 << 20);
        let mut edited = data[..1000].to_vec();
        edited.extend_from_slice(b"inserted by the resynchronization test");
        edited.extend_from_slice(&data[1000..]);
        let cdc = Cdc::default();
        let ids = |d: &[u8]| -> Vec<crate::ChunkId> {
            cdc.cut_points(d)
                .iter()
                .map(|c| crate::ChunkId::of(&d[c.offset as usize..c.offset as usize + c.len]))
                .collect()
        };
        let before = ids(&data);
        let after = ids(&edited);
        let before_set: HashSet<_> = before.iter().collect();
        let shared = after.iter().filter(|id| before_set.contains(id)).count();
        // Only the chunk holding the insertion differs: every later cut point resynchronizes.
        assert_eq!(after.len(), before.len());
        assert_eq!(shared, before.len() - 1, "shared chunks");
        assert_eq!(before[1..], after[1..]);
    }

    #[test]
    fn params_are_validated() {
        assert!(CdcParams::new(16384, 65536, 262144).is_ok());
        assert!(CdcParams::new(16384, 60000, 262144).is_err());
        assert!(CdcParams::new(65536, 65536, 262144).is_err());
        assert!(CdcParams::new(16384, 65536, 65536).is_err());
        assert!(CdcParams::new(16, 256, 1024).is_err());
        assert!(CdcParams::new(1024, 65536, MAX_SIZE_LIMIT + 1).is_err());
    }
}
