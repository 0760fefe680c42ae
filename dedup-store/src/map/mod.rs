//! Image maps: Merkle trees of chunk ids over a guest address space.
//!
//! A guest address space of `size` bytes is cut into `chunk_size`-byte chunks (a power of two,
//! [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`], recorded per image; the last chunk may be short).
//! For every chunk index the map holds either a [`ChunkId`] or "zero" (all-zero chunks are never
//! stored). The map is a tree of nodes, each stored **as a chunk** of the [`ChunkStore`] (so
//! identical nodes deduplicate like data):
//!
//! ```text
//!              level 2 (root)     [ id | zero | id ]          entries cover FANOUT² chunks each
//!                                   /            \
//!              level 1         [ id | id ... ]   [ zero | id ]      entries cover FANOUT chunks
//!                                /                         \
//!              level 0 (leaf) [ c0 | zero | c2 ... ]     [ ... ]    entries are data chunk ids
//! ```
//!
//! * A leaf (level 0) holds the ids of up to [`FANOUT`] consecutive chunks; a level-`L` node
//!   holds the ids of up to [`FANOUT`] level-`L-1` nodes, so one of its entries covers
//!   `FANOUT^L` chunks.
//! * **A node whose entries are all zero is never stored: it is itself the zero marker.** A
//!   1 TiB empty disk has no node at all (its root is `None`).
//! * The shape depends only on the geometry: `depth` is the smallest `d >= 1` with
//!   `FANOUT^d >= chunks`, and the node at level `L` starting at chunk `s` has exactly
//!   `min(FANOUT, ceil((chunks - s) / FANOUT^L))` entries. Readers check both (a stored node at
//!   the wrong place is corrupt). So reads cost `depth` node loads at any clone depth.
//! * Node ids are BLAKE3-256 of the node bytes ([`ChunkId::of`]); the root id (with size and
//!   chunk size, see [`MapRoot`]) identifies the whole map, and equal subtrees have equal ids,
//!   which is what makes [`diff`] O(changes).
//!
//! # Node byte layout (version 1), all integers little-endian
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic: the first 8 bytes of BLAKE3("vmnest map node v1") ([`node::NODE_MAGIC`]) |
//! | 8 | 2 | version, u16 = 1 |
//! | 10 | 1 | level, u8: 0 for a leaf, `< MAX_DEPTH` |
//! | 11 | 1 | reserved, 0 |
//! | 12 | 4 | count, u32: number of entries, `1..=FANOUT` |
//! | 16 | ceil(count/8) | presence bitmap: bit `i % 8` of byte `i / 8` set when entry `i` is an id; unused high bits 0 |
//! | 16 + ceil(count/8) | 32 × ones | the ids of the present entries, in entry order |
//!
//! The encoding is canonical (at least one present entry, padding bits zero, no trailing
//! bytes), so one tree has exactly one set of node ids. A full leaf of ids is 8,240 bytes.
//!
//! # Operations and their cost
//!
//! * [`MapBuilder`]: streaming ascending [`MapBuilder::push`] keeps one path of nodes in memory
//!   and skips zero subtrees without visiting them; [`MapBuilder::set`] accepts any order at
//!   the cost of buffering the entries set so far (40 bytes each).
//! * [`Map::get`], [`Map::iter_range`]: `depth` loads per lookup, through a bounded node cache;
//!   the range walk never loads a zero subtree, so walking a sparse map is O(allocated).
//! * [`Map::update`]: copy-on-write; writes only the nodes on the paths to changed leaves and
//!   leaves the old root intact. A clone is the same [`MapRoot`] (O(1)).
//! * [`diff`]: descends only where the two trees' ids differ: O(changes × depth) node loads.
//!
//! Durability: [`MapBuilder::finish`] and [`Map::update`] flush the store before returning the
//! root, so a returned root only names durable nodes (and the data chunks put before it).
//!
//! Not covered here: node ids for encrypted stores (they use [`ChunkId::of`], not a keyed hash),
//! and maps whose sizes differ (diff requires equal geometry).

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};

mod builder;
mod diff;
pub mod node;
mod reader;
mod update;

#[cfg(test)]
mod tests;

pub use builder::MapBuilder;
pub use diff::{Diff, DiffEntry, changed, diff};
pub use node::{Node, decode_node, encode_node};
pub use reader::{Map, RangeIter};

/// Entries per node. 256 ids make a full leaf of 8 KiB, and a 1 TiB disk of 4 KiB chunks a
/// tree of depth 4.
pub const FANOUT: usize = 256;
/// Cap on the tree depth (levels of nodes): `FANOUT^MAX_DEPTH` covers every u64 chunk count.
pub const MAX_DEPTH: u8 = 8;
/// Smallest chunk size of a map.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// Largest chunk size of a map.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;

/// What identifies a map: its root node (None when every chunk is zero) and its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MapRoot {
    /// The root node's id, or None for an all-zero address space.
    pub root: Option<ChunkId>,
    /// Size of the guest address space in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Levels of nodes (1 = the root is a leaf); a function of size and chunk size only.
    pub depth: u8,
}

impl MapRoot {
    /// A root for `root` over the given geometry (depth computed; the geometry validated).
    pub fn new(root: Option<ChunkId>, size: u64, chunk_size: u32) -> Result<MapRoot> {
        let geo = Geometry::new(size, chunk_size)?;
        Ok(MapRoot {
            root,
            size,
            chunk_size,
            depth: geo.depth,
        })
    }

    /// Number of chunks: `ceil(size / chunk_size)`.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size.max(1)))
    }
}

/// The shape of a tree, derived from size and chunk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub chunks: u64,
    pub depth: u8,
}

impl Geometry {
    pub(crate) fn new(size: u64, chunk_size: u32) -> Result<Geometry> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(Error::InvalidArgument(format!(
                "map chunk size {chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
            )));
        }
        let chunks = size.div_ceil(u64::from(chunk_size));
        let mut depth = 1u8;
        while span(depth) < u128::from(chunks) {
            depth += 1;
        }
        Ok(Geometry { chunks, depth })
    }

    pub(crate) fn of(root: &MapRoot) -> Result<Geometry> {
        let geo = Geometry::new(root.size, root.chunk_size)?;
        if geo.depth != root.depth {
            return Err(Error::InvalidArgument(format!(
                "map root depth {} does not match its geometry (depth {})",
                root.depth, geo.depth
            )));
        }
        Ok(geo)
    }

    /// Entries of the node at `level` whose first chunk is `start`.
    pub(crate) fn count_at(&self, level: u8, start: u64) -> usize {
        let left = u128::from(self.chunks.saturating_sub(start));
        left.div_ceil(span(level)).min(FANOUT as u128) as usize
    }

    /// The chunk range `[s, e)` covered by entry `slot` of the node at `level` starting at `start`.
    pub(crate) fn entry_range(&self, level: u8, start: u64, slot: usize) -> (u64, u64) {
        let s = u128::from(start) + slot as u128 * span(level);
        let e = (s + span(level)).min(u128::from(self.chunks));
        (s as u64, e as u64)
    }
}

/// Chunks covered by one entry of a node at `level`: `FANOUT^level`.
pub(crate) fn span(level: u8) -> u128 {
    (FANOUT as u128).pow(u32::from(level))
}

/// Loads node `id` expected at `level` starting at chunk `start`, checking its place.
pub(crate) fn load_node<S: ChunkStore + ?Sized>(
    store: &S,
    geo: &Geometry,
    id: &ChunkId,
    level: u8,
    start: u64,
) -> Result<Node> {
    let bytes = store.get(id)?;
    let node = decode_node(id, &bytes)?;
    if node.level != level {
        return Err(Error::corrupt(
            format!("map node {id}"),
            10,
            format!("level {} where the tree needs level {level}", node.level),
        ));
    }
    let want = geo.count_at(level, start);
    if node.entries.len() != want {
        return Err(Error::corrupt(
            format!("map node {id}"),
            12,
            format!(
                "{} entries where the tree needs {want} (node at chunk {start})",
                node.entries.len()
            ),
        ));
    }
    Ok(node)
}

/// Stores a node and returns its id, or None (nothing stored) when every entry is zero.
pub(crate) fn put_node<S: ChunkStore + ?Sized>(
    store: &S,
    level: u8,
    entries: &[Option<ChunkId>],
) -> Result<Option<ChunkId>> {
    if entries.iter().all(Option::is_none) {
        return Ok(None);
    }
    let bytes = encode_node(level, entries);
    let id = store.id_hasher().id(&bytes);
    store.put_meta(id, &bytes)?;
    Ok(Some(id))
}

/// Visits every node and leaf id of the map `root`, depth first. `visit(id, is_node)` returns
/// whether to descend into a node (a caller that marks ids returns false for one already seen:
/// equal ids are equal subtrees, so shared subtrees are walked once). A node that cannot be
/// loaded goes to `on_error` and its subtree is skipped.
pub fn walk<S: ChunkStore + ?Sized>(
    store: &S,
    root: &MapRoot,
    visit: &mut dyn FnMut(&ChunkId, bool) -> bool,
    on_error: &mut dyn FnMut(&ChunkId, Error),
) -> Result<()> {
    let geo = Geometry::of(root)?;
    let Some(top) = root.root else {
        return Ok(());
    };
    let mut stack = vec![(top, geo.depth - 1, 0u64)];
    while let Some((id, level, start)) = stack.pop() {
        if !visit(&id, true) {
            continue;
        }
        let node = match load_node(store, &geo, &id, level, start) {
            Ok(n) => n,
            Err(e) => {
                on_error(&id, e);
                continue;
            }
        };
        for (slot, entry) in node.entries.iter().enumerate() {
            let Some(child) = entry else { continue };
            if level == 0 {
                visit(child, false);
            } else {
                let (s, _) = geo.entry_range(level, start, slot);
                stack.push((*child, level - 1, s));
            }
        }
    }
    Ok(())
}
