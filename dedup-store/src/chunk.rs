//! Chunk ids and the chunk store trait.
//!
//! A chunk is a run of bytes cut from a guest address space or a stream; its id is the BLAKE3-256
//! hash of its plaintext (a keyed BLAKE3 when the store is encrypted, so a remote cannot confirm
//! content). All-zero chunks are never stored: callers check [`is_zero_chunk`] first and record a
//! hole instead.

use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;

use crate::crypt::IdHasher;
use crate::error::{Error, Result};

/// The id of a chunk: BLAKE3-256 of its plaintext (keyed for encrypted stores).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data` in an unencrypted store.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The id of `data` in a store encrypted with a key whose id-hashing key is `key`.
    pub fn keyed(key: &[u8; 32], data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(key, data).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Option<ChunkId> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ChunkId(out))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// True when `data` is all zeros (such chunks are never stored).
pub fn is_zero_chunk(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|p| p.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Where chunks live. Implementations: the pack store of a store directory, a remote, and
/// [`MemoryChunkStore`] for tests. All methods take `&self`; implementations lock internally.
///
/// Durability: `put` may buffer; a chunk is durable once [`ChunkStore::flush`] returns. Callers
/// write what refers to a chunk (an image map node, a manifest) only after that flush.
pub trait ChunkStore: Send + Sync {
    /// Stores `data` under `id` (the caller computed `id` from `data`). Returns false when the
    /// chunk was already present (nothing written).
    fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool>;
    /// The plaintext of chunk `id`, verified against its id.
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>>;
    /// Whether chunk `id` is stored (durably or in a buffer not yet flushed).
    fn contains(&self, id: &ChunkId) -> Result<bool>;
    /// Makes every chunk put so far durable.
    fn flush(&self) -> Result<()>;
    /// How this store computes chunk ids: plain BLAKE3, or keyed in an encrypted store. Every
    /// writer computes ids through this, never with [`ChunkId::of`] directly.
    fn id_hasher(&self) -> IdHasher {
        IdHasher::Plain
    }
    /// Stores a metadata chunk (an image map node): in an encrypted store it goes to a frame
    /// that is not sealed, so a remote can be walked for completeness without keys. Map nodes
    /// hold only (keyed) chunk ids and presence, never content.
    fn put_meta(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.put(id, data)
    }

    /// Copies bytes `from..from + dst.len()` of chunk `id`, which must be `len` bytes long, into
    /// `dst`: a read of part of a chunk without a copy of the whole (the pack store copies
    /// straight out of its cached frame).
    fn read_into(&self, id: &ChunkId, len: usize, from: usize, dst: &mut [u8]) -> Result<()> {
        copy_part(id, &self.get(id)?, len, from, dst)
    }
}

/// Copies `from..from + dst.len()` of chunk `id`'s bytes `data` into `dst`, after checking that
/// the chunk has the `len` bytes its map says.
pub(crate) fn copy_part(
    id: &ChunkId,
    data: &[u8],
    len: usize,
    from: usize,
    dst: &mut [u8],
) -> Result<()> {
    if data.len() != len {
        return Err(crate::Error::corrupt(
            format!("chunk {id}"),
            0,
            format!("{} bytes where the map needs {len}", data.len()),
        ));
    }
    let part = from
        .checked_add(dst.len())
        .and_then(|end| data.get(from..end))
        .ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "bytes {from}..+{} of chunk {id} ({len} bytes)",
                dst.len()
            ))
        })?;
    dst.copy_from_slice(part);
    Ok(())
}

/// Forwards every [`ChunkStore`] method through a pointer type to the store it points at.
macro_rules! forward_chunk_store {
    ($($(#[$doc:meta])* $ptr:ty;)*) => {$(
        $(#[$doc])*
        impl<T: ChunkStore + ?Sized> ChunkStore for $ptr {
            fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
                (**self).put(id, data)
            }
            fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
                (**self).get(id)
            }
            fn contains(&self, id: &ChunkId) -> Result<bool> {
                (**self).contains(id)
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn read_into(&self, id: &ChunkId, len: usize, from: usize, dst: &mut [u8]) -> Result<()> {
                (**self).read_into(id, len, from, dst)
            }
            fn id_hasher(&self) -> IdHasher {
                (**self).id_hasher()
            }
            fn put_meta(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
                (**self).put_meta(id, data)
            }
        }
    )*};
}

forward_chunk_store! {
    /// A borrowed store is a store: maps and builders take their store by value, borrowed or
    /// shared.
    &T;
    /// A shared store is a store (long-lived readers such as a stored disk own one).
    std::sync::Arc<T>;
}

/// A chunk store in memory, for tests and for staging.
#[derive(Debug, Default)]
pub struct MemoryChunkStore {
    chunks: RwLock<HashMap<ChunkId, Vec<u8>>>,
}

impl MemoryChunkStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of chunks stored.
    pub fn len(&self) -> usize {
        self.chunks.read().map(|c| c.len()).unwrap_or(0)
    }

    /// True when no chunk is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total plaintext bytes stored.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks
            .read()
            .map(|c| c.values().map(|v| v.len() as u64).sum())
            .unwrap_or(0)
    }
}

impl ChunkStore for MemoryChunkStore {
    fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        let mut chunks = self
            .chunks
            .write()
            .map_err(|_| Error::InvalidArgument("chunk store lock poisoned".into()))?;
        if chunks.contains_key(&id) {
            return Ok(false);
        }
        chunks.insert(id, data.to_vec());
        Ok(true)
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let chunks = self
            .chunks
            .read()
            .map_err(|_| Error::InvalidArgument("chunk store lock poisoned".into()))?;
        chunks.get(id).cloned().ok_or(Error::MissingChunk(*id))
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        let chunks = self
            .chunks
            .read()
            .map_err(|_| Error::InvalidArgument("chunk store lock poisoned".into()))?;
        Ok(chunks.contains_key(id))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_is_blake3_and_round_trips_through_hex() {
        let id = ChunkId::of(b"abc");
        assert_eq!(
            id.to_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("zz"), None);
    }

    #[test]
    fn keyed_ids_differ_from_plain_ones() {
        assert_ne!(ChunkId::keyed(&[7; 32], b"abc"), ChunkId::of(b"abc"));
    }

    #[test]
    fn memory_store_deduplicates() {
        let s = MemoryChunkStore::new();
        let id = ChunkId::of(b"x");
        assert!(s.put(id, b"x").unwrap());
        assert!(!s.put(id, b"x").unwrap());
        assert_eq!(s.get(&id).unwrap(), b"x");
        assert!(matches!(
            s.get(&ChunkId::of(b"y")),
            Err(Error::MissingChunk(_))
        ));
    }
}
