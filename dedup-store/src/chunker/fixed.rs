//! Fixed-size chunking of a guest address space: aligned chunks of a per-image size for disks,
//! 4 KiB pages for page-aligned memory images.
//!
//! Chunk `i` covers `[i * chunk_size, min((i + 1) * chunk_size, size))`: every chunk is aligned,
//! only the last one may be short (a disk whose size is not a multiple of the chunk size).
//! Chunks whose bytes are all zero are reported as [`FixedChunk::Zero`]: they are never stored,
//! the image map records a hole.

use std::io::{self, Read};
use std::ops::Range;

use crate::chunk::is_zero_chunk;
use crate::error::{Error, Result};

/// The page size of memory images.
pub const PAGE_SIZE: u64 = 4096;
/// Smallest chunk size of a disk.
pub const MIN_CHUNK_SIZE: u64 = 4096;
/// Largest chunk size of a disk (bounds the read buffer).
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;

/// The chunk grid of an address space of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedChunker {
    size: u64,
    chunk_size: u64,
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixedChunk<'a> {
    /// All zeros: not stored.
    Zero,
    /// Bytes to store.
    Data(&'a [u8]),
}

/// Zero when `data` is all zeros, else the data.
pub fn classify(data: &[u8]) -> FixedChunk<'_> {
    if is_zero_chunk(data) {
        FixedChunk::Zero
    } else {
        FixedChunk::Data(data)
    }
}

impl FixedChunker {
    /// Chunks of `chunk_size` (a power of two in `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`) over `size`
    /// bytes.
    pub fn new(size: u64, chunk_size: u64) -> Result<FixedChunker> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(Error::InvalidArgument(format!(
                "chunk size {chunk_size} is not a power of two between {MIN_CHUNK_SIZE} and \
                 {MAX_CHUNK_SIZE}"
            )));
        }
        Ok(FixedChunker { size, chunk_size })
    }

    /// 4 KiB pages over a memory image of `size` bytes, which must be page-aligned.
    pub fn pages(size: u64) -> Result<FixedChunker> {
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgument(format!(
                "memory image size {size} is not a multiple of the {PAGE_SIZE}-byte page"
            )));
        }
        FixedChunker::new(size, PAGE_SIZE)
    }

    /// The size of the address space.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// How many chunks cover the address space.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The byte range of chunk `index`, `None` past the end.
    pub fn chunk(&self, index: u64) -> Option<Range<u64>> {
        let start = index.checked_mul(self.chunk_size)?;
        if start >= self.size {
            return None;
        }
        Some(start..self.size.min(start + self.chunk_size))
    }

    /// The index of the chunk holding byte `offset`.
    pub fn index_of(&self, offset: u64) -> u64 {
        offset / self.chunk_size
    }

    /// The byte ranges of all chunks, in order.
    pub fn chunks(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        (0..self.chunk_count()).filter_map(|i| self.chunk(i))
    }

    /// Reads the address space sequentially from `reader` (exactly `size` bytes), chunk by chunk.
    pub fn read<R: Read>(&self, reader: R) -> FixedReader<R> {
        let buf_len = self.chunk_size.min(self.size.max(1)) as usize;
        FixedReader {
            chunker: *self,
            reader,
            buf: vec![0u8; buf_len].into_boxed_slice(),
            next: 0,
        }
    }
}

/// Reads chunks of a [`FixedChunker`] from a reader; [`FixedReader::next_chunk`] lends each one.
#[derive(Debug)]
pub struct FixedReader<R> {
    chunker: FixedChunker,
    reader: R,
    buf: Box<[u8]>,
    next: u64,
}

impl<R: Read> FixedReader<R> {
    /// The next chunk's range and content, `None` after the last. A reader that ends before
    /// `size` bytes is an `UnexpectedEof` error.
    pub fn next_chunk(&mut self) -> io::Result<Option<(Range<u64>, FixedChunk<'_>)>> {
        let Some(range) = self.chunker.chunk(self.next) else {
            return Ok(None);
        };
        let len = (range.end - range.start) as usize;
        self.reader.read_exact(&mut self.buf[..len])?;
        self.next += 1;
        Ok(Some((range, classify(&self.buf[..len]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_aligned_and_only_the_last_is_short() {
        let c = FixedChunker::new(10 * 65536 + 100, 65536).unwrap();
        assert_eq!(c.chunk_count(), 11);
        let all: Vec<_> = c.chunks().collect();
        assert_eq!(all[0], 0..65536);
        assert_eq!(all[9], 9 * 65536..10 * 65536);
        assert_eq!(all[10], 10 * 65536..10 * 65536 + 100);
        assert_eq!(c.chunk(11), None);
        assert_eq!(c.chunk(u64::MAX), None);
        assert_eq!(c.index_of(65536 * 3 + 7), 3);
        assert_eq!(FixedChunker::new(0, 4096).unwrap().chunk_count(), 0);
    }

    #[test]
    fn chunk_sizes_and_page_alignment_are_validated() {
        assert!(FixedChunker::new(1 << 30, 3000).is_err());
        assert!(FixedChunker::new(1 << 30, 2048).is_err());
        assert!(FixedChunker::new(1 << 30, MAX_CHUNK_SIZE * 2).is_err());
        assert!(FixedChunker::pages(4096 * 3 + 1).is_err());
        assert_eq!(FixedChunker::pages(4096 * 3).unwrap().chunk_count(), 3);
    }

    #[test]
    fn zero_chunks_are_reported_as_zero() {
        let mut disk = vec![0u8; 5 * 8192 + 4096];
        disk[8192 + 17] = 1; // chunk 1
        disk[5 * 8192 + 4095] = 9; // last, short chunk
        let c = FixedChunker::new(disk.len() as u64, 8192).unwrap();
        let mut reader = c.read(&disk[..]);
        let mut kinds = Vec::new();
        while let Some((range, chunk)) = reader.next_chunk().unwrap() {
            match chunk {
                FixedChunk::Zero => kinds.push((range.start, 'z')),
                FixedChunk::Data(d) => {
                    assert_eq!(d, &disk[range.start as usize..range.end as usize]);
                    kinds.push((range.start, 'd'))
                }
            }
        }
        assert_eq!(
            kinds,
            [
                (0, 'z'),
                (8192, 'd'),
                (16384, 'z'),
                (24576, 'z'),
                (32768, 'z'),
                (40960, 'd')
            ]
        );
    }

    #[test]
    fn a_short_reader_is_an_error() {
        let c = FixedChunker::pages(8192).unwrap();
        let data = [1u8; 6000];
        let mut reader = c.read(&data[..]);
        assert!(reader.next_chunk().unwrap().is_some());
        let err = reader.next_chunk().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
