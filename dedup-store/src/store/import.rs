//! Importing a disk: the copy engine's [`ImageWriter`] that cuts the guest address space into
//! fixed chunks and builds the disk's map.
//!
//! The engine reads the source on several threads and hands each window to
//! [`ImageWriter::prepare`] there: this writer detects zero chunks, hashes the others, leaves out
//! those the store holds, and compresses the new ones into pack frames ([`EncodedFrame`]) that the
//! pack store only appends. Each prepared window carries its chunk ids (one unit per chunk: the
//! 32-byte id, or nothing for a zero chunk), and [`ImageWriter::commit`], called in ascending
//! order on one thread, streams them into a [`MapBuilder`], so memory stays at one path of map
//! nodes whatever the disk size. The engine never commits whole zero chunks: they cost nothing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use image_format::create::{ImageWriter, Prepared, Unit, WriteOrder};

use crate::chunk::{ChunkId, ChunkStore, is_zero_chunk};
use crate::map::{MapBuilder, MapRoot};
use crate::pack::{EncodedFrame, PackStore};

/// What an import did.
#[derive(Debug, Default)]
pub struct ImportStats {
    /// Chunks of guest data seen (not zero).
    pub chunks: AtomicU64,
    /// Chunks the store did not hold and that were added.
    pub new_chunks: AtomicU64,
    /// Guest bytes of the new chunks.
    pub new_bytes: AtomicU64,
    /// Bytes the new chunks take in packs (after compression, with frame headers).
    pub stored_bytes: AtomicU64,
}

/// The result of an import, filled when the writer finishes.
#[derive(Clone, Debug, Default)]
pub struct ImportHandle {
    root: Arc<Mutex<Option<MapRoot>>>,
    stats: Arc<ImportStats>,
}

impl ImportHandle {
    /// The disk's map, once [`ImageWriter::finish`] returned.
    pub fn root(&self) -> Option<MapRoot> {
        self.root.lock().ok().and_then(|r| *r)
    }

    /// Counters.
    pub fn stats(&self) -> &ImportStats {
        &self.stats
    }
}

/// An [`ImageWriter`] into a store; see the module documentation.
#[derive(Debug)]
pub struct DiskImporter {
    chunks: Arc<PackStore>,
    size: u64,
    chunk_size: u32,
    builder: Mutex<Option<MapBuilder<Arc<PackStore>>>>,
    handle: ImportHandle,
}

impl DiskImporter {
    /// An importer of a `size`-byte disk in `chunk_size`-byte chunks.
    pub fn new(
        chunks: Arc<PackStore>,
        size: u64,
        chunk_size: u32,
    ) -> crate::Result<(DiskImporter, ImportHandle)> {
        let builder = MapBuilder::new(chunks.clone(), size, chunk_size)?;
        let handle = ImportHandle::default();
        Ok((
            DiskImporter {
                chunks,
                size,
                chunk_size,
                builder: Mutex::new(Some(builder)),
                handle: handle.clone(),
            },
            handle,
        ))
    }

    fn store_frame(
        &self,
        plain: &mut Vec<u8>,
        entries: &mut Vec<(ChunkId, u32, u32)>,
    ) -> crate::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let keys = self.chunks.keys().map(|k| k.as_ref());
        let frame = EncodedFrame::encode(plain, std::mem::take(entries), self.chunks.level(), keys)
            .map_err(|source| crate::Error::Io {
                path: self.chunks.root().to_path_buf(),
                op: "zstd compress",
                source,
            })?;
        self.chunks.put_encoded(&frame, plain)?;
        self.handle
            .stats
            .stored_bytes
            .fetch_add(frame.stored.len() as u64 + 16, Ordering::Relaxed);
        plain.clear();
        Ok(())
    }

    fn encode(&self, off: u64, data: &[u8]) -> crate::Result<Vec<Unit>> {
        let cs = self.chunk_size as usize;
        let mut units = Vec::with_capacity(data.len().div_ceil(cs));
        let target = self.chunks.frame_target();
        let mut plain = Vec::with_capacity(target + cs);
        let mut entries = Vec::new();
        let mut batch = HashSet::new();
        let stats = &self.handle.stats;
        let hasher = self.chunks.id_hasher();
        for (i, chunk) in data.chunks(cs).enumerate() {
            let start = off + (i * cs) as u64;
            // The last chunk of a disk is as long as what is left of it.
            let len = (self.size.saturating_sub(start)).min(chunk.len() as u64) as usize;
            let chunk = &chunk[..len];
            if chunk.is_empty() || is_zero_chunk(chunk) {
                units.push(Unit::default());
                continue;
            }
            let id = hasher.id(chunk);
            stats.chunks.fetch_add(1, Ordering::Relaxed);
            if !batch.contains(&id) && !self.chunks.contains(&id)? {
                batch.insert(id);
                entries.push((id, plain.len() as u32, chunk.len() as u32));
                plain.extend_from_slice(chunk);
                stats.new_chunks.fetch_add(1, Ordering::Relaxed);
                stats
                    .new_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if plain.len() >= target {
                    self.store_frame(&mut plain, &mut entries)?;
                }
            }
            units.push(Unit {
                bytes: id.0.to_vec(),
                compressed: false,
            });
        }
        self.store_frame(&mut plain, &mut entries)?;
        Ok(units)
    }
}

impl ImageWriter for DiskImporter {
    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        u64::from(self.chunk_size)
    }

    fn order(&self) -> WriteOrder {
        WriteOrder::Ascending
    }

    fn prepare(&self, off: u64, data: Vec<u8>) -> image_format::Result<Prepared> {
        let units = self.encode(off, &data)?;
        Ok(Prepared {
            off,
            len: data.len() as u64,
            units,
        })
    }

    fn commit(&self, prepared: Prepared) -> image_format::Result<()> {
        let mut builder = self.builder.lock().map_err(|_| poisoned())?;
        let Some(builder) = builder.as_mut() else {
            return Err(poisoned());
        };
        let first = prepared.off / u64::from(self.chunk_size);
        for (i, unit) in prepared.units.iter().enumerate() {
            if let Ok(id) = <[u8; 32]>::try_from(unit.bytes.as_slice()) {
                builder.push(first + i as u64, Some(ChunkId(id)))?;
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, _off: u64, _len: u64) -> image_format::Result<()> {
        // A new map reads zero wherever nothing was committed.
        Ok(())
    }

    fn finish(self: Box<Self>) -> image_format::Result<()> {
        let builder = self
            .builder
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(poisoned)?;
        // Flushes the store: every chunk and node is durable once the root exists.
        let root = builder.finish()?;
        if let Ok(mut slot) = self.handle.root.lock() {
            *slot = Some(root);
        }
        Ok(())
    }
}

fn poisoned() -> image_format::Error {
    image_format::Error::InvalidArgument {
        path: Default::default(),
        reason: "store importer used after a failure".into(),
    }
}
