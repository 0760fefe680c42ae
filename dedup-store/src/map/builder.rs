//! Building a map from scratch.

use std::collections::BTreeMap;

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::map::{FANOUT, Geometry, MapRoot, put_node, span};

/// Builds a map bottom-up into a [`ChunkStore`].
///
/// [`MapBuilder::push`] streams entries in ascending order: only the current node of each level
/// (one path, `depth × FANOUT` entries) is in memory, and gaps are skipped a whole zero subtree at
/// a time. [`MapBuilder::set`] accepts any order at or after the streaming position by buffering
/// the entries until they are pushed or until [`MapBuilder::finish`].
#[derive(Debug)]
pub struct MapBuilder<S: ChunkStore> {
    store: S,
    geo: Geometry,
    size: u64,
    chunk_size: u32,
    /// The entries of the open node at each level, bottom up.
    levels: Vec<Vec<Option<ChunkId>>>,
    /// Every chunk index below this one is already in `levels`.
    cursor: u64,
    /// Entries from `set` not yet streamed.
    pending: BTreeMap<u64, Option<ChunkId>>,
}

impl<S: ChunkStore> MapBuilder<S> {
    /// A builder of an all-zero map over `size` bytes in `chunk_size`-byte chunks.
    pub fn new(store: S, size: u64, chunk_size: u32) -> Result<Self> {
        let geo = Geometry::new(size, chunk_size)?;
        Ok(MapBuilder {
            store,
            geo,
            size,
            chunk_size,
            levels: vec![Vec::new(); usize::from(geo.depth)],
            cursor: 0,
            pending: BTreeMap::new(),
        })
    }

    fn check_index(&self, index: u64) -> Result<()> {
        if index >= self.geo.chunks {
            return Err(Error::InvalidArgument(format!(
                "chunk index {index} is past the map's {} chunks",
                self.geo.chunks
            )));
        }
        if index < self.cursor {
            return Err(Error::InvalidArgument(format!(
                "chunk index {index} was already streamed (next is {})",
                self.cursor
            )));
        }
        Ok(())
    }

    /// Records chunk `index` (None = zero), in any order not below the last pushed index.
    /// Buffered in memory until pushed past or finished.
    pub fn set(&mut self, index: u64, id: Option<ChunkId>) -> Result<()> {
        self.check_index(index)?;
        self.pending.insert(index, id);
        Ok(())
    }

    /// Streams chunk `index` (None = zero); indexes must ascend. Chunks skipped are zero (or
    /// what `set` recorded for them).
    pub fn push(&mut self, index: u64, id: Option<ChunkId>) -> Result<()> {
        self.check_index(index)?;
        self.pending.remove(&index);
        while let Some((&i, _)) = self.pending.first_key_value() {
            if i >= index {
                break;
            }
            let (i, v) = self.pending.pop_first().expect("checked non-empty");
            self.emit(i, v)?;
        }
        self.emit(index, id)
    }

    /// Writes the remaining nodes, flushes the store, and returns the root.
    pub fn finish(mut self) -> Result<MapRoot> {
        while let Some((i, v)) = self.pending.pop_first() {
            self.emit(i, v)?;
        }
        self.advance_to(self.geo.chunks)?;
        let top = usize::from(self.geo.depth) - 1;
        for level in 0..top {
            if !self.levels[level].is_empty() {
                let entries = std::mem::take(&mut self.levels[level]);
                let id = put_node(&self.store, level as u8, &entries)?;
                self.levels[level + 1].push(id);
            }
        }
        debug_assert_eq!(self.levels[top].len(), self.geo.count_at(top as u8, 0));
        let root = put_node(&self.store, top as u8, &self.levels[top])?;
        self.store.flush()?;
        Ok(MapRoot {
            root,
            size: self.size,
            chunk_size: self.chunk_size,
            depth: self.geo.depth,
        })
    }

    fn emit(&mut self, index: u64, id: Option<ChunkId>) -> Result<()> {
        self.advance_to(index)?;
        self.levels[0].push(id);
        self.cursor = index + 1;
        self.close_full(0)
    }

    /// Appends zero entries until `cursor == target`, a whole zero subtree at a time where the
    /// cursor is aligned to one.
    fn advance_to(&mut self, target: u64) -> Result<()> {
        while self.cursor < target {
            let cursor = u128::from(self.cursor);
            let level = (0..self.geo.depth)
                .rev()
                .find(|&l| {
                    cursor % span(l) == 0
                        && (cursor + span(l)).min(u128::from(self.geo.chunks)) <= u128::from(target)
                })
                .unwrap_or(0);
            self.levels[usize::from(level)].push(None);
            self.cursor = (cursor + span(level)).min(u128::from(self.geo.chunks)) as u64;
            self.close_full(usize::from(level))?;
        }
        Ok(())
    }

    /// Closes full nodes from `level` up (never the root level, closed by `finish`).
    fn close_full(&mut self, mut level: usize) -> Result<()> {
        let top = usize::from(self.geo.depth) - 1;
        while level < top && self.levels[level].len() == FANOUT {
            let entries = std::mem::take(&mut self.levels[level]);
            let id = put_node(&self.store, level as u8, &entries)?;
            self.levels[level + 1].push(id);
            level += 1;
        }
        Ok(())
    }
}
