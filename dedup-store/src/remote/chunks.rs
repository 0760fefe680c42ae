//! [`RemoteChunks`]: the chunks of a remote as a read-only [`ChunkStore`], fetched by range GET.
//!
//! A chunk is located through the remote's index objects ([`Remote::refresh_index`]), its frame
//! is fetched with a range GET, checked (frame header against the frame table, CRC-32C,
//! decompressed length) and the chunk's BLAKE3 compared with its id: a damaged object is an
//! error naming it, never wrong data. A miss fetches the frame *and the frames after it* in the
//! same pack (up to [`READ_AHEAD`] stored bytes) in one request, since a pack holds an image's
//! chunks mostly in address order: sequential reads (restore, pull) then cost one request per
//! few MiB. Decoded frames go to a bounded cache. Several threads may read at once (the convert
//! engine's workers), each request running on the remote's runtime: reads are parallel.
//!
//! This is the reader a lazily fetching export (`serve --from`, not built yet) would sit on.

use std::sync::Arc;

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::pack::{FRAME_HEADER_LEN, FrameCache, PackId, check_frame_header, decode_frame};
use crate::remote::{Remote, RemotePack};

/// Stored bytes one fetch may cover beyond the frame asked for.
pub const READ_AHEAD: u64 = 8 << 20;
/// Default bytes of decoded frames kept.
pub const REMOTE_FRAME_CACHE: usize = 128 << 20;

/// A remote's chunks, readable; see the module documentation.
#[derive(Debug)]
pub struct RemoteChunks {
    remote: Arc<Remote>,
    cache: FrameCache,
}

impl RemoteChunks {
    /// Reads through `remote` (whose index must have been refreshed), keeping up to
    /// `cache_bytes` of decoded frames.
    pub fn new(remote: Arc<Remote>, cache_bytes: usize) -> RemoteChunks {
        RemoteChunks {
            remote,
            cache: FrameCache::new(cache_bytes),
        }
    }

    /// The remote.
    pub fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }

    fn object(&self, pack: &PackId) -> String {
        format!(
            "{}/packs/{}",
            self.remote.url().trim_end_matches('/'),
            pack.file_name()
        )
    }

    /// Frame `first` of `pack`, fetching it and the uncached frames after it.
    fn frame(&self, pack: PackId, info: &RemotePack, first: u32) -> Result<Arc<Vec<u8>>> {
        if let Some(hit) = self.cache.get((pack, first)) {
            return Ok(hit);
        }
        let object = self.object(&pack);
        let Some(f0) = info.frames.get(first as usize) else {
            return Err(Error::corrupt(object, 0, format!("no frame {first}")));
        };
        let start = f0.offset;
        let mut end = f0.offset + FRAME_HEADER_LEN + u64::from(f0.stored_len);
        let mut last = first;
        for (i, f) in info.frames.iter().enumerate().skip(first as usize + 1) {
            let f_end = f.offset + FRAME_HEADER_LEN + u64::from(f.stored_len);
            if f_end - start > READ_AHEAD || self.cache.get((pack, i as u32)).is_some() {
                break;
            }
            end = f_end;
            last = i as u32;
        }
        if end > info.len {
            return Err(Error::corrupt(object, start, "frames run past the pack"));
        }
        let rel = format!("packs/{}", pack.file_name());
        let bytes = self
            .remote
            .block_on(self.remote.get_range(&rel, start..end))?;
        let mut wanted = None;
        for n in first..=last {
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
            check_frame_header(&object, n, f, h)?;
            let plain = Arc::new(decode_frame(&object, n, f, stored)?);
            self.cache.insert((pack, n), plain.clone());
            if n == first {
                wanted = Some(plain);
            }
        }
        wanted.ok_or_else(|| Error::corrupt(object, start, format!("frame {first} not read")))
    }
}

impl ChunkStore for RemoteChunks {
    fn put(&self, _id: ChunkId, _data: &[u8]) -> Result<bool> {
        Err(Error::InvalidArgument(format!(
            "remote {} is read through here, not written",
            self.remote.name()
        )))
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let Some((pack, loc, info)) = self.remote.locate(id) else {
            return Err(Error::Remote {
                object: self.remote.url().to_string(),
                reason: format!("chunk {id} is in no pack the remote's index objects list"),
            });
        };
        let plain = self.frame(pack, &info, loc.frame)?;
        let s = loc.offset as usize;
        let object = self.object(&pack);
        let Some(data) = s
            .checked_add(loc.len as usize)
            .and_then(|e| plain.get(s..e))
        else {
            return Err(Error::corrupt(
                object,
                0,
                format!("chunk {id} runs past frame {}", loc.frame),
            ));
        };
        if ChunkId::of(data) != *id {
            let at = info.frames.get(loc.frame as usize).map_or(0, |f| f.offset);
            return Err(Error::corrupt(
                object,
                at,
                format!("chunk {id} in frame {} does not match its id", loc.frame),
            ));
        }
        Ok(data.to_vec())
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.remote.has_chunk(id))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
