//! [`RemoteChunks`]: the chunks of a remote as a read-only [`ChunkStore`], fetched by range GET.
//!
//! A chunk is located through the remote's index objects ([`Remote::refresh_index`]), its frame
//! is fetched with a range GET, checked (frame header against the frame table, CRC-32C,
//! decompressed length) and the chunk's BLAKE3 compared with its id: a damaged object is an
//! error naming it, never wrong data. A chunk is hashed once while its frame stays cached (the
//! cache remembers which chunks of the frame matched), at its first read, not at every read: a
//! random reader hashes only what it reads, and the readers' threads share the hashing. A miss fetches the frame *and the frames after it* in the
//! same pack (up to [`RemoteReadOptions::fetch_window`] stored bytes) in one request, since a
//! pack holds an image's chunks mostly in address order. Decoded frames go to a bounded memory
//! cache and, when configured, their stored bytes to a bounded directory
//! ([`DiskFrameCache`]), which is untrusted too: what is read back is checked like a fetch.
//!
//! Several threads may read at once (the convert engine's workers, an NBD server's I/O
//! threads), each request running on the remote's runtime: reads are parallel. A frame being
//! fetched is fetched once: other readers of it wait for it. With
//! [`RemoteReadOptions::read_ahead`], reading a frame whose predecessor is cached (a
//! sequential reader) starts a background fetch of the frames after it, at most
//! [`MAX_PREFETCHES`] at once, so a sequential reader finds them cached (`serve --from`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::pack::{FRAME_HEADER_LEN, FrameCache, PackId, check_frame_header, decode_frame};
use crate::remote::disk_cache::DiskFrameCache;
use crate::remote::{Remote, RemotePack};

/// Stored bytes one fetch may cover beyond the frame asked for, by default.
pub const READ_AHEAD: u64 = 8 << 20;
/// Default bytes of decoded frames kept.
pub const REMOTE_FRAME_CACHE: usize = 128 << 20;
/// Background read-ahead fetches in flight at most.
pub const MAX_PREFETCHES: usize = 4;
/// How long a reader waits for a frame another reader is fetching before fetching it itself.
const WAIT_FOR_FETCH: Duration = Duration::from_secs(120);

/// How a [`RemoteChunks`] reads.
#[derive(Clone, Debug)]
pub struct RemoteReadOptions {
    /// Bytes of decoded frames kept in memory.
    pub memory_cache: usize,
    /// A directory of fetched frames and its bound in bytes.
    pub disk_cache: Option<(std::path::PathBuf, u64)>,
    /// Stored bytes a miss fetches at most (the frame asked for, and those after it).
    pub fetch_window: u64,
    /// Stored bytes fetched in the background after a sequentially read frame (0: none).
    pub read_ahead: u64,
    /// Check every chunk read against its id. Off only to walk an encrypted remote without its
    /// key (`verify --remote`, `gc --remote`): its map nodes are not sealed, but their ids are
    /// keyed.
    pub check_ids: bool,
}

impl Default for RemoteReadOptions {
    fn default() -> Self {
        RemoteReadOptions {
            memory_cache: REMOTE_FRAME_CACHE,
            disk_cache: None,
            fetch_window: READ_AHEAD,
            read_ahead: 0,
            check_ids: true,
        }
    }
}

/// Counters of a [`RemoteChunks`].
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Range GETs made for frames (on demand and ahead).
    pub fetches: AtomicUsize,
    /// Of them, background read-ahead.
    pub prefetches: AtomicUsize,
    /// Frames found in the disk cache.
    pub disk_hits: AtomicUsize,
    /// Frames in the disk cache that failed their checks (and were fetched again).
    pub disk_bad: AtomicUsize,
    /// Frames decoded and checked (fetched, or read back from the disk cache).
    pub frames_decoded: AtomicUsize,
    /// Chunks hashed against their ids: once per chunk while its frame stays cached, not once
    /// per read.
    pub chunks_checked: AtomicUsize,
}

#[derive(Debug)]
struct Inner {
    remote: Arc<Remote>,
    cache: FrameCache,
    disk: Option<DiskFrameCache>,
    fetch_window: u64,
    read_ahead: u64,
    /// [`RemoteReadOptions::check_ids`].
    check_ids: bool,
    /// Frames being fetched.
    inflight: Mutex<HashSet<(PackId, u32)>>,
    landed: Condvar,
    prefetching: AtomicUsize,
    stats: ReadStats,
}

/// A remote's chunks, readable; see the module documentation.
#[derive(Debug)]
pub struct RemoteChunks {
    inner: Arc<Inner>,
}

/// Clears frames from the in-flight set (and wakes waiters) when dropped.
struct Claim {
    inner: Arc<Inner>,
    pack: PackId,
    frames: std::ops::RangeInclusive<u32>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut g = self.inner.lock_inflight();
        for n in self.frames.clone() {
            g.remove(&(self.pack, n));
        }
        drop(g);
        self.inner.landed.notify_all();
    }
}

impl RemoteChunks {
    /// Reads through `remote` (whose index must have been refreshed), keeping up to
    /// `cache_bytes` of decoded frames in memory.
    pub fn new(remote: Arc<Remote>, cache_bytes: usize) -> RemoteChunks {
        let options = RemoteReadOptions {
            memory_cache: cache_bytes,
            ..Default::default()
        };
        RemoteChunks::from_inner(remote, options, None)
    }

    /// Reads through `remote` as `options` say (opening the disk cache, if any).
    pub fn with_options(remote: Arc<Remote>, options: RemoteReadOptions) -> Result<RemoteChunks> {
        let disk = match &options.disk_cache {
            Some((dir, max)) => Some(DiskFrameCache::open(dir, *max)?),
            None => None,
        };
        Ok(RemoteChunks::from_inner(remote, options, disk))
    }

    fn from_inner(
        remote: Arc<Remote>,
        options: RemoteReadOptions,
        disk: Option<DiskFrameCache>,
    ) -> RemoteChunks {
        RemoteChunks {
            inner: Arc::new(Inner {
                remote,
                cache: FrameCache::new(options.memory_cache),
                disk,
                fetch_window: options.fetch_window.max(1),
                read_ahead: options.read_ahead,
                check_ids: options.check_ids,
                inflight: Mutex::new(HashSet::new()),
                landed: Condvar::new(),
                prefetching: AtomicUsize::new(0),
                stats: ReadStats::default(),
            }),
        }
    }

    /// Whether chunks read are checked against their ids ([`RemoteReadOptions::check_ids`]).
    pub fn checks_ids(&self) -> bool {
        self.inner.check_ids
    }

    /// The remote.
    pub fn remote(&self) -> &Arc<Remote> {
        &self.inner.remote
    }

    /// Counters.
    pub fn stats(&self) -> &ReadStats {
        &self.inner.stats
    }

    /// Calls `f` with chunk `id`'s bytes inside its cached frame (no copy of the chunk), hashed
    /// against `id` first unless they were since the frame was cached.
    fn with_chunk<R>(&self, id: &ChunkId, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
        let inner = &self.inner;
        let Some((pack, loc, info)) = inner.remote.locate(id) else {
            return Err(Error::Remote {
                object: inner.remote.url().to_string(),
                reason: format!("chunk {id} is in no pack the remote's index objects list"),
            });
        };
        let plain = inner.frame(pack, &info, loc.frame)?;
        let key = (pack, loc.frame);
        let chunk = (loc.offset, loc.len, *id);
        if inner.check_ids && inner.cache.is_checked(key, &plain, chunk) {
            let s = loc.offset as usize;
            if let Some(data) = s
                .checked_add(loc.len as usize)
                .and_then(|e| plain.get(s..e))
            {
                return f(data);
            }
        }
        let object = inner.object(&pack);
        let data =
            inner.check_chunk(&object, &info, loc.frame, id, (loc.offset, loc.len), &plain)?;
        if inner.check_ids {
            inner.cache.mark_checked(key, &plain, chunk);
        }
        f(data)
    }

    /// Bytes in the disk cache, if there is one.
    pub fn disk_cache_bytes(&self) -> Option<u64> {
        self.inner.disk.as_ref().map(DiskFrameCache::bytes)
    }
}

impl Inner {
    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, HashSet<(PackId, u32)>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn object(&self, pack: &PackId) -> String {
        format!(
            "{}/packs/{}",
            self.remote.url().trim_end_matches('/'),
            pack.file_name()
        )
    }

    /// Frame `n` from the memory cache, else from the disk cache (checked).
    fn cached(&self, pack: PackId, info: &RemotePack, n: u32) -> Option<Arc<Vec<u8>>> {
        if let Some(hit) = self.cache.get((pack, n)) {
            return Some(hit);
        }
        let disk = self.disk.as_ref()?;
        let f = info.frames.get(n as usize)?;
        let bytes = disk.get(&pack, n, FRAME_HEADER_LEN + u64::from(f.stored_len))?;
        let object = format!("frame cache copy of {}", self.object(&pack));
        let (h, stored) = bytes.split_at(FRAME_HEADER_LEN as usize);
        match self.decode(&object, info, n, h, stored) {
            Ok(p) => {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.cache.insert((pack, n), p.clone());
                Some(p)
            }
            Err(_) => {
                self.stats.disk_bad.fetch_add(1, Ordering::Relaxed);
                disk.drop_frame(&pack, n);
                None
            }
        }
    }

    /// Frame `n` of a pack (`info`) from its header `h` and stored bytes: the header checked
    /// against the frame table, the body checked (CRC-32C, or the seal) and decoded. Its chunks
    /// are hashed against their ids each at its first read ([`RemoteChunks`]' `with_chunk`).
    fn decode(
        &self,
        object: &str,
        info: &RemotePack,
        n: u32,
        h: &[u8],
        stored: &[u8],
    ) -> Result<Arc<Vec<u8>>> {
        let Some(f) = info.frames.get(n as usize) else {
            return Err(Error::corrupt(object, 0, format!("no frame {n}")));
        };
        check_frame_header(object, n, f, h)?;
        let plain = decode_frame(object, n, f, stored, self.remote.keys().as_deref())?;
        self.stats.frames_decoded.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(plain))
    }

    /// Hashes chunk `id` at `offset..offset + len` of frame `n` (decoded: `plain`) against its
    /// id: the bytes, or an error naming the object, frame and chunk.
    #[allow(clippy::too_many_arguments)]
    fn check_chunk<'a>(
        &self,
        object: &str,
        info: &RemotePack,
        n: u32,
        id: &ChunkId,
        (offset, len): (u32, u32),
        plain: &'a [u8],
    ) -> Result<&'a [u8]> {
        let at = info.frames.get(n as usize).map_or(0, |f| f.offset);
        let s = offset as usize;
        let Some(data) = s.checked_add(len as usize).and_then(|e| plain.get(s..e)) else {
            return Err(Error::corrupt(
                object,
                at,
                format!("chunk {id} runs past frame {n}"),
            ));
        };
        if self.check_ids {
            self.stats.chunks_checked.fetch_add(1, Ordering::Relaxed);
            if self.hasher().id(data) != *id {
                return Err(Error::corrupt(
                    object,
                    at,
                    format!("chunk {id} in frame {n} does not match its id"),
                ));
            }
        }
        Ok(data)
    }

    fn hasher(&self) -> crate::crypt::IdHasher {
        crate::crypt::IdHasher::of(self.remote.keys().as_deref())
    }

    /// Claims frames `first..` of `pack` that are neither cached nor being fetched, within
    /// `window` stored bytes from `first`'s start; None when `first` itself is being fetched or
    /// is in memory.
    fn claim(
        self: &Arc<Self>,
        pack: PackId,
        info: &RemotePack,
        first: u32,
        window: u64,
    ) -> Option<Claim> {
        let mut g = self.lock_inflight();
        // Being fetched, or landed since the caller looked: the caller waits (not at all in
        // the second case) and looks again.
        if g.contains(&(pack, first)) || self.cache.contains((pack, first)) {
            return None;
        }
        let start = info.frames.get(first as usize)?.offset;
        let mut last = first;
        for (i, f) in info.frames.iter().enumerate().skip(first as usize + 1) {
            let i = i as u32;
            let f_end = f.offset + FRAME_HEADER_LEN + u64::from(f.stored_len);
            if f_end - start > window || g.contains(&(pack, i)) || self.cache.contains((pack, i)) {
                break;
            }
            last = i;
        }
        for n in first..=last {
            g.insert((pack, n));
        }
        Some(Claim {
            inner: self.clone(),
            pack,
            frames: first..=last,
        })
    }

    /// The byte range of the claimed frames in the pack.
    fn span(&self, claim: &Claim, info: &RemotePack) -> Result<std::ops::Range<u64>> {
        let object = self.object(&claim.pack);
        let (Some(a), Some(b)) = (
            info.frames.get(*claim.frames.start() as usize),
            info.frames.get(*claim.frames.end() as usize),
        ) else {
            return Err(Error::corrupt(object, 0, "no such frame"));
        };
        let end = b.offset + FRAME_HEADER_LEN + u64::from(b.stored_len);
        if end > info.len || a.offset > end {
            return Err(Error::corrupt(object, a.offset, "frames run past the pack"));
        }
        Ok(a.offset..end)
    }

    /// Checks and decodes the fetched bytes of the claimed frames, caching them; returns the
    /// first.
    fn land(&self, claim: &Claim, info: &RemotePack, bytes: &Bytes) -> Result<Arc<Vec<u8>>> {
        let pack = claim.pack;
        let object = self.object(&pack);
        let start = info.frames[*claim.frames.start() as usize].offset;
        let mut wanted = None;
        for n in claim.frames.clone() {
            let f = &info.frames[n as usize];
            let at = (f.offset - start) as usize;
            let body = at + FRAME_HEADER_LEN as usize;
            let stop = body + f.stored_len as usize;
            let (Some(h), Some(stored)) = (bytes.get(at..body), bytes.get(body..stop)) else {
                return Err(Error::corrupt(
                    &object,
                    f.offset,
                    format!("frame {n} cut short"),
                ));
            };
            let plain = self.decode(&object, info, n, h, stored)?;
            self.cache.insert((pack, n), plain.clone());
            if let Some(d) = &self.disk {
                d.put(&pack, n, &bytes[at..stop]);
            }
            if wanted.is_none() {
                wanted = Some(plain);
            }
        }
        wanted.ok_or_else(|| Error::corrupt(object, start, "no frame read"))
    }

    /// Frame `first` of `pack`: cached, else fetched with the uncached frames after it.
    fn frame(
        self: &Arc<Self>,
        pack: PackId,
        info: &Arc<RemotePack>,
        first: u32,
    ) -> Result<Arc<Vec<u8>>> {
        let deadline = std::time::Instant::now() + WAIT_FOR_FETCH;
        loop {
            if let Some(hit) = self.cached(pack, info, first) {
                self.read_ahead(pack, info, first);
                return Ok(hit);
            }
            let Some(claim) = self.claim(pack, info, first, self.fetch_window) else {
                // Another reader is fetching it: wait for it to land (or fail), then look again.
                let g = self.lock_inflight();
                let wait = deadline.saturating_duration_since(std::time::Instant::now());
                if wait.is_zero() {
                    return Err(self.remote.err(
                        &format!("packs/{}", pack.file_name()),
                        format!("frame {first}: waited too long for another fetch of it"),
                    ));
                }
                let _ = self
                    .landed
                    .wait_timeout_while(g, wait, |g| g.contains(&(pack, first)));
                continue;
            };
            let range = self.span(&claim, info)?;
            let rel = format!("packs/{}", pack.file_name());
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            let bytes = self.remote.block_on(self.remote.get_range(&rel, range))?;
            let plain = self.land(&claim, info, &bytes)?;
            drop(claim);
            self.read_ahead(pack, info, first);
            return Ok(plain);
        }
    }

    /// After frame `n` was read: when the reader looks sequential (the frame before it is
    /// cached, or it is the pack's first) and the frame after the cached run is not, fetches
    /// the next window in the background.
    fn read_ahead(self: &Arc<Self>, pack: PackId, info: &Arc<RemotePack>, n: u32) {
        if self.read_ahead == 0 {
            return;
        }
        if n > 0 && !self.cache.contains((pack, n - 1)) {
            return;
        }
        // The first frame after n not in memory, within one read-ahead window.
        let Some(base) = info.frames.get(n as usize).map(|f| f.offset) else {
            return;
        };
        let mut next = n + 1;
        loop {
            let Some(f) = info.frames.get(next as usize) else {
                return;
            };
            if f.offset - base > self.read_ahead {
                return;
            }
            if !self.cache.contains((pack, next)) {
                break;
            }
            next += 1;
        }
        if self.lock_inflight().contains(&(pack, next)) {
            return;
        }
        if self
            .prefetching
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
                (k < MAX_PREFETCHES).then_some(k + 1)
            })
            .is_err()
        {
            return;
        }
        let Some(claim) = self.claim(pack, info, next, self.read_ahead) else {
            self.prefetching.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let me = self.clone();
        let info = info.clone();
        self.remote.spawn(async move {
            let mut claim = Some(claim);
            let range = claim.as_ref().map(|c| me.span(c, &info));
            if let Some(Ok(range)) = range {
                let rel = format!("packs/{}", pack.file_name());
                me.stats.fetches.fetch_add(1, Ordering::Relaxed);
                me.stats.prefetches.fetch_add(1, Ordering::Relaxed);
                if let Ok(bytes) = me.remote.get_range(&rel, range).await {
                    // Decoding and the cache's file writes run on a blocking thread. A damaged
                    // frame is left uncached: the reader's own fetch reports it.
                    let m = me.clone();
                    let c = claim.take();
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Some(c) = c {
                            let _ = m.land(&c, &info, &bytes);
                        }
                    })
                    .await;
                }
            }
            drop(claim);
            me.prefetching.fetch_sub(1, Ordering::AcqRel);
            // The last owner drops the remote, and with it this runtime: not from in here.
            if let Some(last) = Arc::into_inner(me) {
                std::thread::spawn(move || drop(last));
            }
        });
    }
}

impl ChunkStore for RemoteChunks {
    fn put(&self, _id: ChunkId, _data: &[u8]) -> Result<bool> {
        Err(Error::InvalidArgument(format!(
            "remote {} is read through here, not written",
            self.inner.remote.name()
        )))
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.with_chunk(id, |data| Ok(data.to_vec()))
    }

    fn read_into(&self, id: &ChunkId, len: usize, from: usize, dst: &mut [u8]) -> Result<()> {
        self.with_chunk(id, |data| crate::chunk::copy_part(id, data, len, from, dst))
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.inner.remote.has_chunk(id))
    }

    fn id_hasher(&self) -> crate::crypt::IdHasher {
        self.inner.hasher()
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
