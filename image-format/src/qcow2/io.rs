//! The I/O that executes a mapping: loading L2 tables through a bounded LRU cache, and
//! decompressing compressed clusters (zlib raw deflate or zstd).
//!
//! The cache lock is held only to look up or insert a table (an `Arc`), never while reading
//! from the file; two threads missing on the same table may both read it, which is harmless.
//! An in-place writer replaces a table with [`L2Cache::put`]; a load that started before a `put`
//! is returned to its caller but not cached, so a table read from the file before the change can
//! never replace the newer one. A table changed in memory but not yet written back is *pinned*
//! ([`L2Cache::put_pinned`]): eviction passes it by until [`L2Cache::unpin`], so every reader
//! sees the change although the file does not hold it yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::file::ImageFile;

use super::header::CompressionType;

/// Bytes of L2 tables kept in memory per image (at least [`MIN_CACHED_TABLES`] tables).
pub const L2_CACHE_BYTES: u64 = 32 << 20;
/// Tables kept whatever the cluster size.
pub const MIN_CACHED_TABLES: usize = 4;

/// A bounded least-recently-used cache of L2 tables, keyed by their file offset.
#[derive(Debug)]
pub struct L2Cache {
    inner: Mutex<CacheInner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    /// Table, last use, pinned.
    tables: HashMap<u64, (Arc<[u64]>, u64, bool)>,
    tick: u64,
    /// Bumped by every [`L2Cache::put`].
    epoch: u64,
}

impl L2Cache {
    /// A cache sized for tables of `cluster_size` bytes.
    pub fn new(cluster_size: u64) -> Self {
        let capacity = usize::try_from(L2_CACHE_BYTES / cluster_size.max(1))
            .unwrap_or(MIN_CACHED_TABLES)
            .max(MIN_CACHED_TABLES);
        L2Cache {
            inner: Mutex::new(CacheInner::default()),
            capacity,
        }
    }

    /// The table at `offset`, loaded with `load` on a miss (without the lock held).
    pub fn get(&self, offset: u64, load: impl FnOnce() -> Result<Vec<u64>>) -> Result<Arc<[u64]>> {
        let epoch = {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            if let Some((table, used, _)) = inner.tables.get_mut(&offset) {
                *used = tick;
                return Ok(Arc::clone(table));
            }
            inner.epoch
        };
        let table: Arc<[u64]> = load()?.into();
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return Ok(table);
        }
        if let Some((cached, _, _)) = inner.tables.get(&offset) {
            return Ok(Arc::clone(cached));
        }
        self.insert(&mut inner, offset, Arc::clone(&table), false);
        Ok(table)
    }

    /// Replaces (or adds) the table at `offset`, which the caller has just written to the file.
    pub fn put(&self, offset: u64, table: Arc<[u64]>) {
        self.replace(offset, table, false);
    }

    /// Replaces (or adds) the table at `offset`, changed in memory only: it stays cached until
    /// [`L2Cache::unpin`] (the caller bounds how many it pins).
    pub fn put_pinned(&self, offset: u64, table: Arc<[u64]>) {
        self.replace(offset, table, true);
    }

    /// Lets the table at `offset`, now written to the file, be evicted again.
    pub fn unpin(&self, offset: u64) {
        if let Some((_, _, pinned)) = self.lock().tables.get_mut(&offset) {
            *pinned = false;
        }
    }

    fn replace(&self, offset: u64, table: Arc<[u64]>, pinned: bool) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.tables.remove(&offset);
        self.insert(&mut inner, offset, table, pinned);
    }

    fn insert(&self, inner: &mut CacheInner, offset: u64, table: Arc<[u64]>, pinned: bool) {
        if inner.tables.len() >= self.capacity
            && let Some(oldest) = inner
                .tables
                .iter()
                .filter(|(_, (_, _, pinned))| !pinned)
                .min_by_key(|(_, (_, used, _))| *used)
                .map(|(k, _)| *k)
        {
            inner.tables.remove(&oldest);
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.tables.insert(offset, (table, tick, pinned));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads a table of big-endian u64 entries (`len` bytes, bounded by the caller).
pub fn read_table(
    file: &ImageFile,
    offset: u64,
    len: usize,
    structure: &'static str,
) -> Result<Vec<u64>> {
    let bytes = file.read_vec(offset, len, structure)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Reads the compressed stream `[host, host + clen)` and inflates it into `out` (one cluster).
/// The stream may end past the end of the file by less than a sector (qemu writes compressed
/// clusters without padding the file); the missing bytes read as zeros.
pub fn read_compressed(
    file: &ImageFile,
    kind: CompressionType,
    host: u64,
    clen: u64,
    out: &mut [u8],
) -> Result<()> {
    let corrupt = |reason: String| {
        Error::corrupt("qcow2 compressed cluster", host, reason).in_file(file.path())
    };
    let end = host
        .checked_add(clen)
        .ok_or_else(|| corrupt("offset overflows".into()))?;
    if host >= file.len() || end > file.len().saturating_add(512) {
        return Err(corrupt(format!(
            "{clen} bytes needed but the file ends at {:#x}",
            file.len()
        )));
    }
    let mut input = vec![0u8; usize::try_from(clen).map_err(|_| corrupt("too long".into()))?];
    file.read_zero_padded(&mut input, host)?;
    let produced = match kind {
        CompressionType::Zlib => inflate_raw(&input, out),
        CompressionType::Zstd => unzstd(&input, out),
    }
    .map_err(&corrupt)?;
    if produced != out.len() {
        return Err(corrupt(format!(
            "decompresses to {produced} bytes, a cluster is {}",
            out.len()
        )));
    }
    Ok(())
}

/// Raw deflate (no zlib header): returns the bytes produced.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    let mut d = flate2::Decompress::new(false);
    d.decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| format!("deflate stream invalid: {e}"))?;
    usize::try_from(d.total_out()).map_err(|_| "deflate output too long".to_string())
}

/// One or more zstd frames, stopping once `out` is full: returns the bytes produced.
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| format!("zstd init: {e}"))?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    // Each round consumes input or produces output, or we stop: bounded by the buffer sizes.
    loop {
        let before = (src.pos(), dst.pos());
        let hint = dec
            .run(&mut src, &mut dst)
            .map_err(|e| format!("zstd stream invalid: {e}"))?;
        let full = dst.pos() == dst.capacity();
        if full || (hint == 0 && src.pos() == input.len()) || (src.pos(), dst.pos()) == before {
            break;
        }
    }
    Ok(dst.pos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_tables_outlive_eviction_until_unpinned() {
        // Clusters so large that the cache holds its minimum of tables.
        let cache = L2Cache::new(L2_CACHE_BYTES);
        assert_eq!(cache.capacity, MIN_CACHED_TABLES);
        let table = |v: u64| -> Arc<[u64]> { vec![v; 4].into() };
        let not_loaded = || -> Result<Vec<u64>> { Ok(vec![u64::MAX; 4]) };
        cache.put_pinned(0, table(1));
        for off in 1..=10u64 {
            cache.put(off * 1024, table(off + 100));
        }
        assert_eq!(
            cache.get(0, not_loaded).unwrap()[0],
            1,
            "a pinned table was evicted"
        );
        assert_eq!(
            cache.get(1024, not_loaded).unwrap()[0],
            u64::MAX,
            "nothing was evicted"
        );
        cache.unpin(0);
        for off in 11..=20u64 {
            cache.put(off * 1024, table(off + 100));
        }
        assert_eq!(
            cache.get(0, not_loaded).unwrap()[0],
            u64::MAX,
            "unpinned, kept forever"
        );
    }

    #[test]
    fn raw_deflate_round_trips() {
        use std::io::Write;
        let data = vec![0xabu8; 4096];
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut packed = enc.finish().unwrap();
        packed.extend_from_slice(&[0; 300]); // sector padding after the stream
        let mut out = vec![0u8; 4096];
        assert_eq!(inflate_raw(&packed, &mut out).unwrap(), 4096);
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_stops_when_the_cluster_is_full() {
        let data = vec![7u8; 4096];
        let mut packed = zstd::bulk::compress(&data, 1).unwrap();
        packed.extend_from_slice(&[0; 100]); // trailing bytes of the last sector
        let mut out = vec![0u8; 4096];
        assert_eq!(unzstd(&packed, &mut out).unwrap(), 4096);
        assert_eq!(out, data);
    }

    #[test]
    fn compressed_stream_may_end_past_the_file_by_less_than_a_sector() {
        use std::io::Write;
        let data = vec![0x5au8; 4096];
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let packed = enc.finish().unwrap();
        let dir = std::env::temp_dir().join(format!("vmnest-qcow2-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tail.bin");
        let mut bytes = vec![0u8; 1000];
        bytes.extend_from_slice(&packed);
        std::fs::write(&path, &bytes).unwrap();
        let file = ImageFile::open(&path).unwrap();
        // The descriptor counts whole sectors: the last one passes the end of the file.
        let clen = (1000 + packed.len() as u64).div_ceil(512) * 512 - 1000;
        let mut out = vec![0u8; 4096];
        read_compressed(&file, CompressionType::Zlib, 1000, clen, &mut out).unwrap();
        assert_eq!(out, data);
        let err =
            read_compressed(&file, CompressionType::Zlib, 1000, clen + 1024, &mut out).unwrap_err();
        assert!(err.is_corruption(), "{err}");
    }

    #[test]
    fn garbage_is_not_a_cluster() {
        let mut out = vec![0u8; 4096];
        let produced = inflate_raw(&[0xff; 64], &mut out).unwrap_or(0);
        assert_ne!(produced, 4096);
    }

    #[test]
    fn cache_evicts_the_least_recently_used_table() {
        let cache = L2Cache {
            inner: Mutex::new(CacheInner::default()),
            capacity: 2,
        };
        cache.get(1, || Ok(vec![1])).unwrap();
        cache.get(2, || Ok(vec![2])).unwrap();
        cache.get(1, || Ok(vec![9])).unwrap(); // hit: 1 is now the newest
        cache.get(3, || Ok(vec![3])).unwrap(); // evicts 2
        assert_eq!(&*cache.get(1, || Ok(vec![9])).unwrap(), &[1]);
        assert_eq!(&*cache.get(2, || Ok(vec![8])).unwrap(), &[8]);
    }

    #[test]
    fn a_load_racing_a_put_is_not_cached() {
        let cache = L2Cache::new(4096);
        // The load reads the old table from the file; meanwhile a writer puts the new one.
        let got = cache
            .get(7, || {
                cache.put(7, vec![2].into());
                Ok(vec![1])
            })
            .unwrap();
        assert_eq!(&*got, &[1]);
        assert_eq!(&*cache.get(7, || Ok(vec![9])).unwrap(), &[2]);
    }
}
